"""`lowrank.resize`, `lowrank.combine`, `as_lora` and the "adaptive" SVD, against float64
dense references written here (einsum recompositions, `torch.linalg.svd` of the dense ΔW),
never through the code under test."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from io_helpers import lora_delta64, tucker_delta64
from strategies import assert_close, randn, relative_error, seeds

from lowrank import CP, LoHa, LoKr, LoRA, Tucker2, as_lora, combine, decompose, resize
from lowrank import _factor_space as space
from lowrank.errors import ArgumentError, DTypeError, NonFiniteError, RankError, ShapeError


@pytest.fixture(autouse=True)
def one_thread():
    """LAPACK on one thread: on a busy machine two threads made a 256 × 600 SVD 300× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


kernels = st.sampled_from([(), (1,), (3,), (1, 1), (3, 3), (2, 3), (3, 1, 2)])


def cp_delta64(form: CP) -> torch.Tensor:
    """ΔW = scale Σ_ρ w_ρ out[:, ρ] ⊗ in[:, ρ] ⊗ k[:, ρ]… by one einsum, float64."""
    factors = [form.out_factor, form.in_factor, *form.spatial_factors]
    letters = "abcde"[: len(factors)]
    spec = ",".join(f"{c}z" for c in letters) + "->" + letters
    weights = 1.0 if form.weights is None else form.weights.double()
    first = factors[0].double() * weights
    return form.scale * torch.einsum(spec, first, *(f.double() for f in factors[1:]))


def dense64(form) -> torch.Tensor:
    if isinstance(form, LoRA):
        return lora_delta64(form.down, form.up, form.scale)
    if isinstance(form, Tucker2):
        return tucker_delta64(form.down, form.mid, form.up, form.scale)
    return cp_delta64(form)


def optimal(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Eckart–Young truncation of `delta` flattened to `(out, in·K)`, and its σ's."""
    flat = delta.double().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape), s


def separated(values: torch.Tensor, rank: int) -> bool:
    """Whether σ_rank and σ_rank+1 are apart enough for the truncation to be unique."""
    if rank >= len(values) or values[rank] < 1e-9 * values[0]:
        return True
    return bool(values[rank - 1] - values[rank] > 1e-6 * values[0])


@st.composite
def loras(draw, max_rank: int = 6, dtype=torch.float64):
    g = torch.Generator().manual_seed(draw(seeds))
    out_f, in_f = draw(st.integers(1, 9)), draw(st.integers(1, 7))
    kernel = draw(kernels)
    rank = draw(st.integers(1, max_rank))
    ones = (1,) * len(kernel)
    down = randn(g, rank, in_f, *kernel)
    up = randn(g, out_f, rank, *ones)
    scale = draw(st.floats(-3, 3).filter(lambda s: abs(s) > 1e-3))
    return LoRA(down.to(dtype), up.to(dtype), scale)


@st.composite
def tuckers(draw):
    g = torch.Generator().manual_seed(draw(seeds))
    out_f, in_f = draw(st.integers(2, 8)), draw(st.integers(2, 8))
    kernel = draw(st.sampled_from([(3,), (3, 3), (2, 2, 2)]))
    r_out, r_in = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    ones = (1,) * len(kernel)
    scale = draw(st.floats(0.1, 2))
    return Tucker2(
        randn(g, r_in, in_f, *ones), randn(g, r_out, r_in, *kernel), randn(g, out_f, r_out, *ones),
        scale,
    )  # fmt: skip


# --- as_lora -----------------------------------------------------------------------------


@given(seed=seeds, kernel=kernels, rank=st.integers(1, 5), weights=st.booleans())
def test_a_cp_is_exactly_its_lora(seed, kernel, rank, weights):
    g = torch.Generator().manual_seed(seed)
    form = CP(
        randn(g, 5, rank),
        randn(g, 4, rank),
        [randn(g, k, rank) for k in kernel],
        randn(g, rank) if weights else None,
        scale=0.7,
    )
    lora = as_lora(form)
    assert lora.rank == rank and lora.scale == 0.7 and lora.shape == form.shape
    assert_close(lora_delta64(lora.down, lora.up, lora.scale), cp_delta64(form))


def test_as_lora_of_a_tucker_is_fold_and_refuses_loha():
    g = torch.Generator().manual_seed(0)
    tucker = Tucker2(randn(g, 2, 4, 1, 1), randn(g, 3, 2, 3, 3), randn(g, 5, 3, 1, 1), 0.5)
    lora = as_lora(tucker)
    assert lora.rank == 3
    assert_close(lora_delta64(lora.down, lora.up, 0.5), dense64(tucker))
    half = LoRA(randn(g, 2, 4), randn(g, 5, 2))
    with pytest.raises(DTypeError, match="LoHa"):
        as_lora(LoHa(half, half))


