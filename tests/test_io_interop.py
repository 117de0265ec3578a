"""`lowrank.io` against the real packages (the `interop` extra): files written by peft,
LyCORIS and diffusers merge to the weights those packages compute, and files written by
`lowrank` load in them and give the same outputs. Models are built from small configs."""

from __future__ import annotations

import copy
import itertools
import json
import re

import pytest
import torch
from io_helpers import ORIGINAL_FORMS, net, outputs, randomize, rel, save_state, stand_in_pipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank import errors
from lowrank import nn as lnn
from lowrank.forms import LoHa, LoKr, LoRA, Tucker2
from lowrank.io import (
    Adapter,
    apply_adapter,
    combine_adapters,
    convert_adapter,
    inject_adapter,
    inspect_adapter,
    load_adapter,
    merge_checkpoint,
    model_adapter,
    resize_adapter,
    save_adapter,
)

pytestmark = pytest.mark.long  # among the suite's longest modules: scheduled first

# ---------------------------------------------------------------------------- PEFT


def test_a_peft_adapter_merges_to_merge_and_unload(tmp_path):
    peft = pytest.importorskip("peft")
    model = net()
    base = save_state(model.state_dict(), tmp_path / "base.safetensors")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["lin", "conv", "proj"],
        rank_pattern={"conv": 2},
        alpha_pattern={"proj": 3},
        use_rslora=True,
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "peft")
    with_adapter = outputs(peft_model)
    expected = peft_model.merge_and_unload().state_dict()
    assert rel(outputs(net()), with_adapter) > 1e-2  # the adapter changes the outputs
    merge_checkpoint(base, tmp_path / "peft", tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert rel(merged[key], value) < 1e-6, key
    ours = net()
    apply_adapter(ours, tmp_path / "peft")
    assert rel(outputs(ours), with_adapter) < 1e-6


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.lin = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.BatchNorm1d(8)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"target_modules": ["grouped"]}, "grouped convolution"),
        ({"target_modules": ["attention"]}, "MultiheadAttention"),
        ({"target_modules": ["lin"], "modules_to_save": ["norm"]}, "running statistics"),
    ],
    ids=["grouped", "attention", "batch_norm"],
)
def test_peft_features_lowrank_cannot_hold_are_refused_by_name(tmp_path, settings, named):
    """Files the real PEFT writes for what an adapter of factors cannot hold: each refusal
    says which feature it is, not only that a key is not a factor."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(Embedder(), peft.LoraConfig(r=2, **settings))
    model.save_pretrained(tmp_path / "peft")
    with pytest.raises(errors.FileFormatError, match=named):
        load_adapter(tmp_path / "peft")


def test_a_module_merely_named_base_layer_is_read(tmp_path):
    """Only `X.base_layer.…` beside an adapted `X` is PEFT's wrapper inside a wrapper (an
    nn.MultiheadAttention); a module of the model called `base_layer` is an ordinary layer."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("base_layer", nn.Linear(8, 8))
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["base_layer"], init_lora_weights=False)
    )
    wrapped.save_pretrained(tmp_path / "peft")
    assert list(load_adapter(tmp_path / "peft").layers) == ["base_layer"]


class Stack(nn.Module):
    """Three linear layers PEFT can address by index (`layers.N`)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"init_lora_weights": "pissa_niter_2"}, "init_lora_weights='pissa_niter_2'"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
        ({"init_lora_weights": "OLoRA"}, "init_lora_weights='OLoRA'"),  # PEFT lowercases it
        ({"layer_replication": [[0, 2], [1, 3]]}, "layer_replication"),
        ({"alora_invocation_tokens": [5, 7]}, "aLoRA"),
        ({"target_parameters": ["layers.0.bias"]}, "other than a module's weight"),
    ],
    ids=["pissa", "pissa_niter", "olora", "olora_case", "layer_replication", "alora", "bias"],
)
def test_peft_adapters_for_another_base_are_refused_by_name(tmp_path, settings, named):
    """PiSSA and OLoRA adapters apply to the residual W − B₀A₀ that PEFT makes again when
    it loads them, `layer_replication` ones to layers PEFT duplicates, aLoRA ones only after
    an invocation token: merged into the base checkpoint, each would be wrong, silently."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    in_file = {k: v for k, v in settings.items() if k in ("layer_replication", "target_parameters")}
    settings = {k: v for k, v in settings.items() if k not in in_file}  # PEFT would not build it
    model = peft.get_peft_model(
        Stack(), peft.LoraConfig(r=2, target_modules=["0", "1", "2"], **settings)
    )
    model.save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **in_file}))
    with pytest.raises(errors.FileFormatError, match=named):
        load_adapter(tmp_path / "peft")


@pytest.mark.parametrize(
    ("variant", "named", "key"),
    [
        ("kasa_config", "KaSA", "lora_diag"),
        ("velora_config", "VeLoRA", "lora_velora_embed"),
        ("monteclora_config", "MonteCLoRA", "lora_monteclora_sampler"),
    ],
    ids=["kasa", "velora", "monteclora"],
)
def test_peft_lora_variants_are_refused_by_name(tmp_path, variant, named, key):
    """PEFT's LoRA variants save tensors beside lora_A / lora_B (KaSA's singular values,
    applied over a base PEFT truncates, so its adapted model is no W + s·BA; VeLoRA's and
    MonteCLoRA's training state): a folder the real PEFT writes for one is
    refused naming the variant, by its config field, or by its key where the config has
    lost the field, and a merge writes nothing."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import config as lora_config

    options = {"kasa_config": lora_config.KasaConfig, "velora_config": lora_config.VeloraConfig,
               "monteclora_config": lora_config.MontecloraConfig}  # fmt: skip
    setting = options[variant]() if variant in options else True
    torch.manual_seed(0)
    base = Stack()
    save_state(base.state_dict(), tmp_path / "base.safetensors")
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0"], **{variant: setting})
    )
    randomize(model.base_model.model.layers[0].lora_B, 1)
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert any(key in k for k in saved)  # PEFT's own file holds the variant's tensors
    if variant == "kasa_config":  # PEFT's adapted layer is not the original W + s·BA
        layer = model.base_model.model.layers[0]
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        plain = nn.Linear(16, 16)
        with torch.no_grad():
            plain.weight.copy_(base.layers[0].weight + layer.scaling["default"] * up @ down)
            plain.bias.copy_(base.layers[0].bias)
            x = torch.randn(4, 16)
            assert rel(layer(x), plain(x)) > 1e-3
    out = tmp_path / "merged.safetensors"
    with pytest.raises(errors.FileFormatError, match=f"{named} \\({variant}"):
        merge_checkpoint(tmp_path / "base.safetensors", tmp_path / "peft", out)
    assert not out.exists()
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, variant: None}))
    with pytest.raises(errors.FileFormatError, match=f"{named}'s .*\\({key}"):
        load_adapter(tmp_path / "peft")


@pytest.mark.parametrize("saved_by", ["peft", "diffusers"])
def test_a_bias_on_lora_b_is_refused_as_lora_bias(tmp_path, pipeline_parts, saved_by):
    """PEFT's `lora_bias=True` saves `lora_B.bias` beside the factors. Where its keys are read
    first (a diffusers file, whose metadata is checked after them; a PEFT folder whose config
    lost the field), the refusal names lora_bias, not trained biases of the base layers
    (bias='all' or 'lora_only'), which the file does not hold."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, target_modules=["0" if saved_by == "peft" else "to_q"],
                           lora_bias=True)  # fmt: skip
    if saved_by == "peft":
        torch.manual_seed(0)
        peft.get_peft_model(Stack(), lora).save_pretrained(tmp_path / "lora")
        weights = tmp_path / "lora" / "adapter_model.safetensors"
        config_path = tmp_path / "lora" / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "lora_bias": False}))
    else:
        unet = pipeline_parts[0]
        unet.add_adapter(lora)
        unet.save_lora_adapter(str(tmp_path / "lora"))
        weights = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    assert any(key.endswith(".lora_B.bias") for key in load_file(str(weights)))
    with pytest.raises(errors.FileFormatError, match=r"lora_B\.bias' is a bias on lora_B \(lora_"):
        load_adapter(tmp_path / "lora")


@pytest.mark.parametrize(
    ("setting", "named"),
    [("lora_bias", r"a bias on lora_B \(lora_bias")],
    ids=["lora_bias"],
)  # fmt: skip
def test_a_variants_diffusers_file_of_any_name_is_refused_by_name(
    tmp_path, pipeline_parts, setting, named
):
    """A diffusers file is often given by its own name (`weight_name=`, not
    pytorch_lora_weights.safetensors, which its folder is read by): one of lora_bias, whose
    tensors lie beside the factors, is refused naming the feature, as its folder is, not as
    a file of no known layout (DoRA's are read: `test_io_dora.py`)."""
    peft = pytest.importorskip("peft")
    unet = pipeline_parts[0]
    unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q"], **{setting: True}))
    unet.save_lora_adapter(str(tmp_path / "lora"), weight_name="mine.safetensors")
    for given in (tmp_path / "lora" / "mine.safetensors", tmp_path / "lora"):
        if given.is_dir():  # the same file under the name its folder is read by
            (given / "mine.safetensors").rename(given / "pytorch_lora_weights.safetensors")
        with pytest.raises(errors.FileFormatError, match=named):
            load_adapter(given)


class Deep(nn.Module):
    """`model.layers.N.{q,v}` and a `head`: names PEFT's `layers_to_transform` can index
    with or without `layers_pattern`, and suffixes (`q`) that name several modules."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.Module() for _ in range(2))
        for block in self.model.layers:
            block.q, block.v = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)


DEEP_MODULES = ["model.layers.0.q", "model.layers.0.v", "model.layers.1.q", "model.layers.1.v",
                "head"]  # fmt: skip


@pytest.mark.parametrize(
    ("selection", "field"),
    [
        ({"target_modules": ["q", "head"]}, "target_modules"),
        ({"target_modules": r"model\.layers\.\d\.q|head"}, "target_modules"),
        ({"exclude_modules": ["v"]}, "exclude_modules"),
        ({"exclude_modules": r".*\.1\..*"}, "exclude_modules"),
        ({"layers_to_transform": [0], "layers_pattern": "layers"}, "layers_to_transform"),
        ({"layers_to_transform": 1}, "layers_to_transform"),  # the index after `model.layers`
        ({"exclude_modules": ["k", "layers"]}, None),  # names match whole components only
        ({"target_modules": "(model.layers.[01].[qv])|head"}, None),
        ({"layers_to_transform": [0, 1], "layers_pattern": ["blocks", "layers"]}, None),
        ({"target_modules": DEEP_MODULES, "layers_to_transform": [0]}, None),  # whole names
    ],
    ids=["targets", "targets_regex", "excluded", "excluded_regex", "layers", "layers_default",
         "exclude_nothing", "regex_all", "layers_all", "whole_names"],
)
def test_peft_modules_its_config_does_not_select_are_refused(tmp_path, selection, field):
    """PEFT gives a module a LoRA layer only where `target_modules`, `exclude_modules` and
    `layers_to_transform` select it, and skips the saved keys of any other: such a folder
    is refused by name, before anything is written or changed, and one whose config selects
    every saved module merges as `merge_and_unload` does."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Deep()
    checkpoint = save_state(base.state_dict(), tmp_path / "base.safetensors")
    config = peft.LoraConfig(r=2, target_modules=["q", "v", "head"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **selection}))
    with torch.no_grad():
        reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
        expected = reference.merge_and_unload().state_dict()
    weights = {m: (expected[f"{m}.weight"], base.state_dict()[f"{m}.weight"]) for m in DEEP_MODULES}
    skipped = [m for m, (merged, before) in weights.items() if torch.equal(merged, before)]
    assert bool(skipped) == (field is not None)  # the case is what PEFT does
    out = tmp_path / "merged.safetensors"
    if field is None:
        merge_checkpoint(checkpoint, tmp_path / "peft", out)
        merged = load_file(str(out))
        for key, value in expected.items():
            assert rel(merged[key], value) < 1e-6, key
        return
    named = rf"module '({'|'.join(map(re.escape, skipped))})' has LoRA factors.*'s {field}"
    with pytest.raises(errors.FileFormatError, match=named):
        merge_checkpoint(checkpoint, tmp_path / "peft", out)
    assert not out.exists()
    model = copy.deepcopy(base)
    with pytest.raises(errors.FileFormatError, match=named):
        apply_adapter(model, tmp_path / "peft")
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_peft_all_linear_leaves_out_the_lm_head_as_peft_does(tmp_path):
    """PEFT's `"all-linear"` targets every linear layer of a transformers model but its
    output layer (`get_output_embeddings()`, `lm_head`): a folder whose config says so and
    that holds `lm_head.lora_A` / `lora_B` keys (PEFT saved them under a list naming
    `lm_head`, the config edited since) loads in PEFT with an unchanged `lm_head`, its keys
    skipped. Such a folder is refused by the module's name, nothing written or changed (it
    was merged with the head's update); without those keys it merges as PEFT's
    `merge_and_unload`, and an embedding table's LoRA (`lora_embedding_A`), no linear layer,
    is refused alike."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2,
                                      vocab_size=40, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head", "embed_tokens"],
                           init_lora_weights=False)  # fmt: skip
    peft.get_peft_model(copy.deepcopy(base), lora).save_pretrained(
        tmp_path / "peft", save_embedding_layers=False
    )
    config_path = tmp_path / "peft" / "adapter_config.json"
    # the layers PEFT adds without saved keys (k_proj, …) start as no update
    settings = {**json.loads(config_path.read_text()), "target_modules": "all-linear",
                "init_lora_weights": True}  # fmt: skip
    config_path.write_text(json.dumps(settings))
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    assert "base_model.model.lm_head.lora_A.weight" in tensors
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
        expected = theirs.merge_and_unload().state_dict()
    before = base.state_dict()
    assert torch.equal(expected["lm_head.weight"], before["lm_head.weight"])  # PEFT skips it
    assert torch.equal(expected["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(expected[q_proj], before[q_proj])
    out = tmp_path / "merged.safetensors"
    for dropped, module in (("embed_tokens", "lm_head"), ("lm_head", "model.embed_tokens")):
        kept = {k: v for k, v in tensors.items() if f".{dropped}." not in k}
        save_file(kept, str(weights))
        named = rf"module '{re.escape(module)}' has (LoRA )?factors.*target_modules.*all-linear"
        with pytest.raises(errors.FileFormatError, match=named):
            merge_checkpoint(tmp_path / "base", tmp_path / "peft", out)
        assert not out.exists()
        model = copy.deepcopy(base)
        with pytest.raises(errors.FileFormatError, match=named):
            apply_adapter(model, tmp_path / "peft")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    save_file({k: v for k, v in tensors.items() if ".lm_head." not in k
               and ".embed_tokens." not in k}, str(weights))  # fmt: skip
    merge_checkpoint(tmp_path / "base", tmp_path / "peft", out)
    merged = load_file(str(out))
    for key, value in expected.items():
        assert rel(merged[key], value) < 1e-6, key


@pytest.mark.parametrize(
    ("selection", "named"),
    [
        ({"layers_pattern": "layers"}, "layers_pattern without layers_to_transform"),
        ({"target_modules": "q|v", "layers_to_transform": [0]}, "beside a regex target_modules"),
        ({"target_modules": "q|v", "layers_pattern": "layers"}, "beside a regex target_modules"),
        ({"target_modules": "q(", "exclude_modules": None}, "is not a valid regular expression"),
        ({"exclude_modules": 3}, "exclude_modules must be a name"),
    ],
    ids=["pattern_alone", "regex_layers", "regex_pattern", "bad_regex", "not_names"],
)
def test_peft_selections_peft_refuses_are_refused(tmp_path, selection, named):
    """Settings of the selecting fields that PEFT itself cannot load under are a
    `FileFormatError` naming the field, not a guess at what PEFT would have adapted."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["q", "v", "head"])
    peft.get_peft_model(Deep(), config).save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **selection}))
    with pytest.raises((ValueError, TypeError, re.error)):
        peft.PeftModel.from_pretrained(Deep(), tmp_path / "peft")
    with pytest.raises(errors.FileFormatError, match=named):
        load_adapter(tmp_path / "peft")


class Conv1DNet(nn.Module):
    """An embedding table and a square GPT-2 `Conv1D` (weights stored `(in, out)`: a
    transposed ΔW would fit), then a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(16, 16)
        self.c_proj = Conv1D(16, 16)
        self.lin = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.c_proj(self.emb(ids)))


@pytest.mark.parametrize("stored", ["head_model", "bare_keys", "save_model"])
def test_a_merge_into_a_weight_tied_to_another_is_refused(tmp_path, stored):
    """GPT-2's LM head is its embedding (`tie_word_embeddings`; the checkpoint omits
    `lm_head.weight`): ΔW merged into `transformer.wte.weight` changes the head too, so the
    merged model's logits are not the adapted model's (PEFT's own merge_and_unload shows it).
    Where the checkpoint tells of the tie (the transformers model its config.json describes,
    its keys with the head model's prefix or without; or safetensors' save_model metadata),
    the merge is refused naming both weights, before anything is written; untied, it gives
    PEFT's logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import safetensors.torch

    def gpt2(tied: bool):
        config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40,
                                         n_positions=16, tie_word_embeddings=tied)  # fmt: skip
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(config).eval()

    ids = torch.tensor([[1, 5, 7, 2, 30, 11]])
    lora = peft.LoraConfig(r=2, target_modules=[], target_parameters=["wte.weight"])
    for tied in (True, False):
        adapted = peft.get_peft_model(gpt2(tied), copy.deepcopy(lora))
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.3)
        adapted.save_pretrained(tmp_path / f"peft-{tied}")
        gpt2(tied).save_pretrained(tmp_path / f"base-{tied}")
        with torch.no_grad():
            expected = adapted(ids).logits
            if tied:  # PEFT's merge changes the tied head: the logits go far from its own
                assert rel(adapted.merge_and_unload()(ids).logits, expected) > 1.0
    base = tmp_path / "base-True"
    if stored == "bare_keys":  # as the Hub's gpt2 is stored: the body's keys, a head's config
        state = load_file(str(base / "model.safetensors"))
        save_file({k.removeprefix("transformer."): v for k, v in state.items()},
                  str(base / "model.safetensors"))  # fmt: skip
        tied_key, module = "lm_head.weight", "wte"
        layer = load_adapter(tmp_path / "peft-True").layers["transformer.wte"]
        adapter = Adapter({"wte": layer}, target_parameters=("wte.weight",))
    elif stored == "save_model":  # no config: the file's metadata names the dropped copy
        (base / "config.json").unlink()
        safetensors.torch.save_model(gpt2(True), str(base / "model.safetensors"))
        kept = load_file(str(base / "model.safetensors"))  # it keeps the head's name
        assert "lm_head.weight" in kept and "transformer.wte.weight" not in kept
        tied_key, module = "transformer.wte.weight", "lm_head"
        adapter = Adapter({"lm_head": load_adapter(tmp_path / "peft-True")["transformer.wte"]})
    else:
        tied_key, module, adapter = "lm_head.weight", "transformer.wte", tmp_path / "peft-True"
    out = tmp_path / "merged.safetensors"
    with pytest.raises(errors.MergeError, match=rf"{module}\.weight, which .* is also {tied_key}"):
        merge_checkpoint(base, adapter, out)
    assert not out.exists()
    merge_checkpoint(tmp_path / "base-False", tmp_path / "peft-False", out)
    merged = gpt2(False)
    merged.load_state_dict(load_file(str(out)))
    with torch.no_grad():
        assert rel(merged(ids).logits, expected) < 1e-5


