"""Time `lowrank.kernels.lora_linear` against the dense GEMM and the usual LoRA implementations.

For every grid point (M, in, out, r, dtype) and mode ("forward"; "train" = forward plus the
backward for x, down and up with the weight frozen) it times, in one process:

    dense          F.linear(x, W)                       (the floor; train: forward + dx)
    eager          F.linear(x, W) + s · F.linear(F.linear(x, A), B)
    peft           PEFT's lora.Linear through get_peft_model on a one-layer model
    compile        torch.compile(eager, dynamic=True)
    lycoris        F.linear(x, W) + LyCORIS 4.x bypass_forward_diff(..., backend="triton")
    ours           lowrank.kernels.lora_linear (regime by its fixed rule, pick_regime)
    ours_fused, ours_two_phase, ours_persistent, ours_persistent_fused
                   (forward only) each regime forced: what the rule picks from
    ours_one_pass  (train only) lora_linear with LOWRANK_LORA_BACKWARD=one_pass: the whole
                   backward of up to 1024 rows in one launch (skipped where it cannot run)
    ours_epilogue  lora_linear in the persistent regime with LOWRANK_LORA_EXPAND=epilogue: the
                   adapter term added after the K loop (the default adds it first; both store
                   a 16-bit y by TMA). Forward: the regime forced (compare with
                   ours_persistent); train: only where the rule picks the persistent regime
                   (compare with ours).
                   Skipped where TMA cannot read the operands. (Runs up to the 2026-11-27
                   one had ours_expand_first, the then opt-in expand first, instead.)

Each row holds p20/p50/p80 ms (`harness.time_ms`), the ratio of p50 to dense, TFLOP/s and the
relative error vs a float64 reference (train: the largest over dx, d_down, d_up). Input sets
rotate so that together they exceed the L2 cache several times; rows at M <= 4096 are also
timed as CUDA-graph replays (the GPU's time without the host's per-call cost). A column that
cannot run records why and is skipped.

    python benchmarks/lora_linear.py                 # the full grid on CUDA
    python benchmarks/lora_linear.py --resume        # continue an interrupted run
    python benchmarks/lora_linear.py --anchors       # the four bf16 anchor points only
    python benchmarks/lora_linear.py --quick         # a few points (on CPU: a tiny smoke grid)
    python benchmarks/plot_lora_linear.py            # plot + docs/benchmarks.md table
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import RESULTS_DIR, env_vars, environment, relative_error, time_ms
from lowrank.kernels import lora_linear

GRID_M = (16, 128, 1024, 4096, 8192)
GRID_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
GRID_R = (8, 16, 64, 128)
ANCHORS = ((16, 4096, 4096, 16), (1024, 4096, 4096, 16), (4096, 4096, 4096, 16),
           (8192, 4096, 14336, 64))  # fmt: skip
"""`(M, in, out, r)` of the four anchor points (bf16), which earlier H100 measurements of the
peers cover: timed first in a full run, so that a run cut short by its budget still compares
with those numbers."""
QUICK = {"m": (16, 1024, 4096), "shapes": ((4096, 4096),), "r": (16,), "dtypes": ("bf16",)}
CPU_SMOKE = {"m": (16, 128), "shapes": ((256, 384),), "r": (8,), "dtypes": ("bf16",)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCALE = 2.0  # alpha = 2 r
GRAPH_MAX_M = 4096
"""Points up to this many rows are also timed as CUDA-graph replays (both modes): where the
host's per-call Python and launch cost exceeds the GPU work, eager timings measure the host."""
ROTATE_L2_MULTIPLE = 4
MAX_SETS = 8


@dataclass(frozen=True)
class Point:
    mode: str
    dtype: str
    m: int
    fan_in: int
    fan_out: int
    rank: int
    dropout: float = 0.0  # on the adapter branch's input (training steps only)

    def flops(self, lora: bool) -> float:
        """Useful FLOPs: 2 M in out per GEMM pass, plus the adapter's shrink and expand."""
        dense = 2.0 * self.m * self.fan_in * self.fan_out
        adapter = 2.0 * self.m * self.rank * (self.fan_in + self.fan_out)
        if self.mode == "forward":
            return dense + adapter * lora
        return 2 * dense + 3 * adapter * lora  # fwd + dx; adapter: fwd, dx, d_down + d_up


