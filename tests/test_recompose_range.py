"""`recompose` in float16 and bfloat16 over the whole range of the dtype: ΔW is summed and
scaled in float32 and rounded once, so every ΔW that the dtype holds comes out finite and
correctly rounded, whatever `scale · up` or an intermediate product would be, and a ΔW
outside the range is a `NonFiniteError` naming the form.

References are float64 `einsum`s (and `torch.kron`) written out here from the factors' own
values, with a bound on the float32 summation error from the same sums of |terms|; the
gradients' references are float64 autograd through those einsums, or the matmuls written
out.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.autograd.forward_ad as fwd
from hypothesis import assume, given
from hypothesis import strategies as st

import lowrank._products
import lowrank.forms
from lowrank import CP, DTypeError, LoHa, LoKr, LoRA, NonFiniteError, Tucker2, fold, recompose

HALVES = (torch.float16, torch.bfloat16)


def _lora_terms(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Σ_p up[t,p] down[p,s·], Σ_p |up[t,p] down[p,s·]|)` in float64, shape `(out, in, *k)`."""
    up2 = up.double().reshape(up.shape[:2])
    down = down.double()
    return (
        torch.einsum("tp,ps...->ts...", up2, down),
        torch.einsum("tp,ps...->ts...", up2.abs(), down.abs()),
    )


