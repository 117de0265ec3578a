"""The GPU check: one command that, on a bare CUDA machine, tests the compiled kernels and
times the anchor points, inside a time budget, leaving what it measured.

    python3 benchmarks/gpu_check.py --out "$OUT"                 # on a lent GPU, one call
    make gpu-check RESULTS="$OUT"                                # the same through make

Steps, in order, each a subprocess with its own share of `--budget-s` (a step cut off by its
share is stopped and recorded as such; the next step still runs):

- `install`: `pip install --no-deps -e .` into the running Python unless `lowrank` already
  imports from this checkout; wheels in `.whl/` (lycoris-lora, tensorly, toml: packages a GPU
  image may lack) go to a temporary folder outside `OUT` (a lent machine sends back only a
  few files from `OUT`, and the packages' hundreds would crowd out the results), put on
  `PYTHONPATH` for the later steps.
- `sanitize` (only with `--sanitize EXPR`): the tests that `pytest -k EXPR` selects, under
  `compute-sanitizer --tool memcheck`, stopping at the first failure, with Triton printing
  each autotuned config: which kernel and config made a bad access, and where.
- `tests`: the compiled-kernel tests (every regime, bf16/fp16/fp32, dropout on and off, odd
  shapes; the grid marked `exhaustive` left out), with `CUDA_LAUNCH_BLOCKING=1` so a fault is
  charged to the launch that made it, on pytest-xdist workers when it is installed. Each
  outcome is appended to `OUT/gpu-tests.jsonl` as it arrives (tests/conftest.py), and a test
  that breaks its process's CUDA context ends that worker, so the rest still run.
- `bench`: `benchmarks/lora_linear.py --anchors` (the four bf16 anchor points, forward and
  training step, every comparator) into `OUT/lora_linear-cuda.json`, stopping at its share.
- `host`: `benchmarks/host_profile.py` into `OUT/host_profile-cuda.json`: wall time per eager
  call at 16 rows and where the Python's time goes (cProfile), for lora_linear and torch.
- `conv`: `benchmarks/lora_conv.py` (the UNet conv grid in bf16) into
  `OUT/lora_conv-cuda.json`, stopping at its share.

`OUT/gpu_check.json` is rewritten after every step: environment, each step's status and
seconds, and the tests' counts with the first failures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("install", "sanitize", "tests", "bench", "host", "conv")
SHARES = {"install": 0.08, "sanitize": 0.3, "tests": 0.5, "bench": 0.42, "host": 0.07,
          "conv": 0.15}  # fmt: skip
"""Each step's share of the budget; time a step leaves unused passes to the next."""
TEST_FILES = ("tests/test_lora_linear.py", "tests/test_lora_dropout.py",
              "tests/test_lora_one_pass.py", "tests/test_lora_expand_first.py",
              "tests/test_lora_compile.py", "tests/test_lora_transforms.py",
              "tests/test_lora_edges.py")
TEST_LOG = "gpu-tests.jsonl"
FIRST_FAILURES = 20
BENCH_POINT_S = 60.0  # about the longest grid point, autotuning included
GRACE_S = 15.0  # a step's subprocess gets this long to stop after SIGTERM


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | failed | timed_out | skipped
    seconds: float = 0.0
    returncode: int | None = None
    detail: str = ""


@dataclass
class Summary:
    budget_s: float
    environment: dict = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    tests: dict = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for every result file")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-clock seconds for all steps together (default 540)")  # fmt: skip
    parser.add_argument("--steps", nargs="+", choices=STEPS,
                        default=[s for s in STEPS if s != "sanitize"])  # fmt: skip
    parser.add_argument("--sanitize", metavar="EXPR",
                        help="the tests `pytest -k EXPR` selects, under compute-sanitizer")
    parser.add_argument("--workers", type=int, default=min(16, len(os.sched_getaffinity(0))),
                        help="pytest-xdist workers (default: a core each, up to 16)")  # fmt: skip
    parser.add_argument("--python", default=sys.executable, help="the Python to run steps with")
    parser.add_argument("--bench-args", default="",
                        help="more benchmark arguments, e.g. '--modes train'")  # fmt: skip
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.sanitize and "sanitize" not in args.steps:
        args.steps.append("sanitize")
    if "sanitize" in args.steps and not args.sanitize:
        parser.error("the sanitize step needs --sanitize EXPR")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder, got the file {args.out}")
    return args


def step_limit(steps: list[str], left_s: float, done: list[str]) -> float:
    """Seconds the next step of `steps` may take: its share of what is left, in proportion to
    the shares of the steps still to run (so unused time passes on)."""
    todo = [s for s in STEPS if s in steps and s not in done]
    if not todo:
        return 0.0
    total = sum(SHARES[s] for s in todo)
    return max(0.0, left_s * SHARES[todo[0]] / total)


