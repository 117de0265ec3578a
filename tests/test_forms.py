"""The factor forms: recomposition against einsum and TensorLy, properties, dtypes, errors.

References are built here, independently of `lowrank.forms`: a `torch.einsum` written
out per form, TensorLy's `tucker_to_tensor`/`cp_to_tensor` (numpy backend, float64),
and parameter counts summed from the shapes the test itself chose.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import FLOAT64_RTOL, assert_close, channels, randn, ranks, seeds

from lowrank import (
    CP,
    ArgumentError,
    DeviceError,
    DTypeError,
    LoHa,
    LoKr,
    LoRA,
    NonFiniteError,
    RankError,
    ShapeError,
    Tucker2,
    alpha_from_scale,
    as_lora,
    fold,
    recompose,
    scale_from_alpha,
)
from lowrank.forms import add_dense

kernels = st.integers(0, 3).flatmap(lambda d: st.tuples(*[st.integers(1, 3)] * d))
scales = st.sampled_from([1.0, 0.25, -2.5, 7.0])
AXES = "hwz"
LOW_PRECISION_RTOL = {
    torch.float32: 4 * torch.finfo(torch.float32).eps,
    torch.float16: 4 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps,
}


def unit(kernel: tuple[int, ...]) -> tuple[int, ...]:
    return (1,) * len(kernel)


Kernel = tuple[int, ...]


def make_lora(
    g: torch.Generator, out_f: int, in_f: int, kernel: Kernel, r: int, scale: float = 1.0
) -> LoRA:
    """`down (r, in, *k)`, `up (out, r, 1…)`; `kernel=()` for a linear weight."""
    return LoRA(randn(g, r, in_f, *kernel), randn(g, out_f, r, *unit(kernel)), scale)


def make_tucker2(
    g: torch.Generator,
    out_f: int,
    in_f: int,
    kernel: Kernel,
    ranks_: tuple[int, int],
    scale: float = 1.0,
) -> Tucker2:
    """`down (r_in, in, 1…)`, `mid (r_out, r_in, *k)`, `up (out, r_out, 1…)`."""
    r_out, r_in = ranks_
    return Tucker2(
        randn(g, r_in, in_f, *unit(kernel)),
        randn(g, r_out, r_in, *kernel),
        randn(g, out_f, r_out, *unit(kernel)),
        scale,
    )


def make_cp(
    g: torch.Generator,
    out_f: int,
    in_f: int,
    kernel: Kernel,
    r: int,
    scale: float = 1.0,
    weights: bool = True,
) -> CP:
    """`out (out, R)`, `in (in, R)`, `(k_i, R)` per axis, `weights (R,)` or None."""
    spatial = [randn(g, k, r) for k in kernel]
    return CP(
        randn(g, out_f, r), randn(g, in_f, r), spatial, randn(g, r) if weights else None, scale
    )


def einsum_lora(form: LoRA) -> torch.Tensor:
    up = form.up.reshape(form.up.shape[:2])
    return torch.einsum("or,ri...->oi...", up, form.down) * form.scale


def einsum_tucker2(form: Tucker2) -> torch.Tensor:
    up = form.up.reshape(form.up.shape[:2])
    down = form.down.reshape(form.down.shape[:2])
    return torch.einsum("tp,pq...,qs->ts...", up, form.mid, down) * form.scale


def einsum_cp(form: CP) -> torch.Tensor:
    axes = AXES[: len(form.spatial_factors)]
    weights = torch.ones_like(form.out_factor[0]) if form.weights is None else form.weights
    inputs = ",".join(["or", "ir", *(f"{a}r" for a in axes), "r"])
    return (
        torch.einsum(
            f"{inputs}->oi{axes}", form.out_factor, form.in_factor, *form.spatial_factors, weights
        )
        * form.scale
    )


forms_and_references = st.sampled_from(
    [
        (lambda g, o, i, k, r, s: make_lora(g, o, i, k, r, s), einsum_lora),
        (lambda g, o, i, k, r, s: make_tucker2(g, o, i, k, (r, r % 3 + 1), s), einsum_tucker2),
        (lambda g, o, i, k, r, s: make_cp(g, o, i, k, r, s), einsum_cp),
        (lambda g, o, i, k, r, s: make_cp(g, o, i, k, r, s, weights=False), einsum_cp),
    ]
)


@given(
    case=forms_and_references,
    out_f=channels,
    in_f=channels,
    kernel=kernels,
    r=ranks,
    seed=seeds,
    scale=scales,
)
def test_recompose_equals_einsum(
    case: tuple, out_f: int, in_f: int, kernel: Kernel, r: int, seed: int, scale: float
) -> None:
    make, reference = case
    form = make(torch.Generator().manual_seed(seed), out_f, in_f, kernel, r, scale)
    dense = recompose(form)
    assert dense.shape == (out_f, in_f, *kernel) == form.shape
    assert_close(dense, reference(form))
    assert torch.equal(form.to_dense(), dense)


@given(
    case=forms_and_references,
    out_f=channels,
    in_f=channels,
    kernel=kernels,
    r=ranks,
    seed=seeds,
    scale=scales,
    alpha=st.sampled_from([1.0, -0.75, 3.0]),
    bounds=st.tuples(st.integers(0, 6), st.integers(0, 6)),
    single=st.booleans(),
)
def test_add_dense_adds_alpha_times_those_rows_of_delta_w(
    case: tuple,
    out_f: int,
    in_f: int,
    kernel: Kernel,
    r: int,
    seed: int,
    scale: float,
    alpha: float,
    bounds: tuple[int, int],
    single: bool,
) -> None:
    """In float64, and in float32 (factors cast, the sum in float32) to float32 accuracy."""
    make, reference = case
    g = torch.Generator().manual_seed(seed)
    form = make(g, out_f, in_f, kernel, r, scale)
    rows = slice(min(bounds[0], out_f), min(max(bounds), out_f))
    target = randn(g, rows.stop - rows.start, in_f, *kernel)
    expected = target + alpha * reference(form)[rows]
    dtype = torch.float32 if single else torch.float64
    work = form.to(dtype)
    got = add_dense(target.to(dtype), work, alpha, rows)
    assert got.dtype == dtype and got.shape == expected.shape
    assert_close(got, expected, rtol=1e-5 if single else FLOAT64_RTOL)


@pytest.mark.parametrize("rows", [1, [0, 1], torch.tensor([0, 1]), (0, 2)])
def test_to_dense_rows_must_be_a_slice(rows) -> None:
    g = torch.Generator().manual_seed(0)
    form = LoRA(torch.randn(2, 4, generator=g), torch.randn(3, 2, generator=g))
    with pytest.raises(ArgumentError, match="rows must be a slice"):
        form.to_dense(rows)


@given(
    out_f=channels, in_f=channels, kernel=kernels, r_out=ranks, r_in=ranks, seed=seeds, scale=scales
)
def test_tucker2_matches_tensorly_tucker_to_tensor(
    out_f: int, in_f: int, kernel: Kernel, r_out: int, r_in: int, seed: int, scale: float
) -> None:
    form = make_tucker2(
        torch.Generator().manual_seed(seed), out_f, in_f, kernel, (r_out, r_in), scale
    )
    up = form.up.reshape(out_f, r_out).numpy()
    down = form.down.reshape(r_in, in_f).numpy()
    spatial = [np.eye(k) for k in kernel]
    with tl.backend_context("numpy"):
        reference = tl.tucker_to_tensor((form.mid.numpy(), [up, down.T, *spatial])) * scale
    assert_close(recompose(form), torch.from_numpy(reference))


@given(
    out_f=channels,
    in_f=channels,
    kernel=kernels,
    r=ranks,
    seed=seeds,
    scale=scales,
    with_weights=st.booleans(),
)
def test_cp_matches_tensorly_cp_to_tensor(
    out_f: int, in_f: int, kernel: Kernel, r: int, seed: int, scale: float, with_weights: bool
) -> None:
    form = make_cp(
        torch.Generator().manual_seed(seed), out_f, in_f, kernel, r, scale, weights=with_weights
    )
    factors = [f.numpy() for f in (form.out_factor, form.in_factor, *form.spatial_factors)]
    weights = np.ones(r) if form.weights is None else form.weights.numpy()
    with tl.backend_context("numpy"):
        reference = tl.cp_to_tensor((weights, factors)) * scale
    assert_close(recompose(form), torch.from_numpy(reference))


@given(
    out_f=channels, in_f=channels, kernel=kernels, r_out=ranks, r_in=ranks, seed=seeds, scale=scales
)
def test_fold_gives_the_equal_lora_of_rank_r_out(
    out_f: int, in_f: int, kernel: Kernel, r_out: int, r_in: int, seed: int, scale: float
) -> None:
    tucker = make_tucker2(
        torch.Generator().manual_seed(seed), out_f, in_f, kernel, (r_out, r_in), scale
    )
    lora = fold(tucker)
    assert isinstance(lora, LoRA)
    assert lora.rank == r_out
    assert lora.down.shape == (r_out, in_f, *kernel)
    assert lora.scale == scale
    assert torch.equal(lora.up, tucker.up)
    assert_close(recompose(lora), einsum_tucker2(tucker))


@given(out_f=channels, in_f=channels, kernel=kernels, r=ranks, r_in=ranks, seed=seeds)
def test_shape_rank_and_parameter_counts(
    out_f: int, in_f: int, kernel: Kernel, r: int, r_in: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    taps = math.prod(kernel)
    ones = (1,) * len(kernel)

    lora = make_lora(g, out_f, in_f, kernel, r)
    assert lora.shape == (out_f, in_f, *kernel)
    assert lora.rank == r
    assert lora.num_params == r * in_f * taps + out_f * r
    assert LoRA.count(in_f, out_f, kernel, r) == lora.num_params

    tucker = make_tucker2(g, out_f, in_f, kernel, (r, r_in))
    assert tucker.shape == (out_f, in_f, *kernel)
    assert tucker.rank == (r, r_in)
    brute = sum(math.prod(s) for s in [(r_in, in_f, *ones), (r, r_in, *kernel), (out_f, r, *ones)])
    assert tucker.num_params == brute
    assert Tucker2.count(in_f, out_f, kernel, (r, r_in)) == brute

    for with_weights in (False, True):
        cp = make_cp(g, out_f, in_f, kernel, r, weights=with_weights)
        assert cp.shape == (out_f, in_f, *kernel)
        assert cp.rank == r
        brute = out_f * r + in_f * r + sum(k * r for k in kernel) + (r if with_weights else 0)
        assert cp.num_params == brute
        assert CP.count(in_f, out_f, kernel, r, weights=with_weights) == brute


@given(
    case=forms_and_references,
    out_f=channels,
    in_f=channels,
    kernel=kernels,
    r=ranks,
    seed=seeds,
    cuts=st.lists(st.integers(0, 64), min_size=2, max_size=6),
)
def test_with_rows_is_those_rows_of_delta_w(
    case: tuple, out_f: int, in_f: int, kernel: Kernel, r: int, seed: int, cuts: list[int]
) -> None:
    """`with_rows(blocks)` of a LoRA, Tucker2 or CP, and of a LoHa of two of them, is the form
    whose ΔW is ΔW's rows `blocks` in turn (einsum of the float64 factors)."""
    make, reference = case
    g = torch.Generator().manual_seed(seed)
    form = make(g, out_f, in_f, kernel, r, 0.75)
    bounds = sorted({c % (out_f + 1) for c in cuts})
    blocks = list(itertools.pairwise(bounds))[::-1] or [(0, out_f)]
    rows = torch.cat([torch.arange(start, stop) for start, stop in blocks])
    assert_close(reference(form.with_rows(blocks)), reference(form)[rows])
    if isinstance(form, LoRA) and form.down.ndim == 2:
        other = make_lora(g, out_f, in_f, (), r, 1.0)
        loha = LoHa(LoRA(form.down, form.up), other, 0.5)
        part = loha.with_rows(blocks)
        want = 0.5 * einsum_lora(LoRA(form.down, form.up))[rows] * einsum_lora(other)[rows]
        assert_close(part.to_dense().double(), want)


