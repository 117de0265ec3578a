"""CP decomposition of a conv kernel `(o, i, k₁, …)` by alternating least squares.

Memory-light: the matricised-tensor-times-Khatri–Rao products (MTTKRP) contract one of
the two channel modes first with a `(·, R)` factor, so no Khatri–Rao product of the
channel modes (`o·i × R`) is ever formed; the largest temporary is `R · max(o, i) · K`.
The initialisation takes eigenvectors of Gram matrices, never a full-matrices SVD of an
unfolding. Derivation in `docs/decompose.md` ("CP").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._checks import all_finite


def khatri_rao(factors: Sequence[torch.Tensor], rank: int, like: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product `(∏ k_j, R)` of `(k_j, R)` factors, first factor slowest."""
    product = torch.ones(1, rank, dtype=like.dtype, device=like.device)
    for factor in factors:
        product = (product.unsqueeze(1) * factor.unsqueeze(0)).reshape(-1, rank)
    return product


def _initial_factor(unfolding: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    """`(I, R)`: top eigenvectors of `unfolding (I, J)`'s Gram matrix, then random unit columns.

    With R ≤ I the R leading left singular vectors; with R > I all I of them (a basis) and
    R − I columns drawn from `generator` (CPU) and normalised.
    """
    size = unfolding.shape[0]
    _, vectors = torch.linalg.eigh(unfolding @ unfolding.T)
    leading = vectors[:, -min(rank, size) :].flip(-1)
    if rank <= size:
        return leading
    extra = torch.randn(size, rank - size, dtype=unfolding.dtype, generator=generator)
    extra = extra.to(unfolding.device)
    extra = extra / torch.linalg.vector_norm(extra, dim=0).clamp_min(1e-30)
    return torch.cat([leading, extra], dim=1)


def _solve(mttkrp: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """`mttkrp (I, R) @ gram⁻¹` for the symmetric `gram (R, R)`, with a rounding-level ridge.

    The ridge (≥ the smallest normal number) keeps an all-zero Gram matrix solvable; one
    still singular in rounding (a rank-deficient tensor at a larger rank: equal columns)
    takes the pseudo-inverse, the least-squares solution of least norm.
    """
    rank = gram.shape[0]
    info = torch.finfo(gram.dtype)
    ridge = (info.eps * gram.diagonal().sum() / rank).clamp_min(info.tiny)
    system = gram + ridge * torch.eye(rank, dtype=gram.dtype, device=gram.device)
    solution, failed = torch.linalg.solve_ex(system, mttkrp.T)
    if not bool(failed) and all_finite(solution):
        return solution.T
    return mttkrp @ torch.linalg.pinv(system, hermitian=True)


def _normalise(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm columns of `factor (I, R)` and the norms `(R,)` (zero columns left as they are)."""
    norms = torch.linalg.vector_norm(factor, dim=0)
    return factor / torch.where(norms > 0, norms, torch.ones_like(norms)), norms


def cp_als(
    tensor: torch.Tensor, rank: int, n_iter: int, tol: float, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rank-R CP of `tensor (o, i, *k)`: `weights (R,)` and unit-column factors.

    Factors are `[out (o, R), in (i, R), (k_j, R) per spatial axis]`. Runs at most
    `n_iter` ALS sweeps and stops once a sweep lowers the relative error by less than `tol`.
    ALS lowers the error at every sweep in exact arithmetic, but a rank-deficient tensor
    at a larger rank leaves the Gram matrices singular, and a sweep in rounding can then
    leap to large, cancelling components (a box filter at rank 4: from 2·10⁻⁷ to 8.4,
    components of norm 4·10⁷ for a tensor of norm 8.5), where the error estimate drowns in
    rounding too. A sweep whose components' squared norms sum beyond 1/√ε times the best
    sweep's (at least ‖T‖²) stops the run. The estimate (`_relative_error`) resolves errors
    down to about √(ε · Σw²/‖T‖²) only; below `_FLOOR` times that, or with such large
    components, the error is computed from the factors instead (`_exact_error`), so that
    the stop compares errors rather than rounding. Returns the sweep of least error.
    """
    out_features, in_features, *kernel = tensor.shape
    taps = math.prod(kernel)
    generator = torch.Generator().manual_seed(seed)
    # (o, i·K) and (o·K, i): the two layouts whose matmuls contract a channel mode first.
    unfold_out = tensor.reshape(out_features, -1)
    by_in = tensor.reshape(out_features, in_features, taps).transpose(1, 2)
    by_in = by_in.reshape(-1, in_features)
    # The out factor needs no start: the first update computes it from the others.
    factors = [torch.empty(0), _initial_factor(by_in.T, rank, generator)]
    for axis in range(len(kernel)):
        unfolding = tensor.movedim(2 + axis, 0).reshape(kernel[axis], -1)
        factors.append(_initial_factor(unfolding, rank, generator))
    norm2 = float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2
    root_eps = math.sqrt(torch.finfo(tensor.dtype).eps)
    floor, best_spread = _FLOOR * root_eps, math.inf
    error, least, best = math.inf, math.inf, None
    for _ in range(n_iter):
        spatial_kr = khatri_rao(factors[2:], rank, tensor)
        # out: Σ_{i,s} T[o,i,s] A_in[i,r] K[s,r], contracting i first.
        by_out = (by_in @ factors[1]).view(out_features, taps, rank)
        mttkrp = (by_out * spatial_kr).sum(1)
        factors[0], weights = _normalise(_solve(mttkrp, _gram_product(factors, 0)))
        # in: Σ_{o,s} T[o,i,s] A_out[o,r] K[s,r], contracting o first.
        by_rank = (factors[0].T @ unfold_out).view(rank, in_features, taps)
        mttkrp = torch.einsum("ris,sr->ir", by_rank, spatial_kr)
        factors[1], weights = _normalise(_solve(mttkrp, _gram_product(factors, 1)))
        mode = 1
        # spatial axes: Σ over channels and the other axes, from (R, K) = Σ_i by_rank A_in.
        per_tap = torch.einsum("ris,ir->rs", by_rank, factors[1]).view(rank, *kernel)
        for axis in range(len(kernel)):
            moved = per_tap.movedim(1 + axis, 1).reshape(rank, kernel[axis], -1)
            others = khatri_rao(factors[2 : 2 + axis] + factors[3 + axis :], rank, tensor)
            mttkrp = torch.einsum("rkx,xr->kr", moved, others)
            mode = 2 + axis
            factors[mode], weights = _normalise(_solve(mttkrp, _gram_product(factors, mode)))
        # unit columns: the weights are the components' norms
        spread = float(weights.double().square().sum()) / max(norm2, 1e-300)
        if best is not None and spread > max(1.0, best_spread) / root_eps:
            break  # a leap to cancelling components, beyond the best sweep's
        previous, error = error, _relative_error(norm2, mttkrp, factors, weights, mode)
        # the estimate's rounding grows with the components, as ε · Σ w²
        if spread > 1 / root_eps or error < floor * math.sqrt(max(1.0, spread)):
            error = _exact_error(tensor, norm2, factors, weights)
        if error < least:
            least, best, best_spread = error, (weights, list(factors)), spread
        if previous - error < tol:
            break
    return best if best is not None else (weights, factors)


# below this many √ε the estimated error is recomputed from the factors
_FLOOR = 16


def _exact_error(
    tensor: torch.Tensor, norm2: float, factors: Sequence[torch.Tensor], weights: torch.Tensor
) -> float:
    """‖T − [[w; A]]‖ / ‖T‖ from the tensor rebuilt in its dtype, `_ROWS` output rows at a
    time (so that no temporary exceeds `_ROWS · i·K`), the squares summed in float64."""
    rank = weights.shape[0]
    rows = tensor.reshape(tensor.shape[0], -1)
    inner = khatri_rao(factors[1:], rank, tensor).T
    outer = factors[0] * weights
    total = 0.0
    for start in range(0, rows.shape[0], _ROWS):
        rebuilt = outer[start : start + _ROWS] @ inner
        residual = rows[start : start + _ROWS] - rebuilt
        total += float(residual.square().sum(dtype=torch.float64))
    return math.sqrt(total / max(norm2, 1e-300))


# output rows rebuilt at a time by `_exact_error`
_ROWS = 64


def _gram_product(factors: Sequence[torch.Tensor], skip: int | None) -> torch.Tensor:
    """Hadamard product `(R, R)` of `AᵀA` over every factor but `factors[skip]` (all if None)."""
    grams = [f.T @ f for n, f in enumerate(factors) if n != skip]
    product = grams[0]
    for gram in grams[1:]:
        product = product * gram
    return product


def _relative_error(
    norm2: float,
    mttkrp: torch.Tensor,
    factors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    mode: int,
) -> float:
    """‖T − [[w; A]]‖ / ‖T‖ from the last MTTKRP of `mode`, without forming the tensor.

    `⟨T, X⟩ = Σ (mttkrp ∘ A_mode) w` and `‖X‖² = wᵀ (∏ AᵀA) w`.
    """
    inner = float((mttkrp * factors[mode] * weights).sum(dtype=torch.float64))
    grams = _gram_product(factors, None)
    model2 = float(weights @ grams @ weights)
    return math.sqrt(max(norm2 - 2 * inner + model2, 0.0) / max(norm2, 1e-300))
