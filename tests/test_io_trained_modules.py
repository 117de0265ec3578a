"""`lowrank.io.model_adapter` of a model with modules trained beside its adapters (a
classification head unfrozen after `inject`): written as PEFT's `modules_to_save`, so that
PEFT loads the trained head (checked against `PeftModel.from_pretrained`); a trainable
parameter a file cannot hold is a `TargetError`, nothing written."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lowrank import io as lio
from lowrank import nn as lnn
from lowrank.errors import ArgumentError, TargetError


def _tiny_bert_classifier() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def test_a_trained_head_is_saved_as_modules_to_save_and_peft_loads_it(tmp_path):
    peft = pytest.importorskip("peft")
    base = _tiny_bert_classifier()
    model = copy.deepcopy(base)
    lnn.inject(model, ["query", "value"], rank=2, alpha=4)
    model.classifier.requires_grad_(True)  # PEFT's modules_to_save=["classifier"]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids, labels = torch.randint(0, 64, (2, 6)), torch.tensor([0, 2])
    for _ in range(2):
        model(ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(model.classifier.weight, base.classifier.weight)
    adapter = lio.model_adapter(model)
    assert adapter.model["modules_to_save"] == ["classifier"]
    lio.save_adapter(adapter, tmp_path / "out", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-6)


def _adapted_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    lnn.inject(model, ["0"], rank=2)
    return model


def test_a_module_trained_in_part_is_refused():
    model = _adapted_mlp()
    model[1].weight.requires_grad_(True)  # its bias frozen: PEFT saves a module whole
    with pytest.raises(TargetError, match=r"'1\.weight'.*modules_to_save"):
        lio.model_adapter(model)


def test_a_trained_base_layer_inside_an_adapter_is_refused():
    model = _adapted_mlp()
    model[0].base.weight.requires_grad_(True)
    with pytest.raises(TargetError, match=r"'0\.base\.weight'"):
        lio.model_adapter(model)


def test_a_model_with_only_adapters_trainable_saves_no_base_tensors():
    adapter = lio.model_adapter(_adapted_mlp())
    assert adapter.base_weights == {} and "modules_to_save" not in adapter.model


@pytest.mark.parametrize("dropouts", [(0.1, 0.1), (0.1, 0.25)], ids=["same", "differ"])
def test_the_adapters_dropout_is_the_peft_configs_lora_dropout(tmp_path, dropouts):
    """PEFT trains on with the folder's `lora_dropout` (`is_trainable=True`): it is the
    adapters' (the largest where they differ), where it was always 0.0. Read back, the
    folder keeps it. PEFT refuses to load any but 0.0 with a parameter target (an embedding
    table's LoRA): such a folder states 0.0, and PEFT loads it."""
    peft = pytest.importorskip("peft")
    base = _tiny_bert_classifier()
    model = copy.deepcopy(base)
    query, value = dropouts
    targets = {"query": {"dropout": query}, "value": {"dropout": value}}
    lnn.inject(model, targets, rank=2, alpha=4)
    adapter = lio.model_adapter(model)
    assert adapter.model["lora_dropout"] == max(dropouts)
    lio.save_adapter(adapter, tmp_path / "out", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out",
                                            is_trainable=True)  # fmt: skip
    assert theirs.peft_config["default"].lora_dropout == max(dropouts)
    layer = theirs.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.lora_dropout["default"].p == max(dropouts)
    assert lio.load_adapter(tmp_path / "out").model["lora_dropout"] == max(dropouts)
    # injected back, the adapters train with it, as PEFT's do (it was 0)
    injected = copy.deepcopy(base)
    lio.inject_adapter(injected, tmp_path / "out")
    assert {a.dropout for a in lnn.adapters(injected).values()} == {max(dropouts)}
    injected.train(), theirs.train()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    got = injected(ids).logits
    torch.manual_seed(3)
    torch.testing.assert_close(got, theirs(ids).logits, rtol=1e-5, atol=1e-6)
    # an embedding table's LoRA goes in as PEFT's own (lora_embedding_A / _B), no parameter
    # target, beside which PEFT would refuse the dropout of the other layers
    embedded = copy.deepcopy(base)
    lnn.inject(embedded, {**targets, "word_embeddings": {}}, rank=2)
    lio.save_adapter(lio.model_adapter(embedded), tmp_path / "e", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "e",
                                            is_trainable=True)  # fmt: skip
    assert theirs.peft_config["default"].lora_dropout == max(dropouts)
    assert not theirs.peft_config["default"].target_parameters
    assert any("lora_embedding_A" in name for name, _ in theirs.named_parameters())


def test_lora_dropout_stays_out_of_peft_loha_configs(tmp_path):
    """PEFT's LoHa and LoKr configs have no `lora_dropout` (their `rank_dropout` and
    `module_dropout` drop otherwise): a LoRA's dropout is not written into them."""
    peft = pytest.importorskip("peft")
    from lowrank.forms import LoHa, LoRA

    generator = torch.Generator().manual_seed(0)
    half = [LoRA(torch.randn(2, 4, generator=generator), torch.randn(6, 2, generator=generator))
            for _ in range(2)]  # fmt: skip
    adapter = lio.Adapter({"0": LoHa(*half)}, model={"lora_dropout": 0.1})
    lio.save_adapter(adapter, tmp_path / "loha", format="peft")
    config = (tmp_path / "loha" / "adapter_config.json").read_text()
    assert "lora_dropout" not in config and '"rank_dropout": 0.0' in config
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(mlp), tmp_path / "loha")
    assert isinstance(loaded.peft_config["default"], peft.LoHaConfig)
    with pytest.raises(ArgumentError, match=r"model\['lora_dropout'\] must be a number in \[0, 1"):
        lio.Adapter({"0": LoHa(*half)}, model={"lora_dropout": 1.5})


