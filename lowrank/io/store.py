"""Reading and writing adapter files: `load_adapter` and `save_adapter`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import nn

from .._checks import require_finite, require_name, require_path, require_paths
from ..errors import ArgumentError
from . import formats
from .adapter import Adapter, require_known_layout
from .checkpoint import Checkpoint
from .files import PathLike, Staging, output_path, require_outputs, require_outside_folders
from .formats import diffusers, peft, require_format
from .layouts import require_module_layout
from .names import Base, base_paths


def adapter_files(path: Path, fmt: str | None = None) -> list[Path]:
    """The files an adapter at `path` is read from (a PEFT folder's weights and config)."""
    fmt = fmt or formats.detect(path)
    if fmt == "peft":
        folder = path if path.is_dir() else path.parent
        return [folder / peft.WEIGHTS_NAME, folder / peft.CONFIG_NAME]
    if fmt == "diffusers":
        return [diffusers.weights_path(path)]
    return [path]


def adapter_readings(path: Path, fmt: str | None = None) -> dict[Path, str]:
    """The paths whose writing would change what the adapter at `path` reads as, though
    they are not read, each → what it would change (`files.require_outputs`): a folder
    holding `adapter_config.json` reads as a PEFT adapter (to lowrank and PEFT), so that
    name may not be written into a diffusers folder given as an input, as such or as its
    `pytorch_lora_weights.safetensors` (which diffusers would still load). A PEFT folder
    reads by its own files (`adapter_files`) whatever lies beside them, and kohya, LyCORIS
    and other diffusers files are read as they are."""
    fmt = fmt or formats.detect(path)
    if fmt != "diffusers" or not (path.is_dir() or path.name == diffusers.WEIGHTS_NAME):
        return {}
    folder = path if path.is_dir() else path.parent
    return {
        folder / peft.CONFIG_NAME: f"what the input {path} reads as: with a PEFT config, "
        f"{folder} reads as a PEFT adapter to lowrank and PEFT, while diffusers still loads "
        f"its {diffusers.WEIGHTS_NAME}"
    }


def load_adapter(
    path: PathLike, *, base: Base | Mapping[str, Base] | None = None, component: str | None = None
) -> Adapter:
    """The adapter file (or PEFT folder) at `path`, its format detected, as an `Adapter`.

    Every tensor is checked (safetensors header, finite values, shapes of each form); the
    scales are resolved from the file's alphas. With `base` (a checkpoint path, an
    `nn.Module`, a dict of module name → weight shape, or a dict of those per component),
    kohya names become module paths and every layer is checked against its module
    (`Adapter.resolve`; `component` names the model of layers that name none when `base`
    is given per component). Raises `FileFormatError` for a file that is not an adapter (a
    pickle is refused unread), `NonFiniteError` for NaN/Inf factors.
    """
    component = require_name("component", component)
    adapter = formats.read(require_path("path", path))
    return adapter if base is None else adapter.resolve(base, component)


def require_finite_factors(adapter: Adapter) -> None:
    """`NonFiniteError` naming the layer and factor of `adapter` that holds NaN/Inf, or the
    base weight it saves (`Adapter.base_weights`) that does."""
    for name, form in adapter.items():
        for key, tensor in form.named_factors().items():
            require_finite(f"layer {name!r}: {key}", tensor)
    for key, tensor in adapter.base_weights.items():
        require_finite(f"saved base weight {key}", tensor)


def adapter_from(
    source: PathLike | Adapter,
    base: Base | Mapping[str, Base] | None = None,
    component: str | None = None,
) -> Adapter:
    """`source` itself, an `Adapter` whose factors are checked as a file's are
    (`require_finite_factors`), or the adapter file it names (`load_adapter`); with `base`,
    resolved against it (`Adapter.resolve`, with `component`)."""
    if isinstance(source, Adapter):
        require_finite_factors(source)
        return source if base is None else source.resolve(base, component)
    return load_adapter(source, base=base, component=component)


def save_adapter(
    adapter: Adapter,
    out: PathLike,
    format: str,
    *,
    component: str | None = None,
    prefix: str | None = None,
    inputs: Iterable[PathLike] = (),
    base: Base | Mapping[str, Base] | None = None,
) -> list[Path]:
    """Write `adapter` as `format` (`peft`, `kohya`, `lycoris`, `diffusers`) at `out`; return
    the files written.

    `out` is a folder for PEFT (and for diffusers unless it ends in `.safetensors`), a file
    otherwise, whose path may not end in a separator, which names a folder
    (`OutputPathError`). Tucker2 layers are folded exactly (`lowrank.fold`) for formats
    without a mid factor; LoHa and LoKr layers go to `lycoris`, and to `peft` as PEFT's
    LoHa or LoKr adapter type where every layer is LoHa or every one LoKr and PEFT builds
    their parts (`ConversionError` otherwise); Full layers go only to `lycoris`
    (`convert_adapter` approximates LoHa, LoKr and 2-D Full layers by LoRA on request).
    Base weights saved beside the layers (`Adapter.base_weights`) go to PEFT output only
    (LoRA, LoHa or LoKr; `ConversionError` naming the key otherwise). `component` picks the
    model for PEFT when the adapter names several, and names the model of component-less
    layers for diffusers (default `unet`); kohya names of component-less layers start with
    `prefix`
    (default: the prefix they came with, `lycoris` for a LyCORIS whole-model file, else
    `lora_unet`; a `prefix` given where every layer names its model is an
    `ArgumentError`). The files are written atomically and never over the adapter's own
    source files, over `inputs` (a list of paths, else `ArgumentError`), or over or into
    the checkpoints `base` names (the base the adapter was resolved with;
    `OutputPathError`). An adapter whose config says `fan_in_fan_out`
    and that is not resolved against a base that tells the module types is a
    `FileFormatError` (its `Conv1D` layers are transposed, and only the base tells which;
    `base` here does not resolve it: resolve it first, with `load_adapter(path, base=…)` or
    `Adapter.resolve`).
    """
    if not isinstance(adapter, Adapter):
        raise ArgumentError(f"adapter must be a lowrank.io.Adapter, got {type(adapter).__name__}")
    component = require_name("component", component)
    inputs = require_paths("inputs", inputs)
    out = require_new_output(out, format, [adapter], base=base, inputs=inputs)
    require_finite_factors(adapter)  # a file that its own reader would refuse is not written
    require_known_layout(adapter, written=True)
    adapter.require_peft_selected(None)  # resolved against a base, it is cleared
    stored = (*adapter.target_parameters, *adapter.embeddings)  # updates of weights as stored
    require_module_layout(stored, format, adapter.source or "the adapter")
    with Staging() as staging:
        return formats.write(adapter, out, staging, format, component=component, prefix=prefix)


def written_layers(adapter: Adapter, fmt: str, component: str | None) -> Adapter:
    """The layers of `adapter` that `save_adapter` writes as `fmt`, under their names: for
    PEFT, which holds one model, those of the model `component` picks (a `TargetError`
    where it picks none, as `Adapter.select`'s), else all (kohya names too, which
    `save_adapter` refuses for PEFT, naming the fix), so that a tool works on and reports
    the layers written."""
    if fmt != "peft" or adapter.kohya_names:
        return adapter
    adapter.select(component)  # the model it picks: the one given, or the only one
    chosen = component or (adapter.components[0] if adapter.components else "")
    kept = [n for n in adapter.layers if adapter.component_of(n) == chosen]
    return adapter if len(kept) == len(adapter) else adapter.renamed(
        {n: n for n in kept}, adapter.components
    )


def planned_outputs(out: Path, fmt: str) -> list[Path]:
    """The paths an adapter written as `fmt` at `out` occupies: `out` itself (a kohya or
    LyCORIS file, a diffusers one ending in `.safetensors`, or the folder), and the files of
    a PEFT or diffusers folder there."""
    if fmt == "peft":
        return [out, out / peft.WEIGHTS_NAME, out / peft.CONFIG_NAME]
    if fmt == "diffusers" and out.suffix.lower() != ".safetensors":
        return [out, out / diffusers.WEIGHTS_NAME]
    return [out]


def require_new_output(
    out: PathLike,
    fmt: str,
    adapters: Iterable[Adapter] = (),
    *,
    base: Base | Mapping[str, Base] | None = None,
    inputs: Iterable[Path] = (),
) -> Path:
    """`out` as a `Path`, once checked as `save_adapter` will write `fmt` there, so that a
    tool can check before its work: not ending in a separator where `fmt` writes one file
    there (`output_path`), never over the files of `adapters` read from disk or a name that
    would change what one reads as (`adapter_readings`), over `inputs`, or over or into the
    checkpoints `base` names (`OutputPathError`)."""
    fmt = require_format(fmt)
    out = output_path(out, lambda path: planned_outputs(path, fmt) == [path])
    sources = [a for a in adapters if a.source is not None]
    inputs = [*inputs, *(f for a in sources for f in adapter_files(a.source, a.format))]
    readings = {k: v for a in sources for k, v in adapter_readings(a.source, a.format).items()}
    kinds = (Checkpoint, str, os.PathLike, nn.Module, Mapping)
    if base is not None and not isinstance(base, kinds):
        raise ArgumentError(
            f"base must be a checkpoint path, a Checkpoint, a module or a dict of them, got "
            f"{type(base).__name__}"
        )
    bases = base_paths(base)
    inputs += [file for path in bases for file in Checkpoint(path).inputs]
    require_outputs(planned_outputs(out, fmt), inputs, readings)
    require_outside_folders(out, bases, "an adapter")
    return out