def reference(form: object) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW of `form` in float64 and the sum of |terms| of each entry (scale included)."""
    if isinstance(form, LoRA):
        value, size = _lora_terms(form.up, form.down)
    elif isinstance(form, Tucker2):
        up = form.up.double().reshape(form.up.shape[:2])
        down = form.down.double().reshape(form.down.shape[:2])
        mid = form.mid.double()
        value = torch.einsum("tp,pq...,qs->ts...", up, mid, down)
        size = torch.einsum("tp,pq...,qs->ts...", up.abs(), mid.abs(), down.abs())
    elif isinstance(form, CP):
        axes = "hwz"[: len(form.spatial_factors)]
        factors = [form.out_factor, form.in_factor, *form.spatial_factors]
        factors = [f.double() for f in factors]
        weights = form.weights.double() if form.weights is not None else factors[0][0] * 0 + 1
        spec = ",".join(["or", "ir", *(f"{a}r" for a in axes), "r"]) + f"->oi{axes}"
        value = torch.einsum(spec, *factors, weights)
        size = torch.einsum(spec, *(f.abs() for f in factors), weights.abs())
    elif isinstance(form, LoHa):
        first, second = (_lora_terms(h.up, h.down) for h in (form.first, form.second))
        value, size = first[0] * second[0], first[1] * second[1]
    else:
        w2 = form.w2.double()
        w1 = form.w1.double().reshape(*form.w1.shape, *[1] * (w2.ndim - 2))
        value = torch.kron(w1, w2)
        size = value.abs()
    return value * form.scale, size * abs(form.scale)


def _randn(g: torch.Generator, magnitude: float, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return (torch.randn(shape, generator=g, dtype=torch.float64) * magnitude).to(dtype)


def build(kind: str, g: torch.Generator, magnitude: float, scale: float, dtype: torch.dtype):
    """A small form of `kind` with factor entries of about `magnitude`, in `dtype`."""

    def r(*shape: int) -> torch.Tensor:
        return _randn(g, magnitude, dtype, *shape)

    if kind == "lora":
        return LoRA(r(3, 4, 3, 3), r(5, 3, 1, 1), scale)
    if kind == "tucker2":
        return Tucker2(r(2, 4, 1, 1), r(3, 2, 3, 3), r(5, 3, 1, 1), scale)
    if kind == "cp":
        return CP(r(5, 3), r(4, 3), (r(3, 3), r(2, 3)), r(3), scale)
    if kind == "loha":
        return LoHa(LoRA(r(2, 4, 3), r(5, 2, 1)), LoRA(r(2, 4, 3), r(5, 2, 1)), scale)
    return LoKr(r(2, 3), r(3, 2, 3), scale)


KINDS = ("lora", "tucker2", "cp", "loha", "lokr")


def assert_rounded_once(dense: torch.Tensor, value: torch.Tensor, size: torch.Tensor) -> None:
    """`dense` is `value` rounded once to its dtype, up to the float32 summation error on
    the |terms| `size` (and the dtype's smallest normal number, for subnormal results)."""
    info = torch.finfo(dense.dtype)
    bound = info.eps * value.abs() + 64 * torch.finfo(torch.float32).eps * size
    assert bool(((dense.double() - value).abs() <= bound + info.smallest_normal).all())


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("kind", KINDS)
def test_a_large_scale_on_small_factors_stays_finite(kind, dtype):
    """`scale · up` alone overflows float16 here (1e5 > 65504); ΔW itself is small."""
    g = torch.Generator().manual_seed(0)
    form = build(kind, g, 1e-3, 1e5, dtype)
    value, size = reference(form)
    assert float(value.abs().max()) < 1e3
    dense = recompose(form)
    assert dense.dtype == dtype and dense.shape == form.shape
    assert bool(torch.isfinite(dense).all())
    assert_rounded_once(dense, value, size)


def test_the_lora_of_small_factors_and_a_large_scale_is_200():
    down = torch.full((2, 4), 1e-3).half()
    dense = recompose(LoRA(down, torch.ones(3, 2).half(), 1e5))
    assert dense.dtype == torch.float16
    exact = 2 * float(down[0, 0]) * 1e5  # 200.08…: 1e-3 is 1.0004e-3 in float16
    assert torch.equal(dense, torch.full((3, 4), exact, dtype=torch.float64).half())


@given(
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(HALVES),
    magnitude=st.integers(-12, 12).map(lambda a: 2.0**a),
    scale=st.tuples(st.sampled_from([-1, 1]), st.integers(-9, 9)).map(lambda s: s[0] * 10.0**s[1]),
    seed=st.integers(0, 2**31 - 1),
)
def test_recompose_is_rounded_once_or_refuses(kind, dtype, magnitude, scale, seed):
    form = build(kind, torch.Generator().manual_seed(seed), magnitude, scale, dtype)
    value, size = reference(form)
    info = torch.finfo(dtype)
    largest = float(value.abs().max())
    if largest > 1.01 * info.max:
        with pytest.raises(NonFiniteError, match=type(form).__name__):
            recompose(form)
        return
    assume(largest < 0.99 * info.max)
    assert_rounded_once(recompose(form), value, size)


@pytest.mark.parametrize("block", [7, 40])
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("kind", ["tucker2", "cp"])
def test_half_products_are_rounded_block_by_block(monkeypatch, kind, dtype, block):
    """A few rows at a time (one row per block at 7 values): still rounded once, still
    differentiable and batched by `vmap`."""
    monkeypatch.setattr(lowrank._products, "ROUNDING_BLOCK", block)
    form = build(kind, torch.Generator().manual_seed(3), 2.0, 0.5, dtype)
    dense = recompose(form)
    assert dense.dtype == dtype and dense.shape == form.shape
    assert_rounded_once(dense, *reference(form))
    factors = [t.detach().requires_grad_(True) for t in form.named_factors().values()]
    rebuilt = type(form)(*factors, 0.5) if kind == "tucker2" else CP(
        factors[0], factors[1], tuple(factors[2:-1]), factors[-1], 0.5
    )
    rebuilt.to_dense().float().sum().backward()
    assert all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in factors)
    if kind == "tucker2":
        stacked = [torch.stack([t, 2 * t]) for t in form.named_factors().values()]
        batched = torch.vmap(lambda d, m, u: Tucker2(d, m, u, 0.5).to_dense())(*stacked)
        twice = Tucker2(*(2 * t for t in form.named_factors().values()), 0.5).to_dense()
        assert torch.equal(batched[0], dense) and torch.equal(batched[1], twice)


def test_cp_weights_beyond_an_intermediate_range_stay_exact():
    """Tiny `out`, huge weights: ΔW = 1e10 although `in · weights` alone is 1e40."""
    cp = CP(torch.full((2, 1), 1e-30), torch.full((3, 1), 1e10), (), torch.tensor([1e30]))
    dense = recompose(cp)
    assert torch.allclose(dense.double(), torch.full((2, 3), 1e10, dtype=torch.float64),
                          rtol=1e-6)  # fmt: skip


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("kind", ["tucker2", "cp"])
def test_half_recompose_is_differentiable(kind, dtype):
    form = build(kind, torch.Generator().manual_seed(4), 1.0, 0.5, dtype)
    factors = [t.requires_grad_(True) for t in form.named_factors().values()]
    recompose(form).float().sum().backward()
    assert all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in factors)


