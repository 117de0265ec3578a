"""The algebra behind `decompose.resize` and `decompose.combine`: orthonormal bases of the
factors' spans and the small core they leave, never the dense ΔW.

A LoRA `up (m, r) @ down (r, n)` has QR factors `up = Q_u R_u`, `downᵀ = Q_d R_d`, so
`up @ down = Q_u (R_u R_dᵀ) Q_dᵀ` and the SVD of the small `R_u R_dᵀ` is, after `Q_u` and
`Q_d`, the SVD of the product. A Tucker2 leaves the core `R₁ ×₀ mid ×₁ R₂` the same way.
The derivations are in `docs/factor_tools.md`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._checks import all_finite
from ._hooi import HOOI_SWEEPS, HOOI_TOL, hooi
from .forms import LoRA, Tucker2, rounded_factors
from .rank_selection import energy_rank, ratio_rank

F64 = torch.float64


def binary_peak(tensor: torch.Tensor) -> float:
    """The power of two at or just below max |tensor| (1 for an all-zero tensor): what a
    factor is divided by, exactly, leaving entries below 2, so that products of factors
    neither overflow nor underflow the working dtype."""
    peak = float(tensor.abs().max()) if tensor.numel() else 0.0
    return math.ldexp(1.0, math.frexp(peak)[1] - 1) if peak > 0 else 1.0


def root(value: float, n: int) -> float:
    """`value^(1/n)` of a finite float `value ≥ 0`, its power of two rooted exactly:
    `value = m · 2^e` with `e = n q + s`, `0 ≤ s < n`, gives `2^q · (m · 2^s)^(1/n)`.

    `value ** (1/n)` raises to a rounded `1/n`, which is off by a relative `|ln value| · δ`
    (`δ` the rounding of `1/n`, about 1.9e-17 for n = 3): the n shares of a float64 peak
    near 1e300, multiplied back together, missed it by 3.9e-14. Here the power taken is of
    `m · 2^s < 2^(n−1)`, whose logarithm is below n, so the shares multiply back to
    `value` to within a few units in the last place whatever its magnitude."""
    if value == 0:
        return 0.0
    mantissa, exponent = math.frexp(value)  # value = mantissa · 2^exponent, mantissa in [½, 1)
    quotient, rest = divmod(exponent, n)
    return math.ldexp(math.ldexp(mantissa, rest) ** (1 / n), quotient)


def shared_peak(*peaks: float) -> float:
    """The geometric mean of `peaks` (products of powers of two), computed without forming
    their product: the magnitude each of the factors gets back, so that none of them holds
    more of it than another."""
    return math.prod(root(peak, len(peaks)) for peak in peaks)


@dataclass(frozen=True)
class LoRACore:
    """`up @ down = up_peak · down_peak · q_up @ u @ diag(values) @ vh @ q_downᵀ` with
    orthonormal `q_up (m, p_u)`, `q_down (n, p_d)` and the SVD `u (p_u, p)`, `values (p,)`
    descending, `vh (p, p_d)` of `R_u R_dᵀ` (the QR of the factors divided by their peaks),
    p = min(m, n, r); the scale is left out."""

    q_up: torch.Tensor
    u: torch.Tensor
    values: torch.Tensor
    vh: torch.Tensor
    q_down: torch.Tensor
    up_peak: float = 1.0
    down_peak: float = 1.0

    def log_norm(self, floor: float = 0.0) -> float:
        """log ‖up @ down‖_F (−inf for 0, or where the singular values' norm is at most
        `floor`: rounding noise), from the singular values and the peaks without forming
        their product, which can leave float64's range."""
        log_values = log_vector_norm(self.values)
        if log_values <= _log_product(floor):
            return -math.inf
        return log_values + _log_product(self.up_peak, self.down_peak)


def lora_core(lora: LoRA, dtype: torch.dtype) -> LoRACore:
    """QR of `up (m, r)` and `downᵀ (n, r)` (the kernel flattened into n = in·K) in `dtype`,
    each first divided by its largest |entry|, then the SVD of the `(min(m, r), min(n, r))`
    product of their R factors."""
    rank = lora.rank
    up = lora.up.reshape(lora.up.shape[0], rank).to(dtype)
    down = lora.down.reshape(rank, -1).to(dtype)
    up_peak, down_peak = binary_peak(up), binary_peak(down)
    q_up, r_up = torch.linalg.qr(up / up_peak)
    q_down, r_down = torch.linalg.qr(down.T / down_peak)
    u, values, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return LoRACore(q_up, u, values, vh, q_down, up_peak, down_peak)


