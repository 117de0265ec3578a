"""Module names: those of a base model, and kohya's underscored names mapped back to them.

kohya / sd-scripts and LyCORIS name a layer `<prefix>_<module path with dots as
underscores>`, e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`. The prefix says which
model of a pipeline it targets (`KOHYA_PREFIXES`); the rest cannot be turned back into a
dotted path by itself (`down_blocks_0` could be `down_blocks.0` or `down.blocks_0`), so
it is looked up among the base model's module names: exactly one match or an error that
names the layer, never a guess.

kohya's SDXL LoRAs (and some SD 1.x ones) name UNet layers by the original Stable Diffusion
("LDM") modules, `input_blocks_4_1_…`, `middle_block_1_…`, `output_blocks_2_0_in_layers_2`,
which a diffusers `UNet2DConditionModel` of SDXL calls `down_blocks.1.attentions.0.…`,
`mid_block.attentions.0.…`, `up_blocks.0.resnets.2.conv1`. `ldm_unet_names` gives each such
module its LDM path too, from the block structure the base's own module names show, so
both spellings are looked up; ComfyUI's UNet LoRAs name the same modules by their dotted
LDM paths (`diffusion_model.input_blocks.4.1.proj_in`, the pipeline's `unet` by
`original_component`).

sd-scripts' Flux LoRAs name the transformer's layers `lora_unet_…` by Black Forest Labs'
modules (`double_blocks_0_img_attn_qkv`, `single_blocks_0_linear1`, `final_layer_linear`);
such a file's `lora_unet` layers belong to a pipeline's `transformer` (`kohya_components`).
A diffusers `FluxTransformer2DModel` splits some of these modules in several (`qkv` is
`to_q`, `to_k`, `to_v`) and orders one's rows otherwise (`norm_out`); Chroma's LoRAs name
Flux's blocks so, and its approximator's layers by theirs (`distilled_guidance_layer.layers
.0.in_layer`, diffusers' `….linear_1`). musubi-tuner's and
ComfyUI's Wan and HunyuanVideo LoRAs (and LTX-Video's) name those models' original modules
too (`lora_unet_blocks_0_self_attn_q`, `diffusion_model.double_blocks.0.img_attn_qkv`,
`diffusion_model.patchify_proj`), which their diffusers models rename
(`blocks.0.attn1.to_q`, `proj_in`) or split alike. `original_names`
gives each original module as the `Piece`s of the base's modules it is (`OriginalLayout`),
so a layer on it can be split exactly, and a parameter that is no module's weight (Wan's
`blocks.0.modulation`, diffusers' `blocks.0.scale_shift_table`) as the parameter it is
(`original_parameter`). Qwen-Image's LoRAs name diffusers' own modules
(`lora_unet_transformer_blocks_0_attn_to_q`).

transformers 5 dropped the `text_model` level of `CLIPTextModel` (Stable Diffusion's text
encoder: `encoder.layers.0.self_attn.q_proj`, saved so too), which every LoRA file of
these pipelines names (`lora_te_text_model_encoder_layers_0_…`,
`text_encoder.text_model.…`), and which checkpoints saved before keep: `clip_text_names`
gives each module of a CLIP text model the other spelling too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import FileFormatError, TargetError
from .checkpoint import Checkpoint, shard_note

# kohya prefix → pipeline component (None: the whole model, LyCORIS' generic wrapper)
KOHYA_PREFIXES: dict[str, str | None] = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
    "lora_transformer": "transformer",
    "lycoris": None,
}
_LONGEST_FIRST = sorted(KOHYA_PREFIXES, key=len, reverse=True)
ORIGINAL_PREFIX = "diffusion_model."
"""The first name of every key of a LoRA that names a diffusion model's modules in its original
layout, as ComfyUI and ai-toolkit save them (`diffusion_model.double_blocks.0.img_attn.qkv
.lora_A.weight`, Black Forest Labs' Flux; Wan's `diffusion_model.blocks.0.self_attn.q…`;
a Stable Diffusion UNet's LDM modules, `diffusion_model.input_blocks.4.1.…`): the layers are
the pipeline's `original_component`, where diffusers loads them."""
ORIGINAL_COMPONENT = "transformer"
"""The component of a `diffusion_model.` file's layers that are no UNet's (a DiT's)."""
ORIGINAL_TEXT_PREFIX = "text_encoders."
"""The first name of a text encoder's keys beside a diffusion model's in its original layout,
as ComfyUI saves and reads them: `text_encoders.<encoder>.transformer.<module>.<part>`, the
module a path of the encoder's transformers model (`text_encoders.clip_l.transformer
.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`, `text_encoders.t5xxl.transformer
.encoder.block.0.layer.0.SelfAttention.q.…`); `original_text_components` says whose."""
T5_ENCODER = "t5xxl"
"""ComfyUI's name of the T5 encoder: Flux's second text encoder, Chroma's only one, SD3's
third (`T5_COMPONENTS`)."""
ORIGINAL_TEXT_ENCODERS = ("clip_l", "clip_h", "clip_g", T5_ENCODER)
"""The text encoders ComfyUI names whose pipeline components `original_text_components` tells."""
_CLIP_COMPONENTS = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"}
_FLUX_BLOCKS = re.compile(r"(double|single)_blocks\.\d+\.")
_SD3_BLOCKS = re.compile(r"joint_blocks\.\d+\.")
SD_CHECKPOINT_UNET = "model.diffusion_model."
"""The prefix of the UNet's keys in an original (single-file) Stable Diffusion checkpoint,
beside its VAE's and text encoders': no base for a UNet's module paths (the UNet's keys
without it are)."""
_SHOWN = 3

Base = Checkpoint | str | os.PathLike[str] | nn.Module | Mapping[str, Sequence[int]]


def component_bases(base: Base | Mapping[str, Base]) -> dict[str, Base]:
    """`{component: base}` of a per-component base (`{"unet": …, "text_encoder": …}`), or
    `{"": base}` of one base (a model, a checkpoint, a `{module: shape}` dict)."""
    if isinstance(base, Mapping) and base and not all(
        isinstance(v, Sequence) and not isinstance(v, str) for v in base.values()
    ):
        return dict(base)  # type: ignore[arg-type]
    return {"": base}  # type: ignore[dict-item]


def base_paths(base: Base | Mapping[str, Base] | None) -> list[Path]:
    """The checkpoint paths `base` names, as given: itself, or the values of a dict of bases
    per component, that are paths or `Checkpoint`s (modules and shape dicts name none)."""
    given = [] if base is None else component_bases(base).values()
    return [
        item.path if isinstance(item, Checkpoint) else Path(item)
        for item in given
        if isinstance(item, (Checkpoint, str, os.PathLike))
    ]


def split_stem(stem: str, source: object) -> tuple[str, str]:
    """`(prefix, underscored module path)` of a kohya layer name; `FileFormatError` naming
    `source` (the file) when the prefix is not one of `KOHYA_PREFIXES`."""
    for prefix in _LONGEST_FIRST:
        if stem.startswith(prefix + "_") and len(stem) > len(prefix) + 1:
            return prefix, stem[len(prefix) + 1 :]
    raise FileFormatError(
        f"{source}: layer {stem!r} has no known kohya prefix (expected one of "
        f"{', '.join(p + '_' for p in KOHYA_PREFIXES)})"
    )


# modules of the DiTs whose layers sd-scripts and musubi-tuner name `lora_unet`, that no UNet
# (whose layers start with their block: `down_blocks_0_…`) nor another model has: Flux's in
# Black Forest Labs' layout and HunyuanVideo's (`double_blocks_0_…`; `img_in` and `txt_in` are
# Qwen-Image's too; Flux's `final_layer_linear` and `final_layer_adaLN_modulation_1` are SD3's,
# DiT's, Lumina's too, so not listed), Chroma's approximator, Wan's blocks' in its original
# layout, Qwen-Image's blocks' own (`img_mod`, `txt_mlp`)
_UNET_NAMED_DIT = re.compile(
    r"(double_blocks|single_blocks)_\d+_|(img_in|txt_in)$|distilled_guidance_layer_"
    r"|(time_in|vector_in|guidance_in)_(in|out)_layer$"
    r"|(vace_)?blocks_\d+_((self_attn|cross_attn)_(q|k|v|o|k_img|v_img)|ffn_(0|2))$"
    r"|transformer_blocks_\d+_(img|txt)_(mod|mlp)_"
)
# a DiT's blocks in diffusers' layout, at the top of a model: no UNet has them there
_DIT_BLOCKS = re.compile(r"(single_)?transformer_blocks_\d+_")
# Flux's blocks in BFL's layout, as kohya layer bodies name them
_KOHYA_FLUX_BLOCKS = re.compile(r"(double|single)_blocks_\d+_")


def unet_named_transformer(paths: Iterable[str]) -> bool:
    """Whether module paths (dotted, or a kohya layer's underscored body) of one model name a
    module of a DiT whose layers sd-scripts and musubi-tuner name `lora_unet`: Flux's in Black
    Forest Labs' layout (`double_blocks.0.img_attn.qkv`, `img_in`) and HunyuanVideo's
    (`double_blocks.0.img_attn_qkv`), Chroma's approximator (`distilled_guidance_layer.…`),
    Wan's in its original layout (`blocks.0.self_attn.q`, `blocks.0.ffn.0`), Qwen-Image's
    (`transformer_blocks.0.img_mod.1`, `….txt_mlp.net.2`).
    Such a model is a pipeline's `transformer`."""
    return any(_UNET_NAMED_DIT.match(path.replace(".", "_")) for path in paths)


# blocks only the original Stable Diffusion ("LDM") UNet has; its other top-level modules
# (`time_embed`, `label_emb`, `out`) are too generic a name to tell a model by
_LDM_UNET_ONLY = re.compile(r"(input_blocks|middle_block|output_blocks)\.\d+\.")


def original_component(paths: Iterable[str]) -> str:
    """The pipeline component of a `diffusion_model.` file whose layers have the dotted
    module `paths`, told by all of them at once: `unet` when one is in a block only the LDM
    UNet has (`input_blocks.4.1.proj_in`, `middle_block.…`, `output_blocks.…`), so that its
    `time_embed.…`, `label_emb.…` and `out.…` layers go with the rest; else
    `ORIGINAL_COMPONENT` (a DiT's)."""
    return "unet" if any(_LDM_UNET_ONLY.match(p) for p in paths) else ORIGINAL_COMPONENT


T5_COMPONENTS = {"Flux": "text_encoder_2", "Chroma": "text_encoder", "SD3": "text_encoder_3"}
"""The component a T5 encoder is in each pipeline that has one (ComfyUI's `t5xxl`, sd-scripts'
`lora_te3`): Flux's second text encoder, Chroma's only one, SD3's third."""
# modules only Flux has of the DiTs in Black Forest Labs' layout (Chroma has no modulation
# projections, time, vector or guidance embedders), and only Chroma (its `distilled_guidance_layer`
# gives every block's modulation), as dotted paths or kohya layer bodies
_FLUX_ONLY = re.compile(
    r"double_blocks[._]\d+[._](img|txt)_mod[._]|single_blocks[._]\d+[._]modulation[._]"
    r"|(time|vector|guidance)_in[._]|final_layer[._]adaLN_modulation[._]"
)
_CHROMA_ONLY = re.compile(r"distilled_guidance_layer[._]")
_KOHYA_SD3_BLOCKS = re.compile(r"joint_blocks_\d+_")
# what a LoRA file's metadata says its model is: sd-scripts' `ss_base_model_version` (`flux1`,
# `chroma`, `sd3…`) and the model spec's `modelspec.architecture` (`flux-1-dev/lora`,
# `chroma/lora`, `stable-diffusion-3-medium/lora`), by their beginnings
_METADATA_MODELS = (
    ("ss_base_model_version", (("flux", "Flux"), ("chroma", "Chroma"), ("sd3", "SD3"))),
    ("modelspec.architecture",
     (("flux-1", "Flux"), ("chroma", "Chroma"), ("stable-diffusion-3", "SD3"))),
)  # fmt: skip


def metadata_pipeline(metadata: Mapping[str, str]) -> str | None:
    """The pipeline with a T5 encoder (a key of `T5_COMPONENTS`) that a LoRA file's metadata
    names (`_METADATA_MODELS`); None where it names none, or two."""
    named = {
        model
        for key, starts in _METADATA_MODELS
        for start, model in starts
        if str(metadata.get(key, "")).lower().startswith(start)
    }
    return named.pop() if len(named) == 1 else None


def t5_component(
    flux: bool, chroma: bool, sd3: bool, metadata: Mapping[str, str]
) -> str | None:
    """The component of a file's T5 layers, told by its other layers (`flux`: a module only
    Flux has, or a CLIP-L's beside Flux's blocks; `chroma`: one only Chroma has; `sd3`:
    SD3's blocks or its second CLIP) when they tell one pipeline, else by its metadata
    (`metadata_pipeline`); None where neither tells."""
    told = [name for name, said in (("Flux", flux), ("Chroma", chroma), ("SD3", sd3)) if said]
    pipeline = told[0] if len(told) == 1 else None if told else metadata_pipeline(metadata)
    return T5_COMPONENTS.get(pipeline or "")


def t5_refusal(named: str) -> str:
    """Why a T5 layer (`named`: "key '…'", "layer '…'") is read as no component: the end of
    the error naming it."""
    choices = ", ".join(f"{pipeline}'s {c}" for pipeline, c in T5_COMPONENTS.items())
    return (
        f"{named} is a T5 encoder's, which is {choices}, and nothing tells which (the file's "
        "other layers, its metadata ss_base_model_version or modelspec.architecture)"
    )


def original_text_components(
    encoders: Iterable[str], paths: Iterable[str], metadata: Mapping[str, str] | None = None
) -> dict[str, str | None]:
    """`{encoder: pipeline component}` for the text encoders a file in the original layout
    names, ComfyUI's (`ORIGINAL_TEXT_PREFIX`) or kohya prefixes, beside the dotted module
    `paths` of its `diffusion_model.` layers, told by the whole file: `clip_l` (Stable
    Diffusion's, SDXL's first, SD3's and Flux's CLIP-L) and `clip_h` (SD 2's) are the
    `text_encoder`, `clip_g` (SDXL's and SD3's second) `text_encoder_2`. `t5xxl` (and
    `lora_te3`, sd-scripts' T5) is SD3's `text_encoder_3` where the diffusion model's layers
    are SD3's (`joint_blocks.N.`) or the file has `clip_g` layers; beside Flux's blocks in
    Black Forest Labs' layout (`double_blocks.N.`, `single_blocks.N.`), which Chroma's have
    too, Flux's `text_encoder_2` where a layer is on a module only Flux has (a block's
    modulation, `time_in`, `guidance_in`, …) or a CLIP-L's is there (Chroma has none),
    Chroma's `text_encoder` (its only encoder) where one is on Chroma's
    `distilled_guidance_layer`; else as the metadata says (`t5_component`). Any other kohya
    prefix is its `KOHYA_PREFIXES` component. None for an encoder of no known component, or
    a T5 the file does not tell (or tells two ways)."""
    encoders, paths = set(encoders), list(paths)
    blocks = any(_FLUX_BLOCKS.match(p) for p in paths)
    clip_l = bool(encoders & {"clip_l", "lora_te1", "lora_te"})
    t5 = t5_component(
        flux=any(_FLUX_ONLY.match(p) for p in paths) or (blocks and clip_l),
        chroma=any(_CHROMA_ONLY.match(p) for p in paths),
        sd3="clip_g" in encoders or "lora_te2" in encoders
        or any(_SD3_BLOCKS.match(p) for p in paths),
        metadata=metadata or {},
    )  # fmt: skip
    known = {**_CLIP_COMPONENTS, **KOHYA_PREFIXES, T5_ENCODER: t5, "lora_te3": t5}
    return {e: known.get(e) for e in encoders}


def original_pipeline(paths: Iterable[str]) -> tuple[str, ...]:
    """The text encoders of the pipeline whose diffusion model's layers in the original layout
    have the dotted module `paths`, where they tell it: Flux's (`double_blocks.N.`, CLIP and
    T5) and SD3's (`joint_blocks.N.`, two CLIPs and T5); none otherwise."""
    paths = list(paths)
    if any(_SD3_BLOCKS.match(p) for p in paths):
        return ("text_encoder", "text_encoder_2", "text_encoder_3")
    if any(_FLUX_BLOCKS.match(p) for p in paths):
        return ("text_encoder", "text_encoder_2")
    return ()


# the modules of a CLIP text model and of a T5 encoder that text encoders' kohya layers name
# (`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`, OneTrainer's T5
# `lora_te2_encoder_block_0_layer_1_DenseReluDense_wi_0`): a block's, `(block pattern,
# its path with the block's numbers, the block's modules)`, and the others'
_KOHYA_TEXT_BLOCKS = (
    (re.compile(r"text_model_encoder_layers_(\d+)_(.+)$"), "text_model.encoder.layers.{}.{}",
     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
      "mlp.fc1", "mlp.fc2", "layer_norm1", "layer_norm2")),
    (re.compile(r"encoder_block_(\d+)_layer_(\d+)_(.+)$"), "encoder.block.{}.layer.{}.{}",
     ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
      "DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo",
      "layer_norm")),
)  # fmt: skip
_KOHYA_TEXT_TOP = ("text_model.embeddings.token_embedding",
                   "text_model.embeddings.position_embedding", "text_model.final_layer_norm",
                   "text_projection", "encoder.final_layer_norm", "shared")  # fmt: skip


