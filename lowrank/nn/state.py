"""What an adapter's state dict records and what may load into it: the saved state
(`_extra_state`: merged, residual, trainable, scale, form), the state-dict hooks that save
merged factors as they were merged and map the un-adapted layer's keys to the base, and the
checks that refuse, before torch copies anything, a state that would load into a different
model (another form, shape, scale or start). `module` is a `LowRankAdapter` throughout."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .._tensors import gathered
from ..errors import NonFiniteError, ShapeError, StateDictError
from .variants import VARIANTS


def save_as_merged(
    module: nn.Module, state_dict: dict, prefix: str, _meta: dict
) -> None:
    """State-dict post-hook: a merged adapter's factors are saved as they were merged
    (`merged_factors`), so that the state's weight holds their ΔW even where the factors
    changed since; a shard (FSDP2's DTensor) is saved as the one kept at the merge."""
    if not module.merged or module.merged_factors is None:
        return
    for key, tensor in module.merged_factors.items():
        saved = state_dict.get(prefix + key)
        if not isinstance(saved, torch.Tensor) or saved.is_meta or tensor.is_meta:
            continue
        if tensor.shape != saved.shape:
            continue
        if type(saved.detach()) is not torch.Tensor:  # a shard: kept with its placements
            same = getattr(tensor, "placements", None) == getattr(saved, "placements", ())
            if same and type(tensor) is type(saved.detach()):
                state_dict[prefix + key] = tensor.to(dtype=saved.dtype)
            continue
        merged = tensor.to(device=saved.device, dtype=saved.dtype)
        if not torch.equal(merged, saved.detach()):  # changed since: keep_vars aside
            state_dict[prefix + key] = merged


def _base_names(module: nn.Module) -> set[str]:
    """The names of the base layer's own parameters, buffers and submodules."""
    base = module.base
    return set(base._parameters) | set(base._buffers) | set(base._modules)


def map_base_keys(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    _meta: dict,
    _strict: bool,
    _missing: list,
    _unexpected: list,
    _errors: list,
) -> None:
    """Load pre-hook: keys of the un-adapted layer (`prefix.weight`) go to the base
    (`prefix.base.weight`); the saved state (`saved_state`) sets the merged flag (a
    checkpoint that carries the base weight without it is unmerged), and a fixed scale saved
    loads into a trainable one. Factors may not load into a merged adapter without its base
    weight: the weight would keep the old ΔW."""
    base_names = _base_names(module)
    own = {name.split(".")[0] for name in module.adapter_tensors()}
    own |= {"scale", "base", _EXTRA, *_OLD_FLAGS}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        head = key[len(prefix):].split(".")[0]
        target = prefix + "base." + key[len(prefix):]
        if head in base_names and head not in own and target not in state_dict:
            state_dict[target] = state_dict.pop(key)
    assign = bool(_meta.get("assign_to_params_buffers", False))
    tied = _checked_ties(module, state_dict, prefix)
    has_weight, has_factors, saved = refuse_load(
        module, state_dict, prefix, assign=assign, tied=tied
    )
    held = module.scale
    if isinstance(held, nn.Parameter) and saved.scale is not None and not saved.scale_entry:
        # a fixed scale saved (0-d, or in the saved state) loads as the (1,) one, in its
        # dtype and place (a meta one's place is the state's, for `assign=True`)
        place = None if held.is_meta else held.device
        state_dict[prefix + "scale"] = saved.scale.reshape(1).to(dtype=held.dtype, device=place)
    if not isinstance(held, nn.Parameter):
        state_dict.pop(prefix + "scale", None)  # equal to the fixed one (`refuse_load`)
    for name in _OLD_FLAGS:
        state_dict.pop(prefix + name, None)
    merged, residual = saved.merged, saved.residual
    if not has_weight:
        merged = residual = None  # the flags describe the base weight, which stays as it is
    elif residual is None and has_factors:
        residual = False  # W and factors saved from an adapter that started from zero
    if has_weight and merged is None:
        merged = False
    factor_keys = [prefix + name for name in module.adapter_tensors()]
    module._loading = _Loading(
        merged, has_weight and not has_factors, factor_keys, residual, prefix + _EXTRA
    )


# the saved state's key (torch's name for a module's extra state), and the keys of the
# flags a state saved before it held
_EXTRA = "_extra_state"
_OLD_FLAGS = ("merged", "residual")


@dataclass(frozen=True)
class SavedState:
    """What a state says of an adapter beside its tensors: whether the base weight it holds
    is merged (W + ΔW) and whether it holds `W − ΔW₀` of a PiSSA start (None: not said),
    the one-element scale its factors were trained at (None: not said), whether that is a
    trainable scale's `(1,)` entry (else a fixed one recorded), whether the scale was
    trainable but the state lacks it, and the adapter form it records (None: not said)."""

    merged: bool | None
    residual: bool | None
    scale: torch.Tensor | None
    scale_entry: bool = False
    scale_missing: bool = False
    form: str | None = None


def saved_state(state_dict: dict, prefix: str) -> SavedState:
    """The `SavedState` of `state_dict` under `prefix`: from `<prefix>_extra_state`
    (`LowRankAdapter.get_extra_state`) and `<prefix>scale`, or from the `merged`, `residual`
    and 0-d `scale` entries of a state saved before the extra state; `StateDictError` for an
    extra state that is not one."""
    key = prefix + _EXTRA
    extra = state_dict.get(key)
    scale = state_dict.get(prefix + "scale")
    entry = isinstance(scale, torch.Tensor) and scale.ndim == 1
    if extra is None:
        merged, residual = (state_dict.get(prefix + name) for name in _OLD_FLAGS)
        return SavedState(
            None if merged is None else state_flag(prefix + "merged", merged),
            None if residual is None else state_flag(prefix + "residual", residual),
            scale if isinstance(scale, torch.Tensor) else None,
            scale_entry=entry,
        )
    fits = isinstance(extra, torch.Tensor) and extra.shape == (5,) and not extra.is_meta
    if not fits or not extra.is_floating_point():
        raise StateDictError(
            f"{key} must be an adapter's saved state, a floating-point tensor [merged, "
            f"residual, trainable, scale, form] of shape (5,) with values, got {_shown(extra)}"
        )
    merged, residual, trainable, fixed, code = extra.double().tolist()
    form = next((v.name for v in VARIANTS.values() if v.code == code), None)
    if form is None:
        raise StateDictError(f"{key}[4] must be the code of an adapter form, got {code!r}")
    trainable = state_flag(f"{key}[2] (trainable)", trainable)
    merged = state_flag(f"{key}[0] (merged)", merged)
    residual = state_flag(f"{key}[1] (residual)", residual)
    recorded = {"merged": merged, "residual": residual}
    # flags as an earlier version saved them (and `adapter_state_dict` saves `residual`),
    # and a 0-d scale beside a fixed one recorded (a `(1,)` one is a trainable adapter's
    # own, in a template filled in place): refused where they say otherwise
    for name, value in recorded.items():
        flag = state_dict.get(prefix + name)
        if flag is not None and state_flag(prefix + name, flag) != value:
            raise StateDictError(
                f"this state's {prefix}{name} says {not value}, but its {key} records "
                f"{value}: keep one of them"
            )
    older = isinstance(scale, torch.Tensor) and scale.ndim == 0 and not trainable
    older = older and scale.is_floating_point() and not scale.is_meta
    if older and float(scale.double()) != float(torch.tensor(fixed, dtype=scale.dtype)):
        raise StateDictError(
            f"this state's {prefix}scale is {float(scale)!r}, but its {key} records the "
            f"fixed scale {fixed!r}: keep one of them"
        )
    # a fixed scale recorded is the one the factors were trained at, whatever `scale`
    # entry lies beside it (a template filled in place holds a trainable adapter's own)
    trained = scale if isinstance(scale, torch.Tensor) else None
    return SavedState(
        merged,
        residual,
        trained if trainable else extra[3:4],
        scale_entry=trainable and entry,
        scale_missing=trainable and trained is None,
        form=form,
    )


class _Loading(NamedTuple):
    """What a load pre-hook found, for the post-hook: the merged and residual flags to set
    (None: left as they are), whether the state held the base weight alone, the factor keys
    and the saved state's key (neither counts as missing then)."""

    merged: bool | None
    base_only: bool
    factor_keys: list[str]
    residual: bool | None
    extra_key: str


def loaded_parts(
    module: nn.Module, state_dict: dict, prefix: str
) -> tuple[bool, bool, SavedState]:
    """Whether `state_dict` holds, under `prefix`, the base layer's weight (as `base.weight`
    or as the un-adapted layer's `weight`) and any of the adapter's tensors, and its
    `SavedState`."""
    has_weight = prefix + "base.weight" in state_dict or prefix + "weight" in state_dict
    has_factors = any(prefix + name in state_dict for name in module.adapter_tensors())
    return has_weight, has_factors, saved_state(state_dict, prefix)


def loads_merged(module: nn.Module, state_dict: dict, prefix: str) -> bool:
    """Whether `state_dict` holds, under `prefix`, a base weight saved merged."""
    has_weight, _, saved = loaded_parts(module, state_dict, prefix)
    return has_weight and bool(saved.merged)


_CHECKED_TIES = "_lowrank_checked_ties"


def _loaded_weight(state_dict: dict, prefix: str) -> object:
    """The base weight `state_dict` holds under `prefix` (either key), or None."""
    return state_dict.get(prefix + "base.weight", state_dict.get(prefix + "weight"))


def remember_ties(module: nn.Module, state_dict: dict, prefix: str, tied: tuple) -> None:
    """Keep `tied` (`module.current_ties()`, looked up for a whole load at once) for the
    adapter's own load hook of the same load, which finds it by the very weight tensor
    `state_dict` holds (a weak reference), and takes it once."""
    weight = _loaded_weight(state_dict, prefix)
    if isinstance(weight, torch.Tensor):
        module.__dict__[_CHECKED_TIES] = (weakref.ref(weight), tied)


def _checked_ties(module: nn.Module, state_dict: dict, prefix: str) -> tuple | None:
    """The ties `remember_ties` kept for this load of `module` (taken: None next time), or
    None where it kept none for this state's weight."""
    kept = module.__dict__.pop(_CHECKED_TIES, None)
    if kept is None or kept[0]() is not _loaded_weight(state_dict, prefix):
        return None
    return kept[1]


def _shown(value: object) -> str:
    """`value` in an error message: a tensor by its dtype and shape, anything else by repr."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def state_flag(key: str, value: object) -> bool:
    """A saved `merged` / `residual` flag as a bool: 0 or 1 as a one-element tensor of any
    real dtype (`state_dict` writes a bool one; a state cast wholesale to float16 holds a
    float one), a bool or a number (NumPy's included); else `StateDictError` naming `key`."""
    if isinstance(value, torch.Tensor):
        number = None
        if value.numel() == 1 and not value.is_meta and not value.is_complex():
            number = float(value.reshape(()))
    elif isinstance(value, (str, bytes)):
        number = None
    else:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            number = None
    if number in (0.0, 1.0):
        return bool(number)
    raise StateDictError(
        f"{key} must be a saved flag, 0 or 1 (a one-element tensor), got {_shown(value)}"
    )


def refuse_load(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    *,
    assign: bool = False,
    tied: tuple[str, ...] | None = None,
) -> tuple[bool, bool, SavedState]:
    """`loaded_parts` of `state_dict` for `module` (under `prefix`), or `StateDictError` if
    it cannot load into `module` as it stands: a base weight without the adapter and from
    another start would lose (or gain) ΔW₀; a merged base weight without all the factors
    merged into it, or merged at another scale than `module`'s fixed one, would sit beside
    other ones; factors without the base weight into a merged adapter would keep the old
    ΔW, and factors whose flag says they started otherwise than `module` would sit beside
    the wrong base; a merged base weight into a base tied to another module's weight would
    write W + ΔW into that one too (a merge there is refused); a factor of another form, a
    DoRA magnitude into an adapter without DoRA, and a scale other than `module`'s fixed
    one, would load into a different model (torch's hooks never see `strict`, so these are
    refused in either mode, as torch refuses another shape). `ShapeError` for a factor or
    weight of another shape (`_require_loaded_shapes`). `assign` is `load_state_dict`'s
    (a trainable scale then takes the state's dtype); `tied` is `module.current_ties()`
    where the caller has it (looked up here otherwise, for a merged state only)."""
    has_weight, has_factors, saved = loaded_parts(module, state_dict, prefix)
    residual = saved.residual
    where = f"the adapter at {prefix[:-1]!r}"
    _refuse_other_form(module, state_dict, prefix, saved)
    _require_loaded_shapes(module, state_dict, prefix)
    _require_same_kind(module, state_dict, prefix)
    dora_state = prefix + "magnitude" in state_dict and "magnitude" not in _base_names(module)
    if dora_state and not module.dora:
        # factors trained under m ⊙ (W + ΔW) / ‖W + ΔW‖: beside W + ΔW they are another model
        how = ("its base weight holds a DoRA merge m ⊙ (W + ΔW) / ‖W + ΔW‖, which unmerging "
               "as W + ΔW would not give W" if has_weight and saved.merged else
               "its factors were trained under m ⊙ (W + ΔW) / ‖W + ΔW‖, and W + ΔW of them "
               "alone is another model")  # fmt: skip
        raise StateDictError(
            f"{where} is not DoRA, but this state holds a DoRA adapter's {prefix}magnitude: "
            f"{how}; inject with dora=True to load it"
        )
    merged = has_weight and bool(saved.merged)
    if merged:
        tied = module.current_ties() if tied is None else tied
        if tied:
            raise StateDictError(
                f"{where}: this state's base weight holds W + ΔW (merged), but the adapter's "
                f"base weight is also {', '.join(map(repr, tied))} (tied weights), into "
                "which the load would write W + ΔW too; load a state saved unmerged, or "
                "untie them"
            )
        # a DoRA adapter's merge scales W + ΔW by its magnitude: part of what the weight holds
        names = [*module.factor_tensors(), *(["magnitude"] if module.dora else [])]
        absent = [name for name in names if prefix + name not in state_dict]
        if absent:
            raise StateDictError(
                f"{where}: this state's base weight holds W + ΔW of its factors, but it lacks "
                f"{', '.join(absent)}; beside the adapter's own it would not be the model it was "
                "saved from: load it with all its factors, or save it unmerged"
            )
    _refuse_other_scale(module, saved, prefix, merged=merged, assign=assign)
    if has_weight and not has_factors and bool(residual) != module.residual:
        if module.residual:
            raise StateDictError(
                f"{where} started from init='pissa', so its base holds W − ΔW₀; a base "
                "weight saved without that start would lose ΔW₀: load the checkpoint before "
                "inject, or a state dict saved from an adapted model"
            )
        raise StateDictError(
            f"{where} started from zero, but this base weight holds W − ΔW₀ of a PiSSA "
            "start: beside these factors it would not be the model it was saved from (load "
            "its factors with it)"
        )
    if has_factors and not has_weight:
        if module.merged:
            raise StateDictError(
                f"{where} is merged, so its base weight holds the current ΔW: unmerge it "
                "before loading other factors, or use lowrank.nn.load_adapter_state_dict"
            )
        if residual is not None and residual != module.residual:
            raise StateDictError(f"{where} {start_mismatch(residual)}")
    return has_weight, has_factors, saved


def _refuse_other_scale(
    module: nn.Module, saved: SavedState, prefix: str, *, merged: bool, assign: bool
) -> None:
    """`StateDictError` where the `saved` state holds a scale (trainable, or the fixed one
    a state records) other than `module`'s fixed scale, or lacks its trainable one: the
    factors were trained at it, and a merged state's base weight holds ΔW at it, which
    unmerging would take out at the other; and where a merged state records no scale.
    `NonFiniteError` where a finite, nonzero scale overflows or underflows the dtype of
    `module`'s trainable one (the state's own with `assign`, which keeps it)."""
    value = saved.scale
    where = f"the adapter at {prefix[:-1]!r}"
    trainable = isinstance(module.scale, nn.Parameter)
    if saved.scale_missing and not trainable:
        raise StateDictError(
            f"{where} has the fixed scale {module.scale!r}, but this state's factors were "
            f"trained with a trainable scale that it lacks ({prefix}scale): load it with that "
            "entry, or inject with trainable_scale=True"
        )
    if value is None:
        if merged:
            raise StateDictError(
                f"{where}: this state's base weight holds W + ΔW, but the state records no "
                f"scale ({prefix}scale) to say at which scale it was merged; add it "
                "(torch.tensor(scale, dtype=torch.float64)) or save the state unmerged"
            )
        return
    if isinstance(value, torch.Tensor) and type(value.detach()) is not torch.Tensor:
        if trainable:
            return  # a shard (FSDP2's DTensor) into a shard: the engine's own
        value = gathered(value)  # a collective, as the load of a sharded model is
    number = None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
        number = float(value.reshape(()).double()) if value.is_floating_point() else None
    if trainable and isinstance(value, torch.Tensor) and value.is_complex():
        raise StateDictError(
            f"{prefix}scale must be real, got a {value.dtype} tensor: the adapter's scale is "
            f"{module.scale.dtype}"
        )
    if trainable and number is None:
        return  # torch's to load
    if number is None:
        raise StateDictError(
            f"{prefix}scale must be a one-element floating-point tensor, got {value!r}"
        )
    if trainable:
        kept = assign and saved.scale_entry
        dtype = value.dtype if kept else module.scale.dtype
        stored = float(torch.tensor(number, dtype=dtype))
        if math.isfinite(number) and (not math.isfinite(stored) or (number and not stored)):
            raise NonFiniteError(
                f"{prefix}scale = {number!r} {'over' if stored else 'under'}flows the "
                f"adapter's {dtype} scale (to {stored!r}): inject with a wider dtype to load it"
            )
        return
    # a state cast wholesale (to bfloat16, say) holds the scale rounded to its dtype
    if number == float(torch.tensor(module.scale, dtype=value.dtype)):
        return
    if merged:
        raise StateDictError(
            f"{where} has scale {module.scale!r}, but this state's base weight holds W + ΔW "
            f"merged at scale {number!r}: unmerging would take out another ΔW; inject with "
            "the alpha (or scale) it was saved with"
        )
    raise StateDictError(
        f"{where} has the fixed scale {module.scale!r}, but this state's factors are at "
        f"scale {number!r}: inject with trainable_scale=True (or that scale) to load it, or "
        "load its factors alone (lowrank.nn.load_adapter_state_dict) to keep the adapter's"
    )


# names under a PEFT layer (`lora_A.<adapter>.weight`, …), never under an adapter here
_PEFT_NAMES = frozenset(
    ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
     "lora_magnitude_vector", "lora_dropout")
)  # fmt: skip


def _refuse_other_form(
    module: nn.Module, state_dict: dict, prefix: str, saved: SavedState
) -> None:
    """`StateDictError` where the state under `prefix` is of another adapter form: its saved
    state records another form, it holds factors only another form has (a Tucker2 state's
    `mid` in a LoRA adapter), or a PEFT layer's entries. Found before torch, which in a
    strict load copies every other key before it reports them. Other keys the adapter lacks
    are torch's to report, or to ignore under `strict=False`."""
    base_names = _base_names(module)
    heads = {key[len(prefix):].split(".")[0] for key in state_dict if key.startswith(prefix)}
    where = f"the adapter at {prefix[:-1]!r} ({module.config.form}, rank {module.rank})"
    peft = sorted((heads & _PEFT_NAMES) - base_names)
    if peft:
        raise StateDictError(
            f"{where} has no {', '.join(prefix + h for h in peft)}: this is a PEFT model's "
            "state; save it as a PEFT adapter (save_pretrained) and load that with "
            "lowrank.io (inject_adapter, apply_adapter)"
        )
    others = {name for variant in VARIANTS.values() for name in variant.names}
    foreign = sorted(heads & (others - set(module.variant.names)))
    if foreign and saved.form in (None, module.variant.name):
        raise StateDictError(
            f"{where} has no {', '.join(prefix + n for n in foreign)}: a state of another "
            "adapter form; inject with the settings it was saved with"
        )
    form = saved.form
    whole = any(prefix + name in state_dict for name in ("base.weight", "weight", "merged"))
    if form is None and whole:
        # a whole state (base weight or flags) without a record, as earlier versions saved
        # it, holds every factor of its form: exactly another form's are that form's
        own = set(module.variant.names)
        found = {name for name in others if prefix + name in state_dict}
        form = next((v.name for v in VARIANTS.values() if set(v.names) == found != own), None)
    if form not in (None, module.variant.name):
        raise StateDictError(
            f"{where}: this state is of the {form} form; inject with the settings it was "
            "saved with"
        )


def _require_loaded_shapes(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """`ShapeError` naming the key where `state_dict` holds a factor or the base weight of
    another shape than `module`'s (another rank): found before torch copies anything, which
    it would do for every other key before reporting the mismatch; `StateDictError` for
    one that is no tensor, which torch would report only after the copies too."""
    keys = [prefix + name for name in module.adapter_tensors()]
    for key in (*keys, prefix + "base.weight", prefix + "weight"):
        value = state_dict.get(key)
        if value is not None and not isinstance(value, torch.Tensor):
            raise StateDictError(f"{key} must be a tensor, got {_shown(value)}")
    for name, current in module.adapter_tensors().items():
        value = state_dict.get(prefix + name)
        if not isinstance(value, torch.Tensor) or (name == "scale" and value.ndim == 0):
            continue  # a 0-d scale loads as the (1,) one (`map_base_keys`)
        if value.shape != current.shape:
            raise ShapeError(
                f"{prefix}{name} has shape {tuple(value.shape)}, but the adapter's is "
                f"{tuple(current.shape)} (rank {module.rank})"
            )
    for key in (prefix + "base.weight", prefix + "weight"):
        value = state_dict.get(key)  # the weight read only then (a parametrization computes it)
        if isinstance(value, torch.Tensor) and value.shape != module.base.weight.shape:
            raise ShapeError(
                f"{key} has shape {tuple(value.shape)}, but the adapted layer's weight is "
                f"{tuple(module.base.weight.shape)}"
            )


def _require_same_kind(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """`StateDictError` naming the key where `state_dict` holds a plain tensor for a tensor
    of `module` that FSDP2 shards (a DTensor), or a shard for a plain one: torch fails to
    copy it only after the load has copied others, and after the adapter's flags are set
    from the state (a merged one's, beside its unmerged weight)."""
    tensors = dict(module.adapter_tensors())
    tensors.update({f"base.{name}": t for name, t in module.base.named_parameters()})
    tensors.update(module.base.named_parameters())  # the un-adapted layer's keys
    for name, current in tensors.items():
        value = state_dict.get(prefix + name)
        if not isinstance(value, torch.Tensor):
            continue
        kinds = [type(t.detach()).__name__ for t in (current, value)]
        if kinds[0] != kinds[1]:
            raise StateDictError(
                f"{prefix}{name} is a {kinds[0]} in the model (sharded by FSDP2 where a "
                f"DTensor) but a {kinds[1]} in the state: torch cannot copy one into the "
                "other; load a state of the model's own kind (a sharded model's state_dict(), "
                "or a whole state through torch.distributed.checkpoint's set_model_state_dict "
                "with full_state_dict=True)"
            )


def start_mismatch(saved_residual: bool) -> str:
    """Why factors saved with `saved_residual` cannot load into an adapter that started the
    other way."""
    how = (
        "started from zero, but these factors were trained from init='pissa' (beside a "
        "base holding W − ΔW₀)"
        if saved_residual
        else "started from init='pissa' (its base holds W − ΔW₀), but these factors were "
        "trained beside the base weight W"
    )
    return f"{how}: the model would not be the one they were saved from"


def apply_loaded_state(module: nn.Module, incompatible: object) -> None:
    """Load post-hook: set the loaded merged state; a state without the saved state (one of
    the un-adapted layer, or saved before it) does not count it missing, and a checkpoint
    of the un-adapted layer lacks the factors, which then keep their values instead of
    counting as missing."""
    loading = module.__dict__.pop("_loading", None)
    if loading is None:
        return
    merged, base_only, factor_keys, residual, extra_key = loading
    missing = incompatible.missing_keys  # type: ignore[attr-defined]
    missing[:] = [key for key in missing if key != extra_key]
    if residual is not None:
        module.residual = bool(residual)
    if merged is not None:
        module.merged = merged
        module.base_copy = None
        # the loaded weight holds ΔW of the loaded factors: unmerge takes out that one
        module.merged_factors = module.factors_in_weight() if merged else None
    if base_only:
        # factors that hold no values (a model built on the meta device) stay missing
        kept = {prefix_key for prefix_key, factor in zip(
            factor_keys, module.adapter_tensors().values(), strict=True) if not factor.is_meta}
        missing[:] = [key for key in missing if key not in kept]