# --- resize ------------------------------------------------------------------------------


@given(form=loras(), keep=st.integers(1, 6))
def test_resize_is_the_optimal_dense_truncation(form, keep):
    delta = dense64(form)
    best, values = optimal(delta, keep)
    assume(separated(values, keep))
    small, error = resize(form, keep, return_error=True)
    expected_rank = (
        form.rank if keep >= form.rank else min(keep, len(values))
    )  # len: min(out, in·K)
    assert small.rank == expected_rank and small.shape == form.shape
    assert small.scale == form.scale and small.down.dtype == form.down.dtype
    if keep >= form.rank:
        assert small is form and error == 0.0
        return
    assert_close(dense64(small), best, 1e-9)
    tail = math.sqrt(float((values[keep:] ** 2).sum() / (values**2).sum()))
    assert error == pytest.approx(tail, abs=1e-12)
    assert relative_error(dense64(small), delta) == pytest.approx(tail, abs=1e-9)


@given(form=loras(max_rank=6), fraction=st.floats(0.05, 1.0))
def test_resize_by_energy_and_ratio_picks_the_dense_rule(form, fraction):
    _, values = optimal(dense64(form), 1)
    values = values[: min(form.rank, len(values))]
    energy = torch.cumsum(values**2, 0) / (values**2).sum()
    assume(torch.all((energy - fraction).abs() > 1e-9))
    assume(torch.all((values / values[0] - fraction).abs() > 1e-9))
    by_energy = int((energy < fraction).sum()) + 1
    by_ratio = int((values >= fraction * values[0]).sum())
    for rule, rank in (("energy", by_energy), ("ratio", by_ratio)):
        small = resize(form, **{rule: fraction})
        assert small.rank == (form.rank if rank >= form.rank else rank), rule


def test_resize_never_forms_the_dense_update(monkeypatch):
    g = torch.Generator().manual_seed(3)
    lora = LoRA(randn(g, 12, 200, 3, 3), randn(g, 150, 12, 1, 1), 0.5)
    tucker = Tucker2(randn(g, 6, 200, 1, 1), randn(g, 7, 6, 3, 3), randn(g, 150, 7, 1, 1))
    for cls in (LoRA, Tucker2):
        original = cls.to_dense

        def small_only(self, rows=None, original=original):
            assert self.shape[0] < 150, "resize formed the dense ΔW"
            return original(self, rows)

        monkeypatch.setattr(cls, "to_dense", small_only)
    assert resize(lora, 4).rank == 4
    assert resize(tucker, 3).rank == (3, 3)
    assert combine([lora, tucker], [1.0, -2.0], rank=5).rank == 5


@given(form=tuckers(), keep=st.integers(1, 4))
def test_resize_a_tucker_reports_its_exact_error_and_beats_hosvd(form, keep):
    delta = dense64(form)
    small, error = resize(form, keep, return_error=True)
    assert isinstance(small, Tucker2) and small.shape == form.shape
    assert relative_error(dense64(small), delta) == pytest.approx(error, abs=1e-9)
    r_out, r_in = small.rank
    if (r_out, r_in) == form.rank:
        assert small is form
        return
    # HOSVD of the dense ΔW at the same ranks, from torch.linalg.svd of its unfoldings
    out_f, in_f = delta.shape[:2]
    u0 = torch.linalg.svd(delta.reshape(out_f, -1), full_matrices=False)[0][:, :r_out]
    u1 = torch.linalg.svd(delta.transpose(0, 1).reshape(in_f, -1), full_matrices=False)[0]
    u1 = u1[:, :r_in]
    hosvd = torch.einsum("ap,bq,pq...->ab...", u0 @ u0.T, u1 @ u1.T, delta)
    assert error <= relative_error(hosvd, delta) + 1e-9


def kept_share(approx: torch.Tensor, delta: torch.Tensor) -> float:
    """‖ΔW'‖² / ‖ΔW‖², float64: the share of ΔW's energy a projection of it keeps."""
    return float(approx.double().norm() ** 2 / delta.double().norm() ** 2)


@given(form=tuckers(), fraction=st.floats(0.3, 0.999), square=st.booleans())
def test_resize_a_tucker_by_energy_keeps_that_share_of_the_whole(form, fraction, square):
    """The share of ‖ΔW‖² the result keeps, not each channel mode's, reaches `energy`."""
    delta = dense64(form)
    small, error = resize(form, energy=fraction, square=square, return_error=True)
    assert isinstance(small, Tucker2)
    assert kept_share(dense64(small), delta) >= fraction - 1e-9
    assert 1 - error**2 == pytest.approx(kept_share(dense64(small), delta), abs=1e-9)
    if square:
        assert small.rank[0] == small.rank[1]