def kohya_text_module(body: str) -> str | None:
    """The dotted module path a text encoder's kohya layer names by its underscored `body`,
    without a base to look it up in: a CLIP text model's module under `text_model.` (as
    kohya files name them; `text_projection`) or a T5 encoder's (`encoder.block.0.layer.0
    .SelfAttention.q`, `encoder.block.0.layer.1.DenseReluDense.wi_0`, `shared`); None for
    any other body."""
    top = {path.replace(".", "_"): path for path in _KOHYA_TEXT_TOP}
    if body in top:
        return top[body]
    for pattern, path, modules in _KOHYA_TEXT_BLOCKS:
        match = pattern.match(body)
        parts = {module.replace(".", "_"): module for module in modules}
        if match and match.groups()[-1] in parts:
            *numbers, part = match.groups()
            return path.format(*numbers, parts[part])
    return None


def kohya_components(
    stems: Iterable[str],
    source: object,
    metadata: Mapping[str, str] | None = None,
    t5: str | None = None,
) -> dict[str, str | None]:
    """The component of each kohya layer of one file (`{stem: component}`): its prefix's
    (`KOHYA_PREFIXES`), but `transformer` for every `lora_unet` layer of a file whose
    `lora_unet` layers name a DiT's module, as sd-scripts and musubi-tuner name a
    transformer's layers: one `unet_named_transformer` tells (Flux's and HunyuanVideo's
    `lora_unet_double_blocks_0_…`, Wan's `lora_unet_blocks_0_self_attn_q`), or a
    block of diffusers' layout at the top (`lora_unet_transformer_blocks_0_attn_to_q`,
    Qwen-Image's), which no UNet has. A file is told by all its layers at once, so that its
    `final_layer_…` layers, named alike in SD3's and other DiTs' files, go with the rest.

    sd-scripts names the T5 encoder `lora_te3` in SD3's, Flux's and Chroma's files, which
    their pipelines hold as `text_encoder_3`, `text_encoder_2` and `text_encoder`
    (`T5_COMPONENTS`): told by the file's other layers (`lora_unet` ones on a module only
    Flux has, or Flux's blocks beside a CLIP-L's `lora_te1`; on Chroma's
    `distilled_guidance_layer`; SD3's `joint_blocks`, or a `lora_te2`), else by its
    `metadata` (`metadata_pipeline`), else by `t5` (the component the bases it is resolved
    against give it, `Adapter.resolve`). `FileFormatError` naming the first `lora_te3`
    layer and the choices where none tells."""
    split = {stem: split_stem(layer_parameter(stem)[0], source) for stem in stems}
    prefixes = {prefix for prefix, _ in split.values()}
    bodies = [body for prefix, body in split.values() if prefix == "lora_unet"]
    dit = unet_named_transformer(bodies) or any(_DIT_BLOCKS.match(body) for body in bodies)
    known = dict(KOHYA_PREFIXES)
    if "lora_te3" in prefixes:
        blocks = any(_KOHYA_FLUX_BLOCKS.match(body) for body in bodies)
        told = t5_component(
            flux=any(_FLUX_ONLY.match(b) for b in bodies) or (blocks and "lora_te1" in prefixes),
            chroma=any(_CHROMA_ONLY.match(b) for b in bodies),
            sd3="lora_te2" in prefixes or any(_KOHYA_SD3_BLOCKS.match(b) for b in bodies),
            metadata=metadata or {},
        )  # fmt: skip
        known["lora_te3"] = told or t5
        if known["lora_te3"] is None:
            first = min(stem for stem, (prefix, _) in split.items() if prefix == "lora_te3")
            raise FileFormatError(
                f"{source}: {t5_refusal(f'layer {first!r}')}; or give bases per component, "
                "the T5's under the one it is ({'text_encoder_2': …} for Flux, {'text_encoder': …} "
                "for Chroma, {'text_encoder_3': …} for SD3)"
            )
    return {
        stem: "transformer" if dit and prefix == "lora_unet" else known[prefix]
        for stem, (prefix, _) in split.items()
    }


