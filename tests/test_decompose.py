"""Tests of lowrank.decompose against float64 references, brute force and TensorLy."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tensorly.decomposition import parafac, partial_tucker

from lowrank import _svd, decompose
from lowrank.errors import (
    ArgumentError,
    DeviceError,
    DTypeError,
    NonFiniteError,
    RankError,
    ShapeError,
)
from lowrank.forms import CP, LoRA, recompose

pytestmark = pytest.mark.long  # among the suite's longest modules: scheduled first

F64 = torch.float64


def _random(shape: tuple[int, ...], seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=F64).to(dtype)


def _with_spectrum(rows: int, cols: int, spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    """A `(rows, cols)` float64 matrix with the given singular values (random singular vectors)."""
    left, _ = torch.linalg.qr(_random((rows, len(spectrum)), seed))
    right, _ = torch.linalg.qr(_random((cols, len(spectrum)), seed + 1))
    return (left * spectrum) @ right.T


def _rel(approx: torch.Tensor, ref: torch.Tensor) -> float:
    return float((approx.double() - ref.double()).norm() / ref.double().norm())


def _hosvd_error(weight: torch.Tensor, r_out: int, r_in: int) -> float:
    """Relative error of the HOSVD projection on modes 0 and 1, by full SVDs of the unfoldings."""
    out_features, in_features = weight.shape[:2]
    u_out = torch.linalg.svd(weight.reshape(out_features, -1))[0][:, :r_out]
    u_in = torch.linalg.svd(weight.transpose(0, 1).reshape(in_features, -1))[0][:, :r_in]
    approx = torch.einsum(
        "ap,bq,pq...->ab...", u_out, u_in, torch.einsum("ap,bq,ab...->pq...", u_out, u_in, weight)
    )
    return _rel(approx, weight)


conv_shapes = st.tuples(
    st.integers(1, 9),
    st.integers(1, 9),
    st.lists(st.integers(1, 3), min_size=0, max_size=3),
).map(lambda t: (t[0], t[1], *t[2]))


# --- svd -------------------------------------------------------------------------------


@given(shape=conv_shapes, seed=st.integers(0, 2**16), method=st.sampled_from(["exact", "auto"]))
def test_svd_full_rank_is_exact(shape, seed, method):
    weight = _random(shape, seed)
    full = min(shape[0], math.prod(shape[1:]))
    lora = decompose.svd(weight, full, method=method)
    assert lora.shape == weight.shape and lora.rank == full
    assert lora.down.shape == (full, *shape[1:])
    assert lora.up.shape == (shape[0], full, *([1] * (len(shape) - 2)))
    assert _rel(recompose(lora), weight) < 1e-12


@given(shape=conv_shapes, seed=st.integers(0, 2**16), data=st.data())
def test_svd_truncation_error_is_eckart_young(shape, seed, data):
    weight = _random(shape, seed)
    matrix = weight.reshape(shape[0], -1)
    values = torch.linalg.svdvals(matrix)
    rank = data.draw(st.integers(1, len(values)))
    lora = decompose.svd(weight, rank, method="exact")
    error = float((recompose(lora) - weight).norm())
    assert error == pytest.approx(float(values[rank:].norm()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("rows,cols", [(512, 1024), (640, 5760)])
@pytest.mark.parametrize("decay", ["1/i", "1/sqrt(i)", "0.97^i"])
def test_randomized_svd_within_one_percent_of_optimal(rows, cols, decay):
    index = torch.arange(1, min(rows, cols) + 1, dtype=F64)
    spectrum = {"1/i": 1 / index, "1/sqrt(i)": index**-0.5, "0.97^i": 0.97**index}[decay]
    weight = _with_spectrum(rows, cols, spectrum, seed=3)
    for rank in (8, 64):
        lora = decompose.svd(weight.float(), rank, method="randomized", seed=0)
        optimal = float(spectrum[rank:].norm())
        error = float((recompose(lora).double() - weight).norm())
        assert optimal <= error * (1 + 1e-6) and error <= 1.01 * optimal


@pytest.mark.parametrize(
    "spectrum",
    ["flat", "i^-0.3", "0.99^i", "0.95^i", "i^-2"],
)
@pytest.mark.parametrize("rank", [8, 64])
def test_auto_svd_within_a_tenth_of_a_percent_of_optimal(spectrum, rank):
    """The default ("auto") keeps a randomised result only when its sketch has converged:
    on every spectrum, flat ones included, the error is within 0.1 % of Eckart–Young."""
    rows, cols = 384, 768
    index = torch.arange(1, rows + 1, dtype=F64)
    if spectrum == "flat":
        weight = _random((rows, cols), 5)
    else:
        base, power = spectrum.split("^")
        values = index ** float(power[1:]) if base == "i" else float(base) ** index
        weight = _with_spectrum(rows, cols, values, seed=5)
    optimal = float(torch.linalg.svdvals(weight)[rank:].norm())
    error = float((recompose(decompose.svd(weight, rank, seed=0)) - weight).norm())
    assert optimal * (1 - 1e-9) <= error <= optimal * (1 + 1e-3)


def test_a_flat_sketch_is_not_taken_as_converged():
    flat = torch.linalg.svdvals(_random((384, 768), 5))[:74]
    steep = 0.8 ** torch.arange(74, dtype=F64)
    captured = float((steep**2).sum())
    assert not _svd.converged(flat, 64, 4, float((flat**2).sum()))
    assert _svd.converged(steep, 64, 4, captured)
    assert _svd.converged(torch.tensor([2.0, 1.0, 0.0, 0.0]), 2, 0, 5.0)  # σ̃_l = 0: exact
    assert not _svd.converged(torch.tensor([2.0, 1.0]), 2, 4, 5.0)  # no wider sketch to read
    # the same steep sketch with as much energy again left beyond it: the gap alone passes
    assert not _svd.converged(steep, 64, 0, 2 * captured)


@given(
    shape=st.tuples(st.integers(20, 60), st.integers(2, 30), st.integers(1, 3)),
    seed=st.integers(0, 2**16),
    n_iter=st.integers(0, 2),
    data=st.data(),
)
def test_randomized_error_is_norm_minus_captured_energy(shape, seed, n_iter, data):
    """Guard: ‖W − UΣ̃Vᵀ‖² = ‖W‖² − Σσ̃², with σ̃_i read off the balanced factors."""
    out_features, in_features, k = shape
    weight = _random((out_features, in_features, k), seed)
    full = min(out_features, in_features * k)
    rank = data.draw(st.integers(1, max(1, full - 3)))
    lora = decompose.svd(weight, rank, method="randomized", oversample=2, n_iter=n_iter, seed=1)
    captured = lora.up.norm(dim=0).squeeze(-1) ** 2 * lora.down.flatten(1).norm(dim=1) ** 2
    error = float((recompose(lora) - weight).norm())
    predicted = math.sqrt(max(float(weight.norm() ** 2 - captured.sum()), 0.0))
    assert error == pytest.approx(predicted, rel=1e-6, abs=1e-9 * float(weight.norm()))
    optimal = float(torch.linalg.svdvals(weight.reshape(out_features, -1))[rank:].norm())
    assert error >= optimal * (1 - 1e-9)


def _brute_energy(values: torch.Tensor, energy: float, total: float) -> int:
    for rank in range(1, len(values) + 1):
        if sum(float(v) ** 2 for v in values[:rank]) >= energy * total:
            return rank
    return len(values)


def _brute_ratio(values: torch.Tensor, ratio: float) -> int:
    return max(1, sum(1 for v in values.tolist() if v >= ratio * values[0].item()))


def _brute_budget(in_features: int, out_features: int, taps: int, budget: int, full: int) -> int:
    best = 0
    for rank in range(1, full + 1):
        if rank * in_features * taps + rank * out_features <= budget:
            best = rank
    return best


@given(
    shape=conv_shapes,
    seed=st.integers(0, 2**16),
    energy=st.floats(0.01, 1.0),
    ratio=st.floats(0.001, 1.0),
    budget=st.integers(1, 2000),
)
def test_rank_selection_matches_brute_force(shape, seed, energy, ratio, budget):
    weight = _random(shape, seed)
    values = torch.linalg.svdvals(weight.reshape(shape[0], -1))
    total = float(weight.norm() ** 2)
    taps = math.prod(shape[2:])
    assert decompose.svd(weight, energy=energy, method="exact").rank == _brute_energy(
        values, energy, total
    )
    assert decompose.svd(weight, ratio=ratio, method="exact").rank == _brute_ratio(values, ratio)
    expected = _brute_budget(shape[1], shape[0], taps, budget, len(values))
    if expected == 0:
        with pytest.raises(RankError, match="max_params"):
            decompose.svd(weight, max_params=budget)
    else:
        lora = decompose.svd(weight, max_params=budget)
        assert lora.rank == expected and lora.num_params <= budget


@pytest.mark.parametrize("method", ["auto", "randomized"])
def test_randomized_rank_selection(method):
    index = torch.arange(1, 513, dtype=F64)
    weight = _with_spectrum(512, 1536, 0.9**index, seed=7)
    values, total = 0.9**index, float(weight.norm() ** 2)
    assert decompose.svd(weight, ratio=0.1, method=method, seed=0).rank == _brute_ratio(values, 0.1)
    lora = decompose.svd(weight, energy=0.99, method=method, seed=0)
    exact = _brute_energy(values, 0.99, total)
    assert exact <= lora.rank <= exact + 1
    assert float((recompose(lora) - weight).norm() ** 2) <= (1 - 0.99) * total * (1 + 1e-9)


def test_flat_spectrum_falls_back_to_exact():
    weight = _random((512, 1536), 11)
    values = torch.linalg.svdvals(weight)
    lora = decompose.svd(weight, energy=0.9, method="randomized", seed=0)
    assert lora.rank == _brute_energy(values, 0.9, float(weight.norm() ** 2)) > 128


def test_svd_balanced_split_and_dtypes():
    weight = _random((48, 16, 3, 3), 2) * 50
    lora = decompose.svd(weight, 10)
    torch.testing.assert_close(
        torch.linalg.vector_norm(lora.up, dim=(0, 2, 3)), lora.down.flatten(1).norm(dim=1)
    )
    half = decompose.svd(weight.to(torch.bfloat16), 10)
    assert half.down.dtype == half.up.dtype == torch.bfloat16
    assert _rel(recompose(half.to(F64)), recompose(lora)) < 2e-2


@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
def test_bf16_factors_of_extreme_weights_are_finite(magnitude):
    weight = (_random((32, 16, 3, 3), 4) * magnitude).to(torch.bfloat16)
    reference = weight.double()
    forms = [
        decompose.svd(weight, 8),
        decompose.tucker2(weight, (8, 8)),
        decompose.cp(weight, 8, n_iter=5),
    ]
    for form in forms:
        for name, value in vars(form).items():
            for tensor in value if isinstance(value, tuple) else (value,):
                if isinstance(tensor, torch.Tensor):
                    assert tensor.dtype == torch.bfloat16, name
                    assert bool(torch.isfinite(tensor).all()), name
        dense = recompose(form.to(F64))
        assert bool(torch.isfinite(dense).all()) and _rel(dense, reference) < 1.0


@settings(max_examples=8)
@example(exponent=307, seed=0)
@example(exponent=-300, seed=1)
@given(exponent=st.integers(-300, 307), seed=st.integers(0, 2**16))
def test_float64_decompositions_hold_the_whole_exponent_range(exponent, seed):
    """Factors of a float64 weight scaled by 10^exponent stay finite, and the decomposition
    is the unscaled one scaled: the same relative error (computed on the scaled-back dense)."""
    base = _random((8, 6, 3, 3), seed)
    scale = 10.0**exponent
    for make in (lambda w: decompose.tucker2(w, (4, 3), n_iter=5),
                 lambda w: decompose.cp(w, 3, n_iter=8),
                 lambda w: decompose.svd(w, 4)):  # fmt: skip
        form = make(base * scale)
        for name, value in vars(form).items():
            for tensor in value if isinstance(value, tuple) else (value,):
                if isinstance(tensor, torch.Tensor):
                    assert bool(torch.isfinite(tensor).all()), name
        scaled_back = recompose(form) / scale
        assert bool(torch.isfinite(scaled_back).all())
        assert abs(_rel(scaled_back, base) - _rel(recompose(make(base)), base)) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_weight_gives_finite_zero_forms(dtype):
    weight = torch.zeros(8, 6, 3, 3, dtype=dtype)
    forms = [
        decompose.svd(weight, energy=0.5),
        decompose.svd(weight, ratio=0.5),
        decompose.tucker2(weight, 2),
        decompose.cp(weight, 3),
    ]
    assert [f.rank for f in forms] == [1, 1, (2, 2), 3]
    for form in forms:
        assert torch.equal(recompose(form), weight)


@pytest.mark.parametrize("method", ["exact", "auto", "randomized"])
def test_svd_energy_one_keeps_everything(method):
    weight = _random((20, 10, 3), 17)
    lora = decompose.svd(weight, energy=1.0, method=method, seed=0)
    assert lora.rank == 20
    assert _rel(recompose(lora), weight) < 1e-12
    assert decompose.svd(weight, ratio=1.0, method=method, seed=0).rank == 1


@pytest.mark.parametrize(("seed", "base", "method"), [(0, 0.7, "exact"), (1, 0.7, "auto")])
def test_energy_one_keeps_every_direction_of_a_steep_float32_spectrum(seed, base, method):
    """The float32 σ's of a steep spectrum carry rounding of about 1e-7 of ‖W‖², so their
    running sum of squares reached a directly computed ‖W‖² after 21 of 512 directions
    (error 5.6e-4 instead of 1.6e-6). Energy 1 asks for every direction."""
    weight = _with_spectrum(512, 512, base ** torch.arange(512, dtype=F64), seed).float()
    lora = decompose.svd(weight, energy=1.0, method=method, seed=0)
    assert lora.rank == 512 and _rel(recompose(lora), weight) < 1e-5
    assert decompose.svd(torch.zeros(6, 4), energy=1.0).rank == 1  # a zero weight: rank 1
    zero = LoRA(torch.zeros(4, 6), torch.zeros(5, 4))
    assert decompose.resize(zero, energy=1.0).rank == 1


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_energy_and_ratio_ties_keep_the_direction_that_reaches_the_threshold(dtype):
    """k of the ten equal directions of eye(10) hold exactly k/10 of its energy, and σ₂ of
    diag(10, 7, 1) is exactly 0.7 σ₁; ‖W‖² computed as a squared square root, and σ's of a
    weight divided by its peak in float32, fell just short of those thresholds."""
    for k in range(1, 10):
        assert decompose.svd(torch.eye(10, dtype=dtype), energy=k / 10).rank == k
    weight = torch.diag(torch.tensor([10.0, 7.0, 1.0], dtype=dtype))
    assert decompose.svd(weight, ratio=0.7).rank == 2


@pytest.mark.parametrize(("n_iter", "tail"), [(0, 0.01), (0, 0.05), (1, 0.3)])
@pytest.mark.parametrize("method", ["auto", "adaptive"])
def test_a_sketch_a_long_tail_has_tilted_is_not_kept(method, n_iter, tail):
    """Eight strong directions over 592 equal small ones: with few power steps the gap
    (σ̃_l/σ̃_r)^(4q+2) looked converged while the tail had tilted the sketch's top directions
    (error 34 % above Eckart–Young at q = 0). The tail test sends it to a wider sketch or
    the exact SVD."""
    spectrum = torch.full((600,), tail, dtype=F64)
    spectrum[:8] = torch.linspace(1, 0.9, 8, dtype=F64)
    weight = _with_spectrum(600, 600, spectrum, seed=3).float()
    optimal = float(spectrum[8:].norm())
    lora = decompose.svd(weight, 8, method=method, n_iter=n_iter, seed=0)
    assert float((recompose(lora).double() - weight.double()).norm()) <= optimal * (1 + 1e-3)


# --- tucker2 ---------------------------------------------------------------------------


@given(shape=conv_shapes, seed=st.integers(0, 2**16))
def test_tucker2_full_rank_is_exact(shape, seed):
    weight = _random(shape, seed)
    taps = math.prod(shape[2:])
    r_out, r_in = min(shape[0], shape[1] * taps), min(shape[1], shape[0] * taps)
    tucker = decompose.tucker2(weight, (r_out, r_in))
    assert tucker.rank == (r_out, r_in)
    assert _rel(recompose(tucker), weight) < 1e-12


@given(
    out_features=st.integers(2, 12),
    in_features=st.integers(2, 12),
    kernel=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_hooi_beats_hosvd_and_tensorly(out_features, in_features, kernel, seed, data):
    weight = _random((out_features, in_features, *kernel), seed)
    taps = math.prod(kernel)
    r_out = data.draw(st.integers(1, min(out_features, in_features * taps)))
    r_in = data.draw(st.integers(max(1, -(-r_out // taps)), min(in_features, r_out * taps)))
    tucker = decompose.tucker2(weight, (r_out, r_in), n_iter=100, tol=0)
    ours = _rel(recompose(tucker), weight)
    assert ours <= _hosvd_error(weight, r_out, r_in) + 1e-12
    (core, factors), _ = partial_tucker(
        weight.numpy(), rank=[r_out, r_in], modes=[0, 1], n_iter_max=100, tol=0
    )
    theirs = np.linalg.norm(tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1]) - weight.numpy())
    assert ours <= theirs / float(weight.norm()) + 1e-9


def test_tucker2_agrees_with_tensorly_and_balances():
    weight = _random((24, 20, 3, 3), 9) * 1e3
    tucker = decompose.tucker2(weight, (6, 5))
    norms = [float(t.norm()) for t in (tucker.down, tucker.mid, tucker.up)]
    assert max(norms) == pytest.approx(min(norms), rel=1e-9)
    factors = [tucker.up.flatten(1).numpy(), tucker.down.flatten(1).T.numpy()]
    theirs = tl.tenalg.multi_mode_dot(tucker.mid.numpy(), factors, modes=[0, 1])
    np.testing.assert_allclose(recompose(tucker).numpy(), theirs, rtol=1e-10, atol=1e-8)


def test_tucker2_float32_matches_float64():
    weight = _random((40, 24, 3, 3), 13)
    single = decompose.tucker2(weight.float(), (12, 8))
    double = decompose.tucker2(weight, (12, 8))
    assert single.mid.dtype == torch.float32
    assert _rel(recompose(single), weight) == pytest.approx(_rel(recompose(double), weight), 1e-5)


def _graded_tucker(out: int, inp: int, rank: int, taper: float, seed: int) -> torch.Tensor:
    """A float64 `(out, inp, 3, 3)` weight of exact Tucker rank `(rank, rank)`: random
    orthonormal channel factors around a random core whose slices fall geometrically from 1
    to `taper` on both channel modes."""
    generator = torch.Generator().manual_seed(seed)
    u_out = torch.linalg.qr(torch.randn(out, rank, generator=generator, dtype=F64))[0]
    u_in = torch.linalg.qr(torch.randn(inp, rank, generator=generator, dtype=F64))[0]
    grade = torch.logspace(0, math.log10(taper), rank, dtype=F64)
    core = torch.randn(rank, rank, 9, generator=generator, dtype=F64)
    core = core * grade[:, None, None] * grade[None, :, None]
    return torch.einsum("ap,bq,pqk->abk", u_out, u_in, core).reshape(out, inp, 3, 3)


@pytest.mark.parametrize("taper", [1e-3, 1e-4])
def test_tucker2_float32_recovers_a_graded_exact_tucker_weight(taper):
    """A weight of exact Tucker rank (6, 6) whose core tapers to `taper` on both channel modes:
    its smallest mode singular values lie below √eps₃₂ of the largest, where a float32 Gram
    matrix cannot tell them from rounding. float32 must still recover it to float32's
    precision, as float64 and TensorLy's SVD-based `partial_tucker` do."""
    rank = 6
    weight = _graded_tucker(40, 30, rank, taper, seed=5).float()
    assert _rel(recompose(decompose.tucker2(weight, rank)), weight) < 1e-6
    (tl_core, tl_factors), _ = partial_tucker(weight.double().numpy(), rank=[rank, rank],
                                              modes=[0, 1], init="svd")  # fmt: skip
    theirs = tl.tenalg.multi_mode_dot(tl_core, tl_factors, modes=[0, 1])
    assert _rel(torch.from_numpy(theirs), weight) < 1e-6


