"""The docs table of the checkpoint-tools benchmark is the one its result file gives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import checkpoint_tools  # noqa: E402


def test_docs_show_the_recorded_results():
    result = json.loads((ROOT / "benchmarks/results/checkpoint_tools-cpu.json").read_text())
    table = checkpoint_tools.report(result)
    assert table in (ROOT / "docs/benchmarks.md").read_text(encoding="utf-8"), (
        "docs/benchmarks.md is stale: paste `python benchmarks/checkpoint_tools.py --report "
        "benchmarks/results/checkpoint_tools-cpu.json`"
    )
    assert result["checkpoint"]["params"] == 859_520_964
    rows = {row["operation"] for row in result["rows"]}
    assert {"copy", "read + write", "merge", "convert", "inspect"} <= rows
