"""Time the dense recomposition of conv adapters: lowrank vs loops vs einsum vs LyCORIS.

Sizes are Stable-Diffusion UNet convolutions (C in {320, 640, 1280}, 3×3 kernel) at
ranks {8, 16, 64}, for the low/mid/up Tucker2 form and the LoCon form. Compared:

- `lowrank`: `lowrank.recompose` (two matmuls for Tucker2, one for LoCon);
- `loops`: the Python loops over rank × in-channels and out × in-channels of the
  LoRA-for-conv write-up, re-expressed here (timed once per size: it is slow);
- `einsum`: one `torch.einsum("tp,pqhw,qs->tshw")` (or `"tr,rshw->tshw"`);
- `lycoris`: `lycoris.functional.locon.diff_weight`, when lycoris-lora is installed.

Usage: `python benchmarks/recompose.py [--dtype bf16] [--quick] [--no-loops]`
Writes `benchmarks/results/recompose-<cpu|cuda>.json` (`recompose-<dtype>-<cpu|cuda>.json`
with `--dtype`) and, with matplotlib, a plot beside it; `--report FILE.json` prints the
Markdown table of an existing result file and redraws its plot without timing anything.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from harness import relative_error, time_ms, write_results

import lowrank

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def loop_recompose_tucker(down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The write-up's algorithm: loop over (rank, in) then (out, in), summing per tap."""
    rank, in_features = down.shape[:2]
    out_features = up.shape[0]
    kernel = mid.shape[2:]
    down2d, up2d = down.reshape(rank, in_features), up.reshape(out_features, -1)
    mixed = down.new_zeros(mid.shape[0], in_features, *kernel)
    for p in range(mid.shape[0]):
        for s in range(in_features):
            mixed[p, s] = (mid[p] * down2d[:, s].reshape(-1, *([1] * len(kernel)))).sum(0)
    dense = down.new_zeros(out_features, in_features, *kernel)
    for t in range(out_features):
        for s in range(in_features):
            dense[t, s] = (mixed[:, s] * up2d[t].reshape(-1, *([1] * len(kernel)))).sum(0)
    return dense


