"""Bad input to `lowrank.io`: each case raises its typed error naming the file (and key),
leaves every input byte for byte as it was, and leaves no output (nor temporary file)."""

from __future__ import annotations

import errno
import itertools
import json
import os
import pickle
import resource
import shutil
import signal
import stat
import struct
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from io_helpers import (
    deadline,
    digest,
    listing,
    lora_factors,
    save_sharded,
    save_state,
    targets,
    tiny,
)
from safetensors.torch import load_file, save_file

from lowrank import errors
from lowrank.forms import CP, LoHa, LoKr, LoRA, Tucker2, as_lora
from lowrank.io import (
    Adapter,
    Checkpoint,
    CheckpointWriter,
    Staging,
    apply_adapter,
    combine_adapters,
    convert_adapter,
    extract_adapter,
    inject_adapter,
    inspect_adapter,
    load_adapter,
    merge_checkpoint,
    save_adapter,
)


@pytest.fixture
def files(tmp_path):
    """A base checkpoint (one file and sharded) and a kohya adapter with recorded names."""
    model = tiny()
    base = save_state(model.state_dict(), tmp_path / "base.safetensors")
    sharded = save_sharded(model.state_dict(), tmp_path / "sharded", 2)
    g = torch.Generator().manual_seed(0)
    layers = {n: LoRA(*lora_factors(tuple(m.weight.shape), 2, g), scale=0.5)
              for n, m in targets(model).items()}  # fmt: skip
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(Adapter(layers), adapter, "kohya")
    return {"model": model, "base": base, "sharded": sharded, "adapter": adapter, "dir": tmp_path}


class Unchanged:
    """Check after the block that the inputs are intact and no new file appeared."""

    def __init__(self, folder: Path, inputs: list[Path]) -> None:
        self.folder, self.inputs = folder, inputs

    def __enter__(self) -> None:
        self.before = (listing(self.folder), digest(self.inputs))

    def __exit__(self, *exc: object) -> None:
        assert listing(self.folder) == self.before[0], "an output or temporary file was left"
        assert digest(self.inputs) == self.before[1], "an input changed"


def unchanged(files, *extra):
    return Unchanged(
        files["dir"], [files["base"], files["adapter"], files["sharded"].parent, *extra]
    )


def edit_header(path: Path, change) -> None:
    """Rewrite a safetensors file's JSON header through `change(dict)`, keeping the data."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8 : 8 + size])
    change(head)
    text = json.dumps(head).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


class Payload:
    """Unpickling this writes a marker file: proof that a loader ran pickled code."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["adapter.bin", "adapter.pt", "fake.safetensors", "model.ckpt"])
def test_pickles_are_refused_unread(files, name):
    marker = files["dir"] / "pwned"
    payload = Payload()
    payload.marker = marker
    bad = files["dir"] / name
    if name.startswith("fake"):
        torch.save({"x": payload}, bad)  # a zip archive under a safetensors name
    else:
        bad.write_bytes(pickle.dumps({"x": payload}))
    for call in (
        lambda: load_adapter(bad),
        lambda: merge_checkpoint(files["base"], bad, files["dir"] / "o.safetensors"),
        lambda: merge_checkpoint(bad, files["adapter"], files["dir"] / "o.safetensors"),
    ):
        with unchanged(files, bad), pytest.raises(errors.FileFormatError) as info:
            call()
        assert "pickle" in str(info.value) and "save_file" in str(info.value)
        assert str(bad) in str(info.value)
        # the advised command writes a new file, never over the pickle it reads
        written = str(info.value).rsplit("'", 2)[-2]
        assert written.endswith(".safetensors") and written != str(bad)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_header_length_that_looks_like_a_pickle_opcode_is_still_read(tmp_path, protocol):
    """A header of 0x0380 bytes starts the file with b"\\x80\\x03", as pickles start."""
    size = 0x80 + (protocol << 8)
    head = json.dumps({"lycoris_fc.lokr_w1": {"dtype": "F32", "shape": [1, 1],
                                              "data_offsets": [0, 4]},
                       "lycoris_fc.lokr_w2": {"dtype": "F32", "shape": [1, 1],
                                              "data_offsets": [4, 8]}}).encode()  # fmt: skip
    path = tmp_path / "a.safetensors"
    path.write_bytes(struct.pack("<Q", size) + head.ljust(size) + struct.pack("<2f", 2.0, 3.0))
    assert path.read_bytes()[:2] == bytes([0x80, protocol])
    form = load_adapter(path, base={"fc": (1, 1)}).select()["fc"]
    assert float(form.to_dense()) == 6.0


def test_a_peft_folder_with_only_a_bin_is_refused(files):
    folder = files["dir"] / "peft"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({}))
    with unchanged(files), pytest.raises(errors.FileFormatError, match=r"adapter_model\.bin"):
        load_adapter(folder)


def corrupt_cases():
    def truncated(path):
        path.write_bytes(path.read_bytes()[:-7])

    def lying_shape(path):
        def change(head):
            key = next(k for k in head if k != "__metadata__" and head[k]["shape"])
            head[key]["shape"] = [d + 1 for d in head[key]["shape"]]

        edit_header(path, change)

    def lying_offsets(path):
        def change(head):
            key = next(k for k in head if k != "__metadata__")
            begin, end = head[key]["data_offsets"]
            head[key]["data_offsets"] = [begin, end + 10**9]

        edit_header(path, change)

    def huge_header(path):
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", 10**12) + raw[8:])

    def garbage(path):
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")

    def empty(path):
        path.write_bytes(b"")

    return [truncated, lying_shape, lying_offsets, huge_header, garbage, empty]


