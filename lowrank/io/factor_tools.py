"""Factor-space tools on adapter files: `extract_adapter` (an adapter from a fine-tune),
`resize_adapter` (a lower rank) and `combine_adapters` (one adapter for a weighted sum).

Extraction streams the two checkpoints one weight at a time and decomposes each
difference (`decompose.svd`, "adaptive": randomised with a convergence check, exact when
that fails; `decompose.tucker2` for Tucker layers). Resizing and combining work on the
factors (`decompose.resize`, `decompose.combine`) and never form a dense ΔW. Each returns
a JSON-ready report with every layer's rank and relative error; outputs are written
atomically, never over an input. The algebra is in `docs/factor_tools.md`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import _factor_space as space
from .. import decompose
from .._checks import (
    DTYPE_NAMES,
    all_finite,
    require_choice,
    require_finite,
    require_flag,
    require_int,
    require_list,
    require_name,
    require_weights,
    wider_dtype,
    work_dtype,
)
from .._text import aligned, sizes_text
from ..errors import (
    ArgumentError,
    ConversionError,
    DeviceError,
    DTypeError,
    FileFormatError,
    NonFiniteError,
    RankError,
    ShapeError,
    TargetError,
)
from ..forms import (
    CP,
    Factors,
    Full,
    LoHa,
    LoKr,
    LoRA,
    Tucker2,
    as_lora,
    kernel_volume,
    require_factor_space,
)
from ..rank_selection import rank_rule
from ..targets import matches, parse_targets
from .adapter import (
    Adapter,
    form_name,
    joined_base_weights,
    joined_model,
    listed_rank,
    per_component,
    require_no_dora,
    require_used_component,
)
from .checkpoint import Checkpoint
from .files import CODE_DTYPES, PathLike, holds_weights, parse_json, require_outside_folders
from .formats import TRAITS, kohya, require_format
from .formats.common import exact_fold, parameter_refusal
from .formats.peft import lora_bias_layer
from .layouts import (
    require_module_layout,
    require_no_tables,
    require_runnable_convs,
    resolved_for,
    with_layouts,
)
from .merge import CHUNK_ELEMENTS, output_dtype
from .module_types import kinds, tied_weights
from .names import PARAMETERS, SD_CHECKPOINT_UNET, Base, layer_parameter, sd_checkpoint_refusal
from .quantized import Quantization, dequantized, equal_weights, rounds_to
from .store import (
    adapter_files,
    adapter_from,
    load_adapter,
    require_new_output,
    save_adapter,
    written_layers,
)

EXTRACT_FORMS = ("lora", "tucker2")
_SHOWN = 3


def _bar(items: Iterable[Any], total: int, desc: str, progress: bool) -> Iterable[Any]:
    """`items` with a tqdm bar on a terminal when `progress`."""
    return tqdm(items, total=total, desc=desc, unit="layer", disable=None if progress else True)


def layer_row(name: str, form: Factors, error: float, **extra: Any) -> dict[str, Any]:
    """One layer of a report: `name`, `form`, ΔW `shape`, `rank`, `relative_error`, and
    `extra` fields."""
    return {
        "name": name,
        "form": form_name(form),
        "shape": list(form.shape),
        "rank": listed_rank(form),
        "relative_error": error,
        **extra,
    }


# The formats that hold a Tucker layer's mid factor (`lora_mid`).


def _stored(form: Factors, fmt: str) -> Factors:
    """`form` as a file of format `fmt` holds it, so reports name what is written and
    measure its rounding: in kohya / LyCORIS files as their writer stores it
    (`kohya.stored_form`: a Tucker2 with equal inner ranks on a kernel beyond 1×1, folded
    elsewhere, as are a LoHa's or LoKr's Tucker chains there), folded into its LoCon in PEFT
    and diffusers ones (`exact_fold`); a CP as its exact LoRA (`as_lora`), which every
    format holds."""
    if isinstance(form, CP):
        return as_lora(form)
    if TRAITS[fmt].mid:
        return kohya.stored_form(form)
    return exact_fold(form) if isinstance(form, Tucker2) else form


# --- extract ---------------------------------------------------------------------------


def _device(device: str | torch.device) -> torch.device:
    """`device` as a `torch.device` that exists here, else `DeviceError`."""
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError, ValueError, OverflowError):
        raise DeviceError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if found.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for, but torch sees no CUDA device")
    if found.type not in ("cpu", "cuda"):
        raise DeviceError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return found


def _matrix_keys(checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    """`{key: shape}` of every floating `<module>.weight` with 2 to 5 dimensions."""
    return {
        key: info.shape
        for key, info in checkpoint.infos.items()
        if key.endswith(".weight") and 2 <= len(info.shape) <= 5 and holds_weights(info.dtype)
    }


def _targeted(name: str, targets: Sequence[str]) -> bool:
    return any(matches(name, pattern) for pattern in targets)


def _patterns(targets: object) -> list[str] | None:
    """`targets` as module-name patterns (`lowrank.targets.parse_targets`: a pattern string,
    comma-separated, or a list of them), or None for every weight; `TargetError` otherwise."""
    if targets is None:
        return None
    parsed = parse_targets(targets)  # type: ignore[arg-type]
    if any(parsed.values()):
        raise TargetError(
            f"extract takes module-name patterns, not per-pattern settings: {targets!r}"
        )
    return list(parsed)


def _paired_keys(
    base: Checkpoint, tuned: Checkpoint, targets: Sequence[str] | None
) -> dict[str, tuple[int, ...]]:
    """The weights to extract, checked to be in both checkpoints with one shape."""
    ours, theirs = _matrix_keys(base), _matrix_keys(tuned)
    for lacking, holder, missing in (
        (base, tuned, set(theirs) - set(ours)),
        (tuned, base, set(ours) - set(theirs)),
    ):
        for key in sorted(missing):
            if key in lacking.infos:  # there, but not a floating 2–5-D weight
                held, other = holder.infos[key], lacking.infos[key]
                kind = DTypeError if held.shape == other.shape else ShapeError
                raise kind(
                    f"{key} is {held.dtype} {tuple(held.shape)} in {holder} but {other.dtype} "
                    f"{tuple(other.shape)} in {lacking}; base and tuned must be the same model"
                )
        if missing:
            raise TargetError(
                f"{holder} has {len(missing)} weights that {lacking} lacks, e.g. "
                f"{sorted(missing)[:_SHOWN]}; base and tuned must be the same model"
            )
    for key, shape in theirs.items():
        if ours[key] != shape:
            raise ShapeError(
                f"{key} has shape {shape} in {tuned} but {ours[key]} in {base}; base and tuned "
                "must be the same model"
            )
    if targets is None:
        return dict(theirs)
    chosen = {k: s for k, s in theirs.items() if _targeted(k.removesuffix(".weight"), targets)}
    if not chosen:
        raise TargetError(f"targets {list(targets)} match no weight of {tuned}")
    return chosen


PEFT_WHOLE = ("weight", "bias")
"""The parameters of a module PEFT saves whole (`modules_to_save`)."""

_NOT_WHOLE = {
    "kohya": "kohya files hold LoRA factors only",
    "diffusers": "diffusers files hold LoRA factors of modules only",
    "lycoris": (
        "a LyCORIS file of them would not load as the fine-tune in LyCORIS itself "
        "(lycoris-lora 4.1.3): its loader drops a bias difference (diff_b) beside LoRA "
        "factors, fails on one alone, fails on a norm's 1-D diff, and reads norm "
        "differences (w_norm, b_norm) of torch LayerNorm and GroupNorm modules only"
    ),
}
"""Why `extract_adapter(whole=True)` refuses each format but PEFT."""

_CONVS = (
    "{} cannot run their LoRA as they are (grouped, dilated or not zero-padded; naming them "
    "in targets says why); extract them into kohya or lycoris files"
)

_NAME_TABLES = (
    "name them in targets to extract them (into PEFT folders as lora_embedding_A / _B, "
    "kohya and lycoris files as they are; diffusers files cannot hold them)"
)


def _require_own_weights(keys: Iterable[str], fmt: str, tuned: Checkpoint) -> None:
    """`TargetError` where a whole single-file checkpoint (its diffusion model's weights
    under `SD_CHECKPOINT_UNET`, beside its text encoders' and VAE's) would be written as
    `fmt`, which names layers by component: its keys would give names no loader maps
    (`lora_unet_model_diffusion_model_input_blocks_…`, the text encoder's and the VAE's
    layers under the UNet's prefix too). A PEFT folder names the checkpoint's own paths."""
    nested = sorted(key for key in keys if key.startswith(SD_CHECKPOINT_UNET))
    if nested and fmt != "peft":
        named = "prefix='lora_te'" if TRAITS[fmt].kohya_named else "component='text_encoder'"
        raise TargetError(
            f"{tuned}: {nested[0]} would be written as {fmt} layer "
            f"{nested[0].removesuffix('.weight')!r}, whose name no {fmt} loader maps"
            + sd_checkpoint_refusal()
            + f" (the text encoder's likewise, with {named})"
        )


def _require_untied(keys: Iterable[str], tuned: Checkpoint) -> None:
    """`ConversionError` where a weight to extract has other names in `tuned`
    (`tied_weights`: an embedding table that is also the LM head): the fine-tune changed
    them all, but an adapter on the module changes it alone where PEFT runs it, and merges
    refuse tied weights."""
    ties = tied_weights(tuned, [key.removesuffix(".weight") for key in keys])
    for name, names in ties.items():
        raise ConversionError(
            f"{tuned}: {name}.weight is also {names[0]}: the fine-tune changed both, but an "
            f"adapter on {name!r} changes that module alone where PEFT runs it, and merges "
            "refuse tied weights; save both checkpoints untied (tie_word_embeddings=False, "
            f"each its own tensor) to extract both, or leave {name!r} out of targets"
        )


def _extract_layer(
    delta: torch.Tensor, form: str, criterion: str, value: float, square: bool
) -> LoRA | Tucker2:
    """The factors of one difference `delta (out, in, *k)` (float32 or float64); Tucker2
    ranks equal when `square` (`space.tucker_ranks`)."""
    if form == "tucker2" and delta.ndim > 2 and kernel_volume(delta.shape[2:]) > 1:
        flat = delta.reshape(*delta.shape[:2], -1)
        return decompose.tucker2(delta, space.tucker_ranks(flat, criterion, value, square=square))
    if criterion == "rank":
        rank = min(int(value), delta.shape[0], delta[0].numel())
        return decompose.svd(delta, rank, method="adaptive", oversample=max(10, rank), seed=0)
    return decompose.svd(delta, method="adaptive", seed=0, **{criterion: value})


def _fit_error(delta: torch.Tensor, factors: Factors) -> float:
    """‖Δ − ΔW(factors)‖ / ‖Δ‖, the relative error of the factors as stored, from blocks of
    `CHUNK_ELEMENTS` rows at a time (float64 sums), so no second layer-sized tensor is
    made. Both sides are divided by the power of two at Δ's largest |entry| (exactly), so
    the squared norms stay within float64 whatever Δ's magnitude (a float64 Δ near 1e±170
    has squares that vanish or overflow)."""
    factors = factors.to(delta.dtype)
    peak = space.binary_peak(delta)
    step = max(1, CHUNK_ELEMENTS // max(1, delta[0].numel()))
    total = difference = 0.0
    for start in range(0, delta.shape[0], step):
        rows = slice(start, min(start + step, delta.shape[0]))
        block, approx = delta[rows] / peak, factors.to_dense(rows) / peak
        total += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
        difference += float(torch.linalg.vector_norm(block - approx, dtype=torch.float64)) ** 2
    return math.sqrt(difference / total)


def _factor_dtype(tuned: Checkpoint, key: str) -> torch.dtype:
    """The dtype extracted factors take by default: the tuned weight's, where factors can be
    stored in it; `DTypeError` for other weights (float8), which need an explicit dtype."""
    dtype = tuned.infos[key].dtype
    if dtype not in DTYPE_NAMES.values():
        raise DTypeError(
            f"{tuned}: {key} is {dtype}, which factors cannot be stored in; pass the "
            f"factors' dtype (dtype=, or --dtype): one of {', '.join(DTYPE_NAMES)}"
        )
    return dtype


def extract_adapter(
    base: PathLike,
    tuned: PathLike,
    out: PathLike,
    rank: int | None = None,
    energy: float | None = None,
    ratio: float | None = None,
    form: str = "lora",
    format: str = "peft",
    *,
    conv_rank: int | None = None,
    targets: str | Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    component: str | None = None,
    prefix: str | None = None,
    whole: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the adapter that best approximates `tuned − base`, layer by layer, at `out`.

    `base` and `tuned` are checkpoints of one model (a `.safetensors` file, a sharded
    checkpoint's index or its folder) with the same `<module>.weight` keys and shapes
    (`TargetError`, `ShapeError` otherwise); they are read one weight at a time. Every
    floating weight with 2–5 dimensions (those whose module matches one of `targets`, if
    given: module-name patterns as `lowrank.targets.parse_targets` reads them) gets
    `Δ = tuned − base` in float32 (float64 for float64 weights) on `device`,
    and a layer named by its module path. Embedding tables (the `nn.Embedding`s of the
    transformers model a `config.json` beside a checkpoint describes, `layouts.kinds`; else
    2-D weights of modules named `embed_tokens`, `wte`, `word_embeddings`, `shared`, …) are
    left out unless `targets` names them, and then go into PEFT files as PEFT's LoRA of an
    `nn.Embedding` (`lora_embedding_A` / `_B`) and into kohya and LyCORIS files as they
    are (`ConversionError` for diffusers, whose loader reads no table's LoRA, and for a
    table the checkpoint ties to another weight, `tied_weights`: an LM head the fine-tune
    changed with it, which an adapter on the table leaves as it was). The layers
    of a model with transformers' `Conv1D` (its `config.json`'s `model_type`; weights
    stored `(in, out)`) go into PEFT files as parameter targets
    (`target_parameters`, read by PEFT 0.17 and later: ΔW is added to the weight as
    stored), into kohya and LyCORIS files as they are, and not into diffusers files. Each
    layer is

    - `form="lora"`: the truncated SVD of Δ flattened to `(out, in·K)` (`decompose.svd`,
      "adaptive": randomised sketches whose spectral gap must show convergence, doubled
      while that fails, then the exact SVD);
    - `form="tucker2"`: on k×k convolutions, HOOI (`decompose.tucker2`) at inner ranks
      chosen as `decompose.resize` chooses them (`energy`: the share of ‖Δ‖² the Tucker2
      itself keeps), equal in kohya / LyCORIS files; other layers LoRA. PEFT and diffusers
      files hold no Tucker2, and a HOOI Tucker folded into LoCon is worse than the optimal
      LoCon of its size, so there every layer is extracted as with `form="lora"`.

    One of `rank` (capped at each layer's full rank), `energy` (share of ‖Δ‖² kept) or
    `ratio` (σ_i ≥ ratio·σ₁) sets every rank; `conv_rank` overrides it on k×k
    convolutions. Layers that did not change are skipped (`_same_values`): where one
    checkpoint's dtype holds every value of the other's, the narrower weight is the wider
    one rounded (a float32 base's untouched weights in a bfloat16 fine-tune, a float32
    fine-tune's over a float16 release), or equal to it; where neither does (a float16
    base, a bfloat16 fine-tune), every entry of the two could be the rounding of one number
    (`|tuned − base|` within half a step of each dtype there). A float8 weight stored with
    a scale (`lowrank.io.quantized`) is read as `W8 · s`, the narrower side: unchanged where
    it is the other weight quantized with its scale, or where two such are equal as `W8 · s`;
    integer-packed weights are a `DTypeError`. Factors are stored in `dtype`
    (`float16`, `bfloat16`, `float32`, `float64`; default the tuned weight's, which a float8
    checkpoint cannot be: `DTypeError`) as `format`
    (`component`, `prefix` as in `save_adapter`), scale 1. The report gives the `form`
    extracted ("lora" for `form="tucker2"` into PEFT or diffusers) and every layer's
    `rank`, `relative_error` (of the stored factors) and `energy`, 1 − relative_error² (the
    share of ‖Δ‖² they keep, as in `resize_adapter`),
    the `skipped` layers, the `embeddings` left out that differ, the `convolutions` left out
    that differ (for PEFT and diffusers, whose conv LoRA cannot load a grouped convolution's
    nor run a dilated or not zero-padded one's as the base does, `peft_conv_mismatch`; known
    from the model's types, as tables are: `ConversionError` where `targets` names them),
    and `other_changes`: tensors outside those weights (biases, norms) that differ by the
    same measure, which extraction leaves out (it makes factor layers; only LyCORIS files
    hold such changes, as dense differences, `diff_b` / `diff`). With `whole`, a PEFT
    folder saves them as PEFT does (`_whole_tensors`): the changed bias of a module with a
    layer as `bias="lora_only"`'s `<module>.base_layer.bias`, every other changed module
    (a norm) whole, as `modules_to_save`, both the tuned tensors (`ArgumentError` for
    another format, since LyCORIS' own loader would not load them from a LyCORIS file;
    `ConversionError` for a change no such tensor holds or one the base lacks,
    `ShapeError` for one whose shape differs, `NonFiniteError` for a NaN or Inf in one).
    Nothing is written unless all succeeds, never over an input, and never into a
    checkpoint folder given as `base` or `tuned`, nor as `out` the folder a checkpoint file
    given lies alone in (`OutputPathError`).
    """
    criterion, value = rank_rule(rank, energy, ratio)
    progress = require_flag("progress", progress)
    whole = require_flag("whole", whole)
    component = require_name("component", component)
    require_choice("form", form, EXTRACT_FORMS)
    require_format(format)
    if whole and format != "peft":
        raise ArgumentError(
            f"whole=True saves changed biases and norms as PEFT folders do (format='peft'); "
            f"{_NOT_WHOLE[format]}"
        )
    conv = (criterion, value)
    if conv_rank is not None:
        conv = ("rank", require_int("conv_rank", conv_rank, minimum=1, error=RankError))
    compute = _device(device)
    out_dtype = output_dtype(dtype)
    base_ckpt, tuned_ckpt = Checkpoint(base), Checkpoint(tuned)
    inputs = [*base_ckpt.inputs, *tuned_ckpt.inputs]
    out = require_new_output(out, format, inputs=inputs)
    require_outside_folders(out, [Path(base), Path(tuned)], "an adapter")
    patterns = _patterns(targets)
    quantized = (Quantization(base_ckpt), Quantization(tuned_ckpt))
    for quantization in quantized:
        _require_unpacked(quantization, patterns)
    keys = _paired_keys(base_ckpt, tuned_ckpt, patterns)
    _require_own_weights(keys, format, tuned_ckpt)
    every = {k.removesuffix(".weight"): s for k, s in _matrix_keys(tuned_ckpt).items()}
    found = [kinds(every, checkpoint) for checkpoint in (base_ckpt, tuned_ckpt)]
    all_tables = {f"{n}.weight" for kind in found for n in kind.tables}
    if patterns is None:
        keys = {key: shape for key, shape in keys.items() if key not in all_tables}
    parameters = sorted({f"{n}.weight" for kind in found for n in kind.conv1d} & set(keys))
    require_module_layout(parameters, format, tuned_ckpt)
    require_no_tables(sorted(all_tables & set(keys)), format, tuned_ckpt)
    unrunnable = {f"{n}.weight": why for kind in found for n, why in kind.convs}
    if patterns is None and not TRAITS[format].kohya_named:
        keys = {key: shape for key, shape in keys.items() if key not in unrunnable}
    require_runnable_convs(
        sorted((k, why) for k, why in unrunnable.items() if k in keys), format, tuned_ckpt
    )
    stored = {key: out_dtype or _factor_dtype(tuned_ckpt, key) for key in keys}
    held = form if TRAITS[format].mid else "lora"  # no Tucker in PEFT or diffusers files
    layers: dict[str, Factors] = {}
    rows, skipped = [], []
    for key in _bar(keys, len(keys), "extracting", progress):
        name = key.removesuffix(".weight")
        before, after = (_weight_values(quantization, key) for quantization in quantized)
        require_finite(f"{base_ckpt}: {key}", before)
        require_finite(f"{tuned_ckpt}: {key}", after)
        if _same_weights(*quantized, key):
            skipped.append(name)
            continue
        work = work_dtype(before.dtype, after.dtype)
        delta = after.to(compute, work) - before.to(compute, work)
        del before, after
        require_finite(f"{key}: tuned − base (in {work}, from {tuned_ckpt} and {base_ckpt})", delta)
        is_conv = delta.ndim > 2 and kernel_volume(delta.shape[2:]) > 1
        rule = conv if is_conv else (criterion, value)
        factors = _extract_layer(delta, held, *rule, square=TRAITS[format].mid)
        factors = _stored(factors, format).to(stored[key])
        if not all(all_finite(t) for t in factors.named_factors().values()):
            wider = wider_dtype(stored[key])
            advice = ("float64 is the widest dtype" if wider is None else "pass a wider dtype "
                      f"(dtype=, or --dtype {str(wider).removeprefix('torch.')})")  # fmt: skip
            raise NonFiniteError(
                f"{key}: the factors of tuned − base overflow {stored[key]}, in which they "
                f"would be stored; {advice}"
            )
        error = _fit_error(delta, factors)
        layers[name] = factors.to("cpu")
        rows.append(layer_row(name, factors, error, energy=_kept_share(error)))
    # the changed weights only: a tied head stored beside its table, both as the base's,
    # is no layer of the adapter
    _require_untied([f"{name}.weight" for name in layers], tuned_ckpt)
    changed = _other_changes(*quantized, set(keys))
    tables = [k for k in changed if k in all_tables]
    convs = [k for k in changed if k in unrunnable]
    if not layers:
        hint = f"; embedding tables {tables[:_SHOWN]} differ: {_NAME_TABLES}" if tables else ""
        if convs:
            hint += f"; convolutions {convs[:_SHOWN]} differ: {_CONVS.format(format)}"
        raise TargetError(
            f"{tuned} and {base} do not differ in any weight to extract: nothing to extract{hint}"
        )
    targeted = tuple(key for key in parameters if key.removesuffix(".weight") in layers)
    embedded = tuple(key for key in sorted(all_tables) if key.removesuffix(".weight") in layers)
    others = [k for k in changed if k not in tables and k not in convs]
    saved, fields = _whole_tensors(others, layers, *quantized) if whole else ({}, {})
    written = save_adapter(
        Adapter(layers, target_parameters=targeted, embeddings=embedded, base_weights=saved,
                model=fields),
        out, format, component=component, prefix=prefix, inputs=inputs,
    )
    return {
        "base": str(base_ckpt.path),
        "tuned": str(tuned_ckpt.path),
        "output": [str(p) for p in written],
        "format": format,
        "form": held,
        "device": str(compute),
        "layers": rows,
        "skipped": skipped,
        "embeddings": tables,
        "convolutions": convs,
        "other_changes": others,
        "saved_whole": sorted(saved),
    }


