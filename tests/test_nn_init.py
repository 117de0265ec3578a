"""Adapters that start from factors: given ones (`factors=`) or the form nearest to the base
weight (`init="pissa"`), checked against float64 SVDs and direct layer calls."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowrank
import lowrank.nn as lnn
from lowrank.errors import (
    ArgumentError,
    DTypeError,
    MergeError,
    ShapeError,
    StateDictError,
    TargetError,
)


def best_rank(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The Eckart–Young truncation of `weight (out, in, *k)` flattened, in float64."""
    flat = weight.detach().double().reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(weight.shape)


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict, modules: dict) -> None:
    assert dict(model.named_modules()).keys() == modules.keys()
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (tensor, flag) in before.items():
        assert torch.equal(after[name][0], tensor), name
        assert after[name][1] == flag, name


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))


def test_pissa_linear_starts_at_the_truncated_svd_and_keeps_the_output():
    model = mlp()
    original = copy.deepcopy(model)
    x = torch.randn(5, 16)
    lnn.inject(model, ["0", "2"], rank=4, alpha=8, init="pissa")
    for name in ("0", "2"):
        adapter, weight = model.get_submodule(name), original.get_submodule(name).weight
        delta = adapter.delta_weight().double()
        torch.testing.assert_close(delta, best_rank(weight, 4), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            adapter.base.weight.double(), weight.double() - delta, atol=1e-6, rtol=0
        )
    torch.testing.assert_close(model(x), original(x), atol=1e-5, rtol=0)
    assert "init='pissa'" in repr(model[0])


def test_pissa_splits_the_scale_like_peft():
    """Both factors carry √(σ / scale): `up = U √(S/s)`, `down = √(S/s) Vᵀ`."""
    layer = nn.Linear(10, 6)
    weight = layer.weight.detach().double()
    adapter = lnn.LoRALinear(layer, 3, alpha=12, init="pissa")  # scale 4
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    signs = torch.sign((adapter.up.double()[:, :3] * u[:, :3]).sum(0))
    torch.testing.assert_close(adapter.up.double() * signs, u[:, :3] * (s[:3] / 4).sqrt(),
                               atol=1e-5, rtol=0)  # fmt: skip
    torch.testing.assert_close(adapter.down.double() * signs[:, None],
                               (s[:3] / 4).sqrt()[:, None] * vh[:3], atol=1e-5, rtol=0)  # fmt: skip


@pytest.mark.parametrize("form, rank", [("lora", 3), ("centre_tap", 3), ("tucker2", (3, 2)),
                                        ("cp", 4)])  # fmt: skip
def test_pissa_conv_keeps_the_output(form, rank):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    x = torch.randn(2, 6, 7, 7)
    adapter = lnn.LoRAConv(conv, rank, init="pissa", form=form)
    reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    torch.testing.assert_close(adapter(x).double(), reference, atol=1e-5, rtol=0)
    delta = adapter.delta_weight().double()
    torch.testing.assert_close(adapter.base.weight.double() + delta, weight.double(),
                               atol=1e-6, rtol=0)  # fmt: skip
    error = (weight.double() - delta).norm()
    if form == "lora":
        torch.testing.assert_close(delta, best_rank(weight, 3), atol=1e-5, rtol=0)
    elif form == "centre_tap":
        tap = torch.zeros_like(weight.double())
        tap[..., 1, 1] = best_rank(weight[..., 1, 1], 3)
        torch.testing.assert_close(delta, tap, atol=1e-5, rtol=0)
    elif form == "tucker2":  # never worse than the HOSVD projection (float64)
        flat = weight.double()
        q_out = torch.linalg.svd(flat.flatten(1), full_matrices=False)[0][:, :3]
        q_in = torch.linalg.svd(flat.transpose(0, 1).flatten(1), full_matrices=False)[0][:, :2]
        hosvd = torch.einsum("ap,pqhw,bq->abhw", q_out,
                             torch.einsum("ap,bq,abhw->pqhw", q_out, q_in, flat), q_in)  # fmt: skip
        assert error <= (flat - hosvd).norm() * (1 + 1e-6)
    assert error < weight.double().norm()


