"""Tucker2 of float64 weights: time and error of `decompose.tucker2` where the Gram matrix's
rounding can hide kept directions, against the Gram basis alone (every float64 Gram trusted,
as before the check), in one process; and the singular vectors of an unfolding through the
QR's small triangle (`_hooi._svd_vectors`) against LAPACK's SVD of the whole unfolding.

Weights: 320 → 320 3×3 float64 at rank 32: random; exact Tucker rank 32; exact rank with a
core graded to 1e-12 on both channel modes; exact rank plus noise of 1e-9. And 16 → 16 3×3
of exact Tucker rank 5 whose core falls by 10³ per index on both modes, at rank 5 (its
smallest kept directions below √eps₆₄, where the Gram basis loses them).

    python benchmarks/tucker2_float64.py      # writes results/tucker2_float64-cpu.json
"""

from __future__ import annotations

from unittest import mock

import torch
from harness import interleaved_ms, relative_error, write_results

from lowrank import _hooi, decompose, recompose

SIZE, RANK = 320, 32


def weights() -> dict[str, tuple[torch.Tensor, int]]:
    """`{name: (weight, rank)}`: the four `(320, 320, 3, 3)` float64 weights and the steep
    `(16, 16, 3, 3)` one, from a fixed seed."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    u_out, u_in = (torch.linalg.qr(randn(SIZE, RANK))[0] for _ in range(2))
    core = randn(RANK, RANK, 3, 3)
    grade = torch.logspace(0, -12, RANK, dtype=torch.float64)
    exact = torch.einsum("ap,pqxy,bq->abxy", u_out, core, u_in)
    graded = torch.einsum("ap,pqxy,bq->abxy", u_out * grade, core, u_in * grade)
    small_out, small_in = (torch.linalg.qr(randn(16, 5))[0] for _ in range(2))
    steps = 1e3 ** -torch.arange(5, dtype=torch.float64)
    steep = randn(5, 5, 3, 3) * steps[:, None, None, None] * steps[None, :, None, None]
    return {
        "random": (randn(SIZE, SIZE, 3, 3), RANK),
        "exact rank": (exact, RANK),
        "graded to 1e-12": (graded, RANK),
        "exact rank + 1e-9 noise": (exact + 1e-9 * randn(SIZE, SIZE, 3, 3), RANK),
        "16 → 16, rank 5, core ×1e-3 per index": (
            torch.einsum("ap,pqxy,bq->abxy", small_out, steep, small_in), 5
        ),
    }


def gram_only(weight: torch.Tensor, rank: int) -> object:
    """`decompose.tucker2` with every Gram basis kept, as float64 was decomposed before."""
    with mock.patch.object(_hooi, "gram_trusted", lambda *_: True):
        return decompose.tucker2(weight, rank)


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    for name, (weight, rank) in weights().items():
        runs = {"checked": lambda w=weight, r=rank: decompose.tucker2(w, r),
                "gram_only": lambda w=weight, r=rank: gram_only(w, r)}  # fmt: skip
        timed = interleaved_ms(runs, rounds=5)
        errors = {key: relative_error(recompose(run()), weight) for key, run in runs.items()}
        rows.append({"weight": name, "rank": rank,
                     **{f"{k}_ms": t["p50_ms"] for k, t in timed.items()},
                     **{f"{k}_error": e for k, e in errors.items()}})  # fmt: skip
        print(f"{name:38s} checked {timed['checked']['p50_ms']:7.1f} ms {errors['checked']:.1e}"
              f"   gram only {timed['gram_only']['p50_ms']:7.1f} ms {errors['gram_only']:.1e}")
    unfolding = torch.randn(1280, 1280 * 9, dtype=torch.float64)
    svd = interleaved_ms({
        "qr_triangle": lambda: _hooi._svd_vectors(unfolding, 64),
        "lapack_svd": lambda: torch.linalg.svd(unfolding, full_matrices=False).U[:, :64],
    }, rounds=3)  # fmt: skip
    vectors = {key: t["p50_ms"] for key, t in svd.items()}
    print(f"1280 × 11520 left singular vectors: {vectors}")
    path = write_results("tucker2_float64", rows, {"singular_vectors_1280x11520_ms": vectors})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