def test_a_delta_out_of_range_names_the_form_and_the_dtype():
    lora = LoRA(torch.full((2, 4), 200.0).half(), torch.full((3, 2), 200.0).half(), 10.0)
    with pytest.raises(NonFiniteError, match=r"LoRA of shape \(3, 4\).*float16"):
        recompose(lora)
    # the same factors at a scale that brings ΔW back into range
    assert torch.equal(recompose(LoRA(lora.down, lora.up, 1e-3)), torch.full((3, 4), 80.0).half())


def test_non_finite_factors_are_named():
    up = torch.ones(3, 2)
    up[1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="factor up holds NaN/Inf"):
        recompose(LoRA(torch.ones(2, 4), up))


def test_a_float32_sum_that_overflows_is_redone_in_float64():
    """`up @ down` is 8e38 (beyond float32), ΔW = 1e-2 times that is not."""
    big = torch.full((1, 1), 2e19)
    lora = LoRA(big, big.clone(), 1e-2)
    dense = recompose(lora)
    assert dense.dtype == torch.float32
    assert torch.equal(dense, torch.tensor([[4e36]]))


@pytest.mark.parametrize("dtype", HALVES)
def test_gradients_flow_through_the_float32_sum(dtype):
    g = torch.Generator().manual_seed(3)
    down = _randn(g, 1e-3, dtype, 2, 4).requires_grad_()
    up = _randn(g, 1.0, dtype, 3, 2).requires_grad_()
    dense = recompose(LoRA(down, up, 1e4))
    probe = torch.ones_like(dense)
    grad_up, grad_down = torch.autograd.grad((dense * probe).sum(), (up, down))
    assert grad_up.dtype == dtype and grad_down.dtype == dtype
    want_up = 1e4 * probe.double() @ down.double().T
    want_down = 1e4 * up.double().T @ probe.double()
    assert torch.allclose(grad_up.double(), want_up, rtol=2 * torch.finfo(dtype).eps)
    assert torch.allclose(grad_down.double(), want_down, rtol=2 * torch.finfo(dtype).eps)


def _mapped(form, fn):
    """`form` with each factor tensor `t` replaced by `fn(t)`, in `named_factors` order (the
    halves and parts of a LoHa or LoKr too)."""
    changes = {}
    for spec in dataclasses.fields(form):
        value = getattr(form, spec.name)
        if isinstance(value, torch.Tensor):
            changes[spec.name] = fn(value)
        elif isinstance(value, tuple):
            changes[spec.name] = tuple(fn(t) for t in value)
        elif isinstance(value, (LoRA, Tucker2)):
            changes[spec.name] = _mapped(value, fn)
    return dataclasses.replace(form, **changes)


def reference_gradients(form, upstream: torch.Tensor) -> tuple[list, list]:
    """∂⟨ΔW, upstream⟩ / ∂factor of each factor of `form` in float64 (autograd through the
    einsum `reference`), and the sum of |terms| of each entry (the same with |factors|,
    |scale| and |upstream|)."""

    def gradients(source, entries, weight):
        wide = _mapped(source, lambda t: entries(t).detach().double().requires_grad_())
        value = reference(wide)[0]
        return torch.autograd.grad((value * weight).sum(), list(wide.named_factors().values()))

    value = gradients(form, lambda t: t, upstream.double())
    magnitude = dataclasses.replace(form, scale=abs(form.scale))
    size = gradients(magnitude, torch.abs, upstream.double().abs())
    return list(value), list(size)


def assert_gradient_rounded_once(grad: torch.Tensor, value: torch.Tensor, size: torch.Tensor):
    """`grad` is `value` rounded once to its dtype: within half an ulp of it (`eps/2 · |value|`,
    or half the smallest subnormal), up to the float32 summation error on the |terms| `size`.
    A gradient rounded to the dtype before the scale multiplies it misses this by up to
    another half ulp, and by far more where the unscaled product left the dtype's range (Inf)
    or its normal numbers."""
    info = torch.finfo(grad.dtype)
    bound = info.eps / 2 * value.abs() + 64 * torch.finfo(torch.float32).eps * size
    bound = bound + info.smallest_normal * info.eps / 2
    assert grad.shape == value.shape
    assert bool(((grad.double() - value).abs() <= bound).all())