def truncated_lora(core: LoRACore, rank: int, like: LoRA) -> LoRA:
    """The first `rank` triplets of `core` as a LoRA shaped, scaled and typed like `like`:
    `up = Q_u U_k √Σ_k`, `down = √Σ_k V_kᵀ Q_dᵀ` (Σ with the peaks back, one √ on each
    side), rounded by `forms.rounded_factors`."""
    root = core.values[:rank].clamp_min(0).sqrt()
    share = shared_peak(core.up_peak, core.down_peak)
    up = core.q_up @ (core.u[:, :rank] * root) * share
    down = (root[:, None] * core.vh[:rank]) @ core.q_down.T * share
    tail = (1,) * (like.up.ndim - 2)
    down, up = rounded_factors(
        down.reshape(rank, *like.down.shape[1:]),
        up.reshape(up.shape[0], rank, *tail),
        like.down.dtype,
        "the truncated LoRA",
    )
    return LoRA(down, up, like.scale)


@dataclass(frozen=True)
class TuckerCore:
    """`ΔW / scale = peaks · core ×₀ q_up ×₁ q_down` with orthonormal `q_up (out, p₁)`,
    `q_down (in, p₂)`, `core (p₁, p₂, K)` = `R₁ ×₀ mid ×₁ R₂` of the factors each divided by
    its largest |entry|, and `peaks` = those entries `(up, mid, down)`."""

    q_up: torch.Tensor
    core: torch.Tensor
    q_down: torch.Tensor
    peaks: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def log_norm(self) -> float:
        """log ‖ΔW / scale‖_F (−inf for 0), without forming the peaks' product."""
        return log_vector_norm(self.core) + _log_product(*self.peaks)


def log_vector_norm(tensor: torch.Tensor) -> float:
    """log ‖tensor‖ (−inf for 0), its peak divided out first (exactly, a power of two) so
    that no square underflows or overflows float64."""
    if not bool(tensor.any()):
        return -math.inf
    peak = binary_peak(tensor)
    norm = float(torch.linalg.vector_norm(tensor.double() / peak))
    return math.log(norm) + math.log(peak)


def _log_product(*factors: float) -> float:
    """log |Π factors|: −inf where one is 0."""
    if not all(factors):
        return -math.inf
    return math.fsum(math.log(abs(f)) for f in factors)


def relative_of_logs(log_gap: float, log_whole: float) -> float:
    """`relative` of two norms given by their logs (−inf for 0)."""
    if log_gap == -math.inf:
        return 0.0
    if log_whole == -math.inf or log_gap - log_whole > _LOG_MAX:
        return math.inf
    return math.exp(log_gap - log_whole)


_LOG_MAX = math.log(sys.float_info.max)


def tucker_core(tucker: Tucker2, dtype: torch.dtype) -> TuckerCore:
    """QR of `up (out, r₁)` and `downᵀ (in, r₂)` in `dtype`, each factor first divided by its
    largest |entry|, and the core they leave."""
    r_out, r_in = tucker.rank
    out_features, in_features = tucker.shape[:2]
    up = tucker.up.reshape(out_features, r_out).to(dtype)
    down = tucker.down.reshape(r_in, in_features).T.to(dtype)
    mid = tucker.mid.reshape(r_out, r_in, -1).to(dtype)
    peaks = (binary_peak(up), binary_peak(mid), binary_peak(down))
    q_up, r_up = torch.linalg.qr(up / peaks[0])
    q_down, r_down = torch.linalg.qr(down / peaks[2])
    core = torch.einsum("ap,pqk,bq->abk", r_up, mid / peaks[1], r_down)
    return TuckerCore(q_up, core, q_down, peaks)