def run_step(command: list[str], limit_s: float, env: dict, log: Path) -> tuple[str, int | None]:
    """Run `command` (output appended to `log`) for at most `limit_s` seconds; on time, stop
    its whole process group. Returns `(status, returncode)`."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        try:
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        except OSError as err:  # e.g. no compute-sanitizer on this machine
            out.write(f"cannot start {command[0]}: {err}\n")
            return "failed", None
        try:
            code = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return "timed_out", None
    return ("ok" if code == 0 else "failed"), code


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_test_log(path: Path) -> dict:
    """Counts by outcome and the first failures from the per-test JSON lines."""
    if not path.exists():
        return {"counts": {}, "failures": []}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    counts = Counter(line["outcome"] for line in lines)
    failures = [{"test": line["test"], "when": line["when"], "error": line.get("error", "")[-600:]}
                for line in lines if line["outcome"] == "failed"]  # fmt: skip
    return {"counts": dict(counts), "failures": failures[:FIRST_FAILURES]}


def commands(args: argparse.Namespace, out: Path) -> dict[str, list[str]]:
    py = args.python
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not exhaustive",
             *TEST_FILES]  # fmt: skip
    if _has_module(py, "xdist") and args.workers > 1:
        tests += ["-n", str(args.workers)]
    bench = [py, "benchmarks/lora_linear.py", "--anchors", "--out",
             str(out / "lora_linear-cuda.json"), *shlex.split(args.bench_args)]  # fmt: skip
    sanitize = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "10", py, "-m",
                "pytest", "-x", "-q", "-p", "no:cacheprovider", *TEST_FILES, "-k",
                args.sanitize or ""]  # fmt: skip
    install = [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."]
    conv = [py, "benchmarks/lora_conv.py", "--out", str(out / "lora_conv-cuda.json")]
    host = [py, "benchmarks/host_profile.py", "--out", str(out / "host_profile-cuda.json")]
    return {"install": install, "sanitize": sanitize, "tests": tests, "bench": bench,
            "host": host, "conv": conv}  # fmt: skip


def _has_module(python: str, name: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def _imports_this_checkout(python: str, env: dict) -> bool:
    probe = "import lowrank.kernels, pathlib; print(pathlib.Path(lowrank.__file__).resolve())"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env, cwd="/")
    return done.returncode == 0 and Path(done.stdout.strip()).is_relative_to(ROOT)


def _wheels(python: str, env: dict, log: Path, limit: float) -> str:
    """Install the wheels carried in `.whl/` into a temporary folder (never under `--out`,
    whose files are what a lent machine sends back) and put it on `env`'s `PYTHONPATH`."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return "no wheels"
    site = Path(tempfile.mkdtemp(prefix="lowrank-gpu-check-site-"))
    command = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--upgrade", "--target", str(site), *map(str, wheels)]  # fmt: skip
    status, _ = run_step(command, limit, env, log)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return f"{len(wheels)} wheels: {status}"


def environment(python: str, env: dict) -> dict:
    probe = ("import json, torch, triton; print(json.dumps({'torch': torch.__version__, "
             "'triton': triton.__version__, 'cuda': torch.version.cuda, 'device': "
             "torch.cuda.get_device_name() if torch.cuda.is_available() else None}))")  # fmt: skip
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env)
    info = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-300:]}
    return {**info, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}  # fmt: skip


def run_named(
    name: str, step: Step, args: argparse.Namespace, out: Path, env: dict, limit: float
) -> None:
    """Run step `name` within `limit` seconds, recording its outcome in `step`; `install`
    also puts the carried wheels on `env`'s `PYTHONPATH` for the steps after it."""
    log = out / "gpu_check.log"
    command = commands(args, out)[name]
    step_env = env
    if name == "install":
        step.detail = _wheels(args.python, env, log, limit)
        if _imports_this_checkout(args.python, env):
            step.status, step.detail = "ok", f"{step.detail}; lowrank already installed"
            return
    elif name == "sanitize":
        step_env = {**env, "TRITON_PRINT_AUTOTUNING": "1"}
    elif name == "tests":
        step_env = {**env, "LOWRANK_TEST_LOG": str(out / TEST_LOG), "CUDA_LAUNCH_BLOCKING": "1"}
    elif name != "host":  # bench, conv: their budget stops them between points
        command += ["--budget-s", f"{max(1.0, limit - BENCH_POINT_S):.0f}"]
    step.status, step.returncode = run_step(command, limit, step_env, log)
    if name in ("bench", "conv") and step.returncode == 3:
        step.status = "budget_spent"


def write_summary(summary: Summary, out: Path) -> None:
    path = out / "gpu_check.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(summary), indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    (out / TEST_LOG).unlink(missing_ok=True)
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    summary = Summary(budget_s=args.budget_s)
    done: list[str] = []
    for name in STEPS:
        step = Step(name)
        summary.steps.append(step)
        if name in args.steps:
            limit = step_limit(args.steps, args.budget_s - (time.monotonic() - start), done)
            began = time.monotonic()
            run_named(name, step, args, out, env, limit)
            step.seconds = round(time.monotonic() - began, 1)
            done.append(name)
        else:
            step.status = "skipped"
        if name == "install":
            summary.environment = environment(args.python, env)
        if name == "tests":
            summary.tests = read_test_log(out / TEST_LOG)
        write_summary(summary, out)
        print(f"{name}: {step.status} in {step.seconds} s {step.detail}".rstrip(), flush=True)
    counts = summary.tests.get("counts", {})
    print(f"tests: {counts}; results in {out}")
    return 0 if all(s.status in ("ok", "skipped", "budget_spent") for s in summary.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
