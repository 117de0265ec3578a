"""Host-side cost of one `lora_linear` call: the Python around the kernels, on a CPU.

At decode sizes the GPU work of a LoRA layer takes ~10 µs, so the Python that validates the
operands, picks the backend and regime and builds the autograd node matters as much as the
kernels. This times `lora_linear` with the kernel launches replaced by returning preallocated
outputs (so neither Triton's launcher nor any GPU is timed), in inference (`no_grad`) and
with autograd, and the same call through the `torch.library` op that torch.compile traces
(which eager calls skip), beside torch's own per-call cost for the dense and the eager LoRA
forward on tiny CPU tensors (8 × 8, where the arithmetic is negligible) for scale. Triton's launcher
adds its own cost on a GPU; that is in the GPU benchmark, not here.

    python benchmarks/host_overhead.py      # writes results/host_overhead-cpu.json
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # Triton on CPU tensors, before triton is imported

import torch
import torch.nn.functional as F
from harness import time_ms, write_results
from lowrank.kernels import _lora_triton, lora_linear
from lowrank.kernels._lora_op import lora_linear_fwd

M, IN, OUT, RANK = 16, 4096, 4096, 16


def stub_launches(y: torch.Tensor, t: torch.Tensor) -> None:
    """Replace the kernel launches by returning `y` and `t` (the Python around them remains)."""

    def launched(*args, **kwargs):
        return y, t

    _lora_triton._gemm_in_regime = launched


def main() -> None:
    x, weight = torch.randn(M, IN), torch.randn(OUT, IN)
    down, up, bias = torch.randn(RANK, IN), torch.randn(OUT, RANK), torch.randn(OUT)
    stub_launches(torch.empty(M, OUT), torch.empty(M, RANK))
    tiny = [torch.randn(8, 8), torch.randn(8, 8), torch.randn(2, 8), torch.randn(8, 2),
            torch.randn(8)]  # fmt: skip

    def ours() -> torch.Tensor:
        return lora_linear(x, weight, down, up, scale=2.0, bias=bias, backend="triton")

    def ours_no_grad() -> torch.Tensor:
        with torch.no_grad():
            return ours()

    def through_op() -> torch.Tensor:
        y, _ = lora_linear_fwd(x, weight, down, up, bias, 2.0, 0.0, 0, None, True, "triton")
        return y

    def through_op_no_grad() -> torch.Tensor:
        with torch.no_grad():
            return lora_linear_fwd(x, weight, down, up, bias, 2.0, 0.0, 0, None, False,
                                   "triton")[0]  # fmt: skip

    def dense_dispatch() -> torch.Tensor:
        with torch.no_grad():
            return F.linear(tiny[0], tiny[1], tiny[4])

    def eager_dispatch() -> torch.Tensor:
        tx, tw, td, tu, tb = tiny
        with torch.no_grad():
            return F.linear(tx, tw, tb) + 2.0 * F.linear(F.linear(tx, td), tu)

    down.requires_grad_()
    up.requires_grad_()
    cases = {
        "lowrank lora_linear, no_grad (kernels stubbed)": ours_no_grad,
        "lowrank lora_linear, autograd (kernels stubbed)": ours,
        "torch.library op lowrank::lora_linear_fwd, no_grad (kernels stubbed)": through_op_no_grad,
        "torch.library op lowrank::lora_linear_fwd, autograd (kernels stubbed)": through_op,
        "torch F.linear, no_grad (8 x 8 CPU tensors)": dense_dispatch,
        "torch eager LoRA, 3 linears + scale + add, no_grad (8 x 8 CPU tensors)": eager_dispatch,
    }
    rows = []
    for name, fn in cases.items():
        timing = time_ms(fn, warmup_ms=200, rep_ms=1000)
        row = {"case": name, **{k.replace("_ms", "_us"): v * 1e3 for k, v in timing.items()}}
        rows.append(row)
        print(f"{name:70s} p50 {row['p50_us']:7.2f} µs  (p20 {row['p20_us']:.2f}, "
              f"p80 {row['p80_us']:.2f})")  # fmt: skip
    path = write_results("host_overhead", rows, {"shape": {"m": M, "in": IN, "out": OUT,
                                                           "rank": RANK}})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
