"""DoRA adapter files: PEFT's `lora_magnitude_vector` and LyCORIS' `dora_scale` read, merged
and applied as the real PEFT and LyCORIS merge and run them, converted between the two, and
refused by name wherever only a ΔW would do."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from io_helpers import INPUTS, net, outputs, randomize, rel, save_state
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank import CP, DoRA, LoRA, errors
from lowrank.cli import main
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
from lowrank.io.merge import dora_squares, merged_blocks
from lowrank.nn import LowRankAdapter

TARGETS = ("lin", "conv", "proj")


def dora64(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: int,
           eps: float = 0.0) -> torch.Tensor:  # fmt: skip
    """m ⊙ V / (‖V‖ + eps), V = W + ΔW in float64, the norm per index of `axis` over the
    other axes, written from DoRA's formula."""
    v = weight.double() + delta.double()
    dims = [d for d in range(v.ndim) if d != axis]
    norm = v.square().sum(dim=dims, keepdim=True).sqrt()
    shape = [1] * v.ndim
    shape[axis] = v.shape[axis]
    return magnitude.double().reshape(shape) * v / (norm + eps)


def peft_dora(tmp_path, model: nn.Module, **config):
    """A PEFT DoRA adapter on `model` (random factors and magnitudes), saved to tmp/peft."""
    peft = pytest.importorskip("peft")
    settings = {"r": 2, "lora_alpha": 3, "target_modules": list(TARGETS), **config}
    peft_model = peft.get_peft_model(model, peft.LoraConfig(use_dora=True, **settings))
    named = dict(peft_model.named_parameters())
    factors = [p for n, p in named.items() if "lora_B" in n]
    randomize(nn.ParameterList(factors), seed=1)
    for n, p in named.items():  # magnitudes near the base norms, not equal to them
        if "lora_magnitude_vector" in n:
            with torch.no_grad():
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=torch.Generator().manual_seed(2)))
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    return peft_model


# ----------------------------------------------------------------------------- PEFT


def test_a_peft_dora_adapter_merges_to_merge_and_unload_and_float64(tmp_path):
    base = save_state(net().state_dict(), tmp_path / "base.safetensors")
    peft_model = peft_dora(tmp_path, net(), rank_pattern={"conv": 3}, use_rslora=True)
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    magnitudes = {k: v.shape for k, v in saved.items() if "magnitude" in k}
    assert magnitudes == {  # what PEFT 0.21 writes, the key without `.weight`
        "base_model.model.lin.lora_magnitude_vector": (96,),
        "base_model.model.conv.lora_magnitude_vector": (1, 48, 1, 1),
        "base_model.model.proj.lora_magnitude_vector": (1, 32, 1, 1),
    }
    with_adapter = outputs(peft_model)
    assert rel(outputs(net()), with_adapter) > 1e-2
    expected = peft_model.merge_and_unload().state_dict()
    merge_checkpoint(base, tmp_path / "peft", tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    plain = net().state_dict()
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for name in TARGETS:
        down = saved[f"base_model.model.{name}.lora_A.weight"]
        up = saved[f"base_model.model.{name}.lora_B.weight"]
        rank = down.shape[0]
        delta = (config["lora_alpha"] / rank**0.5) * torch.einsum(
            "or,ri->oi", up.double().flatten(1), down.double().flatten(1)
        ).reshape(plain[f"{name}.weight"].shape)
        magnitude = saved[f"base_model.model.{name}.lora_magnitude_vector"].flatten()
        reference = dora64(plain[f"{name}.weight"], delta, magnitude, axis=0)
        assert rel(merged[f"{name}.weight"], reference) < 1e-6, name
        assert rel(merged[f"{name}.weight"], expected[f"{name}.weight"]) < 1e-6, name
    assert torch.equal(merged["lin.bias"], expected["lin.bias"])
    ours = net()
    apply_adapter(ours, tmp_path / "peft")
    assert rel(outputs(ours), with_adapter) < 1e-6


def test_the_magnitude_spelled_as_the_modules_parameter_reads_the_same(tmp_path):
    """`….lora_magnitude_vector.weight` (the parameter's own name) is read as PEFT's key."""
    peft_dora(tmp_path, net())
    first = load_adapter(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k.replace("magnitude_vector", "magnitude_vector.weight"): v
               for k, v in tensors.items()}, str(path))  # fmt: skip
    second = load_adapter(tmp_path / "peft")
    for name in TARGETS:
        assert torch.equal(first[name].magnitude, second[name].magnitude)


def test_a_diffusers_dora_file_merges_as_peft_does(tmp_path):
    """A diffusers file (keys `unet.<module>.lora_magnitude_vector`, no metadata: diffusers
    then sets use_dora from the keys and takes alpha = r) merges to PEFT's merge of the same
    factors at that alpha."""
    peft_model = peft_dora(tmp_path, net(), lora_alpha=2)
    expected = peft_model.merge_and_unload().state_dict()
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    save_file({k.replace("base_model.model.", "unet."): v for k, v in saved.items()},
              str(tmp_path / "pytorch_lora_weights.safetensors"))  # fmt: skip
    adapter = load_adapter(tmp_path / "pytorch_lora_weights.safetensors")
    assert adapter.format == "diffusers"
    assert all(isinstance(form, DoRA) for form in adapter.layers.values())
    base = save_state(net().state_dict(), tmp_path / "base.safetensors")
    merge_checkpoint(base, adapter, tmp_path / "merged.safetensors", component="unet")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for name in TARGETS:
        assert rel(merged[f"{name}.weight"], expected[f"{name}.weight"]) < 1e-6, name


TINY_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (8, 16),
    "layers_per_block": 1, "cross_attention_dim": 12, "attention_head_dim": 2,
    "norm_num_groups": 4, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}  # fmt: skip


