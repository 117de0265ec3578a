"""Module names: those of a base model, and kohya's underscored names mapped back to them.

kohya / sd-scripts and LyCORIS name a layer `<prefix>_<module path with dots as
underscores>`, e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`. The prefix says which
model of a pipeline it targets (`KOHYA_PREFIXES`); the rest cannot be turned back into a
dotted path by itself (`down_blocks_0` could be `down_blocks.0` or `down.blocks_0`), so
it is looked up among the base model's module names: exactly one match or an error that
names the layer, never a guess.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import FileFormatError, TargetError
from .checkpoint import Checkpoint

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


def kohya_prefix(component: str | None, components: Iterable[str], default: str) -> str:
    """The kohya prefix for a layer of `component` (`default` when it has none); the first
    text encoder is `lora_te1` when a second one is present, else `lora_te`."""
    if component is None:
        return default
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


def resolve_stems(
    bodies: Mapping[str, str], names: Iterable[str], source: object, base: object
) -> dict[str, str]:
    """Map each kohya layer (stem → underscored body) to the one module of `names` whose
    dotted path underscores to its body. `TargetError` naming the file `source`, the layer
    and `base` when there is none, or more than one."""
    index: dict[str, list[str]] = {}
    for name in names:
        index.setdefault(name.replace(".", "_"), []).append(name)
    resolved = {}
    for stem, body in bodies.items():
        found = index.get(body, [])
        if not found:
            sample = sorted(n for hits in index.values() for n in hits)[:_SHOWN]
            raise TargetError(
                f"{source}: kohya layer {stem!r} matches no module of the base {base} (its "
                f"{len(index)} module names look like {sample})"
            )
        if len(found) > 1:
            raise TargetError(
                f"{source}: kohya layer {stem!r} is ambiguous in the base {base}: modules "
                f"{sorted(found)} all underscore to {body!r}"
            )
        resolved[stem] = found[0]
    return resolved
