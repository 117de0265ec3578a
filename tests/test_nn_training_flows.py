"""Training flows of lowrank.nn as a PEFT user runs them on a tiny transformers model:
freezing the model and training the adapters again (`set_requires_grad`), and gradient
checkpointing with a frozen base, each against the real PEFT on the same factors."""

from __future__ import annotations

import copy
import io

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


class _FourKinds(torch.nn.Module):
    """An embedding, a linear layer, a transformers `Conv1D` and a 3×3 convolution in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.lin = torch.nn.Linear(8, 12)
        self.c1d = transformers.pytorch_utils.Conv1D(10, 12)
        self.conv = torch.nn.Conv2d(10, 6, 3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.c1d(self.lin(self.emb(ids)))  # (B, L, 10)
        return self.conv(h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 3))


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
@pytest.mark.parametrize(("model_dtype", "factor_dtype"), [
    (torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)])
def test_autocast_training_step_equals_peft(model_dtype, factor_dtype) -> None:
    """Under `torch.autocast("cpu", bfloat16)` with dropout: each layer's output dtype, the
    factors' dtype and their gradients' equal PEFT's (`autocast_adapter_dtype` for float32
    factors over a bfloat16 model), values bit for bit."""
    torch.manual_seed(0)
    base = _FourKinds().to(model_dtype)
    kinds = ["emb", "lin", "c1d", "conv"]
    ours = copy.deepcopy(base)
    lnn.inject(ours, kinds, rank=2, alpha=4, dropout=0.2, factor_dtype=factor_dtype)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=kinds, lora_dropout=0.2)
    theirs = peft.get_peft_model(copy.deepcopy(base), config,
                                 autocast_adapter_dtype=factor_dtype is not None)  # fmt: skip
    pairs = []
    generator = torch.Generator().manual_seed(1)
    for name, adapter in lnn.adapters(ours).items():
        layer = theirs.base_model.model.get_submodule(name)
        peer = ((layer.lora_embedding_A["default"], layer.lora_embedding_B["default"])
                if name == "emb" else (layer.lora_A["default"].weight,
                                       layer.lora_B["default"].weight))  # fmt: skip
        with torch.no_grad():
            for mine, other in zip((adapter.down, adapter.up), peer, strict=True):
                mine.copy_(0.5 * torch.randn(mine.shape, generator=generator))
                other.copy_(mine.reshape(other.shape))
        pairs += [(name, adapter.down, peer[0]), (name, adapter.up, peer[1])]
    ids = torch.randint(0, 20, (2, 5), generator=generator)
    results = []
    for model, prefix in ((ours, ""), (theirs, "base_model.model.")):
        model.train()
        outputs = {}
        for kind in kinds:
            model.get_submodule(prefix + kind).register_forward_hook(
                lambda _m, _i, out, kind=kind, seen=outputs: seen.__setitem__(kind, out))
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(ids)
        y.float().square().mean().backward()
        results.append(outputs)
    for kind in kinds:
        assert results[0][kind].dtype == results[1][kind].dtype
        assert torch.equal(results[0][kind], results[1][kind]), kind
    for name, mine, other in pairs:
        assert mine.dtype == other.dtype == (factor_dtype or model_dtype), name
        assert mine.grad.dtype == other.grad.dtype == mine.dtype, name
        assert torch.equal(mine.grad, other.grad.reshape(mine.shape)), name


@pytest.mark.parametrize("settings", [{"dropout": 0.1}, {"dora": True, "dropout": 0.1},
                                      {"trainable_scale": True}])  # fmt: skip
def test_resuming_from_saved_states_continues_the_run(settings) -> None:
    """An optimizer keyed by the adapters' parameters trains on through `merge(exact=True)`,
    `unmerge` and a `swap_adapter` of the adapters' own state (the parameters are the same
    objects, written in place), and a run saved mid-way (`adapter_state_dict` and the
    optimizer's state, through `torch.save`) and resumed in a fresh model continues it bit for
    bit: four AdamW steps of one plain run are the reference."""
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(2))
    base = tiny_llama()

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = copy.deepcopy(base)
        torch.manual_seed(1)  # the same start for every run
        lnn.inject(model, TARGETS, rank=2, alpha=4, **settings)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=1e-2)

    def steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seeds: range) -> None:
        for seed in seeds:
            torch.manual_seed(seed)
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()

    reference, optimizer = fresh()
    steps(reference, optimizer, range(4))

    model, optimizer = fresh()
    parameters = list(model.parameters())
    steps(model, optimizer, range(2))
    saved = io.BytesIO()
    torch.save({"adapter": lnn.adapter_state_dict(model), "optimizer": optimizer.state_dict()},
               saved)  # fmt: skip
    lnn.merge(model, exact=True)
    lnn.unmerge(model)
    lnn.swap_adapter(model, lnn.adapter_state_dict(model), exact=True)
    lnn.unmerge(model)
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    steps(model, optimizer, range(2, 4))

    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed, optimizer = fresh()
    lnn.load_adapter_state_dict(resumed, state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    steps(resumed, optimizer, range(2, 4))

    expected = lnn.adapter_state_dict(reference)
    for run in (model, resumed):
        got = lnn.adapter_state_dict(run)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), key
