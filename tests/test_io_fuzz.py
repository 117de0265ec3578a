"""Corrupt and hostile files through every reader and the command line: the file is read
whole and right, or refused with a `LowRankError` naming it (one line, exit status 2, from
`lowrank`); never another exception, a hang or a huge allocation, never an output left
behind or an input changed, and a pickle is never unpickled.

The seeds are small valid files of every format (kohya, LyCORIS LoHa / LoKr / LoCon / Full /
DoRA, diffusers, a PEFT folder, single-file and sharded checkpoints); hypothesis mutates
their bytes (bounded and derandomized), and each hostile construct has a case of its own.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_helpers import digest, listing, lora_factors, save_sharded, save_state, targets, tiny
from safetensors.torch import save_file

import lowrank.io.checkpoint as checkpoint_module
from lowrank import errors
from lowrank.cli import main
from lowrank.forms import DoRA, Full, LoHa, LoKr, LoRA
from lowrank.io import Adapter, Checkpoint, load_adapter, merge_checkpoint, save_adapter

ADAPTERS = ("kohya.safetensors", "loha.safetensors", "lokr.safetensors", "locon.safetensors",
            "full.safetensors", "dora.safetensors", "diffusers.safetensors",
            "peft/adapter_model.safetensors")  # fmt: skip
SHARD = "sharded/model-00001-of-00002.safetensors"
CHECKPOINTS = ("base.safetensors", SHARD)


def write_seeds(folder: Path) -> None:
    """A valid small file of every format lowrank reads, in `folder`."""
    model = tiny()
    save_state(model.state_dict(), folder / "base.safetensors")
    save_sharded(model.state_dict(), folder / "sharded", 2)
    g = torch.Generator().manual_seed(0)
    layers = {n: LoRA(*lora_factors(tuple(m.weight.shape), 2, g), scale=0.5)
              for n, m in targets(model).items()}  # fmt: skip
    for name, fmt in (("kohya.safetensors", "kohya"), ("peft", "peft"),
                      ("diffusers.safetensors", "diffusers"),
                      ("locon.safetensors", "lycoris")):  # fmt: skip
        save_adapter(Adapter(layers), folder / name, fmt)
    linear = [n for n in layers if "attn" in n or n == "head"]

    def half(name: str) -> LoRA:
        return LoRA(*lora_factors(tuple(model.get_submodule(name).weight.shape), 2, g))

    loha = {n: LoHa(half(n), half(n), 0.7) for n in linear}
    lokr = {"down_blocks.0.attn.to_q": LoKr(torch.randn(2, 2, generator=g),
                                            torch.randn(4, 4, generator=g))}  # fmt: skip
    full = {"head": Full(torch.randn(3, 6, generator=g)),
            "head.bias": Full(torch.randn(3, generator=g))}  # fmt: skip
    dora = {n: DoRA(layers[n], torch.rand(model.get_submodule(n).weight.shape[0], 1) + 1)
            for n in linear}  # fmt: skip
    for name, forms in (("loha", loha), ("lokr", lokr), ("full", full), ("dora", dora)):
        save_adapter(Adapter(forms), folder / f"{name}.safetensors", "lycoris")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seeds")
    write_seeds(folder)
    return folder


@contextlib.contextmanager
def copy_of(seeds: Path):
    """A fresh copy of the seed files, and an empty `out` folder beside them."""
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp) / "in"
        shutil.copytree(seeds, folder)
        (Path(temp) / "out").mkdir()
        yield folder


def cli(*argv: object) -> tuple[int, str]:
    """`lowrank *argv` in this process: its status and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main([str(a) for a in argv])
    return status, err.getvalue()


def names(message: str, path: Path) -> bool:
    """Whether `message` names `path`, or the PEFT folder or sharded checkpoint it is in."""
    return str(path) in message or (
        path.parent.name in ("peft", "sharded") and str(path.parent) in message
    )


