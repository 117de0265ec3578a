"""PEFT's `target_modules="all-linear"` against the real peft package: which module is a
base's output layer (`get_output_embeddings()` of a transformers model, which PEFT leaves
out; none of any other model), for adapter files (merge, apply, convert; LoRA, LoHa, LoKr)
and for `lowrank.nn.inject`."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from io_helpers import rel, save_state
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank import errors
from lowrank.io import (
    apply_adapter,
    combine_adapters,
    convert_adapter,
    load_adapter,
    merge_checkpoint,
    save_adapter,
)
from lowrank.io.module_types import NAMED_MODELS, may_be_output_layer
from lowrank.nn import inject

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOWER = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 32, "vocab_size": 32, "max_position_embeddings": 16,
         "tie_word_embeddings": False}  # fmt: skip
MASKED_LMS = {
    # output layers not named lm_head
    "bert": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(**TOWER)),
             "cls.predictions.decoder"),
    "roberta": (lambda: transformers.RobertaForMaskedLM(transformers.RobertaConfig(**TOWER)),
                "lm_head.decoder"),
}  # fmt: skip
CONFIGS = {
    "lora": lambda targets: peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False),
    "loha": lambda targets: peft.LoHaConfig(r=2, target_modules=targets, init_weights=False),
    "lokr": lambda targets: peft.LoKrConfig(r=2, target_modules=targets, init_weights=False),
}


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def all_linear_folder(
    model: nn.Module, kind: str, folder: Path, targets: list[str] | None = None
) -> Path:
    """A PEFT `kind` adapter trained on `targets` (default: every linear layer of `model`,
    its output layer too, as a list names it), whose config then says `"all-linear"`."""
    torch.manual_seed(1)
    targets = linear_names(model) if targets is None else targets
    adapted = peft.get_peft_model(copy.deepcopy(model), CONFIGS[kind](targets))
    adapted.save_pretrained(folder, save_embedding_layers=False)
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "target_modules": "all-linear"}))  # fmt: skip
    return folder


def drop_module(folder: Path, module: str) -> None:
    """Remove the keys of `module`'s factors from the adapter in `folder`."""
    weights = folder / "adapter_model.safetensors"
    kept = {k: v for k, v in load_file(str(weights)).items()
            if not k.startswith(f"base_model.model.{module}.")}  # fmt: skip
    save_file(kept, str(weights))


def peft_merged(model: nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """The state PEFT's `merge_and_unload` gives `model` with the adapter in `folder`."""
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder)
        return loaded.merge_and_unload().state_dict()


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_a_transformers_output_layer_not_named_lm_head_is_left_out_as_peft_does(
    tmp_path, name, kind
):
    """PEFT's all-linear leaves out the layer `get_output_embeddings()` returns (BERT's
    `cls.predictions.decoder`, RoBERTa's `lm_head.decoder`) and skips its saved keys: a
    folder holding them is refused naming that layer, by merge (the checkpoint's
    config.json tells the model) and apply, nothing written or changed; without them it
    merges as PEFT's `merge_and_unload`."""
    make, output = MASKED_LMS[name]
    torch.manual_seed(0)
    model = make().eval()
    model.save_pretrained(tmp_path / "base")
    folder = all_linear_folder(model, kind, tmp_path / "adapter")
    expected = peft_merged(model, folder)
    before = model.state_dict()
    weight = f"{output}.weight"
    assert torch.equal(expected[weight], before[weight])  # PEFT gives it no layer
    out = tmp_path / "merged.safetensors"
    named = rf"module '{re.escape(output)}' has factors.*'all-linear'.*output layer"
    with pytest.raises(errors.FileFormatError, match=named):
        merge_checkpoint(tmp_path / "base", folder, out)
    assert not out.exists()
    applied = copy.deepcopy(model)
    with pytest.raises(errors.FileFormatError, match=named):
        apply_adapter(applied, folder)
    assert all(torch.equal(applied.state_dict()[k], v) for k, v in before.items())
    drop_module(folder, output)
    merge_checkpoint(tmp_path / "base", folder, out)
    merged = load_file(str(out))
    changed = [k for k, v in expected.items() if not torch.equal(v, before[k])]
    assert changed  # the other linear layers are adapted
    for key in changed:
        assert rel(merged[key], expected[key]) < 1e-6, key
    assert torch.equal(merged[weight], before[weight])


