"""`lowrank extract | resize | combine`: help, tables and JSON, results on disk, and bad
input that exits with status 2, one line on stderr and nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from io_helpers import (
    as_printed,
    digest,
    listing,
    lora_delta64,
    lora_factors,
    rel,
    save_state,
    targets,
    tiny,
)
from safetensors.torch import load_file

from lowrank.cli import main
from lowrank.forms import LoRA
from lowrank.io import Adapter, load_adapter, save_adapter


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def files(tmp_path):
    """A base and a tuned checkpoint of the tiny model, and two kohya adapters on it."""
    model = tiny()
    base = save_state(model.state_dict(), tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(0)
    tuned_state = {
        k: v + 0.1 * torch.randn(v.shape, generator=g) if k.endswith("weight") and v.ndim > 1
        else v
        for k, v in model.state_dict().items()
    }  # fmt: skip
    tuned = save_state(tuned_state, tmp_path / "tuned.safetensors")
    adapters = []
    for rank, scale in ((2, 0.5), (3, 1.0)):
        layers = {
            n: LoRA(*lora_factors(tuple(m.weight.shape), rank, g), scale=scale)
            for n, m in targets(model).items()
        }
        adapters.append((tmp_path / f"lora{rank}.safetensors", layers))
        save_adapter(Adapter(layers), adapters[-1][0], "kohya")
    return {"base": base, "tuned": tuned, "adapters": adapters, "state": tuned_state}


@pytest.mark.parametrize("command", ["extract", "resize", "combine"])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: lowrank {command}")


def test_extract_json_and_table(capsys, files, tmp_path):
    out = tmp_path / "ex"
    status, text, _ = run(capsys, "extract", files["base"], files["tuned"], "-o", out,
                          "--rank", 2, "--json")  # fmt: skip
    report = json.loads(text)
    assert status == 0 and report["format"] == "peft" and len(report["layers"]) == 9
    assert (out / "adapter_model.safetensors").is_file()
    status, text, _ = run(capsys, "extract", files["base"], files["tuned"], "-o",
                          tmp_path / "t.safetensors", "--energy", "0.5", "--form", "tucker2",
                          "--format", "kohya", "--threads", "1")  # fmt: skip
    lines = text.splitlines()
    assert status == 0 and "9 layers" in lines[0]
    assert any(line.split()[:2] == ["down_blocks.0.conv_in", "Tucker2"] for line in lines)


def test_extract_says_what_whole_saves_of_the_weights_targets_leave_out(capsys, tmp_path):
    """A weight --targets leaves out is no bias or norm, and --whole saves it whole too."""
    g = torch.Generator().manual_seed(0)
    base = {"h.weight": torch.randn(8, 8, generator=g), "g.weight": torch.randn(8, 8)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    paths = [save_state(s, tmp_path / f"{i}.safetensors") for i, s in enumerate((base, tuned))]
    argv = ["extract", *paths, "--rank", "2", "--targets", "h"]
    status, text, _ = run(capsys, *argv, "-o", tmp_path / "x")
    assert status == 0
    assert "1 other tensors differ and are not in the adapter (--whole saves them whole" in text
    status, text, _ = run(capsys, *argv, "-o", tmp_path / "y", "--whole")
    assert status == 0
    saved = load_file(tmp_path / "y" / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.g.weight"], tuned["g.weight"])


def test_extract_names_the_embedding_tables_it_leaves_out(capsys, tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"wte.weight": torch.randn(40, 8, generator=g), "h.weight": torch.randn(8, 8)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    paths = [save_state(s, tmp_path / f"{i}.safetensors") for i, s in enumerate((base, tuned))]
    status, text, _ = run(capsys, "extract", *paths, "-o", tmp_path / "x", "--rank", 2)
    assert status == 0 and "1 layers" in text
    assert "1 embedding tables differ and are not extracted (e.g. wte.weight)" in text
    assert "into PEFT folders as lora_embedding_A" in text  # as extract writes them (below)
    status, _, _ = run(capsys, "extract", *paths, "-o", tmp_path / "y", "--rank", "2",
                       "--targets", "wte,h")
    assert status == 0
    keys = load_file(tmp_path / "y" / "adapter_model.safetensors")
    assert "base_model.model.wte.lora_embedding_A" in keys


def test_resize_and_combine(capsys, files, tmp_path):
    (first, layers2), (second, layers3) = files["adapters"]
    status, text, _ = run(capsys, "resize", second, "-o", tmp_path / "r.safetensors",
                          "--rank", 1)  # fmt: skip
    assert status == 0 and "3 → 1" in text
    status, text, _ = run(capsys, "combine", f"{first}:0.5", f"{second}:-1", "-o",
                          tmp_path / "c", "--format", "peft", "--json")  # fmt: skip
    report = json.loads(text)
    assert status == 0 and [i["weight"] for i in report["inputs"]] == [0.5, -1.0]
    combined = load_adapter(tmp_path / "c")
    for name, form in combined.items():
        a, b = layers2[name], layers3[name]
        expected = 0.5 * lora_delta64(a.down, a.up, a.scale) - lora_delta64(b.down, b.up, b.scale)
        assert form.rank == 5 and rel(form.to_dense(), expected) < 1e-6


def test_combine_says_which_layers_a_weight_of_zero_drops(capsys, files, tmp_path):
    """kohya output, weight 0 on the only adapter with most layers: those layers go (ΔW = 0),
    the command says so and succeeds."""
    (first, layers2), _ = files["adapters"]
    kept = "down_blocks.0.attn.to_q"
    only = tmp_path / "only.safetensors"
    save_adapter(Adapter({kept: layers2[kept]}), only, "kohya")
    out = tmp_path / "z.safetensors"
    status, text, _ = run(capsys, "combine", f"{first}:0", only, "-o", out)
    assert status == 0 and f"{len(layers2) - 1} layers dropped: every adapter" in text
    assert list(load_adapter(out).select("unet").layers) == [kept]


def test_component_less_layers_take_the_component_their_base_is_given_for(capsys, files, tmp_path):
    """A PEFT folder names no model; with `--base` per component, `--component` says whose
    layers they are, for kohya output too, and without it the command asks for it."""
    (_, layers), _ = files["adapters"]
    save_adapter(Adapter(layers), tmp_path / "peft", "peft")
    bases = ["--base", f"unet={files['base']}", "--base", f"text_encoder={files['base']}"]
    before = (listing(tmp_path), digest([tmp_path]))
    status, out, err = run(capsys, "resize", tmp_path / "peft", "-o", tmp_path / "r.safetensors",
                           "--rank", 1, "--format", "kohya", *bases)  # fmt: skip
    assert status == 2 and out == "" and "--component" in err and err.count("\n") == 1
    assert (listing(tmp_path), digest([tmp_path])) == before
    status, _, _ = run(capsys, "resize", tmp_path / "peft", "-o", tmp_path / "r.safetensors",
                       "--rank", 1, "--format", "kohya", *bases, "--component", "unet")  # fmt: skip
    keys = load_file(str(tmp_path / "r.safetensors")).keys()
    assert status == 0 and keys and all(k.startswith("lora_unet_") for k in keys)
    assert sorted(load_adapter(tmp_path / "r.safetensors").select("unet").layers) == sorted(layers)
    status, text, _ = run(capsys, "inspect", tmp_path / "peft", *bases, "--component", "unet")
    assert status == 0 and "components: unet" in text
    before = (listing(tmp_path), digest([tmp_path]))
    for argv in (["inspect", tmp_path / "peft", "--component", "unet"],  # no bases to place among
                 ["convert", tmp_path / "r.safetensors", "--to", "kohya", "-o",
                  tmp_path / "c.safetensors", *bases, "--component", "unet"],
                 ["combine", tmp_path / "peft", tmp_path / "peft", "--format", "kohya", "-o",
                  tmp_path / "k.safetensors", "--component", "text_encoder"]):  # fmt: skip
        status, out, err = run(capsys, *argv)
        assert status == 2 and out == "" and "would change nothing" in err, argv
    assert (listing(tmp_path), digest([tmp_path])) == before


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["extract", "{base}", "{tuned}", "-o", "{base}", "--rank", "2", "--format", "kohya"],
         "is the input"),
        (["extract", "{base}", "{tuned}", "-o", "{dir}/x", "--rank", "0"], "--rank: must be"),
        (["extract", "{base}", "{tuned}", "-o", "{dir}/x", "--rank", "2", "--conv-rank", "0"],
         "--conv-rank: must be a positive integer"),
        (["extract", "{base}", "{base}", "-o", "{dir}/x", "--rank", "2"], "nothing to extract"),
        (["extract", "{base}", "{tuned}", "-o", "{dir}/x", "--rank", "2", "--device", "tpu"],
         "device"),
        (["extract", "{base}", "{lora2}", "-o", "{dir}/x", "--rank", "2"],
         "holds an adapter's tensors only"),
        (["resize", "{lora2}", "-o", "{lora2}", "--rank", "1"], "is the input"),
        (["resize", "{lora2}", "-o", "{dir}/x.safetensors", "--energy", "2"], "energy"),
        (["resize", "{dir}/none.safetensors", "-o", "{dir}/x", "--rank", "1"], "does not exist"),
        (["combine", "{lora2}", "{base}", "-o", "{dir}/x.safetensors"], "unknown adapter layout"),
        (["combine", "{lora2}", "{lora3}", "-o", "{lora3}"], "is the input"),
        (["combine", "{lora2}", "{lora3}", "-o", "{dir}/x.safetensors", "--ratio", "0"], "ratio"),
    ],
)  # fmt: skip
def test_errors_are_one_line_exit_2_and_write_nothing(capsys, files, tmp_path, argv, match):
    names = {"base": files["base"], "tuned": files["tuned"], "dir": tmp_path,
             "lora2": files["adapters"][0][0], "lora3": files["adapters"][1][0]}  # fmt: skip
    before = (listing(tmp_path), digest([tmp_path]))
    status, out, err = run(capsys, *(a.format(**names) for a in argv))
    assert status == 2 and out == "" and err.startswith("lowrank: error:")
    assert match in err and err.count("\n") == 1
    assert (listing(tmp_path), digest([tmp_path])) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["extract", "b", "t", "-o", "x"],
        ["extract", "b", "t", "-o", "x", "--rank", "2", "--energy", "0.9"],
        ["extract", "b", "t", "-o", "x", "--rank", "2", "--form", "cp"],
        ["resize", "a", "-o", "x"],
        ["resize", "a", "--rank", "2"],
        ["combine", "a", "b"],
        ["combine", "a", "-o", "x", "--rank", "2", "--ratio", "0.1"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(capsys, argv):
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == "" and err.startswith("lowrank: error:")
    assert err.count("\n") == 1 and "--help" in err


def test_a_corrupt_checkpoint_is_one_line_without_traceback(capfd, caplog, files, tmp_path):
    """Whatever the file reader prints, warns or logs (`as_printed`): one line."""
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(files["tuned"].read_bytes()[:-3])
    argv = ("extract", files["base"], broken, "-o", tmp_path / "x", "--rank", "2")
    status, out, err = as_printed(main, argv, capfd, caplog)
    assert status == 2 and out == ""
    assert err.startswith(f"lowrank: error: {broken} is not a valid safetensors file")
    assert err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_extract_whole_saves_changed_norms_in_peft_folders_only(capsys, tmp_path):
    """`--whole`: a changed norm goes into the PEFT folder whole (the tensor the tuned
    checkpoint holds), and the table says so; for kohya one line on stderr, status 2."""
    model = tiny()
    base = save_state(model.state_dict(), tmp_path / "base.safetensors")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["down_blocks.0.attn.to_q.weight"] += 0.5
    state["down_blocks.0.norm.weight"] += 0.25
    tuned = save_state(state, tmp_path / "tuned.safetensors")
    status, out, _ = run(capsys, "extract", base, tuned, "-o", tmp_path / "p", "--rank", "2",
                         "--whole")  # fmt: skip
    assert status == 0 and "saved whole" in out
    saved = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.model.down_blocks.0.norm.weight"],
                       state["down_blocks.0.norm.weight"])  # fmt: skip
    status, _, err = run(capsys, "extract", base, tuned, "-o", tmp_path / "k.safetensors",
                         "--rank", "2", "--whole", "--format", "kohya")  # fmt: skip
    assert status == 2 and len(err.strip().splitlines()) == 1 and "whole" in err
    assert not (tmp_path / "k.safetensors").exists()