def test_transposed_lora_is_the_lora_of_the_transpose() -> None:
    """A linear LoRA's `transposed()` recomposes to ΔWᵀ (einsum of the float64 factors); a
    convolution's LoRA has none (`ShapeError`)."""
    g = torch.Generator().manual_seed(2)
    form = make_lora(g, 5, 3, (), 2, 0.75)
    assert_close(einsum_lora(form.transposed()), einsum_lora(form).T)
    with pytest.raises(ShapeError, match="linear"):
        make_lora(g, 5, 3, (3, 3), 2).transposed()


@pytest.mark.parametrize(("dense_w1", "blocks", "whole"), [
    (True, [(4, 8), (0, 4)], True), (False, [(0, 4), (8, 12)], True),
    (True, [(0, 2)], False), (False, [(4, 6), (0, 4)], False),
])  # fmt: skip
def test_lokr_with_rows_takes_whole_groups_of_w2_rows_only(
    dense_w1: bool, blocks: list[tuple[int, int]], whole: bool
) -> None:
    """ΔW = w1 ⊗ w2 with w2 of 4 rows: rows [4i, 4i + 4) are w1[i] ⊗ w2, so blocks of whole
    groups give the LoKr of those rows (kron of the float64 factors); a block that cuts a
    group has none (None)."""
    g = torch.Generator().manual_seed(0)
    w1 = randn(g, 3, 2).double()
    w2 = randn(g, 4, 5).double()
    form = LoKr(w1 if dense_w1 else LoRA(randn(g, 1, 2).double(), randn(g, 3, 1).double()), w2, 2.0)
    part = form.with_rows(blocks)
    if not whole:
        assert part is None
        return
    dense_w1_value = w1 if dense_w1 else form.w1.up @ form.w1.down
    rows = torch.cat([torch.arange(start, stop) for start, stop in blocks])
    assert_close(part.to_dense(), 2.0 * torch.kron(dense_w1_value, w2)[rows])


