"""The `lowrank` command: `bounds` for one layer (table, JSON, plot) and for a model."""

from __future__ import annotations

import argparse
import errno
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from model_factories import sd_v1_unet_config

from lowrank import cli
from lowrank.bounds import crossover_rank, max_useful_rank, param_count
from lowrank.cli import PLOT_RANKS, main, plot_layer

TESTS = Path(__file__).parent


def run(capsys, *argv: object) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
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
    lora = data["forms"]["lora"]  # 1 + 16·3520/(640·320·9)
    assert lora["unmerged_flops_ratio_exact"] == "371/360"
    assert data["forms"]["lora"]["unmerged_flops_ratio"] == 371 / 360


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


def brute_count(form: str, in_f: int, out_f: int, kernel: tuple[int, ...], r: int) -> int:
    """Parameters of `form` at rank `r`: the sizes of its factors (ranks at both Tucker2
    modes), multiplied out and summed."""
    ones = (1,) * len(kernel)
    shapes = {
        "lora": [(r, in_f, *kernel), (out_f, r, *ones)],
        "centre_tap": [(r, in_f, *ones), (out_f, r, *ones)],
        "tucker2": [(r, in_f, *ones), (r, r, *kernel), (out_f, r, *ones)],
        "cp": [(out_f, r), (in_f, r), *((k, r) for k in kernel)],
    }[form]
    return sum(math.prod(shape) for shape in shapes)


def plotted(axes) -> tuple[dict[str, tuple[list, list]], set[tuple[float, float]]]:
    """`{form: (ranks, counts)}` of the drawn curves, and the set of marker points."""
    lines, labels = axes.get_legend_handles_labels()
    curves = {
        label.split()[0]: tuple(map(list, line.get_data()))
        for line, label in zip(lines, labels, strict=True)
        if label.split()[0] != "dense"
    }
    markers = {
        (float(line.get_xdata()[0]), float(line.get_ydata()[0]))
        for line in axes.get_lines()
        if len(line.get_xdata()) == 1
    }
    return curves, markers


@pytest.mark.parametrize(
    ("in_f", "out_f", "kernel"), [(7, 9, ()), (6, 5, (3,)), (12, 20, (3, 3)), (4, 3, (3, 1, 3))]
)
def test_plot_matches_a_brute_force_count_at_every_rank(tmp_path, in_f, out_f, kernel):
    pytest.importorskip("matplotlib")
    axes = plot_layer(in_f, out_f, kernel, tmp_path / "bounds.png").axes[0]
    curves, markers = plotted(axes)
    dense = out_f * in_f * math.prod(kernel)
    expected_markers = set()
    for form, (ranks, counts) in curves.items():
        assert ranks == list(range(1, len(ranks) + 1))  # small layers: every rank
        assert counts == [brute_count(form, in_f, out_f, kernel, r) for r in ranks]
        useful = 0  # counts grow with the rank: scan up to the first that is not below dense
        while brute_count(form, in_f, out_f, kernel, useful + 1) < dense:
            useful += 1
        if 0 < useful <= ranks[-1]:
            expected_markers.add((useful, brute_count(form, in_f, out_f, kernel, useful)))
        if form == "lora":
            assert ranks[-1] > useful  # the plot goes on past LoRA's largest useful rank
    assert markers == expected_markers
    odd = all(k % 2 for k in kernel) and kernel
    assert set(curves) == {"lora", "tucker2", "cp"} | ({"centre_tap"} if odd else set())


