"""`lowrank.io` on files written by hand in each format's key scheme: reading, writing
bit-exactly, kohya names mapped through the base, conversions, and merges against float64
references computed from the raw file tensors."""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from io_helpers import (
    lora_delta64,
    lora_factors,
    rel,
    save_sharded,
    save_state,
    targets,
    tiny,
    tucker_delta64,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank.io.merge
from lowrank import errors, resize
from lowrank.forms import LoHa, LoKr, LoRA, Tucker2, scale_from_alpha
from lowrank.io import (
    Adapter,
    Checkpoint,
    apply_adapter,
    convert_adapter,
    inject_adapter,
    inspect_adapter,
    load_adapter,
    merge_checkpoint,
    model_adapter,
    save_adapter,
)
from lowrank.io.files import Staging, save_small, write_safetensors
from lowrank.io.formats.peft import module_settings
from lowrank.io.report import format_report


def write_peft(folder, layers, config):
    """A PEFT folder from raw `{module: (down, up)}` and a config dict."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (down, up) in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = down
        tensors[f"base_model.model.{name}.lora_B.weight"] = up
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return folder


def peft_layers(model, seed=0, dtype=torch.float32):
    """Random rank-2..4 factors for every target of `model`."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: lora_factors(tuple(module.weight.shape), 2 + i % 3, g, dtype)
        for i, (name, module) in enumerate(targets(model).items())
    }


def kohya_stem(name, prefix="lora_unet"):
    return f"{prefix}_{name.replace('.', '_')}"


def random_adapter(model, seed=0, dtype=torch.float32):
    """An in-memory adapter of LoRA / LoCon layers with assorted scales (plain names)."""
    layers = {}
    for i, (name, (down, up)) in enumerate(peft_layers(model, seed, dtype).items()):
        layers[name] = LoRA(down, up, scale=0.25 + 0.5 * i)
    return Adapter(layers)


@pytest.mark.parametrize("fmt", ["peft", "kohya", "lycoris", "diffusers"])
def test_every_format_reads_back_what_it_wrote_bit_for_bit(tmp_path, fmt):
    model = tiny()
    adapter = random_adapter(model, dtype=torch.bfloat16)
    out = tmp_path / ("adapter" if fmt == "peft" else "adapter.safetensors")
    save_adapter(adapter, out, fmt)
    back = load_adapter(out).select()
    umask = os.umask(0o022)
    os.umask(umask)
    for file in out.rglob("*") if out.is_dir() else [out]:
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it
    assert back.kohya_names is False and sorted(back.layers) == sorted(adapter.layers)
    for name, form in adapter.items():
        again = back[name]
        assert torch.equal(again.down, form.down) and torch.equal(again.up, form.up)
        assert again.down.dtype == torch.bfloat16 and again.scale == form.scale


def test_peft_to_kohya_to_peft_is_bit_exact(tmp_path):
    model = tiny()
    layers = peft_layers(model)
    config = {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["to_q", "to_out", "conv_in", "proj_out", "head"],
        "rank_pattern": {"down_blocks.0.attn.to_out": 3, "conv_in": 4},
        "alpha_pattern": {"head": 1.5, "down_blocks.1.attn.to_q": 7},
    }
    config["rank_pattern"] = {
        n: down.shape[0] for n, (down, _) in layers.items() if down.shape[0] != 2
    }
    original = write_peft(tmp_path / "peft", layers, config)
    convert_adapter(original, tmp_path / "k.safetensors", "kohya")
    # without the module paths the file records, the base maps the kohya names back
    stripped = tmp_path / "stripped.safetensors"
    save_file(load_file(str(tmp_path / "k.safetensors")), str(stripped))
    for source, base in ((tmp_path / "k.safetensors", None), (stripped, model)):
        out = tmp_path / f"back-{source.stem}"
        convert_adapter(source, out, "peft", base=base)
        before = load_file(str(original / "adapter_model.safetensors"))
        after = load_file(str(out / "adapter_model.safetensors"))
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        written = json.loads((out / "adapter_config.json").read_text())
        for name in layers:
            assert module_settings(written, name, "") == module_settings(config, name, "")


def test_rslora_keeps_every_scale_to_the_last_ulp_through_kohya(tmp_path):
    model = tiny()
    layers = peft_layers(model)
    config = {
        "r": 2,
        "lora_alpha": 3,
        "use_rslora": True,
        "rank_pattern": {n: d.shape[0] for n, (d, _) in layers.items()},
    }
    original = write_peft(tmp_path / "peft", layers, config)
    convert_adapter(original, tmp_path / "k.safetensors", "kohya")
    kohya = load_adapter(tmp_path / "k.safetensors").select()
    convert_adapter(tmp_path / "k.safetensors", tmp_path / "back", "peft")
    back = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    for name, (down, _) in layers.items():
        peft_scale = 3 / down.shape[0] ** 0.5  # PEFT's own formula
        assert math.isclose(kohya[name].scale, peft_scale, rel_tol=2.3e-16)
        r, alpha = module_settings(back, name, "")
        assert alpha / r == kohya[name].scale


def kohya_file(path, model, dtype=torch.float16, seed=1):
    """A hand-made kohya file: LoRA layers with and without alpha, a Tucker (lora_mid) conv."""
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for i, (name, module) in enumerate(targets(model).items()):
        shape = tuple(module.weight.shape)
        stem = kohya_stem(name)
        if len(shape) == 4 and shape[2] == 3:
            r = 2
            down = torch.randn(r, shape[1], 1, 1, generator=g).to(dtype)
            mid = torch.randn(r, r, 3, 3, generator=g).to(dtype)
            up = torch.randn(shape[0], r, 1, 1, generator=g).to(dtype)
            tensors[f"{stem}.lora_mid.weight"] = mid
            alpha = 1.0
            delta = lambda d=down, m=mid, u=up, a=alpha, r=r: tucker_delta64(d, m, u, a / r)  # noqa: E731
        else:
            r = 1 + i % 3
            down, up = lora_factors(shape, r, g, dtype)
            alpha = None if i == 0 else float(i)
            scale = 1.0 if alpha is None else alpha / r
            delta = lambda d=down, u=up, s=scale: lora_delta64(d, u, s)  # noqa: E731
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
        expected[name] = delta()
    save_file(tensors, str(path), metadata={"ss_network_dim": "3", "ss_network_module": "x"})
    return path, expected


