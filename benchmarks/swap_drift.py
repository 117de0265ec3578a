"""Drift of hot-swapping merged adapters: subtract-then-add against the exact mode.

A block of four 1024×1024 linear layers and a 320→320 3×3 convolution in bf16 and fp16, each
with a rank-16 adapter (alpha 32) whose ΔW is about 5 % of W in norm. Two adapters are
swapped in turn 100 times (`lowrank.nn.swap_adapter`), then unmerged. Reported per mode:

- `restore_*`: the unmerged weight against the original (elements changed, largest
  difference, relative Frobenius error), 0 for a bit-exact restore;
- `vs_fresh_merge_*`: the merged weight after the last swap against merging that adapter
  once into the original weight;
- `held_bytes`: memory the mode keeps (one copy of every adapted weight for `exact`);
- `swap_ms`: time of one swap of the whole block.

Usage: `python benchmarks/swap_drift.py [--cycles 100]`; writes
`benchmarks/results/swap_drift-<cpu|cuda>.json`.
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import write_results
from torch import nn

from lowrank import nn as lnn

TARGETS = ["0", "1", "2", "3", "4"]


def block(dtype: torch.dtype, device: str) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(1024, 1024) for _ in range(4)] + [nn.Conv2d(320, 320, 3, padding=1)]
    return nn.Sequential(*layers).to(device, dtype)


def random_adapter(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Factors with ‖ΔW‖ ≈ 5 % of ‖W‖ per layer (up scaled after drawing)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, adapter in lnn.adapters(model).items():
        down = torch.randn(adapter.down.shape, generator=generator)
        up = torch.randn(adapter.up.shape, generator=generator)
        delta = adapter.scale * (up.flatten(1) @ down.flatten(1))
        up *= 0.05 * adapter.base.weight.float().norm() / delta.norm()
        device, dtype = adapter.down.device, adapter.down.dtype
        state[f"{name}.down"] = down.to(device, dtype)
        state[f"{name}.up"] = up.to(device, dtype)
    return state


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: a.base.weight.detach().clone() for n, a in lnn.adapters(model).items()}


def compare(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    differences = {k: ours[k].double() - v.double() for k, v in reference.items()}
    changed = sum(int((d != 0).sum()) for d in differences.values())
    total = sum(v.numel() for v in reference.values())
    largest = max(float(d.abs().max()) for d in differences.values())
    squared = sum(float(d.square().sum()) for d in differences.values())
    norm = sum(float(v.double().square().sum()) for v in reference.values())
    return {"changed_fraction": changed / total, "max_abs": largest,
            "rel_frobenius": (squared / norm) ** 0.5}  # fmt: skip


def run_mode(dtype: torch.dtype, device: str, exact: bool, cycles: int) -> dict:
    model = block(dtype, device)
    lnn.inject(model, TARGETS, rank=16, alpha=32)
    original = weights(model)
    adapters = [random_adapter(model, seed) for seed in (1, 2)]
    lnn.load_adapter_state_dict(model, adapters[0])
    held = lnn.merge(model, exact=exact)
    start = time.perf_counter()
    for cycle in range(cycles):
        lnn.swap_adapter(model, adapters[(cycle + 1) % 2])
    swap_ms = 1e3 * (time.perf_counter() - start) / cycles
    swapped = weights(model)
    fresh = block(dtype, device)
    lnn.inject(fresh, TARGETS, rank=16, alpha=32)
    lnn.load_adapter_state_dict(fresh, adapters[cycles % 2])
    lnn.merge(fresh)
    lnn.unmerge(model)
    restore = compare(weights(model), original)
    versus = compare(swapped, weights(fresh))
    return {
        "dtype": str(dtype).removeprefix("torch."), "mode": "exact" if exact else "subtract",
        "cycles": cycles, "held_bytes": held, "swap_ms": swap_ms,
        **{f"restore_{k}": v for k, v in restore.items()},
        **{f"vs_fresh_merge_{k}": v for k, v in versus.items()},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for exact in (False, True):
            rows.append(run_mode(dtype, device, exact, args.cycles))
            row = rows[-1]
            print(f"{row['dtype']:8s} {row['mode']:8s} restore: "
                  f"{row['restore_changed_fraction']:.2%} changed, max |Δ| "
                  f"{row['restore_max_abs']:.3g}, rel "
                  f"{row['restore_rel_frobenius']:.3g}; vs fresh merge rel "
                  f"{row['vs_fresh_merge_rel_frobenius']:.3g}; held {row['held_bytes']:,} B; "
                  f"{row['swap_ms']:.1f} ms/swap", flush=True)  # fmt: skip
    print(f"wrote {write_results('swap_drift', rows)}")


if __name__ == "__main__":
    main()