@pytest.mark.parametrize("mode", ["lora_only", "all"])
def test_trained_biases_are_peft_bias_and_peft_loads_them(tmp_path, mode):
    """Biases trained beside the adapters, their weights frozen: those of the adapted
    modules are PEFT's `bias="lora_only"`, every bias `bias="all"` (they were refused).
    PEFT loads the folder to the trained model's logits (the adapters at ΔW = 0, so those
    differ from the base's by the biases alone) and, training on, trains the same biases."""
    peft = pytest.importorskip("peft")
    base = _tiny_bert_classifier()
    model = copy.deepcopy(base)
    lnn.inject(model, ["query", "value"], rank=2, alpha=4)
    for name, p in model.named_parameters():
        if name.endswith(".bias") and (mode == "all" or ".base." in name):
            p.requires_grad_(True)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert len(trained) == (2 if mode == "lora_only" else 11)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained biases; the adapters left at ΔW = 0, so only they count
        for name, p in model.named_parameters():
            if name in trained:
                p.add_(torch.randn(p.shape, generator=generator))
    ids = torch.randint(0, 64, (2, 6), generator=generator)
    adapter = lio.model_adapter(model)
    assert adapter.model["bias"] == mode and "modules_to_save" not in adapter.model
    lio.save_adapter(adapter, tmp_path / "out", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    assert theirs.peft_config["default"].bias == mode
    with torch.no_grad():
        unbiased = base(ids).logits
        got = model(ids).logits
        assert torch.linalg.norm(got - unbiased) > 1e-2 * torch.linalg.norm(unbiased)
        torch.testing.assert_close(theirs(ids).logits, got, rtol=1e-5, atol=1e-6)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out",
                                           is_trainable=True)  # fmt: skip
    theirs_trained = {n.removeprefix("base_model.model.").replace(".base_layer.", ".base.")
                      for n, p in again.named_parameters()
                      if p.requires_grad and n.endswith("bias")}  # fmt: skip
    assert theirs_trained == trained