def kohya_prefix(
    component: str | None, components: Iterable[str], default: str, unet_named: bool = False
) -> str:
    """The kohya prefix for a layer of `component` (`default` when it has none); the first
    text encoder is `lora_te1` when a second one is present, else `lora_te`; `unet_named`
    says the `transformer` is a DiT whose layers sd-scripts and musubi-tuner name
    `lora_unet` (`unet_named_transformer`; read back so by `kohya_components`)."""
    if component is None:
        return default
    if component == "transformer" and unet_named:
        return "lora_unet"
    if component == "text_encoder":
        return "lora_te1" if "text_encoder_2" in components else "lora_te"
    for prefix, owner in KOHYA_PREFIXES.items():
        if owner == component and prefix != "lora_te1":
            return prefix
    raise TargetError(
        f"component {component!r} has no kohya prefix; kohya names "
        f"{', '.join(c for c in KOHYA_PREFIXES.values() if c)}"
    )


def module_shapes(base: Base) -> dict[str, tuple[int, ...]]:
    """`{module name: weight shape}` of every module with a weight in `base`: a checkpoint
    (path or `Checkpoint`, keys `<name>.weight`), an `nn.Module`, or such a dict itself."""
    if isinstance(base, nn.Module):
        return {
            name: tuple(module.weight.shape)
            for name, module in base.named_modules(remove_duplicate=False)
            if isinstance(getattr(module, "weight", None), torch.Tensor)
        }
    if isinstance(base, (str, os.PathLike)):
        base = Checkpoint(base)
    if isinstance(base, Checkpoint):
        return {
            key[: -len(".weight")]: info.shape
            for key, info in base.infos.items()
            if key.endswith(".weight")
        }
    if isinstance(base, Mapping):
        return {str(name): tuple(shape) for name, shape in base.items()}
    raise TargetError(
        f"a base must be a checkpoint path, a Checkpoint, an nn.Module or a dict of module "
        f"name → weight shape, got {type(base).__name__}"
    )