def test_an_adapter_on_an_lm_head_the_checkpoint_omits_names_its_tie(tmp_path):
    """A tied Llama checkpoint stores its LM head as the embedding only. A PEFT adapter on
    `lm_head` (saved without base weights), which PEFT's merge_and_unload adds to the
    embedding too, is refused naming the tensor the head is stored as, not as a module the
    base lacks, and nothing is written."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=40, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "base")
    assert "lm_head.weight" not in load_file(str(tmp_path / "base" / "model.safetensors"))
    adapted = peft.get_peft_model(copy.deepcopy(base),
                                  peft.LoraConfig(r=2, target_modules=["lm_head"]))  # fmt: skip
    randomize(adapted.base_model.model.lm_head.lora_B, 1)
    adapted.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    embedding = base.model.embed_tokens.weight
    assert rel(adapted.merge_and_unload().model.embed_tokens.weight, embedding) > 1e-2
    out = tmp_path / "merged.safetensors"
    with pytest.raises(errors.TargetError,
                       match=r"no module 'lm_head'.*its weight is model\.embed_tokens\.weight"):
        merge_checkpoint(tmp_path / "base", tmp_path / "peft", out)  # fmt: skip
    assert not out.exists()


def gpt2_peft(tmp_path, fan_in_fan_out, targets, **settings):
    """A tiny untied GPT-2 saved to `tmp_path/base` (save_pretrained: model.safetensors and
    config.json), and PEFT's LoRA on `targets` with random lora_B saved to `tmp_path/peft`
    (no base weights), its config's fan_in_fan_out then set to `fan_in_fan_out` (None:
    left out, as another tool may write it); returns the base and PEFT's model."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40,
                                     n_positions=16, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).eval()
    base.save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(target_modules=targets, **settings)
    adapted = peft.get_peft_model(copy.deepcopy(base), lora)
    for name, module in adapted.named_modules():
        if name.endswith("lora_B"):
            randomize(module, len(name))
    adapted.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    config_path = tmp_path / "peft" / "adapter_config.json"
    stated = json.loads(config_path.read_text())
    stated.pop("fan_in_fan_out")
    if fan_in_fan_out is not None:
        stated["fan_in_fan_out"] = fan_in_fan_out
    config_path.write_text(json.dumps(stated))
    return base, adapted


GPT2_IDS = torch.tensor([[1, 5, 7, 2, 30, 11]])


@pytest.mark.parametrize("fan_in_fan_out", [True, False, None], ids=["true", "false", "absent"])
def test_a_peft_lora_on_gpt2_conv1d_layers_is_read_as_peft_runs_it(tmp_path, fan_in_fan_out):
    """PEFT runs the module LoRA of a transformers Conv1D (GPT-2's layers, weights stored
    (in, out)) transposed, ΔWᵀ = scale·AᵀBᵀ, whatever the config's fan_in_fan_out says, and
    that of an nn.Linear (the LM head here) as it is. Against a base that tells the module
    types (the model, or its save_pretrained folder) lowrank reads each so: the merge equals
    PEFT's merge_and_unload, apply and inject give PEFT's logits, rank_pattern,
    alpha_pattern and use_rslora apply as PEFT applies them, the PEFT file written loads in
    PEFT to the same logits, and the kohya, LyCORIS, resized and combined files merge to
    PEFT's weights."""
    peft = pytest.importorskip("peft")
    targets = ["c_attn", "c_proj", "c_fc", "lm_head"]
    base, adapted = gpt2_peft(tmp_path, fan_in_fan_out, targets, r=2, lora_alpha=6,
                              use_rslora=True, rank_pattern={"c_fc": 3},
                              alpha_pattern={"attn.c_proj": 5})  # fmt: skip
    with torch.no_grad():
        expected = adapted(GPT2_IDS).logits
        reference = copy.deepcopy(adapted).merge_and_unload().state_dict()
        as_stored = copy.deepcopy(base)  # GPT-2's square attn.c_proj, ΔW added as stored
        saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
        prefix = "base_model.model.transformer.h.0.attn.c_proj"
        as_stored.transformer.h[0].attn.c_proj.weight += (
            saved[f"{prefix}.lora_B.weight"] @ saved[f"{prefix}.lora_A.weight"] * 5 / 2**0.5
        )
        assert rel(as_stored(GPT2_IDS).logits, expected) > 1e-2  # no shape would tell
    merge_checkpoint(tmp_path / "base", tmp_path / "peft", tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert max(rel(merged[key], reference[key]) for key in merged) < 1e-6
    applied, injected = copy.deepcopy(base), copy.deepcopy(base)
    apply_adapter(applied, tmp_path / "peft")
    inject_adapter(injected, tmp_path / "peft")
    with torch.no_grad():
        assert rel(applied(GPT2_IDS).logits, expected) < 1e-6
        assert rel(injected(GPT2_IDS).logits, expected) < 1e-6
    report = inspect_adapter(tmp_path / "peft", base=base)
    shapes = {row["name"]: row["shape"] for row in report["layers"]}
    assert shapes["transformer.h.0.mlp.c_fc"] == [16, 64] and shapes["lm_head"] == [40, 16]
    convert_adapter(tmp_path / "peft", tmp_path / "again", to="peft", base=tmp_path / "base")
    with torch.no_grad():
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
        assert rel(reloaded(GPT2_IDS).logits, expected) < 1e-6
    built = tmp_path / "base"
    written = {
        "k.safetensors": lambda out: convert_adapter(tmp_path / "peft", out, "kohya", base=base),
        "l.safetensors": lambda out: convert_adapter(tmp_path / "peft", out, "lycoris", base=built),
        "resized": lambda out: resize_adapter(tmp_path / "peft", out, rank=3, base=built),
        "combined": lambda out: combine_adapters([tmp_path / "peft"] * 2, out, [0.25, 0.75],
                                                 base=built),
    }
    for name, write in written.items():
        write(tmp_path / name)
        out = tmp_path / f"merged-{name}.safetensors"
        merge_checkpoint(tmp_path / "base", tmp_path / name, out)
        merged = load_file(str(out))
        assert max(rel(merged[key], reference[key]) for key in merged) < 1e-6, name


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_a_peft_loha_or_lokr_on_a_gpt2_conv1d_layer_is_refused_as_peft_refuses_it(
    tmp_path, kind
):
    """PEFT's LoHa and LoKr layers wrap nn.Linear and convolutions only: it refuses to load
    one onto GPT-2's Conv1D. Such a folder (made here on a stand-in whose c_proj is an
    nn.Linear) has no orientation any tool runs, and on a square layer either one fits: each
    tool refuses it naming the layer, and writes nothing."""
    peft = pytest.importorskip("peft")
    base, _ = gpt2_peft(tmp_path, None, ["c_attn"], r=2)
    stand_in = copy.deepcopy(base)
    stand_in.transformer.h[0].attn.c_proj = nn.Linear(16, 16)  # GPT-2's c_proj is (16, 16)
    config = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[kind](
        target_modules=["attn.c_proj"], r=2, init_weights=False
    )
    peft.get_peft_model(stand_in, config).save_pretrained(tmp_path / kind)
    with pytest.raises(TypeError, match="Conv1D"):
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / kind)
    named = r"layer 'transformer\.h\.0\.attn\.c_proj' is a (LoHa|LoKr) on a transformers Conv1D"
    out = tmp_path / "merged.safetensors"
    with pytest.raises(errors.TargetError, match=named):
        merge_checkpoint(tmp_path / "base", tmp_path / kind, out)
    assert not out.exists()
    for use in (apply_adapter, inject_adapter):
        model = copy.deepcopy(base)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(errors.TargetError, match=named):
            use(model, tmp_path / kind)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert not any("lora" in n or "adapter" in n for n, _ in model.named_modules()), use


@pytest.mark.parametrize("architectures", [None, ["MyGPT2"]], ids=["absent", "unknown"])
def test_a_gpt2_checkpoint_whose_model_cannot_be_built_transposes_only_its_conv1d_layers(
    tmp_path, architectures
):
    """A GPT-2 checkpoint whose config.json names no model transformers can build (no
    `architectures`, or a class of its own) is told by its model_type and the layers'
    names: c_attn, c_proj, c_fc are Conv1Ds, run transposed; the untied square LM head is an
    nn.Linear, run as it is. The merge equals PEFT's merge_and_unload."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=16,
                                     n_positions=16, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).eval()
    base.save_pretrained(tmp_path / "base")
    stated = json.loads((tmp_path / "base" / "config.json").read_text())
    stated.pop("architectures")
    if architectures is not None:
        stated["architectures"] = architectures
    (tmp_path / "base" / "config.json").write_text(json.dumps(stated))
    lora = peft.LoraConfig(target_modules=["c_attn", "c_proj", "lm_head"], r=2, lora_alpha=6)
    adapted = peft.get_peft_model(copy.deepcopy(base), lora)
    for name, module in adapted.named_modules():
        if name.endswith("lora_B"):
            randomize(module, len(name))
    adapted.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    with torch.no_grad():
        reference = copy.deepcopy(adapted).merge_and_unload().state_dict()
    assert reference["lm_head.weight"].shape == (16, 16)  # square: no shape would tell
    merge_checkpoint(tmp_path / "base", tmp_path / "peft", tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert max(rel(merged[key], reference[key]) for key in merged) < 1e-6


def test_a_diffusers_lora_on_gpt2_conv1d_layers_is_read_as_peft_runs_it(tmp_path):
    """diffusers loads a text encoder's LoRA through PEFT, which runs a Conv1D's module LoRA
    transposed: a diffusers file holding PEFT's GPT-2 factors under `text_encoder.` (its
    config in `lora_adapter_metadata`, fan_in_fan_out included) applies to PEFT's merged
    weights given the model, and needs one."""
    base, adapted = gpt2_peft(tmp_path, True, ["c_attn", "c_proj"], r=2, lora_alpha=6,
                              alpha_pattern={"mlp.c_proj": 3})  # fmt: skip
    with torch.no_grad():
        reference = copy.deepcopy(adapted).merge_and_unload().state_dict()
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    settings = {f"text_encoder.{key}": config[key]
                for key in ("r", "lora_alpha", "alpha_pattern", "fan_in_fan_out")}  # fmt: skip
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({key.replace("base_model.model.", "text_encoder."): value
               for key, value in saved.items()}, str(path),
              {"format": "pt", "lora_adapter_metadata": json.dumps(settings)})  # fmt: skip
    with pytest.raises(errors.FileFormatError, match="says fan_in_fan_out"):
        inspect_adapter(path)
    apply_adapter(base, path, component="text_encoder")
    state = base.state_dict()
    assert max(rel(state[key], value) for key, value in reference.items()) < 1e-6


def test_a_fan_in_fan_out_peft_lora_needs_a_base_that_tells_the_module_types(tmp_path):
    """A config saying fan_in_fan_out holds its Conv1D layers transposed, and only module
    types tell which layers those are: without a base, or against a bare .safetensors file
    or a dict of shapes, every tool refuses it naming the setting, and writes nothing."""
    gpt2_peft(tmp_path, True, ["c_attn", "c_proj"], r=2)
    (tmp_path / "bare").mkdir()
    (tmp_path / "base" / "model.safetensors").rename(tmp_path / "bare" / "model.safetensors")
    bare = tmp_path / "bare" / "model.safetensors"
    shapes = {key.removesuffix(".weight"): tuple(value.shape)
              for key, value in load_file(str(bare)).items()}  # fmt: skip
    peft_dir = tmp_path / "peft"
    out = tmp_path / "out"
    tools = {
        "inspect": lambda: inspect_adapter(peft_dir),
        "convert": lambda: convert_adapter(peft_dir, out, to="kohya"),
        "resize": lambda: resize_adapter(peft_dir, out, rank=1),
        "combine": lambda: combine_adapters([peft_dir, peft_dir], out),
        "save": lambda: save_adapter(load_adapter(peft_dir), out, "peft"),
        "shapes": lambda: load_adapter(peft_dir, base=shapes),
        "merge": lambda: merge_checkpoint(bare, peft_dir, out),
        "convert_bare": lambda: convert_adapter(peft_dir, out, to="peft", base=bare),
    }
    for name, tool in tools.items():
        with pytest.raises(errors.FileFormatError, match=r"says fan_in_fan_out.*give a base"):
            tool()
        assert not out.exists(), name


def test_saving_an_unresolved_fan_in_fan_out_adapter_asks_to_resolve_it_first(tmp_path):
    """save_adapter writes an adapter as it is: its base= only keeps outputs off the
    checkpoints, and resolves nothing. An adapter read from a config saying fan_in_fan_out
    and not resolved is refused, saying it is not resolved (never that no base was given,
    with a base given) and how to resolve it; the adapter resolved against that base saves,
    and PEFT loads the file to the logits it computes itself."""
    peft = pytest.importorskip("peft")
    base, adapted = gpt2_peft(tmp_path, True, ["c_attn", "c_proj"], r=2)
    out = tmp_path / "out"
    with pytest.raises(errors.FileFormatError, match=r"says fan_in_fan_out") as info:
        save_adapter(load_adapter(tmp_path / "peft"), out, "peft", base=tmp_path / "base")
    assert "no base was given" not in str(info.value)
    assert "not resolved" in str(info.value) and "load_adapter" in str(info.value)
    assert not out.exists()
    save_adapter(load_adapter(tmp_path / "peft", base=tmp_path / "base"), out, "peft")
    with torch.no_grad():
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
        assert rel(reloaded(GPT2_IDS).logits, adapted(GPT2_IDS).logits) < 1e-6


def test_peft_target_parameters_survive_our_writers(tmp_path):
    """A PEFT adapter on parameters (`target_parameters`) updates each weight as stored:
    applied, injected as trainable modules, and written back by lowrank (directly, and
    through a kohya file with no base), it gives PEFT's outputs; diffusers cannot hold it."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["lin"], alpha_pattern={"emb.weight": 6},
                             target_parameters=["c_proj.weight", "emb.weight"])  # fmt: skip
    base = Conv1DNet()
    trained = peft.get_peft_model(copy.deepcopy(base), config)
    for name, param in trained.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)
    trained.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 16, (3, 5))
    expected = trained(ids).detach()
    adapter = load_adapter(tmp_path / "peft")
    applied, injected = copy.deepcopy(base), copy.deepcopy(base)
    apply_adapter(applied, adapter)
    inject_adapter(injected, adapter)
    assert rel(applied(ids), expected) < 1e-6 and rel(injected(ids), expected) < 1e-6
    convert_adapter(tmp_path / "peft", tmp_path / "again", to="peft")
    convert_adapter(tmp_path / "peft", tmp_path / "k.safetensors", to="kohya")
    convert_adapter(tmp_path / "k.safetensors", tmp_path / "back", to="peft")
    for folder in ("again", "back"):
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / folder)
        assert rel(reloaded(ids), expected) < 1e-6, folder
    assert adapter["emb"].scale == 3.0  # PEFT keys a parameter target's patterns by its weight
    for diffusers in (lambda: convert_adapter(tmp_path / "peft", tmp_path / "d", to="diffusers"),
                      lambda: save_adapter(adapter, tmp_path / "d", "diffusers")):  # fmt: skip
        with pytest.raises(errors.ConversionError, match="diffusers file cannot hold"):
            diffusers()
    assert not (tmp_path / "d").exists()


def test_the_model_a_peft_adapter_is_for_survives_our_tools(tmp_path):
    """`base_model_name_or_path`, `revision` and `task_type` say which model PEFT's
    `AutoPeftModel…` loads under an adapter: resize, convert and combine keep them, and a
    combination of adapters for different models (one name at two revisions) states no
    model, and the task type they agree on."""
    peft = pytest.importorskip("peft")
    for name, revision in (("a", "v1"), ("b", "v2")):
        config = peft.LoraConfig(r=4, target_modules=["lin", "conv"], revision=revision,
                                 task_type="FEATURE_EXTRACTION")  # fmt: skip
        peft.get_peft_model(net(), config).save_pretrained(tmp_path / name)
        path = tmp_path / name / "adapter_config.json"  # a hub name set before saving is fetched
        stated = {**json.loads(path.read_text()), "base_model_name_or_path": "org/base"}
        path.write_text(json.dumps(stated))
    resize_adapter(tmp_path / "a", tmp_path / "resized", rank=2)
    convert_adapter(tmp_path / "a", tmp_path / "converted", to="peft")
    combine_adapters([tmp_path / "a", tmp_path / "a"], tmp_path / "same", weights=[0.5, 0.5])
    combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "mixed")
    for folder in ("resized", "converted", "same"):
        config = peft.PeftConfig.from_pretrained(tmp_path / folder)
        assert (config.base_model_name_or_path, config.revision, config.task_type) == (
            "org/base", "v1", "FEATURE_EXTRACTION"), folder
    mixed = peft.PeftConfig.from_pretrained(tmp_path / "mixed")
    assert (mixed.base_model_name_or_path, mixed.revision, mixed.task_type) == (
        None, None, "FEATURE_EXTRACTION")  # fmt: skip


def test_peft_loads_our_folder_and_gives_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    g = torch.Generator().manual_seed(1)

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    adapter = Adapter(
        {
            "lin": LoRA(t(3, 64), t(96, 3), scale=0.7),
            "conv": Tucker2(t(2, 32, 1, 1), t(3, 2, 3, 3), t(48, 3, 1, 1), scale=1.5),
            "proj": LoRA(t(5, 48, 1, 1), t(32, 5, 1, 1), scale=0.3),
        },
        rslora=True,
    )
    save_adapter(adapter, tmp_path / "peft", "peft")
    peft_model = peft.PeftModel.from_pretrained(net(), tmp_path / "peft")
    ours = net()
    apply_adapter(ours, adapter)
    assert rel(outputs(peft_model), outputs(ours)) < 1e-6
    lin = peft_model.base_model.model.lin
    assert torch.equal(lin.lora_A["default"].weight, adapter["lin"].down)
    assert lin.scaling["default"] == 0.7


# ---------------------------------------------------------------------------- LyCORIS

LYCORIS_NETWORKS = [
    ("locon", {}),
    ("locon", {"use_tucker": True}),
    ("loha", {}),
    ("loha", {"use_tucker": True}),
    ("lokr", {"factor": 8, "decompose_both": True}),
    ("lokr", {"factor": 8, "decompose_both": True, "use_tucker": True}),
    ("lokr", {"factor": 8}),
]


def lycoris_network(lycoris, model, algo, alpha, **kwargs):
    lycoris.LycorisNetwork.apply_preset({"target_name": ["lin", "conv", "proj"]})
    network = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=alpha, algo=algo,
                                     **kwargs)  # fmt: skip
    network.apply_to()
    return network


@pytest.mark.parametrize(("algo", "kwargs"), LYCORIS_NETWORKS)
def test_a_lycoris_file_merges_to_what_lycoris_computes(tmp_path, lycoris, algo, kwargs):
    model = net()
    network = lycoris_network(lycoris, model, algo, alpha=3, **kwargs)
    randomize(network, seed=2)
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    expected = outputs(model)  # LyCORIS' own forward, scale alpha / rank applied once
    assert rel(outputs(net()), expected) > 1e-2
    adapter = load_adapter(tmp_path / "l.safetensors", base=net())
    assert adapter.format == "lycoris"
    ours = net()
    apply_adapter(ours, adapter)
    assert rel(outputs(ours), expected) < 1e-5