def test_plot_of_a_huge_layer_is_fast_and_exact_where_drawn(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bounds.png"
    plot_layer(8, 8, (), tmp_path / "warm-up.png")  # matplotlib's first figure costs extra
    start = time.perf_counter()
    status, _, _ = run(capsys, "bounds", "--in", "1000000", "--out", "1000000", "--plot", path)
    assert status == 0 and time.perf_counter() - start < 5  # every rank drawn: 21 s
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    size = 10**6
    curves, markers = plotted(plot_layer(size, size, (3, 3), path).axes[0])
    for form, (ranks, counts) in curves.items():
        assert len(ranks) == PLOT_RANKS and ranks == sorted(set(ranks)) and ranks[0] == 1
        assert counts == [brute_count(form, size, size, (3, 3), r) for r in ranks]
    lora_useful = (size * size * 9 - 1) // (size * 9 + size)  # r (9 s + t) < 9 s t
    assert curves["lora"][0][-1] > lora_useful
    assert (lora_useful, brute_count("lora", size, size, (3, 3), lora_useful)) in markers


# sizes of every magnitude, up to counts a float cannot hold, and sizes it cannot hold
SIZES = st.integers(1, 400).flatmap(lambda digits: st.integers(1, 10**digits))


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(in_f=SIZES, out_f=SIZES, kernel=st.sampled_from(["", "3", "5x1", "3x3x3"]))
@example(in_f=10**310, out_f=10**310, kernel="3")  # 1.25 × the widest rank is no float
def test_plot_of_any_size_is_drawn_or_refused_in_one_line(tmp_path, capsys, in_f, out_f, kernel):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bounds.png"
    path.unlink(missing_ok=True)
    argv = ["bounds", "--in", in_f, "--out", out_f, *(["--kernel", kernel] if kernel else [])]
    status, _, err = run(capsys, *argv, "--plot", path)
    if status == 0:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert status == 2 and err.count("\n") == 1 and "beyond 1.8e308" in err
        assert not path.exists()


def test_the_table_of_a_rank_beyond_floats_is_exact(capsys):
    """At r = 10³²⁰ a 1 → 1 LoRA has 2r parameters, 2·10³²² % of the dense one, and its
    unmerged FLOPs 1 + 2r times the dense (float divisions would overflow)."""
    rank = 10**320
    status, out, _ = run(capsys, "bounds", "--in", "1", "--out", "1", "--rank", str(rank))
    row = next(line.split() for line in out.splitlines() if line.startswith("lora"))
    assert status == 0
    assert row[-2:] == [f"{2 * 10**322}.00", f"{1 + 2 * rank}.0000"]


@pytest.mark.parametrize(("suffix", "magic"), [(".svg", b"<?xml"), (".PDF", b"%PDF")])
def test_plot_formats_by_suffix(tmp_path, capsys, suffix, magic):
    pytest.importorskip("matplotlib")
    path = tmp_path / f"bounds{suffix}"
    status, _, _ = run(capsys, "bounds", "--in", "8", "--out", "8", "--plot", path)
    assert status == 0 and path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_plot_that_fails_halfway_leaves_no_file(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def disk_full(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    path = tmp_path / "bounds.png"
    status, out, err = run(capsys, "bounds", "--in", "8", "--out", "8", "--plot", path)
    assert status == 2 and out == "" and err.count("\n") == 1
    assert f"cannot write {path}: No space left on device" in err
    assert list(tmp_path.iterdir()) == []


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


def test_what_a_model_factory_prints_goes_to_stderr(tmp_path, capsys, monkeypatch):
    (tmp_path / "chatty_factory.py").write_text(
        "import torch\n"
        "print('importing the factory')\n"
        "def build():\n"
        "    print('building the model')\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 4))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "chatty_factory", raising=False)
    argv = ["bounds", "--model", "chatty_factory:build", "--targets", "0", "--rank", "2"]
    status, out, err = run(capsys, *argv, "--json")
    assert status == 0 and json.loads(out)["totals"]["adapter_params"] == 2 * (8 + 4)
    assert "importing the factory" in err and "building the model" in err


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


# The config.json of Llama 7B (huggyllama/llama-7b), as transformers writes it.
LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 2048,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.28.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


@pytest.mark.parametrize(
    "spec", ["transformers:AutoModelForCausalLM", "transformers:LlamaForCausalLM"]
)
def test_transformers_model_from_config_json(tmp_path, capsys, spec):
    pytest.importorskip("transformers")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_7B))
    argv = ["bounds", "--model", spec, "--config", config, "--targets", "q_proj,v_proj"]
    status, out, err = run(capsys, *argv, "--rank", "16", "--json")
    assert status == 0 and err == ""
    totals = json.loads(out)["totals"]
    # 32 layers x (q_proj + v_proj) x 16 (4096 + 4096); 6,738,415,616 is Llama 7B's count
    assert totals["adapter_params"] == 32 * 2 * 16 * (4096 + 4096) == 8_388_608
    assert totals["base_params"] == 6_738_415_616


def test_transformers_warnings_about_the_config_are_silenced(tmp_path, capsys):
    pytest.importorskip("transformers")
    config = tmp_path / "config.json"
    # GPT-2's default token ids (50256) lie outside this vocabulary, which transformers warns of
    tiny_gpt2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4,
                 "vocab_size": 100, "n_positions": 32}  # fmt: skip
    config.write_text(json.dumps(tiny_gpt2))
    argv = ["bounds", "--model", "transformers:AutoModelForCausalLM", "--config", config]
    status, out, err = run(capsys, *argv, "--targets", "c_attn", "--rank", "4", "--json")
    assert status == 0 and err == ""
    totals = json.loads(out)["totals"]
    # per block: two layer norms, c_attn (64 → 192), attn c_proj, mlp c_fc (64 → 256), c_proj
    block = 2 * 128 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)
    assert totals["base_params"] == 100 * 64 + 32 * 64 + 2 * block + 128  # lm_head is tied
    assert totals["adapter_params"] == 2 * 4 * (64 + 192)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"hidden_size": 64}, 'has no "model_type"'),
        ({"model_type": "no_such_model_type"}, "failed: ValueError"),
    ],
)
def test_transformers_config_errors(tmp_path, capsys, settings, match):
    pytest.importorskip("transformers")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(settings))
    argv = ["bounds", "--model", "transformers:AutoModelForCausalLM", "--config", config]
    status, out, err = run(capsys, *argv, "--targets", "q_proj", "--rank", "2")
    assert status == 2 and out == "" and err.count("\n") == 1 and match in err
    assert len(err) < 500


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
        (["bounds", "--model", "model_factories:mlp_head", "--targets", "0"],
         "--targets needs --rank"),
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