@pytest.mark.parametrize("kind", KINDS)
@given(
    dtype=st.sampled_from(HALVES),
    magnitude=st.integers(-8, 8).map(lambda a: 2.0**a),
    scale=st.tuples(st.sampled_from([-1, 1]), st.integers(-6, 6)).map(lambda s: s[0] * 10.0**s[1]),
    upstream=st.integers(-24, 14).map(lambda a: 2.0**a),
    seed=st.integers(0, 2**31 - 1),
)
def test_half_gradients_are_summed_and_scaled_in_float32(kind, dtype, magnitude, scale,
                                                         upstream, seed):  # fmt: skip
    """Each factor's gradient is the float64 one rounded once to the factors' dtype, wherever
    it fits: also where `upstream · factor` products leave float16's range (a small scale
    under a large upstream gradient) or its normal numbers (a large scale over a small one)."""
    g = torch.Generator().manual_seed(seed)
    form = build(kind, g, magnitude, scale, dtype)
    info = torch.finfo(dtype)
    assume(float(reference(form)[0].abs().max()) < 0.5 * info.max)
    grad_out = ((torch.rand(form.shape, generator=g, dtype=torch.float64) * 2 - 1) * upstream)
    grad_out = grad_out.to(dtype)
    factors = [t.requires_grad_(True) for t in form.named_factors().values()]
    grads = torch.autograd.grad(recompose(form), factors, grad_out)
    for grad, want, size in zip(grads, *reference_gradients(form, grad_out), strict=True):
        assert grad.dtype == dtype
        if float(want.abs().max()) < 0.99 * info.max:  # a gradient beyond the dtype is Inf
            assert_gradient_rounded_once(grad, want, size)


@pytest.mark.parametrize(
    ("down_shape", "up_shape"), [((2, 4), (3, 2)), ((2, 1, 2, 2), (3, 2, 1, 1))],
    ids=["linear", "conv"],
)  # fmt: skip
def test_a_small_scale_under_a_large_upstream_gradient_fits_float16(down_shape, up_shape):
    """`G @ downᵀ` is 4 · 2^15 · 8 = 2^20, beyond 65504; the gradient, scale times that, is 640
    (and `scale · upᵀ @ G` 480), both exact in float16."""
    down = torch.full(down_shape, 8.0, dtype=torch.float16, requires_grad=True)
    up = torch.full(up_shape, 8.0, dtype=torch.float16, requires_grad=True)
    scale = 640 / 2**20
    dense = recompose(LoRA(down, up, scale))
    grad_out = torch.full(dense.shape, 2.0**15, dtype=torch.float16)
    grad_up, grad_down = torch.autograd.grad(dense, (up, down), grad_out)
    rank, out_features = down.shape[0], up.shape[0]
    flat_up = up.detach().double().reshape(out_features, rank)
    flat_down = down.detach().double().reshape(rank, -1)
    flat_out = grad_out.double().reshape(out_features, -1)
    want_up = scale * flat_out @ flat_down.T
    want_down = scale * flat_up.T @ flat_out
    assert float(want_up.max()) == 640 and float(want_down.max()) == 480
    assert torch.equal(grad_up, want_up.to(torch.float16).view(up.shape))
    assert torch.equal(grad_down, want_down.to(torch.float16).view(down.shape))


def test_a_large_scale_over_a_small_upstream_gradient_keeps_float16_precision():
    """`G @ downᵀ` near 2^-19 is a float16 subnormal (spacing 2^-24); the gradient, 2^10 times
    that, is a normal number near 2^-9 and must keep its 11 bits."""
    g = torch.Generator().manual_seed(2)
    down = _randn(g, 2.0**-4, torch.float16, 4, 16).requires_grad_()
    up = _randn(g, 2.0**-4, torch.float16, 8, 4).requires_grad_()
    scale = 2.0**10
    grad_out = _randn(g, 2.0**-17, torch.float16, 8, 16)
    grad_up, grad_down = torch.autograd.grad(recompose(LoRA(down, up, scale)), (up, down),
                                             grad_out)  # fmt: skip
    wide_out = grad_out.double()
    wide_up, wide_down = up.detach().double(), down.detach().double()
    want_up = scale * wide_out @ wide_down.T
    size_up = scale * wide_out.abs() @ wide_down.abs().T
    want_down = scale * wide_up.T @ wide_out
    size_down = scale * wide_up.abs().T @ wide_out.abs()
    assert_gradient_rounded_once(grad_up, want_up, size_up)
    assert_gradient_rounded_once(grad_down, want_down, size_down)


