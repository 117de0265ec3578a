"""`lora_linear` as `torch.library` custom ops, for graphs that torch.compile traces.

`lowrank::lora_linear_fwd` returns `(y, t)` and `lowrank::lora_linear_bwd` the five
gradients; the forward's autograd formula calls the backward op, and both have fake
implementations, so `torch.compile(fullgraph=True)` takes the whole layer, forward and
backward, as two opaque nodes (and inductor's CUDA graphs can capture the launches). Eager
calls do not come here: the dispatcher's Python path costs more per call than the
`autograd.Function` in `lora.py`, and nothing in eager mode needs it.

Conventions as in `_lora_torch` / `_lora_triton`: `x (M, in)`, `weight (out, in)`, `down
(r, in)`, `up (out, r)`, `bias (out,)` or None, `t (M, r)` (float32 from Triton, x's dtype
from torch; an empty `(0,)` stand-in when not kept). `backend` is "triton" or "torch".
Unneeded gradients come back as empty `(0,)` tensors (an op cannot return None).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.library import custom_op

from lowrank._checks import require_applied_scale

from . import _lora_torch


def _ops(backend: str) -> ModuleType:
    if backend == "torch":
        return _lora_torch
    from . import _lora_triton

    return _lora_triton


def _t_dtype(x: torch.Tensor, backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else x.dtype


def _seed(seed: int, seed_tensor: torch.Tensor | None) -> int:
    """The dropout seed: `seed_tensor` (an int64 scalar drawn inside a traced graph) if given."""
    return int(seed_tensor) if seed_tensor is not None else seed


@custom_op("lowrank::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    p: float,
    seed: int,
    seed_tensor: torch.Tensor | None,
    keep_t: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(y (M, out), t)`: `t (M, r)` if `keep_t`, else an empty stand-in. The scale is
    checked here, where its value is known (`lora_linear` checks it in eager calls)."""
    require_applied_scale(scale, x.dtype, p)
    y, t = _ops(backend).forward(
        x, weight, down, up, bias, scale, p, _seed(seed, seed_tensor), keep_t=keep_t
    )
    return y, t if t is not None else x.new_empty((0,), dtype=_t_dtype(x, backend))


@lora_linear_fwd.register_fake
def _(x, weight, down, up, bias, scale, p, seed, seed_tensor, keep_t, backend):
    t_shape = (x.shape[0], down.shape[0]) if keep_t else (0,)
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty(
        t_shape, dtype=_t_dtype(x, backend)
    )


@custom_op("lowrank::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    t: torch.Tensor,
    scale: float,
    p: float,
    seed: int,
    seed_tensor: torch.Tensor | None,
    needs: list[bool],
    backend: str,
) -> list[torch.Tensor]:
    """`[dx, d_weight, d_down, d_up, d_bias]`, each empty where `needs` says it is not due;
    `t` is the forward's (recomputed where it kept only the empty stand-in)."""
    kept = t if needs[3] and t.dim() == 2 else None
    grads = _ops(backend).backward(
        dy, x, weight, down, up, kept, scale, p, _seed(seed, seed_tensor), tuple(needs)
    )
    return [
        g.contiguous() if g is not None else dy.new_empty((0,))
        for g in grads
    ]


@lora_linear_bwd.register_fake
def _(dy, x, weight, down, up, t, scale, p, seed, seed_tensor, needs, backend):
    like = (x, weight, down, up, dy.new_empty((weight.shape[0],)))
    return [ref.new_empty(ref.shape) if need else dy.new_empty((0,))
            for ref, need in zip(like, needs, strict=True)]  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    x, weight, down, up, _, scale, p, seed, seed_tensor, _, backend = inputs
    ctx.save_for_backward(x, weight, down, up, output[1], seed_tensor)
    ctx.args = (scale, p, seed, backend)


def _backward(ctx, dy: torch.Tensor, _dt: torch.Tensor) -> tuple:
    x, weight, down, up, t, seed_tensor = ctx.saved_tensors
    scale, p, seed, backend = ctx.args
    needs = list(ctx.needs_input_grad[:5])
    grads = lora_linear_bwd(
        dy, x, weight, down, up, t, scale, p, seed, seed_tensor, needs, backend
    )
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)),
            None, None, None, None, None, None)  # fmt: skip


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
