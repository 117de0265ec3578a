"""The docs tables of the regex-matching benchmark are the ones its result file gives; its
arguments, the schema its tiny run writes, and `re` killed past the time cap."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import pattern_matching  # noqa: E402

RESULT = ROOT / "benchmarks/results/pattern_matching-cpu.json"


def _check_schema(result: dict) -> None:
    env = result["environment"]
    assert {"device", "torch", "triton", "cuda", "date", "command"} <= set(env)
    rows = result["rows"]
    per_name = {(r["pattern"], r["matcher"]): r for r in rows if r["case"] == "per name"}
    assert set(per_name) == {(p, m) for p in pattern_matching.PATTERNS
                             for m in pattern_matching.MATCHERS}  # fmt: skip
    for label in pattern_matching.PATTERNS:
        selected = {per_name[label, m]["selected"] for m in pattern_matching.MATCHERS}
        assert len(selected) == 1  # the three agree on every name, so on the count
        for m in pattern_matching.MATCHERS:
            row = per_name[label, m]
            assert row["cold_us_per_name"] > 0 and row["warm_us_per_name"] > 0
            assert len(row["cold_ms"]) == result["repeat"]
        assert set(result["ratios"][label]) == {
            f"{w}_lowrank_vs_{p}" for w in ("cold", "warm") for p in ("re", "PEFT")
        }
    loads = {r["matcher"] for r in rows if r["case"] == "load"}
    assert loads == {"lowrank load_adapter", "lowrank key resolution", "PEFT key resolution"}
    assert result["folder"]["rank_pattern_keys"] > 0
    hostile = {r["pattern"]: r for r in rows if r["case"] == "hostile"}
    assert set(hostile) == set(pattern_matching.HOSTILE)
    for row in hostile.values():
        assert row["lowrank_s"] > 0 and row["matches"] is False
        assert (row["re_s"] is None) == row["re_timed_out"]


def test_docs_show_the_recorded_results():
    result = json.loads(RESULT.read_text())
    assert pattern_matching.report(result) in (ROOT / "docs/benchmarks.md").read_text(
        encoding="utf-8"
    ), (
        "docs/benchmarks.md is stale: paste `python benchmarks/pattern_matching.py --report "
        "benchmarks/results/pattern_matching-cpu.json`"
    )
    assert not result["quick"] and result["folder"]["layers"] == 560
    assert result["environment"]["command"].startswith("python benchmarks/pattern_matching.py")
    _check_schema(result)


@pytest.mark.parametrize("argv", [["--repeat", "0"], ["--cap", "0"]])
def test_counts_below_one_and_no_cap_are_refused_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pattern_matching.main(argv)
    assert exit_info.value.code == 2 and argv[0] in capsys.readouterr().err


def test_the_quick_run_writes_every_row_and_ratio(tmp_path):
    out = tmp_path / "result.json"
    pattern_matching.main(["--quick", "--cap", "0.5", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["quick"] and result["repeat"] == 1
    _check_schema(result)
    assert pattern_matching.report(result).count("\n| ") >= 4 + 3 + 3


def test_re_past_the_cap_is_killed_and_recorded_as_such():
    """`(a|aa)*c` on 40 a's takes `re` minutes: the worker is killed at the cap."""
    (row,) = pattern_matching.hostile_rows({"(a|aa)*c": 40}, 1, 0.3)
    assert row["re_timed_out"] and row["re_s"] is None and row["re_cap_s"] == 0.3
    assert row["lowrank_s"] < 0.3 and row["name_length"] == 40
