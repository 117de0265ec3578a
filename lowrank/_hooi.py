"""Tucker-2 of a 3-way tensor on its first two modes: HOSVD initialisation, then HOOI.

Works on `tensor (o, i, K)` (a conv weight with its kernel axes flattened) in whatever
float dtype and device it comes in. Each HOOI half-step keeps the top left singular
vectors of a projected unfolding, which maximises the core's norm for the other factor
fixed, so the error never increases; see `docs/decompose.md` ("Tucker2").
"""

from __future__ import annotations

import math

import torch

# The sweeps and the stopping tolerance `decompose.tucker2` runs HOOI with by default.
HOOI_SWEEPS = 50
HOOI_TOL = 1e-7


GRAM_SPREAD = 1e-3
"""Least `λ_rank / λ_1` of a Gram matrix formed in a float dtype below float64 whose kept
subspace is trusted. Rounding perturbs such a Gram matrix by about `eps · λ_1` (float32:
1.2e-7), so below that ratio a kept direction's angle error is no longer small next to its
singular value, and the Gram matrix is formed again in float64."""


def leading_left_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """An orthonormal basis `(m, rank)` of the top-`rank` left singular subspace of `matrix (m, n)`.

    Uses the eigenvectors of the smaller Gram matrix: `M Mᵀ (m, m)` when m ≤ n, otherwise
    `MᵀM (n, n)` mapped back through M and re-orthonormalised by QR. Where the kept singular
    values span more than `GRAM_SPREAD` in squares and `matrix` is below float64, the Gram
    matrix is formed and decomposed in float64, so that directions with singular values down
    to about float32's epsilon times the largest are still resolved. Needs rank ≤ min(m, n).
    """
    rows = matrix.shape[0]
    if rank == rows:
        return torch.eye(rows, dtype=matrix.dtype, device=matrix.device)
    basis, values = _gram_vectors(matrix, rank)
    if matrix.dtype != torch.float64 and not values[-rank] >= GRAM_SPREAD * values[-1]:
        basis, _ = _gram_vectors(matrix.double(), rank)
    return basis.to(matrix.dtype)


def _gram_vectors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`rank` left singular vectors `(m, rank)` of `matrix (m, n)` through the smaller
    Gram matrix, and that Gram matrix's eigenvalues (ascending)."""
    rows, cols = matrix.shape
    if rows <= cols:
        values, vectors = torch.linalg.eigh(matrix @ matrix.T)
        return vectors[:, -rank:].flip(-1), values
    values, vectors = torch.linalg.eigh(matrix.T @ matrix)
    basis, _ = torch.linalg.qr(matrix @ vectors[:, -rank:].flip(-1))
    return basis, values


def _mode_product(unfolding: torch.Tensor, factor: torch.Tensor, trailing: int) -> torch.Tensor:
    """`factorᵀ (r, a) @ unfolding (a, b·K)`, re-unfolded along b: `(b, r·K)`."""
    rank = factor.shape[1]
    projected = (factor.T @ unfolding).view(rank, -1, trailing)
    return projected.transpose(0, 1).reshape(-1, rank * trailing)


def hooi(
    tensor: torch.Tensor, r_out: int, r_in: int, n_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of `tensor (o, i, K)` at ranks `(r_out, r_in)`.

    Returns `u_out (o, r_out)` and `u_in (i, r_in)` with orthonormal columns and the core
    `(r_out, r_in, K)` = `tensor ×₀ u_outᵀ ×₁ u_inᵀ`. Runs at most `n_iter` HOOI sweeps after
    the HOSVD and stops once a sweep lowers the relative error by less than `tol`.
    Needs r_out ≤ min(o, r_in·K) and r_in ≤ min(i, r_out·K).
    """
    out_features, in_features, taps = tensor.shape
    unfold_out = tensor.reshape(out_features, -1)
    unfold_in = tensor.transpose(0, 1).reshape(in_features, -1)
    u_out = leading_left_vectors(unfold_out, r_out)
    u_in = leading_left_vectors(unfold_in, r_in)
    norm2 = float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2
    error = math.inf
    for _ in range(n_iter):
        if r_out < out_features:
            u_out = leading_left_vectors(_mode_product(unfold_in, u_in, taps), r_out)
        projected_in = _mode_product(unfold_out, u_out, taps)
        if r_in < in_features:
            u_in = leading_left_vectors(projected_in, r_in)
        core_norm = float(torch.linalg.vector_norm(u_in.T @ projected_in, dtype=torch.float64))
        previous, error = error, math.sqrt(max(norm2 - core_norm**2, 0.0) / max(norm2, 1e-300))
        if previous - error < tol:
            break
    core_in = u_in.T @ _mode_product(unfold_out, u_out, taps)
    core = core_in.view(r_in, r_out, taps).transpose(0, 1).contiguous()
    return u_out, core, u_in
