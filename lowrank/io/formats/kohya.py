"""kohya / sd-scripts and LyCORIS files: one safetensors file, layers named kohya's way.

Each layer is a stem `<prefix>_<module path, dots as underscores>` (`names.KOHYA_PREFIXES`)
and its parts, `<stem>.<part>`:

- LoRA / LoCon: `lora_down.weight (r, in[, *k])`, `lora_up.weight (out, r[, 1…])`; with
  `lora_mid.weight (r, r, *k)` the Tucker form (`down` and `up` are then 1×1) of a
  convolution with a kernel beyond 1×1 (a Tucker2 elsewhere is written folded, a LoRA);
- LoHa: `hada_w1_a (out, r)`, `hada_w1_b (r, in·K)`, `hada_w2_a`, `hada_w2_b`; with Tucker
  cores `hada_t1`, `hada_t2 (r, r, *k)` the `a` factors are `(r, out)` and `b` `(r, in)`
  (written only for a kernel beyond 1×1, as `lora_mid` and `lokr_t2`: elsewhere folded);
- LoKr: `lokr_w1 (a, c)` or `lokr_w1_a (a, r)`, `lokr_w1_b (r, c)`; `lokr_w2 (b, d, *k)` or
  `lokr_w2_a (b, r)`, `lokr_w2_b (r, d·K)`, or with `lokr_t2 (r, r, *k)`: `lokr_w2_a (r, b)`,
  `lokr_w2_b (r, d)`;
- LyCORIS full: `diff`, the dense ΔW of the weight (a `Full` form, scale 1; an `alpha`
  beside it is ignored, as LyCORIS' full module and ComfyUI ignore it);
- `diff_b (out,)` beside any of these, or alone: the dense difference of the module's bias,
  the layer `<stem>.bias` (a 1-D `Full` form);
- `dora_scale` beside any of these (LyCORIS' `dora_wd`): a DoRA magnitude, `(out, 1, 1…)`
  or `(1, in, 1…)` (`formats.dora`);
- `alpha`, a scalar: scale = alpha / r with r the rows of `lora_down` / `hada_w1_b` / the
  LoKr `_b` factors; no alpha, or an alpha of 0 (as kohya and LyCORIS read it), means
  alpha = r; a LoKr with dense `w1` and `w2` has scale 1.

`ss_*` metadata is kept (hashes of the tensors, `sshs_*` and `modelspec.hash_sha256`, are
not). Files written
here also record each stem's module path in the metadata key `lowrank_module_names`, so they
read back without the base model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from ..._checks import require_ndim
from ..._factor_space import squared
from ...errors import ConversionError, FileFormatError
from ...forms import (
    CP,
    DoRA,
    Factors,
    Full,
    LoHa,
    LoKr,
    LoRA,
    Tucker2,
    alpha_rank,
    scale_from_alpha,
    update_of,
)
from ..adapter import Adapter
from ..files import Staging, parse_json, require_safetensors, save_small
from ..names import (
    BIAS,
    KOHYA_PREFIXES,
    ORIGINAL_PREFIX,
    ORIGINAL_TEXT_ENCODERS,
    ORIGINAL_TEXT_PREFIX,
    PARAMETERS,
    T5_ENCODER,
    kohya_components,
    kohya_prefix,
    kohya_text_module,
    kohya_text_paths,
    layer_parameter,
    original_component,
    original_pipeline,
    original_text_components,
    split_stem,
    t5_refusal,
    unet_named_transformer,
)
from . import dora
from .common import (
    CONV1D_KEY,
    adapter_tensors,
    build,
    cp_refusal,
    exact_fold,
    full_at_scale_one,
    lora_only,
    one_dtype,
    parameter_refusal,
    recorded_list,
)
from .peft import require_supported_keys

NAMES_KEY = "lowrank_module_names"
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
PARAMETERS_KEY = "lowrank_target_parameters"
"""Metadata of the layers that update a weight as stored (`Adapter.target_parameters`)."""
EMBEDDINGS_KEY = "lowrank_embeddings"
"""Metadata of the layers that are LoRAs of an `nn.Embedding`'s table (`Adapter.embeddings`),
which PEFT output then holds as `lora_embedding_A` / `_B` without a base to tell them."""
LORA_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL_PART, BIAS_PART = "diff", "diff_b"
PARTS = frozenset(
    (*LORA_PARTS, *LOHA_PARTS, *LOKR_PARTS, FULL_PART, BIAS_PART, "alpha", dora.LYCORIS_PART)
)
_UNSUPPORTED = {
    "lokr_t1": "a LoKr w1 Tucker core (lokr_t1)",
    **dict.fromkeys(("oft_blocks", "rescale"), "LyCORIS OFT / BOFT (oft_blocks, rescale)"),
    **dict.fromkeys(("on_input", "weight"), "LyCORIS IA³ (weight, on_input)"),
    **dict.fromkeys(
        ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"), "LyCORIS GLoRA"
    ),
    **dict.fromkeys(("w_norm", "b_norm"), "LyCORIS norm layers (w_norm, b_norm)"),
    **dict.fromkeys(
        ("q_layer.weight", "p_layer.weight", "lambda_layer"),
        "LyCORIS T-LoRA (q_layer, p_layer, lambda_layer)",
    ),
}
# A LoKr part is stored dense or factored, never both: (dense part, its factored parts).
_EITHER = (
    ("lokr_w1", ("lokr_w1_a", "lokr_w1_b")),
    ("lokr_w2", ("lokr_w2_a", "lokr_w2_b", "lokr_t2")),
)
DEFAULT_PREFIX = "lora_unet"
_PEFT_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
"""PEFT's factor names, in a diffusion model's file in its original layout (`read_original`),
and kohya's."""


