"""`lowrank merge` of a PEFT LoRA and DoRA into an LLM checkpoint against PEFT's own route, on CPU.

Builds a transformers `LlamaForCausalLM` from `LLAMA` (hidden 1024, 8 layers, intermediate
2816, vocabulary 32000, untied embeddings: 168,313,856 parameters) in float32 and writes it
once with `save_pretrained`; then two PEFT adapters saved by PEFT itself with
`save_pretrained`, rank 16 (alpha 32) on `q,k,v,o,gate,up,down_proj` of every layer, with
random factors (and, for DoRA, a magnitude perturbed from ‖W‖): `lora` and `dora`
(`use_dora=True`). Each merge then runs as its own process, timed (wall clock) with its
peak resident memory, by `checkpoint_tools.measure`:

- `lowrank merge` : `lowrank merge model.safetensors ADAPTER -o merged.safetensors`;
- `lowrank merge, bare file`: the same with the checkpoint hard-linked into a folder
  without `config.json`, so names alone give the module types (with the `config.json` of
  this Llama they do too, `lowrank.io.module_types.NAMED_MODELS`; a model the table lacks
  is built on the meta device, `described_model`);
- `PEFT merge` : `LlamaForCausalLM.from_pretrained` (float32), `PeftModel.from_pretrained`,
  `merge_and_unload()` and `save_pretrained` (`PEFT_MERGE`);
- `idle`: `python -c "import lowrank.cli"`, the interpreter and torch alone.

The six merges alternate, `--repeat` rounds. The largest relative difference between
`lowrank merge`'s and PEFT's outputs over `CHECKED` (float32 rounding where both merge the
same ΔW) is recorded per adapter; the bare file's output must equal `lowrank merge`'s.
Usage: `python benchmarks/merge_llm.py [--repeat 3] [--workdir DIR] [--note TEXT]`; writes
`benchmarks/results/merge_llm-cpu.json`. `--report FILE.json` prints the docs table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import harness
import torch
from checkpoint_tools import MB, measure
from harness import write_results
from safetensors import safe_open

RANK, ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
"""The `LlamaConfig` of the benchmark's model."""
ADAPTERS = ("lora", "dora")
ROUTES = ("lowrank merge", "lowrank merge, bare file", "PEFT merge")
CHECKED = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.{last}.mlp.down_proj.weight",
    "model.layers.{last}.mlp.gate_proj.weight",
)
"""Merged tensors compared between the two routes (`{last}`: the last layer)."""
# PEFT's route from a base folder and an adapter folder to a merged model folder.
PEFT_MERGE = """
import sys
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

base, adapter, out = sys.argv[1:4]
model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def write_model(config: dict, folder: Path) -> tuple[Path, int]:
    """`LlamaForCausalLM(config)` (seeded, float32) saved with `save_pretrained` in `folder`;
    its single safetensors file and its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.save_pretrained(folder)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one safetensors file in {folder}, got {files}")
    return files[0], sum(p.numel() for p in model.parameters())


