"""Matching user regexes: lowrank's matcher (`lowrank._regex`: `re` itself where a bound on
its backtracking is small, else a linear-time automaton) against `re` and PEFT's own
matching functions, on CPU.

The module names are those of a transformers `LlamaForCausalLM` built on the meta device
(`LLAMA`: 32 layers, 291 modules, ≈ 36 characters each; nothing downloaded). Measured:

- per module name, for each pattern of `PATTERNS` (real ones: PEFT's `.*\\.(q_proj|v_proj)`,
  Unsloth's vision `target_modules`, a `rank_pattern` key in PEFT's wrapping
  `(.*\\.)?(key)$`, `^(?!.*lm_head).*`): lowrank (`_regex.fullmatch` for a `target_modules`
  string, `formats.peft.pattern_key` for a key), `re` (`re.fullmatch` / `re.match`) and
  PEFT (`check_target_module_exists` with a `LoraConfig(target_modules=…)`, and
  `get_pattern_key`, which `LoraModel` calls per module), each over every name, cold
  (every cache emptied first: lowrank's automata, `re`'s compiled patterns) and warm
  (`harness.interleaved_ms`, the three in turn each round); all three must agree on every
  name;
- loading a PEFT folder of `LOAD_LAYERS` decoder layers × 7 projections (rank 4, 8 or 16 in
  turn, written by `lowrank.io.save_adapter`, which puts each layer of another rank than the
  most common in `rank_pattern` and `alpha_pattern`): the whole `lowrank.io.load_adapter`,
  lowrank's resolution of the keys alone (`formats.peft.module_settings` over the names) and
  PEFT's (`get_pattern_key` for the rank and the alpha of every name, as `LoraModel` does),
  each with empty caches, and the states of the keys' automata in all;
- hostile regexes (`HOSTILE`): lowrank's time on a name of the given length, and `re`'s in a
  subprocess killed after `--cap` seconds (recorded as `null` with `re_timed_out`).

Usage: `python benchmarks/pattern_matching.py [--repeat 5] [--cap 10] [--note TEXT]` writes
`benchmarks/results/pattern_matching-cpu.json` (`--out` elsewhere); `--quick` runs a
2-layer model, a 4-layer folder and short hostile names (for the test); `--report FILE.json`
prints the docs table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness
import torch
from harness import RESULTS_DIR, interleaved_ms, write_results

from lowrank import LoRA, _regex
from lowrank.io import Adapter, load_adapter, save_adapter
from lowrank.io.formats import peft as peft_format

LLAMA = {"num_hidden_layers": 32, "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 128}  # fmt: skip
"""The `LlamaConfig` the module names come from (sizes do not change them)."""
UNSLOTH_VISION = (
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense).*?"
    r"(?:k_proj|v_proj|q_proj|out_proj|fc1|fc2|o_proj|gate_proj|up_proj|down_proj).*?)|"
    r"(?:\bmodel\.layers\.[\d]{1,}\.(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense)\."
    r"(?:(?:k_proj|v_proj|q_proj|out_proj|fc1|fc2|o_proj|gate_proj|up_proj|down_proj)))"
)
"""Unsloth's `get_peft_regex` output for a vision model's language layers."""
PATTERNS = {
    "q/v suffix": ("target_modules", r".*\.(q_proj|v_proj)"),
    "Unsloth's vision target_modules": ("target_modules", UNSLOTH_VISION),
    "a rank_pattern key": ("rank_pattern", r"layers\.\d+\.self_attn\.q_proj"),
    "all but lm_head": ("target_modules", r"^(?!.*lm_head).*"),
}
"""Row name → (the config field, the pattern as the user writes it)."""
MATCHERS = ("lowrank", "re", "PEFT")
LOAD_LAYERS, LOAD_RANKS, LOAD_SIZE = 80, (4, 8, 16), 32
HOSTILE = {
    "(?:a?){4090}b": ("(?:a?){4090}b", "a", 512),
    "(a|aa)*c": ("(a|aa)*c", "a", 45),
    "(.*\\.)?(.*.*.*.*.*.*x)$": ("(.*\\.)?(.*.*.*.*.*.*x)$", "a.", 150),
}
"""Row name → (regex, the unit repeated to make the name, repeats); `re.fullmatch` is timed
for the first two, `re.match` (PEFT's key wrapping) for the third."""
QUICK_HOSTILE_REPEATS = {"(?:a?){4090}b": 16, "(a|aa)*c": 24, "(.*\\.)?(.*.*.*.*.*.*x)$": 20}
RE_WORKER = """
import re, sys, time
regex, name, how = sys.argv[1:4]
start = time.perf_counter()
getattr(re, how)(regex, name)
print(time.perf_counter() - start)
"""


def llama_names(layers: int) -> list[str]:
    """Every named module of a `LlamaForCausalLM` of `layers` layers, built on meta."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, "num_hidden_layers": layers}))
    return [name for name, _ in model.named_modules() if name]


def empty_caches() -> None:
    """Forget every compiled pattern: lowrank's automata and `re`'s cache."""
    _regex._MATCHERS.clear()
    _regex._FIRSTS.clear()
    re.purge()


def matchers(field: str, pattern: str) -> dict[str, Callable[[str], bool]]:
    """`{matcher: whether it selects a module name}` for `pattern` in config `field`."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    if field == "target_modules":
        config = LoraConfig(target_modules=pattern)
        return {
            "lowrank": lambda name: _regex.fullmatch(pattern, name),
            "re": lambda name: re.fullmatch(pattern, name) is not None,
            "PEFT": lambda name: bool(check_target_module_exists(config, name)),
        }
    wrapped = rf"(.*\.)?({pattern})$"
    return {
        "lowrank": lambda name: peft_format.pattern_key({pattern: 4}, name, "config") is not None,
        "re": lambda name: re.match(wrapped, name) is not None,
        "PEFT": lambda name: get_pattern_key([pattern], name) == pattern,
    }


def _every_name(fn: Callable[[str], bool], names: list[str]) -> Callable[[], list[bool]]:
    return lambda: [fn(name) for name in names]


def cold_ms(fn: Callable[[], object], repeat: int) -> list[float]:
    """Milliseconds of `fn()` right after `empty_caches()`, `repeat` times."""
    times = []
    for _ in range(repeat):
        empty_caches()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def pattern_rows(names: list[str], repeat: int) -> list[dict]:
    """One row per pattern and matcher: µs per name, cold and warm."""
    rows = []
    for label, (field, pattern) in PATTERNS.items():
        runs = {key: _every_name(fn, names) for key, fn in matchers(field, pattern).items()}
        answers = {key: run() for key, run in runs.items()}
        if len({tuple(a) for a in answers.values()}) != 1:
            raise RuntimeError(f"{label}: the matchers disagree")
        warm = interleaved_ms(runs, rounds=max(repeat, 3))
        for key, run in runs.items():
            cold = cold_ms(run, repeat)
            rows.append({
                "case": "per name", "pattern": label, "field": field, "regex": pattern,
                "matcher": key, "names": len(names), "selected": sum(answers[key]),
                "cold_us_per_name": statistics.median(cold) * 1e3 / len(names),
                "cold_ms": cold,
                "warm_us_per_name": warm[key]["p50_ms"] * 1e3 / len(names),
                "warm_ms": warm[key]["samples_ms"],
            })  # fmt: skip
    return rows


def write_folder(layers: int, folder: Path) -> list[str]:
    """A PEFT folder written by lowrank with a LoRA on the 7 projections of `layers` decoder
    layers (ranks `LOAD_RANKS` in turn, alpha = 2 · rank); the module names."""
    names = [n for n in llama_names(layers) if n.rsplit(".", 1)[-1].endswith("_proj")]
    g = torch.Generator().manual_seed(0)
    forms = {}
    for i, name in enumerate(names):
        rank = LOAD_RANKS[i % len(LOAD_RANKS)]
        down = torch.randn(rank, LOAD_SIZE, generator=g)
        up = torch.randn(LOAD_SIZE, rank, generator=g)
        forms[name] = LoRA(down, up, scale=2.0)
    save_adapter(Adapter(forms), folder, "peft")
    return names


def load_rows(layers: int, work: Path, repeat: int) -> tuple[list[dict], dict]:
    """Load the folder of `write_folder` and resolve its keys, lowrank's way and PEFT's."""
    from peft.utils.other import get_pattern_key

    folder = work / "peft"
    names = write_folder(layers, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    ranks, alphas = config["rank_pattern"], config["alpha_pattern"]

    def peft_resolution() -> list[tuple[int, float]]:
        return [
            (ranks.get(get_pattern_key(ranks.keys(), n), config["r"]),
             alphas.get(get_pattern_key(alphas.keys(), n), config["lora_alpha"]))
            for n in names
        ]  # fmt: skip

    def lowrank_resolution() -> list[tuple[int, float]]:
        return [peft_format.module_settings(config, n, "config") for n in names]

    if lowrank_resolution() != peft_resolution():
        raise RuntimeError("lowrank and PEFT resolve the rank_pattern keys differently")
    loaded = load_adapter(folder)
    peft_ranks = dict(zip(names, (rank for rank, _ in peft_resolution()), strict=True))
    if {name: form.rank for name, form in loaded.layers.items()} != peft_ranks:
        raise RuntimeError("load_adapter read other ranks than PEFT resolves")
    timed = {
        "lowrank load_adapter": lambda: load_adapter(folder),
        "lowrank key resolution": lowrank_resolution,
        "PEFT key resolution": peft_resolution,
    }
    rows = []
    for key, fn in timed.items():
        cold = cold_ms(fn, repeat)
        rows.append({"case": "load", "matcher": key, "p50_s": statistics.median(cold) / 1e3,
                     "runs_s": [t / 1e3 for t in cold]})  # fmt: skip
    literal = sum(_regex.literal(key) is not None for key in ranks)
    folder_info = {"layers": len(names), "rank_pattern_keys": len(ranks),
                   "alpha_pattern_keys": len(alphas), "decoder_layers": layers,
                   "literal_keys": literal}  # fmt: skip
    return rows, folder_info


def hostile_rows(repeats: dict[str, int], repeat: int, cap: float) -> list[dict]:
    """lowrank's time on the hostile regexes `repeats` names (of `HOSTILE`, with the repeats
    of their unit making the name; median of `repeat`, caches emptied) and `re`'s in a
    subprocess killed after `cap` seconds."""
    rows = []
    for label, count in repeats.items():
        regex, unit, _ = HOSTILE[label]
        name = unit * count
        how = "match" if regex.endswith("$") else "fullmatch"
        ours = getattr(_regex, how)
        answers = []
        cold = [t / 1e3 for t in cold_ms(lambda: answers.append(ours(regex, name)), repeat)]  # noqa: B023
        states = _regex.compiled(regex).size
        command = [sys.executable, "-c", RE_WORKER, regex, name, how]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=cap, check=True)
            re_s, timed_out = float(done.stdout), False
        except subprocess.TimeoutExpired:
            re_s, timed_out = None, True
        rows.append({
            "case": "hostile", "pattern": label, "regex": regex, "how": how,
            "name_length": len(name), "states": states, "matches": answers[0],
            "lowrank_s": statistics.median(cold), "lowrank_runs_s": cold,
            "re_s": re_s, "re_timed_out": timed_out, "re_cap_s": cap,
        })  # fmt: skip
    return rows


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """lowrank's time over each peer's, per pattern (cold and warm) and for the load."""
    out: dict[str, dict[str, float]] = {}
    per_name = {(r["pattern"], r["matcher"]): r for r in rows if r["case"] == "per name"}
    for label in PATTERNS:
        ours = per_name[label, "lowrank"]
        out[label] = {
            f"{when}_lowrank_vs_{peer}": ours[f"{when}_us_per_name"]
            / per_name[label, peer][f"{when}_us_per_name"]
            for peer in ("re", "PEFT") for when in ("cold", "warm")
        }  # fmt: skip
    load = {r["matcher"]: r["p50_s"] for r in rows if r["case"] == "load"}
    out["load"] = {
        "load_adapter_vs_PEFT_key_resolution": load["lowrank load_adapter"]
        / load["PEFT key resolution"],
        "key_resolution_lowrank_vs_PEFT": load["lowrank key resolution"]
        / load["PEFT key resolution"],
    }
    return out


def run(args: argparse.Namespace) -> Path:
    """Measure everything and write the result file."""
    layers, load_layers = (2, 4) if args.quick else (LLAMA["num_hidden_layers"], LOAD_LAYERS)
    repeat = 1 if args.quick else args.repeat
    hostile_repeats = (
        QUICK_HOSTILE_REPEATS if args.quick else {k: v[2] for k, v in HOSTILE.items()}
    )
    load_average = [os.getloadavg()[0]]
    names = llama_names(layers)
    rows = pattern_rows(names, repeat)
    with tempfile.TemporaryDirectory(prefix="lowrank-pattern-matching-") as work:
        load, folder = load_rows(load_layers, Path(work), repeat)
    rows += load
    rows += hostile_rows(hostile_repeats, repeat, args.cap)
    load_average.append(os.getloadavg()[0])
    from importlib.metadata import version

    extra = {
        "quick": args.quick,
        "model": {
            "name": "LlamaForCausalLM (meta)",
            "config": {**LLAMA, "num_hidden_layers": layers},
            "names": len(names),
            "mean_name_length": sum(map(len, names)) / len(names),
        },
        "folder": folder,
        "ratios": ratios(rows),
        "versions": {name: version(name) for name in ("peft", "transformers")},
        "repeat": repeat,
        "load_average_1min": {"start": load_average[0], "end": load_average[1]},
        "note": args.note,
    }
    out = args.out or RESULTS_DIR / "pattern_matching-cpu.json"
    return write_results("pattern_matching", rows, extra, path=out)


def _us(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _code(text: str) -> str:
    """`text` as inline code in a Markdown table cell (its `|` escaped)."""
    return "`" + text.replace("|", "\\|") + "`"


def report(result: dict) -> str:
    """The Markdown tables (and their caption) of a result file."""
    env, model, folder = result["environment"], result["model"], result["folder"]
    load = result["load_average_1min"]
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    per_name = {(r["pattern"], r["matcher"]): r for r in result["rows"] if r["case"] == "per name"}
    lines = [
        f"Measured on {env['device']} ({env['cpu_threads']} threads), torch {env['torch']}, "
        f"{versions}, {env['date']}; command `{env['command']}`. Names: the {model['names']} "
        f"modules of a {model['config']['num_hidden_layers']}-layer `LlamaForCausalLM` "
        f"(≈ {model['mean_name_length']:.0f} characters). 1-minute load average "
        f"{load['start']:.1f} at the start, {load['end']:.1f} at the end"
        + (f"; {result['note']}" if result.get("note") else "") + ".",
        "",
        "| pattern | lowrank warm (µs/name) | `re` warm | PEFT warm | lowrank ÷ `re` warm "
        "| lowrank ÷ PEFT warm | lowrank cold (µs/name) | `re` cold | PEFT cold "
        "| lowrank ÷ PEFT cold |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in PATTERNS:
        cell = {m: per_name[label, m] for m in MATCHERS}
        ratio = result["ratios"][label]
        warm = [_us(cell[m]["warm_us_per_name"]) for m in MATCHERS]
        cold = [_us(cell[m]["cold_us_per_name"]) for m in MATCHERS]
        field, regex = PATTERNS[label]
        shown = f"{field} {_code(regex)}" if len(regex) < 60 else label
        lines.append(
            f"| {shown} | {' | '.join(warm)} | {ratio['warm_lowrank_vs_re']:.1f}× "
            f"| {ratio['warm_lowrank_vs_PEFT']:.1f}× | {' | '.join(cold)} "
            f"| {ratio['cold_lowrank_vs_PEFT']:.2f}× |"
        )
    loads = {r["matcher"]: r for r in result["rows"] if r["case"] == "load"}
    ratio = result["ratios"]["load"]
    lines += [
        "",
        f"A PEFT folder of {folder['layers']} layers ({folder['decoder_layers']} decoder layers "
        f"× 7 projections) whose `rank_pattern` holds {folder['rank_pattern_keys']} keys and "
        f"`alpha_pattern` {folder['alpha_pattern_keys']} (lowrank runs each dict's keys as one "
        "automaton, backwards from a name's end, and looks up escaped module names by a "
        f"name's dotted suffixes: {folder['literal_keys']} here), caches emptied before each "
        "run:",
        "",
        "| what | p50 (s) | runs (s) |",
        "|---|---|---|",
    ]
    for key, row in loads.items():
        runs = ", ".join(f"{t:.2f}" for t in row["runs_s"])
        lines.append(f"| {key} | {row['p50_s']:.2f} | {runs} |")
    lines += [
        "",
        f"The whole `load_adapter` takes {ratio['load_adapter_vs_PEFT_key_resolution']:.2f}× "
        "PEFT's key resolution alone; lowrank's key resolution "
        f"{ratio['key_resolution_lowrank_vs_PEFT']:.2f}× PEFT's.",
        "",
        "| hostile regex | name length | automaton states | lowrank (s) | `re` (s) |",
        "|---|---|---|---|---|",
    ]
    for row in (r for r in result["rows"] if r["case"] == "hostile"):
        theirs = f"> {row['re_cap_s']:g} (killed)" if row["re_timed_out"] else f"{row['re_s']:.3g}"
        lines.append(
            f"| {_code(row['pattern'])} | {row['name_length']} | {row['states']:,} "
            f"| {row['lowrank_s']:.3g} | {theirs} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a `--repeat` below 1 or a `--cap` not above 0 exits with a usage
    error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each cold measurement")
    parser.add_argument("--cap", type=float, default=10.0, help="seconds before re is killed")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--out", type=Path, help="the result file (default results/…-cpu.json)")
    parser.add_argument("--note", help="a note on the machine stored in the result file")
    parser.add_argument("--report", type=Path, help="print the tables of this result file")
    args = harness.parsed(parser, argv)
    if not args.cap > 0:
        parser.error(f"--cap must be above 0 seconds, got {args.cap}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if harness.print_report(args.report, report):
        return
    path = run(args)
    print(report(json.loads(path.read_text())))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
