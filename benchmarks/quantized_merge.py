"""`lowrank.io.merge_checkpoint` into scaled float8 checkpoints against the way people merge
into them today (dequantize with transformers, merge with PEFT, requantize), on CPU.

The checkpoints are synthetic: one Llama-2-7B decoder layer (`LAYER`: hidden 4096,
intermediate 11008; q, k, v, o, gate, up, down projections and two norms), its weights drawn
N(0, 0.02²), in two float8 layouts (`VARIANTS`) with a `config.json` that names them:

- `fp8-block`: transformers' fine-grained FP8 (DeepSeek-V3, Qwen3-FP8): `float8_e4m3fn`
  weights and a float32 `weight_scale_inv` per 128×128 block, `quant_method: fp8`;
- `fp8-channel`: compressed-tensors FP8-dynamic: a float32 `weight_scale` per output
  channel `(out, 1)`, `quant_method: compressed-tensors`;

and the same weights dequantized to bfloat16 (`bf16`, the unquantized baseline). The
adapter is a PEFT folder, rank 16, alpha 32, on the seven projections, with random factors.
Each route runs as its own process with one torch thread, its peak RSS recorded
(`checkpoint_tools.measure`) and its own merge time (from reading the checkpoint to the
merged file written, imports excluded):

- `lowrank`: `merge_checkpoint(base, adapter, out)` (float64, rounded once; scales kept
  where the merged values fit);
- `transformers + PEFT`: every tensor loaded (`safetensors.torch.load_file`), each adapted
  weight dequantized to bfloat16 by transformers' own `Fp8Dequantize` (the op behind
  `from_pretrained(..., dequantize=True)`), merged by PEFT's LoRA `Linear.merge()` (its
  ΔW = B·A·alpha/r), requantized by transformers' `Fp8Quantize` (absmax / 448 per block,
  clamp, cast to float8: new scales for every block; per channel with block `(1, in)`);
- `PEFT, stored scales`: the same in float32, divided by the stored scales, clamped to
  ±448 as transformers' quantizer does and cast to float8 (`.to(torch.float8_e4m3fn)`:
  the merged value is rounded to float32 first, then to float8);
- `lowrank bf16`: `merge_checkpoint` of the bfloat16 checkpoint (no quantization).

Rounds alternate the routes, `--repeat` of them. After the first round every output's
weights are compared (float64) with the exact merge `W8 · s + ΔW`: the relative error, and
how many float8 entries and scales differ from lowrank's output. Usage:
`python benchmarks/quantized_merge.py [--repeat 3] [--workdir DIR] [--note TEXT]` writes
`benchmarks/results/quantized_merge-cpu.json` (`--out` elsewhere); `--quick` merges a tiny
layer in this process (no peak RSS), for the test; `--report FILE.json` prints the docs
table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
import torch
from harness import RESULTS_DIR, write_results
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowrank import LoRA
from lowrank.io import Adapter, merge_checkpoint, save_adapter

LAYER = {"hidden_size": 4096, "intermediate_size": 11008}
QUICK_LAYER = {"hidden_size": 256, "intermediate_size": 384}
BLOCK, RANK, ALPHA = 128, 16, 32
FP8, FP8_MAX = torch.float8_e4m3fn, 448.0
VARIANTS = ("fp8-block", "fp8-channel")
ROUTES = ("lowrank", "transformers + PEFT", "PEFT, stored scales", "lowrank bf16")
SCALE_NAME = {"fp8-block": "weight_scale_inv", "fp8-channel": "weight_scale"}
CONFIGS = {
    "fp8-block": {
        "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK],
        "activation_scheme": "dynamic", "fmt": "e4m3",
    },
    "fp8-channel": {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        }},
    },
}  # fmt: skip
"""Each layout's `quantization_config` in `config.json`."""


def projections(layer: dict) -> dict[str, tuple[int, int]]:
    """`{weight key: (out, in)}` of the seven projections of decoder layer 0."""
    hidden, inter = layer["hidden_size"], layer["intermediate_size"]
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}  # fmt: skip
    return {f"model.layers.0.{name}.weight": shape for name, shape in shapes.items()}