def test_kohya_names_map_through_the_base_and_scales_follow_alpha(tmp_path):
    model = tiny()
    path, expected = kohya_file(tmp_path / "k.safetensors", model)
    raw = load_adapter(path)
    assert raw.kohya_names and raw.format == "kohya" and raw.metadata["ss_network_dim"] == "3"
    for base in (model, save_state(model.state_dict(), tmp_path / "base.safetensors")):
        adapter = load_adapter(path, base=base)
        assert adapter.components == ("unet",)
        plain = adapter.select()
        assert set(plain.layers) == set(expected)
        for name, delta in expected.items():
            form = plain[name]
            assert isinstance(form, Tucker2 if "conv_in" in name else LoRA)
            assert rel(form.to(torch.float64).to_dense(), delta) < 1e-12


def test_ambiguous_and_unmatched_kohya_names_are_errors(tmp_path):
    down, up = torch.randn(1, 4), torch.randn(4, 1)
    stem = "lora_unet_a_b_c"
    save_file(
        {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up},
        str(tmp_path / "k.safetensors"),
    )
    ambiguous = {"a.b_c": (4, 4), "a_b.c": (4, 4)}
    with pytest.raises(errors.TargetError, match=r"ambiguous.*\['a.b_c', 'a_b.c'\]"):
        load_adapter(tmp_path / "k.safetensors", base=ambiguous)
    with pytest.raises(errors.TargetError, match="lora_unet_a_b_c' matches no module"):
        load_adapter(tmp_path / "k.safetensors", base={"a.b.d": (4, 4)})
    assert load_adapter(tmp_path / "k.safetensors", base={"a.b.c": (4, 4)}).select()["a.b.c"]


