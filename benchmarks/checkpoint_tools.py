"""`lowrank merge | convert | inspect` at Stable Diffusion v1 UNet scale, on CPU.

Builds a synthetic fp16 checkpoint with every tensor of the SD v1 UNet (names and shapes from
diffusers' `UNet2DConditionModel` on the meta device: 859,520,964 parameters) and a rank-16
kohya LoRA (alpha 8, fp16) on every linear and convolution weight, without the module paths
lowrank records, so the merge maps kohya names through the base. Each operation then runs
as its own process, timed (wall clock) with its peak resident memory (`wait4`):

- `copy`: `shutil.copyfile` of the checkpoint (the kernel copies it, `sendfile`);
- `read + write`: the checkpoint read and written once through this process, 16 MiB at a
  time: the least any tool that looks at the data must do;
- `merge`: `lowrank merge base.safetensors lora.safetensors -o merged.safetensors`, with
  torch's default threads and with `--threads 1`;
- `convert`: `lowrank convert lora.safetensors --to peft -o peft --base base.safetensors`;
- `inspect`: `lowrank inspect lora.safetensors --json`;
- `idle`: `python -c "import lowrank.cli"`, the interpreter and torch alone;
- `kohya-style merge` (peer `kohya`): the method of sd-scripts' `networks/merge_lora.py` on
  an SD checkpoint: `safetensors.torch.load_file` of the whole base and of the LoRA (cast
  to float32), each LoRA layer's weight found by its kohya name, `W + (alpha / r) · up @ down`
  in float32 (a 1×1 conv as a matrix product, a 3×3 one as `conv2d` of `down` by `up`), cast
  back to fp16, and `save_file` of the whole dict (`KOHYA_MERGE`);
- `diffusers fuse` (peer `diffusers`): what `pipe.load_lora_weights`, `pipe.fuse_lora()`,
  `pipe.unload_lora_weights()` and `pipe.unet.save_pretrained` do to the UNet, called on it
  alone: `UNet2DConditionModel.from_pretrained` (fp16) of a folder holding the SD v1 config and
  the checkpoint, diffusers' kohya-name conversion and PEFT injection, fuse, unload, save
  (`DIFFUSERS_FUSE`).

Copy, read + write, merge and the peers alternate, `--repeat` times each, every run after
`os.sync()` so that none waits on another's writeback (page cache warm for all). A few
merged tensors of each merge are checked against a float64 merge of the same factors; every
file is deleted at the end. Usage: `python benchmarks/checkpoint_tools.py [--repeat 3]
[--workdir DIR] [--peers kohya diffusers]` (`--peers` alone runs none); writes
`benchmarks/results/checkpoint_tools-cpu.json`. `--report FILE.json` prints the docs table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import harness
import torch
from harness import SD_V1_UNET, write_results
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank.io.files import write_safetensors

RANK, ALPHA = 16, 8.0
PEERS = {"kohya": "kohya-style merge", "diffusers": "diffusers fuse"}
OPERATIONS = (
    "copy",
    "read + write",
    "merge",
    "merge, 1 thread",
    *PEERS.values(),
    "convert",
    "inspect",
    "idle",
)
READ_WRITE = """
import sys
with open(sys.argv[1], "rb") as source, open(sys.argv[2], "wb") as target:
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    while count := source.readinto(buffer):
        target.write(view[:count])
"""
# sd-scripts' merge of a kohya LoRA into a checkpoint: every tensor in memory, each layer's
# ΔW = (alpha / r) · up @ down added in float32. A 3×3 conv's ΔW[o, i] = Σ_r up[o, r] down[r, i]
# (each a 3×3 kernel) is conv2d of down, read as i images of r channels, by up's o 1×1
# filters: (i, o, 3, 3), transposed back.
KOHYA_MERGE = """
import sys
import torch
from safetensors.torch import load_file, save_file

base, lora, out = sys.argv[1:4]
weights = load_file(base)
factors = {k: v.float() for k, v in load_file(lora).items()}
kohya_names = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k
               for k in weights if k.endswith(".weight")}