class Plain(nn.Module):
    """No transformers model: a body and a layer named `lm_head`, which PEFT adapts."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.body(x)))


class PlainWithGetter(Plain):
    """A torch model that has a `get_output_embeddings` method, but is no transformers
    `PreTrainedModel`: PEFT leaves nothing out of it."""

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_lm_head_of_a_torch_model_is_adapted_as_peft_does(tmp_path, kind):
    """PEFT's all-linear leaves out only a transformers model's output layer: of a plain
    torch model it adapts `lm_head` too. Applied to that model, or converted and merged
    against it, the folder gives PEFT's merged weights and outputs; a checkpoint that does
    not tell which model it is (no config.json), or no base, is refused naming `lm_head`
    (it would be the output layer of a transformers model), nothing written."""
    torch.manual_seed(0)
    model = Plain().eval()
    theirs = peft.get_peft_model(copy.deepcopy(model), CONFIGS[kind]("all-linear"))
    assert sorted(theirs.targeted_module_names) == ["body", "lm_head"]
    folder = all_linear_folder(model, kind, tmp_path / "adapter")
    expected = peft_merged(model, folder)
    assert not torch.equal(expected["lm_head.weight"], model.lm_head.weight)
    applied = copy.deepcopy(model)
    assert sorted(apply_adapter(applied, folder)) == ["body", "lm_head"]
    for key, value in expected.items():
        assert rel(applied.state_dict()[key], value) < 1e-6, key
    x = torch.randn(5, 8)
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder)
        assert rel(applied(x), loaded(x)) < 1e-5
    checkpoint = save_state(model.state_dict(), tmp_path / "base.safetensors")
    out = tmp_path / "merged.safetensors"
    unknown = r"module 'lm_head' has factors.*'all-linear'.*may be.*tells which model"
    with pytest.raises(errors.FileFormatError, match=unknown):
        merge_checkpoint(checkpoint, folder, out)
    assert not out.exists()
    with pytest.raises(errors.FileFormatError, match=unknown):
        convert_adapter(folder, tmp_path / "kohya.safetensors", "lycoris")
    with pytest.raises(errors.FileFormatError, match=unknown):
        save_adapter(load_adapter(folder), tmp_path / "kohya.safetensors", "lycoris")
    with pytest.raises(errors.FileFormatError, match=unknown):
        combine_adapters([folder, folder], tmp_path / "kohya.safetensors", format="lycoris")
    assert not (tmp_path / "kohya.safetensors").exists()
    save_adapter(load_adapter(folder, base=model), tmp_path / "saved", "peft")
    assert set(load_adapter(tmp_path / "saved").layers) == {"body", "lm_head"}
    convert_adapter(folder, tmp_path / "converted", "peft", base=model)
    assert set(load_adapter(tmp_path / "converted").layers) == {"body", "lm_head"}
    merge_checkpoint(checkpoint, tmp_path / "converted", out)  # its config lists lm_head
    merged = load_file(str(out))
    for key, value in expected.items():
        assert rel(merged[key], value) < 1e-6, key


def test_a_bare_checkpoint_of_a_transformers_model_is_refused_where_its_output_layer_may_be(
    tmp_path,
):
    """Without the config.json that describes it, a checkpoint does not tell which module is
    the output layer: a layer on one some transformers model gives that role
    (`cls.predictions.decoder`), which PEFT skips if the base is that model, is refused by
    name rather than merged."""
    make, output = MASKED_LMS["bert"]
    torch.manual_seed(0)
    model = make().eval()
    folder = all_linear_folder(model, "lora", tmp_path / "adapter")
    checkpoint = save_state(model.state_dict(), tmp_path / "bare.safetensors")
    out = tmp_path / "merged.safetensors"
    with pytest.raises(errors.FileFormatError, match=rf"'{re.escape(output)}'.*may be"):
        merge_checkpoint(checkpoint, folder, out)
    assert not out.exists()


def test_inject_all_linear_adapts_lm_head_of_a_torch_model_with_a_getter_as_peft_does():
    """A `get_output_embeddings` method does not make a model a transformers one: PEFT
    leaves nothing out of it, nor does `inject`."""
    model = PlainWithGetter()
    config = peft.LoraConfig(r=2, target_modules="all-linear")
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    names = inject(model, "all-linear", rank=2)
    assert sorted(names) == sorted(theirs.targeted_module_names) == ["body", "lm_head"]


def test_output_layer_paths_cover_transformers_models():
    """Every module path a transformers model's `get_output_embeddings()` returns as an
    attribute path is one `may_be_output_layer` refuses without a base that tells (an
    embedding table aside, and MusicGen's `lm_heads`, a ModuleList: PEFT leaves out that
    name, and adapts the linear layers in it)."""
    models = Path(transformers.__file__).parent / "models"
    found = set()
    returned = re.compile(r"def get_output_embeddings\(self\).*?\n"
                          r"(?:\s*#.*\n|\s*\"\"\"[\s\S]*?\"\"\"\n)*\s*return self\.([\w.]+)\n")
    for path in models.glob("*/modeling_*.py"):
        found.update(returned.findall(path.read_text(encoding="utf-8")))
    assert {"lm_head", "cls.predictions.decoder", "proj_out", "head", "output"} <= found
    missing = sorted(p for p in found if not may_be_output_layer(p)
                     and not p.endswith("embed_tokens") and p != "lm_heads")  # fmt: skip
    assert missing == []


@pytest.mark.parametrize("architecture", sorted(NAMED_MODELS))
def test_named_models_name_their_output_layer(architecture):
    """`NAMED_MODELS` gives each model's output layer without building it: the module its
    `get_output_embeddings()` returns."""
    model_class = getattr(transformers, architecture)
    with torch.device("meta"):
        model = model_class(model_class.config_class(num_hidden_layers=1))
    output = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is output), None)
    assert NAMED_MODELS[architecture].output == name


class WithConvs(nn.Module):
    """A convolution, a 1×1 convolution and a linear layer: all-linear takes the last only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pointwise = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pointwise(self.conv(x)).mean((2, 3)))


