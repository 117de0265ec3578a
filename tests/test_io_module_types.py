"""Module types of a checkpoint whose `config.json` names a transformers model: for the models
of `NAMED_MODELS` the names tell them, without the model being built (importing its
transformers code took 5–8 s and ~220 MiB of a `lowrank merge` of a Llama); the answers
are those of the built model, and anything the table does not settle builds it."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from io_helpers import randomize, rel
from safetensors.torch import load_file, save_file

from lowrank.io import merge_checkpoint
from lowrank.io import module_types as mt
from lowrank.io.checkpoint import Checkpoint
from lowrank.io.names import module_shapes
from lowrank.nn.ties import tied_names

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "llama": {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 40},
    "gpt2": {"n_embd": 16, "n_layer": 2, "n_head": 2, "vocab_size": 40, "n_positions": 16},
}  # fmt: skip
TINY["mistral"] = TINY["qwen2"] = TINY["llama"]
TINY["qwen3"] = {**TINY["llama"], "head_dim": 8}
CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
           "qwen3": "Qwen3Config", "gpt2": "GPT2Config", "bert": "BertConfig"}  # fmt: skip
ABSENT = "absent"
"""A `tie_word_embeddings` setting: the key left out of config.json (the class's default)."""
# (class, its config's settings beyond TINY): every NAMED_MODELS class, tied, untied and
# with the default, and the options that add modules (biases, GPT-2's cross-attention)
VARIANTS = [
    *((arch, {"tie_word_embeddings": tie}) for arch in mt.NAMED_MODELS
      for tie in (True, False, ABSENT)),
    ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    ("GPT2LMHeadModel", {"add_cross_attention": True}),
    ("GPT2Model", {"add_cross_attention": True}),
]  # fmt: skip


def described(folder: Path, arch: str, **settings) -> tuple[torch.nn.Module, Checkpoint]:
    """`arch` from a tiny config with `settings`, built on the meta device by transformers,
    and a checkpoint in `folder` with that config.json beside it (one tensor: the module
    types asked here are passed as shapes)."""
    transformers = pytest.importorskip("transformers")
    named = mt.NAMED_MODELS.get(arch)
    model_type = named.model_type if named else settings.pop("model_type")
    config_class = getattr(transformers, CONFIGS[model_type])
    absent = settings.get("tie_word_embeddings") == ABSENT
    settings = {**TINY.get(model_type, {}), **settings}
    if absent:
        del settings["tie_word_embeddings"]
    config = config_class(**settings)
    config.architectures = [arch]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, arch)(config)
    folder.mkdir(exist_ok=True)
    stated = config.to_dict()
    if absent:
        stated.pop("tie_word_embeddings", None)
    (folder / "config.json").write_text(json.dumps(stated))
    save_file({"x.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    return model, Checkpoint(folder / "model.safetensors")


def built_today(monkeypatch) -> list[str]:
    """Make module types come from the built model as before `NAMED_MODELS` (no entry
    found); returns the list each build appends its config's path to."""
    calls: list[str] = []
    built = mt._built

    def counted(path, *rest):
        calls.append(path)
        return built(path, *rest)

    monkeypatch.setattr(mt, "_built", counted)
    return calls


def no_build(monkeypatch) -> None:
    def refuse(*_):
        raise AssertionError("the model was built")

    monkeypatch.setattr(mt, "_built", refuse)


def test_every_named_model_is_checked_against_its_transformers_class():
    """The variants below build every class of the table, with the transformers the table
    describes; each entry's `model_type` and default tie are its config class's."""
    transformers = pytest.importorskip("transformers")
    assert {arch for arch, _ in VARIANTS} == set(mt.NAMED_MODELS)
    assert transformers.__version__.partition(".")[0] == mt.NAMED_VERSION
    for arch, named in mt.NAMED_MODELS.items():
        config_class = getattr(transformers, CONFIGS[named.model_type])
        assert config_class.model_type == named.model_type, arch
        assert config_class().tie_word_embeddings is named.tie_default, arch


@pytest.mark.parametrize(("arch", "settings"), VARIANTS)
def test_a_named_model_s_module_types_come_without_building_it(
    tmp_path, monkeypatch, arch, settings
):
    """Every module with a weight of the model transformers builds: `kinds` against its
    checkpoint is what the model's own module types give, and the weights it ties are
    those `tied_weights` names, without the model being built unless a tied module is
    asked about under a config that ties it."""
    model, checkpoint = described(tmp_path, arch, **settings)
    shapes = module_shapes(model)
    # with and without the head model's prefix, as a checkpoint of the bare model names them
    bare = {name.partition(".")[2]: shape for name, shape in shapes.items()}
    with monkeypatch.context() as today:  # no table: the model is built
        today.setattr(mt, "named_model", lambda _: None)
        expected = [mt.kinds(layers, checkpoint) for layers in (shapes, bare)]
        expected_ties = mt.tied_weights(checkpoint, list(shapes))
        assert mt.described_model(checkpoint) is not None
    assert expected[0] == mt.kinds(shapes, model)  # the model's own module types
    assert type(model).config_class.__name__ == CONFIGS[mt.NAMED_MODELS[arch].model_type]
    named = dict(model.named_modules(remove_duplicate=False))
    ties = dict(zip(shapes, tied_names(model, [named[n] for n in shapes]), strict=True))
    tied = {name for name, found in ties.items() if found}
    assert tied <= set(mt.NAMED_MODELS[arch].tied) and expected_ties.keys() == tied
    tables = [name.rpartition(".")[2] for name in expected[0].tables]
    if arch.startswith("GPT2"):
        assert tables == ["wte", "wpe"]
        assert {n.rpartition(".")[2] for n in expected[0].conv1d} >= {"c_attn", "c_proj", "c_fc"}
    else:
        assert tables == ["embed_tokens"] and not expected[0].conv1d
    no_build(monkeypatch)
    assert [mt.kinds(layers, checkpoint) for layers in (shapes, bare)] == expected
    untied = [name for name in shapes if name not in mt.NAMED_MODELS[arch].tied]
    assert mt.tied_weights(checkpoint, untied) == {}
    if not tied:
        assert mt.tied_weights(checkpoint, list(shapes)) == {}
    if arch.startswith("GPT2"):  # its model_type tells that it has Conv1Ds
        assert mt.tells_module_types(checkpoint)


@pytest.mark.parametrize(
    "case", ["other class", "other model_type", "other transformers", "3-D table", "tie asked"]
)
def test_what_the_table_does_not_settle_is_told_by_the_built_model(tmp_path, monkeypatch, case):
    """A class the table lacks, a config.json whose `model_type` is not its class's, another
    major version of transformers, a layer named as a table that is not 2-D (the model's
    `nn.Embedding` is a table whatever the checkpoint's shape; a name is one only in 2-D),
    or a tied module asked about under a config that ties it: the model is built, and the
    answer is its own."""
    settings = {"tie_word_embeddings": True}
    arch = "BertForSequenceClassification" if case == "other class" else "LlamaForCausalLM"
    if case == "other class":
        settings = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "intermediate_size": 24,
                    "vocab_size": 40}  # fmt: skip
    model, checkpoint = described(tmp_path, arch, **settings)
    shapes = module_shapes(model)
    if case == "other model_type":
        stated = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**stated, "model_type": "mistral"}))
    if case == "other transformers":
        monkeypatch.setattr(mt, "_transformers_major", lambda: "4")
    if case == "3-D table":
        shapes = {"model.embed_tokens": (40, 16, 1), "model.layers.0.mlp.up_proj": (24, 16)}
    calls = built_today(monkeypatch)
    if case == "tie asked":
        found = mt.tied_weights(checkpoint, ["lm_head", "embed_tokens"])
        described_as = "(tied in the LlamaForCausalLM that config.json describes)"
        assert found == {"lm_head": (f"model.embed_tokens.weight {described_as}",),
                         "embed_tokens": (f"lm_head.weight {described_as}",)}  # fmt: skip
    else:
        assert mt.kinds(shapes, checkpoint) == mt.kinds(shapes, model)
    assert calls