def loop_recompose_locon(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The same loop structure for LoCon: one (out, in) loop over the rank sum."""
    out_features, in_features = up.shape[0], down.shape[1]
    up2d = up.reshape(out_features, -1)
    dense = down.new_zeros(out_features, in_features, *down.shape[2:])
    for t in range(out_features):
        for s in range(in_features):
            dense[t, s] = (down[:, s] * up2d[t].reshape(-1, 1, 1)).sum(0)
    return dense


def make_factors(form: str, channels: int, rank: int, dtype: torch.dtype, device: str):
    """Random factors (unit-variance entries scaled to keep ΔW O(1)) for one size."""
    gen = torch.Generator(device="cpu").manual_seed(channels * 1000 + rank)

    def rand(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[1] ** 0.5
        return t.to(device=device, dtype=dtype)

    if form == "tucker2":
        return lowrank.Tucker2(
            rand(rank, channels, 1, 1), rand(rank, rank, 3, 3), rand(channels, rank, 1, 1), 0.5
        )
    return lowrank.LoRA(rand(rank, channels, 3, 3), rand(channels, rank, 1, 1), 0.5)


def comparators(factors, with_lycoris: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """Every method that recomposes `factors`, keyed by name."""
    scale = factors.scale
    if isinstance(factors, lowrank.Tucker2):
        d, m, u = factors.down, factors.mid, factors.up
        methods = {
            "lowrank": lambda: lowrank.recompose(factors),
            "einsum": lambda: torch.einsum(
                "tp,pqhw,qs->tshw", u[:, :, 0, 0] * scale, m, d[:, :, 0, 0]
            ),
            "loops": lambda: loop_recompose_tucker(d, m, u) * scale,
        }
        lyco_args = (d, u, m)
    else:
        d, u = factors.down, factors.up
        methods = {
            "lowrank": lambda: lowrank.recompose(factors),
            "einsum": lambda: torch.einsum("tr,rshw->tshw", u[:, :, 0, 0] * scale, d),
            "loops": lambda: loop_recompose_locon(d, u) * scale,
        }
        lyco_args = (d, u, None)
    if with_lycoris:
        from lycoris.functional.locon import diff_weight

        methods["lycoris"] = lambda: diff_weight(*lyco_args, gamma=scale)
    return methods


def lycoris_available() -> bool:
    try:
        from lycoris.functional.locon import diff_weight  # noqa: F401
    except Exception:
        return False
    return True


def time_once_ms(fn: Callable[[], torch.Tensor]) -> float:
    """One timed call, for methods too slow to repeat."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


METHOD_ORDER = ("lowrank", "einsum", "lycoris", "loops")


def markdown_table(rows: list[dict]) -> str:
    """p50 milliseconds per method for every (form, C, r), and loops ÷ lowrank."""
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    header = "| form | C | r | " + " | ".join(f"{m} (ms)" for m in methods)
    lines = [header + " | loops ÷ lowrank |", "|---" * (len(methods) + 4) + "|"]
    keys = dict.fromkeys((r["form"], r["channels"], r["rank"]) for r in rows)
    for form, channels, rank in keys:
        cell = {
            r["method"]: r
            for r in rows
            if (r["form"], r["channels"], r["rank"]) == (form, channels, rank)
        }
        times = " | ".join(f"{cell[m]['p50_ms']:.4g}" if m in cell else "–" for m in methods)
        ratio = f"{cell['loops']['speedup_of_lowrank']:.0f}×" if "loops" in cell else "–"
        lines.append(f"| {form} | {channels} | {rank} | {times} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    """p50 time vs channels per method, one panel per (form, rank); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    forms = list(dict.fromkeys(r["form"] for r in rows))
    ranks = list(dict.fromkeys(r["rank"] for r in rows))
    fig, axes = plt.subplots(
        len(forms),
        len(ranks),
        figsize=(4 * len(ranks), 3.2 * len(forms)),
        squeeze=False,
        sharey=True,
    )
    for i, form in enumerate(forms):
        for j, rank in enumerate(ranks):
            ax = axes[i][j]
            for method in METHOD_ORDER:
                points = [
                    r for r in rows if (r["form"], r["rank"], r["method"]) == (form, rank, method)
                ]
                if points:
                    ax.plot(
                        [p["channels"] for p in points],
                        [p["p50_ms"] for p in points],
                        marker="o",
                        label=method,
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{form}, r = {rank}")
            ax.set_xlabel("channels C (C→C, 3×3)")
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("p50 time (ms)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(path: Path) -> None:
    """Print the table of an existing result file and redraw its plot."""
    payload = json.loads(path.read_text())
    print(markdown_table(payload["rows"]))
    plot(payload["rows"], path.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--quick", action="store_true", help="C=320 only")
    parser.add_argument("--no-loops", action="store_true", help="skip the slow loop baseline")
    parser.add_argument("--report", type=Path, help="print the table of this result file")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    with_lycoris = lycoris_available()
    channel_sizes = (320,) if args.quick else (320, 640, 1280)
    rows = []
    for form in ("tucker2", "locon"):
        for channels in channel_sizes:
            for rank in (8, 16, 64):
                factors = make_factors(form, channels, rank, dtype, device)
                reference = lowrank.recompose(factors.to(torch.float64))
                for method, fn in comparators(factors, with_lycoris).items():
                    if method == "loops" and args.no_loops:
                        continue
                    error = relative_error(fn(), reference)
                    if method == "loops":
                        p50 = time_once_ms(fn)
                        timing = {"p20_ms": None, "p50_ms": p50, "p80_ms": None, "repeats": 1}
                    else:
                        timing = time_ms(fn)
                    row = {
                        "form": form,
                        "channels": channels,
                        "kernel": 3,
                        "rank": rank,
                        "dtype": dtype_name,
                        "method": method,
                        "rel_error": error,
                        **timing,
                    }
                    rows.append(row)
                    print(
                        f"{form:8s} C={channels:5d} r={rank:3d} {method:8s} "
                        f"p50={row['p50_ms']:10.4f} ms  err={error:.2e}",
                        flush=True,
                    )
    for row in rows:
        ours = next(
            r
            for r in rows
            if r["method"] == "lowrank"
            and all(r[k] == row[k] for k in ("form", "channels", "rank"))
        )
        row["speedup_of_lowrank"] = row["p50_ms"] / ours["p50_ms"]
    # the device's default dtype keeps the plain name; another gets its own file
    name = "recompose" if args.dtype is None else f"recompose-{dtype_name}"
    path = write_results(name, rows, {"lycoris_installed": with_lycoris})
    print(f"wrote {path}")
    report(path)


if __name__ == "__main__":
    main()