for key, down in factors.items():
    if not key.endswith(".lora_down.weight"):
        continue
    stem = key.removesuffix(".lora_down.weight")
    target, up = kohya_names[stem], factors[stem + ".lora_up.weight"]
    rank = down.shape[0]
    scale = factors.get(stem + ".alpha", rank) / rank
    weight = weights[target].float()
    if weight.dim() == 2:
        if up.dim() == 4:
            up, down = up[:, :, 0, 0], down[:, :, 0, 0]
        weight = weight + (up @ down) * scale
    elif down.shape[2:] == (1, 1):
        weight = weight + (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None] * scale
    else:
        delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        weight = weight + delta * scale
    weights[target] = weight.to(weights[target].dtype)
save_file(weights, out, metadata={"format": "pt"})
"""
# diffusers' own path for a kohya file, as `pipe.load_lora_weights` (low_cpu_mem_usage as it
# defaults there), `pipe.fuse_lora()`, `pipe.unload_lora_weights()` take it for the UNet.
DIFFUSERS_FUSE = """
import sys
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin as loader

model, lora, out = sys.argv[1:4]
unet = UNet2DConditionModel.from_pretrained(model, torch_dtype=torch.float16)
state_dict, alphas = loader.lora_state_dict(lora)
loader.load_lora_into_unet(state_dict, alphas, unet=unet, adapter_name="lora",
                           low_cpu_mem_usage=True)