def read_all(path):
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize(("dtype", "chunk"), [(None, 1 << 22), ("bfloat16", 7), ("float32", 50)])
def test_merge_matches_the_float64_reference(tmp_path, monkeypatch, sharded, dtype, chunk):
    """Also in blocks of rows smaller than a row (7 values) and of several rows (50)."""
    monkeypatch.setattr(lowrank.io.merge, "CHUNK_ELEMENTS", chunk)
    model = tiny()
    state = {
        k: v.to(torch.float16) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    base = (
        save_sharded(state, tmp_path / "base", 3)
        if sharded
        else save_state(state, tmp_path / "base.safetensors")
    )
    layers = peft_layers(model, seed=3)
    peft = write_peft(
        tmp_path / "peft",
        layers,
        {"r": 2, "lora_alpha": 3, "rank_pattern": {n: d.shape[0] for n, (d, _) in layers.items()}},
    )
    kohya, kohya_deltas = kohya_file(tmp_path / "k.safetensors", model)
    out = tmp_path / ("merged" if sharded else "merged.safetensors")
    report = merge_checkpoint(base, [f"{peft}", kohya], out, weights=[0.5, -1.25], dtype=dtype)
    assert report["merged_tensors"] == len(layers)
    merged = {}
    for file in sorted(out.glob("*.safetensors")) if sharded else [out]:
        merged.update(read_all(file))
    out_dtype = torch.float16 if dtype is None else getattr(torch, dtype)
    for key, value in state.items():
        got = merged[key]
        if not value.is_floating_point():
            assert torch.equal(got, value)
            continue
        assert got.dtype == out_dtype
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and name in layers:
            down, up = layers[name]
            expected = value.double() + 0.5 * lora_delta64(down, up, 3 / down.shape[0])
            expected -= 1.25 * kohya_deltas[name]
            # one rounding to the output dtype, from a float32 accumulation
            assert rel(got, expected) <= torch.finfo(out_dtype).eps / 2 + 1e-6
        else:
            assert torch.equal(got, value.to(out_dtype))
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        source = json.loads((base).read_text())
        assert index["weight_map"] == source["weight_map"]
        size = sum(t.numel() * t.element_size() for t in merged.values())
        assert index["metadata"]["total_size"] == size


def test_a_sharded_checkpoint_by_its_folder_and_odd_dtypes(tmp_path):
    """The folder names the checkpoint as its index does; integer, bool and unsigned
    tensors pass through unchanged."""
    model = tiny()
    state = dict(model.state_dict())
    state.update(
        {"flags": torch.tensor([True, False]), "counts": torch.tensor([1, 2, 3]).to(torch.uint16)}
    )
    index = save_sharded(state, tmp_path / "base", 2)
    adapter = random_adapter(model)
    merge_checkpoint(index, adapter, tmp_path / "by-index")
    merge_checkpoint(index.parent, adapter, tmp_path / "by-folder")
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        a, b = (load_file(str(tmp_path / d / name)) for d in ("by-index", "by-folder"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merged = {}
    for shard in sorted((tmp_path / "by-index").glob("*.safetensors")):
        merged.update(load_file(str(shard)))
    assert torch.equal(merged["flags"], state["flags"]) and merged["counts"].dtype == torch.uint16


def test_merge_holds_one_block_of_rows_at_a_time(tmp_path, monkeypatch):
    """With blocks of 64 values, the 32×16 and 16×32 weights are read 8 rows / 2 rows at a
    time: no whole base tensor is ever in memory, at most two blocks are alive (one being
    written while the next is read), and the blocks reuse two buffers."""
    model = tiny()
    base = save_state(model.state_dict(), tmp_path / "base.safetensors")
    monkeypatch.setattr(lowrank.io.merge, "CHUNK_ELEMENTS", 64)
    alive, peak, rows, buffers, sizes = set(), [0], {}, set(), []
    held = []  # each buffer's storage, so that no later buffer can take a freed one's address
    blocks = Checkpoint.row_blocks

    def counted(self, key, elements, scratch=None):
        for i, block in enumerate(blocks(self, key, elements, scratch)):
            held.append(block.untyped_storage())
            buffers.add(block.untyped_storage().data_ptr())
            sizes.append(block.nbytes)
            alive.add((key, i))
            weakref.finalize(block, alive.discard, (key, i))
            peak[0] = max(peak[0], len(alive))
            rows.setdefault(key, []).append(block.shape[0] if block.ndim else 1)
            yield block

    monkeypatch.setattr(Checkpoint, "row_blocks", counted)
    monkeypatch.setattr(Checkpoint, "get", None)  # nothing is read whole
    out = tmp_path / "out.safetensors"
    merge_checkpoint(base, random_adapter(model), out)
    assert rows.keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        per_block = max(1, 64 // max(1, tensor[0].numel())) if tensor.ndim else 1
        assert max(rows[key]) <= per_block and sum(rows[key]) == (len(tensor) if tensor.ndim else 1)
    assert peak[0] <= 2  # the block being read, and at most the one just written
    # two read buffers taken in turn, each replaced only when a block outgrows it
    turns = sizes[0::2], sizes[1::2]
    assert len(buffers) == sum(n > max(t[:i], default=0) for t in turns for i, n in enumerate(t))
    assert load_file(str(out)).keys() == model.state_dict().keys()


def test_merge_copies_0d_tensors(tmp_path):
    """BatchNorm's `num_batches_tracked` (0-d int64) and a 0-d float pass through a merge,
    cast with `dtype` where floating."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    state = {**model.state_dict(), "temperature": torch.tensor(1.5)}
    base = save_state(state, tmp_path / "base.safetensors")
    form = LoRA(torch.randn(2, 3, 3, 3), torch.randn(8, 2, 1, 1), 0.5)
    out = tmp_path / "out.safetensors"
    merge_checkpoint(base, Adapter({"0": form}), out, dtype="float64")
    merged = load_file(str(out))
    assert torch.equal(merged["1.num_batches_tracked"], state["1.num_batches_tracked"])
    assert merged["temperature"].dtype == torch.float64 and merged["temperature"] == 1.5
    expected = state["0.weight"].double() + lora_delta64(form.down, form.up, 0.5)
    assert rel(merged["0.weight"], expected) < 1e-13  # a float64 output is summed in float64


def test_apply_adapter_merges_into_the_module(tmp_path):
    model = tiny()
    adapter = random_adapter(model, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_adapter(model, adapter, weight=0.75)
    assert sorted(names) == sorted(adapter.layers)
    for name, form in adapter.items():
        expected = before[f"{name}.weight"].double() + 0.75 * lora_delta64(
            form.down, form.up, form.scale
        )
        assert rel(model.get_submodule(name).weight, expected) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_adapter_to_a_channels_last_conv(dtype):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(4, 6, 3)).to(dtype=dtype, memory_format=torch.channels_last)
    weight = model[0].weight.detach().double().clone()
    form = LoRA(torch.randn(2, 4, 3, 3), torch.randn(6, 2, 1, 1), 0.5)
    apply_adapter(model, Adapter({"0": form}), weight=-1.5)
    expected = weight - 1.5 * lora_delta64(form.down, form.up, 0.5)
    assert rel(model[0].weight, expected) < torch.finfo(dtype).eps


def test_inject_adapter_gives_the_merged_outputs_and_trains_only_factors(tmp_path):
    model, merged = tiny(), tiny()
    kohya, _ = kohya_file(tmp_path / "k.safetensors", model, dtype=torch.float32)
    apply_adapter(merged, load_adapter(kohya, base=merged))
    names = inject_adapter(model, kohya)
    assert len(names) == len(targets(merged))
    x, image = torch.randn(2, 8), torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(model(x, image), merged(x, image), rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("down", "mid", "up") for n in trainable)


def test_apply_adapter_refuses_weights_it_could_not_write_for_good():
    """A merge into a computed weight (an injected adapter's W + ΔW, a parametrization, a
    `weight_norm` hook) would be lost, one into a tied weight would change the other module
    too, one into a meta weight has no values: each is refused, and nothing changes."""
    import lowrank.nn as lnn

    form = LoRA(torch.randn(2, 6), torch.randn(4, 2))
    adapted = nn.Sequential(nn.Linear(6, 4))
    lnn.inject(adapted, ["0"], rank=2)
    parametrized = nn.Sequential(nn.Linear(6, 4))
    torch.nn.utils.parametrize.register_parametrization(parametrized[0], "weight", nn.Identity())
    with warnings.catch_warnings():  # the old-style hook, deprecated for the parametrization
        warnings.simplefilter("ignore", FutureWarning)
        normed = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(6, 4)))
    tied = nn.Sequential(nn.Linear(6, 4), nn.Linear(6, 4))
    tied[1].weight = tied[0].weight
    cases = [(adapted, errors.MergeError, "lowrank.nn adapter"),
             (parametrized, errors.MergeError, "parametrization"),
             (normed, errors.MergeError, "computed before each forward"),
             (tied, errors.MergeError, r"'1.weight' \(tied weights\)"),
             (nn.Sequential(nn.Linear(6, 4, device="meta")), errors.DeviceError, "meta")]
    for model, error, match in cases:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(error, match=match):
            apply_adapter(model, Adapter({"0": form}))
        assert before.keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert value.is_meta or torch.equal(before[key], value), key
    shared = nn.Module()
    shared.a = shared.b = nn.Linear(6, 4)  # one module under two names is no tie
    weight = shared.a.weight.detach().double().clone()
    assert apply_adapter(shared, Adapter({"b": form})) == ["b"]
    assert rel(shared.a.weight, weight + lora_delta64(form.down, form.up, 1.0)) < 1e-6


def test_inject_adapter_refuses_a_meta_model_and_a_quantized_weight():
    """Factors injected into a meta-device model would be lost by `to_empty`; an integer
    weight takes no adapter. Both are refused by name and leave the model as it was."""
    form = LoRA(torch.randn(2, 6), torch.randn(4, 2))
    meta = nn.Sequential(nn.Linear(6, 4, device="meta"))
    with pytest.raises(errors.DeviceError, match=r"module '0' is on the meta device"):
        inject_adapter(meta, Adapter({"0": form}))
    assert type(meta[0]) is nn.Linear
    quantized = nn.Sequential(nn.Linear(6, 4))
    del quantized[0].weight
    quantized[0].register_buffer("weight", torch.ones(4, 6, dtype=torch.int8))
    with pytest.raises(errors.DTypeError, match=r"module '0' has a torch.int8 weight"):
        inject_adapter(quantized, Adapter({"0": form}))
    assert type(quantized[0]) is nn.Linear


def test_a_trained_models_adapters_write_files_every_reader_applies(tmp_path):
    """`model_adapter` gives a GPT-2's adapters (`Conv1D` layers and a position table,
    whose weights are stored `(in, out)`) in the layout files use: PEFT, `inject_adapter`
    and `apply_adapter` all give the adapted model's logits back."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import lowrank.nn as lnn

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50,
                                     n_positions=16)  # fmt: skip
    torch.manual_seed(0)
    state = transformers.GPT2LMHeadModel(config).state_dict()

    def fresh():
        model = transformers.GPT2LMHeadModel(config).eval()
        model.load_state_dict(state)
        return model

    model = fresh()
    lnn.inject(model, ["attn.c_proj", "attn.c_attn", "wpe"], rank=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in lnn.adapters(model).values():
            adapter.up.copy_(torch.randn(adapter.up.shape, generator=g) * 0.3)
    ids = torch.randint(0, 50, (2, 7), generator=g)
    with torch.no_grad():
        expected = model(input_ids=ids).logits.double()
        assert rel(fresh()(input_ids=ids).logits, expected) > 1e-2
    adapter = model_adapter(model)
    assert sorted(adapter.target_parameters) == [
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
        "transformer.wpe.weight"]  # fmt: skip
    save_adapter(adapter, tmp_path / "peft", "peft")
    save_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(fresh(), str(tmp_path / "peft")).eval()
        assert rel(loaded(input_ids=ids).logits, expected) < 1e-5
        for apply in (inject_adapter, apply_adapter):
            for source in (adapter, tmp_path / "peft", tmp_path / "k.safetensors"):
                other = fresh()
                apply(other, source)
                assert rel(other(input_ids=ids).logits, expected) < 1e-5, (apply, source)
    with pytest.raises(errors.TargetError, match=r"no lowrank\.nn adapters"):
        model_adapter(fresh())
    pissa = fresh()
    lnn.inject(pissa, ["attn.c_attn"], rank=2, init="pissa")
    with pytest.raises(errors.TargetError, match="init='pissa'"):
        model_adapter(pissa)


def test_model_adapter_writes_what_the_model_computes(tmp_path):
    """A centre tap gets its convolution's kernel; a merged adapter whose factors moved on
    gives what its merge put in the weight; the Adapter is a copy that training leaves
    alone; a model on the meta device has no values to give."""
    peft = pytest.importorskip("peft")
    import lowrank.nn as lnn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lnn.inject(model, {"0": {"r": 2, "form": "centre_tap"}, "1": {"r": 3}})
    with torch.no_grad():
        for adapter in lnn.adapters(model).values():
            adapter.up.normal_()
    model[1].merge()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = model(x).double()
        model[1].up.add_(1.0)  # moves on after the merge: the weight still holds the old ΔW
        assert rel(model(x), expected) < 1e-6
    adapter = model_adapter(model)
    assert adapter["0"].down.shape == (2, 4, 3, 3) and not adapter["0"].down.requires_grad
    up = adapter["1"].up.clone()
    with torch.no_grad():
        model[1].up.mul_(2)
    assert torch.equal(adapter["1"].up, up)
    save_adapter(adapter, tmp_path / "peft", "peft")
    for source in (adapter, tmp_path / "peft"):
        fresh = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1))
        fresh.load_state_dict(state)
        apply_adapter(fresh, source)
        with torch.no_grad():
            assert rel(fresh(x), expected) < 1e-5
    fresh.load_state_dict(state)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "peft"))
    with torch.no_grad():
        assert rel(loaded(x), expected) < 1e-5
    for wrapped in (torch.compile(model), nn.DataParallel(model)):  # names of the model
        assert model_adapter(wrapped).layers.keys() == {"0", "1"}
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    lnn.inject(meta, ["0"], rank=1)
    with pytest.raises(errors.DeviceError, match="meta device"):
        model_adapter(meta)