@pytest.mark.parametrize("damage", corrupt_cases(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("which", ["adapter", "base", "shard"])
def test_corrupt_files_stop_with_the_file_named(files, damage, which):
    target = {
        "adapter": files["adapter"],
        "base": files["base"],
        "shard": files["sharded"].parent / "model-00002-of-00002.safetensors",
    }[which]
    damage(target)
    base = files["sharded"] if which == "shard" else files["base"]
    out = files["dir"] / "merged"
    with unchanged(files), pytest.raises(errors.FileFormatError) as info:
        merge_checkpoint(base, files["adapter"], out)
    assert str(target) in str(info.value)
    if which == "adapter":
        with unchanged(files), pytest.raises(errors.FileFormatError, match=str(target)):
            convert_adapter(target, files["dir"] / "x", "peft")


def test_an_unknown_layout_says_what_it_found(files):
    odd = files["dir"] / "odd.safetensors"
    save_file({"model.layer.kernel": torch.ones(2)}, str(odd))
    with unchanged(files, odd), pytest.raises(errors.FileFormatError) as info:
        inspect_adapter(odd)
    assert "unknown adapter layout" in str(info.value) and "model.layer.kernel" in str(info.value)
    with pytest.raises(errors.FileFormatError, match="does not exist"):
        load_adapter(files["dir"] / "missing.safetensors")


def test_a_layer_with_no_module_in_the_base(files):
    adapter = files["dir"] / "extra.safetensors"
    tensors = load_file(str(files["adapter"]))
    tensors["lora_unet_missing_layer.lora_down.weight"] = torch.ones(1, 8)
    tensors["lora_unet_missing_layer.lora_up.weight"] = torch.ones(8, 1)
    save_file(tensors, str(adapter))
    for base in (files["base"], files["sharded"]):
        with unchanged(files, adapter), pytest.raises(errors.TargetError) as info:
            merge_checkpoint(base, adapter, files["dir"] / "merged")
        assert "lora_unet_missing_layer" in str(info.value) and str(adapter) in str(info.value)


def test_a_shape_mismatch(files):
    adapter = files["dir"] / "wide.safetensors"
    tensors = load_file(str(files["adapter"]))
    tensors["lora_unet_head.lora_down.weight"] = torch.ones(2, 7)
    save_file(tensors, str(adapter), metadata={})
    with unchanged(files, adapter), pytest.raises(errors.ShapeError) as info:
        merge_checkpoint(files["base"], adapter, files["dir"] / "merged.safetensors")
    assert "lora_unet_head" in str(info.value) and "(3, 6)" in str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_factors(files, value):
    adapter = files["dir"] / "nan.safetensors"
    tensors = load_file(str(files["adapter"]))
    tensors["lora_unet_head.lora_up.weight"][1, 0] = value
    save_file(tensors, str(adapter))
    with unchanged(files, adapter), pytest.raises(errors.NonFiniteError) as info:
        merge_checkpoint(files["base"], adapter, files["dir"] / "merged.safetensors")
    assert "lora_unet_head.lora_up.weight" in str(info.value) and str(adapter) in str(info.value)
    form = load_adapter(files["adapter"]).select()["head"]
    bad = Adapter({"head": LoRA(form.down, form.up.clone().fill_(value))})
    with unchanged(files), pytest.raises(errors.NonFiniteError, match="head"):
        merge_checkpoint(files["base"], bad, files["dir"] / "merged.safetensors")
    out = files["dir"] / "combined.safetensors"
    calls = [
        lambda: combine_adapters([bad, files["adapter"]], out),
        lambda: combine_adapters([bad], out, weights=[0.5]),
        lambda: inspect_adapter(bad),
    ]
    for call in calls:  # an adapter in memory is checked as its file would be
        with unchanged(files), pytest.raises(errors.NonFiniteError, match="layer 'head': up"):
            call()


@pytest.mark.parametrize("sharded", [False, True])
def test_a_merged_weight_that_overflows_leaves_no_output(files, sharded):
    """The failure comes mid-stream (after earlier tensors and shards were written)."""
    base = files["sharded"] if sharded else files["base"]
    last = list(targets(files["model"]))[-1]
    shape = tuple(files["model"].get_submodule(last).weight.shape)
    big = Adapter(
        {last: LoRA(torch.full((1, *shape[1:]), 300.0), torch.full((shape[0], 1), 300.0))}
    )
    with unchanged(files), pytest.raises(errors.NonFiniteError, match=r"overflows torch\.float16"):
        merge_checkpoint(base, big, files["dir"] / "merged", dtype="float16")
    with unchanged(files), pytest.raises(errors.NonFiniteError, match=r"overflows torch\.float32"):
        merge_checkpoint(base, [big, big], files["dir"] / "merged", weights=[1e36, 1e36])


def test_a_layer_scale_beyond_float32_leaves_no_output(files):
    """A kohya alpha stored in float64 can make a scale float32 cannot hold: the merge, which
    adds in float32, refuses it by layer, as it refuses such a merge weight."""
    last = list(targets(files["model"]))[-1]
    shape = tuple(files["model"].get_submodule(last).weight.shape)
    stem = "lora_unet_" + last.replace(".", "_")
    tail = [1] * (len(shape) - 2)
    huge = save_state({f"{stem}.lora_down.weight": torch.randn(2, *shape[1:]),
                       f"{stem}.lora_up.weight": torch.randn(shape[0], 2, *tail),
                       f"{stem}.alpha": torch.tensor(1e300, dtype=torch.float64)},
                      files["dir"] / "huge.safetensors")  # fmt: skip
    model = files["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with unchanged(files, huge), pytest.raises(errors.NonFiniteError, match="scale 5e\\+299"):
        merge_checkpoint(files["base"], huge, files["dir"] / "out.safetensors")
    with pytest.raises(errors.NonFiniteError, match=f"{last}.*scale 5e\\+299"):
        apply_adapter(model, huge)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("nan", [False, True])
def test_a_cast_that_overflows_leaves_no_output(files, nan):
    """Also beside a NaN the base already holds, which must not hide the overflow."""
    state = files["model"].state_dict()
    state["down_blocks.1.norm.weight"] = torch.full((8,), 1e6)  # beyond float16, no adapter
    if nan:
        state["down_blocks.1.norm.weight"][0] = float("nan")
    base = save_state(state, files["dir"] / "large.safetensors")
    with unchanged(files, base), pytest.raises(errors.NonFiniteError) as info:
        merge_checkpoint(base, files["adapter"], files["dir"] / "out.safetensors", dtype="float16")
    assert "down_blocks.1.norm.weight" in str(info.value) and "overflows" in str(info.value)


def test_a_merge_into_float8_weights_that_would_clip_leaves_no_output(files):
    """float8_e4m3fn clips values beyond 448 instead of making them Inf: a merge past 464 (where
    values stop rounding to 448) is refused like an overflow; one within range is written, to
    one float8 rounding of the float64 sum."""
    base = save_state(files["model"].state_dict(), files["dir"] / "fp8.safetensors",
                      dtype=torch.float8_e4m3fn)  # fmt: skip
    last = list(targets(files["model"]))[-1]
    shape = tuple(files["model"].get_submodule(last).weight.shape)

    def adapter(value: float) -> Adapter:
        down = torch.full((1, *shape[1:]), value)
        return Adapter({last: LoRA(down, torch.full((shape[0], 1), value))})

    with unchanged(files, base), pytest.raises(
        errors.NonFiniteError, match=r"overflows torch\.float8_e4m3fn"
    ):
        merge_checkpoint(base, adapter(30.0), files["dir"] / "merged.safetensors")  # ΔW = 900
    out = files["dir"] / "merged.safetensors"
    merge_checkpoint(base, adapter(10.0), out)  # ΔW = 100
    merged = load_file(out)[f"{last}.weight"]
    weight = load_file(base)[f"{last}.weight"].double()
    assert merged.dtype == torch.float8_e4m3fn
    expected = (weight + 100.0).float().to(torch.float8_e4m3fn)
    assert torch.equal(merged.view(torch.uint8), expected.view(torch.uint8))


def test_extract_from_float8_checkpoints_needs_a_dtype_for_the_factors(files):
    state = files["model"].state_dict()
    base = save_state(state, files["dir"] / "b8.safetensors", dtype=torch.float8_e4m3fn)
    last = list(targets(files["model"]))[-1]
    tuned_state = dict(state, **{f"{last}.weight": state[f"{last}.weight"] + 0.5})
    tuned = save_state(tuned_state, files["dir"] / "t8.safetensors", dtype=torch.float8_e4m3fn)
    with unchanged(files, base, tuned), pytest.raises(
        errors.DTypeError, match=r"t8\.safetensors: .*float8_e4m3fn.*dtype="
    ):
        extract_adapter(base, tuned, files["dir"] / "x.safetensors", rank=1, format="kohya")
    report = extract_adapter(base, tuned, files["dir"] / "x.safetensors", rank=1,
                             format="kohya", dtype="float32")  # fmt: skip
    assert [row["name"] for row in report["layers"]] == [last]


def test_outputs_never_replace_inputs(files):
    base, adapter, sharded = files["base"], files["adapter"], files["sharded"]
    link = files["dir"] / "link.safetensors"
    os.link(base, link)
    cases = [
        lambda: merge_checkpoint(base, adapter, base),
        lambda: merge_checkpoint(base, adapter, link),
        lambda: merge_checkpoint(base, adapter, adapter),
        lambda: merge_checkpoint(sharded, adapter, sharded.parent),
        lambda: convert_adapter(adapter, adapter, "kohya"),
        lambda: save_adapter(load_adapter(adapter), adapter, "lycoris"),
    ]
    for case in cases:
        inputs = r"is the input|is the folder of the checkpoint .* given as input"
        with unchanged(files, link), pytest.raises(errors.OutputPathError, match=inputs):
            case()


@pytest.mark.parametrize("tool", ["convert", "resize", "combine"])
def test_an_adapter_written_with_a_base_never_replaces_or_enters_it(files, tool):
    """`convert`, `resize` and `combine` read the base given to map names: `-o` naming that
    checkpoint replaced the model with the adapter (exit 0), and an adapter written into a
    base folder left it two `.safetensors` files that no longer open."""
    from lowrank.io import resize_adapter

    base, adapter, sharded = files["base"], files["adapter"], files["sharded"]
    folder = files["dir"] / "model"
    folder.mkdir()
    lone = save_state(files["model"].state_dict(), folder / "model.safetensors")
    write = {
        "convert": lambda out, b: convert_adapter(adapter, out, "kohya", base=b),
        "resize": lambda out, b: resize_adapter(adapter, out, 1, base=b),
        "combine": lambda out, b: combine_adapters([adapter, adapter], out, base=b),
    }[tool]
    for out, given, match in [
        (base, base, "is the input"),
        (sharded, sharded.parent, "is the input"),
        (folder / "lora.safetensors", folder, "folder of a checkpoint"),
        (folder, lone, "folder of a checkpoint"),
        (base, {"unet": base}, "is the input"),
    ]:
        with unchanged(files, lone), pytest.raises(errors.OutputPathError, match=match):
            write(out, given)
    write(files["dir"] / "beside.safetensors", base)  # beside a base file: the caller's choice
    with unchanged(files, lone), pytest.raises(errors.ArgumentError, match="base must be"):
        save_adapter(load_adapter(adapter), files["dir"] / "x.safetensors", "kohya", base=42)
    assert Checkpoint(base).infos and Checkpoint(folder).infos


def test_a_peft_output_onto_its_own_folder(files):
    peft = files["dir"] / "peft"
    convert_adapter(files["adapter"], peft, "peft")
    with unchanged(files, peft), pytest.raises(errors.OutputPathError, match="is the input"):
        convert_adapter(peft, peft, "peft")


def test_a_diffusers_output_ending_in_safetensors_in_any_case_is_one_file(files):
    """The output checks read `x.SAFETENSORS` as one file, as the command line does; the
    writer made it a folder, so a diffusers folder of that name given as input and output
    had its weights replaced."""
    from lowrank.io import resize_adapter

    adapter = load_adapter(files["adapter"])
    folder = files["dir"] / "folder.Safetensors"  # a diffusers folder, as diffusers saves one
    save_adapter(adapter, files["dir"] / "made", "diffusers")
    (files["dir"] / "made").rename(folder)
    for case in (lambda: resize_adapter(folder, folder, 1),
                 lambda: convert_adapter(folder, folder, "diffusers")):  # fmt: skip
        with unchanged(files, folder), pytest.raises(errors.OutputPathError, match="folder"):
            case()
    out = files["dir"] / "lora.SAFETENSORS"
    assert save_adapter(adapter, out, "diffusers") == [out]
    assert out.is_file() and load_adapter(out).layers.keys() == adapter.layers.keys()


def test_inconsistent_peft_configs(files):
    peft = files["dir"] / "peft"
    convert_adapter(files["adapter"], peft, "peft")
    config_path = peft / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for change, match in [
        ({"r": 5, "rank_pattern": {}}, "rank 5"),
        ({"use_dora": True}, "no lora_magnitude_vector, but the config says use_dora"),
        ({"peft_type": "LOHA"}, "not a PEFT LOHA factor"),
        ({"peft_type": "IA3"}, "IA3 adapter; lowrank reads LORA, LOHA and LOKR"),
        ({"rank_pattern": {"(": 2}}, "not a valid regular expression"),
    ]:
        config_path.write_text(json.dumps({**config, **change}))
        with unchanged(files, peft), pytest.raises(errors.FileFormatError, match=match):
            merge_checkpoint(files["base"], peft, files["dir"] / "out.safetensors")
    config_path.write_text("{broken")
    with pytest.raises(errors.FileFormatError, match="not valid JSON"):
        load_adapter(peft)
    config_path.unlink()
    with pytest.raises(errors.FileFormatError, match=r"adapter_config\.json"):
        load_adapter(peft / "adapter_model.safetensors")


def test_lying_shard_indexes(files):
    index = files["sharded"]
    content = json.loads(index.read_text())
    key = next(iter(content["weight_map"]))
    for weight_map, match in [
        ({**content["weight_map"], "ghost.weight": content["weight_map"][key]}, "missing"),
        ({**content["weight_map"], key: "../base.safetensors"}, "file names"),
    ]:
        index.write_text(json.dumps({"weight_map": weight_map}))
        with unchanged(files), pytest.raises(errors.FileFormatError, match=match):
            merge_checkpoint(index, files["adapter"], files["dir"] / "out")


def test_kohya_names_without_a_base_cannot_become_peft(files):
    stripped = files["dir"] / "stripped.safetensors"
    save_file(load_file(str(files["adapter"])), str(stripped))
    with unchanged(files, stripped), pytest.raises(errors.TargetError, match="base"):
        convert_adapter(stripped, files["dir"] / "peft", "peft")


def test_unknown_parts_and_incomplete_layers(files):
    tensors = load_file(str(files["adapter"]))
    for extra, match in [
        ({"lora_unet_fc.dora_scale": torch.ones(3, 1)}, "DoRA magnitude of a layer with no"),
        ({"lora_unet_head.oft_blocks": torch.ones(1)}, "OFT / BOFT .* not supported"),
        ({"lora_unet_head.lora_side.weight": torch.ones(1)}, "not a kohya/LyCORIS layer part"),
        ({"unknown_head.lora_down.weight": torch.ones(1, 6)}, "no known kohya prefix"),
        ({"lora_unet_fc.lora_down.weight": torch.ones(1, 6)}, "lacks lora_unet_fc.lora_up"),
        ({"lora_unet_fc.hada_w1_a": torch.ones(3, 1), "lora_unet_fc.lora_up.weight":
          torch.ones(3, 1)}, "not one known form"),
        ({"lora_unet_head.alpha": torch.ones(2)}, "must be a scalar"),
        ({"lora_unet_head.alpha": torch.tensor(True)}, "must be a real number, got torch.bool"),
    ]:  # fmt: skip
        bad = files["dir"] / "bad.safetensors"
        save_file({**tensors, **extra}, str(bad))
        with unchanged(files, bad), pytest.raises(errors.FileFormatError, match=match):
            merge_checkpoint(files["base"], bad, files["dir"] / "out.safetensors")
        bad.unlink()


def test_apply_adapter_refuses_an_integer_weight(files):
    model = files["model"]
    last = list(targets(model))[-1]
    module = model.get_submodule(last)
    module.weight = torch.nn.Parameter(module.weight.detach().to(torch.int8), requires_grad=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(errors.DTypeError, match=rf"{last}\.weight is torch\.int8"):
        apply_adapter(model, files["adapter"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_cp_layer_is_refused_with_its_exact_lora_as_the_way(files):
    """No format has a CP layout; the refusal pointed to converting with a rank, which
    approximates only LoHa / LoKr layers of a file. It names `as_lora`, whose file holds
    the CP's ΔW (against an einsum of the CP's factors in float64)."""
    g = torch.Generator().manual_seed(3)
    cp = CP(*(torch.randn(n, 3, generator=g) for n in (6, 4)), [torch.randn(3, 3, generator=g),
            torch.randn(3, 3, generator=g)], weights=torch.randn(3, generator=g), scale=0.5)
    for fmt in ("peft", "kohya", "lycoris", "diffusers"):
        out = files["dir"] / ("cp.safetensors" if fmt != "peft" else "cp")
        with unchanged(files), pytest.raises(errors.ConversionError) as refusal:
            save_adapter(Adapter({"conv": cp}), out, fmt)
        assert "lowrank.as_lora" in str(refusal.value) and "approximate" not in str(refusal.value)
        save_adapter(Adapter({"conv": as_lora(cp)}), out, fmt)
        (stored,) = load_adapter(out).layers.values()
        f = [t.double() for t in (cp.out_factor, cp.in_factor, *cp.spatial_factors, cp.weights)]
        expected = 0.5 * torch.einsum("tr,sr,hr,wr,r->tshw", *f)
        assert torch.allclose(stored.to_dense().double(), expected, rtol=1e-5, atol=1e-5)


def test_a_key_the_checkpoint_lacks_is_named_with_the_file(files):
    """`Checkpoint.get`, `row_blocks` and `tensors(keys)` raised a bare KeyError for a key
    the checkpoint does not hold; the error names the key, the checkpoint and keys it has."""
    for path in (files["base"], files["sharded"]):
        checkpoint = Checkpoint(path)
        reads = (lambda c, k: c.get(k), lambda c, k: next(c.row_blocks(k, 8)),
                 lambda c, k: next(c.tensors([k])))  # fmt: skip
        for read, key in itertools.product(reads, ("nope.weight", 3)):
            with pytest.raises(errors.ArgumentError, match=f"no tensor {key!r}") as refusal:
                read(checkpoint, key)
            assert path.name in str(refusal.value)
        key = next(iter(checkpoint.infos))
        assert torch.equal(checkpoint.get(key), load_file(checkpoint.infos[key].file)[key])


def test_apply_and_inject_adapter_take_a_module(files):
    """`model` is the module itself: a checkpoint path or a dict of weight shapes, which are
    bases elsewhere, reached `model.named_modules()` in `inject_adapter` (AttributeError)."""
    shapes = {n: tuple(m.weight.shape) for n, m in targets(files["model"]).items()}
    for call in (apply_adapter, inject_adapter):
        for model in (files["base"], str(files["base"]), shapes):
            with unchanged(files), pytest.raises(errors.ArgumentError, match="model must be"):
                call(model, files["adapter"])


def test_apply_adapter_leaves_the_model_unchanged_on_error(files):
    model = files["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = load_adapter(files["adapter"])
    last = adapter.select()
    layers = dict(last.layers)
    name = sorted(layers)[-1]
    layers[name] = LoRA(layers[name].down, layers[name].up * 1e30)
    with pytest.raises(errors.NonFiniteError):
        apply_adapter(model, Adapter(layers), weight=1e20)
    with pytest.raises(errors.NonFiniteError, match="weight"):
        apply_adapter(model, adapter, weight=float("nan"))
    with pytest.raises(errors.ArgumentError, match="weight"):
        apply_adapter(model, adapter, weight="1")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_merge_arguments(files):
    base, adapter = files["base"], files["adapter"]
    out = files["dir"] / "out.safetensors"
    for call, error, match in [
        (lambda: merge_checkpoint(base, [], out), errors.ArgumentError, "at least one"),
        (lambda: merge_checkpoint(base, adapter, out, weights=[1, 2]), errors.ArgumentError,
         "1 adapters but 2 weights"),
        (lambda: merge_checkpoint(base, adapter, out, dtype="int8"), errors.DTypeError, "dtype"),
        (lambda: merge_checkpoint(base, adapter, out, weights=[True]), errors.ArgumentError,
         r"weights\[0\]"),
        (lambda: merge_checkpoint(base, adapter, out, component="text_encoder"),
         errors.TargetError, "no layers for component"),
        (lambda: convert_adapter(adapter, out, "onnx"), errors.ConversionError, "unknown format"),
        (lambda: convert_adapter(adapter, out, "kohya", rank=0), errors.RankError, "rank"),
    ]:  # fmt: skip
        with unchanged(files), pytest.raises(error, match=match):
            call()


# ---------------------------------------------------------------------------- kohya layers


@pytest.mark.parametrize(
    ("extra", "conflict"),
    [
        ({"lokr_w1_a": torch.ones(1, 1), "lokr_w1_b": torch.ones(1, 2)}, ["lokr_w1", "lokr_w1_a"]),
        ({"lokr_w2_a": torch.ones(3, 1), "lokr_w2_b": torch.ones(1, 3)}, ["lokr_w2", "lokr_w2_a"]),
        ({"lokr_t2": torch.ones(1, 1)}, ["lokr_w2", "lokr_t2"]),
    ],
)
def test_a_lokr_part_both_dense_and_factored_is_refused(files, extra, conflict):
    dense = {"lokr_w1": torch.ones(1, 2), "lokr_w2": torch.ones(3, 3)}
    bad = files["dir"] / "both.safetensors"
    save_file({f"lora_unet_head.{p}": t for p, t in {**dense, **extra}.items()}, str(bad))
    with unchanged(files, bad), pytest.raises(errors.FileFormatError) as info:
        load_adapter(bad)
    assert str(bad) in str(info.value)
    assert all(f"lora_unet_head.{part}" in str(info.value) for part in conflict)


@pytest.mark.parametrize(
    ("parts", "bad"),
    [  # LyCORIS stores these parts as matrices; each is given another number of dimensions
        ({"lokr_w1": torch.ones(1, 2), "lokr_w2_a": torch.ones(1, 3, 1),
          "lokr_w2_b": torch.ones(1, 3)}, "lokr_w2_a"),
        ({"lokr_w1": torch.ones(1, 2), "lokr_w2_a": torch.ones(()),
          "lokr_w2_b": torch.ones(1, 3)}, "lokr_w2_a"),
        ({"lokr_w1": torch.ones(1, 2), "lokr_w2_a": torch.ones(1, 1, 3),
          "lokr_w2_b": torch.ones(1, 3), "lokr_t2": torch.ones(1, 1, 1, 1)}, "lokr_w2_a"),
        ({"lokr_w1": torch.ones(1, 2), "lokr_w2_a": torch.ones(1, 3),
          "lokr_w2_b": torch.ones(1, 1, 3), "lokr_t2": torch.ones(1, 1, 1, 1)}, "lokr_w2_b"),
        ({"hada_w1_a": torch.ones(1, 1, 3), "hada_w1_b": torch.ones(1, 6),
          "hada_w2_a": torch.ones(1, 3), "hada_w2_b": torch.ones(1, 6),
          "hada_t1": torch.ones(1, 1, 1, 1), "hada_t2": torch.ones(1, 1, 1, 1)}, "hada_w1_a"),
        ({"hada_w1_a": torch.ones(1, 3), "hada_w1_b": torch.ones(1, 6),
          "hada_w2_a": torch.ones(1, 3), "hada_w2_b": torch.ones(1, 6, 1),
          "hada_t1": torch.ones(1, 1, 1, 1), "hada_t2": torch.ones(1, 1, 1, 1)}, "hada_w2_b"),
    ],
)  # fmt: skip
def test_lycoris_chain_parts_of_the_wrong_dimensions_are_shape_errors(files, parts, bad):
    """The chain parts were reshaped or transposed as matrices unchecked: a 3-D `lokr_w2_a`
    was a raw RuntimeError from `reshape`, a 0-D one a TypeError, a 3-D Tucker `a` one from
    `t()`."""
    path = files["dir"] / "chain.safetensors"
    save_file({f"lora_unet_head.{p}": t for p, t in parts.items()}, str(path))
    with unchanged(files, path), pytest.raises(errors.ShapeError) as info:
        load_adapter(path)
    assert str(path) in str(info.value) and f"{bad} must have 2 dimensions" in str(info.value)


@pytest.mark.parametrize("fmt", ["kohya", "lycoris"])
def test_a_scale_of_zero_cannot_be_stored_as_a_kohya_alpha(files, fmt):
    """An alpha of 0 reads as alpha = rank (scale 1) in kohya and LyCORIS."""
    zero = Adapter({"head": LoRA(torch.ones(2, 6), torch.ones(3, 2), scale=0.0)})
    with unchanged(files), pytest.raises(errors.ConversionError, match=r"'head'.*scale 0\.0"):
        save_adapter(zero, files["dir"] / "zero.safetensors", fmt)


def test_a_lokr_the_lycoris_layout_cannot_hold_is_refused(files):
    """A form changed past its own checks (a Tucker2 `w1`) would lose its core in a LyCORIS
    file; the writer refuses it rather than write another ΔW."""
    form = LoKr(LoRA(torch.ones(1, 2), torch.ones(1, 1)), torch.ones(3, 3))
    object.__setattr__(form, "w1", Tucker2(torch.ones(1, 2), torch.ones(1, 1), torch.ones(1, 1)))
    with unchanged(files), pytest.raises(errors.ConversionError, match=r"'head'.*w1 is a Tucker2"):
        save_adapter(Adapter({"head": form}), files["dir"] / "x.safetensors", "lycoris")


def test_an_invalid_prefix_is_an_argument_error(files):
    adapter = load_adapter(files["adapter"])
    with unchanged(files), pytest.raises(errors.ArgumentError, match="lora_bogus"):
        save_adapter(adapter, files["dir"] / "x.safetensors", "kohya", prefix="lora_bogus")


# ---------------------------------------------------------------------------- one module twice


def test_renaming_two_layers_to_one_name_is_refused():
    form = LoRA(torch.ones(1, 6), torch.ones(3, 1))
    with pytest.raises(errors.TargetError, match=r"'a' and 'b'.*'head'"):
        Adapter({"a": form, "b": form}).renamed({"a": "head", "b": "head"}, ())


def test_kohya_layers_on_one_module_under_two_prefixes_are_refused(files):
    """`lora_te_head` and `lora_te1_head` both name the text encoder's `head`."""
    factors = {"lora_down.weight": torch.ones(1, 6), "lora_up.weight": torch.ones(3, 1)}
    tensors = {f"{stem}.{p}": t.clone() for stem in ("lora_te_head", "lora_te1_head")
               for p, t in factors.items()}  # fmt: skip
    record = json.dumps(dict.fromkeys(("lora_te_head", "lora_te1_head"), "text_encoder.head"))
    twice = files["dir"] / "twice.safetensors"
    save_file(tensors, str(twice), metadata={"lowrank_module_names": record})
    with unchanged(files, twice):
        # a record that names one module twice is not used: both layers keep their names
        assert sorted(load_adapter(twice).layers) == ["lora_te1_head", "lora_te_head"]
        for call in (
            lambda: merge_checkpoint(files["base"], twice, files["dir"] / "merged.safetensors"),
            lambda: load_adapter(twice, base={"text_encoder": files["base"]}),
        ):
            with pytest.raises(errors.TargetError) as info:
                call()
            assert "'lora_te_head'" in str(info.value) and "'lora_te1_head'" in str(info.value)
            assert "head'" in str(info.value)


# ---------------------------------------------------------------------------- no layers


def test_an_adapter_with_no_layers(files):
    diffusers = files["dir"] / "empty_diffusers"
    diffusers.mkdir()
    save_file({}, str(diffusers / "pytorch_lora_weights.safetensors"))
    peft = files["dir"] / "empty_peft"
    peft.mkdir()
    save_file({}, str(peft / "adapter_model.safetensors"))
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    for folder in (diffusers, peft):
        with unchanged(files, folder), pytest.raises(errors.FileFormatError, match="no layers"):
            load_adapter(folder)
    for fmt in ("peft", "kohya", "lycoris", "diffusers"):
        with unchanged(files), pytest.raises(errors.ConversionError, match="no layers"):
            save_adapter(Adapter({}), files["dir"] / "out", fmt)


# ---------------------------------------------------------------------------- failing writes


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_an_output_that_is_a_fifo_is_never_replaced(files, fmt):
    """A rename onto a device node or FIFO (`-o /dev/null` run as root) would replace it."""
    fifo = files["dir"] / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(errors.OutputPathError, match="not a regular file"):
        convert_adapter(files["adapter"], fifo, fmt)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in files["dir"].iterdir() if ".tmp" in p.name) == []


@contextmanager
def file_size_limit(size: int):
    """Writes past `size` bytes fail (EFBIG) in this process, as on a full disk."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_write_that_fails_is_an_output_path_error(files):
    adapter = load_adapter(files["adapter"])
    out = files["dir"] / "out"
    for call, named in [
        (lambda: merge_checkpoint(files["base"], adapter, out / "m.safetensors"), "m.safetensors"),
        (lambda: merge_checkpoint(files["sharded"], adapter, out), "model-00001-of-00002"),
        (lambda: save_adapter(adapter, out / "k.safetensors", "kohya"), "k.safetensors"),
        (lambda: save_adapter(adapter, out, "peft"), "adapter_model.safetensors"),
    ]:
        with unchanged(files), pytest.raises(errors.OutputPathError) as info, file_size_limit(256):
            call()
        assert str(out / named) in str(info.value) and "too large" in str(info.value)


def test_a_rename_that_fails_is_an_output_path_error(files, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    out = files["dir"] / "out.safetensors"
    with unchanged(files), pytest.raises(errors.OutputPathError) as info:
        save_adapter(load_adapter(files["adapter"]), out, "kohya")
    assert f"cannot write {out}: No space left on device" in str(info.value)


REAL_REPLACE = os.replace


def fail_renames_onto(monkeypatch, name: str) -> None:
    """Make renaming a temporary file onto `name` fail, as a full or read-only disk would."""

    def failing(source, target):
        if Path(target).name == name and Path(source).suffix == ".tmp":
            raise OSError(errno.EIO, "Input/output error")
        REAL_REPLACE(source, target)

    monkeypatch.setattr(os, "replace", failing)


@pytest.mark.parametrize("links", [True, False])
def test_a_commit_that_fails_halfway_puts_every_output_back(files, monkeypatch, links):
    """The last file of a PEFT folder (its config) and of a sharded merge (its index) fail
    to rename: the files renamed before are put back as they were, new ones removed, with
    hard-linked backups or (where the filesystem has no hard links) moved ones."""
    adapter = load_adapter(files["adapter"])
    peft, merged = files["dir"] / "peft", files["dir"] / "merged"
    save_adapter(adapter, peft, "peft")
    merge_checkpoint(files["sharded"], adapter, merged)
    (merged / "model-00002-of-00002.safetensors").unlink()  # new at the next commit
    if not links:

        def no_links(*args, **kwargs):
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
    doubled = Adapter({n: replace(f, scale=2 * f.scale) for n, f in adapter.select().items()})
    for call, last in [
        (lambda: save_adapter(doubled, peft, "peft"), "adapter_config.json"),
        (lambda: merge_checkpoint(files["sharded"], doubled, merged), files["sharded"].name),
    ]:
        fail_renames_onto(monkeypatch, last)
        with unchanged(files, peft, merged), pytest.raises(errors.OutputPathError) as info:
            call()
        assert f"{last}: Input/output error; every output is as it was before" in str(info.value)


def test_outputs_get_their_mode_without_touching_the_umask(files, monkeypatch):
    """The umask is process-wide: reading it by setting it races with other threads."""
    umask = os.umask(0o022)
    os.umask(umask)
    monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("os.umask was called"))
    adapter = load_adapter(files["adapter"])
    outputs = save_adapter(adapter, files["dir"] / "out.safetensors", "kohya")
    outputs += save_adapter(adapter, files["dir"] / "peft", "peft")
    for path in outputs:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it


def test_a_replaced_output_keeps_its_permission_bits(files):
    """A rename puts a new file in place, with the temporary file's mode: a private (0o600)
    output became readable by all (0o644 under the usual umask)."""
    adapter = load_adapter(files["adapter"])
    kohya, merged = files["dir"] / "k.safetensors", files["dir"] / "merged"
    save_adapter(adapter, kohya, "kohya")
    merge_checkpoint(files["sharded"], adapter, merged)
    os.chmod(kohya, 0o600)
    os.chmod(merged / "model.safetensors.index.json", 0o640)
    save_adapter(adapter, kohya, "kohya")
    merge_checkpoint(files["sharded"], adapter, merged)
    assert stat.S_IMODE(kohya.stat().st_mode) == 0o600
    assert stat.S_IMODE((merged / "model.safetensors.index.json").stat().st_mode) == 0o640


def unreachable(folder: Path, suffix: str = ".safetensors") -> list[tuple[Path, str, str]]:
    """Paths in `folder` (names ending in `suffix`) that the file system cannot look up, as
    errors name them, and why."""
    loop = folder / f"loop{suffix}"
    loop.symlink_to(loop)
    nul, long = folder / f"nul\0{suffix}", folder / ("n" * 300 + suffix)
    return [
        (loop, str(loop), "Too many levels of symbolic links"),
        (nul, repr(str(nul)), "embedded null byte"),
        (long, str(long), "File name too long"),
    ]


class GivenPath(os.PathLike):
    """A path as an `os.PathLike` gives it: its text as it stands."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __fspath__(self) -> str:
        return self.text


def test_an_output_ending_in_a_separator_is_a_folder(files):
    """A trailing separator names a folder, and pathlib drops it: the API wrote the file
    `x.safetensors` for `x.safetensors/` (the command line alone refused it). Where the
    output is one file, that is an `OutputPathError` naming the path as given, before
    anything is computed; where it is a folder (PEFT, diffusers, a sharded merge), the
    folder is written."""
    from lowrank.io import resize_adapter

    adapter, folder = load_adapter(files["adapter"]), files["dir"]
    resolved = load_adapter(files["adapter"], base=files["base"])  # module paths: diffusers
    calls = [
        lambda out: save_adapter(adapter, out, "kohya"),
        lambda out: save_adapter(adapter, out, "lycoris"),
        lambda out: save_adapter(resolved, out, "diffusers"),
        lambda out: convert_adapter(files["adapter"], out, "kohya"),
        lambda out: resize_adapter(files["adapter"], out, 1),
        lambda out: combine_adapters([files["adapter"]], out),
        lambda out: extract_adapter(files["base"], files["base"], out, rank=1, format="kohya"),
        lambda out: merge_checkpoint(files["base"], adapter, out),
    ]
    file = folder / "x.safetensors"
    for given in (f"{file}{os.sep}", GivenPath(f"{file}{os.sep}")):
        for call in calls:
            with unchanged(files), pytest.raises(errors.OutputPathError) as info:
                call(given)
            assert str(info.value) == (
                f"output {file}{os.sep} ends in {os.sep!r}, which names a folder, but the "
                f"output there is one file: give {file}"
            )
    peft = save_adapter(adapter, f"{folder / 'peft'}{os.sep}", "peft")
    diffusers = save_adapter(resolved, f"{folder / 'diffusers'}{os.sep}", "diffusers")
    merged = merge_checkpoint(files["sharded"], adapter, f"{folder / 'merged'}{os.sep}")
    assert set(peft) == {folder / "peft" / "adapter_model.safetensors",
                         folder / "peft" / "adapter_config.json"}  # fmt: skip
    assert diffusers == [folder / "diffusers" / "pytorch_lora_weights.safetensors"]
    assert Checkpoint(folder / "merged").infos.keys() == Checkpoint(files["sharded"]).infos.keys()
    assert all(Path(path).parent == folder / "merged" for path in merged["output"])


def test_an_output_path_that_cannot_be_looked_up_is_an_output_path_error(files):
    """pathlib's checks raised these raw (RuntimeError for the loop, ValueError, OSError)."""
    adapter = load_adapter(files["adapter"])
    calls = [
        lambda out: merge_checkpoint(files["base"], adapter, out),
        lambda out: merge_checkpoint(files["sharded"], adapter, out),
        lambda out: save_adapter(adapter, out, "kohya"),
        lambda out: save_adapter(adapter, out, "peft"),
        lambda out: extract_adapter(files["base"], files["base"], out, rank=1),
    ]
    for out, named, why in unreachable(files["dir"]):
        for call in calls:
            with unchanged(files), pytest.raises(errors.OutputPathError) as info:
                call(out)
            assert str(info.value) == f"cannot write {named}: {why}"


def test_an_input_path_that_cannot_be_looked_up_is_a_file_format_error(files):
    """A name too long raised OSError; the loop and the NUL byte were called missing. A
    checkpoint's index is refused so too."""
    calls = [
        load_adapter,
        Checkpoint,
        lambda path: merge_checkpoint(path, files["adapter"], files["dir"] / "m.safetensors"),
    ]
    for path, named, why in unreachable(files["dir"]):
        for call in calls:
            with unchanged(files), pytest.raises(errors.FileFormatError) as info:
                call(path)
            assert str(info.value) == f"cannot read {named}: {why}"
    for path, named, why in unreachable(files["dir"], ".safetensors.index.json"):
        for call in calls[1:]:
            with unchanged(files), pytest.raises(errors.FileFormatError) as info:
                call(path)
            assert str(info.value) == f"cannot read {named}: {why}"


def test_an_output_whose_lookup_is_refused_is_an_output_path_error(files, monkeypatch):
    """`Path.exists` raised PermissionError (EACCES) for a path in a folder without search
    permission; `os.stat` refuses it here, as root may search any folder."""
    locked = files["dir"] / "locked"
    locked.mkdir()
    real_stat = os.stat

    def refusing(path, *args, **kwargs):
        if Path(path).parent == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", refusing)
    out = locked / "k.safetensors"
    with unchanged(files), pytest.raises(errors.OutputPathError) as info:
        save_adapter(load_adapter(files["adapter"]), out, "kohya")
    assert str(info.value) == f"cannot write {out}: Permission denied"


@pytest.mark.skipif(os.geteuid() == 0, reason="root searches any folder")
def test_an_output_in_a_folder_that_cannot_be_searched_is_an_output_path_error(files):
    """`Path.exists` raised PermissionError (EACCES)."""
    locked = files["dir"] / "locked"
    locked.mkdir()
    locked.chmod(0o600)
    try:
        with unchanged(files), pytest.raises(errors.OutputPathError, match="Permission denied"):
            save_adapter(load_adapter(files["adapter"]), locked / "k.safetensors", "kohya")
    finally:
        locked.chmod(0o700)


def test_a_sharded_merge_over_an_earlier_one_removes_the_shards_it_lacks(files, monkeypatch):
    """An earlier merge of a 3-shard base left `model-0000k-of-00003` beside the new
    shards; they go only once the new index is in place (a failed commit keeps them)."""
    adapter = load_adapter(files["adapter"])
    out = files["dir"] / "merged"
    three = save_sharded(files["model"].state_dict(), files["dir"] / "three", 3)
    merge_checkpoint(three, adapter, out)
    fail_renames_onto(monkeypatch, "model.safetensors.index.json")
    with unchanged(files, out), pytest.raises(errors.OutputPathError, match="as it was before"):
        merge_checkpoint(files["sharded"], adapter, out)
    monkeypatch.setattr(os, "replace", REAL_REPLACE)
    merge_checkpoint(files["sharded"], adapter, out)
    assert listing(out) == {"model.safetensors.index.json", "model-00001-of-00002.safetensors",
                            "model-00002-of-00002.safetensors"}  # fmt: skip
    assert Checkpoint(out).infos.keys() == Checkpoint(files["sharded"]).infos.keys()


def test_a_file_to_remove_that_is_an_output_under_another_name_is_kept(tmp_path):
    """`remove_after` removed its files once every output was in place, also one that was
    by then an output under another name, deleting the output: on a case-insensitive file
    system `Model.safetensors` is `model.safetensors`; here a path through a linked folder
    is such a second name. A link to an output, or a hard link of the file an output
    replaced, is no output: each goes."""
    folder, alias = tmp_path / "out", tmp_path / "alias"
    folder.mkdir()
    alias.symlink_to(folder)
    output, replaced = folder / "new.bin", folder / "replaced.bin"
    replaced.write_bytes(b"before")
    os.link(replaced, folder / "before.bin")
    (folder / "link.bin").symlink_to(output)
    with Staging() as staging:
        for final in (output, replaced):
            with staging.writing(final) as temp:
                temp.write_bytes(b"new")
        for name in ("new.bin", "before.bin", "link.bin"):
            staging.remove_after(alias / name)
    assert output.read_bytes() == replaced.read_bytes() == b"new"
    assert listing(folder) == {"new.bin", "replaced.bin"}


@pytest.mark.parametrize("call", ["temp_for", "folder"])
@pytest.mark.parametrize("name", ["a\0b.bin", "x" * 300 + ".bin"], ids=["nul", "too long"])
def test_staging_refuses_a_path_that_cannot_be_looked_up(name, call, tmp_path):
    """`Staging` is public: a path the file system cannot look up is an `OutputPathError`
    naming it there too, not pathlib's `ValueError` or `OSError`, and nothing is left."""
    with pytest.raises(errors.OutputPathError, match="cannot write"), Staging() as staging:
        getattr(staging, call)(tmp_path / name)
    assert listing(tmp_path) == set()


def test_shards_named_as_the_outputs_but_for_case_are_the_outputs(files, monkeypatch):
    """Where the system compares file names case-folded (`os.path.normcase` on Windows,
    simulated here), an earlier index listing `MODEL-00001-OF-00002.SAFETENSORS` lists the
    new `model-00001-of-00002.safetensors`: it was obsolete and removed once the new index
    was in place, deleting a shard just written. An index named as this one but for case
    is this one, not another checkpoint's."""
    adapter = load_adapter(files["adapter"])
    out = files["dir"] / "merged"
    merge_checkpoint(files["sharded"], adapter, out)
    index = out / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    for shard in set(content["weight_map"].values()):
        (out / shard).rename(out / shard.upper())
    content["weight_map"] = {k: shard.upper() for k, shard in content["weight_map"].items()}
    index.write_text(json.dumps(content))
    monkeypatch.setattr(os.path, "normcase", lambda name: os.fspath(name).lower())
    merge_checkpoint(files["sharded"], adapter, out)  # on Linux, beside the upper-case ones
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert listing(out) == {index.name, *shards, *(name.upper() for name in shards)}
    index.rename(out / "MODEL.safetensors.index.json")
    checkpoint = Checkpoint(files["sharded"])
    dtypes = {key: info.dtype for key, info in checkpoint.infos.items()}
    with Staging() as staging:
        assert CheckpointWriter(checkpoint, out, staging, dtypes).obsolete == []


def test_a_sharded_merge_into_a_folder_of_another_checkpoint_is_refused(files):
    """An index of another name beside it left a folder that opens as neither ("holds
    several indexes"); an index of its name that is none, or that lists an input as a shard
    (removed as obsolete), is refused too."""
    adapter = load_adapter(files["adapter"])
    out = files["dir"] / "merged"
    other = save_sharded(files["model"].state_dict(), out, 2)
    other.rename(out / "diffusion_pytorch_model.safetensors.index.json")
    with unchanged(files), pytest.raises(
        errors.OutputPathError, match=r"holds the index diffusion_pytorch_model\.safetensors\.index"
    ):
        merge_checkpoint(files["sharded"], adapter, out)
    (out / "diffusion_pytorch_model.safetensors.index.json").unlink()
    index = out / "model.safetensors.index.json"
    index.write_text("[]")
    with unchanged(files), pytest.raises(errors.OutputPathError, match="has no 'weight_map'"):
        merge_checkpoint(files["sharded"], adapter, out)
    shutil.copy(files["adapter"], out / "lora.safetensors")
    index.write_text(json.dumps({"weight_map": {"x": "lora.safetensors"}}))
    with unchanged(files), pytest.raises(errors.OutputPathError, match=r"lora\.safetensors is the"):
        merge_checkpoint(files["sharded"], out / "lora.safetensors", out)


def test_a_checkpoint_cut_short_after_opening_is_a_file_format_error(tmp_path):
    """Tensors are read at the header's offsets; a file truncated since the header was read
    gives a `FileFormatError` naming it, not a short or garbage tensor."""
    state = {"a.weight": torch.arange(12.0).reshape(3, 4), "b.weight": torch.ones(5, 4)}
    path = save_state(state, tmp_path / "base.safetensors")
    checkpoint = Checkpoint(path)
    assert all(torch.equal(checkpoint.get(k), v) for k, v in state.items())
    assert torch.equal(torch.cat(list(checkpoint.row_blocks("b.weight", 4))), state["b.weight"])
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size - 8)
    last = max(checkpoint.infos, key=lambda k: checkpoint.infos[k].offset)
    with pytest.raises(errors.FileFormatError, match="ends 8 bytes early"):
        checkpoint.get(last)


def test_a_merge_whose_factor_product_overflows_float32_sums_in_float64(tmp_path):
    """LoHa halves of 1e20 each with a scale of 1e-10: their product (1e40) overflows a
    float32 sum, ΔW (1e30) does not; the merge is redone in float64, as `recompose` is."""
    layer = "lycoris_lin"
    big = {f"{layer}.hada_w{i}_{s}": torch.full(shape, 1e10)
           for i in (1, 2) for s, shape in (("a", (4, 1)), ("b", (1, 3)))}  # fmt: skip
    adapter = save_state({**big, f"{layer}.alpha": torch.tensor(1e-10)}, tmp_path / "a.safetensors")
    base = save_state({"lin.weight": torch.zeros(4, 3)}, tmp_path / "base.safetensors")
    merge_checkpoint(base, adapter, tmp_path / "out.safetensors")
    merged = load_file(str(tmp_path / "out.safetensors"))["lin.weight"]
    expected = torch.full((4, 3), 1e40 * float(torch.tensor(1e-10)), dtype=torch.float64)
    assert torch.allclose(merged.double(), expected, rtol=1e-6)


def test_a_tucker_chain_with_unequal_ranks_is_not_written(tmp_path):
    """LyCORIS reads `lokr_t2` (and a LoHa's `hada_t1`/`hada_t2`, which a LoHa form refuses
    to hold) as `(r, r, *k)`."""
    half = Tucker2(torch.randn(3, 6, 1, 1), torch.randn(2, 3, 3, 3), torch.randn(5, 2, 1, 1))
    with pytest.raises(errors.RankError, match=r"first.mid of a LoHa must be \(r, r, \*k\)"):
        LoHa(half, half)
    lokr = LoKr(torch.randn(2, 2), half)
    with pytest.raises(errors.ConversionError, match=r"lokr_t2 would have ranks \(2, 3\)"):
        save_adapter(Adapter({"blk": lokr}), tmp_path / "h.safetensors", "lycoris")
    assert list(tmp_path.iterdir()) == []


def test_an_output_over_an_input_is_refused_before_any_work_or_temporary_file(files, monkeypatch):
    """resize, combine and convert checked the output against their inputs only once the
    work was done and a temporary file written (inside the input's PEFT folder for one)."""
    from lowrank.io import factor_tools, formats, resize_adapter

    def never(*_: object, **__: object) -> None:
        raise AssertionError("work or writing began before the output was checked")

    adapter = files["adapter"]
    peft = files["dir"] / "peft"
    save_adapter(load_adapter(adapter), peft, "peft")
    for module, name in ((factor_tools.decompose, "resize"), (factor_tools, "_combined"),
                         (formats, "write")):  # fmt: skip
        monkeypatch.setattr(module, name, never)
    with unchanged(files, peft):
        with pytest.raises(errors.OutputPathError, match="is the input"):
            resize_adapter(adapter, adapter, rank=1)
        with pytest.raises(errors.OutputPathError, match="is the input"):
            combine_adapters([peft, adapter], peft, base=files["base"])
        with pytest.raises(errors.OutputPathError, match="is the input"):
            convert_adapter(adapter, adapter, "kohya")


def test_an_input_that_is_no_regular_file_is_said_to_be_one(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(errors.FileFormatError, match=r"pipe\.safetensors is not a regular file"):
        load_adapter(fifo)
    folder = tmp_path / "peft"
    folder.mkdir()
    os.mkfifo(folder / "adapter_config.json")
    with pytest.raises(errors.FileFormatError, match=r"adapter_config\.json is not a regular file"):
        load_adapter(folder)
    save_file({"base_model.model.lin.lora_A.weight": torch.ones(1, 2),
               "base_model.model.lin.lora_B.weight": torch.ones(2, 1)},
              folder / "adapter_model.safetensors")  # fmt: skip
    with pytest.raises(errors.FileFormatError, match=r"adapter_config\.json is not a regular file"):
        load_adapter(folder / "adapter_model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    os.mkfifo(sharded / "model.safetensors.index.json")  # reading it would block
    with pytest.raises(errors.FileFormatError, match=r"index\.json is not a regular file"):
        Checkpoint(sharded)




def test_a_config_json_beside_a_base_that_is_no_regular_file_is_not_read(files):
    """The optional `config.json` beside a base checkpoint (the model it describes) was read
    whatever it was: a FIFO there blocked the command until something wrote to it (and a
    device such as `/dev/zero` would be read without end). Such a file now counts as no
    config: the result is the one without it."""
    from lowrank.io import resize_adapter

    folder = files["dir"] / "model"
    folder.mkdir()
    base = shutil.copy(files["base"], folder / "model.safetensors")
    expected = files["dir"] / "expected"
    convert_adapter(files["adapter"], expected, "peft", base=base)
    os.mkfifo(folder / "config.json")
    with deadline(30):
        convert_adapter(files["adapter"], files["dir"] / "peft", "peft", base=base)
        resize_adapter(files["adapter"], files["dir"] / "resized", 1, format="peft", base=base)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        written = (files["dir"] / "peft" / name).read_bytes()
        assert written == (expected / name).read_bytes()


def test_a_config_json_asking_for_a_huge_model_is_not_built(tmp_path):
    """The transformers model a base's `config.json` describes is built (on the meta device)
    to learn its module types; a config asking for a million layers beside a checkpoint of
    a few tensors took about an hour and tens of GiB to build (4 s per 1000 layers). Now it
    is built no further than the checkpoint's tensors allow, and names decide (`model_type`
    gpt2: its 2-D weights are Conv1D's), as they do for the model of the right size."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    weights = {"h.0.attn.c_attn.weight": torch.randn(8, 24),
               "h.0.mlp.c_fc.weight": torch.randn(8, 32)}  # fmt: skip
    for name, change in (("base", 0.0), ("tuned", 0.01)):
        (tmp_path / name).mkdir()
        tensors = {k: v + change * torch.randn_like(v) for k, v in weights.items()}
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    outputs = {}
    for layers in (1, 10**6):
        config = transformers.GPT2Config(n_layer=layers, n_embd=8, n_head=2, vocab_size=10,
                                         n_positions=4, architectures=["GPT2Model"])  # fmt: skip
        config.to_json_file(tmp_path / "base" / "config.json")
        out = tmp_path / f"peft-{layers}"
        with deadline(60):
            extract_adapter(tmp_path / "base" / "model.safetensors",
                            tmp_path / "tuned" / "model.safetensors", out, rank=2)  # fmt: skip
        outputs[layers] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert outputs[10**6] == outputs[1]
    written = json.loads(outputs[1]["adapter_config.json"])
    assert written["target_parameters"] == sorted(weights)


def test_a_config_whose_parsing_grows_with_its_layers_is_not_parsed(tmp_path):
    """A Qwen2 config checks a per-layer list (`layer_types`) entry by entry while it is
    parsed, before any module is built: a million layers took 8 s and 0.56 GB there. A
    count of layers or experts beyond what the checkpoint could hold, or a list that long,
    is not parsed; a config of the right size is, and says what its modules are."""
    from lowrank.io.checkpoint import Checkpoint
    from lowrank.io.module_types import described_model

    transformers = pytest.importorskip("transformers")
    save_file({"embed_tokens.weight": torch.zeros(10, 8)}, str(tmp_path / "model.safetensors"))
    config = transformers.Qwen2Config(
        num_hidden_layers=2, hidden_size=8, intermediate_size=16, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=10, architectures=["Qwen2Model"],
    ).to_dict()  # fmt: skip
    assert config["layer_types"] == ["full_attention"] * 2
    for layers in (10**6, 2):  # the file transformers writes for `layers` (built at 2 layers:
        # transformers takes seconds to build a config of a million)
        types = ["full_attention"] * layers
        written = {**config, "num_hidden_layers": layers, "layer_types": types}
        (tmp_path / "config.json").write_text(json.dumps(written))
        with deadline(5) if layers > 2 else nullcontext():  # 2: imports the model
            built = described_model(Checkpoint(tmp_path / "model.safetensors"))
        assert (built is None) == (layers == 10**6)
    assert type(built.layers[1].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.parametrize(
    ("settings", "parsed"),
    [
        ({"num_hidden_layers": 80}, True),  # Llama-3-70B
        ({"text_config": {"num_hidden_layers": 30, "vocab_size_per_layer_input": 262144}},
         True),  # Gemma 3n / 4: a size that mentions layers, not a count of them
        ({"num_experts": 16384, "num_hidden_layers": 8}, True),  # Doge: stacked experts
        ({"n_routed_experts": 256, "first_k_dense_replace": 3, "moe_layer_freq": 1}, True),
        ({"label2id": {"bricklayer": 5000}}, True),
        ({"custom": [[[[]]]] * 3}, True),
        ({"num_hidden_layers": 10**6}, False),
        ({"n_layer": 10**6}, False),
        ({"decoder_layers": 5000}, False),
        ({"text_config": {"layer_types": ["full_attention"] * 5000}}, False),
    ],
)
def test_which_configs_are_too_large_to_parse(settings, parsed):
    """Against a budget of 4,120 submodules (387 checkpoint tensors): only a count of layers
    (not of experts, which are often stacked in one tensor, nor a size that mentions layers)
    or a list beyond the budget keeps a config from being parsed."""
    from lowrank.io.module_types import _asks_for_more

    assert _asks_for_more(settings, 4120) is not parsed


def test_a_config_nested_deeper_than_pythons_recursion_limit_is_walked():
    """JSON that Python parses may nest deeper than a recursive walk can follow."""
    from lowrank.io.module_types import _asks_for_more

    nested: list = []
    for _ in range(5000):
        nested = [nested]
    assert _asks_for_more({"custom": nested}, 1024) is False


def test_a_models_submodules_are_counted_without_touching_torchs_hook_table():
    """The submodule budget counts this thread's registrations with one hook kept for the
    process: adding and removing a hook per build changed torch's global hook table while
    another thread's build iterated over it (`OrderedDict mutated during iteration`)."""
    from torch.nn.modules import module as torch_module

    from lowrank.io.module_types import _module_budget, _OverBudget

    with _module_budget(10):
        torch.nn.Linear(1, 1)
    hooks = dict(torch_module._global_module_registration_hooks)
    with pytest.raises(_OverBudget), _module_budget(3), torch.device("meta"):
        torch.nn.Sequential(*(torch.nn.Linear(1, 1) for _ in range(5)))
    with _module_budget(10):
        torch.nn.Sequential(torch.nn.Linear(1, 1))
        assert dict(torch_module._global_module_registration_hooks) == hooks
    torch.nn.Sequential(*(torch.nn.Linear(1, 1) for _ in range(20)))  # outside: no budget


def test_an_output_folder_of_another_format_may_sit_in_an_input_folder(files):
    """A diffusers file written into a PEFT input folder touches none of its files (the check
    of every format's names before the work refused it)."""
    peft = files["dir"] / "peft"
    save_adapter(load_adapter(files["adapter"]), peft, "peft")
    before = digest([peft / "adapter_model.safetensors", peft / "adapter_config.json"])
    report = convert_adapter(peft, peft, "diffusers")
    assert report["output"] == [str(peft / "pytorch_lora_weights.safetensors")]
    assert digest([peft / "adapter_model.safetensors", peft / "adapter_config.json"]) == before
    expected, written = load_adapter(peft).layers, load_adapter(peft / report["output"][0])
    for name, form in expected.items():
        assert torch.equal(written[f"unet.{name}"].to_dense(), form.to_dense())


def test_no_writer_makes_an_input_diffusers_folder_read_as_peft(files):
    """A folder holding `adapter_config.json` reads as a PEFT adapter (to lowrank and PEFT),
    while diffusers still loads its `pytorch_lora_weights.safetensors`: PEFT output into a
    diffusers folder given as input (as such or as its file) made it read as another
    adapter. Every writer refuses it by name before writing; other files may go there."""
    from lowrank.io import combine_adapters, resize_adapter

    folder = files["dir"] / "d"
    save_adapter(load_adapter(files["adapter"]), folder, "diffusers")
    peft = files["dir"] / "p"
    save_adapter(load_adapter(files["adapter"]), peft, "peft")
    weights = folder / "pytorch_lora_weights.safetensors"
    config = folder / "adapter_config.json"
    cases = [
        (folder, lambda: convert_adapter(folder, folder, "peft")),
        (weights, lambda: convert_adapter(weights, folder, "peft")),
        (folder, lambda: resize_adapter(folder, folder, 1, format="peft")),
        (folder, lambda: combine_adapters([peft, folder], folder, format="peft")),
        (folder, lambda: merge_checkpoint(files["base"], folder, config)),
    ]
    for given, case in cases:
        with unchanged(files, folder, peft), pytest.raises(
            errors.OutputPathError, match=f"output {config} would change what the input {given} "
        ):
            case()
    assert sorted(p.name for p in folder.iterdir()) == [weights.name]
    convert_adapter(folder, folder / "k.safetensors", "kohya")  # read as it is, beside it
    assert load_adapter(folder).format == "diffusers"


def test_a_failed_output_folder_chain_leaves_no_folder(files):
    """`new/<300 characters>/x`: `new` was made, the next folder failed, `new` was left."""
    out = files["dir"] / "new" / ("a" * 300) / "x.safetensors"
    with unchanged(files), pytest.raises(errors.OutputPathError, match="cannot create folder"):
        save_adapter(load_adapter(files["adapter"]), out, "kohya")


@pytest.mark.parametrize("value", [[1], "classifier", {"classifier": 1}])
def test_a_peft_config_whose_modules_to_save_is_no_list_of_names_is_refused(tmp_path, value):
    """`modules_to_save` is a list of module names in every config PEFT writes; anything else
    (a number in the list crashed the reader with a bare TypeError) is a FileFormatError
    naming the field."""
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({"base_model.model.l.lora_A.weight": torch.ones(2, 4),
               "base_model.model.l.lora_B.weight": torch.ones(4, 2),
               "base_model.model.c.modules_to_save.default.weight": torch.ones(3, 4)},
              str(folder / "adapter_model.safetensors"))  # fmt: skip
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": 2, "lora_alpha": 2, "modules_to_save": value})
    )
    with pytest.raises(errors.FileFormatError, match="modules_to_save must be a list"):
        load_adapter(folder)
