"""lowrank.report.count_model: reference figures, meta device, agreement with real injected
modules, the seed wrapper's dict config, the report's table and JSON, and every error."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from model_factories import Classifier, TinyNet, mlp_head, sd_v1_unet_config
from torch import nn

from lowrank import ArgumentError, DTypeError, NonFiniteError, RankError, TargetError
from lowrank.nn import count_parameters, inject
from lowrank.report import count_model
from lowrank.targets import matches


def test_sd_v1_unet_rank8_to_q_to_v_reference_figures():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**sd_v1_unet_config())
    report = count_model(unet, ["to_q", "to_v"], rank=8)
    assert report.base_params == 859_520_964
    assert report.adapter_params == 797_184
    assert len(report.rows) == 64
    assert all(p.is_meta for p in unet.parameters())
    assert report.adapter_bytes == 797_184 * 4
    assert report.adapter_adam_bytes == 797_184 * 8
    assert report.full_adam_bytes == 859_520_964 * 8
    # the documented glob: q, k, v of the 16 self-attentions (not to_out, a ModuleList)
    assert len(count_model(unet, "*.attn1.to_[qkv]", rank=8).rows) == 48


def test_sd_v1_unet_centre_tap_names_the_strided_conv():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**sd_v1_unet_config())
    with pytest.raises(TargetError, match=r"down_blocks\.0\.downsamplers\.0\.conv.*stride"):
        count_model(unet, "re:.*resnets.*conv[12]|.*downsamplers.*conv", rank=4, form="centre_tap")


def test_mlp_head_rank4_adds_6376():
    report = count_model(mlp_head(), ["0", "2", "4", "6"], rank=4)
    assert report.adapter_params == 6_376
    assert [row.name for row in report.rows] == ["0", "2", "4", "6"]


def test_cifar_classifier_rank4_and_the_write_ups_15370():
    with torch.device("meta"):
        model = Classifier()
    rank4 = count_model(model, "fc1,fc2,fc3", rank=4)
    rank1 = count_model(model, "fc1,fc2,fc3", rank=1)
    assert rank4.base_params == 20_998_154
    assert rank4.adapter_params == 61_480
    assert rank1.adapter_params == 15_370  # the write-up's "rank 4" figure is rank 1's
    assert f"{100 * rank1.adapter_params / rank1.base_params:.3f}" == "0.073"


CASES = [
    (["to_q", "to_v", "temporal", "volume", "head.0", "head.2"], "lora", 2),
    (["blocks.*.conv", "blocks.*.proj", "temporal", "volume", "to_q"], "centre_tap", 3),
    (["re:blocks\\.\\d\\.(conv|down|proj)", "volume", "to_v"], "tucker2", (3, 2)),
    (["re:blocks\\.\\d\\.(conv|down|proj)", "temporal", "volume", "head.2"], "cp", 4),
]


@pytest.mark.parametrize(("targets", "form", "rank"), CASES)
def test_counts_equal_real_injected_modules(targets, form, rank):
    with torch.device("meta"):
        meta_model = TinyNet()
    report = count_model(meta_model, targets, rank=rank, form=form)
    model = TinyNet()
    names = inject(model, targets, rank=rank, form=form)
    assert names == [row.name for row in report.rows]
    assert count_parameters(model) == (report.adapter_params, report.base_params)
    for row in report.rows:
        adapter = model.get_submodule(row.name)
        assert sum(p.numel() for p in adapter.parameters() if p.requires_grad) == (
            row.adapter_params
        )
        assert tuple(adapter.base.weight.shape) == row.shape


SEED_CONFIG = {
    "to_q": {"r": 8, "scale": 1.0, "trainable_scale": False, "hard": False},
    "to_v": {"r": 4, "scale": 0.5, "trainable_scale": True, "hard": False},
    "proj": {"r": 2, "scale": 1.0, "trainable_scale": True, "hard": True},
    "blocks.0.down": {"r": [3, 2], "form": "tucker2"},
}


def test_a_model_with_adapters_already_counts_them_apart_from_the_base():
    """A second `inject` leaves the earlier adapters trainable: the report's base is what
    stays frozen and its share trainable what `inject` then leaves (both counted directly)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3))
    inject(model, ["0"], rank=2, trainable_scale=True)
    report = count_model(model, ["1", "2"], rank=3)
    inject(model, ["1", "2"], rank=3)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert (report.earlier_params, report.base_params) == (2 * 4 * 2 + 1, frozen)
    assert report.adapter_params + report.earlier_params == trainable
    assert report.percent_trainable == pytest.approx(100 * trainable / (trainable + frozen))
    assert "earlier adapters    17" in str(report)
    assert report.to_dict()["totals"]["earlier_adapter_params"] == 17