@pytest.mark.parametrize("taper", [1e-9, 1e-12])
def test_tucker2_float64_recovers_a_graded_exact_tucker_weight(taper):
    """The float64 twin: a core tapering below √eps₆₄ lies below a float64 Gram matrix's
    rounding too (the error stalled near 1e-9). Against the weight itself, which the rank
    holds exactly, and float64 singular vectors of its unfoldings (a HOSVD, which HOOI
    must not end above)."""
    rank = 5
    weight = _graded_tucker(16, 16, rank, taper, seed=7)
    ours = _rel(recompose(decompose.tucker2(weight, rank)), weight)
    assert ours < 1e-13
    flat = weight.reshape(16, 16, 9)
    left = torch.linalg.svd(flat.reshape(16, -1), full_matrices=False).U[:, :rank]
    right = torch.linalg.svd(flat.transpose(0, 1).reshape(16, -1), full_matrices=False).U
    right = right[:, :rank]
    hosvd = torch.einsum("ak,bl,klc->abc", left @ left.T, right @ right.T, flat)
    assert ours <= _rel(hosvd.reshape(weight.shape), weight) + 1e-15


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)], ids=["wide", "tall"])
def test_leading_left_vectors_of_a_graded_float64_matrix_keep_what_the_svd_keeps(shape):
    """A float64 matrix with singular values 1 … 1e-14, whose Gram matrix rounds away the
    kept directions below 1e-8: projected on the basis, it leaves what the optimal (Eckart–
    Young) truncation leaves, `‖σ_{>8}‖`, to rounding."""
    from lowrank import _hooi

    rows, cols = shape
    generator = torch.Generator().manual_seed(3)
    left = torch.linalg.qr(torch.randn(rows, 12, generator=generator, dtype=F64))[0]
    right = torch.linalg.qr(torch.randn(cols, 12, generator=generator, dtype=F64))[0]
    matrix = (left * torch.logspace(0, -14, 12, dtype=F64)) @ right.T
    basis = _hooi.leading_left_vectors(matrix, 8)
    left_out = float(torch.logspace(0, -14, 12, dtype=F64)[8:].norm())
    residual = float(torch.linalg.matrix_norm(matrix - basis @ (basis.T @ matrix)))
    assert residual == pytest.approx(left_out, rel=1e-3)


