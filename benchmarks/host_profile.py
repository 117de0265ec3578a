"""Where the host's time goes in eager `lora_linear` calls on a GPU: wall time per call and a
profile of the Python, beside torch's own dense and eager LoRA calls.

At decode sizes an eager call is bound by the host, not the GPU: on an H100 the fused forward
of 16 × 4096 × 4096 took 19 µs as a CUDA-graph replay but 91 µs called eagerly, and the eager
training step 0.93 ms against PEFT's 0.56 ms (`results/lora_linear-cuda*.json`). This times,
for each case, the wall time of `--calls` back-to-back calls followed by one synchronisation
(the GPU's work is a few µs a call, so the host sets the pace), then runs the same calls
under `cProfile` and keeps the functions with the most time of their own.

    python3 benchmarks/host_profile.py --out results/host_profile-cuda.json   # on a GPU

Cases: `F.linear`; eager LoRA (three linears); `lora_linear` under `no_grad`; the launcher
`_lora_triton.forward` called directly in the fused and the persistent regime; a training
step (forward and `autograd.grad` of x, down and up) for eager LoRA, `lora_linear` (at 16
rows the one-pass backward), and `lora_linear` with `LOWRANK_LORA_BACKWARD=separate`.
Without CUDA it runs on small CPU tensors (256 features) with whatever backend "auto" picks
there (a smoke run: its numbers say nothing about the kernels).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import env_vars, write_results

M, IN, OUT, RANK, SCALE = 16, 4096, 4096, 16, 2.0
CPU_FEATURES = 256  # in and out of the CPU smoke run
TOP = 25


def wall_us(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    """Mean wall time per call (µs) of `calls` back-to-back calls and one final sync."""
    for _ in range(max(3, calls // 10)):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def profile_top(fn: Callable[[], object], calls: int, top: int = TOP) -> list[dict]:
    """The `top` functions by own time over `calls` calls of `fn`, per call (µs)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    rows = [
        {"function": f"{Path(file).name}:{line}({name})", "calls_per_call": nc / calls,
         "own_us": tt / calls * 1e6, "cumulative_us": ct / calls * 1e6}
        for (file, line, name), (_, nc, tt, ct, _) in stats.items()
    ]  # fmt: skip
    return sorted(rows, key=lambda r: r["own_us"], reverse=True)[:top]


def cases(device: str) -> dict[str, Callable[[], object]]:
    """The timed calls, on `device` (bf16 on CUDA, float32 on CPU)."""
    from lowrank.kernels import _lora_triton, lora_linear

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    fan_in, fan_out = (IN, OUT) if device == "cuda" else (CPU_FEATURES, CPU_FEATURES)
    x = torch.randn(M, fan_in, device=device, dtype=dtype)
    weight = torch.randn(fan_out, fan_in, device=device, dtype=dtype) * fan_in**-0.5
    down = torch.randn(RANK, fan_in, device=device, dtype=dtype) * fan_in**-0.5
    up = torch.randn(fan_out, RANK, device=device, dtype=dtype) * RANK**-0.5
    down.requires_grad_()
    up.requires_grad_()
    xg = x.clone().requires_grad_()
    dy = torch.randn(M, fan_out, device=device, dtype=dtype)

    def eager(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight) + SCALE * F.linear(F.linear(x, down), up)

    def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return fn()

        return run

    def train(fn: Callable[[torch.Tensor], torch.Tensor], env: dict | None = None):
        def run() -> object:
            with env_vars(env or {}):
                return torch.autograd.grad(fn(xg), (xg, down, up), dy)

        return run

    def ours(x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, weight, down, up, SCALE)

    def launcher(regime: str) -> Callable[[], object]:
        return lambda: _lora_triton.forward(x, weight, down, up, None, SCALE, 0.0, 0,
                                            keep_t=False, regime=regime)  # fmt: skip

    found = {
        "F.linear, no_grad": no_grad(lambda: F.linear(x, weight)),
        "eager LoRA, no_grad": no_grad(lambda: eager(x)),
        "lora_linear, no_grad": no_grad(lambda: ours(x)),
        "eager LoRA, training step": train(eager),
        "lora_linear, training step": train(ours),
        "lora_linear separate backward, training step": train(
            ours, {_lora_triton.BACKWARD_ENV: "separate"}
        ),
    }
    if device == "cuda":  # the persistent regime: 0.36-0.40 ms per eager call on an H100
        for regime in ("fused", "persistent"):
            found[f"_lora_triton.forward ({regime}), no_grad"] = no_grad(launcher(regime))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per timing and profile")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: results/host_profile-DEVICE.json")  # fmt: skip
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows: list[dict] = []
    found = cases(device)
    for name, fn in found.items():
        us = wall_us(fn, args.calls, sync)
        rows.append({"case": name, "wall_us_per_call": us, "top": profile_top(fn, args.calls)})
        print(f"{name:50s} {us:8.1f} µs/call", flush=True)
        # written after each case, so a run stopped midway keeps what it measured
        extra = {"complete": len(rows) == len(found),
                 "shape": {"m": M, "in": IN, "out": OUT, "rank": RANK}}  # fmt: skip
        path = write_results("host_profile", rows, extra, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
