"""lora_linear against a float64 torch reference: outputs, every gradient, odd shapes, errors.

The Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1) in float32 and
float16; bfloat16 runs only on a CUDA device. The compiled kernels are checked on a GPU by the
`*_cuda` tests, which need the interpreter off: `TRITON_INTERPRET=0 pytest tests/test_lora_*.py`
(the interpreter-only tests then skip). Dropout has its own file, test_lora_dropout.py.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lowrank.kernels import (
    ArgumentError,
    _lora_gemm,
    _lora_gemm_tma,
    _lora_torch,
    _lora_triton,
    lora_dropout_mask,
    lora_linear,
)
from lowrank.kernels import lora as lora_module
from lowrank.kernels._lora_op import lora_linear_fwd

from lowrank.errors import DeviceError, DTypeError, NonFiniteError, RankError, ShapeError

pytestmark = pytest.mark.long  # among the suite's longest modules: scheduled first

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
COMPILED_CUDA = torch.cuda.is_available() and not INTERPRETING
interpreter_only = pytest.mark.skipif(
    not INTERPRETING, reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)
compiled_cuda_only = pytest.mark.skipif(
    not COMPILED_CUDA, reason="compiled kernels: needs CUDA and TRITON_INTERPRET=0"
)
TRITON_CPU = pytest.param("triton", marks=interpreter_only)
KERNEL_DEVICES = [pytest.param("cpu", marks=interpreter_only),
                  pytest.param("cuda", marks=compiled_cuda_only)]  # fmt: skip
"""Where the Triton kernels run: the interpreter on CPU tensors, or compiled on a GPU."""

# (leading dims of x, in, out, r): M = 1, sizes that are multiples of no block, r = 1 and
# r = 128, more rows than the fused regime takes (two-phase), leading dims.
SHAPES = [
    ((1,), 6, 42, 1),
    ((37,), 123, 42, 5),
    ((20,), 40, 30, 128),
    ((2, 3), 64, 17, 8),
    ((300,), 48, 40, 16),
    ((12,), 24, 20, 200),  # r above MAX_BLOCK_R: two-phase, the rank walked in slabs
]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().double() - ref.detach()).norm() / ref.detach().norm())


def make(lead, fan_in, fan_out, rank, dtype, bias=True, seed=0):
    """Fresh random operands with unit-scale outputs (never zeros: they hide unwritten tiles)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    x = rnd(*lead, fan_in)
    weight = rnd(fan_out, fan_in, std=fan_in**-0.5)
    down = rnd(rank, fan_in, std=fan_in**-0.5)
    up = rnd(fan_out, rank, std=rank**-0.5)
    b = rnd(fan_out) if bias else None
    return x, weight, down, up, b


def reference(x, weight, down, up, scale, bias=None, mask=None, p=0.0):
    """float64 `x Wᵀ + b + s (drop(x) Aᵀ) Bᵀ`, autograd-able, with an explicit keep-mask."""
    x, weight, down, up = (t.double() for t in (x, weight, down, up))
    xa = x if mask is None else x * mask.double() / (1 - p)
    y = x @ weight.t() + scale * (xa @ down.t()) @ up.t()
    return y if bias is None else y + bias.double()


def leaves(*tensors, weight_grad=False):
    """float64 and working-dtype copies of the operands that require grad."""
    out = []
    for i, t in enumerate(tensors):
        if t is None:
            out.append(None)
            continue
        wants = i != 1 or weight_grad
        out.append(t.detach().clone().requires_grad_(wants))
    return out


def check_op(lead, fan_in, fan_out, rank, dtype, backend, bias=True, weight_grad=False, scale=0.7):
    x, weight, down, up, b = make(lead, fan_in, fan_out, rank, dtype, bias)
    ours = leaves(x, weight, down, up, b, weight_grad=weight_grad)
    theirs = leaves(*(t.double() if t is not None else None for t in (x, weight, down, up, b)),
                    weight_grad=weight_grad)  # fmt: skip
    y = lora_linear(*ours[:4], scale=scale, bias=ours[4], backend=backend)
    y_ref = reference(*theirs[:4], scale, theirs[4])
    assert y.dtype == dtype and y.shape == (*lead, fan_out)
    assert rel(y, y_ref) < TOL[dtype]
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    for name, a, r in zip(("x", "weight", "down", "up", "bias"), ours, theirs, strict=True):
        if r is None or not r.requires_grad:
            assert a is None or a.grad is None, name
            continue
        assert a.grad is not None and a.grad.shape == a.shape, name
        assert rel(a.grad, r.grad) < TOL[dtype], name


@interpreter_only
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_forward_and_gradients(shape, dtype):
    check_op(*shape, dtype, backend="triton")


@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_torch_forward_and_gradients(shape):
    check_op(*shape, torch.float32, backend="torch")


@pytest.mark.parametrize("backend", [TRITON_CPU, "torch"])
def test_weight_and_bias_gradients_when_they_require_grad(backend):
    check_op((19,), 33, 21, 4, torch.float32, backend, bias=True, weight_grad=True)


@pytest.mark.parametrize("backend", [TRITON_CPU, "torch"])
def test_without_bias(backend):
    check_op((5,), 24, 40, 3, torch.float32, backend, bias=False)


@interpreter_only
@given(
    rows=st.integers(1, 40),
    fan_in=st.integers(1, 40),
    fan_out=st.integers(1, 40),
    rank=st.integers(1, 20),
    scale=st.floats(-2.0, 2.0, allow_nan=False).filter(lambda s: abs(s) > 1e-3),
)
def test_random_shapes_match_float64(rows, fan_in, fan_out, rank, scale):
    check_op((rows,), fan_in, fan_out, rank, torch.float32, "triton", scale=scale)


@pytest.mark.parametrize("backend", [TRITON_CPU, "torch"])
def test_non_contiguous_inputs_and_output_gradient(backend):
    x, weight, down, up, b = make((24,), 70, 36, 6, torch.float32)
    b = torch.stack([b, torch.randn_like(b)], dim=1)[:, 0]  # a strided bias (stride 2)
    assert not b.is_contiguous()
    x_wide = torch.randn(24, 140, dtype=torch.float32)
    x_wide[:, ::2] = x
    x_view = x_wide[:, ::2]  # stride 2 along in
    weight_view = weight.t().contiguous().t()  # column-major (out, in)
    down_view = down.t().contiguous().t()
    up_view = up.t().contiguous().t()
    assert not (x_view.is_contiguous() or weight_view.is_contiguous() or up_view.is_contiguous())
    ours = [t.clone().requires_grad_() for t in (x_view, down_view, up_view)]
    y = lora_linear(ours[0], weight_view, ours[1], ours[2], scale=1.3, bias=b, backend=backend)
    theirs = [t.double().requires_grad_() for t in (x, down, up)]
    y_ref = reference(theirs[0], weight, theirs[1], theirs[2], 1.3, b)
    assert rel(y, y_ref) < TOL[torch.float32]
    grad_t = torch.randn(36, 24, dtype=torch.float64)
    (y.t() * grad_t.float()).sum().backward()  # dy = grad_tᵀ: a transposed, strided gradient
    (y_ref.t() * grad_t).sum().backward()
    for a, r in zip(ours, theirs, strict=True):
        assert rel(a.grad, r.grad) < TOL[torch.float32]


def negative_view(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s values as a view whose memory holds their negatives: the imaginary part of a
    conjugate (`z.conj().imag`), which torch negates lazily (`is_neg()`)."""
    view = torch.complex(torch.zeros_like(tensor), -tensor).conj().imag
    assert view.is_neg() and torch.equal(view, tensor)
    return view


@pytest.mark.parametrize("backend", [TRITON_CPU, "torch"])
def test_negative_views_are_read_as_their_values(backend):
    """Operands and an output gradient that are negative views (`z.conj().imag`), whose memory
    holds the negated values: the kernels must not read that memory as it is."""
    x, weight, down, up, b = make((5,), 24, 12, 3, torch.float32)
    ours = [negative_view(t).requires_grad_() for t in (x, weight, down, up, b)]
    theirs = [t.double().requires_grad_() for t in (x, weight, down, up, b)]
    y = lora_linear(*ours[:4], scale=0.7, bias=ours[4], backend=backend)
    y_ref = reference(*theirs[:4], 0.7, theirs[4])
    assert rel(y, y_ref) < TOL[torch.float32]
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y.backward(negative_view(dy.float()))
    y_ref.backward(dy)
    for name, a, r in zip(("x", "weight", "down", "up", "bias"), ours, theirs, strict=True):
        assert rel(a.grad, r.grad) < TOL[torch.float32], name


LAYOUTS = ("contiguous", "transposed", "strided", "offset", "broadcast", "negative")


def laid_out(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """`tensor`'s values in another memory layout: its transpose stored (the last two axes
    swapped in memory), every other element of a wider buffer, a buffer that starts 3 elements
    in, a stride-0 broadcast (where `tensor` repeats its first row along the second-last
    axis), or a negative view (`negative_view`)."""
    if layout == "transposed" and tensor.ndim >= 2:
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":
        wide = torch.zeros(*tensor.shape[:-1], 2 * tensor.shape[-1], dtype=tensor.dtype)
        wide[..., ::2] = tensor
        return wide[..., ::2]
    if layout == "offset":
        flat = torch.zeros(tensor.numel() + 3, dtype=tensor.dtype)
        flat[3:] = tensor.flatten()
        return flat[3:].view(tensor.shape)
    if layout == "broadcast" and tensor.ndim >= 2:
        return tensor[..., :1, :].expand(tensor.shape)
    if layout == "negative":
        return negative_view(tensor)
    return tensor.clone()


@given(
    lead=st.sampled_from([(), (1,), (3,), (2, 3), (0,)]),
    fan_in=st.integers(1, 20),
    fan_out=st.integers(1, 20),
    rank=st.integers(1, 24),
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 6),
    wants=st.tuples(*[st.booleans()] * 5),
    scale=st.sampled_from([0.0, -0.7, 1.5]),
    bias=st.booleans(),
    backend=st.sampled_from(["triton", "torch"] if INTERPRETING else ["torch"]),
)
@settings(max_examples=12, deadline=None)
def test_any_layout_and_gradients_asked_for_match_float64(
    lead, fan_in, fan_out, rank, layouts, wants, scale, bias, backend
):
    """Any leading dims (none, or zero rows), sizes off every tile, a rank above min(in, out),
    every operand and the output gradient in any memory layout, and any set of operands
    requiring grad: the output and each gradient asked for match float64 (a broadcast operand
    takes the values it shows)."""
    values = make(lead, fan_in, fan_out, rank, torch.float32, bias)
    shown = [None if v is None else laid_out(v, layout)
             for v, layout in zip(values, layouts[:5], strict=True)]  # fmt: skip
    ours = [None if v is None else v.requires_grad_(want)
            for v, want in zip(shown, wants, strict=True)]  # fmt: skip
    theirs = [None if v is None else v.detach().double().requires_grad_(want)
              for v, want in zip(shown, wants, strict=True)]  # fmt: skip
    y = lora_linear(*ours[:4], scale=scale, bias=ours[4], backend=backend)
    y_ref = reference(*theirs[:4], scale, theirs[4])
    assert y.shape == (*lead, fan_out) and y.dtype == torch.float32
    assert torch.allclose(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    if not y_ref.requires_grad:
        return
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dy = laid_out(dy.float(), layouts[5])
    y.backward(dy)
    y_ref.backward(dy.double())
    for name, a, r in zip(("x", "weight", "down", "up", "bias"), ours, theirs, strict=True):
        if r is not None and r.requires_grad:
            assert a.grad is not None and a.grad.shape == a.shape, name
            assert torch.allclose(a.grad.double(), r.grad, rtol=1e-4, atol=1e-5), name


@pytest.fixture
def gemm_tiles(monkeypatch):
    """Run `lora_gemm_kernel` with one interpreter config of `TILES_N` N tiles per program."""

    def use(tiles: int) -> None:
        config = _lora_gemm._config(16, 16, 32, 2, 4, 1, tiles=tiles)
        monkeypatch.setattr(_lora_gemm.lora_gemm_kernel, "configs", [config])
        monkeypatch.setattr(_lora_gemm.lora_gemm_kernel, "cache", {})

    return use


@interpreter_only
@pytest.mark.parametrize("tiles", [1, 3])
@pytest.mark.parametrize("regime", ["two_phase", "fused"])
def test_every_tile_walk_matches_float64(gemm_tiles, monkeypatch, tiles, regime):
    """N tiles walked per program (the fused shrink computed on the first, reused by the rest),
    with a last group that runs past N: out = 70 is 5 tiles of 16, in = 40 is 3."""
    gemm_tiles(tiles)
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    check_op((33,), 40, 70, 6, torch.float32, "triton")


@interpreter_only
@pytest.mark.parametrize(
    ("shape", "dtype", "bias"),
    [
        (((33,), 40, 72, 6), torch.float32, True),  # 9 ragged tiles of 16 x 32, 3 programs
        (((3, 17), 64, 48, 40), torch.float16, False),  # r = 40: two t slabs in the epilogue
        (((1,), 8, 24, 1), torch.float32, True),  # one row, a K smaller than the tile
    ],
    ids=str,
)
@pytest.mark.parametrize("regime", ["persistent", "persistent_fused"])
def test_persistent_regimes_match_float64(
    persistent_calls, monkeypatch, shape, dtype, bias, regime
):
    """The persistent TMA GEMM, t from the shrink kernel or from its own K loop (items of two
    N tiles sharing it): forward (W read K-major) and dx (W read N-major), every gradient."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    check_op(*shape, dtype, "triton", bias=bias, weight_grad=True)
    assert len(persistent_calls) == 2  # the forward and the dx GEMM


