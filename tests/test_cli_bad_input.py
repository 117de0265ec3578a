"""Bad input to every `lowrank` subcommand: exit status 2, exactly one line on stderr that
names the problem, nothing on stdout, and no file written or changed; and, for `bounds`,
arbitrary command lines that never end in a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_helpers import digest, listing, lora_factors, save_sharded, save_state, targets, tiny
from safetensors.torch import load_file, save_file

from lowrank import cli
from lowrank._termination import Terminated, terminate
from lowrank.cli import main
from lowrank.forms import LoRA
from lowrank.io import Adapter, save_adapter

pytestmark = pytest.mark.long  # among the suite's longest modules: scheduled first

BROKEN_MODULES = {
    "raises_runtime": "raise RuntimeError('boom at import')\n",
    "raises_oserror": "raise OSError(5, 'disk gone')\n",
    "bad_syntax": "def f(:\n    pass\n",
    "missing_dependency": "import lowrank_no_such_dependency\n",
    "exits": "import sys\nsys.exit(3)\n",
    "multiline": "raise ValueError('first line\\nsecond line\\n' + 'x' * 5000)\n",
}


DEEP_JSON = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON parser can go
PEFT_CONFIGS = {  # adapter_config.json of broken PEFT folders: what replaces the good one
    "peft_deep": DEEP_JSON,
    "peft_latin1": '{"r": "caf\xe9"}',
    "peft_r_fraction": {"r": 2.5},
    "peft_rank_pattern": {"rank_pattern": {"to_q": "x"}},
    "peft_alpha_pattern": {"alpha_pattern": {"to_q": None}},
    "peft_pattern_regex": {"alpha_pattern": {"(": 4}},
    "peft_alpha_inf": {"lora_alpha": float("inf")},  # JSON's 1e400
    "peft_alpha_huge": {"lora_alpha": 10**400},  # an integer no float holds
}


def write_peft_variants(folder: Path) -> None:
    """Copies of the PEFT folder `folder / "peft"` with each config of `PEFT_CONFIGS`."""
    good = json.loads((folder / "peft" / "adapter_config.json").read_text())
    for name, change in PEFT_CONFIGS.items():
        shutil.copytree(folder / "peft", folder / name)
        text = change if isinstance(change, str) else json.dumps({**good, **change})
        (folder / name / "adapter_config.json").write_bytes(text.encode("latin-1"))


def write_inputs(folder: Path) -> None:
    """Checkpoints, adapters, broken files, JSON files and broken `--model` modules."""
    folder.mkdir()
    model = tiny()
    save_state(model.state_dict(), folder / "base.safetensors")
    g = torch.Generator().manual_seed(0)
    tuned = {
        k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    save_state(tuned, folder / "tuned.safetensors")
    save_sharded(model.state_dict(), folder / "sharded", 2)
    layers = {
        n: LoRA(*lora_factors(tuple(m.weight.shape), 2, g), scale=0.5)
        for n, m in targets(model).items()
    }
    save_adapter(Adapter(layers), folder / "lora.safetensors", "kohya")
    save_adapter(Adapter(layers), folder / "peft", "peft")
    write_peft_variants(folder)
    shutil.copytree(folder / "peft", folder / "peft_bin")  # as older PEFT saved by default
    (folder / "peft_bin" / "adapter_model.safetensors").rename(
        folder / "peft_bin" / "adapter_model.bin"
    )
    for name, prefix in (("bare", "lora_unet"), ("whole", "lycoris")):  # no recorded names
        path = folder / f"{name}.safetensors"
        save_adapter(Adapter(layers), path, "lycoris", prefix=prefix)
        save_file(load_file(path), path)
    diffusers = folder / "diffusers.safetensors"
    save_adapter(Adapter(layers), diffusers, "diffusers")
    save_file(load_file(diffusers), diffusers, metadata={"lora_adapter_metadata": DEEP_JSON})
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "junk.safetensors").write_bytes(b"\x00" * 64)
    (folder / "model.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    (folder / "adir").mkdir()
    (folder / "notes.txt").write_text("not an adapter\n")
    (folder / "latin1.json").write_bytes('{"name": "caf\xe9"}'.encode("latin-1"))
    (folder / "list.json").write_text("[1, 2]")
    (folder / "deep.json").write_text(DEEP_JSON)
    (folder / "linear.json").write_text('{"in_features": 6, "out_features": 4}')
    (folder / "bad_regex.json").write_text('{"re:(": {"r": 2}}')
    for name, source in BROKEN_MODULES.items():
        (folder / f"{name}.py").write_text(source)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The inputs (`write_inputs`), written once for the module; every test reads a copy."""
    folder = tmp_path_factory.mktemp("pristine") / "in"
    write_inputs(folder)
    return folder