def test_a_diffusers_saved_dora_file_merges_as_peft_merges_it(tmp_path):
    """A DoRA adapter diffusers saves (`save_lora_adapter`, under its own file name) reads as
    DoRA layers and merges to PEFT's merge of the adapted UNet."""
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET)
    base = save_state(unet.state_dict(), tmp_path / "unet.safetensors")
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "conv1"], use_dora=True)
    unet.add_adapter(config)
    named = dict(unet.named_parameters())
    randomize(nn.ParameterList(p for n, p in named.items() if "lora_B" in n), seed=4)
    for n, p in named.items():
        if "lora_magnitude_vector" in n:
            with torch.no_grad():
                p.mul_(1.25)
    unet.save_lora_adapter(str(tmp_path / "lora"), weight_name="mine.safetensors")
    saved = load_file(str(tmp_path / "lora" / "mine.safetensors"))
    adapter = load_adapter(tmp_path / "lora" / "mine.safetensors")
    assert adapter.format == "diffusers"
    assert len(adapter) == sum(k.endswith("lora_magnitude_vector") for k in saved) > 2
    assert all(isinstance(form, DoRA) for form in adapter.layers.values())
    for module in unet.modules():
        if isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer):
            module.merge()
    expected = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items()}
    merge_checkpoint(base, adapter, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for name in adapter.layers:
        assert rel(merged[f"{name}.weight"], expected[f"{name}.weight"]) < 1e-6, name
        assert rel(merged[f"{name}.weight"], load_file(str(base))[f"{name}.weight"]) > 1e-3


def test_a_peft_dora_on_gpt2_conv1d_layers_merges_as_peft_runs_it(tmp_path):
    """PEFT runs a DoRA of a transformers Conv1D (weight stored (in, out)) transposed, its
    magnitude per output feature: a column of the stored weight. Against the model's
    save_pretrained folder the merge equals PEFT's merge_and_unload, and apply_adapter
    gives PEFT's logits (the LM head, an nn.Linear, as it is). Converted to PEFT, its
    Conv1D layers go back to module LoRAs with fan_in_fan_out (PEFT's DoRA takes no
    parameter targets; they were refused): the same tensors, PEFT's logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40,
                                     n_positions=16, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).eval()
    base.save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_fc", "lm_head"],
                           use_dora=True, fan_in_fan_out=True)  # fmt: skip
    adapted = peft.get_peft_model(copy.deepcopy(base), lora)
    randomize(nn.ParameterList(p for n, p in adapted.named_parameters() if "lora_B" in n), 7)
    adapted.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    ids = torch.tensor([[1, 5, 7, 2, 30, 11]])
    with torch.no_grad():
        expected = adapted(ids).logits
        reference = copy.deepcopy(adapted).merge_and_unload().state_dict()
    merge_checkpoint(tmp_path / "base", tmp_path / "peft", tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert max(rel(merged[key], reference[key]) for key in merged) < 1e-6
    adapter = load_adapter(tmp_path / "peft", base=base)
    assert adapter["transformer.h.0.attn.c_attn"].axis == 1 and adapter["lm_head"].axis == 0
    applied = copy.deepcopy(base)
    apply_adapter(applied, tmp_path / "peft")
    with torch.no_grad():
        assert rel(applied(ids).logits, expected) < 1e-5
        assert rel(base(ids).logits, expected) > 1e-2
    # PEFT's target_parameters, which hold Conv1D LoRAs, have no DoRA: written back as the
    # module LoRAs PEFT's DoRA runs on a Conv1D (fan_in_fan_out), the tensors bit for bit
    convert_adapter(tmp_path / "peft", tmp_path / "again", "peft", base=base)
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and config["use_dora"] and not config.get("target_parameters")
    first = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    second = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, expected)
    # a DoRA on another parameter target (a Linear's weight as stored, a magnitude per row)
    # has no PEFT form: refused by name
    other = Adapter({"lm_head": adapter["lm_head"]}, target_parameters=("lm_head.weight",))
    with pytest.raises(errors.ConversionError, match=r"lm_head' is a DoRA on .*parameter target"):
        save_adapter(other, tmp_path / "other", "peft")
    assert not (tmp_path / "other").exists()


def test_a_per_column_dora_of_a_linear_s_stored_weight_is_not_written_as_a_conv1d_s(tmp_path):
    """A DoRA on a weight as stored with its magnitude per column is what PEFT's DoRA of a
    transformers Conv1D is (its (in, out) weight), which PEFT output holds transposed
    (fan_in_fan_out); on an nn.Linear's weight it is a magnitude per input channel, which
    PEFT would read transposed (a square one even loads). Built by hand, nothing tells which:
    saved to PEFT it is a `ConversionError` naming the layer (it was written as a Conv1D's);
    converted from a LyCORIS file against a model whose module is an nn.Linear, too, naming
    it as no Conv1D (against a bare checkpoint, which tells no module types, as nothing
    telling); the adapter of a lowrank.nn GPT-2 (its Conv1Ds known) is written, and so is
    lowrank's LyCORIS file of it, which records them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(8, 8))
    lora = LoRA(torch.randn(2, 8), torch.randn(8, 2), 0.5)
    dora = DoRA(lora, torch.rand(1, 8) + 1, axis=1)
    adapter = Adapter({"lin": dora}, target_parameters=("lin.weight",))
    with pytest.raises(errors.ConversionError, match=r"layer 'lin' is a DoRA.*nothing tells"):
        save_adapter(adapter, tmp_path / "peft", "peft")
    assert not (tmp_path / "peft").exists()
    save_adapter(adapter, tmp_path / "dora.safetensors", "lycoris")
    checkpoint = save_state(model.state_dict(), tmp_path / "base.safetensors")
    # a bare checkpoint tells no module types
    for base, why in ((model, "no Conv1D"), (checkpoint, "nothing tells")):
        with pytest.raises(errors.ConversionError, match=rf"layer '(unet\.)?lin' is a DoRA.*{why}"):
            convert_adapter(tmp_path / "dora.safetensors", tmp_path / "out", "peft", base=base)
        assert not (tmp_path / "out").exists()
    # a Conv1D's, as the lowrank.nn model knows it: written
    from lowrank import nn as lnn

    config = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=16, n_positions=8)
    gpt2 = transformers.GPT2Model(config)
    lnn.inject(gpt2, ["c_attn"], rank=2, dora=True)
    written = model_adapter(gpt2)
    assert written.conv1d == ("h.0.attn.c_attn.weight",)
    save_adapter(written, tmp_path / "gpt2", "peft")
    assert json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())["fan_in_fan_out"]
    # lowrank's LyCORIS file records them: converted to PEFT without a base, the same folder
    save_adapter(written, tmp_path / "gpt2.safetensors", "lycoris")
    convert_adapter(tmp_path / "gpt2.safetensors", tmp_path / "again", "peft")
    first = load_file(str(tmp_path / "gpt2" / "adapter_model.safetensors"))
    second = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_inspect_reports_dora_layers(tmp_path):
    peft_dora(tmp_path, net())
    report = inspect_adapter(tmp_path / "peft")
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["lin"]["form"] == "DoRA (LoRA)" and rows["lin"]["dora"] == "out"
    assert rows["conv"]["form"] == "DoRA (LoCon)"
    assert rows["lin"]["params"] == 2 * (64 + 96) + 96  # factors and magnitude


# ----------------------------------------------------------------------------- LyCORIS


def lycoris_dora(lycoris, model, algo, alpha, wd_on_output, **kwargs):
    """A LyCORIS network with DoRA (`dora_wd`) on `model`, random factors and magnitudes."""
    lycoris.LycorisNetwork.apply_preset({"target_name": list(TARGETS)})
    network = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=alpha, algo=algo,
                                     dora_wd=True, wd_on_output=wd_on_output,
                                     **kwargs)  # fmt: skip
    network.apply_to()
    params = dict(network.named_parameters())
    randomize(nn.ParameterList(p for n, p in params.items() if "dora_scale" not in n), 2)
    for n, p in params.items():
        if "dora_scale" in n:
            with torch.no_grad():
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=torch.Generator().manual_seed(3)))
    return network


LYCORIS_DORA = [
    ("locon", {}),
    ("locon", {"use_tucker": True}),
    ("loha", {}),
    ("lokr", {"factor": 2, "decompose_both": True}),
]


@pytest.mark.parametrize("wd_on_output", [True, False], ids=["on_out", "on_in"])
@pytest.mark.parametrize(("algo", "kwargs"), LYCORIS_DORA, ids=["locon", "tucker", "loha", "lokr"])
def test_a_lycoris_dora_file_merges_to_what_lycoris_computes(
    tmp_path, lycoris, algo, kwargs, wd_on_output
):
    """LyCORIS' forward pass (alpha ≠ rank: the scale counts) and its own `merge_to` (alpha
    = rank: it scales LoHa and LoKr twice, `test_lycoris_merge_to_scales_loha_twice`) give
    the weights lowrank's merge of the saved file gives."""
    for alpha in (3, 2):
        model = net()
        network = lycoris_dora(lycoris, model, algo, alpha, wd_on_output, **kwargs)
        network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
        saved = load_file(str(tmp_path / "l.safetensors"))
        scales = {k: v.shape for k, v in saved.items() if k.endswith("dora_scale")}
        assert len(scales) == 3
        adapter = load_adapter(tmp_path / "l.safetensors", base=net())
        assert adapter.format == "lycoris"
        assert {form.axis for form in adapter.layers.values()} == {0 if wd_on_output else 1}
        expected = outputs(model)
        assert rel(outputs(net()), expected) > 1e-2
        ours = net()
        apply_adapter(ours, tmp_path / "l.safetensors")
        assert rel(outputs(ours), expected) < 1e-5
        if alpha == 2:
            base = save_state(net().state_dict(), tmp_path / "base.safetensors")
            merge_checkpoint(base, tmp_path / "l.safetensors", tmp_path / "merged.safetensors")
            merged = load_file(str(tmp_path / "merged.safetensors"))
            network.merge_to()
            for name in TARGETS:
                weight = getattr(model, name).weight
                assert rel(merged[f"{name}.weight"], weight) < 1e-6, name