@pytest.mark.parametrize("how", ["dual, requires grad", "dual", "torch.func.jvp"])
@pytest.mark.parametrize("dtype", HALVES)
def test_forward_mode_tangents_are_summed_and_scaled_in_float32(dtype, how):
    """The tangent of ΔW, `scale · (ṫup @ down + up @ ṫdown)`, rounded once, whether or not
    the factors also require grad; a small scale under large tangents gave Inf in float16."""
    g = torch.Generator().manual_seed(5)
    down = _randn(g, 8.0, dtype, 2, 6).requires_grad_(how == "dual, requires grad")
    up = _randn(g, 8.0, dtype, 3, 2).requires_grad_(how == "dual, requires grad")
    down_tangent = _randn(g, 2.0**12, dtype, 2, 6)
    up_tangent = _randn(g, 2.0**12, dtype, 3, 2)
    scale = 1e-3
    if how == "torch.func.jvp":
        _, tangent = torch.func.jvp(lambda d, u: LoRA(d, u, scale).to_dense(), (down, up),
                                    (down_tangent, up_tangent))  # fmt: skip
    else:
        with fwd.dual_level():
            dense = LoRA(fwd.make_dual(down, down_tangent), fwd.make_dual(up, up_tangent),
                         scale).to_dense()  # fmt: skip
            tangent = fwd.unpack_dual(dense).tangent
    wide = [t.detach().double() for t in (up_tangent, down, up, down_tangent)]
    want = scale * (wide[0] @ wide[1] + wide[2] @ wide[3])
    size = scale * (wide[0].abs() @ wide[1].abs() + wide[2].abs() @ wide[3].abs())
    assert_gradient_rounded_once(tangent, want, size)



