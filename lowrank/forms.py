"""The factor forms of a low-rank weight update, their validation and dense recomposition.

Every form is a frozen dataclass of tensors that stands for a dense update ΔW of a
linear weight `(out, in)` or a convolution weight `(out, in, *k)` (1-, 2- or 3-D
kernel). Each has `shape` (of ΔW), `rank`, `num_params` and `to_dense()`; the
recompositions are one matmul chain each, with no Python loop over channels or
ranks. The derivations are in `docs/math.md`.

- `LoRA`: `down (r, in, *k)`, `up (out, r, 1…)`; `r (in·K + out)` parameters.
- `Tucker2`: `down (r_in, in, 1…)`, `mid (r_out, r_in, *k)`, `up (out, r_out, 1…)`;
  `r_out r_in K + r_out out + r_in in` parameters.
- `CP`: `out (out, R)`, `in (in, R)`, `(k_i, R)` per axis, `weights (R,)`;
  `R (out + in + Σ k_i)` parameters (+R with weights).
- `LoHa` (LyCORIS): the Hadamard product of two unscaled `LoRA` or `Tucker2` halves.
- `LoKr` (LyCORIS): the Kronecker product of `w1 (a, c)` and `w2 (b, d, *k)`, each dense or
  factored.
- `Full` (LyCORIS' `full`): the dense difference of one parameter, of its shape (a weight's,
  or a 1-D bias's or norm weight's).

ΔW is summed and scaled in float32 (float64 for float64 factors) and rounded once to the
factors' dtype, so float16/bfloat16 factors whose product fits the dtype give it even where
`scale · up` or an intermediate product would not; so are the gradients of float16/bfloat16
factors (`lowrank._products`, where a LoRA's GEMM runs in their dtype).
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from ._checks import (
    HALF_DTYPES,
    all_finite,
    is_index,
    require_choice,
    require_flag,
    require_float,
    require_float_dtype,
    require_int,
    require_ints,
    require_ndim,
    require_real,
    require_same_dtype_device,
    require_tensor,
    require_unbatched,
    wider_dtype_advice,
    work_dtype,
)
from ._products import (
    Bounds,
    gemm_alpha,
    peak,
    product_bounds,
    rounded_product,
    row_sum_peak,
    scaled,
    scaled_mm,
)
from .errors import (
    ArgumentError,
    DeviceError,
    DTypeError,
    NonFiniteError,
    RankError,
    ShapeError,
)

MAX_SPATIAL_DIMS = 3


def _divisor(rank: object, rslora: object) -> float:
    """`rank` (an int ≥ 1 within float64's range, else `RankError`), or `sqrt(rank)` with
    `rslora`, as a float."""
    rank = require_int("rank", rank, minimum=1, error=RankError)
    if rank > sys.float_info.max:
        raise RankError(f"rank is beyond float64's range: an int of {rank.bit_length()} bits")
    return math.sqrt(rank) if require_flag("rslora", rslora) else float(rank)


def scale_from_alpha(alpha: float, rank: int, *, rslora: bool = False) -> float:
    """The scale a file's `alpha` stands for: `alpha / rank`, or `alpha / sqrt(rank)` (rsLoRA).

    `alpha` is a finite real number, `rank` an int ≥ 1 (`ArgumentError`, `NonFiniteError`,
    `RankError` otherwise).
    """
    divisor = _divisor(rank, rslora)
    return require_real("alpha", alpha) / divisor


def alpha_from_scale(scale: float, rank: int, *, rslora: bool = False) -> float:
    """An `alpha` that `scale_from_alpha(alpha, rank, rslora=rslora)` maps to exactly `scale`.

    Starts from `scale · rank` (`scale · sqrt(rank)`), which can miss by one rounding, and
    steps by one ulp at a time (at most 8 each way) to the nearest alpha that resolves
    to `scale` bit for bit; if none does, the start is returned. `NonFiniteError` naming
    `scale` where `scale · rank` is beyond a float (no alpha gives it).
    """
    value = require_real("scale", scale)
    product = value * _divisor(rank, rslora)
    # an alpha near the largest float can give a scale whose product with the rank rounds
    # beyond it: look below it then
    start = product if math.isfinite(product) else math.copysign(sys.float_info.max, product)
    candidates = [start]
    for direction in (math.inf, -math.inf):
        alpha = start
        for _ in range(8):
            alpha = math.nextafter(alpha, direction)
            candidates.append(alpha)
    finite = (alpha for alpha in candidates if math.isfinite(alpha))
    for alpha in sorted(finite, key=lambda a: abs(a - start)):
        if scale_from_alpha(alpha, rank, rslora=rslora) == value:
            return alpha
    if not math.isfinite(product):
        raise NonFiniteError(
            f"scale {value!r} times {'√' if rslora else ''}rank {rank} is beyond a float's "
            "range: no finite alpha gives it"
        )
    return start


def kernel_volume(kernel_size: Sequence[int]) -> int:
    """K = ∏ k_i, the number of taps of a kernel (1 for a linear weight, `kernel_size=()`)."""
    return math.prod([int(k) for k in kernel_size])  # a list: dynamo traces no generator


def _contiguous(rows: slice) -> slice:
    """`rows` if it is a contiguous slice (step 1 or None), else an `ArgumentError` (not a
    slice) or a `ShapeError` (a step)."""
    if not isinstance(rows, slice):
        raise ArgumentError(f"rows must be a slice of output channels, got {type(rows).__name__}")
    if rows.step not in (None, 1):
        raise ShapeError(f"rows must be a contiguous slice (step 1), got {rows}")
    for bound in (rows.start, rows.stop):
        if bound is not None and not is_index(bound):
            raise ArgumentError(
                f"rows must be a slice of integer channel indices, got {rows} "
                f"(a {type(bound).__name__} bound)"
            )
    return rows


def _shown(value: object) -> str:
    """A factor as `dtype[shape]` (and its device off the CPU), a tuple of them element by
    element, anything else as `repr` gives it."""
    if isinstance(value, torch.Tensor):
        where = "" if value.device.type == "cpu" else f" on {value.device}"
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}{where}"
    if isinstance(value, list):
        return f"[{', '.join(map(_shown, value))}]"
    if isinstance(value, tuple):
        return f"({', '.join(map(_shown, value))}{',' if len(value) == 1 else ''})"
    return repr(value)


def _form_repr(form: object) -> str:
    """`LoRA(down=float32[4, 16], up=float32[12, 4], scale=0.5)`: one line of shapes and
    dtypes for every form, never the factors' values."""
    shown = ", ".join(f"{f.name}={_shown(getattr(form, f.name))}" for f in fields(form))
    return f"{type(form).__name__}({shown})"


def _row_slice(tensor: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """`tensor[rows]` for a contiguous slice of output channels (all rows for None)."""
    return tensor if rows is None else tensor[_contiguous(rows)]


RowBlocks = Sequence[tuple[int, int]]
"""Ranges `(start, stop)` of ΔW's output rows, taken in turn (`with_rows`): at least one,
each `0 ≤ start < stop ≤` ΔW's rows, else a `ShapeError`."""


def _require_blocks(blocks: object, rows: int) -> list[tuple[int, int]]:
    """`blocks` as `[(start, stop)]`, each a non-empty range of ΔW's `rows` output rows,
    `0 ≤ start < stop ≤ rows`: an `ArgumentError` for what is no sequence of integer pairs,
    a `ShapeError` for no blocks or one outside the rows (slicing would clip or wrap it
    silently)."""
    if not isinstance(blocks, Sequence) or not all(
        isinstance(b, Sequence) and len(b) == 2 and all(map(is_index, b)) for b in blocks
    ):
        raise ArgumentError(
            f"blocks must be a sequence of (start, stop) row indices, got {blocks!r:.80}"
        )
    ranges = [(operator.index(start), operator.index(stop)) for start, stop in blocks]
    if not ranges:
        raise ShapeError("blocks must name at least one range (start, stop) of ΔW's rows")
    for start, stop in ranges:
        if not 0 <= start < stop <= rows:
            raise ShapeError(
                f"a block of rows must satisfy 0 ≤ start < stop ≤ {rows} (ΔW's output rows), "
                f"got ({start}, {stop})"
            )
    return ranges


def _rows_of(tensor: torch.Tensor, blocks: RowBlocks) -> torch.Tensor:
    """The rows `blocks` (checked by `_require_blocks`) of `tensor`, in turn, as a new
    tensor."""
    return torch.cat([tensor[start:stop] for start, stop in _require_blocks(blocks, len(tensor))])


def _require_positive_rank(name: str, tensor: torch.Tensor, axis: int) -> None:
    if tensor.shape[axis] < 1:
        raise RankError(
            f"{name} has rank {tensor.shape[axis]} along axis {axis} "
            f"(shape {tuple(tensor.shape)}); ranks must be at least 1"
        )


def _require_nonempty(form: object) -> None:
    """A `ShapeError` if the ΔW `form` stands for has an axis of size 0 (an empty `in`,
    `out` or kernel axis: no weight to adapt)."""
    shape = tuple(form.shape)  # type: ignore[attr-defined]
    if 0 in shape:
        raise ShapeError(
            f"a {type(form).__name__} stands for ΔW of shape {shape}; every axis of ΔW (out, "
            "in and each kernel axis) must have at least one element"
        )


def _require_unit_tail(name: str, tensor: torch.Tensor, layout: str) -> None:
    if any(size != 1 for size in tensor.shape[2:]):
        expected = (*tensor.shape[:2], *([1] * (tensor.ndim - 2)))
        raise ShapeError(
            f"{name} must have shape {layout} = {expected} (a 1×1 factor), "
            f"got {tuple(tensor.shape)}"
        )


def _require_conv_ndim(name: str, tensor: torch.Tensor, layout: str) -> None:
    require_ndim(name, tensor, range(2, 3 + MAX_SPATIAL_DIMS), layout)


@dataclass(frozen=True, eq=False)
class LoRA:
    """ΔW = scale · up @ down, for a linear weight or a convolution ("LoCon").

    Shapes: `down (r, in)` and `up (out, r)` for a linear weight `(out, in)`;
    `down (r, in, *k)` and `up (out, r, 1, …)` for a convolution weight
    `(out, in, *k)`. A 1×1 `down` on a k×k convolution is the centre-tap form: see
    `lowrank.centre_tap`.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    __repr__ = _form_repr

    def __post_init__(self) -> None:
        down = require_tensor("down", self.down)
        up = require_tensor("up", self.up)
        _require_conv_ndim("down", down, "(r, in, *k)")
        require_float("down", down)
        require_same_dtype_device({"down": down, "up": up})
        if up.ndim != down.ndim:
            raise ShapeError(
                f"up must have {down.ndim} dimensions (out, r{', 1' * (down.ndim - 2)}) to match "
                f"down {tuple(down.shape)}, got shape {tuple(up.shape)}"
            )
        _require_unit_tail("up", up, "(out, r, 1, …)")
        if up.shape[1] != down.shape[0]:
            raise RankError(
                f"up has rank {up.shape[1]} (shape {tuple(up.shape)}) but down has rank "
                f"{down.shape[0]} (shape {tuple(down.shape)}); up.shape[1] must equal down.shape[0]"
            )
        _require_positive_rank("down", down, 0)
        _require_nonempty(self)
        object.__setattr__(self, "scale", require_real("scale", self.scale))

    @staticmethod
    def count(in_features: int, out_features: int, kernel_size: Sequence[int], rank: int) -> int:
        """Parameters of a rank-r LoRA of a `(out, in, *kernel_size)` weight: `r (in·K + out)`.

        The formula alone, unchecked (each form's `count` is); `lowrank.param_count` checks
        its arguments first."""
        return rank * (in_features * kernel_volume(kernel_size) + out_features)

    @property
    def rank(self) -> int:
        """The rank r."""
        return self.down.shape[0]

    @property
    def shape(self) -> torch.Size:
        """Shape of ΔW: `(out, in, *k)`."""
        return torch.Size((self.up.shape[0], *self.down.shape[1:]))

    @property
    def num_params(self) -> int:
        """Number of scalars in the factors: `r (in·K + out)`."""
        return self.down.numel() + self.up.numel()

    def to_dense(self, rows: slice | None = None) -> torch.Tensor:
        """ΔW of shape `self.shape` in the factors' dtype, scale applied: one GEMM
        `(out, r) @ (r, in·K)` on the factors themselves, which sums in float32 (float64)
        also for float16/bfloat16 factors and applies the scale as its alpha before its one
        rounding (no float32 copy of ΔW).

        `rows` (a slice of output channels) gives only `ΔW[rows]`, from those rows of `up`.
        """
        return self._product(rows, self.down.dtype)

    def _bounds(self) -> Bounds:
        """Bounds on max |ΔW| / |scale| and on every sum on the way (`recompose`):
        `max_t ‖up[t]‖₁ · max |down|`."""
        final = row_sum_peak(self.up.reshape(self.up.shape[:2])) * peak(self.down)
        return final, final, final

    def _accumulated(self, rows: slice | None = None) -> torch.Tensor:
        """`ΔW[rows]` in `work_dtype` of the factors, scale applied."""
        return self._product(rows, work_dtype(self.down.dtype))

    def _product(self, rows: slice | None, dtype: torch.dtype) -> torch.Tensor:
        """`ΔW[rows]` from the factors cast to `dtype`, scale applied."""
        out_features, rank = self.up.shape[:2]
        up = _row_slice(self.up.reshape(out_features, rank), rows).to(dtype)
        delta = scaled_mm(up, self.down.reshape(rank, -1).to(dtype), self.scale)
        return delta.view(up.shape[0], *self.shape[1:])

    def to(self, *args: object, **kwargs: object) -> LoRA:
        """The same form with every factor passed through `Tensor.to(*args, **kwargs)`."""
        return LoRA(self.down.to(*args, **kwargs), self.up.to(*args, **kwargs), self.scale)

    def transposed(self) -> LoRA:
        """The LoRA of ΔWᵀ, `(in, out)`, for a linear weight: `up' = downᵀ (in, r)`,
        `down' = upᵀ (r, out)`, the scale kept (`ShapeError` for a convolution's)."""
        if self.down.ndim != 2:
            raise ShapeError(
                f"only a linear LoRA has a transpose, got down {tuple(self.down.shape)}"
            )
        return LoRA(self.up.t().contiguous(), self.down.t().contiguous(), self.scale)

    def with_rows(self, blocks: RowBlocks) -> LoRA:
        """The LoRA of ΔW's output rows `blocks` in turn: `up`'s rows, `down` (copied) and
        the scale kept, exactly."""
        return LoRA(self.down.clone(), _rows_of(self.up, blocks), self.scale)

    def named_factors(self) -> dict[str, torch.Tensor]:
        """The factors by field name: `down`, `up`."""
        return {"down": self.down, "up": self.up}

    def with_kernel(self, kernel_size: Sequence[int]) -> LoRA:
        """The same ΔW with a flattened `down (r, in·K)` unfolded to `(r, in, *kernel_size)`.

        LyCORIS stores the halves of LoHa and LoKr on a convolution flattened like this;
        the unfolding is a reshape (row-major, as `W.reshape(out, -1)` flattens a kernel),
        so ΔW keeps every value. A form whose kernel already is `kernel_size` comes back
        unchanged.
        """
        kernel = require_ints("kernel_size", kernel_size, minimum=1, error=ShapeError)
        if tuple(self.shape[2:]) == kernel:
            return self
        rank, flat = self.down.shape[0], self.down.shape[1]
        taps = kernel_volume(kernel)
        if self.down.ndim != 2 or not kernel or flat % taps:
            raise ShapeError(
                f"down {tuple(self.down.shape)} cannot be unfolded to kernel {kernel}: it must "
                f"be a flattened (r, in·K) factor with in·K divisible by K = {taps}"
            )
        ones = (1,) * len(kernel)
        down = self.down.reshape(rank, flat // taps, *kernel)
        return LoRA(down, self.up.reshape(self.up.shape[0], rank, *ones), self.scale)


@dataclass(frozen=True, eq=False)
class Tucker2:
    """ΔW = scale · up ×₀ (mid ×₁ down): 1×1 down, k×k mid, 1×1 up (LyCORIS `lora_mid`).

    Shapes: `down (r_in, in, 1, …)`, `mid (r_out, r_in, *k)`, `up (out, r_out, 1, …)`;
    ΔW has shape `(out, in, *k)` and
    `ΔW[t, s, ·] = scale · Σ_{p,q} up[t, p] · mid[p, q, ·] · down[q, s]`.
    """

    down: torch.Tensor
    mid: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    __repr__ = _form_repr

    def __post_init__(self) -> None:
        down = require_tensor("down", self.down)
        mid = require_tensor("mid", self.mid)
        up = require_tensor("up", self.up)
        _require_conv_ndim("mid", mid, "(r_out, r_in, *k)")
        require_float("mid", mid)
        require_same_dtype_device({"mid": mid, "down": down, "up": up})
        unit_tail = ", 1" * (mid.ndim - 2)
        for name, tensor, layout in (("down", down, "r_in, in"), ("up", up, "out, r_out")):
            if tensor.ndim != mid.ndim:
                raise ShapeError(
                    f"{name} must have {mid.ndim} dimensions ({layout}{unit_tail}) to match "
                    f"mid {tuple(mid.shape)}, got shape {tuple(tensor.shape)}"
                )
        _require_unit_tail("down", down, "(r_in, in, 1, …)")
        _require_unit_tail("up", up, "(out, r_out, 1, …)")
        if down.shape[0] != mid.shape[1]:
            raise RankError(
                f"down has {down.shape[0]} rows (shape {tuple(down.shape)}) but mid expects "
                f"r_in = mid.shape[1] = {mid.shape[1]} (mid shape {tuple(mid.shape)})"
            )
        if up.shape[1] != mid.shape[0]:
            raise RankError(
                f"up has {up.shape[1]} columns (shape {tuple(up.shape)}) but mid expects "
                f"r_out = mid.shape[0] = {mid.shape[0]} (mid shape {tuple(mid.shape)})"
            )
        _require_positive_rank("mid", mid, 0)
        _require_positive_rank("mid", mid, 1)
        _require_nonempty(self)
        object.__setattr__(self, "scale", require_real("scale", self.scale))

    @staticmethod
    def count(
        in_features: int, out_features: int, kernel_size: Sequence[int], rank: tuple[int, int]
    ) -> int:
        """Parameters at ranks `(r_out, r_in)`: `r_out r_in K + r_out out + r_in in`.

        0 when either rank is 0: ΔW is then zero whatever the other factors hold, so no
        parameter is left (as rank 0 counts 0 for every form).
        """
        r_out, r_in = rank
        if r_out == 0 or r_in == 0:
            return 0
        return r_out * r_in * kernel_volume(kernel_size) + r_out * out_features + r_in * in_features

    @property
    def rank(self) -> tuple[int, int]:
        """The ranks `(r_out, r_in)`."""
        return (self.mid.shape[0], self.mid.shape[1])

    @property
    def shape(self) -> torch.Size:
        """Shape of ΔW: `(out, in, *k)`."""
        return torch.Size((self.up.shape[0], self.down.shape[1], *self.mid.shape[2:]))

    @property
    def num_params(self) -> int:
        """Number of scalars: `r_out r_in K + r_out out + r_in in`."""
        return self.down.numel() + self.mid.numel() + self.up.numel()

    def to_dense(self, rows: slice | None = None) -> torch.Tensor:
        """ΔW of shape `self.shape` in the factors' dtype, scale applied, as two matmuls in
        `work_dtype`, rounded once.

        First `mid (r_out·K, r_in) @ down (r_in, in)`, one GEMM whose small result is laid
        out `(r_out, in, K)`; then `up (out, r_out) @ that (r_out, in·K)`, which
        writes ΔW contiguously. `rows` gives only `ΔW[rows]`, from those rows of `up`.
        """
        return self._rounded(rows, self.mid.dtype)

    def _bounds(self) -> Bounds:
        """Bounds on max |ΔW| / |scale| and on every sum on the way (`recompose`): the
        intermediate `max_s ‖down[:, s]‖₁ · max |mid|`, times `max_t ‖up[t]‖₁`."""
        up, down = self.up.reshape(self.up.shape[:2]), self.down.reshape(self.down.shape[:2])
        mixed = row_sum_peak(down.t()) * peak(self.mid)
        final = row_sum_peak(up) * mixed
        return final, torch.maximum(final, mixed), torch.minimum(final, mixed)

    def _rounded(self, rows: slice | None, dtype: torch.dtype) -> torch.Tensor:
        """`ΔW[rows]` summed in `work_dtype` of the factors, scale applied, in `dtype`."""
        r_out, r_in = self.rank
        out_features, in_features = self.shape[:2]
        work = work_dtype(self.mid.dtype)
        # one GEMM (r_out·K, r_in) @ (r_in, in), then the small result laid out (r_out, in, K)
        mid = self.mid.reshape(r_out, r_in, -1).to(work)
        taps = mid.shape[2]
        down = self.down.reshape(r_in, in_features).to(work)
        mixed = mid.transpose(1, 2).reshape(r_out * taps, r_in) @ down
        mixed = mixed.view(r_out, taps, in_features).transpose(1, 2).reshape(r_out, -1)
        up = _row_slice(self.up.reshape(out_features, r_out), rows).to(work)
        delta = rounded_product(up, mixed, self.scale, dtype)
        return delta.view(up.shape[0], *self.shape[1:])

    def _accumulated(self, rows: slice | None = None) -> torch.Tensor:
        """`ΔW[rows]` in `work_dtype` of the factors, scale applied."""
        return self._rounded(rows, work_dtype(self.mid.dtype))

    def with_rows(self, blocks: RowBlocks) -> Tucker2:
        """The Tucker2 of ΔW's output rows `blocks` in turn: `up`'s rows, `mid` and `down`
        (copied) and the scale kept, exactly."""
        return Tucker2(self.down.clone(), self.mid.clone(), _rows_of(self.up, blocks), self.scale)

    def to(self, *args: object, **kwargs: object) -> Tucker2:
        """The same form with every factor passed through `Tensor.to(*args, **kwargs)`."""
        return Tucker2(
            self.down.to(*args, **kwargs),
            self.mid.to(*args, **kwargs),
            self.up.to(*args, **kwargs),
            self.scale,
        )

    def named_factors(self) -> dict[str, torch.Tensor]:
        """The factors by field name: `down`, `mid`, `up`."""
        return {"down": self.down, "mid": self.mid, "up": self.up}


@dataclass(frozen=True, eq=False)
class CP:
    """ΔW = scale · Σ_R weights[R] · out[:, R] ⊗ in[:, R] ⊗ k₁[:, R] ⊗ … (Lebedev et al. 2015).

    Shapes: `out_factor (out, R)`, `in_factor (in, R)`, one `(k_i, R)` per spatial
    axis in `spatial_factors` (a tuple or list; none for a linear weight), optional
    `weights (R,)`. The factors share one dtype and device; `weights` shares the device and
    has the factors' dtype, or float32 beside float16/bfloat16 factors (the norms λ of a
    half-precision weight's decomposition can exceed float16's range, `decompose.cp`).
    As convolutions: a 1×1 `in → R`, one depthwise convolution per spatial axis,
    then a 1×1 `R → out`.
    """

    out_factor: torch.Tensor
    in_factor: torch.Tensor
    spatial_factors: Sequence[torch.Tensor] = field(default_factory=tuple)
    weights: torch.Tensor | None = None
    scale: float = 1.0

    __repr__ = _form_repr

    def __post_init__(self) -> None:
        out_factor = require_tensor("out_factor", self.out_factor)
        in_factor = require_tensor("in_factor", self.in_factor)
        if not isinstance(self.spatial_factors, (tuple, list)):
            raise DTypeError(
                "spatial_factors must be a tuple of (k_i, R) tensors, got "
                f"{type(self.spatial_factors).__name__}"
            )
        spatial = tuple(self.spatial_factors)
        object.__setattr__(self, "spatial_factors", spatial)
        if len(spatial) > MAX_SPATIAL_DIMS:
            raise ShapeError(
                f"spatial_factors must hold at most {MAX_SPATIAL_DIMS} factors (1-, 2- or 3-D "
                f"kernels), got {len(spatial)}"
            )
        require_ndim("out_factor", out_factor, (2,), "(out, R)")
        require_float("out_factor", out_factor)
        named = {"out_factor": out_factor, "in_factor": in_factor}
        named.update({f"spatial_factors[{i}]": f for i, f in enumerate(spatial)})
        for name, tensor in named.items():
            require_tensor(name, tensor)
        require_same_dtype_device(named)
        if self.weights is not None:
            weights = require_tensor("weights", self.weights)
            if weights.dtype != out_factor.dtype and not (
                weights.dtype == torch.float32 and out_factor.dtype in HALF_DTYPES
            ):
                raise DTypeError(
                    f"weights has dtype {weights.dtype} but the factors {out_factor.dtype}; "
                    "weights take the factors' dtype, or float32 beside float16/bfloat16 ones"
                )
            if weights.device != out_factor.device:
                raise DeviceError(
                    f"weights is on {weights.device} but out_factor is on {out_factor.device}; "
                    "all factors must share one device"
                )
            named["weights"] = weights
        rank = out_factor.shape[1]
        for name, tensor in named.items():
            expected_ndim, layout = (1, "(R,)") if name == "weights" else (2, "(size, R)")
            require_ndim(name, tensor, (expected_ndim,), layout)
            if tensor.shape[-1] != rank:
                raise RankError(
                    "all factors of a CP form must have the same number of columns R; "
                    f"out_factor.shape[1]={rank} but {name}.shape[-1]={tensor.shape[-1]} "
                    f"(shape {tuple(tensor.shape)})"
                )
        _require_positive_rank("out_factor", out_factor, 1)
        _require_nonempty(self)
        object.__setattr__(self, "scale", require_real("scale", self.scale))

    @staticmethod
    def count(
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        rank: int,
        *,
        weights: bool = False,
    ) -> int:
        """Parameters of a rank-R CP form: `R (out + in + Σ k_i)`, plus R with `weights`."""
        return rank * (out_features + in_features + sum(int(k) for k in kernel_size) + weights)

    @property
    def rank(self) -> int:
        """The CP rank R."""
        return self.out_factor.shape[1]

    @property
    def shape(self) -> torch.Size:
        """Shape of ΔW: `(out, in, *k)`."""
        kernel = (f.shape[0] for f in self.spatial_factors)
        return torch.Size((self.out_factor.shape[0], self.in_factor.shape[0], *kernel))

    @property
    def num_params(self) -> int:
        """Number of scalars: `R (out + in + Σ k_i)`, plus R with weights."""
        extra = 0 if self.weights is None else self.weights.numel()
        factors = (self.out_factor, self.in_factor, *self.spatial_factors)
        return sum(f.numel() for f in factors) + extra

    def to_dense(self, rows: slice | None = None) -> torch.Tensor:
        """ΔW of shape `self.shape` in the factors' dtype, scale and weights applied.

        The spatial outer product `(R, K)` and its product with `in` `(R, in·K)` are
        elementwise; one matmul `out (out, R) @ (R, in·K)` then writes ΔW, all in
        `work_dtype`, rounded once. `rows` gives only `ΔW[rows]`, from those rows of
        `out_factor`.
        """
        return self._rounded(rows, self.out_factor.dtype)

    def _bounds(self) -> Bounds:
        """Bounds on max |ΔW| / |scale| and on every sum on the way (`recompose`):
        `max_o ‖weighted_out[o]‖₁` times the intermediate `max |in| · ∏ max |k_i|`."""
        left = row_sum_peak(self.weighted_out(torch.float64))
        right = smallest = peak(self.in_factor)
        for spatial in self.spatial_factors:
            right = right * peak(spatial)
            smallest = torch.minimum(smallest, right)
        final = left * right
        largest = torch.maximum(final, torch.maximum(left, right))
        return final, largest, torch.minimum(final, torch.minimum(left, smallest))

    def _rounded(self, rows: slice | None, dtype: torch.dtype) -> torch.Tensor:
        """`ΔW[rows]` summed in `work_dtype` of the factors, scale and weights applied, in
        `dtype`."""
        work = work_dtype(self.out_factor.dtype)
        out_factor = _row_slice(self.weighted_out(work), rows)
        delta = rounded_product(out_factor, self.in_kernel(work), self.scale, dtype)
        return delta.view(out_factor.shape[0], *self.shape[1:])

    def _accumulated(self, rows: slice | None = None) -> torch.Tensor:
        """`ΔW[rows]` in `work_dtype` of the factors, scale and weights applied."""
        return self._rounded(rows, work_dtype(self.out_factor.dtype))

    def weighted_out(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`out_factor (out, R)` with `weights` applied to its columns, computed in `dtype`
        (a float dtype, `DTypeError` otherwise; default: the weights' dtype where present,
        else the factors')."""
        if dtype is not None:
            require_float_dtype("dtype", dtype)
        out_factor = self.out_factor if dtype is None else self.out_factor.to(dtype)
        if self.weights is None:
            return out_factor
        weights = self.weights if dtype is None else self.weights.to(dtype)
        return out_factor.to(weights.dtype) * weights

    def in_kernel(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`(R, in·K)` in `dtype` (a float dtype, `DTypeError` otherwise; default: the
        factors'): row ρ is `in[:, ρ] ⊗ k₁[:, ρ] ⊗ …` flattened row-major, so that
        `ΔW = scale · weighted_out() @ in_kernel()` reshaped to `(out, in, *k)`."""
        rank = self.rank
        dtype = self.in_factor.dtype if dtype is None else require_float_dtype("dtype", dtype)
        right = self.in_factor.t().to(dtype)
        for spatial in self.spatial_factors:
            right = (right.unsqueeze(-1) * spatial.t().to(dtype).unsqueeze(1)).reshape(rank, -1)
        return right

    def with_rows(self, blocks: RowBlocks) -> CP:
        """The CP of ΔW's output rows `blocks` in turn: `out_factor`'s rows, the other
        factors (copied) and the scale kept, exactly."""
        return CP(
            _rows_of(self.out_factor, blocks),
            self.in_factor.clone(),
            tuple(f.clone() for f in self.spatial_factors),
            None if self.weights is None else self.weights.clone(),
            self.scale,
        )

    def to(self, *args: object, **kwargs: object) -> CP:
        """The same form with every factor passed through `Tensor.to(*args, **kwargs)`."""
        return CP(
            self.out_factor.to(*args, **kwargs),
            self.in_factor.to(*args, **kwargs),
            tuple(f.to(*args, **kwargs) for f in self.spatial_factors),
            None if self.weights is None else self.weights.to(*args, **kwargs),
            self.scale,
        )

    def named_factors(self) -> dict[str, torch.Tensor]:
        """The factors by field name: `out_factor`, `in_factor`, `spatial_factors.<i>`,
        and `weights` if present."""
        named = {"out_factor": self.out_factor, "in_factor": self.in_factor}
        named.update({f"spatial_factors.{i}": f for i, f in enumerate(self.spatial_factors)})
        if self.weights is not None:
            named["weights"] = self.weights
        return named


Half = LoRA | Tucker2


def _require_half(name: str, half: object) -> Half:
    """`half` if it is an unscaled `LoRA` or `Tucker2`, else a typed error naming it."""
    if not isinstance(half, (LoRA, Tucker2)):
        raise DTypeError(f"{name} must be a LoRA or Tucker2 form, got {type(half).__name__}")
    if half.scale != 1.0:
        raise ArgumentError(
            f"{name} has scale {half.scale}; the halves of a product form are unscaled and the "
            "product carries the scale"
        )
    return half


def _named(name: str, half: Half | torch.Tensor) -> dict[str, torch.Tensor]:
    """A part's tensors under `name`: the tensor itself, or `name.<factor>` of a form."""
    if isinstance(half, torch.Tensor):
        return {name: half}
    return {f"{name}.{part}": tensor for part, tensor in half.named_factors().items()}


def _down_rank(half: Half) -> int:
    """The rank a file's alpha divides by: rows of `down` (LyCORIS' `lora_dim`)."""
    return half.down.shape[0]


def alpha_divisor_rank(rank: Rank) -> int:
    """The rank `alpha` divides for a LoRA or Tucker2 rank: `r`, or `r_in` of a Tucker2 pair
    `(r_out, r_in)`, the rows of `down` (LyCORIS' `lora_dim`), so that an adapter's alpha
    means one scale in memory and in its files."""
    return rank_pair(rank)[1]


def alpha_rank(form: Factors | DoRA) -> int | None:
    """The rank a file's alpha is divided by: `alpha_divisor_rank` of a LoRA or Tucker2, the
    rank of a LoHa's halves or of a LoKr's factored parts (None if both are dense), the CP
    rank; a DoRA's update's."""
    if isinstance(form, DoRA):
        return alpha_rank(form.update)
    if isinstance(form, (LoRA, Tucker2)):
        return alpha_divisor_rank(form.rank)
    return form.rank


@dataclass(frozen=True, eq=False)
class LoHa:
    """ΔW = scale · ΔW₁ ⊙ ΔW₂: the Hadamard product of two unscaled halves (LyCORIS LoHa).

    Each half is a `LoRA` — `down (r, in, *k)` (or LyCORIS' flattened `(r, in·K)`, see
    `with_kernel`), `up (out, r, 1…)` — or, with Tucker cores (`hada_t1`/`hada_t2`), a
    `Tucker2` — `down (r, in, 1…)`, `mid (r, r, *k)`, `up (out, r, 1…)`. Both halves have
    scale 1, one shape, one rank `r` and one dtype and device. The dense rank of ΔW is at
    most r², from `2 r (in·K + out)` parameters (`2 (r in + r out + r² K)` with cores).
    """

    first: Half
    second: Half
    scale: float = 1.0

    __repr__ = _form_repr

    def __post_init__(self) -> None:
        first = _require_half("first", self.first)
        second = _require_half("second", self.second)
        require_same_dtype_device({**_named("first", first), **_named("second", second)})
        if first.shape != second.shape:
            raise ShapeError(
                f"the halves of a LoHa stand for one ΔW shape, got first {tuple(first.shape)} "
                f"and second {tuple(second.shape)}"
            )
        if type(first) is not type(second):
            raise ShapeError(
                f"the halves of a LoHa are both LoRA or both Tucker2 (with cores), got first "
                f"{type(first).__name__} and second {type(second).__name__}"
            )
        for name, half in (("first", first), ("second", second)):
            if isinstance(half, Tucker2) and half.rank[0] != half.rank[1]:
                raise RankError(
                    f"{name}.mid of a LoHa must be (r, r, *k), got shape {tuple(half.mid.shape)}"
                )
        if _down_rank(first) != _down_rank(second):
            raise RankError(
                f"the halves of a LoHa share one rank, got first.down with {_down_rank(first)} "
                f"rows and second.down with {_down_rank(second)}"
            )
        object.__setattr__(self, "scale", require_real("scale", self.scale))

    @staticmethod
    def count(
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        rank: int,
        *,
        tucker: bool = False,
    ) -> int:
        """Parameters at rank r: `2 r (in·K + out)`, or `2 (r in + r out + r² K)` with cores."""
        if tucker:
            return 2 * Tucker2.count(in_features, out_features, kernel_size, (rank, rank))
        return 2 * LoRA.count(in_features, out_features, kernel_size, rank)

    @property
    def rank(self) -> int:
        """The rank r of each half (rows of its `down`)."""
        return _down_rank(self.first)

    @property
    def shape(self) -> torch.Size:
        """Shape of ΔW: `(out, in, *k)`, or `(out, in·K)` while the halves are flattened."""
        return self.first.shape

    @property
    def num_params(self) -> int:
        """Number of scalars in both halves."""
        return self.first.num_params + self.second.num_params

    def to_dense(self, rows: slice | None = None) -> torch.Tensor:
        """ΔW of shape `self.shape` in the factors' dtype, scale applied: the elementwise
        product of the halves in `work_dtype`, rounded once (`rows`: only `ΔW[rows]`)."""
        return self._accumulated(rows).to(self.first.up.dtype)

    def _bounds(self) -> Bounds:
        """Bounds on max |ΔW| / |scale| and on every sum on the way (`recompose`): the
        product of the halves' bounds, and theirs."""
        return product_bounds(self.first._bounds(), self.second._bounds())

    def _accumulated(self, rows: slice | None = None) -> torch.Tensor:
        """`ΔW[rows]` in `work_dtype` of the factors, scale applied."""
        delta = self.first._accumulated(rows) * self.second._accumulated(rows)
        return scaled(delta, self.scale)

    def with_rows(self, blocks: RowBlocks) -> LoHa:
        """The LoHa of ΔW's output rows `blocks` in turn: a row of the Hadamard product is
        the product of the halves' rows, so each half takes those rows (`with_rows`),
        exactly."""
        return LoHa(self.first.with_rows(blocks), self.second.with_rows(blocks), self.scale)

    def to(self, *args: object, **kwargs: object) -> LoHa:
        """The same form with every factor passed through `Tensor.to(*args, **kwargs)`."""
        return LoHa(self.first.to(*args, **kwargs), self.second.to(*args, **kwargs), self.scale)

    def named_factors(self) -> dict[str, torch.Tensor]:
        """The factors of both halves: `first.down`, `first.up`, …, `second.mid`."""
        return {**_named("first", self.first), **_named("second", self.second)}

    def with_kernel(self, kernel_size: Sequence[int]) -> LoHa:
        """The same ΔW with flattened LoRA halves unfolded to `kernel_size` (`LoRA.with_kernel`)."""
        halves = [
            h.with_kernel(kernel_size) if isinstance(h, LoRA) else h
            for h in (self.first, self.second)
        ]
        return LoHa(*halves, scale=self.scale)


def _part_bounds(part: torch.Tensor | Half) -> Bounds:
    """max |part| of a dense LoKr part (thrice), else the bounds of its form."""
    if isinstance(part, torch.Tensor):
        return peak(part), peak(part), peak(part)
    return part._bounds()


def _accumulated(part: torch.Tensor | Half) -> torch.Tensor:
    """A LoKr part as a dense tensor in `work_dtype` of its factors."""
    if isinstance(part, torch.Tensor):
        return part.to(work_dtype(part.dtype))
    return part._accumulated()


@dataclass(frozen=True, eq=False)
class LoKr:
    """ΔW = scale · w1 ⊗ w2, the Kronecker product (LyCORIS LoKr).

    `w1 (a, c)` is a dense tensor (`lokr_w1`) or an unscaled linear `LoRA` (`lokr_w1_a`
    `(a, r)` as `up`, `lokr_w1_b (r, c)` as `down`). `w2 (b, d, *k)` is a dense tensor
    (`lokr_w2`), an unscaled `LoRA` (`down (r, d, *k)` or flattened `(r, d·K)`, `up (b, r,
    1…)`) or an unscaled `Tucker2` (`lokr_t2` as `mid`). ΔW has shape `(a·b, c·d, *k)`:
    `ΔW[i·b + j, p·d + q, ·] = scale · w1[i, p] · w2[j, q, ·]`. `rank` is the inner rank of
    the factored parts, `None` when both are dense (LyCORIS then ignores alpha: scale 1).
    """

    w1: torch.Tensor | LoRA
    w2: torch.Tensor | Half
    scale: float = 1.0

    __repr__ = _form_repr

    def __post_init__(self) -> None:
        if isinstance(self.w1, torch.Tensor):
            require_ndim("w1", require_tensor("w1", self.w1), (2,), "(a, c)")
            require_float("w1", self.w1)
        elif not isinstance(self.w1, LoRA):
            raise DTypeError(
                f"w1 must be a dense (a, c) tensor or a linear LoRA, got {type(self.w1).__name__}"
            )
        elif _require_half("w1", self.w1).down.ndim != 2:
            raise ShapeError(f"w1 must be a linear LoRA (a, c), got shape {tuple(self.w1.shape)}")
        if isinstance(self.w2, torch.Tensor):
            _require_conv_ndim("w2", require_tensor("w2", self.w2), "(b, d, *k)")
            require_float("w2", self.w2)
        else:
            _require_half("w2", self.w2)
        require_same_dtype_device({**_named("w1", self.w1), **_named("w2", self.w2)})
        ranks = {_down_rank(p) for p in (self.w1, self.w2) if not isinstance(p, torch.Tensor)}
        if len(ranks) > 1:
            raise RankError(
                f"the factored parts of a LoKr share one rank, got w1 rank "
                f"{_down_rank(self.w1)} and w2 rank {_down_rank(self.w2)}"  # type: ignore[arg-type]
            )
        _require_nonempty(self)
        object.__setattr__(self, "scale", require_real("scale", self.scale))

    @staticmethod
    def count(
        out_split: tuple[int, int],
        in_split: tuple[int, int],
        kernel_size: Sequence[int],
        rank: int = 0,
        *,
        factor_w1: bool = False,
        factor_w2: bool = False,
        tucker: bool = False,
    ) -> int:
        """Parameters for `out = a·b`, `in = c·d` (`out_split = (a, b)`, `in_split = (c, d)`).

        `w1`: `a c` dense, `r (a + c)` with `factor_w1`; `w2`: `b d K` dense, `r (b + d K)`
        with `factor_w2`, `r (b + d) + r² K` with `factor_w2` and a Tucker core.
        """
        (a, b), (c, d) = out_split, in_split
        taps = kernel_volume(kernel_size)
        w1 = LoRA.count(c, a, (), rank) if factor_w1 else a * c
        if not factor_w2:
            w2 = b * d * taps
        elif tucker:
            w2 = Tucker2.count(d, b, kernel_size, (rank, rank))
        else:
            w2 = LoRA.count(d, b, kernel_size, rank)
        return w1 + w2

    @property
    def rank(self) -> int | None:
        """The inner rank of the factored parts, or None when `w1` and `w2` are dense."""
        for part in (self.w1, self.w2):
            if not isinstance(part, torch.Tensor):
                return _down_rank(part)
        return None

    @property
    def shape(self) -> torch.Size:
        """Shape of ΔW: `(a·b, c·d, *k)` (`(a·b, c·d·K)` while `w2` is flattened)."""
        (a, c), (b, d, *kernel) = self.w1.shape, self.w2.shape
        return torch.Size((a * b, c * d, *kernel))

    @property
    def num_params(self) -> int:
        """Number of scalars in `w1` and `w2` (their factors where factored)."""
        return sum(
            p.numel() if isinstance(p, torch.Tensor) else p.num_params for p in (self.w1, self.w2)
        )

    def to_dense(self, rows: slice | None = None) -> torch.Tensor:
        """ΔW of shape `self.shape` in the factors' dtype, scale applied: one `torch.kron` of
        the dense parts in `work_dtype`, rounded once.

        `rows` gives only `ΔW[rows]`: the Kronecker product of the rows of `w1` they fall in
        (row `i` of ΔW is row `i // b` of `w1` with row `i % b` of `w2`), trimmed.
        """
        return self._accumulated(rows).to(dtype_of(self))

    def _bounds(self) -> Bounds:
        """Bounds on max |ΔW| / |scale| and on every sum on the way (`recompose`): the
        product of the parts' bounds, and theirs."""
        return product_bounds(_part_bounds(self.w1), _part_bounds(self.w2))

    def _accumulated(self, rows: slice | None = None) -> torch.Tensor:
        """`ΔW[rows]` in `work_dtype` of the factors, scale applied."""
        w2 = _accumulated(self.w2)
        w1 = _accumulated(self.w1)
        span = slice(None) if rows is None else _contiguous(rows)
        start, stop = span.indices(self.shape[0])[:2]
        b = w2.shape[0]
        first = start // b
        w1 = w1[first : -(-stop // b)].reshape(-1, w1.shape[1], *([1] * (w2.ndim - 2)))
        delta = torch.kron(w1, w2)[start - first * b : stop - first * b]
        return scaled(delta, self.scale)

    def with_rows(self, blocks: RowBlocks) -> LoKr | None:
        """The LoKr of ΔW's output rows `blocks` in turn, or None where a block does not
        start and end on a multiple of `w2`'s rows b: ΔW's rows `[i·b, (i + 1)·b)` are
        `w1[i] ⊗ w2`, so whole such groups are `w1`'s rows (a LoRA `w1`: its `up`'s) beside
        `w2` (copied), exactly; a part of one is no Kronecker product of these factors."""
        b = self.w2.shape[0]
        blocks = _require_blocks(blocks, self.shape[0])
        if any(start % b or stop % b for start, stop in blocks):
            return None
        groups = [(start // b, stop // b) for start, stop in blocks]
        if isinstance(self.w1, torch.Tensor):
            w1 = _rows_of(self.w1, groups)
        else:
            w1 = self.w1.with_rows(groups)
        return LoKr(w1, self.w2.to(copy=True), self.scale)

    def to(self, *args: object, **kwargs: object) -> LoKr:
        """The same form with every factor passed through `Tensor.to(*args, **kwargs)`."""
        return LoKr(self.w1.to(*args, **kwargs), self.w2.to(*args, **kwargs), self.scale)

    def named_factors(self) -> dict[str, torch.Tensor]:
        """The tensors of both parts: `w1` (dense) or `w1.down`, `w1.up`; likewise `w2`."""
        return {**_named("w1", self.w1), **_named("w2", self.w2)}

    def with_kernel(self, kernel_size: Sequence[int]) -> LoKr:
        """The same ΔW with a flattened `w2 (b, d·K)` unfolded to `(b, d, *kernel_size)`.

        Row-major unfolding of w2's input axis unfolds ΔW's input axis the same way,
        because `kron` places `w2`'s columns contiguously inside each column block of `w1`.
        """
        kernel = require_ints("kernel_size", kernel_size, minimum=1, error=ShapeError)
        w2 = self.w2
        if isinstance(w2, LoRA):
            w2 = w2.with_kernel(kernel)
        elif isinstance(w2, torch.Tensor) and tuple(w2.shape[2:]) != kernel:
            taps = kernel_volume(kernel)
            if w2.ndim != 2 or not kernel or w2.shape[1] % taps:
                raise ShapeError(
                    f"w2 {tuple(w2.shape)} cannot be unfolded to kernel {kernel}: it must be a "
                    f"flattened (b, d·K) tensor with d·K divisible by K = {taps}"
                )
            w2 = w2.reshape(w2.shape[0], w2.shape[1] // taps, *kernel)
        return LoKr(self.w1, w2, self.scale)


@dataclass(frozen=True, eq=False)
class Full:
    """ΔW = scale · delta: a dense difference of one parameter (LyCORIS' `full` algorithm,
    `diff` / `diff_b`; ComfyUI's `diff` and `diff_b` keys).

    `delta` has the parameter's shape: a weight's `(out, in, *k)` (or `(out, in)`), or a 1-D
    `(n,)` one (a bias, which an adapter names `<module>.bias`, or a norm's weight). It has
    no rank: `num_params` is its `numel`, and files store it at scale 1.
    """

    delta: torch.Tensor
    scale: float = 1.0

    __repr__ = _form_repr

    def __post_init__(self) -> None:
        delta = require_tensor("delta", self.delta)
        require_ndim("delta", delta, range(1, 3 + MAX_SPATIAL_DIMS), "(out[, in, *k])")
        require_float("delta", delta)
        _require_nonempty(self)
        object.__setattr__(self, "scale", require_real("scale", self.scale))

    @property
    def rank(self) -> None:
        """None: a dense difference has no factor rank."""
        return None

    @property
    def shape(self) -> torch.Size:
        """Shape of ΔW, the parameter's."""
        return self.delta.shape

    @property
    def num_params(self) -> int:
        """Number of scalars in `delta`."""
        return self.delta.numel()

    def to_dense(self, rows: slice | None = None) -> torch.Tensor:
        """ΔW (`rows`: only `ΔW[rows]`) in `delta`'s dtype, scaled in `work_dtype` and rounded
        once."""
        return self._accumulated(rows).to(self.delta.dtype)

    def _bounds(self) -> Bounds:
        """max |delta| (thrice: no sum is formed on the way)."""
        return peak(self.delta), peak(self.delta), peak(self.delta)

    def _accumulated(self, rows: slice | None = None) -> torch.Tensor:
        """`ΔW[rows]` in `work_dtype` of `delta`, scale applied."""
        delta = _row_slice(self.delta, rows)
        return scaled(delta.to(work_dtype(delta.dtype)), self.scale)

    def with_rows(self, blocks: RowBlocks) -> Full:
        """The dense difference of ΔW's output rows `blocks` in turn, copied."""
        return Full(_rows_of(self.delta, blocks), self.scale)

    def to(self, *args: object, **kwargs: object) -> Full:
        """The same form with `delta` passed through `Tensor.to(*args, **kwargs)`."""
        return Full(self.delta.to(*args, **kwargs), self.scale)

    def named_factors(self) -> dict[str, torch.Tensor]:
        """`{"delta": delta}`."""
        return {"delta": self.delta}


Factors = LoRA | Tucker2 | CP | LoHa | LoKr | Full

FORMS = ("dense", "lora", "centre_tap", "tucker2", "cp")
"""The names of the forms a layer can take (`"dense"`: the weight itself); the counts are the
classes' `count` (`centre_tap` is `LoRA` with a 1×1 `down`)."""
ADAPTER_FORMS = FORMS[1:]

Rank = int | tuple[int, int]
"""A rank: an int, or `(r_out, r_in)` for `"tucker2"`."""


DORA_AXES = {0: "out", 1: "in"}
"""The axis a DoRA magnitude runs along, and its name in reports: 0, one per output
channel (PEFT's `lora_magnitude_vector`, LyCORIS' `dora_scale` with `wd_on_out`), or 1, one
per input channel (LyCORIS without `wd_on_out`)."""


def _normal_or_zero(values: torch.Tensor) -> bool:
    """Whether every value is 0 or finite and at least the smallest normal of its dtype."""
    tiny = torch.finfo(values.dtype).tiny
    return bool(((values == 0) | (torch.isfinite(values) & (values >= tiny))).all())


@dataclass(frozen=True, eq=False)
class DoRA:
    """DoRA (weight-decomposed LoRA, Liu et al. 2024): a magnitude per channel times the
    direction of the updated weight. It has no ΔW of its own: the merged weight depends on
    the base weight `W (out, in, *k)`,

        W' = m ⊙ (W + ΔW) / (‖W + ΔW‖ + eps),

    the norm taken for each index along `axis` over every other axis (`docs/math.md`).

    `update` is the low-rank form of ΔW (`LoRA`, `Tucker2`, `CP`, `LoHa` or `LoKr`, scale
    included). `magnitude` is m in the shape that broadcasts against W: `(out, 1, 1…)` for
    `axis=0` (a norm per output channel over the input and kernel axes: PEFT's
    `lora_magnitude_vector`, LyCORIS' `dora_scale` with `wd_on_out`), `(1, in, 1…)` for
    `axis=1` (a norm per input channel over the output and kernel axes: LyCORIS without
    `wd_on_out`, and PEFT's layers of a weight stored `(in, out)`, a transformers `Conv1D`'s).
    A LyCORIS convolution layer read flattened, `update` of shape `(out, in·K)`, keeps its
    magnitude's `(…, 1, 1)` until `with_kernel` gives it the kernel. `eps` is added to the
    norm: 0 in PEFT; None for LyCORIS' `dora_scale`, which adds the machine epsilon of the
    dtype its network runs in, that of the module it adapts (`merge_to` casts the network to
    the module's weight dtype first), whatever dtype the file stores: the eps of the weight
    it merges into (`for_dtype`; float32's `1.19e-7` for a float32 weight, bfloat16's `2⁻⁷`
    for a bfloat16 one, float32's for an 8-bit float one, which no tool takes a norm in).
    The magnitude may have another dtype than the factors.
    """

    update: Factors
    magnitude: torch.Tensor
    axis: int = 0
    eps: float | None = 0.0

    __repr__ = _form_repr

    def __post_init__(self) -> None:
        if not isinstance(self.update, (LoRA, Tucker2, CP, LoHa, LoKr)):
            raise DTypeError(
                "update must be a LoRA, Tucker2, CP, LoHa or LoKr form, got "
                f"{type(self.update).__name__}"
            )
        magnitude = require_tensor("magnitude", self.magnitude)
        require_float("magnitude", magnitude)
        if magnitude.device != device_of(self.update):
            raise DeviceError(
                f"magnitude is on {magnitude.device} but the update's factors are on "
                f"{device_of(self.update)}"
            )
        if not is_index(self.axis) or operator.index(self.axis) not in DORA_AXES:
            raise ArgumentError(f"axis must be 0 (output channels) or 1 (input), got {self.axis!r}")
        axis = operator.index(self.axis)
        object.__setattr__(self, "axis", axis)
        if self.eps is not None:
            eps = require_real("eps", self.eps)
            if eps < 0:
                raise ArgumentError(f"eps is added to a norm and must be at least 0, got {eps}")
            object.__setattr__(self, "eps", eps)
        shape = tuple(self.update.shape)
        ndim = len(shape) if magnitude.ndim <= len(shape) else magnitude.ndim
        expected = [1] * ndim
        expected[axis] = shape[axis]
        flattened = len(shape) == 2 < magnitude.ndim  # a LyCORIS conv layer, kernel unknown
        fits = magnitude.ndim == ndim and all(
            size == want or (i == axis == 1 and flattened and shape[1] % max(size, 1) == 0)
            for i, (size, want) in enumerate(zip(magnitude.shape, expected, strict=True))
        )
        if not fits:
            raise ShapeError(
                f"magnitude must have shape {tuple(expected)} (one value per "
                f"{DORA_AXES[axis]}put channel of ΔW {shape}, broadcast against the weight), "
                f"got {tuple(magnitude.shape)}"
            )

    @property
    def shape(self) -> torch.Size:
        """Shape of the weight it adapts (of `update`'s ΔW)."""
        return self.update.shape

    @property
    def rank(self) -> Rank | None:
        """The rank of `update`."""
        return self.update.rank

    @property
    def scale(self) -> float:
        """The scale of `update`."""
        return self.update.scale

    @property
    def num_params(self) -> int:
        """Scalars in `update` and the magnitude."""
        return self.update.num_params + self.magnitude.numel()

    def named_factors(self) -> dict[str, torch.Tensor]:
        """`update`'s factors under `update.<name>`, and `magnitude`."""
        return {**_named("update", self.update), "magnitude": self.magnitude}

    def to(self, *args: object, **kwargs: object) -> DoRA:
        """The same form with every tensor passed through `Tensor.to(*args, **kwargs)`."""
        return DoRA(
            self.update.to(*args, **kwargs),
            self.magnitude.to(*args, **kwargs),
            self.axis,
            self.eps,
        )

    def with_kernel(self, kernel_size: Sequence[int]) -> DoRA:
        """A flattened `update (out, in·K)` unfolded to `kernel_size` (its `with_kernel`), and
        the magnitude given the kernel's unit axes (`with_update`)."""
        return self.with_update(self.update.with_kernel(kernel_size))  # type: ignore[union-attr]

    def with_update(self, update: Factors) -> DoRA:
        """The same magnitude over `update`, this ΔW in another shape (a flattened kernel
        unfolded, a 1×1 kernel dropped): one value per channel of `axis`, shaped `(out,
        1…)` or `(1, in, 1…)` for `update`'s ΔW; `ShapeError` if it has not one value per
        such channel (a flattened `(1, in·K)` update's magnitude for another `in`)."""
        shape = [1] * len(update.shape)
        shape[self.axis] = update.shape[self.axis]
        if self.magnitude.numel() != shape[self.axis]:
            raise ShapeError(
                f"magnitude {tuple(self.magnitude.shape)} has not one value per "
                f"{DORA_AXES[self.axis]}put channel of ΔW {tuple(update.shape)}"
            )
        return DoRA(update, self.magnitude.reshape(shape), self.axis, self.eps)

    def transposed(self) -> DoRA:
        """The DoRA of the transposed linear weight `(in, out)`: `update.transposed()`, and the
        magnitude on the other axis (`ShapeError` for a convolution's)."""
        if not isinstance(self.update, LoRA):
            raise ShapeError(
                f"only a linear LoRA has a transpose, got a {type(self.update).__name__}"
            )
        return DoRA(self.update.transposed(), self.magnitude.t(), 1 - self.axis, self.eps)

    def with_rows(self, blocks: RowBlocks) -> DoRA | None:
        """The DoRA of the weight's output rows `blocks` in turn, or None where no DoRA of
        those rows is: with one magnitude per output row each row's merge is its own
        (`update.with_rows` and the magnitude's rows); with one per input channel the norm
        runs over all rows, which no part holds, but which every row in another order (each
        once) leaves as it is (the magnitude kept)."""
        if self.axis != 0:
            taken = torch.zeros(self.shape[0], dtype=torch.int64)  # times each row is taken
            for start, stop in _require_blocks(blocks, self.shape[0]):
                taken[start:stop] += 1
            update = self.update.with_rows(blocks) if bool((taken == 1).all()) else None
            return None if update is None else DoRA(update, self.magnitude, self.axis, self.eps)
        update = self.update.with_rows(blocks)
        if update is None:
            return None
        return DoRA(update, _rows_of(self.magnitude, blocks), 0, self.eps)

    def for_dtype(self, dtype: torch.dtype) -> DoRA:
        """This DoRA merging into a weight of `dtype`: with `eps` None (LyCORIS'), eps the
        machine epsilon of `dtype`, the dtype LyCORIS runs its network in on such a weight
        (float32's for an 8-bit float weight, which no tool takes a norm in: LyCORIS cannot
        merge into one, ComfyUI merges in float32); itself otherwise."""
        if self.eps is not None:
            return self
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DTypeError(f"a DoRA merges into a floating-point weight, got dtype {dtype!r}")
        runs_in = torch.float32 if dtype.itemsize < 2 else dtype
        return DoRA(self.update, self.magnitude, self.axis, torch.finfo(runs_in).eps)

    def squares(self, total: torch.Tensor) -> torch.Tensor:
        """The sums of squares of `total` (rows of `W + ΔW`, in the dtype to sum in) that the
        norm adds up: per row `(rows, 1, 1…)` for `axis=0`, summed over these rows
        `(1, in, 1…)` for `axis=1` (add those of every block of rows for the whole norm).
        Summed in float64 where a sum leaves the normal range of `total`'s dtype (squares
        of |values| beyond about 1.8e19 overflow float32, below about 1.1e-19 lose digits)."""
        dims = [d for d in range(total.ndim) if d != self.axis]
        squares = total.square().sum(dim=dims, keepdim=True)
        if total.dtype != torch.float64 and not _normal_or_zero(squares):
            squares = total.to(torch.float64).square().sum(dim=dims, keepdim=True)
        return squares

    def rescale_(
        self, total: torch.Tensor, squares: torch.Tensor, rows: slice | None = None
    ) -> torch.Tensor:
        """`total *= m / (√squares + eps)` in place, for `total` the rows `rows` (all for None)
        of `W + ΔW` and `squares` the norm's sums of squares (`squares`: of these rows for
        `axis=0`, of the whole weight for `axis=1`); returns `total`. An eps of None (the
        weight's dtype's) must be given first (`for_dtype`): `ArgumentError`."""
        if self.eps is None:
            raise ArgumentError(
                "this DoRA adds the eps of the weight's dtype (LyCORIS'), which the rows summed "
                "in another dtype do not tell: take for_dtype(weight.dtype) first"
            )
        magnitude = self.magnitude.to(device=total.device, dtype=total.dtype)
        if self.axis == 0:
            magnitude = _row_slice(magnitude, rows)
        return total.mul_(magnitude / (squares.sqrt() + self.eps))

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """`W' = m ⊙ (W + ΔW) / (‖W + ΔW‖ + eps)` of the base `weight` (`self.shape`), summed
        in `work_dtype` of the weight and the factors (float32, float64 where one is) and
        returned in it, unchecked (NaN where a norm is 0 and eps is 0); an eps of None is
        that of `weight`'s dtype (`for_dtype`)."""
        weight = require_tensor("weight", weight)
        require_float("weight", weight)
        if tuple(weight.shape) != tuple(self.shape) or self.magnitude.ndim != weight.ndim:
            raise ShapeError(
                f"a DoRA of shape {tuple(self.shape)} (magnitude "
                f"{tuple(self.magnitude.shape)}) cannot merge into a weight of shape "
                f"{tuple(weight.shape)}"
            )
        dtype = work_dtype(weight.dtype, dtype_of(self.update))
        total = weight.to(dtype, copy=True, memory_format=torch.contiguous_format)
        add_dense(total, self.update.to(device=weight.device, dtype=dtype))
        return self.for_dtype(weight.dtype).rescale_(total, self.squares(total))


def require_form(form: object, *, allow_dense: bool = True) -> str:
    """Return `form` if it names a known form, else raise `ArgumentError` listing the names."""
    return require_choice("form", form, FORMS if allow_dense else ADAPTER_FORMS)


def require_rank(form: str, rank: object, *, minimum: int = 0) -> Rank:
    """Validate a rank for `form`: an int ≥ `minimum`, or for `"tucker2"` a pair of them
    (`RankError` naming the rank otherwise)."""
    if form == "tucker2" and isinstance(rank, (tuple, list)) and len(rank) == 2:
        return tuple(  # type: ignore[return-value]
            require_int(f"rank[{i}]", r, minimum=minimum, error=RankError)
            for i, r in enumerate(rank)
        )
    if isinstance(rank, (tuple, list)):
        expected = "an int or a pair (r_out, r_in)" if form == "tucker2" else "an int"
        raise RankError(f"the rank of form {form!r} must be {expected}, got {rank!r}")
    return require_int("rank", rank, minimum=minimum, error=RankError)


def dtype_of(form: Factors) -> torch.dtype:
    """The dtype all of `form`'s factors share."""
    return next(iter(form.named_factors().values())).dtype


def device_of(form: Factors) -> torch.device:
    """The device all of `form`'s factors share."""
    return next(iter(form.named_factors().values())).device


def rank_pair(rank: Rank) -> tuple[int, int]:
    """Tucker2 inner ranks `(r_out, r_in)` of a rank `require_rank` accepted: an int stands for
    both."""
    return (rank[0], rank[1]) if isinstance(rank, tuple) else (rank, rank)


def update_of(form: Factors | DoRA) -> Factors:
    """The form of a layer's ΔW: a DoRA's `update`, any other form itself."""
    return form.update if isinstance(form, DoRA) else form


def dora_refusal(name: str, what: str) -> str:
    """Why the DoRA layer `name` cannot go where only a ΔW can (`what`: "resize", …)."""
    return (
        f"{name} is a DoRA layer: its merged weight m ⊙ (W + ΔW) / ‖W + ΔW‖ depends on the "
        f"base weight W, so it has no update ΔW of its own to {what}; merge it into its base "
        "(lowrank merge, apply_adapter)"
    )


def add_dense(
    target: torch.Tensor, form: Factors, alpha: float = 1.0, rows: slice | None = None
) -> torch.Tensor:
    """`target += alpha · ΔW[rows]` in place, `target (rows, in, *k)` contiguous in the
    factors' `work_dtype` (the factors cast to it already); returns `target`.

    A LoRA adds its product inside one GEMM (`addmm` into `target`, the scales as its
    alpha), with no buffer for ΔW; the other forms add their summed `ΔW[rows]`. Unchecked:
    callers check the result's finiteness.
    """
    if isinstance(form, LoRA):
        out_features, rank = form.up.shape[:2]
        up = _row_slice(form.up.reshape(out_features, rank), rows)
        down = form.down.reshape(rank, -1)
        view, coefficient = target.view(up.shape[0], down.shape[1]), alpha * form.scale
        if gemm_alpha(coefficient, target.dtype):
            view.addmm_(up, down, alpha=coefficient)
        else:
            view.add_(scaled_mm(up, down, coefficient))
        return target
    return target.add_(form._accumulated(rows).view(target.shape), alpha=alpha)


def recompose(factors: Factors) -> torch.Tensor:
    """The dense ΔW `(out, in, *k)` of any factor form, scale applied (vectorised), in the
    factors' dtype: summed and scaled in `work_dtype` and rounded once (`to_dense`). It is
    differentiable, and the gradients of float16/bfloat16 factors are summed and scaled in
    float32 and rounded once too.

    Raises `DTypeError` for anything but a form, and for factors batched by `torch.vmap`
    (the range check reads values on the host; `to_dense` is the unchecked recomposition,
    which vmap takes), and `NonFiniteError` naming the form when a factor holds NaN/Inf or
    ΔW lies outside the range of the dtype. A float32 sum that overflows where ΔW itself
    does not is redone in float64. ΔW is read for NaN/Inf only where bounds from the
    factors (products of max row 1-norms and max |entries|, a pass over the factors alone)
    do not already keep ΔW and every sum on the way within half the dtype's largest value
    (so that a GEMM that held partial sums in the dtype could not overflow either).
    """
    if isinstance(factors, DoRA):
        raise DTypeError(dora_refusal("the form", "recompose"))
    if not isinstance(factors, (LoRA, Tucker2, CP, LoHa, LoKr, Full)):
        raise DTypeError(
            "recompose expects a LoRA, Tucker2, CP, LoHa, LoKr or Full form, got "
            f"{type(factors).__name__}"
        )
    require_unbatched(
        "recompose reads ΔW's values on the host (its range check, the float64 redo)",
        factors.named_factors(),
        "call recompose on each form in a loop, or form.to_dense() inside vmap (the same ΔW "
        "unchecked: Inf where ΔW leaves the dtype's range, NaN from NaN factors, and no "
        "float64 redo of a float32 sum that overflows or underflows on the way)",
    )
    delta = factors.to_dense()
    if delta.is_meta or not delta.numel():
        return delta
    final, largest, smallest = torch.stack(factors._bounds()).tolist()  # one host sync
    limit, peak_scaled = torch.finfo(delta.dtype).max / 2, final * abs(factors.scale)
    if _may_underflow(smallest, peak_scaled, delta.dtype):
        return _finite_or_raise(factors, delta.dtype)
    if peak_scaled <= limit and largest <= limit:
        return delta
    if math.isfinite(final) and math.isfinite(largest) and all_finite(delta):
        return delta
    return _finite_or_raise(factors, delta.dtype)


_UNDERFLOW_MARGIN = 2.0**24
"""How far above the work dtype's smallest normal number (in its mantissa's 24 bits) every
bound on a value formed on the way must lie for the recomposition in that dtype to keep ΔW's
precision."""


def _may_underflow(smallest: float, scaled: float, dtype: torch.dtype) -> bool:
    """Whether a value formed on the way to ΔW in `work_dtype(dtype)` may fall below its normal
    numbers (bound `smallest`, 0 only where ΔW is 0) while ΔW itself (bound `scaled`) would be
    a normal `dtype` number: factors of 1e-25 under an `up` of 1e30, or a product of halves
    of 1e-32 at a scale of 1e30, summed to 0 in float32. Such forms are summed in float64."""
    work = work_dtype(dtype)
    if work == torch.float64:
        return False
    tiny = torch.finfo(work).tiny
    return 0 < smallest < tiny * _UNDERFLOW_MARGIN and scaled >= torch.finfo(dtype).tiny


def _finite_or_raise(factors: Factors, dtype: torch.dtype) -> torch.Tensor:
    """ΔW of `factors` (whose first recomposition was not finite, or may have underflowed on
    the way) from a float64 sum, or a `NonFiniteError` naming the form and saying why."""
    name = f"{type(factors).__name__} of shape {tuple(factors.shape)}"
    for part, tensor in factors.named_factors().items():
        if not all_finite(tensor):
            raise NonFiniteError(f"{name}: factor {part} holds NaN/Inf; ΔW would not be finite")
    wide = factors.to(torch.float64)._accumulated()
    if not all_finite(wide):
        raise NonFiniteError(
            f"ΔW of this {name}, or a product of its factors on the way, leaves the range of "
            "float64; float64 is the widest dtype: where ΔW itself fits, rescale the factors "
            "(moving powers of two between them leaves ΔW unchanged)"
        )
    delta = wide.to(dtype)
    if not all_finite(delta):
        largest = float(wide.abs().max())
        raise NonFiniteError(
            f"ΔW of this {name} is out of the range of {dtype}: its largest |entry| is "
            f"{largest:.4g}, above {torch.finfo(dtype).max:.4g}; "
            + wider_dtype_advice(dtype, "recompose it")
        )
    return delta


def fold(tucker: Tucker2) -> LoRA:
    """The exactly equal LoRA (LoCon) form of a Tucker2 form: `down' = mid ∘ down`.

    `down' (r_out, in, *k)`, `up (out, r_out, 1, …)`; the rank is `r_out`. Formats
    without a mid factor (PEFT, kohya) can then carry a Tucker2 adapter with no loss:
    `down'` is summed in float64 and rounded to the factors' dtype (torch casts float64 to
    float16 / bfloat16 through float32).
    """
    if not isinstance(tucker, Tucker2):
        raise DTypeError(f"fold expects a Tucker2 form, got {type(tucker).__name__}")
    r_out, r_in = tucker.rank
    in_features = tucker.shape[1]
    mid = tucker.mid.reshape(r_out, r_in, -1).to(torch.float64)
    mixed = torch.matmul(tucker.down.reshape(r_in, in_features).t().to(torch.float64), mid)
    down = mixed.view(r_out, in_features, *tucker.shape[2:])
    down, up = rounded_factors(down, tucker.up, tucker.down.dtype, "fold")
    return LoRA(down, up, tucker.scale)


def rounded_factors(
    down: torch.Tensor, up: torch.Tensor, dtype: torch.dtype, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA's `down (r, …)` and `up (out, r, …)`, computed in a wider dtype, rounded to
    `dtype`.

    Where a factor would leave `dtype`'s range, or all of one rank's `down` row or `up`
    column would fall below its normal numbers (losing precision), each rank ρ gets its
    magnitude shared evenly instead: `down[ρ] / 2^e`, `up[:, ρ] · 2^e` (exact, a power of
    two), so `up @ down` is unchanged; `NonFiniteError` naming `what` if even that leaves
    the range, or if `down` or `up` is not finite. Meta tensors are only cast.
    """
    if down.is_meta or up.is_meta:
        return down.to(dtype), up.to(dtype)
    wide = torch.promote_types(down.dtype, up.dtype)
    if not (all_finite(down) and all_finite(up)):
        raise NonFiniteError(
            f"{what}: the LoRA factors formed in {wide} are not finite (a factor holds NaN/Inf, "
            f"or a product of factors on the way leaves the range of {wide})"
        )
    rank = down.shape[0]
    down_peak = down.reshape(rank, -1).abs().amax(1).to(wide) if down.numel() else None
    up_peak = up.reshape(up.shape[0], rank).abs().amax(0).to(wide) if up.numel() else None
    narrow_down, narrow_up = down.to(dtype), up.to(dtype)
    tiny = torch.finfo(dtype).tiny
    sinks = down_peak is not None and up_peak is not None and bool(
        (((down_peak < tiny) & (down_peak > 0)) | ((up_peak < tiny) & (up_peak > 0))).any()
    )
    if not sinks and all_finite(narrow_down) and all_finite(narrow_up):
        return narrow_down, narrow_up
    if down_peak is None or up_peak is None:
        raise NonFiniteError(f"{what}: the LoRA factors leave the range of {dtype}")
    down, up = down.to(wide), up.to(wide)
    both = (down_peak > 0) & (up_peak > 0)
    share = torch.exp2(torch.round(torch.log2(torch.where(both, down_peak / up_peak, 1)) / 2))
    narrow_down = (down / share.view(rank, *(1,) * (down.ndim - 1))).to(dtype)
    narrow_up = (up * share.view(1, rank, *(1,) * (up.ndim - 2))).to(dtype)
    if not (all_finite(narrow_down) and all_finite(narrow_up)):
        raise NonFiniteError(
            f"{what}: the LoRA factors leave the range of {dtype} even with each rank's "
            "magnitude shared evenly between up and down; " + wider_dtype_advice(dtype, "work")
        )
    return narrow_down, narrow_up


def require_factor_space(name: str, form: object) -> LoRA | Tucker2 | CP:
    """`form` if it is a `LoRA`, `Tucker2` or `CP` form, each of which has an exactly equal
    LoRA (`as_lora`); else `DTypeError` naming `name`."""
    if isinstance(form, (LoRA, Tucker2, CP)):
        return form
    if isinstance(form, DoRA):
        raise DTypeError(dora_refusal(name, "resize or combine"))
    if isinstance(form, Full):
        raise DTypeError(
            f"{name} is a dense difference (Full, shape {tuple(form.shape)}), which has no "
            "factors to truncate: Full layers combine exactly without a rank; approximate a "
            "weight's by truncated SVD (decompose.svd; for a file, lowrank convert --to kohya "
            "--rank R, which writes LoRA layers)"
        )
    raise DTypeError(
        f"{name} is a {type(form).__name__}, not a LoRA, Tucker2 or CP form: a LoHa or LoKr "
        "has no LoRA of comparable rank, so no factor-space resize or combination; approximate "
        "its dense ΔW by truncated SVD (decompose.svd; for a file, lowrank convert --to "
        "kohya --rank R, which writes LoRA layers)"
    )


def as_lora(form: LoRA | Tucker2 | CP) -> LoRA:
    """The exactly equal `LoRA` of a `LoRA` (itself), `Tucker2` (`fold`) or `CP` form.

    A rank-R CP is the LoRA `up = out·diag(sign(w)·√|w|) (out, R, 1…)`, `down (R, in, *k)`
    with row ρ `√|w_ρ|` times the outer product `in[:, ρ] ⊗ k₁[:, ρ] ⊗ …` (`CP.in_kernel`),
    at the same scale (`w` the weights, 1 without): each side carries half of the weights'
    magnitude, computed in float64 and rounded to the factors' dtype (`rounded_factors`).
    LoHa and LoKr have no LoRA of comparable size: `DTypeError` (`require_factor_space`).
    """
    form = require_factor_space("form", form)
    if isinstance(form, LoRA):
        return form
    if isinstance(form, Tucker2):
        return fold(form)
    dtype = form.out_factor.dtype
    up, down = form.out_factor.to(torch.float64), form.in_kernel(torch.float64)
    if form.weights is not None:
        weights = form.weights.to(torch.float64)
        root = weights.abs().sqrt()
        up, down = up * (root * weights.sign()), down * root[:, None]
    ones = (1,) * (len(form.shape) - 2)
    up = up.reshape(form.shape[0], form.rank, *ones)
    down, up = rounded_factors(down.reshape(form.rank, *form.shape[1:]), up, dtype, "as_lora")
    return LoRA(down, up, form.scale)