def test_frozen_earlier_adapters_stay_in_the_base():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    inject(model, ["0"], rank=2)
    model[0].requires_grad_(False)
    report = count_model(model, ["1"], rank=3)
    inject(model, ["1"], rank=3)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    counts = (report.earlier_params, report.base_params, report.adapter_params)
    assert counts == (0, frozen, trainable)


def test_seed_wrapper_json_config():
    config = json.loads(json.dumps(SEED_CONFIG))
    with torch.device("meta"):
        report = count_model(TinyNet(), config)
    model = TinyNet()
    inject(model, config)
    assert count_parameters(model) == (report.adapter_params, report.base_params)
    by_name = {row.name: row for row in report.rows}
    assert by_name["blocks.1.attn.to_q"].adapter_params == 8 * (6 + 6)
    assert by_name["blocks.0.attn.to_v"].adapter_params == 4 * (4 + 4) + 1
    assert by_name["blocks.0.proj"].adapter_params == 2 * (4 + 4) + 1
    assert by_name["blocks.0.down"].rank == (3, 2)
    assert model.blocks[0].attn["to_v"].scale.item() == 0.5
    assert model.blocks[0].proj.hard


def test_report_table_and_json():
    report = count_model(mlp_head(), ["0", "6"], rank=4, dtype=torch.float16)
    data = json.loads(json.dumps(report.to_dict()))
    totals = data["totals"]
    assert data["dtype"] == "float16" and len(data["rows"]) == 2
    assert totals["adapter_params"] == 4 * (576 + 288) + 4 * (72 + 10) == 3_784
    assert totals["adapter_bytes"] == 2 * 3_784
    assert totals["adapter_adam_bytes"] == 8 * 3_784
    base = sum(p.numel() for p in mlp_head().parameters())
    assert totals["full_finetune_params"] == base
    assert totals["full_finetune_bytes"] == 2 * base
    assert totals["percent_trainable"] == pytest.approx(100 * 3_784 / (base + 3_784))
    assert data["rows"][0] == {
        "name": "0",
        "kind": "Linear",
        "shape": [288, 576],
        "form": "lora",
        "rank": 4,
        "base_params": 288 * 576 + 288,
        "adapter_params": 4 * (576 + 288),
    }
    text = str(report)
    assert "3,456" in text and "3,784" in text and "float16" in text and "Adam" in text


def test_pattern_kinds():
    assert matches("a.b.to_q", "to_q") and matches("to_q", "to_q")
    assert not matches("a.b.xto_q", "to_q")
    assert matches("a.b.to_q", "b.to_q") and not matches("a.ab.to_q", "b.to_q")
    assert matches("blocks.3.attn.to_q", "blocks.*.to_q") and not matches("x.to_q", "blocks.*")
    assert matches("blocks.3.conv", "re:blocks\\.\\d\\.conv")
    assert not matches("blocks.3.conv1", "re:blocks\\.\\d\\.conv")


def test_overlapping_plain_patterns_count_once():
    report = count_model(TinyNet(), ["to_q", "attn.to_q", "blocks.*.attn.to_q"], rank=2)
    assert len(report.rows) == 2


