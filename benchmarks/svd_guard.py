"""How far `decompose.svd`'s default lands from the Eckart–Young optimum, with and without the
randomised SVD's convergence check, over spectra from flat to steep.

For each matrix (float64, random singular vectors, the given singular values; a flat
spectrum is a Gaussian matrix) and rank r it records the error of `method="randomized"`
(always the sketch) and of the default `method="auto"` (the sketch only if its gap shows it
converged, else the exact SVD) as the excess over the optimal error, and the time.

    python benchmarks/svd_guard.py      # writes results/svd_guard-cpu.json
"""

from __future__ import annotations

import itertools
import time

import torch
from harness import write_results

from lowrank import decompose, recompose

SHAPES = ((320, 2880), (640, 640), (512, 1536))
SPECTRA = (("flat", 0.0), ("power", 0.3), ("power", 1.0), ("power", 2.0), ("geometric", 0.99),
           ("geometric", 0.95), ("geometric", 0.8))  # fmt: skip
RANKS = (8, 16, 64)


def matrix(rows: int, cols: int, kind: str, value: float, seed: int = 0) -> torch.Tensor:
    """`(rows, cols)` float64 with singular values i^-value ("power") or value^i
    ("geometric"), or a standard Gaussian matrix ("flat")."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "flat":
        return torch.randn(rows, cols, dtype=torch.float64, generator=generator)
    size = min(rows, cols)
    index = torch.arange(size, dtype=torch.float64)
    values = (index + 1) ** -value if kind == "power" else value**index
    left, _ = torch.linalg.qr(torch.randn(rows, size, dtype=torch.float64, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(cols, size, dtype=torch.float64, generator=generator))
    return (left * values) @ right.T


def excess(weight: torch.Tensor, rank: int, method: str) -> tuple[float, float]:
    """(error / optimal error − 1, seconds) of `decompose.svd(weight, rank, method=...)`."""
    optimal = float(torch.linalg.svdvals(weight)[rank:].norm())
    start = time.perf_counter()
    lora = decompose.svd(weight.float(), rank, method=method, seed=0)
    seconds = time.perf_counter() - start
    error = float((recompose(lora).double() - weight).norm())
    if optimal <= 1e-6 * float(weight.norm()):  # below float32's resolution of this matrix
        return 0.0, seconds
    return error / optimal - 1.0, seconds


def main() -> None:
    rows = []
    for (m, n), (kind, value), rank in itertools.product(SHAPES, SPECTRA, RANKS):
        weight = matrix(m, n, kind, value)
        row = {"rows": m, "cols": n, "spectrum": kind, "value": value, "rank": rank}
        for method in ("randomized", "auto"):
            row[f"excess_{method}"], row[f"seconds_{method}"] = excess(weight, rank, method)
        rows.append(row)
        print(f"{kind:9s} {value:<5g} {m}x{n} r={rank:<3d} excess randomized "
              f"{row['excess_randomized']:.2e}  auto {row['excess_auto']:.2e}")  # fmt: skip
    worst = {method: max(r[f"excess_{method}"] for r in rows) for method in ("randomized", "auto")}
    path = write_results("svd_guard", rows, {"worst_excess": worst})
    print(f"worst excess: {worst}; wrote {path}")


if __name__ == "__main__":
    main()