@pytest.fixture
def dirs(tmp_path, monkeypatch, pristine):
    """`{"in": a copy of the inputs, "out": an empty folder}` under `tmp_path`; the inputs
    importable."""
    shutil.copytree(pristine, tmp_path / "in")
    (tmp_path / "out").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path / "in"))
    return {"in": tmp_path / "in", "out": tmp_path / "out"}


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


LORA = "{in}/lora.safetensors"
BASE = "{in}/base.safetensors"
TUNED = "{in}/tuned.safetensors"
MODEL = ["--model", "model_factories:mlp_head"]
LAYER = ["bounds", "--in", "8", "--out", "8"]
EXTRACT = ["extract", BASE, TUNED, "-o", "{out}/x"]
RESIZE = ["resize", LORA, "-o", "{out}/x.safetensors"]
COMBINE = ["combine", LORA, LORA, "-o", "{out}/x.safetensors"]
MERGE = ["merge", BASE, LORA, "-o", "{out}/m.safetensors"]
CONVERT = ["convert", LORA, "--to", "kohya", "-o", "{out}/x.safetensors"]

CASES = [
    # the command line itself
    ([], "required: COMMAND"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    (["bounds"], "one of the arguments --in --model is required"),
    ([*LAYER, "--model", "m:f"], "not allowed with argument"),
    ([*LAYER, "--bogus"], "unrecognized arguments: --bogus"),
    # bounds, one layer
    ([*LAYER, "--rank", "abc"], "argument --rank"),
    ([*LAYER, "--rank", "0"], "argument --rank"),
    ([*LAYER, "--rank", "-1"], "argument --rank"),
    ([*LAYER, "--rank", "4,0"], "argument --rank"),
    (["bounds", "--in", "abc", "--out", "8"], "argument --in"),
    (["bounds", "--in", "8", "--out", "-3"], "argument --out"),
    ([*LAYER, "--kernel", "0"], "argument --kernel"),
    ([*LAYER, "--kernel", "3x3x3x3"], "argument --kernel"),
    ([*LAYER, "--dims", "4"], "argument --dims"),
    ([*LAYER, "--plot", "{out}/bounds.xyz"], "must end in .png, .svg, .pdf"),
    ([*LAYER, "--plot", "{out}/bounds"], "got no suffix"),
    ([*LAYER, "--plot", "{out}"], "is a folder"),
    ([*LAYER, "--plot", "{out}/missing/bounds.png"], "missing does not exist"),
    ([*LAYER, "--plot", "{in}/notes.txt/bounds.png"], "notes.txt does not exist"),
    ([*LAYER, "--config", "{in}/linear.json"], "--config cannot be used with --in"),
    # bounds, a model
    (["bounds", *MODEL, "--targets", "0", "--rank", "2", "--plot", "x.png"], "--plot cannot"),
    (["bounds", "--model", "raises_runtime:f", "--targets", "0"], "'raises_runtime'"),
    (["bounds", "--model", "raises_oserror:f", "--targets", "0"], "OSError: [Errno 5] disk gone"),
    (["bounds", "--model", "bad_syntax:f", "--targets", "0"], "SyntaxError"),
    (["bounds", "--model", "missing_dependency:f", "--targets", "0"], "ModuleNotFoundError"),
    (["bounds", "--model", "exits:f", "--targets", "0"], "SystemExit: 3"),
    (["bounds", "--model", "multiline:f", "--targets", "0"], "first line second line"),
    (["bounds", "--model", ".relative:f", "--targets", "0"], "package.module:callable"),
    (["bounds", "--model", "model_factories:", "--targets", "0"], "package.module:callable"),
    (["bounds", *MODEL, "--targets", "re:[", "--rank", "2"], "'re:[' is not a valid regular"),
    (["bounds", "--model", "model_factories:TinyNet", "--targets-config", "{in}/bad_regex.json"],
     "'re:(' is not a valid regular"),
    (["bounds", *MODEL, "--targets", "0", "--config", "{in}/latin1.json"], "is not UTF-8"),
    (["bounds", *MODEL, "--targets", "0", "--config", "{in}/deep.json"], "not valid JSON"),
    (["bounds", *MODEL, "--targets", "0", "--config", "{in}/list.json"], "a JSON object"),
    (["bounds", *MODEL, "--targets", "0", "--config", "{in}/adir"], "cannot read --config"),
    (["bounds", *MODEL, "--targets-config", "{in}/latin1.json"], "is not UTF-8"),
    (["bounds", *MODEL, "--targets-config", "{in}/none.json"], "cannot read --targets-config"),
    (["bounds", *MODEL, "--targets", "0", "--rank", "2", "--dtype", "float7"], "argument --dtype"),
    (["bounds", *MODEL, "--targets", "0", "--rank", "2", "--alpha", "abc"], "argument --alpha"),
    (["bounds", *MODEL, "--targets", "0", "--rank", "2", "--alpha", "nan"], "alpha"),
    (["bounds", *MODEL, "--targets", "0", "--rank", "2", "--form", "dense"], "argument --form"),
    (["bounds", *MODEL, "--targets", "0", "--targets-config", "{in}/list.json"], "exactly one"),
    # inspect
    (["inspect", "{in}/none.safetensors"], "none.safetensors does not exist"),
    (["inspect", "{in}/adir"], "adir holds no adapter"),
    (["inspect", "{in}/empty.safetensors"], "empty.safetensors is not a valid safetensors"),
    (["inspect", "{in}/junk.safetensors"], "junk.safetensors is not a valid safetensors"),
    (["inspect", "{in}/notes.txt"], "notes.txt is not a valid safetensors"),
    (["inspect", "{in}/model.pt"], "model.pt is a pickle"),
    (["inspect", "{in}/peft/adapter_config.json"],
     "adapter_config.json is a JSON file, not a .safetensors file"),
    (["inspect", LORA, "--base", "{in}/bare.safetensors"],
     "bare.safetensors holds an adapter's tensors only"),
    (["inspect", LORA, "--base", "{in}/junk.safetensors"], "junk.safetensors"),
    (["inspect", LORA, "--base", "unet=a", "--base", "b"], "COMPONENT=CKPT"),
    (["inspect", "{in}/peft_deep"], "adapter_config.json is not valid JSON"),
    (["inspect", "{in}/peft_latin1"], "adapter_config.json is not UTF-8 text"),
    (["inspect", "{in}/peft_r_fraction"], "r must be a whole number, got 2.5"),
    (["inspect", "{in}/peft_rank_pattern"], "rank_pattern['to_q'] must be a number, got 'x'"),
    (["inspect", "{in}/peft_alpha_pattern"], "alpha_pattern['to_q'] must be a number, got None"),
    (["inspect", "{in}/peft_pattern_regex"], "alpha_pattern key '(' is not a valid regular"),
    (["inspect", "{in}/diffusers.safetensors"], "lora_adapter_metadata is not valid JSON"),
    (["inspect", "{in}/peft_alpha_inf"], "lora_alpha must be a finite number, got inf"),
    (["inspect", "{in}/peft_alpha_huge"], "lora_alpha must be a finite number, got an integer"),
    (["inspect", "{in}/peft_bin"], "adapter_model.bin is a pickle"),
    (["inspect", LORA, "--base", "unet=" + BASE, "--base", "unet=" + BASE],
     "--base unet=… is given twice"),
    ([*RESIZE, "--rank", "1", "--rank", "2"], "--rank is given twice"),
    ([*CONVERT, "-o", "{out}/y.safetensors"], "-o is given twice"),
    (["merge", BASE, LORA, "-o", "{out}/new/" + "a" * 300 + "/m.safetensors"],
     "File name too long"),
    (["combine", "{in}/bare.safetensors", "{in}/whole.safetensors", "-o", "{out}/x.safetensors"],
     "cannot be matched by name; give the base model"),
    # convert
    (["convert", LORA, "--to", "kohya", "-o", LORA], "is the input"),
    (["convert", LORA, "--to", "onnx", "-o", "{out}/x"], "argument --to"),
    ([*CONVERT[:-1], "{out}/x.txt"], "ending in .safetensors"),
    ([*CONVERT[:-1], "{in}/adir"], "ending in .safetensors"),
    (["convert", LORA, "--to", "peft", "-o", "{out}/p.safetensors"], "peft writes a folder"),
    (["convert", LORA, "--to", "peft", "-o", "{out}/new/p", "--component", "text_encoder"],
     "no layers for component 'text_encoder'"),
    ([*CONVERT, "--rank", "0"], "argument --rank"),
    ([*CONVERT, "--rank", "abc"], "argument --rank"),
    ([*CONVERT, "--component", "unet"], "--component"),
    ([*CONVERT, "--prefix", "nope"], "prefix 'nope'"),
    ([*CONVERT, "--prefix", "lora_te"], "prefix='lora_te' (--prefix) would change nothing"),
    ([*CONVERT, "--component", ""], "component name must not be empty"),
    (["merge", BASE, LORA, "-o", "{out}/m.safetensors", "--component", " "],
     "component name must not be empty"),
    (["convert", LORA, "--to", "peft", "-o", "{out}/p", "--prefix", "lora_te"], "--prefix"),
    (["convert", "{in}/empty.safetensors", "--to", "kohya", "-o", "{out}/x.safetensors"],
     "not a valid safetensors"),
    # merge
    (["merge", BASE, LORA + ":abc", "-o", "{out}/m.safetensors"], "must be a number, got 'abc'"),
    (["merge", BASE, LORA + ":", "-o", "{out}/m.safetensors"], "must be a number, got ''"),
    (["merge", BASE, LORA + ":nan", "-o", "{out}/m.safetensors"], "must be finite"),
    (["merge", BASE, LORA + ":-inf", "-o", "{out}/m.safetensors"], "must be finite"),
    (["merge", BASE, LORA, "-o", BASE], "is the input"),
    (["merge", BASE, LORA, "-o", "{out}/m.bin"], "a file ending in .safetensors, or a folder"),
    (["merge", LORA, BASE, "-o", "{out}/m.safetensors"],
     "lora.safetensors holds an adapter's tensors only"),
    (["merge", "{in}/peft", LORA, "-o", "{out}/m.safetensors"],
     "adapter_model.safetensors holds an adapter's tensors only"),
    (["merge", "{in}/linear.json", LORA, "-o", "{out}/m.safetensors"],
     "linear.json is a JSON file, not a .safetensors file"),
    (["merge", "{in}/sharded/model-00001-of-00002.safetensors", "{in}/peft", "-o",
      "{out}/m.safetensors"], "(one shard of {in}/sharded/model.safetensors.index.json"),
    (["inspect", "{in}/bare.safetensors", "--base",
      "{in}/sharded/model-00001-of-00002.safetensors"],
     "(one shard of {in}/sharded/model.safetensors.index.json"),
    (["merge", "{in}/sharded", LORA, "-o", "{out}/m.safetensors"], "a folder, as BASE is sharded"),
    ([*MERGE, "--dtype", "float7"], "argument --dtype"),
    ([*MERGE, "--threads", "0"], "argument --threads"),
    ([*MERGE, "--threads", "abc"], "argument --threads"),
    ([*MERGE, "--threads", "99999"], "argument --threads: at most"),  # torch would abort
    (["merge", BASE, LORA, "-o", "{out}/" + "a" * 260 + ".safetensors"], "File name too long"),
    (["merge", BASE, LORA, "-o", "{out}/m.safetensors/"], "'/', which names a folder"),
    ([*CONVERT[:-1], "{out}/x.safetensors/"], "'/', which names a folder"),
    ([*LAYER, "--plot", "{out}/bounds.png/"], "'/', which names a folder"),
    (["inspect", "{in}/" + "a" * 260 + ".safetensors"], "File name too long"),
    ([*LAYER, "--plot", "{out}/" + "a" * 260 + ".png"], "cannot write {out}/aaa"),
    (["bounds", *MODEL, "--targets", "0", "--config", "{in}/" + "a" * 260 + ".json"],
     "cannot read --config {in}/aaa"),
    ([*LAYER, "--dims", "3"], "--dims 3 needs --kernel"),
    ([*CONVERT, "--rank", "2"], "nothing would use it"),
    (["inspect", LORA, "--base", "=x.safetensors"], "give --base as CKPT or COMPONENT=CKPT"),
    ([*MERGE, "--component", "text_encoder"], "no layers for component"),
    (["merge", "{in}/junk.safetensors", LORA, "-o", "{out}/m.safetensors"], "junk.safetensors"),
    (["merge", "{in}/adir", LORA, "-o", "{out}/m.safetensors"], "adir holds 0 .safetensors"),
    (["merge", "{in}/none.safetensors", LORA, "-o", "{out}/m.safetensors"], "none.safetensors"),
    (["merge", BASE, "{in}/adir", "-o", "{out}/m.safetensors"], "adir holds no adapter"),
    (["merge", BASE, BASE, "-o", "{out}/m.safetensors"], "unknown adapter layout"),
    # extract
    ([*EXTRACT, "--rank", "0"], "argument --rank"),
    ([*EXTRACT, "--rank", "-1"], "argument --rank"),
    ([*EXTRACT, "--rank", "abc"], "argument --rank"),
    ([*EXTRACT, "--energy", "1.5"], "energy"),
    ([*EXTRACT, "--energy", "nan"], "energy"),
    ([*EXTRACT, "--ratio", "nan"], "ratio"),
    ([*EXTRACT, "--ratio", "-1"], "ratio"),
    ([*EXTRACT, "--rank", "2", "--energy", "0.5"], "not allowed with argument"),
    ([*EXTRACT, "--rank", "2", "--conv-rank", "0"], "argument --conv-rank"),
    ([*EXTRACT, "--rank", "2", "--dtype", "float7"], "argument --dtype"),
    ([*EXTRACT, "--rank", "2", "--device", "tpu"], "device"),
    ([*EXTRACT, "--rank", "2", "--targets", "re:["], "'re:[' is not a valid regular"),
    ([*EXTRACT, "--rank", "2", "--targets", "re:a["],
     "at position 1 (positions count in 'a[', the regex matched)"),
    ([*EXTRACT, "--rank", "2", "--targets", "nomatch"], "match no weight"),
    ([*EXTRACT, "--rank", "2", "--prefix", "lora_te"], "--prefix"),
    (["extract", BASE, TUNED, "-o", "{out}/x.safetensors", "--rank", "2"], "peft writes a folder"),
    ([*EXTRACT, "--rank", "2", "--format", "kohya"], "ending in .safetensors"),
    (["extract", BASE, TUNED, "-o", TUNED, "--rank", "2", "--format", "kohya"], "is the input"),
    (["extract", BASE, "{in}/junk.safetensors", "-o", "{out}/x", "--rank", "2"], "junk"),
    (["extract", BASE, LORA, "-o", "{out}/x", "--rank", "2"],
     "lora.safetensors holds an adapter's tensors only"),
    (["extract", BASE, BASE, "-o", "{out}/new/x", "--rank", "2"], "nothing to extract"),
    # resize
    ([*RESIZE, "--rank", "0"], "argument --rank"),
    ([*RESIZE, "--rank", "abc"], "argument --rank"),
    ([*RESIZE, "--energy", "1.5"], "energy"),
    ([*RESIZE, "--ratio", "nan"], "ratio"),
    (["resize", LORA, "-o", "{out}/x"], "one of the arguments --rank --energy --ratio"),
    (["resize", LORA, "-o", LORA, "--rank", "1"], "is the input"),
    (["resize", LORA, "-o", "{out}/x.txt", "--rank", "1"], "ending in .safetensors"),
    (["resize", LORA, "-o", "{out}/x.safetensors", "--rank", "1", "--format", "peft"],
     "peft writes a folder"),
    (["resize", BASE, "-o", "{out}/x.safetensors", "--rank", "1"], "unknown adapter layout"),
    (["resize", "{in}/empty.safetensors", "-o", "{out}/x.safetensors", "--rank", "1"],
     "not a valid safetensors"),
    (["resize", "{in}/none.safetensors", "-o", "{out}/x.safetensors", "--rank", "1"],
     "does not exist"),
    ([*RESIZE, "--rank", "1", "--base", "{in}/junk.safetensors"], "junk.safetensors"),
    # combine
    (["combine", LORA + ":abc", "-o", "{out}/x.safetensors"], "must be a number, got 'abc'"),
    (["combine", LORA + ":nan", "-o", "{out}/x.safetensors"], "must be finite"),
    (["combine", LORA, LORA, "-o", LORA], "is the input"),
    ([*COMBINE, "--rank", "0"], "argument --rank"),
    ([*COMBINE, "--energy", "1.5"], "energy"),
    ([*COMBINE, "--ratio", "nan"], "ratio"),
    ([*COMBINE, "--rank", "2", "--ratio", "0.1"], "not allowed with argument"),
    (["combine", LORA, "-o", "{out}/x.txt"], "ending in .safetensors"),
    (["combine", LORA, "-o", "{out}/x.safetensors", "--format", "peft"], "peft writes a folder"),
    (["combine", LORA, BASE, "-o", "{out}/new/x.safetensors"], "unknown adapter layout"),
    (["combine", "{in}/adir", "-o", "{out}/x.safetensors"], "adir holds no adapter"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "match"), CASES, ids=[" ".join(a) or "(none)" for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, dirs, argv, match):
    before = (listing(dirs["in"].parent), digest([dirs["in"].parent]))
    status, out, err = run(capsys, *(a.format(**dirs) for a in argv))
    lines = err.splitlines()
    assert status == 2 and out == ""
    assert len(lines) == 1 and err.endswith("\n") and lines[0].startswith("lowrank: error: ")
    assert match.format(**dirs) in lines[0]
    assert len(lines[0]) < 1100
    assert (listing(dirs["in"].parent), digest([dirs["in"].parent])) == before


def test_a_module_that_raises_at_import_is_one_line_in_a_real_process(tmp_path):
    (tmp_path / "raises_at_import.py").write_text("raise RuntimeError('boom')\n")
    result = subprocess.run(
        [sys.executable, "-m", "lowrank.cli", "bounds", "--model", "raises_at_import:f",
         "--targets", "x", "--rank", "2"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "lowrank: error: cannot import 'raises_at_import' for --model: RuntimeError: boom\n"
    )


# Values a user might type for each option of `bounds`, good and bad. Free text never
# reaches --model (importing an arbitrary module name runs its code) nor holds NUL, which
# no command line can carry.
TEXT = st.text(st.characters(exclude_characters="\x00"), max_size=8).filter(
    lambda text: not text.startswith("-")
)
NUMBER = st.one_of(
    st.integers(1, 4096).map(str),
    st.integers(-3, 10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["abc", "", "1e3", "2,3", "4,0", "1,2,3", " 7", "0x10", "٣"]),
    TEXT,
)
PLOT_PATHS = ["{out}/bounds.xyz", "{out}", "{out}/missing/bounds.png", "{out}/bounds"]
OPTIONS = {
    "--in": NUMBER,
    "--out": NUMBER,
    "--rank": NUMBER,
    "--dims": NUMBER,
    "--alpha": NUMBER,
    "--kernel": st.one_of(st.sampled_from(["3", "3x3", "3x1x3", "3x3x3x3", "0", "5,1"]), NUMBER),
    "--targets": st.one_of(
        st.sampled_from(["0", "0,2", "re:[", "re:.*", "re:0|2", "*", "all-linear", ",", "["]),
        TEXT,
    ),
    "--model": st.sampled_from(
        ["model_factories:mlp_head", "model_factories:TinyNet", "torch.nn:Linear",
         "raises_runtime:f", "lowrank_no_such_module:f", "model_factories", ":f", "x:"]
    ),
    "--config": st.sampled_from(
        ["{in}/linear.json", "{in}/latin1.json", "{in}/list.json", "{in}/deep.json",
         "{in}/adir", "{in}/none.json"]
    ),
    "--targets-config": st.sampled_from(
        ["{in}/bad_regex.json", "{in}/latin1.json", "{in}/list.json", "{in}/linear.json"]
    ),
    "--form": st.sampled_from(["lora", "centre_tap", "tucker2", "cp", "dense", "LoRA"]),
    "--dtype": st.sampled_from(["float16", "bfloat16", "float32", "float64", "float7"]),
    "--plot": st.sampled_from(PLOT_PATHS),
}  # fmt: skip
FRAGMENT = st.one_of(
    *(value.map(lambda v, option=option: [option, v]) for option, value in OPTIONS.items()),
    st.just(["--json"]),
    TEXT.map(lambda text: [text]),
)
# Most command lines start like a real one, so that the fragments after it are what is tested.
SIZE = st.integers(1, 10**7).map(str)
START = st.one_of(
    st.just([]),
    st.tuples(SIZE, SIZE).map(lambda sizes: ["--in", sizes[0], "--out", sizes[1]]),
    st.sampled_from(
        [["--model", "model_factories:mlp_head", "--targets", targets] for targets in
         ("0,2", "re:[0-9]", "*")] + [["--model", "model_factories:TinyNet", "--targets", "to_q"]]
    ),
)  # fmt: skip


def placed(part: str, dirs: dict[str, Path]) -> str:
    """`part` with `{in}` and `{out}` replaced by those folders (free text may hold braces)."""
    return part.replace("{in}", str(dirs["in"])).replace("{out}", str(dirs["out"]))


# the fixtures hold read-only inputs and an output folder checked to stay empty
@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=START, fragments=st.lists(FRAGMENT, max_size=4))
def test_bounds_never_ends_in_a_traceback(capsys, dirs, start, fragments):
    """Any mix of `bounds` options and values exits 0 with output or 2 with one line."""
    parts = [*start, *(part for fragment in fragments for part in fragment)]
    argv = ["bounds", *(placed(part, dirs) for part in parts)]
    before = listing(dirs["out"])
    status, out, err = run(capsys, *argv)
    assert (status, err == "", out != "") in ((0, True, True), (2, False, False))
    assert status == 0 or (err.count("\n") == 1 and err.startswith("lowrank: error: "))
    assert listing(dirs["out"]) == before


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(["resize", "combine"]),
    weight=st.one_of(st.none(), NUMBER),
    rule=st.sampled_from([None, "--rank", "--energy", "--ratio"]),
    value=NUMBER,
)
def test_weights_and_rank_rules_never_end_in_a_traceback(
    capsys, dirs, command, weight, rule, value
):
    """`ADAPTER:WEIGHT` and `--rank/--energy/--ratio` values: the output written (exit 0) or
    one line and nothing written (exit 2)."""
    out = dirs["out"] / "x.safetensors"
    adapter = placed(LORA, dirs) + ("" if weight is None else f":{weight}")
    status, stdout, err = run(capsys, command, adapter, "-o", out, *([rule, value] if rule else []))
    if status == 0:
        assert err == "" and stdout != "" and out.is_file()
        out.unlink()
    else:
        assert status == 2 and stdout == "" and err.count("\n") == 1
        assert err.startswith("lowrank: error: ")
    assert listing(dirs["out"]) == set()


def test_kohya_names_nested_too_deep_are_ignored(capsys, dirs, tmp_path):
    """lowrank records module paths in a kohya file's metadata; unreadable ones are ignored
    (the file reads as any kohya file: kohya's names), not a traceback."""
    path = tmp_path / "deep_names.safetensors"
    save_file(load_file(dirs["in"] / "lora.safetensors"), path,
              metadata={"lowrank_module_names": DEEP_JSON})  # fmt: skip
    status, out, err = run(capsys, "inspect", path)
    assert status == 0 and err == "" and "kohya adapter, 9 layers" in out
    assert "lora_unet_down_blocks_0_attn_to_q" in out



def test_a_file_whose_index_lists_it_alone_is_no_shard_of_others(capsys, dirs, tmp_path):
    """A model saved as one shard with an index (model-00001-of-00001.safetensors) is the
    whole model: an error about it names no other shards to give instead."""
    folder = tmp_path / "one"
    folder.mkdir()
    shard = folder / "model-00001-of-00001.safetensors"
    save_file({"lin.weight": torch.zeros(5, 6)}, shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lin.weight": shard.name}}))  # fmt: skip
    status, _, err = run(capsys, "merge", shard, dirs["in"] / "lora.safetensors", "-o",
                         dirs["out"] / "m.safetensors")  # fmt: skip
    assert status == 2 and str(shard) in err and "one shard" not in err

def test_an_output_name_near_the_limit_is_written(capsys, dirs):
    """Its temporary name, hidden and with a random part, must not be longer than allowed."""
    out = dirs["out"] / ("b" * 240 + ".safetensors")
    status, _, err = run(capsys, *(a.format(**dirs) for a in MERGE[:-1]), out)
    assert status == 0, err
    assert listing(dirs["out"]) == {out.name}


def test_a_base_whose_path_holds_an_equals_sign(capsys, dirs):
    base = dirs["in"] / "a=b.safetensors"
    shutil.copy(dirs["in"] / "base.safetensors", base)
    status, _, err = run(capsys, "merge", base, dirs["in"] / "lora.safetensors", "-o",
                           dirs["out"] / "m.safetensors")  # fmt: skip
    assert status == 0, err
    status, _, err = run(capsys, "inspect", dirs["in"] / "lora.safetensors", "--base", base)
    assert status == 0, err


@pytest.fixture
def disposition():
    """`set(signum, handler)`: `signum`'s disposition for this test, the one found put back
    after. `main` catches only the signals at their default, and a parent may have changed
    one: a non-interactive shell starts a background command with SIGQUIT ignored."""
    found = {}

    def set_disposition(signum, handler):
        found.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, handler)

    yield set_disposition
    for signum, handler in found.items():
        signal.signal(signum, handler)


class _SignalOnCollection:
    """Sends `signum` to this process from its finalizer, where Python prints what the
    handler raises (through `sys.unraisablehook`) and goes on: the exception is swallowed."""

    def __init__(self, signum):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)


