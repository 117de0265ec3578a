"""Layers whose update a PEFT file cannot hold as a module LoRA.

PEFT reads the module LoRA of a transformers `Conv1D` (GPT-2's layers, weights stored
`(in, out)`) transposed, and that of an `nn.Embedding` from other keys than `lora_A` /
`lora_B`; a PEFT or diffusers file's module LoRAs of `Conv1D`s are read so, where the base
tells the module types (`adapter.transposed_layers`). A `Conv1D` layer named in
`target_parameters` instead has its ΔW added to the weight as it is stored: such layers go
into PEFT files that way (but with dropout, which PEFT takes only without parameter
targets: then as the module LoRAs PEFT runs transposed, `formats.peft`), into kohya and
LyCORIS files as they are (their metadata records them), and not into diffusers files,
whose loader takes module LoRAs only. An embedding table goes into PEFT files as PEFT's
LoRA of an `nn.Embedding` (`lora_embedding_A` / `_B`), unless its source already holds it
as a parameter target (a PEFT file's or `model_adapter`'s, kept as it was but with
dropout), and into kohya and LyCORIS files as it is, not into diffusers files; a convolution
PEFT's conv LoRA cannot run as the base does (grouped, dilated, or padded other than with
zeros) goes into kohya and LyCORIS files only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from ..errors import ConversionError
from .adapter import Adapter, per_component, require_known_layout, require_used_component
from .formats import TRAITS
from .formats.dora import conv1d_dora
from .module_types import PADDED, Kinds, kinds, tells_module_types
from .names import Base, component_bases, targets_parameter


def layer_kinds(adapter: Adapter, base: Base | Mapping[str, Base] | None) -> Kinds:
    """`kinds` of `adapter`'s layers found against `base` (per component where it has
    several), named `<module>.weight` as PEFT names them, without a pipeline component."""
    found: dict[str, set[str]] = {"conv1d": set(), "tables": set()}
    convs: dict[str, str] = {}
    for component, sub in component_bases(base).items():
        shapes = {}
        for name, form in adapter.items():
            head, _, rest = name.partition(".")
            if component and head != component:
                continue
            path = rest if rest and head in adapter.components else name
            shapes[path] = tuple(form.shape)
        layers = kinds(shapes, sub)
        for kind, names in found.items():
            names.update(f"{n}.weight" for n in getattr(layers, kind))
        convs.update((f"{n}.weight", why) for n, why in layers.convs)
    return Kinds(**{kind: tuple(sorted(names)) for kind, names in found.items()},
                 convs=tuple(sorted(convs.items())))  # fmt: skip


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


def require_runnable_convs(convs: Sequence[tuple[str, str]], fmt: str, where: object) -> None:
    """`ConversionError` when `fmt` builds module LoRAs itself (PEFT, diffusers) and `convs`
    (`(layer, why)` pairs of convolutions it cannot run, `peft_conv_mismatch`) is not
    empty."""
    if convs and not TRAITS[fmt].kohya_named:
        name, why = convs[0]
        count = f" ({len(convs)} such convolutions)" if len(convs) > 1 else ""
        raise ConversionError(
            f"{where}: {name.removesuffix('.weight')!r}{count} is {why}, and {fmt} files load "
            "through PEFT's LoRA layers; leave it out, or write kohya or lycoris (lowrank "
            "merge applies those)"
        )


def require_no_tables(tables: Sequence[str], fmt: str, where: object) -> None:
    """`ConversionError` when `fmt`'s loader takes module LoRAs from `lora_A` / `lora_B`
    keys only (diffusers) and `tables` (embedding tables not already parameter targets) is
    not empty."""
    if tables and TRAITS[fmt].module_lora_only:
        raise ConversionError(
            f"{where}: {tables[0].removesuffix('.weight')!r} ({len(tables)} in all) is an "
            f"embedding table: PEFT reads an nn.Embedding's LoRA from lora_embedding_A / "
            f"lora_embedding_B, and {fmt} files hold lora_A / lora_B keys only, which it "
            "would load with no effect; leave it out, or write peft, kohya or lycoris"
        )


def require_conv1d_doras(
    adapter: Adapter, conv1d: Sequence[str], base: Base | Mapping[str, Base] | None, fmt: str
) -> None:
    """`ConversionError` naming the first DoRA layer of `adapter` that `fmt` (PEFT, diffusers)
    would write as PEFT's DoRA of a transformers `Conv1D` (`dora.conv1d_dora`) where `base`
    tells the module types (every base of a per-component one) and its module is no
    `Conv1D` of it (`conv1d`, `<module>.weight` as `layer_kinds` names them): PEFT would
    read it transposed."""
    if not TRAITS[fmt].dora or TRAITS[fmt].kohya_named or base is None:
        return
    if not all(tells_module_types(sub) for sub in component_bases(base).values()):
        return
    for name, form in adapter.items():
        path = name.partition(".")[2] if adapter.component_of(name) else name
        if conv1d_dora(form, path, adapter.target_parameters) and not targets_parameter(
            path, conv1d
        ):
            raise ConversionError(
                f"{adapter.source or 'the adapter'}: layer {name!r} is a DoRA of the weight "
                "as stored with its magnitude per column, which PEFT's DoRA holds only as a "
                f"transformers Conv1D's (fan_in_fan_out), but the base's module {path!r} is "
                f"no Conv1D: {fmt} would read it transposed; write lycoris"
            )


def with_layouts(adapter: Adapter, base: Base | Mapping[str, Base] | None, fmt: str) -> Adapter:
    """`adapter` ready to be written as `fmt`: its `Conv1D` layers (found against `base`)
    join its parameter targets, which PEFT configs and lowrank's kohya and LyCORIS metadata
    keep and diffusers refuses (`require_module_layout`); embedding tables not already
    parameter targets (found against `base`, or read as such from a PEFT file) become the
    adapter's `embeddings` for PEFT, which writes them as `lora_embedding_A` / `_B`, and
    are refused for diffusers (`require_no_tables`), and so are
    convolutions PEFT cannot run as merged (`require_runnable_convs`), except padded ones
    from a PEFT or diffusers file, whose function PEFT's run is (PEFT trained it so; a
    dilated one PEFT cannot run at all). The `Conv1D`s found join the adapter's `conv1d`,
    and a DoRA PEFT would hold as a `Conv1D`'s on a module of the base that is none is
    refused (`require_conv1d_doras`)."""
    require_known_layout(adapter)  # resolved against a base that tells them, if it says so
    found = layer_kinds(adapter, base)
    targets = tuple(sorted({*adapter.target_parameters, *found.conv1d}))
    where = adapter.source or "the adapter"
    require_module_layout(targets, fmt, where)
    tables = sorted({*found.tables, *adapter.embeddings} - set(targets))
    require_no_tables(tables, fmt, where)
    convs = found.convs
    ran_in_peft = adapter.format in TRAITS and not TRAITS[adapter.format].kohya_named
    if ran_in_peft:  # a PEFT or diffusers file's padded convolutions ran as PEFT runs them
        convs = tuple((name, why) for name, why in convs if not why.startswith(PADDED))
    require_runnable_convs(convs, fmt, where)
    require_conv1d_doras(adapter, found.conv1d, base, fmt)
    conv1d = tuple(sorted({*adapter.conv1d, *found.conv1d}))
    return replace(adapter, target_parameters=targets, embeddings=tuple(tables), conv1d=conv1d)


def resolved_for(
    adapter: Adapter, base: Base | Mapping[str, Base] | None, component: str | None, fmt: str
) -> Adapter:
    """`adapter` as read from its file, made ready to be written as `fmt`: `component`
    refused where it would change nothing (`require_used_component`), resolved against
    `base` where one is given (`Adapter.resolve`; without one, a layer PEFT's `"all-linear"`
    may leave out is refused, `Adapter.require_peft_selected`), then `with_layouts`."""
    placed = per_component(base) and adapter.has_plain_layers
    where = adapter.source or "the adapter"
    require_used_component(component, placed or not TRAITS[fmt].kohya_named, where)
    if base is not None:
        adapter = adapter.resolve(base, component)
    else:
        adapter.require_peft_selected(None)
    return with_layouts(adapter, base, fmt)
