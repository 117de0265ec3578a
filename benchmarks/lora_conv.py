"""Time conv adapters at Stable Diffusion UNet sizes against the dense convolution and peers.

Sizes: C = 320 at 64×64, 640 at 32×32, 1280 at 16×16 (3×3, padding 1), ranks {8, 16, 64},
NCHW and channels-last, forward (no grad) and a training step (forward + backward, the input
and the adapter's factors needing gradients; the dense conv's own weight for `dense`).
Methods, all in one process:

- `dense`: the base `nn.Conv2d` alone (its weight trainable in the training step);
- `parallel_1x1`: base + a parallel 1×1 → 1×1 branch (the centre-tap form, written out);
- `peft`: PEFT's LoRA `Conv2d` layer (k×k down, 1×1 up) around the base;
- `tucker_3conv`: base + three sequential Tucker convs (1×1, 3×3, 1×1), written out;
- `lycoris_bypass`: LyCORIS `LoConModule` (LoCon) in bypass mode;
- `merge_on_the_fly`: one conv with `W + up·down` recomposed on every call (LoCon);
- `lowrank_<form>`: `lowrank.nn.LoRAConv` as it runs each form (at inference it picks one
  conv with `W + ΔW` where recomposing costs less than the branch).

CPU: fp32, batch 1 (`--batch`), one thread (`--threads`: a shared machine disturbs one
thread least); CUDA: bf16, batch 8. All methods, layouts and modes of one size and rank run
in turn, one call each per round (`harness.interleaved_ms`); each row gives p20/p50/p80 ms
and the median over rounds of the time over the dense conv's in the same round, of the same
layout and channels-last.
Usage: `python benchmarks/lora_conv.py [--batch N] [--quick] [--rounds 5]`;
`--report FILE` prints the summary table of a result file. Writes
`benchmarks/results/lora_conv-<cpu|cuda>.json` (and a plot with matplotlib).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import interleaved_ms, relative_error, write_results
from torch import nn

from lowrank.nn import LoRAConv

SIZES = ((320, 64), (640, 32), (1280, 16))
RANKS = (8, 16, 64)
FORMS = ("lora", "centre_tap", "tucker2", "cp")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def randomised(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter that trains drawn at a small random scale (no zero factor)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                values = torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5
                param.copy_(values.to(param.dtype))
    return module


def peft_layer(base: nn.Conv2d, rank: int) -> nn.Module | None:
    """PEFT's LoRA Conv2d around a copy of `base`, or `None` without peft."""
    try:
        import peft
    except ImportError:
        return None
    holder = nn.Sequential(copy.deepcopy(base))
    config = peft.LoraConfig(target_modules=["0"], r=rank, lora_alpha=rank, init_lora_weights=False)
    return peft.get_peft_model(holder, config).base_model.model[0]


def lycoris_layer(base: nn.Conv2d, rank: int) -> nn.Module | None:
    """LyCORIS's LoCon module in bypass mode on a copy of `base`, or `None` without it."""
    try:
        from lycoris.modules.locon import LoConModule
    except ImportError:
        return None
    module = LoConModule("conv", copy.deepcopy(base), lora_dim=rank, alpha=rank, bypass_mode=True)
    return module.to(base.weight.device, base.weight.dtype)


