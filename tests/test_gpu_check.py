"""The GPU check's CPU-checkable parts (benchmarks/gpu_check.py): arguments, the time budget,
the per-test log it summarises and the summary it writes, with a stand-in Python whose
"pytest" and "benchmark" write what the real ones would, or hang."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_check

FAKE_PYTHON = r"""#!/bin/sh
case "$1" in -c) exit 1 ;; esac
if [ "$2" = pip ]; then  # `--target DIR`: a package's many files, as a real install leaves
    while [ $# -gt 1 ]; do
        if [ "$1" = --target ]; then
            mkdir -p "$2/pkg" && for i in 1 2 3 4 5 6 7 8 9 10; do : > "$2/pkg/m$i.py"; done
        fi
        shift
    done
    exit 0
fi
if [ "$2" = pytest ]; then
    line='"when": "call", "seconds": 0.1'
    echo "{\"test\": \"t.py::a\", \"outcome\": \"passed\", $line}" >> "$LOWRANK_TEST_LOG"
    echo "{\"test\": \"t.py::b\", \"outcome\": \"failed\", \"error\": \"boom\", $line}" \
        >> "$LOWRANK_TEST_LOG"
    echo "$CUDA_LAUNCH_BLOCKING $TRITON_INTERPRET" > "$PROBE"
    echo "$PYTHONPATH" > "$PROBE.path"
fi
case "$1" in benchmarks/*) sleep "$BENCH_SLEEP"; exit "$BENCH_EXIT" ;; esac
"""


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PROBE", str(tmp_path / "probe"))
    monkeypatch.setenv("BENCH_SLEEP", "0")
    monkeypatch.setenv("BENCH_EXIT", "0")
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget-s", "0"], "--budget-s must be positive"),
        (["--budget-s", "-5"], "--budget-s must be positive"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--steps", "lint"], "invalid choice"),
        (["--steps", "sanitize"], "the sanitize step needs --sanitize EXPR"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        gpu_check.parse_args(["--out", str(tmp_path), *argv])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_not_be_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(target)])
    assert "must be a folder" in capsys.readouterr().err
    assert target.read_text() == "x"


def test_each_step_gets_its_share_of_what_is_left():
    steps = ["bench", "tests", "install"]  # run in the check's own order whatever the order here
    assert gpu_check.step_limit(steps, 100.0, []) == pytest.approx(8.0)
    # install finished early: the 92 s left split 50 : 42 between tests and bench
    assert gpu_check.step_limit(steps, 92.0, ["install"]) == pytest.approx(50.0)
    assert gpu_check.step_limit(steps, 30.0, ["install", "tests"]) == pytest.approx(30.0)
    assert gpu_check.step_limit(["bench"], 60.0, []) == pytest.approx(60.0)
    assert gpu_check.step_limit(steps, -3.0, ["install"]) == 0.0


def test_test_log_is_counted_and_failures_kept(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"test": f"t::{i}", "when": "call", "outcome": o, "seconds": 0.0}
             for i, o in enumerate(["passed", "failed", "skipped", "passed"])]  # fmt: skip
    lines[1]["error"] = "x" * 5000
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = gpu_check.read_test_log(log)
    assert summary["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert [f["test"] for f in summary["failures"]] == ["t::1"]
    assert len(summary["failures"][0]["error"]) == 600
    assert gpu_check.read_test_log(tmp_path / "missing") == {"counts": {}, "failures": []}


def test_a_step_past_its_limit_is_stopped_with_its_children(tmp_path):
    child_pid = tmp_path / "child"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
              f"open({str(child_pid)!r}, 'w').write(str(p.pid)); time.sleep(60)")  # fmt: skip
    began = time.monotonic()
    status, code = gpu_check.run_step([sys.executable, "-c", script], 2.0, dict(os.environ),
                                      tmp_path / "log")  # fmt: skip
    assert status == "timed_out" and code is None
    assert time.monotonic() - began < 10
    time.sleep(0.2)
    stat_file = Path(f"/proc/{int(child_pid.read_text())}/stat")
    assert not stat_file.exists() or stat_file.read_text().split()[2] == "Z"  # gone or a zombie


def test_a_whole_run_writes_its_summary(tmp_path, fake_python, monkeypatch):
    out = tmp_path / "out"
    code = gpu_check.main(["--out", str(out), "--steps", "tests", "bench", "host",
                           "--python", str(fake_python), "--budget-s", "30"])  # fmt: skip
    summary = json.loads((out / "gpu_check.json").read_text())
    assert code == 0
    assert [s["name"] for s in summary["steps"]] == ["install", "sanitize", "tests", "bench",
                                                     "host", "conv"]  # fmt: skip
    assert [s["status"] for s in summary["steps"]] == ["skipped", "skipped", "ok", "ok", "ok",
                                                       "skipped"]  # fmt: skip
    assert summary["tests"]["counts"] == {"passed": 1, "failed": 1}
    assert summary["tests"]["failures"][0]["error"] == "boom"
    assert summary["budget_s"] == 30
    assert {"date", "command"} <= set(summary["environment"])
    # the tests run compiled (no interpreter) and with launches serialised
    assert (tmp_path / "probe").read_text().split() == ["1", "0"]


def test_carried_wheels_are_installed_outside_out(tmp_path, fake_python, monkeypatch):
    """The wheels of `.whl/` go to a folder on the later steps' `PYTHONPATH` but not under
    `--out`: a lent machine sends back at most 8 files from there, which the installed
    packages' files would crowd out (`OUT/site` did)."""
    root = tmp_path / "repo"
    (root / ".whl").mkdir(parents=True)
    (root / ".whl" / "pkg-1.0-py3-none-any.whl").write_text("")
    monkeypatch.setattr(gpu_check, "ROOT", root)
    out = tmp_path / "out"
    code = gpu_check.main(["--out", str(out), "--steps", "install", "tests", "--python",
                           str(fake_python), "--budget-s", "30"])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in out.rglob("*")) == ["gpu-tests.jsonl", "gpu_check.json",
                                                     "gpu_check.log"]  # fmt: skip
    site = Path((tmp_path / "probe.path").read_text().strip().split(os.pathsep)[0])
    assert len(list(site.glob("pkg/*.py"))) == 10 and not site.is_relative_to(out)


def test_the_budget_stops_a_hanging_benchmark_and_the_summary_says_so(
    tmp_path, fake_python, monkeypatch
):
    monkeypatch.setenv("BENCH_SLEEP", "60")
    out = tmp_path / "out"
    began = time.monotonic()
    code = gpu_check.main(["--out", str(out), "--steps", "bench", "--python", str(fake_python),
                           "--budget-s", "2"])  # fmt: skip
    assert time.monotonic() - began < 10
    summary = json.loads((out / "gpu_check.json").read_text())
    assert code == 1
    assert summary["steps"][3]["status"] == "timed_out"


def test_a_benchmark_that_ran_out_of_budget_is_not_a_failure(tmp_path, fake_python, monkeypatch):
    monkeypatch.setenv("BENCH_EXIT", "3")
    out = tmp_path / "out"
    code = gpu_check.main(["--out", str(out), "--steps", "bench", "conv", "--python",
                           str(fake_python)])  # fmt: skip
    summary = json.loads((out / "gpu_check.json").read_text())
    assert code == 0
    assert [s["status"] for s in summary["steps"][3:]] == ["budget_spent", "skipped",
                                                           "budget_spent"]  # fmt: skip


def test_the_conv_benchmark_writes_where_it_is_told_and_stops_at_its_budget(tmp_path):
    """`lora_conv.py --budget-s` stops between grid points with exit status 3 and writes what
    it measured, marked incomplete, to `--out` (CPU, the smallest grid)."""
    out = tmp_path / "conv.json"
    script = Path(gpu_check.ROOT) / "benchmarks" / "lora_conv.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--rounds", "1", "--out",
                           str(out), "--budget-s", "1e-9"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 3, done.stderr
    result = json.loads(out.read_text())
    assert result["complete"] is False and result["rows"] == []


def test_sanitize_runs_first_under_compute_sanitizer(tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path), "--sanitize", "persistent_fused"])
    assert args.steps == ["install", "tests", "bench", "host", "conv", "sanitize"]
    command = gpu_check.commands(args, tmp_path)["sanitize"]
    assert command[:3] == ["compute-sanitizer", "--tool", "memcheck"]
    assert command[-2:] == ["-k", "persistent_fused"] and "-x" in command
    assert gpu_check.step_limit(args.steps, 88.0, ["install"]) == pytest.approx(
        88.0 * 0.3 / (0.3 + 0.5 + 0.42 + 0.07 + 0.15)
    )


def test_the_host_profile_writes_where_it_is_told_without_a_budget(tmp_path, capsys):
    """`host_profile.py --out` (CPU smoke: the torch path) writes one row per case with its
    wall time and the profile's top functions; the check gives it no `--budget-s`."""
    args = gpu_check.parse_args(["--out", str(tmp_path)])
    command = gpu_check.commands(args, tmp_path)["host"]
    assert command[1:] == ["benchmarks/host_profile.py", "--out",
                           str(tmp_path / "host_profile-cuda.json")]  # fmt: skip
    out = tmp_path / "host.json"
    script = Path(gpu_check.ROOT) / "benchmarks" / "host_profile.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the torch path
    done = subprocess.run([sys.executable, str(script), "--calls", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["case"] for r in rows} >= {"lora_linear, no_grad", "lora_linear, training step"}
    assert all(r["wall_us_per_call"] > 0 and r["top"] for r in rows)
    import host_profile

    with pytest.raises(SystemExit) as exit_info:
        host_profile.main(["--calls", "0"])
    assert exit_info.value.code == 2
    assert "--calls must be at least 1" in capsys.readouterr().err