def test_resize_a_tucker_by_energy_picks_the_smallest_square_rank():
    """Channel modes that reach 93 % at ranks 5 (out) and 4 (in), while the Tucker at (5, 4)
    keeps 89.7 % and at (5, 5) 92.7 % of ‖ΔW‖² (HOOI of the dense ΔW): the per-mode rule
    stops short, the whole-ΔW rule goes on to rank 6."""
    g = torch.Generator().manual_seed(1)
    form = Tucker2(randn(g, 8, 6, 1, 1), randn(g, 8, 8, 3, 3), randn(g, 10, 8, 1, 1), 1.0)
    delta = dense64(form)
    small = resize(form, energy=0.93, square=True)
    assert small.rank == (6, 6)
    assert kept_share(dense64(small), delta) >= 0.93
    assert kept_share(dense64(decompose.tucker2(delta, 5)), delta) < 0.93
    assert kept_share(dense64(resize(form, energy=0.9)), delta) >= 0.9


def test_square_resize_pads_a_side_with_fewer_directions():
    """A Tucker with r = 6 > out = 3 (as LyCORIS trains at lora_dim 6 on a 3-channel conv):
    `square` keeps equal inner ranks, the output side padded with zeros, ΔW unchanged."""
    g = torch.Generator().manual_seed(2)
    form = Tucker2(randn(g, 6, 8, 1, 1), randn(g, 6, 6, 3, 3), randn(g, 3, 6, 1, 1), 0.5)
    small, error = resize(form, 5, square=True, return_error=True)
    assert small.rank == (5, 5) and small.scale == 0.5
    assert torch.count_nonzero(small.up[:, 3:]) == 0 and torch.count_nonzero(small.mid[3:]) == 0
    assert relative_error(dense64(small), dense64(form)) == pytest.approx(error, abs=1e-9)
    assert resize(form, 5).rank == (3, 5)  # without square: no zero directions


@given(form=tuckers(), keep=st.integers(1, 4))
def test_a_tucker_resized_to_lora_is_the_optimal_locon(form, keep):
    delta = dense64(form)
    best, values = optimal(delta, keep)
    assume(separated(values, keep))
    small, error = resize(form, keep, to="lora", return_error=True)
    assert isinstance(small, LoRA)
    if keep >= form.rank[0]:
        assert_close(dense64(small), delta, 1e-9)
        return
    assert_close(dense64(small), best, 1e-9)
    assert relative_error(dense64(small), delta) == pytest.approx(error, abs=1e-9)


def test_resize_a_cp_through_its_lora():
    g = torch.Generator().manual_seed(5)
    form = CP(randn(g, 9, 6), randn(g, 7, 6), [randn(g, 3, 6), randn(g, 3, 6)], scale=1.5)
    best, _ = optimal(cp_delta64(form), 2)
    small = resize(form, 2)
    assert isinstance(small, LoRA) and small.rank == 2
    assert_close(dense64(small), best, 1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_resize_keeps_the_dtype_and_is_optimal_to_its_precision(dtype):
    g = torch.Generator().manual_seed(6)
    form = LoRA(randn(g, 16, 40, 3, 3), randn(g, 30, 16, 1, 1), 0.25).to(dtype)
    best, _ = optimal(dense64(form), 5)
    small = resize(form, 5)
    assert small.down.dtype == dtype and small.up.dtype == dtype
    tolerance = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    assert relative_error(dense64(small), best) < tolerance


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, RankError, "at least 1"),
        ({"rank": 2.5}, RankError, "integer"),
        ({"energy": 1.5}, RankError, "energy"),
        ({}, RankError, "exactly one"),
        ({"rank": 2, "ratio": 0.1}, RankError, "exactly one"),
        ({"rank": 2, "to": "tucker2"}, ArgumentError, "to must be"),
        ({"rank": 2, "square": "no"}, ArgumentError, "square must be true or false"),
    ],
)
def test_resize_rejects_bad_arguments(kwargs, error, match):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(error, match=match):
        resize(LoRA(randn(g, 3, 4), randn(g, 5, 3)), **kwargs)


def test_resize_checks_a_tucker_rank_pair_once():
    g = torch.Generator().manual_seed(0)
    tucker = Tucker2(randn(g, 3, 4, 1, 1), randn(g, 3, 3, 3, 3), randn(g, 5, 3, 1, 1))
    cases = [
        ((0, 2), "r_out must be at least 1, got 0"),
        ((1, 2, 3), "an int or a pair"),
        ((1.5, 2), r"rank\[0\] must be an integer"),
    ]
    for rank, match in cases:
        with pytest.raises(RankError, match=match):
            resize(tucker, rank)


def test_resize_refuses_a_loha():
    g = torch.Generator().manual_seed(0)
    half = LoRA(randn(g, 2, 4), randn(g, 5, 2))
    with pytest.raises(DTypeError, match="LoHa"):
        resize(LoHa(half, half), 1)


