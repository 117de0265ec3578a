"""Host cost of launching the Triton kernels: through Triton's autotuner on every call, against
`_lora_triton._launch`, which asks the autotuner once per key and then launches its choice.

Triton's `Autotuner.run` rebuilds its cache key from every argument on every call (a dict of
all arguments, a membership test of each against the argument list, every tensor's dtype as
a string): tens of µs for kernels with 30-45 arguments, more than the GPU work of a decode-size
LoRA layer. This measures the Python of both ways on a CPU, with Triton's own launch
(`JITFunction.run`: the binder and the driver call, the same in both) replaced by a no-op and
the autotuner's pruning by its first candidate (nothing is compiled or benchmarked). The
rows are the launchers a forward and a backward make at 16 × 4096 × 4096, r = 16.

    python benchmarks/launch_overhead.py      # writes results/launch_overhead-cpu.json
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # the real autotuner, with its every candidate

import torch
from harness import interleaved_ms, write_results
from lowrank.kernels import _lora_triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

M, IN, OUT, RANK = 16, 4096, 4096, 16


def stub_triton() -> None:
    """No compile, no benchmark, no launch: the Python around them remains."""
    JITFunction.run = lambda self, *args, **kwargs: None
    Autotuner.prune_configs = lambda self, kwargs, max_configs=None: [self.configs[0]]


def main() -> None:
    stub_triton()
    x, w = torch.randn(M, IN), torch.randn(OUT, IN)
    a, b, g = torch.randn(RANK, IN), torch.randn(OUT, RANK), torch.randn(M, RANK)
    grad = torch.empty(RANK, IN)
    real_launch = _lora_triton._launch

    def through_autotuner(kernel, grid, key, *args, **constexprs):
        kernel[grid](*args, **constexprs)

    def gemm() -> object:
        return _lora_triton._gemm_in_regime(x, w, a, b, None, 2.0, (0, 0.0, "in"), "fused", True)

    def reduce() -> object:
        return _lora_triton._reduce_rows(g, x, 2.0, 0, 0.0, grad)

    cases = {}
    launchers = (("forward GEMM launcher (fused)", gemm), ("d_down reduction launcher", reduce))
    for name, fn in launchers:
        for way, launch in (("through Triton's autotuner", through_autotuner),
                            ("autotuner's choice reused", real_launch)):  # fmt: skip

            def run(fn=fn, launch=launch) -> object:
                _lora_triton._launch = launch
                return fn()

            cases[f"{name}, {way}"] = run
    timed = interleaved_ms(cases, rounds=2000)
    rows = []
    for name, timing in timed.items():
        row = {"case": name, **{k.replace("_ms", "_us"): v * 1e3 for k, v in timing.items()
                                if k != "samples_ms"}}  # fmt: skip
        rows.append(row)
        print(f"{name:70s} p50 {row['p50_us']:7.2f} µs  (p20 {row['p20_us']:.2f}, "
              f"p80 {row['p80_us']:.2f})")  # fmt: skip
    _lora_triton._launch = real_launch
    path = write_results("launch_overhead", rows, {"shape": {"m": M, "in": IN, "out": OUT,
                                                             "rank": RANK}})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