def tucker_gap(exact: Tucker2, approx: Tucker2) -> float:
    """`‖ΔW(exact) − ΔW(approx)‖ / ‖ΔW(exact)‖` in float64 from the factors alone: the core
    norm of the Tucker2 whose factors stack both (`mid` block-diagonal, the second block
    times `−s'/s`), against `exact`'s own (0 where the forms are one object)."""
    if approx is exact:
        return 0.0
    a, b = exact.to(torch.float64), approx.to(torch.float64)
    if a.scale == 0:
        return relative_of_logs(_log_product(b.scale) + tucker_core(b, F64).log_norm(), -math.inf)
    (a_out, a_in), (b_out, b_in) = a.rank, b.rank
    mid = a.mid.new_zeros(a_out + b_out, a_in + b_in, *a.mid.shape[2:])
    mid[:a_out, :a_in] = a.mid
    mid[a_out:, a_in:] = b.mid * (-b.scale / a.scale)
    both = Tucker2(torch.cat([a.down, b.down]), mid, torch.cat([a.up, b.up], dim=1))
    return relative_of_logs(tucker_core(both, F64).log_norm(), tucker_core(a, F64).log_norm())


def tucker_limits(r_out: int, r_in: int, taps: int) -> tuple[int, int]:
    """`(r_out, r_in)` lowered to r_out ≤ r_in·K and r_in ≤ r_out·K: a larger inner rank of
    a Tucker2 with K taps only adds zero directions."""
    return min(r_out, r_in * taps), min(r_in, r_out * taps)


