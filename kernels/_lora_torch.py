"""Plain-torch LoRA linear: the CPU path, and the float64 path that gradcheck verifies.

Notation shared with `_lora_triton`: `x (M, in)`, `weight (out, in)`, `down (r, in)`,
`up (out, r)`, keep-mask `m (M, in)`, `c = scale / (1 − p)`, `t = (m ⊙ x) downᵀ (M, r)`:

    y       = x weightᵀ + bias + c · t upᵀ
    g       = dy up
    dx      = dy weight + c · m ⊙ (g down)
    d_down  = c · gᵀ (m ⊙ x)
    d_up    = c · dyᵀ t
    d_weight = dyᵀ x,  d_bias = Σ_rows dy

The mask comes from a `torch.Generator` seeded with `seed`: reproducible, but not the same
bits as the Triton kernels' Philox mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def keep_mask(seed: int, p: float, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """The `(rows, cols)` boolean keep-mask (each entry kept with probability `1 − p`)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand((rows, cols), generator=generator, device=device) >= p


def _masked(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    if p == 0:
        return x
    return x * keep_mask(seed, p, x.shape[0], x.shape[1], x.device).to(x.dtype)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    p: float,
    seed: int,
    keep_t: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`y (M, out)` and, if `keep_t`, `t (M, r)` in the input dtype."""
    t = _masked(x, seed, p) @ down.t()
    # addmm_, not `.add_(t @ up.t(), alpha=c)`: torch.compile (inductor, CPU, torch 2.13)
    # drops the alpha of an add onto a matmul's output.
    y = F.linear(x, weight, bias).addmm_(t, up.t(), alpha=scale / (1.0 - p))
    return y, t if keep_t else None


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    t: torch.Tensor | None,
    scale: float,
    p: float,
    seed: int,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients `(dx, d_weight, d_down, d_up, d_bias)`, each only where `needs` says so."""
    need_x, need_w, need_down, need_up, need_bias = needs
    c = scale / (1.0 - p)
    g = dy @ up if need_x or need_down else None
    dx = dy @ weight + c * _masked(g @ down, seed, p) if need_x else None
    d_down = c * (g.t() @ _masked(x, seed, p)) if need_down else None
    d_up = c * (dy.t() @ t) if need_up else None
    d_weight = dy.t() @ x if need_w else None
    d_bias = dy.sum(0) if need_bias else None
    return dx, d_weight, d_down, d_up, d_bias