@interpreter_only
@pytest.mark.parametrize(
    ("shape", "dtype", "y_tma"),
    [
        # 3 row blocks × 3 ragged N tiles of 32: the stores' halves clipped at 72 and 40
        (((33,), 40, 72, 6), torch.float16, [True, True]),
        # float32 after the K loop: by pointer
        (((33,), 40, 72, 6), torch.float32, [False, False]),
        # out = 21 fp16 is 42-byte rows: y by pointer (and dx, reading such dy, two-phase)
        (((12,), 40, 21, 6), torch.float16, [False]),
    ],
    ids=str,
)
@pytest.mark.parametrize("regime", ["persistent", "persistent_fused"])
def test_persistent_epilogue_stores_y_by_tma_where_it_can(
    persistent_calls, tma_constexprs, monkeypatch, shape, dtype, y_tma, regime
):
    """With the expand after the K loop (the epilogue form, and the fused shrink's), a 16-bit
    `y` leaves by TMA where its rows are 16-byte aligned, else (and in float32) by pointer:
    forward and dx against float64, every gradient."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    seen = tma_constexprs
    check_op(*shape, dtype, "triton", bias=True, weight_grad=True)
    assert [(c["EXPAND_FIRST"], c["SHRINK"]) for c in seen] == [
        (False, regime == "persistent_fused")] * len(y_tma)  # fmt: skip
    assert [c["Y_DESC"] for c in seen] == y_tma


@interpreter_only
@pytest.mark.parametrize("rank", [1, 6, 32])
@pytest.mark.parametrize("regime", ["persistent", "persistent_fused"])
def test_flattened_persistent_loop_matches_float64(
    persistent_calls, flattened, monkeypatch, rank, regime
):
    """The flattened configs' code (one N tile per item), which the pruner offers for
    r ≤ EPILOGUE_SLAB_R (the t slab unrolled after the K loop) and with the fused shrink (t in
    registers). The interpreter runs the loop unflattened: the flattening itself is the
    compiler's, checked by `make compile-check` and on a GPU."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    check_op((33,), 40, 72, rank, torch.float32, "triton", bias=True)
    assert len(persistent_calls) == 2


@interpreter_only
def test_persistent_fused_inference_stores_no_t(persistent_calls, monkeypatch):
    """No gradient needed: the fused shrink's t stays in registers (EMIT_T off)."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, "persistent_fused")
    x, weight, down, up, b = make((3, 11), 40, 72, 9, torch.float16)
    with torch.no_grad():
        y = lora_linear(x, weight, down, up, scale=0.7, bias=b)
    assert rel(y, reference(x, weight, down, up, 0.7, b)) < TOL[torch.float16]
    assert persistent_calls == [torch.Size([33, 40])]


@interpreter_only
def test_persistent_autotuning_sets_the_chosen_tile_on_every_call(persistent_calls, monkeypatch):
    """Two candidate tiles, a fake clock preferring the second: the pre-hook must give the
    descriptors that tile's box when tuning and on every later (cached) call."""
    kernel = _lora_gemm_tma.lora_gemm_tma_kernel
    small, tall = (_lora_gemm_tma._config(16, 32, 32, 2, 4, 1),
                   _lora_gemm_tma._config(32, 16, 16, 1, 4, 1))  # fmt: skip
    clock = itertools.cycle([2.0, 1.0])

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        return [next(clock)] * len(quantiles)

    monkeypatch.setattr(kernel, "configs", [small, tall])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "do_bench", fake_bench)
    for seed in (0, 1):
        x, weight, down, up, b = make((40,), 48, 56, 5, torch.float32, seed=seed)
        y = lora_linear(x, weight, down, up, scale=0.6, bias=b)
        assert rel(y, reference(x, weight, down, up, 0.6, b)) < TOL[torch.float32]
    assert list(kernel.cache.values()) == [tall]  # tuned on the first call, cached for the second
    assert len(persistent_calls) == 2


@interpreter_only
def test_persistent_regime_runs_two_phase_where_tma_cannot_read(persistent_calls):
    """out = 25 float32 rows are 100 bytes apart, not a multiple of TMA's 16: the dx GEMM (dy,
    weightᵀ) runs two-phase, the forward (in = 40: 160-byte rows) runs persistent."""
    check_op((9,), 40, 25, 4, torch.float32, "triton")
    assert persistent_calls == [torch.Size([9, 40])]


@pytest.mark.parametrize(
    ("x", "w", "ready"),
    [
        (torch.empty(8, 32), torch.empty(16, 32), True),
        (torch.empty(8, 32), torch.empty(32, 16).t(), True),  # an N-major W (the dx GEMM's)
        (torch.empty(8, 64)[:, ::2], torch.empty(16, 32), False),  # x strided along K
        (torch.empty(8, 33), torch.empty(16, 33), False),  # rows 132 B apart
        (torch.empty(8, 40)[:, 8:], torch.empty(16, 32), True),  # offset 32 B: aligned
        (torch.empty(8, 40)[:, 2:34], torch.empty(16, 32), False),  # offset 8 B
        (torch.empty(8, 32), torch.empty(16, 64)[:, ::2], False),  # W strided both ways
        (torch.empty(1, 32).expand(8, 32), torch.empty(16, 32), False),  # broadcast rows
        (torch.empty(8, 32), torch.empty(32, 1).expand(32, 16).t(), False),  # broadcast W
        (torch.empty(8, 24).half(), torch.empty(16, 24).half(), True),  # 48-byte rows
        (torch.empty(8, 20).half(), torch.empty(16, 20).half(), False),  # 40-byte rows
        (torch.empty(8, 24).half(), torch.empty(24, 20).half().t(), False),  # W columns 40 B
    ],
)
def test_tma_readiness(monkeypatch, x, w, ready):
    monkeypatch.setattr(_lora_gemm_tma, "INTERPRET", True)
    assert _lora_gemm_tma.tma_ready(x, w) is ready
    monkeypatch.setattr(_lora_gemm_tma, "INTERPRET", False)
    assert not _lora_gemm_tma.tma_ready(x, w)  # CPU tensors, compiled: no TMA


def test_measure_times_each_regime_once_per_key_and_keeps_the_fastest(monkeypatch):
    """LOWRANK_LORA_REGIME=measure, with a fake clock: the rule would say "fused" here."""
    timed = []

    def fake_time(fn):
        out = fn()
        timed.append(out)
        return {"fused": 2.0, "two_phase": 1.0, "persistent": 0.5, "persistent_fused": 0.7}[out]

    monkeypatch.setattr(_lora_triton, "_measurable", lambda x: True)
    monkeypatch.setattr(_lora_triton, "_time_ms", fake_time)
    monkeypatch.setattr(_lora_triton, "_measured_regimes", {})
    monkeypatch.setenv(_lora_triton.REGIME_ENV, "measure")
    x = torch.empty(8, 4)
    for _ in range(3):
        chosen = _lora_triton.resolve_regime(8, 16, "auto", x, ("key",), lambda name: name)
        assert chosen == "two_phase"
    assert timed == ["fused", "two_phase"]
    chosen = _lora_triton.resolve_regime(8, 16, "auto", x, ("tma",), lambda name: name, tma=True)
    assert chosen == "persistent"
    assert timed[2:] == ["fused", "persistent", "persistent_fused"]  # two-phase: not with TMA
    monkeypatch.setattr(_lora_triton, "_measurable", lambda x: False)  # e.g. a graph capture
    assert _lora_triton.resolve_regime(8, 16, "auto", x, ("key",), lambda name: name) == (
        "two_phase"
    )  # the measured choice, not the row-count rule's "fused"
    assert _lora_triton.resolve_regime(8, 300, "auto", x, ("big",), lambda name: name) == (
        "two_phase"
    )  # r > MAX_BLOCK_R without TMA: only two-phase applies, nothing timed
    assert _lora_triton.resolve_regime(8, 300, "auto", x, ("big",), lambda name: name,
                                       tma=True) == "persistent"  # likewise with TMA
    assert len(timed) == 5
    monkeypatch.setattr(_lora_triton, "_measurable", lambda x: True)
    chosen = _lora_triton.resolve_regime(8, 16, "auto", x, ("tma",), lambda name: name, tma=False)
    assert chosen == "two_phase"  # measured again: persistent cannot read these operands
    assert timed[5:] == ["fused", "two_phase"]
    monkeypatch.setenv(_lora_triton.REGIME_ENV, "fused")
    assert _lora_triton.resolve_regime(8, 16, "auto", x, ("key",), lambda name: name) == "fused"
    monkeypatch.setenv(_lora_triton.REGIME_ENV, "persistent")
    assert _lora_triton.resolve_regime(8, 16, "auto", x, ("key",), lambda name: name) == (
        "two_phase"
    )  # operands TMA cannot read
    monkeypatch.setenv(_lora_triton.REGIME_ENV, "persistent_fused")
    assert _lora_triton.resolve_regime(8, 16, "auto", x, ("key",), lambda name: name) == "fused"
    for tma in (True, False):
        with pytest.raises(ArgumentError, match="persistent_fused regime takes r <= 128"):
            _lora_triton.resolve_regime(8, 129, "auto", x, ("key",), lambda name: name, tma=tma)
    monkeypatch.setenv(_lora_triton.REGIME_ENV, "fast")
    with pytest.raises(ArgumentError, match="LOWRANK_LORA_REGIME"):
        _lora_triton.resolve_regime(8, 16, "auto", x, ("key",), lambda name: name)