def _whole_tensors(
    changed: Sequence[str],
    layers: Mapping[str, Factors],
    base_quantization: Quantization,
    tuned_quantization: Quantization,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of `tuned` a PEFT folder saves whole for the `changed` keys, as
    `({"<module>.weight" / ".bias": tensor}, PEFT config fields)`: the bias of a module with
    a layer (`bias="lora_only"`, saved as its `base_layer.bias`), and every parameter of any
    other changed module (`modules_to_save`, which PEFT loads whole). `ConversionError`
    naming a changed key that is no floating weight or bias of `tuned`, or that `base`
    lacks (PEFT loads a saved tensor in place of the base's); `ShapeError` where their
    shapes differ, or one that is float8 stored with a scale (`quantized.Quantization`),
    whose values as stored are not the weights; `NonFiniteError` for a NaN or Inf in a
    tensor to save."""
    base, tuned = base_quantization.checkpoint, tuned_quantization.checkpoint

    def whole_tensor(key: str) -> torch.Tensor:
        info, mine = tuned.infos[key], base.infos.get(key)
        if mine is None:
            raise ConversionError(
                f"{key} is in {tuned} but not in {base}: PEFT loads a tensor saved whole in "
                "place of the base's; leave whole=False (the change is listed)"
            )
        if mine.shape != info.shape:
            raise ShapeError(
                f"{key} has shape {tuple(info.shape)} in {tuned} but {tuple(mine.shape)} in "
                f"{base}; base and tuned must be the same model"
            )
        plan = tuned_quantization.scaled(key)
        if plan is not None:
            raise ConversionError(
                f"{tuned}: {key} is float8 stored with the scale {plan.scale}: PEFT would load "
                "its float8 values, not the weights they stand for; leave whole=False (the "
                "change is listed)"
            )
        tensor = tuned.get(key)
        require_finite(f"{tuned}: {key}", tensor)
        return tensor

    tensors: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    fields: dict[str, Any] = {}
    for key in changed:
        module, _, parameter = key.rpartition(".")
        info = tuned.infos.get(key)
        if info is None or parameter not in PEFT_WHOLE or not info.dtype.is_floating_point:
            why = "is not in" if info is None else "is no floating weight or bias of"
            raise ConversionError(
                f"{key} changed but {why} {tuned}, and PEFT saves whole tensors only as "
                "modules' weights and biases; leave whole=False (the change is listed)"
            )
        if module in layers:  # a bias: the module's weight is its layer
            tensors[key] = whole_tensor(key)
            fields["bias"] = "lora_only"
        else:
            modules.add(module)
    for key in (f"{m}.{p}" for m in sorted(modules) for p in PEFT_WHOLE):
        if key in tuned.infos:
            tensors[key] = whole_tensor(key)
    if modules:
        fields["modules_to_save"] = sorted(modules)
    return tensors, fields


def _kept_share(error: float) -> float:
    """`1 − error²`, the share of ‖ΔW‖² a layer of relative error `error` keeps (where the
    error comes from dropping orthogonal directions), within [0, 1]; 0 for an infinite error
    (a sum that cancels to 0)."""
    return min(1.0, max(0.0, 1.0 - error * error)) if math.isfinite(error) else 0.0


def _other_changes(
    base_quantization: Quantization, tuned_quantization: Quantization, extracted: Iterable[str]
) -> list[str]:
    """Keys outside `extracted` whose values differ between the checkpoints (a dtype alone
    is no difference, `_same_weights`), or that one of them lacks, read one pair at a time;
    the scales and markers of float8 weights stored scaled are parts of those weights, not
    tensors of their own (`Quantization.auxiliary`)."""
    base, tuned = base_quantization.checkpoint, tuned_quantization.checkpoint
    done = set(extracted) | base_quantization.auxiliary | tuned_quantization.auxiliary
    changed = []
    for key, info in tuned.infos.items():
        if key in done:
            continue
        mine = base.infos.get(key)
        if (mine is None or mine.shape != info.shape
                or not _same_weights(base_quantization, tuned_quantization, key)):  # fmt: skip
            changed.append(key)
    changed += [key for key in base.infos if key not in tuned.infos and key not in done]
    return changed


def _require_unpacked(quantization: Quantization, patterns: Sequence[str] | None) -> None:
    """`DTypeError` naming a tensor of the first integer-packed module of `quantization`'s
    checkpoint (among those `patterns` target, or any)."""
    for module in quantization.packed:
        if patterns is None or _targeted(module, patterns):
            raise quantization.refusal(
                f"{module}.weight", "extract", "extract from the unquantized checkpoints"
            )


def _weight_values(quantization: Quantization, key: str) -> torch.Tensor:
    """The tensor `key` of `quantization`'s checkpoint as the weights it stands for: a float8
    weight stored with a scale as float32 `W8 · s` (`quantized.dequantized`), any other as
    stored."""
    plan = quantization.scaled(key)
    if plan is None:
        return quantization.checkpoint.get(key)
    return dequantized(quantization.checkpoint, plan)


def _same_weights(base: Quantization, tuned: Quantization, key: str) -> bool:
    """Whether the tensor `key` holds the same weights in both checkpoints, each stored as
    its own dtype stores them (`_same_values`), where a float8 weight stored with a scale is
    the narrower one: beside a plain tensor, the scaled one must be it quantized with its
    stored scale (`quantized.rounds_to`), as a bfloat16 copy must be a float32 weight
    rounded; two scaled ones must stand for equal weights (`W8 · s`, exact in float64). A
    scaled weight is read `CHUNK_ELEMENTS` values at a time, never whole or as a float64
    copy of the whole."""
    plans = (base.scaled(key), tuned.scaled(key))
    if plans == (None, None):
        return _same_values(base.checkpoint.get(key), tuned.checkpoint.get(key))
    first, second = plans
    if first is not None and second is not None:
        return equal_weights((base.checkpoint, first), (tuned.checkpoint, second), CHUNK_ELEMENTS)
    scaled, plan, other = (base, first, tuned) if first is not None else (tuned, second, base)
    assert plan is not None  # one of the two is scaled
    return rounds_to(scaled.checkpoint, plan, other.checkpoint, CHUNK_ELEMENTS)


def _same_values(base: torch.Tensor, tuned: torch.Tensor) -> bool:
    """Whether `tuned` and `base` (one shape) can hold the same numbers, each as its own
    dtype stores them. Where one floating dtype holds every value of the other
    (`_holds`: float32 and a bfloat16 or float16 copy, bfloat16 and a float8 one), the wider
    tensor is taken as the weights themselves: the narrower must be it rounded
    (a float32 base saved as bfloat16 rounds every entry, which is no change; so does a
    float32 fine-tune over a float16 release of it). Where neither holds the other (float16
    and bfloat16: both roundings of float32 weights), every entry must be a rounding of
    one real number in both (`_roundings_meet`). Equal dtypes compare exactly; integers
    in int64; a float and an integer tensor differ, and a NaN differs from everything.
    Tensors of codes (`CODE_DTYPES`) are the same only in one dtype and byte for byte."""
    if base.dtype in CODE_DTYPES or tuned.dtype in CODE_DTYPES:
        return base.dtype == tuned.dtype and torch.equal(
            base.view(torch.uint8), tuned.view(torch.uint8)
        )
    if base.dtype == tuned.dtype:
        return torch.equal(base, tuned)
    floating = (base.is_floating_point(), tuned.is_floating_point())
    if all(floating):
        if _holds(base.dtype, tuned.dtype):
            return torch.equal(base.to(tuned.dtype), tuned)
        if _holds(tuned.dtype, base.dtype):
            return torch.equal(tuned.to(base.dtype), base)
        pairs = zip(base.reshape(-1).split(CHUNK_ELEMENTS),
                    tuned.reshape(-1).split(CHUNK_ELEMENTS), strict=True)  # fmt: skip
        return all(_roundings_meet(*pair) for pair in pairs)
    if not any(floating) and not (base.is_complex() or tuned.is_complex()):
        return torch.equal(base.to(torch.int64), tuned.to(torch.int64))
    return False


@functools.cache
def _eps(dtype: torch.dtype) -> float:
    """The step from 1 to the next value of the floating `dtype`, 2^−(mantissa bits): the
    least power of two `s` for which `1 + s` (a float64) converts to `dtype` and back
    unchanged. `torch.finfo(dtype).eps` is not used: it gives float8_e5m2fnuz, whose 2
    mantissa bits step 1 to 1.25, the step 2⁻³."""
    step = 1.0
    while 1 + step / 2 > 1:  # else 1 + step / 2 rounds to 1 in float64 itself
        half = torch.tensor(1 + step / 2, dtype=torch.float64)
        if half.to(dtype).to(torch.float64).item() != half.item():
            break
        step /= 2
    return step


def _holds(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether every value of the floating dtype `narrow` is one of `wide`'s: binary
    formats, so it is where `wide` has at least `narrow`'s precision (`_eps`), largest value
    and smallest step (the subnormal one, smallest_normal · eps), each step of `narrow`
    being then a multiple of `wide`'s there."""
    w, n = torch.finfo(wide), torch.finfo(narrow)
    return (_eps(wide) <= _eps(narrow) and w.max >= n.max
            and w.smallest_normal * _eps(wide) <= n.smallest_normal * _eps(narrow))  # fmt: skip


def _rounding_interval(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(low, high)`, float64 tensors of `values`' shape: the reals that round to each
    entry of `values` in its floating dtype (round to nearest) lie in `[low, high]`.

    With `eps` the dtype's step at 1 (`_eps`) and `x = m · 2^e`, `m ∈ [1/2, 1)` (`frexp`),
    the step between `x` and its neighbour away from zero is `ulp = eps · 2^(e−1)`:
    `2^(e−1)` is the power of two at the start of x's binade. Below the smallest normal
    value every step is `eps · smallest_normal` (the subnormal one), so `|x|` is raised to
    it first (0 too).
    The neighbour toward zero is `ulp` away too, except at a power of two above the smallest
    normal (`m = 1/2`), where the binade below has half the step. A real rounds to `x` when
    it lies within half a step of `x` on its side, so `[low, high]` is `x` minus half the
    step toward zero and plus half the step away from it (for negative `x`, mirrored). Each
    bound is `x` plus a power of two times `eps`, exact in float64 for every dtype of at
    most float32's precision. A real at a bound lies halfway between two values and rounds
    to the even one, so the bounds belong to the interval of one of them only; both are
    counted in, a tie too lenient by a set of measure zero. The largest value's step above
    is that of its binade: reals up to half a step past it round to it, beyond to inf."""
    info = torch.finfo(values.dtype)
    x = values.to(torch.float64)
    mantissa, exponent = torch.frexp(x.abs().clamp(min=info.smallest_normal))
    ulp = torch.ldexp(torch.full_like(x, _eps(values.dtype)), exponent - 1)
    below = torch.where((mantissa == 0.5) & (x.abs() > info.smallest_normal), ulp / 2, ulp)
    low = x - torch.where(x > 0, below, ulp) / 2
    high = x + torch.where(x < 0, below, ulp) / 2
    return low, high


def _roundings_meet(base: torch.Tensor, tuned: torch.Tensor) -> bool:
    """Whether every entry of `base` and `tuned` (floating, one shape, dtypes neither of
    which holds the other) is the rounding of one real number in both: their rounding
    intervals (`_rounding_interval`) overlap, which is, away from powers of two,
    `|tuned − base| ≤ ½ ulp(tuned) + ½ ulp(base)`, each ulp its own dtype's at its own
    magnitude. The untouched weights of a float32 model saved once as float16 and once as
    bfloat16 pass: each is within half a step of the float32 weight. An entry training
    moved further is a change, as is a NaN (its comparisons are false)."""
    low_b, high_b = _rounding_interval(base)
    low_t, high_t = _rounding_interval(tuned)
    return bool((torch.maximum(low_b, low_t) <= torch.minimum(high_b, high_t)).all())


# --- resize ----------------------------------------------------------------------------


def _vector(form: Factors) -> bool:
    """Whether `form` is a 1-D dense difference (a bias's, as PEFT's `lora_bias` and
    LyCORIS' `diff_b` hold it, or a norm's weight's), which has no rank to truncate: resize
    and a truncating combination carry it exactly."""
    return isinstance(form, Full) and len(form.shape) == 1


def _factor_space_layer(adapter: Adapter, name: str) -> LoRA | Tucker2 | CP:
    """Layer `name` of `adapter` if it is a LoRA, Tucker2 or CP form, else `DTypeError`
    naming the adapter's file and the layer (`require_factor_space`); for a LoHa, LoKr or
    dense difference with the conversion that makes LoRA layers of this adapter
    (`_lora_advice`)."""
    where = f"layer {name!r}" if adapter.source is None else f"{adapter.source}: layer {name!r}"
    form = adapter[name]
    if isinstance(form, (LoHa, LoKr)):
        raise DTypeError(
            f"{where} is a {type(form).__name__}, not a LoRA, Tucker2 or CP form: a LoHa or LoKr "
            "has no LoRA of comparable rank, so no factor-space resize or combination; "
            + _lora_advice(adapter)
        )
    if isinstance(form, Full):
        raise DTypeError(
            f"{where} is a dense difference (Full, shape {tuple(form.shape)}), which has no "
            "factors to truncate: Full layers combine exactly without a rank; "
            + _lora_advice(adapter)
        )
    return require_factor_space(where, form)


def _lora_advice(adapter: Adapter) -> str:
    """How to make LoRA layers of `adapter`'s LoHa, LoKr and weights' `Full` layers, which
    then resize and combine: `lowrank convert --rank` to a format that holds its other
    layers too, kohya where it has no 1-D `Full` layer, PEFT where each is a bias's beside
    its module's layer (PEFT's `lora_bias`); where another 1-D one (a norm's) is there, which
    only LyCORIS files hold and no rank approximates, the merge."""
    vectors = [n for n, f in adapter.items() if _vector(f)]
    base = " --base BASE" if adapter.kohya_names else ""
    if not vectors:
        return (f"approximate it by truncated SVD first (lowrank convert ADAPTER --to kohya "
                f"--rank R{base}, which writes LoRA layers)")  # fmt: skip
    if all(lora_bias_layer(adapter, n) for n in vectors):
        return (f"approximate it by truncated SVD first (lowrank convert ADAPTER --to peft "
                f"--rank R{base}, which writes LoRA layers and keeps the bias differences as "
                "PEFT's lora_bias)")  # fmt: skip
    return (f"its layer {vectors[0]!r} is a 1-D dense difference (a norm's), which only "
            "LyCORIS files hold and no rank approximates, so no conversion makes LoRA layers "
            "of this adapter to resize or combine: merge it into the model instead (lowrank "
            "merge BASE ADAPTER -o OUT)")  # fmt: skip


def _require_no_parameter_layers(adapter: Adapter) -> None:
    """`ConversionError` naming the first layer of `adapter` that is a dense difference of a
    `names.PARAMETERS` parameter (Wan's `modulation`): it has no rank to lower and no
    adapter file lowrank writes holds it, so resize and combine cannot write it; the error
    says to merge the file instead (`formats.common.parameter_refusal`)."""
    for name in adapter.layers:
        if layer_parameter(name)[1] in PARAMETERS:
            where = f"{adapter.source}: " if adapter.source else ""
            raise ConversionError(where + parameter_refusal(name))


def _common(values: Iterable[object]) -> str:
    """The one value of `values` as text, or "Dynamic" (sd-scripts' word) when they differ."""
    distinct = set(values)
    return str(distinct.pop()) if len(distinct) == 1 else "Dynamic"


def _kohya_metadata(adapter: Adapter) -> dict[str, str]:
    """`adapter.metadata` with kohya's settings, where present, describing its layers as
    sd-scripts and LyCORIS set them: `ss_network_dim` / `ss_network_alpha` the rank and alpha
    of the linear (and 1×1) layers, or of all layers when there are none, and `conv_dim` /
    `conv_alpha` in the JSON `ss_network_args` those of the k×k convolutions; each one value,
    or "Dynamic". A Tucker2's rank is its inner rank when both are equal. An
    `ss_network_args` that is not JSON is kept as it is (no reader finds settings in it); one
    nested too deeply for Python's parser is a `FileFormatError` naming the file and key,
    since other readers may find settings there that it could not update."""
    metadata = dict(adapter.metadata)

    def rank(form: Factors) -> object:
        value = listed_rank(form)
        return value if not isinstance(value, list) or len(set(value)) > 1 else value[0]

    def described(names: list[str]) -> tuple[str, str]:
        ranks = (rank(adapter[n]) for n in names)
        alphas = (f"{adapter.alpha(n) or 0:g}" for n in names)
        return _common(map(str, ranks)), _common(alphas)

    conv = [n for n, f in adapter.items() if kernel_volume(f.shape[2:]) > 1]
    linear = [n for n in adapter if n not in conv] or list(adapter)
    for key, value in zip(("ss_network_dim", "ss_network_alpha"), described(linear), strict=True):
        if key in metadata:
            metadata[key] = value
    try:
        args = parse_json(metadata.get("ss_network_args", "null"))
    except ValueError:
        return metadata
    except RecursionError:
        raise FileFormatError(
            f"{adapter.source or 'the adapter'}: metadata ss_network_args is JSON nested too "
            "deeply to read, so its conv_dim / conv_alpha cannot be set to the ranks written"
        ) from None
    if conv and isinstance(args, dict):
        for key, value in zip(("conv_dim", "conv_alpha"), described(conv), strict=True):
            if key in args:
                args[key] = value
        metadata["ss_network_args"] = json.dumps(args)
    return metadata


def resize_adapter(
    path: PathLike,
    out: PathLike,
    rank: int | None = None,
    *,
    energy: float | None = None,
    ratio: float | None = None,
    form: str | None = None,
    format: str | None = None,
    base: Base | Mapping[str, Base] | None = None,
    component: str | None = None,
    prefix: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the adapter at `path` with every layer at a lower rank, in factor space.

    Each LoRA / LoCon layer becomes its optimal (Eckart–Young) truncation at the rank that
    `rank`, `energy` or `ratio` chooses (`decompose.resize`: QR of the factors and the SVD
    of their small core); a layer already at or below `rank` is copied unchanged. Tucker
    (`lora_mid`) layers get lower, equal inner ranks by HOOI of their core where `format`
    holds them (kohya, LyCORIS: `decompose.resize(square=True)`), and are folded into LoCon
    and resized as such otherwise or with `form="lora"`. Scales are kept (alpha follows the
    rank); kohya metadata (`ss_network_dim` / `_alpha`, `conv_dim` / `conv_alpha` in
    `ss_network_args`) is set to the ranks and alphas written. A 1-D `Full` layer (a
    bias's difference: PEFT's `lora_bias`, LyCORIS' `diff_b`) has no rank and is kept as it
    is. LoHa / LoKr layers and weights' `Full` layers are a `DTypeError`, and so are DoRA
    layers, whose merge depends on the base weight.
    `format` defaults to the input's; `base`, `component` and `prefix` are as
    in `convert_adapter`. The report gives every layer's form as written, its rank before
    and after, `relative_error` ‖ΔW − ΔW'‖ / ‖ΔW‖ of the factors as the file holds them
    (measured in float64 from the factors: the truncation and the rounding to the file's
    dtype) and `energy`, 1 − relative_error² (the share of ‖ΔW‖² the layer keeps).
    """
    criterion, value = rank_rule(rank, energy, ratio)
    progress = require_flag("progress", progress)
    component = require_name("component", component)
    if form is not None:
        require_choice("form", form, ("lora",))
    adapter = load_adapter(path)
    fmt = require_format((adapter.format or "peft") if format is None else format)
    require_new_output(out, fmt, [adapter], base=base)
    adapter = written_layers(resolved_for(adapter, base, component, fmt), fmt, component)
    require_no_dora(adapter, "resize")
    _require_no_parameter_layers(adapter)
    for name, layer in adapter.items():
        if not _vector(layer):
            _factor_space_layer(adapter, name)
    to = "lora" if form == "lora" or not TRAITS[fmt].mid else None
    layers: dict[str, Factors] = {}
    rows = []
    for name, layer in _bar(adapter.items(), len(adapter), "resizing", progress):
        if _vector(layer):  # no rank to lower: kept as it is
            layers[name] = layer
            rows.append(layer_row(name, layer, 0.0, rank_before=None, energy=1.0))
            continue
        resized = decompose.resize(layer, to=to, square=TRAITS[fmt].mid, **{criterion: value})
        resized = layers[name] = _stored(resized, fmt)
        error = _error_of(resized, [(layer, 1.0)])
        before = listed_rank(layer)
        rows.append(layer_row(name, resized, error, rank_before=before, energy=_kept_share(error)))
    result = replace(adapter, layers=layers)
    result = replace(result, metadata=_kohya_metadata(result))
    written = save_adapter(result, out, fmt, component=component, prefix=prefix, base=base)
    return {
        "input": str(path),
        "from": adapter.format,
        "format": fmt,
        "output": [str(p) for p in written],
        "layers": rows,
    }


# --- combine ---------------------------------------------------------------------------


def _label(adapter: Adapter, index: int) -> str:
    return str(adapter.source) if adapter.source else f"adapters[{index}]"


def _aligned(adapters: list[Adapter], component: str | None) -> list[Adapter]:
    """The adapters named alike: all kohya names, or all module paths under the same
    components (component-less ones placed under `component`, or the others' only one)."""
    kohya = {a.kohya_names for a in adapters}
    if len(kohya) > 1:
        named = next(i for i, a in enumerate(adapters) if a.kohya_names)
        raise TargetError(
            f"{_label(adapters[named], named)} names its layers kohya's way and others by module "
            "paths; give the base model (base=…, --base) to map kohya names to module paths"
        )
    if kohya == {True}:
        plain = [i for i, a in enumerate(adapters) if a.has_plain_layers]
        if plain and len(plain) < len(adapters):
            raise TargetError(
                f"{_label(adapters[plain[0]], plain[0])} names its layers for a whole model "
                f"(kohya prefix {adapters[plain[0]].prefix or 'lycoris'}) and others for a "
                "pipeline's models (lora_unet_…, lora_te_…): their layers cannot be matched by "
                "name; give the base model (base=…, --base) to match them by module path"
            )
        return adapters
    present = sorted({c for a in adapters for c in a.components})
    if not present or all(a.components for a in adapters):
        return adapters
    if component is None:
        if len(present) > 1:
            raise TargetError(
                f"some adapters name components {present} and others none; choose the one "
                "their layers belong to with component= (--component)"
            )
        component = present[0]
    return [a if a.components else a.with_component(component) for a in adapters]


def combine_adapters(
    adapters: Sequence[PathLike | Adapter],
    out: PathLike,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    *,
    energy: float | None = None,
    ratio: float | None = None,
    format: str | None = None,
    base: Base | Mapping[str, Base] | None = None,
    component: str | None = None,
    prefix: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write one adapter whose ΔW is exactly `Σ weights[i] · ΔW_i` for every layer.

    `adapters` are files, PEFT folders or `Adapter`s, `weights` one real number each
    (default 1; negative subtracts). Layers are matched by name (kohya names and module
    paths do not mix: `base` maps kohya names; `component` names the model of
    component-less module paths beside adapters that name one). An adapter weighted 0 adds
    nothing: a layer only such adapters have is dropped (listed in the report's `dropped`).
    A layer in several adapters becomes one LoRA with their factors concatenated
    (`decompose.combine`: rank Σ rᵢ, scale the largest |weight · scale|; Tucker layers
    folded, CP layers as their LoRA); a layer in one adapter keeps its form with its scale
    times its weight (a LoKr with dense w1 and w2, which LyCORIS files store at scale 1,
    takes it split over w1 and w2 there; PEFT keeps its scale). `rank`, `energy` or `ratio`
    truncate each result optimally in factor space (`decompose.resize`; a lone Tucker layer
    as `resize_adapter` does for `format`); LoHa / LoKr layers can only be carried over
    untruncated (`DTypeError` otherwise); Full layers (dense differences) add exactly,
    untruncated (a weight's is a `DTypeError` with a truncation rule, a 1-D one is summed
    all the same). Each layer is reported in the form the file holds, with its
    `relative_error` against the exact weighted sum (measured in float64: truncation and
    rounding to the file's dtype) and `energy`, 1 − relative_error².
    `format` defaults to the first adapter's. Nothing is written over an input.
    """
    sources = require_list("adapters", adapters, "adapter paths or Adapters")
    if not sources:
        raise ArgumentError("give at least one adapter to combine")
    scales = require_weights("weights", weights, len(sources), "adapters")
    progress = require_flag("progress", progress)
    component = require_name("component", component)
    truncate = rank is not None or energy is not None or ratio is not None
    rule = dict([rank_rule(rank, energy, ratio)]) if truncate else {}
    loaded = [adapter_from(s) for s in sources]
    for adapter, weight in zip(loaded, scales, strict=True):
        if weight != 0.0:  # an adapter weighted 0 adds nothing, so none of its layers
            require_no_dora(adapter, "combine")
    fmt = require_format((loaded[0].format or "peft") if format is None else format)
    plain = any(adapter.has_plain_layers for adapter in loaded)
    named = any(adapter.components or adapter.kohya_names for adapter in loaded)
    placed = plain and (per_component(base) or named)
    require_used_component(component, placed or not TRAITS[fmt].kohya_named, "the adapters")
    if base is not None:
        loaded = [adapter.resolve(base, component) for adapter in loaded]
    for adapter in loaded:  # resolved against a base, it is cleared
        adapter.require_peft_selected(None)
    loaded = [with_layouts(a, base, fmt) for a in _aligned(loaded, component)]
    for adapter, weight in zip(loaded, scales, strict=True):
        if weight != 0.0:  # an adapter weighted 0 adds nothing, so none of its layers
            _require_no_parameter_layers(adapter)
    require_new_output(out, fmt, loaded, base=base)
    contributions: dict[str, list[tuple[int, Factors]]] = {}
    for index, adapter in enumerate(loaded):
        for name, layer in adapter.items():
            contributions.setdefault(name, []).append((index, layer))
    layers: dict[str, Factors] = {}
    rows, dropped = [], []
    for name, parts in _bar(contributions.items(), len(contributions), "combining", progress):
        parts = [(index, layer) for index, layer in parts if scales[index] != 0.0]
        _require_one_shape(name, parts, loaded)
        if not parts:
            dropped.append(name)
            continue
        layers[name] = stored = _stored(_combined(name, parts, loaded, scales, rule, fmt), fmt)
        error = _error_of(stored, [(form, scales[index]) for index, form in parts])
        rows.append(
            layer_row(
                name,
                stored,
                error,
                sources=[_label(loaded[i], i) for i, _ in parts],
                energy=_kept_share(error),
            )
        )
    if not layers:
        raise ArgumentError(
            f"every adapter is weighted 0 (weights {scales}): the combination has no layers"
        )
    prefixes = {a.prefix for a in loaded}  # kept when every input had the same
    # what PEFT loads in place of the base's weights (joined_base_weights leaves out those
    # of adapters weighted 0), and the config fields of the adapters that add something
    weighted = [(a, _label(a, i), w) for i, (a, w) in enumerate(zip(loaded, scales, strict=True))]
    saved = joined_base_weights(weighted, ConversionError)
    result = Adapter(
        layers,
        fmt,
        components=tuple(sorted({c for a in loaded for c in a.components})),
        kohya_names=loaded[0].kohya_names,
        target_parameters=tuple(sorted({p for a in loaded for p in a.target_parameters})),
        embeddings=tuple(sorted({p for a in loaded for p in a.embeddings})),
        conv1d=tuple(sorted({p for a in loaded for p in a.conv1d})),
        prefix=prefixes.pop() if len(prefixes) == 1 else None,
        model=joined_model([a for a, _, w in weighted if w != 0.0]),
        pipeline=tuple(sorted({c for a in loaded for c in a.pipeline})),
        base_weights=saved,
    )
    inputs = [f for a in loaded if a.source is not None for f in adapter_files(a.source, a.format)]
    written = save_adapter(
        result, out, fmt, component=component, prefix=prefix, inputs=inputs, base=base
    )
    kept = written_layers(result, fmt, component).layers  # PEFT: one model's
    rows = [row for row in rows if row["name"] in kept]
    return {
        "inputs": [
            {"adapter": _label(a, i), "weight": w, "layers": len(a)}
            for i, (a, w) in enumerate(zip(loaded, scales, strict=True))
        ],
        "format": fmt,
        "output": [str(p) for p in written],
        "truncated": truncate,
        "layers": rows,
        "dropped": dropped,
    }


def _require_one_shape(
    name: str, parts: list[tuple[int, Factors]], adapters: list[Adapter]
) -> None:
    """`ShapeError` unless every adapter's layer `name` (in `parts`, possibly none) stands
    for one ΔW shape."""
    first_index, first = parts[0] if parts else (0, None)
    for index, layer in parts[1:]:
        if layer.shape != first.shape:
            flat = (first.shape[0], math.prod(first.shape[1:]))
            hint = (
                " (the same weight with its kernel flattened, as LyCORIS stores LoHa and LoKr "
                "convolutions: give the base model, base=… or --base, to give it its kernel)"
                if flat == (layer.shape[0], math.prod(layer.shape[1:]))
                else ""
            )
            raise ShapeError(
                f"layer {name!r}: ΔW has shape {tuple(first.shape)} in "
                f"{_label(adapters[first_index], first_index)} but {tuple(layer.shape)} in "
                f"{_label(adapters[index], index)}{hint}"
            )


def _weighted(form: Factors, weight: float, fmt: str) -> Factors:
    """`weight · ΔW(form)` in `form`'s own form for a file of format `fmt`: the weight joins
    the scale (exactly), except for a LoKr whose w1 and w2 are both dense where `fmt` stores
    it with scale 1 (LyCORIS: it has no rank for an alpha; PEFT keeps `alpha / r`), so
    scale · weight is split over w1 and w2 (`space.split`: exactly for a power of two), or
    put on one of them where the split leaves the dtype's range; `NonFiniteError` where
    every choice overflows or rounds a factor to zero."""
    if isinstance(form, LoKr) and form.rank is None and not TRAITS[fmt].lokr_scale:
        coefficient = form.scale * weight
        change = ""
        for on_w1, on_w2 in (space.split(coefficient), (1.0, abs(coefficient)),
                             (abs(coefficient), 1.0)):  # fmt: skip
            weighted = LoKr(form.w1 * on_w1, form.w2 * (on_w2 if coefficient >= 0 else -on_w2))
            if not all(all_finite(t) for t in weighted.named_factors().values()):
                change = change or "overflows"
            elif any(bool(new.any()) < bool(old.any()) for new, old in
                     ((weighted.w1, form.w1), (weighted.w2, form.w2))):  # fmt: skip
                change = change or "underflows to zero in"
            else:
                return weighted
        raise NonFiniteError(
            f"the dense LoKr times {coefficient:.4g} (its scale times the weight) {change} "
            f"{form.w2.dtype}, in which its w1 and w2 are stored"
        )
    return form if weight == 1.0 else replace(form, scale=form.scale * weight)


def _kronecker_gap(stored: LoKr, form: LoKr, coefficient: float) -> float:
    """`‖s·X⊗Y − c·A⊗B‖ / ‖c·A⊗B‖` for dense LoKr factors in float64, never forming the
    Kronecker product. With `A' = tA`, `t = ⟨X,A⟩/‖A‖²` (so `⟨X − A', A'⟩ = 0`) and
    `B' = cB/t`, `X⊗Y − A'⊗B' = A'⊗(Y − B') + (X − A')⊗Y`, whose two terms are orthogonal:
    the squared gap is `‖A'‖²‖Y − B'‖² + ‖X − A'‖²‖Y‖²`, a sum of squares (no cancellation)."""
    x = stored.w1.to(torch.float64) * stored.scale
    y = stored.w2.to(torch.float64)
    a, b = form.w1.to(torch.float64), form.w2.to(torch.float64) * coefficient
    # each side divided by a power of two (exactly) leaves the ratio as it is and keeps the
    # squares in the norms below within float64, whatever the factors' magnitude
    first = max(space.binary_peak(x), space.binary_peak(a))
    second = max(space.binary_peak(y), space.binary_peak(b))
    x, a, y, b = x / first, a / first, y / second, b / second
    whole = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    if whole == 0:
        return 0.0 if not (x.any() and y.any()) else math.inf
    t = float((x * a).sum() / a.square().sum())
    if t == 0 or not math.isfinite(t):  # X ⟂ A: the two products are orthogonal
        gap = math.hypot(float(torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)), whole)
        return gap / whole
    a_aligned, b_aligned = a * t, b / t
    gap = math.hypot(
        float(torch.linalg.vector_norm(a_aligned) * torch.linalg.vector_norm(y - b_aligned)),
        float(torch.linalg.vector_norm(x - a_aligned) * torch.linalg.vector_norm(y)),
    )
    return gap / whole


def _error_of(stored: Factors, parts: Sequence[tuple[Factors, float]]) -> float:
    """`‖ΔW(stored) − Σ w · ΔW(form)‖ / ‖Σ w · ΔW(form)‖` over `parts` `(form, w)`, in float64:
    the error of a layer as its file holds it, the rounding of its factors included. From the
    factors alone where every form is a LoRA, Tucker2 or CP (`space.relative_gap`), from the
    dense ΔW where a LoHa or LoKr takes part."""
    forms = (LoRA, Tucker2, CP)
    if len(parts) == 1 and not isinstance(stored, forms):  # a LoHa or LoKr carried over
        form, weight = parts[0]
        same = stored.named_factors().keys() == form.named_factors().keys() and all(
            torch.equal(stored.named_factors()[k], t) for k, t in form.named_factors().items()
        )
        if same and stored.scale == form.scale * weight:
            return 0.0
        if isinstance(stored, LoKr) and stored.rank is None and form.rank is None:
            return _kronecker_gap(stored, form, form.scale * weight)
    if isinstance(stored, forms) and all(isinstance(form, forms) for form, _ in parts):
        loras = [as_lora(form.to(torch.float64)) for form, _ in parts]
        coefficients = [w * lora.scale for lora, (_, w) in zip(loras, parts, strict=True)]
        exact = space.concatenate(loras, coefficients)
        return space.relative_gap(exact, as_lora(stored.to(torch.float64)))
    exact = sum(w * form.to(torch.float64).to_dense() for form, w in parts)
    gap = float(torch.linalg.vector_norm(stored.to(torch.float64).to_dense() - exact))
    return space.relative(gap, float(torch.linalg.vector_norm(exact)))


def _combined(
    name: str,
    parts: list[tuple[int, Factors]],
    adapters: list[Adapter],
    weights: list[float],
    rule: dict[str, float],
    fmt: str,
) -> Factors:
    """Layer `name` of the combination of `parts` (`(adapter index, form)`, weights ≠ 0). A
    layer from one adapter keeps its form (`_weighted`) and, truncated, is resized as
    `resize_adapter` resizes for `fmt`; several become one LoRA (`decompose.combine`)."""
    if len(parts) == 1:
        index, layer = parts[0]
        try:
            weighted = _weighted(layer, weights[index], fmt)
        except NonFiniteError as err:
            source = _label(adapters[index], index)
            raise NonFiniteError(f"layer {name!r} of {source}: {err}") from None
        if not rule or _vector(weighted):
            return weighted
        _factor_space_layer(adapters[index], name)
        to = None if TRAITS[fmt].mid else "lora"
        return decompose.resize(weighted, to=to, square=TRAITS[fmt].mid, **rule)
    forms = [layer for _, layer in parts]
    if all(isinstance(form, Full) for form in forms) and (not rule or _vector(forms[0])):
        return _summed(forms, [weights[i] for i, _ in parts])
    for index, _ in parts:
        _factor_space_layer(adapters[index], name)
    return decompose.combine(forms, [weights[i] for i, _ in parts], **rule)


def _summed(forms: Sequence[Full], weights: Sequence[float]) -> Full:
    """`Σ w · ΔW` of dense differences, exactly: summed in float64, rounded once to their
    promoted dtype."""
    dtype = functools.reduce(torch.promote_types, [form.delta.dtype for form in forms])
    pairs = zip(forms, weights, strict=True)
    total = sum(w * form.to(torch.float64).to_dense() for form, w in pairs)
    return Full(total.to(dtype))


def format_factor_report(report: dict[str, Any]) -> str:
    """The report of `extract_adapter`, `resize_adapter` or `combine_adapters` as text: a
    header, then one line per layer (form, rank, relative error, energy kept)."""
    rows = report["layers"]
    if "tuned" in report:
        head = f"{report['tuned']} − {report['base']}"
    elif "inputs" in report:
        terms = [f"{abs(i['weight']):g}·{i['adapter']}" for i in report["inputs"]]
        signs = ["−" if i["weight"] < 0 else "+" for i in report["inputs"]]
        head = "".join(f" {sign} {term}" for sign, term in zip(signs, terms, strict=True))
        head = "−" + head[3:] if head.startswith(" − ") else head.removeprefix(" + ")
    else:
        head = f"{report['input']} ({report['from']})"
    errors = [row["relative_error"] for row in rows]
    lines = [
        f"{head} → {', '.join(report['output'])} ({report['format']}): {len(rows)} layers, "
        f"relative error ≤ {max(errors, default=0.0):.3g}"
    ]
    if report.get("skipped"):
        lines.append(f"{len(report['skipped'])} layers with no difference skipped")
    if report.get("dropped"):
        dropped = report["dropped"]
        lines.append(
            f"{len(dropped)} layers dropped: every adapter that has them is weighted 0 (e.g. "
            f"{', '.join(dropped[:_SHOWN])})"
        )
    if report.get("embeddings"):
        tables = report["embeddings"]
        lines.append(
            f"{len(tables)} embedding tables differ and are not extracted (e.g. "
            f"{', '.join(tables[:_SHOWN])}): {_NAME_TABLES}"
        )
    if report.get("convolutions"):
        convs = report["convolutions"]
        lines.append(
            f"{len(convs)} convolutions differ and are not extracted (e.g. "
            f"{', '.join(convs[:_SHOWN])}): {_CONVS.format(report['format'])}"
        )
    if report.get("other_changes"):
        changed = report["other_changes"]
        where = (
            "are saved whole (PEFT's modules_to_save, bias)"
            if report.get("saved_whole")
            else "are not in the adapter (--whole saves them whole in PEFT folders)"
        )
        lines.append(
            f"{len(changed)} other tensors differ and {where} (e.g. "
            f"{', '.join(changed[:_SHOWN])})"
        )
    header = ["layer", "form", "rank", "relative error", "energy kept"]
    table = [header]
    for row in rows:
        rank = sizes_text(row["rank"])
        if row.get("rank_before") is not None:  # a dense difference has no rank to lower
            rank = f"{sizes_text(row['rank_before'])} → {rank}"
        table.append(
            [
                row["name"],
                row["form"],
                rank,
                f"{row['relative_error']:.3g}",
                f"{row['energy']:.6f}",
            ]
        )
    return "\n".join([*lines, "", *aligned(table)])