@dataclass(frozen=True)
class Piece:
    """One module of the base that a layer of another layout (partly) is: the module's
    weight rows are the layer's ΔW rows `rows`, ranges `(start, stop)` taken in order;
    None for all of them, in order (the layer is the module)."""

    module: str
    rows: tuple[tuple[int, int], ...] | None = None


def sd_checkpoint_refusal() -> str:
    """Why a layer names no module of a whole single-file checkpoint (an original Stable
    Diffusion one, or a Flux one saved so), which holds each model under a prefix (the
    diffusion model under `SD_CHECKPOINT_UNET`): the end of the `TargetError` naming it."""
    return (
        "; it is a whole single-file checkpoint (its diffusion model under "
        f"{SD_CHECKPOINT_UNET!r}): give the model's own weights, their keys without its prefix"
    )


def resolve_stems(
    bodies: Mapping[str, str], shapes: Mapping[str, Sequence[int]], source: object, base: object
) -> dict[str, tuple[Piece, ...]]:
    """Map each kohya layer (stem → underscored body) to the one module of `shapes`
    (`{module: weight shape}`) whose dotted path, or LDM path in a diffusers UNet
    (`ldm_unet_names`), or other spelling in a CLIP text model (`clip_text_names`),
    underscores to its body, or to the modules of a diffusers DiT that its path in the
    model's original layout is (`original_names`: Flux's BFL paths, Chroma's, Wan's,
    HunyuanVideo's, LTX-Video's). `TargetError` naming the file `source`, the layer and
    `base` when there is none, or more than one."""
    names = list(shapes)
    index: dict[str, list[tuple[Piece, ...]]] = {}
    for name in names:
        index.setdefault(name.replace(".", "_"), []).append((Piece(name),))
    for ldm, name in ldm_unet_names(names).items():
        index.setdefault(ldm.replace(".", "_"), []).append((Piece(name),))
    for original, pieces in original_names(shapes).items():
        index.setdefault(original.replace(".", "_"), []).append(pieces)
    for other, name in clip_text_names(names).items():
        index.setdefault(other.replace(".", "_"), []).append((Piece(name),))
    resolved = {}
    for stem, body in bodies.items():
        found = index.get(body, [])
        if not found:
            nested = any(name.startswith(SD_CHECKPOINT_UNET) for name in names)
            raise TargetError(
                f"{source}: kohya layer {stem!r} matches no module of the base {base}"
                + shard_note(base)
                + f" (its {len(names)} module names look like {sorted(names)[:_SHOWN]})"
                + (sd_checkpoint_refusal() if nested else "")
            )
        if len(found) > 1:
            shown = sorted(" + ".join(p.module for p in pieces) for pieces in found)
            raise TargetError(
                f"{source}: kohya layer {stem!r} is ambiguous in the base {base}: modules "
                f"{shown} all underscore to {body!r}"
            )
        resolved[stem] = found[0]
    return resolved