def test_a_lycoris_dora_conv_layer_merges_as_its_float64_formula(tmp_path, lycoris):
    """The merge of a LyCORIS DoRA layer, per input channel, against DoRA's formula in
    float64 with LyCORIS' eps (float32's) on the norm."""
    model = net()
    network = lycoris_dora(lycoris, model, "locon", 2, wd_on_output=False)
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    saved = load_file(str(tmp_path / "l.safetensors"))
    base = save_state(net().state_dict(), tmp_path / "base.safetensors")
    merge_checkpoint(base, tmp_path / "l.safetensors", tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    stem = "lycoris_conv"  # LyCORIS' prefix for a bare model
    down, up = saved[f"{stem}.lora_down.weight"], saved[f"{stem}.lora_up.weight"]
    delta = torch.einsum("or,ri->oi", up.double().flatten(1), down.double().flatten(1))
    weight = net().conv.weight
    reference = dora64(weight, delta.reshape(weight.shape), saved[f"{stem}.dora_scale"].flatten(),
                       axis=1, eps=torch.finfo(torch.float32).eps)  # fmt: skip
    assert saved[f"{stem}.dora_scale"].shape == (1, 32, 1, 1)
    assert rel(merged["conv.weight"], reference) < 1e-6


@pytest.mark.parametrize("wd_on_output", [True, False], ids=["on_out", "on_in"])
def test_a_lycoris_dora_of_a_1x1_convolution_adapts_a_linear_weight(
    tmp_path, lycoris, wd_on_output
):
    """A 1×1 LoCon DoRA layer (SD2's proj_in: a 1×1 convolution in the LDM checkpoint,
    linear in diffusers) merges into a linear weight as its float64 formula and as LyCORIS
    merges it into the 1×1 convolution, the magnitude per output or per input channel."""
    model = net()
    network = lycoris_dora(lycoris, model, "locon", 2, wd_on_output=wd_on_output)
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    saved = load_file(str(tmp_path / "l.safetensors"))
    network.merge_to()
    state = net().state_dict()
    state["proj.weight"] = state["proj.weight"].flatten(1)  # (32, 48): a linear layer's
    base = save_state(state, tmp_path / "base.safetensors")
    merge_checkpoint(base, tmp_path / "l.safetensors", tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))["proj.weight"]
    down, up = saved["lycoris_proj.lora_down.weight"], saved["lycoris_proj.lora_up.weight"]
    delta = torch.einsum("or,ri->oi", up.double().flatten(1), down.double().flatten(1))
    magnitude = saved["lycoris_proj.dora_scale"]
    reference = dora64(state["proj.weight"], delta, magnitude.flatten(), 0 if wd_on_output else 1,
                       eps=torch.finfo(torch.float32).eps)  # fmt: skip
    assert merged.shape == (32, 48) and rel(merged, reference) < 1e-6
    assert rel(merged, model.proj.weight.flatten(1)) < 1e-6
    linear = nn.Linear(48, 32)
    with torch.no_grad():
        linear.weight.copy_(state["proj.weight"])
    layer = load_adapter(tmp_path / "l.safetensors")["lycoris_proj"]  # (32, 48, 1, 1)
    apply_adapter(nn.ModuleDict({"proj": linear}), Adapter({"proj": layer}))
    assert rel(linear.weight, reference) < 1e-6


# sd-scripts' Flux layers fused in Black Forest Labs' model, rows of a diffusers Flux's modules
FLUX_FUSED = {
    "double_blocks_0_img_attn_qkv": ["transformer_blocks.0.attn.to_q",
                                     "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"],
    "single_blocks_0_linear1": ["single_transformer_blocks.0.attn.to_q",
                                "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v",
                                "single_transformer_blocks.0.proj_mlp"],
}  # fmt: skip


@pytest.mark.parametrize("axis", [0, 1], ids=["on_out", "on_in"])
def test_a_dora_on_a_fused_flux_layer_splits_by_rows_or_is_refused(tmp_path, axis):
    """A LyCORIS DoRA on a kohya Flux layer fused in BFL's model (`qkv`, `linear1`), against
    a diffusers Flux whose modules are its row blocks: per output channel each row's merge
    is its own, so the modules' merges are the rows of DoRA's float64 formula on the fused
    weight; per input channel the norm runs over all the blocks' rows, which no module's
    DoRA holds: a TargetError naming the layer, nothing written, the model unchanged."""
    pytest.importorskip("diffusers")
    from model_factories import tiny_flux

    transformer = tiny_flux()
    state = transformer.state_dict()
    g = torch.Generator().manual_seed(3)
    tensors, references = {}, {}
    for body, modules in FLUX_FUSED.items():
        fused = torch.cat([state[f"{m}.weight"] for m in modules])
        stem = f"lora_unet_{body}"
        down = torch.randn(3, fused.shape[1], generator=g) * 0.3
        up = torch.randn(fused.shape[0], 3, generator=g) * 0.3
        magnitude = torch.rand(fused.shape[axis], generator=g) + 0.5
        tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                    f"{stem}.alpha": torch.tensor(2.0),
                    f"{stem}.dora_scale": magnitude.unsqueeze(1 - axis)}  # fmt: skip
        delta = (2 / 3) * up.double() @ down.double()
        merged = dora64(fused, delta, magnitude, axis, eps=torch.finfo(torch.float32).eps)
        references |= dict(zip(modules, merged.split([len(state[f"{m}.weight"]) for m in modules]),
                               strict=True))  # fmt: skip
    lora = tmp_path / "flux_dora.safetensors"
    save_file(tensors, str(lora))
    base = save_state(state, tmp_path / "flux.safetensors")
    out = tmp_path / "merged.safetensors"
    model = copy.deepcopy(transformer)
    if axis == 1:
        with pytest.raises(errors.TargetError, match=r"double_blocks_0_img_attn_qkv' is a DoRA"):
            merge_checkpoint(base, lora, out)
        with pytest.raises(errors.TargetError, match="norm runs over each input channel"):
            apply_adapter(model, lora)
        assert not out.exists()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        return
    merge_checkpoint(base, lora, out)
    merged = load_file(str(out))
    applied = apply_adapter(model, lora)
    assert sorted(applied) == sorted(references)
    for module, reference in references.items():
        assert rel(merged[f"{module}.weight"], reference) < 1e-6, module
        assert rel(model.get_submodule(module).weight, reference) < 1e-6, module


