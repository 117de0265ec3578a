"""What the format modules share: reading an adapter's tensors (checked finite) and the
module types lowrank records in their metadata, building a layer with the file and key in
its errors, and choosing what a writer may store.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch

from ..._checks import all_finite, require_finite
from ...errors import ConversionError, FileFormatError, LowRankError, NonFiniteError
from ...forms import CP, DoRA, Full, LoRA, Tucker2, dtype_of, fold
from ..adapter import Adapter, form_name
from ..files import load_tensors, parse_json
from ..names import PARAMETERS, layer_parameter

T = TypeVar("T")
F = TypeVar("F", torch.Tensor, LoRA, Tucker2)

CONV1D_KEY = "lowrank_conv1d"
"""Metadata of the layers of lowrank's kohya, LyCORIS and PEFT files known to be transformers
`Conv1D`s (`Adapter.conv1d`, `<module>.weight`), a JSON list: PEFT output then holds their
DoRA as a `Conv1D`'s without a base, and a PEFT file's module LoRAs of those modules (which
PEFT runs transposed, `fan_in_fan_out`) are read without one (`peft.recorded_conv1d`)."""


def build(source: Path, layer: str, make: Callable[[], T]) -> T:
    """`make()`, with any lowrank error re-raised as its own type naming file and layer."""
    try:
        return make()
    except LowRankError as err:
        raise type(err)(f"{source}: layer {layer!r}: {err}") from None


def stored_difference(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`values` (float64: a dense difference times a scale the file cannot store beside it,
    LyCORIS' `diff_b`, PEFT's `lora_B.bias` under another scale) in `dtype` where that holds
    each of them exactly, else in float32 (float64 for a float64 `dtype`): rounded no more
    than the float32 merge that adds them, not to the 8 bits of a bfloat16 they were read in."""
    held = values.to(dtype)
    if torch.equal(held.to(torch.float64), values):
        return held
    return values.to(torch.promote_types(dtype, torch.float32))


def exact_fold(tucker: Tucker2) -> LoRA:
    """`lowrank.fold(tucker)`, the LoRA of `down' = mid ∘ down`, in the factors' dtype where
    rounding `down'` to it changes none of its float64 values, else in float32: a bfloat16
    or float16 Tucker layer folded for a file without a mid factor keeps float32's precision
    instead of losing a relative 2e-3 (bfloat16) or 2e-4 (float16) of its ΔW."""
    folded = fold(tucker)
    if folded.down.dtype.itemsize >= 4:
        return folded
    wide = fold(tucker.to(torch.float64))
    if torch.equal(folded.down.to(torch.float64), wide.down) and torch.equal(
        folded.up.to(torch.float64), wide.up
    ):
        return folded
    return fold(tucker.to(torch.float32))


def one_dtype(*forms: F) -> list[F]:
    """`forms` (the parts of one LoHa or LoKr) cast to the dtype they promote to, which the
    form requires of its parts (`exact_fold` may have widened one of them)."""
    dtypes = [f.dtype if isinstance(f, torch.Tensor) else dtype_of(f) for f in forms]
    dtype = functools.reduce(torch.promote_types, dtypes)
    return [f.to(dtype) for f in forms]


def full_at_scale_one(form: Full) -> torch.Tensor:
    """ΔW of a `Full` difference as a file that holds no scale stores it: its `delta` at
    scale 1, else `scale · delta` in float64, `stored_difference` (`ΔW (*shape)`);
    `NonFiniteError` where that leaves the dtype's range."""
    if form.scale == 1.0:
        return form.delta
    wide = form.delta.to(torch.float64) * form.scale
    stored = stored_difference(wide, form.delta.dtype)
    if not all_finite(stored):
        raise NonFiniteError(
            f"ΔW = {form.scale:.4g} · diff leaves the range of {stored.dtype}: its largest "
            f"|entry| is {float(wide.abs().max()):.4g}"
        )
    return stored


