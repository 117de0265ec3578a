"""Probe which shape parameter or config makes a compiled kernel fault or go wrong: each case
runs in its own process (a fault ends the CUDA context), forward and backward of
`lora_linear` against float64, and reports ok / wrong / crash.

The cases run with `shrink_fusable` switched off (every weight offered to the fused-shrink
kernels, as before it existed), so that they show which operands those kernels get right;
`--guarded` keeps it. The 2026-11-27 H100 run (`results/probe_shapes-h100-2026-11-27.json`)
predates the guard; 120 and 136 (16-byte rows, strides not multiples of 16) were added after.

    python3 benchmarks/probe_shapes.py --out "$OUT/probe.json"
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

BASE = (37, 123, 42, 5)
VARIANTS = [BASE, (37, 128, 42, 5), (37, 124, 42, 5), (37, 122, 42, 5), (37, 127, 42, 5),
            (37, 120, 42, 5), (37, 136, 42, 5), (37, 123, 48, 5), (37, 123, 42, 8),
            (37, 123, 48, 8), (64, 123, 42, 5), (16, 123, 42, 5)]  # fmt: skip


def child(spec: dict) -> dict:
    import torch
    from lowrank.kernels import _lora_gemm, _lora_triton, lora_linear

    if not spec.get("guarded"):
        _lora_triton.shrink_fusable = lambda w: True
    if spec.get("config") is not None:
        kernel = _lora_gemm.lora_backward_kernel
        kernel.configs = [_lora_gemm.ONE_PASS_CONFIGS[spec["config"]]]
    rows, fan_in, fan_out, rank = spec["shape"]
    dtype = getattr(torch, spec["dtype"])
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    ref = [rnd(rows, fan_in), rnd(fan_out, fan_in, std=fan_in**-0.5),
           rnd(rank, fan_in, std=fan_in**-0.5), rnd(fan_out, rank, std=rank**-0.5),
           rnd(fan_out)]  # fmt: skip
    ours = [t.to(dtype).cuda().requires_grad_(i != 1) for i, t in enumerate(ref)]
    theirs = [t.cuda().requires_grad_(i != 1) for i, t in enumerate(ref)]
    y = lora_linear(*ours[:4], scale=0.7, bias=ours[4], backend="triton")
    x, w, a, b, bias = theirs
    y_ref = x @ w.t() + bias + 0.7 * (x @ a.t()) @ b.t()
    dy = torch.randn(y.shape, dtype=torch.float64, device="cuda")
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    torch.cuda.synchronize()

    def rel(o, r):
        return float((o.detach().double() - r.detach()).norm() / r.detach().norm())

    errs = {"y": rel(y, y_ref)}
    for i, name in ((0, "dx"), (2, "d_down"), (3, "d_up"), (4, "d_bias")):
        errs[name] = rel(ours[i].grad, theirs[i].grad)
    return errs


def run_case(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, **spec.get("env", {}))
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout", "seconds": round(time.time() - start, 1)}
    out = {**spec, "seconds": round(time.time() - start, 1)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        errs = json.loads(lines[-1])
        tol = 4e-3 if spec["dtype"] == "float16" else 2e-2
        out["errs"] = errs
        out["status"] = "ok" if all(e <= tol for e in errs.values()) else "wrong"
    else:
        tail = proc.stderr.strip().splitlines()[-3:]
        out["status"] = "crash"
        out["error"] = " | ".join(tail)[-400:]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one case, as JSON (internal)
    parser.add_argument("--out", help="write the results (JSON) here, after each case")
    parser.add_argument("--workers", type=int, default=8, help="cases run at once")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per case")
    parser.add_argument("--guarded", action="store_true", help="keep shrink_fusable's guard")
    args = parser.parse_args()
    if args.workers < 1 or args.timeout <= 0:
        parser.error(f"--workers must be at least 1 and --timeout positive, got {args.workers} "
                     f"and {args.timeout}")  # fmt: skip
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    specs = []
    for shape in VARIANTS:
        for path, env in (("one_pass", {"LOWRANK_LORA_BACKWARD": "one_pass",
                                        "LOWRANK_LORA_REGIME": "fused"}),
                          ("fused", {"LOWRANK_LORA_BACKWARD": "separate",
                                     "LOWRANK_LORA_REGIME": "fused"})):  # fmt: skip
            specs.append({"shape": shape, "dtype": "float16", "path": path, "env": env})
    for i in range(7):
        specs.append({"shape": BASE, "dtype": "float16", "path": "one_pass", "config": i,
                      "env": {"LOWRANK_LORA_BACKWARD": "one_pass", "LOWRANK_LORA_REGIME": "fused"}})
    for path, env in (("one_pass", {"LOWRANK_LORA_BACKWARD": "one_pass"}),
                      ("fused", {"LOWRANK_LORA_REGIME": "fused"}),
                      ("two_phase", {"LOWRANK_LORA_REGIME": "two_phase"}),
                      ("persistent_fused", {"LOWRANK_LORA_REGIME": "persistent_fused"})):
        env = {"LOWRANK_LORA_BACKWARD": "separate", **env}
        specs.append({"shape": BASE, "dtype": "bfloat16", "path": path, "env": env})
    for path, env in (("two_phase", {"LOWRANK_LORA_REGIME": "two_phase"}),
                      ("persistent_fused", {"LOWRANK_LORA_REGIME": "persistent_fused"})):
        env = {"LOWRANK_LORA_BACKWARD": "separate", **env}
        specs.append({"shape": BASE, "dtype": "float16", "path": path, "env": env})
    for spec in specs:
        spec["guarded"] = args.guarded
    results = []
    with cf.ThreadPoolExecutor(args.workers) as pool:
        for res in pool.map(lambda s: run_case(s, args.timeout), specs):
            results.append(res)
            print(res["path"], res["dtype"], res["shape"], res.get("config"), res["status"],
                  res.get("errs", res.get("error", "")), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
