"""Host time of `lowrank.nn`'s model-wide calls against PEFT, on tiny GPT-2 models.

For GPT-2 configs of 24 and 96 layers (`n_embd` 64, random weights; "all-linear" targets,
four adapters a layer), in one process, best of `--repeats`:

- `inject` against PEFT's `get_peft_model`, `merge_and_unload` against PEFT's, and
  `unload`, each on a fresh copy of the model;
- `swap_adapter` of a small Llama (q/v adapters) with nothing else holding its weights,
  and with a `state_dict()` kept, which holds every weight's memory and so makes every
  write search the live objects for weights tied outside the model (`lowrank.nn.ties`);
- `merge_and_unload` of eight bias-free `--width`² linear layers (rank 16, alpha 32) in
  float32 and bfloat16 against PEFT's, where the arithmetic rather than the walk over the
  model dominates, with each merged weight's largest error against a float64 merge.

Usage: `python benchmarks/nn_overhead.py [--layers 24 96] [--repeats 3] [--width 4096]
[--out PATH]`;
writes `benchmarks/results/nn_overhead-cpu.json`. Needs transformers and peft. Run with
`PYTHONPATH` at an older copy of the package to time it (`lowrank_from` records which).
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch
from harness import write_results

from lowrank import nn as lnn


def best_s(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of `repeats` runs of `fn()`, in seconds."""
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gpt2(layers: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    return GPT2LMHeadModel(config)


def model_calls(layers: int, repeats: int) -> dict:
    import peft

    base = gpt2(layers)
    settings = {"rank": 4, "alpha": 8}

    def injected() -> torch.nn.Module:
        model = copy.deepcopy(base)
        lnn.inject(model, "all-linear", **settings)
        return model

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    prepared = {name: [] for name in ("merge", "unload", "peft_merge")}

    def timed(name: str, make: Callable[[], object], call: Callable[[object], object]) -> float:
        prepared[name] = [make() for _ in range(repeats)]
        return best_s(lambda: call(prepared[name].pop()), repeats)

    return {
        "layers": layers,
        "adapters": 4 * layers,
        "inject_s": best_s(injected, repeats),
        "peft_get_peft_model_s": best_s(
            lambda: peft.get_peft_model(copy.deepcopy(base), config), repeats
        ),
        "merge_and_unload_s": timed("merge", injected, lnn.merge_and_unload),
        "peft_merge_and_unload_s": timed(
            "peft_merge",
            lambda: peft.get_peft_model(copy.deepcopy(base), config),
            lambda model: model.merge_and_unload(),
        ),
        "unload_s": timed("unload", injected, lnn.unload),
    }


def wide_merge(width: int, layers: int, dtype: torch.dtype, repeats: int) -> dict:
    """`merge_and_unload` against PEFT's on `layers` bias-free `width × width` linears in
    `dtype` (rank 16, alpha 32, trained-looking factors), and each result's largest error
    against W + ΔW computed in float64."""
    import peft

    torch.manual_seed(0)
    base = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
    base = base.to(dtype)
    model = copy.deepcopy(base)
    lnn.inject(model, "all-linear", rank=16, alpha=32)
    with torch.no_grad():
        for adapter in lnn.adapters(model).values():
            adapter.up.normal_(std=0.02)
    factors = {name: (a.down.detach(), a.up.detach()) for name, a in lnn.adapters(model).items()}
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")

    def peft_copy() -> torch.nn.Module:
        tuned = peft.get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for name, (down, up) in factors.items():
                layer = tuned.base_model.model.get_submodule(name)
                layer.lora_A["default"].weight.copy_(down)
                layer.lora_B["default"].weight.copy_(up)
        return tuned

    def error(merged: torch.nn.Module) -> float:
        worst = 0.0
        for name, (down, up) in factors.items():
            exact = base.get_submodule(name).weight.double() + 2.0 * up.double() @ down.double()
            got = merged.get_submodule(name).weight.double()
            worst = max(worst, float((got - exact).abs().max() / exact.abs().max()))
        return worst

    ours = [copy.deepcopy(model) for _ in range(repeats)]
    theirs = [peft_copy() for _ in range(repeats)]
    row = {
        "width": width,
        "layers": layers,
        "dtype": str(dtype).removeprefix("torch."),
        "merge_and_unload_s": best_s(
            lambda: ours.append(lnn.merge_and_unload(ours.pop(0))), repeats
        ),
        "peft_merge_and_unload_s": best_s(
            lambda: theirs.append(theirs.pop(0).merge_and_unload()), repeats
        ),
    }
    row["error"] = error(ours[-1])
    row["peft_error"] = error(theirs[-1])
    return row


def swap_calls(repeats: int) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=128)  # fmt: skip
    model = LlamaForCausalLM(config)
    lnn.inject(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    lnn.merge(model)
    state = {key: value.clone() for key, value in lnn.adapter_state_dict(model).items()}
    rows = [{"case": "nothing else holds the weights",
             "swap_s": best_s(lambda: lnn.swap_adapter(model, state), repeats)}]  # fmt: skip
    kept = model.state_dict()
    rows.append({"case": "a state_dict() kept",
                 "swap_s": best_s(lambda: lnn.swap_adapter(model, state), repeats),
                 "live_objects": len(gc.get_objects())})  # fmt: skip
    del kept
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[24, 96])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=4096, help="of the wide-merge layers")
    parser.add_argument("--out", type=Path, help="results file (default: nn_overhead-cpu.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the calls are host work; one thread keeps the timings steady
    rows = [model_calls(layers, args.repeats) for layers in args.layers]
    for row in rows:
        print(row)
    swaps = swap_calls(args.repeats)
    for row in swaps:
        print(row)
    wide = [wide_merge(args.width, 8, dtype, args.repeats)
            for dtype in (torch.float32, torch.bfloat16)]  # fmt: skip
    for row in wide:
        print(row)
    lowrank_at = str(Path(lnn.__file__).parents[2])
    extra = {"swap": swaps, "wide_merge": wide, "threads": 1, "lowrank_from": lowrank_at}
    path = write_results("nn_overhead", rows, extra, path=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