def refused_or_read(call: Callable[[], object], path: Path) -> None:
    """`call()` succeeds, or raises a `LowRankError` naming `path`; either way the inputs
    (the folder of the seeds' copy) are as they were, and `out` beside it holds nothing once
    it failed."""
    inputs = path.parent.parent if path.parent.name in ("peft", "sharded") else path.parent
    out = inputs.parent / "out"
    before = digest([inputs])
    try:
        call()
    except errors.LowRankError as err:
        assert names(str(err), path), err
        assert listing(out) == set(), "a failed call left an output"
    assert digest([inputs]) == before, "an input changed"
    shutil.rmtree(out)
    out.mkdir()


def refused_on_one_line(path: Path, *argv: object) -> None:
    """`lowrank *argv` exits 0, or 2 after one line naming `path`; no output is left when it
    fails, and no input changes."""
    inputs = path.parent.parent if path.parent.name in ("peft", "sharded") else path.parent
    out = inputs.parent / "out"
    before = digest([inputs])
    status, err = cli(*argv)
    if status != 0:
        lines = err.splitlines()
        assert status == 2 and len(lines) == 1, err[-2000:]
        assert lines[0].startswith("lowrank: error: ") and names(lines[0], path), lines[0]
        assert listing(out) == set(), "a failed command left an output"
    assert digest([inputs]) == before, "an input changed"
    shutil.rmtree(out)
    out.mkdir()


def split(raw: bytes) -> tuple[int, bytes, bytes]:
    """`(header length, header, data)` of a safetensors file's bytes."""
    (size,) = struct.unpack("<Q", raw[:8])
    return size, raw[8 : 8 + size], raw[8 + size :]


def run_everything(folder: Path, target: str) -> None:
    """Every reader of the (mutated) `target` in `folder`, through the API and the CLI."""
    out = folder.parent / "out"
    path = folder / target
    if target in CHECKPOINTS:
        base = folder / ("sharded" if target == SHARD else "base.safetensors")
        merged = out / ("m" if target == SHARD else "m.safetensors")
        adapter = folder / "kohya.safetensors"
        refused_or_read(lambda: merge_checkpoint(base, adapter, out / "m"), path)
        refused_on_one_line(path, "merge", base, adapter, "-o", merged)
        return
    adapter = folder / "peft" if target.startswith("peft/") else path
    refused_or_read(lambda: load_adapter(adapter), path)
    refused_on_one_line(path, "convert", adapter, "--to", "lycoris", "-o", out / "c.safetensors")
    refused_on_one_line(path, "merge", folder / "base.safetensors", adapter,
                        "-o", out / "m.safetensors")  # fmt: skip


MUTATIONS = ("flip header bit", "set header byte", "insert header byte", "delete header byte",
             "flip data bit", "truncate", "change length field")  # fmt: skip


@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    target=st.sampled_from(ADAPTERS + CHECKPOINTS),
    mutation=st.sampled_from(MUTATIONS),
    where=st.floats(0, 1, exclude_max=True),
    value=st.integers(0, 255),
)
def test_mutated_bytes_are_read_whole_or_refused_naming_the_file(
    seeds, target, mutation, where, value
):
    with copy_of(seeds) as folder:
        path = folder / target
        raw = bytearray(path.read_bytes())
        size, _, data = split(bytes(raw))
        at_head = 8 + int(where * size)
        if mutation == "flip header bit":
            raw[at_head] ^= 1 << (value % 8)
        elif mutation == "set header byte":
            raw[at_head] = b'{}[]",:-.0123456789eE\\ \x00\xff'[value % 23]
        elif mutation == "insert header byte":
            raw[at_head:at_head] = bytes([b'{}[]",:0123456789 '[value % 18]])
        elif mutation == "delete header byte":
            del raw[at_head]
        elif mutation == "flip data bit":
            raw[8 + size + int(where * len(data))] ^= 1 << (value % 8)
        elif mutation == "truncate":
            raw = raw[: int(where * len(raw))]
        else:
            raw[:8] = struct.pack("<Q", max(0, size + value - 128))
        path.write_bytes(bytes(raw))
        run_everything(folder, target)


