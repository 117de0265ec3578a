"""Centre tap, its validity check, and 2-D → 3-D inflation, against direct convolutions.

A parallel 1×1 branch `conv1x1(x, up @ down)` added to the base convolution must
equal the base convolution with `weight + centre_tap(up @ down, k)` wherever
`check_centre_tap` accepts the base; where it refuses, the identity indeed breaks.
`inflate` is checked against `conv2d` (or `conv1d`) run slice by slice.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import assert_close, channels, randn, ranks, seeds
from torch import nn

from lowrank import DTypeError, GeometryError, ShapeError, centre_tap, check_centre_tap, inflate
from lowrank.conv import conv_function

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def same_size_convs(draw: st.DrawFn, d: int) -> nn.Module:
    """A float64 ConvNd that keeps its spatial size: odd kernel, stride 1, padding d·(k−1)/2."""
    kernel = tuple(draw(st.sampled_from([1, 3, 5] if d < 3 else [1, 3])) for _ in range(d))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(d))
    same = tuple(di * (k - 1) // 2 for k, di in zip(kernel, dilation, strict=True))
    padding = draw(st.sampled_from([same, "same"]))
    torch.manual_seed(draw(seeds))
    return MODULES[d](
        draw(channels),
        draw(channels),
        kernel,
        padding=padding,
        dilation=dilation,
        bias=draw(st.booleans()),
        dtype=torch.float64,
    )


@pytest.mark.parametrize("d", [1, 2, 3])
@given(data=st.data(), r=ranks, seed=seeds)
def test_centre_tap_equals_parallel_one_by_one_branch(
    d: int, data: st.DataObject, r: int, seed: int
) -> None:
    conv = data.draw(same_size_convs(d))
    check_centre_tap(conv)
    g = torch.Generator().manual_seed(seed)
    down = randn(g, r, conv.in_channels)
    up = randn(g, conv.out_channels, r)
    size = [data.draw(st.integers(1, 7)) for _ in range(d)]
    x = randn(g, 2, conv.in_channels, *size)
    delta = up @ down

    reference = conv(x) + CONVS[d](x, delta.reshape(*delta.shape, *[1] * d))
    merged = conv._conv_forward(x, conv.weight + centre_tap(delta, conv.kernel_size), conv.bias)
    assert_close(merged, reference)


def test_centre_tap_places_delta_at_the_centre_only() -> None:
    delta = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    kernel = centre_tap(delta, (3, 5))
    assert kernel.shape == (2, 3, 3, 5)
    assert kernel.dtype == torch.float64
    assert torch.equal(kernel[:, :, 1, 2], delta)
    kernel[:, :, 1, 2] = 0
    assert not kernel.any()


@pytest.mark.parametrize(
    ("delta_shape", "kernel_size", "spatial_dims", "expected"),
    [
        ((2, 3), 3, 2, (2, 3, 3, 3)),
        ((2, 3, 1), 3, None, (2, 3, 3)),
        ((2, 3, 1, 1, 1), (1, 3, 5), None, (2, 3, 1, 3, 5)),
        ((2, 3), (7,), None, (2, 3, 7)),
    ],
)
def test_centre_tap_kernel_size_forms(
    delta_shape: tuple[int, ...],
    kernel_size: int | tuple[int, ...],
    spatial_dims: int | None,
    expected: tuple[int, ...],
) -> None:
    delta = torch.randn(delta_shape)
    kernel = centre_tap(delta, kernel_size, spatial_dims=spatial_dims)
    assert kernel.shape == expected
    centre = (slice(None), slice(None), *(k // 2 for k in expected[2:]))
    assert torch.equal(kernel[centre], delta.reshape(2, 3))
    kernel[centre] = 0
    assert not kernel.any()


BAD_GEOMETRIES = [
    pytest.param(dict(kernel_size=3, stride=2, padding=1), "stride", id="stride-2"),
    pytest.param(dict(kernel_size=2, padding=1), "odd", id="even-kernel"),
    pytest.param(dict(kernel_size=3, padding=0), "padding", id="no-padding"),
    pytest.param(dict(kernel_size=3, padding=2), "padding", id="too-much-padding"),
    pytest.param(dict(kernel_size=3, padding=1, dilation=2), "padding", id="dilated-wrong-pad"),
    pytest.param(dict(kernel_size=3, padding=1, groups=2), "groups", id="grouped"),
    pytest.param(dict(kernel_size=3, padding="valid"), "padding", id="valid-string"),
]


@pytest.mark.parametrize("padding", [0, "valid", "same"])
def test_a_1x1_conv_keeps_its_size_however_its_padding_is_spelt(padding) -> None:
    conv = nn.Conv2d(4, 6, 1, padding=padding, dtype=torch.float64)
    check_centre_tap(conv)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    delta = torch.randn(6, 4, dtype=torch.float64)
    merged = conv._conv_forward(x, conv.weight + centre_tap(delta, (1, 1)), conv.bias)
    assert_close(merged, conv(x) + F.conv2d(x, delta[:, :, None, None]))


@pytest.mark.parametrize(("kwargs", "named"), BAD_GEOMETRIES)
def test_check_centre_tap_refuses_and_the_identity_breaks(kwargs: dict, named: str) -> None:
    conv = nn.Conv2d(4, 6, dtype=torch.float64, **kwargs)
    with pytest.raises(GeometryError, match=named):
        check_centre_tap(conv)

    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    delta = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    if conv.groups == 1:
        assert conv(x).shape != F.conv2d(x, delta).shape, "the branch cannot be added"
    else:
        assert conv.weight.shape != (6, 4, 3, 3), "the centre tap cannot be added"


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_even_kernel_with_same_padding_breaks_the_identity_numerically() -> None:
    conv = nn.Conv2d(4, 6, 4, padding="same", bias=False, dtype=torch.float64)
    with pytest.raises(GeometryError, match="odd"):
        check_centre_tap(conv)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    delta = torch.randn(6, 4, dtype=torch.float64)
    middle = torch.zeros_like(conv.weight)
    middle[:, :, 2, 2] = delta
    branch = conv(x) + F.conv2d(x, delta[:, :, None, None])
    merged = conv._conv_forward(x, conv.weight + middle, None)
    assert merged.shape == branch.shape
    assert not torch.allclose(merged, branch)


def test_check_centre_tap_accepts_dilated_same_padding_and_1x1() -> None:
    check_centre_tap(nn.Conv2d(4, 6, 3, padding=2, dilation=2))
    check_centre_tap(nn.Conv3d(4, 6, (3, 1, 5), padding=(1, 0, 2)))
    check_centre_tap(nn.Conv1d(4, 6, 1))


@pytest.mark.parametrize(
    "module", [nn.Linear(3, 4), nn.ConvTranspose2d(3, 4, 3, padding=1), nn.Identity()]
)
def test_check_centre_tap_refuses_non_convolutions(module: nn.Module) -> None:
    with pytest.raises(GeometryError, match=type(module).__name__):
        check_centre_tap(module)


def test_centre_tap_errors_name_the_tensor() -> None:
    with pytest.raises(GeometryError, match="odd"):
        centre_tap(torch.randn(2, 3), (3, 4))
    with pytest.raises(ShapeError, match="delta must be 1×1"):
        centre_tap(torch.randn(2, 3, 3, 3), 3)
    with pytest.raises(ShapeError, match="delta"):
        centre_tap(torch.randn(2), 3, spatial_dims=2)
    with pytest.raises(ShapeError, match="delta has 2 spatial axes"):
        centre_tap(torch.randn(2, 3, 1, 1), (3,))
    with pytest.raises(ShapeError, match="spatial_dims"):
        centre_tap(torch.randn(2, 3), 3)
    with pytest.raises(ShapeError, match="kernel_size"):
        centre_tap(torch.randn(2, 3), (3, 3, 3, 3))
    with pytest.raises(ShapeError, match="spatial_dims is 3"):
        centre_tap(torch.randn(2, 3), (3, 3), spatial_dims=3)
    with pytest.raises(DTypeError, match="delta"):
        centre_tap([[1.0]], 3, spatial_dims=2)


@pytest.mark.parametrize("depth", [1, 3, 5])
@given(
    in_f=channels,
    out_f=channels,
    seed=seeds,
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    slices=st.integers(1, 4),
)
def test_inflate_2d_to_3d_equals_conv2d_slice_by_slice(
    depth: int,
    in_f: int,
    out_f: int,
    seed: int,
    kernel: tuple[int, int],
    stride: int,
    padding: int,
    dilation: int,
    slices: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    weight = randn(g, out_f, in_f, *kernel)
    x = randn(g, 2, in_f, slices, 9, 8)
    inflated = inflate(weight, depth)
    assert inflated.shape == (out_f, in_f, depth, *kernel)

    out = F.conv3d(
        x,
        inflated,
        stride=(1, stride, stride),
        padding=(depth // 2, padding, padding),
        dilation=(1, dilation, dilation),
    )
    reference = torch.stack(
        [
            F.conv2d(x[:, :, s], weight, stride=stride, padding=padding, dilation=dilation)
            for s in range(slices)
        ],
        dim=2,
    )
    assert_close(out, reference)


@pytest.mark.parametrize("depth", [1, 3, 5])
@given(in_f=channels, out_f=channels, seed=seeds, k=st.integers(1, 4), padding=st.integers(0, 2))
def test_inflate_1d_to_2d_equals_conv1d_row_by_row(
    depth: int, in_f: int, out_f: int, seed: int, k: int, padding: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    weight = randn(g, out_f, in_f, k)
    x = randn(g, 2, in_f, 3, 7)
    out = F.conv2d(x, inflate(weight, depth), padding=(depth // 2, padding))
    reference = torch.stack([F.conv1d(x[:, :, s], weight, padding=padding) for s in range(3)], 2)
    assert_close(out, reference)


def test_inflate_keeps_dtype_and_is_zero_off_centre() -> None:
    weight = torch.randn(2, 3, 3, 3, dtype=torch.bfloat16)
    inflated = inflate(weight, 5)
    assert inflated.dtype == torch.bfloat16
    assert torch.equal(inflated[:, :, 2], weight)
    assert not inflated[:, :, [0, 1, 3, 4]].any()


def test_inflate_errors_name_the_argument() -> None:
    for depth in (0, 2, -1):
        with pytest.raises(GeometryError, match="depth"):
            inflate(torch.randn(2, 3, 3, 3), depth)
    with pytest.raises(ShapeError, match="weight"):
        inflate(torch.randn(2, 3, 3, 3, 3), 3)
    with pytest.raises(ShapeError, match="weight"):
        inflate(torch.randn(2, 3), 3)
    with pytest.raises(DTypeError, match="weight"):
        inflate(torch.ones(2, 3, 3, 3, dtype=torch.int64), 3)


@pytest.mark.parametrize(
    ("kernel_size", "named"),
    [
        (3.0, "kernel_size must be an integer"),
        ((3.5, 3), r"kernel_size\[0\] must be an integer"),
        ((3, "3"), r"kernel_size\[1\] must be an integer"),
        ("3", "kernel_size must be an integer"),
        (None, "kernel_size must be an integer"),
        ((3, True), r"kernel_size\[1\] must be an integer"),
    ],
)
def test_centre_tap_kernel_size_must_be_ints(kernel_size: object, named: str) -> None:
    """A non-integer size is refused, never truncated (3.5 used to become 3)."""
    with pytest.raises(ShapeError, match=named):
        centre_tap(torch.randn(2, 3), kernel_size, spatial_dims=2)


@pytest.mark.parametrize("spatial_dims", [0, 4, 2.0, "2"])
def test_centre_tap_spatial_dims_must_be_1_to_3(spatial_dims: object) -> None:
    with pytest.raises(ShapeError, match="spatial_dims"):
        centre_tap(torch.randn(2, 3), 3, spatial_dims=spatial_dims)


@pytest.mark.parametrize("depth", [3.0, "3", None, True, (3,)])
def test_inflate_depth_must_be_an_int(depth: object) -> None:
    """The depth is checked first: a float 3.0 names `depth`, not the weight's shape."""
    with pytest.raises(GeometryError, match="depth must be an integer"):
        inflate(torch.randn(2, 3, 3, 3), depth)


def test_conv_function_per_dimensionality() -> None:
    assert conv_function(1) is F.conv1d
    assert conv_function(2) is F.conv2d
    assert conv_function(3) is F.conv3d
    for bad in (0, 4):
        with pytest.raises(ShapeError, match=str(bad)):
            conv_function(bad)
    for bad in (True, 2.0, "2"):
        with pytest.raises(ShapeError, match="spatial_dims must be an integer"):
            conv_function(bad)


def test_a_grouped_conv_is_refused_for_its_groups_alone() -> None:
    """A grouped 3×3 convolution keeps its spatial size; the refusal names only its groups."""
    with pytest.raises(GeometryError) as info:
        check_centre_tap(nn.Conv2d(4, 6, 3, padding=1, groups=2))
    assert "groups=2" in str(info.value) and "spatial size" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_centre_tap_refuses_a_non_float_update(dtype):
    with pytest.raises(DTypeError, match="delta must be a floating-point tensor"):
        centre_tap(torch.ones(3, 4, dtype=dtype), (3,))