@pytest.mark.parametrize("blocks", [[], [(2, 7)], [(-2, 5)], [(0, 2), (3, 3)], [(4, 1)]])
@pytest.mark.parametrize("index", range(7))
def test_with_rows_refuses_blocks_outside_delta_w_rows(index: int, blocks: list) -> None:
    """ΔW has 5 rows: no blocks, an empty or reversed one, one past the last row or before
    the first is a ShapeError, not the clipped or wrapped rows slicing would take (a form
    of 2 rows where `[(2, 7)]` asks 5)."""
    g = torch.Generator().manual_seed(index)
    forms = [*all_forms(g), LoHa(make_lora(g, 5, 4, (), 2), make_lora(g, 5, 4, (), 2)),
             LoKr(randn(g, 5, 2), randn(g, 1, 2))]  # fmt: skip
    with pytest.raises(ShapeError, match="block"):
        forms[index].with_rows(blocks)


def all_forms(g: torch.Generator, kernel: Kernel = (3, 3)) -> list[LoRA | Tucker2 | CP]:
    """LoCon, linear LoRA, Tucker2, CP with and without weights, all 5 × 4."""
    return [
        make_lora(g, 5, 4, kernel, 3),
        make_lora(g, 5, 4, (), 3),
        make_tucker2(g, 5, 4, kernel, (3, 2)),
        make_cp(g, 5, 4, kernel, 3),
        make_cp(g, 5, 4, kernel, 3, weights=False),
    ]


def with_scale(form: LoRA | Tucker2 | CP, scale: float) -> LoRA | Tucker2 | CP:
    if isinstance(form, LoRA):
        return LoRA(form.down, form.up, scale)
    if isinstance(form, Tucker2):
        return Tucker2(form.down, form.mid, form.up, scale)
    return CP(form.out_factor, form.in_factor, form.spatial_factors, form.weights, scale)


@pytest.mark.parametrize("index", range(5))
def test_scale_is_applied_exactly_once(index: int) -> None:
    form = all_forms(torch.Generator().manual_seed(index))[index]
    once = recompose(with_scale(form, 1.0))
    assert torch.equal(recompose(with_scale(form, 2.0)), 2 * once)
    assert torch.equal(recompose(with_scale(form, -0.5)), -0.5 * once)
    assert not recompose(with_scale(form, 0.0)).any()


