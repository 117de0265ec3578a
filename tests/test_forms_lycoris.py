"""LoHa and LoKr forms against float64 references written from their definitions, and
`alpha_from_scale` as the exact inverse of `scale_from_alpha`."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import FLOAT64_RTOL, channels, ranks, seeds

from lowrank import errors
from lowrank.forms import (
    CP,
    LoHa,
    LoKr,
    LoRA,
    Tucker2,
    add_dense,
    alpha_from_scale,
    recompose,
    scale_from_alpha,
)

kernels = st.sampled_from([(), (3,), (3, 3), (1, 3), (3, 1, 2)])
scales = st.floats(min_value=-4, max_value=4, allow_nan=False).filter(lambda s: abs(s) > 1e-3)


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def half(g, out_f, in_f, kernel, r, tucker):
    """One LoHa half: LoRA with the kernel on `down`, or a Tucker chain; and its float64 ΔW."""
    ones = (1,) * len(kernel)
    if tucker:
        down, mid, up = randn(g, r, in_f, *ones), randn(g, r, r, *kernel), randn(g, out_f, r, *ones)
        dense = torch.einsum("op,pq...,qi->oi...", up.flatten(1), mid, down.flatten(1))
        return Tucker2(down, mid, up), dense
    down, up = randn(g, r, in_f, *kernel), randn(g, out_f, r, *ones)
    dense = torch.einsum("or,ri...->oi...", up.flatten(1), down)
    return LoRA(down, up), dense


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=FLOAT64_RTOL, atol=1e-12)


@given(
    out_f=channels,
    in_f=channels,
    kernel=kernels,
    r=ranks,
    seed=seeds,
    scale=scales,
    tucker=st.booleans(),
)
def test_loha_is_the_hadamard_product_of_its_halves(out_f, in_f, kernel, r, seed, scale, tucker):
    tucker = tucker and bool(kernel)
    g = torch.Generator().manual_seed(seed)
    (first, d1), (second, d2) = (half(g, out_f, in_f, kernel, r, tucker) for _ in range(2))
    loha = LoHa(first, second, scale)
    close(recompose(loha), scale * d1 * d2)
    assert loha.shape == (out_f, in_f, *kernel) and loha.rank == r
    assert loha.num_params == LoHa.count(in_f, out_f, kernel, r, tucker=tucker)


@given(out_f=channels, in_f=channels, kernel=kernels, r=ranks, seed=seeds, scale=scales)
def test_add_dense_adds_a_loha_to_some_rows(out_f, in_f, kernel, r, seed, scale):
    g = torch.Generator().manual_seed(seed)
    (first, d1), (second, d2) = (half(g, out_f, in_f, kernel, r, False) for _ in range(2))
    rows = slice(out_f // 2, out_f)
    target = randn(g, out_f - out_f // 2, in_f, *kernel)
    expected = target - 0.5 * scale * (d1 * d2)[rows]
    close(add_dense(target.clone(), LoHa(first, second, scale), -0.5, rows), expected)


@given(
    a=channels,
    b=channels,
    c=channels,
    d=channels,
    kernel=kernels,
    r=ranks,
    seed=seeds,
    scale=scales,
    w1_factored=st.booleans(),
    w2_kind=st.sampled_from(["dense", "lora", "tucker"]),
)
def test_lokr_is_the_kronecker_product(a, b, c, d, kernel, r, seed, scale, w1_factored, w2_kind):
    if w2_kind == "tucker" and not kernel:
        w2_kind = "lora"
    g = torch.Generator().manual_seed(seed)
    if w1_factored:
        w1_down, w1_up = randn(g, r, c), randn(g, a, r)
        w1, w1_dense = LoRA(w1_down, w1_up), w1_up @ w1_down
    else:
        w1 = w1_dense = randn(g, a, c)
    if w2_kind == "dense":
        w2 = w2_dense = randn(g, b, d, *kernel)
    else:
        w2, w2_dense = half(g, b, d, kernel, r, w2_kind == "tucker")
    form = LoKr(w1, w2, scale)
    # ΔW[i·b + j, p·d + q, ·] = scale · w1[i, p] · w2[j, q, ·], written out index by index
    blocks = torch.einsum("ip,jq...->ijpq...", w1_dense, w2_dense)
    expected = scale * blocks.reshape(a * b, c * d, *kernel)
    close(recompose(form), expected)
    assert form.shape == (a * b, c * d, *kernel)
    assert form.rank == (r if w1_factored or w2_kind != "dense" else None)
    count = LoKr.count(
        (a, b),
        (c, d),
        kernel,
        r,
        factor_w1=w1_factored,
        factor_w2=w2_kind != "dense",
        tucker=w2_kind == "tucker",
    )
    assert form.num_params == count


@given(out_f=channels, in_f=channels, kernel=kernels.filter(bool), r=ranks, seed=seeds)
def test_with_kernel_unfolds_the_flattened_input_axis(out_f, in_f, kernel, r, seed):
    """LyCORIS stores conv halves as `(r, in·K)`: unfolding equals reshaping ΔW."""
    g = torch.Generator().manual_seed(seed)
    taps = math.prod(kernel)
    flat = [LoRA(randn(g, r, in_f * taps), randn(g, out_f, r)) for _ in range(2)]
    loha = LoHa(*flat, scale=0.7)
    unfolded = loha.with_kernel(kernel)
    assert unfolded.shape == (out_f, in_f, *kernel)
    close(recompose(unfolded), recompose(loha).reshape(out_f, in_f, *kernel))
    lokr = LoKr(randn(g, 2, 3), flat[0], 1.5)
    close(
        recompose(lokr.with_kernel(kernel)), recompose(lokr).reshape(2 * out_f, 3 * in_f, *kernel)
    )
    assert loha.with_kernel(kernel).with_kernel(kernel).shape == unfolded.shape


def test_with_kernel_refuses_what_does_not_divide():
    lora = LoRA(torch.randn(2, 10), torch.randn(4, 2))
    with pytest.raises(errors.ShapeError, match="cannot be unfolded"):
        lora.with_kernel((3, 3))
    with pytest.raises(errors.ShapeError, match="w2"):
        LoKr(torch.randn(2, 2), torch.randn(3, 10)).with_kernel((3, 3))


H = lambda: LoRA(torch.randn(2, 5), torch.randn(4, 2))  # noqa: E731


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: LoHa(H(), torch.randn(4, 5)), errors.DTypeError, "second must be a LoRA"),
        (
            lambda: LoHa(H(), LoRA(torch.randn(2, 5), torch.randn(4, 2), 2.0)),
            errors.ArgumentError,
            "second has scale 2",
        ),
        (
            lambda: LoHa(H(), LoRA(torch.randn(2, 6), torch.randn(4, 2))),
            errors.ShapeError,
            "one ΔW shape",
        ),
        (
            lambda: LoHa(H(), LoRA(torch.randn(3, 5), torch.randn(4, 3))),
            errors.RankError,
            "share one rank",
        ),
        (lambda: LoHa(H(), H().to(torch.float64)), errors.DTypeError, "dtype"),
        (lambda: LoHa(H(), H(), math.nan), errors.NonFiniteError, "scale"),
        (lambda: LoKr(torch.randn(2, 3, 1), torch.randn(2, 2)), errors.ShapeError, "w1"),
        (lambda: LoKr(torch.randn(2, 3), torch.randn(2)), errors.ShapeError, "w2"),
        (
            lambda: LoKr(torch.zeros(2, 3, dtype=torch.int64), torch.randn(2, 2)),
            errors.DTypeError,
            "w1",
        ),
        (
            lambda: LoKr(LoRA(torch.randn(2, 3, 3), torch.randn(2, 2, 1)), torch.randn(2, 2)),
            errors.ShapeError,
            "linear LoRA",
        ),
        (
            lambda: LoKr(H(), LoRA(torch.randn(3, 5), torch.randn(4, 3))),
            errors.RankError,
            "share one rank",
        ),
        (
            lambda: LoKr(
                Tucker2(torch.randn(2, 3), torch.randn(2, 2), torch.randn(4, 2)), torch.randn(2, 2)
            ),
            errors.DTypeError,
            "w1 must be a dense",
        ),
    ],
)
def test_invalid_product_forms(make, error, match):
    with pytest.raises(error, match=match):
        make()


@given(
    rank=st.integers(1, 4096),
    alpha=st.one_of(st.integers(1, 1024).map(float), st.floats(1e-3, 1e4, allow_nan=False)),
    rslora=st.booleans(),
)
def test_alpha_from_scale_resolves_to_the_scale_bit_for_bit(rank, alpha, rslora):
    scale = scale_from_alpha(alpha, rank, rslora=rslora)
    again = alpha_from_scale(scale, rank, rslora=rslora)
    assert scale_from_alpha(again, rank, rslora=rslora) == scale
    assert math.isclose(again, alpha, rel_tol=1e-14)


@given(seed=seeds, start=st.integers(0, 11), length=st.integers(0, 12))
def test_rows_of_every_form_are_those_rows_of_its_dense_update(seed, start, length):
    """`to_dense(rows)` builds ΔW[rows] from the factors of those rows alone."""
    g = torch.Generator().manual_seed(seed)
    rows = slice(start, start + length)
    forms = [
        LoRA(randn(g, 2, 5, 3, 3), randn(g, 12, 2, 1, 1), 0.5),
        Tucker2(randn(g, 2, 5, 1, 1), randn(g, 3, 2, 3, 3), randn(g, 12, 3, 1, 1), 2.0),
        CP(randn(g, 12, 3), randn(g, 5, 3), [randn(g, 3, 3)], randn(g, 3), 1.5),
        LoHa(LoRA(randn(g, 2, 5), randn(g, 12, 2)), LoRA(randn(g, 2, 5), randn(g, 12, 2)), 0.3),
        LoKr(randn(g, 3, 2), LoRA(randn(g, 2, 4, 3), randn(g, 4, 2, 1)), 0.7),
    ]
    for form in forms:
        close(form.to_dense(rows), form.to_dense()[rows])


def test_rows_must_be_a_contiguous_slice_for_every_form():
    g = torch.Generator().manual_seed(0)
    forms = [
        LoRA(randn(g, 2, 5), randn(g, 6, 2)),
        Tucker2(randn(g, 2, 5, 1), randn(g, 3, 2, 3), randn(g, 6, 3, 1)),
        CP(randn(g, 6, 3), randn(g, 5, 3), [randn(g, 3, 3)]),
        LoHa(LoRA(randn(g, 2, 5), randn(g, 6, 2)), LoRA(randn(g, 2, 5), randn(g, 6, 2))),
        LoKr(randn(g, 3, 2), LoRA(randn(g, 2, 4, 3), randn(g, 2, 2, 1))),
    ]
    for form in forms:
        with pytest.raises(errors.ShapeError, match="contiguous"):
            form.to_dense(slice(0, 6, 2))
