"""Eval-mode forward latency of a small Llama with DoRA adapters: lowrank against PEFT.

A `LlamaForCausalLM` (hidden 512, 4 layers, 8 heads, intermediate 1376, vocabulary 4096;
random weights, float32) gets DoRA adapters (rank 16, alpha 32) on `q_proj`, `k_proj`,
`v_proj` and `o_proj` from both libraries, PEFT's random factors and magnitudes copied into
lowrank's (`lora_B` drawn non-zero, so ΔW is not 0). Each forward runs in `eval()` under
`torch.no_grad()`, in one process, the three interleaved one call each per round
(`harness.interleaved_ms`) so that load from other processes falls on all alike:

- `lowrank`: inside `lowrank.nn.reuse_dora_factors`, reusing each adapter's
  `m / ‖W + ΔW‖` from the last call while nothing it depends on has changed;
- `lowrank_recomputed`: the same model by default (no reuse asked for), each forward
  computing the dense `W + ΔW` and its norms, as PEFT does;
- `peft`: PEFT's `get_peft_model(LoraConfig(use_dora=True))`.

Rows per input shape `(batch, sequence)`: p20/p50/p80 ms and the median over rounds of the
per-round ratios lowrank ÷ PEFT and lowrank_recomputed ÷ PEFT; the largest difference of the
logits from PEFT's (0 is bit for bit). The 1-minute load average is recorded at the start and
the end.

Usage: `python benchmarks/dora_inference.py [--shapes 1x1 1x32 4x128] [--rounds 40]
[--threads 1] [--note TEXT] [--out PATH]`; writes `benchmarks/results/dora_inference-cpu.json`.
Needs transformers and peft.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from pathlib import Path

import torch
from harness import interleaved_ms, write_results

from lowrank import nn as lnn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA = 16, 32


def llama(hidden: int = 512, layers: int = 4) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=hidden * 43 // 16,
                         vocab_size=4096, max_position_embeddings=512)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def adapted(hidden: int = 512, layers: int = 4) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(lowrank's model, PEFT's), the same DoRA adapters on both."""
    import peft

    base = llama(hidden, layers)
    ours = copy.deepcopy(base)
    lnn.inject(ours, TARGETS, rank=RANK, alpha=ALPHA, dora=True)
    config = peft.LoraConfig(target_modules=TARGETS, r=RANK, lora_alpha=ALPHA, use_dora=True)
    theirs = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, layer in theirs.base_model.model.named_modules():
            if not hasattr(layer, "lora_magnitude_vector"):
                continue
            layer.lora_B["default"].weight.normal_(std=0.02)
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(torch.empty_like(magnitude).uniform_(0.8, 1.2))
            adapter = ours.get_submodule(name)
            adapter.down.copy_(layer.lora_A["default"].weight)
            adapter.up.copy_(layer.lora_B["default"].weight)
            adapter.magnitude.copy_(magnitude)
    return ours.eval(), theirs.eval()


def row(ours: torch.nn.Module, theirs: torch.nn.Module, shape: tuple[int, int],
        rounds: int) -> dict:  # fmt: skip
    batch, sequence = shape
    ids = torch.randint(0, 4096, (batch, sequence), generator=torch.Generator().manual_seed(1))
    recomputed = copy.deepcopy(ours)
    fns = {"lowrank": lambda: ours(ids).logits,
           "lowrank_recomputed": lambda: recomputed(ids).logits,
           "peft": lambda: theirs(ids).logits}  # fmt: skip
    with torch.no_grad(), lnn.reuse_dora_factors(ours):
        want = theirs(ids).logits
        gaps = {key: float((fn() - want).abs().max()) for key, fn in fns.items() if key != "peft"}
        timed = interleaved_ms(fns, rounds=rounds)
    peft_samples = timed["peft"]["samples_ms"]

    def ratio(key: str) -> float:
        pairs = zip(timed[key]["samples_ms"], peft_samples, strict=True)
        return statistics.median(ours_ms / peft_ms for ours_ms, peft_ms in pairs)

    result = {"batch": batch, "sequence": sequence}
    for key, t in timed.items():
        result.update({f"{key}_{q}": t[q] for q in ("p20_ms", "p50_ms", "p80_ms")})
    result["lowrank_over_peft"] = ratio("lowrank")
    result["lowrank_recomputed_over_peft"] = ratio("lowrank_recomputed")
    result["max_abs_logit_diff_vs_peft"] = gaps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1x1", "1x32", "4x128"],
                        help="batch x sequence of the input ids")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="", help="recorded as is (the machine's load, say)")
    parser.add_argument("--out", type=Path, help="results file (default: dora_inference-cpu.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    load_start = os.getloadavg()[0]
    ours, theirs = adapted()
    rows = []
    for text in args.shapes:
        batch, sequence = (int(v) for v in text.split("x"))
        rows.append(row(ours, theirs, (batch, sequence), args.rounds))
        print(rows[-1])
    extra = {"model": "LlamaForCausalLM hidden 512, 4 layers, 8 heads, intermediate 1376, "
                      "vocabulary 4096, float32",
             "adapters": f"DoRA rank {RANK}, alpha {ALPHA} on {', '.join(TARGETS)}",
             "threads": args.threads, "rounds": args.rounds, "peft": peft.__version__,
             "transformers": transformers.__version__, "load_average_1min_start": load_start,
             "load_average_1min_end": os.getloadavg()[0], "note": args.note}  # fmt: skip
    path = write_results("dora_inference", rows, extra, path=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