def test_lycoris_merge_to_scales_loha_twice(tmp_path, lycoris):
    """LyCORIS' forward applies a LoHa's scale once, its `merge_to` twice; lowrank follows
    the forward (as ComfyUI and A1111 do), and agrees with `merge_to` when scale is 1."""
    for alpha, agrees in ((2, True), (3, False)):  # rank 2: scale 1, then 1.5
        model = net()
        network = lycoris_network(lycoris, model, "loha", alpha=alpha)
        randomize(network, seed=3)
        network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
        ours = net()
        apply_adapter(ours, tmp_path / "l.safetensors")
        network.merge_to()
        same = rel(ours.lin.weight, model.lin.weight) < 1e-6
        assert same == agrees


def test_a_lycoris_dylora_convolution_merges_as_alpha_over_rank(tmp_path, lycoris):
    """LyCORIS' DyLoRA stores a convolution's `lora_up` as `(out, r)` beside a 4-D
    `lora_down`; it is read as `(out, r, 1, 1)` and merges to `W + α/r · up down` (the
    reading of ComfyUI and A1111, at the file's full rank), against that sum in float64."""
    model = net()
    lycoris.LycorisNetwork.apply_preset({"target_name": ["lin", "conv", "proj"]})
    network = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=3.0, algo="dylora",
                                     block_size=2)  # fmt: skip
    network.apply_to()
    randomize(network, seed=4)
    path = tmp_path / "dylora.safetensors"
    network.save_weights(str(path), torch.float32, {})
    tensors = load_file(str(path))
    assert tensors["lycoris_conv.lora_up.weight"].ndim == 2
    ours = net()
    apply_adapter(ours, path)
    for name in ("lin", "conv", "proj"):
        up = tensors[f"lycoris_{name}.lora_up.weight"].double()
        down = tensors[f"lycoris_{name}.lora_down.weight"].double()
        base = getattr(net(), name).weight.double()
        want = base + 3.0 / 4 * (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
        assert rel(getattr(ours, name).weight, want) < 1e-6, name


@pytest.mark.parametrize(
    ("algo", "kwargs", "named"),
    [("boft", {}, "OFT / BOFT"), ("diag-oft", {"constraint": 1e-3, "rescaled": True}, "OFT"),
     ("ia3", {}, "IA³"), ("glora", {}, "GLoRA"), ("tlora", {}, "T-LoRA"),
     ("lora", {"train_norm": True}, "norm layers")],
)  # fmt: skip
def test_lycoris_algorithms_lowrank_does_not_read_are_named(tmp_path, lycoris, algo, kwargs,
                                                             named):  # fmt: skip
    """Each LyCORIS algorithm outside LoRA / LoHa / LoKr is refused by name, from a file
    LyCORIS made, and nothing is written."""
    model = nn.Sequential(nn.Linear(16, 32), nn.GroupNorm(4, 32))
    lycoris.LycorisNetwork.apply_preset({"target_module": ["Linear", "GroupNorm"]})
    network = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, algo=algo,
                                     **kwargs)  # fmt: skip
    network.apply_to()
    randomize(network, seed=5)
    path = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "base.safetensors"))  # fmt: skip
    with pytest.raises(errors.FileFormatError, match=f"{re.escape(named)}.*not supported"):
        merge_checkpoint(tmp_path / "base.safetensors", path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    ("algo", "kwargs"),
    [("locon", {}), ("loha", {}), ("lokr", {"factor": 8, "decompose_both": True})],
)
def test_an_alpha_of_zero_is_read_as_lycoris_reads_it(tmp_path, lycoris, algo, kwargs):
    """LyCORIS (like kohya) takes a stored alpha of 0 for alpha = rank: scale 1."""
    network = lycoris_network(lycoris, net(), algo, alpha=3, **kwargs)
    randomize(network, seed=8)
    path = tmp_path / "l.safetensors"
    network.save_weights(str(path), torch.float32, {})
    tensors = load_file(str(path))
    zeroed = {k: torch.zeros_like(v) if k.endswith(".alpha") else v for k, v in tensors.items()}
    assert sum(key.endswith(".alpha") for key in zeroed) == 3  # one per layer
    save_file(zeroed, str(path))
    model = net()
    loaded, _ = lycoris.create_lycoris_from_weights(1.0, str(path), model)
    loaded.merge_to()  # scale 1, so merge_to's scale² is the forward's scale too
    ours = net()
    apply_adapter(ours, path)
    assert rel(ours.lin.weight, net().lin.weight) > 1e-2
    for name in ("lin", "conv", "proj"):
        merged = model.get_submodule(name).weight
        assert rel(ours.get_submodule(name).weight, merged) < 1e-6, name


def test_a_lycoris_loha_conv_file_to_kohya_needs_the_base(tmp_path, lycoris):
    """kohya LoRA factors of a convolution carry its kernel; a LyCORIS LoHa conv layer is
    stored flattened, so only the base can say what the kohya factors' shape is."""
    network = lycoris_network(lycoris, net(), "loha", alpha=2)
    randomize(network, seed=9)
    path, out = tmp_path / "loha.safetensors", tmp_path / "kohya.safetensors"
    network.save_weights(str(path), torch.float32, {})
    with pytest.raises(errors.ConversionError, match="give the base"):
        convert_adapter(path, out, "kohya", rank=4, prefix="lycoris")
    assert not out.exists()
    convert_adapter(path, out, "kohya", rank=4, base=net())  # keeps the `lycoris_` prefix
    model = net()
    loaded, _ = lycoris.create_lycoris_from_weights(1.0, str(out), model)
    assert len(loaded.loras) == 3
    loaded.merge_to()
    ours = net()
    apply_adapter(ours, out)
    for name in ("lin", "conv", "proj"):
        merged = model.get_submodule(name).weight
        assert rel(ours.get_submodule(name).weight, merged) < 1e-6, name


@pytest.mark.parametrize("tool", ["convert", "resize", "combine"])
def test_a_lycoris_file_keeps_its_prefix_when_a_base_maps_its_names(tmp_path, lycoris, tool):
    """LyCORIS' whole-model wrapper names its layers `lycoris_…` and loads no others; a file
    our tools write from one, with the base given to map its names, keeps that prefix."""
    model = net()
    network = lycoris_network(lycoris, model, "locon", alpha=3)
    randomize(network, seed=5)
    path, out = tmp_path / "l.safetensors", tmp_path / "out.safetensors"
    network.save_weights(str(path), torch.float32, {})
    if tool == "convert":
        convert_adapter(path, out, "lycoris", base=net())
    elif tool == "resize":
        resize_adapter(path, out, 2, base=net())  # rank 2 already: copied
    else:
        combine_adapters([path, path], out, [0.5, 0.5], base=net())
    assert sorted({key.partition(".")[0] for key in load_file(str(out))}) == [
        "lycoris_conv", "lycoris_lin", "lycoris_proj"]  # fmt: skip
    assert load_adapter(out).components == ()
    theirs = net()
    loaded, _ = lycoris.create_lycoris_from_weights(1.0, str(out), theirs)
    loaded.apply_to()
    assert len(loaded.loras) == 3
    assert rel(outputs(theirs), outputs(model)) < 1e-5


def test_a_weight_of_zero_carries_a_flattened_lycoris_layer_over_without_the_base(
    tmp_path, lycoris
):
    """A LoHa stores a convolution flattened `(out, in·k·k)`, a LoCon keeps its kernel; with
    the LoCon weighted 0 nothing is added, so the LoHa is written as it is."""
    loha = lycoris_network(lycoris, net(), "loha", alpha=2)
    locon = lycoris_network(lycoris, net(), "locon", alpha=2)
    for seed, network in enumerate((loha, locon)):
        randomize(network, seed=seed)
    paths = [tmp_path / "loha.safetensors", tmp_path / "locon.safetensors"]
    for network, path in zip((loha, locon), paths, strict=True):
        network.save_weights(str(path), torch.float32, {})
    out = tmp_path / "out.safetensors"
    combine_adapters(paths, out, [1.0, 0.0])
    assert load_file(str(out)).keys() == load_file(str(paths[0])).keys()
    with pytest.raises(errors.ShapeError, match=r"flattened.*give the base"):
        combine_adapters(paths, tmp_path / "both.safetensors", [1.0, 1.0])


LOWRANK_FORMS = {
    "locon": lambda t: {"lin": LoRA(t(2, 64), t(96, 2), 1.5), "conv": LoRA(t(2, 32, 3, 3),
                        t(48, 2, 1, 1), 0.5), "proj": LoRA(t(2, 48, 1, 1), t(32, 2, 1, 1), 2.0)},
    "tucker": lambda t: {"conv": Tucker2(t(2, 32, 1, 1), t(2, 2, 3, 3), t(48, 2, 1, 1), 0.75)},
    "loha": lambda t: {"lin": LoHa(LoRA(t(2, 64), t(96, 2)), LoRA(t(2, 64), t(96, 2))),
                       "conv": LoHa(Tucker2(t(2, 32, 1, 1), t(2, 2, 3, 3), t(48, 2, 1, 1)),
                                    Tucker2(t(2, 32, 1, 1), t(2, 2, 3, 3), t(48, 2, 1, 1)))},
    "lokr": lambda t: {"lin": LoKr(LoRA(t(2, 8), t(8, 2)), LoRA(t(2, 8), t(12, 2)), 0.5),
                       "conv": LoKr(t(6, 4), LoRA(t(2, 8 * 9), t(8, 2)), 1.25)},
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(LOWRANK_FORMS))
def test_lycoris_loads_our_file_and_merges_to_ours(tmp_path, lycoris, kind):
    """LoCon and Tucker layers go in a kohya file and are compared with LyCORIS' `merge_to`;
    LoHa and LoKr need the LyCORIS format and its forward pass (see the test above)."""
    g = torch.Generator().manual_seed(4)
    adapter = Adapter(LOWRANK_FORMS[kind](lambda *s: torch.randn(*s, generator=g) * 0.3))
    product = kind in ("loha", "lokr")
    path = tmp_path / "ours.safetensors"
    save_adapter(adapter, path, "lycoris" if product else "kohya", prefix="lycoris")
    model = net()
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(path), model)
    assert len(network.loras) == len(adapter)
    ours = net()
    apply_adapter(ours, adapter.for_model(ours))
    assert rel(outputs(net()), outputs(ours)) > 1e-2
    if product:
        network.apply_to()
        assert rel(outputs(model), outputs(ours)) < 1e-5
    else:
        network.merge_to()
        for name in adapter.layers:
            merged = model.get_submodule(name).weight
            assert rel(merged, ours.get_submodule(name).weight) < 1e-6


@pytest.mark.parametrize("fmt", ["kohya", "lycoris"])
def test_lycoris_loads_a_trained_tucker2_model_off_the_kernel(tmp_path, lycoris, fmt):
    """`lowrank.nn`'s Tucker2 adapters on a linear layer and a 1×1 convolution went into
    kohya / LyCORIS files with a `lora_mid`, which LyCORIS builds only for a kernel beyond
    1×1: `create_lycoris_from_weights` failed (AttributeError: no `lora_mid`). Written
    folded, LyCORIS runs the trained model's outputs."""
    model = net()
    lnn.inject(model, {"lin": {"r": [3, 2]}, "conv": {"r": [3, 2]}, "proj": {"r": [2, 3]}},
               form="tucker2", alpha=3.0)  # fmt: skip
    randomize(nn.ParameterList(p for p in model.parameters() if p.requires_grad), seed=3)
    path = tmp_path / "ours.safetensors"
    save_adapter(model_adapter(model), path, fmt, prefix="lycoris")
    loaded = net()
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(path), loaded)
    network.apply_to()
    assert len(network.loras) == 3
    assert rel(outputs(loaded), outputs(net())) > 1e-2
    assert rel(outputs(loaded), outputs(model)) < 1e-5


def tucker_delta(t: Tucker2) -> torch.Tensor:
    """ΔW of an unscaled Tucker2 in float64, from the formula: `Σ up[o, p] mid[p, q, ·]
    down[q, i]`."""
    up, down = t.up.flatten(1).double(), t.down.flatten(1).double()
    return torch.einsum("op,pq...,qi->oi...", up, t.mid.double(), down)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_loads_our_tucker_chains_off_the_kernel(tmp_path, lycoris, algo):
    """LyCORIS builds LoHa and LoKr Tucker cores (`hada_t1` / `hada_t2`, `lokr_t2`) only for
    a kernel beyond 1×1; such chains of a linear layer or a 1×1 convolution went into
    LyCORIS files as cores, which `create_lycoris_from_weights` failed on (RuntimeError:
    size of tensor a (2) must match … b (96); AttributeError: no `lokr_w2_a`). Written
    folded, LyCORIS runs them as W + ΔW from the float64 formulas."""
    g = torch.Generator().manual_seed(7)

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    def chain(out_f, in_f, kernel):
        units = [1] * len(kernel)
        return Tucker2(t(2, in_f, *units), t(2, 2, *kernel), t(out_f, 2, *units))

    if algo == "loha":
        layers = {"lin": LoHa(chain(96, 64, ()), chain(96, 64, ()), 1.5),
                  "proj": LoHa(chain(32, 48, (1, 1)), chain(32, 48, (1, 1)), 0.5)}  # fmt: skip
        deltas = {n: f.scale * tucker_delta(f.first) * tucker_delta(f.second)
                  for n, f in layers.items()}  # fmt: skip
    else:
        layers = {"lin": LoKr(LoRA(t(2, 8), t(8, 2)), chain(12, 8, ()), 0.5),
                  "proj": LoKr(t(4, 6), chain(8, 8, (1, 1)), 1.25)}  # fmt: skip
        w1 = {"lin": layers["lin"].w1.up.double() @ layers["lin"].w1.down.double(),
              "proj": layers["proj"].w1.double()[..., None, None]}  # fmt: skip
        deltas = {n: f.scale * torch.kron(w1[n], tucker_delta(f.w2)) for n, f in layers.items()}
    path = tmp_path / "ours.safetensors"
    save_adapter(Adapter(layers), path, "lycoris", prefix="lycoris")
    model = net()
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(path), model)
    network.apply_to()
    assert len(network.loras) == 2
    want = net()
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = want.get_submodule(name).weight
            weight.copy_(weight.double() + delta.reshape(weight.shape))
    assert rel(outputs(want), outputs(net())) > 1e-2
    assert rel(outputs(model), outputs(want)) < 1e-5


# ---------------------------------------------------------------------------- diffusers

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "cross_attention_dim": 12,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}


