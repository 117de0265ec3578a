"""The PEFT-style calls of lowrank.nn: inject settings, merge_and_unload against the real
PEFT, unload, the adapter-only state dict, base checkpoints loading through, and checks that
leave the model unchanged when they fail."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from model_factories import TinyNet
from torch import nn

from lowrank import (
    ArgumentError,
    DTypeError,
    MergeError,
    NonFiniteError,
    ShapeError,
    StateDictError,
    TargetError,
)
from lowrank import nn as lnn
from lowrank.io import model_adapter
from lowrank.nn import AdapterConfig, LoRALinear, inject


def randomise(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def snapshot(model: nn.Module) -> dict[str, object]:
    """Every parameter's value and flag, and the module structure."""
    return {
        "values": {n: p.detach().clone() for n, p in model.named_parameters()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "layout": [(n, type(m)) for n, m in model.named_modules()],
        "merged": {n: m.merged for n, m in lnn.adapters(model).items()},
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    assert after["layout"] == before["layout"] and after["flags"] == before["flags"]
    assert after["merged"] == before["merged"]
    assert after["values"].keys() == before["values"].keys()
    assert all(torch.equal(after["values"][n], v) for n, v in before["values"].items())


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.proj = nn.Conv2d(6, 6, 1)
        self.down = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.proj(torch.relu(self.conv(x))))
        return self.head(torch.relu(self.down(x)).flatten(1))


TARGETS = ["conv", "proj", "down", "head"]


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_and_unload_equals_peft_on_the_same_factors(rslora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = ConvNet()
    ours = copy.deepcopy(model)
    inject(ours, TARGETS, rank=3, alpha=6, rslora=rslora)
    config = peft.LoraConfig(target_modules=TARGETS, r=3, lora_alpha=6, use_rslora=rslora,
                             init_lora_weights=False)  # fmt: skip
    theirs = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name in TARGETS:
            layer = theirs.base_model.model.get_submodule(name)
            adapter = ours.get_submodule(name)
            adapter.down.copy_(layer.lora_A["default"].weight)
            adapter.up.copy_(layer.lora_B["default"].weight.reshape(adapter.up.shape))
    x = torch.randn(2, 3, 8, 8)
    adapted = ours(x).detach()
    torch.testing.assert_close(adapted, theirs(x), rtol=1e-5, atol=1e-6)
    merged_ours, merged_theirs = lnn.merge_and_unload(ours), theirs.merge_and_unload()
    assert [type(m) for m in merged_ours.modules()] == [type(m) for m in merged_theirs.modules()]
    ours_state, theirs_state = merged_ours.state_dict(), merged_theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged_ours(x), adapted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("merged", [None, "exact", "subtract"])
def test_unload_gives_back_the_original_model(merged):
    torch.manual_seed(0)
    model = ConvNet()
    original = copy.deepcopy(model)
    inject(model, TARGETS, rank=2, form="tucker2")
    randomise(model)
    if merged:
        lnn.merge(model, exact=merged == "exact")
    plain = lnn.unload(model)
    assert [type(m) for m in plain.modules()] == [type(m) for m in original.modules()]
    for (key, value), (_, reference) in zip(plain.state_dict().items(),
                                            original.state_dict().items(), strict=True):
        if merged == "subtract":  # W + ΔW − ΔW, each rounded once in float32
            torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(value, reference), key


def test_adapter_state_dict_round_trips_into_a_fresh_model():
    torch.manual_seed(0)
    model = TinyNet()
    fresh = copy.deepcopy(model)
    config = {"to_q": {"r": 2, "trainable_scale": True}, "blocks.0.conv": {"r": 3, "form": "cp"}}
    inject(model, config)
    inject(fresh, config)
    randomise(model)
    state = lnn.adapter_state_dict(model)
    assert set(state) == {
        f"blocks.{b}.attn.to_q.{k}" for b in (0, 1) for k in ("down", "up", "scale")
    } | {f"blocks.0.conv.{k}" for k in ("out_factor", "in_factor", "spatial_factors.0",
                                        "spatial_factors.1")}  # fmt: skip
    lnn.load_adapter_state_dict(fresh, {k: v.clone() for k, v in state.items()})
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(fresh.blocks[0].conv(x), model.blocks[0].conv(x), rtol=0, atol=0)
    assert fresh.blocks[1].attn["to_q"].scale.item() == model.blocks[1].attn["to_q"].scale.item()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda s: s.update({"blocks.0.attn.to_k.down": s.pop("blocks.0.attn.to_q.down")}),
         StateDictError, "unexpected"),
        (lambda s: s.pop("blocks.1.attn.to_q.up"), StateDictError, "missing"),
        (lambda s: s.update({"blocks.0.attn.to_q.up": torch.zeros(4, 3)}), ShapeError, "to_q.up"),
        (lambda s: s["blocks.0.attn.to_q.down"].__setitem__((0, 0), float("inf")),
         NonFiniteError, "to_q.down"),
        (lambda s: s.update({"blocks.0.attn.to_q.up": [[0.0] * 2] * 4}), DTypeError, "to_q.up"),
        (lambda s: s.update({"blocks.0.attn.to_q.up": torch.zeros(4, 2, dtype=torch.long)}),
         DTypeError, "to_q.up"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("merged", [False, True])
def test_a_bad_adapter_state_dict_raises_and_changes_nothing(change, error, match, merged):
    model = TinyNet()
    inject(model, "to_q", rank=2)
    randomise(model)
    if merged:
        lnn.merge(model)
    state = {k: v.clone() + 1 for k, v in lnn.adapter_state_dict(model).items()}
    change(state)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        lnn.load_adapter_state_dict(model, state)
    assert_unchanged(model, before)


def test_partial_load_without_strict_and_loading_into_a_merged_adapter():
    torch.manual_seed(0)
    model, reference = TinyNet(), None
    inject(model, ["to_q", "to_v"], rank=2)
    randomise(model)
    reference = copy.deepcopy(model)
    new = {k: torch.randn_like(v) for k, v in lnn.adapter_state_dict(model).items() if "to_q" in k}
    lnn.merge(model)
    lnn.load_adapter_state_dict(model, new, strict=False)
    lnn.load_adapter_state_dict(reference, new, strict=False)
    lnn.merge(reference)
    for name, adapter in lnn.adapters(model).items():
        assert adapter.merged
        torch.testing.assert_close(adapter.base.weight,
                                   reference.get_submodule(name).base.weight,
                                   rtol=1e-6, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("was_merged", [False, True])
def test_a_checkpoint_of_the_unadapted_model_loads_into_the_adapted_one(was_merged):
    torch.manual_seed(0)
    model = ConvNet()
    checkpoint = {k: v + 0.5 for k, v in model.state_dict().items()}
    inject(model, TARGETS, rank=2, trainable_scale=True)
    randomise(model)
    factors = {k: v.clone() for k, v in lnn.adapter_state_dict(model).items()}
    if was_merged:
        lnn.merge(model)
    result = model.load_state_dict(checkpoint)
    assert not result.missing_keys and not result.unexpected_keys
    assert not any(a.merged for a in lnn.adapters(model).values())
    assert all(torch.equal(v, factors[k]) for k, v in lnn.adapter_state_dict(model).items())
    plain = lnn.unload(model)
    assert all(torch.equal(v, checkpoint[k]) for k, v in plain.state_dict().items())


def test_factors_alone_do_not_load_into_a_merged_adapter_by_state_dict():
    model = nn.Sequential(nn.Linear(4, 4))
    inject(model, "0", rank=2)
    randomise(model)
    model[0].merge()
    with pytest.raises(StateDictError, match="merged"):
        model.load_state_dict({"0.down": torch.zeros(2, 4), "0.up": torch.zeros(4, 2)},
                              strict=False)  # fmt: skip


def test_a_merged_base_without_its_factors_is_refused_and_changes_nothing():
    """A merged model's frozen part alone (base weights and merged flags): its weight holds
    ΔW of factors it does not carry, so beside other factors it is no longer that model."""
    saved = nn.Sequential(nn.Linear(4, 4))
    inject(saved, "0", rank=2)
    randomise(saved, seed=1)
    saved[0].merge()
    frozen = {k: v for k, v in saved.state_dict().items() if k not in ("0.down", "0.up")}
    model = nn.Sequential(nn.Linear(4, 4))
    inject(model, "0", rank=2)
    randomise(model, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateDictError, match="holds W \\+ ΔW of its factors, but it lacks"):
        model.load_state_dict(frozen)
    partial = {k: v for k, v in saved.state_dict().items() if k != "0.down"}  # up alone
    with pytest.raises(StateDictError, match="lacks down"):
        model.load_state_dict(partial, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_0_d_scale_loads_into_the_one_element_trainable_scale():
    """The trainable scale is a (1,) parameter (FSDP2 takes no 0-d one); a state that saved
    it 0-d loads by either path, and a scale of another shape is refused by name."""
    model = nn.Sequential(nn.Linear(4, 4))
    inject(model, "0", rank=2, trainable_scale=True)
    assert model[0].scale.shape == (1,)
    model.load_state_dict(dict(model.state_dict(), **{"0.scale": torch.tensor(3.0)}))
    assert float(model[0].scale.detach()) == 3.0
    lnn.load_adapter_state_dict(model, dict(lnn.adapter_state_dict(model),
                                            **{"0.scale": torch.tensor(5.0)}))  # fmt: skip
    assert float(model[0].scale.detach()) == 5.0
    with pytest.raises(ShapeError, match=r"0\.scale has shape \(2,\)"):
        model.load_state_dict(dict(model.state_dict(), **{"0.scale": torch.ones(2)}))


@pytest.mark.parametrize("trainable", [False, True])
def test_a_trainable_scale_keeps_the_autocast_dtype(trainable):
    """Under autocast a bf16 branch times a float32 (1,) tensor would be float32; the output,
    and ΔW, keep the dtype a constant scale gives (and their shapes)."""
    model = nn.Sequential(nn.Linear(8, 4), nn.Conv2d(4, 4, 3))
    inject(model, ["0", "1"], rank=2, trainable_scale=trainable)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear, conv = model[0](torch.randn(3, 8)), model[1](torch.randn(1, 4, 5, 5))
        delta = model[1].delta_weight()
    assert (linear.dtype, conv.dtype, delta.dtype) == (torch.bfloat16,) * 3
    assert (linear.shape, conv.shape, delta.shape) == ((3, 4), (1, 4, 3, 3), (4, 4, 3, 3))


def test_a_state_of_another_rank_is_refused_before_anything_loads():
    """torch copies every key that fits before reporting a size mismatch: here the merged base
    weight and its flag would have loaded beside rank-3 factors."""
    saved = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    inject(saved, ["0", "1"], rank=2)
    randomise(saved)
    lnn.merge(saved)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    inject(model, ["0", "1"], rank=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ShapeError, match=r"0\.down has shape \(2, 4\), but the adapter's is "
                                         r"\(3, 4\) \(rank 3\)"):  # fmt: skip
        model.load_state_dict(saved.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(a.merged for a in lnn.adapters(model).values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merges_inside_autocast_compute_delta_w_in_float32(dtype):
    """merge, swap and a PiSSA start inside `torch.autocast`: ΔW still in float32, so the
    merged float32 weight is W + ΔW to float32 rounding (autocast would give ~1e-3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Conv2d(4, 4, 3, padding=1))
    weights = [model[0].weight.detach().double().clone(), model[1].weight.detach().double()]
    inject(model, ["0", "1"], rank=4, alpha=8)
    randomise(model)
    adapters = lnn.adapters(model)
    deltas = [adapters[n].delta(dtype=torch.float64) for n in ("0", "1")]
    with torch.autocast("cpu", dtype=dtype):
        lnn.merge(model)
    for name, weight, delta in zip(("0", "1"), weights, deltas, strict=True):
        error = (adapters[name].base.weight.double() - (weight + delta)).abs().max()
        assert error < 1e-6 * (weight + delta).abs().max(), name
    pissa = nn.Sequential(nn.Linear(64, 64))
    original = pissa[0].weight.detach().double().clone()
    with torch.autocast("cpu", dtype=dtype):
        inject(pissa, "0", rank=8, init="pissa")
    restored = pissa[0].base.weight.double() + pissa[0].delta(dtype=torch.float64)
    assert (restored - original).abs().max() < 1e-6 * original.abs().max()


def test_a_tucker2_pissa_start_inside_autocast_is_the_float32_one():
    """HOOI's products would run in bf16 under autocast (factors ~0.1 off)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3)
    starts = []
    for autocast in (False, True):
        model = nn.Sequential(copy.deepcopy(conv))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            inject(model, "0", rank=4, form="tucker2", init="pissa")
        starts.append(lnn.adapter_state_dict(model))
    for key, value in starts[0].items():
        assert torch.allclose(starts[1][key], value, atol=1e-5), key


def test_apply_adapter_inside_autocast_merges_in_float32():
    from lowrank.forms import Tucker2
    from lowrank.io import Adapter, apply_adapter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3))
    weight = model[0].weight.detach().double().clone()
    form = Tucker2(torch.randn(4, 8, 1, 1), torch.randn(4, 4, 3, 3), torch.randn(8, 4, 1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        apply_adapter(model, Adapter({"0": form}))
    down, mid, up = (t.double() for t in (form.down, form.mid, form.up))
    delta = torch.einsum("or,rqij,qs->osij", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    expected = weight + delta
    assert (model[0].weight.double() - expected).abs().max() < 1e-6 * expected.abs().max()


@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from([1.0, 3.0, 8.0]))
def test_a_tucker2_alpha_divides_by_the_rank_of_down_as_in_its_files(r_out, r_in, alpha):
    model = nn.Sequential(nn.Conv2d(8, 8, 3))
    inject(model, "0", rank=(r_out, r_in), form="tucker2", alpha=alpha)
    assert model[0].down.shape[0] == r_in
    assert model[0].scale == alpha / r_in  # LyCORIS: alpha / lora_dim, the rows of lora_down
    assert model_adapter(model).alpha("0") == alpha


def test_inject_settings_by_keyword_and_by_config_object():
    model = TinyNet()
    inject(model, "to_q", rank=4, alpha=8, rslora=True)
    assert model.blocks[0].attn["to_q"].scale == 8 / 2
    config = AdapterConfig(rank=(3, 2), form="tucker2", alpha=3.0)
    inject(model, ["blocks.0.conv", "temporal"], config, dropout=0.1)
    assert model.blocks[0].conv.config == AdapterConfig(rank=(3, 2), form="tucker2", alpha=3.0,
                                                        dropout=0.1)  # fmt: skip
    assert model.temporal.scale == 3.0 / 2  # alpha / r_in
    with pytest.raises(ArgumentError, match="bogus"):
        inject(TinyNet(), "to_q", rank=2, bogus=1)
    with pytest.raises(ArgumentError, match="AdapterConfig"):
        inject(TinyNet(), "to_q", 4)


def test_all_linear_on_a_torch_model_takes_every_linear_layer_once():
    model = TinyNet()
    names = inject(model, "all-linear", rank=2)
    assert names == ["blocks.0.attn.to_q", "blocks.0.attn.to_v", "blocks.1.attn.to_q",
                     "blocks.1.attn.to_v", "head.0", "head.2"]  # fmt: skip
    assert inject(model, ["blocks.0.conv"], rank=2) == ["blocks.0.conv"]
    with pytest.raises(TargetError, match="all-linear"):
        inject(model, "all-linear", rank=2)


def test_multihead_attention_out_proj_refuses_what_would_never_run():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)})
    before = snapshot(model)
    with pytest.raises(TargetError, match=r"MultiheadAttention.*dropout"):
        inject(model, "out_proj", rank=2, dropout=0.1)
    assert_unchanged(model, before)


def test_a_failure_while_building_adapters_changes_nothing(monkeypatch):
    model = TinyNet()
    inject(model, "to_v", rank=2)
    before = snapshot(model)
    built = []

    class Failing(LoRALinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)
            if len(built) == 2:
                raise RuntimeError("out of memory")

    monkeypatch.setattr(lnn.model, "adapter_class", lambda module: Failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        inject(model, "to_q", rank=2)
    assert_unchanged(model, before)


def test_model_merge_of_a_tied_weight_names_both_modules_and_changes_nothing():
    model = nn.ModuleDict({"embed": nn.Embedding(10, 6), "head": nn.Linear(6, 10, bias=False)})
    model.head.weight = model.embed.weight
    inject(model, ["head", "embed"], rank=2)
    randomise(model)
    before = snapshot(model)
    with pytest.raises(MergeError, match=r"adapter 'embed'.*'head\.base\.weight'"):
        lnn.merge(model)
    with pytest.raises(MergeError, match="tied"):
        lnn.merge_and_unload(model)
    assert_unchanged(model, before)


def test_merge_and_unload_refuses_all_when_one_adapter_would_overflow():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).half()
    inject(model, ["0", "1"], rank=1, scale=1.0)
    randomise(model)
    with torch.no_grad():
        model[1].down.fill_(400.0)
        model[1].up.fill_(400.0)
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match=r"adapter '1'.*overflows"):
        lnn.merge_and_unload(model)
    assert_unchanged(model, before)


@given(st.sampled_from(["lora", "tucker2", "cp", "centre_tap"]),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), st.integers(0, 2**16))
def test_exact_merge_then_unmerge_restores_the_weight_bit_for_bit(form, dtype, seed):  # fmt: skip
    torch.manual_seed(seed)
    base = nn.Conv2d(4, 6, 3, padding=1, dtype=dtype)
    adapter = lnn.LoRAConv(base, 2, form=form)
    randomise(adapter, seed)
    original = base.weight.detach().clone()
    x = torch.randn(1, 4, 5, 5, dtype=dtype)
    unmerged = adapter(x).detach().double()
    adapter.merge(exact=True)
    assert adapter.base_copy is not None
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(adapter(x).double(), unmerged, rtol=tolerance, atol=tolerance)
    adapter.unmerge()
    assert torch.equal(base.weight, original) and adapter.base_copy is None
