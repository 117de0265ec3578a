"""`lora_linear` under torch.compile: the whole layer in one graph (`fullgraph=True`), forward
and every gradient against float64, on the torch path and on the Triton kernels (in the
interpreter), as a function and inside a model with fused adapters."""

from __future__ import annotations

import os
from fractions import Fraction

import pytest
import torch
from lowrank.kernels import lora_linear
from torch import nn

from lowrank import LoRALinear

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_CPU = pytest.param(
    "triton", marks=pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1")
)
TOL = 2e-5  # float32


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().double() - ref.detach()).norm() / ref.detach().norm())


def operands(seed: int = 0) -> list[torch.Tensor]:
    """`x (2, 3, 16)`, `weight (8, 16)`, `down (4, 16)`, `up (8, 4)`, `bias (8,)`, float32."""
    gen = torch.Generator().manual_seed(seed)
    shapes = ((2, 3, 16), (8, 16), (4, 16), (8, 4), (8,))
    return [torch.randn(*s, generator=gen) * (s[-1] ** -0.5 if i else 1.0)
            for i, s in enumerate(shapes)]  # fmt: skip


def reference(x, weight, down, up, bias, scale):
    x, weight, down, up, bias = (t.double() for t in (x, weight, down, up, bias))
    return x @ weight.t() + bias + scale * (x @ down.t()) @ up.t()


@pytest.mark.parametrize("backend", ["torch", TRITON_CPU])
def test_fullgraph_forward_and_every_gradient_match_float64(backend):
    torch._dynamo.reset()
    ours = [t.requires_grad_(i != 1) for i, t in enumerate(operands())]
    theirs = [t.detach().double().requires_grad_(i != 1) for i, t in enumerate(ours)]

    def layer(x, weight, down, up, bias):
        return lora_linear(x, weight, down, up, 0.7, bias, backend=backend).tanh()

    y = torch.compile(layer, fullgraph=True)(*ours)
    y_ref = reference(*theirs, 0.7).tanh()
    assert rel(y, y_ref) < TOL
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.float())
    y_ref.backward(dy)
    for name, a, b in zip(("x", "weight", "down", "up", "bias"), ours, theirs, strict=True):
        if name == "weight":
            assert a.grad is None
        else:
            assert rel(a.grad, b.grad) < TOL, name


@pytest.mark.parametrize("backend", ["torch", TRITON_CPU])
def test_fullgraph_dropout_draws_a_new_mask_per_call_and_keeps_a_given_seed(backend):
    torch._dynamo.reset()
    x, weight, down, up, bias = operands()

    def layer(x, seed=None):
        return lora_linear(x, weight, down, up, 1.0, bias, 0.5, seed, backend=backend)

    compiled = torch.compile(layer, fullgraph=True)
    torch.manual_seed(0)
    first, second = compiled(x), compiled(x)
    assert not torch.equal(first, second)  # each call draws its own seed inside the graph
    seeded = torch.compile(lambda x: layer(x, 1234), fullgraph=True)(x)
    assert torch.equal(seeded, layer(x, 1234))  # an explicit seed: the eager call's mask


@pytest.mark.parametrize("backend", ["torch", TRITON_CPU])
def test_fullgraph_takes_a_new_scale_each_call_and_still_checks_it(backend):
    """A scale that changes between calls (an adapter's strength turned down), which dynamo
    traces as a symbolic float on the second value (the op's float argument then specialises
    it, a graph per value): the graph must still compile whole and match float64 at every
    value, and a scale beyond float32's range must still be refused."""
    from lowrank.errors import NonFiniteError

    torch._dynamo.reset()
    ours = [t.requires_grad_(i == 2) for i, t in enumerate(operands())]
    compiled = torch.compile(
        lambda x, w, d, u, b, s: lora_linear(x, w, d, u, s, b, backend=backend), fullgraph=True
    )
    for scale in (1.0, 0.5, -2.0, 3, Fraction(1, 4)):
        ours[2].grad = None
        down = ours[2].detach().double().requires_grad_()
        y = compiled(*ours, scale)
        y_ref = reference(ours[0], ours[1], down, ours[3], ours[4], float(scale))
        assert rel(y, y_ref) < TOL, scale
        y.sum().backward()
        y_ref.sum().backward()
        assert rel(ours[2].grad, down.grad) < TOL, scale
    for bad in (float("nan"), 1e39):
        with pytest.raises(NonFiniteError, match="scale"):
            compiled(*ours, bad)


def test_a_compiled_fused_adapter_follows_its_scale():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), 3, alpha=6.0, fused=True)
    nn.init.normal_(layer.up, std=0.3)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(5, 16)
    w, b = layer.base.weight.double(), layer.base.bias.double()
    for scale in (2.0, 0.5, 0.25):
        layer.scale = scale
        y_ref = reference(x, w, layer.down.detach(), layer.up.detach(), b, scale)
        assert rel(compiled(x), y_ref) < TOL, scale


def test_model_with_fused_adapters_compiles_whole():
    """A model whose fused adapters run `lora_linear` (the Triton kernels in the interpreter,
    else the torch path) compiles with no graph break, and its output and factor gradients
    equal float64 on the same weights."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 8))
    for i in (0, 2):
        model[i] = LoRALinear(model[i], 3, alpha=6.0, fused=True)
        nn.init.normal_(model[i].up, std=0.3)  # ΔW ≠ 0
    x = torch.randn(5, 16)
    reference_model = [
        (m.base.weight.double(), m.base.bias.double(), m.down.detach().double().requires_grad_(),
         m.up.detach().double().requires_grad_())
        for m in (model[0], model[2])
    ]  # fmt: skip

    def forward_ref(x):
        (w0, b0, d0, u0), (w2, b2, d2, u2) = reference_model
        h = torch.nn.functional.gelu(x @ w0.t() + b0 + 2.0 * (x @ d0.t()) @ u0.t())
        return h @ w2.t() + b2 + 2.0 * (h @ d2.t()) @ u2.t()

    y = torch.compile(model, fullgraph=True)(x)
    y_ref = forward_ref(x.double())
    assert rel(y, y_ref) < TOL
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for module, (_, _, d, u) in zip((model[0], model[2]), reference_model, strict=True):
        assert rel(module.down.grad, d.grad) < TOL
        assert rel(module.up.grad, u.grad) < TOL


@pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETING, reason="compiled kernels: needs CUDA"
)
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fullgraph_on_cuda_and_in_cuda_graphs(mode, dtype):
    """The compiled kernels inside a compiled graph, and replayed from inductor's CUDA graphs
    ("reduce-overhead"): forward and factor gradients against float64, three steps."""
    torch._dynamo.reset()
    x, weight, down, up, bias = (t.cuda().to(dtype) for t in operands())
    down.requires_grad_()
    up.requires_grad_()
    theirs = [t.detach().double().requires_grad_(i in (2, 3))
              for i, t in enumerate((x, weight, down, up, bias))]  # fmt: skip
    step = torch.compile(lambda x: lora_linear(x, weight, down, up, 0.7, bias).float().tanh(),
                         fullgraph=True, mode=mode)  # fmt: skip
    y_ref = reference(*theirs, 0.7).tanh()
    y_ref.sum().backward()
    for _ in range(3):
        down.grad = up.grad = None
        y = step(x)
        y.sum().backward()
        assert rel(y, y_ref) < 2e-2
        assert rel(down.grad, theirs[2].grad) < 2e-2
        assert rel(up.grad, theirs[3].grad) < 2e-2