def edit_header(change: Callable[[dict], object]) -> Callable[[Path], None]:
    """A mutation that rewrites a safetensors header through `change(dict)`, data kept."""

    def mutate(path: Path) -> None:
        _, head, data = split(path.read_bytes())
        content = json.loads(head)
        change(content)
        text = json.dumps(content).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)

    return mutate


def first(content: dict) -> dict:
    return next(v for k, v in content.items() if k != "__metadata__")


def length_field(value: int) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value % 2**64) + raw[8:])

    return mutate


def duplicate_key(path: Path) -> None:
    """The first entry given twice in the JSON text, the second with another dtype."""
    _, head, data = split(path.read_bytes())
    content = json.loads(head)
    key = next(k for k in content if k != "__metadata__")
    again = json.dumps({key: {**content[key], "dtype": "F64"}})[1:]
    text = head.rstrip()[:-1] + b"," + again.encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def overlapping(content: dict) -> None:
    """One tensor's data_offsets made another's where both span as many bytes."""
    entries: dict[int, dict] = {}
    for key, entry in content.items():
        if key == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if end - begin in entries:
            entry["data_offsets"] = list(entries[end - begin]["data_offsets"])
            return
        entries[end - begin] = entry
    raise AssertionError("no two tensors of one size")


def reversed_offsets(content: dict) -> None:
    entry = first(content)
    entry["data_offsets"] = entry["data_offsets"][::-1]


HOSTILE_HEADERS = {
    "length 0": length_field(0),
    "length -1": length_field(-1),
    "length -8": length_field(-8),
    "length beyond the file": lambda path: length_field(path.stat().st_size)(path),
    "length 2**63": length_field(2**63),
    "shape overflowing int64": edit_header(lambda c: first(c).update(shape=[2**40, 2**40])),
    "shape beyond 2**64": edit_header(lambda c: first(c).update(shape=[2**64])),
    "shape negative": edit_header(lambda c: first(c).update(shape=[-1, 4])),
    "shape of floats": edit_header(lambda c: first(c).update(shape=[2.0, 3.0])),
    "bytes beyond the file": edit_header(
        lambda c: first(c).update(shape=[1 << 20, 1 << 10], data_offsets=[0, 1 << 32])
    ),
    "dtype unknown": edit_header(lambda c: first(c).update(dtype="F33")),
    "dtype lowrank does not read": edit_header(lambda c: first(c).update(dtype="F4")),
    "dtype not a string": edit_header(lambda c: first(c).update(dtype=5)),
    "duplicate key": duplicate_key,
    "offsets overlapping": edit_header(overlapping),
    "offsets reversed": edit_header(reversed_offsets),
    "offsets negative": edit_header(lambda c: first(c).update(data_offsets=[-4, 0])),
    "metadata holding a number": edit_header(lambda c: c.update(__metadata__={"format": 1})),
    "metadata holding an object": edit_header(lambda c: c.update(__metadata__={"a": {"b": 1}})),
    "metadata a list": edit_header(lambda c: c.update(__metadata__=["a"])),
    "entry a string": edit_header(lambda c: c.update({next(iter(c)): "x"})),
    "header a list": lambda path: path.write_bytes(struct.pack("<Q", 2) + b"[]"),
    "header not UTF-8": lambda path: path.write_bytes(struct.pack("<Q", 4) + b'{"\xff}'),
    "empty": lambda path: path.write_bytes(b""),
    "a directory": lambda path: (path.unlink(), path.mkdir()),
    "a symlink loop": lambda path: (path.unlink(), os.symlink(path.name, path)),
    "a dangling symlink": lambda path: (path.unlink(), os.symlink("/nonexistent/x", path)),
    "a symlink to /dev/zero": lambda path: (path.unlink(), os.symlink("/dev/zero", path)),
    "a FIFO": lambda path: (path.unlink(), os.mkfifo(path)),
}


@pytest.mark.parametrize("target", ["kohya.safetensors", "peft/adapter_model.safetensors",
                                    "base.safetensors", SHARD])  # fmt: skip