NO_FACTOR_SPACE = "a LoHa or LoKr has no LoRA of comparable rank, so no factor-space resize"


def test_a_loha_or_lokr_is_refused_with_one_message():
    """`as_lora`, `resize` and `combine` refuse a LoHa / LoKr in the same words, naming the
    argument."""
    g = torch.Generator().manual_seed(0)
    half = LoRA(randn(g, 2, 4), randn(g, 5, 2))
    lokr = LoKr(randn(g, 1, 2), randn(g, 5, 2))
    calls = [
        (lambda: as_lora(LoHa(half, half)), "form is a LoHa"),
        (lambda: resize(lokr, 1), "form is a LoKr"),
        (lambda: combine([half, lokr]), r"forms\[1\] is a LoKr"),
    ]
    for call, name in calls:
        with pytest.raises(DTypeError, match=f"{name}.*{NO_FACTOR_SPACE}"):
            call()


# --- combine -----------------------------------------------------------------------------


@st.composite
def mixes(draw):
    """1–4 forms of one ΔW shape (LoRA, Tucker2, CP; any ranks and scales) and weights."""
    g = torch.Generator().manual_seed(draw(seeds))
    out_f, in_f = draw(st.integers(1, 7)), draw(st.integers(1, 6))
    kernel = draw(st.sampled_from([(), (3,), (3, 3)]))
    ones = (1,) * len(kernel)
    forms = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["lora", "tucker2", "cp"] if kernel else ["lora", "cp"]))
        rank = draw(st.integers(1, 5))
        scale = draw(st.floats(-2, 2))
        if kind == "lora":
            form = LoRA(randn(g, rank, in_f, *kernel), randn(g, out_f, rank, *ones), scale)
        elif kind == "tucker2":
            r_in = draw(st.integers(1, 4))
            mid = randn(g, rank, r_in, *kernel)
            form = Tucker2(randn(g, r_in, in_f, *ones), mid, randn(g, out_f, rank, *ones), scale)
        else:
            spatial = [randn(g, k, rank) for k in kernel]
            form = CP(randn(g, out_f, rank), randn(g, in_f, rank), spatial, scale=scale)
        forms.append(form)
    weights = draw(st.lists(st.floats(-3, 3), min_size=len(forms), max_size=len(forms)))
    return forms, weights


def _ranks(form) -> int:
    return form.rank[0] if isinstance(form, Tucker2) else form.rank


@given(mix=mixes())
def test_combine_is_exactly_the_weighted_dense_sum(mix):
    forms, weights = mix
    expected = sum(w * dense64(f) for f, w in zip(forms, weights, strict=True))
    combined, error = combine(forms, weights, return_error=True)
    largest = max(abs(w * f.scale) for f, w in zip(forms, weights, strict=True))
    assert isinstance(combined, LoRA) and combined.scale == (largest or 1.0) and error < 1e-12
    assert combined.rank == sum(_ranks(f) for f in forms)
    got = dense64(combined)
    scale = sum(abs(w) * float(dense64(f).norm()) for f, w in zip(forms, weights, strict=True))
    assert float((got - expected).norm()) <= 1e-12 * max(scale, 1.0)


@given(mix=mixes(), keep=st.integers(1, 4))
def test_combine_truncated_is_the_optimal_truncation_of_the_sum(mix, keep):
    forms, weights = mix
    expected = sum(w * dense64(f) for f, w in zip(forms, weights, strict=True))
    best, values = optimal(expected, keep)
    assume(float(values[0]) > 1e-6 and separated(values, keep))
    combined, error = combine(forms, weights, rank=keep, return_error=True)
    assert combined.rank <= keep
    assert_close(dense64(combined), best, 1e-8)
    assert relative_error(dense64(combined), expected) == pytest.approx(error, abs=1e-8)


def test_adding_factors_is_not_the_sum_of_products():
    """kohya's default merge adds `up` to `up` and `down` to `down`: (u₁ + u₂)(d₁ + d₂) has
    the cross terms u₁d₂ + u₂d₁ that ΔW₁ + ΔW₂ lacks; concatenation has none."""
    g = torch.Generator().manual_seed(7)
    first, second = (LoRA(randn(g, 4, 10), randn(g, 12, 4)) for _ in range(2))
    expected = dense64(first) + dense64(second)
    added = (first.up + second.up) @ (first.down + second.down)
    assert relative_error(added, expected) > 0.5
    cross = first.up @ second.down + second.up @ first.down
    assert_close(added, expected + cross)
    assert_close(dense64(combine([first, second])), expected)