def send_mid_merge(monkeypatch, signum, *, swallowed=False):
    """Make the merge send `signum` to this process as it draws its first merged block, once
    lowrank's handler is found to have it (at its default, it would end pytest); with
    `swallowed`, from a finalizer. Returns the rows of each block drawn, a list that grows."""
    from lowrank.io import merge as merge_module

    blocks = merge_module.merged_blocks
    drawn = []

    def signalled(*args, **kwargs):
        for block in blocks(*args, **kwargs):
            drawn.append(block.shape[0])  # its rows
            if len(drawn) == 1:
                handler = signal.getsignal(signum)
                name = signal.Signals(signum).name
                assert handler is terminate, f"{name}'s handler is {handler!r}, not lowrank's"
                if swallowed:
                    _SignalOnCollection(signum)  # collected at once: its __del__ runs here
                else:
                    os.kill(os.getpid(), signum)
            yield block

    monkeypatch.setattr(merge_module, "merged_blocks", signalled)
    return drawn


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGQUIT"])
def test_a_signal_that_ends_the_process_mid_merge_removes_what_was_being_written(
    capsys, dirs, monkeypatch, disposition, name
):
    """The signal becomes an exception, so the writers' cleanup runs: no output, no
    temporary file, exit status 128 + its number, and its default handler back after."""
    signum = getattr(signal, name)
    disposition(signum, signal.SIG_DFL)  # whatever the shell that started pytest left
    send_mid_merge(monkeypatch, signum)
    status, out, err = run(capsys, *(a.format(**dirs) for a in MERGE))
    said = "terminated" if name == "SIGTERM" else f"terminated by {name}"
    assert (status, out, err) == (128 + signum, "", f"lowrank: {said}\n")
    assert listing(dirs["out"]) == set()
    assert signal.getsignal(signum) is signal.SIG_DFL


