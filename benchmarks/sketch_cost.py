"""What the randomised SVD's sketch and the Gram-matrix route cost next to LAPACK's SVD, on
one CPU thread: the costs `decompose.svd(method="adaptive")` and HOOI's Gram basis weigh.

Rows:
- `sketch`: `decompose.svd(W, rank=r, method="randomized", oversample=r)` (a sketch of `2r`
  columns, 4 power steps) against `method="exact"`, float32 Gaussian `W` of the given shape;
- `gram`: the top singular vectors of a float32 `(m, n)` matrix, m ≥ n, from `eigh` of its
  `n × n` Gram matrix (formed here) against its thin SVD.

The functions of a row run in turn, one call each per round (`harness.interleaved_ms`), so
that load from other processes falls on both alike.

    python benchmarks/sketch_cost.py      # writes results/sketch_cost-cpu.json
"""

from __future__ import annotations

import argparse

import torch
from harness import interleaved_ms, write_results

from lowrank import decompose

SKETCHES = ((1280, 1280, 32), (1280, 11520, 32))
GRAMS = ((640, 576),)


def sketch_row(rows: int, cols: int, rank: int, rounds: int) -> dict:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    timed = interleaved_ms(
        {
            "sketch": lambda: decompose.svd(
                weight, rank, method="randomized", oversample=rank, seed=0
            ),
            "exact": lambda: decompose.svd(weight, rank, method="exact"),
        },
        rounds=rounds,
    )
    return {
        "case": "sketch",
        "shape": [rows, cols],
        "rank": rank,
        "sketch_columns": 2 * rank,
        "sketch_ms": timed["sketch"]["p50_ms"],
        "exact_ms": timed["exact"]["p50_ms"],
        "exact_over_sketch": timed["exact"]["p50_ms"] / timed["sketch"]["p50_ms"],
        "samples_ms": {key: value["samples_ms"] for key, value in timed.items()},
    }


def gram_row(rows: int, cols: int, rounds: int) -> dict:
    matrix = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    timed = interleaved_ms(
        {
            "gram_eigh": lambda: torch.linalg.eigh(matrix.T @ matrix),
            "thin_svd": lambda: torch.linalg.svd(matrix, full_matrices=False),
        },
        rounds=rounds,
    )
    return {
        "case": "gram",
        "shape": [rows, cols],
        "gram_eigh_ms": timed["gram_eigh"]["p50_ms"],
        "thin_svd_ms": timed["thin_svd"]["p50_ms"],
        "samples_ms": {key: value["samples_ms"] for key, value in timed.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="calls of each function per row")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(1)
    rows = [sketch_row(*shape, args.rounds) for shape in SKETCHES]
    rows += [gram_row(*shape, args.rounds * 3) for shape in GRAMS]
    for row in rows:
        times = {k: round(v, 1) for k, v in row.items() if k.endswith("_ms") and k != "samples_ms"}
        print(row["case"], row["shape"], times)
    print(write_results("sketch_cost", rows, {"threads": 1}))


if __name__ == "__main__":
    main()
