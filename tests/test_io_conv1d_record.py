"""PEFT folders lowrank writes for a model of transformers `Conv1D`s (GPT-2) record which
layers are `Conv1D`s (the safetensors metadata `lowrank_conv1d`), so that their module
LoRAs, which PEFT runs transposed (`fan_in_fan_out`), are read without a base that tells the
module types: merged into a bare `.safetensors` checkpoint as PEFT's `merge_and_unload`
merges them (float64, the real transformers GPT-2 and PEFT), converted without a base. PEFT
still loads such folders; PEFT's own (no record) stay refused without such a base; a record
that is malformed, names no layer of the file, or contradicts the base is refused, naming
the file and the key."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank import io as lio
from lowrank import nn as lnn
from lowrank.errors import FileFormatError, ShapeError

KEY = "lowrank_conv1d"
_CONV1DS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_WEIGHTS = tuple(sorted(f"transformer.h.0.{name}.weight" for name in _CONV1DS))


def _gpt2() -> nn.Module:
    """A tiny transformers GPT-2 in float64 (its `c_attn` non-square, `(16, 48)`)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40,
                                     n_positions=8)  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def _trained(base: nn.Module, targets, **settings) -> nn.Module:
    """`base` with `lowrank.nn` adapters on `targets`, their `up` (and DoRA magnitudes)
    random, so that every update is nonzero."""
    model = copy.deepcopy(base)
    lnn.inject(model, list(targets), rank=2, alpha=4, **settings)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in lnn.adapters(model).values():
            adapter.up.copy_(torch.randn(adapter.up.shape, generator=generator) * 0.3)
            if getattr(adapter, "magnitude", None) is not None:
                adapter.magnitude.mul_(1 + 0.2 * torch.rand(adapter.magnitude.shape,
                                                            generator=generator))  # fmt: skip
    return model


def _bare(model: nn.Module, path: Path) -> Path:
    """`model`'s weights as one `.safetensors` file with no `config.json` beside it (the
    LM head, tied to the token table, left out)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, path)
    return path


def _peft_merged(base: nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """The weights PEFT's `merge_and_unload` gives for the folder on `base`."""
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    return theirs.merge_and_unload().state_dict()


def _assert_merged(path: Path, expected: dict[str, torch.Tensor], base: nn.Module) -> None:
    """Every tensor of the checkpoint at `path` equals PEFT's merge in float64, and each
    `Conv1D` weight changed."""
    merged = load_file(path)
    assert set(merged) == set(expected) - {"lm_head.weight"}
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-12, atol=1e-12, msg=key)
    own = base.state_dict()
    assert all((merged[key] - own[key]).abs().max() > 1e-3 for key in _WEIGHTS)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as handle:
        return handle.metadata() or {}