def test_biases_peft_cannot_train_as_they_were_are_refused_by_name():
    """One adapted module's bias trained, another's frozen, or a bias of a module without
    an adapter trained alone: no PEFT `bias` setting trains those, refused by name."""
    model = _adapted_mlp()
    model[2].bias.requires_grad_(True)
    with pytest.raises(TargetError, match=r"bias '2\.bias' requires gradients but '0\.bias' "
                                          r"is frozen.*bias='all'"):  # fmt: skip
        lio.model_adapter(model)
    model = _adapted_mlp()
    lnn.inject(model, ["2"], rank=2)
    model[0].base.bias.requires_grad_(True)
    with pytest.raises(TargetError, match=r"'0\.bias' requires gradients but '2\.bias' is frozen"):
        lio.model_adapter(model)
    model[2].base.bias.requires_grad_(True)
    assert lio.model_adapter(model).model["bias"] == "lora_only"


def test_a_head_injected_from_a_peft_folder_is_saved_again(tmp_path):
    """`inject_adapter` of a PEFT classifier's folder leaves its head trainable, as PEFT's
    `modules_to_save` are, so that `model_adapter` writes it again: PEFT loads the result
    to the logits of the PEFT model it started from (a frozen head was left out, the
    base's random one loaded in its place)."""
    peft = pytest.importorskip("peft")
    base = _tiny_bert_classifier()
    config = peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS",
                             init_lora_weights=False)  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    theirs.eval().save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    lio.inject_adapter(model, tmp_path / "peft")
    assert all(p.requires_grad for p in model.classifier.parameters())
    lio.save_adapter(lio.model_adapter(model), tmp_path / "out", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, theirs(ids).logits, rtol=0, atol=0)