def test_an_ignored_ending_signal_stays_ignored(capsys, dirs, monkeypatch, disposition):
    """A signal the caller ignores (as `nohup` does SIGHUP, a shell's background job SIGQUIT)
    is left ignored: the merge goes on to the end."""
    from lowrank.io import merge as merge_module

    blocks = merge_module.merged_blocks

    def signalled(*args, **kwargs):
        for i, block in enumerate(blocks(*args, **kwargs)):
            if i == 0:
                assert signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN
                os.kill(os.getpid(), signal.SIGQUIT)
            yield block

    disposition(signal.SIGQUIT, signal.SIG_IGN)
    monkeypatch.setattr(merge_module, "merged_blocks", signalled)
    status, _, err = run(capsys, *(a.format(**dirs) for a in MERGE))
    assert (status, err) == (0, "")
    assert listing(dirs["out"]) == {"m.safetensors"}
    assert signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN


def test_a_signal_whose_exception_a_finalizer_swallows_still_ends_the_command(
    capsys, dirs, monkeypatch, disposition
):
    """What the handler raises in a finalizer (`__del__`, a weakref callback, run wherever
    the garbage is collected) never reaches `main`; the command still ends, as soon as it
    writes again and before any output is put in place, and leaves nothing."""
    from lowrank.io import files

    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda found: swallowed.append(found.exc_type))
    disposition(signal.SIGTERM, signal.SIG_DFL)
    drawn = send_mid_merge(monkeypatch, signal.SIGTERM, swallowed=True)
    done = (143, "", "lowrank: terminated\n")
    assert run(capsys, *(a.format(**dirs) for a in MERGE)) == done
    assert swallowed == [Terminated] and len(drawn) == 1  # not one more block computed
    assert listing(dirs["out"]) == set()

    write = files.write_safetensors  # an adapter is written whole, then put in place

    def save_signalled(*args, **kwargs):
        _SignalOnCollection(signal.SIGTERM)
        return write(*args, **kwargs)

    monkeypatch.setattr(files, "write_safetensors", save_signalled)
    assert run(capsys, *(a.format(**dirs) for a in CONVERT)) == done
    assert swallowed == [Terminated] * 2 and listing(dirs["out"]) == set()

    inspect_adapter = cli.inspect_adapter  # a command that writes nothing does not end in 0

    def inspect_signalled(*args, **kwargs):
        _SignalOnCollection(signal.SIGTERM)
        return inspect_adapter(*args, **kwargs)

    monkeypatch.setattr(cli, "inspect_adapter", inspect_signalled)
    status, _, err = run(capsys, "inspect", LORA.format(**dirs))
    assert (status, err, swallowed) == (143, "lowrank: terminated\n", [Terminated] * 3)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_symlink_loop_as_output_or_input_is_one_line(capsys, dirs):
    """`Path.resolve` raised RuntimeError on the output, a traceback; as an input it was
    called missing."""
    loop = dirs["out"] / "loop.safetensors"
    loop.symlink_to(loop)
    for argv, said in [
        (["merge", *(a.format(**dirs) for a in MERGE[1:3]), "-o", loop], f"cannot write {loop}"),
        (["inspect", loop], f"cannot read {loop}"),
    ]:
        status, out, err = run(capsys, *argv)
        assert status == 2 and out == ""
        assert err == f"lowrank: error: {said}: Too many levels of symbolic links\n"
        assert listing(dirs["out"]) == {loop.name}