@pytest.mark.parametrize("name", HOSTILE_HEADERS)
def test_hostile_safetensors_headers_are_refused_naming_the_file(seeds, name, target):
    with copy_of(seeds) as folder:
        HOSTILE_HEADERS[name](folder / target)
        run_everything(folder, target)


def test_an_index_pointing_outside_its_folder_is_refused(seeds):
    with copy_of(seeds) as folder:
        index = folder / "sharded" / "model.safetensors.index.json"
        content = json.loads(index.read_text())
        key = next(iter(content["weight_map"]))
        for shard in ("../base.safetensors", str(folder / "base.safetensors"), "..", ""):
            content["weight_map"][key] = shard
            index.write_text(json.dumps(content))
            with pytest.raises(errors.FileFormatError, match="file names in the index's folder"):
                Checkpoint(folder / "sharded")
            refused_on_one_line(
                index,
                "merge",
                folder / "sharded",
                folder / "kohya.safetensors",
                "-o",
                folder.parent / "out" / "m",
            )


class Payload:
    """Unpickling this creates `marker`: proof that a reader ran pickled code."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_bin_beside_or_instead_of_the_weights_is_never_unpickled(seeds):
    with copy_of(seeds) as folder:
        payload = Payload()
        payload.marker = folder.parent / "pwned"
        (folder / "peft" / "adapter_model.bin").write_bytes(pickle.dumps({"x": payload}))
        load_adapter(folder / "peft")  # the safetensors weights are read, the .bin is not
        (folder / "peft" / "adapter_model.safetensors").unlink()
        with pytest.raises(errors.FileFormatError, match=r"adapter_model\.bin is a pickle"):
            load_adapter(folder / "peft")
        shutil.copy(folder / "peft" / "adapter_model.bin", folder / "lora.safetensors")
        for argv in (["inspect", folder / "peft"], ["inspect", folder / "lora.safetensors"],
                     ["merge", folder / "peft" / "adapter_model.bin", folder / "kohya.safetensors",
                      "-o", folder.parent / "out" / "m.safetensors"]):  # fmt: skip
            status, err = cli(*argv)
            assert status == 2 and "pickle" in err, err
        assert not payload.marker.exists()


GOOD_CONFIG_CHANGES = {  # adapter_config.json fields → what replaces them, and the key named
    "r as a string": ({"r": "2"}, "r must be a number"),
    "r a fraction": ({"r": 2.5}, "r must be a whole number"),
    "r a bool": ({"r": True}, "r must be a number"),
    "r negative": ({"r": -2}, "rank -2"),
    "lora_alpha NaN": ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    "lora_alpha inf": ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    "target_modules a dict": ({"target_modules": {"a": 1}}, "target_modules must be a name"),
    "rank_pattern a list": ({"rank_pattern": [1]}, "rank_pattern must be an object"),
    "use_dora a string": ({"use_dora": "yes"}, "use_dora must be true or false"),
    "peft_type a list": ({"peft_type": ["LORA"]}, "is a PEFT ['LORA'] adapter"),
    "peft_type an object": ({"peft_type": {"LOHA": 1}}, "is a PEFT {'LOHA': 1} adapter"),
    "task_type an object": ({"task_type": {}}, "task_type must be a name or null"),
    "task_type a list": ({"task_type": ["SEQ_CLS"]}, "task_type must be a name or null"),
    "lora_dropout 2": ({"lora_dropout": 2.0}, "lora_dropout must be below 1"),
    "lora_dropout a string": ({"lora_dropout": "0.1"}, "lora_dropout must be a number"),
}


LOHA_FIELDS = ("target_modules", "rank_pattern", "task_type", "lora_dropout")
"""The fields of `GOOD_CONFIG_CHANGES` a LoHa config has too (its alpha is `alpha`)."""


@pytest.mark.parametrize(
    ("name", "kind"),
    [(name, "LORA") for name in GOOD_CONFIG_CHANGES]
    + [
        (n, "LOHA")
        for n, (change, _) in GOOD_CONFIG_CHANGES.items()
        if set(change) <= set(LOHA_FIELDS)
    ],
)
def test_a_peft_config_of_wrong_types_is_refused_naming_the_file_and_key(seeds, name, kind):
    """The LoRA config of the seed, and a LoHa one (a folder of LoHa factors, which PEFT's
    LoHa config reads), each with one field of the wrong type or out of its range."""
    change, match = GOOD_CONFIG_CHANGES[name]
    with copy_of(seeds) as folder:
        if kind == "LOHA":
            shutil.rmtree(folder / "peft")
            save_adapter(load_adapter(folder / "loha.safetensors"), folder / "peft", "peft")
        config = folder / "peft" / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
        with pytest.raises(errors.FileFormatError) as info:
            load_adapter(folder / "peft")
        assert match in str(info.value) and str(folder / "peft") in str(info.value)
        status, err = cli("inspect", folder / "peft")
        assert status == 2 and len(err.splitlines()) == 1 and match in err, err


def test_a_negative_lora_dropout_is_no_dropout_as_peft_reads_it(tmp_path):
    """PEFT gives a LoRA no dropout (an `Identity`) at `lora_dropout` 0 or below, and loads
    such a folder: so does lowrank (its adapters, injected, drop nothing)."""
    peft = pytest.importorskip("peft")
    from lowrank import nn as lnn
    from lowrank.io import inject_adapter

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    config = peft.LoraConfig(target_modules=["0"], r=2, init_lora_weights=False)
    peft.get_peft_model(torch.nn.Sequential(*base), config).save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora_dropout": -0.1}))
    loaded = peft.PeftModel.from_pretrained(torch.nn.Sequential(*base), tmp_path / "peft")
    assert isinstance(loaded.base_model.model[0].lora_dropout["default"], torch.nn.Identity)
    assert load_adapter(tmp_path / "peft").model["lora_dropout"] == 0.0
    injected = torch.nn.Sequential(*base)
    inject_adapter(injected, tmp_path / "peft")
    assert [a.dropout for a in lnn.adapters(injected).values()] == [0.0]
    x = torch.randn(3, 8)
    loaded.train(), injected.train()
    with torch.no_grad():
        assert torch.allclose(injected(x), loaded(x), rtol=1e-6, atol=1e-6)


def test_a_peft_config_nested_too_deep_is_refused(seeds):
    with copy_of(seeds) as folder:
        config = folder / "peft" / "adapter_config.json"
        text = config.read_text()
        config.write_text(text.replace('"bias"', '"x": ' + "[" * 50_000 + "]" * 50_000
                                       + ', "bias"', 1))  # fmt: skip
        with pytest.raises(errors.FileFormatError, match=r"adapter_config\.json is not valid JSON"):
            load_adapter(folder / "peft")


BIG = "9" * 5000  # more digits than Python converts by default (4300)


@pytest.mark.parametrize(("target", "key"), [
    ("kohya.safetensors", "lowrank_module_names"),
    ("kohya.safetensors", "lowrank_target_parameters"),
    ("locon.safetensors", "lowrank_embeddings"),
    ("locon.safetensors", "lowrank_conv1d"),
    ("diffusers.safetensors", "lora_adapter_metadata"),
])  # fmt: skip
def test_metadata_json_with_a_huge_integer_is_refused_or_ignored(seeds, target, key):
    """Python's `json` raises a plain `ValueError` (no `JSONDecodeError`) for an integer of
    more digits than `int()` converts; it escaped the readers of lowrank's JSON metadata."""
    with copy_of(seeds) as folder:
        path = folder / target

        def change(content):
            content["__metadata__"] = {**content.get("__metadata__", {}), key: BIG}

        edit_header(change)(path)
        refused_or_read(lambda: load_adapter(path), path)


