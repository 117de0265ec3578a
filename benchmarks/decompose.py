"""Time the decompositions of `lowrank.decompose` against TensorLy and torch, at equal ranks.

Sizes are Stable-Diffusion UNet convolutions `(C, C, 3, 3)`, C in {320, 640}, at ranks
{8, 16, 64}. The weight has random singular vectors and singular values i^-0.5 on its
`(C, 9C)` flattening (a slowly decaying spectrum, like trained conv kernels). Compared,
with p50 time and relative reconstruction error ‖W − Ŵ‖/‖W‖:

- `svd`: ours exact, randomised and "auto" vs `torch.svd_lowrank` (same sketch, same power
  iterations);
- `tucker2`: ours (HOSVD + HOOI) vs TensorLy `partial_tucker` (PyTorch backend, init "svd"),
  both `--sweeps` sweeps with tol 0;
- `cp`: ours (ALS) vs TensorLy `parafac` (PyTorch backend, init "random"), both
  `--sweeps` sweeps with tol 0.

Then peak memory of one CP at (1280, 1280, 3, 3), rank 64, 3 sweeps, each in a fresh
subprocess (ours, TensorLy init "random" and "svd").

Usage: `python benchmarks/decompose.py [--quick] [--sweeps N] [--no-memory]`
Writes `benchmarks/results/decompose-<cpu|cuda>.json`.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import warnings
from collections.abc import Callable

import tensorly as tl
import torch
from harness import relative_error, time_ms, write_results
from tensorly.decomposition import parafac, partial_tucker

from lowrank import decompose, recompose

MEMORY_PROBE = """
import json, sys, warnings, torch
from lowrank.forms import CP
warnings.simplefilter("ignore")

def kib(field):
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1])

g = torch.Generator().manual_seed(0)
parts = [torch.randn(n, 64, generator=g) / n**0.5 for n in (1280, 1280, 3, 3)]
w = CP(parts[0], parts[1], parts[2:]).to_dense()
w += 0.1 * w.std() * torch.randn(w.shape, generator=g)
if sys.argv[1] == "lowrank":
    from lowrank import decompose
    run = lambda: decompose.cp(w, 64, n_iter=3, tol=0)
else:
    import tensorly as tl
    from tensorly.decomposition import parafac
    tl.set_backend("pytorch")
    run = lambda: parafac(w, 64, n_iter_max=3, tol=0, init=sys.argv[1], random_state=0)
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # reset the peak (VmHWM) to the current RSS
before = kib("VmRSS")
run()
print(json.dumps({"extra_peak_mib": (kib("VmHWM") - before) / 1024}))
"""


def conv_weight(channels: int, device: str) -> torch.Tensor:
    """`(C, C, 3, 3)` float32 with singular values i^-0.5 on its `(C, 9C)` flattening."""
    gen = torch.Generator().manual_seed(channels)
    cols = 9 * channels
    left, _ = torch.linalg.qr(torch.randn(channels, channels, generator=gen, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, channels, generator=gen, dtype=torch.float64))
    spectrum = torch.arange(1, channels + 1, dtype=torch.float64) ** -0.5
    weight = (left * spectrum) @ right.T
    return weight.reshape(channels, channels, 3, 3).float().to(device)


def tl_tucker(weight: torch.Tensor, rank: int, sweeps: int) -> torch.Tensor:
    """TensorLy partial Tucker on modes 0 and 1, recomposed."""
    (core, factors), _ = partial_tucker(
        weight, [rank, rank], modes=[0, 1], n_iter_max=sweeps, tol=0
    )
    return tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])


def tl_cp(weight: torch.Tensor, rank: int, sweeps: int) -> torch.Tensor:
    """TensorLy CP-ALS from a random start, recomposed."""
    cp_tensor = parafac(weight, rank, n_iter_max=sweeps, tol=0, init="random", random_state=0)
    return tl.cp_to_tensor(cp_tensor)


def torch_lowrank(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """`torch.svd_lowrank` with our default sketch (rank + 10) and power iterations (4)."""
    matrix = weight.reshape(weight.shape[0], -1)
    u, s, v = torch.svd_lowrank(matrix, q=rank + 10, niter=4)
    return ((u[:, :rank] * s[:rank]) @ v[:, :rank].T).view(weight.shape)


def cases(sweeps: int) -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    """Name → function returning the dense reconstruction at a rank."""
    return {
        "svd/lowrank-exact": lambda w, r: recompose(decompose.svd(w, r, method="exact")),
        "svd/lowrank-randomized": lambda w, r: recompose(
            decompose.svd(w, r, method="randomized", seed=0)
        ),
        "svd/lowrank-auto": lambda w, r: recompose(decompose.svd(w, r, seed=0)),
        "svd/torch.svd_lowrank": torch_lowrank,
        "tucker2/lowrank": lambda w, r: recompose(decompose.tucker2(w, r, n_iter=sweeps, tol=0)),
        "tucker2/tensorly": lambda w, r: tl_tucker(w, r, sweeps),
        "cp/lowrank": lambda w, r: recompose(decompose.cp(w, r, n_iter=sweeps, tol=0)),
        "cp/tensorly": lambda w, r: tl_cp(w, r, sweeps),
    }


def memory_rows() -> list[dict]:
    """Peak extra RSS of one rank-64 CP of a (1280, 1280, 3, 3) kernel, per implementation."""
    rows = []
    for impl in ("lowrank", "random", "svd"):
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, impl], capture_output=True, text=True
        )
        name = "cp/lowrank" if impl == "lowrank" else f"cp/tensorly-init-{impl}"
        row = {"case": name, "shape": [1280, 1280, 3, 3], "rank": 64, "sweeps": 3}
        if done.returncode == 0:
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            row["failed"] = done.stderr.strip().splitlines()[-1]
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="C = 320 and ranks 8, 64 only")
    parser.add_argument("--sweeps", type=int, default=10, help="HOOI / ALS sweeps (tol 0)")
    parser.add_argument("--no-memory", action="store_true", help="skip the 1280-channel probe")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    tl.set_backend("pytorch")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    channels, ranks = ((320,), (8, 64)) if args.quick else ((320, 640), (8, 16, 64))
    rows = []
    for c in channels:
        weight = conv_weight(c, device)
        for rank in ranks:
            for name, fn in cases(args.sweeps).items():
                error = relative_error(fn(weight, rank), weight)
                timing = time_ms(functools.partial(fn, weight, rank), warmup_ms=1, rep_ms=1)
                row = {"case": name, "shape": list(weight.shape), "rank": rank, "rel_error": error}
                row.update(timing)
                print(
                    f"C={c:5d} r={rank:3d} {name:24s} p50 {timing['p50_ms']:10.2f} ms  "
                    f"error {error:.5f}",
                    flush=True,
                )
                rows.append(row)
    extra = {"sweeps": args.sweeps, "weight": "random vectors, singular values i^-0.5"}
    if not args.no_memory:
        extra["memory"] = memory_rows()
    print(write_results("decompose", rows, extra))


if __name__ == "__main__":
    main()