_CLIP_TEXT = "text_model."
# a module of a CLIP text model without its `text_model.` level (transformers 5's layout)
_CLIP_TEXT_MODULE = re.compile(
    r"(encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]|layer_norm[12])"
    r"|embeddings\.(token|position)_embedding|final_layer_norm)$"
)


def kohya_text_paths(component: str | None, paths: Iterable[str]) -> dict[str, str]:
    """`{path: the path a kohya file names it by}` for the module paths of one component's
    layers: a CLIP text encoder's (`text_encoder`, `text_encoder_2`) under `text_model.`,
    where sd-scripts, A1111 and ComfyUI look for them, also when the base is transformers
    5's `CLIPTextModel`, which has no such level (`clip_text_names` reads them back against
    either). The component is taken for CLIP's only where every path is a CLIP text module:
    another text encoder with `encoder.layers.…` paths (T5Gemma's, PRX's and Stable Audio 3's:
    `self_attn.o_proj`, `mlp.gate_proj` beside `self_attn.q_proj`) keeps its paths as they
    are, as does any other component."""
    paths = list(paths)
    clip = component in ("text_encoder", "text_encoder_2") and all(
        _CLIP_TEXT_MODULE.match(path) for path in paths
    )
    return {path: _CLIP_TEXT + path if clip else path for path in paths}


def clip_text_names(names: Iterable[str]) -> dict[str, str]:
    """`{other spelling: module}` for the modules of a CLIP text model among `names`
    (`embeddings.token_embedding`, `encoder.layers.…` and `final_layer_norm`, all with or
    all without `text_model.` before them; `{}` for any other model): a module of
    transformers 5's `CLIPTextModel` (`encoder.layers.0.mlp.fc1`) answers to the path with
    `text_model.` that earlier versions and LoRA files give it, one of an earlier
    checkpoint (`text_model.encoder.layers.0.mlp.fc1`) to the path without. A model with
    another tower beside `text_model` (`CLIPModel`'s or `SiglipModel`'s `vision_model`,
    whose transformers 5 `CLIPVisionModel` / `SiglipVisionModel` is flattened to
    `encoder.layers.…` too) gets no other spellings: a path without a tower names neither."""
    names = set(names)

    def clip(prefix: str) -> bool:
        parts = {f"{prefix}embeddings.token_embedding", f"{prefix}final_layer_norm"}
        return parts <= names and any(n.startswith(f"{prefix}encoder.layers.") for n in names)

    if clip("") and not any(n.startswith(_CLIP_TEXT) for n in names):
        return {_CLIP_TEXT + n: n for n in names}
    towers = {n.partition(".")[0] for n in names if n.partition(".")[2].startswith("encoder.")}
    if clip(_CLIP_TEXT) and towers == {_CLIP_TEXT[:-1]}:
        return {n[len(_CLIP_TEXT) :]: n for n in names if n.startswith(_CLIP_TEXT)}
    return {}