@dataclass
class Operands:
    x: torch.Tensor
    weight: torch.Tensor
    down: torch.Tensor
    up: torch.Tensor
    dy: torch.Tensor


def make_sets(point: Point, device: str, count: int) -> list[Operands]:
    dtype = DTYPES[point.dtype]
    train = point.mode == "train"
    sets = []
    for _ in range(count):

        def rnd(*shape: int, std: float = 1.0, grad: bool = False) -> torch.Tensor:
            t = (torch.randn(*shape, device=device) * std).to(dtype)
            return t.requires_grad_(grad)

        sets.append(
            Operands(
                x=rnd(point.m, point.fan_in, grad=train),
                weight=rnd(point.fan_out, point.fan_in, std=point.fan_in**-0.5),
                down=rnd(point.rank, point.fan_in, std=point.fan_in**-0.5, grad=train),
                up=rnd(point.fan_out, point.rank, std=point.rank**-0.5, grad=train),
                dy=rnd(point.m, point.fan_out),
            )
        )
    return sets


def rotation_count(point: Point, device: str) -> int:
    """Enough input sets that one pass over them exceeds L2 `ROTATE_L2_MULTIPLE` times."""
    if device != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    elements = point.fan_in * point.fan_out + point.m * (point.fan_in + point.fan_out)
    elements += point.rank * (point.fan_in + point.fan_out)
    per_set = elements * torch.finfo(DTYPES[point.dtype]).bits // 8
    return max(1, min(MAX_SETS, math.ceil(ROTATE_L2_MULTIPLE * l2 / per_set)))


# ---- methods: each returns run(ops) -> forward output, or the gradients it trains -----------


def eager(x, weight, down, up, p=0.0):
    branch = F.dropout(x, p) if p else x
    return F.linear(x, weight) + SCALE * F.linear(F.linear(branch, down), up)


@functools.cache
def compiled_eager() -> Callable:
    """`torch.compile(eager)`, built on first use (importing inductor is slow and noisy)."""
    return torch.compile(eager, dynamic=True)


def method_dense(point: Point, sets: list[Operands]) -> Callable:
    return lambda o: F.linear(o.x, o.weight)


def method_eager(point: Point, sets: list[Operands]) -> Callable:
    return lambda o: eager(o.x, o.weight, o.down, o.up, point.dropout)


def method_compile(point: Point, sets: list[Operands]) -> Callable:
    compiled = compiled_eager()
    return lambda o: compiled(o.x, o.weight, o.down, o.up, point.dropout)


def method_ours(point: Point, sets: list[Operands]) -> Callable:
    return lambda o: lora_linear(o.x, o.weight, o.down, o.up, SCALE, dropout_p=point.dropout)


def _regime(regime: str) -> Callable:
    def build(point: Point, sets: list[Operands]) -> Callable:
        if point.mode != "forward":
            raise SkipMethod("regime variants are timed in forward mode only")
        if not torch.cuda.is_available():
            raise SkipMethod("the Triton kernels need CUDA here")
        from lowrank.kernels import _lora_triton

        persistent = regime.startswith("persistent")
        if persistent and not _lora_triton.tma_ready(sets[0].x, sets[0].weight):
            raise SkipMethod("the persistent regimes need TMA (sm_90+) and 16-byte-aligned rows")

        def run(o: Operands) -> torch.Tensor:
            args = (o.x, o.weight, o.down, o.up, None, SCALE, 0.0, 0)
            return _lora_triton.forward(*args, keep_t=False, regime=regime)[0]

        return run

    return build


