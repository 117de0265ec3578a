"""Hot swap of merged adapters: bit-exact restore in bf16 after 100 swaps, a swap equal to a
fresh merge, the drift of subtract-then-add, and a failed swap that changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank import NonFiniteError, StateDictError
from lowrank import nn as lnn

CYCLES = 100


def base_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Conv1d(32, 16, 3, padding=1))
    return model.to(torch.bfloat16)


def random_adapter(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: 0.2 * torch.randn(value.shape, generator=generator).to(value.dtype)
        for key, value in lnn.adapter_state_dict(model).items()
    }


def adapted() -> tuple[nn.Module, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    model = base_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lnn.inject(model, ["0", "2"], rank=4, alpha=8, form="lora")
    adapters = [random_adapter(model, seed) for seed in range(3)]
    lnn.load_adapter_state_dict(model, adapters[0])
    return model, weights, adapters


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": a.base.weight.detach().clone()
            for name, a in lnn.adapters(model).items()}  # fmt: skip


def swap_cycles(model: nn.Module, adapters: list[dict[str, torch.Tensor]]) -> None:
    for cycle in range(CYCLES):
        lnn.swap_adapter(model, adapters[1 + cycle % 2])


def test_exact_mode_restores_the_bf16_base_weight_bit_for_bit_after_100_swaps():
    model, weights, adapters = adapted()
    held = lnn.merge(model, exact=True)
    assert held == 2 * (32 * 24 + 16 * 32 * 3)  # one bf16 copy of each adapted weight
    swap_cycles(model, adapters)
    lnn.unmerge(model)
    for key, value in base_weights(model).items():
        assert torch.equal(value, weights[key]), key


def fresh_merge(adapter: dict[str, torch.Tensor]) -> nn.Module:
    fresh = base_model()
    lnn.inject(fresh, ["0", "2"], rank=4, alpha=8)
    lnn.load_adapter_state_dict(fresh, adapter)
    lnn.merge(fresh)
    return fresh


def test_an_exact_swap_equals_a_fresh_merge_bit_for_bit():
    model, _, adapters = adapted()
    lnn.merge(model, exact=True)
    swap_cycles(model, adapters)
    fresh = fresh_merge(adapters[2])
    swapped = base_weights(model)
    for key, value in base_weights(fresh).items():
        assert torch.equal(swapped[key], value), key
    x = torch.randn(2, 5, 24, dtype=torch.bfloat16)
    assert all(a.merged for a in lnn.adapters(model).values())
    assert torch.equal(model[0](x), fresh[0](x))


def test_one_subtracting_swap_equals_a_fresh_merge_up_to_bf16_rounding():
    model, _, adapters = adapted()
    lnn.merge(model)
    lnn.swap_adapter(model, adapters[1])
    swapped = base_weights(model)
    for key, value in base_weights(fresh_merge(adapters[1])).items():
        difference = (swapped[key].double() - value.double()).norm() / value.double().norm()
        assert difference < 1e-2, key


def test_subtract_then_add_drifts_in_bf16():
    """Without the kept copy each swap rounds twice: after 100 the weight has moved."""
    model, weights, adapters = adapted()
    lnn.merge(model)
    swap_cycles(model, adapters)
    lnn.unmerge(model)
    changed = sum(int((value != weights[key]).sum()) for key, value in base_weights(model).items())
    assert changed > 0


def test_swap_into_unmerged_adapters_merges_them_and_a_bad_swap_changes_nothing():
    model, _, adapters = adapted()
    assert lnn.swap_adapter(model, adapters[1], exact=True) > 0
    assert all(a.merged and a.base_copy is not None for a in lnn.adapters(model).values())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partial = dict(adapters[2])
    partial.pop("2.up")
    with pytest.raises(StateDictError, match="missing"):
        lnn.swap_adapter(model, partial)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_wider_state_is_merged_as_the_adapter_keeps_it():
    """A float32 state into bf16 adapters: the factors are stored rounded to bf16, and the
    swap merges those, so it equals a fresh merge bit for bit."""
    model, _, adapters = adapted()
    lnn.merge(model, exact=True)
    generator = torch.Generator().manual_seed(7)
    wide = {k: 0.2 * torch.randn(v.shape, generator=generator) for k, v in adapters[1].items()}
    lnn.swap_adapter(model, wide)
    rounded = {k: v.to(torch.bfloat16) for k, v in wide.items()}
    fresh = fresh_merge(rounded)
    swapped = base_weights(model)
    for key, value in base_weights(fresh).items():
        assert torch.equal(swapped[key], value), key
    assert all(torch.equal(v, rounded[k]) for k, v in lnn.adapter_state_dict(model).items())


@pytest.mark.parametrize("swap", [False, True])
def test_a_state_beyond_the_adapters_dtype_is_refused_and_changes_nothing(swap):
    """1e5 is finite in float32 but beyond float16: loading it would store Inf (ΔW itself,
    1e5 · 1e-5, would be harmless)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4)).half()
    lnn.inject(model, ["0"], rank=2)
    state = {k: v.float() for k, v in lnn.adapter_state_dict(model).items()}
    state["0.up"].fill_(1e5)
    state["0.down"].fill_(1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load = lnn.swap_adapter if swap else lnn.load_adapter_state_dict
    with pytest.raises(NonFiniteError, match=r"0\.up .*overflows the adapter's torch\.float16"):
        load(model, state)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not lnn.adapters(model)["0"].merged


def test_a_meta_tensor_in_a_state_is_refused_by_name():
    model, _, adapters = adapted()
    state = dict(adapters[1], **{"0.down": adapters[1]["0.down"].to("meta")})
    with pytest.raises(StateDictError, match=r"0\.down is a meta tensor"):
        lnn.load_adapter_state_dict(model, state)


@pytest.mark.parametrize("swap", [False, True])
def test_a_state_holding_the_models_own_factors_under_other_names_loads_their_values(swap):
    """`adapter_state_dict` shares the factors' memory: a state that moves them between
    layers (the two adapters exchanged) loaded the first layer's new factors into the
    second too, as each adapter was written in turn (1.up kept its own values). The values
    loaded are those the state held when the call began; merged weights against float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    weights = [layer.weight.detach().double().clone() for layer in model]
    lnn.inject(model, ["0", "1"], rank=2, alpha=4)
    generator = torch.Generator().manual_seed(1)
    shapes = {k: v.shape for k, v in lnn.adapter_state_dict(model).items()}
    lnn.load_adapter_state_dict(model, {k: torch.randn(s, generator=generator)
                                        for k, s in shapes.items()})  # fmt: skip
    live = lnn.adapter_state_dict(model)
    before = {k: v.clone() for k, v in live.items()}
    exchanged = {f"{i}.{name}": live[f"{1 - i}.{name}"] for i in (0, 1) for name in ("up", "down")}
    (lnn.swap_adapter if swap else lnn.load_adapter_state_dict)(model, exchanged)
    for i in (0, 1):
        up, down = before[f"{1 - i}.up"], before[f"{1 - i}.down"]
        assert torch.equal(model[i].up, up) and torch.equal(model[i].down, down), i
        if swap:
            want = weights[i] + 2 * up.double() @ down.double()
            torch.testing.assert_close(model[i].base.weight.double(), want, rtol=1e-6, atol=1e-6)