def test_model_adapter_names_the_module_whose_factor_changed_shape():
    """A factor replaced by one of another shape than its adapter was built with is a
    `ShapeError` naming the module (among several adapters of one class) and the factor."""
    import lowrank.nn as lnn

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    lnn.inject(model, ["0", "1", "2"], rank=2)
    model[1].down = nn.Parameter(torch.randn(1, 4))
    model[1].up = nn.Parameter(torch.randn(4, 1))
    with pytest.raises(errors.ShapeError, match=r"^module '1': .*factor 'down' has shape \(1, 4\)"):
        model_adapter(model)


def test_apply_adapter_refuses_two_layers_on_one_module():
    shared = nn.Module()
    shared.a = shared.b = nn.Linear(6, 4)
    before = shared.a.weight.clone()
    forms = {name: LoRA(torch.randn(1, 6), torch.randn(4, 1)) for name in ("a", "b")}
    with pytest.raises(errors.TargetError, match="'a' and 'b' name one module"):
        apply_adapter(shared, Adapter(forms))
    assert torch.equal(shared.a.weight, before)


def test_inject_refuses_a_loha(tmp_path):
    model = tiny()
    half = LoRA(torch.randn(2, 8), torch.randn(8, 2))
    adapter = Adapter(
        {
            "head": LoRA(torch.randn(1, 6), torch.randn(3, 1)),
            "down_blocks.0.attn.to_q": LoHa(half, half),
        }
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(errors.TargetError, match="LoHa"):
        inject_adapter(model, adapter)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_convert_folds_tucker_exactly_for_peft(tmp_path, dtype):
    """`down' = mid ∘ down` of a bfloat16 or float16 Tucker layer needs more bits than its
    dtype has: its folded factors are float32, within 1e-6 of the float64 ΔW (rounded to
    the file's dtype they were 2e-3 (bfloat16) or 2e-4 (float16) off)."""
    model = tiny()
    kohya, expected = kohya_file(tmp_path / "k.safetensors", model, dtype=dtype)
    report = convert_adapter(kohya, tmp_path / "peft", "peft", base=model)
    assert report["folded"] == ["unet.down_blocks.0.conv_in", "unet.down_blocks.1.conv_in"]
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for name, delta in expected.items():
        down = tensors[f"base_model.model.{name}.lora_A.weight"]
        up = tensors[f"base_model.model.{name}.lora_B.weight"]
        r, alpha = module_settings(config, name, "")
        assert down.shape[0] == r and rel(lora_delta64(down, up, alpha / r), delta) < 1e-6


def lycoris_file(path, model, seed=2):
    """A hand-made LyCORIS file: LoHa (plain and Tucker) and LoKr layers, LyCORIS layout."""
    g = torch.Generator().manual_seed(seed)
    r = 2
    q = dict(targets(model))["down_blocks.0.attn.to_q"].weight.shape  # (8, 8)
    conv = dict(targets(model))["down_blocks.0.conv_in"].weight.shape  # (6, 4, 3, 3)
    t = {}
    stem = kohya_stem("down_blocks.0.attn.to_q")
    for i in (1, 2):
        t[f"{stem}.hada_w{i}_a"] = torch.randn(q[0], r, generator=g)
        t[f"{stem}.hada_w{i}_b"] = torch.randn(r, q[1], generator=g)
    t[f"{stem}.alpha"] = torch.tensor(1.0)
    loha = (
        0.5
        * (t[f"{stem}.hada_w1_a"] @ t[f"{stem}.hada_w1_b"]).double()
        * (t[f"{stem}.hada_w2_a"] @ t[f"{stem}.hada_w2_b"]).double()
    )
    stem = kohya_stem("down_blocks.0.conv_in")
    for i in (1, 2):
        t[f"{stem}.hada_w{i}_a"] = torch.randn(r, conv[0], generator=g)
        t[f"{stem}.hada_w{i}_b"] = torch.randn(r, conv[1], generator=g)
        t[f"{stem}.hada_t{i}"] = torch.randn(r, r, 3, 3, generator=g)
    halves = [
        torch.einsum(
            "ij...,jr,ip->pr...",
            t[f"{stem}.hada_t{i}"].double(),
            t[f"{stem}.hada_w{i}_b"].double(),
            t[f"{stem}.hada_w{i}_a"].double(),
        )
        for i in (1, 2)
    ]
    tucker_loha = halves[0] * halves[1]  # no alpha: scale 1
    stem = kohya_stem("down_blocks.1.conv_in")
    t[f"{stem}.lokr_w1"] = torch.randn(2, 2, generator=g)
    t[f"{stem}.lokr_w2_a"] = torch.randn(3, 1, generator=g)
    t[f"{stem}.lokr_w2_b"] = torch.randn(1, 2 * 9, generator=g)
    t[f"{stem}.alpha"] = torch.tensor(3.0)
    w2 = (t[f"{stem}.lokr_w2_a"] @ t[f"{stem}.lokr_w2_b"]).double().reshape(3, 2, 3, 3)
    lokr = 3.0 * torch.kron(t[f"{stem}.lokr_w1"].double()[..., None, None], w2)
    save_file(t, str(path))
    return path, {
        "down_blocks.0.attn.to_q": loha,
        "down_blocks.0.conv_in": tucker_loha,
        "down_blocks.1.conv_in": lokr,
    }


def test_lycoris_layers_read_merge_and_keep_their_layout(tmp_path):
    model = tiny()
    path, expected = lycoris_file(tmp_path / "l.safetensors", model)
    adapter = load_adapter(path, base=model)
    assert adapter.format == "lycoris"
    plain = adapter.select()
    assert isinstance(plain["down_blocks.0.attn.to_q"], LoHa)
    assert isinstance(plain["down_blocks.1.conv_in"], LoKr)
    assert plain["down_blocks.1.conv_in"].shape == (6, 4, 3, 3)  # unfolded with the base kernel
    for name, delta in expected.items():
        assert rel(plain[name].to_dense(), delta) < 1e-6
    save_adapter(load_adapter(path), tmp_path / "again.safetensors", "lycoris")
    before, after = load_file(str(path)), load_file(str(tmp_path / "again.safetensors"))
    assert before.keys() <= after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lossy_conversion_needs_a_rank_and_reports_the_optimal_error(tmp_path):
    model = tiny()
    path, expected = lycoris_file(tmp_path / "l.safetensors", model)
    with pytest.raises(errors.ConversionError, match="pass a rank"):
        convert_adapter(path, tmp_path / "out", "peft", base=model)
    assert not (tmp_path / "out").exists()
    with pytest.raises(errors.ConversionError, match="give the base"):
        convert_adapter(path, tmp_path / "out", "peft", rank=2)
    with pytest.raises(errors.RankError, match="lycoris files hold its LoHa, LoKr and Full layers"):
        convert_adapter(path, tmp_path / "same.safetensors", "lycoris", base=model, rank=2)
    loha = next(f for f in load_adapter(path, base=model).layers.values() if type(f) is not LoRA)
    with pytest.raises(errors.DTypeError, match="--to kohya --rank R") as refused:
        resize(loha, 2)
    advised = convert_adapter(path, tmp_path / "k.safetensors", "kohya", base=model, rank=2)
    assert advised["approximated"], str(refused.value)  # the advice works
    report = convert_adapter(path, tmp_path / "out", "peft", base=model, rank=2)
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    for row in report["approximated"]:
        name = row["name"].removeprefix("unet.")
        delta = expected[name]
        values = torch.linalg.svdvals(delta.flatten(1))
        optimal = float(values[2:].norm() / values.norm())  # Eckart–Young at rank 2
        assert row["rank"] == 2 and row["relative_error"] == pytest.approx(optimal, abs=1e-6)
        down = tensors[f"base_model.model.{name}.lora_A.weight"]
        up = tensors[f"base_model.model.{name}.lora_B.weight"]
        r, alpha = module_settings(config, name, "")
        assert rel(lora_delta64(down, up, alpha / r), delta) == pytest.approx(optimal, abs=1e-6)


def test_lokr_with_dense_parts_has_scale_one(tmp_path):
    t = {
        "lycoris_fc.lokr_w1": torch.randn(2, 2),
        "lycoris_fc.lokr_w2": torch.randn(3, 4),
        "lycoris_fc.alpha": torch.tensor(8.0),
    }
    save_file(t, str(tmp_path / "l.safetensors"))
    form = load_adapter(tmp_path / "l.safetensors", base={"fc": (6, 8)}).select()["fc"]
    assert form.scale == 1.0 and form.rank is None
    assert torch.equal(
        form.to_dense(), torch.kron(t["lycoris_fc.lokr_w1"], t["lycoris_fc.lokr_w2"])
    )


def test_inspect_reports_every_layer(tmp_path):
    model = tiny()
    path, _ = kohya_file(tmp_path / "k.safetensors", model)
    report = inspect_adapter(path, base=model)
    tensors = load_file(str(path))
    factors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    assert report["format"] == "kohya" and report["components"] == ["unet"]
    assert report["totals"]["params"] == sum(v.numel() for v in factors.values())
    assert report["totals"]["bytes"] == sum(2 * v.numel() for v in factors.values())
    assert report["totals"]["file_bytes"] == path.stat().st_size
    assert report["forms"] == {"LoRA": 5, "Tucker2": 2, "LoCon": 2}
    rows = {row["name"]: row for row in report["layers"]}
    head = rows["unet.head"]
    alpha = float(tensors["lora_unet_head.alpha"])
    rank = tensors["lora_unet_head.lora_down.weight"].shape[0]
    assert (head["alpha"], head["scale"], head["rank"]) == (alpha, alpha / rank, rank)
    assert report["targets"] == sorted(rows)


def test_inspect_shows_a_dense_lokr_without_rank_or_alpha(tmp_path):
    """A LoKr of two dense parts has no rank (LyCORIS ignores its alpha): the table showed
    the word `None` for its rank."""
    layer = LoKr(torch.randn(2, 3), torch.randn(4, 5), scale=1.0)
    path = tmp_path / "lokr.safetensors"
    save_adapter(Adapter({"fc": layer}), path, "lycoris")
    report = inspect_adapter(path)
    (row,) = report["layers"]
    assert row["rank"] is None and row["alpha"] is None
    line = format_report(report).splitlines()[-1].split()
    assert line[1:4] == ["LoKr", "—", "—"]
    assert "None" not in format_report(report)


NAMES = ["blocks.1.q", "blocks_1_q", "blocks.1.qq", "x.blocks.1.q", "head"]


@settings(max_examples=15, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 3), min_size=5, max_size=5),
    alphas=st.lists(st.sampled_from([1.0, 2.0, 0.1, 3.5, 16.0]), min_size=5, max_size=5),
    rslora=st.booleans(),
)
def test_peft_config_gives_every_module_its_rank_and_scale(tmp_path_factory, ranks, alphas, rslora):
    """Names that a plain pattern would also match elsewhere (`.` is a regex wildcard, and
    patterns match suffixes) still get their own rank and alpha."""
    layers = {
        n: LoRA(torch.randn(r, 4), torch.randn(4, r), scale=a / (r**0.5 if rslora else r))
        for n, r, a in zip(NAMES, ranks, alphas, strict=True)
    }
    out = tmp_path_factory.mktemp("peft")
    save_adapter(Adapter(layers, rslora=rslora), out, "peft")
    back = load_adapter(out)
    assert {n: (f.rank, f.scale) for n, f in back.items()} == {
        n: (f.rank, f.scale) for n, f in layers.items()
    }