def explicit_methods(base: nn.Conv2d, rank: int) -> dict[str, nn.Module]:
    """The parallel 1×1, three-Tucker-conv and merge-on-the-fly comparators as small modules
    whose forward is written out here (trainable factors; the base frozen)."""
    channels, dtype = base.out_channels, base.weight.dtype

    class Branch(nn.Module):
        def __init__(self, shapes: dict[str, tuple[int, ...]], run: Callable) -> None:
            super().__init__()
            self.base = base
            self.factors = nn.ParameterDict(
                {n: nn.Parameter(torch.empty(s, dtype=dtype)) for n, s in shapes.items()}
            )
            self.run = run

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.run(self.base, self.factors, x)

    def parallel(b, f, x):
        return b(x) + F.conv2d(F.conv2d(x, f["down"]), f["up"])

    def tucker(b, f, x):
        return b(x) + F.conv2d(F.conv2d(F.conv2d(x, f["down"]), f["mid"], padding=1), f["up"])

    def on_the_fly(b, f, x):
        delta = (f["up"].flatten(1) @ f["down"].flatten(1)).view_as(b.weight)
        return F.conv2d(x, b.weight + delta, b.bias, padding=1)

    one = (1, 1)
    lora = {"down": (rank, channels, 3, 3), "up": (channels, rank, *one)}
    centre = {"down": (rank, channels, *one), "up": (channels, rank, *one)}
    tucker2 = {**centre, "mid": (rank, rank, 3, 3)}
    return {
        "parallel_1x1": Branch(centre, parallel),
        "tucker_3conv": Branch(tucker2, tucker),
        "merge_on_the_fly": Branch(lora, on_the_fly),
    }


def methods(
    base: nn.Conv2d, rank: int, device: str, dtype: torch.dtype, memory_format: torch.memory_format
) -> dict[str, nn.Module]:
    """Every method for one size and rank, each with its own trainable parameters, built on a
    copy of `base` already on `device` in `dtype` and `memory_format` (LyCORIS keeps its base
    layer outside its registered modules, where a later `.to` does not reach; and `.to` on a
    module shared by two layouts would leave both in the last one)."""
    base = copy.deepcopy(base).to(device, dtype, memory_format=memory_format)
    frozen = copy.deepcopy(base).requires_grad_(False)
    found: dict[str, nn.Module | None] = {"dense": base}
    found.update(explicit_methods(frozen, rank))
    found["peft"] = peft_layer(frozen, rank)
    found["lycoris_bypass"] = lycoris_layer(frozen, rank)
    for form in FORMS:
        found[f"lowrank_{form}"] = LoRAConv(frozen, rank, alpha=rank, form=form)
    return {name: randomised(m, i) for i, (name, m) in enumerate(found.items()) if m is not None}


def float64_error(module: nn.Module, x: torch.Tensor) -> float | None:
    """‖out − out₆₄‖ / ‖out₆₄‖ against a float64 copy of the method, `None` where a copy does
    not convert whole (LyCORIS keeps its base layer outside its registered modules)."""
    with torch.no_grad():
        try:
            expected = copy.deepcopy(module).double()(x.double())
        except RuntimeError:
            return None
        return relative_error(module(x), expected)