unet.fuse_lora()
unet.unload_lora()
unet.save_pretrained(out)
"""
MB = 2**20


def unet_shapes(config: dict = SD_V1_UNET) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the UNet of `config` (default SD v1), built on the meta
    device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def write_checkpoint(shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """A synthetic fp16 checkpoint, written one tensor at a time."""
    g = torch.Generator().manual_seed(0)
    entries = [(k, torch.float16, s) for k, s in shapes.items()]
    tensors = ((k, (torch.randn(s, generator=g) * 0.02).half()) for k, s in shapes.items())
    write_safetensors(path, entries, tensors, {"format": "pt"})


def write_lora(shapes: dict[str, tuple[int, ...]], path: Path) -> dict[str, int]:
    """A rank-16 kohya LoRA on every linear and conv weight; its size."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            continue
        stem = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        ones = (1,) * (len(shape) - 2)
        tensors[f"{stem}.lora_down.weight"] = (
            torch.randn(RANK, *shape[1:], generator=g) * 0.05
        ).half()
        tensors[f"{stem}.lora_up.weight"] = (
            torch.randn(shape[0], RANK, *ones, generator=g) * 0.05
        ).half()
        tensors[f"{stem}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    save_file(
        tensors, str(path), metadata={"ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA)}
    )
    factors = [t for k, t in tensors.items() if not k.endswith(".alpha")]
    return {
        "layers": len(factors) // 2,
        "params": sum(t.numel() for t in factors),
        "bytes": sum(t.numel() * t.element_size() for t in factors),
        "file_bytes": path.stat().st_size,
    }


# Runs the command as its own child and reports that child's wall time, CPU time and peak
# RSS: a small launcher, so the child does not start as a fork of this (large) process.
LAUNCHER = """
import json, os, subprocess, sys, time
command, extra_env = json.loads(sys.argv[1]), json.loads(sys.argv[2])
start = time.perf_counter()
child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env={**os.environ, **extra_env})
_, status, usage = os.wait4(child.pid, 0)
wall = time.perf_counter() - start
error = child.stderr.read().decode()
print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_rss_mb": usage.ru_maxrss / 1024,
                  "status": os.waitstatus_to_exitcode(status), "stderr": error[-2000:]}))
"""


def measure(command: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run `command` (with `env` added) after flushing dirty pages: its wall seconds and its
    own peak RSS in MiB."""
    os.sync()
    launched = subprocess.run(
        [sys.executable, "-c", LAUNCHER, json.dumps(command), json.dumps(env or {})],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(launched.stdout)
    if result["status"] != 0:
        raise RuntimeError(f"{command} failed: {result['stderr']}")
    return {"wall_s": result["wall_s"], "peak_rss_mb": result["peak_rss_mb"]}


def check_merge(base: Path, lora: Path, merged: Path, keys: list[str]) -> float:
    """The largest ‖merged − float64 merge‖ / ‖float64 merge‖ over `keys`."""
    worst = 0.0
    with (
        safe_open(str(base), "pt") as b,
        safe_open(str(lora), "pt") as a,
        safe_open(str(merged), "pt") as m,
    ):
        for key in keys:
            stem = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
            down = a.get_tensor(f"{stem}.lora_down.weight").double().flatten(1)
            up = a.get_tensor(f"{stem}.lora_up.weight").double().flatten(1)
            expected = b.get_tensor(key).double() + (ALPHA / RANK * up @ down).reshape(
                b.get_slice(key).get_shape()
            )
            got = m.get_tensor(key).double()
            worst = max(worst, float((got - expected).norm() / expected.norm()))
    return worst


def diffusers_model(config: dict, checkpoint: Path, folder: Path) -> Path:
    """A diffusers model folder: `config` as its `config.json`, `checkpoint` linked as its
    weights (what `save_pretrained` of the model would have written)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(checkpoint.resolve())
    return folder


def peer_commands(
    peers: list[str], base: Path, lora: Path, work: Path, config: dict
) -> dict[str, tuple[list[str], Path]]:
    """Each peer's command line and the merged checkpoint it writes, by operation name; every
    output lies in its own folder `work/<peer>`, which the command may (re)create."""
    commands = {}
    if "kohya" in peers:
        output = work / "kohya" / "merged.safetensors"
        commands[PEERS["kohya"]] = (
            [sys.executable, "-c", KOHYA_MERGE, str(base), str(lora), str(output)],
            output,
        )
    if "diffusers" in peers:
        model = diffusers_model(config, base, work / "diffusers-model")
        output = work / "diffusers" / "diffusion_pytorch_model.safetensors"
        commands[PEERS["diffusers"]] = (
            [sys.executable, "-c", DIFFUSERS_FUSE, str(model), str(lora), str(output.parent)],
            output,
        )
    return commands


def peer_versions() -> dict[str, str]:
    """The versions of the packages the peers run on."""
    from importlib.metadata import version

    return {name: version(name) for name in ("diffusers", "peft", "safetensors")}


def run(work: Path, repeat: int, peers: list[str]) -> None:
    python = sys.executable
    shapes = unet_shapes()
    params = sum(torch.Size(s).numel() for s in shapes.values())
    base, lora, merged = (
        work / "base.safetensors",
        work / "lora.safetensors",
        work / "merged.safetensors",
    )
    write_checkpoint(shapes, base)
    adapter = write_lora(shapes, lora)
    largest = max(shapes, key=lambda k: torch.Size(shapes[k]).numel())
    largest_mb = torch.Size(shapes[largest]).numel() * 2 / MB
    merge = [python, "-m", "lowrank.cli", "merge", str(base), str(lora), "-o", str(merged)]
    peer_runs = peer_commands(peers, base, lora, work, SD_V1_UNET)
    commands = {
        "copy": [
            python,
            "-c",
            "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])",
            str(base),
            str(work / "copy.safetensors"),
        ],
        "read + write": [python, "-c", READ_WRITE, str(base), str(work / "copy.safetensors")],
        "merge": merge,
        **{name: command for name, (command, _) in peer_runs.items()},
    }
    operations = [name for name in OPERATIONS if name not in PEERS.values() or name in peer_runs]
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in operations}
    load = [os.getloadavg()[0]]
    for _ in range(repeat):
        for name, command in commands.items():
            if name in peer_runs:
                # every peer run writes a new file: its last output is removed first
                folder = peer_runs[name][1].parent
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
            samples[name].append(measure(command))
            (work / "copy.safetensors").unlink(missing_ok=True)
        samples["merge, 1 thread"].append(measure([*merge, "--threads", "1"]))
    for _ in range(repeat):
        shutil.rmtree(work / "peft", ignore_errors=True)
        samples["convert"].append(
            measure(
                [
                    python,
                    "-m",
                    "lowrank.cli",
                    "convert",
                    str(lora),
                    "--to",
                    "peft",
                    "-o",
                    str(work / "peft"),
                    "--base",
                    str(base),
                ]
            )
        )
        samples["inspect"].append(
            measure([python, "-m", "lowrank.cli", "inspect", str(lora), "--json"])
        )
        samples["idle"].append(measure([python, "-c", "import lowrank.cli"]))
    load.append(os.getloadavg()[0])
    targeted = [k for k in shapes if k.endswith(".weight") and len(shapes[k]) in (2, 4)]
    kinds: dict[tuple[int, ...], str] = {}
    for key in targeted:  # the first linear, 1×1 conv and 3×3 conv
        kinds.setdefault(shapes[key][2:], key)
    checked = [largest, *kinds.values()]
    error = check_merge(base, lora, merged, checked)
    rows = []
    for name, runs in samples.items():
        walls = [r["wall_s"] for r in runs]
        rows.append(
            {
                "operation": name,
                "p50_s": statistics.median(walls),
                "wall_s": walls,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            }
        )
    by_name = {row["operation"]: row for row in rows}
    peer_results = {}
    for name, (_, output) in peer_runs.items():
        peer, lowrank, one = by_name[name], by_name["merge"], by_name["merge, 1 thread"]
        rounds = zip(peer["wall_s"], lowrank["wall_s"], strict=True)
        peer_results[name] = {
            "time_vs_merge": peer["p50_s"] / lowrank["p50_s"],
            "time_vs_merge_per_run": [a / b for a, b in rounds],
            "time_vs_merge_one_thread": peer["p50_s"] / one["p50_s"],
            "peak_rss_mb": peer["peak_rss_mb"],
            "peak_rss_vs_merge": peer["peak_rss_mb"] / lowrank["peak_rss_mb"],
            "max_relative_error_vs_float64": check_merge(base, lora, output, checked),
            "output_bytes": output.stat().st_size,
        }
        shutil.rmtree(output.parent)
    extra = {
        "checkpoint": {
            "params": params,
            "tensors": len(shapes),
            "bytes": base.stat().st_size,
            "dtype": "float16",
            "largest_tensor": {"key": largest, "shape": list(shapes[largest]), "mb": largest_mb},
        },
        "adapter": {"format": "kohya", "rank": RANK, "alpha": ALPHA, "dtype": "float16", **adapter},
        "targets": {
            "merge_peak_rss_mb_max": 2 * largest_mb + adapter["bytes"] / MB + 200,
            "merge_time_s_max": 3 * by_name["read + write"]["p50_s"],
        },
        "merge": {
            "time_vs_read_write": by_name["merge"]["p50_s"] / by_name["read + write"]["p50_s"],
            "one_thread_time_vs_read_write": by_name["merge, 1 thread"]["p50_s"]
            / by_name["read + write"]["p50_s"],
            "beyond_start_up_vs_read_write": (by_name["merge"]["p50_s"] - by_name["idle"]["p50_s"])
            / by_name["read + write"]["p50_s"],
            "peak_rss_above_idle_mb": by_name["merge"]["peak_rss_mb"]
            - by_name["idle"]["peak_rss_mb"],
            "max_relative_error_vs_float64": error,
            "output_bytes": merged.stat().st_size,
        },
        "checked_tensors": checked,
        "peers": peer_results,
        "peer_versions": peer_versions() if peer_results else {},
        "repeat": repeat,
        "load_average_1min": {"start": load[0], "end": load[1]},
    }
    merged.unlink()
    path = write_results("checkpoint_tools", rows, extra)
    print(report(json.loads(path.read_text())))
    print(f"wrote {path}")


def sampled(result: dict) -> str:
    """What the merges' error was measured on, in words."""
    checked = result.get("checked_tensors")
    if checked is None:
        return "sampled merged tensors"
    return (
        f"{len(checked)} merged tensors (the largest, and the first linear, 1×1 conv and "
        f"3×3 conv of the checkpoint: {', '.join(f'`{k}`' for k in sorted(checked))})"
    )


def report(result: dict) -> str:
    """The Markdown table (and its caption) of a result file."""
    env, load = result["environment"], result["load_average_1min"]
    ckpt, adapter = result["checkpoint"], result["adapter"]
    targets, merge = result["targets"], result["merge"]
    rows = {row["operation"]: row for row in result["rows"]}
    peers = result.get("peers", {})
    lines = [
        f"Measured on {env['device']} ({env['cpu_threads']} threads), torch {env['torch']}, "
        f"{env['date']}; command `{env['command']}`. Checkpoint: {ckpt['params']:,} fp16 "
        f"parameters in {ckpt['tensors']} tensors ({ckpt['bytes'] / MB:,.0f} MiB; largest "
        f"`{ckpt['largest_tensor']['key']}`, {ckpt['largest_tensor']['mb']:.1f} MiB). Adapter: "
        f"kohya, rank {adapter['rank']} on {adapter['layers']} linear and conv layers, "
        f"{adapter['params']:,} parameters ({adapter['bytes'] / MB:.1f} MiB). The machine was "
        f"shared: 1-minute load average {load['start']:.1f} at the start, {load['end']:.1f} at "
        "the end.",
        "",
        "| operation | p50 wall time (s) | runs (s) | peak RSS (MiB) |",
        "|---|---|---|---|",
    ]
    for name in OPERATIONS:
        if name not in rows:
            continue
        row = rows[name]
        runs = ", ".join(f"{w:.2f}" for w in row["wall_s"])
        lines.append(f"| {name} | {row['p50_s']:.2f} | {runs} | {row['peak_rss_mb']:.0f} |")
    lines += [
        "",
        f"Merge time {merge['time_vs_read_write']:.2f}× reading and writing the checkpoint "
        f"once with torch's default threads, {merge['one_thread_time_vs_read_write']:.2f}× "
        f"with one thread (target ≤ 3×, i.e. ≤ "
        f"{targets['merge_time_s_max']:.1f} s); the merge's time beyond the start-up of an "
        f"interpreter with torch (`idle`) is {merge['beyond_start_up_vs_read_write']:.2f}× "
        "it. Merge peak RSS "
        f"{rows['merge']['peak_rss_mb']:.0f} MiB, {merge['peak_rss_above_idle_mb']:.0f} MiB "
        f"above the idle interpreter with torch ({rows['idle']['peak_rss_mb']:.0f} MiB); "
        "target ≤ 2 × largest tensor + adapter + 200 MiB = "
        f"{targets['merge_peak_rss_mb_max']:.0f} MiB. Largest relative error of "
        f"{sampled(result)} against a float64 merge: "
        f"{merge['max_relative_error_vs_float64']:.2e} (fp16 rounding).",
    ]
    if peers:
        versions = ", ".join(f"{k} {v}" for k, v in result["peer_versions"].items())
        lines += [
            "",
            f"Peers against `lowrank merge` (torch's default threads; {versions}):",
            "",
            "| peer | time / lowrank merge (p50) | same-round runs | time / merge, 1 thread "
            "| peak RSS (MiB) | peak RSS / lowrank merge | largest relative error vs float64 |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, peer in peers.items():
            runs = ", ".join(f"{r:.2f}" for r in peer["time_vs_merge_per_run"])
            lines.append(
                f"| {name} | {peer['time_vs_merge']:.2f}× | {runs} | "
                f"{peer['time_vs_merge_one_thread']:.2f}× | {peer['peak_rss_mb']:,.0f} "
                f"| {peer['peak_rss_vs_merge']:.1f}× | "
                f"{peer['max_relative_error_vs_float64']:.2e} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a `--repeat` below 1 exits with a usage error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each operation")
    parser.add_argument("--workdir", type=Path, help="where the synthetic files go (deleted after)")
    parser.add_argument(
        "--peers",
        nargs="*",
        choices=list(PEERS),
        default=list(PEERS),
        help="the peers to time against lowrank merge (default: all; none if given alone)",
    )
    parser.add_argument("--report", type=Path, help="print the table of this result file")
    args = harness.parsed(parser, argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if harness.print_report(args.report, report):
        return
    work = Path(tempfile.mkdtemp(prefix="lowrank-checkpoint-tools-", dir=args.workdir))
    try:
        run(work, args.repeat, args.peers)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