def test_sigterm_swallowed_by_a_model_factory_still_ends_the_command(
    tmp_path, capsys, monkeypatch, disposition
):
    disposition(signal.SIGTERM, signal.SIG_DFL)
    (tmp_path / "stubborn_factory.py").write_text(
        "import os, signal, torch\n"
        "def build():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    except BaseException:\n"
        "        pass\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 4))\n"
        "def build_then_fail():\n"
        "    build()\n"
        "    raise ValueError('after the TERM')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "stubborn_factory", raising=False)
    for factory in ("build", "build_then_fail"):
        argv = ["bounds", "--model", f"stubborn_factory:{factory}", "--targets", "0", "--rank",
                "2"]  # fmt: skip
        status, out, err = run(capsys, *argv)
        assert status == 128 + signal.SIGTERM and out == "" and err == "lowrank: terminated\n"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    again = ["bounds", "--model", "model_factories:mlp_head", "--targets", "0", "--rank", "2"]
    assert run(capsys, *again)[0] == 0  # the next command is not cut short by the last TERM


def test_bounds_json_numbers_are_numbers(capsys):
    status, out, _ = run(capsys, "bounds", "--in", "320", "--out", "320", "--kernel", "3",
                         "--rank", "16", "--json")  # fmt: skip
    row = json.loads(out)["forms"]["lora"]
    assert status == 0 and row["unmerged_flops_ratio"] == pytest.approx(19 / 18)
    assert row["unmerged_flops_ratio_exact"] == "19/18"


def test_a_closed_stdout_ends_quietly(tmp_path):
    """`lowrank … | head`: the reader goes away; no traceback, exit 128 + SIGPIPE."""
    result = subprocess.run(
        f"{sys.executable} -m lowrank.cli bounds --in 320 --out 320 --kernel 3 --rank 16 "
        "--json | head -c 1",
        shell=True, capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.stderr == "" and result.stdout == "{"


def test_bounds_prints_counts_of_any_size(capsys):
    """Exact integer counts past Python's 4300-digit str limit are printed whole."""
    size = str(10**2200)
    status, out, _ = run(capsys, "bounds", "--in", size, "--out", size, "--json")
    assert status == 0 and f'"dense_params": 1{"0" * 4400},' in out
    status, out, _ = run(capsys, "bounds", "--in", "4", "--out", "4", "--rank", str(10**2500))
    assert status == 0 and str(10**2500) in out