tokens = st.sampled_from(["blocks", "to_q", "proj_in", "attn1", "0", "1", "12", "ff", "net_2"])
layer_names = st.lists(tokens, min_size=1, max_size=4).map(".".join)


@st.composite
def layers_of(draw, rslora):
    """Random LoRA / LoCon / Tucker2 layers under distinct names (distinct kohya stems too)."""
    names = draw(
        st.lists(layer_names, min_size=1, max_size=4, unique_by=lambda n: n.replace(".", "_"))
    )
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    out = {}
    for name in names:
        r, in_f, out_f = (draw(st.integers(1, 5)) for _ in range(3))
        kernel = draw(st.sampled_from([(), (1, 1), (3, 3), (3,), (1, 3, 3)]))
        alpha = draw(st.sampled_from([1.0, 0.5, 0.1, 2.75, 16.0]))
        scale = scale_from_alpha(alpha, r, rslora=rslora)  # a scale a file's alpha gives
        ones = (1,) * len(kernel)
        if kernel and draw(st.booleans()):
            mid_rank = draw(st.integers(1, 4))
            out[name] = Tucker2(
                torch.randn(r, in_f, *ones, generator=g).to(dtype),
                torch.randn(mid_rank, r, *kernel, generator=g).to(dtype),
                torch.randn(out_f, mid_rank, *ones, generator=g).to(dtype),
                scale,
            )
        else:
            out[name] = LoRA(
                torch.randn(r, in_f, *kernel, generator=g).to(dtype),
                torch.randn(out_f, r, *ones, generator=g).to(dtype),
                scale,
            )
    return out