# diffusers ResnetBlock2D part → the LDM ResBlock's (`in_layers` is GroupNorm, SiLU, conv;
# `out_layers` GroupNorm, SiLU, dropout, conv; `emb_layers` SiLU, linear)
_LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers top-level module → LDM (`time_embed` and `label_emb.0` are linear, SiLU, linear;
# `out` is GroupNorm, SiLU, conv)
_LDM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                    r"\.(\d+)(?:\.(.*))?$")  # fmt: skip
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def ldm_unet_names(names: Iterable[str]) -> dict[str, str]:
    """`{LDM module path: module}` for the modules of a diffusers `UNet2DConditionModel`
    among `names` (none unless `conv_in`, `down_blocks.…`, `mid_block.…` and `up_blocks.…`
    are all there).

    The LDM UNet numbers its blocks through the whole model: `input_blocks.0` is `conv_in`,
    then each down level k holds one block per resnet (`.0` the resnet, `.1` its attention
    where the level has them) and one more for its downsampler (`.0.op`);
    `middle_block` alternates resnets and attentions; each up level holds one block per
    resnet, the last of which also holds the upsampler (`.1.conv`, or `.2.conv` after an
    attention). The counts per level are read off the names, so a level's downsampler or
    upsampler must have a weight (a convolution, as in every Stable Diffusion UNet).
    Attention internals keep their names; a resnet's are renamed by `_LDM_RESNET`.
    """
    names = list(names)
    if "conv_in" not in names or not all(
        any(n.startswith(part) for n in names)
        for part in ("down_blocks.", "mid_block.", "up_blocks.")
    ):
        return {}
    # (blocks, level) → {kind: indices}
    levels: dict[tuple[str, int], dict[str, set[int]]] = {}
    for name in names:
        match = _BLOCK.match(name)
        if match:
            blocks, level, kind, index, _ = match.groups()
            levels.setdefault((blocks, int(level)), {}).setdefault(kind, set()).add(int(index))
    # LDM block number (with the sub-module index) of each diffusers block
    where: dict[str, str] = {}
    for blocks, first in (("down_blocks", 1), ("up_blocks", 0)):
        number = first
        for level in range(max((lv for b, lv in levels if b == blocks), default=-1) + 1):
            parts = levels.get((blocks, level), {})
            resnets = len(parts.get("resnets", ()))
            for j in range(resnets):
                where[f"{blocks}.{level}.resnets.{j}"] = f"{number + j}.0"
                where[f"{blocks}.{level}.attentions.{j}"] = f"{number + j}.1"
            if "downsamplers" in parts:
                where[f"{blocks}.{level}.downsamplers.0"] = f"{number + resnets}.0"
                resnets += 1
            if "upsamplers" in parts:
                sub = 2 if "attentions" in parts else 1
                where[f"{blocks}.{level}.upsamplers.0"] = f"{number + resnets - 1}.{sub}"
            number += resnets
    mid_attention = any(n.startswith("mid_block.attentions.") for n in names)
    ldm = {}
    for name in names:
        if name in _LDM_TOP:
            ldm[_LDM_TOP[name]] = name
        elif match := _BLOCK.match(name):
            blocks, level, kind, index, rest = match.groups()
            block = where.get(f"{blocks}.{level}.{kind}.{index}")
            if block is None or rest is None:
                continue
            stage = "input_blocks" if blocks == "down_blocks" else "output_blocks"
            if kind == "resnets":
                rest = _LDM_RESNET.get(rest)
            elif kind == "downsamplers":
                rest = "op" if rest == "conv" else None
            if rest is not None:
                ldm[f"{stage}.{block}.{rest}"] = name
        elif match := _MID.match(name):
            kind, index, rest = match.groups()
            j = int(index)
            block = (2 * j + (kind == "attentions")) if mid_attention else j
            if rest is not None and kind == "resnets":
                rest = _LDM_RESNET.get(rest)
            if rest is not None:
                ldm[f"middle_block.{block}.{rest}"] = name
    return ldm


@dataclass(frozen=True)
class OriginalLayout:
    """How a DiT's modules in its original layout (the names its LoRAs carry) are the modules
    of its diffusers model. `tells`: diffusers modules that all have weights in that model and
    tell it from others. `blocks`: `{diffusers block list: (original block list, {original
    part: its diffusers parts})}`, blocks numbered alike (`transformer_blocks.3` is
    `double_blocks.3`). `top`: `{original module: its diffusers modules}` outside the blocks.
    A module listed with several diffusers modules is a fused projection: its weight's rows
    are theirs in turn, each as many as its weight has. `swapped`: `{original: diffusers
    module}` whose rows are the original's with its two halves exchanged. `parameters`:
    `{original parameter: diffusers parameter}` of the `PARAMETERS` that are no module's
    weight, the same tensor, `N` standing for a block's number in both."""

    tells: tuple[str, ...]
    blocks: Mapping[str, tuple[str, Mapping[str, tuple[str, ...]]]]
    top: Mapping[str, tuple[str, ...]]
    swapped: Mapping[str, str]
    parameters: Mapping[str, str] = field(default_factory=dict)


