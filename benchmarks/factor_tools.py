"""`lowrank extract | resize | combine` at Stable Diffusion v1 UNet scale, on CPU, against
LyCORIS' extraction, the dense-SVD resize and PEFT's `add_weighted_adapter`.

The checkpoint is the synthetic fp16 SD v1 UNet of `checkpoint_tools.py` (names and shapes
from diffusers on the meta device); the "fine-tune" adds to every linear and convolution
weight a rank-64 perturbation `(G₁ G₂) · 2.5e-4` (G Gaussian, entries ≈ 10 % of the weights')
and Gaussian noise of std 2e-4, stored in fp16. Adapters are random kohya files (fp16) on the
same layers. Measured:

- `extract`: `lowrank extract base tuned --rank 32` on the whole UNet, wall time and peak
  RSS in its own process; and on a subset,
  one layer of every distinct shape: the same decomposition per layer against LyCORIS'
  `extract_linear` / `extract_conv` (an exact SVD each), every layer's time, its error and
  the exact truncated SVD's error (LyCORIS' is that: the Eckart–Young optimum);
- `resize` 128 → 16: `lowrank resize` on the whole adapter, and per layer of the subset
  `lowrank.resize` against the dense method (ΔW, `torch.linalg.svd`, truncate): time,
  error, and how far the two results are apart;
- `combine` of three adapters of ranks 8, 16, 32 (weights 0.8, 0.5, −0.3): `lowrank
  combine` on the whole UNet (exact, and `--rank 32`), and on a model of the subset's
  layers `lowrank.combine` against PEFT's `add_weighted_adapter` (`"svd"`, rank 32, and
  `"cat"`): time and error against the float64 weighted sum.

Every command runs in its own process with one torch thread (`--threads 1`; peak RSS
recorded): on a shared two-core machine the second thread of LAPACK's QR and SVD mostly
waits (the result file records a QR timed both ways). The exact SVDs that LyCORIS and the
dense method need make every layer of the UNet too slow for two shared cores (≈ 14 min for
the thin SVDs alone), hence the subset. Every file is deleted at the end.

Usage: `python benchmarks/factor_tools.py [--workdir DIR]` writes
`benchmarks/results/factor_tools-cpu.json` and `factor_tools-cpu.png`; `--report FILE.json`
prints the docs table, `--plot FILE.json` redraws the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from checkpoint_tools import LAUNCHER, SD_V1_UNET, unet_shapes, write_checkpoint
from harness import RESULTS_DIR, time_ms, write_results
from safetensors import safe_open

from lowrank import LoRA, combine, decompose, resize
from lowrank.io import Adapter, Checkpoint, load_adapter, save_adapter
from lowrank.io.factor_tools import _extract_layer
from lowrank.io.files import write_safetensors

TUNE_RANK, TUNE_SCALE, NOISE = 64, 2.5e-4, 2e-4
EXTRACT_RANK = 32
RESIZE_FROM, RESIZE_TO = 128, 16
COMBINE = ((8, 4.0, 0.8), (16, 16.0, 0.5), (32, 8.0, -0.3))  # (rank, alpha, weight)
COMBINE_RANK = 32
MB = 2**20


def targets(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The linear and 2-D convolution weights."""
    return {k: s for k, s in shapes.items() if k.endswith(".weight") and len(s) in (2, 4)}


