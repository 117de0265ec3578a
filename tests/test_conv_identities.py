"""Running a form's factor convolutions in sequence equals one convolution with its ΔW.

The reference is the chain of `F.convNd` calls on the factors themselves (float64),
never `recompose`; the tested side is one convolution with `recompose(form)`. For
1-, 2- and 3-D kernels, odd and even sizes, strides, paddings and dilations.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import ConvGeometry, assert_close, channels, conv_geometries, randn, ranks, seeds

from lowrank import CP, LoRA, Tucker2, fold, recompose

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
SPATIAL_DIMS = [1, 2, 3]
scales = st.sampled_from([1.0, 0.5, -1.75, 3.0])


def unit(d: int) -> tuple[int, ...]:
    return (1,) * d


def geometry_and_sizes(d: int) -> st.SearchStrategy:
    """A geometry with kernels ≤ 3 in 3-D (to keep the examples fast), plus channel counts."""
    return st.tuples(
        conv_geometries(d, max_kernel=4 if d < 3 else 3), channels, channels, ranks, seeds, scales
    )


def batch(generator: torch.Generator, in_features: int, geometry: ConvGeometry) -> torch.Tensor:
    return randn(generator, 2, in_features, *geometry.input_size)


@pytest.mark.parametrize("d", SPATIAL_DIMS)
@given(data=st.data())
def test_locon_is_down_conv_then_one_by_one_up(d: int, data: st.DataObject) -> None:
    geometry, in_f, out_f, r, seed, scale = data.draw(geometry_and_sizes(d))
    g = torch.Generator().manual_seed(seed)
    down = randn(g, r, in_f, *geometry.kernel)
    up = randn(g, out_f, r, *unit(d))
    x = batch(g, in_f, geometry)
    conv = CONVS[d]

    reference = conv(conv(x, down, **geometry.conv_kwargs), up) * scale
    merged = conv(x, recompose(LoRA(down, up, scale)), **geometry.conv_kwargs)
    assert_close(merged, reference)


@pytest.mark.parametrize("d", SPATIAL_DIMS)
@given(data=st.data(), r_out=ranks)
def test_tucker2_is_down_then_mid_then_up(d: int, data: st.DataObject, r_out: int) -> None:
    geometry, in_f, out_f, r_in, seed, scale = data.draw(geometry_and_sizes(d))
    g = torch.Generator().manual_seed(seed)
    down = randn(g, r_in, in_f, *unit(d))
    mid = randn(g, r_out, r_in, *geometry.kernel)
    up = randn(g, out_f, r_out, *unit(d))
    x = batch(g, in_f, geometry)
    conv = CONVS[d]

    reference = conv(conv(conv(x, down), mid, **geometry.conv_kwargs), up) * scale
    tucker = Tucker2(down, mid, up, scale)
    merged = conv(x, recompose(tucker), **geometry.conv_kwargs)
    assert_close(merged, reference)
    folded = conv(x, recompose(fold(tucker)), **geometry.conv_kwargs)
    assert_close(folded, reference)


@pytest.mark.parametrize("d", SPATIAL_DIMS)
@pytest.mark.parametrize("with_weights", [False, True])
@given(data=st.data())
def test_cp_is_pointwise_then_one_depthwise_conv_per_axis_then_pointwise(
    d: int, with_weights: bool, data: st.DataObject
) -> None:
    geometry, in_f, out_f, r, seed, scale = data.draw(geometry_and_sizes(d))
    g = torch.Generator().manual_seed(seed)
    out_factor = randn(g, out_f, r)
    in_factor = randn(g, in_f, r)
    spatial = [randn(g, k, r) for k in geometry.kernel]
    weights = randn(g, r) if with_weights else None
    x = batch(g, in_f, geometry)
    conv = CONVS[d]

    hidden = conv(x, in_factor.t().reshape(r, in_f, *unit(d)))
    for i, factor in enumerate(spatial):
        taps = [1] * d
        taps[i] = factor.shape[0]
        depthwise = factor.t().reshape(r, 1, *taps)
        hidden = conv(hidden, depthwise, groups=r, **geometry.axis(i))
    last = out_factor * (weights if with_weights else 1.0) * scale
    reference = conv(hidden, last.reshape(out_f, r, *unit(d)))

    form = CP(out_factor, in_factor, spatial, weights, scale)
    merged = conv(x, recompose(form), **geometry.conv_kwargs)
    assert_close(merged, reference)


@given(in_f=channels, out_f=channels, r=ranks, seed=seeds, scale=scales)
def test_linear_lora_is_two_matmuls(in_f: int, out_f: int, r: int, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    down, up = randn(g, r, in_f), randn(g, out_f, r)
    x = randn(g, 5, in_f)
    reference = F.linear(F.linear(x, down), up) * scale
    assert_close(F.linear(x, recompose(LoRA(down, up, scale))), reference)