@pytest.mark.parametrize("axis", [0, 1], ids=["on_out", "on_in"])
def test_a_dora_on_flux_s_swapped_final_modulation_merges_as_its_formula(tmp_path, axis):
    """sd-scripts' `final_layer_adaLN_modulation_1` is a diffusers Flux's `norm_out.linear`
    with the halves of its rows exchanged: a DoRA there, per output channel or per input
    channel (whose norms a reordering of every row leaves as they are), merges and applies
    to the rows of DoRA's float64 formula on BFL's weight, exchanged alike."""
    pytest.importorskip("diffusers")
    from model_factories import tiny_flux

    transformer = tiny_flux()
    state = transformer.state_dict()
    weight = state["norm_out.linear.weight"]
    half = len(weight) // 2

    def swapped(rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows[half:], rows[:half]])

    g = torch.Generator().manual_seed(5)
    down = torch.randn(3, weight.shape[1], generator=g) * 0.3
    up = torch.randn(weight.shape[0], 3, generator=g) * 0.3
    magnitude = torch.rand(weight.shape[axis], generator=g) + 0.5
    stem = "lora_unet_final_layer_adaLN_modulation_1"
    lora = tmp_path / "flux_dora.safetensors"
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
               f"{stem}.alpha": torch.tensor(2.0),
               f"{stem}.dora_scale": magnitude.unsqueeze(1 - axis)}, str(lora))  # fmt: skip
    delta = (2 / 3) * up.double() @ down.double()
    eps = torch.finfo(torch.float32).eps
    reference = swapped(dora64(swapped(weight), delta, magnitude, axis, eps=eps))
    base = save_state(state, tmp_path / "flux.safetensors")
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert rel(merged["norm_out.linear.weight"], reference) < 1e-6
    model = copy.deepcopy(transformer)
    assert apply_adapter(model, lora) == ["norm_out.linear"]
    assert rel(model.norm_out.linear.weight, reference) < 1e-6


# ----------------------------------------------------------------------------- convert


def test_peft_dora_to_lycoris_and_back_keeps_the_outputs(tmp_path, lycoris):
    """PEFT → LyCORIS: LyCORIS loads the file (`create_lycoris_from_weights`) to PEFT's
    outputs (its eps on the norm aside); → PEFT again: PEFT loads it to the same outputs,
    the tensors bit for bit, as through diffusers."""
    peft = pytest.importorskip("peft")
    peft_model = peft_dora(tmp_path, net())
    expected = outputs(peft_model)
    convert_adapter(tmp_path / "peft", tmp_path / "l.safetensors", "lycoris", prefix="lycoris")
    model = net()
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(tmp_path / "l.safetensors"), model)
    network.apply_to()
    assert rel(outputs(model), expected) < 1e-5
    convert_adapter(tmp_path / "l.safetensors", tmp_path / "back", "peft")
    again = peft.PeftModel.from_pretrained(net(), tmp_path / "back")
    assert rel(outputs(again), expected) < 1e-6
    first = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    second = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    convert_adapter(tmp_path / "peft", tmp_path / "d.safetensors", "diffusers")
    convert_adapter(tmp_path / "d.safetensors", tmp_path / "third", "peft")
    third = load_file(str(tmp_path / "third" / "adapter_model.safetensors"))
    assert first.keys() == third.keys()
    assert all(torch.equal(first[k], third[k]) for k in first)


def test_a_lycoris_dora_file_to_peft_loads_in_peft_to_lycoris_outputs(tmp_path, lycoris):
    """LyCORIS (wd_on_out) → PEFT: PEFT loads it to LyCORIS' outputs, LyCORIS' eps on the
    norm aside."""
    peft = pytest.importorskip("peft")
    model = net()
    network = lycoris_dora(lycoris, model, "locon", 3, wd_on_output=True)
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    expected = outputs(model)
    convert_adapter(tmp_path / "l.safetensors", tmp_path / "peft", "peft", base=net())
    loaded = peft.PeftModel.from_pretrained(net(), tmp_path / "peft")
    assert rel(outputs(loaded), expected) < 1e-5


def test_a_lycoris_tucker_dora_folds_into_peft_and_says_so(tmp_path, lycoris):
    """A LyCORIS Tucker LoCon DoRA (`lora_mid`) to PEFT: the Tucker layer is folded exactly
    into a LoCon, the report lists it, and PEFT loads the file to LyCORIS' outputs."""
    peft = pytest.importorskip("peft")
    model = net()
    network = lycoris_dora(lycoris, model, "locon", 3, wd_on_output=True, use_tucker=True)
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    assert "lycoris_conv.lora_mid.weight" in load_file(str(tmp_path / "l.safetensors"))
    report = convert_adapter(tmp_path / "l.safetensors", tmp_path / "peft", "peft", base=net())
    assert report["folded"] == ["conv"]
    loaded = peft.PeftModel.from_pretrained(net(), tmp_path / "peft")
    assert rel(outputs(loaded), outputs(model)) < 1e-5


@pytest.mark.parametrize("to", ["peft", "diffusers", "kohya"])
def test_a_lycoris_dora_per_input_channel_has_no_peft_form(tmp_path, lycoris, to):
    network = lycoris_dora(lycoris, net(), "locon", 2, wd_on_output=False)
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    out = tmp_path / ("out" if to == "peft" else "out.safetensors")
    why = "per input channel" if to != "kohya" else "kohya files cannot hold"
    with pytest.raises(errors.ConversionError, match=f"layer '.*conv'.*{why}"):
        convert_adapter(tmp_path / "l.safetensors", out, to, base=net())
    assert not out.exists()


def test_a_lycoris_dora_loha_goes_to_peft_with_a_rank_and_never_to_kohya(tmp_path, lycoris):
    """A DoRA over a LoHa has no PEFT form as it is; with a rank its update is approximated
    (here at the rank of the Hadamard product, exactly) and PEFT loads the file to LyCORIS'
    outputs (its eps aside). kohya files hold no magnitude, whatever the rank."""
    peft = pytest.importorskip("peft")
    model = net()
    network = lycoris_dora(lycoris, model, "loha", 2, wd_on_output=True)
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    with pytest.raises(errors.ConversionError, match=r"DoRA \(LoHa\).*pass a rank"):
        convert_adapter(tmp_path / "l.safetensors", tmp_path / "peft", "peft", base=net())
    assert not (tmp_path / "peft").exists()
    report = convert_adapter(tmp_path / "l.safetensors", tmp_path / "peft", "peft", base=net(),
                             rank=4)  # fmt: skip
    assert [row["form"] for row in report["approximated"]] == ["DoRA (LoHa)"] * 3
    assert max(row["relative_error"] for row in report["approximated"]) < 1e-5
    loaded = peft.PeftModel.from_pretrained(net(), tmp_path / "peft")
    assert rel(outputs(loaded), outputs(model)) < 1e-5
    for rank in (None, 4):
        with pytest.raises(errors.ConversionError, match=r"DoRA \(LoHa\), whose magnitude kohya"):
            convert_adapter(tmp_path / "l.safetensors", tmp_path / "k.safetensors", "kohya",
                            base=net(), rank=rank)  # fmt: skip
    assert not (tmp_path / "k.safetensors").exists()


def test_the_command_line_inspects_merges_and_refuses_dora(tmp_path, capsys):
    """`lowrank inspect` lists DoRA layers; `lowrank merge` of one at a weight other than 1
    is a one-line error, exit status 2."""
    peft_dora(tmp_path, net())
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    assert "DoRA (LoCon)" in capsys.readouterr().out
    base = save_state(net().state_dict(), tmp_path / "base.safetensors")
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(base), f"{tmp_path / 'peft'}:0.5", "-o", str(out)]) == 2
    assert "weight 1 only" in capsys.readouterr().err and not out.exists()
    assert main(["merge", str(base), str(tmp_path / "peft"), "-o", str(out)]) == 0
    assert out.exists()


def test_kohya_cannot_hold_a_dora_layer(tmp_path):
    peft_dora(tmp_path, net())
    with pytest.raises(errors.ConversionError, match=r"layer 'conv' is a DoRA .*lycoris"):
        convert_adapter(tmp_path / "peft", tmp_path / "k.safetensors", "kohya")