def _set_metadata(path: Path, **values: str) -> None:
    """Rewrite the safetensors header of `path` with `values` in its metadata (`None`
    removes a key), keeping the data."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8 : 8 + size])
    metadata = {**head.get("__metadata__", {}), **values}
    head["__metadata__"] = {k: v for k, v in metadata.items() if v is not None}
    text = json.dumps(head).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


@pytest.mark.parametrize("dora", [False, True])
def test_a_written_gpt2_folder_merges_into_a_bare_checkpoint_as_peft_merges_it(tmp_path, dora):
    """A GPT-2 trained with dropout (or DoRA): its `Conv1D` LoRAs go into PEFT as the module
    LoRAs PEFT runs transposed (`fan_in_fan_out`), and the folder records them. Merged into
    the bare checkpoint (which tells no module types), and into the one `save_pretrained`
    writes with its `config.json` (which does), the weights are PEFT's `merge_and_unload`'s."""
    base = _gpt2()
    settings = {"dora": True} if dora else {"dropout": 0.1}
    model = _trained(base, _CONV1DS, **settings)
    folder = tmp_path / "peft"
    lio.save_adapter(lio.model_adapter(model), folder, format="peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and "target_parameters" not in config
    assert json.loads(_metadata(folder / "adapter_model.safetensors")[KEY]) == list(_WEIGHTS)
    expected = _peft_merged(base, folder)
    lio.merge_checkpoint(_bare(base, tmp_path / "bare.safetensors"), folder,
                         tmp_path / "merged.safetensors")  # fmt: skip
    _assert_merged(tmp_path / "merged.safetensors", expected, base)
    base.save_pretrained(tmp_path / "described")
    lio.merge_checkpoint(tmp_path / "described" / "model.safetensors", folder,
                         tmp_path / "described.safetensors")  # fmt: skip
    _assert_merged(tmp_path / "described.safetensors", expected, base)
    with torch.no_grad():  # and the merged model runs as PEFT's adapted one
        merged = copy.deepcopy(base)
        merged.load_state_dict(load_file(tmp_path / "merged.safetensors"), strict=False)
        peft = pytest.importorskip("peft")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(merged(ids).logits, theirs(ids).logits,
                                   rtol=1e-10, atol=1e-10)  # fmt: skip


def test_a_written_gpt2_folder_converts_without_a_base(tmp_path):
    """Without a base, the folder converts: to PEFT as the same folder (its dropout kept,
    the same tensors, config and record), to kohya and LyCORIS as parameter targets that
    merge into the bare checkpoint as PEFT merges the folder."""
    base = _gpt2()
    folder = tmp_path / "peft"
    lio.save_adapter(lio.model_adapter(_trained(base, _CONV1DS, dropout=0.1)), folder,
                     format="peft")  # fmt: skip
    expected = _peft_merged(base, folder)
    bare = _bare(base, tmp_path / "bare.safetensors")
    lio.convert_adapter(folder, tmp_path / "again", "peft")
    for name in ("adapter_config.json",):
        assert (tmp_path / "again" / name).read_text() == (folder / name).read_text()
    weights = [f / "adapter_model.safetensors" for f in (folder, tmp_path / "again")]
    assert _metadata(weights[1]) == _metadata(weights[0])
    again, source = (load_file(w) for w in weights)
    assert set(again) == set(source)
    assert all(torch.equal(again[k], source[k]) for k in source)
    for fmt in ("kohya", "lycoris"):
        out = tmp_path / f"{fmt}.safetensors"
        lio.convert_adapter(folder, out, fmt)
        assert json.loads(_metadata(out)[KEY]) == list(_WEIGHTS)
        lio.merge_checkpoint(bare, out, tmp_path / f"{fmt}_merged.safetensors")
        _assert_merged(tmp_path / f"{fmt}_merged.safetensors", expected, base)


def test_peft_gpt2_folders_without_the_record_stay_refused_without_a_base(tmp_path):
    """PEFT's own GPT-2 folder (`fan_in_fan_out`, no record): only the module types tell
    its `Conv1D`s, so a bare checkpoint and no base are refused, nothing written."""
    peft = pytest.importorskip("peft")
    base = _gpt2()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                             fan_in_fan_out=True, lora_dropout=0.1)  # fmt: skip
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "theirs")
    bare = _bare(base, tmp_path / "bare.safetensors")
    with pytest.raises(FileFormatError, match="fan_in_fan_out"):
        lio.merge_checkpoint(bare, tmp_path / "theirs", tmp_path / "merged.safetensors")
    with pytest.raises(FileFormatError, match="fan_in_fan_out"):
        lio.convert_adapter(tmp_path / "theirs", tmp_path / "out", "kohya")
    assert not (tmp_path / "merged.safetensors").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("record", "message"), [
    ('["transformer.h.0.attn.nope.weight"]', "lists 'transformer.h.0.attn.nope.weight', which "
     "is no weight of a layer"),
    ('["transformer.h.0.attn.c_attn"]', "lists 'transformer.h.0.attn.c_attn', which is no "
     "weight of a layer"),
    ('["transformer.wte.weight"]', "nn.Embedding's LoRA"),
    ('["transformer.h.0.attn.c_attn.weight"', "is not a list of names"),
    ('{"transformer.h.0.attn.c_attn.weight": 1}', "is not a list of names"),
    ("[1]", "is not a list of names"),
])  # fmt: skip
def test_a_bad_record_is_refused_naming_the_file_and_key(tmp_path, record, message):
    """Malformed JSON, no list of names, a name that is no weight of a layer of the file,
    or one of an embedding table's LoRA: `FileFormatError` naming the file and the key,
    and a merge writes nothing."""
    base = _gpt2()
    folder = tmp_path / "peft"
    model = _trained(base, [*_CONV1DS, "wte"], dropout=0.1)
    lio.save_adapter(lio.model_adapter(model), folder, format="peft")
    weights = folder / "adapter_model.safetensors"
    _set_metadata(weights, **{KEY: record})
    with pytest.raises(FileFormatError, match="metadata lowrank_conv1d") as caught:
        lio.load_adapter(folder)
    assert str(weights) in str(caught.value) and message in str(caught.value)
    with pytest.raises(FileFormatError, match="metadata lowrank_conv1d"):
        lio.merge_checkpoint(_bare(base, tmp_path / "bare.safetensors"), folder,
                             tmp_path / "merged.safetensors")  # fmt: skip
    assert not (tmp_path / "merged.safetensors").exists()


def test_a_record_the_base_contradicts_is_refused(tmp_path):
    """A record naming `nn.Linear` layers (added to a PEFT folder of them): against a bare
    checkpoint, a non-square one's ΔW read as stored is the transpose of its weight, and
    against the model, which tells the module types, any is no `Conv1D`: refused, nothing
    written. A GPT-2 record that leaves out the non-square `c_attn` reads it as a linear
    layer's, whose ΔW does not fit the stored weight (`ShapeError`)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 6)).double()
    config = peft.LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "linear")
    weights = tmp_path / "linear" / "adapter_model.safetensors"
    bare = _bare(base, tmp_path / "bare.safetensors")
    _set_metadata(weights, **{KEY: '["0.weight"]'})
    with pytest.raises(FileFormatError, match=r"layer '0' is recorded .* the transpose"):
        lio.merge_checkpoint(bare, tmp_path / "linear", tmp_path / "merged.safetensors")
    _set_metadata(weights, **{KEY: '["1.weight"]'})
    with pytest.raises(FileFormatError, match=r"layer '1' is recorded .* no Conv1D"):
        lio.load_adapter(tmp_path / "linear", base=copy.deepcopy(base))
    with pytest.raises(FileFormatError, match=r"layer '1' is recorded .* no Conv1D"):
        lio.inject_adapter(target := copy.deepcopy(base), tmp_path / "linear")
    assert not lnn.adapters(target) and not (tmp_path / "merged.safetensors").exists()
    gpt2 = _gpt2()
    folder = tmp_path / "gpt2"
    lio.save_adapter(lio.model_adapter(_trained(gpt2, _CONV1DS, dropout=0.1)), folder,
                     format="peft")  # fmt: skip
    left = [w for w in _WEIGHTS if "c_attn" not in w]
    _set_metadata(folder / "adapter_model.safetensors", **{KEY: json.dumps(left)})
    with pytest.raises(ShapeError, match="c_attn"):
        lio.merge_checkpoint(_bare(gpt2, tmp_path / "gpt2.safetensors"), folder,
                             tmp_path / "gpt2_merged.safetensors")  # fmt: skip
    assert not (tmp_path / "gpt2_merged.safetensors").exists()