@pytest.mark.parametrize("dtype", list(LOW_PRECISION_RTOL))
@pytest.mark.parametrize("index", range(5))
def test_recompose_in_low_precision_keeps_dtype(index: int, dtype: torch.dtype) -> None:
    form = with_scale(all_forms(torch.Generator().manual_seed(index), (3, 1, 5))[index], 0.75)
    low = form.to(dtype)
    dense = recompose(low)
    assert dense.dtype == dtype
    assert dense.device == form.to_dense().device
    reference = recompose(low.to(torch.float64))
    assert_close(dense, reference, rtol=LOW_PRECISION_RTOL[dtype])


@pytest.mark.parametrize("index", range(5))
def test_to_float64_and_meta_device(index: int) -> None:
    form = all_forms(torch.Generator().manual_seed(index))[index]
    single = form.to(torch.float32)
    double = single.to(torch.float64)
    assert type(double) is type(form)
    assert recompose(double).dtype == torch.float64
    assert double.scale == form.scale
    assert_close(recompose(double), recompose(form), rtol=1e-6)

    meta = form.to("meta")
    dense = recompose(meta)
    assert dense.device.type == "meta"
    assert dense.shape == form.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("index", range(5))
def test_recompose_on_cuda(index: int) -> None:
    form = all_forms(torch.Generator().manual_seed(index))[index]
    dense = recompose(form.to("cuda"))
    assert dense.is_cuda
    assert_close(dense.cpu(), recompose(form))


def test_recompose_of_non_contiguous_factors() -> None:
    g = torch.Generator().manual_seed(7)
    lora = LoRA(
        randn(g, 4, 3, 5, 2).permute(1, 3, 0, 2).transpose(2, 3),
        randn(g, 1, 1, 3, 6).permute(3, 2, 0, 1),
    )
    assert not lora.down.is_contiguous()
    assert_close(recompose(lora), einsum_lora(lora))
    tucker = Tucker2(
        randn(g, 5, 4).t()[..., None, None],
        randn(g, 3, 3, 4, 2).permute(3, 2, 0, 1),
        randn(g, 6, 1).expand(6, 2)[..., None, None],
        1.5,
    )
    assert_close(recompose(tucker), einsum_tucker2(tucker))
    assert_close(recompose(fold(tucker)), einsum_tucker2(tucker))
    spatial = [randn(g, 3, 4).t(), randn(g, 1, 3).expand(2, 3)]
    cp = CP(randn(g, 3, 6).t(), randn(g, 3, 5).t(), spatial, randn(g, 6)[::2])
    assert_close(recompose(cp), einsum_cp(cp))


