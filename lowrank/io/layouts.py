"""Layers whose update a PEFT file must hold as a parameter target.

PEFT reads the module LoRA of a transformers `Conv1D` (GPT-2's layers, weights stored
`(in, out)`) transposed, and that of an `nn.Embedding` from other keys than `lora_A` /
`lora_B`. A layer named in `target_parameters` instead has its ΔW added to the weight as it
is stored, whatever its module: such layers go into PEFT files that way, into kohya and
LyCORIS files as they are, and not into diffusers files, whose loader takes module LoRAs only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

from torch import nn

from ..errors import ConversionError
from ..nn.layers import is_conv1d
from .adapter import Adapter
from .checkpoint import Checkpoint
from .formats import TRAITS
from .names import Base

CONV1D_MODELS = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp",
                           "clvp_decoder"})  # fmt: skip
"""transformers `model_type`s whose linear layers are `Conv1D`, with weights stored
`(in, out)` (transformers 5.24)."""

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


def embedding_key(key: str, shape: Sequence[int]) -> bool:
    """Whether checkpoint weight `key` of `shape` looks like an embedding table by its
    module's name (`_EMBEDDING_NAME`)."""
    module = key.removesuffix(".weight").rpartition(".")[2]
    return len(shape) == 2 and _EMBEDDING_NAME.fullmatch(module) is not None


def _model_config(checkpoint: Checkpoint) -> dict:
    """The transformers `config.json` beside `checkpoint`, or `{}`."""
    try:
        config = json.loads((checkpoint.path.parent / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def conv1d_model(checkpoint: Checkpoint) -> str | None:
    """The `model_type` of the `config.json` beside `checkpoint` when it names a model of
    `Conv1D` layers (`CONV1D_MODELS`), else None."""
    model_type = _model_config(checkpoint).get("model_type")
    return model_type if model_type in CONV1D_MODELS else None


def require_untied(checkpoint: Checkpoint, tables: Mapping[str, Sequence[int]]) -> None:
    """`ConversionError` naming the first of `tables` (`{key: shape}`) that is the token
    table a transformers model ties to its output layer (`tie_word_embeddings`, true unless
    its `config.json` says otherwise; `vocab_size` rows): a PEFT parameter target on it
    changes the lookup only, where merging it changes the output layer too."""
    config = _model_config(checkpoint)
    if not config or not config.get("tie_word_embeddings", True):
        return
    for key, shape in tables.items():
        if shape[0] == config.get("vocab_size"):
            raise ConversionError(
                f"{key} is tied to the output layer (tie_word_embeddings in "
                f"{checkpoint.path.parent / 'config.json'}): a PEFT folder's update of it "
                "would change the lookup alone, where a merge changes both; write kohya or "
                "lycoris (merged exactly), or leave it out of targets"
            )


def parameter_targets(
    shapes: Mapping[str, Sequence[int]], base: Base | Mapping[str, Base]
) -> tuple[str, ...]:
    """`<layer>.weight` of each layer of `shapes` (`{layer: ΔW shape}`) whose weight PEFT must
    take as a parameter target: by its module's type where `base` is a model (`Conv1D`,
    `nn.Embedding`); else every 2-D layer of a checkpoint whose `config.json` names a
    `Conv1D` model, and 2-D layers named like embedding tables."""
    if isinstance(base, nn.Module):
        modules = dict(base.named_modules())
        kinds = {name: modules.get(name) for name in shapes}
        chosen = [name for name, module in kinds.items()
                  if is_conv1d(module) or isinstance(module, nn.Embedding)]  # fmt: skip
    else:
        path = base.path if isinstance(base, Checkpoint) else base
        transposed = isinstance(path, (str, os.PathLike)) and conv1d_model(Checkpoint(path))
        chosen = [name for name, shape in shapes.items()
                  if len(shape) == 2 and (transposed or embedding_key(name, shape))]  # fmt: skip
    return tuple(f"{name}.weight" for name in chosen)


def require_module_layout(targets: Sequence[str], fmt: str, where: object) -> None:
    """`ConversionError` when `fmt` is diffusers and `targets` (`parameter_targets`) is not
    empty: its loader would read those layers as module LoRAs."""
    if targets and TRAITS[fmt].module_lora_only:
        raise ConversionError(
            f"{where}: {targets[0].removesuffix('.weight')!r} ({len(targets)} such layers) is "
            "a transformers Conv1D (weight stored (in, out)) or an embedding table, whose "
            "update a diffusers file cannot hold (its loader would read it transposed or "
            "from other keys); write peft (as target_parameters), kohya or lycoris"
        )


def _module_path(adapter: Adapter, name: str) -> str:
    """Layer `name` of `adapter` without its pipeline component (`unet.`), as PEFT names it."""
    component, _, rest = name.partition(".")
    return rest if rest and component in adapter.components else name


def with_layouts(adapter: Adapter, base: Base | Mapping[str, Base] | None, fmt: str) -> Adapter:
    """`adapter` ready to be written as `fmt`: its parameter targets (its own and, with a
    `base`, `parameter_targets` of its layers), which PEFT configs and lowrank's kohya and
    LyCORIS metadata keep, refused for diffusers (`require_module_layout`)."""
    shapes = {_module_path(adapter, name): tuple(form.shape) for name, form in adapter.items()}
    found = parameter_targets(shapes, base) if base is not None else ()
    targets = tuple(sorted({*adapter.target_parameters, *found}))
    require_module_layout(targets, fmt, adapter.source or "the adapter")
    return replace(adapter, target_parameters=targets)