def test_combine_keeps_a_common_dtype_and_the_fp32_sum_exact():
    g = torch.Generator().manual_seed(8)
    forms = [
        LoRA(randn(g, r, 64, 3, 3), randn(g, 48, r, 1, 1), s).to(dtype)
        for r, s, dtype in (
            (8, 0.5, torch.float32),
            (16, 1.0, torch.float16),
            (32, 0.25, torch.float32),
        )
    ]
    weights = [0.8, 0.5, -0.3]
    expected = sum(w * dense64(f) for f, w in zip(forms, weights, strict=True))
    combined = combine(forms, weights)
    assert combined.down.dtype == torch.float32 and combined.rank == 56
    assert relative_error(dense64(combined), expected) < 1e-6


def test_combine_rejects_bad_input():
    g = torch.Generator().manual_seed(0)
    linear = LoRA(randn(g, 2, 4), randn(g, 5, 2))
    conv = LoRA(randn(g, 2, 4, 3, 3), randn(g, 5, 2, 1, 1))
    with pytest.raises(ShapeError, match=r"\(5, 4\).*\(5, 4, 3, 3\)"):
        combine([linear, conv])
    with pytest.raises(ArgumentError, match="2 forms but 1 weights"):
        combine([linear, linear], [1.0])
    with pytest.raises(NonFiniteError, match=r"weights\[1\]"):
        combine([linear, linear], [1.0, math.nan])
    with pytest.raises(ArgumentError, match="at least one"):
        combine([])
    with pytest.raises(DTypeError, match=r"forms\[1\]"):
        combine([linear, LoHa(linear, linear)])


# --- the adaptive SVD --------------------------------------------------------------------