@pytest.mark.parametrize("fmt", ["peft", "lycoris"])
def test_a_dora_over_a_cp_is_refused_with_the_lora_that_equals_it(tmp_path, fmt):
    """No format holds a CP update: the refusal points to its exactly equal LoRA, not to
    another format that cannot hold it either."""
    cp = CP(torch.randn(4, 2), torch.randn(5, 2), [])
    out = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    with pytest.raises(errors.ConversionError, match=r"'lin' is a CP.*lowrank.as_lora"):
        save_adapter(Adapter({"lin": DoRA(cp, torch.ones(4, 1))}), out, fmt)
    assert not out.exists()


def test_dora_and_plain_layers_in_one_peft_config_are_refused(tmp_path):
    peft_dora(tmp_path, net())
    adapter = load_adapter(tmp_path / "peft")
    layers = dict(adapter.layers, lin=adapter["lin"].update)
    mixed = copy.copy(adapter)
    mixed.layers = layers
    with pytest.raises(errors.ConversionError, match="layer 'lin' is a plain LoRA"):
        save_adapter(mixed, tmp_path / "mixed", "peft")
    save_adapter(mixed, tmp_path / "mixed.safetensors", "lycoris")  # LyCORIS has one per layer
    back = load_adapter(tmp_path / "mixed.safetensors")
    assert isinstance(back["unet.conv"], DoRA) and isinstance(back["unet.lin"], LoRA)


# ----------------------------------------------------------------------------- refusals


def edit_file(tmp_path, change):
    path = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_bad_magnitudes_are_refused_naming_the_key(tmp_path):
    peft_dora(tmp_path, net())
    base = save_state(net().state_dict(), tmp_path / "base.safetensors")
    key = "base_model.model.lin.lora_magnitude_vector"

    def wrong_shape(t):
        t[key] = torch.ones(1, 96)

    def not_finite(t):
        t[key] = torch.full((96,), float("nan"))

    def alone(t):
        t["base_model.model.other.lora_magnitude_vector"] = torch.ones(96)

    def missing(t):
        del t[key]

    cases = [
        (wrong_shape, errors.FileFormatError, f"{key}.*shape \\(96,\\)"),
        (not_finite, errors.NonFiniteError, key),
        (alone, errors.FileFormatError, r"other.lora_magnitude_vector.*no lora_A"),
        (missing, errors.FileFormatError, "'base_model.model.lin' has no lora_magnitude"),
    ]
    original = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for change, error, named in cases:
        save_file(original, str(tmp_path / "peft" / "adapter_model.safetensors"))
        edit_file(tmp_path, change)
        out = tmp_path / "merged.safetensors"
        with pytest.raises(error, match=named):
            merge_checkpoint(base, tmp_path / "peft", out)
        assert not out.exists()


def test_a_peft_dora_on_an_embedding_is_refused_naming_its_key(tmp_path):
    """PEFT keeps an embedding's DoRA magnitude per embedding dimension, the columns of the
    `(num, dim)` table: not read, and named."""
    peft = pytest.importorskip("peft")

    class Embedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 5)

    model = peft.get_peft_model(Embedder(), peft.LoraConfig(r=2, target_modules=["emb"],
                                                            use_dora=True))  # fmt: skip
    model.save_pretrained(tmp_path / "peft")
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert saved["base_model.model.emb.lora_magnitude_vector"].shape == (5,)
    with pytest.raises(errors.FileFormatError, match=r"emb.lora_magnitude_vector.*embedding"):
        load_adapter(tmp_path / "peft")


def test_a_magnitude_without_use_dora_is_refused(tmp_path):
    peft_dora(tmp_path, net())
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": False}))
    with pytest.raises(errors.FileFormatError, match=r"lora_magnitude_vector.*use_dora"):
        load_adapter(tmp_path / "peft")


@pytest.mark.parametrize("value", ["yes", 1, 1.0, None])
def test_a_use_dora_that_is_no_bool_is_refused_naming_it(tmp_path, value):
    """PEFT's `use_dora` is a bool; a string "yes" or the number 1 (truthy) loaded as DoRA
    and 0 or None said the magnitudes were not DoRA's: each is a FileFormatError naming the
    field, for the merge and inject alike."""
    peft_dora(tmp_path, net())
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": value}))
    for call in (load_adapter, lambda path: inject_adapter(net(), path)):
        with pytest.raises(errors.FileFormatError, match=r"config.json: use_dora must be true or "):
            call(tmp_path / "peft")