def test_pissa_embedding_uses_the_transposed_table():
    torch.manual_seed(2)
    table = nn.Embedding(20, 8)
    weight = table.weight.detach().clone()
    adapter = lnn.LoRAEmbedding(table, 3, init="pissa")
    ids = torch.randint(0, 20, (4, 5))
    torch.testing.assert_close(adapter(ids), F.embedding(ids, weight), atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter.delta_weight().double(), best_rank(weight.T, 3).T,
                               atol=1e-5, rtol=0)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pissa_half_rounds_the_residual_once(dtype):
    torch.manual_seed(3)
    layer = nn.Linear(32, 24).to(dtype)
    weight = layer.weight.detach().clone()
    adapter = lnn.LoRALinear(layer, 4, alpha=4, init="pissa")
    delta = adapter.up.float() @ adapter.down.float()
    assert torch.equal(adapter.base.weight, (weight.float() - delta).to(dtype))


@settings(max_examples=25, deadline=None)
@given(
    form_scale=st.floats(-4, 4).filter(lambda v: abs(v) > 1e-3),
    alpha=st.floats(0.25, 32),
    rank=st.integers(1, 5),
    pissa=st.booleans(),
)
def test_given_factors_set_delta_w(form_scale, alpha, rank, pissa):
    """The adapter's ΔW₀ is the given form's, whatever the two scales; `pissa` subtracts it
    from the base, default adds it."""
    torch.manual_seed(rank)
    layer = nn.Linear(9, 7)
    weight = layer.weight.detach().double().clone()
    start = lowrank.LoRA(torch.randn(rank, 9), torch.randn(7, rank), form_scale)
    expected = form_scale * start.up.double() @ start.down.double()
    init = "pissa" if pissa else "default"
    adapter = lnn.LoRALinear(layer, rank, alpha=alpha, factors=start, init=init)
    torch.testing.assert_close(adapter.delta_weight().double(), expected, atol=1e-4, rtol=1e-5)
    x = torch.randn(3, 9).double()
    total = weight if pissa else weight + expected
    torch.testing.assert_close(adapter(x.float()).double(), x @ total.T + layer.bias.double(),
                               atol=1e-4, rtol=1e-5)  # fmt: skip


def test_a_tucker2_start_folds_into_a_locon_adapter():
    torch.manual_seed(4)
    start = lowrank.Tucker2(torch.randn(2, 6, 1, 1), torch.randn(3, 2, 3, 3),
                            torch.randn(5, 3, 1, 1), 0.5)  # fmt: skip
    reference = torch.einsum("ai,bajk,cb->cijk", start.down[:, :, 0, 0].double(),
                             start.mid.double(), start.up[:, :, 0, 0].double()) * 0.5  # fmt: skip
    adapter = lnn.LoRAConv(nn.Conv2d(6, 5, 3), 3, factors=start)
    torch.testing.assert_close(adapter.delta_weight().double(), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [1e-200, 1e200, 1e-300, 2.0**1000])
def test_a_float64_start_whose_scale_is_far_from_the_adapters_comes_back_to_rounding(scale):
    """The ratio of the two scales is shared among the three Tucker2 factors; the shares
    multiply back to it to ulps however far it is from 1."""
    torch.manual_seed(5)
    down, mid, up = (torch.randn(2, 6, 1, 1).double(), torch.randn(2, 2, 3, 3).double(),
                     torch.randn(5, 2, 1, 1).double())  # fmt: skip
    start = lowrank.Tucker2(down, mid, up, scale)
    reference = torch.einsum("ai,bajk,cb->cijk", down[:, :, 0, 0], mid, up[:, :, 0, 0]) * scale
    adapter = lnn.LoRAConv(nn.Conv2d(6, 5, 3).double(), 2, form="tucker2", scale=1.0,
                           factors=start)  # fmt: skip
    delta = adapter.delta_weight().detach()
    assert float((delta - reference).abs().max() / reference.abs().max()) < 2e-15