def test_a_decaying_spectrum_stays_in_float32(monkeypatch):
    """The float64 pass is for weights a rank holds almost exactly: a 320 → 320 3×3 weight
    with σ_i ∝ 1/i at rank 64 (far from exactly representable) never takes it."""
    from lowrank import _hooi

    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(320, 320, generator=generator, dtype=F64))[0]
    right = torch.linalg.qr(torch.randn(320 * 9, 320, generator=generator, dtype=F64))[0]
    spectrum = torch.arange(1, 321, dtype=F64) ** -1.0
    weight = ((left * spectrum) @ right.T).reshape(320, 320, 3, 3).float()
    dtypes = []
    gram_vectors = _hooi._gram_vectors
    monkeypatch.setattr(_hooi, "_gram_vectors",
                        lambda m, r: dtypes.append(m.dtype) or gram_vectors(m, r))  # fmt: skip
    decompose.tucker2(weight, 64, n_iter=2)
    assert dtypes and set(dtypes) == {torch.float32}
    dtypes.clear()  # a projected unfolding whose rank is its size: any basis of it is exact
    decompose.tucker2(_random((64, 48, 1, 1), 3).float(), 16, n_iter=2)
    assert dtypes and set(dtypes) == {torch.float32}


# --- cp --------------------------------------------------------------------------------