def peft_folder(tmp_path: Path, base: torch.nn.Module, targets: list[str], **settings) -> Path:
    """PEFT's LoRA on `targets` of `base` with random factors, saved by PEFT (no base
    weights) to `tmp_path / "peft"`."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets, **settings)
    adapted = peft.get_peft_model(copy.deepcopy(base), lora)
    for name, module in adapted.named_modules():
        if name.endswith(("lora_A", "lora_B")):
            randomize(module, len(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    return tmp_path / "peft"


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel"])
@pytest.mark.parametrize("tied", [True, False])
def test_a_merge_into_a_named_model_builds_nothing_and_equals_peft_s(
    tmp_path, monkeypatch, arch, tied
):
    """`merge_checkpoint` of PEFT's LoRA into a tiny Llama's or GPT-2's `save_pretrained`
    folder (GPT-2's `Conv1D` layers, run transposed by PEFT; tied or untied embeddings,
    the adapter off them) builds no model and gives PEFT's `merge_and_unload` weights."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model_type = mt.NAMED_MODELS[arch].model_type
    config = getattr(transformers, CONFIGS[model_type])(**TINY[model_type],
                                                         tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(0)
    base = getattr(transformers, arch)(config).eval()
    base.save_pretrained(tmp_path / "base")
    if model_type == "gpt2":
        folder = peft_folder(tmp_path, base, ["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    else:
        folder = peft_folder(tmp_path, base, ["q_proj", "v_proj", "o_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    reference = reference.merge_and_unload().state_dict()
    no_build(monkeypatch)
    out = tmp_path / "merged.safetensors"
    report = merge_checkpoint(tmp_path / "base", folder, out)
    merged = load_file(str(out))
    assert report["merged_tensors"] == 2 * 4
    assert merged.keys() <= reference.keys()
    for key, value in merged.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-6, atol=1e-7, msg=key)
    changed = [k for k, v in merged.items() if rel(v, base.state_dict()[k]) > 1e-3]
    assert len(changed) == report["merged_tensors"]


def test_lowrank_merge_of_a_llama_does_not_import_transformers_models(tmp_path):
    """The CLI's merge of a Llama `save_pretrained` folder imports no transformers model
    code (the import was most of the time it spent on the config)."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**TINY["llama"], tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    folder = peft_folder(tmp_path, base, ["q_proj", "v_proj"])
    out = tmp_path / "merged.safetensors"
    script = (
        "import sys\nfrom lowrank import cli\n"
        f"status = cli.main(['merge', {str(tmp_path / 'base')!r}, {str(folder)!r}, '-o', "
        f"{str(out)!r}])\n"
        "print(status, sorted(m for m in sys.modules if m.startswith('transformers.')))"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120, check=True)  # fmt: skip
    assert done.stdout.split("\n")[-2] == "0 []", done.stdout + done.stderr
    assert out.exists()
