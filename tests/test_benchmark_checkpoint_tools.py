"""The docs table of the checkpoint-tools benchmark is the one its result file gives; its
arguments, its report with and without peers, and the peers' own merges on a small UNet."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import checkpoint_tools  # noqa: E402

RESULT = ROOT / "benchmarks/results/checkpoint_tools-cpu.json"
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}


def test_docs_show_the_recorded_results():
    result = json.loads(RESULT.read_text())
    table = checkpoint_tools.report(result)
    assert table in (ROOT / "docs/benchmarks.md").read_text(encoding="utf-8"), (
        "docs/benchmarks.md is stale: paste `python benchmarks/checkpoint_tools.py --report "
        "benchmarks/results/checkpoint_tools-cpu.json`"
    )
    assert result["checkpoint"]["params"] == 859_520_964
    rows = {row["operation"] for row in result["rows"]}
    assert {"copy", "read + write", "merge", "convert", "inspect"} <= rows
    assert set(result["peers"]) == set(checkpoint_tools.PEERS.values()) <= rows
    for peer in result["peers"].values():
        assert peer["max_relative_error_vs_float64"] < 1e-3  # fp16 rounding, not a lost ΔW
        assert len(peer["time_vs_merge_per_run"]) == result["repeat"]


def test_repeat_below_one_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        checkpoint_tools.main(["--repeat", "0"])
    assert exit_info.value.code == 2 and "at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "peers"),
    [([], ["kohya", "diffusers"]), (["--peers"], []), (["--peers", "diffusers"], ["diffusers"])],
)
def test_peers_default_to_all_and_can_be_chosen(argv, peers):
    assert checkpoint_tools.parse_args(argv).peers == peers


def test_an_unknown_peer_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        checkpoint_tools.parse_args(["--peers", "sd-scripts"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_the_report_gives_each_peer_as_ratios_to_the_merge():
    result = json.loads(RESULT.read_text())
    result["peers"]["kohya-style merge"].update(
        time_vs_merge=2.5, time_vs_merge_per_run=[2.25, 2.5, 3.0], time_vs_merge_one_thread=1.5,
        peak_rss_mb=3650.4, peak_rss_vs_merge=12.04, max_relative_error_vs_float64=2.1e-4,
    )  # fmt: skip
    lines = checkpoint_tools.report(result).splitlines()
    row = "| kohya-style merge | 2.50× | 2.25, 2.50, 3.00 | 1.50× | 3,650 | 12.0× | 2.10e-04 |"
    assert row in lines
    assert sum(line.startswith("| diffusers fuse |") for line in lines) == 2  # both tables


def test_a_result_without_peers_reports_without_them():
    result = copy.deepcopy(json.loads(RESULT.read_text()))
    names = set(checkpoint_tools.PEERS.values())
    result["rows"] = [row for row in result["rows"] if row["operation"] not in names]
    del result["peers"], result["peer_versions"]
    table = checkpoint_tools.report(result)
    assert "Peers" not in table and not any(name in table for name in names)
    assert "| merge |" in table


@pytest.mark.parametrize(
    "peer", ["kohya", pytest.param("diffusers", marks=pytest.mark.exhaustive)]
)  # diffusers' takes 10 s (the benchmark checks each peer's merge against float64 as it runs)
def test_each_peer_merges_a_small_unet_as_float64_does(tmp_path, peer):
    """The peers' scripts, run as the benchmark runs them, on a small UNet with a 1×1 and 3×3
    conv and linear layers: every targeted weight is W + (alpha / r) · up @ down."""
    shapes = checkpoint_tools.unet_shapes(TINY_UNET)
    base, lora = tmp_path / "base.safetensors", tmp_path / "lora.safetensors"
    checkpoint_tools.write_checkpoint(shapes, base)
    checkpoint_tools.write_lora(shapes, lora)
    targeted = [k for k, s in shapes.items() if k.endswith(".weight") and len(s) in (2, 4)]
    assert {shapes[k][2:] for k in targeted} == {(), (1, 1), (3, 3)}
    peers = checkpoint_tools.peer_commands([peer], base, lora, tmp_path, TINY_UNET)
    assert len(peers) == 1
    for name, (command, output) in peers.items():
        output.parent.mkdir()
        subprocess.run(command, check=True, capture_output=True)
        error = checkpoint_tools.check_merge(base, lora, output, targeted)
        assert error < 1e-3, name
