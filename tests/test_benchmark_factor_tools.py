"""The docs table of the factor-tools benchmark is the one its result file gives, and the file
holds every comparator."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import factor_tools  # noqa: E402


def test_docs_show_the_recorded_results():
    result = json.loads((ROOT / "benchmarks/results/factor_tools-cpu.json").read_text())
    table = factor_tools.report(result)
    assert table in (ROOT / "docs/factor_tools.md").read_text(encoding="utf-8"), (
        "docs/factor_tools.md is stale: paste `python benchmarks/factor_tools.py --report "
        "benchmarks/results/factor_tools-cpu.json`"
    )
    assert result["checkpoint"]["params"] == 859_520_964
    assert set(result["workers"]) == set(factor_tools.WORKERS)
    row = result["rows"][0]
    for key in ("lycoris_error", "resize_dense_error", "peft_svd_error", "peft_cat_error"):
        assert key in row