def test_a_peft_loha_on_convolutions_under_all_linear_is_refused_as_peft_skips_it(tmp_path):
    """PEFT's LoHa keeps a convolution's parts flattened, 2-D (`hada_w1_b (r, in·k·k)`), as
    a linear layer's: under all-linear PEFT gives the convolutions no layer and skips their
    keys. Against the model, which tells the convolutions apart, such a folder is refused
    naming the first, the model unchanged; without their keys it applies as PEFT merges."""
    torch.manual_seed(0)
    model = WithConvs().eval()
    theirs = peft.get_peft_model(copy.deepcopy(model), CONFIGS["loha"]("all-linear"))
    assert sorted(theirs.targeted_module_names) == ["fc"]
    folder = all_linear_folder(model, "loha", tmp_path / "adapter", ["conv", "pointwise", "fc"])
    assert load_file(str(folder / "adapter_model.safetensors"))[
        "base_model.model.conv.hada_w1_b"].ndim == 2  # fmt: skip
    expected = peft_merged(model, folder)
    before = model.state_dict()
    applied = copy.deepcopy(model)
    with pytest.raises(errors.FileFormatError, match=r"'conv' has factors.*nn.Linear and Conv1D"):
        apply_adapter(applied, folder)
    assert all(torch.equal(applied.state_dict()[k], v) for k, v in before.items())
    drop_module(folder, "conv")
    with pytest.raises(errors.FileFormatError, match=r"'pointwise' has factors"):
        apply_adapter(applied, folder)
    drop_module(folder, "pointwise")
    assert apply_adapter(applied, folder) == ["fc"]
    for key, value in expected.items():
        assert rel(applied.state_dict()[key], value) < 1e-6, key