def test_inject_factors_by_any_alias_and_the_pissa_round_trip_to_a_plain_lora():
    """extract → fine-tune → save: the trained PiSSA adapter relative to the original W is
    `combine([trained, initial], [1, -1])`, of rank 2r."""
    model = mlp()
    original = copy.deepcopy(model)
    model.alias = model[0]
    start = lowrank.decompose.svd(model[0].weight.detach(), 4)
    lnn.inject(model, ["0"], rank=4, factors={"alias": start}, init="pissa")
    assert model.alias is model[0]
    initial = model[0].factors().to(torch.float32, copy=True)  # the parameters change below
    with torch.no_grad():
        model[0].up.add_(torch.randn_like(model[0].up) * 0.1)
        model[0].down.add_(torch.randn_like(model[0].down) * 0.1)
    plain = lowrank.combine([model[0].factors(), initial], [1.0, -1.0])
    trained = model[0].base.weight.double() + model[0].delta_weight().double()
    torch.testing.assert_close(original[0].weight.double() + plain.to_dense().double(), trained,
                               atol=1e-5, rtol=0)  # fmt: skip
    merged = lnn.merge_and_unload(model)
    torch.testing.assert_close(merged[0].weight.double(), trained, atol=1e-5, rtol=0)


def test_pissa_state_dict_round_trip_and_refusals():
    model = mlp()
    plain_state = copy.deepcopy(model.state_dict())
    fresh = copy.deepcopy(model)
    lnn.inject(model, "all-linear", rank=3, init="pissa")
    with torch.no_grad():
        model[0].up.add_(0.05)
    x = torch.randn(4, 16)
    lnn.inject(fresh, "all-linear", rank=3)  # a default start, then the PiSSA state loads
    fresh.load_state_dict(model.state_dict())
    assert fresh[0].residual
    torch.testing.assert_close(fresh(x), model(x))
    with pytest.raises(StateDictError, match="init='pissa'"):
        model.load_state_dict(plain_state)
    before, modules = snapshot(model), dict(model.named_modules())
    with pytest.raises(MergeError, match="merge_and_unload"):
        lnn.unload(model)
    assert_unchanged(model, before, modules)


def test_a_refused_load_changes_no_module():
    """The refusal comes before torch loads any module, also those before the adapter."""
    model = mlp()
    lnn.inject(model, ["2"], rank=3, init="pissa")
    other = mlp()
    with torch.no_grad():
        other[0].weight.fill_(7.0)
    before, modules = snapshot(model), dict(model.named_modules())
    with pytest.raises(StateDictError, match="'2' started from init='pissa'"):
        model.load_state_dict(other.state_dict())
    assert_unchanged(model, before, modules)
    lnn.merge(model)
    factors_only = {k: v for k, v in model.state_dict().items() if k.startswith("2.") and
                    k.split(".")[1] in ("down", "up")}  # fmt: skip
    factors_only["0.weight"] = torch.full_like(model[0].weight, 7.0)
    before = snapshot(model)
    with pytest.raises(StateDictError, match="'2' is merged"):
        model.load_state_dict(factors_only, strict=False)
    assert_unchanged(model, before, modules)


def test_a_zero_start_state_dict_loads_into_a_pissa_model_exactly():
    """W and trained factors from an adapter that started from zero give the same model in
    one that started from PiSSA, which then holds W, not a residual."""
    trained, target = mlp(), mlp()
    lnn.inject(trained, ["0", "2"], rank=3)
    with torch.no_grad():
        trained[0].up.normal_()
        trained[2].up.normal_()
    lnn.inject(target, ["0", "2"], rank=3, init="pissa")
    target.load_state_dict(trained.state_dict())
    assert not target[0].residual and not target[2].residual
    x = torch.randn(4, 16)
    torch.testing.assert_close(target(x), trained(x), rtol=0, atol=0)
    lnn.unload(target)  # no residual left to refuse


def test_adapter_state_dicts_carry_the_start():
    pissa, plain = mlp(), mlp()
    lnn.inject(pissa, ["0", "2"], rank=3, init="pissa")
    lnn.inject(plain, ["0", "2"], rank=3)
    state = lnn.adapter_state_dict(pissa)
    assert state["0.residual"] and state["2.residual"]
    before, modules = snapshot(plain), dict(plain.named_modules())
    with pytest.raises(StateDictError, match="trained from init='pissa'"):
        lnn.load_adapter_state_dict(plain, state)
    with pytest.raises(StateDictError, match="trained beside the base weight W"):
        lnn.swap_adapter(pissa, lnn.adapter_state_dict(plain))
    assert_unchanged(plain, before, modules)
    twin = mlp()
    lnn.inject(twin, ["0", "2"], rank=3, init="pissa")
    with torch.no_grad():
        pissa[2].down.add_(0.5)
    lnn.load_adapter_state_dict(twin, lnn.adapter_state_dict(pissa))
    x = torch.randn(4, 16)
    torch.testing.assert_close(twin(x), pissa(x), rtol=0, atol=0)