@pytest.mark.parametrize("settings", [{"dropout": 0.1}, {"dora": True}], ids=["dropout", "dora"])
def test_a_folder_of_linear_and_conv1d_layers_records_only_the_conv1ds(tmp_path, settings):
    """A GPT-2 with an untied `nn.Linear` head beside its `Conv1D`s, trained with dropout
    (or DoRA): the folder's config says `fan_in_fan_out`, which PEFT applies to the
    `Conv1D`s only; the record lists those, so the head is read as a linear layer's LoRA.
    Merged into the bare checkpoint, every weight (the head's included) is PEFT's
    `merge_and_unload`'s."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40,
                                     n_positions=8, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).double().eval()
    folder = tmp_path / "peft"
    model = _trained(base, ["attn.c_attn", "mlp.c_fc", "lm_head"], **settings)
    lio.save_adapter(lio.model_adapter(model), folder, format="peft")
    written = [w for w in _WEIGHTS if "c_attn" in w or "c_fc" in w]
    assert json.loads(_metadata(folder / "adapter_model.safetensors")[KEY]) == written
    expected = _peft_merged(base, folder)
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(state, tmp_path / "bare.safetensors")
    lio.merge_checkpoint(tmp_path / "bare.safetensors", folder, tmp_path / "merged.safetensors")
    merged = load_file(tmp_path / "merged.safetensors")
    assert set(merged) == set(expected)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-12, atol=1e-12, msg=key)
    assert all((merged[k] - state[k]).abs().max() > 1e-3 for k in [*written, "lm_head.weight"])