@pytest.mark.parametrize("env", [None, "auto"])
def test_auto_is_a_fixed_rule_that_never_times(monkeypatch, env):
    """The rule, on a clock that must not run, even where timing would be possible."""
    if env is None:
        monkeypatch.delenv(_lora_triton.REGIME_ENV, raising=False)
    else:
        monkeypatch.setenv(_lora_triton.REGIME_ENV, env)
    monkeypatch.setattr(_lora_triton, "_measurable", lambda x: True)
    monkeypatch.setattr(_lora_triton, "_time_ms", lambda fn: pytest.fail("auto timed a regime"))
    x = torch.empty(8, 4)
    run = lambda name: pytest.fail("auto ran a regime to time it")  # noqa: E731
    assert (_lora_triton.FUSED_MAX_ROWS, _lora_triton.PERSISTENT_FUSED_MAX_ROWS) == (1024, 4096)
    assert _lora_triton.PERSISTENT_FUSED_MAX_RANK == 16
    expected = {  # (rows, rank, tma) -> regime, at and across each threshold
        (1, 1, False): "fused", (1024, 128, False): "fused", (1024, 128, True): "fused",
        (1024, 129, False): "two_phase", (1024, 129, True): "persistent",
        (1025, 16, False): "two_phase", (1025, 16, True): "persistent_fused",
        (4096, 16, True): "persistent_fused", (4097, 16, True): "persistent",
        (4096, 17, True): "persistent", (8192, 64, True): "persistent",
        (8192, 64, False): "two_phase", (10**6, 300, False): "two_phase",
    }  # fmt: skip
    for (rows, rank, tma), regime in expected.items():
        assert _lora_triton.resolve_regime(rows, rank, "auto", x, (), run, tma=tma) == regime
        assert _lora_triton.pick_regime(rows, rank, tma=tma) == regime
    with pytest.raises(ArgumentError, match="r <= 128"):
        _lora_triton.resolve_regime(8, 129, "fused", x, (), run)


@pytest.mark.parametrize("backend", [TRITON_CPU, "torch"])
def test_inference_skips_autograd_and_gives_the_same_output(backend):
    x, weight, down, up, b = make((2, 9), 40, 24, 4, torch.float32)
    down.requires_grad_()
    trained = lora_linear(x, weight, down, up, scale=0.5, bias=b, backend=backend)
    with torch.no_grad():
        inferred = lora_linear(x, weight, down, up, scale=0.5, bias=b, backend=backend)
    frozen = lora_linear(x, weight, down.detach(), up, scale=0.5, bias=b, backend=backend)
    assert trained.grad_fn is not None and inferred.grad_fn is None and frozen.grad_fn is None
    assert torch.equal(trained.detach(), inferred) and torch.equal(inferred, frozen)
    assert rel(inferred, reference(x, weight, down, up, 0.5, b)) < TOL[torch.float32]


def test_next_power_of_2_matches_triton():
    import triton

    assert [_lora_triton._next_power_of_2(n) for n in range(1, 3000)] == [
        triton.next_power_of_2(n) for n in range(1, 3000)
    ]


def test_empty_rows():
    x, weight, down, up, b = make((0,), 8, 5, 2, torch.float32)
    x.requires_grad_()
    y = lora_linear(x, weight, down.requires_grad_(), up, bias=b)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(down.grad, torch.zeros_like(down))