def require_finite_tensors(source: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Raise `NonFiniteError` naming the file and key of the first tensor with NaN or Inf."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point():
            require_finite(f"{source}: {key}", tensor)


def adapter_tensors(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an adapter's safetensors file, floating tensors checked
    finite; `FileFormatError` for a file with no tensors (an adapter with no layers)."""
    tensors, metadata = load_tensors(weights)
    if not tensors:
        raise FileFormatError(f"{weights} holds no tensors: the adapter has no layers")
    require_finite_tensors(weights, tensors)
    return tensors, metadata


def recorded_list(metadata: Mapping[str, str], source: Path, key: str) -> tuple[str, ...]:
    """The names a lowrank-written file recorded as a JSON list under metadata `key`; none
    where it records none; `FileFormatError` naming `source` and `key` for anything else
    (JSON that does not parse, or no list of strings)."""
    try:
        names = parse_json(metadata.get(key, "[]"))
    except (ValueError, RecursionError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FileFormatError(f"{source}: metadata {key} is not a list of names")
    return tuple(names)


def lora_only(adapter: Adapter, fmt: str, *, mid: bool) -> dict[str, LoRA | Tucker2]:
    """The layers of `adapter` as forms `fmt` stores: LoRA, and Tucker2 when it has a mid
    factor (`mid`), else folded exactly into a LoRA (`lowrank.fold`). A LoHa, LoKr or Full
    layer is a `ConversionError` (only `convert_adapter(..., rank=…)` approximates it), and so is
    a CP layer, whose exact LoRA (`lowrank.as_lora`) the message points to."""
    layers: dict[str, LoRA | Tucker2] = {}
    for name, form in adapter.items():
        if isinstance(form, Tucker2) and not mid:
            layers[name] = exact_fold(form)
        elif isinstance(form, (LoRA, Tucker2)):
            layers[name] = form
        elif isinstance(form, CP):
            raise ConversionError(cp_refusal(name, form, fmt))
        elif isinstance(form, Full):
            raise ConversionError(full_refusal(name, form, fmt))
        elif isinstance(form, DoRA):
            raise ConversionError(magnitude_refusal(name, form, fmt))
        else:
            raise ConversionError(
                f"layer {name!r} is a {form_name(form)}, which {fmt} files cannot hold exactly; "
                "convert with a rank to approximate it by truncated SVD (the error is "
                "reported), or write lycoris"
            )
    return layers


def full_refusal(name: str, form: Full, fmt: str) -> str:
    """Why a `Full` layer `name` (a dense difference) is not written as `fmt`, whose files
    lowrank writes with factors only (PEFT's hold a bias's beside its module's LoRA, as
    `lora_bias`): LyCORIS files hold it (`diff`, `diff_b`); a weight's can be approximated;
    one of a `PARAMETERS` parameter, neither (`parameter_refusal`)."""
    if layer_parameter(name)[1] in PARAMETERS:
        return parameter_refusal(name)
    if len(form.shape) == 1:
        what = "a bias's or norm's (1-D), which no LoRA approximates"
        if fmt.lower() == "peft":
            what += " (PEFT's lora_bias holds a bias's only beside its module's LoRA, no DoRA)"
    else:
        what = "a weight's; convert with a rank to approximate it by truncated SVD"
    return (
        f"layer {name!r} is a dense difference (Full, shape {tuple(form.shape)}), which "
        f"lowrank's {fmt} files do not hold: write lycoris (diff, diff_b); it is {what}"
    )


def parameter_refusal(name: str) -> str:
    """Why layer `name`, a dense difference of a `names.PARAMETERS` parameter (Wan's
    `modulation`), is written in no format: kohya and LyCORIS files have no name for it,
    PEFT and diffusers files hold factors of modules, and no rank makes it a LoRA."""
    parameter = layer_parameter(name)[1]
    return (
        f"layer {name!r} is a dense difference of the parameter {parameter!r}, no module's "
        "weight or bias, which no adapter file lowrank writes can hold (kohya and LyCORIS "
        "files have no name for it, PEFT and diffusers files hold LoRAs of modules, and no "
        "rank makes one of it): merge it into the model instead (lowrank merge BASE ADAPTER "
        "-o OUT; merge_checkpoint, apply_adapter), which adds it exactly"
    )


def magnitude_refusal(name: str, form: DoRA, fmt: str) -> str:
    """Why a DoRA layer `name` is not written as `fmt`, a format without DoRA magnitudes."""
    return (
        f"layer {name!r} is a {form_name(form)}, whose magnitude {fmt} files cannot hold: "
        "write lycoris (dora_scale), or peft / diffusers (lora_magnitude_vector)"
    )


def cp_refusal(name: str, form: CP, fmt: str) -> str:
    """Why a `CP` layer `name` is not written as `fmt`: no format has a CP layout, but its
    exactly equal LoRA (`lowrank.as_lora`, rank R) is one every format holds."""
    return (
        f"layer {name!r} is a CP, which {fmt} files have no layout for; its exactly equal "
        f"LoRA, lowrank.as_lora(form) (rank {form.rank}), is one they hold: write that"
    )
