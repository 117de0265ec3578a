"""Truncated SVD kernels for `lowrank.decompose.svd`: exact (LAPACK/cuSOLVER) and randomised.

The randomised SVD is the range finder with subspace iteration of Halko, Martinsson and
Tropp (2011, Algorithm 4.4) followed by an exact SVD of the small projected matrix; see
`docs/decompose.md` for its error guard.
"""

from __future__ import annotations

import torch

# "auto" uses the randomised SVD when the smaller side has at least this many entries ...
AUTO_MIN_SIDE = 256
# ... and the sketch is at most this fraction of the smaller side.
AUTO_MAX_SKETCH_FRACTION = 0.25
# A randomised rank-r result is kept when (σ̃_l / σ̃_r)^(4q+2) is at most this, l the sketch
# width and q the power steps (benchmarks/svd_guard.py: within 2.2e-4 of the optimum) ...
CONVERGED_GAP = 5e-3
# ... and the energy the tail beyond the sketch can still have pulled out of the top r
# directions is at most this share of the result's own squared error.
CONVERGED_LOSS = 1e-3


def converged(values: torch.Tensor, rank: int, n_iter: int, total: float) -> bool:
    """Whether a randomised sketch with Ritz values `values (l,)` (descending), found with
    `n_iter` power steps from a matrix of squared norm `total`, has settled its top `rank`
    directions, by two tests.

    The gap: `(σ̃_l / σ̃_r)^(4q+2) ≤ CONVERGED_GAP`, the rate at which subspace iteration
    shrinks the part of the top-r subspace it has not found. The tail: the energy left
    beyond the sketch, `T = total − Σ_{i≤l} σ̃_i²`, tilts direction i by about
    `T (σ̃_l/σ̃_i)^(4q) / (σ̃_i² (l − r − 1))` (l − r oversampling columns), which loses
    `T Σ_{i≤r} (σ̃_l/σ̃_i)^(4q) / (l − r − 1)` of the captured energy; that must stay under
    `CONVERGED_LOSS` times the result's squared error `total − Σ_{i≤r} σ̃_i²` (exact for
    a projection), so the error is within about half that share of the optimum. A long
    flat tail with few power steps fails the second test where it passes the first. A
    sketch as wide as the rank decides nothing (no gap to read), unless the matrix has no
    more directions."""
    if rank >= len(values):
        return False
    top = float(values[rank - 1])
    if top == 0.0:
        return True  # rank-deficient: every captured direction is exact
    last = float(values[-1])
    if (last / top) ** (4 * n_iter + 2) > CONVERGED_GAP:
        return False
    squares = values.double() ** 2
    error = max(total - float(squares[:rank].sum()), 0.0)
    if error <= (16 * torch.finfo(values.dtype).eps) ** 2 * total:
        return True  # exact to the working precision: nothing left to tilt toward
    tail = max(total - float(squares.sum()), 0.0)
    tilt = float(((last / values[:rank].double()) ** (4 * n_iter)).sum())
    return tail * tilt / max(len(values) - rank - 1, 1) <= CONVERGED_LOSS * error


def prefer_randomized(rows: int, cols: int, sketch: int) -> bool:
    """The "auto" rule: randomised iff `min(rows, cols) ≥ 256` and `sketch ≤ min/4`."""
    side = min(rows, cols)
    return side >= AUTO_MIN_SIDE and sketch <= AUTO_MAX_SKETCH_FRACTION * side


def exact_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of `matrix (m, n)`: `U (m, p)`, `S (p,)` descending, `Vh (p, n)`, p = min(m, n)."""
    return torch.linalg.svd(matrix, full_matrices=False)


def gaussian(shape: tuple[int, int], like: torch.Tensor, seed: int | None) -> torch.Tensor:
    """A standard normal `shape` matrix in `like`'s dtype and device.

    With an int `seed` it is drawn on the CPU from a private generator (the same numbers on
    every device); with None from torch's global generator.
    """
    if seed is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=like.dtype, generator=generator).to(like.device)


def randomized_svd(
    matrix: torch.Tensor, sketch: int, n_iter: int, seed: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`sketch` SVD of `matrix (m, n)` from a Gaussian sketch with `n_iter` power steps.

    Returns `U (m, l)`, `S (l,)`, `Vh (l, n)` with l = `sketch` ≤ min(m, n). `U S Vh` equals
    `Q Qᵀ matrix` for the orthonormal basis `Q (m, l)` found, so a truncation to the first r
    triplets has Frobenius error exactly `sqrt(‖matrix‖² − Σ_{i<r} S_i²)`.
    """
    basis, _ = torch.linalg.qr(matrix @ gaussian((matrix.shape[1], sketch), matrix, seed))
    for _ in range(n_iter):
        row_basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ row_basis)
    small_u, values, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ small_u, values, vh