@pytest.mark.parametrize(
    ("targets", "kwargs", "error", "match"),
    [
        ("to_k", {"rank": 2}, TargetError, "'to_k' matches no module"),
        ("norm", {"rank": 2}, TargetError, "blocks.0.norm.*GroupNorm"),
        ("attn", {"rank": 2}, TargetError, "blocks.0.attn.*ModuleDict"),
        ("blocks.0.down", {"rank": 2, "form": "centre_tap"}, TargetError, "blocks.0.down"),
        ({"to_q": {"r": 2, "hard": True}, "conv": {"r": 2, "hard": True}}, {}, TargetError, "1×1"),
        ({"to_q": {"r": 2, "lora_dropout": 0.1}}, {}, TargetError, "lora_dropout"),
        ({"to_q": {"r": 2, "dropout": 1.0}}, {}, ArgumentError, "to_q.*dropout.*\\[0, 1\\)"),
        ({"proj": {"r": 2, "hard": True, "dropout": 0.1}}, {}, TargetError, "no branch input"),
        ({"to_q": 8}, {}, TargetError, "dict of settings"),
        ({"to_q": {"r": 2, "alpha": 4, "scale": 1}}, {}, ArgumentError, "alpha and scale"),
        ({"to_q": {"r": 2, "rank": 2}}, {}, TargetError, "both 'r' and 'rank'"),
        ({"to_q": {"r": 2, "alpha": "big"}}, {}, TargetError, "alpha must be a number"),
        ({"to_q": {"r": 2}, "attn.to_q": {"r": 4}}, {}, TargetError, "matched by both"),
        ("to_q", {}, RankError, "blocks.0.attn.to_q"),
        ("to_q", {"rank": 0}, RankError, "blocks.0.attn.to_q"),
        ("to_q", {"rank": 2, "form": "loha"}, ArgumentError, "loha"),
        ("", {"rank": 2}, TargetError, "empty"),
        ("re:[", {"rank": 2}, TargetError, r"target 're:\[' is not a valid regular expression"),
        (["to_q", "re:(a"], {"rank": 2}, TargetError, r"'re:\(a' is not a valid regular"),
        ({"re:*": {"r": 2}}, {}, TargetError, r"'re:\*' is not a valid regular expression"),
        ("to_q", {"rank": 2, "alpha": "8"}, ArgumentError, "alpha must be a number"),
        ("to_q", {"rank": 2, "scale": 1j}, ArgumentError, "scale must be a number"),
        ("to_q", {"rank": 2, "dropout": "0.5"}, ArgumentError, "dropout must be a number"),
        ("to_q", {"rank": 2.0}, RankError, "rank must be an integer"),
        (42, {"rank": 2}, TargetError, "pattern string"),
        ("to_q", {"rank": 2, "dtype": "float32"}, DTypeError, "torch.dtype"),
        ("to_q", {"rank": 2, "alpha": math.nan}, NonFiniteError, "blocks.0.attn.to_q.*alpha"),
        ({"to_v": {"r": 2, "scale": math.inf}}, {}, NonFiniteError, "blocks.0.attn.to_v.*scale"),
    ],
)
def test_errors(targets, kwargs, error, match):
    with torch.device("meta"):
        model = TinyNet()
    with pytest.raises(error, match=match):
        count_model(model, targets, **kwargs)


def test_root_module_cannot_be_a_target():
    with pytest.raises(TargetError, match="root"):
        count_model(nn.Linear(3, 3), "re:.*", rank=1)


def test_count_model_does_not_modify_the_model():
    model = TinyNet()
    snapshot = copy.deepcopy(model.state_dict())
    count_model(model, ["to_q", "conv"], rank=2)
    assert list(model.state_dict()) == list(snapshot)
    assert isinstance(model.blocks[0].attn["to_q"], nn.Linear)


