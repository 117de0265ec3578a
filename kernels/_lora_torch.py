"""Plain-torch LoRA linear: the CPU path, and the float64 path that gradcheck verifies.

Notation shared with `_lora_triton`: `x (M, in)`, `weight (out, in)`, `down (r, in)`,
`up (out, r)`, keep-mask `m (M, in)`, `c = scale / (1 − p)`, `t = (m ⊙ x) downᵀ (M, r)`:

    y       = x weightᵀ + bias + c · t upᵀ
    g       = dy up
    dx      = dy weight + c · m ⊙ (g down)
    d_down  = c · gᵀ (m ⊙ x)
    d_up    = c · dyᵀ t
    d_weight = dyᵀ x,  d_bias = Σ_rows dy

The mask is the Triton kernels' own, bit for bit: entry `(m, j)` is kept when word `j mod 4`
of Philox-4x32-10 keyed by the 64-bit `seed` at counter `(j div 4, m, 0, 0)`, made a uniform
float32 as `tl.uint_to_uniform_float` makes it, is at least `p` (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011), a test both decide in integers
(`keep_threshold`). The 32-bit words live in int64 tensors.
"""

from __future__ import annotations

import functools
import struct

import torch
import torch.nn.functional as F

_WORD = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key
_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10  # the largest s with (2**31 - 1) · s < 1 in float32
_CHUNK = 1 << 16  # mask entries built at a time: the int64 temporaries stay in cache


def _mul_hi_lo(multiplier: int, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32 bits of `multiplier · word` (both < 2**32). The product needs 64
    unsigned bits; int64 multiplication wraps modulo 2**64 and so keeps every one of them
    (the arithmetic shift's sign copies fall outside the high word's mask)."""
    product = word * multiplier
    return (product >> 32) & _WORD, product & _WORD


def _philox(seed: int, c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """The four output words of Philox-4x32-10 at counters `(c0, c1, 0, 0)`, key `seed`,
    stacked on a new last axis."""
    k0, k1 = seed & _WORD, (seed >> 32) & _WORD
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        high_b, low_b = _mul_hi_lo(_ROUND_B, c2)
        high_a, low_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + _KEY_A) & _WORD, (k1 + _KEY_B) & _WORD
    return torch.stack((c0, c1, c2, c3), dim=-1)


def _float32(value: float) -> float:
    """`value` rounded to the nearest float32 (ties to even), as a Python float."""
    return struct.unpack("f", struct.pack("f", value))[0]


@functools.cache
def keep_threshold(p: float) -> int:
    """The least int32 magnitude `m` (`x`, or `~x` for a negative word `x`) whose uniform
    float32 `f32(f32(m) · 4.6566127342e-10)` is at least `f32(p)`: keeping `m ≥ keep_threshold(p)`
    is keeping `uniform ≥ p`, decided without a float conversion per entry. 2**31 (nothing
    kept) if no int32 magnitude reaches it. The product of two float32 values is exact in a
    float64 (24 + 24 significant bits), so one rounding gives the float32 product."""
    target, scale = _float32(p), _float32(_UNIFORM_SCALE)
    low, high = 0, 1 << 31  # the answer lies in [low, high]
    while low < high:
        middle = (low + high) // 2
        if _float32(_float32(middle) * scale) >= target:
            high = middle
        else:
            low = middle + 1
    return low


def keep_mask(seed: int, p: float, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """The `(rows, cols)` boolean keep-mask (each entry kept with probability `1 − p`)."""
    mask = torch.empty((rows, cols), dtype=torch.bool, device=device)
    keep_min = keep_threshold(p)
    quads = torch.arange((cols + 3) // 4, dtype=torch.int64, device=device)
    step = max(1, _CHUNK // max(cols, 1))
    for start in range(0, rows, step):
        rows_index = torch.arange(start, min(start + step, rows), dtype=torch.int64,
                                  device=device)  # fmt: skip
        c0, c1 = torch.broadcast_tensors(quads[None, :], rows_index[:, None])
        words = _philox(seed, c0, c1).flatten(1)[:, :cols]  # column 4q + i: word i of quad q
        magnitude = torch.where(words >= 1 << 31, words ^ _WORD, words)  # x, or ~x if x < 0
        mask[start : start + step] = magnitude >= keep_min
    return mask


def _mask(x: torch.Tensor, seed: int, p: float) -> torch.Tensor | None:
    """The boolean keep-mask of the `(M, in)` activation `x`, or None without dropout."""
    if p == 0:
        return None
    return keep_mask(seed, p, x.shape[0], x.shape[1], x.device)


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`x` with its dropped entries 0, as the kernels select them (an Inf dropped is 0, not
    the NaN a multiplication by 0 would give)."""
    return x if mask is None else torch.where(mask, x, 0)


def _shrunk(x: torch.Tensor, down: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """`t = mask(x) downᵀ (M, r)`, the mask drawn from `seed`."""
    return _masked(x, _mask(x, seed, p)) @ down.t()


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
    t = _shrunk(x, down, seed, p)
    # addmm_, not `.add_(t @ up.t(), alpha=c)`: torch.compile (inductor, CPU, torch 2.13)
    # drops the alpha of an add onto a matmul's output. An alpha of 0 skips the product,
    # so scale 0 multiplies it instead: NaN/Inf in the factors still reach y, as in the
    # formula and the Triton kernels.
    y = F.linear(x, weight, bias)
    if scale == 0:
        return y.add_(torch.mm(t, up.t()).mul_(0.0)), t if keep_t else None
    return y.addmm_(t, up.t(), alpha=scale / (1.0 - p)), t if keep_t else None


def composite(
    x: torch.Tensor,
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    p: float,
    seed: int,
) -> torch.Tensor:
    """`y (M, out)` from out-of-place torch ops alone, which every autograd mode and
    `torch.func` transform (grad, vmap, jvp, jacrev, ...) differentiates and batches itself."""
    t = _shrunk(x, down, seed, p)
    if scale == 0:  # an alpha of 0 would skip the product and its NaN/Inf (see `forward`)
        return F.linear(x, weight, bias) + (t @ up.t()) * 0.0
    return torch.addmm(F.linear(x, weight, bias), t, up.t(), alpha=scale / (1.0 - p))


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
    """Gradients `(dx, d_weight, d_down, d_up, d_bias)`, each only where `needs` says so;
    `t` (needed for `d_up`) is recomputed where it is None. Every op is differentiable, so
    under `create_graph` (and with `t` recomputed) the gradients have second derivatives."""
    need_x, need_w, need_down, need_up, need_bias = needs
    c = scale / (1.0 - p)
    g = dy @ up if need_x or need_down else None
    recompute = need_up and t is None
    mask = _mask(x, seed, p) if need_x or need_down or recompute else None  # drawn once
    dx = dy @ weight + c * _masked(g @ down, mask) if need_x else None
    d_down = c * (g.t() @ _masked(x, mask)) if need_down else None
    if recompute:
        t = _masked(x, mask) @ down.t()
    d_up = c * (dy.t() @ t) if need_up else None
    d_weight = dy.t() @ x if need_w else None
    d_bias = dy.sum(0) if need_bias else None
    return dx, d_weight, d_down, d_up, d_bias