def method_ours_one_pass(point: Point, sets: list[Operands]) -> Callable:
    if point.mode != "train":
        raise SkipMethod("the one-pass backward changes the training step only")
    if not torch.cuda.is_available():
        raise SkipMethod("the one-pass backward is a Triton kernel: it needs CUDA here")
    from lowrank.kernels import _lora_triton

    if not _lora_triton.one_pass_fits(point.m, point.rank, point.fan_in, point.fan_out):
        raise SkipMethod("beyond the one-pass backward's rows, rank or partial-sum memory")
    dtype = DTYPES[point.dtype]
    tiles = (point.m, point.rank, point.fan_in, dtype, True, point.dropout > 0)
    if not _lora_triton._one_pass_tiles_fit(*tiles, _lora_triton._precision(dtype)):
        raise SkipMethod("only a fallback tile fits: lora_linear runs the separate backward")

    run = method_ours(point, sets)
    run.env = {_lora_triton.BACKWARD_ENV: "one_pass"}  # type: ignore[attr-defined]
    return run


def method_ours_epilogue(point: Point, sets: list[Operands]) -> Callable:
    if not torch.cuda.is_available():
        raise SkipMethod("the persistent regime is a Triton kernel: it needs CUDA here")
    from lowrank.kernels import _lora_triton

    if not _lora_triton.tma_ready(sets[0].x, sets[0].weight):
        raise SkipMethod("the persistent regime needs TMA (sm_90+) and 16-byte-aligned rows")
    run = method_ours(point, sets)
    run.env = {_lora_triton.EXPAND_ENV: "epilogue"}  # type: ignore[attr-defined]
    if point.mode == "forward":  # against ours_persistent, the same regime forced
        run.env[_lora_triton.REGIME_ENV] = "persistent"  # type: ignore[attr-defined]
    elif _lora_triton.pick_regime(point.m, point.rank, tma=True) != "persistent":
        raise SkipMethod("train mode: timed where the rule runs the persistent regime (vs ours)")
    return run


def method_peft(point: Point, sets: list[Operands]) -> Callable:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise SkipMethod(f"peft not importable: {err}") from err
    models = {}
    for o in sets:
        # built on the device in the working dtype: a CPU float32 init of a 14336 x 4096 layer
        # per input set would cost seconds per grid point
        linear = torch.nn.Linear(
            point.fan_in, point.fan_out, bias=False, device=o.x.device, dtype=o.x.dtype
        )
        base = torch.nn.Sequential(linear)
        config = LoraConfig(r=point.rank, lora_alpha=SCALE * point.rank, target_modules=["0"],
                            lora_dropout=point.dropout)  # fmt: skip
        model = get_peft_model(base, config).to(device=o.x.device, dtype=o.x.dtype)
        layer = model.base_model.model[0]
        layer.base_layer.weight = torch.nn.Parameter(o.weight, requires_grad=False)
        layer.lora_A["default"].weight = torch.nn.Parameter(o.down, o.down.requires_grad)
        layer.lora_B["default"].weight = torch.nn.Parameter(o.up, o.up.requires_grad)
        if abs(layer.scaling["default"] - SCALE) > 1e-12:
            raise SkipMethod(f"PEFT scaling {layer.scaling['default']} != {SCALE}")
        models[id(o)] = (model, layer)

    def run(o: Operands) -> torch.Tensor:
        return models[id(o)][0](o.x)

    run.leaves = lambda o: (  # type: ignore[attr-defined]
        models[id(o)][1].lora_A["default"].weight,
        models[id(o)][1].lora_B["default"].weight,
    )
    return run


def method_lycoris(point: Point, sets: list[Operands]) -> Callable:
    try:
        from lycoris.functional.locon import bypass_forward_diff
        from lycoris.kernels.select import choose
    except Exception as err:  # any import failure means: no LyCORIS column
        raise SkipMethod(f"lycoris not importable: {type(err).__name__}: {err}") from err
    o = sets[0]
    if point.dropout:
        raise SkipMethod("LyCORIS's bypass_forward_diff has no dropout")
    picked = choose((o.x, o.down, o.up), backend="triton")
    if picked != "triton":
        raise SkipMethod(f"LyCORIS chose backend {picked!r}, not its Triton kernels")

    def run(o: Operands) -> torch.Tensor:
        diff = bypass_forward_diff(o.x, None, o.down, o.up, None, gamma=SCALE, backend="triton")
        return F.linear(o.x, o.weight) + diff

    return run


