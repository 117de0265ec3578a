"""`make demo` runs end to end on the bundled digits and reports what it checked."""

from pathlib import Path

import pytest
import torch

from lowrank import demo


def test_demo_adapts_the_cnn_and_checks_merge_and_reload(tmp_path: Path, capsys) -> None:
    pytest.importorskip("sklearn")
    demo.main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "$ lowrank bounds --in 16 --out 32 --rank 4,4 --kernel 3x3" in printed
    after = float(printed.split("% before, ")[1].split(" %")[0])
    assert after > 80
    merge_gap = float(printed.split("logit over")[1].split(": ")[1].split()[0])
    assert merge_gap < 1e-4
    reloads = printed.split("max |reloaded − saved| logit: ")[1].split("\n")[0]
    adapter_gap, dense_gap = (float(part.split()[1]) for part in reloads.split(", "))
    assert adapter_gap < 1e-5 and dense_gap < 1e-5  # a folded Tucker2, a float32 merge
    assert (tmp_path / "finetune.png").stat().st_size > 10_000
    check_files_with_peft(tmp_path)


def check_files_with_peft(out: Path) -> None:
    """The PEFT folder the demo wrote, loaded onto its base checkpoint by PEFT itself and
    merged by PEFT, computes what the dense checkpoint lowrank merged computes."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    base, dense = demo.small_cnn(), demo.small_cnn()
    base.load_state_dict(load_file(out / "base.safetensors"))
    dense.load_state_dict(load_file(out / "dense.safetensors"))
    merged = peft.PeftModel.from_pretrained(base, out / "adapter_peft").merge_and_unload()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(merged(x), dense(x), atol=1e-5, rtol=1e-5)


def test_digits_split_by_label_without_overlap() -> None:
    pytest.importorskip("sklearn")
    old, new = demo.digits(range(5), 0), demo.digits(range(5, 10), 0)
    assert set(old.train_y.tolist()) == set(range(5))
    assert set(new.test_y.tolist()) <= set(range(5, 10))
    assert old.train_x.shape[1:] == (1, 8, 8)
    assert 0 <= float(old.train_x.min()) <= float(old.train_x.max()) <= 1
    total = sum(len(s.train_y) + len(s.test_y) for s in (old, new))
    assert total == 1797 and torch.isin(new.train_y, torch.arange(5)).sum() == 0