@pytest.fixture
def pipeline_parts():
    """A tiny diffusers UNet and CLIP text encoder, and a stand-in pipeline class with the
    LoRA loader of Stable Diffusion pipelines."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET)
    pipeline = stand_in_pipeline(
        diffusers.loaders.StableDiffusionLoraLoaderMixin, ("unet", "text_encoder")
    )
    return unet, tiny_clip_text(transformers), pipeline


def tiny_clip_text(transformers):
    """A tiny transformers `CLIPTextModel` (width 12, one layer, MLP 16)."""
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=12, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=50, max_position_embeddings=8))  # fmt: skip


def unet_out(unet):
    g = torch.Generator().manual_seed(7)
    sample, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 12, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), context).sample


def text_out(text):
    with torch.no_grad():
        return text(torch.tensor([[1, 5, 7, 2]])).last_hidden_state


@pytest.mark.parametrize("saved_with_text_model", [False, True])
def test_text_encoder_layers_read_with_or_without_text_model_in_either_base(
    tmp_path, pipeline_parts, saved_with_text_model
):
    """transformers 5's `CLIPTextModel` has no `text_model` level (its modules and checkpoint
    say `encoder.layers.0.mlp.fc1`); LoRA files and earlier checkpoints say
    `text_model.encoder.…`. A kohya file and a diffusers file, naming the layers each way,
    merge into a checkpoint of either spelling and apply to the model as W + scale·up@down
    in float64 does."""
    _, text, _ = pipeline_parts
    state = text.state_dict()
    assert not any(key.startswith("text_model.") for key in state)  # transformers 5's layout
    g = torch.Generator().manual_seed(3)
    layers = {"encoder.layers.0.self_attn.q_proj": (12, 12), "encoder.layers.0.mlp.fc1": (16, 12)}
    factors = {name: (torch.randn(2, cols, generator=g), torch.randn(rows, 2, generator=g))
               for name, (rows, cols) in layers.items()}  # fmt: skip
    kohya = {}
    for name, (down, up) in factors.items():
        stem = "lora_te_text_model_" + name.replace(".", "_")
        kohya |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                  f"{stem}.alpha": torch.tensor(1.0)}  # fmt: skip
    diffusers_file = {}
    for i, (name, (down, up)) in enumerate(factors.items()):
        path = f"text_encoder.{'text_model.' if i == 0 else ''}{name}"  # one of each spelling
        diffusers_file |= {f"{path}.lora_A.weight": down * 0.5**0.5,
                           f"{path}.lora_B.weight": up * 0.5**0.5}  # fmt: skip
    prefix = "text_model." if saved_with_text_model else ""
    base = save_state({prefix + k: v for k, v in state.items()}, tmp_path / "clip.safetensors")
    want = {f"{prefix}{name}.weight": state[f"{name}.weight"].double() + 0.5 * (up @ down).double()
            for name, (down, up) in factors.items()}  # fmt: skip
    for label, tensors in (("kohya", kohya), ("diffusers", diffusers_file)):
        lora = save_state(tensors, tmp_path / f"{label}.safetensors")
        out = tmp_path / f"merged-{label}.safetensors"
        merge_checkpoint(base, [lora], out, component="text_encoder")
        merged = load_file(str(out))
        for key, value in merged.items():
            expected = want.get(key, (state[key[len(prefix):]]).double())
            assert torch.allclose(value.double(), expected, rtol=1e-6, atol=1e-6), (label, key)
        model = copy.deepcopy(text)
        apply_adapter(model, lora, component="text_encoder")
        for name in layers:
            got = model.get_submodule(name).weight.double()
            assert torch.allclose(got, want[f"{prefix}{name}.weight"], rtol=1e-6, atol=1e-6)


def test_kohya_output_names_a_clip_text_encoder_under_text_model_whatever_the_base(
    tmp_path, pipeline_parts
):
    """Layers read against transformers 5's `CLIPTextModel` (no `text_model` level) are
    written to kohya files as sd-scripts, A1111 and ComfyUI name them,
    `lora_te_text_model_encoder_layers_…`; the file reads back without a base to the model's
    own paths and merges into a checkpoint of either spelling as float64 W + ΔW."""
    _, text, _ = pipeline_parts
    state = text.state_dict()
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(2, 12, generator=g), torch.randn(16, 2, generator=g)
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file({"base_model.model.encoder.layers.0.mlp.fc1.lora_A.weight": down,
               "base_model.model.encoder.layers.0.mlp.fc1.lora_B.weight": up},
              str(peft_dir / "adapter_model.safetensors"))  # fmt: skip
    (peft_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 1, "target_modules": ["fc1"]}))  # fmt: skip
    adapter = load_adapter(peft_dir, base={"text_encoder": text})
    out = tmp_path / "kohya.safetensors"
    save_adapter(adapter, out, "kohya")
    assert sorted(load_file(str(out))) == [
        f"lora_te_text_model_encoder_layers_0_mlp_fc1.{part}"
        for part in ("alpha", "lora_down.weight", "lora_up.weight")
    ]
    assert list(load_adapter(out).layers) == ["text_encoder.encoder.layers.0.mlp.fc1"]
    want = state["encoder.layers.0.mlp.fc1.weight"].double() + 0.5 * (up @ down).double()
    for prefix in ("", "text_model."):
        renamed = {prefix + k: v for k, v in state.items()}
        base = save_state(renamed, tmp_path / f"clip{len(prefix)}.safetensors")
        merged = tmp_path / f"merged{len(prefix)}.safetensors"
        merge_checkpoint(base, [out], merged)
        got = load_file(str(merged))[f"{prefix}encoder.layers.0.mlp.fc1.weight"].double()
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), prefix


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_vision_tower_lora_never_lands_on_the_text_tower_of_a_two_tower_model(
    tmp_path, family
):
    """transformers 5 flattens CLIPVisionModel and SiglipVisionModel as it does CLIPTextModel
    (`encoder.layers.0.self_attn.q_proj`), so a PEFT LoRA of the vision model names its
    layers without a tower. Against the whole CLIPModel / SiglipModel (text_model and
    vision_model, equally wide here as in siglip-base) such a path names neither tower: it is
    a TargetError naming the layer, the checkpoint and model unchanged and nothing written,
    never a merge into text_model's layers. Against the vision model's own checkpoint it
    merges as PEFT's merge_and_unload does."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    sizes = dict(hidden_size=12, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    text = dict(sizes, vocab_size=50, max_position_embeddings=8)
    vision = dict(sizes, image_size=8, patch_size=4)
    prefix = {"clip": "CLIP", "siglip": "Siglip"}[family]
    torch.manual_seed(0)
    both = getattr(transformers, f"{prefix}Model")(
        getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision)
    ).eval()
    both.save_pretrained(tmp_path / "both")
    tower = getattr(transformers, f"{prefix}VisionModel")(
        getattr(transformers, f"{prefix}VisionConfig")(**vision)
    ).eval()
    tower.save_pretrained(tmp_path / "tower")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"])
    adapted = peft.get_peft_model(copy.deepcopy(tower), lora)
    for name, module in adapted.named_modules():
        if name.endswith("lora_B"):
            randomize(module, len(name))
    adapted.save_pretrained(tmp_path / "lora")
    with torch.no_grad():
        reference = copy.deepcopy(adapted).merge_and_unload().state_dict()
    merge_checkpoint(tmp_path / "tower", tmp_path / "lora", tmp_path / "tower.safetensors")
    for key, value in load_file(str(tmp_path / "tower.safetensors")).items():
        assert torch.allclose(value, reference[key], rtol=1e-6, atol=1e-7), key
    named = r"layer 'encoder\.layers\.0\.self_attn\.(k|q)_proj' has no module"
    out = tmp_path / "both.safetensors"
    with pytest.raises(errors.TargetError, match=named):
        merge_checkpoint(tmp_path / "both", tmp_path / "lora", out)
    assert not out.exists()
    model = copy.deepcopy(both)
    with pytest.raises(errors.TargetError, match=named):
        apply_adapter(model, tmp_path / "lora")
    for key, value in both.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_kohya_output_keeps_the_paths_of_a_text_encoder_that_is_not_clip(tmp_path):
    """A text encoder with `encoder.layers.…` paths that is no CLIP model (T5Gemma's, PRX's
    and Stable Audio 3's `text_encoder`: `self_attn.o_proj` beside `q_proj`) is written to
    kohya by its own paths, every layer alike (`lora_te_encoder_layers_0_self_attn_q_proj`),
    so the file, without lowrank's metadata, reads against the model and merges as float64
    W + scale · up @ down."""
    tf = pytest.importorskip("transformers")
    size = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "head_dim": 8,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 40}  # fmt: skip
    config = tf.T5GemmaConfig(encoder=size, decoder=size, vocab_size=40, is_encoder_decoder=False)
    text = tf.T5GemmaEncoderModel(config)
    state = text.state_dict()
    g = torch.Generator().manual_seed(5)
    modules = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.o_proj")
    factors = {m: (torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g))
               for m in modules}  # fmt: skip
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file({f"base_model.model.{m}.lora_{p}.weight": t for m, (down, up) in factors.items()
               for p, t in (("A", down), ("B", up))}, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 1, "target_modules": ["q_proj", "o_proj"]}))
    out = tmp_path / "kohya.safetensors"
    save_adapter(load_adapter(peft_dir, base={"text_encoder": text}), out, "kohya")
    assert sorted({key.partition(".")[0] for key in load_file(str(out))}) == sorted(
        "lora_te_" + m.replace(".", "_") for m in modules)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(out)), str(bare))  # without the recorded module paths
    base = save_state(state, tmp_path / "t5gemma.safetensors")
    merge_checkpoint(base, [bare], tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for m, (down, up) in factors.items():
        want = state[f"{m}.weight"].double() + 0.5 * (up @ down).double()
        assert torch.allclose(merged[f"{m}.weight"].double(), want, rtol=1e-6, atol=1e-6), m


def test_diffusers_loads_our_file_and_matches_our_merge(tmp_path, pipeline_parts):
    unet, text, pipeline = pipeline_parts
    pristine = copy.deepcopy(unet)
    ours_unet, ours_text = copy.deepcopy(unet), copy.deepcopy(text)
    g = torch.Generator().manual_seed(1)
    layers = {}
    for component, model, suffixes in (("unet", unet, ("to_q", "to_v", "conv1", "proj_in")),
                                       ("text_encoder", text, ("q_proj", "fc1"))):  # fmt: skip
        for i, (name, module) in enumerate(model.named_modules()):
            if name.endswith(suffixes):
                out_f, *rest = module.weight.shape
                r = 2 + i % 2
                down = torch.randn(r, *rest, generator=g) * 0.3
                up = torch.randn(out_f, r, *([1] * (len(rest) - 1)), generator=g) * 0.3
                layers[f"{component}.{name}"] = LoRA(down, up, scale=0.5 + i % 3)
    adapter = Adapter(layers, components=("text_encoder", "unet"))
    save_adapter(adapter, tmp_path / "lora", "diffusers")
    pipeline(unet, text).load_lora_weights(str(tmp_path / "lora"))
    apply_adapter(ours_unet, adapter, component="unet")
    apply_adapter(ours_text, adapter, component="text_encoder")
    assert rel(unet_out(ours_unet), unet_out(pristine)) > 1e-3
    assert rel(unet_out(ours_unet), unet_out(unet)) < 1e-5
    assert rel(text_out(ours_text), text_out(text)) < 1e-5


def test_a_models_own_diffusers_file_reads_its_flat_config(tmp_path, pipeline_parts):
    """`save_lora_adapter` (a model's LoRA, as Flux and SD3 transformers save theirs) writes
    keys without a component and a plain PEFT config as metadata: the scales must be the
    config's, as diffusers' `load_lora_adapter` reads them, and the merge diffusers' forward."""
    peft = pytest.importorskip("peft")
    unet = pipeline_parts[0]
    base = save_state(unet.state_dict(), tmp_path / "unet.safetensors")
    config = peft.LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "conv1"],
                             alpha_pattern={"to_v": 6}, init_lora_weights=False)  # fmt: skip
    unet.add_adapter(config)
    unet.save_lora_adapter(str(tmp_path / "lora"))
    expected = unet_out(unet)
    adapter = load_adapter(tmp_path / "lora")
    assert adapter.components == ()
    peft_scales = {name: module.scaling["default"] for name, module in unet.named_modules()
                   if isinstance(getattr(module, "scaling", None), dict)}  # fmt: skip
    assert {name: form.scale for name, form in adapter.items()} == peft_scales
    assert {0.5, 1.5} <= set(peft_scales.values())
    merge_checkpoint(base, tmp_path / "lora", tmp_path / "merged.safetensors")
    merged = type(unet)(**TINY_UNET)
    merged.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))
    assert rel(unet_out(merged), expected) < 1e-5


def test_a_diffusers_file_merges_to_what_diffusers_computes(tmp_path, pipeline_parts):
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    unet, _, pipeline = pipeline_parts
    base = save_state(unet.state_dict(), tmp_path / "unet.safetensors")
    config = peft.LoraConfig(r=4, lora_alpha=2, target_modules=["to_k", "conv2", "proj_out"],
                             rank_pattern={"conv2": 2}, init_lora_weights=False)  # fmt: skip
    unet.add_adapter(config)
    pipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet),
                               unet_lora_adapter_metadata=config.to_dict())  # fmt: skip
    expected = unet_out(unet)
    merge_checkpoint(base, tmp_path / "lora", tmp_path / "merged.safetensors")
    merged = type(unet)(**TINY_UNET)
    merged.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))
    unet.disable_adapters()
    assert rel(unet_out(unet), expected) > 1e-3
    assert rel(unet_out(merged), expected) < 1e-5


def test_a_diffusers_file_whose_components_differ_in_rslora_reads_as_diffusers_does(
    tmp_path, pipeline_parts
):
    """`save_lora_weights` keeps each component's config, `use_rslora` too: a UNet trained
    with rsLoRA beside a text encoder without it is one valid file, which diffusers loads
    with each component's own scaling. It merges to what diffusers computes, and written
    back (as diffusers, or through kohya) loads in diffusers to the same outputs."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    unet, text, pipeline = pipeline_parts
    pristine_unet, pristine_text = copy.deepcopy(unet), copy.deepcopy(text)
    base = save_state(unet.state_dict(), tmp_path / "unet.safetensors")
    unet_config = peft.LoraConfig(r=4, lora_alpha=2, use_rslora=True, init_lora_weights=False,
                                  target_modules=["to_k", "conv1"])  # fmt: skip
    text_config = peft.LoraConfig(r=3, lora_alpha=5, init_lora_weights=False,
                                  target_modules=["q_proj", "fc1"])  # fmt: skip
    unet.add_adapter(unet_config)
    text = peft.inject_adapter_in_model(text_config, text)
    pipeline.save_lora_weights(
        tmp_path / "lora",
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text, adapter_name="default"),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    expected_unet, expected_text = unet_out(unet), text_out(text)
    scales = {f"{component}.{name}": module.scaling["default"]
              for component, model in (("unet", unet), ("text_encoder", text))
              for name, module in model.named_modules()
              if isinstance(getattr(module, "scaling", None), dict)}  # fmt: skip
    assert {1.0, 5 / 3} <= set(scales.values())  # 2 / √4 and 5 / 3
    adapter = load_adapter(tmp_path / "lora")
    assert {name: form.scale for name, form in adapter.items()} == scales
    merge_checkpoint(base, tmp_path / "lora", tmp_path / "merged.safetensors", component="unet")
    merged = type(unet)(**TINY_UNET)
    merged.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))
    assert rel(unet_out(merged), expected_unet) < 1e-5
    convert_adapter(tmp_path / "lora", tmp_path / "again", "diffusers")
    convert_adapter(tmp_path / "lora", tmp_path / "k.safetensors", "kohya")
    convert_adapter(tmp_path / "k.safetensors", tmp_path / "back", "diffusers")
    for written in ("again", "back"):
        unet_copy, text_copy = copy.deepcopy(pristine_unet), copy.deepcopy(pristine_text)
        pipeline(unet_copy, text_copy).load_lora_weights(str(tmp_path / written))
        assert rel(unet_out(unet_copy), expected_unet) < 1e-6
        assert rel(text_out(text_copy), expected_text) < 1e-6


# SDXL's UNet layout, small: three levels, attention in the last two, text_time conditioning
TINY_SDXL_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (8, 16, 16),
    "layers_per_block": 2,
    "cross_attention_dim": 12,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 2),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 12 + 6 * 4,
}

# kohya's SDXL names (the original LDM UNet's modules), one of each kind of layer, and the
# modules of `TINY_SDXL_UNET` they are, by SDXL's layout
SDXL_LDM_LAYERS = {
    "input_blocks_0_0": "conv_in",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_2_0_emb_layers_1": "down_blocks.0.resnets.1.time_emb_proj",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_6_0_op": "down_blocks.1.downsamplers.0.conv",
    "input_blocks_8_1_transformer_blocks_1_ff_net_0_proj":
        "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.0.proj",
    "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
    "middle_block_1_transformer_blocks_1_attn2_to_k":
        "mid_block.attentions.0.transformer_blocks.1.attn2.to_k",
    "middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
    "output_blocks_0_1_proj_out": "up_blocks.0.attentions.0.proj_out",
    "output_blocks_2_0_in_layers_2": "up_blocks.0.resnets.2.conv1",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_1_transformer_blocks_0_attn2_to_out_0":
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_6_0_skip_connection": "up_blocks.2.resnets.0.conv_shortcut",
    "output_blocks_8_0_out_layers_3": "up_blocks.2.resnets.2.conv2",
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
    "out_2": "conv_out",
}  # fmt: skip
# SD 1.x's layout (`TINY_UNET`: attention on the first level, a plain last one), as some tools
# name it; diffusers 0.42 reads an upsampler after a level without attention
# (`output_blocks_1_1_conv`) as an attention, so it is checked here by name only
SD1_LDM_LAYERS = {
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks_1_1_transformer_blocks_0_attn2_to_v":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_3_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "middle_block_1_proj_out": "mid_block.attentions.0.proj_out",
    "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
    "output_blocks_0_0_skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "output_blocks_3_1_transformer_blocks_0_ff_net_2":
        "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "output_blocks_2_0_out_layers_3": "up_blocks.1.resnets.0.conv2",
}  # fmt: skip


def sdxl_unet_out(unet):
    g = torch.Generator().manual_seed(7)
    sample, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 12, generator=g)
    added = {"text_embeds": torch.randn(1, 12, generator=g),
             "time_ids": torch.randn(1, 6, generator=g)}  # fmt: skip
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), context, added_cond_kwargs=added).sample


def write_kohya_unet_file(path, unet, bodies):
    """A kohya file of random LoRA layers `lora_unet_<body>` on the modules `bodies` names,
    each of rank 2 or 3 and alpha 1.5 (one alpha: diffusers 0.42 misnames attention layers'
    own, see docs/files.md)."""
    modules = dict(unet.named_modules())
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i, (body, name) in enumerate(bodies.items()):
        out_f, in_f, *kernel = modules[name].weight.shape
        r, stem = 2 + i % 2, f"lora_unet_{body}"
        tensors[f"{stem}.lora_down.weight"] = torch.randn(r, in_f, *kernel, generator=g) * 0.3
        up = torch.randn(out_f, r, *[1] * len(kernel), generator=g) * 0.3
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.alpha"] = torch.tensor(1.5)
    save_file(tensors, str(path))


def unet_pipeline(layout):
    """A stand-in pipeline class with the LoRA loader of SDXL's (`sdxl`) or SD 1.x's (`sd1`)
    pipelines, holding a UNet only."""
    loaders = pytest.importorskip("diffusers").loaders
    mixin = {"sdxl": loaders.StableDiffusionXLLoraLoaderMixin,
             "sd1": loaders.StableDiffusionLoraLoaderMixin}[layout]  # fmt: skip
    return stand_in_pipeline(mixin, ("unet",), absent=("text_encoder", "text_encoder_2"))


def diffusers_fuse_kohya_unet(layout, unet, lora):
    """The kohya UNet LoRA file `lora` loaded by diffusers' own conversion (the LDM names
    mapped by the UNet's config, as SDXL's load_lora_weights does; SD 1.x's maps them only
    given the config) and fused into `unet`."""
    pipe = unet_pipeline(layout)(unet)
    state, alphas = pipe.lora_state_dict(str(lora), unet_config=unet.config)
    pipe.load_lora_into_unet(state, network_alphas=alphas, unet=unet, _pipeline=pipe)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, under the modules' own keys


@pytest.mark.parametrize("layout", ["sdxl", "sd1"])
def test_a_kohya_file_with_ldm_unet_names_merges_as_diffusers_fuses_it(tmp_path, layout):
    """kohya's SDXL LoRAs name the UNet's layers by the LDM modules (`input_blocks_4_1_…`,
    `middle_block_…`, `output_blocks_2_2_conv`, `out_2`); read against a diffusers UNet
    they name its modules, and merge to the weights diffusers' own loader and `fuse_lora`
    give."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    config, bodies = {"sdxl": (TINY_SDXL_UNET, SDXL_LDM_LAYERS),
                      "sd1": (TINY_UNET, SD1_LDM_LAYERS)}[layout]  # fmt: skip
    unet = diffusers.UNet2DConditionModel(**config)
    base = save_state(unet.state_dict(), tmp_path / "unet.safetensors")
    lora = tmp_path / "ldm.safetensors"
    write_kohya_unet_file(lora, unet, bodies)
    pristine = copy.deepcopy(unet)
    before = pristine.state_dict()
    adapter = load_adapter(lora, base=pristine)
    assert sorted(adapter.layers) == sorted(f"unet.{name}" for name in bodies.values())
    diffusers_fuse_kohya_unet(layout, unet, lora)
    fused = unet.state_dict()
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    changed = {k for k in merged if not torch.equal(merged[k], before[k])}
    assert changed == {f"{name}.weight" for name in bodies.values()}
    assert changed == {k for k in fused if not torch.equal(fused[k], before[k])}
    for key, weight in merged.items():
        assert torch.allclose(weight, fused[key], rtol=1e-5, atol=1e-6), key


def test_an_sd1_upsampler_after_a_level_without_attention_has_its_ldm_name(tmp_path):
    """The upsampler of a level without attention sits at `.1` of its LDM block."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DConditionModel(**TINY_UNET)
    write_kohya_unet_file(tmp_path / "up.safetensors", unet,
                          {"output_blocks_1_1_conv": "up_blocks.0.upsamplers.0.conv"})  # fmt: skip
    adapter = load_adapter(tmp_path / "up.safetensors", base=unet)
    assert list(adapter.layers) == ["unet.up_blocks.0.upsamplers.0.conv"]


def test_an_ldm_unet_name_of_no_module_is_named(tmp_path):
    """An LDM name past the base's blocks (`input_blocks_9_…`: TINY_SDXL_UNET has 9) or of a
    part a resnet has not is a `TargetError` naming the layer; nothing is guessed."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DConditionModel(**TINY_SDXL_UNET)
    for body in ("input_blocks_9_0_in_layers_2", "input_blocks_1_1_proj_in",
                 "output_blocks_8_1_conv", "middle_block_3_in_layers_2"):  # fmt: skip
        path = tmp_path / f"{body}.safetensors"
        save_file({f"lora_unet_{body}.lora_down.weight": torch.zeros(2, 8),
                   f"lora_unet_{body}.lora_up.weight": torch.zeros(8, 2)}, str(path))  # fmt: skip
        with pytest.raises(errors.TargetError, match=f"lora_unet_{body}"):
            load_adapter(path, base=unet)


