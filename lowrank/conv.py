"""Convolution geometry: the centre-tap embedding of a 1×1 update, its validity check,
2-D → 3-D kernel inflation, and the `F.convNd` for a kernel's dimensionality.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import require_float, require_int, require_ints, require_ndim, require_tensor
from .errors import GeometryError, ShapeError

_CONV_FUNCTIONS: dict[int, Callable[..., torch.Tensor]] = {
    1: F.conv1d,
    2: F.conv2d,
    3: F.conv3d,
}


def conv_function(spatial_dims: int) -> Callable[..., torch.Tensor]:
    """`F.conv1d`, `F.conv2d` or `F.conv3d` for a kernel with `spatial_dims` axes."""
    dims = require_int("spatial_dims", spatial_dims, error=ShapeError)
    if dims not in _CONV_FUNCTIONS:
        raise ShapeError(f"convolutions have 1, 2 or 3 spatial dimensions, got {dims}")
    return _CONV_FUNCTIONS[dims]


def _as_kernel_size(kernel_size: object, spatial_dims: int | None) -> tuple[int, ...]:
    """`kernel_size` (an int, or a tuple or list of ints) as a tuple of `spatial_dims` ints
    (an int is repeated; a tuple keeps its length); `ShapeError` naming it for anything else."""
    if isinstance(kernel_size, (tuple, list)):
        return require_ints("kernel_size", kernel_size, error=ShapeError)
    size = require_int("kernel_size", kernel_size, error=ShapeError)
    if spatial_dims is None:
        raise ShapeError("an int kernel_size needs spatial_dims (1, 2 or 3)")
    return (size,) * spatial_dims


def centre_tap(
    delta: torch.Tensor, kernel_size: int | Sequence[int], *, spatial_dims: int | None = None
) -> torch.Tensor:
    """Place a 1×1 update in the centre tap of a kernel.

    `delta (out, in)` or `(out, in, 1, …)` becomes `(out, in, *kernel_size)`, zero
    except at the centre. A convolution with this kernel equals a parallel 1×1
    branch only where `check_centre_tap` accepts the base convolution. An int
    `kernel_size` needs `spatial_dims`, unless `delta` already has its unit axes.
    """
    delta = require_tensor("delta", delta)
    require_float("delta", delta)
    require_ndim("delta", delta, range(2, 6), "(out, in) or (out, in, 1, …)")
    if any(size != 1 for size in delta.shape[2:]):
        raise ShapeError(f"delta must be 1×1: shape (out, in, 1, …), got {tuple(delta.shape)}")
    if spatial_dims is not None:
        spatial_dims = require_int("spatial_dims", spatial_dims, minimum=1, maximum=3,
                                   error=ShapeError)  # fmt: skip
    dims = spatial_dims if spatial_dims is not None else (delta.ndim - 2 or None)
    kernel = _as_kernel_size(kernel_size, dims)
    if spatial_dims is not None and len(kernel) != spatial_dims:
        raise ShapeError(
            f"kernel_size {kernel} has {len(kernel)} entries but spatial_dims is {spatial_dims}"
        )
    if not 1 <= len(kernel) <= 3:
        raise ShapeError(f"kernel_size must have 1, 2 or 3 entries, got {kernel}")
    if delta.ndim > 2 and delta.ndim - 2 != len(kernel):
        raise ShapeError(
            f"delta has {delta.ndim - 2} spatial axes (shape {tuple(delta.shape)}) but "
            f"kernel_size {kernel} has {len(kernel)}"
        )
    require_odd_kernel(kernel)
    out_features, in_features = delta.shape[:2]
    kernel_tensor = delta.new_zeros(out_features, in_features, *kernel)
    centre = (slice(None), slice(None), *(k // 2 for k in kernel))
    kernel_tensor[centre] = delta.reshape(out_features, in_features)
    return kernel_tensor


def has_centre_tap(kernel: Sequence[int]) -> bool:
    """Whether `kernel` has a centre tap: every size odd (and positive)."""
    return all(k >= 1 and k % 2 for k in kernel)


def require_odd_kernel(kernel: Sequence[int]) -> None:
    """`GeometryError` unless `kernel` has a centre tap (`has_centre_tap`)."""
    if not has_centre_tap(kernel):
        raise GeometryError(f"the centre tap needs odd kernel sizes, got {tuple(kernel)}")


def check_centre_tap(conv: nn.Module) -> None:
    """Raise `GeometryError` unless a centre-tap update of `conv` equals a parallel 1×1 branch.

    That holds when the convolution keeps the spatial size and samples its input at
    the output position with its centre tap: odd kernel, stride 1, padding
    `dilation·(k−1)/2` per axis ("same"), groups 1. The stride-2 downsampling
    convolutions of a diffusion UNet fail this check.
    """
    if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed:
        raise GeometryError(
            f"check_centre_tap expects an nn.Conv1d/Conv2d/Conv3d, got {type(conv).__name__}"
        )
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    problems = []
    if not has_centre_tap(kernel):
        problems.append(f"kernel_size {kernel} is not odd")
    if any(s != 1 for s in stride):
        problems.append(f"stride {stride} is not 1")
    if conv.groups != 1:
        problems.append(f"groups={conv.groups} (a 1×1 branch mixes all input channels)")
    same = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    padding = conv.padding
    if padding == "valid":  # no padding: the size is kept only where the kernel is 1 wide
        padding = (0,) * len(kernel)
    if padding != "same" and tuple(padding) != same:
        problems.append(f"padding {padding} is not 'same' {same}")
    if problems:
        raise GeometryError(
            f"a centre-tap (parallel 1×1) update is not equivalent to {conv!r}: "
            + "; ".join(problems)
        )


def inflate(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """A 1-D or 2-D kernel `(out, in, *k)` as one with a leading depth axis `(out, in, depth, *k)`.

    Zero except in the centre depth slice (`depth` must be a positive odd int). A convolution
    with it, padding `depth // 2` and stride 1 along depth, run on a stack of slices equals
    the original convolution applied to each slice.
    """
    depth = require_int("depth", depth, error=GeometryError)
    if depth < 1 or depth % 2 == 0:
        raise GeometryError(f"depth must be a positive odd number, got {depth}")
    weight = require_tensor("weight", weight)
    require_float("weight", weight)
    require_ndim("weight", weight, (3, 4), "(out, in, *k) with a 1-D or 2-D kernel")
    inflated = weight.new_zeros(weight.shape[0], weight.shape[1], depth, *weight.shape[2:])
    inflated[:, :, depth // 2] = weight
    return inflated