def subset(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The first layer of every distinct weight shape."""
    chosen: dict[tuple[int, ...], str] = {}
    for key, shape in targets(shapes).items():
        chosen.setdefault(shape, key)
    return {key: shape for shape, key in chosen.items()}


def write_tuned(shapes: dict[str, tuple[int, ...]], base: Path, path: Path) -> None:
    """`base` plus a rank-64 perturbation and noise on every target, fp16, streamed."""
    g = torch.Generator().manual_seed(2)
    chosen = targets(shapes)

    def tensors():
        with safe_open(str(base), "pt") as handle:
            for key in shapes:
                weight = handle.get_tensor(key)
                if key in chosen:
                    flat = weight.float().reshape(weight.shape[0], -1)
                    left = torch.randn(flat.shape[0], TUNE_RANK, generator=g)
                    right = torch.randn(TUNE_RANK, flat.shape[1], generator=g)
                    flat += (left @ right) * TUNE_SCALE
                    flat += torch.randn(flat.shape, generator=g) * NOISE
                    weight = flat.reshape(weight.shape).half()
                yield key, weight

    entries = [(k, torch.float16, s) for k, s in shapes.items()]
    write_safetensors(path, entries, tensors(), {"format": "pt"})


def write_lora(
    shapes: dict[str, tuple[int, ...]], rank: int, alpha: float, seed: int, path: Path
) -> None:
    """A random fp16 kohya LoRA of `rank` on every target (module paths recorded)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for key, shape in targets(shapes).items():
        ones = (1,) * (len(shape) - 2)
        down = (torch.randn(rank, *shape[1:], generator=g) * 0.05).half()
        up = (torch.randn(shape[0], rank, *ones, generator=g) * 0.05).half()
        layers[key.removesuffix(".weight")] = LoRA(down, up, alpha / rank)
    save_adapter(Adapter(layers), path, "kohya")


def measure(command: list[str], threads: int | None = None) -> dict[str, float]:
    """Wall and CPU seconds and peak RSS (MiB) of `command` in its own process
    (`checkpoint_tools`' launcher, after flushing dirty pages)."""
    os.sync()
    env = {} if threads is None else {"OMP_NUM_THREADS": str(threads)}
    launched = subprocess.run(
        [sys.executable, "-c", LAUNCHER, json.dumps(command), json.dumps(env)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(launched.stdout)
    if result["status"] != 0:
        raise RuntimeError(f"{command} failed: {result['stderr']}")
    return {key: result[key] for key in ("wall_s", "cpu_s", "peak_rss_mb")}


def _relative(approx: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double()
    return float((approx.double() - reference).norm() / reference.norm())


# --- workers: one process each, one thread ----------------------------------------------


def _deltas(work: Path, keys: list[str]):
    """`(key, tuned − base)` in float32, each tensor read on its own (`Checkpoint.get`), as
    `lowrank extract` reads them."""
    base, tuned = Checkpoint(work / "base.safetensors"), Checkpoint(work / "tuned.safetensors")
    for key in keys:
        yield key, tuned.get(key).float() - base.get(key).float()


def _full_rank(delta: torch.Tensor) -> int:
    return min(delta.shape[0], delta[0].numel())


def worker_extract_ours(work: Path, keys: list[str]) -> list[dict]:
    """`lowrank extract`'s decomposition of each layer; whether it fell back to exact."""
    fallbacks = []
    exact = decompose.exact_svd

    def counted(matrix):
        fallbacks.append(True)
        return exact(matrix)

    decompose.exact_svd = counted
    rows = []
    for key, delta in _deltas(work, keys):
        fallbacks.clear()
        start = time.perf_counter()
        lora = _extract_layer(delta, "lora", "rank", EXTRACT_RANK)
        seconds = time.perf_counter() - start
        error = _relative(lora.to(torch.float64).to_dense(), delta)
        rows.append({"key": key, "seconds": seconds, "error": error, "exact": bool(fallbacks)})
    return rows


def worker_extract_lycoris(work: Path, keys: list[str]) -> list[dict]:
    """LyCORIS' `extract_linear` / `extract_conv` on each layer, mode "fixed", rank 32."""
    from lycoris.utils import extract_conv, extract_linear

    rows = []
    for key, delta in _deltas(work, keys):
        extract = extract_conv if delta.ndim == 4 else extract_linear
        start = time.perf_counter()
        result, mode = extract(delta, "fixed", EXTRACT_RANK)
        seconds = time.perf_counter() - start
        norm = float(delta.double().norm())
        rank = _full_rank(delta) if mode == "full" else result[0].shape[0]
        error = 0.0 if mode == "full" else float(result[2].double().norm()) / norm
        ours = min(EXTRACT_RANK, _full_rank(delta))
        if rank == ours:
            optimal = error  # LyCORIS' exact SVD at our rank is the Eckart–Young optimum
        else:  # LyCORIS caps a conv's rank at its input channels (not in·K)
            values = torch.linalg.svdvals(delta.double().flatten(1))
            optimal = float((values[ours:] ** 2).sum().sqrt()) / norm
        rows.append(
            {"key": key, "seconds": seconds, "error": error, "mode": mode, "rank": rank,
             "optimal": optimal}
        )  # fmt: skip
    return rows


def _layers(path: Path, keys: list[str]) -> dict[str, LoRA]:
    """The layers `keys` of an adapter file, in float32 (as PEFT holds them)."""
    layers = load_adapter(path).select("unet").layers
    return {k: layers[k.removesuffix(".weight")].to(torch.float32) for k in keys}  # type: ignore[misc]


def worker_resize(work: Path, keys: list[str]) -> list[dict]:
    """`lowrank.resize` 128 → 16 against ΔW + `torch.linalg.svd` + truncation, per layer."""
    rows = []
    for key, lora in _layers(work / "lora128.safetensors", keys).items():
        ours = time_ms(lambda lora=lora: resize(lora, RESIZE_TO), warmup_ms=5, rep_ms=50)
        small, error = resize(lora, RESIZE_TO, return_error=True)
        start = time.perf_counter()
        dense = lora.to(torch.float32).to_dense().reshape(lora.shape[0], -1)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        truncated = (u[:, :RESIZE_TO] * s[:RESIZE_TO]) @ vh[:RESIZE_TO]
        dense_seconds = time.perf_counter() - start
        tail = (s[RESIZE_TO:].double() ** 2).sum()
        dense_error = float((tail / (s.double() ** 2).sum()).sqrt())
        apart = _relative(small.to(torch.float32).to_dense().reshape(truncated.shape), truncated)
        rows.append(
            {
                "key": key,
                "ours_s": ours["p50_ms"] / 1e3,
                "dense_s": dense_seconds,
                "ours_error": error,
                "dense_error": dense_error,
                "results_apart": apart,
            }
        )
    return rows


def _exact_sum(forms: list[LoRA]) -> torch.Tensor:
    pairs = zip(forms, COMBINE, strict=True)
    return sum(w * f.to(torch.float64).to_dense() for f, (_, _, w) in pairs)


def worker_combine_ours(work: Path, keys: list[str]) -> list[dict]:
    """`lowrank.combine` of the three adapters per layer, exact and truncated to rank 32."""
    adapters = [_layers(work / f"lora{r}.safetensors", keys) for r, _, _ in COMBINE]
    weights = [w for _, _, w in COMBINE]
    rows = []
    for key in keys:
        forms = [a[key] for a in adapters]
        exact = time_ms(lambda f=forms: combine(f, weights), warmup_ms=5, rep_ms=50)
        cut = time_ms(
            lambda f=forms: combine(f, weights, rank=COMBINE_RANK), warmup_ms=5, rep_ms=50
        )
        reference = _exact_sum(forms)
        rows.append(
            {
                "key": key,
                "exact_s": exact["p50_ms"] / 1e3,
                "exact_error": _relative(combine(forms, weights).to_dense(), reference),
                "rank32_s": cut["p50_ms"] / 1e3,
                "rank32_error": _relative(
                    combine(forms, weights, rank=COMBINE_RANK).to_dense(), reference
                ),
            }
        )
    return rows


def worker_combine_peft(work: Path, keys: list[str], kind: str) -> list[dict]:
    """PEFT's `add_weighted_adapter(combination_type=kind)` on a model of the subset's layers
    (one Linear / Conv2d each), the three adapters' factors copied in."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    adapters = [_layers(work / f"lora{r}.safetensors", keys) for r, _, _ in COMBINE]
    with torch.device("meta"):
        model = nn.ModuleDict()
        for i, key in enumerate(keys):
            out, inp, *kernel = adapters[0][key].shape
            model[f"layer{i}"] = (
                nn.Conv2d(inp, out, tuple(kernel), bias=False) if kernel else nn.Linear(inp, out)
            )
    model = model.to_empty(device="cpu")
    names = [f"layer{i}" for i in range(len(keys))]
    for n, (rank, alpha, _) in enumerate(COMBINE):
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names)
        if n == 0:
            peft_model = get_peft_model(model, config, adapter_name="a0")
        else:
            peft_model.add_adapter(f"a{n}", config)
    with torch.no_grad():
        for i, key in enumerate(keys):
            module = peft_model.base_model.model[f"layer{i}"]
            for n, adapter in enumerate(adapters):
                module.lora_A[f"a{n}"].weight.copy_(adapter[key].down.float())
                module.lora_B[f"a{n}"].weight.copy_(adapter[key].up.float())
    options = {"svd_rank": COMBINE_RANK} if kind == "svd" else {}
    start = time.perf_counter()
    peft_model.add_weighted_adapter(
        [f"a{n}" for n in range(len(COMBINE))],
        [w for _, _, w in COMBINE],
        "merged",
        combination_type=kind,
        **options,
    )
    seconds = time.perf_counter() - start
    rows = []
    for i, key in enumerate(keys):
        module = peft_model.base_model.model[f"layer{i}"]
        got = module.get_delta_weight("merged")
        reference = _exact_sum([a[key] for a in adapters])
        rows.append({"key": key, "error": _relative(got, reference)})
    return [{"key": "all", "seconds": seconds}, *rows]


WORKERS = {
    "extract-ours": worker_extract_ours,
    "extract-lycoris": worker_extract_lycoris,
    "resize": worker_resize,
    "combine-ours": worker_combine_ours,
    "combine-peft-svd": lambda w, k: worker_combine_peft(w, k, "svd"),
    "combine-peft-cat": lambda w, k: worker_combine_peft(w, k, "cat"),
}


def run_worker(name: str, work: Path, keys: list[str]) -> tuple[list[dict], dict[str, float]]:
    """Run worker `name` in its own one-thread process: its rows, wall time and peak RSS."""
    out = work / f"{name}.json"
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--workdir",
        str(work),
        "--out",
        str(out),
    ]
    command += ["--keys", ",".join(keys)]
    process = measure(command, threads=1)
    return json.loads(out.read_text()), process


def qr_probe() -> dict[str, float]:
    """Milliseconds of one QR of an 11520 × 64 float32 matrix with one thread and with torch's
    default: on a shared machine the default's threads wait on each other."""
    matrix = torch.randn(11520, 64)
    default = torch.get_num_threads()
    times = {}
    for threads in (1, default):
        torch.set_num_threads(threads)
        times[f"{threads} threads"] = time_ms(lambda: torch.linalg.qr(matrix))["p50_ms"]
    torch.set_num_threads(default)
    return times


# --- the whole run ---------------------------------------------------------------------


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "lowrank.cli", *map(str, args)]


SMOKE_UNET = {
    "block_out_channels": [32, 64, 64, 64],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}


def run(work: Path, name: str) -> Path:
    shapes = unet_shapes()
    chosen = targets(shapes)
    keys = list(subset(shapes))
    base, tuned = work / "base.safetensors", work / "tuned.safetensors"
    write_checkpoint(shapes, base)
    write_tuned(shapes, base, tuned)
    write_lora(shapes, RESIZE_FROM, RESIZE_FROM, 3, work / "lora128.safetensors")
    for n, (rank, alpha, _) in enumerate(COMBINE):
        write_lora(shapes, rank, alpha, 4 + n, work / f"lora{rank}.safetensors")
    load = [os.getloadavg()[0]]
    extract = cli("extract", base, tuned, "-o", work / "ex.safetensors", "--rank", EXTRACT_RANK)
    extract += ["--format", "kohya"]
    resize_cmd = cli("resize", work / "lora128.safetensors", "-o", work / "lora16.safetensors")
    resize_cmd += ["--rank", str(RESIZE_TO)]
    combine_cmd = cli(
        "combine", *[f"{work}/lora{r}.safetensors:{w}" for r, _, w in COMBINE], "-o",
        work / "combined.safetensors",
    )  # fmt: skip
    one = ["--threads", "1"]
    runs = {
        "extract --rank 32": measure([*extract, *one]),
        "extract --rank 32, torch's default threads": measure(extract),
        "resize 128 → 16": measure([*resize_cmd, *one]),
        "combine 8 + 16 + 32 (exact)": measure([*combine_cmd, *one]),
        "combine 8 + 16 + 32 --rank 32": measure([*combine_cmd, *one, "--rank", str(COMBINE_RANK)]),
        "idle (import lowrank.cli)": measure([sys.executable, "-c", "import lowrank.cli"]),
    }
    # PEFT's "svd" fails on a layer with fewer than 32 singular values (it reshapes U to
    # rank 32): such layers (conv_out, 4 outputs) are left out of both PEFT runs.
    narrow = [k for k in keys if min(chosen[k][0], torch.Size(chosen[k][1:]).numel()) < 32]
    workers = {}
    results = {}
    for worker in WORKERS:
        names = [k for k in keys if k not in narrow] if worker.startswith("combine-peft") else keys
        results[worker], workers[worker] = run_worker(worker, work, names)
    load.append(os.getloadavg()[0])
    rows = _rows(keys, chosen, results)
    extra = {
        "checkpoint": {
            "layers": len(chosen),
            "params": sum(torch.Size(s).numel() for s in shapes.values()),
            "bytes": base.stat().st_size,
            "fine_tune": f"rank-{TUNE_RANK} perturbation (Gaussian factors × {TUNE_SCALE}) "
            f"+ Gaussian noise (std {NOISE}), fp16",
        },
        "subset": {
            "layers": len(keys),
            "rule": "the first layer of every distinct shape",
            "left_out_of_peft": narrow,
        },
        "settings": {
            "extract_rank": EXTRACT_RANK,
            "resize": [RESIZE_FROM, RESIZE_TO],
            "combine": [{"rank": r, "alpha": a, "weight": w} for r, a, w in COMBINE],
            "combine_rank": COMBINE_RANK,
        },
        "runs": runs,
        "workers": workers,
        "peft": {kind: results[f"combine-peft-{kind}"][0]["seconds"] for kind in ("svd", "cat")},
        "load_average_1min": {"start": load[0], "end": load[1]},
        "qr_probe_ms": qr_probe(),
    }
    path = write_results(name, rows, extra)
    plot(json.loads(path.read_text()), path.with_suffix(".png"))
    return path


def _rows(keys: list[str], shapes: dict, results: dict[str, list[dict]]) -> list[dict]:
    by_key = {name: {r["key"]: r for r in rows} for name, rows in results.items()}
    counts = Counter(shapes.values())
    rows = []
    for key in keys:
        ours, lycoris = by_key["extract-ours"][key], by_key["extract-lycoris"][key]
        sized, merged = by_key["resize"][key], by_key["combine-ours"][key]
        rows.append(
            {
                "key": key,
                "shape": list(shapes[key]),
                "layers_of_this_shape": counts[shapes[key]],
                "extract_s": ours["seconds"],
                "extract_error": ours["error"],
                "extract_exact_fallback": ours["exact"],
                "lycoris_s": lycoris["seconds"],
                "lycoris_error": lycoris["error"],
                "lycoris_mode": lycoris["mode"],
                "lycoris_rank": lycoris["rank"],
                "optimal_error": lycoris["optimal"],
                "resize_s": sized["ours_s"],
                "resize_dense_s": sized["dense_s"],
                "resize_error": sized["ours_error"],
                "resize_dense_error": sized["dense_error"],
                "resize_results_apart": sized["results_apart"],
                "combine_s": merged["exact_s"],
                "combine_error": merged["exact_error"],
                "combine_rank32_s": merged["rank32_s"],
                "combine_rank32_error": merged["rank32_error"],
                "peft_svd_error": by_key["combine-peft-svd"].get(key, {}).get("error"),
                "peft_cat_error": by_key["combine-peft-cat"].get(key, {}).get("error"),
            }
        )
    return rows


# --- report and plot -------------------------------------------------------------------


def _ratio(row: dict) -> float:
    """Our extraction error over the optimal one (the exact truncated SVD at our rank)."""
    return row["extract_error"] / row["optimal_error"]


def _smaller_side(row: dict) -> int:
    return min(row["shape"][0], math.prod(row["shape"][1:]))


def _estimate(rows: list[dict], key: str) -> float:
    """Seconds for the whole UNet: each shape's time × the layers of that shape."""
    return sum(r[key] * r["layers_of_this_shape"] for r in rows)


def summary(result: dict) -> dict[str, float]:
    """The numbers the docs quote, from a result file."""
    rows = result["rows"]
    cut = [r for r in rows if _smaller_side(r) > EXTRACT_RANK]
    # the layers whose dense SVD is a 1280-wide problem (a smoke run has none)
    big = [r for r in rows if _smaller_side(r) >= 1280] or rows
    speedups = [r["resize_dense_s"] / r["resize_s"] for r in rows]
    return {
        "extract_ratio_max": max(_ratio(r) for r in cut),
        "extract_exact": sum(r["extract_exact_fallback"] for r in rows),
        "lycoris_rank_differs": [
            r["key"] for r in rows if r["lycoris_rank"] != min(EXTRACT_RANK, _smaller_side(r))
        ],
        "extract_subset_s": sum(r["extract_s"] for r in rows),
        "lycoris_subset_s": sum(r["lycoris_s"] for r in rows),
        "lycoris_unet_estimate_s": _estimate(rows, "lycoris_s"),
        "resize_subset_s": sum(r["resize_s"] for r in rows),
        "resize_dense_subset_s": sum(r["resize_dense_s"] for r in rows),
        "resize_dense_unet_estimate_s": _estimate(rows, "resize_dense_s"),
        "resize_speedup_1280_min": min(r["resize_dense_s"] / r["resize_s"] for r in big),
        "resize_speedup_min": min(speedups),
        "resize_speedup_max": max(speedups),
        "resize_ms_min": 1e3 * min(r["resize_s"] for r in rows),
        "resize_ms_max": 1e3 * max(r["resize_s"] for r in rows),
        "resize_error_diff_max": max(
            abs(r["resize_error"] - r["resize_dense_error"]) for r in rows
        ),
        "resize_apart_max": max(r["resize_results_apart"] for r in rows),
        "combine_error_max": max(r["combine_error"] for r in rows),
        "combine_rank32_error_max": max(r["combine_rank32_error"] for r in rows),
        "peft_svd_error_max": max(r["peft_svd_error"] or 0.0 for r in rows),
        "peft_cat_error_max": max(r["peft_cat_error"] or 0.0 for r in rows),
        "combine_subset_s": sum(r["combine_s"] for r in rows),
        "combine_rank32_subset_s": sum(r["combine_rank32_s"] for r in rows),
    }


def report(result: dict) -> str:
    """The Markdown tables (and their caption) of a result file."""
    env, load, ckpt = result["environment"], result["load_average_1min"], result["checkpoint"]
    runs, workers, peft = result["runs"], result["workers"], result["peft"]
    s = summary(result)
    n = result["subset"]["layers"]
    probe = " and ".join(f"{ms:.1f} ms" for ms in result["qr_probe_ms"].values())
    lines = [
        f"Measured on {env['device']} ({env['cpu_threads']} threads), torch {env['torch']}, "
        f"{env['date']}; command `{env['command']}`. Checkpoint: the synthetic fp16 SD v1 "
        f"UNet ({ckpt['params']:,} parameters, {ckpt['layers']} linear and conv layers); "
        f"fine-tune: {ckpt['fine_tune']}. The machine was shared: 1-minute load average "
        f"{load['start']:.1f} at the start, {load['end']:.1f} at the end.",
        "",
        "Whole UNet, each command in its own process, with `--threads 1` unless the row says "
        "otherwise (on a shared machine a second thread can wait on the other load: one QR of "
        f"an 11520 × 64 matrix, timed once in the run, took {probe} on one thread and on "
        f"torch's default {env['cpu_threads']}):",
        "",
        "| command | wall time (s) | CPU time (s) | peak RSS (MiB) |",
        "|---|---|---|---|",
    ]
    for name, run_ in runs.items():
        lines.append(
            f"| {name} | {run_['wall_s']:.1f} | {run_['cpu_s']:.1f} | {run_['peak_rss_mb']:.0f} |"
        )
    differs = ", ".join(f"`{k}`" for k in s["lycoris_rank_differs"]) or "none"
    lines += [
        "",
        f"Per layer, on the {n} layers that have a distinct shape (one thread each; the "
        "whole-UNet estimate multiplies each shape's time by its number of layers):",
        "",
        "| task | lowrank | comparator | time lowrank (s) | time comparator (s) | "
        "peak RSS lowrank / comparator (MiB) | error |",
        "|---|---|---|---|---|---|---|",
        f"| extract rank 32 | `lowrank extract`'s SVD (adaptive) | LyCORIS `extract_linear` / "
        f"`extract_conv` | {s['extract_subset_s']:.1f} | {s['lycoris_subset_s']:.1f} (whole "
        f"UNet ≈ {s['lycoris_unet_estimate_s']:.0f}) | "
        f"{workers['extract-ours']['peak_rss_mb']:.0f} / "
        f"{workers['extract-lycoris']['peak_rss_mb']:.0f} | ours ≤ "
        f"{s['extract_ratio_max']:.5f} × the exact truncated SVD's; {s['extract_exact']} of "
        f"{n} layers took the exact SVD |",
        f"| resize 128 → 16 | `lowrank.resize` | ΔW + `torch.linalg.svd` | "
        f"{s['resize_subset_s']:.2f} | {s['resize_dense_subset_s']:.1f} (whole UNet ≈ "
        f"{s['resize_dense_unet_estimate_s']:.0f}) | "
        f"{workers['resize']['peak_rss_mb']:.0f} (one process runs both) | errors differ by "
        f"≤ {s['resize_error_diff_max']:.1e}; results ≤ {s['resize_apart_max']:.1e} apart |",
        f'| combine 8 + 16 + 32 | `lowrank.combine` | PEFT `add_weighted_adapter` "cat" | '
        f"{s['combine_subset_s']:.2f} | {peft['cat']:.2f} | "
        f"{workers['combine-ours']['peak_rss_mb']:.0f} / "
        f"{workers['combine-peft-cat']['peak_rss_mb']:.0f} | ours ≤ "
        f"{s['combine_error_max']:.1e}, PEFT ≤ {s['peft_cat_error_max']:.1e} |",
        f'| combine, rank 32 | `lowrank.combine(..., rank=32)` | PEFT "svd" (rank 32) | '
        f"{s['combine_rank32_subset_s']:.2f} | {peft['svd']:.1f} | "
        f"{workers['combine-ours']['peak_rss_mb']:.0f} / "
        f"{workers['combine-peft-svd']['peak_rss_mb']:.0f} | ours ≤ "
        f"{s['combine_rank32_error_max']:.4f}, PEFT ≤ {s['peft_svd_error_max']:.4f} |",
        "",
        f"Resize took {s['resize_ms_min']:.0f}–{s['resize_ms_max']:.0f} ms per layer "
        f"whatever its size, {s['resize_speedup_min']:.1f}–{s['resize_speedup_max']:.0f}× "
        "less than the dense method, and at least "
        f"{s['resize_speedup_1280_min']:.0f}× less on every layer whose smaller side is 1280 "
        "or more. Layers where LyCORIS did not return rank 32 (it caps a convolution's rank "
        "at its input channels, and returns the dense difference when the rank is half the "
        f"output channels or more): {differs}; there the optimum is computed from the exact "
        "singular values.",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Per-layer time against dense size: extract (ours, LyCORIS) and resize (ours, dense)."""
    from matplotlib import figure as mpl_figure

    rows = result["rows"]
    size = [r["shape"][0] * torch.Size(r["shape"][1:]).numel() for r in rows]
    fig = mpl_figure.Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    for axes, series, title in (
        (left, (("extract_s", "lowrank extract"), ("lycoris_s", "LyCORIS")), "extract, rank 32"),
        (
            right,
            (("resize_s", "lowrank resize"), ("resize_dense_s", "dense SVD")),
            "resize 128 → 16",
        ),
    ):
        for key, label in series:
            axes.loglog(size, [r[key] for r in rows], "o", label=label)
        axes.set_xlabel("dense size out × in·K")
        axes.set_ylabel("seconds per layer (1 thread)")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where the synthetic files go (deleted after)")
    parser.add_argument("--report", type=Path, help="print the table of this result file")
    parser.add_argument("--plot", type=Path, help="redraw the plot of this result file")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny UNet, to check the script (factor_tools-smoke)"
    )
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return
    if args.plot is not None:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    if args.worker is not None:
        torch.set_num_threads(1)
        rows = WORKERS[args.worker](args.workdir, args.keys.split(","))
        args.out.write_text(json.dumps(rows))
        return
    if args.smoke:
        SD_V1_UNET.update(SMOKE_UNET)
    work = Path(tempfile.mkdtemp(prefix="lowrank-factor-tools-", dir=args.workdir))
    try:
        path = run(work, "factor_tools-smoke" if args.smoke else "factor_tools")
        print(report(json.loads(path.read_text())))
        print(f"wrote {path} and {path.with_suffix('.png').relative_to(RESULTS_DIR.parent)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