# sd-scripts' Flux names (Black Forest Labs' modules) → the modules of a diffusers
# FluxTransformer2DModel they are, by diffusers' `_convert_kohya_flux_lora_to_diffusers`
FLUX_BFL_LAYERS = {
    "double_blocks_0_img_attn_qkv": ("transformer_blocks.0.attn.to_q",
                                     "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"),
    "double_blocks_0_img_attn_proj": ("transformer_blocks.0.attn.to_out.0",),
    "double_blocks_0_img_mlp_0": ("transformer_blocks.0.ff.net.0.proj",),
    "double_blocks_0_img_mlp_2": ("transformer_blocks.0.ff.net.2",),
    "double_blocks_0_img_mod_lin": ("transformer_blocks.0.norm1.linear",),
    "double_blocks_0_txt_attn_qkv": ("transformer_blocks.0.attn.add_q_proj",
                                     "transformer_blocks.0.attn.add_k_proj",
                                     "transformer_blocks.0.attn.add_v_proj"),
    "double_blocks_0_txt_attn_proj": ("transformer_blocks.0.attn.to_add_out",),
    "double_blocks_0_txt_mlp_0": ("transformer_blocks.0.ff_context.net.0.proj",),
    "double_blocks_0_txt_mlp_2": ("transformer_blocks.0.ff_context.net.2",),
    "double_blocks_0_txt_mod_lin": ("transformer_blocks.0.norm1_context.linear",),
    "single_blocks_0_linear1": ("single_transformer_blocks.0.attn.to_q",
                                "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v",
                                "single_transformer_blocks.0.proj_mlp"),
    "single_blocks_0_linear2": ("single_transformer_blocks.0.proj_out",),
    "single_blocks_0_modulation_lin": ("single_transformer_blocks.0.norm.linear",),
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in_in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in_out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in_in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in_out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in_in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in_out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer_linear": ("proj_out",),
    "final_layer_adaLN_modulation_1": ("norm_out.linear",),
}  # fmt: skip
# diffusers 0.42 splits a single block's `linear1` by Flux.1's sizes, whatever the model's
FLUX1_LINEAR1 = (3072, 3072, 3072, 12288)


@pytest.fixture
def flux_parts():
    """A tiny diffusers Flux transformer and CLIP text encoder, and a stand-in pipeline class
    with the LoRA loader of Flux pipelines."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from model_factories import tiny_flux

    pipeline = stand_in_pipeline(
        diffusers.loaders.FluxLoraLoaderMixin, ("transformer", "text_encoder")
    )
    return tiny_flux(), tiny_clip_text(transformers), pipeline


def flux_out(transformer):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 4, 4, generator=g),
            encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
            pooled_projections=torch.randn(1, 32, generator=g),
            timestep=torch.tensor([0.5]),
            img_ids=torch.randint(0, 4, (4, 3), generator=g).float(),
            txt_ids=torch.zeros(3, 3),
            guidance=torch.tensor([3.5]),
        ).sample


def kohya_flux_tensors(transformer):
    """A kohya Flux file's tensors: random LoRA layers of rank 3 or 5 (not a multiple of the
    split count, which diffusers would read as block-sparse) on every layer of
    `FLUX_BFL_LAYERS`; alphas 2 to 4, none on `final_layer` (diffusers 0.42 drops those
    alphas)."""
    shapes = {name: module.weight.shape for name, module in transformer.named_modules()
              if isinstance(getattr(module, "weight", None), torch.Tensor)}  # fmt: skip
    layers = {f"lora_unet_{body}": (sum(shapes[m][0] for m in modules), shapes[modules[0]][1])
              for body, modules in FLUX_BFL_LAYERS.items()}  # fmt: skip
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i, (stem, (rows, cols)) in enumerate(layers.items()):
        r = 3 + 2 * (i % 2)
        tensors[f"{stem}.lora_down.weight"] = torch.randn(r, cols, generator=g) * 0.3
        tensors[f"{stem}.lora_up.weight"] = torch.randn(rows, r, generator=g) * 0.3
        if "final_layer" not in stem:
            tensors[f"{stem}.alpha"] = torch.tensor(2.0 + i % 3)
    return tensors


def diffusers_fuse_kohya_flux(pipeline, transformer, text, tensors):
    """The kohya Flux LoRA `tensors` loaded by diffusers' own conversion and fused into the
    models. diffusers 0.42 splits `linear1` by Flux.1's sizes (`FLUX1_LINEAR1`), so the tiny
    layer's row blocks go in at those offsets and the split LoRAs are cut back to the
    model's rows; it also leaves the layers outside the blocks without the `transformer.`
    its loader looks for, which is added."""
    tensors = dict(tensors)
    stem, modules = "lora_unet_single_blocks_0_linear1", FLUX_BFL_LAYERS["single_blocks_0_linear1"]
    sizes = [dict(transformer.named_modules())[m].weight.shape[0] for m in modules]
    up = tensors[f"{stem}.lora_up.weight"]
    padded = torch.zeros(sum(FLUX1_LINEAR1), up.shape[1])
    offsets, starts = (list(itertools.accumulate(n, initial=0)) for n in (FLUX1_LINEAR1, sizes))
    for offset, start, size in zip(offsets[:-1], starts[:-1], sizes, strict=True):
        padded[offset : offset + size] = up[start : start + size]
    tensors[f"{stem}.lora_up.weight"] = padded
    state, alphas = pipeline.lora_state_dict(tensors, return_alphas=True)
    state = {k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}": v
             for k, v in state.items()}  # fmt: skip
    for module, size in zip(modules, sizes, strict=True):
        key = f"transformer.{module}.lora_B.weight"
        state[key] = state[key][:size]
    pipe = pipeline(transformer, text)
    pipe.load_lora_into_transformer(state, network_alphas=alphas, transformer=transformer,
                                    _pipeline=pipe)  # fmt: skip
    if text is not None:
        pipe.load_lora_into_text_encoder(state, network_alphas=alphas, text_encoder=text,
                                         prefix="text_encoder", _pipeline=pipe)  # fmt: skip
    pipe.fuse_lora(components=["transformer", "text_encoder"] if text is not None
                   else ["transformer"])  # fmt: skip
    pipe.unload_lora_weights()  # keeps the fused weights, under the modules' own keys


def test_a_kohya_flux_file_merges_and_applies_as_diffusers_fuses_it(tmp_path, flux_parts):
    """sd-scripts' Flux LoRAs name BFL's modules (`double_blocks_0_img_attn_qkv`, …); read
    against a diffusers Flux transformer the fused ones are split by rows into its modules
    (`to_q`, `to_k`, `to_v`), `final_layer_adaLN_modulation_1` has its halves exchanged, and
    the merge and the forward with the adapter applied are those of diffusers' own loader."""
    transformer, _, pipeline = flux_parts
    base = save_state(transformer.state_dict(), tmp_path / "flux.safetensors")
    lora = tmp_path / "flux_lora.safetensors"
    tensors = kohya_flux_tensors(transformer)
    save_file(tensors, str(lora))
    pristine, ours = copy.deepcopy(transformer), copy.deepcopy(transformer)
    before = pristine.state_dict()
    adapter = load_adapter(lora, base=pristine)
    modules = sorted(m for ms in FLUX_BFL_LAYERS.values() for m in ms)
    assert sorted(adapter.layers) == [f"transformer.{m}" for m in modules]
    report = inspect_adapter(lora, base=pristine)
    assert report["components"] == ["transformer"] and report["totals"]["layers"] == len(modules)
    diffusers_fuse_kohya_flux(pipeline, transformer, None, tensors)
    fused = transformer.state_dict()
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    changed = {k for k in merged if not torch.equal(merged[k], before[k])}
    assert changed == {f"{m}.weight" for m in modules}
    assert changed == {k for k in fused if not torch.equal(fused[k], before[k])}
    for key, weight in merged.items():
        assert torch.allclose(weight, fused[key], rtol=1e-5, atol=1e-6), key
    apply_adapter(ours, lora)
    assert rel(flux_out(ours), flux_out(pristine)) > 1e-3
    assert rel(flux_out(ours), flux_out(transformer)) < 1e-5


def test_a_kohya_flux_file_written_back_loads_in_diffusers(tmp_path, flux_parts):
    """Converted against its base, a kohya Flux file carries diffusers' module names:
    written as diffusers, diffusers' Flux loader fuses it to the same weights as its own
    reading of the kohya file; written as PEFT, PEFT merges it to them; written
    as kohya, the names are the modules' (`lora_transformer_transformer_blocks_0_attn_to_q`)."""
    transformer, _, pipeline = flux_parts
    lora = tmp_path / "flux_lora.safetensors"
    tensors = kohya_flux_tensors(transformer)
    save_file(tensors, str(lora))
    reference = copy.deepcopy(transformer)
    diffusers_fuse_kohya_flux(pipeline, reference, None, tensors)
    expected = reference.state_dict()
    adapter = load_adapter(lora, base=transformer)

    def assert_fused(loaded):
        for key, weight in loaded.state_dict().items():
            assert torch.allclose(weight, expected[key], rtol=1e-5, atol=1e-6), key

    convert_adapter(lora, tmp_path / "diffusers", "diffusers", base=transformer)
    loaded = copy.deepcopy(transformer)
    pipe = pipeline(loaded, None)
    pipe.load_lora_weights(str(tmp_path / "diffusers"))
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    assert_fused(loaded)

    convert_adapter(lora, tmp_path / "peft", "peft", base=transformer)
    peft = pytest.importorskip("peft")
    assert_fused(peft.PeftModel.from_pretrained(copy.deepcopy(transformer), tmp_path / "peft")
                 .merge_and_unload())  # fmt: skip

    convert_adapter(lora, tmp_path / "kohya.safetensors", "kohya", base=transformer)
    stems = {key.partition(".")[0] for key in load_file(str(tmp_path / "kohya.safetensors"))}
    assert {"lora_transformer_transformer_blocks_0_attn_to_q",
            "lora_transformer_single_transformer_blocks_0_proj_mlp",
            "lora_transformer_norm_out_linear"} <= stems  # fmt: skip
    assert sorted(load_adapter(tmp_path / "kohya.safetensors").layers) == sorted(adapter.layers)


def test_a_kohya_flux_file_on_a_bfl_checkpoint_keeps_its_layers(tmp_path):
    """Against a checkpoint in Black Forest Labs' layout (`double_blocks.0.img_attn.qkv`)
    sd-scripts' names are its modules: nothing is split, the merge adds each ΔW, and written
    back as kohya the names are sd-scripts' own."""
    paths = ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "img_in",
             "final_layer.adaLN_modulation.1", "time_in.in_layer")  # fmt: skip
    g = torch.Generator().manual_seed(3)
    shapes = dict(zip(paths, [(96, 32), (224, 32), (32, 4), (64, 32), (32, 256)], strict=True))
    state = {f"{path}.weight": torch.randn(*shape, generator=g) for path, shape in shapes.items()}
    state["double_blocks.0.img_attn.qkv.bias"] = torch.randn(96, generator=g)
    base = save_state(state, tmp_path / "flux1.safetensors")
    tensors = {}
    for path, (rows, cols) in shapes.items():
        stem = "lora_unet_" + path.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = torch.randn(3, cols, generator=g)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(rows, 3, generator=g)
        tensors[f"{stem}.alpha"] = torch.tensor(1.5)
    lora = tmp_path / "flux_lora.safetensors"
    save_file(tensors, str(lora))
    adapter = load_adapter(lora, base=base)
    assert sorted(adapter.layers) == sorted(f"transformer.{path}" for path in paths)
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for path in paths:
        stem = "lora_unet_" + path.replace(".", "_")
        up, down = (tensors[f"{stem}.lora_{p}.weight"].double() for p in ("up", "down"))
        expected = state[f"{path}.weight"].double() + 0.5 * up @ down
        assert rel(merged[f"{path}.weight"].double(), expected) < 1e-6, path
    assert torch.equal(merged["double_blocks.0.img_attn.qkv.bias"],
                       state["double_blocks.0.img_attn.qkv.bias"])  # fmt: skip
    convert_adapter(lora, tmp_path / "kohya.safetensors", "kohya", base=base)
    written = load_file(str(tmp_path / "kohya.safetensors"))
    assert {key.partition(".")[0] for key in written} == {
        "lora_unet_" + path.replace(".", "_") for path in paths
    }


@pytest.mark.parametrize(
    ("stem", "parts", "error", "named"),
    [
        # a LoKr whose w2 rows (48) straddle to_q / to_k (32 rows each): no exact split
        ("lora_unet_double_blocks_0_img_attn_qkv",
         {"lokr_w1": (2, 4), "lokr_w2": (48, 8)}, errors.TargetError, "LoKr"),
        # the base has one double block
        ("lora_unet_double_blocks_1_img_attn_qkv",
         {"lora_down.weight": (2, 32), "lora_up.weight": (96, 2)}, errors.TargetError, "no module"),
        ("lora_unet_single_blocks_0_linear1",
         {"lora_down.weight": (2, 32), "lora_up.weight": (200, 2)}, errors.ShapeError, "224"),
    ],
)  # fmt: skip
def test_a_kohya_flux_layer_that_does_not_split_is_named(tmp_path, stem, parts, error, named):
    """A layer on a fused BFL module that cannot be split exactly into the diffusers modules
    it is (a LoKr whose w2 groups straddle them; rows that are not theirs), or on a block the
    base has not, is refused naming it, and a merge writes nothing."""
    pytest.importorskip("diffusers")
    from model_factories import tiny_flux

    transformer = tiny_flux()
    g = torch.Generator().manual_seed(4)
    tensors = {f"{stem}.{part}": torch.randn(*shape, generator=g) for part, shape in parts.items()}
    lora = tmp_path / "flux_lora.safetensors"
    save_file(tensors, str(lora))
    with pytest.raises(error, match=f"{stem}.*{named}"):
        load_adapter(lora, base=transformer)
    base = save_state(transformer.state_dict(), tmp_path / "flux.safetensors")
    with pytest.raises(error, match=stem):
        merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()


def test_kohya_flux_loha_and_lokr_on_fused_layers_split_into_their_rows(tmp_path):
    """A LoHa's ΔW rows are the Hadamard product of its halves' rows, and a LoKr's whole
    groups of w2's rows are w1's rows beside w2: on a fused BFL module (qkv, a single
    block's linear1) and the swapped final modulation, each splits exactly into the
    diffusers modules it is; the merge adds to each module its rows of the float64 ΔW."""
    pytest.importorskip("diffusers")
    from model_factories import tiny_flux

    transformer = tiny_flux()
    g = torch.Generator().manual_seed(8)
    parts = {
        "double_blocks_0_img_attn_qkv": {"hada_w1_a": (96, 2), "hada_w1_b": (2, 32),
                                         "hada_w2_a": (96, 2), "hada_w2_b": (2, 32)},
        "single_blocks_0_linear1": {"lokr_w1": (7, 4), "lokr_w2": (32, 8)},
        "final_layer_adaLN_modulation_1": {"lokr_w1_a": (2, 1), "lokr_w1_b": (1, 4),
                                           "lokr_w2": (32, 8)},
    }  # fmt: skip
    tensors = {f"lora_unet_{body}.{part}": torch.randn(*shape, generator=g)
               for body, layer in parts.items() for part, shape in layer.items()}  # fmt: skip
    tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = torch.tensor(1.0)  # scale 1/2
    tensors["lora_unet_final_layer_adaLN_modulation_1.alpha"] = torch.tensor(3.0)  # 3/1
    lora = save_state(tensors, tmp_path / "flux_lycoris.safetensors")
    t = {key: value.double() for key, value in tensors.items()}
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    loha = 0.5 * (t[f"{qkv}.hada_w1_a"] @ t[f"{qkv}.hada_w1_b"]) * (
        t[f"{qkv}.hada_w2_a"] @ t[f"{qkv}.hada_w2_b"]
    )
    linear1 = "lora_unet_single_blocks_0_linear1"
    lokr = torch.kron(t[f"{linear1}.lokr_w1"], t[f"{linear1}.lokr_w2"])  # dense: scale 1
    final = "lora_unet_final_layer_adaLN_modulation_1"
    modulation = 3.0 * torch.kron(t[f"{final}.lokr_w1_a"] @ t[f"{final}.lokr_w1_b"],
                                  t[f"{final}.lokr_w2"])  # fmt: skip
    want = {"transformer_blocks.0.attn.to_q": loha[:32],
            "transformer_blocks.0.attn.to_k": loha[32:64],
            "transformer_blocks.0.attn.to_v": loha[64:],
            "single_transformer_blocks.0.attn.to_q": lokr[:32],
            "single_transformer_blocks.0.attn.to_k": lokr[32:64],
            "single_transformer_blocks.0.attn.to_v": lokr[64:96],
            "single_transformer_blocks.0.proj_mlp": lokr[96:],
            "norm_out.linear": torch.cat([modulation[32:], modulation[:32]])}  # fmt: skip
    base = save_state(transformer.state_dict(), tmp_path / "flux.safetensors")
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    before, merged = load_file(str(base)), load_file(str(tmp_path / "merged.safetensors"))
    changed = {k for k in merged if not torch.equal(merged[k], before[k])}
    assert changed == {f"{module}.weight" for module in want}
    for module, delta in want.items():
        key = f"{module}.weight"
        assert rel(merged[key].double() - before[key].double(), delta) < 1e-5, module


def test_a_kohya_flux_loha_on_an_unfused_module_is_read(tmp_path):
    """Where a BFL module is one diffusers module (`img_mlp.0` is `ff.net.0.proj`), any form
    is read, as it is."""
    pytest.importorskip("diffusers")
    from model_factories import tiny_flux

    g = torch.Generator().manual_seed(5)
    stem = "lora_unet_double_blocks_0_img_mlp_0"
    parts = {"hada_w1_a": (128, 2), "hada_w1_b": (2, 32),
             "hada_w2_a": (128, 2), "hada_w2_b": (2, 32)}  # fmt: skip
    save_file({f"{stem}.{p}": torch.randn(*s, generator=g) for p, s in parts.items()},
              str(tmp_path / "loha.safetensors"))  # fmt: skip
    adapter = load_adapter(tmp_path / "loha.safetensors", base=tiny_flux())
    assert list(adapter.layers) == ["transformer.transformer_blocks.0.ff.net.0.proj"]
    assert isinstance(adapter["transformer.transformer_blocks.0.ff.net.0.proj"], LoHa)


def test_a_dit_kohya_file_with_a_final_layer_is_one_model(tmp_path):
    """`final_layer_linear` and `final_layer_adaLN_modulation_1` are SD3's, DiT's and
    Lumina's modules as much as Flux's: a `lora_unet` file of such a model (sd-scripts' SD3,
    `joint_blocks_…`), and one lowrank writes of a model without components, are one model's
    layers, merged against one base as W + scale · up @ down; a Flux file's `final_layer`
    layers stay its transformer's."""
    g = torch.Generator().manual_seed(8)
    shapes = {"joint_blocks.0.x_block.attn.qkv": (48, 16), "final_layer.linear": (4, 16),
              "final_layer.adaLN_modulation.1": (32, 16)}  # fmt: skip
    state = {f"{path}.weight": torch.randn(*shape, generator=g) for path, shape in shapes.items()}
    base = save_state(state, tmp_path / "sd3.safetensors")
    tensors = {}
    for path, (rows, cols) in shapes.items():
        stem = "lora_unet_" + path.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = torch.randn(2, cols, generator=g)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(rows, 2, generator=g)
        tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    theirs = tmp_path / "sd3_lora.safetensors"
    save_file(tensors, str(theirs))
    ours = tmp_path / "written.safetensors"
    save_adapter(load_adapter(theirs, base=base).select(), ours, "kohya")
    for lora in (theirs, ours):
        assert load_adapter(lora, base=base).components == ("unet",)
        out = tmp_path / f"merged_{lora.stem}.safetensors"
        merge_checkpoint(base, lora, out)
        merged = load_file(str(out))
        for path in shapes:
            stem = "lora_unet_" + path.replace(".", "_")
            up, down = (tensors[f"{stem}.lora_{p}.weight"].double() for p in ("up", "down"))
            expected = state[f"{path}.weight"].double() + 0.5 * up @ down
            assert rel(merged[f"{path}.weight"].double(), expected) < 1e-6, (lora, path)
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(2, 16),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(48, 2),
            "lora_unet_final_layer_linear.lora_down.weight": torch.ones(2, 16),
            "lora_unet_final_layer_linear.lora_up.weight": torch.ones(4, 2)}  # fmt: skip
    save_file(flux, str(tmp_path / "flux_lora.safetensors"))
    adapter = load_adapter(tmp_path / "flux_lora.safetensors")
    assert {adapter.component_of(name) for name in adapter.layers} == {"transformer"}


