"""DoRA adapters (`dora=True`) against the real PEFT (`LoraConfig(use_dora=True)`): the
magnitude's start, the forward with and without dropout, the gradients of the factors and
the magnitude, a few optimiser steps, merge / unmerge and `merge_and_unload`; the state
dict, swap and adapter-file paths carrying the magnitude; and the settings refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lowrank import (
    ArgumentError,
    MergeError,
    NonFiniteError,
    StateDictError,
    TargetError,
)
from lowrank.nn import (
    AdapterConfig,
    LoRALinear,
    adapter_state_dict,
    count_parameters,
    inject,
    load_adapter_state_dict,
    merge,
    merge_and_unload,
    reuse_dora_factors,
    swap_adapter,
    unmerge,
)
from lowrank.report import count_model

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.conv1d = nn.Conv1d(5, 4, 3, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.conv(x)).mean(dim=2)  # (N, 5, W)
        return self.head(torch.tanh(self.conv1d(hidden)).mean(dim=2))


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 3, (1, 2, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


CASES = {
    "mlp": (MLP, ["fc1", "fc2"], (4, 6)),
    "cnn": (CNN, ["conv", "conv1d", "head"], (2, 3, 6, 7)),
    "conv3d": (Conv3dNet, ["conv"], (2, 2, 3, 4, 5)),
}


def peft_dora(model: nn.Module, targets: list[str], *, init: bool = False, **config):
    lora_config = peft.LoraConfig(target_modules=targets, use_dora=True,
                                  init_lora_weights=init, **config)  # fmt: skip
    return peft.get_peft_model(model, lora_config)


def peft_layer(theirs: nn.Module, name: str) -> nn.Module:
    return theirs.base_model.model.get_submodule(name)


def peft_tensors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's `lora_A`, `lora_B` weights and DoRA magnitude of one layer."""
    magnitude = layer.lora_magnitude_vector["default"].weight
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight, magnitude


def copy_from_peft(theirs: nn.Module, ours: nn.Module, targets: list[str]) -> None:
    with torch.no_grad():
        for name in targets:
            adapter = ours.get_submodule(name)
            down, up, magnitude = peft_tensors(peft_layer(theirs, name))
            adapter.down.copy_(down)
            adapter.up.copy_(up.reshape(adapter.up.shape))
            adapter.magnitude.copy_(magnitude.reshape(-1))


def paired(case: str, *, dropout: float = 0.0, init: bool = False):
    """(ours, theirs, targets, input): one model adapted by both, PEFT's random factors and
    magnitude copied into ours."""
    cls, targets, shape = CASES[case]
    torch.manual_seed(0)
    model = cls()
    ours = copy.deepcopy(model)
    inject(ours, targets, rank=2, alpha=6, dropout=dropout, dora=True)
    theirs = peft_dora(model, targets, init=init, r=2, lora_alpha=6, lora_dropout=dropout)
    copy_from_peft(theirs, ours, targets)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return ours, theirs, targets, x


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want.reshape(got.shape), rtol=2e-5, atol=2e-6)


def equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit: the same operations in the same order as PEFT's (the norm, float32)."""
    torch.testing.assert_close(got, want.reshape(got.shape), rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_magnitude_starts_as_peft_does(case):
    """m starts at ‖W‖ per output channel (PEFT's default start), norms over every axis but
    the output channel of a convolution; the first output is the base model's."""
    cls, targets, shape = CASES[case]
    torch.manual_seed(0)
    model = cls()
    ours = copy.deepcopy(model)
    inject(ours, targets, rank=2, alpha=6, dora=True)
    theirs = peft_dora(copy.deepcopy(model), targets, init=True, r=2, lora_alpha=6)
    x = torch.randn(shape)
    for name in targets:
        weight = model.get_submodule(name).weight.double()
        want = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.ndim)))
        got = ours.get_submodule(name).magnitude
        assert got.shape == (weight.shape[0],)
        close(got, want.float())
        close(got, peft_tensors(peft_layer(theirs, name))[2])
    close(ours(x), model(x))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_gradients_and_steps_equal_peft(case, dropout):
    ours, theirs, targets, x = paired(case, dropout=dropout)
    ours_opt = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    theirs_opt = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        ours.train(), theirs.train()
        torch.manual_seed(step)
        got = ours(x)
        torch.manual_seed(step)
        want = theirs(x)
        equal(got, want)
        got.square().sum().backward()
        want.square().sum().backward()
        for name in targets:
            adapter = ours.get_submodule(name)
            for mine, theirs_param in zip((adapter.down, adapter.up, adapter.magnitude),
                                          peft_tensors(peft_layer(theirs, name)), strict=True):
                equal(mine.grad, theirs_param.grad)
        ours_opt.step(), theirs_opt.step()
        ours_opt.zero_grad(), theirs_opt.zero_grad()
    ours.eval(), theirs.eval()
    equal(ours(x), theirs(x))
    for name in targets:
        adapter = ours.get_submodule(name)
        equal(adapter.magnitude, peft_tensors(peft_layer(theirs, name))[2])
    # merged as PEFT merges: plain modules with the same weights
    plain = merge_and_unload(ours)
    merged = theirs.merge_and_unload()
    for name in targets:
        assert type(plain.get_submodule(name)) is type(merged.get_submodule(name))
        close(plain.get_submodule(name).weight, merged.get_submodule(name).weight)
    close(plain(x), merged(x))


def test_merge_unmerge_restores_the_base_and_a_failed_merge_changes_nothing():
    ours, _, targets, x = paired("cnn")
    ours.eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # m apart from ‖W + ΔW‖, as after training
        for name in targets:
            magnitude = ours.get_submodule(name).magnitude
            magnitude.mul_(torch.rand(magnitude.shape, generator=generator) + 0.5)
    before = {name: ours.get_submodule(name).base.weight.clone() for name in targets}
    want = ours(x)
    merge(ours)
    close(ours(x), want)
    unmerge(ours)  # W' ⊙ n / m − ΔW, with the norm kept at the merge
    for name in targets:
        close(ours.get_submodule(name).base.weight, before[name])
    before = {name: ours.get_submodule(name).base.weight.clone() for name in targets}
    merge(ours, exact=True)
    unmerge(ours)  # the copy kept
    for name in targets:
        assert torch.equal(ours.get_submodule(name).base.weight, before[name])
    # a NaN magnitude: the merge refuses and writes nothing
    layer = ours.get_submodule("conv")
    with torch.no_grad():
        layer.magnitude[1] = float("nan")
    with pytest.raises(NonFiniteError, match="DoRA"):
        merge(ours)
    for name in targets:
        assert not ours.get_submodule(name).merged
        assert torch.equal(ours.get_submodule(name).base.weight, before[name])
    # a zero norm (W + ΔW = 0 in one channel) is refused as well
    with torch.no_grad():
        layer.magnitude[1] = 1.0
        layer.base.weight[2] = 0.0
        layer.up.zero_()
    with pytest.raises(NonFiniteError):
        layer.merge()
    assert not layer.merged
    assert not layer.base.weight[2].any()


