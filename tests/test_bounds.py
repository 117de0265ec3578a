"""lowrank.bounds: exact counts, tight useful ranks and crossovers, FLOPs, the write-up's claims.

The reference counts here are built from the factor shapes (numpy, vectorised over the
rank), independently of `lowrank.forms.*.count`; brute-force scans check tightness.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from lowrank import CP, ArgumentError, GeometryError, LoRA, RankError, ShapeError, Tucker2
from lowrank.bounds import (
    ADAPTER_FORMS,
    crossover_rank,
    forward_flops,
    max_useful_rank,
    param_count,
    unmerged_overhead,
)

# --------------------------------------------------------------------- references


def factor_shapes(form, in_features, out_features, kernel, rank):
    """Shapes of the factors of `form` (rank may be a numpy array; Tucker2 pairs allowed)."""
    ones = (1,) * len(kernel)
    r_out, r_in = rank if isinstance(rank, tuple) else (rank, rank)
    if form == "dense":
        return [(out_features, in_features, *kernel)]
    if form == "lora":
        return [(rank, in_features, *kernel), (out_features, rank, *ones)]
    if form == "centre_tap":
        return [(rank, in_features, *ones), (out_features, rank, *ones)]
    if form == "tucker2":
        return [(r_in, in_features, *ones), (r_out, r_in, *kernel), (out_features, r_out, *ones)]
    return [(out_features, rank), (in_features, rank), *[(k, rank) for k in kernel]]


def reference_count(form, in_features, out_features, kernel, rank):
    """Sum over the factors of the product of their sizes."""
    total = 0
    for shape in factor_shapes(form, in_features, out_features, kernel, rank):
        size = 1
        for n in shape:
            size = size * n
        total = total + size
    return total


def brute_max_useful(form, in_features, out_features, kernel):
    """Largest r with count(r) < dense, by scanning r = 0, 1, 2, … (counts increase)."""
    dense = reference_count("dense", in_features, out_features, kernel, 0)
    r = 0
    while reference_count(form, in_features, out_features, kernel, r + 1) < dense:
        r += 1
    return r


def scan_limit(in_features, out_features, kernel):
    """A rank past every crossover of two adapter forms (|linear coefficient| + 2)."""
    return in_features * math.prod(kernel) + 2 * (in_features + out_features) + sum(kernel) + 2


# --------------------------------------------------------------------- strategies

small = st.integers(1, 48)
sizes = st.integers(1, 700)
kernels = st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple)
odd_kernels = st.lists(st.sampled_from([1, 3, 5, 7]), min_size=1, max_size=3).map(tuple)


def fitting(form, kernel):
    return form != "centre_tap" or all(k % 2 for k in kernel)


# --------------------------------------------------------------------- counts


@given(st.sampled_from(("dense", *ADAPTER_FORMS)), sizes, sizes, kernels, st.integers(0, 300))
def test_param_count_equals_factor_shapes(form, in_features, out_features, kernel, rank):
    assume(fitting(form, kernel))
    expected = reference_count(form, in_features, out_features, kernel, rank)
    assert param_count(form, in_features, out_features, kernel, rank) == expected


@given(sizes, sizes, kernels, st.integers(1, 60), st.integers(1, 60))
def test_tucker2_pair_rank(in_features, out_features, kernel, r_out, r_in):
    expected = reference_count("tucker2", in_features, out_features, kernel, (r_out, r_in))
    assert param_count("tucker2", in_features, out_features, kernel, (r_out, r_in)) == expected
    assert param_count("tucker2", in_features, out_features, kernel, [r_out, r_in]) == expected


def tucker2_entries_that_reach_delta(in_features, out_features, kernel, r_out, r_in):
    """Brute force: how many entries of random Tucker2 factors ΔW depends on, read from the
    nonzero columns of the Jacobian of `ΔW = Σ up[t,p] mid[p,q,·] down[q,s]` (float64)."""
    taps = math.prod(kernel)
    shapes = [(r_in, in_features), (r_out, r_in, taps), (out_features, r_out)]
    sizes_ = [math.prod(shape) for shape in shapes]
    if not sum(sizes_):
        return 0
    generator = torch.Generator().manual_seed(0)
    point = torch.randn(sum(sizes_), dtype=torch.float64, generator=generator)

    def delta(vector):
        down, mid, up = (t.reshape(s) for t, s in zip(vector.split(sizes_), shapes, strict=True))
        return torch.einsum("tp,pqk,qs->tsk", up, mid, down)

    jacobian = torch.autograd.functional.jacobian(delta, point)
    jacobian = jacobian.reshape(jacobian.shape[:-1].numel(), len(point))
    return int((jacobian != 0).any(0).sum())


@given(
    st.integers(1, 5),
    st.integers(1, 5),
    st.lists(st.integers(1, 3), max_size=2).map(tuple),
    st.integers(0, 3),
    st.integers(0, 3),
)
def test_tucker2_count_is_the_entries_that_reach_delta(in_f, out_f, kernel, r_out, r_in):
    """A zero in either rank leaves ΔW = 0 and no parameter: the count is 0, as for rank 0."""
    expected = tucker2_entries_that_reach_delta(in_f, out_f, kernel, r_out, r_in)
    assert param_count("tucker2", in_f, out_f, kernel, (r_out, r_in)) == expected
    assert (expected == 0) == (r_out == 0 or r_in == 0)


def test_tucker2_with_one_zero_rank_counts_zero():
    assert param_count("tucker2", 320, 320, (3, 3), (0, 5)) == 0
    assert param_count("tucker2", 320, 320, (3, 3), (5, 0)) == 0
    assert Tucker2.count(320, 320, (3, 3), (0, 5)) == 0


@given(st.sampled_from(ADAPTER_FORMS), small, small, kernels, st.integers(1, 6))
def test_param_count_equals_num_params_of_factor_objects(form, in_f, out_f, kernel, rank):
    assume(fitting(form, kernel))
    shapes = factor_shapes(form, in_f, out_f, kernel, rank)
    tensors = [torch.zeros(shape) for shape in shapes]
    if form in ("lora", "centre_tap"):
        factors = LoRA(*tensors)
    elif form == "tucker2":
        factors = Tucker2(*tensors)
    else:
        factors = CP(tensors[0], tensors[1], tensors[2:])
    assert param_count(form, in_f, out_f, kernel, rank) == factors.num_params


# --------------------------------------------------------------------- useful ranks


@given(st.sampled_from(ADAPTER_FORMS), sizes, sizes, kernels)
def test_max_useful_rank_is_tight(form, in_features, out_features, kernel):
    assume(fitting(form, kernel))
    r = max_useful_rank(form, in_features, out_features, kernel)
    dense = reference_count("dense", in_features, out_features, kernel, 0)
    assert reference_count(form, in_features, out_features, kernel, r) < dense
    assert dense <= reference_count(form, in_features, out_features, kernel, r + 1)


@given(st.sampled_from(ADAPTER_FORMS), st.integers(1, 64), st.integers(1, 64), kernels)
def test_max_useful_rank_matches_linear_scan(form, in_features, out_features, kernel):
    assume(fitting(form, kernel))
    expected = brute_max_useful(form, in_features, out_features, kernel)
    assert max_useful_rank(form, in_features, out_features, kernel) == expected


@given(
    st.sampled_from(("lora", "tucker2", "cp")),
    st.integers(1, 6),
    st.integers(1, 24),
    st.integers(1, 24),
    st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
)
def test_grouped_bounds_match_a_scan_of_per_group_factor_shapes(form, groups, per_in,
                                                                per_out, kernel):  # fmt: skip
    """A grouped convolution's adapter is one factor set per group: its count, the dense
    weight's and the largest useful rank against a scan of `groups ×` one group's shapes."""
    sizes_ = (groups * per_in, groups * per_out, kernel)

    def reference(form_, rank):
        return groups * reference_count(form_, per_in, per_out, kernel, rank)

    dense = reference("dense", 0)
    assert param_count("dense", *sizes_, groups=groups) == dense
    assert param_count(form, *sizes_, 3, groups=groups) == reference(form, 3)
    r = max_useful_rank(form, *sizes_, groups=groups)
    assert r == brute_max_useful(form, per_in, per_out, kernel)
    assert (r == 0 or reference(form, r) < dense) and dense <= reference(form, r + 1)
    assert unmerged_overhead(form, *sizes_, r + 1, groups=groups) >= 2


def test_max_useful_rank_is_zero_when_no_rank_helps():
    assert max_useful_rank("lora", 1, 1) == 0
    assert max_useful_rank("tucker2", 1, 1) == 0
    assert max_useful_rank("lora", 3, 1) == 0  # 1 · (3 + 1) = 4 ≥ 3


def test_max_useful_rank_at_llama_sizes_is_exact():
    # 4096 × 11008: r (4096 + 11008) < 4096 · 11008  ⇔  r ≤ 2985
    assert max_useful_rank("lora", 4096, 11008) == 2985
    assert param_count("lora", 4096, 11008, (), 2985) < 4096 * 11008
    assert param_count("lora", 4096, 11008, (), 2986) >= 4096 * 11008


# --------------------------------------------------------------------- crossovers


@given(
    st.sampled_from(ADAPTER_FORMS),
    st.sampled_from(ADAPTER_FORMS),
    st.integers(1, 40),
    st.integers(1, 40),
    st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple),
)
def test_crossover_matches_brute_force_scan(form_a, form_b, in_f, out_f, kernel):
    assume(fitting(form_a, kernel) and fitting(form_b, kernel))
    limit = scan_limit(in_f, out_f, kernel)
    ranks = np.arange(1, limit + 1, dtype=np.int64)
    a_smaller = reference_count(form_a, in_f, out_f, kernel, ranks) < reference_count(
        form_b, in_f, out_f, kernel, ranks
    )
    a_larger = reference_count(form_a, in_f, out_f, kernel, ranks) > reference_count(
        form_b, in_f, out_f, kernel, ranks
    )
    crossing = crossover_rank(form_a, form_b, in_f, out_f, kernel)
    if crossing.rank is None:
        since = crossing.since
        assert a_smaller[since - 1 :].all()
        assert since == 1 or not a_smaller[since - 2]
        assert crossing.above == form_a
    else:
        assert a_smaller[: crossing.rank].all()
        assert not a_smaller[crossing.rank :].any()
        if crossing.above is None:
            assert not a_larger.any()
        else:
            assert crossing.above == form_b and a_larger[-1]


@given(st.sampled_from(ADAPTER_FORMS), st.integers(1, 200), st.integers(1, 200), kernels)
def test_crossover_with_dense_is_max_useful_rank(form, in_features, out_features, kernel):
    assume(fitting(form, kernel))
    sizes_ = (in_features, out_features, kernel)
    useful = max_useful_rank(form, *sizes_)
    assert crossover_rank(form, "dense", *sizes_).rank == useful
    flipped = crossover_rank("dense", form, *sizes_)
    assert flipped.rank is None and flipped.above == "dense"
    dense = reference_count("dense", *sizes_, 0)
    assert reference_count(form, *sizes_, flipped.since) > dense
    assert reference_count(form, *sizes_, flipped.since - 1) <= dense


def test_crossover_of_equal_forms():
    crossing = crossover_rank("lora", "cp", 64, 32)  # both r (in + out) on a linear layer
    assert (crossing.rank, crossing.above) == (0, None)
    assert "equal" in str(crossing)


def test_crossover_strings():
    assert "up to rank 284" in str(crossover_rank("tucker2", "lora", 320, 320, (3, 3)))
    assert "from rank 285 on" in str(crossover_rank("lora", "tucker2", 320, 320, (3, 3)))
    assert "at every rank" in str(crossover_rank("centre_tap", "lora", 320, 320, (3, 3)))
    assert "never" in str(crossover_rank("lora", "centre_tap", 320, 320, (3, 3)))


# --------------------------------------------------------------------- the write-up's claims

channels = st.integers(1, 4096)


@given(channels)
def test_locon_bound_is_exactly_nine_tenths(n):
    # LoCon, t = s = n, 3×3: r (9n + n) < 9n²  ⇔  10 r < 9 n.
    assert max_useful_rank("lora", n, n, (3, 3)) == (9 * n - 1) // 10


@given(channels)
def test_tucker2_bound_is_root_of_82(n):
    # 9r² + 2nr < 9n²  ⇔  r < n (√82 − 1) / 9 ≈ 0.8951 n  ⇔  (9r + n)² < 82 n².
    r = max_useful_rank("tucker2", n, n, (3, 3))
    assert (9 * r + n) ** 2 < 82 * n * n <= (9 * (r + 1) + n) ** 2


@given(channels)
def test_tucker2_beats_locon_below_eight_ninths(n):
    # 9r² + 2nr < 10nr  ⇔  9 r < 8 n (0.889 n; the write-up truncates to 0.88 n).
    assert crossover_rank("tucker2", "lora", n, n, (3, 3)).rank == (8 * n - 1) // 9


@given(channels)
def test_truncated_decimals_are_safe_but_lose_ranks(n):
    # every r < 0.89 n is useful for Tucker2 and every r < 0.88 n beats LoCon …
    assert max_useful_rank("tucker2", n, n, (3, 3)) >= (89 * n - 1) // 100
    assert crossover_rank("tucker2", "lora", n, n, (3, 3)).rank >= (88 * n - 1) // 100


def test_truncated_decimals_lose_ranks_at_sd_sizes():
    # … but they give away ranks: at n = 1280, 1145 is useful (0.89 n = 1139.2).
    assert max_useful_rank("tucker2", 1280, 1280, (3, 3)) == 1145
    assert crossover_rank("tucker2", "lora", 1280, 1280, (3, 3)).rank == 1137  # 0.88 n: 1126


def test_decimal_bounds_only_hold_for_t_equal_s():
    # s = 640 → t = 320, 3×3: not every r < 0.9 s (576) or r < 0.89 s (569.6) is useful.
    dense = reference_count("dense", 640, 320, (3, 3), 0)
    assert reference_count("lora", 640, 320, (3, 3), 575) > dense
    assert reference_count("tucker2", 640, 320, (3, 3), 569) > dense
    assert max_useful_rank("lora", 640, 320, (3, 3)) == 303
    assert max_useful_rank("tucker2", 640, 320, (3, 3)) == 402


@given(sizes, sizes, st.sampled_from([1, 3, 5, 7]))
def test_tucker2_beats_locon_below_s_times_k2_minus_1_over_k2_for_any_t(s, t, k):
    # r²K + sr + tr < s r K + r t  ⇔  r K < s (K − 1): exact for every t ≠ s.
    big_k = k * k
    expected = max(0, (s * (big_k - 1) - 1) // big_k)
    crossing = crossover_rank("tucker2", "lora", s, t, (k, k))
    assert (crossing.rank if crossing.rank is not None else -1) == expected


@given(sizes, sizes, st.sampled_from([1, 3, 5, 7]))
def test_stricter_tucker2_bound_is_a_valid_lower_bound(s, t, k):
    # "r < −max(t,s)/k² + min(t,s)·sqrt(1/k⁴ + 1)"  ⇔  (rK + M)² < m² (K² + 1), rK + M > 0.
    big_k, big, low = k * k, max(s, t), min(s, t)
    useful = max_useful_rank("tucker2", s, t, (k, k))
    strict = [
        r for r in range(1, useful + 2) if (r * big_k + big) ** 2 < low * low * (big_k**2 + 1)
    ]
    assert all(r <= useful for r in strict)
    if s == t:
        assert strict == list(range(1, useful + 1))


def test_stricter_tucker2_bound_loses_ranks_when_t_differs_from_s():
    # 320 → 1280, 3×3: the exact bound allows r ≤ 557; the "stricter" one only r ≤ 179.
    useful = max_useful_rank("tucker2", 320, 1280, (3, 3))
    strict = max(r for r in range(useful + 1) if (9 * r + 1280) ** 2 < 320**2 * 82)
    assert (useful, strict) == (557, 179)


@given(sizes, sizes, st.sampled_from([1, 3, 5, 7]))
def test_locon_exact_and_simplified_bounds(s, t, k):
    # exact: r < t s K / (s K + t); simplified: r < min²/max · K/(K + 1) is a lower bound.
    big_k = k * k
    useful = max_useful_rank("lora", s, t, (k, k))
    assert useful == (t * s * big_k - 1) // (s * big_k + t)
    big, low = max(s, t), min(s, t)
    simplified = (low * low * big_k - 1) // (big * (big_k + 1))
    assert simplified <= useful


# --------------------------------------------------------------------- FLOPs


@given(st.sampled_from(("dense", *ADAPTER_FORMS)), sizes, sizes, kernels, st.integers(1, 64))
def test_flops_are_two_per_multiply_add_per_position(form, in_f, out_f, kernel, rank):
    assume(fitting(form, kernel))
    spatial = (7, 5)[: len(kernel)] or (3,)
    per_position = reference_count(form, in_f, out_f, kernel, rank)
    assert (
        forward_flops(form, in_f, out_f, kernel, rank, spatial)
        == 2 * math.prod(spatial) * per_position
    )
    overhead = unmerged_overhead(form, in_f, out_f, kernel, rank)
    dense = reference_count("dense", in_f, out_f, kernel, 0)
    assert overhead == Fraction(dense + per_position, dense)


def test_flops_for_one_token_by_default():
    assert forward_flops("lora", 4096, 4096, (), 16) == 2 * 16 * 8192


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: param_count("loha", 4, 4, (), 2), ArgumentError, "loha"),
        (lambda: max_useful_rank("dense", 4, 4), ArgumentError, "dense"),
        (lambda: crossover_rank("lora", "kron", 4, 4), ArgumentError, "kron"),
        (lambda: param_count("lora", 0, 4, (), 2), ShapeError, "in_features"),
        (lambda: param_count("lora", 4, -1, (), 2), ShapeError, "out_features"),
        (lambda: param_count("lora", True, 4, (), 2), ShapeError, "in_features"),
        (lambda: param_count("lora", 4.0, 4, (), 2), ShapeError, "in_features"),
        (lambda: param_count("lora", 4, 4, 3, 2), ShapeError, "kernel_size"),
        (lambda: param_count("lora", 4, 4, "3", 2), ShapeError, "kernel_size"),
        (lambda: param_count("lora", 4, 4, (3, 3, 3, 3), 2), ShapeError, "at most 3"),
        (lambda: param_count("lora", 4, 4, (3, 0), 2), ShapeError, "kernel_size"),
        (lambda: param_count("lora", 4, 4, (3,)), RankError, "needs a rank"),
        (lambda: param_count("lora", 4, 4, (3,), -1), RankError, "rank"),
        (lambda: param_count("lora", 4, 4, (3,), 1.5), RankError, "rank"),
        (lambda: param_count("lora", 4, 4, (3,), True), RankError, "rank"),
        (lambda: param_count("lora", 4, 4, (3,), (2, 2)), RankError, "an int"),
        (lambda: param_count("tucker2", 4, 4, (3,), (2, 2, 2)), RankError, "r_out, r_in"),
        (lambda: param_count("tucker2", 4, 4, (3,), (2, -2)), RankError, "rank"),
        (lambda: param_count("centre_tap", 4, 4, (3, 2), 2), GeometryError, "odd"),
        (lambda: forward_flops("lora", 4, 4, (3,), 2, (0,)), ShapeError, "spatial"),
        (lambda: forward_flops("lora", 4, 4, (3,), 2, spatial=8), ShapeError, "spatial must be"),
        (lambda: forward_flops("lora", 4, 4, (3,), 2, (8.0,)), ShapeError, r"spatial\[0\]"),
        (lambda: param_count("lora", 4, 4, 3, 2), ShapeError, "kernel_size must be a tuple"),
        (lambda: param_count("lora", 4, 4, (3.0,), 2), ShapeError, r"kernel_size\[0\]"),
        (lambda: param_count("lora", 4.0, 4, (3,), 2), ShapeError, "in_features"),
        (lambda: param_count("lora", 4, 4, (3,), "2"), RankError, "rank must be an integer"),
        (lambda: param_count(["lora"], 4, 4, (3,), 2), ArgumentError, "form must be one of"),
        (lambda: unmerged_overhead("cp", 4, 4, (3,)), RankError, "needs a rank"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("groups", [2, 8])
def test_a_grouped_centre_tap_is_refused_as_the_modules_refuse_it(groups):
    """No module takes a centre tap on a grouped convolution (its 1×1 branch would mix every
    input channel); the bounds counted one per group, and gave a depthwise 3×3 a useful
    centre-tap rank of 4."""
    from lowrank.errors import TargetError
    from lowrank.nn import LoRAConv

    with pytest.raises(TargetError, match="groups"):
        LoRAConv(torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups), 1, form="centre_tap")
    for call in (lambda: param_count("centre_tap", 8, 8, (3, 3), 1, groups=groups),
                 lambda: max_useful_rank("centre_tap", 8, 8, (3, 3), groups=groups),
                 lambda: unmerged_overhead("centre_tap", 8, 8, (3, 3), 1, groups=groups),
                 lambda: forward_flops("centre_tap", 8, 8, (3, 3), 1, (4, 4), groups=groups)):
        with pytest.raises(GeometryError, match="groups"):
            call()
    assert param_count("centre_tap", 8, 8, (3, 3), 1) == 16


def test_count_model_lives_in_report_and_lowrank():
    import lowrank
    import lowrank.bounds
    from lowrank.report import ModelReport, count_model

    assert lowrank.count_model is count_model and lowrank.ModelReport is ModelReport
    assert not hasattr(lowrank.bounds, "count_model")