def test_a_bad_dora_scale_is_refused_naming_the_key(tmp_path, lycoris):
    network = lycoris_dora(lycoris, net(), "locon", 2, wd_on_output=True)
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    tensors = load_file(str(tmp_path / "l.safetensors"))
    key = next(k for k in tensors if k.endswith("_lin.dora_scale"))
    save_file({**tensors, key: torch.ones(3, 1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(errors.ShapeError, match=f"{key} must have shape \\(96, 1\\).*\\(1, 64\\)"):
        load_adapter(tmp_path / "bad.safetensors")
    save_file({**tensors, key: torch.ones(96, 1, dtype=torch.int32)},
              str(tmp_path / "int.safetensors"))  # fmt: skip
    with pytest.raises(errors.DTypeError, match=f"int.safetensors: {key}: .*floating-point"):
        load_adapter(tmp_path / "int.safetensors")
    stem = key.partition(".")[0]
    only = {k: v for k, v in tensors.items() if not (k.startswith(stem) and "lora_" in k)}
    save_file(only, str(tmp_path / "alone.safetensors"))
    with pytest.raises(errors.FileFormatError, match=f"{stem}.dora_scale.*no factors"):
        load_adapter(tmp_path / "alone.safetensors")


def test_a_flattened_lycoris_dora_scale_of_the_wrong_channels_is_named(tmp_path, lycoris):
    """A LoHa convolution is stored flattened, (out, in·K): its per-input-channel dora_scale
    is checked against `in` once the base gives the kernel, and named as the magnitude."""
    network = lycoris_dora(lycoris, net(), "loha", 2, wd_on_output=False)
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    tensors = load_file(str(tmp_path / "l.safetensors"))
    assert tensors["lycoris_conv.dora_scale"].shape == (1, 32, 1, 1)
    tensors["lycoris_conv.dora_scale"] = torch.ones(1, 3, 1, 1)  # 3 divides in·K = 288
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    base = save_state(net().state_dict(), tmp_path / "base.safetensors")
    out = tmp_path / "merged.safetensors"
    with pytest.raises(errors.ShapeError, match=r"lycoris_conv.*magnitude \(1, 3, 1, 1\).*input"):
        merge_checkpoint(base, tmp_path / "bad.safetensors", out)
    assert not out.exists()


@pytest.mark.parametrize("tool", ["resize", "combine"])
def test_tools_that_need_a_delta_refuse_dora_by_layer(tmp_path, tool):
    peft_dora(tmp_path, net())
    out = tmp_path / "out"
    with pytest.raises(errors.DTypeError, match=r"layer 'conv' is a DoRA layer.*base weight"):
        if tool == "resize":
            resize_adapter(tmp_path / "peft", out, rank=1)
        else:
            combine_adapters([tmp_path / "peft"], out)
    assert not out.exists()


def test_a_peft_dora_folder_injects_to_peft_outputs_and_trains_back_into_peft(tmp_path):
    """Injected as `dora=True` adapters (Linear, 3×3 and 1×1 Conv2d), the model runs what
    PEFT's `from_pretrained` of the folder runs, bit for bit, and what `apply_adapter` merges;
    the factors and magnitudes train, and the trained model saved as PEFT loads in PEFT to
    its outputs."""
    peft = pytest.importorskip("peft")
    peft_dora(tmp_path, net())
    theirs = peft.PeftModel.from_pretrained(net(), tmp_path / "peft").eval()
    model = net()
    assert inject_adapter(model, tmp_path / "peft") == list(TARGETS)
    model.eval()
    fused = net()
    apply_adapter(fused, tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(outputs(model), outputs(theirs))
        assert rel(outputs(model), outputs(fused)) < 1e-6
        assert rel(outputs(model), outputs(net())) > 1e-2
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == 3 * len(TARGETS)  # down, up, magnitude per layer
    sum(y.square().sum() for y in model(*INPUTS)).backward()
    with torch.no_grad():
        for parameter in trained:
            assert parameter.grad.abs().sum() > 0
            parameter -= 1e-3 * parameter.grad
        stepped = outputs(model)
    assert rel(stepped, outputs(theirs)) > 1e-4
    save_adapter(model_adapter(model), tmp_path / "trained", "peft")
    again = peft.PeftModel.from_pretrained(net(), tmp_path / "trained").eval()
    assert rel(outputs(again), stepped) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dora", [True, False], ids=["dora", "lora"])
def test_a_peft_folder_injects_into_a_half_precision_model_as_peft_loads_it(
    tmp_path, dtype, dora
):
    """`PeftModel.from_pretrained` keeps the factors and DoRA magnitudes of a bfloat16 or
    float16 model in float32 (`autocast_adapter_dtype`); injected, the adapters hold them
    so, and the model's outputs equal PEFT's bit for bit (the magnitude and factors were
    kept in the model's dtype: 6e-3 off in bfloat16)."""
    peft = pytest.importorskip("peft")
    if dora:
        peft_dora(tmp_path, net())
    else:
        config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=list(TARGETS))
        adapted = peft.get_peft_model(net(), config)
        randomize(nn.ParameterList(p for n, p in adapted.named_parameters() if "lora_B" in n), 1)
        adapted.save_pretrained(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(net().to(dtype), tmp_path / "peft").eval()
    model = net().to(dtype)
    inject_adapter(model, tmp_path / "peft")
    model.eval()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trained) == (3 if dora else 2) * len(TARGETS)
    inputs = [x.to(dtype) for x in INPUTS]
    # with gradients, as in training (a LoRA convolution without them may run W + ΔW)
    got = torch.cat([y.flatten() for y in model(*inputs)])
    want = torch.cat([y.flatten() for y in theirs(*inputs)])
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    assert {p.dtype for p in trained.values()} == {torch.float32}
    assert rel(got, torch.cat([y.flatten() for y in net().to(dtype)(*inputs)])) > 1e-2
    got.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained.values())


def test_a_peft_dora_on_gpt2_conv1d_layers_injects_to_peft_outputs(tmp_path):
    """PEFT's DoRA on transformers Conv1D layers (norm per output feature, a column of the
    stored (in, out) weight) and on the Linear LM head injects to PEFT's logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40,
                                     n_positions=16, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).eval()
    lora = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_fc", "lm_head"],
                           use_dora=True, fan_in_fan_out=True)  # fmt: skip
    adapted = peft.get_peft_model(copy.deepcopy(base), lora)
    named = dict(adapted.named_parameters())
    randomize(nn.ParameterList(p for n, p in named.items() if "lora_B" in n), 7)
    with torch.no_grad():
        for n, p in named.items():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=torch.Generator().manual_seed(2)))
    adapted.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    model = copy.deepcopy(base)
    wrapped = inject_adapter(model, tmp_path / "peft")
    assert sorted(wrapped) == ["lm_head", "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    ids = torch.tensor([[1, 5, 7, 2, 30, 11]])
    with torch.no_grad():
        assert rel(model(ids).logits, theirs(ids).logits) < 1e-6
        assert rel(base(ids).logits, theirs(ids).logits) > 1e-2


def test_a_dora_no_dora_adapter_computes_exactly_is_refused_by_layer(tmp_path, lycoris):
    """LyCORIS' DoRA (eps on the norm; per input channel without wd_on_output; over a
    Tucker2 LoCon) and a DoRA per input channel are `TargetError`s naming the layer and the
    reason; the model is unchanged."""
    model = net()
    before = copy.deepcopy(model.state_dict())
    lycoris_dora(lycoris, net(), "locon", 2, True).save_weights(
        str(tmp_path / "l.safetensors"), torch.float32, {}
    )
    lycoris_dora(lycoris, net(), "locon", 2, True, use_tucker=True).save_weights(
        str(tmp_path / "t.safetensors"), torch.float32, {}
    )
    torch.manual_seed(4)
    lora = LoRA(torch.randn(2, 64), torch.randn(96, 2), 0.5)
    per_input = Adapter({"lin": DoRA(lora, torch.rand(1, 64) + 1, axis=1)})
    cases = [
        (tmp_path / "l.safetensors", r"layer 'conv' is a DoRA \(LoCon\).*eps of the weight's"),
        (tmp_path / "t.safetensors", r"layer 'conv' is a DoRA \(Tucker2\).*LoRA update only"),
        (per_input, r"layer 'lin' is a DoRA \(LoRA\).*per input channel"),
    ]
    for adapter, match in cases:
        with pytest.raises(errors.TargetError, match=match):
            inject_adapter(model, adapter)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert not any(isinstance(m, LowRankAdapter) for m in model.modules())


def test_a_dora_merge_beside_another_adapter_or_weighted_is_refused(tmp_path):
    peft_dora(tmp_path, net())
    base = save_state(net().state_dict(), tmp_path / "base.safetensors")
    out = tmp_path / "merged.safetensors"
    with pytest.raises(errors.MergeError, match=r"conv.weight.*DoRA.*order"):
        merge_checkpoint(base, [tmp_path / "peft", tmp_path / "peft"], out)
    with pytest.raises(errors.MergeError, match=r"conv.weight.*weight 1 only"):
        merge_checkpoint(base, [tmp_path / "peft"], out, weights=[0.5])
    assert not out.exists()
    model = net()
    with pytest.raises(errors.MergeError, match="weight 1 only"):
        apply_adapter(model, tmp_path / "peft", weight=0.5)
    assert torch.equal(model.lin.weight, net().lin.weight)


# ----------------------------------------------------------------------------- identities


@settings(max_examples=30, deadline=None)
@given(
    out_features=st.integers(1, 6),
    in_features=st.integers(1, 6),
    kernel=st.sampled_from([(), (1,), (3,), (2, 3)]),
    axis=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_dora_merge_identities(out_features, in_features, kernel, axis, seed):
    """The merged weight's norms along `axis` are |m|; with m = ‖W + ΔW‖ the merge is W + ΔW;
    streamed by row blocks it equals the whole (float64)."""
    g = torch.Generator().manual_seed(seed)
    shape = (out_features, in_features, *kernel)
    weight = torch.randn(shape, generator=g, dtype=torch.float64)
    down = torch.randn(2, in_features, *kernel, generator=g, dtype=torch.float64)
    up = torch.randn(out_features, 2, *([1] * len(kernel)), generator=g, dtype=torch.float64)
    update = LoRA(down, up, 0.7)
    delta = 0.7 * torch.einsum("or,ri->oi", up.flatten(1), down.flatten(1)).reshape(shape)
    dims = [d for d in range(len(shape)) if d != axis]
    norms = (weight + delta).square().sum(dim=dims, keepdim=True).sqrt()
    magnitude = torch.rand(norms.shape, generator=g, dtype=torch.float64) + 0.5
    merged = DoRA(update, magnitude, axis).merged(weight)
    got = merged.square().sum(dim=dims, keepdim=True).sqrt()
    assert torch.allclose(got, magnitude, rtol=1e-12)
    assert torch.allclose(DoRA(update, norms, axis).merged(weight), weight + delta, rtol=1e-12)
    reference = dora64(weight, delta, magnitude.flatten(), axis)
    assert torch.allclose(merged, reference, rtol=1e-12)
    form = DoRA(update, magnitude, axis)
    squares = dora_squares(weight.split(2), form, torch.float64) if axis == 1 else None
    streamed = merged_blocks(weight.split(2), [(form, 1.0, "dora")], torch.float64, "w", None,
                             squares)  # fmt: skip
    assert torch.allclose(torch.cat(list(streamed)), reference, rtol=1e-12)


@pytest.mark.parametrize("size", [3e19, 1e-21], ids=["huge", "tiny"])
@pytest.mark.parametrize("axis", [0, 1])
def test_dora_norms_beyond_float32s_range_are_taken_in_float64(size, axis):
    """Weights whose squares overflow float32 (|w| > 1.8e19) or fall below its normal range
    (|w| < 1.1e-19) have norms float32 cannot hold: the merge takes them in float64 rather
    than giving zeros or a norm off by the lost digits (float64 reference), whole or
    streamed by row blocks."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.rand(6, 5, generator=g) + 0.5) * size
    root = size**0.5
    update = LoRA(torch.randn(2, 5, generator=g) * root, torch.randn(6, 2, generator=g) * root)
    delta = update.up.double() @ update.down.double()
    magnitude = torch.rand(weight.shape[axis], generator=g) + 0.5
    form = DoRA(update, magnitude.reshape((-1, 1) if axis == 0 else (1, -1)), axis)
    reference = dora64(weight, delta, magnitude, axis)
    assert rel(form.merged(weight), reference) < 1e-6
    squares = dora_squares(weight.split(2), form, torch.float32) if axis == 1 else None
    streamed = merged_blocks(weight.split(2), [(form, 1.0, "dora")], torch.float32, "w", None,
                             squares)  # fmt: skip
    assert rel(torch.cat(list(streamed)), reference) < 1e-6


def test_a_per_input_channel_norm_whose_sum_alone_overflows_float32_is_exact():
    """Each block's sums of squares within float32 (2 rows of 1e19: 2e38), their sum over
    the whole weight past it (6e38): summed on in float64."""
    weight = torch.full((6, 5), 1e19)
    form = DoRA(LoRA(torch.zeros(1, 5), torch.zeros(6, 1)), torch.ones(1, 5), 1)
    squares = dora_squares(weight.split(2), form, torch.float32)
    streamed = merged_blocks(weight.split(2), [(form, 1.0, "dora")], torch.float32, "w", None,
                             squares)  # fmt: skip
    assert torch.allclose(torch.cat(list(streamed)), torch.full((6, 5), 6**-0.5))


def test_a_lycoris_dora_channel_of_zeros_merges_as_lycoris_runs_it(tmp_path, lycoris):
    """LyCORIS adds float32's eps to the norm: an output channel whose W + ΔW is 0 gives 0
    (not NaN) in LyCORIS' forward, and in lowrank's merge of its file."""
    model = net()
    with torch.no_grad():
        model.lin.weight[3] = 0
    base = copy.deepcopy(model)
    network = lycoris_dora(lycoris, model, "locon", 2, wd_on_output=True)
    with torch.no_grad():
        next(m for n, m in network.named_modules() if n.endswith("lin")).lora_up.weight[3] = 0
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    expected = outputs(model)
    assert bool(torch.isfinite(expected).all())
    apply_adapter(base, tmp_path / "l.safetensors")
    assert torch.equal(base.lin.weight[3], torch.zeros(64))
    assert rel(outputs(base), expected) < 1e-5


@pytest.mark.parametrize("wd_on_output", [True, False], ids=["on_out", "on_in"])
def test_a_bfloat16_dora_scale_adds_bfloat16s_eps_as_lycoris_does(tmp_path, lycoris, wd_on_output):
    """LyCORIS takes the norm in the dtype its network runs in and adds that dtype's eps: a
    network trained in bfloat16 on a bfloat16 module, saved in bfloat16, adds bfloat16's
    eps (2⁻⁷, 13 % of these norms). Applied to the module, the file gives LyCORIS' forward
    and its `merge_to` (to bfloat16 rounding), and the float64 formula with bfloat16's eps
    (float32's was read: 13 % off). A PEFT-style DoRA (eps 0) of a bfloat16 magnitude is
    written to LyCORIS as it is, bit for bit, and read back with the weight's eps."""
    base = net()
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.mul_(0.1)  # norms near 0.06
    base = base.to(torch.bfloat16)
    model = copy.deepcopy(base)
    lycoris.LycorisNetwork.apply_preset({"target_name": list(TARGETS)})
    network = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=2, algo="locon",
                                     dora_wd=True, wd_on_output=wd_on_output)  # fmt: skip
    network.apply_to()
    params = dict(network.named_parameters())
    randomize(nn.ParameterList(p for n, p in params.items() if "dora_scale" not in n), 2, 0.02)
    with torch.no_grad():
        for n, p in params.items():
            if "dora_scale" in n:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=torch.Generator().manual_seed(3)))
    network.to(torch.bfloat16)
    inputs = [x.to(torch.bfloat16) for x in INPUTS]
    with torch.no_grad():
        expected = torch.cat([y.flatten() for y in model(*inputs)])
    network.save_weights(str(tmp_path / "l.safetensors"), torch.bfloat16, {})
    adapter = load_adapter(tmp_path / "l.safetensors", base=base)
    ours = copy.deepcopy(base)
    apply_adapter(ours, tmp_path / "l.safetensors")
    with torch.no_grad():
        got = torch.cat([y.flatten() for y in ours(*inputs)])
    assert rel(got, expected) < 1e-2
    network.merge_to()
    for name, form in adapter.items():
        weight, merged = getattr(base, name).weight, getattr(ours, name).weight
        assert rel(merged, getattr(model, name).weight) < 1e-2
        delta = form.update.to_dense().reshape(weight.shape)
        want = dora64(weight, delta, form.magnitude, form.axis, eps=2.0**-7)
        assert rel(merged, want) < 4e-3
    assert {form.eps for form in adapter.layers.values()} == {None}  # the weight's dtype's
    lin = adapter["lin"]
    peft_style = Adapter({"lin": DoRA(lin.update, lin.magnitude, lin.axis)})
    save_adapter(peft_style, tmp_path / "p.safetensors", "lycoris")
    back = load_adapter(tmp_path / "p.safetensors")
    (form,) = back.layers.values()
    assert form.eps is None and form.magnitude.dtype == torch.bfloat16
    assert torch.equal(form.magnitude, peft_style["lin"].magnitude)