def dora64(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m ⊙ (W + ΔW) / ‖W + ΔW‖ in float64, the norm per output channel (rows of `(out, …)`)."""
    v = weight.double() + delta.double()
    norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.ndim)), keepdim=True)
    return magnitude.double().reshape(-1, *[1] * (v.ndim - 1)) * v / norm


def test_a_zero_magnitude_merges_and_unmerges_its_channel_back():
    """A channel whose magnitude is 0 merges to 0 (its output is the bias alone, as in
    PEFT's forward), which keeps nothing of W there: the merge keeps those channels of W
    aside, and `unmerge` (and a swap's restore) puts them back bit for bit (it was
    0 / 0 = NaN: a NonFiniteError, the adapter stuck merged). PEFT's own unmerge gives NaN
    there, so the reference is the float64 formula, PEFT's forward and W itself."""
    ours, theirs, targets, x = paired("cnn")
    ours.eval(), theirs.eval()
    with torch.no_grad():
        for name in targets:
            peft_tensors(peft_layer(theirs, name))[2].view(-1)[1] = 0.0
    copy_from_peft(theirs, ours, targets)
    want = theirs(x)
    before = {name: ours.get_submodule(name).base.weight.clone() for name in targets}
    state = {key: tensor.clone() for key, tensor in adapter_state_dict(ours).items()}
    for swap in (False, True):
        merge(ours)
        if swap:  # merged W restored (its zeroed channels from the merge's), merged again
            swap_adapter(ours, state)
        for name in targets:
            layer = ours.get_submodule(name)
            delta = (layer.up.flatten(1) @ layer.down.flatten(1)).reshape(before[name].shape)
            assert not layer.base.weight[1].any()
            expected = dora64(before[name], 3 * delta, layer.magnitude)
            torch.testing.assert_close(layer.base.weight.double(), expected, rtol=1e-6, atol=1e-7)
        close(ours(x), want)
        unmerge(ours)
        for name in targets:
            weight = ours.get_submodule(name).base.weight
            assert torch.equal(weight[1], before[name][1])
            close(weight, before[name])
        close(ours(x), want)
    # a Conv1D's channel is a column of its stored (in, out) weight; a bfloat16 one too
    model = tiny_gpt2().to(torch.bfloat16)
    inject(model, ["c_attn"], rank=2, alpha=4, dora=True)
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    with torch.no_grad():
        layer.up.normal_(0.0, 0.05)
        layer.magnitude[[3, 40]] = 0.0
    weight = layer.base.weight
    stored = weight.clone()
    layer.merge()
    assert not weight[:, [3, 40]].any() and weight[:, 4].any()
    layer.unmerge()
    assert torch.equal(weight[:, [3, 40]], stored[:, [3, 40]])
    error = torch.linalg.vector_norm((weight - stored).double()) / stored.double().norm()
    assert error < 1e-2  # the other columns: W' ⊙ n / m − ΔW, rounded to bfloat16 twice


def test_a_loaded_merged_dora_adapter_refuses_to_unmerge():
    ours, _, _, x = paired("mlp")
    merge(ours)
    fresh, _, _, _ = paired("mlp")
    fresh.load_state_dict(ours.state_dict())
    assert fresh.fc1.merged
    fresh.eval(), ours.eval()
    close(fresh(x), ours(x))
    with pytest.raises(MergeError, match="norm"):
        unmerge(fresh)
    assert fresh.fc1.merged


def test_state_dict_and_swap_carry_the_magnitude():
    ours, _, targets, x = paired("cnn")
    ours.eval()
    state = {key: tensor.clone() for key, tensor in adapter_state_dict(ours).items()}
    assert {f"{name}.magnitude" for name in targets} <= state.keys()
    assert state["conv.magnitude"].shape == (5,)
    want = ours(x)
    other, _, _, _ = paired("cnn")
    with torch.no_grad():
        for name in targets:
            other.get_submodule(name).magnitude.mul_(1.5)
    other.eval()
    assert not torch.allclose(other(x), want)
    load_adapter_state_dict(other, state)
    close(other(x), want)
    # a swap into a merged model gives the weights a fresh merge of that state gives
    third, _, _, _ = paired("cnn")
    with torch.no_grad():
        for name in targets:
            third.get_submodule(name).magnitude.mul_(0.5)
    merge(third)
    swap_adapter(third, state)
    third.eval()
    close(third(x), want)
    merge(ours)
    for name in targets:
        close(third.get_submodule(name).base.weight, ours.get_submodule(name).base.weight)
    unmerge(third)  # with the norm of the swap's merge: W itself, not W scaled per channel
    close(third(x), want)
    for name in targets:
        close(third.get_submodule(name).base.weight, other.get_submodule(name).base.weight)
    with pytest.raises(Exception, match="magnitude"):
        load_adapter_state_dict(other, {k: v for k, v in state.items() if "magnitude" not in k})


def test_written_peft_folder_loads_in_peft_to_the_same_outputs(tmp_path):
    from lowrank.io import model_adapter, save_adapter

    ours, _, targets, x = paired("cnn", dropout=0.1)
    # train a step so that the factors and magnitude are not PEFT's start
    ours.train()
    ours(x).square().sum().backward()
    with torch.no_grad():
        for parameter in ours.parameters():
            if parameter.grad is not None:
                parameter -= 0.05 * parameter.grad
    ours.eval()
    save_adapter(model_adapter(ours), tmp_path / "peft", "peft")
    loaded = peft.PeftModel.from_pretrained(fresh_cnn(), tmp_path / "peft").eval()
    for name in targets:
        layer = peft_layer(loaded, name)
        assert "default" in layer.lora_magnitude_vector
    close(loaded(x), ours(x))
    # merged adapters are written as merged: the same file
    merge(ours)
    save_adapter(model_adapter(ours), tmp_path / "merged", "peft")
    reloaded = peft.PeftModel.from_pretrained(fresh_cnn(), tmp_path / "merged").eval()
    close(reloaded(x), loaded(x))


def fresh_cnn() -> CNN:
    """The base `paired("cnn")` adapts."""
    torch.manual_seed(0)
    return CNN()


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"form": "tucker2"}, ArgumentError, "form 'lora' only"),
        ({"hard": True}, ArgumentError, "hard"),
        ({"fused": True}, ArgumentError, "fused"),
        ({"trainable_scale": True}, ArgumentError, "trainable_scale"),
        ({"init": "pissa"}, ArgumentError, "pissa"),
        ({"dora": "yes"}, ArgumentError, "dora"),
    ],
)
def test_settings_dora_does_not_run_are_refused_by_name(settings, error, match):
    model = MLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        inject(model, ["fc1"], rank=2, **{"dora": True, **settings})
    assert isinstance(model.fc1, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(error, match="fc1"):
        AdapterConfig(rank=2, **{"dora": True, **settings}).validated("fc1")


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (lambda: nn.Embedding(5, 4), "Embedding"),
        (lambda: nn.Conv2d(4, 4, 3, groups=2), "grouped"),
        (lambda: nn.Linear(4, 4, dtype=torch.complex64), "complex"),
    ],
)
def test_layers_dora_does_not_run_on_are_refused_by_name(layer, match):
    layer = layer()
    model = nn.Sequential(layer)
    with pytest.raises(TargetError, match=f"'0'.*{match}"):
        inject(model, ["0"], rank=2, dora=True)
    assert model[0] is layer