def test_a_trained_head_whose_name_ends_another_s_saves_that_one_too(tmp_path):
    """PEFT matches `modules_to_save` names as suffixes of module paths: DistilBERT's
    trained `classifier` makes PEFT save and load `pre_classifier` whole too, so the file
    holds it as it is (PEFT's load was a `KeyError`, lowrank's a `FileFormatError`)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.DistilBertConfig(
        vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=24, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.DistilBertForSequenceClassification(config).eval()
    model = copy.deepcopy(base)
    lnn.inject(model, ["q_lin", "v_lin"], rank=2, alpha=4)
    model.classifier.requires_grad_(True)
    with torch.no_grad():  # trained: the adapters' factors and the head
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(torch.randn_like(parameter))
    lio.save_adapter(lio.model_adapter(model), tmp_path / "out", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    assert lio.load_adapter(tmp_path / "out", base=base).base_weights.keys() >= {
        "pre_classifier.weight", "pre_classifier.bias", "classifier.weight"
    }


def test_a_module_peft_would_save_with_a_trained_one_holding_an_adapter_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("pre_head", nn.Linear(4, 4))
    model.add_module("head", nn.Linear(4, 2))
    lnn.inject(model, ["pre_head"], rank=2)
    model.head.requires_grad_(True)
    with pytest.raises(TargetError, match=r"'pre_head'.*holds an adapter.*\['head'\]"):
        lio.model_adapter(model)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_biases_injected_from_a_peft_folder_are_saved_again(tmp_path, bias):
    """`inject_adapter` of a PEFT folder saved with `bias="all"` / `"lora_only"` leaves those
    biases trainable, as PEFT's `is_trainable=True` does, so that `model_adapter` writes them
    again: PEFT loads the result to the logits of the PEFT model it started from (frozen,
    they were left out and the base's loaded in their place)."""
    peft = pytest.importorskip("peft")
    base = _tiny_bert_classifier()
    config = peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS",
                             bias=bias, init_lora_weights=False)  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    layer = theirs.base_model.model.bert.encoder.layer[0]
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.attention.self.query.base_layer.bias.add_(torch.randn(16, generator=generator))
        if bias == "all":
            layer.output.dense.bias.add_(torch.randn(16, generator=generator))
    theirs.eval().save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    lio.inject_adapter(model, tmp_path / "peft")
    lio.save_adapter(lio.model_adapter(model), tmp_path / "out", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    assert again.peft_config["default"].bias == bias
    ids = torch.randint(0, 64, (2, 6), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, theirs(ids).logits, rtol=0, atol=0)


def _saved_state(model: nn.Module, path):
    """`model`'s state written to the safetensors file `path`; `path`."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _refuses_negative_weights(checkpoint, adapter, tmp_path, said: str) -> None:
    """`combine` at weight -1 and `merge` into `checkpoint` at -0.5 refuse `adapter` with a
    message matching `said` (ConversionError, MergeError), writing nothing."""
    from lowrank.errors import ConversionError, MergeError

    with pytest.raises(ConversionError, match=said):
        lio.combine_adapters([adapter], tmp_path / "c", weights=[-1.0])
    with pytest.raises(MergeError, match=said):
        lio.merge_checkpoint(checkpoint, adapter, tmp_path / "m.safetensors", weights=[-0.5])
    assert not (tmp_path / "c").exists() and not (tmp_path / "m.safetensors").exists()


def test_an_adapter_saving_whole_tensors_weighted_0_leaves_them_out_below_0_is_refused(
    tmp_path,
):
    """A saved head is loaded in place of the base's, not added: an adapter weighted 0 leaves
    it out of a merge or combination (the base's head stays; the merge replaced it anyway),
    one weighted below 0 is refused naming the adapter and a tensor, with nothing written (a
    weight of -1 kept the head as trained); above 0 it is loaded as saved, as PEFT loads it
    at any strength."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file


    base = _tiny_bert_classifier()
    config = peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS",
                             init_lora_weights=False)  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    theirs.save_pretrained(tmp_path / "peft")
    checkpoint = _saved_state(base, tmp_path / "base.safetensors")
    said = r"peft saves whole base tensors \(classifier\..*cannot take them back out"
    _refuses_negative_weights(checkpoint, tmp_path / "peft", tmp_path, said)
    head = theirs.base_model.model.classifier.modules_to_save["default"].weight
    for weight, want in ((0.5, head), (0.0, base.classifier.weight)):
        lio.merge_checkpoint(checkpoint, tmp_path / "peft", tmp_path / f"{weight}.safetensors",
                             weights=[weight])  # fmt: skip
        merged = load_file(tmp_path / f"{weight}.safetensors")["classifier.weight"]
        torch.testing.assert_close(merged, want, rtol=0, atol=0)


def _peft_classifier(peft, base: nn.Module, path, seed: int, **settings) -> nn.Module:
    """A PEFT LoRA of `base` (a tiny BERT classifier) with random factors and, for
    `task_type="SEQ_CLS"`, a trained head (random), saved to `path`."""
    config = peft.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False,
                             **settings)  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name or (
                name.endswith("bias") and p.requires_grad
            ):
                p.add_(torch.randn(p.shape, generator=generator))
    model.save_pretrained(path)
    return model.eval()


