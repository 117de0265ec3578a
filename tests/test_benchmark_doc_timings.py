"""The CPU-checkable parts of `benchmarks/sketch_cost.py` and `benchmarks/count_model.py`:
their arguments, and the rows the sketch benchmark records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import count_model
import sketch_cost


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        (sketch_cost.main, ["--rounds", "0"]),
        (count_model.main, ["--repeats", "0"]),
        (count_model.main, ["--processes", "-1"]),
    ],
)
def test_counts_below_one_are_refused_before_any_work(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_a_row_times_both_methods_once_per_round():
    sketch = sketch_cost.sketch_row(64, 80, 4, rounds=2)
    assert sketch["sketch_columns"] == 8 and sketch["shape"] == [64, 80]
    assert all(len(v) == 2 for v in sketch["samples_ms"].values())
    assert sketch["exact_over_sketch"] == sketch["exact_ms"] / sketch["sketch_ms"]
    gram = sketch_cost.gram_row(40, 30, rounds=3)
    assert set(gram["samples_ms"]) == {"gram_eigh", "thin_svd"}