def test_a_kohya_flux_file_with_clip_layers_reads_per_component(tmp_path, flux_parts):
    """sd-scripts' `lora_te1_…` layers of a Flux LoRA are the CLIP text encoder's: with a base
    per component they read beside the transformer's, and merged into the encoder's
    checkpoint (keys `text_model.…`, as CLIP checkpoints are stored) they give the weights
    diffusers' Flux loader fuses."""
    transformer, text, pipeline = flux_parts
    g = torch.Generator().manual_seed(6)
    tensors = kohya_flux_tensors(transformer)
    # MLP layers: diffusers 0.42 reads a kohya CLIP attention layer as `…self_attn.to_q_lora`,
    # which a transformers 5 CLIPTextModel does not load
    clip_layers = {"text_model_encoder_layers_0_mlp_fc1": (16, 12),
                   "text_model_encoder_layers_0_mlp_fc2": (12, 16)}  # fmt: skip
    for body, (rows, cols) in clip_layers.items():
        tensors[f"lora_te1_{body}.lora_down.weight"] = torch.randn(3, cols, generator=g) * 0.3
        tensors[f"lora_te1_{body}.lora_up.weight"] = torch.randn(rows, 3, generator=g) * 0.3
        tensors[f"lora_te1_{body}.alpha"] = torch.tensor(1.5)
    lora = tmp_path / "flux_lora.safetensors"
    save_file(tensors, str(lora))
    before = {f"text_model.{key}": value.clone() for key, value in text.state_dict().items()}
    clip = save_state(before, tmp_path / "clip.safetensors")
    adapter = load_adapter(lora, base={"transformer": transformer, "text_encoder": clip})
    assert adapter.components == ("text_encoder", "transformer")
    assert {"text_encoder.text_model.encoder.layers.0.mlp.fc1",
            "transformer.single_transformer_blocks.0.proj_mlp"} <= set(adapter.layers)  # fmt: skip
    reference = copy.deepcopy(text)
    diffusers_fuse_kohya_flux(pipeline, copy.deepcopy(transformer), reference, tensors)
    fused = {f"text_model.{key}": value for key, value in reference.state_dict().items()}
    merge_checkpoint(clip, lora, tmp_path / "merged.safetensors", component="text_encoder")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    changed = {k for k in merged if not torch.equal(merged[k], before[k])}
    assert changed == {"text_model.encoder.layers.0.mlp.fc1.weight",
                       "text_model.encoder.layers.0.mlp.fc2.weight"}  # fmt: skip
    assert changed == {k for k in fused if not torch.equal(fused[k], before[k])}
    for key, weight in merged.items():
        assert torch.allclose(weight, fused[key], rtol=1e-5, atol=1e-6), key


# ComfyUI's / ai-toolkit's DiT LoRAs: `diffusion_model.<module in the original layout>.<part>`,
# in the forms of `ORIGINAL_FORMS`
# the layers of `FLUX_BFL_LAYERS` by BFL's module paths, as ComfyUI and ai-toolkit name them
FLUX_BFL_PATHS = (
    "double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.0",
    "double_blocks.0.img_mlp.2", "double_blocks.0.img_mod.lin", "double_blocks.0.txt_attn.qkv",
    "double_blocks.0.txt_attn.proj", "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2",
    "double_blocks.0.txt_mod.lin", "single_blocks.0.linear1", "single_blocks.0.linear2",
    "single_blocks.0.modulation.lin", "img_in", "txt_in", "time_in.in_layer",
    "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer",
    "guidance_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1",
)  # fmt: skip


def original_flux_tensors(kohya, form):
    """kohya Flux tensors (`kohya_flux_tensors`) under `diffusion_model.<BFL path>`
    (`original_tensors`)."""
    paths = {f"lora_unet_{path.replace('.', '_')}": path for path in FLUX_BFL_PATHS}
    assert set(paths) == {f"lora_unet_{body}" for body in FLUX_BFL_LAYERS}
    return original_tensors(kohya, paths, form)


def original_tensors(kohya, paths, form):
    """kohya tensors under `diffusion_model.<path>` (`paths`: kohya stem → the module path in
    the model's original layout) in one of `ORIGINAL_FORMS`, and the kohya tensors that hold
    the same layers (without the alphas where the form drops them: alpha = r, scale 1)."""
    down, up, alphas = ORIGINAL_FORMS[form]
    parts = {"lora_down.weight": down, "lora_up.weight": up, "alpha": "alpha"}
    original, same = {}, {}
    for key, value in kohya.items():
        stem, _, part = key.partition(".")
        if part == "alpha" and not alphas:
            continue
        original[f"diffusion_model.{paths[stem]}.{parts[part]}"] = value
        same[key] = value
    return original, same


@pytest.mark.parametrize("form", sorted(ORIGINAL_FORMS))
def test_a_comfyui_flux_file_merges_as_diffusers_fuses_it(tmp_path, flux_parts, form):
    """ComfyUI / ai-toolkit Flux LoRAs (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A
    .weight`, or `.lora_down.weight` / `.alpha`) are the pipeline's `transformer`: read against
    a diffusers Flux transformer, BFL's modules are split and permuted as in sd-scripts'
    files, and the merge and the applied forward are those diffusers fuses from the kohya file
    of the same layers (no alpha: alpha = r). diffusers reads the `lora_down` form as that
    kohya file itself."""
    transformer, _, pipeline = flux_parts
    base = save_state(transformer.state_dict(), tmp_path / "flux.safetensors")
    original, same = original_flux_tensors(kohya_flux_tensors(transformer), form)
    if form == "lora_down":  # (without `linear1`, which diffusers sizes as Flux.1's)
        theirs, kohyas = (
            pipeline.lora_state_dict({k: v for k, v in t.items() if "linear1" not in k})
            for t in (original, same)
        )
        assert theirs.keys() == kohyas.keys()
        assert all(torch.equal(theirs[k], kohyas[k]) for k in theirs)
    lora = tmp_path / "comfy_lora.safetensors"
    save_file(original, str(lora))
    pristine, ours = copy.deepcopy(transformer), copy.deepcopy(transformer)
    before = pristine.state_dict()
    adapter = load_adapter(lora, base=pristine)
    modules = sorted(m for ms in FLUX_BFL_LAYERS.values() for m in ms)
    assert sorted(adapter.layers) == [f"transformer.{m}" for m in modules]
    assert load_adapter(lora).components == ("transformer",)
    diffusers_fuse_kohya_flux(pipeline, transformer, None, same)
    fused = transformer.state_dict()
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    changed = {k for k in merged if not torch.equal(merged[k], before[k])}
    assert changed == {f"{m}.weight" for m in modules}
    for key, weight in merged.items():
        assert torch.allclose(weight, fused[key], rtol=1e-5, atol=1e-6), key
    apply_adapter(ours, lora)
    assert rel(flux_out(ours), flux_out(pristine)) > 1e-3
    assert rel(flux_out(ours), flux_out(transformer)) < 1e-5


def test_a_comfyui_flux_file_written_back_loads_in_diffusers(tmp_path, flux_parts):
    """Converted against the diffusers transformer, a ComfyUI Flux file's layers carry
    diffusers' names: diffusers and PEFT load the diffusers and PEFT outputs to the weights
    diffusers fuses from the same layers. Without a base, kohya output names BFL's modules
    `lora_unet_…`, which diffusers reads as sd-scripts' Flux file, to the same weights; a
    diffusers output keeps BFL's names, which diffusers refuses to load into its model."""
    transformer, _, pipeline = flux_parts
    original, same = original_flux_tensors(kohya_flux_tensors(transformer), "lora_A+alpha")
    lora = tmp_path / "comfy_lora.safetensors"
    save_file(original, str(lora))
    reference = copy.deepcopy(transformer)
    diffusers_fuse_kohya_flux(pipeline, reference, None, same)
    expected = reference.state_dict()

    def assert_fused(loaded):
        for key, weight in loaded.state_dict().items():
            assert torch.allclose(weight, expected[key], rtol=1e-5, atol=1e-6), key

    def diffusers_loads(path):
        loaded = copy.deepcopy(transformer)
        pipe = pipeline(loaded, None)
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(components=["transformer"])
        pipe.unload_lora_weights()
        return loaded

    convert_adapter(lora, tmp_path / "diffusers", "diffusers", base=transformer)
    assert_fused(diffusers_loads(tmp_path / "diffusers"))
    convert_adapter(lora, tmp_path / "peft", "peft", base=transformer)
    peft = pytest.importorskip("peft")
    assert_fused(peft.PeftModel.from_pretrained(copy.deepcopy(transformer), tmp_path / "peft")
                 .merge_and_unload())  # fmt: skip
    convert_adapter(lora, tmp_path / "kohya.safetensors", "kohya")
    written = load_file(str(tmp_path / "kohya.safetensors"))
    assert {k.partition(".")[0] for k in written} == {k.partition(".")[0] for k in same}
    loaded = copy.deepcopy(transformer)
    diffusers_fuse_kohya_flux(pipeline, loaded, None, written)
    assert_fused(loaded)
    convert_adapter(lora, tmp_path / "bfl_diffusers", "diffusers")
    with pytest.raises(Exception, match="not found in the base model"):
        diffusers_loads(tmp_path / "bfl_diffusers")


# a Wan transformer in its original layout (ai-toolkit / ComfyUI names), and the diffusers
# WanTransformer3DModel's name for the first
WAN_ORIGINAL = {"blocks.0.self_attn.q": (24, 16), "blocks.0.cross_attn.o": (16, 24),
                "blocks.0.ffn.0": (32, 16), "head.head": (8, 16)}  # fmt: skip


@pytest.mark.parametrize("form", sorted(ORIGINAL_FORMS))
@pytest.mark.parametrize("model", ["flux", "wan"])
def test_a_comfyui_file_merges_into_its_original_checkpoint(tmp_path, form, model):
    """Against a checkpoint in the model's original layout, a `diffusion_model.` file's names
    are its modules: the merge is float64 W + scale · up @ down, scale alpha / r (1 without
    alpha), nothing split; a Flux file written back as kohya names sd-scripts' modules. A
    Wan file against a diffusers Wan base is named by its modules (`blocks.0.attn1.to_q`)."""
    down_part, up_part, alphas = ORIGINAL_FORMS[form]
    shapes = WAN_ORIGINAL if model == "wan" else {
        "double_blocks.0.img_attn.qkv": (96, 32), "single_blocks.0.linear1": (224, 32),
        "img_in": (32, 4), "final_layer.adaLN_modulation.1": (64, 32)}  # fmt: skip
    g = torch.Generator().manual_seed(9)
    state = {f"{path}.weight": torch.randn(*shape, generator=g) for path, shape in shapes.items()}
    base = save_state(state, tmp_path / "model.safetensors")
    tensors, scales = {}, {}
    for i, (path, (rows, cols)) in enumerate(shapes.items()):
        rank = 2 + i % 2
        tensors[f"diffusion_model.{path}.{down_part}"] = torch.randn(rank, cols, generator=g)
        tensors[f"diffusion_model.{path}.{up_part}"] = torch.randn(rows, rank, generator=g)
        scales[path] = 1.0
        if alphas:
            tensors[f"diffusion_model.{path}.alpha"] = torch.tensor(1.5 + i)
            scales[path] = (1.5 + i) / rank
    lora = tmp_path / "comfy_lora.safetensors"
    save_file(tensors, str(lora))
    adapter = load_adapter(lora, base=base)
    assert sorted(adapter.layers) == sorted(f"transformer.{path}" for path in shapes)
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for path in shapes:
        up, down = (tensors[f"diffusion_model.{path}.{p}"].double() for p in (up_part, down_part))
        expected = state[f"{path}.weight"].double() + scales[path] * up @ down
        assert rel(merged[f"{path}.weight"].double(), expected) < 1e-6, path
    if model == "flux":
        convert_adapter(lora, tmp_path / "kohya.safetensors", "kohya", base=base)
        written = load_file(str(tmp_path / "kohya.safetensors"))
        assert {key.partition(".")[0] for key in written} == {
            "lora_unet_" + path.replace(".", "_") for path in shapes
        }
    else:
        diffusers_names = {"blocks.0.attn1.to_q": (24, 16), "blocks.0.attn2.to_out.0": (16, 24),
                           "blocks.0.ffn.net.0.proj": (32, 16), "proj_out": (8, 16),
                           "condition_embedder.time_proj": (96, 16)}  # fmt: skip
        assert sorted(load_adapter(lora, base=diffusers_names).layers) == [
            f"transformer.{name}" for name in sorted(diffusers_names) if "time_proj" not in name
        ]


@pytest.mark.parametrize(
    ("keys", "error", "named"),
    [
        # a LoKr whose w2 rows (48) straddle to_q / to_k (32 rows each): no exact split
        ({"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": (2, 4),
          "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": (48, 8)},
         errors.TargetError, "img_attn.qkv.*LoKr"),
        ({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (2, 32),
          "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": (90, 2)},
         errors.ShapeError, "img_attn.qkv.*96"),
        ({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (2, 32),
          "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": (2, 32),
          "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": (96, 2)},
         errors.FileFormatError, "img_attn.qkv.*lora_A.*lora_down"),
        ({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (2, 32),
          "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": (96, 2),
          "lora_unet_img_in.lora_down.weight": (2, 4),
          "lora_unet_img_in.lora_up.weight": (32, 2)},
         errors.FileFormatError, "lora_unet_img_in"),
        ({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (2, 32),
          "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": (96, 2),
          "diffusion_model.double_blocks.0.img_attn.qkv.diff_b": (96, 2)},
         errors.ShapeError, r"img_attn\.qkv\.diff_b.*\(out,\)"),
        ({"diffusion_model.lora_A.weight": (2, 32)}, errors.FileFormatError,
         r"'diffusion_model\.lora_A\.weight' is not diffusion_model\.<module>"),
    ],
)  # fmt: skip
def test_a_comfyui_flux_layer_that_cannot_be_read_is_named(tmp_path, keys, error, named):
    """A `diffusion_model.` layer that does not split into the diffusers modules it is, one
    with two spellings of a factor, a file that mixes the layout with kohya's, or a feature
    lowrank does not read, is refused naming it."""
    pytest.importorskip("diffusers")
    from model_factories import tiny_flux

    g = torch.Generator().manual_seed(4)
    lora = tmp_path / "comfy_lora.safetensors"
    save_file({k: torch.randn(*s, generator=g) for k, s in keys.items()}, str(lora))
    with pytest.raises(error, match=named):
        load_adapter(lora, base=tiny_flux())


def tiny_t5(transformers):
    """A tiny transformers `T5EncoderModel` (width 8, one block, gated MLP 16: `wi_0`, `wi_1`)."""
    torch.manual_seed(3)
    return transformers.T5EncoderModel(transformers.T5Config(
        d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, vocab_size=32,
        feed_forward_proj="gated-gelu"))  # fmt: skip


