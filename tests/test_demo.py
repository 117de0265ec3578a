"""`make demo` runs end to end, and its table's numbers agree with independent references."""

from pathlib import Path

import pytest
import torch

from lowrank import demo


def test_demo_prints_a_table_for_every_layer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    demo.main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for layer in ("[0]", "[2]", "[4]", "[8]", "[10]"):
        assert f"\n{layer} " in printed
    for form in ("lora", "tucker2", "cp"):
        assert f" {form} " in printed
    assert (tmp_path / "decompose.png").stat().st_size > 10_000


def test_demo_lora_errors_are_the_eckart_young_errors() -> None:
    weight = demo.trained_like_weight((24, 16, 3, 3), torch.Generator().manual_seed(3))
    values = torch.linalg.svdvals(weight.double().reshape(24, -1))
    for row in demo.decompose_layer("w", weight, seed=0):
        if row.form == "lora":
            rank = int(row.rank)
            optimal = values[rank:].square().sum().sqrt() / values.square().sum().sqrt()
            assert row.rel_error == pytest.approx(float(optimal), rel=1e-9, abs=1e-12)
            assert row.params == rank * (16 * 9 + 24)


def test_trained_like_weights_have_a_decaying_spectrum() -> None:
    weight = demo.trained_like_weight((64, 32, 3, 3), torch.Generator().manual_seed(0))
    values = torch.linalg.svdvals(weight.double().reshape(64, -1))
    assert torch.isfinite(weight).all()
    assert values[0] > 5 * values[len(values) // 2]