def test_plain_loads_of_factors_keep_each_start():
    """`load_state_dict(strict=False)` of factors alone: refused across starts when their
    flag says so, and the flag never moves to a base that did not load."""
    pissa, plain = mlp(), mlp()
    lnn.inject(pissa, ["0", "2"], rank=3, init="pissa")
    lnn.inject(plain, ["0", "2"], rank=3)
    before, modules = snapshot(plain), dict(plain.named_modules())
    with pytest.raises(StateDictError, match="trained from init='pissa'"):
        plain.load_state_dict(lnn.adapter_state_dict(pissa), strict=False)
    assert_unchanged(plain, before, modules)
    assert not plain[0].residual
    state = lnn.adapter_state_dict(plain)
    state["0.residual"] = torch.tensor(False)  # the flag's value counts, not its presence
    state["2.residual"] = torch.tensor(False)
    with pytest.raises(StateDictError, match="trained beside the base weight W"):
        pissa.load_state_dict(state, strict=False)
    lnn.load_adapter_state_dict(plain, state)
    # a merged flag without the base weight says nothing about the weight that stays
    plain.load_state_dict({**lnn.adapter_state_dict(plain), "0.merged": torch.tensor(True)},
                          strict=False)  # fmt: skip
    assert not plain[0].merged
    # trainable tensors of a PiSSA model (a bias among them) into its twin
    twin = mlp()
    lnn.inject(twin, ["0", "2"], rank=3, init="pissa")
    pissa[0].base.bias.requires_grad_(True)
    with torch.no_grad():
        pissa[0].base.bias.add_(1.0)
        pissa[0].up.add_(0.25)
    trained = {n: p for n, p in pissa.named_parameters() if p.requires_grad}
    assert "0.base.bias" in trained
    twin.load_state_dict(trained, strict=False)
    assert twin[0].residual
    x = torch.randn(4, 16)
    torch.testing.assert_close(twin(x), pissa(x), rtol=0, atol=0)


def test_a_pissa_base_alone_is_refused_beside_zero_start_factors():
    pissa, plain = mlp(), mlp()
    lnn.inject(pissa, ["0"], rank=3, init="pissa")
    lnn.inject(plain, ["0"], rank=3)
    base_only = {k: v for k, v in pissa.state_dict().items()
                 if k.split(".")[1] not in ("down", "up")}  # fmt: skip
    assert base_only["0._extra_state"][1] == 1  # the residual flag
    before, modules = snapshot(plain), dict(plain.named_modules())
    with pytest.raises(StateDictError, match="'0' started from zero, but this base weight"):
        plain.load_state_dict(base_only, strict=False)
    assert_unchanged(plain, before, modules)
    assert not plain[0].residual
    twin = mlp()
    lnn.inject(twin, ["0"], rank=3, init="pissa")
    twin.load_state_dict(base_only, strict=False)  # the same start: fine
    assert twin[0].residual


def test_write_residual_twice_is_refused():
    model = mlp()
    lnn.inject(model, ["0"], rank=3, init="pissa")
    weight = model[0].base.weight.clone()
    with pytest.raises(MergeError, match="already holds"):
        model[0].write_residual()
    assert torch.equal(model[0].base.weight, weight)


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_given_factors_on_the_meta_device(init):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 12))
    form = lowrank.LoRA(torch.randn(3, 16), torch.randn(12, 3))
    lnn.inject(model, ["0"], rank=3, init=init, factors={"0": form})
    assert model[0].up.is_meta and model[0].up.shape == (12, 3)
    assert model[0].residual == (init == "pissa")


def test_a_zero_scale_form_starts_a_zero_scale_adapter():
    model = mlp()
    form = lowrank.LoRA(torch.ones(2, 16), torch.ones(12, 2), 0.0)
    lnn.inject(model, ["0"], rank=2, scale=0.0, factors={"0": form})
    assert torch.equal(model[0].up, form.up) and torch.equal(model[0].down, form.down)
    assert not model[0].delta_weight().any()