# text encoders' layers beside a Flux file's `diffusion_model.` ones, as ComfyUI names them
# (`text_encoders.<encoder>.transformer.<module>`): CLIP-L's (the `text_encoder`) and T5's
# (Flux's `text_encoder_2`), `{encoder: {module: (the base's module (transformers 5's
# CLIPTextModel has no `text_model`), (out, in))}}`
COMFY_TEXT_LAYERS = {
    "clip_l": {
        "text_model.encoder.layers.0.self_attn.q_proj": ("encoder.layers.0.self_attn.q_proj",
                                                         (12, 12)),
        "text_model.encoder.layers.0.mlp.fc1": ("encoder.layers.0.mlp.fc1", (16, 12)),
        "text_model.encoder.layers.0.mlp.fc2": ("encoder.layers.0.mlp.fc2", (12, 16)),
    },
    "t5xxl": {
        "encoder.block.0.layer.0.SelfAttention.q": ("encoder.block.0.layer.0.SelfAttention.q",
                                                    (8, 8)),
        "encoder.block.0.layer.1.DenseReluDense.wi_0": (
            "encoder.block.0.layer.1.DenseReluDense.wi_0", (16, 8)),
    },
}  # fmt: skip
COMFY_TEXT_COMPONENTS = {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"}


def comfy_text_tensors(form, encoders=("clip_l", "t5xxl")):
    """`text_encoders.<encoder>.transformer.<module>` layers of `COMFY_TEXT_LAYERS`'
    `encoders` in one of `ORIGINAL_FORMS`, and `{(component, base module): (down, up,
    scale)}` of each."""
    down_part, up_part, alphas = ORIGINAL_FORMS[form]
    g = torch.Generator().manual_seed(12)
    tensors, layers = {}, {}
    paths = [(e, p, m) for e in encoders for p, m in COMFY_TEXT_LAYERS[e].items()]
    for i, (encoder, path, (module, (rows, cols))) in enumerate(paths):
        rank, stem = 2 + i % 2, f"text_encoders.{encoder}.transformer.{path}"
        down = torch.randn(rank, cols, generator=g) * 0.3
        up = torch.randn(rows, rank, generator=g) * 0.3
        tensors[f"{stem}.{down_part}"], tensors[f"{stem}.{up_part}"] = down, up
        scale = 1.0
        if alphas:
            tensors[f"{stem}.alpha"] = torch.tensor(1.5 + i)
            scale = (1.5 + i) / rank
        layers[(COMFY_TEXT_COMPONENTS[encoder], module)] = (down, up, scale)
    return tensors, layers


def assert_layers_added(weights, before, layers, component):
    """`weights` are `before` but for the weights of `component`'s `layers`
    (`comfy_text_tensors`), each float64 W + scale · up @ down."""
    mine = {f"{m}.weight": layer for (c, m), layer in layers.items() if c == component}
    assert mine and mine.keys() <= weights.keys()
    for key, weight in weights.items():
        if key not in mine:
            assert torch.equal(weight, before[key]), key
            continue
        down, up, scale = mine[key]
        expected = before[key].double() + scale * up.double() @ down.double()
        assert rel(weight.double(), expected) < 1e-6, key


def merged_into(tmp_path, lora, component, model):
    """`lora` merged into `model`'s checkpoint as `component`: (merged, before)."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = save_state(before, tmp_path / f"{component}.safetensors")
    out = tmp_path / f"{component}_merged.safetensors"
    merge_checkpoint(base, lora, out, component=component)
    return load_file(str(out)), before


@pytest.mark.parametrize("form", sorted(ORIGINAL_FORMS))
def test_a_comfyui_flux_file_with_text_encoders_is_one_pipeline_adapter(
    tmp_path, flux_parts, form
):
    """ComfyUI saves a Flux LoRA's text encoder layers beside its `diffusion_model.` ones,
    `text_encoders.clip_l.transformer.text_model.…` (CLIP-L, the pipeline's `text_encoder`)
    and `text_encoders.t5xxl.transformer.encoder.block.…` (T5, Flux's `text_encoder_2`):
    the file is one adapter of three components, and merged into each component's
    checkpoint (transformers 5's CLIP, without `text_model`) every text layer is float64
    W + scale · up @ down. In the `lora_down` form diffusers' Flux loader reads the file
    itself (the transformer's layers and CLIP's; it drops T5's): the merges of the
    transformer and CLIP-L equal its fused weights."""
    transformers = pytest.importorskip("transformers")
    transformer, text, pipeline = flux_parts
    t5 = tiny_t5(transformers)
    original, _ = original_flux_tensors(kohya_flux_tensors(transformer), form)
    texts, layers = comfy_text_tensors(form)
    lora = tmp_path / "comfy_lora.safetensors"
    save_file({**original, **texts}, str(lora))
    adapter = load_adapter(
        lora, base={"transformer": transformer, "text_encoder": text, "text_encoder_2": t5}
    )
    assert adapter.components == ("text_encoder", "text_encoder_2", "transformer")
    assert {f"{c}.{m}" for c, m in layers} <= set(adapter.layers)
    assert load_adapter(lora).components == adapter.components
    assert_layers_added(*merged_into(tmp_path, lora, "text_encoder", text), layers,
                        "text_encoder")  # fmt: skip
    assert_layers_added(*merged_into(tmp_path, lora, "text_encoder_2", t5), layers,
                        "text_encoder_2")  # fmt: skip
    if form != "lora_down":
        return
    # diffusers 0.42 splits `linear1` by Flux.1's sizes, and reads a CLIP attention layer as
    # `…self_attn.to_q_lora`, which a transformers 5 CLIPTextModel does not load: neither here
    theirs = {k: v for k, v in {**original, **texts}.items()
              if "linear1" not in k and "self_attn" not in k}  # fmt: skip
    lora = tmp_path / "comfy_theirs.safetensors"
    save_file(theirs, str(lora))
    fused, fused_text = copy.deepcopy(transformer), copy.deepcopy(text)
    state, alphas = pipeline.lora_state_dict(theirs, return_alphas=True)
    assert state and not any("block.0.layer" in k for k in state)  # T5's dropped
    state = {k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}": v
             for k, v in state.items()}  # fmt: skip
    pipe = pipeline(fused, fused_text)
    pipe.load_lora_into_transformer(state, network_alphas=alphas, transformer=fused,
                                    _pipeline=pipe)  # fmt: skip
    pipe.load_lora_into_text_encoder(state, network_alphas=alphas, text_encoder=fused_text,
                                     prefix="text_encoder", _pipeline=pipe)  # fmt: skip
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()
    for component, model, reference in (("transformer", transformer, fused),
                                        ("text_encoder", text, fused_text)):  # fmt: skip
        merged, before = merged_into(tmp_path, lora, component, model)
        expected = reference.state_dict()
        changed = {k for k in merged if not torch.equal(merged[k], before[k])}
        assert changed
        assert changed == {k for k in expected if not torch.equal(expected[k], before[k])}
        for key, weight in merged.items():
            assert torch.allclose(weight, expected[key], rtol=1e-5, atol=1e-6), key


def test_a_comfyui_flux_file_with_text_encoders_converts_to_diffusers(tmp_path, flux_parts):
    """Converted to diffusers against a base per component, a ComfyUI Flux file's
    transformer and CLIP-L layers load in diffusers' Flux loader to the transformer diffusers
    fuses from the kohya file of the same layers and CLIP weights float64 W + scale · up @
    down; its T5 layers (`text_encoder_2`, which that loader does not load), converted to
    PEFT, PEFT merges to float64 W + scale · up @ down."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    transformer, text, pipeline = flux_parts
    t5 = tiny_t5(transformers)
    original, same = original_flux_tensors(kohya_flux_tensors(transformer), "lora_A+alpha")
    texts, layers = comfy_text_tensors("lora_A+alpha")
    lora = tmp_path / "comfy_lora.safetensors"
    save_file({**original, **texts}, str(lora))
    bases = {"transformer": transformer, "text_encoder": text, "text_encoder_2": t5}
    reference = copy.deepcopy(transformer)
    diffusers_fuse_kohya_flux(pipeline, reference, None, same)
    clip_file = tmp_path / "comfy_clip.safetensors"
    save_file({**original, **comfy_text_tensors("lora_A+alpha", ("clip_l",))[0]}, str(clip_file))
    convert_adapter(clip_file, tmp_path / "diffusers", "diffusers", base=bases)
    loaded, loaded_text = copy.deepcopy(transformer), copy.deepcopy(text)
    pipe = pipeline(loaded, loaded_text)
    pipe.load_lora_weights(str(tmp_path / "diffusers"))
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()
    expected = reference.state_dict()
    for key, weight in loaded.state_dict().items():
        assert torch.allclose(weight, expected[key], rtol=1e-5, atol=1e-6), key
    assert_layers_added(loaded_text.state_dict(), text.state_dict(), layers, "text_encoder")
    convert_adapter(lora, tmp_path / "peft_t5", "peft", base=bases, component="text_encoder_2")
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(t5), tmp_path / "peft_t5")
    assert_layers_added(merged.merge_and_unload().state_dict(), t5.state_dict(), layers,
                        "text_encoder_2")  # fmt: skip


@pytest.mark.parametrize("t5_prefix", ["lora_te2_", "lora_te3_"])
def test_kohya_text_layers_beside_a_comfyui_flux_file_are_the_text_encoders(
    tmp_path, flux_parts, t5_prefix
):
    """kohya-named text encoder layers beside `diffusion_model.` ones (`lora_te1_` CLIP;
    Flux's T5 `lora_te2_` as OneTrainer names it, `lora_te3_` as sd-scripts does, both
    Flux's `text_encoder_2`, as ComfyUI reads them) are read without a base as the modules
    they name (`text_encoder.text_model.encoder.layers.0.mlp.fc1`, `text_encoder_2.encoder
    .block.0.layer.1.DenseReluDense.wi_0`), and merge as float64 W + scale · up @ down."""
    transformers = pytest.importorskip("transformers")
    transformer, text, _ = flux_parts
    t5 = tiny_t5(transformers)
    original, _ = original_flux_tensors(kohya_flux_tensors(transformer), "lora_A")
    texts, layers = comfy_text_tensors("lora_down")
    prefixes = {"clip_l": "lora_te1_", "t5xxl": t5_prefix}
    kohya = {}
    for key, value in texts.items():
        encoder, _, rest = key.removeprefix("text_encoders.").partition(".transformer.")
        part = next(p for p in ("lora_down.weight", "lora_up.weight", "alpha") if key.endswith(p))
        module = rest.removesuffix(f".{part}").replace(".", "_")
        kohya[f"{prefixes[encoder]}{module}.{part}"] = value
    lora = tmp_path / "mixed.safetensors"
    save_file({**original, **kohya}, str(lora))
    adapter = load_adapter(lora)
    assert adapter.components == ("text_encoder", "text_encoder_2", "transformer")
    assert {"text_encoder.text_model.encoder.layers.0.mlp.fc1",
            "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0"} <= set(adapter.layers)
    assert_layers_added(*merged_into(tmp_path, lora, "text_encoder", text), layers,
                        "text_encoder")  # fmt: skip
    assert_layers_added(*merged_into(tmp_path, lora, "text_encoder_2", t5), layers,
                        "text_encoder_2")  # fmt: skip


def sd_scripts_t5_tensors(component="text_encoder_2"):
    """`COMFY_TEXT_LAYERS`' T5 layers as sd-scripts names them (`lora_te3_encoder_block_0_…`),
    and `{(component, base module): (down, up, scale)}` of each."""
    texts, layers = comfy_text_tensors("lora_down", encoders=("t5xxl",))
    kohya = {}
    for key, value in texts.items():
        rest = key.removeprefix("text_encoders.t5xxl.transformer.")
        part = next(p for p in ("lora_down.weight", "lora_up.weight", "alpha") if key.endswith(p))
        kohya[f"lora_te3_{rest.removesuffix(f'.{part}').replace('.', '_')}.{part}"] = value
    return kohya, {(component, module): layer for (_, module), layer in layers.items()}


def test_sd_scripts_flux_t5_layers_are_the_pipelines_text_encoder_2(tmp_path, flux_parts):
    """sd-scripts names Flux's T5 `lora_te3_` (SD3's third encoder's prefix); beside its
    `lora_unet_double_blocks_…` layers they are the Flux pipeline's `text_encoder_2`, and
    merge into the T5's checkpoint as float64 W + scale · up @ down (they were read as a
    `text_encoder_3` no Flux pipeline has)."""
    transformers = pytest.importorskip("transformers")
    transformer = flux_parts[0]
    t5 = tiny_t5(transformers)
    kohya, layers = sd_scripts_t5_tensors()
    lora = tmp_path / "flux_lora.safetensors"
    save_file({**kohya_flux_tensors(transformer), **kohya}, str(lora))
    t5_state = {key: value.clone() for key, value in t5.state_dict().items()}
    t5_base = save_state(t5_state, tmp_path / "t5_base.safetensors")
    adapter = load_adapter(lora, base={"transformer": transformer, "text_encoder_2": t5_base})
    assert adapter.components == ("text_encoder_2", "transformer")
    assert_layers_added(*merged_into(tmp_path, lora, "text_encoder_2", t5), layers,
                        "text_encoder_2")  # fmt: skip


@pytest.mark.parametrize(
    ("metadata", "component"),
    [
        ({"ss_base_model_version": "flux1"}, "text_encoder_2"),
        ({"modelspec.architecture": "flux-1-dev/lora"}, "text_encoder_2"),
        ({"modelspec.architecture": "chroma/lora"}, "text_encoder"),
        ({"modelspec.architecture": "stable-diffusion-3-medium/lora"}, "text_encoder_3"),
    ],
)  # fmt: skip
def test_sd_scripts_t5_layers_alone_are_the_component_the_metadata_tells(
    tmp_path, metadata, component
):
    """A file of sd-scripts' T5 layers alone (`lora_te3_…`, no transformer layers) is told by
    its metadata: Flux's (`ss_base_model_version` `flux1`, `modelspec.architecture`
    `flux-1-…`) T5 is the pipeline's `text_encoder_2`, Chroma's its `text_encoder`, SD3's
    its `text_encoder_3`; merged as that component into the T5's checkpoint each layer is
    float64 W + scale · up @ down, and no other component has layers (a Flux or Chroma
    file was read as SD3's `text_encoder_3`)."""
    transformers = pytest.importorskip("transformers")
    t5 = tiny_t5(transformers)
    kohya, layers = sd_scripts_t5_tensors(component)
    lora = tmp_path / "t5_lora.safetensors"
    save_file(kohya, str(lora), metadata=metadata)
    assert_layers_added(*merged_into(tmp_path, lora, component, t5), layers, component)
    other = next(c for c in ("text_encoder_2", "text_encoder_3") if c != component)
    with pytest.raises(errors.TargetError, match=f"no layers for component '{other}'"):
        merged_into(tmp_path, lora, other, t5)


def test_sd_scripts_t5_layers_nothing_tells_take_the_bases_component(tmp_path):
    """sd-scripts' T5 layers alone with no metadata are Flux's `text_encoder_2`, Chroma's
    `text_encoder` or SD3's `text_encoder_3`: used without a base that tells (a merge into
    one checkpoint, one base to resolve against) they are a `FileFormatError` naming the
    layer and the choices, nothing written; against bases per component, or merged as a
    component, they are the component of the pipeline given (`text_encoder_3` where it is
    there, else `text_encoder_2`), each layer float64 W + scale · up @ down (they were read as
    `text_encoder_3` whatever the pipeline)."""
    transformers = pytest.importorskip("transformers")
    t5 = tiny_t5(transformers)
    kohya, _ = sd_scripts_t5_tensors()
    lora = tmp_path / "t5_lora.safetensors"
    save_file(kohya, str(lora))
    base = save_state({k: v.clone() for k, v in t5.state_dict().items()},
                      tmp_path / "t5.safetensors")  # fmt: skip
    named = (r"layer 'lora_te3_encoder_block_0_layer_0_SelfAttention_q'.*Flux's text_encoder_2"
             r".*Chroma's text_encoder.*SD3's text_encoder_3")  # fmt: skip
    with pytest.raises(errors.FileFormatError, match=named):
        merge_checkpoint(base, lora, tmp_path / "out.safetensors")
    with pytest.raises(errors.FileFormatError, match=named):
        load_adapter(lora, base=base)
    assert not (tmp_path / "out.safetensors").exists()
    for pipeline, component in (
        (("text_encoder", "text_encoder_2"), "text_encoder_2"),
        (("text_encoder_2", "text_encoder_3"), "text_encoder_3"),
    ):
        bases = {c: base if c == component else {"unused": (1, 1)} for c in pipeline}
        assert load_adapter(lora, base=bases).components == (component,)
        layers = sd_scripts_t5_tensors(component)[1]
        assert_layers_added(*merged_into(tmp_path, lora, component, t5), layers, component)


def tiny_chroma():
    """A diffusers `ChromaTransformer2DModel` at toy sizes: one double and one single block,
    2 heads of 8 (width 16), text width 8, a one-layer `distilled_guidance_layer`."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(5)
    return diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=8, axes_dims_rope=(2, 2, 4),
        approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1)  # fmt: skip


# a ComfyUI Chroma file's transformer layers (Black Forest Labs' layout, as Flux's):
# `{module: (its diffusers module, (out, in))}`; `distilled_guidance_layer` is Chroma's alone
COMFY_CHROMA_LAYERS = {
    "double_blocks.0.img_attn.proj": ("transformer_blocks.0.attn.to_out.0", (16, 16)),
    "distilled_guidance_layer.in_proj": ("distilled_guidance_layer.in_proj", (16, 8)),
}


def test_a_comfyui_chroma_file_s_t5_is_the_chroma_pipelines_text_encoder(tmp_path):
    """ComfyUI names Chroma's T5 `text_encoders.t5xxl.…` as Flux's; diffusers' ChromaPipeline
    holds it as its `text_encoder` (its only text encoder; Flux's is CLIP-L, its T5
    `text_encoder_2`). Beside a layer on Chroma's `distilled_guidance_layer` the T5 layers
    are the `text_encoder`'s (they were read as a `text_encoder_2` the Chroma pipeline does
    not have): converted to PEFT as that component, PEFT's `merge_and_unload` of the T5
    gives float64 W + scale · up @ down (diffusers' loader reads CLIP text encoders' layers
    only); converted to diffusers against a base per component, diffusers' Chroma loader
    (`FluxLoraLoaderMixin`) + `fuse_lora` gives the Chroma transformer float64 W + scale ·
    up @ down on the modules the transformer's layers name."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    transformer, t5 = tiny_chroma(), tiny_t5(transformers)
    texts, layers = comfy_text_tensors("lora_A+alpha", encoders=("t5xxl",))
    g = torch.Generator().manual_seed(6)
    tensors, deltas = dict(texts), {}
    for path, (module, (rows, cols)) in COMFY_CHROMA_LAYERS.items():
        down, up = torch.randn(2, cols, generator=g), torch.randn(rows, 2, generator=g)
        tensors[f"diffusion_model.{path}.lora_A.weight"] = down
        tensors[f"diffusion_model.{path}.lora_B.weight"] = up
        tensors[f"diffusion_model.{path}.alpha"] = torch.tensor(3.0)
        deltas[f"{module}.weight"] = 1.5 * up.double() @ down.double()
    lora = tmp_path / "comfy_chroma.safetensors"
    save_file(tensors, str(lora))
    assert load_adapter(lora).components == ("text_encoder", "transformer")
    bases = {"transformer": transformer, "text_encoder": t5}
    convert_adapter(lora, tmp_path / "peft_t5", "peft", base=bases, component="text_encoder")
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(t5), tmp_path / "peft_t5")
    assert_layers_added(merged.merge_and_unload().state_dict(), t5.state_dict(),
                        {("text_encoder", m): v for (_, m), v in layers.items()},
                        "text_encoder")  # fmt: skip
    out = tmp_path / "chroma_diffusers.safetensors"
    convert_adapter(lora, out, "diffusers", base=bases)
    with safe_open(str(out), "pt") as written:  # the transformer's keys, with the settings
        metadata = written.metadata()
    theirs = tmp_path / "chroma_transformer.safetensors"
    save_file({k: v for k, v in load_file(str(out)).items() if k.startswith("transformer.")},
              str(theirs), metadata=metadata)  # fmt: skip
    pipeline = stand_in_pipeline(
        diffusers.loaders.FluxLoraLoaderMixin, ("transformer", "text_encoder")
    )
    loaded = copy.deepcopy(transformer)
    pipe = pipeline(loaded, copy.deepcopy(t5))
    pipe.load_lora_weights(str(theirs))
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    before = transformer.state_dict()
    for key, weight in loaded.state_dict().items():
        expected = before[key].double() + deltas.get(key, 0)
        assert rel(weight.double(), expected) < 1e-6, key


# Chroma's approximator in its original layout → diffusers' ChromaTransformer2DModel: each
# layer's `in_layer` / `out_layer` are `linear_1` / `linear_2`; `in_proj`, `out_proj` and the
# RMSNorms `norms.N` are named alike
CHROMA_APPROXIMATOR = {
    "distilled_guidance_layer.layers.0.in_layer": "distilled_guidance_layer.layers.0.linear_1",
    "distilled_guidance_layer.layers.0.out_layer": "distilled_guidance_layer.layers.0.linear_2",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}


@pytest.mark.parametrize("naming", ["comfyui", "kohya"])
def test_a_chroma_approximator_layer_in_the_original_layout_merges_as_diffusers_loads_it(
    tmp_path, naming
):
    """ComfyUI's and sd-scripts' Chroma LoRAs name the approximator's layers by the original
    modules (`diffusion_model.distilled_guidance_layer.layers.0.in_layer`,
    `lora_unet_distilled_guidance_layer_layers_0_out_layer`), which diffusers' single-file
    converter renames (`….layers.0.linear_1` / `linear_2`). Merged into the diffusers
    transformer's checkpoint, each module is float64 W + scale · up @ down (they were a
    `TargetError`); converted to diffusers against the
    transformer, diffusers' Chroma loader + `fuse_lora` gives the same LoRA weights."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    transformer = tiny_chroma()
    before = transformer.state_dict()
    g = torch.Generator().manual_seed(8)
    tensors, deltas = {}, {}
    for path, module in CHROMA_APPROXIMATOR.items():
        rows, cols = before[f"{module}.weight"].shape
        down, up = torch.randn(2, cols, generator=g), torch.randn(rows, 2, generator=g)
        stem = (f"diffusion_model.{path}" if naming == "comfyui"
                else "lora_unet_" + path.replace(".", "_"))  # fmt: skip
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.alpha"] = torch.tensor(3.0)
        deltas[f"{module}.weight"] = 1.5 * up.double() @ down.double()
    lora = tmp_path / "chroma.safetensors"
    save_file(tensors, str(lora))
    base = save_state(before, tmp_path / "transformer.safetensors")
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for key, weight in merged.items():
        expected = before[key].double() + deltas.get(key, 0)
        assert rel(weight.double(), expected) < 1e-6, key
    assert {k for k in merged if not torch.equal(merged[k], before[k])} == set(deltas)
    out = tmp_path / "chroma_diffusers.safetensors"
    convert_adapter(lora, out, "diffusers", base=transformer, component="transformer")
    pipeline = stand_in_pipeline(
        diffusers.loaders.FluxLoraLoaderMixin, ("transformer",), absent=("text_encoder",)
    )
    loaded = copy.deepcopy(transformer)
    pipe = pipeline(loaded)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    for key, weight in loaded.state_dict().items():
        assert rel(weight.double(), before[key].double() + deltas.get(key, 0)) < 1e-6, key


@pytest.mark.parametrize(
    ("diffusion", "metadata", "component"),
    [
        # a module only Flux has (a block's modulation, the guidance embedder)
        ("double_blocks.0.img_mod.lin", {}, "text_encoder_2"),
        ("guidance_in.in_layer", {}, "text_encoder_2"),
        ("distilled_guidance_layer.in_proj", {}, "text_encoder"),
        # a block both have: the metadata tells
        ("double_blocks.0.img_attn.proj", {"modelspec.architecture": "chroma/lora"},
         "text_encoder"),
        ("double_blocks.0.img_attn.proj", {"ss_base_model_version": "flux1"}, "text_encoder_2"),
    ],
)  # fmt: skip
def test_a_comfyui_t5_beside_flux_s_layout_is_told_flux_or_chroma(
    tmp_path, diffusion, metadata, component
):
    """Flux's and Chroma's layers in Black Forest Labs' layout are alike but for the modules
    only one has; a `t5xxl` layer beside them is Flux's `text_encoder_2` or Chroma's
    `text_encoder` as those or the metadata tell, and merges into that component's
    checkpoint as float64 W + scale · up @ down (with neither telling, the refusal is
    `test_a_comfyui_text_encoder_layer_that_cannot_be_told_is_named`)."""
    g = torch.Generator().manual_seed(9)
    path = "encoder.block.0.layer.0.SelfAttention.q"
    down, up = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    stem = f"text_encoders.t5xxl.transformer.{path}"
    tensors = {f"diffusion_model.{diffusion}.lora_A.weight": torch.randn(2, 8, generator=g),
               f"diffusion_model.{diffusion}.lora_B.weight": torch.randn(16, 2, generator=g),
               f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}  # fmt: skip
    lora = tmp_path / "comfy_lora.safetensors"
    save_file(tensors, str(lora), metadata=metadata)
    assert load_adapter(lora).components == (component, "transformer")
    weight = torch.randn(8, 8, generator=g)
    base = save_state({f"{path}.weight": weight}, tmp_path / "t5.safetensors")
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors", component=component)
    merged = load_file(str(tmp_path / "merged.safetensors"))[f"{path}.weight"]
    assert rel(merged.double(), weight.double() + up.double() @ down.double()) < 1e-6


@pytest.mark.parametrize(
    ("diffusion", "encoders"),
    [
        # SD3 (MMDiT's `joint_blocks`): CLIP-L, CLIP-G, T5 are text_encoder, _2, _3
        ("joint_blocks.0.x_block.attn.qkv", {"clip_l": "text_encoder", "clip_g": "text_encoder_2",
                                             "t5xxl": "text_encoder_3"}),
        # SDXL's UNet: CLIP-L and CLIP-G
        ("input_blocks.4.1.proj_in", {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}),
        # SD 2's: CLIP-H
        ("input_blocks.4.1.proj_in", {"clip_h": "text_encoder"}),
    ],
)  # fmt: skip
def test_comfyui_text_encoders_are_their_pipelines_components(tmp_path, diffusion, encoders):
    """ComfyUI's `clip_l`, `clip_h`, `clip_g` and `t5xxl` layers are the components diffusers'
    SD3, SDXL and SD 2 pipelines hold those encoders as (SD3's T5 `text_encoder_3`, beside
    `joint_blocks`), each merging into its checkpoint as float64 W + scale · up @ down."""
    g = torch.Generator().manual_seed(8)
    module = "text_model.encoder.layers.0.self_attn.q_proj"
    tensors = {f"diffusion_model.{diffusion}.lora_A.weight": torch.randn(2, 8, generator=g),
               f"diffusion_model.{diffusion}.lora_B.weight": torch.randn(24, 2, generator=g)}
    layers = {}
    for i, encoder in enumerate(encoders):
        path = "encoder.block.0.layer.0.SelfAttention.q" if encoder == "t5xxl" else module
        down, up = torch.randn(2 + i, 8, generator=g), torch.randn(8, 2 + i, generator=g)
        stem = f"text_encoders.{encoder}.transformer.{path}"
        tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                    f"{stem}.alpha": torch.tensor(3.0)}  # fmt: skip
        layers[encoders[encoder]] = (path, up.double() @ down.double() * 3.0 / (2 + i))
    lora = tmp_path / "comfy_lora.safetensors"
    save_file(tensors, str(lora))
    adapter = load_adapter(lora)
    unet = "unet" if diffusion.startswith("input_blocks") else "transformer"
    assert adapter.components == tuple(sorted({unet, *encoders.values()}))
    for component, (path, delta) in layers.items():
        assert f"{component}.{path}" in adapter.layers
        weight = torch.randn(8, 8, generator=g)
        base = save_state({f"{path}.weight": weight}, tmp_path / f"{component}.safetensors")
        out = tmp_path / f"{component}_merged.safetensors"
        merge_checkpoint(base, lora, out, component=component)
        merged = load_file(str(out))[f"{path}.weight"]
        assert rel(merged.double(), weight.double() + delta) < 1e-6, component


COMFY_FLUX_LAYER = {"diffusion_model.img_in.lora_A.weight": (2, 4),
                    "diffusion_model.img_in.lora_B.weight": (32, 2)}  # fmt: skip
COMFY_Q = "text_encoders.{}.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_{}.weight"


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        # T5 is Flux's text_encoder_2 and SD3's text_encoder_3: a file of neither tells none
        ({COMFY_Q.format("t5xxl", "A"): (2, 8), COMFY_Q.format("t5xxl", "B"): (8, 2),
          **COMFY_FLUX_LAYER}, r"t5xxl.*SelfAttention\.q\.lora_A.*nothing tells"),
        ({COMFY_Q.format("umt5xxl", "A"): (2, 8), COMFY_Q.format("umt5xxl", "B"): (8, 2)},
         r"umt5xxl.*SelfAttention\.q\.lora_A.*no pipeline component"),
        ({"text_encoders.clip_l.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": (2, 12)},
         r"clip_l\.text_model.*not text_encoders\.<encoder>\.transformer"),
        # a kohya name that is no CLIP or T5 module cannot be told without a base
        ({"lora_te1_text_model_encoder_layers_0_mlp_fc_1.lora_down.weight": (2, 12),
          **COMFY_FLUX_LAYER}, r"lora_te1_text_model_encoder_layers_0_mlp_fc_1.*CLIP"),
        # one module in two spellings
        ({"text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_A.weight":
          (2, 12), "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_A.weight": (2, 12)},
         r"text_encoder\.text_model\.encoder\.layers\.0\.mlp\.fc1.*spelled one way"),
    ],
)  # fmt: skip
def test_a_comfyui_text_encoder_layer_that_cannot_be_told_is_named(tmp_path, keys, named):
    """A ComfyUI text encoder layer whose component the file does not tell, of an encoder
    lowrank knows no component of, not under `transformer.`, a kohya text layer of no known
    module, or a module named twice, is a `FileFormatError` naming the key; nothing is
    written."""
    g = torch.Generator().manual_seed(4)
    lora = tmp_path / "comfy_lora.safetensors"
    save_file({k: torch.randn(*s, generator=g) for k, s in keys.items()}, str(lora))
    with pytest.raises(errors.FileFormatError, match=named):
        load_adapter(lora)
    with pytest.raises(errors.FileFormatError, match=named):
        convert_adapter(lora, tmp_path / "out.safetensors", "kohya")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comfy_lora.safetensors"]


# the words of the LDM UNet's module names that hold an underscore
LDM_WORDS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb",
             "in_layers", "out_layers", "emb_layers", "skip_connection", "transformer_blocks",
             "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out")  # fmt: skip


def ldm_paths(bodies):
    """`{kohya stem: LDM module path}` of kohya LDM names' bodies (`input_blocks_4_1_proj_in`
    → `input_blocks.4.1.proj_in`)."""
    words = re.compile("|".join(LDM_WORDS) + "|[^_]+")
    return {f"lora_unet_{body}": ".".join(words.findall(body)) for body in bodies}


def comfyui_unet_file(tmp_path, unet, bodies, form):
    """A ComfyUI UNet LoRA (`diffusion_model.<LDM path>.<part>`, one of `ORIGINAL_FORMS`) of
    random layers on the modules `bodies` names (`write_kohya_unet_file`), its tensors, and
    the kohya file of the same layers (`lora_unet_<body>`)."""
    write_kohya_unet_file(tmp_path / "kohya_all.safetensors", unet, bodies)
    kohya = load_file(str(tmp_path / "kohya_all.safetensors"))
    original, same = original_tensors(kohya, ldm_paths(bodies), form)
    lora, reference = tmp_path / "comfy_lora.safetensors", tmp_path / "kohya.safetensors"
    save_file(original, str(lora))
    save_file(same, str(reference))
    return lora, original, reference


@pytest.mark.parametrize("form", sorted(ORIGINAL_FORMS))
@pytest.mark.parametrize("layout", ["sdxl", "sd1"])
def test_a_comfyui_unet_file_merges_as_diffusers_fuses_its_kohya_file(tmp_path, layout, form):
    """ComfyUI's LoRAs of a Stable Diffusion UNet name its LDM modules under
    `diffusion_model.` (`diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q
    .lora_A.weight`, or `.lora_down.weight` / `.alpha`): the whole file is the pipeline's
    `unet` (its `time_embed`, `label_emb`, `out` layers too), each layer read against a
    diffusers UNet is the module its LDM path is, and the merge equals what diffusers fuses
    from the kohya file of the same layers (`lora_unet_input_blocks_4_1_…`), as does the
    forward of the UNet it is applied to. Written as kohya without a base, the layers are
    that file's. diffusers 0.42 converts none of the
    `diffusion_model.` keys."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    config, bodies = {"sdxl": (TINY_SDXL_UNET, SDXL_LDM_LAYERS),
                      "sd1": (TINY_UNET, SD1_LDM_LAYERS)}[layout]  # fmt: skip
    unet = diffusers.UNet2DConditionModel(**config)
    base = save_state(unet.state_dict(), tmp_path / "unet.safetensors")
    lora, original, reference = comfyui_unet_file(tmp_path, unet, bodies, form)
    read = load_adapter(lora)
    assert read.components == ("unet",)
    assert sorted(read.layers) == sorted(f"unet.{path}" for path in ldm_paths(bodies).values())
    adapter = load_adapter(lora, base=unet)
    assert sorted(adapter.layers) == sorted(f"unet.{name}" for name in bodies.values())
    pristine = copy.deepcopy(unet)
    state, _ = unet_pipeline(layout)(pristine).lora_state_dict(str(lora), unet_config=unet.config)
    assert state.keys() == original.keys()
    before = pristine.state_dict()
    diffusers_fuse_kohya_unet(layout, unet, reference)
    fused = unet.state_dict()
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    changed = {k for k in merged if not torch.equal(merged[k], before[k])}
    assert changed == {f"{name}.weight" for name in bodies.values()}
    for key, weight in merged.items():
        assert torch.allclose(weight, fused[key], rtol=1e-5, atol=1e-6), key
    if layout == "sdxl":
        ours = copy.deepcopy(pristine)
        apply_adapter(ours, lora)
        assert rel(sdxl_unet_out(ours), sdxl_unet_out(unet)) < 1e-5
    convert_adapter(lora, tmp_path / "back.safetensors", "kohya")
    written, same = load_file(str(tmp_path / "back.safetensors")), load_file(str(reference))
    assert {k.partition(".")[0] for k in written} == {k.partition(".")[0] for k in same}
    assert all(torch.equal(written[k], value) for k, value in same.items())