def block_of(variant: str, shape: tuple[int, int]) -> tuple[int, int]:
    """The rows and columns one scale covers in `variant`."""
    return (BLOCK, BLOCK) if variant == "fp8-block" else (1, shape[1])


def expand(grid: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Each block's scale repeated over the entries of the block, `shape`."""
    rows = grid.repeat_interleave(block[0], 0)[: shape[0]]
    return rows.repeat_interleave(block[1], 1)[:, : shape[1]]


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` (float32) as float8 values and float32 scales `absmax / 448` per block."""
    grid = (math.ceil(w.shape[0] / block[0]), math.ceil(w.shape[1] / block[1]))
    peaks = _block_peaks(w.abs(), block, grid)
    scale = torch.where(peaks > 0, peaks / FP8_MAX, torch.ones_like(peaks))
    return (w / expand(scale, block, w.shape)).to(FP8), scale


def _block_peaks(a: torch.Tensor, block: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The largest entry of each block of `a` (zero-padded to whole blocks)."""
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[: a.shape[0], : a.shape[1]] = a
    return padded.view(grid[0], block[0], grid[1], block[1]).amax(dim=(1, 3))


def write_checkpoints(layer: dict, work: Path) -> dict[str, Path]:
    """The three checkpoints (`VARIANTS` and `bf16`) of one decoder layer, each in its own
    folder with a `config.json`; their safetensors files by name."""
    g = torch.Generator().manual_seed(0)
    hidden = layer["hidden_size"]
    norms = {f"model.layers.0.{n}.weight": torch.ones(hidden, dtype=torch.bfloat16)
             for n in ("input_layernorm", "post_attention_layernorm")}  # fmt: skip
    tensors: dict[str, dict[str, torch.Tensor]] = {v: dict(norms) for v in (*VARIANTS, "bf16")}
    for key, shape in projections(layer).items():
        w = torch.randn(shape, generator=g) * 0.02
        for variant in VARIANTS:
            w8, scale = quantize(w, block_of(variant, shape))
            tensors[variant][key] = w8
            tensors[variant][key.replace("weight", SCALE_NAME[variant])] = scale
        block = block_of("fp8-block", shape)
        w8, scale = tensors["fp8-block"][key], tensors["fp8-block"][key + "_scale_inv"]
        tensors["bf16"][key] = (w8.float() * expand(scale, block, shape)).bfloat16()
    model = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **layer,
             "num_hidden_layers": 1, "torch_dtype": "bfloat16"}  # fmt: skip
    paths = {}
    for variant, state in tensors.items():
        folder = work / variant
        folder.mkdir()
        config = dict(model)
        if variant in CONFIGS:
            config["quantization_config"] = CONFIGS[variant]
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        paths[variant] = folder / "model.safetensors"
        save_file(state, str(paths[variant]), metadata={"format": "pt"})
    return paths


def write_adapter(layer: dict, folder: Path) -> None:
    """A PEFT folder: rank `RANK`, alpha `ALPHA` on the seven projections, factors N(0, 0.02²)."""
    g = torch.Generator().manual_seed(1)
    forms = {}
    for key, (out, inp) in projections(layer).items():
        down = torch.randn(RANK, inp, generator=g) * 0.02
        up = torch.randn(out, RANK, generator=g) * 0.02
        forms[key.removesuffix(".weight")] = LoRA(down, up, scale=ALPHA / RANK)
    save_adapter(Adapter(forms), folder, "peft")


def _factors(adapter: Path, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    stem = "base_model.model." + key.removesuffix(".weight")
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return f.get_tensor(f"{stem}.lora_A.weight"), f.get_tensor(f"{stem}.lora_B.weight")


def peft_merged(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`weight` (its dtype) merged with the LoRA `(down, up)` by PEFT's own LoRA layer."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    out, inp = weight.shape
    base = torch.nn.Linear(inp, out, bias=False, device="meta")
    base.weight = torch.nn.Parameter(weight, requires_grad=False)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
    layer = LoraLinear(base, "default", config, r=RANK, lora_alpha=ALPHA)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(down)
        layer.lora_B["default"].weight.copy_(up)
    layer.merge()
    return layer.get_base_layer().weight.data


class _Quantizer:
    """The stand-in for the `hf_quantizer` transformers' FP8 ops read their settings from."""

    def __init__(self, block: tuple[int, int]) -> None:
        self.quantization_config = argparse.Namespace(weight_block_size=list(block),
                                                      scale_fmt=None)  # fmt: skip


def peer_merge(base: Path, adapter: Path, out: Path, variant: str, stored_scales: bool) -> None:
    """The `transformers + PEFT` route (`stored_scales`: `PEFT, stored scales`) from `base`
    to `out`."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    state = load_file(str(base))
    scale_name = SCALE_NAME[variant]
    for key in [k for k in state if k.endswith(f".{scale_name}")]:
        weight_key = key.replace(scale_name, "weight")
        w8, scale = state[weight_key], state[key]
        shape, block = tuple(w8.shape), block_of(variant, tuple(w8.shape))
        dtype = torch.float32 if stored_scales else torch.bfloat16
        weight = Fp8Dequantize(None)._dequantize_one(w8, scale, dtype)
        merged = peft_merged(weight, *_factors(adapter, weight_key))
        if stored_scales:
            quotient = merged / expand(scale, block, shape)
            state[weight_key] = quotient.clamp(-FP8_MAX, FP8_MAX).to(FP8)
            continue
        requantized = Fp8Quantize(_Quantizer(block))._quantize_one(weight_key, merged)
        state[weight_key] = requantized[weight_key]
        state[key] = requantized[weight_key.replace("weight", "weight_scale_inv")].to(scale.dtype)
    save_file(state, str(out), metadata={"format": "pt"})


def route_merge(
    route: str, variant: str, paths: dict[str, Path], adapter: Path, out: Path
) -> float:
    """Run `route` on `variant`'s checkpoint to `out`; its seconds."""
    start = time.perf_counter()
    if route == "lowrank":
        merge_checkpoint(paths[variant], adapter, out)
    elif route == "lowrank bf16":
        merge_checkpoint(paths["bf16"], adapter, out)
    else:
        peer_merge(paths[variant], adapter, out, variant, route == "PEFT, stored scales")
    return time.perf_counter() - start


def compare(
    variant: str, layer: dict, paths: dict[str, Path], adapter: Path, outputs: dict[str, Path]
) -> dict:
    """Per route: the largest relative error of its merged weights against the exact merge
    of its base (float64: `W8 · s + ΔW`, the bfloat16 checkpoint's `W + ΔW` for `lowrank
    bf16`), and the float8 entries and scales that differ from lowrank's output."""
    scale_name = SCALE_NAME[variant]
    found = {route: {"max_relative_error": 0.0, "differing_entries": 0,
                     "differing_entries_same_scale": 0, "entries_same_scale": 0,
                     "differing_scales": 0, "entries": 0} for route in outputs}  # fmt: skip
    with safe_open(str(paths[variant]), "pt") as b, safe_open(str(paths["bf16"]), "pt") as b16:
        opened = {route: safe_open(str(path), "pt") for route, path in outputs.items()}
        for key, shape in projections(layer).items():
            block = block_of(variant, shape)
            scale = b.get_tensor(key.replace("weight", scale_name)).double()
            down, up = (t.double() for t in _factors(adapter, key))
            delta = ALPHA / RANK * up @ down
            exact = b.get_tensor(key).double() * expand(scale, block, shape) + delta
            exact16 = b16.get_tensor(key).double() + delta
            ours = opened["lowrank"]
            ours8 = ours.get_tensor(key).view(torch.uint8)
            our_scale = ours.get_tensor(key.replace("weight", scale_name))
            for route, f in opened.items():
                w = f.get_tensor(key)
                row = found[route]
                if w.dtype == FP8:
                    s = f.get_tensor(key.replace("weight", scale_name))
                    differing = w.view(torch.uint8) != ours8
                    same = expand(s == our_scale, block, shape)
                    row["differing_entries"] += int(differing.sum())
                    row["differing_entries_same_scale"] += int((differing & same).sum())
                    row["entries_same_scale"] += int(same.sum())
                    row["differing_scales"] += int((s != our_scale).sum())
                    got = w.double() * expand(s.double(), block, shape)
                else:
                    got = w.double()
                row["entries"] += w.numel()
                want = exact16 if route == "lowrank bf16" else exact
                error = float((got - want).norm() / want.norm())
                row["max_relative_error"] = max(row["max_relative_error"], error)
    for key in ("differing_entries", "differing_entries_same_scale", "entries_same_scale",
                "differing_scales"):  # another dtype: its bytes are not comparable
        found["lowrank bf16"][key] = None
    return found


def _import_peers() -> None:
    """Import PEFT and transformers' FP8 ops, so that no route's time includes it."""
    import peft.tuners.lora.layer  # noqa: F401
    import transformers.integrations.finegrained_fp8  # noqa: F401


def worker(args: argparse.Namespace) -> None:
    """One route in this process (`--worker`): writes `{"merge_s": …}` to `--result`."""
    torch.set_num_threads(1)
    _import_peers()
    paths = {v: args.workdir / v / "model.safetensors" for v in (*VARIANTS, "bf16")}
    seconds = route_merge(args.worker, args.variant, paths, args.workdir / "adapter", args.merged)
    args.result.write_text(json.dumps({"merge_s": seconds}))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


def run(args: argparse.Namespace) -> Path:
    """Write the checkpoints and the adapter, time every route, compare, write the results."""
    from checkpoint_tools import measure

    layer = QUICK_LAYER if args.quick else LAYER
    repeat = 1 if args.quick else args.repeat
    work = Path(tempfile.mkdtemp(prefix="lowrank-quantized-merge-", dir=args.workdir))
    load = [os.getloadavg()[0]]
    if args.quick:
        _import_peers()
    try:
        paths = write_checkpoints(layer, work)
        write_adapter(layer, work / "adapter")
        samples: dict[tuple[str, str], list[dict]] = {
            (v, r): [] for v in VARIANTS for r in ROUTES
        }
        errors = {}
        for round_ in range(repeat):
            for variant in VARIANTS:
                outputs = {}
                for route in ROUTES:
                    out = work / "out" / variant / f"{_slug(route)}.safetensors"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.unlink(missing_ok=True)
                    if args.quick:
                        torch.set_num_threads(1)
                        sample = {"merge_s": route_merge(route, variant, paths,
                                                         work / "adapter", out),
                                  "wall_s": None, "peak_rss_mb": None}  # fmt: skip
                    else:
                        result = work / "result.json"
                        command = [sys.executable, __file__, "--worker", route,
                                   "--variant", variant, "--workdir", str(work),
                                   "--merged", str(out), "--result", str(result)]  # fmt: skip
                        sample = {**measure(command), **json.loads(result.read_text())}
                    samples[variant, route].append(sample)
                    outputs[route] = out
                if round_ == 0:
                    errors[variant] = compare(variant, layer, paths, work / "adapter", outputs)
        load.append(os.getloadavg()[0])
        sizes = {name: path.stat().st_size for name, path in paths.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for (variant, route), runs in samples.items():
        rss = [r["peak_rss_mb"] for r in runs]
        rows.append({
            "variant": variant, "route": route,
            "merge_p50_s": statistics.median(r["merge_s"] for r in runs),
            "merge_s": [r["merge_s"] for r in runs],
            "wall_s": [r["wall_s"] for r in runs],
            "peak_rss_mb": None if None in rss else statistics.median(rss),
            "peak_rss_mb_runs": rss,
            **errors[variant][route],
        })  # fmt: skip
    by = {(row["variant"], row["route"]): row for row in rows}
    ratios = {}
    for variant in VARIANTS:
        ours = by[variant, "lowrank"]
        ratios[variant] = {
            f"time_lowrank_vs_{_slug(route)}":
                ours["merge_p50_s"] / by[variant, route]["merge_p50_s"]
            for route in ROUTES[1:]
        }  # fmt: skip
        if ours["peak_rss_mb"] is not None:
            ratios[variant].update({
                f"peak_rss_lowrank_vs_{_slug(route)}":
                    ours["peak_rss_mb"] / by[variant, route]["peak_rss_mb"]
                for route in ROUTES[1:]
            })  # fmt: skip
    from importlib.metadata import version

    extra = {
        "quick": args.quick,
        "checkpoint": {
            "layer": layer,
            "weights": projections(layer),
            "block": BLOCK,
            "bytes": sizes,
            "float8": str(FP8),
        },
        "adapter": {"format": "peft", "rank": RANK, "alpha": ALPHA},
        "threads": 1,
        "ratios": ratios,
        "versions": {name: version(name) for name in ("peft", "transformers", "safetensors")},
        "repeat": repeat,
        "load_average_1min": {"start": load[0], "end": load[1]},
        "note": args.note,
    }
    out = args.out or RESULTS_DIR / "quantized_merge-cpu.json"
    return write_results("quantized_merge", rows, extra, path=out)


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def report(result: dict) -> str:
    """The Markdown table (and its caption) of a result file."""
    env, ckpt, load = result["environment"], result["checkpoint"], result["load_average_1min"]
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    layer = ckpt["layer"]
    lines = [
        f"Measured on {env['device']}, one torch thread per merge, torch {env['torch']}, "
        f"{versions}, {env['date']}; command `{env['command']}`. Checkpoint: one decoder layer, "
        f"hidden {layer['hidden_size']}, intermediate {layer['intermediate_size']} "
        f"(seven projections, {sum(a * b for a, b in ckpt['weights'].values()):,} float8 "
        f"weights, {ckpt['block']}×{ckpt['block']} blocks or per channel); adapter: PEFT, rank "
        f"{result['adapter']['rank']}, alpha {result['adapter']['alpha']}, on all seven. "
        f"1-minute load average {load['start']:.1f} at the start, {load['end']:.1f} at the end"
        + (f"; {result['note']}" if result.get("note") else "") + ".",
        "",
        "| checkpoint | route | merge p50 (s) | runs (s) | lowrank ÷ route time "
        "| peak RSS (MiB) | largest relative error vs exact | float8 entries ≠ lowrank's "
        "| of those under the same scale | scales ≠ lowrank's |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lowrank = {row["variant"]: row for row in result["rows"] if row["route"] == "lowrank"}
    for row in result["rows"]:
        variant, route, ours = row["variant"], row["route"], lowrank[row["variant"]]
        runs = ", ".join(f"{t:.2f}" for t in row["merge_s"])
        differing = same = "–"
        if row["differing_entries"] is not None:
            differing = f"{row['differing_entries']:,} of {row['entries']:,}"
            same = f"{row['differing_entries_same_scale']:,} of {row['entries_same_scale']:,}"
        lines.append(
            f"| {variant} | {route} | {row['merge_p50_s']:.2f} | {runs} "
            f"| {ours['merge_p50_s'] / row['merge_p50_s']:.2f} "
            f"| {_cell(row['peak_rss_mb'], ',.0f')} | {row['max_relative_error']:.2e} "
            f"| {differing} | {same} | {_cell(row['differing_scales'], ',')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a `--repeat` below 1 exits with a usage error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every route")
    parser.add_argument("--workdir", type=Path, help="where the synthetic files go (deleted after)")
    parser.add_argument("--quick", action="store_true", help="a tiny layer, in this process")
    parser.add_argument("--out", type=Path, help="the result file (default results/…-cpu.json)")
    parser.add_argument("--note", help="a note on the machine stored in the result file")
    parser.add_argument("--report", type=Path, help="print the table of this result file")
    parser.add_argument("--worker", choices=ROUTES, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--merged", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = harness.parsed(parser, argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if harness.print_report(args.report, report):
        return
    if args.worker is not None:
        worker(args)
        return
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    path = run(args)
    print(report(json.loads(path.read_text())))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
