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


def leading_left_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """An orthonormal basis `(m, rank)` of the top-`rank` left singular subspace of `matrix (m, n)`.

    Uses the eigenvectors of the smaller Gram matrix: `M Mᵀ (m, m)` when m ≤ n, otherwise
    `MᵀM (n, n)` mapped back through M and re-orthonormalised by QR. For a `matrix` below
    float64 whose Gram matrix's rounding could matter (`gram_trusted`), the Gram matrix is
    formed and decomposed again in float64; a float64 `matrix` whose Gram matrix's rounding
    could matter keeps that basis only where what it leaves, measured, is what the
    truncation leaves (`_leaves_the_truncation`); else (kept directions below about √eps
    of the largest: a weight the rank holds exactly, with a steep spectrum) it takes the
    singular vectors of `matrix` itself (`_svd_vectors`), which keep them to eps. Needs
    rank ≤ min(m, n).
    """
    rows = matrix.shape[0]
    if rank == rows:
        return torch.eye(rows, dtype=matrix.dtype, device=matrix.device)
    basis, values = _gram_vectors(matrix, rank)
    if gram_trusted(values, rank, matrix.dtype):
        return basis
    if matrix.dtype == torch.float64:  # no wider Gram: the basis if measured optimal
        if _leaves_the_truncation(matrix, basis, values):
            return basis
        return _svd_vectors(matrix, rank)
    basis, _ = _gram_vectors(matrix.double(), rank)
    return basis.to(matrix.dtype)


def gram_trusted(values: torch.Tensor, rank: int, dtype: torch.dtype) -> bool:
    """Whether the top-`rank` eigenvectors of a Gram matrix formed in `dtype`, with
    eigenvalues `values` (ascending, `n` of them), lose nothing that matters to rounding.

    Rounding perturbs the Gram matrix by about `E = √n · eps · λ₁`. That moves the kept
    subspace by an angle of about `E / λ_r` toward directions of energy `λ_r`, adding about
    `E² / λ_r` to the squared error of the truncation, whose own squared error is the
    energy left out, `Σ_{i>r} λ_i`. Eigenvalues below `E` are rounding themselves, so the
    kept one counts as at least `E` and each left out one as `λ_i − E`. Trusted when the
    rounding's share stays under 1 % of the truncation's: `E² ≤ 0.01 · λ_r · Σ_{i>r} (λ_i −
    E)₊`. A decaying spectrum passes (σ_i ∝ 1/i at rank 64 of a 320-row float32 unfolding,
    by a factor of about 6,000); a weight that the rank holds almost exactly (a merged
    adapter extracted again) does not, and is worth the float64 pass.
    """
    values = values.double()
    largest = float(values[-1])
    if math.isnan(largest):
        return False
    if rank >= values.numel():  # the whole space: any orthonormal basis of it is exact
        return True
    if not largest > 0:
        return True
    noise = math.sqrt(values.numel()) * torch.finfo(dtype).eps * largest
    kept = max(float(values[-rank]), noise)
    left_out = float((values[:-rank] - noise).clamp_min(0).sum())
    return noise**2 <= 0.01 * kept * left_out


def _leaves_the_truncation(
    matrix: torch.Tensor, basis: torch.Tensor, values: torch.Tensor
) -> bool:
    """Whether `matrix (m, n)` projected on `basis (m, r)` leaves, measured, what its rank-r
    truncation leaves (`Σ_{i>r} (λ_i − E)₊` of its Gram eigenvalues `values`, ascending,
    with `E` their rounding as in `gram_trusted`) to 1 %, plus the rounding of `matrix`
    itself, `(√max(m, n) · eps · ‖M‖)²`. Where the rank holds `matrix` exactly, the
    untrusted Gram basis of a spectrum with no steep taper passes; one that lost kept
    directions to rounding leaves them (σ_r² ≫ the floor) and does not."""
    rank = basis.shape[1]
    eps = torch.finfo(matrix.dtype).eps
    largest = float(values[-1])
    noise = math.sqrt(values.numel()) * eps * largest
    left_out = float((values[:-rank].double() - noise).clamp_min(0).sum())
    total = float(torch.linalg.vector_norm(matrix)) ** 2
    floor = (math.sqrt(max(matrix.shape)) * eps) ** 2 * total
    residual = float(torch.linalg.vector_norm(matrix - basis @ (basis.T @ matrix))) ** 2
    return residual <= 1.01 * left_out + floor


def _svd_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-`rank` left singular vectors `(m, rank)` of `matrix (m, n)`, to the accuracy
    of its SVD: through the QR of its longer side (Householder, backward stable), whose
    small triangle `R` carries the same singular values. `M = (Q R)ᵀ = Rᵀ Qᵀ` has `Rᵀ`'s
    left singular vectors (m ≤ n); `M = Q R` has `Q` times `R`'s (m > n). About 4× faster
    than LAPACK's SVD of a 1280 × 11520 matrix on CPU
    (`benchmarks/results/tucker2_float64-cpu.json`)."""
    rows, cols = matrix.shape
    if rows <= cols:
        triangle = torch.linalg.qr(matrix.T).R
        return torch.linalg.svd(triangle.T).U[:, :rank]
    orthonormal, triangle = torch.linalg.qr(matrix)
    return orthonormal @ torch.linalg.svd(triangle).U[:, :rank]


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