@pytest.mark.parametrize("form", sorted(ORIGINAL_FORMS))
def test_a_comfyui_unet_file_merges_into_an_ldm_checkpoint(tmp_path, form):
    """Against a UNet checkpoint in the LDM layout (an original SDXL checkpoint's UNet, its
    `model.diffusion_model.` prefix taken off) a ComfyUI UNet file's names are its modules:
    the merge is float64 W + scale · up @ down, scale alpha / r (1 without an alpha). The
    whole original checkpoint (`model.diffusion_model.input_blocks.…`) is refused, naming
    the layer and saying so, as it is for the kohya file of the same layers, and nothing is
    written."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DConditionModel(**TINY_SDXL_UNET)
    modules, paths = dict(unet.named_modules()), ldm_paths(SDXL_LDM_LAYERS)
    state = {}
    for body, name in SDXL_LDM_LAYERS.items():
        for part, tensor in modules[name].named_parameters():
            state[f"{paths['lora_unet_' + body]}.{part}"] = tensor.detach()
    base = save_state(state, tmp_path / "ldm_unet.safetensors")
    lora, original, kohya = comfyui_unet_file(tmp_path, unet, SDXL_LDM_LAYERS, form)
    adapter = load_adapter(lora, base=base)
    assert sorted(adapter.layers) == sorted(f"unet.{path}" for path in paths.values())
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    down_part, up_part, alphas = ORIGINAL_FORMS[form]
    for path in paths.values():
        up, down = (original[f"diffusion_model.{path}.{p}"].double() for p in (up_part, down_part))
        weight = state[f"{path}.weight"].double()
        scale = 1.5 / down.shape[0] if alphas else 1.0
        expected = weight + scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        assert rel(merged[f"{path}.weight"].double(), expected) < 1e-6, path
        if f"{path}.bias" in state:
            assert torch.equal(merged[f"{path}.bias"], state[f"{path}.bias"])
    whole = save_state({f"model.diffusion_model.{k}": v for k, v in state.items()},
                       tmp_path / "sdxl.safetensors")  # fmt: skip
    with pytest.raises(errors.TargetError, match=r"layer 'unet\.input_blocks\.0\.0' .*whole "
                       r"single-file checkpoint.*'model\.diffusion_model\.'"):  # fmt: skip
        merge_checkpoint(whole, lora, tmp_path / "whole_merged.safetensors")
    with pytest.raises(errors.TargetError, match=r"'lora_unet_input_blocks_0_0' .*whole "
                       r"single-file checkpoint.*'model\.diffusion_model\.'"):  # fmt: skip
        merge_checkpoint(whole, kohya, tmp_path / "whole_merged.safetensors")
    assert not (tmp_path / "whole_merged.safetensors").exists()


@pytest.mark.parametrize(
    "paths",
    [
        ("input_blocks.9.0.in_layers.2",),  # past TINY_SDXL_UNET's 9 input blocks
        ("input_blocks.1.1.proj_in",),  # its first level has no attention
        ("output_blocks.8.1.conv",),  # the last up level has no upsampler
        ("input_blocks.4.1.proj_in", "double_blocks.0.img_attn.qkv"),  # a Flux layer among
    ],
)  # fmt: skip
def test_a_comfyui_unet_layer_of_no_module_is_named(tmp_path, paths):
    """A `diffusion_model.` LDM path that is no module of the diffusers UNet is a
    `TargetError` naming the layer; a file with a layer in an LDM UNet block is the `unet`'s
    as a whole, so a layer of another model in it is refused by name, not read as a
    `transformer`."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DConditionModel(**TINY_SDXL_UNET)
    tensors = {}
    for path in paths:
        tensors[f"diffusion_model.{path}.lora_A.weight"] = torch.zeros(2, 16)
        tensors[f"diffusion_model.{path}.lora_B.weight"] = torch.zeros(16, 2)
    lora = tmp_path / "comfy_lora.safetensors"
    save_file(tensors, str(lora))
    assert load_adapter(lora).components == ("unet",)
    with pytest.raises(errors.TargetError, match=re.escape(f"layer 'unet.{paths[-1]}'")):
        load_adapter(lora, base=unet)


# ComfyUI's SDXL LoRA names (`diffusion_model.` + the LDM module's dotted path) and the
# modules of `TINY_SDXL_UNET` they are
SDXL_LDM_PATHS = {
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q":
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    "middle_block.1.transformer_blocks.1.attn2.to_k":
        "mid_block.attentions.0.transformer_blocks.1.attn2.to_k",
    "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv",
    "time_embed.0": "time_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}  # fmt: skip


@pytest.mark.parametrize("form", sorted(ORIGINAL_FORMS))
def test_a_comfyui_sdxl_unet_file_is_the_unet(tmp_path, form):
    """ComfyUI saves an SDXL (or SD) UNet's LoRA as `diffusion_model.` + LDM module paths:
    its layers are the pipeline's `unet`, each the diffusers UNet module it is, so the merge
    into a diffusers UNet is float64 W + scale · up @ down on those modules; written as kohya
    without a base they are `lora_unet_input_blocks_…`, as sd-scripts names SDXL's, which
    merge the same."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_SDXL_UNET)
    state = unet.state_dict()
    base = save_state(state, tmp_path / "unet.safetensors")
    modules = dict(unet.named_modules())
    down_part, up_part, alphas = ORIGINAL_FORMS[form]
    g = torch.Generator().manual_seed(2)
    tensors, delta = {}, {}
    for path, name in SDXL_LDM_PATHS.items():
        out_f, in_f, *kernel = modules[name].weight.shape
        down = torch.randn(2, in_f, *kernel, generator=g)
        up = torch.randn(out_f, 2, *[1] * len(kernel), generator=g)
        tensors[f"diffusion_model.{path}.{down_part}"] = down
        tensors[f"diffusion_model.{path}.{up_part}"] = up
        scale = 1.0
        if alphas:
            tensors[f"diffusion_model.{path}.alpha"] = torch.tensor(3.0)
            scale = 1.5
        delta[name] = scale * torch.einsum("or,ri...->oi...", up.double().flatten(1), down.double())
    lora = tmp_path / "comfy_sdxl.safetensors"
    save_file(tensors, str(lora))
    assert load_adapter(lora).components == ("unet",)
    assert sorted(load_adapter(lora, base=unet).layers) == sorted(
        f"unet.{name}" for name in SDXL_LDM_PATHS.values())  # fmt: skip
    convert_adapter(lora, tmp_path / "kohya.safetensors", "kohya")
    assert {k.partition(".")[0] for k in load_file(str(tmp_path / "kohya.safetensors"))} == {
        "lora_unet_" + path.replace(".", "_") for path in SDXL_LDM_PATHS}
    for source in (lora, tmp_path / "kohya.safetensors"):
        merge_checkpoint(base, source, tmp_path / "merged.safetensors")
        merged = load_file(str(tmp_path / "merged.safetensors"))
        for key, weight in merged.items():
            name = key.removesuffix(".weight")
            want = state[key].double() + delta[name] if name in delta else state[key].double()
            assert torch.allclose(weight.double(), want, rtol=1e-5, atol=1e-5), key
