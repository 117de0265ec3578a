"""The lora_linear benchmark's grid (benchmarks/lora_linear.py): every point once, the anchor
points first."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import lora_linear as bench

ISSUE_TABLE = {(16, 4096, 4096, 16), (1024, 4096, 4096, 16), (4096, 4096, 4096, 16),
               (8192, 4096, 14336, 64)}  # fmt: skip


def full_grid() -> list:
    args = argparse.Namespace(quick=False, anchors=False, dtypes=None,
                              modes=["forward", "train"], dropout=0.0)
    return bench.grid(args, "cuda")


def test_full_grid_holds_every_point_of_the_issue_once():
    expected = set(itertools.product(
        ("forward", "train"), ("bf16", "fp16"), (16, 128, 1024, 4096, 8192),
        ((4096, 4096), (4096, 14336), (14336, 4096)), (8, 16, 64, 128),
    ))  # fmt: skip
    points = full_grid()
    got = [(p.mode, p.dtype, p.m, (p.fan_in, p.fan_out), p.rank) for p in points]
    assert len(got) == len(set(got)) == 240
    assert set(got) == expected


def test_the_issue_table_points_come_first_in_bf16_forward_then_train():
    head = full_grid()[:8]
    assert [(p.m, p.fan_in, p.fan_out, p.rank) for p in head[:4]] == [
        (16, 4096, 4096, 16), (1024, 4096, 4096, 16), (4096, 4096, 4096, 16),
        (8192, 4096, 14336, 64),
    ]  # fmt: skip
    assert {(p.m, p.fan_in, p.fan_out, p.rank) for p in head} == ISSUE_TABLE
    assert [p.mode for p in head] == ["forward"] * 4 + ["train"] * 4
    assert {p.dtype for p in head} == {"bf16"}


def test_anchors_grid_is_the_issue_table_in_bf16_forward_then_train():
    args = argparse.Namespace(quick=False, anchors=True, dtypes=None, modes=["forward", "train"],
                              dropout=0.0)
    points = bench.grid(args, "cuda")
    assert [(p.m, p.fan_in, p.fan_out, p.rank) for p in points[:4]] == [
        (16, 4096, 4096, 16), (1024, 4096, 4096, 16), (4096, 4096, 4096, 16),
        (8192, 4096, 14336, 64),
    ]  # fmt: skip
    assert len(points) == 8 and {p.dtype for p in points} == {"bf16"}
    assert [p.mode for p in points] == ["forward"] * 4 + ["train"] * 4


def test_dropout_applies_to_the_training_steps_only_and_smoke_runs_on_cpu(tmp_path):
    args = argparse.Namespace(quick=False, anchors=True, dtypes=None, modes=["forward", "train"],
                              dropout=0.1)  # fmt: skip
    points = bench.grid(args, "cuda")
    assert {(p.mode, p.dropout) for p in points} == {("forward", 0.0), ("train", 0.1)}
    out = tmp_path / "rows.json"
    assert bench.main(["--quick", "--device", "cpu", "--modes", "train", "--dropout", "0.25",
                       "--methods", "dense", "eager", "ours", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert {r["dropout"] for r in rows} == {0.25}
    assert {r["method"]: r["rel_err"] is None for r in rows} == {
        "dense": False, "eager": True, "ours": True}  # fmt: skip
    assert all(r["p50_ms"] > 0 for r in rows)


def test_a_column_s_settings_hold_while_its_step_runs_in_both_modes(monkeypatch):
    """A column's `env` (the opt-in variants' settings) is set for each forward and training
    step it times, and restored after."""
    monkeypatch.delenv("LOWRANK_LORA_EXPAND", raising=False)
    args = argparse.Namespace(quick=True, anchors=False, dtypes=None,
                              modes=["forward", "train"], dropout=0.0)  # fmt: skip
    points = bench.grid(args, "cpu")
    for mode in ("forward", "train"):
        point = next(p for p in points if p.mode == mode)
        sets = bench.make_sets(point, "cpu", 1)
        seen = []
        ours = bench.method_ours(point, sets)

        def run(o, ours=ours, seen=seen):
            seen.append(os.environ.get("LOWRANK_LORA_EXPAND"))
            return ours(o)

        run.env = {"LOWRANK_LORA_EXPAND": "first"}
        bench.step(point, "ours", run)(sets[0])
        assert seen == ["first"], mode
        assert "LOWRANK_LORA_EXPAND" not in os.environ


def test_epilogue_column_forces_the_regime_in_forward_and_follows_the_rule_in_train(
    monkeypatch,
):
    """Forward: persistent forced (to set beside ours_persistent); train: timed only at the
    points where the rule runs persistent anyway (to set beside ours)."""
    from lowrank.kernels import _lora_triton

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_lora_triton, "tma_ready", lambda x, w: True)
    args = argparse.Namespace(quick=False, anchors=True, dtypes=None,
                              modes=["forward", "train"], dropout=0.0)  # fmt: skip
    envs = {}
    for point in bench.grid(args, "cuda"):
        try:
            run = bench.method_ours_epilogue(point, [types.SimpleNamespace(x=0, weight=0)])
        except bench.SkipMethod:
            envs[point.mode, point.m, point.rank] = None
            continue
        envs[point.mode, point.m, point.rank] = run.env
    epilogue = {"LOWRANK_LORA_EXPAND": "epilogue"}
    forced = {**epilogue, "LOWRANK_LORA_REGIME": "persistent"}
    assert envs == {
        ("forward", 16, 16): forced, ("forward", 1024, 16): forced,
        ("forward", 4096, 16): forced, ("forward", 8192, 64): forced,
        ("train", 16, 16): None, ("train", 1024, 16): None, ("train", 4096, 16): None,
        ("train", 8192, 64): epilogue,
    }  # fmt: skip