@pytest.mark.parametrize("wd_on_output", [True, False], ids=["on_out", "on_in"])
def test_a_float32_dora_saved_in_bfloat16_adds_the_eps_lycoris_runs_it_with(
    tmp_path, lycoris, wd_on_output
):
    """A LyCORIS DoRA trained in float32 and saved in bfloat16 (`save_weights(dtype=
    torch.bfloat16)`): LyCORIS builds `dora_scale` in float32 and copies the file's values
    into it, so on a float32 model its forward and `merge_to` add float32's eps, not
    bfloat16's (2⁻⁷, 13 % of these norms, which lowrank read from the file's dtype); on a
    bfloat16 model (`merge_to` casts the network to the weight's dtype) bfloat16's. lowrank's
    merge into each model and its checkpoint equals LyCORIS' own, and the float64 formula
    with that eps."""
    base = net()
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.mul_(0.1)  # norms near 0.06
    model = copy.deepcopy(base)
    network = lycoris_dora(lycoris, model, "locon", 2, wd_on_output)
    with torch.no_grad():  # factors of the norms' size: ΔW changes them, not swamps them
        for name, parameter in network.named_parameters():
            if "dora_scale" not in name:
                parameter.mul_(0.1)
    network.save_weights(str(tmp_path / "l.safetensors"), torch.bfloat16, {})
    saved = load_file(str(tmp_path / "l.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        theirs = copy.deepcopy(base).to(dtype)
        if wd_on_output:  # what inference loads with
            loaded, _ = lycoris.create_lycoris_from_weights(
                1.0, str(tmp_path / "l.safetensors"), theirs
            )
            loaded.apply_to()
        else:  # create_lycoris_from_weights builds wd_on_out modules only
            loaded = lycoris.create_lycoris(theirs, 1.0, linear_dim=2, linear_alpha=2,
                                            algo="locon", dora_wd=True,
                                            wd_on_output=False)  # fmt: skip
            loaded.apply_to()
            loaded.load_weights(str(tmp_path / "l.safetensors"))
        assert {p.dtype for p in loaded.parameters()} == {torch.float32}  # whatever the file's
        loaded.to(dtype)  # its forward needs the network in the model's dtype
        inputs = [x.to(dtype) for x in INPUTS]
        with torch.no_grad():
            expected = torch.cat([y.flatten() for y in theirs(*inputs)])
        ours = copy.deepcopy(base).to(dtype)
        apply_adapter(ours, tmp_path / "l.safetensors")
        with torch.no_grad():
            got = torch.cat([y.flatten() for y in ours(*inputs)])
        assert rel(got, expected) < tolerance, dtype
        checkpoint = save_state(copy.deepcopy(base).to(dtype).state_dict(),
                                tmp_path / f"base_{dtype}.safetensors")  # fmt: skip
        merge_checkpoint(checkpoint, tmp_path / "l.safetensors", tmp_path / "m.safetensors")
        merged = load_file(str(tmp_path / "m.safetensors"))
        loaded.merge_to()
        eps = torch.finfo(dtype).eps
        for name in TARGETS:
            stem = f"lycoris_{name}"
            weight = getattr(base, name).weight.to(dtype)
            delta = torch.einsum("or,ri->oi", saved[f"{stem}.lora_up.weight"].double().flatten(1),
                                 saved[f"{stem}.lora_down.weight"].double().flatten(1))
            want = dora64(weight, delta.reshape(weight.shape), saved[f"{stem}.dora_scale"],
                          0 if wd_on_output else 1, eps)  # fmt: skip
            lycoris_merged = getattr(theirs, name).weight
            assert rel(lycoris_merged, want) < tolerance, (dtype, name)
            assert rel(merged[f"{name}.weight"], lycoris_merged) < tolerance, (dtype, name)
            assert rel(getattr(ours, name).weight, lycoris_merged) < tolerance, (dtype, name)
            assert rel(merged[f"{name}.weight"], want) < tolerance / 2, (dtype, name)


def test_lycoris_eps_keeps_a_zero_channel_zero(tmp_path):
    """LyCORIS adds float32's eps to the norm, so a channel whose W + ΔW is 0 merges to 0;
    PEFT's norm has none, and the merge of such a PEFT layer is a NonFiniteError naming the
    weight rather than NaN."""
    weight = torch.randn(4, 5)
    weight[1] = 0
    up = torch.randn(4, 2)
    up[1] = 0
    update = LoRA(torch.randn(2, 5), up)
    magnitude = torch.rand(4, 1) + 0.5
    merged = DoRA(update, magnitude, 0, torch.finfo(torch.float32).eps).merged(weight)
    assert torch.equal(merged[1], torch.zeros(5)) and bool(torch.isfinite(merged).all())
    base = save_state({"lin.weight": weight}, tmp_path / "base.safetensors")
    with pytest.raises(errors.NonFiniteError, match=r"lin.weight.*DoRA norm"):
        merge_checkpoint(base, Adapter({"lin": DoRA(update, magnitude)}), tmp_path / "m")


def test_a_dora_adapter_weighted_0_is_left_out_of_a_combination(tmp_path):
    """A combination leaves out the layers of an adapter weighted 0, a DoRA's too (it was a
    `DTypeError`, as for a DoRA weighted 1): the result is the other adapter, which PEFT
    loads to its own merge. A merge of it at weight 0 stays refused, naming the weight (the
    tools disagree there: PEFT's LoRA at scale 0 gives m ⊙ W / ‖W‖, LyCORIS' rescaling at
    0 gives W + ΔW)."""
    peft = pytest.importorskip("peft")
    peft_dora(tmp_path, net())
    lora = peft.get_peft_model(net(), peft.LoraConfig(r=2, target_modules=["lin", "proj"],
                                                      init_lora_weights=False))  # fmt: skip
    lora.save_pretrained(tmp_path / "lora")
    expected = lora.merge_and_unload().state_dict()
    combine_adapters([tmp_path / "peft", tmp_path / "lora"], tmp_path / "c", weights=[0, 1])
    loaded = peft.PeftModel.from_pretrained(net(), tmp_path / "c").merge_and_unload()
    for key, tensor in loaded.state_dict().items():
        assert rel(tensor, expected[key]) < 1e-6 if tensor.is_floating_point() else True, key
    assert not json.loads((tmp_path / "c" / "adapter_config.json").read_text())["use_dora"]
    base = save_state(net().state_dict(), tmp_path / "base.safetensors")
    with pytest.raises(errors.MergeError, match=r"\.weight: .*DoRA, which merges at weight 1 "
                       r"only \(got 0\)"):  # fmt: skip
        merge_checkpoint(base, [tmp_path / "peft", tmp_path / "lora"], tmp_path / "m",
                         weights=[0, 1])  # fmt: skip
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_lycoris_dora_merged_into_a_float8_checkpoint_adds_float32s_eps(tmp_path, dtype):
    """No tool takes a LyCORIS DoRA's norm in an 8-bit float (LyCORIS' merge_to fails on such
    a weight, ComfyUI merges in float32): the merge adds float32's eps, not float8's (0.125 or
    0.25, a quarter of these norms)."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(8, 16, generator=g) * 0.1).to(dtype)
    up, down = torch.randn(8, 2, generator=g) * 0.05, torch.randn(2, 16, generator=g) * 0.05
    magnitude = (weight.double() + up.double() @ down.double()).norm(dim=1, keepdim=True) * 1.3
    save_file({"lin.weight": weight}, str(tmp_path / "base.safetensors"))
    save_file({"lora_unet_lin.lora_up.weight": up, "lora_unet_lin.lora_down.weight": down,
               "lora_unet_lin.alpha": torch.tensor(2.0),
               "lora_unet_lin.dora_scale": magnitude.float()}, str(tmp_path / "d.safetensors"))
    merge_checkpoint(tmp_path / "base.safetensors", tmp_path / "d.safetensors",
                     tmp_path / "out.safetensors", dtype="float32")  # fmt: skip
    got = load_file(str(tmp_path / "out.safetensors"))["lin.weight"]
    want = dora64(weight, up @ down, magnitude.float().flatten(), 0, torch.finfo(torch.float32).eps)
    assert rel(got, want) < 1e-6