def test_a_combination_keeps_the_head_of_the_adapter_weighted_above_0(tmp_path):
    """Two PEFT classifiers, each with its own trained head (`modules_to_save`, the head
    PEFT adds for `SEQ_CLS`): combined with weights 0 and 1, the result loads in PEFT to the
    logits of the one weighted 1 (its head and LoRA; the other's head left out, not
    conflicting with it), and the other way round."""
    peft = pytest.importorskip("peft")
    base = _tiny_bert_classifier()
    first = _peft_classifier(peft, base, tmp_path / "a", 1, task_type="SEQ_CLS")
    second = _peft_classifier(peft, base, tmp_path / "b", 2, task_type="SEQ_CLS")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = {"a": first(ids).logits, "b": second(ids).logits}
    assert torch.linalg.norm(logits["a"] - logits["b"]) > 1e-2 * torch.linalg.norm(logits["b"])
    for weights, kept in (([0.0, 1.0], "b"), ([1.0, 0.0], "a")):
        out = tmp_path / f"c_{kept}"
        lio.combine_adapters([tmp_path / "a", tmp_path / "b"], out, weights=weights)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, logits[kept], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_a_negative_weight_of_an_adapter_saving_only_biases_is_refused(tmp_path, bias):
    """An adapter whose only saved tensors are trained biases (PEFT's `bias`, no head):
    its biases are loaded in place of the base's, which a negative weight cannot take back
    out, so `combine` (and the CLI) and `merge` refuse it naming the adapter and a bias,
    with nothing written; weighted 0 it leaves the base's biases, as they are."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from lowrank.cli import main

    base = _tiny_bert_classifier()
    _peft_classifier(peft, base, tmp_path / "peft", 1, bias=bias)
    checkpoint = _saved_state(base, tmp_path / "base.safetensors")
    said = r"peft saves whole base tensors \(.*\.bias, \d+ in all\).*cannot take them back out"
    _refuses_negative_weights(checkpoint, tmp_path / "peft", tmp_path, said)
    assert main(["combine", f"{tmp_path / 'peft'}:-0.5", "-o", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()
    lio.merge_checkpoint(checkpoint, tmp_path / "peft", tmp_path / "z.safetensors",
                         weights=[0.0])  # fmt: skip
    merged = load_file(tmp_path / "z.safetensors")
    for key, tensor in base.state_dict().items():
        torch.testing.assert_close(merged[key], tensor, rtol=0, atol=0)


def _tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40,
                                     n_positions=8)  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


_CONV1DS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _peft_dropouts(model: nn.Module) -> dict[str, nn.Module]:
    """`{module: its lora_dropout}` of a `PeftModel`'s LoRA layers."""
    return {name.removeprefix("base_model.model."): module.lora_dropout["default"]
            for name, module in model.named_modules()
            if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict)}  # fmt: skip


def _train_logits(model: nn.Module, ids: torch.Tensor, seed: int) -> torch.Tensor:
    model.train()
    torch.manual_seed(seed)
    return model(ids).logits