@pytest.mark.parametrize("lead", [(), (2, 3)])
def test_no_input_features_give_the_bias_in_any_batch_shape(lead):
    """`x (…, 0)`: as `F.linear`, the output is the bias in the batch shape; a 1-D or 3-D `x`
    raised torch's "cannot reshape tensor of 0 elements" (a 2-D one did not)."""
    x = torch.randn(*lead, 0, requires_grad=True)
    weight, down, up, bias = torch.randn(6, 0), torch.randn(2, 0), torch.randn(6, 2), torch.randn(6)
    y = lora_linear(x, weight, down, up, bias=bias)
    torch.testing.assert_close(y, F.linear(x.detach(), weight, bias), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_auto_backend_uses_torch_on_cpu_without_interpreter(monkeypatch):
    x, weight, down, up, _ = make((3,), 8, 5, 2, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert lora_module._resolve_backend("auto", x) is lora_module._lora_torch
    with pytest.raises(DeviceError, match="CUDA"):
        lora_linear(x, weight, down, up, backend="triton")
    y = lora_linear(x, weight, down, up, scale=0.5)
    assert rel(y, reference(x, weight, down, up, 0.5)) < TOL[torch.float32]


def test_float64_runs_the_torch_path_and_passes_gradcheck():
    x, weight, down, up, b = make((4, 3), 7, 5, 3, torch.float64)
    args = [t.requires_grad_() for t in (x, weight, down, up, b)]

    def op(x, weight, down, up, b):
        return lora_linear(x, weight, down, up, scale=0.8, bias=b, dropout_p=0.25, seed=11)

    assert torch.autograd.gradcheck(op, args)


# On the GPU: shapes that reach the tuned configs (decode with r = 128 in the fused regime, whose
# K loop also pipelines A tiles; the two-phase regime; ranks over MAX_BLOCK_R).
CUDA_SHAPES = [
    *SHAPES,
    ((16,), 2048, 1024, 128),
    pytest.param(((2, 64), 1000, 520, 64), marks=pytest.mark.exhaustive),
    pytest.param(((1024,), 1024, 768, 16), marks=pytest.mark.exhaustive),
    pytest.param(((300,), 512, 384, 256), marks=pytest.mark.exhaustive),
    ((2, 1000), 4096, 1536, 32),  # 2000 rows: the persistent kernel's large tiles, many waves
]


@compiled_cuda_only
@pytest.mark.parametrize("regime", ["auto", "fused", "two_phase", "persistent", "persistent_fused"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_compiled_kernels_on_cuda(request, monkeypatch, shape, dtype, regime):
    """Forward and every gradient: no worse than eager torch in the same dtype (or TOL)."""
    lead, fan_in, fan_out, rank = shape
    if regime in ("fused", "persistent_fused") and rank > _lora_gemm.MAX_BLOCK_R:
        pytest.skip("the fused regimes take r <= MAX_BLOCK_R")
    persistent = regime.startswith("persistent")
    calls = request.getfixturevalue("persistent_calls") if persistent else []
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    if regime != "auto":  # dx by the forced regime's GEMM at any row count
        monkeypatch.setenv(_lora_triton.BACKWARD_ENV, "separate")
    tensors = [t.cuda() for t in make(lead, fan_in, fan_out, rank, dtype)]
    ours = [t.clone().requires_grad_(i != 1) for i, t in enumerate(tensors)]
    eager = [t.clone().requires_grad_(i != 1) for i, t in enumerate(tensors)]
    theirs = [t.double().requires_grad_(i != 1) for i, t in enumerate(tensors)]
    y = lora_linear(*ours[:4], scale=0.7, bias=ours[4], backend="triton")  # float32: tf32x3
    if persistent:  # it ran wherever TMA can read the operands (else its pointer-kernel twin)
        x2d, weight = tensors[0].reshape(-1, fan_in), tensors[1]
        assert len(calls) == _lora_triton.tma_ready(x2d, weight)
    x, weight, down, up, b = eager
    y_eager = (x @ weight.t() + b) + 0.7 * (x @ down.t()) @ up.t()
    y_ref = reference(*theirs[:4], 0.7, theirs[4])
    assert torch.isfinite(y).all()
    assert rel(y, y_ref) <= max(2 * rel(y_eager, y_ref), TOL[dtype])
    dy = torch.randn(y.shape, dtype=torch.float64, device="cuda")
    for out in (y, y_eager, y_ref):
        out.backward(dy.to(out.dtype))
    for name, a, e, r in zip(("x", "weight", "down", "up", "bias"), ours, eager, theirs,
                             strict=True):  # fmt: skip
        if name == "weight":
            assert a.grad is None
            continue
        assert rel(a.grad, r.grad) <= max(2 * rel(e.grad, r.grad), TOL[dtype]), name


@compiled_cuda_only
@pytest.mark.parametrize(
    ("regime", "expand", "rank"),
    [
        ("persistent", "epilogue", 32),
        ("persistent", "first", 32),
        ("persistent", "first", 64),  # two unrolled slabs, flattened too
        ("persistent_fused", "epilogue", 32),
    ],
)
def test_every_kept_persistent_config_on_cuda(monkeypatch, regime, expand, rank):
    """Every config the pruner keeps for the persistent kernel, flattened ones included, run on
    the GPU while the autotuner times it, in a training step with dropout: each output of the
    forward and the dx GEMM (its adapter term masked) against float64, `y` filled with NaN
    before each run (256 items of 128 × 128, so programs walk several)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the persistent regimes need TMA (sm_90+)")
    kernel = _lora_gemm_tma.lora_gemm_tma_kernel
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    monkeypatch.setenv(_lora_triton.EXPAND_ENV, expand)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(_lora_triton, "_chosen_configs", {})
    gemm = {}
    launch = _lora_triton._persistent_gemm

    def kept_operands(x, w, a, b, t, bias, y, c, dropout, shrink_inside, first=False):
        gemm.update(x=x, w=w, a=a, b=b, t=t, bias=bias, y=y, c=c, dropout=dropout,
                    shrink=shrink_inside)  # fmt: skip
        return launch(x, w, a, b, t, bias, y, c, dropout, shrink_inside, first)

    def expected() -> torch.Tensor:
        """The GEMM's `y` in float64: `x wᵀ + bias + c · mask(t bᵀ)`, masks as the kernels
        draw them (on the shrink's input, or on the dx adapter term)."""
        x, w, a, b = (gemm[k].double() for k in "xwab")
        seed, p, where = gemm["dropout"]
        rows, cols = x.shape[0], (x.shape[1] if where == "in" else w.shape[0])
        mask = _lora_triton.keep_mask(seed, p, rows, cols, x.device).double()
        fused_t = (x * mask if where == "in" else x) @ a.t() if gemm["shrink"] else None
        t = fused_t if gemm["shrink"] else gemm["t"].double()
        adapter = gemm["c"] * t @ b.t()
        want = x @ w.t() + (adapter * mask if where == "out" else adapter)
        return want if gemm["bias"] is None else want + gemm["bias"].double()

    checked, errors, running = [], [], []
    for config in kernel.configs:  # the pre-hook runs inside each launch: it names the config
        def naming(nargs, hook=config.pre_hook):
            running.append({k: nargs[k] for k in ("BLOCK_M", "BLOCK_N", "FLATTEN", "TILES_N")})
            hook(nargs)

        monkeypatch.setattr(config, "pre_hook", naming)

    def checking_bench(kernel_call, quantiles):
        gemm["y"].fill_(float("nan"))  # a config that leaves tiles unwritten must not pass
        kernel_call()
        torch.cuda.synchronize()
        checked.append((gemm["dropout"][2], running[-1]))
        errors.append(rel(gemm["y"], expected()))
        return [1.0 + len(checked) * 1e-3] * len(quantiles)

    monkeypatch.setattr(_lora_triton, "_persistent_gemm", kept_operands)
    monkeypatch.setattr(kernel, "do_bench", checking_bench)
    x, weight, down, up, b = (t.cuda() for t in make((2048,), 1024, 2048, rank, torch.bfloat16))
    ours = [t.clone().requires_grad_() for t in (x, down, up)]
    y = lora_linear(ours[0], weight, ours[1], ours[2], 0.7, b, 0.1, 5, backend="triton")
    y.backward(torch.randn_like(y))
    assert {where for where, _ in checked} == {"in", "out"}  # forward and dx GEMMs tuned
    assert len(checked) > 2 and any(c["FLATTEN"] for _, c in checked), checked
    bad = [(c, e) for c, e in zip(checked, errors, strict=True)
           if not math.isfinite(e) or e >= TOL[torch.bfloat16]]  # fmt: skip
    assert not bad, bad


@compiled_cuda_only
def test_compiled_kernels_follow_the_operands_device():
    x, weight, down, up, b = (t.cuda() for t in make((33,), 64, 48, 8, torch.float16))
    with torch.cuda.device(0):
        y = lora_linear(x, weight, down, up, scale=0.5, bias=b)
    assert y.device == x.device
    assert rel(y, reference(x, weight, down, up, 0.5, b)) < TOL[torch.float16]


@pytest.mark.parametrize(("cols", "walks"), [(4096, True), (123, False), (1000, False)])
def test_programs_walk_several_n_tiles_only_where_every_tile_is_full(cols, walks):
    flags = {"BLOCK_R": 16, "SHRINK": True, "DROP_IN": False, "DROP_OUT": False, "SLAB_R": 16,
             "EXPAND_FIRST": False, "STATIC_SLABS": False}  # fmt: skip
    x = torch.empty(0, dtype=torch.bfloat16)
    named = {"m_bucket": 64, "x_ptr": x, "N": cols, "stride_wn": 1}
    kept = _lora_gemm._prune_gemm(_lora_gemm.GEMM_CONFIGS, named, **flags)
    assert any(c.kwargs["TILES_N"] > 1 for c in kept) == walks
    desc = _lora_gemm_tma.TensorDescriptor(x.new_empty(16, 16), [16, 16], [16, 1], [16, 16])
    tma_named = {"m_bucket": 4096, "N": cols, "x_desc": desc}
    y_tma = _lora_triton.y_by_tma(False, x.element_size())
    tma_kept = _lora_gemm_tma._prune_tma(_lora_gemm_tma.TMA_CONFIGS, tma_named, Y_DESC=y_tma,
                                         **flags)  # fmt: skip
    assert any(c.kwargs["TILES_N"] > 1 for c in tma_kept) == walks


@pytest.mark.parametrize("rows", [1, 16, 128, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("block_r", [16, 64, 128])
@pytest.mark.parametrize("shrink", [True, False])
def test_gpu_config_pruning_keeps_a_config_that_fits(rows, dtype, block_r, shrink):
    """The GPU candidate tiles, pruned as the autotuner will: never empty, within the budget."""
    x = torch.empty(0, dtype=dtype)
    named = {"m_bucket": max(16, rows), "x_ptr": x, "N": 4096, "stride_wn": 4096}
    slab = _lora_triton.slab_r(block_r, shrink)
    flags = {"BLOCK_R": block_r, "SHRINK": shrink, "DROP_IN": False, "DROP_OUT": False,
             "SLAB_R": slab}  # fmt: skip
    kept = _lora_gemm._prune_gemm(_lora_gemm.GEMM_CONFIGS, named, **flags)
    limit = _lora_gemm._smem_limit() - _lora_gemm._SMEM_MARGIN

    def check_tile(c, smallest: int) -> None:
        """Rows no larger than needed (or `smallest`), stages within shared memory, and
        several N tiles per program only with the fused shrink."""
        bm, bn, bk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        assert bm <= max(smallest, rows)
        stage = (bm * bk + bk * bn + (bk * block_r if shrink else 0)) * x.element_size()
        assert c.num_stages * stage <= limit
        assert c.kwargs["TILES_N"] == 1 or shrink

    assert kept
    for c in kept:
        check_tile(c, 16)
    tma_named = {"m_bucket": max(16, rows), "N": 4096, "x_desc": _lora_gemm_tma.TensorDescriptor(
        torch.empty(16, 16, dtype=dtype), [16, 16], [16, 1], [16, 16])}  # fmt: skip
    for first in (False, True):  # the persistent regime's expand after the K loop, or before
        # flattened: the fused shrink's t in registers, or unrolled t slabs: one (r ≤ 32) after
        # the K loop, at most two (r ≤ 64) before it; beyond that, no room on an H100
        flat_r = 64 if first and not shrink else 32
        static = not shrink and (block_r <= 128 if first else block_r <= slab)
        y_tma = _lora_triton.y_by_tma(first and not shrink, x.element_size())
        tma_flags = dict(flags, EXPAND_FIRST=first and not shrink, STATIC_SLABS=static,
                         Y_DESC=y_tma)  # fmt: skip
        tma_kept = _lora_gemm_tma._prune_tma(_lora_gemm_tma.TMA_CONFIGS, tma_named, **tma_flags)
        assert tma_kept and all(c.pre_hook is not None for c in tma_kept)
        for c in tma_kept:
            check_tile(c, 64)
            assert not c.kwargs["FLATTEN"] or (block_r <= flat_r and c.kwargs["TILES_N"] == 1)
        offered = block_r <= flat_r and rows >= 128 and dtype == torch.float16
        assert any(c.kwargs["FLATTEN"] for c in tma_kept) == offered  # fp32: no room
    rows_kept = _lora_gemm._prune_shrink(_lora_gemm.ROW_CONFIGS, named, BLOCK_R=block_r)
    assert rows_kept and all(c.kwargs["BLOCK_M"] <= max(16, rows) for c in rows_kept)
    reduce_named = {"g_ptr": torch.empty(0), "x_ptr": x}
    assert _lora_gemm._prune_reduce(_lora_gemm.REDUCE_CONFIGS, reduce_named, BLOCK_R=block_r)


# ---- errors -------------------------------------------------------------------------------


def good():
    return make((4,), 8, 6, 2, torch.float32)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(x=torch.randn(4, 9)), ShapeError, r"x must have shape \(\.\.\., 8\)"),
        (lambda a: a.update(x=torch.tensor(1.0)), ShapeError, "x must have shape"),
        (lambda a: a.update(weight=torch.randn(6, 8, 1)), ShapeError, "weight must have 2"),
        (lambda a: a.update(down=torch.randn(2, 9)), ShapeError, r"down must have shape \(r, 8\)"),
        (lambda a: a.update(down=torch.randn(2)), ShapeError, "down must have 2"),
        (lambda a: a.update(down=torch.randn(0, 8)), RankError, "rank r >= 1"),
        (lambda a: a.update(up=torch.randn(5, 2)), ShapeError, r"up must have shape \(6, 2\)"),
        (lambda a: a.update(up=torch.randn(6, 3)), RankError, "up has rank 3 but down has rank 2"),
        (lambda a: a.update(up=torch.randn(6)), ShapeError, "up must have 2"),
        (lambda a: a.update(bias=torch.randn(5)), ShapeError, r"bias must have shape \(6,\)"),
        (lambda a: a.update(x=torch.ones(4, 8, dtype=torch.int32)), DTypeError, "x must be a"),
        (lambda a: a.update(up=[[1.0]]), DTypeError, "up must be a torch.Tensor"),
        (lambda a: a.update(down=torch.randn(2, 8).double()), DTypeError, "down has dtype"),
        (lambda a: a.update(bias=torch.randn(6).half()), DTypeError, "bias has dtype"),
        (lambda a: a.update(scale=float("nan")), NonFiniteError, "scale must be finite"),
        (lambda a: a.update(scale=4e38), NonFiniteError, "beyond the range of torch.float32"),
        (lambda a: a.update(scale=2e38, dropout_p=0.5), NonFiniteError,
         r"scale 2e\+38 / \(1 − dropout_p 0\.5\) = 4e\+38 is beyond"),
        (lambda a: a.update(weight=a["weight"].to_sparse()), DTypeError,
         "weight must be a dense tensor, got layout torch.sparse_coo"),
        (lambda a: a.update(x=a["x"].to_sparse_csr()), DTypeError, "x must be a dense tensor"),
        (lambda a: a.update(x=torch.nested.nested_tensor([a["x"][:2], a["x"][:3]])), DTypeError,
         "x must be a dense tensor, got a nested tensor"),
        (lambda a: a.update(dropout_p=1.0), ArgumentError, r"dropout_p must be a number in \[0,"),
        (lambda a: a.update(dropout_p=-0.1), ArgumentError, "dropout_p"),
        (lambda a: a.update(dropout_p=0.1, seed=1.5), ArgumentError, "seed must be an integer"),
        (lambda a: a.update(dropout_p=0.1, seed=-1), ArgumentError, r"below 2\*\*63"),
        (lambda a: a.update(backend="cuda"), ArgumentError, "backend must be one of"),
    ],
)
def test_bad_arguments_raise_typed_errors(change, error, match):
    x, weight, down, up, b = good()
    kwargs = {"x": x, "weight": weight, "down": down, "up": up, "bias": b}
    change(kwargs)
    with pytest.raises(error, match=match):
        lora_linear(**kwargs)


def test_float64_on_triton_backend_is_a_dtype_error():
    x, weight, down, up, _ = make((3,), 8, 5, 2, torch.float64)
    with pytest.raises(DTypeError, match="Triton backend takes"):
        lora_linear(x, weight, down, up, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_are_a_device_error():
    x, weight, down, up, _ = good()
    with pytest.raises(DeviceError, match="up is on"):
        lora_linear(x, weight, down, up.cuda())


def test_errors_are_also_builtin_errors():
    x, weight, down, up, _ = good()
    with pytest.raises(ValueError):
        lora_linear(x, weight, down, up, dropout_p=2.0)
    with pytest.raises(TypeError):
        lora_linear(x.int(), weight, down, up)


def check_autocast(backend: str, dtype: torch.dtype, device: str = "cpu") -> None:
    """Under `torch.autocast`, float32 parameters meet a lower-precision `x` (as a previous
    autocast layer leaves it): the result has F.linear's autocast dtype, matches float64 on
    the cast operands, and the float32 factors get float32 gradients."""
    x, weight, down, up, b = (t.to(device) for t in make((23,), 40, 24, 4, torch.float32))
    down.requires_grad_()
    up.requires_grad_()
    with torch.autocast(device, dtype=dtype):
        y = lora_linear(x.to(dtype), weight, down, up, scale=0.7, bias=b, backend=backend)
        dense = torch.nn.functional.linear(x.to(dtype), weight, b)
    assert y.dtype == dense.dtype == dtype
    cast = [t.detach().to(dtype).double().requires_grad_() for t in (x, weight, down, up, b)]
    y_ref = reference(*cast[:4], 0.7, cast[4])
    assert rel(y, y_ref) < TOL[dtype]
    dy = torch.randn(y.shape, dtype=torch.float64, device=device)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    for ours, theirs in ((down, cast[2]), (up, cast[3])):
        assert ours.grad.dtype == torch.float32
        assert rel(ours.grad, theirs.grad) < TOL[dtype]


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        pytest.param("triton", torch.float16, marks=interpreter_only),
        ("torch", torch.float16),
        ("torch", torch.bfloat16),
    ],
)
def test_autocast_casts_the_operands_as_f_linear_does(backend, dtype):
    check_autocast(backend, dtype)


@compiled_cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_cuda(dtype):
    check_autocast("triton", dtype, device="cuda")


def test_mixed_dtypes_without_autocast_are_a_dtype_error():
    x, weight, down, up, _ = good()
    with pytest.raises(DTypeError, match="has dtype"):
        lora_linear(x.half(), weight, down, up)


def test_meta_tensors_give_a_meta_result():
    """Shape inference on the `meta` device (no autocast there to ask about)."""
    x, weight, down, up, b = (t.to("meta") for t in make((2, 5), 8, 6, 2, torch.float32))
    y = lora_linear(x, weight, down, up, 0.5, b)
    assert y.device.type == "meta" and y.shape == (2, 5, 6)


@interpreter_only
@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor:UserWarning")
def test_a_call_on_fake_tensors_leaves_later_real_calls_intact(monkeypatch):
    """The fused inference path keeps one stand-in for the unused `t` per device; a first call
    under FakeTensorMode (as torch.export makes) must not make that stand-in a fake tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv(_lora_triton.REGIME_ENV, "fused")
    fresh_cache = functools.cache(_lora_triton._cached_no_t.__wrapped__)  # no earlier stand-in
    monkeypatch.setattr(_lora_triton, "_cached_no_t", fresh_cache)
    x, weight, down, up, b = make((5,), 16, 8, 2, torch.float32)
    with FakeTensorMode() as mode, torch.no_grad():
        fake = [mode.from_tensor(t) for t in (x, weight, down, up, b)]
        with contextlib.suppress(Exception):  # the kernels cannot run on fake tensors
            lora_linear(*fake[:4], 0.5, fake[4], backend="triton")
    with torch.no_grad():
        y = lora_linear(x, weight, down, up, 0.5, b, backend="triton")
    assert rel(y, reference(x, weight, down, up, 0.5, b)) < TOL[torch.float32]


@pytest.mark.parametrize("value", [None, 1 + 2j, "2", torch.tensor([1.0, 2.0]), True, [2.0]])
@pytest.mark.parametrize("argument", ["scale", "dropout_p"])
def test_non_numbers_as_scale_or_dropout_are_argument_errors(argument, value):
    x, weight, down, up, _ = good()
    with pytest.raises(ArgumentError, match=argument):
        lora_linear(x, weight, down, up, **{argument: value})


@given(scale=st.one_of(st.integers(-5, 5), st.floats(-4, 4)),
       kind=st.sampled_from([int, float, "numpy"]))  # fmt: skip
def test_real_numbers_of_any_kind_are_taken_as_the_scale(scale, kind):
    import numpy as np

    x, weight, down, up, _ = good()
    value = np.float32(scale) if kind == "numpy" else kind(scale)
    y = lora_linear(x, weight, down, up, scale=value, backend="torch")
    assert rel(y, reference(x, weight, down, up, float(value))) < TOL[torch.float32]


def test_bfloat16_on_the_interpreter_is_refused_not_garbage(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    operands = [t.bfloat16() for t in good()[:4]]
    with pytest.raises(DTypeError, match="interpreter"):
        lora_linear(*operands, backend="triton")


def test_mask_of_a_0_d_tensor_is_a_shape_error():
    with pytest.raises(ShapeError, match="0-dimensional"):
        lora_dropout_mask(torch.tensor(1.0), 0.5, seed=0)


def test_cuda_float32_under_highest_precision_goes_to_cublas(monkeypatch):
    """The kernels' accurate float32 products ("tf32x3") spill registers: "auto" sends CUDA
    float32 under matmul precision "highest" to the torch path, and only there."""
    cuda_fp32 = types.SimpleNamespace(is_cuda=True, dtype=torch.float32)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert lora_module._exact_float32(cuda_fp32)
    assert not lora_module._exact_float32(types.SimpleNamespace(is_cuda=True,
                                                                dtype=torch.bfloat16))  # fmt: skip
    assert not lora_module._exact_float32(torch.empty(2, dtype=torch.float32))  # CPU
    assert _lora_triton._precision(torch.float32) == "tf32x3"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert not lora_module._exact_float32(cuda_fp32)
    assert _lora_triton._precision(torch.float32) == "tf32"


def test_tf32x3_configs_are_priced_for_their_larger_shared_memory():
    """A float32 "tf32x3" tile took up to 1.39× the shared memory of its "tf32" twin on
    sm_90a: the 128×128, 3-stage reduction tile fits in "tf32" and is dropped in "tf32x3"."""
    named = {"g_ptr": torch.empty(0), "x_ptr": torch.empty(0)}
    big = [c for c in _lora_gemm.REDUCE_CONFIGS if c.kwargs == {"BLOCK_M": 128, "BLOCK_K": 128}]
    candidates = [*big, _lora_gemm.REDUCE_CONFIGS[0]]
    flags = {"BLOCK_R": 16, "DROP": True}
    tf32 = _lora_gemm._prune_reduce(candidates, named, PRECISION="tf32", **flags)
    assert tf32[0].kwargs["BLOCK_M"] == 128
    kept = _lora_gemm._prune_reduce(candidates, named, PRECISION="tf32x3", **flags)
    assert [c.kwargs["BLOCK_M"] for c in kept] == [32]


@pytest.mark.parametrize(
    ("rows", "cols", "expected"),
    [(1, 4096, (16, 256)), (64, 14336, (56, 256)), (64, 100_000, (56, 1792)), (16, 100, (1, 256)),
     (65, 4096, (1, 4096)), (8, 700, (3, 256)), (16, 0, (1, 1))],
)  # fmt: skip
def test_k_splits_cover_the_columns_once_in_whole_units(rows, cols, expected):
    splits, per_split = _lora_triton.k_splits(rows, cols)
    assert (splits, per_split) == expected
    assert (splits - 1) * per_split <= cols <= splits * per_split


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("regime", ["fused", "two_phase", "persistent", "persistent_fused"])
def test_a_large_t_within_float16_does_not_overflow(monkeypatch, regime, device):
    """`t = x downᵀ = 32768` fits float16 but `c · t = 65536` does not: the expand must not
    round `c · t` (a massive activation channel, alpha / r = 2, dropout 0.5 making c = 4).
    The forward, and `dx` (whose `g = dy up` takes the same path; also in the one-pass
    backward), against float64."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    tma = device == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    if regime.startswith("persistent") and not tma:
        pytest.skip("the persistent regimes need TMA (sm_90+)")
    x = torch.zeros(4, 16, dtype=torch.float16, device=device)
    x[:, 0] = 2048.0
    weight = (torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 0.01).half()
    weight = weight.to(device)
    down = torch.zeros(3, 16, dtype=torch.float16, device=device)
    down[:, 0] = 16.0
    up = torch.full((8, 3), 1e-3, dtype=torch.float16, device=device)
    for p in (0.0, 0.5):
        mask = lora_dropout_mask(x, p, 3).double()
        dropped = x.double() * mask / (1 - p)
        adapter = (dropped @ down.double().t()) @ up.double().t()
        want = x.double() @ weight.double().t() + 2.0 * adapter
        with torch.no_grad():
            y = lora_linear(x, weight, down, up, scale=2.0, dropout_p=p, seed=3)
        assert torch.isfinite(y).all() and rel(y, want) < TOL[torch.float16], p
    dy = torch.full((4, 8), 4096.0, dtype=torch.float16, device=device)
    ones = torch.ones(8, 3, dtype=torch.float16, device=device)  # g = dy up = 32768: c · g
    small = torch.full((3, 16), 1e-3, dtype=torch.float16, device=device)  # is beyond float16
    g = dy.double() @ ones.double()
    want_dx = dy.double() @ weight.double() + 2.0 * g @ small.double()
    for backward in ("separate", "one_pass") if regime == "fused" else ("separate",):
        monkeypatch.setenv(_lora_triton.BACKWARD_ENV, backward)
        xr = x.clone().requires_grad_()
        lora_linear(xr, weight, small, ones, scale=2.0).backward(dy)
        assert torch.isfinite(xr.grad).all() and rel(xr.grad, want_dx) < TOL[torch.float16]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("regime", ["fused", "two_phase", "persistent", "persistent_fused"])
@pytest.mark.parametrize(
    ("scale", "t_size", "up_size"),
    [(4e4, 2**-6, 1.5),  # y: 2^⌈log₂ c⌉ · up ≈ 2^16 is beyond float16, y ≈ 2,000 is not
     (1.0, 2.0**17, 1e-3),  # y: t = 131072 is beyond float16, y ≈ 300 is not
     (3e4, 2.0**14, 2**-20)],  # dx: 2^15 · down = 2^26 is beyond float16, dx ≈ 70 is not
)  # fmt: skip
def test_the_scale_split_keeps_float16_operands_finite(
    monkeypatch, regime, device, scale, t_size, up_size
):
    """`c · t upᵀ` where `t` or `2^⌈log₂ c⌉ · up` is beyond float16 but the output is not:
    the power of two that moves `c` between the operands is chosen where neither overflows.
    The forward and `dx` (whose `c · g downᵀ` takes the same path), against float64."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    tma = device == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    if regime.startswith("persistent") and not tma:
        pytest.skip("the persistent regimes need TMA (sm_90+)")
    gen = torch.Generator().manual_seed(2)
    x = torch.zeros(4, 16, dtype=torch.float16)
    x[:, 0] = 8.0
    weight = (torch.randn(8, 16, generator=gen) * 0.01).half()
    down = torch.zeros(3, 16, dtype=torch.float16)
    down[:, 0] = t_size / 8  # every column of t = x downᵀ is t_size
    up = (torch.rand(8, 3, generator=gen) * 0.5 + 0.5).half() * up_size
    args = [v.to(device) for v in (x, weight, down, up)]
    want = x.double() @ weight.double().t() + scale * (x.double() @ down.double().t()) @ (
        up.double().t()
    )
    with torch.no_grad():
        y = lora_linear(*args, scale=scale)
    assert torch.isfinite(y).all() and rel(y.cpu(), want) < TOL[torch.float16]
    dy = torch.ones(4, 8, dtype=torch.float16, device=device) * 2**-4
    dyd = dy.double().cpu()
    want_dx = dyd @ weight.double() + scale * (dyd @ up.double()) @ down.double()
    for backward in ("separate", "one_pass") if regime == "fused" else ("separate",):
        monkeypatch.setenv(_lora_triton.BACKWARD_ENV, backward)
        xr = args[0].clone().requires_grad_()
        lora_linear(xr, *args[1:], scale=scale).backward(dy)
        assert torch.isfinite(xr.grad).all() and rel(xr.grad.cpu(), want_dx) < TOL[torch.float16]


@pytest.mark.parametrize(
    ("device", "dtype"),
    [pytest.param("cpu", torch.float32, marks=interpreter_only),
     pytest.param("cuda", torch.float32, marks=compiled_cuda_only),
     pytest.param("cuda", torch.bfloat16, marks=compiled_cuda_only)],
)  # fmt: skip
@pytest.mark.parametrize("regime", ["fused", "two_phase"])
@pytest.mark.parametrize("scale", [1e38, -1.5e38])
def test_a_scale_near_float32s_limit_gives_the_finite_answer(
    monkeypatch, regime, device, dtype, scale
):
    """A scale within float32's range whose outputs are finite (`|t upᵀ|` < 2): the forward
    and `dx` (`c · g down`) match float64, where the split `c = c_t · 2^⌈log₂ c⌉` put 2¹²⁷ on
    `up` (`down` in `dx`), whose entries beyond 2 became Inf, and the outputs Inf or NaN."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(6, 24, generator=gen) * 0.01, torch.randn(10, 24, generator=gen) / 5
    down, up = torch.randn(3, 24, generator=gen) * 4, torch.randn(10, 3, generator=gen) * 2.5
    args = [v.to(dtype).to(device) for v in (x, weight, down, up)]
    xr = args[0].clone().requires_grad_()
    y = lora_linear(xr, *args[1:], scale=scale)
    x, weight, down, up = (v.double().cpu() for v in args)
    want = x @ weight.t() + scale * (x @ down.t()) @ up.t()
    assert torch.isfinite(y).all() and rel(y.cpu(), want) < TOL[dtype]
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64) * 1e-3
    y.backward(dy.to(dtype).to(device))
    dy = dy.to(dtype).double()
    want_dx = dy @ weight + scale * (dy @ up) @ down
    assert torch.isfinite(xr.grad).all() and rel(xr.grad.cpu(), want_dx) < TOL[dtype]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("regime", ["fused", "two_phase"])
@pytest.mark.parametrize("scale", [1e-40, -5e-324])
def test_float16_takes_a_scale_below_float32s_normal_range(monkeypatch, regime, device, scale):
    """A finite scale below float32's smallest normal number (2⁻¹²⁶), which the float16 split
    reads the exponent of: the forward and `dx` match float64 (the adapter term below float16's
    subnormals), where the interpreter raised an InterpreterError (it holds such a Python
    float as a float64)."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    x, weight, down, up, b = (t.to(device) for t in make((5,), 24, 12, 3, torch.float16))
    x.requires_grad_()
    y = lora_linear(x, weight, down, up, scale=scale, bias=b)
    want = reference(x.detach().cpu(), weight.cpu(), down.cpu(), up.cpu(), scale, b.cpu())
    assert rel(y.cpu(), want) < TOL[torch.float16]
    dy = torch.randn(y.shape, dtype=torch.float16, generator=torch.Generator().manual_seed(1))
    y.backward(dy.to(device))
    want_dx = dy.double() @ weight.double().cpu() + scale * (dy.double() @ up.double().cpu()) @ (
        down.double().cpu()
    )
    assert rel(x.grad.cpu(), want_dx) < TOL[torch.float16]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("regime", ["fused", "two_phase", "persistent", "persistent_fused"])
def test_float16_extremes_of_the_scale_split(monkeypatch, regime, device):
    """Where the float16 split meets a zero, a tiny product or a non-finite entry, against
    float64: `c · t` of 1e-6 (a subnormal) under `up` ≈ 100 keeps float16's precision; a
    dropout of 1 − 1e-9 (`c` = 1e9, every `t` zero) leaves `x Wᵀ + b`; an Inf in `up`
    makes its own output column Inf and no other entry."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    tma = device == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    if regime.startswith("persistent") and not tma:
        pytest.skip("the persistent regimes need TMA (sm_90+)")
    gen = torch.Generator().manual_seed(0)
    x, down = torch.randn(8, 32, generator=gen), torch.randn(4, 32, generator=gen) * 2e-3
    up = torch.randn(16, 4, generator=gen) * 100.0
    half = [v.half().to(device) for v in (x, torch.zeros(16, 32), down, up)]
    exact = (half[0].double() @ half[2].double().t()) @ half[3].double().t() * 1e-4
    with torch.no_grad():
        assert rel(lora_linear(*half, scale=1e-4).double(), exact) < TOL[torch.float16]
        weight, bias = (torch.randn(16, 32, generator=gen) / 4).half(), torch.randn(16).half()
        half[1] = weight.to(device)
        y = lora_linear(*half, scale=1.0, bias=bias.to(device), dropout_p=1 - 1e-9, seed=1)
        base = half[0].double() @ weight.double().t().to(device) + bias.double().to(device)
        assert torch.isfinite(y).all() and rel(y.double(), base) < TOL[torch.float16]
        broken = half[3].clone()
        broken[2, 1] = float("inf")
        for scale in (0.5, 4e4):  # at 4e4 the split must move for the finite entries
            y = lora_linear(*half[:3], broken * (0.015 if scale > 1 else 1), scale=scale)
            bad = ~torch.isfinite(y)
            assert bad[:, 2].all() and bad.sum() == y.shape[0], scale


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("regime", ["fused", "two_phase", "persistent", "persistent_fused"])
def test_a_float16_row_that_overflows_leaves_its_tile_finite(monkeypatch, regime, device):
    """Scale 1024 and `up` = 2¹⁰: a row with `t = 2¹⁴` is beyond float16 (2³⁴) and no split
    fits the tile; the split put `c_b · B` past 65504 and every other row came out Inf, or
    NaN where its `t` was 0. Now only that row overflows; the others match float64."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    tma = device == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    if regime.startswith("persistent") and not tma:
        pytest.skip("the persistent regimes need TMA (sm_90+)")
    x = torch.zeros(4, 16)
    x[:, 0] = torch.tensor([2.0**-10, 2.0**14, 0.0, 2.0**-6])
    down = torch.zeros(2, 16)
    down[:, 0] = torch.tensor([1.0, 0.5])
    up = torch.full((8, 2), 2.0**10)
    half = [v.half().to(device) for v in (x, torch.zeros(8, 16), down, up)]
    exact = 1024.0 * (half[0].double() @ half[2].double().t()) @ half[3].double().t()
    with torch.no_grad():
        y = lora_linear(*half, scale=1024.0).double()
    assert not torch.isfinite(y[1]).any()
    assert torch.equal(y[[0, 2, 3]], exact[[0, 2, 3]].to(y.device))
    # dx: `c · g downᵀ` with `down` = 2¹⁰ and one row of `dy` whose own gradient overflows
    x = torch.full((4, 16), 2.0**-8, dtype=torch.float16, device=device, requires_grad=True)
    down = torch.full((2, 16), 2.0**10, dtype=torch.float16, device=device)
    up = torch.tensor([[1.0, 0.5]] * 8, dtype=torch.float16, device=device)
    dy = torch.zeros(4, 8, dtype=torch.float16, device=device)
    dy[0], dy[1] = 2.0**-10, 2.0**12
    for backward in ("separate", "one_pass") if regime == "fused" else ("separate",):
        monkeypatch.setenv(_lora_triton.BACKWARD_ENV, backward)
        x.grad = None
        lora_linear(x, half[1], down, up, scale=1024.0).backward(dy)
        want = 1024.0 * (dy.double() @ up.double()) @ down.double()
        assert not torch.isfinite(x.grad[1]).any()
        assert torch.equal(x.grad[[0, 2, 3]].double(), want[[0, 2, 3]]), backward


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("backward", ["separate", "one_pass"])
@pytest.mark.parametrize("rows", [40, 100])
def test_float16_weight_gradients_of_a_t_or_g_beyond_float16(monkeypatch, backward, rows, device):
    """`d_up = c dyᵀ t` where the float32 `t` (2¹⁷ in the later rows) is beyond float16 and
    `d_down = c gᵀ x` where `g = dy up` (2¹⁷ in the later rows) is, while both gradients are
    not: the kernels round `t` and `g` to float16 for the tensor cores, which made them Inf.
    Against float64, with the large rows after small ones (a later row block needs more
    room than the first) and in one and several one-pass row blocks."""
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, backward)
    large = torch.arange(rows) >= rows // 2
    x = torch.zeros(rows, 16)
    x[:, 0] = torch.where(large, 8.0, 2.0**-3)
    down = torch.zeros(3, 16)
    down[:, 0] = 2.0**14  # t = x downᵀ: 2¹⁷ in the large rows
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 0.01
    up = torch.full((8, 3), 2.0**-10)
    dy = torch.full((rows, 8), 2.0**-6) * (40 / rows)  # d_up = 40960
    half = [v.half().to(device) for v in (x, weight, down, up, dy)]
    leaves_ = [v.clone().requires_grad_() for v in half[:4]]
    lora_linear(*leaves_, scale=1.0).backward(half[4])
    xd, wd, dd, ud, dyd = (v.double().cpu() for v in half)
    assert torch.isfinite(leaves_[3].grad).all()
    assert rel(leaves_[3].grad.cpu(), dyd.t() @ (xd @ dd.t())) < TOL[torch.float16]
    # d_down: x small, dy large (g = dy up = 2¹⁷ in the large rows), down small
    x = torch.full((rows, 16), 2.0**-8 * (40 / rows))
    dy = torch.where(large[:, None], 2.0**14, 1.0).expand(rows, 8)
    up = torch.ones(8, 3)
    down = torch.full((3, 16), 2.0**-10)
    half = [v.half().to(device) for v in (x, weight, down, up, dy)]
    leaves_ = [v.clone().requires_grad_() for v in half[:4]]
    leaves_[1].requires_grad_(False)
    lora_linear(*leaves_, scale=1.0).backward(half[4])
    xd, wd, dd, ud, dyd = (v.double().cpu() for v in half)
    assert torch.isfinite(leaves_[2].grad).all()
    assert rel(leaves_[2].grad.cpu(), (dyd @ ud).t() @ xd) < TOL[torch.float16]
    assert rel(leaves_[0].grad.cpu(), dyd @ wd + (dyd @ ud) @ dd) < TOL[torch.float16]


def _float16_backward(monkeypatch, backward, operands, grads, scale=1.0):
    """`lora_linear`'s float16 backward of `dy` over float16 `(x, weight, down, up, dy)`,
    with grads on the operands at `grads`; asserts the backward took the path asked for."""
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, backward)
    ran = []
    launch = _lora_triton._one_pass_backward
    monkeypatch.setattr(_lora_triton, "_one_pass_backward", lambda *a: ran.append(1) or launch(*a))
    *inputs, dy = (v.half() for v in operands)
    leaves_ = [v.clone().requires_grad_(i in grads) for i, v in enumerate(inputs)]
    lora_linear(*leaves_, scale=scale).backward(dy)
    assert bool(ran) == (backward == "one_pass")
    return [v.grad for v in leaves_]


@pytest.mark.parametrize("backward", ["separate", "one_pass"])
@pytest.mark.parametrize("rows", [8, 100])
@interpreter_only
def test_float16_weight_gradients_scale_each_rank_alone(monkeypatch, backward, rows):
    """Rank 0 of `t` and `g` is 2³⁰ (beyond float16) in every other later row, rank 1 is
    2⁻¹⁰ in the other rows, in the same row blocks: each rank is scaled into float16 by its own
    power of two, so rank 1 keeps its value where a factor shared with rank 0 (2⁻¹⁶) flushed
    it to float16 zero (half of its gradient lost). Each entry against float64; rank 0 also
    has 1s in the earlier rows, so its running scale grows in a later row block."""
    idx = torch.arange(rows)
    late, odd = idx >= rows // 2, idx % 2 == 1
    big, early = late & ~odd, ~late
    # d_up = c dyᵀ t, t = x downᵀ: t[:, 0] = 2³⁰ (big rows), 1 (early rows); t[:, 1] = 2⁻¹⁰
    x = torch.stack([torch.where(big, 2.0**15, torch.where(early, 2.0**-15, 0.0)),
                     torch.where(big, 0.0, 2.0**-10)], dim=1)  # fmt: skip
    down = torch.tensor([[2.0**15, 0.0], [0.0, 1.0]])
    up = torch.full((4, 2), 2.0**-20)
    dy = torch.where(big, 2.0**-24, 1.0)[:, None].expand(rows, 4)
    operands = (x, torch.zeros(4, 2), down, up, dy)
    _, _, _, d_up = _float16_backward(monkeypatch, backward, operands, grads=(0, 3))
    xd, _, dd, _, dyd = (v.half().double() for v in operands)
    want = dyd.t() @ (xd @ dd.t())  # (nbig · 2⁶ + early rows, (rows − nbig) · 2⁻¹⁰)
    torch.testing.assert_close(d_up.double(), want, rtol=2.0**-10, atol=0.0)
    # d_down = c gᵀ x, g = dy up: g[:, 0] = 2³⁰ (big rows), 1 (early rows); g[:, 1] = 2⁻¹⁰
    dy = torch.stack([torch.where(big, 2.0**15, torch.where(early, 2.0**-15, 0.0)),
                      torch.where(big, 0.0, 1.0)], dim=1)  # fmt: skip
    up = torch.tensor([[2.0**15, 0.0], [0.0, 2.0**-10]])
    x = torch.where(big, 2.0**-24, 1.0)[:, None].expand(rows, 3)
    down = torch.full((2, 3), 2.0**-24)
    operands = (x, torch.zeros(2, 3), down, up, dy)
    _, _, d_down, _ = _float16_backward(monkeypatch, backward, operands, grads=(0, 2))
    xd, _, _, ud, dyd = (v.half().double() for v in operands)
    torch.testing.assert_close(d_down.double(), (dyd @ ud).t() @ xd, rtol=2.0**-10, atol=0.0)


@pytest.mark.parametrize("backward", ["separate", "one_pass"])
@pytest.mark.parametrize("rows", [8, 100])
@interpreter_only
def test_float16_weight_gradients_of_a_t_or_g_within_float16_are_unscaled(
    monkeypatch, backward, rows
):
    """A rank of `t` or `g` whose largest value is in [2¹⁵, 65504] fits float16 as it is: the
    weight gradients equal, bit for bit, torch's product of the float16-rounded `t` / `g`
    (float32 accumulation, exact here), where halving them first made the 2⁻²⁴ beside them
    2⁻²⁵, a float16 zero."""
    idx = torch.arange(rows)
    big = (idx >= rows // 2) & (idx % 2 == 0)
    sizes = torch.tensor([1024.0, 1250.0, 2047.0])[idx % 3]  # · 32: 32768, 40000, 65504
    # d_up = c dyᵀ t, t = x downᵀ: 32768 … 65504 in the big rows, 2⁻²⁴ in the others
    x = torch.stack([torch.where(big, sizes, 0.0), torch.where(big, 0.0, 2.0**-24)], dim=1)
    down = torch.tensor([[32.0, 1.0]])
    dy = torch.stack([torch.where(big, 2.0**-10, 0.0), torch.where(big, 0.0, 1.0)], dim=1)
    operands = (x, torch.zeros(2, 2), down, torch.full((2, 1), 2.0**-20), dy)
    _, _, _, d_up = _float16_backward(monkeypatch, backward, operands, grads=(0, 3))
    t = (x.half().float() @ down.half().float().t()).half().float()
    assert torch.equal(d_up, (dy.half().float().t() @ t).half())
    # d_down = c gᵀ x, g = dy up: 32768 … 65504 in the big rows, 2⁻²⁴ in the others
    dy = torch.stack([torch.where(big, sizes, 0.0), torch.where(big, 0.0, 2.0**-24)], dim=1)
    up = torch.tensor([[32.0], [1.0]])
    x = torch.stack([torch.where(big, 2.0**-10, 0.0), torch.where(big, 0.0, 1.0)], dim=1)
    operands = (x, torch.zeros(2, 2), torch.full((1, 2), 2.0**-20), up, dy)
    _, _, d_down, _ = _float16_backward(monkeypatch, backward, operands, grads=(0, 2))
    g = (dy.half().float() @ up.half().float()).half().float()
    assert torch.equal(d_down, (g.t() @ x.half().float()).half())


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("regime", ["fused", "two_phase"])
def test_a_float16_row_keeps_its_precision_beside_a_large_row(monkeypatch, regime, device):
    """The float16 split is chosen per tile: a row with `t = 2^13` beside rows of `t ≈ 2^-12`
    (all outputs normal float16s) must not move the small rows' `c · t` among the
    subnormals, which cost them 10× the error they have computed alone."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    gen = torch.Generator().manual_seed(3)
    x = torch.zeros(4, 16)
    x[:, :4] = torch.eye(4)  # t[m, r] = down[r, m]
    t = (torch.rand(4, 4, generator=gen) + 0.5) * 2**-12
    t[0] = 2.0**13
    down = torch.zeros(4, 16)
    down[:, :4] = t.t()
    up = (torch.rand(8, 4, generator=gen) + 0.5) * 0.5
    half = [v.half().to(device) for v in (x, torch.zeros(8, 16), down, up)]
    exact = (half[0].double() @ half[2].double().t()) @ half[3].double().t()
    with torch.no_grad():
        y = lora_linear(*half, scale=1.0).double()
    for row in range(1, 4):
        assert rel(y[row], exact[row]) < 1e-3, row


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("regime", ["fused", "persistent"])
@pytest.mark.parametrize("scale", [1 / 64, 1 / 3, 2 / 0.9])
def test_a_small_up_keeps_float16_precision(monkeypatch, regime, scale, device):
    """`up` near its zero start (entries ~1e-4) under a small scale: `c · up` would sit among
    float16's subnormals, so the scale must not be rounded into `up` there; nor may a scale
    that is no power of two add a rounding. Within float16's tolerance of float64 (the
    output itself ~1e-2)."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(32, 64, generator=gen) * 8).half()
    down = (torch.randn(16, 64, generator=gen) * 1.5).half()  # t ~ 100
    up = (torch.randn(48, 16, generator=gen) * 1e-4).half()
    weight = torch.zeros(48, 64, dtype=torch.float16)
    want = scale * (x.double() @ down.double().t()) @ up.double().t()
    if device == "cuda" and regime == "persistent" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the persistent regime needs TMA (sm_90+)")
    x, weight, down, up = (t.to(device) for t in (x, weight, down, up))
    with torch.no_grad():
        y = lora_linear(x, weight, down, up, scale=scale).cpu()
    assert rel(y, want) < 1e-3


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize(
    ("backend", "dtype", "device"),
    [("torch", torch.float64, "cpu"), pytest.param("triton", torch.float32, "cpu",
                                                   marks=interpreter_only),
     pytest.param("triton", torch.float32, "cuda", marks=compiled_cuda_only)],
)
def test_second_derivatives_match_float64(backend, dtype, device, p):
    """`create_graph=True` (a gradient penalty, a MAML inner step): the gradients of a penalty
    on every first gradient, against the same two derivatives of the formula in float64 with
    the mask `lora_dropout_mask` reports."""
    operands = make((6,), 16, 8, 3, dtype)
    x, weight, down, up, b = (t.to(device) for t in operands)
    mask = lora_dropout_mask(x, p, 11, backend=backend).double()

    def formula(x, weight, down, up, b):
        return x @ weight.t() + b + 0.5 * ((x * mask / (1 - p)) @ down.t()) @ up.t()

    def penalty_grads(f, operands):
        leaves = [t.detach().requires_grad_() for t in operands]
        first = torch.autograd.grad(f(*leaves).square().sum(), leaves, create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        return torch.autograd.grad(penalty, leaves)

    def ours(x, weight, down, up, b):
        return lora_linear(x, weight, down, up, scale=0.5, bias=b, dropout_p=p, seed=11,
                           backend=backend)  # fmt: skip

    got = penalty_grads(ours, (x, weight, down, up, b))
    want = penalty_grads(formula, [t.double() for t in (x, weight, down, up, b)])
    for name, g, w in zip(("x", "weight", "down", "up", "bias"), got, want, strict=True):
        assert rel(g, w) < 10 * TOL[dtype], name


@interpreter_only
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.exhaustive),
                                   torch.float16], ids=str)  # fmt: skip
def test_split_k_shrink_matches_float64(monkeypatch, dtype):
    """Two-phase with few rows, K split in units of 64 (256 by default; any multiple of the
    interpreter's BLOCK_K of 32 is valid): the shrink of x (in = 150: three splits, the last
    ragged) and of dy (out = 100: two) sum float32 partials; r = 140 takes two rank slabs."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, "two_phase")
    monkeypatch.setattr(_lora_triton, "_K_PER_SPLIT_UNIT", 64)
    assert _lora_triton.k_splits(20, 150) == (3, 64) and _lora_triton.k_splits(20, 100) == (2, 64)
    check_op((20,), 150, 100, 140, dtype, "triton")
    check_op((4, 5), 150, 100, 7, dtype, "triton")


@interpreter_only
@pytest.mark.parametrize("regime", ["fused", "persistent"])
def test_launches_reuse_the_autotuners_choice_without_asking_it_again(
    monkeypatch, regime, persistent_calls
):
    """The first launch per key goes through Triton's autotuner; later ones launch its choice
    directly (the persistent kernel's pre-hook still sets the descriptors' boxes), with the
    same result. A new candidate list (a test's, or a new tuning) sends it back to the tuner."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    monkeypatch.setattr(_lora_triton, "_chosen_configs", {})
    kernel = (_lora_gemm_tma.lora_gemm_tma_kernel if regime == "persistent"
              else _lora_gemm.lora_gemm_kernel)  # fmt: skip
    asked = []
    tune = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **k: asked.append(1) or tune(*a, **k))
    x, weight, down, up, b = make((3, 11), 40, 72, 9, torch.float16)
    expected = reference(x, weight, down, up, 0.7, b)
    with torch.no_grad():
        for _ in range(3):
            y = lora_linear(x, weight, down, up, scale=0.7, bias=b, backend="triton")
            assert rel(y, expected) < TOL[torch.float16]
    assert len(asked) == 1
    if regime == "persistent":
        assert len(persistent_calls) == 3
    copies = [_lora_gemm._with_stages(c, c.num_stages) for c in kernel.configs]
    monkeypatch.setattr(kernel, "configs", copies)
    with torch.no_grad():
        lora_linear(x, weight, down, up, scale=0.7, bias=b, backend="triton")
    assert len(asked) == 2


def test_the_rule_passes_over_a_fused_regime_that_has_only_a_fallback_tile(monkeypatch):
    """With the GPU's candidate tiles (on the H100's shared memory): the fused GEMM at 1024 rows
    has only its fallback for float32 at r = 128 (one of several such cases `make
    compile-check` reports), and real tiles for bf16 at r = 16; the rule then takes the
    unfused twin."""
    monkeypatch.setattr(_lora_gemm.lora_gemm_kernel, "configs", _lora_gemm.GEMM_CONFIGS)
    monkeypatch.setattr(_lora_gemm_tma.lora_gemm_tma_kernel, "configs",
                        _lora_gemm_tma.TMA_CONFIGS)  # fmt: skip
    monkeypatch.setattr(_lora_gemm, "_smem_limit", lambda: 232_448)
    _lora_triton._fused_fits.cache_clear()
    fits = functools.partial(_lora_triton._fused_fits, m_bucket=1024, out_features=4096,
                             w_n_major=False, drop_in=False, drop_out=False)  # fmt: skip
    try:
        assert not fits("fused", dtype=torch.float32, block_r=128, precision="tf32")
        assert fits("fused", dtype=torch.bfloat16, block_r=16, precision="tf32")
        assert fits("persistent_fused", dtype=torch.bfloat16, block_r=16, precision="tf32")
    finally:
        _lora_triton._fused_fits.cache_clear()
    never = lambda regime: False  # noqa: E731
    assert _lora_triton.pick_regime(16, 8, tma=False, fits=never) == "two_phase"
    assert _lora_triton.pick_regime(16, 8, tma=True, fits=never) == "persistent"
    assert _lora_triton.pick_regime(2048, 8, tma=True, fits=never) == "persistent"
    assert _lora_triton.pick_regime(16, 8, tma=True, fits=lambda regime: True) == "fused"
    assert _lora_triton.pick_regime(16, 8, "fused", fits=never) == "fused"  # forced: as it is


@pytest.mark.guarded
def test_shrink_fusable_declines_n_major_row_strides_off_16():
    w = torch.empty(42, 123, dtype=torch.float16)  # W (out, in): rows 246 B apart
    assert _lora_triton.shrink_fusable(w)  # the forward reads it K-major
    assert not _lora_triton.shrink_fusable(w.t())  # the dx GEMM's Wᵀ: N-major, 246 B rows
    assert _lora_triton.shrink_fusable(torch.empty(42, 128, dtype=torch.float16).t())
    assert not _lora_triton.shrink_fusable(torch.empty(42, 124, dtype=torch.float16).t())
    assert not _lora_triton.shrink_fusable(torch.empty(42, 120, dtype=torch.float16).t())
    assert not _lora_triton.shrink_fusable(torch.empty(42, 124, dtype=torch.float32).t())
    assert _lora_triton.shrink_fusable(torch.empty(42, 144, dtype=torch.float32).t())
    assert not _lora_triton.shrink_fusable(torch.empty(42, 144, dtype=torch.float16)[:, 1:].t())
    assert _lora_triton.shrink_fusable(torch.empty(42, 144, dtype=torch.float16)[:, 8:].t())


@pytest.mark.guarded
@pytest.mark.skipif(not (INTERPRETING or COMPILED_CUDA), reason="Triton: interpreter or CUDA")
@pytest.mark.parametrize(
    ("regime", "fan_in", "stored_transposed", "ran"),
    [
        ("fused", 128, False, ["fused", "fused"]),
        ("fused", 123, False, ["fused", "two_phase"]),  # the dx GEMM's Wᵀ: N-major, 246 B rows
        ("auto", 123, False, ["fused", "two_phase"]),  # the rule gives way alike
        ("fused", 120, False, ["fused", "two_phase"]),  # 240 B rows, a stride of 120 elements
        ("fused", 123, True, ["two_phase", "fused"]),  # W stored (in, out): N-major forward
    ],
)
def test_fused_regime_gives_way_where_w_is_n_major_with_a_row_stride_off_16(
    monkeypatch, regime, fan_in, stored_transposed, ran
):
    """fp16, 37 rows, out = 42 (84-byte rows): each GEMM whose weight operand is N-major with
    a row stride off 16 elements runs the unfused kernels, and every result is right (on an
    H100 the fused kernels faulted or returned a wrong dx at such shapes)."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, "separate")
    regimes = []
    launch = _lora_triton._gemm_in_regime
    monkeypatch.setattr(_lora_triton, "_gemm_in_regime",
                        lambda *a: regimes.append(a[7]) or launch(*a))  # fmt: skip
    x, weight, down, up, b = make((37,), fan_in, 42, 5, torch.float16)
    if stored_transposed:
        weight = weight.t().contiguous().t()
    check_tensors(x, weight, down, up, b)
    assert regimes == ran


def check_tensors(*tensors: torch.Tensor) -> None:
    """`lora_linear` (Triton) forward and the gradients of x, down, up and bias against
    float64, on the GPU where compiled kernels run, else on the CPU (the interpreter)."""
    device = "cuda" if COMPILED_CUDA else "cpu"
    dtype = tensors[0].dtype
    ours = [t.to(device).clone().requires_grad_(i != 1) for i, t in enumerate(tensors)]
    theirs = [t.to(device, torch.float64).requires_grad_(i != 1) for i, t in enumerate(tensors)]
    y = lora_linear(*ours[:4], scale=0.7, bias=ours[4], backend="triton")
    y_ref = reference(*theirs[:4], 0.7, theirs[4])
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y.backward(dy.to(device, dtype))
    y_ref.backward(dy.to(device))
    assert rel(y, y_ref) < TOL[dtype]
    for i in (0, 2, 3, 4):
        assert rel(ours[i].grad, theirs[i].grad) < TOL[dtype], i


@interpreter_only
def test_lora_linear_runs_the_unfused_twin_where_the_fused_tiles_do_not_fit(monkeypatch):
    monkeypatch.delenv(_lora_triton.REGIME_ENV, raising=False)
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, "separate")  # dx a GEMM at 9 rows too
    monkeypatch.setattr(_lora_triton, "_fused_fits", lambda *args: False)
    regimes = []
    launch = _lora_triton._gemm_in_regime
    monkeypatch.setattr(_lora_triton, "_gemm_in_regime",
                        lambda *a: regimes.append(a[7]) or launch(*a))  # fmt: skip
    check_op((9,), 40, 24, 5, torch.float32, "triton")  # 160- and 96-byte rows: TMA reads them
    assert regimes == ["persistent", "persistent"]  # the forward and the dx GEMM
    check_op((9,), 30, 22, 5, torch.float32, "triton")  # 120- and 88-byte rows: TMA cannot
    assert regimes[2:] == ["two_phase", "two_phase"]