def _delta_and_scale(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`delta (8, 64)` near 2^-10 and a 0-d scale near 1, in float16."""
    return _randn(g, 2.0**-10, torch.float16, 8, 64), _randn(g, 1.0, torch.float16)


@pytest.mark.parametrize("how", ["backward", "vmap of grad"])
def test_a_tensor_scales_gradient_is_summed_in_float32(how):
    """`scaled(delta, scale)` by a 0-d float16 tensor (an adapter's trainable scale):
    `∂/∂scale = Σ G ⊙ delta` summed in float32 and rounded once (per row of `delta` under
    `vmap`), and `∂/∂delta = scale · G`. Each `G ⊙ delta` is near 2^-26, under half float16's
    smallest subnormal: torch's own derivative of the product rounded each to float16
    first. G takes delta's signs, so that the sums (near 2^-21 a row) stand far above their
    rounding."""
    g = torch.Generator().manual_seed(7)
    delta, scale = _delta_and_scale(g)
    grad_out = _randn(g, 2.0**-16, torch.float16, 8, 64).abs() * delta.sign()
    products = grad_out.double() * delta.double()
    if how == "backward":
        leaves = (delta.requires_grad_(), scale.requires_grad_())
        grad_delta, grad_scale = torch.autograd.grad(lowrank._products.scaled(*leaves), leaves,
                                                     grad_out)  # fmt: skip
        wide_out, wide_scale = grad_out.double(), scale.detach().double()
        assert_gradient_rounded_once(grad_delta, wide_scale * wide_out,
                                     wide_scale.abs() * wide_out.abs())  # fmt: skip
        want, size = products.sum(), products.abs().sum()
    else:
        loss = torch.func.grad(lambda s, d, o: (lowrank._products.scaled(d, s) * o).sum())
        grad_scale = torch.vmap(loss, in_dims=(None, 0, 0))(scale, delta, grad_out)
        want, size = products.sum(-1), products.abs().sum(-1)
    assert grad_scale.dtype == torch.float16
    assert_gradient_rounded_once(grad_scale, want, size)


@pytest.mark.parametrize("how", ["dual", "torch.func.jvp"])
def test_a_tensor_scales_tangent_is_formed_in_float32(how):
    """The tangent of `scaled(delta, scale)` by a 0-d float16 tensor, `scale · ḋelta +
    ṡcale · delta`, is rounded once, whether or not the inputs require grad; torch's own
    rounded each term (here near 2^-26 and 2^-20) to float16 before the sum."""
    g = torch.Generator().manual_seed(7)
    delta, scale = _delta_and_scale(g)
    delta_tangent = _randn(g, 2.0**-20, torch.float16, 8, 64)
    scale_tangent = _randn(g, 2.0**-16, torch.float16)
    if how == "torch.func.jvp":
        _, tangent = torch.func.jvp(lowrank._products.scaled, (delta, scale),
                                    (delta_tangent, scale_tangent))  # fmt: skip
    else:
        with fwd.dual_level():
            dual = lowrank._products.scaled(fwd.make_dual(delta, delta_tangent),
                                            fwd.make_dual(scale, scale_tangent))  # fmt: skip
            tangent = fwd.unpack_dual(dual).tangent
    terms = (scale.double() * delta_tangent.double(), scale_tangent.double() * delta.double())
    assert tangent.dtype == torch.float16
    assert_gradient_rounded_once(tangent, terms[0] + terms[1], terms[0].abs() + terms[1].abs())

def _rebuilt(form, tensors):
    """`form` with its factor tensors, in `named_factors` order, replaced by `tensors`."""
    supply = iter(tensors)
    return _mapped(form, lambda _: next(supply))


@pytest.mark.parametrize("kind", KINDS)
def test_recompose_under_vmap_is_a_dtype_error_pointing_to_to_dense(kind):
    """Its range check reads ΔW on the host, which vmap cannot do for each entry of a batch;
    the error names the batched factors and the unchecked `to_dense`, which vmap takes and
    which gives here what a loop of `recompose` gives."""
    forms = [build(kind, torch.Generator().manual_seed(s), 1.0, 0.5, torch.float16)
             for s in range(3)]  # fmt: skip
    names = list(forms[0].named_factors())
    per_form = (f.named_factors().values() for f in forms)
    stacked = [torch.stack(ts) for ts in zip(*per_form, strict=True)]
    with pytest.raises(DTypeError, match=rf"torch.vmap.*{names[0]}.*batched.*to_dense\(\)"):
        torch.vmap(lambda *ts: recompose(_rebuilt(forms[0], ts)))(*stacked)
    batched = torch.vmap(lambda *ts: _rebuilt(forms[0], ts).to_dense())(*stacked)
    assert torch.equal(batched, torch.stack([recompose(f) for f in forms]))


def test_recompose_under_vmap_of_a_gradient_is_a_dtype_error():
    down, up = torch.randn(3, 2, 4), torch.randn(3, 5, 2)
    loss = torch.func.grad(lambda d, u: recompose(LoRA(d, u, 0.5)).sum())
    with pytest.raises(DTypeError, match="down, up are batched by vmap"):
        torch.vmap(loss)(down, up)


def test_recompose_of_unbatched_factors_inside_vmap_keeps_its_check():
    """A form built from tensors that vmap does not batch is recomposed and checked as
    anywhere else."""
    lora = LoRA(torch.full((2, 4), 200.0).half(), torch.full((3, 2), 200.0).half(), 1e-3)
    out_of_range = LoRA(lora.down, lora.up, 10.0)
    rows = torch.arange(3.0).half()[:, None]
    dense = torch.vmap(lambda row: recompose(lora) * row)(rows)
    assert torch.equal(dense, torch.stack([recompose(lora) * row for row in rows]))
    with pytest.raises(NonFiniteError, match="float16"):
        torch.vmap(lambda row: recompose(out_of_range) * row)(rows)


def test_recompose_and_fold_of_other_objects_are_dtype_errors():
    with pytest.raises(DTypeError, match=r"recompose expects a LoRA.*got str"):
        recompose("x")
    with pytest.raises(DTypeError, match=r"fold expects a Tucker2 form, got type"):
        fold(LoRA)


def test_a_half_lora_with_grad_compiles_with_fullgraph_and_matches_float64():
    torch.manual_seed(0)
    down = torch.randn(2, 6, dtype=torch.float16, requires_grad=True)
    up = torch.randn(3, 2, dtype=torch.float16, requires_grad=True)
    compiled = torch.compile(lambda a, b: LoRA(a, b, 0.5).to_dense(), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    out = compiled(down, up)
    grads = torch.autograd.grad(out.float().sum(), (down, up))
    d64, u64 = (t.detach().double().requires_grad_() for t in (down, up))
    expected = 0.5 * u64 @ d64
    ref = torch.autograd.grad(expected.sum(), (d64, u64))
    assert (out.double() - expected).abs().max() <= 1e-3 * expected.abs().max()
    for got, want in zip(grads, ref, strict=True):
        assert (got.double() - want).abs().max() <= 1e-3 * want.abs().max()