def _exact_cp(shape: tuple[int, ...], rank: int, seed: int) -> torch.Tensor:
    factors = [_random((size, rank), seed + i) for i, size in enumerate(shape)]
    return CP(factors[0], factors[1], factors[2:]).to_dense()


@pytest.mark.parametrize(
    "shape,rank", [((12, 10, 3, 3), 4), ((16, 8, 3), 5), ((9, 7), 3), ((6, 5, 3, 3, 3), 3)]
)
def test_cp_recovers_exact_low_rank_tensor(shape, rank):
    tensor = _exact_cp(shape, rank, seed=sum(shape))
    factors = decompose.cp(tensor, rank, n_iter=1000, tol=0)
    assert factors.rank == rank and factors.shape == tensor.shape
    assert _rel(recompose(factors), tensor) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("rank", [4, 8, 12])
def test_cp_of_a_rank_one_tensor_at_a_larger_rank_is_exact(dtype, rank):
    """A box filter is CP rank 1; more components leave the ALS Gram matrices singular in
    rounding, which the solve must survive."""
    weight = torch.ones(3, 6, 2, 2, dtype=dtype)
    factors = decompose.cp(weight, rank)
    assert factors.rank == rank and factors.out_factor.dtype == dtype
    assert _rel(recompose(factors), weight) < 1e-6