METHODS: dict[str, Callable] = {
    "dense": method_dense,
    "eager": method_eager,
    "peft": method_peft,
    "compile": method_compile,
    "lycoris": method_lycoris,
    "ours": method_ours,
    "ours_fused": _regime("fused"),
    "ours_two_phase": _regime("two_phase"),
    "ours_persistent": _regime("persistent"),
    "ours_persistent_fused": _regime("persistent_fused"),
    "ours_one_pass": method_ours_one_pass,
    "ours_epilogue": method_ours_epilogue,
}


class SkipMethod(Exception):
    """A comparator that cannot run here; the message is recorded in its row."""


# ---- one grid point -------------------------------------------------------------------------


def step(point: Point, name: str, run: Callable) -> Callable[[Operands], object]:
    """The timed unit: forward under no_grad, or forward + autograd.grad of the trained leaves."""
    if point.mode == "forward":

        def forward(o: Operands) -> torch.Tensor:
            with torch.no_grad(), env_vars(getattr(run, "env", {})):
                return run(o)

        return forward

    def train(o: Operands) -> tuple[torch.Tensor, ...]:
        with env_vars(getattr(run, "env", {})):  # read by the backward too
            y = run(o)
            if name == "dense":
                leaves = (o.x,)
            elif hasattr(run, "leaves"):
                leaves = (o.x, *run.leaves(o))
            else:
                leaves = (o.x, o.down, o.up)
            return torch.autograd.grad(y, leaves, o.dy)

    return train


def reference(point: Point, o: Operands, name: str) -> tuple[torch.Tensor, ...]:
    """float64 forward output, or the float64 gradients (dx[, d_down, d_up])."""
    x, w, a, b, dy = (t.detach().double() for t in (o.x, o.weight, o.down, o.up, o.dy))
    if point.mode == "forward":
        y = x @ w.t()
        return (y,) if name == "dense" else (y + SCALE * (x @ a.t()) @ b.t(),)
    dx = dy @ w
    if name == "dense":
        return (dx,)
    g = dy @ b
    return dx + SCALE * g @ a, SCALE * g.t() @ x, SCALE * dy.t() @ (x @ a.t())


def error(point: Point, name: str, out: object, o: Operands) -> float | None:
    """The largest relative error of `out` against float64; None with dropout (each method
    draws its own mask, which the reference cannot know)."""
    if point.dropout and name != "dense":
        return None
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    refs = reference(point, o, name)
    return max(relative_error(a.detach(), r) for a, r in zip(outs, refs, strict=True))


