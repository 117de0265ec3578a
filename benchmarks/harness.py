"""One way to time and record every benchmark in this folder.

`time_ms` returns p20/p50/p80 milliseconds: `triton.testing.do_bench` on CUDA, a
wall-clock loop with the same quantiles on CPU; `interleaved_ms` times several functions in
turn, for ratios that hold on a shared CPU. `environment()` describes the
machine and versions; `write_results` stores rows with it under `results/`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUANTILES = (0.2, 0.5, 0.8)
SD_V1_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
"""The diffusers `UNet2DConditionModel` config of Stable Diffusion v1."""


def environment() -> dict[str, Any]:
    """GPU or CPU name, torch/triton/CUDA versions, date and the exact command line."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "device_type": "cuda" if cuda else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }


def _cpu_quantiles(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> list[float]:
    fn()
    start = time.perf_counter()
    fn()
    once_ms = max((time.perf_counter() - start) * 1e3, 1e-4)
    for _ in range(max(1, int(warmup_ms / once_ms))):
        fn()
    samples = []
    for _ in range(max(5, int(rep_ms / once_ms))):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    cuts = statistics.quantiles(samples, n=10)
    return [cuts[1], statistics.median(samples), cuts[7]]


@contextlib.contextmanager
def env_vars(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def time_ms(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    """p20/p50/p80 run time of `fn()` in milliseconds, on the device its tensors use."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    else:
        p20, p50, p80 = _cpu_quantiles(fn, warmup_ms, rep_ms)
    return {"p20_ms": p20, "p50_ms": p50, "p80_ms": p80}


def interleaved_ms(fns: dict[Any, Callable[[], object]], *, rounds: int = 5) -> dict[Any, dict]:
    """p20/p50/p80 ms of every `fn`, and its `samples_ms`, one per round.

    On CPU the functions run in turn, one call each per round, so that load from other
    processes falls on all of them alike and ratios of samples from the same round stay
    meaningful on a shared machine. On CUDA each is timed by `time_ms` (its samples are its
    p50, repeated)."""
    if torch.cuda.is_available():
        timed = {key: time_ms(fn) for key, fn in fns.items()}
        return {key: {**t, "samples_ms": [t["p50_ms"]] * rounds} for key, t in timed.items()}
    for fn in fns.values():
        fn()
    samples: dict[Any, list[float]] = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[key].append((time.perf_counter() - start) * 1e3)
    result = {}
    for key, values in samples.items():
        cuts = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
        result[key] = {"p20_ms": cuts[1], "p50_ms": statistics.median(values),
                       "p80_ms": cuts[7], "samples_ms": values}  # fmt: skip
    return result


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in float64 (NaN if `out` holds NaN)."""
    diff = (out.double() - ref.double()).norm()
    return float(diff / ref.double().norm())


def write_results(
    name: str, rows: list[dict], extra: dict | None = None, path: Path | None = None
) -> Path:
    """Write `{environment, rows, ...extra}` atomically to `path` (default
    `results/<name>-<device_type>.json`)."""
    env = environment()
    path = path or RESULTS_DIR / f"{name}-{env['device_type']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, **(extra or {}), "rows": rows}
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(payload, tmp, indent=2)
        tmp.write("\n")
    os.replace(tmp.name, path)
    return path


def parsed(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser`'s arguments from `argv` (the command line where None); a usage error for a
    `--repeat` below 1."""
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    return args


def print_report(path: Path | None, report: Callable[[dict], str]) -> bool:
    """Print `report` of the result file `path` (a script's `--report`); whether one was
    given."""
    if path is None:
        return False
    print(report(json.loads(path.read_text())))
    return True