@settings(max_examples=10, deadline=None)
@given(data=st.data(), fmt=st.sampled_from(["peft", "kohya", "lycoris", "diffusers"]))
def test_random_layers_round_trip_through_every_format(tmp_path_factory, data, fmt):
    """Tensors come back bit for bit and scales exactly; Tucker2 layers fold for PEFT and
    diffusers into LoCon layers of the same ΔW."""
    rslora = data.draw(st.booleans())
    layers = data.draw(layers_of(rslora))
    out = tmp_path_factory.mktemp("rt") / ("adapter" if fmt == "peft" else "a.safetensors")
    save_adapter(Adapter(layers, rslora=rslora), out, fmt)
    back = load_adapter(out).select()
    assert sorted(back.layers) == sorted(layers)
    for name, form in layers.items():
        again = back[name]
        if isinstance(form, Tucker2) and fmt in ("peft", "diffusers"):
            assert isinstance(again, LoRA) and again.scale == form.scale
            expected = form.to(torch.float64).to_dense()
            assert (
                rel(again.to(torch.float64).to_dense(), expected)
                < 10 * torch.finfo(form.up.dtype).eps
            )
            continue
        assert type(again) is type(form)
        if isinstance(form, Tucker2):  # kohya and LyCORIS read lora_mid as (r, r, *k)
            r_out, r_in = form.rank
            assert again.rank == (max(r_out, r_in),) * 2
            again = Tucker2(again.down[:r_in], again.mid[:r_out, :r_in], again.up[:, :r_out],
                            again.scale)  # fmt: skip
            padding = back[name].named_factors()
            assert not (padding["down"][r_in:].any() or padding["up"][:, r_out:].any())
        if rslora and fmt in ("kohya", "lycoris"):
            # alpha / r cannot express every alpha / √r: the nearest, within one ulp
            assert math.isclose(again.scale, form.scale, rel_tol=2.3e-16)
        else:
            assert again.scale == form.scale
        for part, tensor in form.named_factors().items():
            assert torch.equal(again.named_factors()[part], tensor)