def _units(tensor: torch.Tensor, ndim: int) -> torch.Tensor:
    """`tensor (m, n)` with unit axes appended up to `ndim` dimensions."""
    return tensor.reshape(*tensor.shape[:2], *([1] * (ndim - 2)))


def _matrix(parts: Mapping[str, torch.Tensor], part: str, layout: str) -> torch.Tensor:
    """The part `part`, which LyCORIS stores as a matrix `layout`; `ShapeError` naming it
    otherwise (it is reshaped and transposed as one)."""
    tensor = parts[part]
    require_ndim(part, tensor, (2,), layout)
    return tensor


def _tucker(parts: Mapping[str, torch.Tensor], a: str, b: str, core: str) -> Tucker2:
    """A LyCORIS Tucker chain `ΔW = Σ core[i, j] a[i, out] b[j, in]` (parts `a (r, out)`,
    `b (r, in)`, `core (r, r, *k)`) as `Tucker2(down=b, mid=core, up=aᵀ)`."""
    mid = parts[core]
    up = _matrix(parts, a, "(r, out)").t()
    down = _matrix(parts, b, "(r, in)")
    return Tucker2(_units(down, mid.ndim), mid, _units(up, mid.ndim))


def _lora(parts: Mapping[str, torch.Tensor]) -> LoRA | Tucker2:
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if up.ndim == 2 < down.ndim:  # LyCORIS DyLoRA stores a convolution's up as (out, r)
        up = _units(up, down.ndim)
    if "lora_mid.weight" in parts:
        return Tucker2(down, parts["lora_mid.weight"], up)
    return LoRA(down, up)


def _loha_half(parts: Mapping[str, torch.Tensor], i: int) -> LoRA | Tucker2:
    a, b, core = f"hada_w{i}_a", f"hada_w{i}_b", f"hada_t{i}"
    return LoRA(parts[b], parts[a]) if core not in parts else _tucker(parts, a, b, core)


def _loha(parts: Mapping[str, torch.Tensor]) -> LoHa:
    if ("hada_t1" in parts) != ("hada_t2" in parts):
        raise FileFormatError("hada_t1 and hada_t2 come together (both halves are Tucker chains)")
    return LoHa(_loha_half(parts, 1), _loha_half(parts, 2))


def _lokr(parts: Mapping[str, torch.Tensor]) -> LoKr:
    if "lokr_w1" in parts:
        w1: torch.Tensor | LoRA = parts["lokr_w1"]
    else:
        w1 = LoRA(parts["lokr_w1_b"], parts["lokr_w1_a"])
    if "lokr_w2" in parts:
        return LoKr(w1, parts["lokr_w2"])
    if "lokr_t2" in parts:
        return LoKr(w1, _tucker(parts, "lokr_w2_a", "lokr_w2_b", "lokr_t2"))
    down = parts["lokr_w2_b"]
    return LoKr(w1, LoRA(down, _units(_matrix(parts, "lokr_w2_a", "(b, r)"), down.ndim)))