def _spectrum_matrix(values: torch.Tensor, rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(randn(g, rows, len(values)))[0]
    v = torch.linalg.qr(randn(g, cols, len(values)))[0]
    return ((u * values) @ v.T).float()


@pytest.fixture
def calls(monkeypatch):
    """Record the sketch widths of `randomized_svd` and the calls of `exact_svd`."""
    seen = {"sketches": [], "exact": 0}
    sketch, exact = decompose.randomized_svd, decompose.exact_svd

    def sketched(matrix, width, n_iter, seed):
        seen["sketches"].append(width)
        return sketch(matrix, width, n_iter, seed)

    def counted(matrix):
        seen["exact"] += 1
        return exact(matrix)

    monkeypatch.setattr(decompose, "randomized_svd", sketched)
    monkeypatch.setattr(decompose, "exact_svd", counted)
    return seen


def _error(weight: torch.Tensor, lora: LoRA) -> float:
    return relative_error(lora_delta64(lora.down, lora.up, lora.scale), weight)


def test_adaptive_svd_grows_a_sketch_that_has_not_converged(calls):
    """A rank-48 block over noise, cut at 16: the first sketch (26 columns) sits inside the
    block and its gap test fails; the doubled one (52) sees past it and passes."""
    values = torch.cat([torch.linspace(1.0, 0.6, 48), torch.full((252,), 1e-3)]).double()
    weight = _spectrum_matrix(values, 300, 1200, 0)
    lora = decompose.svd(weight, 16, method="adaptive", seed=0)
    assert calls["sketches"] == [26, 52] and calls["exact"] == 0
    optimum = math.sqrt(float((values[16:] ** 2).sum() / (values**2).sum()))
    assert _error(weight, lora) <= 1.001 * optimum
    calls["sketches"].clear()
    decompose.svd(weight, 16, method="auto", seed=0)
    assert calls["sketches"] == [26] and calls["exact"] == 1


def test_adaptive_svd_falls_back_to_exact_on_a_flat_spectrum(calls):
    weight = torch.randn(256, 600, generator=torch.Generator().manual_seed(1))
    lora = decompose.svd(weight, 8, method="adaptive", seed=0)
    assert calls["sketches"] == [18, 36] and calls["exact"] == 1  # 72 > 256 / 4
    values = torch.linalg.svdvals(weight.double())
    optimum = math.sqrt(float((values[8:] ** 2).sum() / (values**2).sum()))
    assert _error(weight, lora) == pytest.approx(optimum, rel=1e-5)


@pytest.mark.parametrize("decay", [0.9, 0.97, 0.995])
def test_adaptive_svd_meets_eckart_young_to_a_tenth_of_a_percent(decay):
    values = decay ** torch.arange(300, dtype=torch.float64)
    weight = _spectrum_matrix(values, 300, 900, 2)
    optimum = math.sqrt(float((values[20:] ** 2).sum() / (values**2).sum()))
    lora = decompose.svd(weight, 20, method="adaptive", oversample=20, seed=0)
    assert _error(weight, lora) <= 1.001 * optimum


def test_adaptive_svd_meets_eckart_young_on_a_power_law_spectrum():
    """σ_i ∝ (1 + i)^-0.3, the slowest decay among the spectra measured for
    `docs/factor_tools.md` (flat, clustered at the cut, plateaus, slow exponential): the
    gap test passes while the sketch still misses a little, the worst excess measured."""
    values = (1 + torch.arange(640, dtype=torch.float64)) ** -0.3
    weight = _spectrum_matrix(values, 640, 640, 64)
    optimum = math.sqrt(float((values[64:] ** 2).sum() / (values**2).sum()))
    lora = decompose.svd(weight, 64, method="adaptive", oversample=64, seed=0)
    assert _error(weight, lora) <= 1.001 * optimum


# --- a wider grid (pytest -m exhaustive) ---------------------------------------------------


@pytest.mark.exhaustive
@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3), (3, 3, 3)], ids=str)
@pytest.mark.parametrize("sides", [(320, 320), (640, 320), (1280, 64), (7, 1280)], ids=str)
@pytest.mark.parametrize("rank", [1, 16, 64, 128])
def test_resize_and_combine_grid(request, kernel, sides, rank):
    if "exhaustive" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a wide grid: run with -m exhaustive")
    g = torch.Generator().manual_seed(rank)
    out_f, in_f = sides
    ones = (1,) * len(kernel)
    forms = [LoRA(randn(g, r, in_f, *kernel), randn(g, out_f, r, *ones), 1 / r) for r in (rank, 8)]
    expected = dense64(forms[0]) - 0.5 * dense64(forms[1])
    keep = max(1, rank // 2)
    best, values = optimal(expected, keep)
    combined, error = combine(forms, [1.0, -0.5], rank=keep, return_error=True)
    if separated(values, keep):
        assert_close(dense64(combined), best, 1e-8)
    tail = math.sqrt(float((values[keep:] ** 2).sum() / (values**2).sum()))
    assert error == pytest.approx(tail, abs=1e-9)
    small, error = resize(forms[0], keep, return_error=True)
    best, values = optimal(dense64(forms[0]), keep)
    if keep < rank and separated(values, keep):
        assert_close(dense64(small), best, 1e-8)


# --- magnitudes, rounding and bad factors ---------------------------------------------------


@pytest.mark.parametrize(("magnitude", "scale"), [(1e-23, 1e46), (1e20, 1e-20), (1e-30, 1.0)])
@pytest.mark.parametrize("rule", [{"rank": 2}, {"energy": 0.8}, {"ratio": 0.5}])
def test_resize_of_a_lora_does_not_depend_on_where_its_magnitude_sits(magnitude, scale, rule):
    """Factors far from 1 whose product the scale brings back (or not) are truncated as the
    same LoRA at magnitude 1, and the error reported is the one the result has."""
    g = torch.Generator().manual_seed(3)
    plain = LoRA(randn(g, 4, 6), randn(g, 5, 4)).to(torch.float32)
    far = LoRA(plain.down * magnitude, plain.up * magnitude, scale)
    expected = dense64(far)
    small, error = resize(far, return_error=True, **rule)
    reference = resize(plain, **rule)
    assert small.rank == reference.rank
    best, _ = optimal(expected, small.rank)
    assert relative_error(dense64(small), best) < 1e-5
    assert error == pytest.approx(relative_error(dense64(small), expected), rel=1e-4)
    combined = combine([far, far], [1.0, 1.0], **rule)
    assert combined.rank == reference.rank


@pytest.mark.parametrize("magnitude", [1e-25, 1e20, 1e30])
@pytest.mark.parametrize("rule", [{"energy": 0.9}, {"ratio": 0.3}])
def test_resize_of_a_tucker_chooses_the_same_ranks_at_any_magnitude(magnitude, rule):
    g = torch.Generator().manual_seed(0)
    weight = randn(g, 6, 5, 3, 3).to(torch.float32)
    tucker = decompose.tucker2(weight, (4, 4))
    far = decompose.tucker2(weight * magnitude, (4, 4))
    small, error = resize(far, return_error=True, **rule)
    reference, expected_error = resize(tucker, return_error=True, **rule)
    assert small.rank == reference.rank
    assert error == pytest.approx(expected_error, rel=1e-3, abs=1e-6)
    assert error == pytest.approx(relative_error(dense64(small), dense64(far)), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_error_resize_reports_includes_rounding_to_the_forms_dtype(dtype):
    """A rank-3 LoRA stored at rank 4 loses nothing to the truncation, only to rounding."""
    g = torch.Generator().manual_seed(0)
    down, up = randn(g, 3, 64), randn(g, 64, 3)
    lora = LoRA(torch.cat([down, down[:1]]), torch.cat([up, up[:, :1]], 1)).to(dtype)
    small, error = resize(lora, 3, return_error=True)
    actual = relative_error(dense64(small), dense64(lora))
    assert actual > 1e-4
    assert error == pytest.approx(actual, rel=1e-6)
    tucker = decompose.tucker2(randn(g, 8, 6, 3, 3), (4, 4)).to(dtype)
    small, error = resize(tucker, (3, 2), return_error=True)
    assert error == pytest.approx(relative_error(dense64(small), dense64(tucker)), rel=1e-6)


def test_a_sum_that_cancels_reports_an_infinite_relative_error():
    """A − A is 0: the float64 norm of the exact sum is rounding noise, not a reference."""
    g = torch.Generator().manual_seed(0)
    lora = LoRA(randn(g, 4, 6), randn(g, 5, 4)).to(torch.float32)
    combined, error = combine([lora, lora], [1.0, -1.0], rank=1, return_error=True)
    assert float(dense64(combined).abs().max()) > 0 and error == math.inf
    _, error = combine([lora, lora], [1.0, -0.5], rank=4, return_error=True)
    assert error < 1e-6


def test_folding_a_half_precision_form_shares_each_ranks_magnitude():
    """`mid ∘ down` (or a CP's weights) can leave float16 where ΔW does not: each rank's
    magnitude moves between up and down by a power of two, so ΔW is still exact."""
    h = torch.float16
    tucker = Tucker2(torch.full((2, 4, 1, 1), 200.0, dtype=h), torch.full((1, 2, 3, 3), 200.0,
                     dtype=h), torch.full((5, 1, 1, 1), 1e-3, dtype=h))  # fmt: skip
    cp = CP(torch.full((3, 1), 1e-4, dtype=h), torch.full((4, 1), 10.0, dtype=h),
            [torch.full((3, 1), 10.0, dtype=h)], torch.tensor([1e6]))  # fmt: skip
    for form, folded in ((tucker, as_lora(tucker)), (tucker, resize(tucker, 1, to="lora")),
                         (cp, as_lora(cp))):  # fmt: skip
        assert folded.down.dtype == h
        assert all(bool(torch.isfinite(t).all()) for t in (folded.down, folded.up))
        assert relative_error(dense64(folded), dense64(form)) < 2e-3
    beyond = Tucker2(torch.full((1, 4, 1), 6e4, dtype=h), torch.full((1, 1, 3), 6e4, dtype=h),
                     torch.full((5, 1, 1), 6e4, dtype=h))  # fmt: skip
    with pytest.raises(NonFiniteError, match="fold"):
        as_lora(beyond)


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda f: resize(f, 1), "form.down"),
        (lambda f: resize(f, energy=0.5), "form.down"),
        (lambda f: combine([f]), r"forms\[0\].down"),
        (lambda f: combine([f, f], rank=1), r"forms\[0\].down"),
    ],
)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_factors_are_refused_by_name(call, named, bad):
    g = torch.Generator().manual_seed(0)
    down = randn(g, 2, 6)
    down[1, 3] = bad
    for form in (LoRA(down, randn(g, 5, 2)), Tucker2(down[:, :, None], randn(g, 2, 2, 3),
                                                      randn(g, 5, 2, 1))):  # fmt: skip
        with pytest.raises(NonFiniteError, match=f"{named} holds 1 NaN/Inf"):
            call(form)