def test_a_diffusers_checkpoint_tells_it_has_no_output_layer(tmp_path):
    """A diffusers model is no transformers model: PEFT's all-linear adapts its `proj_out`
    too, and its checkpoint's config.json (`_diffusers_version`) says what model it is, so
    the folder merges as PEFT's `merge_and_unload`, `proj_out` included."""
    pytest.importorskip("diffusers")
    from model_factories import tiny_flux

    model = tiny_flux().eval()
    model.save_pretrained(tmp_path / "base")
    folder = all_linear_folder(model, "lora", tmp_path / "adapter")
    expected = peft_merged(model, folder)
    assert not torch.equal(expected["proj_out.weight"], model.proj_out.weight)
    out = tmp_path / "merged.safetensors"
    merge_checkpoint(tmp_path / "base", folder, out)
    merged = load_file(str(out))
    for key, value in expected.items():
        assert rel(merged[key], value) < 1e-6, key


def test_an_output_layer_named_as_a_suffix_of_another_linear_layer_is_adapted_as_peft_does(
    tmp_path,
):
    """PEFT turns all-linear into the other linear layers' names, which also select a module
    whose name ends in `.<name>`: beside a linear layer named `decoder`, BERT's output layer
    `cls.predictions.decoder` is selected after all. `inject` adapts it, and a folder with
    its factors applies as PEFT merges it."""
    make, output = MASKED_LMS["bert"]
    torch.manual_seed(0)
    model = make().eval()
    model.decoder = nn.Linear(4, 4)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear"))
    assert output in theirs.targeted_module_names
    assert sorted(inject(copy.deepcopy(model), "all-linear", rank=2)) == sorted(
        theirs.targeted_module_names
    )
    folder = all_linear_folder(model, "lora", tmp_path / "adapter")
    expected = peft_merged(model, folder)
    assert not torch.equal(expected[f"{output}.weight"], model.state_dict()[f"{output}.weight"])
    applied = copy.deepcopy(model)
    assert output in apply_adapter(applied, folder)
    for key, value in expected.items():
        torch.testing.assert_close(applied.state_dict()[key], value, rtol=1e-6, atol=1e-6)


def test_a_nested_proj_out_merges_into_a_bare_checkpoint_as_peft_merges_it(tmp_path):
    """Only a whole path `proj_out` (Whisper's, Moonshine's) or a decoder's may be a
    transformers output layer: the `proj_out` of each transformer block of a diffusers model
    (a Flux single block's here) is adapted by PEFT's all-linear, and its folder merges into a
    bare checkpoint, no config.json beside it, as PEFT's `merge_and_unload`."""
    pytest.importorskip("diffusers")
    from model_factories import tiny_flux

    model = tiny_flux().eval()
    model.save_pretrained(tmp_path / "base")
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((tmp_path / "base" / "diffusion_pytorch_model.safetensors").read_bytes())
    folder = all_linear_folder(model, "lora", tmp_path / "adapter")
    expected = peft_merged(model, folder)
    drop_module(folder, "proj_out")  # the root one, which only a config.json tells
    nested = "single_transformer_blocks.0.proj_out.weight"
    assert not torch.equal(expected[nested], model.state_dict()[nested])
    out = tmp_path / "merged.safetensors"
    merge_checkpoint(bare, folder, out)
    merged = load_file(str(out))
    assert torch.equal(merged["proj_out.weight"], model.proj_out.weight)
    for key, value in expected.items():
        if not key.startswith("proj_out."):
            assert rel(merged[key], value) < 1e-6, key