_BUILDERS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, ...], ...], Callable]] = {
    # kind: (its parts, the parts that must be present (one of each group), builder)
    "lora": (LORA_PARTS, (("lora_down.weight",), ("lora_up.weight",)), _lora),
    "loha": (LOHA_PARTS, (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)), _loha),
    "lokr": (LOKR_PARTS, (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")), _lokr),
    "full": ((FULL_PART,), ((FULL_PART,),), lambda parts: Full(parts[FULL_PART])),
}


def _form(stem: str, parts: dict[str, torch.Tensor], source: Path) -> Factors:
    """The unscaled form of one layer from its parts (alpha excluded)."""
    kinds = [k for k, (names, _, _) in _BUILDERS.items() if any(p in parts for p in names)]
    if len(kinds) != 1:
        found = sorted(parts)
        raise FileFormatError(f"{source}: layer {stem!r} has parts {found}: not one known form")
    _, required, builder = _BUILDERS[kinds[0]]
    for group in required:
        if not any(p in parts for p in group):
            raise FileFormatError(f"{source}: layer {stem!r} lacks {stem}.{' or '.join(group)}")
    for pair in (("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b")):
        if (pair[0] in parts) != (pair[1] in parts):
            raise FileFormatError(f"{source}: layer {stem!r} has one of {list(pair)} only")
    for dense, factored in _EITHER:
        both = [f"{stem}.{p}" for p in (dense, *factored) if p in parts]
        if dense in parts and len(both) > 1:
            raise FileFormatError(
                f"{source}: layer {stem!r} has {', '.join(both)}: a LoKr part is stored dense "
                f"({dense}) or factored ({', '.join(factored)}), not both"
            )
    return build(source, stem, lambda: builder(parts))


def _alpha(stem: str, parts: dict[str, torch.Tensor], rank: int | None, source: Path) -> float:
    """The layer's alpha: the stored scalar, or the rank (1 for a dense LoKr) when there is
    none or it is 0, which kohya and LyCORIS both read as "alpha = rank"."""
    if "alpha" not in parts:
        return float(rank or 1)
    alpha = parts["alpha"]
    if alpha.numel() != 1:
        raise FileFormatError(
            f"{source}: {stem}.alpha must be a scalar, got shape {tuple(alpha.shape)}"
        )
    if alpha.dtype == torch.bool:
        raise FileFormatError(f"{source}: {stem}.alpha must be a real number, got {alpha.dtype}")
    value = float(alpha.reshape(()))
    return value if value != 0 else float(rank or 1)


def _recorded_names(
    metadata: dict[str, str], stems: list[str]
) -> tuple[dict[str, str], dict[str, str | None]] | None:
    """The module paths a lowrank-written file recorded, if they match its stems exactly,
    one module per stem, and the stems' components (`kohya_components`)."""
    try:
        names = parse_json(metadata.get(NAMES_KEY, "null"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(names, dict) or set(names) != set(stems):
        return None
    if not all(isinstance(name, str) for name in names.values()):
        return None
    # the component the T5's layers (`lora_te3`) were written from, where the file tells none
    recorded = {n.partition(".")[0] for s, n in names.items() if s.startswith("lora_te3_")}
    try:
        t5 = recorded.pop() if len(recorded) == 1 else None
        components = kohya_components(stems, "", metadata, t5)
    except FileFormatError:
        return None
    for stem, name in names.items():
        (stem_module, parameter), (name, own) = layer_parameter(stem), layer_parameter(name)
        body = split_stem(stem_module, "")[1]
        component = components[stem]
        if parameter != own or (component and not name.startswith(component + ".")):
            return None
        path = name[len(component) + 1 :] if component else name
        spellings = (path, kohya_text_paths(component, [path])[path])
        if body not in {p.replace(".", "_") for p in spellings}:
            return None
    if len(set(names.values())) != len(names):  # two stems on one module (lora_te_, lora_te1_)
        return None
    return names, components


def _layers(
    grouped: Mapping[str, dict[str, torch.Tensor]], weights: Path
) -> tuple[dict[str, Factors], dict[str, float]]:
    """`{layer: form}` with each scale resolved from its alpha, and `{layer: alpha}`, of the
    layers' parts (`{layer: {part: tensor}}`)."""
    layers: dict[str, Factors | DoRA] = {}
    alphas = {}
    for stem, parts in grouped.items():
        bias = parts.pop(BIAS_PART, None)
        if bias is not None:
            require_ndim(f"{weights}: {stem}.{BIAS_PART}", bias, (1,), "(out,)")
            layers[stem + BIAS] = build(weights, stem, lambda b=bias: Full(b))
            if not parts:  # a bias difference alone
                continue
        magnitude = parts.pop(dora.LYCORIS_PART, None)
        if magnitude is not None and not set(parts) - {"alpha"}:
            raise FileFormatError(
                f"{weights}: key {stem}.{dora.LYCORIS_PART} is a DoRA magnitude of a layer with "
                "no factors"
            )
        form = _form(stem, parts, weights)
        if isinstance(form, Full):
            # LyCORIS' full module and ComfyUI's `diff` patch add the difference as it is and
            # never read an alpha beside it: one is checked as a scalar and left out
            _alpha(stem, parts, None, weights)
            parts.pop("alpha", None)
        if isinstance(form, Full) and set(parts) != {FULL_PART}:
            extra = sorted(set(parts) - {FULL_PART}) + ([dora.LYCORIS_PART] if magnitude else [])
            raise FileFormatError(
                f"{weights}: layer {stem!r} is a dense difference ({stem}.{FULL_PART}), which "
                f"has no rank or magnitude, beside {', '.join(extra)}"
            )
        rank = alpha_rank(form)
        alpha = _alpha(stem, parts, rank, weights)
        if rank is not None:
            scale = build(weights, stem, lambda a=alpha, r=rank: scale_from_alpha(a, r))
            form = build(weights, stem, lambda f=form, s=scale: replace(f, scale=s))
        if magnitude is not None:
            form = dora.lycoris_dora(form, magnitude, stem, weights)
        layers[stem] = form
        alphas[stem] = alpha
    return layers, alphas


def original_layout(keys: Iterable[str]) -> bool:
    """Whether an adapter file's `keys` name a diffusion model's modules in its original
    layout, under `ORIGINAL_PREFIX`, or its text encoders' as ComfyUI does beside them, under
    `ORIGINAL_TEXT_PREFIX` (ComfyUI's and ai-toolkit's files): any of them does."""
    return any(key.startswith((ORIGINAL_PREFIX, ORIGINAL_TEXT_PREFIX)) for key in keys)


# a part of an original-layout key, longest first (`lora_down.weight` before IA³'s `weight`);
# PEFT's factor names are kohya's LoRA parts
_ORIGINAL_PARTS = sorted((*PARTS, *_UNSUPPORTED, *_PEFT_PARTS), key=len, reverse=True)
_KNOWN_PARTS = ", ".join(sorted((*PARTS, *_PEFT_PARTS)))
# the kohya prefixes of text encoders, whose layers may stand beside `diffusion_model.` ones
_TEXT_PREFIXES = frozenset(p for p, c in KOHYA_PREFIXES.items() if c and c.startswith("text_"))


def _module_part(key: str, body: str, layout: str, weights: Path) -> tuple[str, str]:
    """`(module, part)` of an original-layout key whose `body` is `<module>.<part>` (the key
    is `layout`); `FileFormatError` naming the key for no known part or no module, or a part
    of a feature lowrank does not read."""
    part = next((p for p in _ORIGINAL_PARTS if f".{body}".endswith(f".{p}")), None)
    module = body[: -len(part) - 1] if part else ""
    if part is None or not module:
        require_supported_keys([key], weights)
        raise FileFormatError(
            f"{weights}: key {key!r} is not {layout} with a LoRA part (known parts: "
            f"{_KNOWN_PARTS})"
        )
    if part in _UNSUPPORTED:
        raise FileFormatError(f"{weights}: key {key!r}: {_UNSUPPORTED[part]} is not supported")
    return module, part


def _original_key(key: str, weights: Path) -> tuple[str, str, str]:
    """`(owner, module, part)` of a key of a file in the original layout: owner "" for a
    diffusion model's `diffusion_model.<module>.<part>`, the encoder for ComfyUI's
    `text_encoders.<encoder>.transformer.<module>.<part>`, the prefix for a text encoder's
    kohya layer `lora_te1_<body>.<part>` (its module `kohya_text_module`'s);
    `FileFormatError` naming the key for any other."""
    if key.startswith(ORIGINAL_PREFIX):
        body = key[len(ORIGINAL_PREFIX) :]
        return ("", *_module_part(key, body, f"{ORIGINAL_PREFIX}<module>.<part>", weights))
    if key.startswith(ORIGINAL_TEXT_PREFIX):
        encoder, found, body = key[len(ORIGINAL_TEXT_PREFIX) :].partition(".transformer.")
        layout = f"{ORIGINAL_TEXT_PREFIX}<encoder>.transformer.<module>.<part>"
        if not found or not encoder or "." in encoder:
            raise FileFormatError(f"{weights}: key {key!r} is not {layout}")
        return (encoder, *_module_part(key, body, layout, weights))
    stem, _, part = key.partition(".")
    prefix = next((p for p in _TEXT_PREFIXES if stem.startswith(f"{p}_")), None)
    if prefix is None:
        raise FileFormatError(
            f"{weights}: key {key!r} is not under {ORIGINAL_PREFIX!r} or "
            f"{ORIGINAL_TEXT_PREFIX!r} as the file's other keys are, nor a text encoder's "
            f"kohya layer ({', '.join(sorted(p + '_' for p in _TEXT_PREFIXES))}): one file "
            "names its diffusion model's layers one way"
        )
    if part in _UNSUPPORTED:
        raise FileFormatError(f"{weights}: key {key!r}: {_UNSUPPORTED[part]} is not supported")
    if part not in PARTS and part not in _PEFT_PARTS:
        raise FileFormatError(
            f"{weights}: key {key!r} is not a kohya/LyCORIS layer part (known parts: "
            f"{_KNOWN_PARTS})"
        )
    module = kohya_text_module(stem[len(prefix) + 1 :])
    if module is None:
        raise FileFormatError(
            f"{weights}: key {key!r}: a text encoder's kohya layer beside "
            f"{ORIGINAL_PREFIX!r} ones is read without a base, so it must name a module of a "
            "CLIP text model (text_model_encoder_layers_N_self_attn_q_proj, …_mlp_fc1, …) or "
            "a T5 encoder (encoder_block_N_layer_N_SelfAttention_q, …_DenseReluDense_wi_0, …)"
        )
    return prefix, module, part


def _original_components(
    owners: Mapping[str, str], diffusion: list[str], metadata: Mapping[str, str], weights: Path
) -> dict[str, str]:
    """`{owner: pipeline component}` of the owners of a file's keys (`{owner: its first
    key}`, `_original_key`), `diffusion` the module paths of its `diffusion_model.` layers:
    those `original_component`'s, text encoders' (ComfyUI's, kohya prefixes)
    `original_text_components`' (with the file's `metadata`). `FileFormatError` naming the
    key of an encoder that names no component, or none the file tells."""
    texts = original_text_components([o for o in owners if o], diffusion, metadata)
    components = {}
    for owner, key in owners.items():
        if not owner:
            components[owner] = original_component(diffusion)
        elif texts[owner] is not None:
            components[owner] = str(texts[owner])
        elif owner in (T5_ENCODER, "lora_te3"):
            raise FileFormatError(
                f"{weights}: {t5_refusal(f'key {key!r}')}: Flux's layers on a module only it "
                "has (diffusion_model.double_blocks.N.img_mod, guidance_in, …) or clip_l "
                "layers beside its blocks, Chroma's on its distilled_guidance_layer, SD3's "
                "joint_blocks.N. or clip_g layers"
            )
        else:
            raise FileFormatError(
                f"{weights}: key {key!r}: text encoder {owner!r} is no pipeline component "
                f"lowrank knows (it reads {', '.join(ORIGINAL_TEXT_ENCODERS)})"
            )
    return components


def read_original(
    path: Path, weights: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]
) -> Adapter:
    """A LoRA whose keys are `diffusion_model.<module>.<part>` (`original_layout`), as
    ComfyUI and ai-toolkit save them: the parts are kohya's / LyCORIS' (with `.alpha`), or
    PEFT's `lora_A.weight` / `lora_B.weight` (down and up, with or without `.alpha`), each
    layer's scale alpha / r and 1 without an alpha, as diffusers reads them. The layers are
    the pipeline's `unet` for a Stable Diffusion UNet's file (LDM paths,
    `input_blocks.4.1.proj_in`), else its `transformer` (a DiT's; `original_component`,
    of the whole file), named by their module paths in the model's original layout
    (`unet.input_blocks.4.1.proj_in`, `transformer.double_blocks.0.img_attn.qkv`). Text
    encoders' layers beside them, as ComfyUI saves them
    (`text_encoders.clip_l.transformer.<module>.<part>`) or kohya names them
    (`lora_te1_text_model_encoder_layers_0_mlp_fc1.<part>`), are their components'
    (`original_text_components`: `text_encoder.text_model.encoder.layers
    .0.mlp.fc1`; a kohya one's module is `kohya_text_module`'s). The format is `diffusers`
    for PEFT's parts, else `kohya` (`lycoris` with LoHa or LoKr layers). Any other key (a
    kohya `lora_unet_…` one), a part no format has, a text encoder of no component the file
    tells, or one factor in two keys is a `FileFormatError` naming it."""
    parsed = {key: _original_key(key, weights) for key in tensors}
    owners: dict[str, str] = {}
    for key, (owner, _, _) in parsed.items():
        owners.setdefault(owner, key)
    diffusion = [module for owner, module, _ in parsed.values() if not owner]
    components = _original_components(owners, diffusion, metadata, weights)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[tuple[str, str], str] = {}  # (layer, factor) → its key
    peft_parts = False
    for key, (owner, module, part) in parsed.items():
        name = f"{components[owner]}.{module}"
        factor = _PEFT_PARTS.get(part, part)
        peft_parts |= factor != part
        first = keys.setdefault((name, factor), key)
        if first != key:
            raise FileFormatError(
                f"{weights}: layer {name!r} has keys {first!r} and {key!r} for one factor "
                f"({factor}); a factor is spelled one way"
            )
        grouped.setdefault(name, {})[factor] = tensors[key]
    layers, alphas = _layers(grouped, weights)
    lycoris = any(isinstance(f, (LoHa, LoKr, Full, DoRA)) for f in layers.values())
    texts = {c for c in components.values() if c.startswith("text_")}
    pipeline = original_pipeline(diffusion) if texts else ()
    if "lora_te1" in owners:  # the first of two text encoders, as in sd-scripts
        pipeline = tuple(sorted({*pipeline, "text_encoder", "text_encoder_2"}))
    return Adapter(
        layers,
        "lycoris" if lycoris else "diffusers" if peft_parts else "kohya",
        components=tuple(sorted(set(components.values()))),
        alphas=alphas,
        metadata=metadata,
        source=path,
        pipeline=pipeline,
    )


def read(path: Path) -> Adapter:
    """A kohya / LyCORIS file as an `Adapter` (kohya names unless the file records paths);
    one in a diffusion model's original layout (`diffusion_model.…`) by `read_original`."""
    weights = require_safetensors(path)
    tensors, metadata = adapter_tensors(weights)
    if original_layout(tensors):
        return read_original(path, weights, tensors, metadata)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")
        if part in _UNSUPPORTED:
            raise FileFormatError(f"{weights}: key {key!r}: {_UNSUPPORTED[part]} is not supported")
        if part not in PARTS:
            raise FileFormatError(
                f"{weights}: key {key!r} is not a kohya/LyCORIS layer part (known parts: "
                f"{', '.join(sorted(PARTS))})"
            )
        split_stem(stem, weights)
        grouped.setdefault(stem, {})[part] = tensor
    layers, alphas = _layers(grouped, weights)
    prefixes = {split_stem(stem, weights)[0] for stem in layers}
    whole_model = sorted(p for p in prefixes if KOHYA_PREFIXES[p] is None)
    lycoris = "lycoris" in prefixes or any(
        isinstance(f, (LoHa, LoKr, Full, DoRA)) for f in layers.values()
    )
    adapter = Adapter(
        layers,
        "lycoris" if lycoris else "kohya",
        alphas=alphas,
        metadata=metadata,
        kohya_names=True,
        source=path,
        target_parameters=recorded_list(metadata, path, PARAMETERS_KEY),
        embeddings=recorded_list(metadata, path, EMBEDDINGS_KEY),
        conv1d=recorded_list(metadata, path, CONV1D_KEY),
        prefix=whole_model[0] if whole_model else None,
        # `lora_te1` (not `lora_te`) is the first of two text encoders in sd-scripts
        pipeline=("text_encoder", "text_encoder_2") if "lora_te1" in prefixes else (),
    )
    recorded = _recorded_names(metadata, list(layers))
    if recorded is None:
        return adapter
    names, components = recorded
    return adapter.renamed(names, tuple(sorted({c for c in components.values() if c})))


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A factor `(m, n, *k)` as LyCORIS stores it, `(m, n·K)`."""
    return tensor.reshape(tensor.shape[0], -1)


def _chain(a: str, b: str, core: str, half: object) -> dict[str, torch.Tensor]:
    """LyCORIS parts of one LoHa half or LoKr `w2`: a `LoRA` plain (`a (out, r)`,
    `b (r, in·K)`), a `Tucker2` as a Tucker chain (`a (r, out)`, `b (r, in)`, `core`)."""
    if isinstance(half, Tucker2):
        rank_out, rank_in = half.rank
        if rank_out != rank_in:
            raise ConversionError(
                f"{core} would have ranks ({rank_out}, {rank_in}); LyCORIS reads it as "
                "(r, r, *k), so a Tucker chain needs equal inner ranks"
            )
        up = half.up.reshape(half.up.shape[0], rank_out)
        return {a: up.t().contiguous(), b: half.down.reshape(rank_in, -1), core: half.mid}
    if isinstance(half, LoRA):
        return {a: _flat(half.up), b: _flat(half.down)}
    raise ConversionError(
        f"{a.removesuffix('_a')} is a {type(half).__name__}; LyCORIS stores it as a LoRA or a "
        "Tucker chain"
    )


def _lokr_w1(w1: object) -> dict[str, torch.Tensor]:
    """The LyCORIS parts of a LoKr `w1`: dense `lokr_w1 (a, c)`, or `lokr_w1_a (a, r)` and
    `lokr_w1_b (r, c)` of a linear LoRA."""
    if isinstance(w1, torch.Tensor):
        return {"lokr_w1": w1}
    if isinstance(w1, LoRA) and w1.down.ndim == 2:
        return {"lokr_w1_a": w1.up, "lokr_w1_b": w1.down}
    raise ConversionError(
        f"LoKr w1 is a {type(w1).__name__}; LyCORIS stores w1 as a dense matrix or a linear LoRA"
    )


def _off_kernel(tucker: Tucker2) -> bool:
    """Whether `tucker` is of a linear layer or a convolution with a 1×1… kernel, where
    LyCORIS builds no Tucker core (`lora_mid`, `hada_t1` / `hada_t2`, `lokr_t2`): its
    loader fails on a file with one there."""
    return all(k == 1 for k in tucker.mid.shape[2:])


def stored_form(form: Factors) -> Factors:
    """`form` as kohya / LyCORIS files hold it, the same ΔW: a Tucker2 with equal inner ranks
    (`lora_mid (r, r, *k)`, `squared`), and every Tucker part off the kernel (`_off_kernel`)
    folded into its exactly equal LoRA (`ΔW = up · mid · down` is the LoRA of
    `down' = mid · down`, `exact_fold`): a Tucker2 layer, both halves of a LoHa, a LoKr's
    `w2` (kept a Tucker chain when `w1` is a LoRA of another rank than the fold's)."""
    if isinstance(form, Tucker2):
        return exact_fold(form) if _off_kernel(form) else squared(form)
    if isinstance(form, LoHa) and isinstance(form.first, Tucker2) and _off_kernel(form.first):
        return LoHa(*one_dtype(exact_fold(form.first), exact_fold(form.second)), form.scale)
    if isinstance(form, LoKr) and isinstance(form.w2, Tucker2) and _off_kernel(form.w2):
        w2 = exact_fold(form.w2)
        if isinstance(form.w1, torch.Tensor) or form.w1.rank == w2.rank:
            return LoKr(*one_dtype(form.w1, w2), form.scale)
    return form


def _parts(form: Factors) -> dict[str, torch.Tensor]:
    """The kohya / LyCORIS parts of one layer (alpha excluded), from which the reader gets
    back exactly `form`'s factors; `ConversionError` for anything they cannot hold."""
    if isinstance(form, LoRA):
        return {"lora_down.weight": form.down, "lora_up.weight": form.up}
    if isinstance(form, Tucker2):
        return {
            "lora_down.weight": form.down,
            "lora_mid.weight": form.mid,
            "lora_up.weight": form.up,
        }
    if isinstance(form, LoHa):
        if isinstance(form.first, Tucker2) != isinstance(form.second, Tucker2):
            raise ConversionError("LyCORIS LoHa halves are both Tucker chains or neither")
        return {
            **_chain("hada_w1_a", "hada_w1_b", "hada_t1", form.first),
            **_chain("hada_w2_a", "hada_w2_b", "hada_t2", form.second),
        }
    if isinstance(form, LoKr):
        w2 = (
            {"lokr_w2": form.w2}
            if isinstance(form.w2, torch.Tensor)
            else _chain("lokr_w2_a", "lokr_w2_b", "lokr_t2", form.w2)
        )
        return {**_lokr_w1(form.w1), **w2}
    raise ConversionError(f"a {type(form).__name__} has no kohya / LyCORIS layout")


def _alpha_tensor(value: float) -> torch.Tensor:
    """A scalar alpha: float32 when that holds it exactly, else float64."""
    single = torch.tensor(value, dtype=torch.float32)
    return single if float(single) == value else torch.tensor(value, dtype=torch.float64)


def _stems(adapter: Adapter, default_prefix: str) -> dict[str, tuple[str, str]]:
    """Layer name → (kohya stem, the module path it records, under the component the stem
    reads back as, `kohya_components`).

    Two names with one stem are a `ConversionError`.
    """
    if adapter.kohya_names:
        return {n: (n, n) for n in adapter.layers}
    pipeline = (*adapter.components, *adapter.pipeline)
    paths = {}
    for name in adapter.layers:
        component = adapter.component_of(name) or None
        module, parameter = layer_parameter(name)  # a bias layer's stem: its module's + `.bias`
        if parameter in PARAMETERS:
            raise ConversionError(parameter_refusal(name))
        paths[name] = (component, module[len(component) + 1 :] if component else module)
    # a transformer that sd-scripts and musubi-tuner name `lora_unet` (Flux in BFL's layout,
    # Wan and HunyuanVideo in their own, Qwen-Image) is so, unless the pipeline's UNet is
    unet_named = "unet" not in pipeline and unet_named_transformer(
        path for component, path in paths.values() if component == "transformer"
    )
    by_component: dict[str | None, list[str]] = {}
    for component, path in paths.values():
        by_component.setdefault(component, []).append(path)
    spelled = {c: kohya_text_paths(c, ps) for c, ps in by_component.items()}
    named: dict[str, str] = {}
    for name, (component, path) in paths.items():
        prefix = kohya_prefix(component, pipeline, default_prefix, unet_named)
        stem = f"{prefix}_{spelled[component][path].replace('.', '_')}"
        stem += BIAS if layer_parameter(name)[1] == "bias" else ""
        if stem in named:
            raise ConversionError(f"layers {named[stem]!r} and {name!r} both become {stem!r}")
        named[stem] = name
    owners = kohya_components(named, "", t5="text_encoder_3")  # `lora_te3` is written for it
    recorded = {}
    for stem, name in named.items():
        path = paths[name][1] + (BIAS if stem.endswith(BIAS) else "")
        recorded[name] = (stem, f"{owners[stem]}.{path}" if owners[stem] else path)
    return recorded


def write(
    adapter: Adapter, out: Path, staging: Staging, fmt: str, default_prefix: str
) -> list[Path]:
    """Stage a kohya (LoRA, LoCon, Tucker) or LyCORIS (also LoHa, LoKr) file at `out`."""
    lycoris = fmt == "lycoris"  # LoHa and LoKr layers too
    layers = dict(adapter.layers if lycoris else lora_only(adapter, "kohya", mid=True))
    stems = _stems(adapter, default_prefix)
    tensors: dict[str, torch.Tensor] = {}
    for name, form in layers.items():
        if isinstance(update_of(form), CP):
            raise ConversionError(cp_refusal(name, update_of(form), fmt))
        stem = stems[name][0]
        if isinstance(form, Full):  # LyCORIS full: ΔW itself, at scale 1, with no alpha
            module, parameter = layer_parameter(stem)
            part = BIAS_PART if parameter == "bias" else FULL_PART
            tensors[f"{module}.{part}"] = build(out, name, lambda f=form: full_at_scale_one(f))
            continue
        extra = dora.lycoris_parts(form) if isinstance(form, DoRA) else {}
        form = update_of(form)
        form = build(out, name, lambda f=form: stored_form(f))
        parts = {**build(out, name, lambda f=form: _parts(f)), **extra}
        alpha = adapter.alpha(name, form, rslora=False)
        if alpha is None and form.scale != 1.0:
            raise ConversionError(
                f"layer {name!r}: a LoKr with dense w1 and w2 has scale 1 in LyCORIS files, "
                f"but this one has scale {form.scale}"
            )
        if alpha == 0:
            raise ConversionError(
                f"layer {name!r} has scale {form.scale}, which kohya / LyCORIS files cannot "
                "hold: its alpha would be 0, and kohya and LyCORIS read an alpha of 0 as "
                "alpha = rank (scale 1)"
            )
        stored = adapter.alphas.get(name, 1.0) if alpha is None else alpha
        tensors.update({f"{stem}.{part}": t for part, t in parts.items()})
        tensors[f"{stem}.alpha"] = _alpha_tensor(stored)
    # hashes of the tensor data (sd-scripts' `sshs_*`, the model spec's `hash_sha256`)
    # describe the file read, whose bytes these are not (new factors, float32 alphas)
    own = (NAMES_KEY, PARAMETERS_KEY, EMBEDDINGS_KEY, CONV1D_KEY, *HASH_KEYS)
    metadata = {k: v for k, v in adapter.metadata.items() if k not in own}
    if adapter.format not in ("kohya", "lycoris"):
        metadata = {}
    if not adapter.kohya_names:
        metadata[NAMES_KEY] = json.dumps(dict(stems[n] for n in layers), sort_keys=True)
    if adapter.target_parameters:
        metadata[PARAMETERS_KEY] = json.dumps(sorted(adapter.target_parameters))
    if adapter.embeddings:
        metadata[EMBEDDINGS_KEY] = json.dumps(sorted(adapter.embeddings))
    if adapter.conv1d:
        metadata[CONV1D_KEY] = json.dumps(sorted(adapter.conv1d))
    save_small(staging, tensors, out, metadata)
    return [out]