@given(
    shape=st.lists(st.integers(1, 6), min_size=3, max_size=4),
    rank=st.integers(2, 12),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, F64]),
)
def test_cp_of_an_outer_product_at_a_larger_rank_is_exact(shape, rank, seed, dtype):
    """A rank-one tensor at rank R > 1 leaves the ALS Gram matrices singular, and a sweep in
    rounding can leap to large cancelling components: the least error is kept (a box
    filter at rank 8 in float64 was 0.5 off)."""
    rank = min(rank, min(math.prod(shape) // size for size in shape))
    generator = torch.Generator().manual_seed(seed)
    vectors = [torch.randn(size, generator=generator, dtype=F64) for size in shape]
    vectors[0] = vectors[0] if seed % 2 else torch.ones(shape[0], dtype=F64)  # box filters too
    weight = functools.reduce(lambda t, v: t.unsqueeze(-1) * v, vectors[1:], vectors[0])
    factors = decompose.cp(weight.to(dtype), rank)
    # the singular Gram matrices amplify rounding: about √ε, not ε, is what ALS reaches
    assert _rel(recompose(factors).double(), weight) < torch.finfo(dtype).eps ** 0.5


@given(shape=conv_shapes, seed=st.integers(0, 2**16))
def test_cp_at_the_rank_limit_is_exact(shape, seed):
    """R = min_n ∏_{m≠n} I_m writes any tensor exactly (one rank-1 term per slice)."""
    weight = _random(shape, seed)
    limit = min(weight.numel() // size for size in shape)
    factors = decompose.cp(weight, limit, n_iter=200, tol=0)
    assert factors.rank == limit
    assert _rel(recompose(factors), weight) < 1e-6


def test_cp_not_worse_than_tensorly_parafac():
    tensor = _exact_cp((20, 16, 3, 3), 6, seed=1)
    tensor = tensor + 0.01 * tensor.norm() / tensor.numel() ** 0.5 * _random(tensor.shape, 2)
    ours = _rel(recompose(decompose.cp(tensor, 6, n_iter=50, tol=0)), tensor)
    theirs = [
        np.linalg.norm(
            tl.cp_to_tensor(
                parafac(tensor.numpy(), 6, n_iter_max=50, init="random", tol=0, random_state=s)
            )
            - tensor.numpy()
        )
        / float(tensor.norm())
        for s in range(3)
    ]
    assert ours <= float(np.median(theirs)) + 1e-3


@pytest.mark.parametrize("weights", [False, True])
def test_cp_agrees_with_tensorly_and_is_deterministic(weights):
    tensor = _random((10, 8, 3, 2), 21)
    first = decompose.cp(tensor, 7, n_iter=20, seed=3, weights=weights)
    again = decompose.cp(tensor, 7, n_iter=20, seed=3, weights=weights)
    factors = [first.out_factor, first.in_factor, *first.spatial_factors]
    for a, b in zip(
        factors, [again.out_factor, again.in_factor, *again.spatial_factors], strict=True
    ):
        assert torch.equal(a, b)
    lam = first.weights if weights else torch.ones(7, dtype=F64)
    theirs = tl.cp_to_tensor((lam.numpy(), [f.numpy() for f in factors]))
    np.testing.assert_allclose(recompose(first).numpy(), theirs, rtol=1e-10, atol=1e-12)
    if weights:
        unit = torch.stack([f.norm(dim=0) for f in factors])
        torch.testing.assert_close(unit, torch.ones_like(unit))
    else:
        assert first.weights is None
        norms = torch.stack([f.norm(dim=0) for f in factors])
        torch.testing.assert_close(norms, norms[:1].expand_as(norms))


_BIG_CP = textwrap.dedent(
    """
    import json, time, torch
    from lowrank import _svd, decompose
    from lowrank.forms import CP

    def kib(field):
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith(field))
        return int(line.split()[1])

    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 64, generator=g) / n**0.5 for n in (1280, 1280, 3, 3)]
    weight = CP(parts[0], parts[1], parts[2:]).to_dense()
    weight += 0.1 * weight.std() * torch.randn(weight.shape, generator=g)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak (VmHWM) to the current RSS
    before = kib("VmRSS")
    start = time.perf_counter()
    cp = decompose.cp(weight, 64, n_iter=3, tol=0)
    seconds = time.perf_counter() - start
    extra = (kib("VmHWM") - before) * 1024
    error = float((cp.to_dense() - weight).norm() / weight.norm())
    print(json.dumps({"extra_bytes": extra, "seconds": seconds, "error": error}))
    """
)


def test_cp_of_a_1280_channel_kernel_at_rank_64_fits_in_memory():
    """Rank 64 exceeds the 3-tap modes; the run must stay within 1 GiB above the input."""
    done = subprocess.run(
        [sys.executable, "-c", _BIG_CP], capture_output=True, text=True, check=True, timeout=300
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < result["extra_bytes"] < 1 << 30
    assert result["error"] < 0.5


# --- all three: dtypes, layouts, autograd ----------------------------------------------


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_and_strided_weights(dtype, strided):
    """fp16/bf16 in, same dtype out, error at the input's rounding level (computed in fp32)."""
    exact = _exact_cp((10, 12, 3, 3), 3, seed=5)
    weight = (exact.transpose(0, 1) if strided else exact).to(dtype)
    assert weight.is_contiguous() != strided
    reference, eps = weight.double(), torch.finfo(dtype).eps
    forms = [
        decompose.svd(weight, 3),
        decompose.tucker2(weight, 3),
        decompose.cp(weight, 3, n_iter=500, tol=0),
    ]
    for form in forms:
        assert recompose(form).dtype == dtype and form.shape == weight.shape
        assert _rel(recompose(form.to(F64)), reference) < 2 * eps


def test_factors_are_detached_from_a_parameter():
    weight = torch.nn.Parameter(_random((8, 6, 3, 3), 23))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forms = [decompose.svd(weight, 4), decompose.tucker2(weight, 3), decompose.cp(weight, 4)]
    for form in forms:
        for value in vars(form).values():
            for tensor in value if isinstance(value, tuple) else (value,):
                if isinstance(tensor, torch.Tensor):
                    assert not tensor.requires_grad and tensor.grad_fn is None


# --- errors ----------------------------------------------------------------------------

DECOMPOSITIONS = [
    pytest.param(lambda w: decompose.svd(w, 1), id="svd"),
    pytest.param(lambda w: decompose.tucker2(w, 1), id="tucker2"),
    pytest.param(lambda w: decompose.cp(w, 1), id="cp"),
]


@pytest.mark.parametrize("run", DECOMPOSITIONS)
def test_weight_errors(run):
    with pytest.raises(DTypeError, match=r"weight must be a torch\.Tensor"):
        run(np.ones((3, 3)))
    with pytest.raises(DTypeError, match="weight must be a floating-point"):
        run(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ShapeError, match=r"weight must have 2 or 3 or 4 or 5 dimensions"):
        run(torch.ones(3))
    with pytest.raises(ShapeError, match="weight must have 2 or 3"):
        run(torch.ones(2, 2, 1, 1, 1, 1))
    with pytest.raises(ShapeError, match="empty axis"):
        run(torch.ones(0, 3, 3, 3))
    for bad in (math.nan, math.inf):
        weight = torch.ones(4, 3, 3, 3)
        weight[1, 2, 0, 0] = bad
        with pytest.raises(NonFiniteError, match="weight holds 1 NaN/Inf"):
            run(weight)


def test_svd_argument_errors():
    weight = torch.ones(6, 4, 3, 3)
    with pytest.raises(RankError, match="rank must lie in \\[1, 6\\]"):
        decompose.svd(weight, 7)
    with pytest.raises(RankError, match="rank must lie"):
        decompose.svd(weight, 0)
    for bad in (2.0, True, "3"):
        with pytest.raises(RankError, match="rank must be an integer"):
            decompose.svd(weight, bad)
    with pytest.raises(RankError, match=r"exactly one of .* got rank, energy"):
        decompose.svd(weight, 2, energy=0.5)
    with pytest.raises(RankError, match="got none"):
        decompose.svd(weight)
    for name in ("energy", "ratio"):
        for bad in (0.0, -0.1, 1.5, math.nan):
            with pytest.raises(RankError, match=f"{name} must lie in"):
                decompose.svd(weight, **{name: bad})
        with pytest.raises(RankError, match=f"{name} must be a number"):
            decompose.svd(weight, **{name: "0.5"})
    with pytest.raises(RankError, match="max_params=41 is below the 42 parameters"):
        decompose.svd(weight, max_params=41)
    with pytest.raises(RankError, match="max_params must be an integer"):
        decompose.svd(weight, max_params=100.0)
    with pytest.raises(ArgumentError, match="method must be one of"):
        decompose.svd(weight, 2, method="lanczos")
    for name in ("oversample", "n_iter", "seed"):
        with pytest.raises(ArgumentError, match=f"{name} must be at least 0"):
            decompose.svd(weight, 2, **{name: -1})


def test_tucker2_argument_errors():
    weight = torch.ones(6, 4, 3, 3)
    with pytest.raises(RankError, match="r_out must lie in \\[1, 6\\]"):
        decompose.tucker2(weight, (7, 2))
    with pytest.raises(RankError, match="r_in must lie in \\[1, 4\\]"):
        decompose.tucker2(weight, 5)
    with pytest.raises(RankError, match="r_out must lie"):
        decompose.tucker2(weight, 0)
    with pytest.raises(RankError, match="r_out ≤ r_in·K"):
        decompose.tucker2(torch.ones(12, 4, 1), (3, 2))
    with pytest.raises(RankError, match="r_in ≤ r_out·K"):
        decompose.tucker2(torch.ones(4, 4), (1, 2))
    with pytest.raises(RankError, match="an int or a pair"):
        decompose.tucker2(weight, (1, 2, 3))
    with pytest.raises(RankError, match=r"rank\[1\] must be an integer"):
        decompose.tucker2(weight, (1, 2.5))
    with pytest.raises(ArgumentError, match="n_iter must be at least 0"):
        decompose.tucker2(weight, 2, n_iter=-1)
    with pytest.raises(ArgumentError, match="tol must be a number ≥ 0"):
        decompose.tucker2(weight, 2, tol=-1e-3)


def test_cp_argument_errors():
    weight = torch.ones(6, 4, 3)
    with pytest.raises(RankError, match="rank must lie in \\[1, 12\\]"):
        decompose.cp(weight, 13)
    with pytest.raises(RankError, match="rank must lie"):
        decompose.cp(weight, 0)
    with pytest.raises(RankError, match="rank must be an integer"):
        decompose.cp(weight, None)
    with pytest.raises(ArgumentError, match="n_iter must be at least 1"):
        decompose.cp(weight, 2, n_iter=0)
    with pytest.raises(ArgumentError, match="tol must be a number ≥ 0"):
        decompose.cp(weight, 2, tol=math.nan)
    with pytest.raises(ArgumentError, match="seed must be at least 0"):
        decompose.cp(weight, 2, seed=-3)


# --- range, seeds and meta weights -------------------------------------------------------


def test_cp_weights_of_a_half_weight_are_float32_and_finite():
    """λ of a 128×128×3×3 float16 weight of 200s is 200·√147456 = 76800, beyond float16."""
    weight = torch.full((128, 128, 3, 3), 200.0).half()
    cp = decompose.cp(weight, 1, weights=True)
    assert cp.weights.dtype == torch.float32 and cp.out_factor.dtype == torch.float16
    assert abs(float(cp.weights[0]) - 200.0 * math.sqrt(weight.numel())) < 1e-2
    error = (recompose(cp).double() - 200.0).abs().max()
    assert float(error) <= 200.0 * torch.finfo(torch.float16).eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_cp_weights_keep_a_dtype_that_holds_them(dtype):
    weight = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    cp = decompose.cp(weight, 2, weights=True)
    assert cp.weights.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)


@pytest.mark.parametrize("peak", [1e307, 1e-300])
@pytest.mark.parametrize("method", ["tucker2", "cp", "svd"])
def test_extreme_float64_weights_give_finite_factors(method, peak):
    """The scale max |W| comes off before the iterations and goes back as a per-factor root,
    so no product of norms overflows (1e307) or underflows (1e-300)."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 6, 3, 3, generator=g, dtype=torch.float64)
    weight = weight / weight.abs().max() * peak
    rank = {"tucker2": (6, 6), "cp": 40, "svd": 6}[method]
    form = getattr(decompose, method)(weight, rank)
    for name, factor in form.named_factors().items():
        assert bool(torch.isfinite(factor).all()), name
    reference = getattr(decompose, method)(weight / peak, rank)
    relative = float((recompose(form) / peak - recompose(reference)).norm())
    assert relative <= 1e-9 * float(recompose(reference).norm())


def _rank_one(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A float64 outer product of random vectors, scaled to max |entry| = 1."""
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.ones((), dtype=F64)
    for size in shape:
        tensor = tensor.unsqueeze(-1) * torch.randn(size, generator=generator, dtype=F64)
    return tensor / tensor.abs().max()


@pytest.mark.parametrize("peak", [1e300, 1e-300, 2.0**1000])
@pytest.mark.parametrize(
    ("method", "shape", "rank"),
    [
        ("tucker2", (8, 6, 3), (8, 6)),
        ("tucker2", (8, 6, 3, 3), (8, 6)),
        ("cp", (8, 6, 3), 1),
        ("cp", (4, 3, 3, 3, 3), 1),
    ],
)
def test_extreme_float64_weights_of_exact_rank_come_back_to_rounding(method, shape, rank, peak):
    """max |W| goes back to the factors as one share each, which must multiply back to it to
    rounding: the shares were `peak ** (1/3)` (Tucker2) and `peak ** (1/N)` (CP of N modes),
    whose rounded exponent put every entry 3.9e-14 off at peak 1e300 (even at a power of
    two), where the same weight at peak 1 comes back to 2e-16."""
    weight = _rank_one(shape, 5) * peak
    form = getattr(decompose, method)(weight, rank)
    assert _rel(recompose(form) / peak, weight / peak) <= 4e-15


def test_cp_weights_beyond_float64_are_a_non_finite_error():
    weight = torch.full((8, 8, 3, 3), 1e307, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="weights=False"):
        decompose.cp(weight, 1, weights=True)
    cp = decompose.cp(weight, 1)
    assert float((recompose(cp) / 1e307 - 1.0).abs().max()) < 1e-12


@pytest.mark.parametrize("seed", [2**64, -1, 1.0, True, "0", None])
def test_cp_seed_must_be_an_int_in_range(seed):
    with pytest.raises(ArgumentError, match="seed must be"):
        decompose.cp(torch.ones(4, 4, 3), 2, seed=seed)


@pytest.mark.parametrize("seed", [2**64, -1, 1.0, True, "0"])
def test_randomized_svd_seed_must_be_an_int_in_range(seed):
    with pytest.raises(ArgumentError, match="seed must be"):
        decompose.svd(torch.ones(300, 300), 4, method="randomized", seed=seed)


def test_the_largest_seed_is_taken():
    weight = torch.randn(300, 300, generator=torch.Generator().manual_seed(2))
    assert decompose.svd(weight, 4, method="randomized", seed=2**64 - 1).rank == 4
    assert decompose.cp(torch.ones(4, 4, 3), 2, seed=np.uint64(2**64 - 1)).rank == 2


@pytest.mark.parametrize("rule", [lambda v: decompose.energy_rank(v, 0.5, 14.0),
                                  lambda v: decompose.ratio_rank(v, 0.5)])  # fmt: skip
def test_meta_singular_values_are_refused_as_needing_real_data(rule):
    with pytest.raises(DeviceError, match=r"singular_values .*meta device.*real data"):
        rule(torch.empty(3, device="meta"))


def test_meta_forms_are_refused_by_resize_and_combine():
    lora = LoRA(torch.empty(2, 4, device="meta"), torch.empty(6, 2, device="meta"))
    for call in (lambda: decompose.resize(lora, 1), lambda: decompose.combine([lora, lora])):
        with pytest.raises(DeviceError, match=r"meta device.*real data"):
            call()


@pytest.mark.parametrize(
    "call",
    [
        lambda w: decompose.svd(w, 2),
        lambda w: decompose.svd(w, energy=0.9),
        lambda w: decompose.tucker2(w, 2),
        lambda w: decompose.cp(w, 2),
    ],
)
def test_meta_weights_are_refused_as_needing_real_data(call):
    weight = torch.empty(8, 8, 3, 3, device="meta")
    with pytest.raises(DeviceError, match=r"meta device.*real data"):
        call(weight)


@pytest.mark.parametrize(
    "values", [[float("nan"), 1.0], [1.0, float("inf")], [-1.0, 2.0], [1.0, 2.0]]
)
def test_rank_selectors_refuse_values_no_svd_gives(values):
    values = torch.tensor(values)
    selectors = (lambda: decompose.energy_rank(values, 0.5, 1.0),
                 lambda: decompose.ratio_rank(values, 0.5))  # fmt: skip
    for select in selectors:
        with pytest.raises((NonFiniteError, ArgumentError), match="singular_values"):
            select()


def test_energy_rank_refuses_an_infinite_total():
    """σ = 1e200 (three times) has ‖W‖² = 3e400, Inf in float64: a total of Inf gave rank 1
    for an energy of 0.9, where the three equal values need 3."""
    values = torch.tensor([1e200] * 3, dtype=torch.float64)
    with pytest.raises(ArgumentError, match="total must be a finite"):
        decompose.energy_rank(values, 0.9, math.inf)
    assert decompose.energy_rank(values / 1e200, 0.9, 3.0) == 3