def build_failures():
    torch.manual_seed(5)
    tied = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False), nn.Linear(10, 6))
    tied[1].weight = tied[0].weight
    grouped = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, groups=2))
    return [
        ("tied", tied, dict(targets=["2", "1"], rank=2, init="pissa"), TargetError, "tied"),
        ("grouped", grouped, dict(targets=["0", "1"], rank=1, init="pissa"), TargetError,
         "grouped"),
        ("unknown name", mlp(), dict(targets=["0"], rank=2,
                                     factors={"2": lowrank.LoRA(torch.ones(2, 12),
                                                                torch.ones(8, 2))}),
         TargetError, "'2'"),
        ("rank", mlp(), dict(targets=["0", "2"], rank=2,
                             factors={"2": lowrank.LoRA(torch.ones(3, 12), torch.ones(8, 3))}),
         ShapeError, "rank 2"),
        ("shape", mlp(), dict(targets=["0", "2"], rank=2,
                              factors={"2": lowrank.LoRA(torch.ones(2, 11), torch.ones(8, 2))}),
         ShapeError, r"\(8, 12\)"),
        ("form", mlp(), dict(targets=["0", "2"], rank=2, form="tucker2",
                             factors={"2": lowrank.LoRA(torch.ones(2, 12), torch.ones(8, 2))}),
         DTypeError, "LoRA"),
        ("nan", mlp(), dict(targets=["0", "2"], rank=2,
                            factors={"2": lowrank.LoRA(torch.full((2, 12), float("nan")),
                                                       torch.ones(8, 2))}),
         lowrank.errors.NonFiniteError, "initial factor"),
        # ΔW = 2 · 300 · 300 = 180000, beyond float16 (each factor is within it)
        ("overflow", mlp().half(), dict(targets=["0", "2"], rank=2,
                                        factors={"2": lowrank.LoRA(torch.full((2, 12), 300.0),
                                                                   torch.full((8, 2), 300.0))}),
         lowrank.errors.NonFiniteError, r"ΔW up to 1\.8e\+05 .*beyond torch\.float16"),
        # float64: ΔW = 2e400 is Inf
        ("overflow64", mlp().double(), dict(targets=["0", "2"], rank=2,
                                            factors={"2": lowrank.LoRA(
                                                torch.full((2, 12), 1e200, dtype=torch.float64),
                                                torch.full((8, 2), 1e200, dtype=torch.float64))}),
         lowrank.errors.NonFiniteError, r"ΔW up to inf .*beyond torch\.float64"),
        ("zero scale", mlp(), dict(targets=["0", "2"], rank=2, scale=0.0,
                                   factors={"2": lowrank.LoRA(torch.ones(2, 12),
                                                              torch.ones(8, 2))}),
         ArgumentError, "scale is 0"),
        ("init", mlp(), dict(targets=["0"], rank=2, init="olora"), ArgumentError, "init"),
        ("pattern init", mlp(), dict(targets={"0": {"r": 2, "init": 3}}), TargetError, "init"),
    ]  # fmt: skip


def test_pissa_never_writes_into_a_layer_a_module_outside_the_model_runs():
    """A layer held by a live module outside the model too (`other`, not a tie of its
    weight's memory but the same layer) was started from PiSSA: W − ΔW₀ moved `other`'s
    output. A `TargetError` naming it, and the model and `other` as they were."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 6)
    model, other = nn.Sequential(layer, nn.ReLU()), nn.Sequential(layer)
    x = torch.randn(2, 6)
    want = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    before, modules = snapshot(model), dict(model.named_modules())
    with pytest.raises(TargetError, match="of a Sequential outside the model"):
        lnn.inject(model, ["0"], rank=2, init="pissa")
    assert_unchanged(model, before, modules)
    torch.testing.assert_close(other(x).double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", build_failures(), ids=lambda c: c[0])
def test_a_failed_start_changes_nothing(case):
    _, model, arguments, error, message = case
    before, modules = snapshot(model), dict(model.named_modules())
    targets = arguments.pop("targets")
    with pytest.raises(error, match=message):
        lnn.inject(model, targets, **arguments)
    assert_unchanged(model, before, modules)


def test_per_pattern_init():
    model = mlp()
    original = copy.deepcopy(model)
    lnn.inject(model, {"0": {"r": 2, "init": "pissa"}, "2": {"r": 2}})
    assert model[0].residual and not model[2].residual
    assert torch.equal(model[2].base.weight, original[2].weight)
    assert not torch.equal(model[0].base.weight, original[0].weight)