@pytest.mark.parametrize("index", range(5))
def test_gradients_through_recompose_match_einsum(index: int) -> None:
    form = with_scale(all_forms(torch.Generator().manual_seed(index))[index], 1.5)
    tensors = [t.requires_grad_() for t in vars(form).values() if isinstance(t, torch.Tensor)]
    tensors += [t.requires_grad_() for t in getattr(form, "spatial_factors", ())]
    reference = {LoRA: einsum_lora, Tucker2: einsum_tucker2, CP: einsum_cp}[type(form)]
    probe = torch.randn(form.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = torch.autograd.grad((recompose(form) * probe).sum(), tensors)
    theirs = torch.autograd.grad((reference(form) * probe).sum(), tensors)
    for got, want in zip(ours, theirs, strict=True):
        assert_close(got, want)


def test_scale_from_alpha() -> None:
    assert scale_from_alpha(16, 8) == 2.0
    assert scale_from_alpha(8.0, 16) == 0.5
    assert scale_from_alpha(16, 64, rslora=True) == 2.0
    assert scale_from_alpha(3, 9, rslora=True) == 1.0
    assert isinstance(scale_from_alpha(4, 2), float)
    for rank in (0, -3):
        with pytest.raises(RankError, match="rank"):
            scale_from_alpha(4, rank)
    for alpha in (math.nan, math.inf):
        with pytest.raises(NonFiniteError, match="alpha must be finite"):
            scale_from_alpha(alpha, 4)


@pytest.mark.parametrize("rank", [math.nan, math.inf, 2.5, 2.0, "8", True, None, (2,)])
def test_scale_from_alpha_needs_an_int_rank(rank: object) -> None:
    with pytest.raises(RankError, match="rank must be an integer"):
        scale_from_alpha(8, rank)
    with pytest.raises(RankError, match="rank must be an integer"):
        alpha_from_scale(1.0, rank)


@pytest.mark.parametrize("alpha", ["8", None, True, 1j, torch.tensor([1.0, 2.0])])
def test_scale_from_alpha_needs_a_number_alpha(alpha: object) -> None:
    with pytest.raises(ArgumentError, match="alpha must be a number"):
        scale_from_alpha(alpha, 8)


def test_scale_from_alpha_takes_numpy_scalars() -> None:
    assert scale_from_alpha(np.float32(16), np.int64(8)) == 2.0
    assert alpha_from_scale(np.float64(2.0), np.int32(8)) == 16.0


@pytest.mark.parametrize(("alpha", "rank", "rslora"),
                         [(sys.float_info.max, 3, False), (-sys.float_info.max, 7, True)])
def test_an_alpha_near_the_largest_float_comes_back_from_its_scale(alpha, rank, rslora):
    """`scale_from_alpha(max float, 3) · 3` rounds beyond the largest float: the search from
    it stepped to Inf and raised, naming alpha; a scale no alpha gives is refused by name."""
    scale = scale_from_alpha(alpha, rank, rslora=rslora)
    assert scale_from_alpha(alpha_from_scale(scale, rank, rslora=rslora), rank, rslora=rslora) == (
        scale
    )
    with pytest.raises(NonFiniteError, match=r"scale 1e\+308 times rank 3"):
        alpha_from_scale(1e308, 3)


# Error paths: each asserts the type and that the message names the tensor at fault.


def f64(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float64)


LORA_ERRORS = [
    pytest.param(lambda: LoRA(f64(4), f64(5, 4)), ShapeError, "down", id="down-1d"),
    pytest.param(
        lambda: LoRA(f64(2, 3, 3, 3, 3, 3), f64(5, 2, 1, 1, 1, 1)), ShapeError, "down", id="down-6d"
    ),
    pytest.param(lambda: LoRA(f64(2, 4, 3, 3), f64(5, 2)), ShapeError, "up", id="up-ndim"),
    pytest.param(
        lambda: LoRA(f64(2, 4, 3, 3), f64(5, 2, 3, 3)),
        ShapeError,
        "up must have shape",
        id="up-not-1x1",
    ),
    pytest.param(lambda: LoRA(f64(2, 4), f64(5, 3)), RankError, "up has rank 3", id="rank"),
    pytest.param(
        lambda: LoRA(f64(2, 4, 3), f64(5, 3, 1)), RankError, "down has rank 2", id="rank-conv"
    ),
    pytest.param(
        lambda: LoRA(f64(2, 4), torch.zeros(5, 2)), DTypeError, "up has dtype", id="dtype-mismatch"
    ),
    pytest.param(
        lambda: LoRA(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(5, 2, dtype=torch.int64)),
        DTypeError,
        "down must be a floating-point",
        id="int",
    ),
    pytest.param(lambda: LoRA(f64(2, 4).bool(), f64(5, 2).bool()), DTypeError, "down", id="bool"),
    pytest.param(
        lambda: LoRA(f64(2, 4), f64(5, 2).to("meta")), DeviceError, "up is on meta", id="device"
    ),
    pytest.param(
        lambda: LoRA(f64(2, 4), f64(5, 2), float("nan")), NonFiniteError, "scale", id="nan-scale"
    ),
    pytest.param(
        lambda: LoRA(f64(2, 4), f64(5, 2), float("inf")), NonFiniteError, "scale", id="inf-scale"
    ),
    pytest.param(lambda: LoRA(f64(0, 4), f64(5, 0)), RankError, "down has rank 0", id="rank-0"),
    pytest.param(
        lambda: LoRA([[0.0]], f64(5, 2)), DTypeError, "down must be a torch.Tensor", id="not-tensor"
    ),
    pytest.param(
        lambda: LoRA(f64(2, 4), np.zeros((5, 2))), DTypeError, "up must be a torch", id="numpy-up"
    ),
]

TUCKER2_ERRORS = [
    pytest.param(
        lambda: Tucker2(f64(2, 4, 1, 1), f64(3, 2, 3, 3), f64(5, 3)), ShapeError, "up", id="up-ndim"
    ),
    pytest.param(
        lambda: Tucker2(f64(2, 4, 3, 3), f64(3, 2, 3, 3), f64(5, 3, 1, 1)),
        ShapeError,
        "down must have shape",
        id="down-not-1x1",
    ),
    pytest.param(
        lambda: Tucker2(f64(2, 4, 1, 1), f64(3, 2, 3, 3), f64(5, 3, 1, 3)),
        ShapeError,
        "up must have shape",
        id="up-not-1x1",
    ),
    pytest.param(
        lambda: Tucker2(f64(2, 4, 1, 1), f64(3, 3, 3, 3), f64(5, 3, 1, 1)),
        RankError,
        "down has 2 rows",
        id="r_in",
    ),
    pytest.param(
        lambda: Tucker2(f64(2, 4, 1, 1), f64(3, 2, 3, 3), f64(5, 4, 1, 1)),
        RankError,
        "up has 4 columns",
        id="r_out",
    ),
    pytest.param(
        lambda: Tucker2(f64(0, 4, 1, 1), f64(3, 0, 3, 3), f64(5, 3, 1, 1)),
        RankError,
        "mid has rank 0 along axis 1",
        id="r_in-0",
    ),
    pytest.param(
        lambda: Tucker2(f64(2, 4, 1, 1), f64(3), f64(5, 4, 1, 1)), ShapeError, "mid", id="mid-1d"
    ),
    pytest.param(
        lambda: Tucker2(f64(2, 4, 1, 1), f64(3, 2, 3, 3).float(), f64(5, 3, 1, 1)),
        DTypeError,
        "down has dtype",
        id="dtype-mismatch",
    ),
    pytest.param(
        lambda: Tucker2(
            f64(2, 4, 1, 1), torch.zeros(3, 2, 3, 3, dtype=torch.int32), f64(5, 3, 1, 1)
        ),
        DTypeError,
        "mid",
        id="int-mid",
    ),
    pytest.param(
        lambda: Tucker2(f64(2, 4, 1, 1), f64(3, 2, 3, 3), f64(5, 3, 1, 1), math.nan),
        NonFiniteError,
        "scale",
        id="nan-scale",
    ),
    pytest.param(
        lambda: Tucker2(f64(2, 4, 1, 1), f64(3, 2, 3, 3), f64(5, 3, 1, 1).to("meta")),
        DeviceError,
        "up",
        id="device",
    ),
]

CP_ERRORS = [
    pytest.param(
        lambda: CP(f64(5, 3), f64(4, 2), [f64(3, 3)]), RankError, "in_factor", id="in-columns"
    ),
    pytest.param(
        lambda: CP(f64(5, 3), f64(4, 3), [f64(3, 3), f64(3, 2)]),
        RankError,
        r"spatial_factors\[1\]",
        id="spatial-columns",
    ),
    pytest.param(
        lambda: CP(f64(5, 3), f64(4, 3), [f64(3, 3)], f64(2)),
        RankError,
        "weights",
        id="weights-length",
    ),
    pytest.param(lambda: CP(f64(5, 0), f64(4, 0)), RankError, "out_factor has rank 0", id="rank-0"),
    pytest.param(
        lambda: CP(f64(5, 3), f64(4, 3), [f64(3, 3)] * 4),
        ShapeError,
        "spatial_factors",
        id="four-spatial",
    ),
    pytest.param(
        lambda: CP(f64(5, 3), f64(4, 3), [f64(3, 3)], f64(3, 1)),
        ShapeError,
        "weights",
        id="weights-2d",
    ),
    pytest.param(
        lambda: CP(f64(5, 3, 1), f64(4, 3), [f64(3, 3)]), ShapeError, "out_factor", id="out-3d"
    ),
    pytest.param(lambda: CP(f64(5, 3), f64(4), [f64(3, 3)]), ShapeError, "in_factor", id="in-1d"),
    pytest.param(
        lambda: CP(f64(5, 3), f64(4, 3), [f64(3, 3, 1)]),
        ShapeError,
        r"spatial_factors\[0\]",
        id="spatial-3d",
    ),
    pytest.param(
        lambda: CP(f64(5, 3), f64(4, 3), [torch.zeros(3, 3)]),
        DTypeError,
        r"spatial_factors\[0\] has dtype",
        id="dtype-mismatch",
    ),
    pytest.param(
        lambda: CP(torch.ones(5, 3, dtype=torch.int64), f64(4, 3)),
        DTypeError,
        "out_factor",
        id="int",
    ),
    pytest.param(
        lambda: CP(f64(5, 3), f64(4, 3), [f64(3, 3).to("meta")]),
        DeviceError,
        r"spatial_factors\[0\]",
        id="device",
    ),
    pytest.param(
        lambda: CP(f64(5, 3), f64(4, 3), [[0.0]]),
        DTypeError,
        r"spatial_factors\[0\]",
        id="spatial-not-tensor",
    ),
    pytest.param(
        lambda: CP(f64(5, 3), f64(4, 3), [], [1.0, 2.0, 3.0]),
        DTypeError,
        "weights",
        id="weights-not-tensor",
    ),
    pytest.param(
        lambda: CP(f64(5, 3), f64(4, 3), [], None, math.inf),
        NonFiniteError,
        "scale",
        id="inf-scale",
    ),
]


@pytest.mark.parametrize(("build", "error", "named"), LORA_ERRORS + TUCKER2_ERRORS + CP_ERRORS)
def test_invalid_factors_raise_a_typed_error_naming_the_tensor(
    build: Callable[[], object], error: type[Exception], named: str
) -> None:
    with pytest.raises(error, match=named):
        build()


def test_recompose_and_fold_refuse_other_types() -> None:
    lora = LoRA(f64(2, 4), f64(5, 2))
    with pytest.raises(TypeError, match="got Tensor"):
        recompose(f64(5, 4))
    with pytest.raises(TypeError, match="got dict"):
        recompose({"down": f64(2, 4), "up": f64(5, 2)})
    with pytest.raises(TypeError, match="got LoRA"):
        fold(lora)


def test_forms_are_frozen() -> None:
    lora = LoRA(f64(2, 4), f64(5, 2))
    with pytest.raises(AttributeError):
        lora.scale = 3.0


@pytest.mark.parametrize("form", ["locon", "tucker2"])
def test_recompose_at_benchmark_size_matches_float64_einsum(form: str) -> None:
    g = torch.Generator().manual_seed(0)
    channels_, r = 1280, 64
    if form == "locon":
        factors = LoRA(randn(g, r, channels_, 3, 3), randn(g, channels_, r, 1, 1), 0.5)
        reference = einsum_lora(factors)
    else:
        factors = Tucker2(
            randn(g, r, channels_, 1, 1), randn(g, r, r, 3, 3), randn(g, channels_, r, 1, 1), 0.5
        )
        reference = einsum_tucker2(factors)
    dense = recompose(factors.to(torch.float32))
    assert dense.dtype == torch.float32
    assert_close(dense, reference, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-31, 1e31])