def graph_time(fn: Callable, sets: list[Operands]) -> dict:
    """p20/p50/p80 per call of a CUDA graph that runs `fn` once on every input set."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for o in sets:
            fn(o)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for o in sets:
            fn(o)
    times = time_ms(graph.replay)
    return {f"graph_{k}": v / len(sets) for k, v in times.items()}


def run_point(point: Point, device: str, methods: list[str], graphs: bool) -> list[dict]:
    count = rotation_count(point, device)
    sets = make_sets(point, device, count)
    rows = []
    for name in methods:
        row = {**asdict(point), "method": name, "rotating_sets": count}
        try:
            fn = step(point, name, METHODS[name](point, sets))
            row["rel_err"] = error(point, name, fn(sets[0]), sets[0])
            cycle = itertools.cycle(sets)
            row.update(time_ms(lambda fn=fn, cycle=cycle: fn(next(cycle))))
            lora = name != "dense"
            row["tflops"] = point.flops(lora) / (row["p50_ms"] * 1e-3) / 1e12
            if graphs and device == "cuda" and point.m <= GRAPH_MAX_M:
                try:
                    row.update(graph_time(fn, sets))
                except Exception as err:  # a comparator that cannot be captured
                    row["graph_error"] = f"{type(err).__name__}: {err}"[:300]
        except SkipMethod as err:
            row["skipped"] = str(err)
        except Exception as err:  # record and keep going: one broken column must not stop a run
            row["skipped"] = f"{type(err).__name__}: {err}"[:300]
        rows.append(row)
        print(format_row(row), flush=True)
    dense = next((r for r in rows if r["method"] == "dense" and "p50_ms" in r), None)
    for row in rows:
        if dense and "p50_ms" in row:
            row["ratio_to_dense"] = row["p50_ms"] / dense["p50_ms"]
            if "graph_p50_ms" in row and "graph_p50_ms" in dense:
                row["graph_ratio_to_dense"] = row["graph_p50_ms"] / dense["graph_p50_ms"]
    del sets
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def format_row(row: dict) -> str:
    head = (
        f"{row['mode']:7s} {row['dtype']} M={row['m']:<5d} {row['fan_in']}x{row['fan_out']} "
        f"r={row['rank']:<3d} {row['method']:15s}"
        + (f" p={row['dropout']:g}" if row.get("dropout") else "")
    )
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    timing = f"p50 {row['p50_ms']:.4f} ms  {row['tflops']:.1f} TFLOP/s"
    err = "–" if row["rel_err"] is None else f"{row['rel_err']:.1e}"
    return f"{head} {timing}  err {err}"


# ---- the run --------------------------------------------------------------------------------


def grid(args: argparse.Namespace, device: str) -> list[Point]:
    """The points to time, the anchor points first; `--dropout` applies to training steps."""

    def dropout(mode: str) -> float:
        return args.dropout if mode == "train" else 0.0

    if args.anchors:
        return [Point(mode, dtype, *anchor, dropout(mode)) for dtype in args.dtypes or ("bf16",)
                for mode in args.modes for anchor in ANCHORS]  # fmt: skip
    if args.quick:
        spec = QUICK if device == "cuda" else CPU_SMOKE
    else:
        spec = {"m": GRID_M, "shapes": GRID_SHAPES, "r": GRID_R, "dtypes": ("bf16", "fp16")}
    dtypes = args.dtypes or spec["dtypes"]
    points = [
        Point(mode, dtype, m, fan_in, fan_out, rank, dropout(mode))
        for dtype in dtypes
        for mode in args.modes
        for fan_in, fan_out in spec["shapes"]
        for rank in spec["r"]
        for m in spec["m"]
    ]
    return sorted(points, key=lambda p: (p.dtype, (p.m, p.fan_in, p.fan_out, p.rank)) not in
                  {("bf16", anchor) for anchor in ANCHORS})  # fmt: skip


def save(path: Path, rows: list[dict], complete: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": environment(),
        "complete": complete,
        "scale": SCALE,
        "methods": list(METHODS),
        "rows": rows,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few grid points (smoke test)")
    parser.add_argument("--anchors", action="store_true", help="the four anchor points only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="JSON path (default: results/lora_linear-…)")
    parser.add_argument("--resume", action="store_true", help="skip points already in --out")
    parser.add_argument("--budget-s", type=float, default=math.inf, help="stop after this long")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["forward", "train"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-graphs", action="store_true", help="skip CUDA-graph timings")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout on the adapter branch in the training steps")  # fmt: skip
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.quick and args.anchors:
        parser.error("--quick and --anchors are two different grids: give one")
    if device == "cpu" and not args.quick:
        print("CPU timings say nothing about the fused kernels; run --quick for a smoke test.")
        return 2
    out = args.out or RESULTS_DIR / (
        "lora_linear-cuda.json" if device == "cuda" else "lora_linear-cpu-smoke.json"
    )
    rows: list[dict] = []
    if args.resume and out.exists():
        rows = json.loads(out.read_text())["rows"]
    done = {(*(r[k] for k in ("mode", "dtype", "m", "fan_in", "fan_out", "rank")),
             r.get("dropout", 0.0)) for r in rows}  # fmt: skip
    start = time.monotonic()
    points = grid(args, device)
    todo = [p for p in points if tuple(asdict(p).values()) not in done]
    for index, point in enumerate(todo):
        if time.monotonic() - start > args.budget_s:
            print(f"budget spent: {len(todo) - index} points left; rerun with --resume")
            save(out, rows, complete=False)
            return 3
        rows.extend(run_point(point, device, args.methods, graphs=not args.no_graphs))
        save(out, rows, complete=False)
    save(out, rows, complete=True)
    print(f"wrote {out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