def _mode_bases(tensor: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For the two channel unfoldings of `tensor (o, i, K)`, `(o, i·K)` and `(i, o·K)`: their
    squared singular values (descending) and left singular vectors, as the eigenpairs of
    their Gram matrices `(o, o)` and `(i, i)`; `tensor` is scaled to a largest |entry| in
    [1, 2) (`tucker_ranks`), so that the Gram matrices neither overflow nor underflow."""
    unfold_out = tensor.reshape(tensor.shape[0], -1)
    unfold_in = tensor.transpose(0, 1).reshape(tensor.shape[1], -1)
    bases = []
    for matrix in (unfold_out, unfold_in):
        values, vectors = torch.linalg.eigh(matrix @ matrix.T)
        bases.append((values.flip(0).clamp_min(0), vectors.flip(1)))
    return bases


def kept_rank(values: torch.Tensor, criterion: str, value: float) -> int:
    """How many of the descending singular `values` a rule keeps: `("rank", r)` (capped at
    len(values)), `("energy", f)` or `("ratio", f)` (`rank_selection`), at least 1."""
    if criterion == "rank":
        return max(1, min(int(value), len(values)))
    if criterion == "energy":
        if value == 1.0:  # everything: no float sum of σ² decides where that is reached
            return len(values) if bool(values.any()) else 1
        total = float((values.double() ** 2).sum())
        return energy_rank(values, value, total) or len(values)
    return ratio_rank(values, value)


def _within(ranks: Sequence[int], shape: Sequence[int], square: bool) -> tuple[int, int]:
    """`ranks` at most the sides of `shape (o, i, K)` and within `tucker_limits`; with
    `square` both first raised to the larger, each side then keeping what it has room for."""
    r_out, r_in = (max(ranks),) * 2 if square else ranks
    return tucker_limits(min(r_out, shape[0]), min(r_in, shape[1]), shape[2])


def _energy_chain(
    energies: Sequence[torch.Tensor], fraction: float, shape: Sequence[int], square: bool
) -> list[tuple[int, int]]:
    """Candidate inner ranks for `energy=fraction`, growing from the per-mode ranks (each
    mode's smallest rank keeping `fraction` of its squared singular values `energies`: a lower
    bound, since a Tucker2 keeps no more than either mode's projection) to full ranks. With
    `square`, r, r + 1, …; otherwise one rank at a time, on the mode whose next direction
    carries more energy."""
    ranks = [kept_rank(e.sqrt(), "energy", fraction) for e in energies]
    chain = [_within(ranks, shape, square)]
    while True:
        if square:
            ranks = [max(ranks) + 1] * 2
            if ranks[0] > max(shape[:2]):
                return chain
        else:
            open_modes = [m for m in (0, 1) if ranks[m] < len(energies[m])]
            if not open_modes:
                return chain
            ranks[max(open_modes, key=lambda m: float(energies[m][ranks[m]]))] += 1
        step = _within(ranks, shape, square)
        if step != chain[-1]:
            chain.append(step)


def _first_keeping(
    tensor: torch.Tensor,
    chain: list[tuple[int, int]],
    bases: Sequence[torch.Tensor],
    fraction: float,
) -> tuple[int, int]:
    """The first ranks of `chain` whose HOOI keeps ≥ `fraction` of ‖tensor‖², given the
    channel modes' singular `bases (o, o)`, `(i, i)`.

    A Tucker2 with orthonormal factors keeps exactly ‖core‖², so each try is exact. The
    HOSVD at `(a, b)` keeps the `(a, b)` corner of `bases[0]ᵀ ×₀ tensor ×₁ bases[1]`, all
    read from one cumulative table, and HOOI, which starts there and never loses energy,
    keeps at least as much: the first entry where the HOSVD reaches the share bounds a
    bisection with HOOI below it, which ends on ranks whose predecessor in `chain` keeps less.
    """
    total = float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2
    needed = fraction * total
    u_out, u_in = bases
    projected = torch.einsum("oa,oik,ib->abk", u_out, tensor, u_in)
    table = projected.square().sum(-1).double().cumsum(0).cumsum(1)
    high = next(
        (j for j, (a, b) in enumerate(chain) if float(table[a - 1, b - 1]) >= needed),
        len(chain) - 1,
    )
    low = 0
    while low < high:
        middle = (low + high) // 2
        _, core, _ = hooi(tensor, *chain[middle], HOOI_SWEEPS, HOOI_TOL)
        if float(torch.linalg.vector_norm(core, dtype=torch.float64)) ** 2 >= needed:
            high = middle
        else:
            low = middle + 1
    return chain[high]


def tucker_ranks(
    tensor: torch.Tensor,
    criterion: str,
    value: float | tuple[int, int],
    *,
    square: bool = False,
) -> tuple[int, int]:
    """Inner ranks `(r_out, r_in)` for a Tucker2 of `tensor (o, i, K)`, at most its sides and
    within `tucker_limits`: `("rank", r)` or `("rank", (r_out, r_in))`; `("ratio", f)` per
    channel mode (σ_j ≥ f·σ₁ of that unfolding); `("energy", f)` the first ranks of
    `_energy_chain` whose HOOI keeps ≥ f of ‖tensor‖² (`_first_keeping`). With `square` both
    aim at one rank r, as kohya and LyCORIS store a Tucker; a side with fewer than r
    directions keeps what it has (`squared` pads it)."""
    shape = tensor.shape
    if criterion == "rank":
        wanted = value if isinstance(value, tuple) else (int(value),) * 2
        return _within(wanted, shape, square)
    # the rules are scale-free: divided by the power of two at its peak (exactly), the tensor
    # has Gram matrices and squared norms within float64 whatever its magnitude (a float64
    # fine-tune difference near 1e±170 has neither)
    tensor = tensor / binary_peak(tensor)
    energies, bases = zip(*_mode_bases(tensor), strict=True)
    if criterion == "ratio":
        return _within([kept_rank(e.sqrt(), criterion, value) for e in energies], shape, square)
    chain = _energy_chain(energies, float(value), shape, square)
    return _first_keeping(tensor, chain, bases, float(value))


def squared(tucker: Tucker2) -> Tucker2:
    """`tucker` with equal inner ranks r = max(r_out, r_in), as kohya and LyCORIS store a
    Tucker (`lora_mid (r, r, *k)`, r read from `lora_down`): the smaller side gets zero rows
    of `down` or zero columns of `up` and the matching zero slices of `mid`, so ΔW and the
    scale are unchanged."""
    r_out, r_in = tucker.rank
    rank = max(r_out, r_in)
    if r_out == r_in:
        return tucker
    down = torch.cat([tucker.down, tucker.down.new_zeros(rank - r_in, *tucker.down.shape[1:])])
    up_pad = tucker.up.new_zeros(tucker.up.shape[0], rank - r_out, *tucker.up.shape[2:])
    up = torch.cat([tucker.up, up_pad], dim=1)
    mid = tucker.mid.new_zeros(rank, rank, *tucker.mid.shape[2:])
    mid[:r_out, :r_in] = tucker.mid
    return Tucker2(down, mid, up, tucker.scale)


def split(coefficient: float) -> tuple[float, float]:
    """`(a, b)` with `a · b = |coefficient|`, for a product whose two sides share it: exactly
    `2^⌊e/2⌋` and `2^⌈e/2⌉` where `|coefficient| = 2^e` (multiplying by them rounds nothing),
    else `√|coefficient|` on each side (one rounding each)."""
    mantissa, exponent = math.frexp(abs(coefficient))  # |c| = mantissa · 2^exponent
    if mantissa == 0.5:  # |c| = 2^(exponent − 1)
        low = (exponent - 1) // 2
        return math.ldexp(1.0, low), math.ldexp(1.0, exponent - 1 - low)
    root = math.sqrt(abs(coefficient))
    return root, root


def concatenate(loras: Sequence[LoRA], coefficients: Sequence[float]) -> LoRA:
    """One LoRA with `ΔW = Σ c_i · up_i @ down_i` (the forms' own scales left out), whose scale
    is the largest `|c_i|` (1 if every `c_i` is 0): each block carries `k_i = c_i / scale`,
    `|k_i| ≤ 1`, split between `down` and `up` by `split` (exactly where `|k_i|` is a power
    of two, so blocks of equal coefficients keep their factors bit for bit), the sign on
    `up`. Up blocks go side by side, down blocks are stacked, so
    `up @ down = Σ_i k_i up_i down_i` block by block. All forms share shape, dtype, device."""
    scale = max((abs(c) for c in coefficients), default=0.0) or 1.0
    ups, downs = [], []
    for lora, coefficient in zip(loras, coefficients, strict=True):
        on_down, on_up = split(coefficient / scale)
        ups.append(lora.up * (on_up if coefficient >= 0 else -on_up))
        downs.append(lora.down * on_down)
    return LoRA(torch.cat(downs, dim=0), torch.cat(ups, dim=1), scale)


def relative_gap(exact: LoRA, approx: LoRA) -> float:
    """`‖ΔW(exact) − ΔW(approx)‖ / ‖ΔW(exact)‖` in float64 from the factors alone: the
    singular values of the LoRA whose blocks are both forms, with scales `s` and `−s'`
    (0 where the two hold the same `down` and `scale · up`, inf where `exact` is 0 and
    `approx` is not). float64 resolves ‖ΔW(exact)‖ only down to its rounding noise, about
    eps times the sum of its rank-1 terms' norms; below `NOISE_FLOOR` times that (a sum of
    terms that cancel, as `A − A`), a norm counts as 0, the reference's and the gap's alike.
    Norms are combined as logarithms, so no product of peaks and scales leaves float64."""
    loras = [exact.to(torch.float64), approx.to(torch.float64)]
    scaled = [lora.up * lora.scale for lora in loras]
    if (
        torch.equal(loras[0].down, loras[1].down)
        and torch.equal(*scaled)
        and all(all_finite(t) for t in scaled)
    ):
        return 0.0
    difference = concatenate(loras, [exact.scale, -approx.scale])
    log_whole = _resolved_log_norm(loras[0], floored=True) + _log_product(exact.scale)
    # the gap counts as 0 within rounding noise only beside a reference that does too
    floored = log_whole == -math.inf
    log_gap = _resolved_log_norm(difference, floored) + _log_product(difference.scale)
    return relative_of_logs(log_gap, log_whole)


def _resolved_log_norm(lora: LoRA, floored: bool) -> float:
    """log ‖up @ down‖_F of a float64 LoRA; with `floored`, −inf where it is within
    float64's rounding noise of 0: at most `NOISE_FLOOR` times the sum of its rank-1 terms'
    norms (terms that cancel, as the blocks of `A − A` do)."""
    core = lora_core(lora, F64)
    if not floored:
        return core.log_norm()
    up = lora.up.reshape(-1, lora.rank) / core.up_peak
    down = lora.down.reshape(lora.rank, -1) / core.down_peak
    terms = float((up.norm(dim=0) * down.norm(dim=1)).sum())
    return core.log_norm(floor=NOISE_FLOOR * terms)


NOISE_FLOOR = 64 * torch.finfo(torch.float64).eps
"""Norms below this share of their terms' are rounding noise in float64 (measured: ≈ 1·eps)."""


def relative(gap: float, whole: float) -> float:
    """`gap / whole`, the relative error of a difference of norm `gap` against a reference of
    norm `whole`: 0 where the two agree, inf where only the reference is 0."""
    if gap == 0:
        return 0.0
    return gap / whole if whole > 0 else math.inf