def step_fn(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """One forward (no grad), or one training step (forward + backward into the input and
    the trainable parameters)."""
    if mode == "forward":

        def forward() -> None:
            with torch.no_grad():
                module(x)

        return forward
    xg = x.detach().clone().requires_grad_()

    def train() -> None:
        module(xg).sum().backward()
        module.zero_grad(set_to_none=True)
        xg.grad = None

    return train


def run(args: argparse.Namespace) -> list[dict]:
    """Every size and rank; within one, every method, layout and mode is timed in turn
    (`interleaved_ms`), and each ratio is the median over rounds of the ratio within a round."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    batch = args.batch or (8 if cuda else 1)
    rows = []
    sizes = SIZES[:1] if args.quick else SIZES
    ranks = RANKS[:1] if args.quick else RANKS
    start = time.monotonic()
    for (channels, side), rank in itertools.product(sizes, ranks):
        if time.monotonic() - start > args.budget_s:
            print(f"budget spent after {len(rows)} rows", flush=True)
            args.complete = False
            break
        torch.manual_seed(channels)
        base = nn.Conv2d(channels, channels, 3, padding=1)
        x_plain = torch.randn(batch, channels, side, side)
        built, fns = {}, {}
        for layout, memory_format in LAYOUTS.items():
            x = x_plain.to(device, dtype).contiguous(memory_format=memory_format)
            for name, module in methods(base, rank, device, dtype, memory_format).items():
                module = module.to(device, dtype, memory_format=memory_format).eval()
                built[layout, name] = (module, x)
                for mode in ("forward", "train"):
                    fns[layout, name, mode] = step_fn(module, x, mode)
        timed = interleaved_ms(fns, rounds=args.rounds)
        for (layout, name, mode), timing in timed.items():
            module, x = built[layout, name]
            samples = timing["samples_ms"]
            rows.append({
                "channels": channels, "side": side, "batch": batch, "rank": rank,
                "layout": layout, "mode": mode, "method": name,
                "dtype": str(dtype).removeprefix("torch."),
                "rel_error_vs_float64": float64_error(module, x), **timing,
                "ratio_vs_dense": paired(samples, timed[layout, "dense", mode]["samples_ms"]),
                "ratio_vs_channels_last_dense": paired(
                    samples, timed["channels_last", "dense", mode]["samples_ms"]
                ),
            })  # fmt: skip
            print(f"C={channels} r={rank} {layout:13s} {mode:7s} {name:18s} "
                  f"{timing['p50_ms']:9.3f} ms  ÷ dense {rows[-1]['ratio_vs_dense']:.2f}",
                  flush=True)  # fmt: skip
    return rows


def paired(samples: list[float], reference: list[float]) -> float:
    """The median over rounds of `samples[i] / reference[i]`."""
    return statistics.median(a / b for a, b in zip(samples, reference, strict=True))


def summary(rows: list[dict]) -> str:
    """Markdown: the range over sizes and ranks of p50 ÷ dense, per method, layout and mode."""
    lines = ["| method | layout | forward ÷ dense | train step ÷ dense |", "|---|---|---|---|"]
    keys = dict.fromkeys((r["method"], r["layout"]) for r in rows)
    for method, layout in keys:
        cells = []
        for mode in ("forward", "train"):
            ratios = [
                r["ratio_vs_dense"]
                for r in rows
                if (r["method"], r["layout"], r["mode"]) == (method, layout, mode)
            ]
            cells.append(f"{min(ratios):.2f}–{max(ratios):.2f}")
        lines.append(f"| {method} | {layout} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    """Forward and training-step ratios to the channels-last dense conv, one panel each."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=False)
    methods_ = list(dict.fromkeys(r["method"] for r in rows))
    cases = list(dict.fromkeys((r["channels"], r["rank"]) for r in rows))
    for ax, mode in zip(axes, ("forward", "train"), strict=True):
        for i, method in enumerate(methods_):
            for layout, marker in (("nchw", "o"), ("channels_last", "s")):
                values = [next((r["ratio_vs_channels_last_dense"] for r in rows
                                if (r["channels"], r["rank"], r["mode"], r["layout"],
                                    r["method"]) == (*case, mode, layout, method)), None)
                          for case in cases]  # fmt: skip
                ax.plot(range(len(cases)), values, marker=marker, color=f"C{i}",
                        linestyle="-" if layout == "nchw" else "--",
                        label=f"{method} ({layout})" if mode == "forward" else None)  # fmt: skip
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cases)), [f"C{c}\nr{r}" for c, r in cases], fontsize=7)
        ax.set_title(f"{mode}: time ÷ channels-last dense conv")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.18, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, help="batch size (default 1 on CPU, 8 on CUDA)")
    parser.add_argument("--quick", action="store_true", help="C = 320 and r = 8 only")
    parser.add_argument("--rounds", type=int, default=5, help="calls of each method timed")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--report", type=Path, help="print the summary of a result file")
    parser.add_argument("--out", type=Path, help="JSON path (default: results/lora_conv-…)")
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="stop between grid points after this long (exit 3)")  # fmt: skip
    args = parser.parse_args()
    args.complete = True
    if args.report:
        rows = json.loads(args.report.read_text())["rows"]
        print(summary(rows))
        return 0
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    rows = run(args)
    path = write_results("lora_conv", rows, {"complete": args.complete}, path=args.out)
    print(f"\nwrote {path}\n\n{summary(rows)}")
    if plot(rows, path.with_suffix(".png")):
        print(f"plot: {path.with_suffix('.png')}")
    return 0 if args.complete else 3


if __name__ == "__main__":
    sys.exit(main())