def test_counts_include_the_magnitude():
    model = CNN()
    report = count_model(model, ["conv", "conv1d", "head"], rank=2, dora=True)
    plain = count_model(model, ["conv", "conv1d", "head"], rank=2)
    assert report.adapter_params - plain.adapter_params == 5 + 4 + 3
    inject(model, ["conv", "conv1d", "head"], rank=2, dora=True)
    trainable, _ = count_parameters(model)
    assert trainable == report.adapter_params
    layer = LoRALinear(nn.Linear(6, 7), 2, dora=True)
    assert layer.num_params == 2 * (6 + 7) + 7
    assert "dora=True" in repr(layer)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_conv1d_dora_equals_peft_on_gpt2(tmp_path):
    """transformers' `Conv1D` stores its weight `(in, out)`: the norm is still per output
    channel (PEFT's `fan_in_fan_out`), merged into the stored layout."""
    from lowrank.io import apply_adapter, model_adapter, save_adapter

    model = tiny_gpt2()
    targets = ["c_attn", "c_proj"]
    ours = copy.deepcopy(model)
    inject(ours, targets, rank=2, alpha=4, dropout=0.2, dora=True)
    theirs = peft_dora(model, targets, r=2, lora_alpha=4, lora_dropout=0.2, fan_in_fan_out=True)
    names = [n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
             if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector]
    assert len(names) == 3  # c_attn, attn.c_proj, mlp.c_proj
    for name in names:
        weight = ours.get_submodule(name).base.weight.double()
        close(ours.get_submodule(name).magnitude, torch.linalg.vector_norm(weight, dim=0).float())
    copy_from_peft(theirs, ours, names)
    ids = torch.tensor([[1, 5, 7, 30], [2, 2, 0, 9]])
    for train in (True, False):
        ours.train(train), theirs.train(train)
        torch.manual_seed(3)
        got = ours(ids).logits
        torch.manual_seed(3)
        want = theirs(ids).logits
        equal(got, want)
        got.square().sum().backward()
        want.square().sum().backward()
        for name in names:
            adapter = ours.get_submodule(name)
            for mine, theirs_param in zip((adapter.down, adapter.up, adapter.magnitude),
                                          peft_tensors(peft_layer(theirs, name)), strict=True):
                equal(mine.grad, theirs_param.grad)
                mine.grad = None
        theirs.zero_grad()
    ours.eval(), theirs.eval()
    # written as a DoRA over the stored (in, out) layout, a magnitude per its axis 1: merged
    # by lowrank.io from a LyCORIS file into a fresh GPT-2, the outputs are the model's;
    # written to PEFT as the module LoRAs PEFT's DoRA runs on a Conv1D (fan_in_fan_out), which
    # PEFT loads to the model's logits (PEFT's target_parameters have no DoRA)
    adapter = model_adapter(ours)
    save_adapter(adapter, tmp_path / "peft", "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and not config.get("target_parameters")
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft").eval()
    equal(loaded(ids).logits, ours(ids).logits)
    save_adapter(adapter, tmp_path / "dora.safetensors", "lycoris")
    fused = tiny_gpt2().eval()
    apply_adapter(fused, tmp_path / "dora.safetensors")
    close(fused(ids).logits, ours(ids).logits)
    before = {name: ours.get_submodule(name).base.weight.clone() for name in names}
    merge(ours)
    close(ours(ids).logits, want)
    unmerge(ours)
    for name in names:
        close(ours.get_submodule(name).base.weight, before[name])
    plain, merged = merge_and_unload(ours), theirs.merge_and_unload()
    for name in names:
        close(plain.get_submodule(name).weight, merged.get_submodule(name).weight)


def test_dora_per_pattern_and_tracing():
    """`"dora": true` in a pattern's settings (a non-bool is refused by name); torch.fx,
    whose trace cannot choose the norm's dtype, is refused, and torch.export runs it."""
    model = MLP()
    with pytest.raises(TargetError, match="fc1"):
        inject(model, {"fc1": {"r": 2, "dora": "true"}})
    inject(model, {"fc1": {"r": 2, "dora": True}, "fc2": {"r": 2}})
    assert model.fc1.dora and not model.fc2.dora
    assert {"fc1.magnitude"} == {k for k in adapter_state_dict(model) if "magnitude" in k}
    with pytest.raises(TargetError, match="cannot trace a DoRA"):
        torch.fx.symbolic_trace(model)
    with torch.no_grad():
        model.fc1.up.normal_()
        model.fc1.magnitude.mul_(1.5)
    x = torch.randn(3, 6)
    exported = torch.export.export(model, (x,)).module()
    close(exported(x), model(x))


def test_reset_parameters_restarts_the_magnitude_at_the_base_norm():
    """A model built on the meta device and materialised: `reset_parameters` draws the
    factors and sets m to ‖W‖ of the base's own values (ΔW = 0)."""
    with torch.device("meta"):
        model = CNN()
    inject(model, ["conv", "head"], rank=2, dora=True)
    assert model.conv.magnitude.shape == (5,) and model.conv.magnitude.is_meta
    model.to_empty(device="cpu")
    for name in ("conv", "head"):
        adapter = model.get_submodule(name)
        adapter.base.reset_parameters()
        adapter.reset_parameters()
        weight = adapter.base.weight.double()
        norm = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.ndim)))
        close(adapter.magnitude, norm.float())
        assert not adapter.up.any()