class SuffixNamed(nn.Module):
    """Linear layers `fc` and `inner.proj`, modules of other kinds whose names end in
    `.<one of those names>` (a `Conv2d` `blk.fc`, a `Conv1d` `deep.inner.proj`, an
    `Embedding` `emb.fc`), and a convolution whose name ends in none (`blk.conv`)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.inner = nn.ModuleDict({"proj": nn.Linear(5, 4)})
        self.blk = nn.ModuleDict({"fc": nn.Conv2d(3, 4, 3), "conv": nn.Conv2d(4, 4, 3)})
        self.deep = nn.ModuleDict({"inner": nn.ModuleDict({"proj": nn.Conv1d(4, 6, 3)})})
        self.emb = nn.ModuleDict({"fc": nn.Embedding(10, 4)})


REACHED = ["blk.fc", "deep.inner.proj", "emb.fc", "fc", "inner.proj"]


def test_all_linear_reaches_modules_named_as_a_linear_layers_suffix_as_peft_does(tmp_path):
    """PEFT turns all-linear into the linear layers' names, which it matches as dotted
    suffixes: a convolution or an embedding table named `….fc` beside a linear layer `fc`
    gets a layer too. `inject` adapts what PEFT does, and a folder with their factors loads,
    applies to the model and merges into its checkpoint as PEFT merges it; without a base
    nothing tells whether PEFT reaches them, so a conversion is refused naming one."""
    torch.manual_seed(0)
    model = SuffixNamed()
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear"))
    assert sorted(theirs.targeted_module_names) == REACHED
    assert sorted(inject(copy.deepcopy(model), "all-linear", rank=2)) == REACHED
    folder = all_linear_folder(model, "lora", tmp_path / "adapter", REACHED)
    expected = peft_merged(model, folder)
    before = model.state_dict()
    assert all(not torch.equal(expected[f"{m}.weight"], before[f"{m}.weight"]) for m in REACHED)
    assert sorted(load_adapter(folder).layers) == REACHED
    applied = copy.deepcopy(model)
    assert sorted(apply_adapter(applied, folder)) == REACHED
    out = tmp_path / "merged.safetensors"
    merge_checkpoint(save_state(before, tmp_path / "base.safetensors"), folder, out)
    merged = load_file(str(out))
    for key, value in expected.items():
        assert rel(applied.state_dict()[key], value) < 1e-6, key
        assert rel(merged[key], value) < 1e-6, key
    named = r"module '(blk\.fc|deep\.inner\.proj|emb\.fc)' has .* factors.*no base tells"
    with pytest.raises(errors.FileFormatError, match=named):
        convert_adapter(folder, tmp_path / "k.safetensors", to="kohya")
    assert not (tmp_path / "k.safetensors").exists()


def test_a_convolution_all_linear_does_not_reach_is_refused_as_peft_skips_it(tmp_path):
    """A convolution whose name ends in no linear layer's name (`blk.conv`) gets no layer
    from PEFT's all-linear, its keys skipped: against the model or its checkpoint, a folder
    with its factors is refused naming it, nothing changed or written."""
    torch.manual_seed(0)
    model = SuffixNamed()
    folder = all_linear_folder(model, "lora", tmp_path / "adapter", [*REACHED, "blk.conv"])
    expected = peft_merged(model, folder)
    before = model.state_dict()
    assert torch.equal(expected["blk.conv.weight"], before["blk.conv.weight"])  # PEFT skips it
    named = r"module 'blk\.conv' has factors.*'all-linear'.*ending in none"
    applied = copy.deepcopy(model)
    with pytest.raises(errors.FileFormatError, match=named):
        apply_adapter(applied, folder)
    assert all(torch.equal(applied.state_dict()[k], v) for k, v in before.items())
    out = tmp_path / "merged.safetensors"
    with pytest.raises(errors.FileFormatError, match=named):
        merge_checkpoint(save_state(before, tmp_path / "base.safetensors"), folder, out)
    assert not out.exists()


def test_inject_all_linear_refuses_a_module_reached_by_name_that_takes_no_adapter():
    """A `LayerNorm` named `….fc` beside a linear layer `fc`: PEFT's all-linear reaches it
    and refuses it (ValueError); `inject` refuses it naming it, the model unchanged."""
    model = SuffixNamed()
    model.norm = nn.ModuleDict({"fc": nn.LayerNorm(4)})
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear"))
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(errors.TargetError, match=r"'norm\.fc' \(LayerNorm\).*\('fc'\)"):
        inject(model, "all-linear", rank=2)
    assert {name: type(m) for name, m in model.named_modules()} == before
