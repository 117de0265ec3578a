"""The docs table built from benchmark rows (benchmarks/plot_lora_linear.py), on hand-made rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import plot_lora_linear

ENV = {"device": "GPU", "torch": "t", "triton": "tr", "cuda": "c", "date": "d", "command": "cmd"}


def row(mode: str, method: str, m: int, **values) -> dict:
    return dict(mode=mode, dtype="bf16", m=m, fan_in=64, fan_out=32, rank=8, method=method,
                **values)  # fmt: skip


@pytest.fixture
def points(tmp_path):
    rows = [
        row("forward", "dense", 16, p50_ms=0.01, tflops=1.0, ratio_to_dense=1.0),
        row("forward", "ours", 16, ratio_to_dense=1.04, rel_err=1e-3),
        row("forward", "eager", 16, ratio_to_dense=3.0, rel_err=2e-3),
        row("forward", "ours_fused", 16, ratio_to_dense=1.04),
        row("forward", "ours_two_phase", 16, ratio_to_dense=1.30),
        row("forward", "ours_persistent", 16, skipped="needs TMA"),
        row("forward", "dense", 4096, p50_ms=1.0, tflops=600.0, ratio_to_dense=1.0),
        row("forward", "ours", 4096, ratio_to_dense=1.08, rel_err=1e-3),
        row("forward", "ours_two_phase", 4096, ratio_to_dense=1.12),
        row("forward", "ours_persistent", 4096, ratio_to_dense=1.08),
        row("train", "dense", 16, p50_ms=0.02, tflops=1.0, ratio_to_dense=1.0),
        row("train", "ours", 16, ratio_to_dense=1.09, rel_err=1e-3),
    ]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"environment": ENV, "rows": rows}))
    return plot_lora_linear.load(path)[1]


def test_fastest_regime_names_the_quickest_forced_regime(points):
    small, large = (points[("forward", "bf16", m, 64, 32, 8)] for m in (16, 4096))
    assert plot_lora_linear._fastest_regime(small) == "fused 1.04"
    assert plot_lora_linear._fastest_regime(large) == "persistent 1.08"
    assert plot_lora_linear._fastest_regime(points[("train", "bf16", 16, 64, 32, 8)]) == "–"


def test_table_counts_the_points_within_target_and_lists_skips(points):
    text = plot_lora_linear.table([ENV], points)
    assert "Ours within 1.05× dense at 1 of 2 points; worst 1.08×." in text
    assert "Ours within 1.10× dense at 1 of 1 points; worst 1.09×." in text
    assert "| 4096×64×32 | 8 | 1.0000 | 600 |" in text and "persistent 1.08 |" in text
    assert "- `ours_persistent` skipped (first reason): needs TMA" in text
    forward, train = text.split("### train")
    assert "fastest regime" in forward and "fastest regime" not in train


def test_runs_merge_with_the_later_run_replacing_a_row_and_graph_tables_appear(tmp_path):
    early = {**ENV, "date": "2026-01-01T00:00:00+00:00", "command": "first"}
    late = {**ENV, "date": "2026-02-01T00:00:00+00:00", "command": "second"}
    first = [row("train", "dense", 16, p50_ms=0.1, tflops=1.0, ratio_to_dense=1.0),
             row("train", "ours", 16, ratio_to_dense=3.0, rel_err=1e-3)]  # fmt: skip
    second = [row("train", "dense", 16, p50_ms=0.1, tflops=1.0, ratio_to_dense=1.0,
                  graph_p50_ms=0.02),
              row("train", "ours", 16, ratio_to_dense=2.0, rel_err=1e-3,
                  graph_ratio_to_dense=1.5)]  # fmt: skip
    paths = []
    for name, env, rows in (("b.json", late, second), ("a.json", early, first)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps({"environment": env, "rows": rows}))
    envs, points = plot_lora_linear.load(*paths)
    assert [e["command"] for e in envs] == ["first", "second"]  # by date, not by argument
    assert points[("train", "bf16", 16, 64, 32, 8)]["ours"]["ratio_to_dense"] == 2.0
    text = plot_lora_linear.table(envs, points)
    assert text.index("`first`") < text.index("`second`")
    assert "### train, bf16, CUDA-graph replays" in text
    assert "| 16×64×32 | 8 | 0.0200 | – | – | – | – | 1.50 |" in text


def test_dropout_rows_get_their_own_table_held_to_the_training_target(tmp_path):
    rows = [row("train", "dense", 16, p50_ms=0.1, tflops=1.0, ratio_to_dense=1.0, dropout=0.1,
                rel_err=1e-3),
            row("train", "ours", 16, ratio_to_dense=1.05, rel_err=None, dropout=0.1),
            row("train", "ours", 16, ratio_to_dense=1.2, rel_err=1e-3)]  # fmt: skip
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"environment": ENV, "rows": rows}))
    envs, points = plot_lora_linear.load(path)
    text = plot_lora_linear.table(envs, points)
    assert "### train, dropout 0.1, bf16" in text and "### train, bf16" in text
    assert "| – | – |" in text  # no error measured under dropout
    assert "Ours within 1.10× dense at 1 of 1 points" in text