@pytest.mark.parametrize("backend", [TRITON_CPU, "torch"])
def test_scale_zero_still_carries_non_finite_factors(backend):
    """`0 · NaN` is NaN: at scale 0 a NaN in `down` or an Inf in `up` reaches y, as the
    float64 formula (and the unfused adapter) has it, on every backend."""
    x, weight, down, up, b = make((4,), 16, 8, 2, torch.float32)
    down[0, 0] = math.nan
    expected = reference(x, weight, down, up, 0.0, b)
    for call in (lambda: lora_linear(x, weight, down, up, 0.0, b, backend=backend),
                 lambda: lora_linear(x, weight, down, up.requires_grad_(), 0.0, b,
                                     backend=backend)):  # fmt: skip
        y = call()
        assert torch.equal(torch.isnan(y), torch.isnan(expected))
        assert bool(torch.isnan(y).any())


@interpreter_only
@pytest.mark.parametrize("backward", ["separate", "one_pass"])
@pytest.mark.parametrize("regime", ["fused", "two_phase", "persistent_fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_an_inf_activation_gives_the_inf_of_the_formula(monkeypatch, regime, backward, dtype):
    """With every operand positive, an Inf in row 0 of `x` (or of `dy`) makes row 0 of `y`
    (of `dx`) +Inf in float64, and the other rows finite. The kernels that compute the shrink
    in their K loop pad the rank to `BLOCK_R` with zero columns of the factor, where `Inf · 0`
    is NaN: those columns must add nothing to the expand, which would make the row NaN."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, backward)
    x, weight, down, up = (t.abs() for t in make((5,), 16, 8, 3, dtype, bias=False)[:4])
    x[0, 1] = math.inf
    dy = torch.ones(5, 8, dtype=dtype)
    dy[0, 1] = math.inf
    ours = x.clone().requires_grad_()
    theirs = x.double().requires_grad_()
    y = lora_linear(ours, weight, down, up, 0.7, backend="triton")
    y_ref = reference(theirs, weight, down, up, 0.7)
    y.backward(dy)
    y_ref.backward(dy.double())
    for name, got, want in (("y", y, y_ref), ("dx", ours.grad, theirs.grad)):
        assert torch.equal(got[0], torch.full_like(got[0], math.inf)), name
        assert torch.equal(want[0], torch.full_like(want[0], math.inf)), name
        assert rel(got[1:], want[1:]) < TOL[dtype], name


@pytest.mark.parametrize("backend", [TRITON_CPU, "torch"])
def test_the_forward_op_without_t_recomputes_it_for_d_up(backend):
    """`lowrank::lora_linear_fwd` with `keep_t=False` keeps an empty stand-in; its backward
    recomputes `t` where `up` needs a gradient (opcheck runs every autograd path)."""
    x, weight, down, up, b = make((6,), 16, 8, 3, torch.float32)
    args = (x, weight, down, up.requires_grad_(), b, 0.7, 0.25, 5, None, False, backend)
    torch.library.opcheck(lora_linear_fwd, args)
    y, _ = lora_linear_fwd(*args)
    y.sum().backward()
    mask = (_lora_triton if backend == "triton" else _lora_torch).keep_mask(5, 0.25, 6, 16, "cpu")
    up_ref = up.detach().double().requires_grad_()
    reference(x, weight, down, up_ref, 0.7, b, mask, 0.25).sum().backward()
    assert rel(up.grad, up_ref.grad) < 1e-5
