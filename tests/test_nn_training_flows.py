"""Training flows of lowrank.nn as a PEFT user runs them on a tiny transformers model:
freezing the model and training the adapters again (`set_requires_grad`), and gradient
checkpointing with a frozen base, each against the real PEFT on the same factors."""

from __future__ import annotations

import copy

import pytest
import torch

from lowrank import ArgumentError, TargetError
from lowrank import nn as lnn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]
PEFT_NAMES = {"down": "lora_A.default.weight", "up": "lora_B.default.weight",
              "magnitude": "lora_magnitude_vector.default.weight"}  # fmt: skip


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def pair(dora: bool = False, dropout: float = 0.0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same tiny Llama adapted by lowrank and by PEFT, with the same nonzero factors."""
    base = tiny_llama()
    ours = copy.deepcopy(base)
    lnn.inject(ours, TARGETS, rank=2, alpha=4, dora=dora, dropout=dropout)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, use_dora=dora,
                             lora_dropout=dropout)  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, adapter in lnn.adapters(ours).items():
            for key, tensor in adapter.adapter_tensors().items():
                if key != "magnitude":
                    tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
                peer = theirs.get_parameter(f"base_model.model.{name}.{PEFT_NAMES[key]}")
                peer.copy_(tensor.reshape(peer.shape))
    return ours, theirs


def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def as_peft(names: set[str]) -> set[str]:
    """lowrank's adapter tensor names as PEFT names them."""
    found = set()
    for name in names:
        module, key = name.rsplit(".", 1)
        found.add(f"base_model.model.{module}.{PEFT_NAMES[key]}")
    return found


@pytest.mark.parametrize("dora", [False, True])
def test_set_requires_grad_trains_the_adapters_again_as_peft_does(dora: bool) -> None:
    ours, theirs = pair(dora=dora)
    injected = trainable(ours)
    for model in (ours, theirs):
        model.requires_grad_(False)
    ours.lm_head.weight.requires_grad_(True)  # trained beside the adapters: left as it is
    lnn.set_requires_grad(ours)
    theirs.set_requires_grad("default")
    assert trainable(ours) == injected | {"lm_head.weight"}
    assert as_peft(injected) == trainable(theirs)
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(2))
    ours(input_ids=ids, labels=ids).loss.backward()
    assert {n for n, p in ours.named_parameters() if p.grad is not None} == trainable(ours)
    lnn.set_requires_grad(ours, False)
    theirs.set_requires_grad("default", requires_grad=False)
    assert trainable(ours) == {"lm_head.weight"}
    assert not trainable(theirs)


def test_set_requires_grad_refuses_what_cannot_train() -> None:
    with pytest.raises(TargetError, match=r"no lowrank\.nn adapters"):
        lnn.set_requires_grad(torch.nn.Linear(2, 2))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.inference_mode():
        lnn.inject(model, ["1"], rank=2)
    lnn.inject(model, ["0"], rank=2)
    model.requires_grad_(False)
    with pytest.raises(TargetError, match=r"1\.down .*inference"):
        lnn.set_requires_grad(model)
    assert not trainable(model)  # nothing changed, the first adapter's factors neither
    with pytest.raises(ArgumentError, match="requires_grad"):
        lnn.set_requires_grad(model, "yes")


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_trains_the_adapters_as_peft(reentrant: bool) -> None:
    """transformers' gradient checkpointing over a frozen base: the adapters' gradients are
    those without checkpointing (dropout on: the recomputed forward draws the same mask)
    and PEFT's, with either `use_reentrant`."""
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(2))

    def gradients(model: torch.nn.Module, checkpointed: bool) -> list[torch.Tensor]:
        if checkpointed:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        torch.manual_seed(3)
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    ours, theirs = pair(dropout=0.25)
    plain = gradients(copy.deepcopy(ours), checkpointed=False)
    checkpointed = gradients(ours, checkpointed=True)
    peer = gradients(theirs, checkpointed=True)
    assert len(checkpointed) == len(plain) == len(peer) == 8
    for mine, reference, peft_grad in zip(checkpointed, plain, peer, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(mine, peft_grad, rtol=1e-5, atol=1e-7)