def write_adapter(base: Path, folder: Path, dora: bool, seed: int) -> dict[str, int]:
    """A PEFT LoRA (DoRA where `dora`) on `TARGETS` of the model in `base`, saved by PEFT in
    `folder`, with random factors (B is zero at PEFT's initialisation, which would merge
    nothing) and a DoRA magnitude of ‖W‖ · (1 + noise); its layer and parameter counts."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=dora)
    model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    layers = params = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                layers += "lora_A" in name
                params += p.numel()
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
                params += p.numel()
    model.save_pretrained(folder)
    return {"layers": layers, "params": params}


def compare(first: Path, second: Path, keys: list[str]) -> float:
    """The largest ‖first − second‖ / ‖second‖ over `keys` of two checkpoints."""
    worst = 0.0
    with safe_open(str(first), "pt") as a, safe_open(str(second), "pt") as b:
        for key in keys:
            x, y = a.get_tensor(key).double(), b.get_tensor(key).double()
            worst = max(worst, float((x - y).norm() / y.norm()))
    return worst


def commands(
    base: Path, bare: Path, adapter: Path, work: Path
) -> dict[str, tuple[list[str], Path]]:
    """Each route's command line and the merged checkpoint it writes, by route name (`bare`:
    the checkpoint `base` without its `config.json`); every output lies in its own folder
    under `work`, which must exist before the command runs."""
    python = sys.executable
    routes = {}
    for route, checkpoint in (("lowrank merge", base), ("lowrank merge, bare file", bare)):
        out = work / route.replace(", ", "-").replace(" ", "-") / "merged.safetensors"
        merge = ["-m", "lowrank.cli", "merge", str(checkpoint), str(adapter), "-o", str(out)]
        routes[route] = ([python, *merge], out)
    peft_out = work / "peft" / "model.safetensors"
    peft = [python, "-c", PEFT_MERGE, str(base.parent), str(adapter), str(peft_out.parent)]
    return {**routes, "PEFT merge": (peft, peft_out)}


def operation(route: str, adapter: str) -> str:
    """The row name of `route` merging `adapter`."""
    return f"{route}, {adapter}"


def run(work: Path, repeat: int, note: str | None, config: dict = LLAMA) -> Path:
    """Build the model and adapters in `work`, time the merges, write the result file."""
    base, params = write_model(config, work / "model")
    bare = work / "bare" / base.name
    bare.parent.mkdir()
    os.link(base, bare)
    adapters = {
        name: write_adapter(base.parent, work / name, name == "dora", seed)
        for seed, name in enumerate(ADAPTERS, 1)
    }
    routes = {name: commands(base, bare, work / name, work / f"out-{name}") for name in ADAPTERS}
    samples: dict[str, list[dict[str, float]]] = {
        operation(route, name): [] for name in ADAPTERS for route in ROUTES
    }
    samples["idle"] = []
    last = config["num_hidden_layers"] - 1
    checked = [key.format(last=last) for key in CHECKED]
    differences: dict[str, float] = {}
    load = [os.getloadavg()[0]]
    for round_ in range(repeat):
        for name in ADAPTERS:
            for route, (command, output) in routes[name].items():
                shutil.rmtree(output.parent, ignore_errors=True)
                output.parent.mkdir(parents=True)
                samples[operation(route, name)].append(measure(command))
            if round_ == 0:
                lowrank_out, bare_out, peft_out = (routes[name][route][1] for route in ROUTES)
                differences[name] = compare(lowrank_out, peft_out, checked)
                if compare(bare_out, lowrank_out, checked) != 0:
                    raise RuntimeError(f"{name}: the bare file merged to other weights")
        samples["idle"].append(measure([sys.executable, "-c", "import lowrank.cli"]))
    load.append(os.getloadavg()[0])
    rows = []
    for name, runs in samples.items():
        walls = [r["wall_s"] for r in runs]
        rows.append(
            {
                "operation": name,
                "p50_s": statistics.median(walls),
                "wall_s": walls,
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                "peak_rss_mb_runs": [r["peak_rss_mb"] for r in runs],
            }
        )
    by_name = {row["operation"]: row for row in rows}
    ratios = {}
    for name in ADAPTERS:
        ours, bare_file, peft = (by_name[operation(route, name)] for route in ROUTES)
        ratios[name] = {
            "time_bare_file_vs_peft": bare_file["p50_s"] / peft["p50_s"],
            "time_lowrank_vs_peft": ours["p50_s"] / peft["p50_s"],
            "time_lowrank_vs_peft_per_run": [
                a / b for a, b in zip(ours["wall_s"], peft["wall_s"], strict=True)
            ],
            "peak_rss_lowrank_vs_peft": ours["peak_rss_mb"] / peft["peak_rss_mb"],
            "max_relative_difference": differences[name],
            **adapters[name],
        }
    from importlib.metadata import version

    extra = {
        "checkpoint": {
            "model": "LlamaForCausalLM",
            "config": config,
            "params": params,
            "bytes": base.stat().st_size,
            "dtype": "float32",
        },
        "adapter": {"format": "peft", "rank": RANK, "alpha": ALPHA, "targets": TARGETS},
        "adapters": ratios,
        "checked_tensors": checked,
        "versions": {name: version(name) for name in ("peft", "transformers", "safetensors")},
        "repeat": repeat,
        "load_average_1min": {"start": load[0], "end": load[1]},
        "note": note,
    }
    return write_results("merge_llm", rows, extra)


def report(result: dict) -> str:
    """The Markdown table (and its caption) of a result file."""
    env, load, ckpt = result["environment"], result["load_average_1min"], result["checkpoint"]
    adapter, rows = result["adapter"], {row["operation"]: row for row in result["rows"]}
    config = ckpt["config"]
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    lines = [
        f"Measured on {env['device']} ({env['cpu_threads']} threads), torch {env['torch']}, "
        f"{versions}, {env['date']}; command `{env['command']}`. Model: {ckpt['model']}, "
        f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, intermediate "
        f"{config['intermediate_size']}, vocabulary {config['vocab_size']}: {ckpt['params']:,} "
        f"{ckpt['dtype']} parameters ({ckpt['bytes'] / MB:,.0f} MiB). Adapters: PEFT, rank "
        f"{adapter['rank']}, alpha {adapter['alpha']}, on {', '.join(adapter['targets'])}. "
        f"1-minute load average {load['start']:.1f} at the start, {load['end']:.1f} at the end"
        + (f"; {result['note']}" if result.get("note") else "")
        + ".",
        "",
        "| adapter | lowrank merge p50 (s) | PEFT p50 (s) | lowrank ÷ PEFT time "
        "| same-round ratios | lowrank peak RSS (MiB) | PEFT peak RSS (MiB) "
        "| lowrank ÷ PEFT RSS | largest relative difference | bare file p50 (s) "
        "| bare file ÷ PEFT time | bare file peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ratio in result["adapters"].items():
        ours, bare_file, peft = (rows[operation(route, name)] for route in ROUTES)
        runs = ", ".join(f"{r:.2f}" for r in ratio["time_lowrank_vs_peft_per_run"])
        label = f"{'DoRA' if name == 'dora' else 'LoRA'} ({ratio['layers']} layers)"
        lines.append(
            f"| {label} | {ours['p50_s']:.2f} | {peft['p50_s']:.2f} | "
            f"{ratio['time_lowrank_vs_peft']:.2f} | {runs} | {ours['peak_rss_mb']:,.0f} | "
            f"{peft['peak_rss_mb']:,.0f} | {ratio['peak_rss_lowrank_vs_peft']:.2f} | "
            f"{ratio['max_relative_difference']:.1e} | {bare_file['p50_s']:.2f} | "
            f"{ratio['time_bare_file_vs_peft']:.2f} | {bare_file['peak_rss_mb']:,.0f} |"
        )
    idle = rows["idle"]
    lines += [
        "",
        f'`idle` (`python -c "import lowrank.cli"`): {idle["p50_s"]:.2f} s, '
        f"{idle['peak_rss_mb']:,.0f} MiB. Peak RSS is the median over the runs.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a `--repeat` below 1 exits with a usage error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the six merges")
    parser.add_argument("--workdir", type=Path, help="where the synthetic files go (deleted after)")
    parser.add_argument("--note", help="a note on the machine stored in the result file")
    parser.add_argument("--report", type=Path, help="print the table of this result file")
    args = harness.parsed(parser, argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if harness.print_report(args.report, report):
        return
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lowrank-merge-llm-", dir=args.workdir))
    try:
        path = run(work, args.repeat, args.note)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(json.loads(path.read_text())))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