def test_dora_merges_and_unmerges_on_the_meta_device_as_lora_does():
    """A model built on the meta device (no values): merge, unmerge, an exact merge and
    merge_and_unload ran for LoRA adapters, but a DoRA adapter's merge checked its meta
    result for NaN/Inf and failed inside torch ("Tensor.item() cannot be called on meta
    tensors"); its unmerge then found no kept norm. Now both run, the weights stay meta."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 5), nn.Conv2d(2, 3, 3))
    inject(model, ["0", "1"], rank=2, dora=True)
    for exact in (False, True):
        merge(model, exact=exact)
        assert all(model[i].merged and model[i].base.weight.is_meta for i in (0, 1))
        unmerge(model)
        assert not any(model[i].merged for i in (0, 1))
    plain = merge_and_unload(model)
    assert type(plain[0]) is nn.Linear and plain[0].weight.is_meta
    assert plain[1].weight.shape == (3, 2, 3, 3)


@pytest.mark.parametrize("saved_dora", [True, False])
def test_a_merged_state_of_the_other_kind_is_refused_even_without_strict(saved_dora):
    """A merged DoRA state (base weight m ⊙ (W + ΔW) / ‖W + ΔW‖) loaded with strict=False
    into plain LoRA adapters set them merged, only its magnitude reported unexpected: their
    unmerge then took ΔW out of the DoRA weight (W off by ~1.6 here). A merged LoRA state
    into DoRA adapters kept their own magnitude beside a weight that holds none. Both are
    refused naming the adapter, nothing loaded."""
    torch.manual_seed(0)
    model = MLP()
    saved, target = copy.deepcopy(model), copy.deepcopy(model)
    inject(saved, ["fc1"], rank=2, dora=saved_dora)
    inject(target, ["fc1"], rank=2, dora=not saved_dora)
    with torch.no_grad():
        saved.fc1.up.normal_()
    merge(saved)
    before = copy.deepcopy(target.state_dict())
    match = "not DoRA" if saved_dora else "lacks magnitude"
    with pytest.raises(StateDictError, match=f"'fc1'.*{match}"):
        target.load_state_dict(saved.state_dict(), strict=False)
    assert not target.fc1.merged
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    torch.testing.assert_close(target.fc1.base.weight, model.fc1.weight, rtol=0, atol=0)


def test_an_unmerged_dora_state_into_plain_adapters_is_refused_even_without_strict():
    """Found by the model state machine: an unmerged DoRA state loaded with strict=False
    into plain LoRA adapters loaded its factors, only its magnitude reported unexpected, and
    the model then computed W + ΔW instead of m ⊙ (W + ΔW) / ‖W + ΔW‖ (a silently other
    model). Refused naming the adapter, nothing loaded."""
    torch.manual_seed(0)
    model = MLP()
    saved, target = copy.deepcopy(model), copy.deepcopy(model)
    inject(saved, ["fc1"], rank=2, dora=True)
    inject(target, ["fc1"], rank=2)
    with torch.no_grad():
        saved.fc1.up.normal_()
        saved.fc1.magnitude.mul_(2.0)
    before = copy.deepcopy(target.state_dict())
    for state in (saved.state_dict(), {k: v for k, v in saved.state_dict().items()
                                       if ".base." not in k}):  # fmt: skip
        with pytest.raises(StateDictError, match=r"'fc1' is not DoRA.*fc1\.magnitude"):
            target.load_state_dict(state, strict=False)
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


# Reuse of DoRA's per-channel factor m / ‖W + ΔW‖ in inference (lowrank.nn.reuse): each
# change below happens after a forward without gradients has kept the factor, and the next
# forward must see it. PEFT's layers (which recompute the norm at every call) get the same
# values copied in, and a deep copy of ours (nothing kept) runs the same input.


def sync_to_peft(ours: nn.Module, theirs: nn.Module, targets: list[str]) -> None:
    """Copy every tensor DoRA's output depends on from our adapters into PEFT's layers."""
    with torch.no_grad():
        for name in targets:
            adapter, layer = ours.get_submodule(name), peft_layer(theirs, name)
            down, up, magnitude = peft_tensors(layer)
            down.copy_(adapter.down)
            up.copy_(adapter.up.reshape(up.shape))
            magnitude.copy_(adapter.magnitude.reshape(magnitude.shape))
            layer.base_layer.weight.copy_(adapter.base.weight)
            if adapter.base.bias is not None:
                layer.base_layer.bias.copy_(adapter.base.bias)
            layer.scaling["default"] = adapter.scale


def agree(ours: nn.Module, theirs: nn.Module, targets: list[str], x: torch.Tensor,
          *, peft_too: bool = True) -> None:
    """Ours (eval, no gradients), PEFT's after `sync_to_peft` (unless not `peft_too`) and a
    deep copy of ours give the same outputs bit for bit."""
    sync_to_peft(ours, theirs, targets)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        got = ours(x)
        if peft_too:
            equal(got, theirs(x))
        equal(got, copy.deepcopy(ours)(x))


def _in_place(ours, targets, tensor):
    with torch.no_grad():
        for name in targets:
            value = getattr(ours.get_submodule(name), tensor)
            value.copy_(torch.randn_like(value))


def _base_weight_in_place(ours, targets):
    with torch.no_grad():
        for name in targets:
            ours.get_submodule(name).base.weight.mul_(0.5)


def _base_weight_data(ours, targets):
    for name in targets:  # `.data =` leaves the version counter as it was
        weight = ours.get_submodule(name).base.weight
        weight.data = torch.randn_like(weight)


def _base_weight_replaced(ours, targets):
    for name in targets:
        base = ours.get_submodule(name).base
        base.weight = nn.Parameter(torch.randn_like(base.weight), requires_grad=False)


def _optimizer_step(ours, targets, x):
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    ours(x).square().sum().backward()  # in eval mode: the kept factor stays
    optimizer.step()


def _load_state_dict(ours, targets):
    state = {key: torch.randn_like(value) if value.is_floating_point() else value
             for key, value in ours.state_dict().items() if "_extra_state" not in key}  # fmt: skip
    ours.load_state_dict(state, strict=False)


def _merge_unmerge(ours, targets):
    with torch.no_grad():
        for name in targets:  # ΔW large enough that W − ΔW rounds off W
            ours.get_submodule(name).up.normal_()
    merge(ours)
    unmerge(ours)


def _swap(ours, targets):
    state = {key: torch.randn_like(value) for key, value in adapter_state_dict(ours).items()}
    swap_adapter(ours, state)  # leaves the adapters merged with it
    unmerge(ours)


def _scale(ours, targets):
    for name in targets:
        ours.get_submodule(name).scale = 1.75


CHANGES = {
    "up": lambda ours, targets, x: _in_place(ours, targets, "up"),
    "down": lambda ours, targets, x: _in_place(ours, targets, "down"),
    "magnitude": lambda ours, targets, x: _in_place(ours, targets, "magnitude"),
    "base weight in place": lambda ours, targets, x: _base_weight_in_place(ours, targets),
    "base weight .data": lambda ours, targets, x: _base_weight_data(ours, targets),
    "base weight replaced": lambda ours, targets, x: _base_weight_replaced(ours, targets),
    "optimizer step": _optimizer_step,
    "load_state_dict": lambda ours, targets, x: _load_state_dict(ours, targets),
    "merge, unmerge": lambda ours, targets, x: _merge_unmerge(ours, targets),
    "swap_adapter": lambda ours, targets, x: _swap(ours, targets),
    "scale": lambda ours, targets, x: _scale(ours, targets),
}


@pytest.mark.parametrize("case", ["mlp", "cnn"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_the_kept_dora_factor_follows_every_change(case, change):
    ours, theirs, targets, x = paired(case)
    with reuse_dora_factors(ours):
        agree(ours, theirs, targets, x)  # keeps the factor
        CHANGES[change](ours, targets, x)
        agree(ours, theirs, targets, x)
        agree(ours, theirs, targets, x)  # and the one kept after the change


def test_without_reuse_asked_for_a_write_through_data_is_seen():
    """By default nothing is kept: a write the version counter does not see (`.data`, as
    an EMA update or an old loader makes) reaches the next forward; inside the block it is
    the documented exception, and at exit the kept factors are freed."""
    ours, theirs, targets, x = paired("mlp")
    agree(ours, theirs, targets, x)
    for name in targets:
        ours.get_submodule(name).base.weight.data.mul_(0.5)
    agree(ours, theirs, targets, x)
    with reuse_dora_factors(ours):
        agree(ours, theirs, targets, x)
        with NormCount() as count, torch.no_grad():
            ours(x)
        assert count.calls == 0
    with NormCount() as count, torch.no_grad():
        ours(x)
    assert count.calls == len(targets)
    assert all(ours.get_submodule(name).dora_reuse._value is None for name in targets)


def test_the_kept_dora_factor_follows_dtype_autocast_and_requires_grad():
    ours, theirs, targets, x = paired("mlp")
    with reuse_dora_factors(ours):
        _dtype_autocast_and_requires_grad(ours, theirs, targets, x)


def _dtype_autocast_and_requires_grad(ours, theirs, targets, x):
    agree(ours, theirs, targets, x)
    ours.double(), theirs.double()
    agree(ours, theirs, targets, x.double())
    ours.float(), theirs.float()
    agree(ours, theirs, targets, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # ΔW's product in bfloat16
        agree(ours, theirs, targets, x, peft_too=False)  # PEFT casts otherwise
    agree(ours, theirs, targets, x)
    # frozen, a forward with gradients on may keep the factor; thawed, m takes its gradient
    for model in (ours, theirs):
        model.requires_grad_(False)
    agree(ours, theirs, targets, x)
    ours(x)
    for model in (ours, theirs):
        for name, param in model.named_parameters():
            param.requires_grad_("magnitude" in name)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    for name in targets:
        want = peft_tensors(peft_layer(theirs, name))[2].grad
        equal(ours.get_submodule(name).magnitude.grad, want)


class NormCount(torch.overrides.TorchFunctionMode):
    """Counts the calls of `torch.linalg.vector_norm` (DoRA's ‖W + ΔW‖)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.linalg.vector_norm
        return func(*args, **(kwargs or {}))


def test_the_dora_factor_is_kept_only_where_no_gradient_needs_it():
    """Without gradients the norm is computed once per adapter, then reused; with gradients
    on (and the factors trainable) at every call; `train()` frees the kept factors, and an
    adapter pickles and copies with one kept."""
    ours, _, targets, x = paired("cnn")
    ours.eval()
    with reuse_dora_factors(ours):
        _kept_only_where_no_gradient_needs_it(ours, targets, x)


def _kept_only_where_no_gradient_needs_it(ours, targets, x):
    def norms(grad: bool = False, inference: bool = False) -> int:
        mode = torch.inference_mode() if inference else torch.set_grad_enabled(grad)
        with NormCount() as count, mode:
            ours(x)
        return count.calls

    assert norms() == len(targets)
    assert norms() == 0
    assert norms(grad=True) == len(targets)
    assert norms(grad=True) == len(targets)
    assert norms() == 0
    assert norms(inference=True) == len(targets)  # an inference tensor, kept for there
    assert norms(inference=True) == 0
    assert norms() == len(targets)
    copy.deepcopy(ours), torch.save(ours, __import__("io").BytesIO())
    ours.train(), ours.eval()  # into training frees the kept factors
    assert norms() == len(targets)


def test_the_dora_factor_is_not_kept_where_a_write_may_go_unseen(tmp_path):
    """Inference tensors (a model adapted inside `torch.inference_mode`) keep no version
    counter, and in a process with a process group collectives write parameters: the norm
    is computed at every call there, to PEFT's outputs."""
    ours, theirs, targets, x = paired("mlp")
    with torch.inference_mode():
        built = copy.deepcopy(MLP()).eval()
        inject(built, targets, rank=2, dora=True)
    with reuse_dora_factors(built), reuse_dora_factors(ours), torch.inference_mode():
        for _ in range(2):
            with NormCount() as count:
                built(x)
            assert count.calls == len(targets)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        with reuse_dora_factors(ours):
            for _ in range(2):
                with NormCount() as count, torch.no_grad():
                    ours(x)
                assert count.calls == len(targets)
            _in_place(ours, targets, "up")
            agree(ours, theirs, targets, x)
    finally:
        torch.distributed.destroy_process_group()
