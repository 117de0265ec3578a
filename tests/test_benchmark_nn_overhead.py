"""The CPU-checkable parts of `benchmarks/nn_overhead.py`: every timed call runs and does
what it is timed for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import nn_overhead as bench


def test_each_model_call_is_timed_and_the_swaps_cover_both_cases():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    row = bench.model_calls(layers=1, repeats=1)
    assert row["adapters"] == 4
    timed = [key for key in row if key.endswith("_s")]
    assert len(timed) == 5 and all(row[key] > 0 for key in timed)
    cases = [swap["case"] for swap in bench.swap_calls(repeats=1)]
    assert cases == ["nothing else holds the weights", "a state_dict() kept"]


def test_best_s_is_the_shortest_run(monkeypatch):
    """On a clock that each run advances by 20, 5 and 10 s, the shortest run is 5 s."""
    now, durations = [0.0], iter([20.0, 5.0, 10.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])

    def run() -> None:
        now[0] += next(durations)

    assert bench.best_s(run, 3) == 5.0
