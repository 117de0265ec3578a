"""The docs table of the LLM merge benchmark is the one its result file gives; its arguments,
and both routes merging a tiny Llama's PEFT DoRA to the same weights as float64."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import merge_llm  # noqa: E402

from lowrank import cli  # noqa: E402

RESULT = ROOT / "benchmarks/results/merge_llm-cpu.json"
TINY_LLAMA = {
    **merge_llm.LLAMA,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 64,
}


def test_docs_show_the_recorded_results():
    result = json.loads(RESULT.read_text())
    assert merge_llm.report(result) in (ROOT / "docs/benchmarks.md").read_text(encoding="utf-8"), (
        "docs/benchmarks.md is stale: paste `python benchmarks/merge_llm.py --report "
        "benchmarks/results/merge_llm-cpu.json`"
    )
    assert result["checkpoint"]["config"] == merge_llm.LLAMA
    assert {row["operation"] for row in result["rows"]} == {
        *(merge_llm.operation(r, a) for r in merge_llm.ROUTES for a in merge_llm.ADAPTERS),
        "idle",
    }
    for adapter in result["adapters"].values():
        assert adapter["layers"] == 7 * merge_llm.LLAMA["num_hidden_layers"]
        assert adapter["max_relative_difference"] < 1e-5  # float32 rounding
        assert len(adapter["time_lowrank_vs_peft_per_run"]) == result["repeat"]
    assert result["environment"]["command"].startswith("python benchmarks/merge_llm.py")


def test_repeat_below_one_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        merge_llm.main(["--repeat", "0"])
    assert exit_info.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_the_report_carries_the_note_and_the_ratios():
    result = json.loads(RESULT.read_text())
    result["note"] = "a note"
    result["adapters"]["dora"].update(time_lowrank_vs_peft=0.25, peak_rss_lowrank_vs_peft=0.125)
    table = merge_llm.report(result)
    assert "; a note." in table
    (row,) = [line for line in table.splitlines() if line.startswith("| DoRA")]
    assert "| 0.25 |" in row and "| 0.12 |" in row


def test_both_routes_merge_a_tiny_dora_as_float64_does(tmp_path, monkeypatch):
    """PEFT's script and `lowrank merge` with the benchmark's arguments, run in this process
    (as `python -c` and `python -m lowrank.cli` would), on a tiny Llama: each merged weight
    is m ⊙ (W + s·B·A) / ‖W + s·B·A‖ (row norms), computed here in float64 from the files."""
    base, _ = merge_llm.write_model(TINY_LLAMA, tmp_path / "model")
    merge_llm.write_adapter(base.parent, tmp_path / "dora", dora=True, seed=1)
    routes = merge_llm.commands(base, base, tmp_path / "dora", tmp_path / "out")
    del routes["lowrank merge, bare file"]  # the same command on another path
    (lowrank, lowrank_out), (peft, peft_out) = routes.values()
    assert lowrank[1:4] == ["-m", "lowrank.cli", "merge"] and peft[1:3] == [
        "-c",
        merge_llm.PEFT_MERGE,
    ]
    lowrank_out.parent.mkdir(parents=True)
    peft_out.parent.mkdir(parents=True)
    assert cli.main(lowrank[3:]) == 0
    monkeypatch.setattr(sys, "argv", ["-c", *peft[3:]])
    exec(merge_llm.PEFT_MERGE, {"__name__": "__main__"})
    prefix = "base_model.model."
    with (
        safe_open(str(base), "pt") as b,
        safe_open(str(tmp_path / "dora/adapter_model.safetensors"), "pt") as a,
    ):
        names = b.keys()
        targets = [k for k in names if k.split(".")[-2] in merge_llm.TARGETS]
        assert len(targets) == 7 * TINY_LLAMA["num_hidden_layers"]
        expected = {}
        for key in targets:
            stem = prefix + key.removesuffix(".weight")
            down = a.get_tensor(f"{stem}.lora_A.weight").double()
            up = a.get_tensor(f"{stem}.lora_B.weight").double()
            m = a.get_tensor(f"{stem}.lora_magnitude_vector").double()
            w = b.get_tensor(key).double() + merge_llm.ALPHA / merge_llm.RANK * up @ down
            expected[key] = m[:, None] * w / w.norm(dim=1, keepdim=True)
    for route, (_, output) in routes.items():
        with safe_open(str(output), "pt") as merged:
            for key, want in expected.items():
                got = merged.get_tensor(key).double()
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (route, key)
