"""What kind of module each layer of a base model is, and which weights a checkpoint stores
tied.

A base tells its module types where it is a model, or a checkpoint whose `config.json`
describes a transformers model (built on the meta device, `described_model`) or names one
whose linear layers are transformers `Conv1D`s (GPT-2's, weights stored `(in, out)`); else
names decide. For the models of `NAMED_MODELS`, whose modules' names tell their types, the
model is not built (importing its transformers code alone takes seconds) unless a tie of
their weights is in question. `kinds` sorts layers into `Conv1D`s, embedding tables and
convolutions PEFT's conv LoRA cannot run as the base does; `tied_weights` finds the weights
a checkpoint holds once for several modules.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from ..nn.fit import is_conv1d, output_layer
from ..nn.layers import LowRankAdapter
from ..nn.ties import tied_names
from .checkpoint import Checkpoint
from .files import config_at
from .names import Base

CONV1D_MODELS = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp",
                           "clvp_decoder"})  # fmt: skip
"""transformers `model_type`s that have `Conv1D` layers, with weights stored `(in, out)`
(transformers 5.24)."""
CONV1D_NAMES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
"""The names every `Conv1D` of those models has (attention and MLP of their GPT-2 blocks;
their heads, embeddings and CLVP's attention projections are `nn.Linear`)."""

# The last name part of modules whose 2-D weight is an embedding table (`nn.Embedding`) in
# common models: GPT-2 (wte, wpe), T5 (shared, relative_attention_bias), BERT
# (word_embeddings, …), CLIP (token_embedding, position_embedding), LLaMA / OPT
# (embed_tokens, embed_positions), GPT-NeoX (embed_in), minGPT (tok_emb, pos_emb), UNets
# (class_embedding, label_emb).
_EMBEDDING_NAME = re.compile(
    r"wte|wpe|shared|relative_attention_bias|embed_(?:tokens|positions|in)"
    r"|(?:(?:tok|token|word|pos|position|token_type|segment|class|label)_)?"
    r"(?:emb|embed|embeds|embedding|embeddings)"
)


@dataclass(frozen=True)
class NamedModel:
    """A transformers model class every module of which, whatever its config, has the type
    its name tells (`kinds` by names: `Conv1D`s by `CONV1D_NAMES` where `model_type` is one
    of `CONV1D_MODELS`, embedding tables by `_EMBEDDING_NAME`, no convolution), and whose
    only tie is that of the weights of the modules `tied` (module paths in the model: the
    input embedding and the LM head), made where its config's `tie_word_embeddings`
    (default `tie_default`) is true; `output` is the path of its output layer
    (`get_output_embeddings()`), if it has one."""

    model_type: str
    tied: tuple[str, ...] = ()
    tie_default: bool = False
    output: str | None = None


_DECODER_HEAD = ("model.embed_tokens", "lm_head")
NAMED_MODELS = {
    "LlamaForCausalLM": NamedModel("llama", _DECODER_HEAD, output="lm_head"),
    "LlamaModel": NamedModel("llama"),
    "MistralForCausalLM": NamedModel("mistral", _DECODER_HEAD, output="lm_head"),
    "MistralModel": NamedModel("mistral"),
    "Qwen2ForCausalLM": NamedModel("qwen2", _DECODER_HEAD, output="lm_head"),
    "Qwen2Model": NamedModel("qwen2"),
    "Qwen3ForCausalLM": NamedModel("qwen3", _DECODER_HEAD, output="lm_head"),
    "Qwen3Model": NamedModel("qwen3"),
    "GPT2LMHeadModel": NamedModel(
        "gpt2", ("transformer.wte", "lm_head"), tie_default=True, output="lm_head"
    ),
    "GPT2Model": NamedModel("gpt2", tie_default=True),
}
"""transformers model classes (`architectures`) whose module types their names tell
(`NamedModel`), as transformers 5 builds them (`NAMED_VERSION`)."""
NAMED_VERSION = "5"
"""The major version of transformers whose models `NAMED_MODELS` describes; with another,
the model is built."""


def embedding_key(key: str, shape: Sequence[int]) -> bool:
    """Whether checkpoint weight `key` of `shape` looks like an embedding table by its
    module's name (`_EMBEDDING_NAME`)."""
    module = key.removesuffix(".weight").rpartition(".")[2]
    return len(shape) == 2 and _EMBEDDING_NAME.fullmatch(module) is not None


def conv1d_model(checkpoint: Checkpoint) -> str | None:
    """The `model_type` of the transformers `config.json` beside `checkpoint` when it names
    a model of `Conv1D` layers (`CONV1D_MODELS`), else None."""
    model_type = (config_at(checkpoint.path.parent / "config.json") or {}).get("model_type")
    return model_type if isinstance(model_type, str) and model_type in CONV1D_MODELS else None


@functools.lru_cache(maxsize=1)
def _transformers_major() -> str | None:
    """The major version of the installed transformers (from its metadata, not imported), or
    None where it is not installed."""
    try:
        return importlib.metadata.version("transformers").partition(".")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def named_model(checkpoint: Checkpoint) -> tuple[NamedModel, dict] | None:
    """The `NAMED_MODELS` entry of the model the `config.json` beside `checkpoint` describes
    (its first `architectures` entry, with that entry's `model_type`) and the config, where
    the installed transformers is the version the table describes; else None."""
    if _transformers_major() != NAMED_VERSION:
        return None
    config = config_at(checkpoint.path.parent / "config.json")
    architectures = (config or {}).get("architectures")
    if not isinstance(architectures, list) or not architectures:
        return None
    named = NAMED_MODELS.get(str(architectures[0]))
    if named is None or config.get("model_type") != named.model_type:
        return None
    return named, config


def _names_tell(checkpoint: Checkpoint, shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether the names of `shapes` (`{layer: ΔW shape}`) give the `kinds` the model the
    `config.json` beside `checkpoint` describes would: a `NAMED_MODELS` model, and every
    layer named as a table or a `Conv1D` 2-D (a module of that type is one whatever its
    shape, a name only on a 2-D weight)."""
    found = named_model(checkpoint)
    if found is None:
        return False
    conv1d = found[0].model_type in CONV1D_MODELS
    for name, shape in shapes.items():
        last = name.rpartition(".")[2]
        typed = _EMBEDDING_NAME.fullmatch(last) or (conv1d and last in CONV1D_NAMES)
        if typed and len(shape) != 2:
            return False
    return True


def _untied(checkpoint: Checkpoint, modules: Sequence[str]) -> bool:
    """Whether the model the `config.json` beside `checkpoint` describes ties none of the
    weights of `modules` (names in the model, or without its head's prefix), known without
    building it: a `NAMED_MODELS` model whose config unties its embedding
    (`tie_word_embeddings` false, or absent where that is the default), or none of whose
    `tied` modules `modules` may name (a tie needs the model built: where it cannot be,
    there is none)."""
    found = named_model(checkpoint)
    if found is None:
        return False
    named, config = found
    if config.get("tie_word_embeddings", named.tie_default) is False:
        return True
    return not any(tied == name or tied.endswith(f".{name}")
                   for tied in named.tied for name in modules)  # fmt: skip


def described_model(checkpoint: Checkpoint) -> nn.Module | None:
    """The transformers model the `config.json` beside `checkpoint` describes (its first
    `architectures` entry, a class transformers itself defines: no code from the folder),
    built on the meta device, so no weights; None where transformers is not installed, the
    file names no such class, or building it fails (then names decide, `kinds`), which it
    does once it has more submodules than `checkpoint` could hold weights for
    (`_module_budget`). Built once per file as it stands."""
    path = checkpoint.path.parent / "config.json"
    try:
        found = path.stat()
    except OSError:
        return None
    budget = _MODULES_PER_TENSOR * len(checkpoint.infos) + _MODULES_FLOOR
    return _built(str(path), found.st_mtime_ns, found.st_size, budget)


def tied_weights(checkpoint: Checkpoint, modules: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The other names of the weight of each module of `modules` (`<module>.weight` keys of
    `checkpoint`) where the checkpoint tells of them, each with how: parameters tied to it
    in the transformers model its `config.json` describes (`described_model`; an LM head
    tied to the embedding, whose tensor such a checkpoint omits; a checkpoint of the bare
    model names its modules without the head model's prefix), and keys its metadata records
    as dropped copies of it (`{dropped: kept}`, as safetensors' `save_model` writes). Modules
    whose weight has no other name are left out; a file without such a config or metadata
    tells of no tie. The model is not built where its config shows it ties none of
    `modules` (`_untied`)."""
    model = None if _untied(checkpoint, modules) else described_model(checkpoint)
    named = dict(model.named_modules(remove_duplicate=False)) if model is not None else {}
    prefix = getattr(model, "base_model_prefix", "")
    copies: dict[str, list[str]] = {}
    for metadata in checkpoint.metadata.values():
        for dropped, kept in metadata.items():
            if kept in checkpoint.infos and dropped not in checkpoint.infos:
                copies.setdefault(kept, []).append(dropped)
    found_modules = {}
    for name in modules:
        module = named.get(name)
        if module is None and prefix:
            module = named.get(f"{prefix}.{name}")
        if module is not None:
            found_modules[name] = module
    # one pass over the model's parameters for every module (a pass each grows as n²)
    described = f"tied in the {type(model).__name__} that config.json describes"
    model_ties = dict(zip(found_modules, tied_names(model, list(found_modules.values())),
                          strict=True)) if found_modules else {}  # fmt: skip
    found = {}
    for name in modules:
        ties = [f"{tie} ({described})" for tie in model_ties.get(name, ())]
        ties += [f"{copy} (the file's metadata records it as that tensor)"
                 for copy in copies.get(f"{name}.weight", ())]  # fmt: skip
        if ties:
            found[name] = tuple(ties)
    return found


def omitted_ties(base: Base, module: str) -> tuple[str, ...]:
    """Where `base` is a checkpoint (a path or `Checkpoint`) that has no `<module>.weight`,
    the tensors it stores that weight as, with how it tells of the tie (`tied_weights`: an
    LM head tied to the embedding, which transformers omits); else `()`."""
    if isinstance(base, (str, os.PathLike)):
        base = Checkpoint(base)
    if not isinstance(base, Checkpoint) or f"{module}.weight" in base.infos:
        return ()
    return tied_weights(base, [module]).get(module, ())


_MODULES_PER_TENSOR = 8
_MODULES_FLOOR = 1024
"""A transformers model has about as many submodules as tensors in its checkpoint (1.1 to
1.5 per tensor for GPT-2 and Llama): a config.json that asks for far more than its
checkpoint's tensors allow (`num_hidden_layers: 1000000`, which would take an hour and tens
of GiB to build, even on the meta device) describes another model, and is not built past
`_MODULES_PER_TENSOR` submodules per tensor plus `_MODULES_FLOOR`."""


class _OverBudget(Exception):
    """A model being built registered more submodules than `_module_budget` allows."""


_BUDGET = threading.local()
"""This thread's `_module_budget`: `limit` and `count`, or no `limit` outside one."""


def _count_one(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    """The registration hook of every `_module_budget`: counts this thread's submodules."""
    limit = getattr(_BUDGET, "limit", None)
    if limit is not None:
        _BUDGET.count += 1
        if _BUDGET.count > limit:
            raise _OverBudget(f"more than {limit} submodules")


_HOOK_LOCK = threading.Lock()
_HOOKED: list[object] = []


def _budget_hook() -> None:
    """Register `_count_one` once for the process and keep it: adding and removing a global
    hook per build would change torch's hook table while another thread iterates over it
    (registered under a lock, so that two first builds do not register it twice)."""
    with _HOOK_LOCK:
        if not _HOOKED:
            _HOOKED.append(register_module_module_registration_hook(_count_one))


@contextmanager
def _module_budget(limit: int) -> Iterator[None]:
    """Raise `_OverBudget` in this thread once the modules built in the block have registered
    more than `limit` submodules (other threads' modules are not counted)."""
    _budget_hook()
    _BUDGET.limit, _BUDGET.count = limit, 0
    try:
        yield
    finally:
        _BUDGET.limit = None


_LAYER_COUNT = re.compile(r"(num|n)_\w*layers?|(encoder|decoder)_layers")
"""Config keys that count a model's layers (`num_hidden_layers`, `n_layer`,
`decoder_layers`): its modules grow with them. Expert counts do not (experts are often
stacked in one tensor), nor sizes that merely mention layers (`vocab_size_per_layer_input`)."""


def _asks_for_more(settings: object, limit: int) -> bool:
    """Whether a config's settings ask for more than `limit` layers (an int under a key
    counting them, `_LAYER_COUNT`) or hold a list longer than `limit` (per-layer settings
    such as `layer_types`), anywhere in the nested settings (walked without recursion, so
    any depth JSON parses is fine). Parsing such a config already takes time and memory in
    proportion (a million `layer_types` checked one by one), before any module is built."""
    pending = [settings]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                number = isinstance(item, int) and not isinstance(item, bool)
                if number and item > limit and _LAYER_COUNT.fullmatch(str(key)):
                    return True
                pending.append(item)
        elif isinstance(value, list):
            if len(value) > limit:
                return True
            pending.extend(value)
    return False


@functools.lru_cache(maxsize=8)
def _built(path: str, mtime_ns: int, size: int, budget: int) -> nn.Module | None:
    """`described_model` of the config at `path` (its modification time and size key the
    cache), built with at most `budget` submodules. A config that names a pretrained
    backbone by repository id is not built, since transformers would look it up online; one
    asking for an attention implementation gets the default, which needs no extra
    package."""
    del mtime_ns, size
    config = config_at(path)
    architectures = (config or {}).get("architectures")
    if not isinstance(architectures, list) or not architectures:
        return None
    if config.get("backbone") and not config.get("backbone_config"):
        return None
    settings = {k: v for k, v in config.items() if k not in _RUNTIME_KEYS}
    if _asks_for_more(settings, budget) or importlib.util.find_spec("transformers") is None:
        return None
    import transformers

    model_class = getattr(transformers, str(architectures[0]), None)  # imports its module
    config_class = getattr(model_class, "config_class", None)
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)) or not (
        isinstance(config_class, type)
    ):
        return None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), torch.device("meta"), _module_budget(budget):
            warnings.simplefilter("ignore")
            return model_class(config_class.from_dict(settings))
    except Exception:  # any failure (_OverBudget too) leaves the module types unknown: names decide
        return None
    finally:
        transformers.logging.set_verbosity(verbosity)


_RUNTIME_KEYS = frozenset({"attn_implementation", "_attn_implementation"})
"""Config keys that choose how a model runs, not what modules it has."""


PADDED = "a convolution padded by"
"""How `peft_conv_mismatch` begins its reason for a convolution padded other than with zeros."""


def peft_conv_mismatch(module: nn.Module) -> str | None:
    """Why PEFT's conv LoRA (a `lora_A` convolution with the base's kernel, stride and
    padding, then a 1×1 `lora_B`) cannot run the update of convolution `module` as the
    module applies it, or None: grouped (cannot load), dilated or padded other than with
    zeros (its unmerged output is not that of its merged weight)."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return None
    if module.groups > 1:
        return (
            f"a grouped convolution (groups={module.groups}): PEFT gives it a lora_A over all "
            "input channels and a grouped lora_B, which cannot load factors of its "
            "(out, in/groups, *k) weight"
        )
    if any(d > 1 and k > 1 for d, k in zip(module.dilation, module.kernel_size, strict=True)):
        return (
            f"a dilated convolution (dilation={tuple(module.dilation)}): PEFT runs its lora_A "
            "undilated, so the adapted layer fails or differs from its merged weight"
        )
    if isinstance(module.padding, str):  # "same" pads where a kernel is wider than 1
        padded = module.padding == "same" and any(k > 1 for k in module.kernel_size)
    else:
        padded = any(module.padding)
    if module.padding_mode != "zeros" and padded:
        return (
            f"{PADDED} {module.padding_mode!r}: PEFT pads its lora_A with zeros, so the "
            "adapted layer's output differs from its merged weight's"
        )
    return None


@dataclass(frozen=True)
class Kinds:
    """Layers (module names) whose update a module LoRA of PEFT or diffusers cannot hold as
    lowrank stores it: transformers `Conv1D`s, embedding tables, and convolutions PEFT
    cannot run as they are (`convs`: `(name, why)` pairs, `peft_conv_mismatch`)."""

    conv1d: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    convs: tuple[tuple[str, str], ...] = ()


def kinds(shapes: Mapping[str, Sequence[int]], base: Base | Mapping[str, Base] | None) -> Kinds:
    """The layers of `shapes` (`{layer: ΔW shape}`) that are `Conv1D`s, embedding tables or
    convolutions PEFT cannot run (`peft_conv_mismatch`): by module type where `base` is a
    model or a checkpoint whose `config.json` describes a transformers model
    (`described_model`; not built where it is a `NAMED_MODELS` model and the layers' shapes
    let names tell the same, `_names_tell`); else (and for layers that model lacks) the 2-D
    layers named as `Conv1D`s are (`CONV1D_NAMES`) of a checkpoint whose `config.json` names
    a `Conv1D` model (`CONV1D_MODELS`), and 2-D layers named like tables (`embedding_key`).
    Without a base, tables by name alone. A `lowrank.nn` adapter in the model stands for its
    base layer."""
    if isinstance(base, (str, os.PathLike)):
        base = Checkpoint(base)  # a file, an index or a folder: the file it names
    model = base if isinstance(base, nn.Module) else None
    if isinstance(base, Checkpoint) and not _names_tell(base, shapes):
        model = described_model(base)
    modules = dict(model.named_modules(remove_duplicate=False)) if model is not None else {}
    prefix = getattr(model, "base_model_prefix", "") if isinstance(base, Checkpoint) else ""
    transposed = isinstance(base, Checkpoint) and conv1d_model(base)
    conv1d, tables, convs = [], [], []
    for name, shape in shapes.items():
        # a checkpoint of the bare model names its modules without the head model's prefix
        module = modules.get(name)
        if module is None and prefix:
            module = modules.get(f"{prefix}.{name}")
        if isinstance(module, LowRankAdapter):  # a model holding lowrank.nn adapters
            module = module.base
        if module is not None:
            if is_conv1d(module):
                conv1d.append(name)
            elif isinstance(module, nn.Embedding):
                tables.append(name)
            elif why := peft_conv_mismatch(module):
                convs.append((name, why))
        elif isinstance(base, nn.Module):
            continue
        elif embedding_key(name, shape):
            tables.append(name)
        elif transposed and len(shape) == 2 and name.rpartition(".")[2] in CONV1D_NAMES:
            conv1d.append(name)
    return Kinds(tuple(conv1d), tuple(tables), tuple(convs))


OUTPUT_PATHS = frozenset({
    "lm_head", "cls.predictions.decoder", "lm_head.decoder", "decoder.proj_out",
    "generator_lm_head", "predictions.decoder", "pred_layer.proj", "output_projection",
    "mlm_score.decoder", "lm_head.out_proj", "vocab_projector", "lm_loss", "head.decoder",
    "embed_out",
})
"""Module paths, matched as dotted suffixes, that transformers 5.24's models return from
`get_output_embeddings()` (`lm_head` by default; BERT's `cls.predictions.decoder`, RoBERTa's
`lm_head.decoder`, Whisper's `proj_out`, …; a composite model's are its part's, such as
`decoder.lm_head`), with `OUTPUT_ROOTS`, which are output layers only as a whole path."""
OUTPUT_ROOTS = frozenset({"decoder", "head", "output", "proj_out"})
"""Output layer paths too common as parts of other names to match as suffixes (InternLM2's
`output`; Whisper's `proj_out`, a name every transformer block of a diffusers UNet or DiT
gives a linear layer too, matched as a suffix only as a decoder's, `decoder.proj_out`)."""


def may_be_output_layer(module: str) -> bool:
    """Whether `module` (a module path) is a path some transformers model gives its output
    layer (`OUTPUT_PATHS`, `OUTPUT_ROOTS`)."""
    return module in OUTPUT_ROOTS or any(
        module == path or module.endswith(f".{path}") for path in OUTPUT_PATHS
    )


def base_output_layer(base: Base | None) -> tuple[str | None, str] | None:
    """`(path, model)` of the output layer PEFT's `"all-linear"` leaves out of `base`
    (`fit.output_layer`: a transformers model's `get_output_embeddings()`; `path` None where
    it has none, as any other `nn.Module`), `model` naming the model class; None where
    `base` does not tell: no base, a `{module: shape}` dict, or a checkpoint whose
    `config.json` describes neither a transformers model (by `NAMED_MODELS`, else
    `described_model`) nor a diffusers one (`_diffusers_version`: no output layer)."""
    if isinstance(base, nn.Module):
        found = output_layer(base)
        return (found[0] if found else None), type(base).__name__
    if isinstance(base, (str, os.PathLike)):
        base = Checkpoint(base)
    if not isinstance(base, Checkpoint):
        return None
    config = config_at(base.path.parent / "config.json") or {}
    if "_diffusers_version" in config:  # a diffusers model, no transformers one
        return None, str(config.get("_class_name", "a diffusers model"))
    named = named_model(base)
    if named is not None:
        return named[0].output, str(named[1]["architectures"][0])
    model = described_model(base)
    if model is None:
        return None
    found = output_layer(model)
    return (found[0] if found else None), type(model).__name__


def tells_module_types(base: Base | None) -> bool:
    """Whether `base` tells which of its modules are transformers `Conv1D`s (`kinds`): a
    model, or a checkpoint whose `config.json` describes a transformers model or names a
    `Conv1D` model; not a bare `.safetensors` file, a `{module: shape}` dict or no base."""
    if isinstance(base, nn.Module):
        return True
    if isinstance(base, (str, os.PathLike)):
        base = Checkpoint(base)
    if not isinstance(base, Checkpoint):
        return False
    return conv1d_model(base) is not None or described_model(base) is not None
