"""The `lowrank` command: `bounds` for one layer (table, JSON, plot) and for a model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from model_factories import sd_v1_unet_config

from lowrank.bounds import crossover_rank, max_useful_rank, param_count
from lowrank.cli import main, plot_layer

TESTS = Path(__file__).parent


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_layer_table(capsys):
    status, out, _ = run(capsys, "bounds", "--in", "320", "--out", "320", "--kernel", "3")
    assert status == 0
    assert "921,600" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[3:7]}
    assert rows == {"lora": "287", "centre_tap": "1439", "tucker2": "286", "cp": "1426"}
    assert "tucker2 has fewer parameters than lora up to rank 284" in out


def test_layer_json_with_rank(capsys):
    argv = ["bounds", "--in", "320", "--out", "640", "--kernel", "3", "--rank", "16", "--json"]
    status, out, _ = run(capsys, *argv)
    data = json.loads(out)
    assert status == 0 and data["kernel_size"] == [3, 3] and data["rank"] == 16
    for form, row in data["forms"].items():
        assert row["params"] == param_count(form, 320, 640, (3, 3), 16)
        assert row["max_useful_rank"] == max_useful_rank(form, 320, 640, (3, 3))
    crossing = next(
        c for c in data["crossovers"] if {c["form_a"], c["form_b"]} == {"lora", "tucker2"}
    )
    expected = crossover_rank(crossing["form_a"], crossing["form_b"], 320, 640, (3, 3))
    assert crossing["rank"] == expected.rank and crossing["rank"] > 0
    assert data["forms"]["lora"]["unmerged_flops_ratio"] == "371/360"  # 1 + 16·3520/(640·320·9)


def test_linear_layer_and_kernel_spellings(capsys):
    _, out, _ = run(capsys, "bounds", "--in", "4096", "--out", "11008", "--rank", "8,4", "--json")
    data = json.loads(out)
    assert "centre_tap" not in data["forms"] and data["kernel_size"] == []
    assert data["forms"]["tucker2"]["params"] == param_count("tucker2", 4096, 11008, (), (8, 4))
    assert data["forms"]["lora"]["params"] is None  # a pair rank is Tucker2's only
    for argv, kernel in [
        (["--kernel", "3", "--dims", "1"], [3]),
        (["--kernel", "3x1x3"], [3, 1, 3]),
        (["--kernel", "5,3", "--dims", "2"], [5, 3]),
    ]:
        _, out, _ = run(capsys, "bounds", "--in", "8", "--out", "8", *argv, "--json")
        assert json.loads(out)["kernel_size"] == kernel


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bounds.png"
    status, _, _ = run(
        capsys, "bounds", "--in", "32", "--out", "64", "--kernel", "3", "--plot", str(path)
    )
    assert status == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_every_form_and_the_dense_line(tmp_path):
    pytest.importorskip("matplotlib")
    axes = plot_layer(32, 64, (3, 3), tmp_path / "bounds.png").axes[0]
    lines, labels = axes.get_legend_handles_labels()
    assert [label.split()[0] for label in labels] == [
        "lora",
        "centre_tap",
        "tucker2",
        "cp",
        "dense",
    ]
    assert labels[-1] == "dense (18,432)" and set(lines[-1].get_ydata()) == {64 * 32 * 9}
    ranks, counts = lines[0].get_data()
    assert list(counts) == [r * (32 * 9 + 64) for r in ranks]  # LoCon: r (s K + t)
    assert axes.get_xlabel().startswith("rank") and axes.get_ylabel() == "parameters"
    assert "32 → 64" in axes.get_title()


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path = tmp_path / "bounds.png"
    status, _, err = run(capsys, "bounds", "--in", "8", "--out", "8", "--plot", str(path))
    assert status == 2 and "pip install 'lowrank-kernels[plot]'" in err
    assert not path.exists()


def test_model_report_from_a_factory(capsys):
    argv = ["bounds", "--model", "model_factories:mlp_head", "--targets", "0,2,4,6", "--rank", "4"]
    status, out, _ = run(capsys, *argv)
    assert status == 0 and "6,376" in out
    status, out, _ = run(capsys, *argv, "--json", "--dtype", "bfloat16")
    totals = json.loads(out)["totals"]
    assert totals["adapter_params"] == 6_376 and totals["adapter_bytes"] == 2 * 6_376


def test_model_report_with_targets_config_and_factory_config(tmp_path, capsys):
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps({"to_q": {"r": 8, "trainable_scale": True}}))
    status, out, _ = run(
        capsys,
        *["bounds", "--model", "model_factories:TinyNet", "--targets-config", str(targets)],
        "--json",
    )
    assert status == 0 and json.loads(out)["totals"]["adapter_params"] == 8 * 8 + 8 * 12 + 2
    config = tmp_path / "linear.json"
    config.write_text(json.dumps({"in_features": 30, "out_features": 20}))
    argv = ["bounds", "--model", "torch.nn:Sequential", "--targets", "x", "--rank", "1"]
    status, _, err = run(capsys, *argv)
    assert status == 2 and "'x' matches no module" in err


def test_diffusers_unet_from_config_file(tmp_path, capsys):
    pytest.importorskip("diffusers")
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({"_class_name": "UNet2DConditionModel", **sd_v1_unet_config()}))
    argv = ["bounds", "--model", "diffusers:UNet2DConditionModel", "--config", str(config)]
    status, out, _ = run(capsys, *argv, "--targets", "to_q,to_v", "--rank", "8", "--json")
    totals = json.loads(out)["totals"]
    assert status == 0
    assert (totals["base_params"], totals["adapter_params"]) == (859_520_964, 797_184)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["bounds", "--in", "8"], "--in needs --out"),
        (["bounds", "--in", "0", "--out", "8"], "argument --in"),
        (["bounds", "--in", "8", "--out", "8", "--kernel", "3x3", "--dims", "3"], "--dims 3"),
        (["bounds", "--model", "model_factories", "--targets", "0"], "package.module:callable"),
        (["bounds", "--model", "no_such_module_xyz:f", "--targets", "0"], "cannot import"),
        (["bounds", "--model", "model_factories:nothing", "--targets", "0"], "no attribute"),
        (["bounds", "--model", "model_factories:sd_v1_unet_config", "--targets", "0"], "not a"),
        (["bounds", "--model", "model_factories:mlp_head", "--rank", "4"], "exactly one"),
        (["bounds", "--model", "model_factories:mlp_head", "--targets", "0"], "no rank"),
        (["bounds", "--model", "torch.nn:Linear", "--targets", "0"], "failed: TypeError"),
        (["bounds", "--model", "model_factories:mlp_head", "--plot", "x.png"], "--plot cannot"),
        (["bounds", "--in", "8", "--out", "8", "--targets", "to_q"], "--targets cannot"),
        (["bounds", "--in", "8", "--out", "8", "--dtype", "float16"], "--dtype cannot"),
    ],
)
def test_errors(capsys, argv, match):
    status, _, err = run(capsys, *argv)
    assert status == 2 and err.startswith("lowrank: error:") and match in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("option", "content", "match"),
    [
        ("--config", None, "cannot read --config"),
        ("--config", "{bad", "not valid JSON"),
        ("--config", "[1, 2]", "must hold a JSON object"),
        ("--config", '{"in_features": 3, "nope": 1}', "failed: TypeError"),
        ("--targets-config", None, "cannot read --targets-config"),
        ("--targets-config", "{bad", "not valid JSON"),
        ("--targets-config", "[1, 2]", "targets must be"),
    ],
)
def test_bad_json_files(tmp_path, capsys, option, content, match):
    path = tmp_path / "file.json"
    if content is not None:
        path.write_text(content)
    if option == "--config":
        argv = ["bounds", "--model", "torch.nn:Linear", option, str(path), "--targets", "x"]
    else:
        argv = ["bounds", "--model", "model_factories:TinyNet", option, str(path)]
    status, _, err = run(capsys, *argv)
    assert status == 2 and err.startswith("lowrank: error:") and match in err


def test_plot_in_a_missing_folder(tmp_path, capsys):
    path = tmp_path / "missing" / "bounds.png"
    status, _, err = run(capsys, "bounds", "--in", "8", "--out", "8", "--plot", str(path))
    assert status == 2 and f"the folder {path.parent} does not exist" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bounds"],
        ["bounds", "--in", "8", "--model", "m:f"],
        ["bounds", "--in", "8", "--out", "8", "--kernel", "3xa"],
        ["bounds", "--in", "8", "--out", "8", "--rank", "1,2,3"],
        ["bounds", "--in", "8", "--out", "8", "--rank", "a"],
        ["bounds", "--in", "8", "--out", "8", "--rank", "0"],
        ["bounds", "--in", "8", "--out", "8", "--rank", "4,0"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(capsys, argv):
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == "" and err.startswith("lowrank: error:")
    assert err.count("\n") == 1 and "--help" in err


def test_runs_as_a_module():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowrank.cli",
            "bounds",
            "--in",
            "64",
            "--out",
            "32",
            "--kernel",
            "3",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=TESTS,
    )
    assert result.returncode == 0, result.stderr
    assert "max useful rank" in result.stdout


def test_errors_are_one_line_without_traceback(tmp_path):
    argv = ["bounds", "--model", "model_factories:TinyNet", "--config", str(tmp_path / "no.json")]
    result = subprocess.run(
        [sys.executable, "-m", "lowrank.cli", *argv, "--targets", "to_q", "--rank", "2"],
        capture_output=True,
        text=True,
        check=False,
        cwd=TESTS,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("lowrank: error: cannot read --config")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