@pytest.mark.parametrize("magnitude", [1e-2, 1e-6])
def test_a_half_precision_resize_shares_the_magnitude_between_its_factors(magnitude):
    """A small `up` and an ordinary `down`: the truncated factors get √ of the product's
    magnitude each, so neither sinks into float16's subnormals (where one keeps `up`'s own
    magnitude, the error grows 47-fold at 1e-6)."""
    g = torch.Generator().manual_seed(0)
    a, b = randn(g, 64, 4), randn(g, 4, 48)
    up = torch.cat([a, a @ randn(g, 4, 4)], 1) * magnitude
    down = torch.cat([b, torch.zeros(4, 48, dtype=b.dtype)]) * 0.5
    lora = LoRA(down, up).to(torch.float16)  # rank 8 holding a rank-4 ΔW
    small = resize(lora, 4)
    assert relative_error(dense64(small), dense64(lora)) < 6e-4
    peaks = [float(t.abs().max()) for t in (small.up, small.down)]
    assert max(peaks) / min(peaks) < 16


def test_a_half_precision_tucker_resize_that_overflows_is_refused():
    g = torch.Generator().manual_seed(0)
    tucker = Tucker2(randn(g, 4, 6, 1) * 200, randn(g, 4, 4, 3) * 300, randn(g, 5, 4, 1) * 200)
    tucker = tucker.to(torch.float16)
    small, error = resize(tucker, 2, return_error=True)
    assert all(bool(torch.isfinite(t).all()) for t in small.named_factors().values())
    assert error == pytest.approx(relative_error(dense64(small), dense64(tucker)), rel=1e-6)
    h = torch.float16
    beyond = Tucker2(torch.full((2, 6, 1), 6e4, dtype=h), torch.full((2, 2, 3), 6e4, dtype=h),
                     torch.full((5, 2, 1), 6e4, dtype=h))  # ΔW of 1e15: no float16 factors hold it
    with pytest.raises(NonFiniteError, match="Tucker2's"):
        resize(beyond, 1)


