"""`lowrank inspect | convert | merge`: help, tables and JSON, results on disk, and one-line
errors with exit status 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from io_helpers import as_printed, lora_delta64, lora_factors, rel, save_state, targets, tiny
from safetensors.torch import load_file, save_file

from lowrank.cli import main
from lowrank.forms import LoRA
from lowrank.io import Adapter, save_adapter


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def files(tmp_path):
    model = tiny()
    base = save_state(model.state_dict(), tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(0)
    layers = {
        n: LoRA(*lora_factors(tuple(m.weight.shape), 2, g), scale=0.5)
        for n, m in targets(model).items()
    }
    adapter = tmp_path / "lora.safetensors"
    save_adapter(Adapter(layers), adapter, "kohya")
    return model, base, adapter, layers


@pytest.mark.parametrize("command", ["inspect", "convert", "merge"])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: lowrank {command}")


def test_inspect_table_and_json(capsys, files):
    _, base, adapter, layers = files
    status, out, _ = run(capsys, "inspect", adapter)
    assert status == 0 and "kohya adapter, 9 layers" in out
    assert any(
        line.split()[:2] == ["unet.down_blocks.0.conv_in", "LoCon"] for line in out.splitlines()
    )
    status, out, _ = run(capsys, "inspect", adapter, "--json", "--base", base)
    report = json.loads(out)
    assert status == 0 and report["totals"]["layers"] == len(layers)
    assert {row["scale"] for row in report["layers"]} == {0.5}


def test_convert_and_back(capsys, files, tmp_path):
    _, _, adapter, layers = files
    status, out, _ = run(capsys, "convert", adapter, "--to", "peft", "-o", tmp_path / "p")
    assert status == 0 and "(peft): 9 layers" in out
    status, out, _ = run(
        capsys,
        "convert",
        tmp_path / "p",
        "--to",
        "diffusers",
        "-o",
        tmp_path / "d.safetensors",
        "--component",
        "unet",
        "--json",
    )
    assert status == 0 and json.loads(out)["to"] == "diffusers"
    tensors = load_file(str(tmp_path / "d.safetensors"))
    for name, form in layers.items():
        assert torch.equal(tensors[f"unet.{name}.lora_A.weight"], form.down)


def test_merge_with_weights(capsys, files, tmp_path):
    model, base, adapter, layers = files
    out = tmp_path / "merged.safetensors"
    status, text, _ = run(capsys, "merge", base, f"{adapter}:0.5", "-o", out, "--dtype", "float32")
    assert status == 0 and "9 of 23 tensors merged" in text
    merged = load_file(str(out))
    for name, form in layers.items():
        weight = model.get_submodule(name).weight
        expected = weight.double() + 0.5 * lora_delta64(form.down, form.up, form.scale)
        assert rel(merged[f"{name}.weight"], expected) < 1e-6
    threads = torch.get_num_threads()
    try:
        status, text, _ = run(
            capsys, "merge", base, adapter, adapter, "-o", out, "--json", "--threads", "1"
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert status == 0 and [a["weight"] for a in json.loads(text)["adapters"]] == [1.0, 1.0]
    # a file whose own name ends in ":0.5" is that file, at weight 1, where the name before
    # the colon names nothing
    named = tmp_path / "named.safetensors:0.5"
    shutil.copyfile(adapter, named)
    status, text, _ = run(capsys, "merge", base, named, "-o", out, "--json")
    assert status == 0 and [a["weight"] for a in json.loads(text)["adapters"]] == [1.0]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["inspect", "{dir}/none.safetensors"], "does not exist"),
        (["inspect", "{dir}/lora.safetensors", "--base", "a=b", "--base", "c"], "COMPONENT=CKPT"),
        (
            ["convert", "{dir}/lora.safetensors", "--to", "kohya", "-o", "{dir}/lora.safetensors"],
            "is the input",
        ),
        (
            ["convert", "{dir}/lora.safetensors", "--to", "peft", "-o", "{dir}/p", "--rank", "0"],
            "rank",
        ),
        (
            [
                "merge",
                "{dir}/base.safetensors",
                "{dir}/lora.safetensors",
                "-o",
                "{dir}/base.safetensors",
            ],
            "is the input",
        ),
        (
            [
                "merge",
                "{dir}/base.safetensors",
                "{dir}/lora.safetensors:x",
                "-o",
                "{dir}/m.safetensors",
            ],
            "the weight after ':' must be a number",
        ),
        (
            [
                "merge",
                "{dir}/lora.safetensors",
                "{dir}/lora.safetensors",
                "-o",
                "{dir}/m.safetensors",
            ],
            "lora.safetensors holds an adapter's tensors only",
        ),
        (
            [
                "merge",
                "{dir}/base.safetensors",
                "{dir}/lora.safetensors",
                "-o",
                "{dir}/m.safetensors",
                "--component",
                "text_encoder",
            ],
            "no layers for component",
        ),
    ],
)
def test_errors_are_one_line_and_exit_2(capsys, files, tmp_path, argv, match):
    before = sorted(p.name for p in tmp_path.iterdir())
    status, out, err = run(capsys, *(a.format(dir=tmp_path) for a in argv))
    assert status == 2 and out == "" and err.startswith("lowrank: error:")
    assert match in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect"],
        ["convert", "x"],
        ["convert", "x", "--to", "onnx", "-o", "y"],
        ["merge", "x"],
        ["merge", "x", "y"],
        ["merge", "x", "y", "-o", "z", "--dtype", "int8"],
        ["merge", "x", "y", "-o", "z", "--threads", "0"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(capsys, argv):
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == "" and err.startswith("lowrank: error:")
    assert err.count("\n") == 1 and "--help" in err


def test_a_corrupt_file_is_one_line_without_traceback(capfd, caplog, files, tmp_path):
    """Whatever the file reader prints, warns or logs (`as_printed`): one line."""
    _, base, adapter, _ = files
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(adapter.read_bytes()[:-3])
    argv = ("merge", base, broken, "-o", tmp_path / "m.safetensors")
    status, out, err = as_printed(main, argv, capfd, caplog)
    assert status == 2 and out == ""
    assert err.startswith(f"lowrank: error: {broken} is not a valid safetensors file")
    assert err.count("\n") == 1 and not (tmp_path / "m.safetensors").exists()


def test_a_kohya_file_without_names_needs_base_for_peft(capsys, files, tmp_path):
    _, base, adapter, _ = files
    stripped = tmp_path / "stripped.safetensors"
    save_file(load_file(str(adapter)), str(stripped))
    status, _, err = run(capsys, "convert", stripped, "--to", "peft", "-o", tmp_path / "p")
    assert status == 2 and "--base" in err
    status, _, _ = run(
        capsys, "convert", stripped, "--to", "peft", "-o", tmp_path / "p", "--base", base
    )
    assert status == 0 and (tmp_path / "p" / "adapter_config.json").is_file()


def test_a_peft_output_reports_the_one_model_it_holds(capsys, tmp_path):
    """A pipeline's adapter written as PEFT holds the layers of the model `--component`
    picks: convert, resize and combine report those (it said 3 layers of a folder of 2, and
    listed the text encoder's rows)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"unet.a": (6, 5), "unet.b": (4, 6), "text_encoder.c": (5, 5)}
    layers = {n: LoRA(*lora_factors(s, 2, g), scale=0.5) for n, s in shapes.items()}
    pipeline = tmp_path / "pipeline.safetensors"
    save_adapter(Adapter(layers, components=("text_encoder", "unet")), pipeline, "diffusers")
    for command, extra in [("convert", ["--to", "peft"]), ("resize", ["--format", "peft",
                           "--rank", "1"]), ("combine", ["--format", "peft"])]:  # fmt: skip
        out = tmp_path / command
        status, text, err = run(capsys, command, pipeline, "-o", out, "--component", "unet",
                                "--json", *extra)
        assert status == 0, err
        written = load_file(out / "adapter_model.safetensors")
        assert sorted(k.split(".")[2] for k in written if "lora_A" in k) == ["a", "b"]
        report = json.loads(text)
        rows = report["layers"]
        names = sorted(r["name"] for r in rows) if command != "convert" else rows
        assert names == (2 if command == "convert" else ["unet.a", "unet.b"])
