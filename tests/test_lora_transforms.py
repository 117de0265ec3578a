"""lora_linear under `torch.func` transforms and forward-mode AD, against float64 torch.

The transforms see wrapped tensors (batched, grad-tracking, dual) whose primal values alone a
kernel would read; every such call must give the transform's true result, on either backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwd
from lowrank.kernels import ArgumentError, lora_linear
from test_lora_linear import TOL, TRITON_CPU, make, reference

BACKENDS = [TRITON_CPU, "torch"]
SCALE = 0.7


def operands(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """`x (3, 5, 24)`, `weight (20, 24)`, `down (4, 24)`, `up (20, 4)`, `bias (20,)`."""
    return make((3, 5), 24, 20, 4, dtype)


def ours(backend: str):
    return lambda x, w, a, b, bias: lora_linear(x, w, a, b, SCALE, bias, backend=backend)


def theirs(x, w, a, b, bias):
    return reference(x, w, a, b, SCALE, bias)


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    err = (out.detach().double() - ref.detach()).norm() / ref.detach().norm()
    return out.shape == ref.shape and float(err) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("argnum", range(5), ids=["x", "weight", "down", "up", "bias"])
def test_func_grad_matches_float64(backend, argnum):
    args = operands()
    wide = tuple(t.double() for t in args)
    grad = torch.func.grad(lambda *a: ours(backend)(*a).sin().sum(), argnums=argnum)(*args)
    ref = torch.func.grad(lambda *a: theirs(*a).sin().sum(), argnums=argnum)(*wide)
    assert close(grad, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_a_batch_of_inputs_and_of_factors(backend):
    x, w, a, b, bias = operands()
    wide = [t.double() for t in (x, w, a, b, bias)]
    batched = torch.func.vmap(ours(backend), in_dims=(0, None, None, None, None))
    assert close(batched(x, w, a, b, bias), theirs(*wide))
    downs, ups = torch.stack([a, 2 * a]), torch.stack([b, -b])  # one adapter per entry
    per_adapter = torch.func.vmap(ours(backend), in_dims=(None, None, 0, 0, None))
    ref = torch.stack([theirs(wide[0], wide[1], d.double(), u.double(), wide[4])
                       for d, u in zip(downs, ups, strict=True)])  # fmt: skip
    assert close(per_adapter(x, w, downs, ups, bias), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacrev_and_jvp_match_float64(backend):
    x, w, a, b, bias = operands()
    wide = [t.double() for t in (x, w, a, b, bias)]
    jac = torch.func.jacrev(lambda d: ours(backend)(x[0], w, d, b, bias))(a)
    assert close(jac, torch.func.jacrev(lambda d: theirs(wide[0][0], wide[1], d, *wide[3:]))(
        wide[2]))
    tangent = torch.randn_like(b)
    _, out = torch.func.jvp(lambda u: ours(backend)(x, w, a, u, bias), (b,), (tangent,))
    _, ref = torch.func.jvp(lambda u: theirs(*wide[:3], u, wide[4]), (wide[3],),
                            (tangent.double(),))  # fmt: skip
    assert close(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mode_ad_carries_every_tangent(backend, requires_grad):
    args = [t.requires_grad_(requires_grad) for t in operands()]
    tangents = [torch.randn_like(t) for t in args]
    with fwd.dual_level():
        duals = [fwd.make_dual(t, d) for t, d in zip(args, tangents, strict=True)]
        out = fwd.unpack_dual(ours(backend)(*duals)).tangent
    _, ref = torch.func.jvp(theirs, tuple(t.detach().double() for t in args),
                            tuple(d.double() for d in tangents))  # fmt: skip
    assert out is not None and close(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_with_a_seed_draws_each_entrys_mask_as_a_plain_call_does(backend):
    x, w, a, b, bias = operands()

    def dropped(xi):
        return lora_linear(xi, w, a, b, SCALE, bias, dropout_p=0.4, seed=11, backend=backend)

    plain = torch.stack([dropped(xi) for xi in x])
    assert torch.allclose(torch.func.vmap(dropped)(x), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("randomness", ["error", "different"])
def test_vmap_dropout_without_a_seed_needs_randomness_same(randomness):
    x, w, a, b, bias = operands()

    def dropped(xi):
        return lora_linear(xi, w, a, b, SCALE, bias, dropout_p=0.4)

    with pytest.raises(ArgumentError, match="randomness='same'"):
        torch.func.vmap(dropped, randomness=randomness)(x)
    torch.manual_seed(0)
    same = torch.func.vmap(dropped, randomness="same")(x)
    torch.manual_seed(0)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    plain = torch.stack([lora_linear(xi, w, a, b, SCALE, bias, dropout_p=0.4, seed=seed)
                         for xi in x])  # fmt: skip
    assert torch.allclose(same, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transforms_inside_torch_compile_match_float64(backend):
    """A transform that dynamo traces (`torch.compile` of `jvp` or of `grad`) must still
    see torch ops, not the custom op, which has no forward-mode rule."""
    torch._dynamo.reset()
    x, w, a, b, bias = operands()
    wide = [t.double() for t in (x, w, a, b, bias)]
    tangent = torch.randn_like(b)

    def jvp(u, du):
        return torch.func.jvp(lambda v: ours(backend)(x, w, a, v, bias), (u,), (du,))[1]

    _, ref = torch.func.jvp(lambda v: theirs(*wide[:3], v, wide[4]), (wide[3],),
                            (tangent.double(),))  # fmt: skip
    assert close(torch.compile(jvp, backend="aot_eager")(b, tangent), ref)

    def loss(u):
        return ours(backend)(x, w, a, u, bias).sin().sum()

    grad = torch.compile(torch.func.grad(loss), backend="aot_eager")(b)
    ref = torch.func.grad(lambda v: theirs(*wide[:3], v, wide[4]).sin().sum())(wide[3])
    assert close(grad, ref)
