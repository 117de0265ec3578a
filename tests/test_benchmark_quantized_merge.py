"""The docs table of the float8 merge benchmark is the one its result file gives; its
arguments, and the schema its tiny run writes: lowrank's output is the reference the peers'
bytes are counted against, and every route merges to within float8 rounding of the exact
merge."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import quantized_merge  # noqa: E402

RESULT = ROOT / "benchmarks/results/quantized_merge-cpu.json"


def _check_schema(result: dict) -> None:
    env = result["environment"]
    assert {"device", "torch", "triton", "cuda", "date", "command"} <= set(env)
    rows = {(r["variant"], r["route"]): r for r in result["rows"]}
    assert set(rows) == {(v, r) for v in quantized_merge.VARIANTS
                         for r in quantized_merge.ROUTES}  # fmt: skip
    for (_, route), row in rows.items():
        assert len(row["merge_s"]) == result["repeat"] and row["merge_p50_s"] > 0
        # float8 rounding of the base (≈ 2⁻⁴ relative per entry), bfloat16's for the baseline
        assert row["max_relative_error"] < (3e-2 if route != "lowrank bf16" else 3e-3)
        if route == "lowrank":
            assert row["differing_entries"] == row["differing_scales"] == 0
        elif route == "lowrank bf16":
            assert row["differing_entries"] is None
        else:
            assert row["differing_entries"] > 0  # the peers choose other scales somewhere
            assert row["differing_entries_same_scale"] <= row["entries_same_scale"]
    for variant in quantized_merge.VARIANTS:
        assert set(result["ratios"][variant]) >= {
            f"time_lowrank_vs_{quantized_merge._slug(r)}" for r in quantized_merge.ROUTES[1:]
        }


def test_docs_show_the_recorded_results():
    result = json.loads(RESULT.read_text())
    assert quantized_merge.report(result) in (ROOT / "docs/benchmarks.md").read_text(
        encoding="utf-8"
    ), (
        "docs/benchmarks.md is stale: paste `python benchmarks/quantized_merge.py --report "
        "benchmarks/results/quantized_merge-cpu.json`"
    )
    assert not result["quick"] and result["checkpoint"]["layer"] == quantized_merge.LAYER
    assert result["environment"]["command"].startswith("python benchmarks/quantized_merge.py")
    assert all(row["peak_rss_mb"] > 0 for row in result["rows"])
    _check_schema(result)


def test_repeat_below_one_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        quantized_merge.main(["--repeat", "0"])
    assert exit_info.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_the_quick_run_writes_every_route_and_ratio(tmp_path):
    out = tmp_path / "result.json"
    quantized_merge.main(["--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["quick"] and result["checkpoint"]["layer"] == quantized_merge.QUICK_LAYER
    _check_schema(result)
    assert all(row["peak_rss_mb"] is None for row in result["rows"])  # in this process
    assert not any((tmp_path / "work").iterdir())  # the synthetic files are deleted