@pytest.mark.parametrize("argv", [
    ["bounds", "--in", "8", "--out", "8"],
    ["inspect", "a"],
    ["convert", "a", "--to", "peft", "-o", "x"],
    ["merge", "a", "b", "-o", "x"],
    ["extract", "a", "b", "-o", "x", "--rank", "2"],
    ["resize", "a", "-o", "x", "--rank", "2"],
    ["combine", "a", "-o", "x"],
])  # fmt: skip
def test_an_unknown_argument_points_to_the_commands_help(capsys, argv):
    status, out, err = run(capsys, *argv, "--no-such-option")
    command = argv[0]
    assert status == 2 and out == ""
    assert err.startswith("lowrank: error: unrecognized arguments: ")
    assert err.endswith(f"--no-such-option (see lowrank {command} --help)\n")


def test_runs_as_a_module():
    """`python -m lowrank.cli` (and `python -m lowrank`, in the next test) run the command
    line in a real process."""
    argv = ["bounds", "--in", "64", "--out", "32", "--kernel", "3"]
    result = subprocess.run(
        [sys.executable, "-m", "lowrank.cli", *argv], capture_output=True, text=True,
        check=False, cwd=TESTS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "max useful rank" in result.stdout
    assert "18,432 parameters" in result.stdout  # the dense weight, 64 · 32 · 3 · 3


def test_errors_are_one_line_without_traceback(tmp_path):
    argv = ["bounds", "--model", "model_factories:TinyNet", "--config", str(tmp_path / "no.json")]
    result = subprocess.run(
        [sys.executable, "-m", "lowrank", *argv, "--targets", "to_q", "--rank", "2"],
        capture_output=True,
        text=True,
        check=False,
        cwd=TESTS,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("lowrank: error: cannot read --config")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_every_option_with_a_default_says_it_in_its_help():
    """`lowrank COMMAND --help` tells each default that is a value (not an unset option's
    None, nor a flag's False)."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    silent = [
        f"{name} {'/'.join(action.option_strings)} (default {action.default!r})"
        for name, command in commands.choices.items()
        for action in command._actions
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
        and "default" not in (action.help or "")
    ]
    assert silent == []


def test_version_is_the_package_version(capsys):
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    stated = re.search(r'^version = "(.+)"$', pyproject, re.MULTILINE).group(1)
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"lowrank {stated}\n"