def test_factors_at_the_ends_of_their_dtypes_range_resize_as_at_magnitude_one():
    """A float32 `down` near its largest value with a tiny `up`, and float64 factors of
    1e±300 whose scale brings ΔW back: the result and its reported error are those of the
    same LoRA at magnitude 1."""
    g = torch.Generator().manual_seed(0)
    down, up = randn(g, 4, 6).abs(), randn(g, 5, 4)
    plain = LoRA(down, up).to(torch.float32)
    _, error = resize(plain, 2, return_error=True)
    far = LoRA(plain.down / float(plain.down.max()) * 1.5e38, plain.up * 1e-30)
    small, far_error = resize(far, 2, return_error=True)
    assert far_error == pytest.approx(error, rel=1e-5) and small.rank == 2
    assert all(bool(torch.isfinite(t).all()) for t in (small.down, small.up))
    assert combine([far], rank=2, return_error=True)[1] == pytest.approx(error, rel=1e-5)
    for magnitude in (1e300, 1e-300):  # ΔW of 1e300 and 1e-300
        huge = LoRA(down * magnitude, up * magnitude, 1 / magnitude)
        _, huge_error = resize(huge, 2, return_error=True)
        assert huge_error == pytest.approx(resize(LoRA(down, up), 2, return_error=True)[1])
    top = LoRA(torch.full((1, 3), 1.5e308, dtype=torch.float64), torch.ones(4, 1).double())
    assert resize(top, 1) is top  # the largest float64s divide by a power of two


def test_cp_and_tucker_edge_cases_of_folding_and_cancelling():
    """A float32 CP whose `out · √w` alone would overflow folds in float64; a float16 fold
    whose `down` would sink into subnormals shares the magnitude; a Tucker2 minus itself is
    0 with error 0; an empty ΔW is a ShapeError."""
    cp = CP(torch.full((3, 1), 1e30), torch.full((4, 1), 1e-30), [torch.full((2, 1), 0.5)],
            torch.tensor([1e30]))  # fmt: skip
    assert relative_error(dense64(as_lora(cp)), cp_delta64(cp)) < 1e-6
    h = torch.float16
    tucker = Tucker2(torch.full((1, 4, 1), 1e-3, dtype=h), torch.full((1, 1, 3), 2e-3, dtype=h),
                     torch.full((5, 1, 1), 1e4, dtype=h))  # fmt: skip
    assert relative_error(dense64(as_lora(tucker)), dense64(tucker)) < 1e-3
    g = torch.Generator().manual_seed(0)
    tucker = decompose.tucker2(randn(g, 6, 5, 3), (2, 2)).to(torch.float16)
    cancelled, error = combine([tucker, tucker], [1.0, -1.0], return_error=True)
    assert not dense64(cancelled).any() and error == 0.0
    with pytest.raises(ShapeError, match="at least one element"):
        resize(LoRA(torch.ones(1, 5), torch.ones(0, 1)), 1)


def test_reported_errors_hold_for_magnitudes_far_apart_and_ill_conditioned_sums():
    """Factors whose ranks differ by 1e200 (their squares underflow float64), a Tucker2 whose
    `down` is 1e300 and `up` 1e-4, and a sum of two nearly cancelling blocks: the reported
    error is the one the same forms have at ordinary magnitudes, never a 0 from underflow
    or from a noise floor beside a reference that is not 0."""
    g = torch.Generator().manual_seed(0)
    down, up = randn(g, 2, 8), randn(g, 6, 2)
    far_down, far_up = down.clone(), up.clone()
    far_down[1] *= 1e-200
    far_up[:, 0] *= 1e-200
    far = LoRA(far_down, far_up)
    assert space.relative_gap(far, LoRA(far_down, far_up * 1.01)) == pytest.approx(0.01)
    mid = torch.eye(2, dtype=torch.float64)[:, :, None].expand(2, 2, 2).clone()
    tucker_down, tucker_up = randn(g, 2, 5, 1), randn(g, 4, 2, 1)
    plain = resize(Tucker2(tucker_down, mid, tucker_up), (1, 1), return_error=True)[1]
    tucker = Tucker2(tucker_down * 1e300, mid, tucker_up * 1e-4)
    assert resize(tucker, (1, 1), return_error=True)[1] == pytest.approx(plain, rel=1e-9)
    d, u = randn(g, 3, 8), randn(g, 6, 3)
    blocks_down, blocks_up = torch.cat([d, d * (1 + 1e-9)]), torch.cat([u * 1e3, -u * 1e3], 1)
    exact = LoRA(blocks_down, blocks_up)
    gap = space.relative_gap(exact, LoRA(blocks_down, blocks_up * (1 + 1e-5)))
    assert gap == pytest.approx(1e-5, rel=0.05)