def test_a_json_integer_of_many_digits_is_refused_before_it_is_converted(seeds):
    """The command lifts Python's limit on `int(str)` (to print counts whole), and converting
    a JSON integer takes time quadratic in its digits: a 4 MB config took three minutes to
    parse. Integers of a file are refused at parsing beyond 4300 digits, limit or none."""
    with copy_of(seeds) as folder:
        config = folder / "peft" / "adapter_config.json"
        content = json.loads(config.read_text())
        config.write_text(json.dumps(content).replace('"r": 2', '"r": ' + "9" * 200_000))
        status, err = cli("inspect", folder / "peft")
        assert status == 2 and len(err.splitlines()) == 1, err
        assert f"{config} is not valid JSON" in err and "200000 digits" in err, err


def test_a_base_config_json_with_a_model_type_that_is_no_name_is_ignored(seeds):
    """`config.json` beside a base tells the module types by its `model_type` when it is a
    name; a list there raised TypeError (unhashable) in `extract` and `combine`."""
    with copy_of(seeds) as folder:
        (folder / "config.json").write_text(json.dumps({"model_type": ["gpt2"]}))
        tuned = {k: v + 0.1 if v.is_floating_point() else v for k, v in tiny().state_dict().items()}
        save_state(tuned, folder / "tuned.safetensors")
        out = folder.parent / "out"
        status, err = cli("extract", folder / "base.safetensors", folder / "tuned.safetensors",
                          "--rank", "1", "-o", out / "e")  # fmt: skip
        assert status == 0, err
        status, err = cli("combine", folder / "kohya.safetensors", "--base",
                          folder / "base.safetensors", "-o", out / "c.safetensors")  # fmt: skip
        assert status == 0, err