def test_counts_refuse_what_no_adapter_can_be():
    """A non-float adapter dtype, and a zero-width layer (named), are typed errors."""
    for dtype in (torch.bool, torch.int8, torch.complex64):
        with pytest.raises(DTypeError, match="floating"):
            count_model(mlp_head(), ["0"], rank=4, dtype=dtype)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(0, 4))
    with pytest.raises(TargetError, match="module '1' cannot take an adapter"):
        count_model(model, ["0", "1"], rank=2)


@pytest.mark.parametrize("form", ["lora", "tucker2", "cp"])
def test_pissa_on_a_grouped_convolution_is_refused_by_the_count_as_by_inject(form):
    """`init='pissa'` cannot start a grouped convolution's adapter (one factor set per
    group), which the layer's sizes alone show: `count_model` (and `plan`) reported counts for
    it that `inject` then refused to build. Both now raise the same `TargetError` naming it."""
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 12, 3, groups=4, padding=1))
    with pytest.raises(TargetError, match=r"module '1'.*grouped"):
        count_model(model, ["0", "1"], rank=2, form=form, init="pissa")
    with pytest.raises(TargetError, match="grouped"):
        inject(copy.deepcopy(model), ["0", "1"], rank=2, form=form, init="pissa")
    # from zero a grouped convolution is counted and built alike
    report = count_model(model, ["1"], rank=2, form=form)
    inject(model, ["1"], rank=2, form=form)
    assert count_parameters(model)[0] == report.adapter_params


# targets in lowrank's language, and PEFT's `target_modules` for the same modules (PEFT
# reads a string as a regular expression fullmatched against the name, lowrank's `re:`)
ARCHITECTURE_TARGETS = [
    ("mistral", ["k_proj", "v_proj", "o_proj", "embed_tokens"]),  # GQA: narrower k, v
    ("gpt2", ["c_attn", "c_proj", "wte"]),  # Conv1D, and the embedding the head ties to
    ("gpt2", ["lm_head"]),
    ("bert", "re:.*attention\\.self\\.(query|value)|.*word_embeddings"),
    ("t5", ["q", "wo", "shared", "lm_head", "relative_attention_bias"]),
    ("whisper", ["conv1", "conv2", "q_proj", "embed_tokens"]),  # Conv1d front end
    ("unet", ["to_q", "to_v", "conv1", "conv2", "conv_in", "conv_out", "time_emb_proj"]),
    ("vae", "re:.*(resnets\\.\\d\\.conv[12]|quant_conv|to_k|downsamplers\\.0\\.conv)"),
]


@pytest.mark.parametrize(("name", "targets"), ARCHITECTURE_TARGETS)
def test_targets_select_and_count_what_peft_does_on_real_architectures(name, targets):
    """The modules a target list or a regex names, and the adapter and total parameters,
    are PEFT's on real models; the report of the model built on the meta device gives the
    counts that `inject` builds on a real one, for every form."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    from model_factories import tiny_architectures

    build = tiny_architectures()[name]
    torch.manual_seed(0)
    model = build()
    with torch.device("meta"):
        meta_model = build()
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=3, target_modules=targets.removeprefix("re:") if isinstance(targets, str) else targets,
        fan_in_fan_out=name == "gpt2" and "wte" not in targets))  # fmt: skip
    trainable, total = theirs.get_nb_trainable_parameters()
    report = count_model(meta_model, targets, rank=3)
    assert sorted(row.name for row in report.rows) == sorted(theirs.targeted_module_names)
    assert (report.adapter_params, report.base_params + report.adapter_params) == (
        trainable, total)  # fmt: skip
    for form, rank in (("lora", 3), ("tucker2", (3, 2)), ("cp", 2)):
        report = count_model(meta_model, targets, rank=rank, form=form, trainable_scale=True)
        adapted = copy.deepcopy(model)
        names = inject(adapted, targets, rank=rank, form=form, trainable_scale=True)
        assert names == [row.name for row in report.rows]
        assert count_parameters(adapted) == (report.adapter_params, report.base_params)