def test_a_scale_that_would_push_a_float32_operand_out_of_range_is_rounded_once(scale):
    """A GEMM may apply its alpha to an operand first: at scale 1e-31 on `down` of 2^-32
    (`alpha · down` ≈ 1e-41, subnormal in float32) ΔW (≈ 1e-34, a normal float32) came out
    1.8e-5 off; within float32's rounding of a float64 product now, through `recompose` and
    `add_dense`, and likewise where `alpha · up` would overflow."""
    g = torch.Generator().manual_seed(0)
    down = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64) * 2.0**-32
    up = torch.randn(5, 3, 1, 1, generator=g, dtype=torch.float64) * 2.0**20
    if scale > 1:  # alpha · down ≈ 4e40 is beyond float32, ΔW ≈ 1e22 is not
        down, up = down * 2.0**64, up * 2.0**-80
    form = LoRA(down.float(), up.float(), scale=scale)
    reference = scale * torch.einsum("tr,rsij->tsij", up.float().double().reshape(5, 3),
                                     down.float().double())  # fmt: skip
    assert float(reference.abs().max()) > torch.finfo(torch.float32).tiny * 1e3
    for got in (recompose(form), add_dense(torch.zeros(5, 4, 3, 3), form)):
        error = (got.double() - reference).norm() / reference.norm()
        assert error < 1e-7, float(error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_scale_beyond_the_factors_range_still_recomposes(dtype):
    """Scale 1e40 on factors of 1e-20 (1e-10 for the products' halves): ΔW is ordinary, but
    the scale itself is no float32; the product is scaled in float64 and rounded once."""
    tiny = 1e-20 if dtype == torch.float32 else 1e-3

    def full(*shape, value=tiny):
        return torch.full(shape, value, dtype=torch.float64)

    big = 1.0 / tiny**2
    forms = [
        LoRA(full(2, 4), full(3, 2), big),
        Tucker2(full(2, 4, 1), full(2, 2, 3, value=1.0), full(3, 2, 1), big),
        CP(full(3, 2), full(4, 2), [full(3, 2, value=1.0)], scale=big),
        LoHa(LoRA(full(2, 4, value=tiny**0.5), full(3, 2, value=tiny**0.5)),
             LoRA(full(2, 4, value=tiny**0.5), full(3, 2, value=tiny**0.5)), big),
        LoKr(full(2, 2), full(3, 2), big),
    ]  # fmt: skip
    for form in forms:
        expected = recompose(form)
        assert 0.5 < float(expected.abs().max()) < 100
        narrow = form.to(dtype)
        if not all(bool((t != 0).all()) for t in narrow.named_factors().values()):
            continue  # the factors themselves underflow this dtype
        got = recompose(narrow)
        assert got.dtype == dtype
        assert float((got.double() - expected).norm() / expected.norm()) < 2e-2, type(form)
    target = torch.zeros(3, 4, dtype=dtype)
    add_dense(target, forms[0].to(dtype))
    assert torch.allclose(target.double(), recompose(forms[0]), rtol=2e-2)


def test_a_form_shows_its_factors_shapes_and_dtypes_on_one_line():
    """Printing a layer of a real size gives one line per form, not the factors' values."""
    lora = LoRA(torch.full((64, 1280), 0.25), torch.full((1280, 64), 0.25), 0.5)
    small = LoRA(torch.zeros(2, 5, dtype=torch.float16), torch.zeros(4, 2, dtype=torch.float16))
    assert repr(lora) == "LoRA(down=float32[64, 1280], up=float32[1280, 64], scale=0.5)"
    assert repr(LoHa(small, small, 0.7)) == (
        "LoHa(first=LoRA(down=float16[2, 5], up=float16[4, 2], scale=1.0), "
        "second=LoRA(down=float16[2, 5], up=float16[4, 2], scale=1.0), scale=0.7)"
    )
    cp = CP(torch.zeros(6, 3), torch.zeros(5, 3), (torch.zeros(3, 3),), None, 2.0)
    assert repr(cp) == ("CP(out_factor=float32[6, 3], in_factor=float32[5, 3], "
                        "spatial_factors=(float32[3, 3],), weights=None, scale=2.0)")  # fmt: skip
    meta = LoRA(torch.zeros(2, 5, device="meta"), torch.zeros(4, 2, device="meta"))
    assert repr(meta) == "LoRA(down=float32[2, 5] on meta, up=float32[4, 2] on meta, scale=1.0)"
    for form in (Tucker2(torch.zeros(3, 8, 1, 1), torch.zeros(3, 3, 3, 3), torch.zeros(6, 3, 1, 1)),
                 LoKr(torch.zeros(2, 3, dtype=torch.float16), small, 1.5)):  # fmt: skip
        assert "\n" not in repr(form) and "tensor" not in repr(form)


@pytest.mark.parametrize(
    ("dtype", "value", "advice"),
    [(torch.float16, 300.0, "form.to(torch.float32)"),
     (torch.bfloat16, 1e20, "form.to(torch.float64)"),  # float32 has bfloat16's range
     (torch.float32, 1e20, "form.to(torch.float64)"),
     (torch.float64, 1e200, "float64 is the widest dtype")],
)  # fmt: skip
def test_an_overflowing_recomposition_names_the_next_wider_dtype(dtype, value, advice):
    form = LoRA(torch.full((1, 4), value, dtype=dtype), torch.full((3, 1), value, dtype=dtype))
    with pytest.raises(NonFiniteError) as info:
        recompose(form)
    assert advice in str(info.value)


def _full(*shape: int, value: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_product_that_underflows_on_the_way_to_an_ordinary_delta_is_summed_in_float64(dtype):
    """`mid ∘ down` of 1e-50 under an `up` of 1e30 (ΔW 1e-20, a normal float32) summed to 0 in
    float32; likewise CP's `in ⊗ k`, a LoHa's halves of 1e-32 at scale 1e30 and a LoKr's
    Kronecker product of 1e-60 at scale 1e30."""
    tucker = Tucker2(_full(1, 2, 1, 1, value=1e-25, dtype=dtype),
                     _full(1, 1, 3, 3, value=1e-25, dtype=dtype),
                     _full(2, 1, 1, 1, value=1e30, dtype=dtype))  # fmt: skip
    cp = CP(_full(2, 1, value=1e30), _full(3, 1, value=1e-25), [_full(3, 1, value=1e-25)])
    half = LoRA(_full(1, 3, value=1e-16), _full(2, 1, value=1e-16))
    loha = LoHa(half, half, 1e30)
    lokr = LoKr(_full(1, 1, value=1e-30), _full(2, 2, value=1e-30), 1e30)
    references = [
        torch.einsum("tp,pqhw,qs->tshw", *(t.double().flatten(2).squeeze(-1) if t.ndim == 4
                                          and t.shape[2:] == (1, 1) else t.double()
                                          for t in (tucker.up, tucker.mid, tucker.down))),
        torch.einsum("oR,iR,kR->oik", cp.out_factor.double(), cp.in_factor.double(),
                     cp.spatial_factors[0].double()),
        1e30 * (half.up.double() @ half.down.double()) ** 2,
        1e30 * torch.kron(lokr.w1.double(), lokr.w2.double()),
    ]  # fmt: skip
    for form, reference in zip((tucker, cp, loha, lokr), references, strict=True):
        got = recompose(form)
        assert float(reference.abs().min()) > 1e-35
        assert torch.equal(got, reference.to(got.dtype)), type(form).__name__


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_factor_is_refused_also_at_scale_zero(bad):
    """At scale 0 the GEMM never reads its factors: a NaN `up` recomposed to zeros."""
    forms = [
        LoRA(_full(2, 4), _full(3, 2, value=bad), 0.0),
        LoRA(_full(2, 4, value=bad), _full(3, 2), 0.0),
        Tucker2(_full(2, 4, 1), _full(2, 2, 3, value=bad), _full(3, 2, 1), 0.0),
        CP(_full(3, 2), _full(4, 2), [_full(3, 2, value=bad)], scale=0.0),
    ]
    for form in forms:
        with pytest.raises(NonFiniteError, match="holds NaN/Inf"):
            recompose(form)


def test_a_float64_product_that_overflows_on_the_way_is_said_to():
    """`mid ∘ down` of 1e400 under an `up` of 1e-300: ΔW (1e100) fits, its sum does not; the
    error says so rather than calling ΔW infinite."""
    tucker = Tucker2(_full(1, 2, 1, value=1e200, dtype=torch.float64),
                     _full(1, 1, 3, value=1e200, dtype=torch.float64),
                     _full(2, 1, 1, value=1e-300, dtype=torch.float64))  # fmt: skip
    with pytest.raises(NonFiniteError, match="product of its factors on the way"):
        recompose(tucker)
    with pytest.raises(NonFiniteError, match=r"on the way leaves the range of torch\.float64"):
        fold(tucker)


def test_meta_forms_fold_and_turn_into_lora_on_meta():
    meta = {"device": "meta"}
    tucker = Tucker2(torch.zeros(3, 4, 1, 1, **meta), torch.zeros(2, 3, 3, 3, **meta),
                     torch.zeros(5, 2, 1, 1, **meta))  # fmt: skip
    folded = fold(tucker)
    assert folded.down.is_meta and folded.down.shape == (2, 4, 3, 3)
    assert folded.up.shape == (5, 2, 1, 1)
    cp = CP(torch.zeros(5, 2, **meta), torch.zeros(4, 2, **meta), [torch.zeros(3, 2, **meta)])
    lora = as_lora(cp)
    assert lora.down.is_meta and lora.down.shape == (2, 4, 3) and lora.up.shape == (5, 2, 1)


@pytest.mark.parametrize(
    "build",
    [lambda: LoRA(torch.zeros(2, 0), torch.zeros(3, 2)),
     lambda: LoRA(torch.zeros(2, 4), torch.zeros(0, 2)),
     lambda: LoRA(torch.zeros(2, 4, 0), torch.zeros(3, 2, 1)),
     lambda: Tucker2(torch.zeros(2, 4, 1, 1), torch.zeros(3, 2, 0, 3), torch.zeros(5, 3, 1, 1)),
     lambda: CP(torch.zeros(3, 2), torch.zeros(4, 2), [torch.zeros(0, 2)]),
     lambda: LoKr(torch.zeros(0, 2), torch.zeros(3, 2))],
)  # fmt: skip
def test_a_form_of_an_empty_weight_is_a_shape_error(build):
    with pytest.raises(ShapeError, match="at least one element"):
        build()


def test_loha_halves_are_alike_and_square_cored():
    """LyCORIS' Tucker LoHa has `hada_t1`/`hada_t2` of shape (r, r, *k) on both halves."""
    square = Tucker2(_full(2, 4, 1, 1), _full(2, 2, 3, 3), _full(5, 2, 1, 1))
    oblong = Tucker2(_full(2, 4, 1, 1), _full(3, 2, 3, 3), _full(5, 3, 1, 1))
    with pytest.raises(RankError, match=r"first.mid of a LoHa must be \(r, r, \*k\)"):
        LoHa(oblong, square)
    with pytest.raises(ShapeError, match="both LoRA or both Tucker2"):
        LoHa(LoRA(_full(2, 4, 3, 3), _full(5, 2, 1, 1)), square)
    assert LoHa(square, square).num_params == LoHa.count(4, 5, (3, 3), 2, tucker=True)


@pytest.mark.parametrize(
    "rows", [slice("a", None), slice(0, 1.5), slice(True, 2), slice(torch.tensor(1.5), 3)]
)
def test_rows_of_other_than_integers_are_an_argument_error(rows):
    lora = LoRA(_full(2, 4), _full(3, 2))
    with pytest.raises(ArgumentError, match="integer channel indices"):
        lora.to_dense(rows)
    assert torch.equal(lora.to_dense(slice(np.int64(1), torch.tensor(3))), lora.to_dense()[1:3])