def test_the_streaming_writer_lets_a_producer_reuse_the_block_before_last(tmp_path):
    """Blocks are written while the next is drawn: a producer that refills the buffer of
    the block before last as soon as it is asked for the next one loses nothing."""
    rows, width = 16, 1 << 20
    expected = torch.arange(rows * width, dtype=torch.float32).reshape(rows, width)
    buffers = [torch.empty(2, width), torch.empty(2, width)]

    def blocks():
        for i in range(rows // 2):
            block = buffers[i % 2]
            block.copy_(expected[2 * i : 2 * i + 2])
            yield block

    path = tmp_path / "reused.safetensors"
    write_safetensors(path, [("w", torch.float32, (rows, width))], [("w", blocks())], {})
    assert torch.equal(load_file(str(path))["w"], expected)


def test_the_streaming_writer_takes_row_blocks_and_checks_them(tmp_path):
    tensor = torch.randn(7, 3, 2)
    entries = [("a", torch.float32, (7, 3, 2)), ("b", torch.float16, ())]
    scalar = torch.tensor(1.5, dtype=torch.float16)
    path = tmp_path / "blocks.safetensors"
    write_safetensors(path, entries, [("a", iter(tensor.split(3))), ("b", scalar)], {"k": "v"})
    back = load_file(str(path))
    assert torch.equal(back["a"], tensor) and torch.equal(back["b"], scalar)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"k": "v"}
    write_safetensors(path, entries, [("a", tensor), ("b", iter([scalar]))], {})
    assert torch.equal(load_file(str(path))["b"], scalar)  # a 0-d tensor as its one block
    for stream, match in [
        ([("a", iter(tensor[:5].split(3))), ("b", scalar)], "5 of 7 rows"),
        ([("a", iter(tensor.double().split(3)))], "planned torch.float32"),
        ([("a", tensor)], "'b' was planned but never written"),
        ([("b", scalar)], "does not match the planned entry"),
        ([("a", tensor), ("b", iter([scalar, scalar]))], "came as 2 blocks"),
        ([("a", tensor), ("b", iter([]))], "came as 0 blocks"),
        ([("a", tensor), ("b", iter([scalar[None]]))], r"planned torch.float16 \(\)"),
    ]:
        with pytest.raises(errors.ShapeError, match=match):
            write_safetensors(tmp_path / "bad.safetensors", entries, stream, {})


