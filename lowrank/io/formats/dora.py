"""DoRA in adapter files: PEFT's and diffusers' `lora_magnitude_vector` beside a layer's
`lora_A` / `lora_B`, LyCORIS' `dora_scale` beside a layer's parts; each read into the
magnitude `lowrank.DoRA` holds (the shape that broadcasts against the weight) and written
back in the file's own shape.

- PEFT / diffusers (`use_dora`): `<layer>.lora_magnitude_vector` (PEFT 0.21 writes it so;
  `….lora_magnitude_vector.weight`, the module's parameter, is read too), `(out,)` for a
  linear layer, `(1, out, 1…)` for a convolution: one value per output channel, the norm
  without eps.
- LyCORIS (`dora_wd`): `<stem>.dora_scale`, `(out, 1, 1…)` with `wd_on_out` (LyCORIS'
  default), `(1, in, 1…)` without: the norm over the other axes, plus the machine epsilon
  of the dtype LyCORIS runs the network in, which is the adapted module's (LyCORIS builds
  `dora_scale` in float32 and copies the file's values into it, whatever their dtype, and
  `merge_to` casts the network to the module's weight dtype first): the eps of the weight
  it merges into (`DoRA(eps=None)`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ...errors import ConversionError, FileFormatError, LowRankError, ShapeError
from ...forms import CP, DORA_AXES, DoRA, Factors, Full, LoRA, Tucker2, update_of
from ..adapter import Adapter, form_name
from ..names import targets_parameter
from .common import build, cp_refusal

MAGNITUDE_KEY = re.compile(r"^(?P<layer>.+)\.lora_magnitude_vector(?:\.weight)?$")
LYCORIS_PART = "dora_scale"


def magnitudes(
    tensors: Mapping[str, torch.Tensor], source: Path
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, torch.Tensor]]]:
    """`tensors` without the DoRA magnitudes, and `{layer: (key, magnitude)}` of those (layer:
    the key before `.lora_magnitude_vector`). A `FileFormatError` names the keys of a layer's
    magnitude under both spellings, and of a DoRA on an embedding (`lora_embedding_A`, whose
    magnitude PEFT keeps per embedding dimension of the `(num, dim)` table), which lowrank
    does not read."""
    rest, found = {}, {}
    for key, tensor in tensors.items():
        match = MAGNITUDE_KEY.match(key)
        if match is None:
            rest[key] = tensor
            continue
        if f"{match['layer']}.lora_embedding_A" in tensors:
            raise FileFormatError(
                f"{source}: key {key!r} is the DoRA magnitude of an embedding "
                "(lora_embedding_A), which lowrank's file tools do not support"
            )
        if match["layer"] in found:
            raise FileFormatError(
                f"{source}: keys {found[match['layer']][0]!r} and {key!r} are both the DoRA "
                "magnitude of one layer"
            )
        found[match["layer"]] = (key, tensor)
    return rest, found


def with_magnitudes(
    layers: Mapping[str, Factors],
    found: Mapping[str, tuple[str, torch.Tensor]],
    use_dora: bool,
    source: Path,
) -> dict[str, Factors | DoRA]:
    """`layers` (keyed as `found`) with each magnitude over its layer as a `DoRA`, axis 0 and
    no eps, as PEFT reads them. A `FileFormatError` names the key of a magnitude without its
    layer's factors, or of the wrong shape (PEFT's: `(out,)` linear, `(1, out, 1…)` a
    convolution), a layer without a magnitude where the config says `use_dora` (PEFT would
    start it from the base's norms), and a magnitude where it does not (PEFT would ignore it)."""
    for layer, (key, _) in found.items():
        if layer not in layers:
            raise FileFormatError(
                f"{source}: key {key!r} is a DoRA magnitude of a layer with no lora_A / lora_B"
            )
        if not use_dora:
            raise FileFormatError(
                f"{source}: key {key!r} is a DoRA magnitude, but the config does not say "
                "use_dora: PEFT would ignore it"
            )
    out: dict[str, Factors | DoRA] = {}
    for layer, form in layers.items():
        if layer not in found:
            if use_dora:
                raise FileFormatError(
                    f"{source}: layer {layer!r} has no lora_magnitude_vector, but the config "
                    "says use_dora: PEFT would start its magnitude from the base weight's "
                    "norms, which no file holds"
                )
            out[layer] = form
            continue
        key, magnitude = found[layer]
        out[layer] = build(source, key, lambda f=form, m=magnitude: _peft_dora(f, m))
    return out


def _peft_shape(form: Factors) -> tuple[int, ...]:
    """The shape PEFT stores a DoRA magnitude of ΔW `form` in."""
    out_features, ndim = form.shape[0], len(form.shape)
    return (out_features,) if ndim == 2 else (1, out_features, *([1] * (ndim - 2)))


def _peft_dora(form: Factors, magnitude: torch.Tensor) -> DoRA:
    shape = _peft_shape(form)
    if tuple(magnitude.shape) != shape:
        raise FileFormatError(
            f"a DoRA magnitude of ΔW {tuple(form.shape)} must have shape {shape} (one value per "
            f"output channel, as PEFT stores it), got {tuple(magnitude.shape)}"
        )
    return DoRA(form, magnitude.reshape(form.shape[0], *([1] * (len(form.shape) - 1))))


def lycoris_dora(form: Factors, scale: torch.Tensor, stem: str, source: Path) -> DoRA:
    """LyCORIS' layer `form` with its `dora_scale`: axis 0 for `(out, 1, 1…)`
    (`wd_on_out`), 1 for `(1, in, 1…)` (`in·K` may be flattened in `form`), eps None (that
    of the weight's dtype, whatever `dora_scale`'s dtype is); `ShapeError` naming the key
    for any other shape, and the error of a `dora_scale` that is no floating-point tensor
    naming it too."""
    for axis in DORA_AXES:
        try:
            return DoRA(form, scale, axis, None)
        except ShapeError:
            continue
        except LowRankError as err:
            raise type(err)(f"{source}: {stem}.{LYCORIS_PART}: {err}") from None
    ndim = max(scale.ndim, len(form.shape), 2)
    on_out = (form.shape[0], *([1] * (ndim - 1)))
    on_in = (1, form.shape[1], *([1] * (ndim - 2)))
    raise ShapeError(
        f"{source}: {stem}.{LYCORIS_PART} must have shape {on_out} (one value per output "
        f"channel, wd_on_out) or {on_in} (per input channel) for ΔW {tuple(form.shape)}, got "
        f"{tuple(scale.shape)}"
    )


def lycoris_parts(form: DoRA) -> dict[str, torch.Tensor]:
    """The `dora_scale` part of a DoRA layer: its magnitude in LyCORIS' shape, in its own
    dtype (LyCORIS' eps follows the weight's dtype, not this one's)."""
    return {LYCORIS_PART: form.magnitude}


def conv1d_dora(form: Factors | DoRA, name: str, parameters: Sequence[str]) -> bool:
    """Whether layer `name` is what PEFT's DoRA of a transformers `Conv1D` is, as stored: a
    DoRA on a parameter target (one of `parameters`) with a linear LoRA update and its
    magnitude per column of the `(in, out)` weight (axis 1, per output feature)."""
    return (
        isinstance(form, DoRA)
        and targets_parameter(name, parameters)
        and isinstance(form.update, LoRA)
        and len(form.shape) == 2
        and form.axis == 1
    )


def peft_split(
    adapter: Adapter, fmt: str
) -> tuple[Adapter, dict[str, torch.Tensor]]:
    """`adapter` with each DoRA layer's update in its place, and `{layer: magnitude}` in PEFT's
    shape (`(out,)`, `(1, out, 1…)`). A transformers `Conv1D`'s DoRA, a parameter target
    (a linear LoRA of the weight as stored, `(in, out)`, its magnitude per column: per
    output feature), becomes the module LoRA PEFT's DoRA runs on a `Conv1D` (which it runs
    transposed, `fan_in_fan_out`): the LoRA of `(out, in)`, a magnitude per row, the layer
    no longer a parameter target, and the adapter's `fan_in_fan_out` set; only where the
    adapter knows its module is a `Conv1D` (`Adapter.conv1d`), since such a DoRA on an
    `nn.Linear`'s weight (a magnitude per input channel) looks the same. `ConversionError`
    naming the layer where PEFT's DoRA cannot hold it: a magnitude per input channel
    (LyCORIS without `wd_on_out`), another parameter target (PEFT's `target_parameters`
    refuse `use_dora`), one that nothing tells is a `Conv1D`'s, or DoRA and plain layers
    in one config (PEFT's `use_dora` is for
    every layer, and a plain one would start from the base's norms). A `Full` layer is left
    for the writer's own refusal (`common.full_refusal`)."""
    doras = {n: f for n, f in adapter.items() if isinstance(f, DoRA)}
    if not doras:
        return adapter, {}
    plain = [n for n, f in adapter.items() if not isinstance(f, (DoRA, Full))]
    if plain:
        raise ConversionError(
            f"layer {plain[0]!r} is a plain LoRA beside DoRA layers ({next(iter(doras))!r}), "
            f"which one {fmt} config cannot hold: its use_dora is for every layer"
        )
    for name, form in list(doras.items()):
        if isinstance(form.update, CP):
            raise ConversionError(cp_refusal(name, form.update, fmt))
        if not isinstance(form.update, (LoRA, Tucker2)):
            raise ConversionError(
                f"layer {name!r} is a {form_name(form)}; {fmt}'s DoRA is over a LoRA only: "
                "write lycoris"
            )
        if targets_parameter(name, adapter.target_parameters):
            if not conv1d_dora(form, name, adapter.target_parameters):
                raise ConversionError(
                    f"layer {name!r} is a DoRA on a weight as stored (a parameter target) "
                    f"other than a transformers Conv1D's, which {fmt}'s DoRA does not "
                    "support (PEFT's target_parameters refuse use_dora): write lycoris"
                )
            if not targets_parameter(name, adapter.conv1d):
                raise ConversionError(
                    f"{adapter.source or 'the adapter'}: layer {name!r} is a DoRA of the "
                    f"weight as stored with its magnitude per column, which {fmt}'s DoRA "
                    "holds only as a transformers Conv1D's (fan_in_fan_out), and nothing tells "
                    "that its module is one (on an nn.Linear it is a magnitude per input "
                    f"channel, which {fmt} would read transposed): give the base that tells "
                    "the module types (load_adapter(path, base=...), convert_adapter's base, "
                    "--base), or write lycoris"
                )
            doras[name] = form.transposed()  # the module LoRA PEFT runs on a Conv1D
            continue
        if form.axis != 0:
            raise ConversionError(
                f"layer {name!r} is a DoRA with a magnitude per input channel (LyCORIS without "
                f"wd_on_out); {fmt}'s DoRA has one per output channel: write lycoris"
            )
    magnitudes = {n: f.magnitude.reshape(_peft_shape(f.update)) for n, f in doras.items()}
    layers = {n: update_of(doras.get(n, f)) for n, f in adapter.items()}
    transposed = [n for n in doras if targets_parameter(n, adapter.target_parameters)]
    targets = tuple(p for p in adapter.target_parameters
                    if not any(targets_parameter(n, (p,)) for n in transposed))  # fmt: skip
    return replace(adapter, layers=layers, target_parameters=targets,
                   fan_in_fan_out=bool(transposed)), magnitudes  # fmt: skip