@pytest.mark.parametrize("change", ["other keys", "header longer than the file", "a list",
                                    "an entry a string", "a tensor grown"])  # fmt: skip
def test_a_checkpoint_changed_between_its_two_header_reads_is_refused(tmp_path, monkeypatch,
                                                                      change):  # fmt: skip
    """`Checkpoint` reads each header twice (`safe_open` for the dtypes and shapes, then the
    JSON for the offsets): a file replaced in between raised KeyError, AttributeError,
    TypeError or MemoryError (a read of the new length field's 2**62 bytes), or read a
    grown tensor's first bytes as the old one."""
    path = tmp_path / "b.safetensors"
    save_file({"a": torch.arange(3.0), "b": torch.ones(2)}, str(path))
    replacements = {
        "other keys": lambda: save_file({"zzz": torch.ones(3)}, str(path)),
        "header longer than the file": lambda: path.write_bytes(struct.pack("<Q", 2**62) + b"{}"),
        "a list": lambda: path.write_bytes(struct.pack("<Q", 2) + b"[]"),
        "an entry a string": lambda: path.write_bytes(struct.pack("<Q", 10) + b'{"a": "x"}'),
        "a tensor grown": lambda: save_file({"a": torch.ones(300), "b": torch.ones(2)}, str(path)),
    }
    real = checkpoint_module.header

    def header_then_change(file):
        found = real(file)
        replacements[change]()
        return found

    monkeypatch.setattr(checkpoint_module, "header", header_then_change)
    with pytest.raises(errors.FileFormatError, match=f"{path} changed while it was being read"):
        Checkpoint(path)


def test_a_loaded_adapter_holds_its_tensors_not_a_map_of_the_file(seeds):
    """safetensors' `get_tensor` gives tensors mapped from the file: an adapter changed
    with its file after it was loaded (and checked finite), and reading one once the file
    was cut short killed the process (SIGBUS). Tensors are now read into memory."""
    with copy_of(seeds) as folder:
        path = folder / "kohya.safetensors"
        adapter = load_adapter(path)
        before = {n: f.to_dense().clone() for n, f in adapter.items()}
        _, _, data = split(path.read_bytes())
        with path.open("r+b") as handle:  # NaN over every byte of the data, in place
            handle.seek(-len(data), 2)
            handle.write(b"\xff" * len(data))
        for name, form in adapter.items():
            assert torch.equal(form.to_dense(), before[name]), name