# Flux in Black Forest Labs' layout (sd-scripts' names) → diffusers' FluxTransformer2DModel
# (`qkv` is q, k, v; a single block's `linear1` is q, k, v and the MLP's input; BFL's last
# modulation gives (shift, scale), diffusers' `norm_out` (scale, shift))
_FLUX = OriginalLayout(
    tells=("x_embedder", "context_embedder"),
    blocks={
        "transformer_blocks": ("double_blocks", {
            "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "img_attn.proj": ("attn.to_out.0",),
            "img_mlp.0": ("ff.net.0.proj",),
            "img_mlp.2": ("ff.net.2",),
            "img_mod.lin": ("norm1.linear",),
            "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "txt_attn.proj": ("attn.to_add_out",),
            "txt_mlp.0": ("ff_context.net.0.proj",),
            "txt_mlp.2": ("ff_context.net.2",),
            "txt_mod.lin": ("norm1_context.linear",),
        }),
        "single_transformer_blocks": ("single_blocks", {
            "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
            "linear2": ("proj_out",),
            "modulation.lin": ("norm.linear",),
        }),
    },
    top={
        "img_in": ("x_embedder",),
        "txt_in": ("context_embedder",),
        "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
        "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
        "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
        "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
        "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
        "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
        "final_layer.linear": ("proj_out",),
    },
    swapped={"final_layer.adaLN_modulation.1": "norm_out.linear"},
)  # fmt: skip
# Chroma's approximator (its `distilled_guidance_layer`, which gives every block's modulation)
# in its original layout → diffusers' ChromaTransformer2DModel, as its single-file converter
# renames it: each layer's `in_layer` / `out_layer` are `linear_1` / `linear_2`; `in_proj`,
# `out_proj` and the norms `norms.N` are named alike. Chroma's blocks are Flux's (`_FLUX`,
# whose modulation projections it lacks).
_CHROMA = OriginalLayout(
    tells=("distilled_guidance_layer.in_proj",),
    blocks={
        "distilled_guidance_layer.layers": ("distilled_guidance_layer.layers", {
            "in_layer": ("linear_1",),
            "out_layer": ("linear_2",),
        }),
    },
    top={},
    swapped={},
)  # fmt: skip
# Wan in its original layout (Wan-AI's checkpoints) → diffusers' WanTransformer3DModel (and
# WanVACETransformer3DModel, whose VACE blocks are blocks with a projection in and out): renamed
# one for one (`patch_embedding` and `vace_patch_embedding` are named alike)
_WAN_BLOCK = {
    "self_attn.q": ("attn1.to_q",),
    "self_attn.k": ("attn1.to_k",),
    "self_attn.v": ("attn1.to_v",),
    "self_attn.o": ("attn1.to_out.0",),
    "cross_attn.q": ("attn2.to_q",),
    "cross_attn.k": ("attn2.to_k",),
    "cross_attn.v": ("attn2.to_v",),
    "cross_attn.o": ("attn2.to_out.0",),
    "cross_attn.k_img": ("attn2.add_k_proj",),
    "cross_attn.v_img": ("attn2.add_v_proj",),
    "ffn.0": ("ffn.net.0.proj",),
    "ffn.2": ("ffn.net.2",),
    # the norms with weights (dense differences of them: `diff`), the cross-attention's
    # input norm `norm3` being diffusers' `norm2`
    "norm3": ("norm2",),
    "self_attn.norm_q": ("attn1.norm_q",),
    "self_attn.norm_k": ("attn1.norm_k",),
    "cross_attn.norm_q": ("attn2.norm_q",),
    "cross_attn.norm_k": ("attn2.norm_k",),
    "cross_attn.norm_k_img": ("attn2.norm_added_k",),
}
_WAN = OriginalLayout(
    tells=("condition_embedder.time_proj",),
    blocks={
        "blocks": ("blocks", _WAN_BLOCK),
        "vace_blocks": ("vace_blocks", {
            **_WAN_BLOCK, "before_proj": ("proj_in",), "after_proj": ("proj_out",),
        }),
    },
    top={
        "time_embedding.0": ("condition_embedder.time_embedder.linear_1",),
        "time_embedding.2": ("condition_embedder.time_embedder.linear_2",),
        "time_projection.1": ("condition_embedder.time_proj",),
        "text_embedding.0": ("condition_embedder.text_embedder.linear_1",),
        "text_embedding.2": ("condition_embedder.text_embedder.linear_2",),
        "img_emb.proj.1": ("condition_embedder.image_embedder.ff.net.0.proj",),
        "img_emb.proj.3": ("condition_embedder.image_embedder.ff.net.2",),
        "head.head": ("proj_out",),
    },
    swapped={},
    # a block's modulation (1, 6, dim: shift, scale, gate of the self-attention, then of the
    # FFN) and the head's (1, 2, dim: shift, scale), as diffusers' single-file converter
    # renames them
    parameters={"blocks.N.modulation": "blocks.N.scale_shift_table",
                "head.modulation": "scale_shift_table"},
)  # fmt: skip
# HunyuanVideo in its original layout (Tencent's checkpoints, Flux's modules with their own
# names) → diffusers' HunyuanVideoTransformer3DModel; the text token refiner's modulation
# keeps its rows' order
_HUNYUAN_VIDEO = OriginalLayout(
    tells=("x_embedder.proj", "context_embedder.proj_in"),
    blocks={
        "transformer_blocks": ("double_blocks", {
            "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "img_attn_proj": ("attn.to_out.0",),
            "img_mlp.fc1": ("ff.net.0.proj",),
            "img_mlp.fc2": ("ff.net.2",),
            "img_mod.linear": ("norm1.linear",),
            "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "txt_attn_proj": ("attn.to_add_out",),
            "txt_mlp.fc1": ("ff_context.net.0.proj",),
            "txt_mlp.fc2": ("ff_context.net.2",),
            "txt_mod.linear": ("norm1_context.linear",),
        }),
        "single_transformer_blocks": ("single_blocks", {
            "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
            "linear2": ("proj_out",),
            "modulation.linear": ("norm.linear",),
        }),
        "context_embedder.token_refiner.refiner_blocks": (
            "txt_in.individual_token_refiner.blocks", {
                "self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "self_attn_proj": ("attn.to_out.0",),
                "mlp.fc1": ("ff.net.0.proj",),
                "mlp.fc2": ("ff.net.2",),
                "adaLN_modulation.1": ("norm_out.linear",),
            }),
    },
    top={
        "img_in.proj": ("x_embedder.proj",),
        "time_in.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
        "time_in.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
        "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
        "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
        "guidance_in.mlp.0": ("time_text_embed.guidance_embedder.linear_1",),
        "guidance_in.mlp.2": ("time_text_embed.guidance_embedder.linear_2",),
        "txt_in.input_embedder": ("context_embedder.proj_in",),
        "txt_in.t_embedder.mlp.0": (
            "context_embedder.time_text_embed.timestep_embedder.linear_1",),
        "txt_in.t_embedder.mlp.2": (
            "context_embedder.time_text_embed.timestep_embedder.linear_2",),
        "txt_in.c_embedder.linear_1": ("context_embedder.time_text_embed.text_embedder.linear_1",),
        "txt_in.c_embedder.linear_2": ("context_embedder.time_text_embed.text_embedder.linear_2",),
        "final_layer.linear": ("proj_out",),
    },
    swapped={"final_layer.adaLN_modulation.1": "norm_out.linear"},
)  # fmt: skip
# LTX-Video in its original layout (Lightricks' checkpoints) → diffusers'
# LTXVideoTransformer3DModel: its blocks and `caption_projection` named alike, two modules
# outside them renamed
_LTX_VIDEO = OriginalLayout(
    tells=("proj_in", "time_embed.linear", "caption_projection.linear_1"),
    blocks={"transformer_blocks": ("transformer_blocks", {})},
    top={
        "patchify_proj": ("proj_in",),
        "adaln_single.linear": ("time_embed.linear",),
        "adaln_single.emb.timestep_embedder.linear_1": (
            "time_embed.emb.timestep_embedder.linear_1",),
        "adaln_single.emb.timestep_embedder.linear_2": (
            "time_embed.emb.timestep_embedder.linear_2",),
    },
    swapped={},
)  # fmt: skip
ORIGINAL_LAYOUTS = (_FLUX, _CHROMA, _WAN, _HUNYUAN_VIDEO, _LTX_VIDEO)
"""The DiTs whose LoRAs name their modules in an original layout that their diffusers models
rename or split: Flux (Black Forest Labs'), Chroma (Flux's blocks and its approximator),
Wan 2.x, HunyuanVideo, LTX-Video. Qwen-Image's LoRAs name diffusers' own modules."""


