"""`lowrank.nn.disable_adapters`: the base model's output inside the block (checked against
the unadapted model and PEFT's `disable_adapter()`), the adapters back at exit, and merged
or PiSSA-started adapters refused with nothing changed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowrank import nn as lnn
from lowrank.errors import MergeError


class Net(nn.Module):
    """A conv, a linear and an `nn.MultiheadAttention`, which reads `out_proj.weight`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(h)


TARGETS = ["conv", "head", "out_proj"]


def _adapted(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.Module]:
    """The base model and an adapted copy with random (non-zero) factors, in training mode."""
    torch.manual_seed(0)
    base = Net().to(dtype).train().requires_grad_(False)  # frozen as inject leaves it
    model = copy.deepcopy(base)
    lnn.inject(model, TARGETS, rank=2, alpha=4)
    with torch.no_grad():
        for adapter in lnn.adapters(model).values():
            adapter.up.normal_(std=0.5)
    return base, model


def test_disabled_block_runs_the_base_model_and_enables_the_adapters_again():
    base, model = _adapted()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    adapted = model(x).detach()
    assert (adapted - base(x)).abs().max() > 1e-2  # the adapters change the output
    with lnn.disable_adapters(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
        torch.testing.assert_close(model.attn.out_proj.weight, base.attn.out_proj.weight)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)


def test_disabled_equals_peft_disable_adapter_with_dropout_in_training():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).train()
    ours = copy.deepcopy(base)
    lnn.inject(ours, ["0", "2"], rank=2, alpha=4, dropout=0.5)
    config = peft.LoraConfig(target_modules=["0", "2"], r=2, lora_alpha=4, lora_dropout=0.5,
                             init_lora_weights=False)  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), config).train()
    x = torch.randn(5, 6)
    with lnn.disable_adapters(ours), theirs.disable_adapter():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        torch.testing.assert_close(ours(x), base(x), rtol=0, atol=0)


def test_blocks_nest_and_an_exception_enables_the_adapters_again():
    base, model = _adapted()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    adapted = model(x).detach()
    with pytest.raises(KeyError), lnn.disable_adapters(model):
        with lnn.disable_adapters(model):
            pass
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # still disabled
        raise KeyError("inside")
    assert not any(a.disabled for a in lnn.adapters(model).values())
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)


def test_the_factors_train_again_after_the_block():
    _, model = _adapted()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    with lnn.disable_adapters(model):
        assert not model(x).requires_grad  # only the frozen base ran
    model(x).sum().backward()
    assert all(a.up.grad.abs().max() > 0 for a in lnn.adapters(model).values())


def test_merged_adapters_are_refused_with_nothing_changed():
    _, model = _adapted()
    lnn.merge(model)
    weights = {n: a.base.weight.clone() for n, a in lnn.adapters(model).items()}
    with pytest.raises(MergeError, match="merged"), lnn.disable_adapters(model):
        pass
    for name, adapter in lnn.adapters(model).items():
        assert adapter.merged and not adapter.disabled
        assert torch.equal(adapter.base.weight, weights[name])


def test_a_merge_inside_the_block_is_refused_at_the_forward():
    _, model = _adapted()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    with lnn.disable_adapters(model):
        lnn.merge(model)
        with pytest.raises(MergeError, match="unmerge"):
            model(x)
        with pytest.raises(MergeError, match="unmerge"):
            model.attn.out_proj.weight  # noqa: B018 (the property is the check)


def test_a_pissa_start_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6))
    lnn.inject(model, ["0"], rank=2, init="pissa")
    with pytest.raises(MergeError, match="pissa"), lnn.disable_adapters(model):
        pass
    assert not model[0].disabled


def test_a_compiled_model_follows_the_block():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5))
    model = copy.deepcopy(base)
    lnn.inject(model, ["0"], rank=2)
    with torch.no_grad():
        model[0].up.normal_()
    compiled = torch.compile(model, backend="eager")  # dynamo guards on the flag
    x = torch.randn(3, 6)
    with torch.no_grad():
        adapted = model(x)
        torch.testing.assert_close(compiled(x), adapted)
        with lnn.disable_adapters(model):
            torch.testing.assert_close(compiled(x), base(x))
        torch.testing.assert_close(compiled(x), adapted)