def test_a_gpt2s_dropout_goes_into_peft_as_module_loras(tmp_path):
    """A GPT-2 trained with dropout (its `Conv1D` layers and token table adapted): PEFT's
    parameter targets take no dropout, so the `Conv1D` LoRAs go in as the module LoRAs PEFT
    runs transposed (`fan_in_fan_out`) and the table as PEFT's embedding LoRA, and the config
    keeps `lora_dropout`. PEFT loads the folder to the model's logits in eval, and in
    training its dropout runs on each `Conv1D` layer (as many dropouts, the same masks:
    the same logits under one seed); `inject_adapter` trains on with the dropout, and its
    `model_adapter` writes the same folder. Without dropout, the layers stay parameter
    targets."""
    peft = pytest.importorskip("peft")
    base = _tiny_gpt2()
    model = copy.deepcopy(base)
    lnn.inject(model, [*_CONV1DS, "wte"], rank=2, alpha=4, dropout=0.1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # up starts at zero: an update to compare
        for adapter in lnn.adapters(model).values():
            adapter.up.copy_(torch.randn(adapter.up.shape, generator=generator) * 0.3)
    lio.save_adapter(lio.model_adapter(model), tmp_path / "out", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out",
                                            is_trainable=True)  # fmt: skip
    config = theirs.peft_config["default"]
    assert config.lora_dropout == 0.1 and config.fan_in_fan_out and not config.target_parameters
    dropouts = _peft_dropouts(theirs)
    conv1ds = [f"transformer.h.0.{name}" for name in _CONV1DS]
    assert sorted(dropouts) == sorted([*conv1ds, "transformer.wte"])
    for name in conv1ds:  # PEFT's embedding LoRA holds a dropout it never runs
        assert isinstance(dropouts[name], nn.Dropout) and dropouts[name].p == 0.1
    ids = torch.randint(0, 40, (2, 8), generator=generator)
    with torch.no_grad():
        expected = model.eval()(ids).logits
        torch.testing.assert_close(theirs.eval()(ids).logits, expected, rtol=1e-5, atol=1e-6)
    ran = []
    hooks = [d.register_forward_hook(lambda *_, n=n: ran.append(n)) for n, d in dropouts.items()]
    torch.testing.assert_close(_train_logits(theirs, ids, 3), _train_logits(model, ids, 3),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert sorted(ran) == sorted(conv1ds)
    for hook in hooks:
        hook.remove()
    injected = copy.deepcopy(base)
    lio.inject_adapter(injected, tmp_path / "out")
    found = {name: a.dropout for name, a in lnn.adapters(injected).items()}
    assert found == {**dict.fromkeys(conv1ds, 0.1), "transformer.wte": 0.0}
    torch.testing.assert_close(_train_logits(injected, ids, 4), _train_logits(theirs, ids, 4),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    lio.save_adapter(lio.model_adapter(injected), tmp_path / "again", format="peft")
    written = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert written["lora_dropout"] == 0.1 and written["fan_in_fan_out"]
    assert "target_parameters" not in written
    again = lio.load_adapter(tmp_path / "again")  # its metadata names the Conv1Ds
    assert again.embeddings == ("transformer.wte.weight",)
    assert again.conv1d == tuple(sorted(f"{name}.weight" for name in conv1ds))
    plain = copy.deepcopy(base)
    lnn.inject(plain, [*_CONV1DS, "wte"], rank=2)
    lio.save_adapter(lio.model_adapter(plain), tmp_path / "plain", format="peft")
    written = lio.load_adapter(tmp_path / "plain")
    assert len(written.target_parameters) == 5 and not written.fan_in_fan_out


def test_a_peft_gpt2_folders_dropout_survives_conversion_back_to_peft(tmp_path):
    """A PEFT folder of a GPT-2's `Conv1D` module LoRAs (`fan_in_fan_out`) with dropout,
    converted to PEFT against the model: its layers, read as the LoRAs of the weights as
    stored, go back in as module LoRAs with the dropout, which PEFT loads to the source's
    logits and trains with; the same folder without dropout comes back as parameter
    targets, and a folder of parameter targets (no dropout, the only value PEFT takes
    there) stays one."""
    peft = pytest.importorskip("peft")
    base = _tiny_gpt2()
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    for dropout in (0.1, 0.0):
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                 fan_in_fan_out=True, lora_dropout=dropout)  # fmt: skip
        source = peft.get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for name, parameter in source.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
        source.save_pretrained(tmp_path / f"src{dropout}")
        out = tmp_path / f"out{dropout}"
        lio.convert_adapter(tmp_path / f"src{dropout}", out, "peft", base=copy.deepcopy(base))
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out, is_trainable=True)
        written = theirs.peft_config["default"]
        assert written.lora_dropout == dropout
        assert bool(written.target_parameters) == (dropout == 0)
        with torch.no_grad():
            torch.testing.assert_close(theirs.eval()(ids).logits, source.eval()(ids).logits,
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
        torch.testing.assert_close(_train_logits(theirs, ids, 3), _train_logits(source, ids, 3),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        again = tmp_path / f"again{dropout}"  # PEFT → PEFT keeps the layout it wrote
        lio.convert_adapter(out, again, "peft", base=copy.deepcopy(base))
        config, kept = (json.loads((f / "adapter_config.json").read_text()) for f in (out, again))
        assert {k: kept.get(k) for k in ("lora_dropout", "target_parameters", "fan_in_fan_out")} \
            == {k: config.get(k) for k in ("lora_dropout", "target_parameters", "fan_in_fan_out")}
