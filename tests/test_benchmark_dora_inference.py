"""The CPU-checkable parts of `benchmarks/dora_inference.py`: the three models it times give
PEFT's logits bit for bit, and each is timed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import dora_inference as bench


def test_a_row_times_three_models_that_agree_with_peft():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    ours, theirs = bench.adapted(hidden=64, layers=1)
    row = bench.row(ours, theirs, (1, 3), rounds=2)
    assert row["max_abs_logit_diff_vs_peft"] == {"lowrank": 0.0, "lowrank_recomputed": 0.0}
    assert row["lowrank_over_peft"] > 0 and row["lowrank_recomputed_over_peft"] > 0
    assert all(row[f"{key}_p50_ms"] > 0 for key in ("lowrank", "lowrank_recomputed", "peft"))
