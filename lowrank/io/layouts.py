"""Layers whose update a PEFT file cannot hold as a module LoRA.

PEFT reads the module LoRA of a transformers `Conv1D` (GPT-2's layers, weights stored
`(in, out)`) transposed, and that of an `nn.Embedding` from other keys than `lora_A` /
`lora_B`. A `Conv1D` layer named in `target_parameters` instead has its ΔW added to the
weight as it is stored: such layers go into PEFT files that way, into kohya and LyCORIS
files as they are (their metadata records them), and not into diffusers files, whose loader
takes module LoRAs only. An embedding table goes into kohya and LyCORIS files only, unless
its source already holds it as a parameter target (a PEFT file's, kept as it was).
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


def conv1d_model(checkpoint: Checkpoint) -> str | None:
    """The `model_type` of the transformers `config.json` beside `checkpoint` when it names
    a model of `Conv1D` layers (`CONV1D_MODELS`), else None."""
    try:
        config = json.loads((checkpoint.path.parent / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if model_type in CONV1D_MODELS else None


def kinds(
    shapes: Mapping[str, Sequence[int]], base: Base | Mapping[str, Base]
) -> tuple[list[str], list[str]]:
    """The layers of `shapes` (`{layer: ΔW shape}`) that are `Conv1D`s and those that are
    embedding tables: by module type where `base` is a model; else every 2-D layer of a
    checkpoint whose `config.json` names a `Conv1D` model, and 2-D layers named like tables."""
    if isinstance(base, nn.Module):
        modules = dict(base.named_modules())
        return ([n for n in shapes if is_conv1d(modules.get(n))],
                [n for n in shapes if isinstance(modules.get(n), nn.Embedding)])  # fmt: skip
    if isinstance(base, (str, os.PathLike)):
        base = Checkpoint(base)  # a file, an index or a folder: the file it names
    transposed = isinstance(base, Checkpoint) and conv1d_model(base)
    tables = [n for n, shape in shapes.items() if embedding_key(n, shape)]
    conv1d = [n for n, shape in shapes.items() if transposed and len(shape) == 2]
    return [n for n in conv1d if n not in tables], tables


def _component_bases(base: Base | Mapping[str, Base]) -> dict[str, Base]:
    """`{component: base}` of a per-component base (`{"unet": …, "text_encoder": …}`), or
    `{"": base}` of one base (a model, a checkpoint, a `{module: shape}` dict)."""
    if isinstance(base, Mapping) and base and not all(
        isinstance(v, Sequence) and not isinstance(v, str) for v in base.values()
    ):
        return dict(base)  # type: ignore[arg-type]
    return {"": base}  # type: ignore[dict-item]


def layer_kinds(
    adapter: Adapter, base: Base | Mapping[str, Base] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`<module>.weight` (PEFT's names, without a pipeline component) of `adapter`'s
    `Conv1D` layers and of its embedding tables, found against `base` (`kinds`; by name
    alone for tables without one)."""
    conv1d: set[str] = set()
    tables: set[str] = set()
    for component, sub in _component_bases(base).items():
        shapes = {}
        for name, form in adapter.items():
            head, _, rest = name.partition(".")
            if component and head != component:
                continue
            path = rest if rest and head in adapter.components else name
            shapes[path] = tuple(form.shape)
        found = kinds(shapes, sub) if sub is not None else (
            [], [n for n, s in shapes.items() if embedding_key(n, s)])
        conv1d.update(f"{n}.weight" for n in found[0])
        tables.update(f"{n}.weight" for n in found[1])
    return tuple(sorted(conv1d)), tuple(sorted(tables))


def require_module_layout(targets: Sequence[str], fmt: str, where: object) -> None:
    """`ConversionError` when `fmt`'s loader takes module LoRAs only (diffusers) and
    `targets`, layers that update a weight as stored, is not empty."""
    if targets and TRAITS[fmt].module_lora_only:
        raise ConversionError(
            f"{where}: {targets[0].removesuffix('.weight')!r} ({len(targets)} such layers) "
            "updates a weight as stored (a transformers Conv1D's (in, out) weight, an "
            "embedding table), which a diffusers file cannot hold (its loader would read it "
            "transposed or from other keys); write peft, kohya or lycoris"
        )


def require_no_tables(tables: Sequence[str], fmt: str, where: object) -> None:
    """`ConversionError` when `fmt` reads LoRA from module keys (PEFT, diffusers) and
    `tables` (embedding tables not already parameter targets) is not empty."""
    if tables and not TRAITS[fmt].kohya_named:
        raise ConversionError(
            f"{where}: {tables[0].removesuffix('.weight')!r} ({len(tables)} in all) is an "
            f"embedding table: {fmt} reads an nn.Embedding's LoRA from lora_embedding_A / "
            "lora_embedding_B, not the lora_A / lora_B keys it would be written as, and would "
            "load it with no effect; leave it out, or write kohya or lycoris"
        )


def with_layouts(adapter: Adapter, base: Base | Mapping[str, Base] | None, fmt: str) -> Adapter:
    """`adapter` ready to be written as `fmt`: its `Conv1D` layers (found against `base`)
    join its parameter targets, which PEFT configs and lowrank's kohya and LyCORIS metadata
    keep and diffusers refuses (`require_module_layout`); embedding tables not already
    parameter targets are refused for PEFT and diffusers (`require_no_tables`)."""
    conv1d, tables = layer_kinds(adapter, base)
    targets = tuple(sorted({*adapter.target_parameters, *conv1d}))
    where = adapter.source or "the adapter"
    require_module_layout(targets, fmt, where)
    require_no_tables([t for t in tables if t not in targets], fmt, where)
    return replace(adapter, target_parameters=targets)