def test_a_1x1_locon_merges_into_the_linear_layer_it_names(tmp_path):
    """kohya factors `(r, in, 1, 1)` / `(out, r, 1, 1)` for a projection that is a 1×1
    convolution in one model and `nn.Linear` in another merge as the linear ΔW
    `alpha / r · up down`; a 3×3 LoCon on a linear layer is still a `ShapeError`."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 16, generator=g, dtype=torch.float64)
    save_file({"proj_in.weight": weight.float()}, str(tmp_path / "base.safetensors"))
    down = torch.randn(4, 16, 1, 1, generator=g)
    up = torch.randn(12, 4, 1, 1, generator=g)
    stem = "lora_unet_proj_in"
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
               f"{stem}.alpha": torch.tensor(2.0)}, str(tmp_path / "a.safetensors"))  # fmt: skip
    merge_checkpoint(tmp_path / "base.safetensors", tmp_path / "a.safetensors",
                     tmp_path / "m.safetensors", dtype="float32")  # fmt: skip
    expected = weight + 0.5 * up.double().flatten(1) @ down.double().flatten(1)
    assert rel(load_file(str(tmp_path / "m.safetensors"))["proj_in.weight"], expected) < 1e-6
    layer = nn.Linear(16, 12, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
    model = nn.Sequential()
    model.add_module("proj_in", layer)
    inject_adapter(model, tmp_path / "a.safetensors")
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    assert rel(model(x), x @ expected.t()) < 1e-6
    save_file({f"{stem}.lora_down.weight": torch.randn(4, 16, 3, 3, generator=g),
               f"{stem}.lora_up.weight": up}, str(tmp_path / "k3.safetensors"))  # fmt: skip
    with pytest.raises(errors.ShapeError, match="proj_in"):
        merge_checkpoint(tmp_path / "base.safetensors", tmp_path / "k3.safetensors",
                         tmp_path / "m3.safetensors")  # fmt: skip
    assert not (tmp_path / "m3.safetensors").exists()


@pytest.mark.parametrize("fmt", ["peft", "kohya", "lycoris"])
def test_factors_that_share_memory_are_written_apart(tmp_path, fmt):
    """Views of one buffer as `down` and `up`, and a LoHa whose halves are one LoRA: every
    tensor is written in full and reads back equal (safetensors refuses shared memory)."""
    buffer = torch.randn(2 * 6 + 4 * 2, generator=torch.Generator().manual_seed(0))
    lora = LoRA(buffer[:12].view(2, 6), buffer[12:].view(4, 2))
    layers = {"blk.a": lora} | ({"blk.b": LoHa(lora, lora, 2.0)} if fmt == "lycoris" else {})
    out = tmp_path / ("p" if fmt == "peft" else "x.safetensors")
    save_adapter(Adapter(layers), out, fmt)
    back = load_adapter(out)
    assert len(back.layers) == len(layers)
    for name, form in layers.items():
        read = back.layers.get(name) or back.layers[f"unet.{name}"]
        assert torch.equal(read.to_dense(), form.to_dense()), name


def test_a_peft_folder_merges_into_the_component_it_is_named_for(tmp_path):
    """A PEFT folder names no model; merged into a UNet checkpoint with component="unet" (as
    a pipeline's merge is called) it gives W + ΔW, the same as without the component."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 16, generator=g, dtype=torch.float64)
    save_file({"proj.weight": weight.float()}, str(tmp_path / "base.safetensors"))
    lora = LoRA(torch.randn(2, 16, generator=g), torch.randn(12, 2, generator=g), 0.5)
    save_adapter(Adapter({"proj": lora}), tmp_path / "peft", "peft")
    expected = weight + 0.5 * lora.up.double() @ lora.down.double()
    for component in (None, "unet"):
        out = tmp_path / f"m-{component}.safetensors"
        merge_checkpoint(tmp_path / "base.safetensors", tmp_path / "peft", out,
                         dtype="float32", component=component)  # fmt: skip
        assert rel(load_file(str(out))["proj.weight"], expected) < 1e-6, component
    with pytest.raises(errors.TargetError, match="no layers for component 'text_encoder'"):
        save_adapter(load_adapter(tmp_path / "peft"), tmp_path / "p2", "peft",
                     component="text_encoder")  # fmt: skip
    assert not (tmp_path / "p2").exists()


@pytest.mark.parametrize("route", ["kohya", "diffusers"])
def test_sdxl_first_text_encoder_keeps_its_kohya_prefix(tmp_path, route):
    """sd-scripts names SDXL's first text encoder `lora_te1` (`lora_te` is SD 1/2's only
    one), and A1111 maps only `lora_te1_text_model…` to SDXL's first encoder. A file with
    `lora_te1` and `lora_unet` layers but none for the second encoder, read against bases
    per component (through diffusers too) and written as kohya, must keep its keys, and so
    must that output read back without a base; an SD 1.x file keeps `lora_te`."""
    g = torch.Generator().manual_seed(0)
    shapes = {"unet": {"mid.to_q": (8, 6)},
              "text_encoder": {"text_model.encoder.layers.0.mlp.fc1": (5, 4)},
              "text_encoder_2": {"text_model.encoder.layers.0.mlp.fc1": (7, 3)}}  # fmt: skip
    for prefixes, components in ((("lora_unet", "lora_te1"), ("unet", "text_encoder",
                                  "text_encoder_2")),
                                 (("lora_unet", "lora_te"), ("unet", "text_encoder"))):  # fmt: skip
        tensors = {}
        for prefix, component in zip(prefixes, components, strict=False):
            ((module, (out_f, in_f)),) = shapes[component].items()
            stem = kohya_stem(module, prefix)
            tensors[f"{stem}.lora_down.weight"] = torch.randn(2, in_f, generator=g)
            tensors[f"{stem}.lora_up.weight"] = torch.randn(out_f, 2, generator=g)
            tensors[f"{stem}.alpha"] = torch.tensor(1.5)
        source = tmp_path / f"{prefixes[1]}.safetensors"
        save_file(tensors, str(source))
        base = {c: shapes[c] for c in components}
        adapter = load_adapter(source, base=base)
        if route == "diffusers":
            save_adapter(adapter, tmp_path / f"{prefixes[1]}-d", "diffusers")
            adapter = load_adapter(tmp_path / f"{prefixes[1]}-d", base=base)
        out = tmp_path / f"{prefixes[1]}-{route}.safetensors"
        save_adapter(adapter, out, "kohya")
        again = tmp_path / f"{prefixes[1]}-{route}-again.safetensors"
        save_adapter(load_adapter(out), again, "kohya")
        for written in (out, again):
            assert sorted(load_file(str(written))) == sorted(tensors), (prefixes, written)
            for key, tensor in load_file(str(written)).items():
                assert torch.equal(tensor, tensors[key]), key


@pytest.mark.parametrize("fmt", ["peft", "kohya", "lycoris", "diffusers"])
def test_the_same_adapter_gives_the_same_bytes_with_every_tensor_aligned(tmp_path, fmt):
    model = tiny()
    adapter = random_adapter(model, dtype=torch.bfloat16)
    first = next(iter(adapter.layers))
    adapter.layers[first] = adapter[first].to(torch.float32)  # two dtypes in one file
    name = "adapter" if fmt == "peft" else "adapter.safetensors"
    files = []
    for i in range(6):  # safetensors' own writer orders the metadata anew for each file
        out = tmp_path / str(i) / name
        save_adapter(adapter, out, fmt)
        files.append(out / "adapter_model.safetensors" if out.is_dir() else out)
    data = [file.read_bytes() for file in files]
    assert all(d == data[0] for d in data[1:])
    (length,) = struct.unpack("<Q", data[0][:8])
    header = json.loads(data[0][8 : 8 + length])
    metadata = header.pop("__metadata__")
    assert list(metadata) == sorted(metadata)
    assert len(metadata) > 1 or fmt != "diffusers"  # its format and its PEFT config
    sizes = {"F32": 4, "BF16": 2}
    assert {entry["dtype"] for entry in header.values()} == set(sizes)
    for entry in header.values():
        assert (8 + length + entry["data_offsets"][0]) % sizes[entry["dtype"]] == 0


def test_a_merge_writes_the_same_bytes_each_time(tmp_path):
    """The base's metadata, which safetensors reads back in a different order from one
    opening to the next, is written in key order."""
    torch.manual_seed(0)
    state = {"0.weight": torch.randn(6, 4), "0.bias": torch.randn(6)}
    base = tmp_path / "base.safetensors"
    save_file(state, str(base), metadata={k: "v" for k in ("format", "note", "zeta", "alpha")})
    form = LoRA(torch.randn(2, 4), torch.randn(6, 2), 0.5)
    data = []
    for i in range(6):
        merge_checkpoint(base, Adapter({"0": form}), tmp_path / f"out{i}.safetensors")
        data.append((tmp_path / f"out{i}.safetensors").read_bytes())
    assert all(d == data[0] for d in data[1:])
    with safe_open(str(tmp_path / "out0.safetensors"), "pt") as f:
        assert sorted(f.metadata()) == ["alpha", "format", "note", "zeta"]


def test_an_adapter_on_the_meta_device_is_a_device_error_and_writes_nothing(tmp_path):
    """A meta tensor has a shape and no values: saving one is refused by name, never a
    torch error from reading it (nor a file of garbage)."""
    form = LoRA(torch.empty(2, 4, device="meta"), torch.empty(6, 2, device="meta"), 0.5)
    for fmt in ("peft", "kohya"):
        out = tmp_path / fmt / ("adapter" if fmt == "peft" else "adapter.safetensors")
        with pytest.raises(errors.DeviceError, match=r"layer '0'.*meta device"):
            save_adapter(Adapter({"0": form}), out, fmt)
    tensors = {"a": torch.zeros(2), "b": torch.empty(3, device="meta")}
    with pytest.raises(errors.DeviceError, match=r"tensor 'b'.*meta device"), Staging() as staging:
        save_small(staging, tensors, tmp_path / "small.safetensors", {})
    assert list(tmp_path.rglob("*")) == []


def test_conjugate_and_negative_views_are_written_as_they_read(tmp_path):
    """`x.conj()` and the imaginary part of one are lazy views (a bit on the tensor, the
    memory of `x`): the file holds their values, as safetensors reads them back."""
    torch.manual_seed(0)
    x = torch.randn(4, dtype=torch.complex64)
    tensors = {"conj": x.conj(), "neg": x.conj().imag}
    assert tensors["conj"].is_conj() and tensors["neg"].is_neg()
    expected = {
        "conj": torch.complex(x.real, -x.imag),
        "neg": -x.imag,
    }
    entries = [(key, value.dtype, tuple(value.shape)) for key, value in tensors.items()]
    write_safetensors(tmp_path / "views.safetensors", entries, tensors.items(), {})
    got = load_file(str(tmp_path / "views.safetensors"))
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