def layout_names(
    shapes: Mapping[str, Sequence[int]], layout: OriginalLayout
) -> dict[str, tuple[Piece, ...]]:
    """`{original module path: its pieces}` for the modules of `layout`'s diffusers model among
    `shapes` (`{module: weight shape}`; none unless all of `layout.tells` and a block are
    there). A module whose diffusers modules are several is a `Piece` each, its rows theirs in
    turn, as many as each one's weight has; a swapped one the diffusers module with its rows'
    halves exchanged. An original module is listed only when every module it is exists in
    the base, so which blocks there are comes from the base's own names."""
    if not all(module in shapes for module in layout.tells) or not any(
        name.startswith(f"{block}.") for name in shapes for block in layout.blocks
    ):
        return {}
    table = dict(layout.top)
    for name in shapes:
        for block, (original, parts) in layout.blocks.items():
            index = name[len(block) + 1 :].partition(".")[0]
            if name.startswith(f"{block}.") and index.isdigit():
                for part, modules in parts.items():
                    table[f"{original}.{index}.{part}"] = tuple(
                        f"{block}.{index}.{module}" for module in modules
                    )
    pieces: dict[str, tuple[Piece, ...]] = {}
    for path, modules in table.items():
        if not all(module in shapes for module in modules):
            continue
        if len(modules) == 1:
            pieces[path] = (Piece(modules[0]),)
            continue
        start, split = 0, []
        for module in modules:
            stop = start + shapes[module][0]
            split.append(Piece(module, ((start, stop),)))
            start = stop
        pieces[path] = tuple(split)
    for path, module in layout.swapped.items():
        if module in shapes and shapes[module][0] % 2 == 0:
            half = shapes[module][0] // 2
            pieces[path] = (Piece(module, ((half, 2 * half), (0, half))),)
    return pieces


def original_names(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[Piece, ...]]:
    """`{module path in the model's original layout: its pieces}` for a diffusers model of one
    of `ORIGINAL_LAYOUTS` (`layout_names`; `{}` for any other model)."""
    names: dict[str, tuple[Piece, ...]] = {}
    for layout in ORIGINAL_LAYOUTS:
        names.update(layout_names(shapes, layout))
    return names


def targets_parameter(layer: str, parameters: Sequence[str]) -> bool:
    """Whether `layer`'s weight is one of PEFT's `target_parameters` (the whole name, or a
    suffix of dotted components, as PEFT matches them)."""
    key = f"{layer}.weight"
    return any(key == p or key.endswith(f".{p}") for p in parameters)


BIAS = ".bias"
"""How a layer on a module's bias is named: `<module>.bias` (a `Full` dense difference); every
other layer updates `<layer>.weight`, but those on a `PARAMETERS` parameter."""
PARAMETERS = ("modulation", "scale_shift_table")
"""Parameters that are no module's weight or bias, which files hold dense differences of
(`diff`) under their own path: Wan's blocks' and head's modulation in its original layout
(`blocks.0.modulation`, `head.modulation`), diffusers' `scale_shift_table` of them. A
layer so named (`blocks.0.scale_shift_table`) updates that parameter of its module."""


def layer_parameter(layer: str) -> tuple[str, str]:
    """`(module, parameter)` a layer updates: `(<module>, "bias")` for `<module>.bias`,
    `(<module>, name)` for `<module>.<name>` with a name of `PARAMETERS` (the module `""`
    for one at the top), else `(layer, "weight")`."""
    if layer.endswith(BIAS):
        return layer[: -len(BIAS)], "bias"
    module, _, name = layer.rpartition(".")
    if name in PARAMETERS:
        return module, name
    return layer, "weight"


def parameter_key(layer: str) -> str:
    """The state-dict key of the parameter a layer updates: `<module>.bias`, `<layer>.weight`,
    or a `PARAMETERS` layer's own name."""
    module, parameter = layer_parameter(layer)
    return f"{module}.{parameter}" if module else parameter


def parameter_shapes(base: Base) -> dict[str, tuple[int, ...]]:
    """`{key: shape}` of every parameter of `base` named as a `PARAMETERS` layer is (its last
    name one of them): a checkpoint's keys, an `nn.Module`'s parameters; none for a dict of
    weight shapes."""
    if isinstance(base, nn.Module):
        named = base.named_parameters(remove_duplicate=False)
        return {key: tuple(p.shape) for key, p in named if key.rpartition(".")[2] in PARAMETERS}
    if isinstance(base, (str, os.PathLike)):
        base = Checkpoint(base)
    if isinstance(base, Checkpoint):
        return {
            key: info.shape
            for key, info in base.infos.items()
            if key.rpartition(".")[2] in PARAMETERS
        }
    return {}


def original_parameter(
    path: str, keys: Iterable[str], shapes: Mapping[str, Sequence[int]]
) -> str | None:
    """The key among `keys` (a base's `parameter_shapes`) of the parameter a `PARAMETERS`
    layer's `path` names: itself, or in a diffusers model of one of `ORIGINAL_LAYOUTS` (told
    by its `shapes`, `{module: weight shape}`) the one its original path is
    (`OriginalLayout.parameters`: Wan's `blocks.0.modulation` is `blocks.0.scale_shift_table`,
    `head.modulation` the top-level `scale_shift_table`); None where there is none."""
    keys = set(keys)
    if path in keys:
        return path
    for layout in ORIGINAL_LAYOUTS:
        if not all(module in shapes for module in layout.tells):
            continue
        for original, theirs in layout.parameters.items():
            pattern = re.escape(original).replace(r"\.N\.", r"\.(\d+)\.")
            if match := re.fullmatch(pattern, path):
                block = f".{match.group(1)}." if match.groups() else ".N."
                found = theirs.replace(".N.", block)
                if found in keys:
                    return found
    return None


def bias_shapes(base: Base) -> dict[str, tuple[int, ...]]:
    """`{module name: bias shape}` of every module with a bias in `base` (a checkpoint's
    `<name>.bias` keys, an `nn.Module`'s biases); none for a dict of weight shapes."""
    if isinstance(base, nn.Module):
        return {
            name: tuple(module.bias.shape)
            for name, module in base.named_modules(remove_duplicate=False)
            if isinstance(getattr(module, "bias", None), torch.Tensor)
        }
    if isinstance(base, (str, os.PathLike)):
        base = Checkpoint(base)
    if isinstance(base, Checkpoint):
        return {
            key[: -len(BIAS)]: info.shape for key, info in base.infos.items() if key.endswith(BIAS)
        }
    return {}
