"""How a model is walked and rewritten: which modules get adapters (`plan`), `inject`,
merging and unloading, the adapter-only state dict, and hot swap.

A module registered under several names (a shared block) is one module: it gets one
adapter, set under every name. Every function that writes weights checks every adapter
first and changes nothing when one check fails.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import (
    all_finite,
    require_finite,
    require_flag,
    require_float,
    require_module,
    require_tensor,
)
from ..errors import (
    LowRankError,
    MergeError,
    NonFiniteError,
    ShapeError,
    StateDictError,
    TargetError,
)
from ..forms import Factors
from ..targets import Targets, matches, named_suffix, parse_targets
from .config import AdapterConfig
from .fit import check_fit, is_conv1d, output_layer
from .layers import (
    LowRankAdapter,
    adapter_class,
    deferred_residuals,
    loaded_fsdp,
    sharded_itself,
)
from .state import loads_merged, refuse_load, remember_ties, start_mismatch, state_flag
from .ties import current_ties, found_ties, wrapped_ties

ALL_LINEAR = "all-linear"
_MAX_NAMES_SHOWN = 3


@dataclass(frozen=True)
class Target:
    """A module to adapt: its first name, every name it has, the module and its settings."""

    name: str
    names: tuple[str, ...]
    module: nn.Module
    config: AdapterConfig


@contextmanager
def _about(name: str) -> Iterator[None]:
    """Re-raise a `LowRankError` with the adapter's module name in front."""
    try:
        yield
    except LowRankError as err:
        raise type(err)(f"adapter {name!r}: {err}") from None


def _inside_adapters(model: nn.Module) -> dict[int, str]:
    """`{id(module): adapter name}` for every module that is an adapter or lies inside one."""
    inside: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankAdapter):
            for sub in module.modules():
                inside.setdefault(id(sub), name)
    return inside


def _output_layers(model: nn.Module) -> set[int]:
    """The output layer of a transformers model (`fit.output_layer`), which `"all-linear"`
    leaves alone, as PEFT does (of any other model it takes every linear layer)."""
    found = output_layer(model)
    return {id(found[1])} if found is not None else set()


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _all_linear(model: nn.Module, config: AdapterConfig) -> dict[int, tuple]:
    """`{id(module): (module, "all-linear", config)}` of every linear-like layer without an
    adapter, but a transformers model's output layer, and, as PEFT matches those layers'
    names as dotted suffixes of a module's name, of every other module named `….<one of
    them>` (a `Conv2d` `blk.fc` beside a `Linear` `fc`); `TargetError` for such a module that
    takes no adapter (PEFT refuses it too)."""
    skip = _inside_adapters(model).keys() | _output_layers(model)
    named = [(name, module) for name, module in model.named_modules() if name]
    linear = {name for name, module in named if _is_linear_like(module) and id(module) not in skip}
    chosen: dict[int, tuple] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and _is_linear_like(module) and id(module) not in skip:
            chosen.setdefault(id(module), (module, ALL_LINEAR, config))
    for name, module in named:
        suffix = named_suffix(name, linear)
        if suffix is None or id(module) in chosen or id(module) in skip:
            continue
        if not isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd)):
            raise TargetError(
                f"'all-linear' reaches module {name!r} ({type(module).__name__}) as PEFT does, "
                f"matching the linear layers' names as dotted suffixes ({suffix!r}), but it "
                "takes no adapter (PEFT refuses it too): name the targets instead"
            )
        # integer indices: a dropout of the call's passes over embeddings, as PEFT's
        embedded = isinstance(module, nn.Embedding)
        chosen[id(module)] = (module, ALL_LINEAR, dataclasses.replace(config, dropout=0.0)
                              if embedded else config)  # fmt: skip
    if not chosen:
        raise TargetError(
            f"'all-linear' matches no linear layer without an adapter in {type(model).__name__}"
        )
    return chosen


def _matched(model: nn.Module, targets: Targets, config: AdapterConfig) -> dict[int, tuple]:
    """`{id(module): (module, pattern, config)}` of the modules `targets` names."""
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return _all_linear(model, config)
    entries = list(model.named_modules(remove_duplicate=False))
    inside = _inside_adapters(model)
    chosen: dict[int, tuple] = {}
    per_pattern = isinstance(targets, Mapping)
    for pattern, settings in parse_targets(targets).items():
        hits = [(name, module) for name, module in entries if matches(name, pattern)]
        if not hits:
            names = [name for name, _ in model.named_modules() if name][-_MAX_NAMES_SHOWN:]
            raise TargetError(
                f"target {pattern!r} matches no module of {type(model).__name__} "
                f"(module names look like {names})"
            )
        for name, module in hits:
            if id(module) in inside:
                raise TargetError(
                    f"module {name!r} already has an adapter (at {inside[id(module)]!r}); "
                    "inject adapts each layer once: leave it out of the targets"
                )
            if id(module) in chosen:
                if per_pattern and chosen[id(module)][1] != pattern:
                    raise TargetError(
                        f"module {name!r} is matched by both {chosen[id(module)][1]!r} and "
                        f"{pattern!r}"
                    )
                continue
            chosen_config = config.updated(pattern, settings)
            if isinstance(module, nn.Embedding) and "dropout" not in settings:
                # integer indices: a dropout of the call's passes over embeddings, as PEFT's
                chosen_config = dataclasses.replace(chosen_config, dropout=0.0)
            chosen[id(module)] = (module, pattern, chosen_config)
    return chosen


def _check_parents(model: nn.Module, names: tuple[str, ...], config: AdapterConfig) -> None:
    """Refuse what cannot hold where the parent reads the child's weight instead of calling
    it (`nn.MultiheadAttention.out_proj`): the adapter acts through `weight = W + ΔW` there,
    so its branch-input dropout and the fused kernel never run."""
    for name in names:
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention) and (config.dropout or config.fused):
            raise TargetError(
                f"module {name!r}: nn.MultiheadAttention reads {name.rpartition('.')[2]}.weight "
                "instead of calling it, so the adapter acts through its weight W + ΔW; "
                "dropout and fused cannot apply there (give dropout=0, fused=False)"
            )


def plan(model: nn.Module, targets: Targets, config: AdapterConfig) -> list[Target]:
    """Every module that `targets` names, in `named_modules()` order, with its checked
    settings (`config`, updated by a per-pattern dict); nothing is changed.

    `targets` is `"all-linear"` (every `nn.Linear` and transformers `Conv1D` without an
    adapter, but the output layer of a transformers model, `get_output_embeddings()`, as
    PEFT leaves it out, unless its name ends in `.<another linear layer's name>`; of any
    other model every one, a layer named `lm_head` included, as PEFT takes them; and, as
    PEFT matches those layers' names as dotted suffixes, every other module whose name ends
    in `.<one of them>`, a `Conv2d` `blk.fc` beside a `Linear` `fc`), or patterns as in
    `lowrank.targets`. Raises `TargetError` for a pattern that matches nothing, a module
    matched by two dict entries, a module that already has an adapter, one that does not
    fit (`check_fit`), or one a distributed engine has wrapped already
    (`DistributedDataParallel`, `fully_shard`: inject before wrapping); `RankError`,
    `ArgumentError` or `NonFiniteError` for bad settings.
    """
    config = AdapterConfig.build(config)
    every = list(require_module("model", model).named_modules(remove_duplicate=False))
    names: dict[int, list[str]] = {}
    for name, module in every:
        names.setdefault(id(module), []).append(name)
    found = []
    wrapped = _wrapped_by_engines(model)
    for key, (module, _, config_) in _matched(model, targets, config).items():
        aliases = tuple(names[key])
        _require_unwrapped(aliases[0], module, wrapped.get(key))
        checked = check_fit(aliases[0], module, config_)
        if aliases[0]:
            _check_parents(model, aliases, checked)
        found.append(Target(aliases[0], aliases, module, checked))
    _require_initialised(model)
    order: dict[int, int] = {}
    for i, (_, module) in enumerate(every):
        order.setdefault(id(module), i)
    return sorted(found, key=lambda t: order[id(t.module)])


def _wrapped_by_engines(model: nn.Module) -> dict[int, str]:
    """`{id(module): the wrapper}` for every module of `model` that a distributed engine has
    wrapped already: one inside a `DistributedDataParallel`, a module `fully_shard` (FSDP2)
    was applied to or one inside it, one inside a `FullyShardedDataParallel` (FSDP1)."""
    if not torch.distributed.is_available():
        return {}
    from torch.nn.parallel import DistributedDataParallel

    engines: list[tuple[type, str]] = [(DistributedDataParallel, "DistributedDataParallel")]
    fsdp = loaded_fsdp()
    if fsdp is not None:
        engines += [(fsdp.FSDPModule, "fully_shard (FSDP2)"),
                    (fsdp.FullyShardedDataParallel, "FullyShardedDataParallel")]  # fmt: skip
    wrapped: dict[int, str] = {}
    for name, module in model.named_modules():
        engine = next((what for kind, what in engines if isinstance(module, kind)), None)
        if engine is not None:
            for inner in module.modules():
                wrapped.setdefault(id(inner), f"{engine} at {name!r}" if name else engine)
    return wrapped


def _require_unwrapped(name: str, module: nn.Module, wrapper: str | None) -> None:
    """`TargetError` where a distributed engine has taken `module`'s parameters already
    (`wrapper`, from `_wrapped_by_engines`, or parameters that are FSDP2 shards): the
    engine knows only the parameters it found when it wrapped the model, so the adapter's
    factors would train outside it, their gradients never averaged across ranks."""
    if wrapper is None and any(
        getattr(p, "device_mesh", None) is not None for p in module.parameters()
    ):
        wrapper = ("a distributed engine: its parameters are DTensors (fully_shard (FSDP2) "
                   "or tensor parallelism)")  # fmt: skip
    if wrapper is not None:
        raise TargetError(
            f"module {name!r} is wrapped by {wrapper} already, which knows only the "
            "parameters it found when it wrapped the model: the adapter's factors would be "
            "outside it, their gradients never averaged across ranks (each rank training an "
            "adapter of its own); inject before wrapping the model"
        )


def _require_initialised(model: nn.Module) -> None:
    """`TargetError` naming the first module with an uninitialised (lazy) parameter: it has no
    size yet, so the model can be neither frozen nor counted."""
    for name, module in model.named_modules():
        if any(nn.parameter.is_lazy(p) for p in module.parameters(recurse=False)):
            raise TargetError(
                f"module {name!r} is an uninitialised lazy module ({type(module).__name__}): its "
                "parameters have no size yet, so the model can be neither frozen nor counted; "
                "run one forward pass first"
            )


def _parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """`{id(child): every (parent, attribute) under which child is registered in model}`,
    from one walk over the model."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for key, module in parent._modules.items():
            if module is not None:
                found.setdefault(id(module), []).append((parent, key))
    return found


def _freeze_all_but_adapters(model: nn.Module) -> None:
    """Freeze every parameter of `model` that is not an adapter's factor or trainable scale;
    adapters keep their own flags."""
    keep = {
        id(tensor)
        for module in model.modules()
        if isinstance(module, LowRankAdapter)
        for tensor in module.adapter_tensors().values()
    }
    for parameter in model.parameters():
        if id(parameter) not in keep:
            parameter.requires_grad_(False)


def inject(
    model: nn.Module,
    targets: Targets,
    config: AdapterConfig | None = None,
    *,
    factors: Mapping[str, Factors] | None = None,
    **settings: object,
) -> list[str]:
    """Wrap every module `targets` names in an adapter; return every name now adapted.

    Settings come as one `AdapterConfig` and/or its fields by keyword (`rank=8, alpha=16,
    rslora=True, form="tucker2", scale=…, dropout=…, trainable_scale=…, hard=…, fused=…,
    init=…, dora=…, factor_dtype=…`); a per-pattern dict in `targets` overrides them
    (`{"to_q": {"r": 8}}`).
    `targets` may be `"all-linear"`. `factors` maps module names (any of a module's names)
    to `lowrank.forms` objects the adapters start from instead of zero (with
    `init="pissa"`: subtracted from the base; without factors, `init="pissa"` starts each
    adapter at its base weight's truncated SVD). Every parameter that is not an adapter's
    is frozen; adapters from earlier calls stay as they are. A shared module gets one
    adapter under each of its names. Nothing changes when a check fails (`plan`) or
    building an adapter raises.
    """
    found = plan(model, targets, AdapterConfig.build(config, **settings))
    starts = _starts(found, factors)
    # before anything here holds a parameter, which would look like a tie held elsewhere
    ties = found_ties(model, [target.module for target in found])
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    built: list[LowRankAdapter] = []
    try:
        with deferred_residuals() as pending:
            for target in found:
                with _about(target.name):
                    built.append(adapter_class(target.module)(
                        target.module, config=target.config, factors=starts.get(target.name)
                    ))  # fmt: skip
        for adapter, tied in zip(built, ties, strict=True):
            adapter.shares_weight_with = tied
        parents = _parents(model)
        for target, adapter in zip(found, built, strict=True):
            for parent, key in parents.get(id(target.module), ()):
                replaced.append((parent, key, target.module))
                setattr(parent, key, adapter)
        _freeze_all_but_adapters(model)
        # in place, an adapter's base run by another module (a live one outside the model
        # holding the layer) shows as a tie, which W − ΔW₀ in the base would change
        runs = wrapped_ties(model, pending) if pending else []
        for adapter, runners in zip(pending, runs, strict=True):
            adapter.shares_weight_with = tuple(dict.fromkeys((*adapter.shares_weight_with,
                                                              *runners)))  # fmt: skip
            with _about(adapter_name(found, built, adapter)):
                try:
                    adapter.check_mergeable()
                except MergeError as err:
                    raise TargetError(
                        f"init='pissa' writes W − ΔW₀ into the base weight: {err}"
                    ) from None
    except BaseException:
        for parent, key, module in reversed(replaced):
            setattr(parent, key, module)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for adapter in built:  # kept alive by the traceback, they must not hold the layers
            del adapter.base
        raise
    for adapter in pending:
        adapter.write_residual()
    _check_loads_through(model)
    return [name for target in found for name in target.names]


def _check_loads_through(model: nn.Module) -> None:
    """Register `_check_adapters_before_load` on `model` and on every module between it and
    an adapter (once each), so that a load through any of them is checked whole first."""
    model._lowrank_load_root = True
    holders = {""}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LowRankAdapter):
            parts = name.split(".")
            holders.update(".".join(parts[:end]) for end in range(1, len(parts)))
    for name in holders:
        holder = model.get_submodule(name)
        if not getattr(holder, "_lowrank_checks_loads", False):
            holder.register_load_state_dict_pre_hook(_check_adapters_before_load)
            holder._lowrank_checks_loads = True


def _check_adapters_before_load(
    model: nn.Module, state_dict: dict, prefix: str, meta: dict, *_: object
) -> None:
    """Load pre-hook: where `model` is the module `load_state_dict` was called on (or one
    `inject` adapted), every adapter's refusal (`refuse_load`) under each of its names (torch
    loads a shared one under each), before torch loads any module, so that a refused load
    changes nothing."""
    if prefix and not getattr(model, "_lowrank_load_root", False):
        return  # a module inside the load: checked where the load started
    assign = bool(meta.get("assign_to_params_buffers", False))
    found = [
        (f"{prefix}{name}." if name else prefix, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, LowRankAdapter)
    ]
    groups = _keys_by_prefix(state_dict, {where for where, _ in found})
    # the ties of every adapter a merged state loads into, in one search of the live
    # modules (not one per adapter, and again in each adapter's own hook)
    merged = {
        id(module): module
        for where, module in found
        if loads_merged(module, groups.get(where, state_dict), where)
    }
    adapters = list(merged.values())
    ties = dict(zip(merged, current_ties(model, adapters), strict=True)) if adapters else {}
    parts: dict[int, tuple[str, set[str]]] = {}
    for where, module in found:
        tied = ties.get(id(module))
        refuse_load(module, groups.get(where, state_dict), where, assign=assign, tied=tied)
        # torch loads a shared adapter once per name: the later names load into what the
        # earlier ones made of it, which the checks above did not see
        keys = {key[len(where):] for key in groups.get(where, {})}
        if not keys:
            continue  # nothing loads under this name
        first, seen = parts.setdefault(id(module), (where, keys))
        if keys != seen:
            raise StateDictError(
                f"the adapter shared as {first[:-1]!r} and {where[:-1]!r} gets other entries "
                f"under each name ({sorted(seen ^ keys)[:8]} under one only): load the same "
                "entries under both, as its own state_dict holds them"
            )
    for where, module in found:  # for each adapter's own hook, once the load is admitted
        if id(module) in ties:
            remember_ties(module, groups.get(where, state_dict), where, ties[id(module)])


def _keys_by_prefix(state_dict: dict, prefixes: set[str]) -> dict[str, dict]:
    """`{prefix: {key: value}}` of the keys of `state_dict` under each of `prefixes` (each
    ending in "."; an empty one is left out): one pass over the keys, so that checking
    every adapter does not read every key once per adapter."""
    groups: dict[str, dict] = {p: {} for p in prefixes if p}
    for key, value in state_dict.items():
        end = key.find(".")
        while end != -1:
            group = groups.get(key[: end + 1])
            if group is not None:
                group[key] = value
            end = key.find(".", end + 1)
    return groups


def adapter_name(found: list[Target], built: list[LowRankAdapter], adapter: nn.Module) -> str:
    """The first module name of `adapter` among the `built` ones."""
    return next(t.name for t, a in zip(found, built, strict=True) if a is adapter)


def _starts(found: list[Target], factors: Mapping[str, Factors] | None) -> dict[str, Factors]:
    """`factors` keyed by each target's first name; `TargetError` for a name that is no
    target and for two names of one module."""
    if factors is None:
        return {}
    if not isinstance(factors, Mapping):
        raise TargetError(
            f"factors must map module names to lowrank.forms objects, got {type(factors).__name__}"
        )
    first = {name: target.name for target in found for name in target.names}
    unknown = [name for name in factors if name not in first]
    if unknown:
        raise TargetError(
            f"factors given for {unknown[:_MAX_NAMES_SHOWN]}, which the targets do not adapt; "
            f"adapted modules: {list(first)[:_MAX_NAMES_SHOWN]}"
        )
    starts: dict[str, Factors] = {}
    for name, form in factors.items():
        if first[name] in starts:
            raise TargetError(f"factors given twice for module {first[name]!r} (also as {name!r})")
        starts[first[name]] = form
    return starts


def adapters(model: nn.Module) -> dict[str, LowRankAdapter]:
    """`{name: adapter}` of every adapter in `model` (a shared one under its first name);
    `ArgumentError` if `model` is not a module."""
    modules = require_module("model", model).named_modules()
    return {n: m for n, m in modules if isinstance(m, LowRankAdapter)}


def _refresh_ties(model: nn.Module, found: dict[str, LowRankAdapter]) -> None:
    holders = list(found.values())
    for adapter, ties in zip(holders, wrapped_ties(model, holders), strict=True):
        adapter.shares_weight_with = ties


def resharded(model: nn.Module) -> None:
    """Put every FSDP2 group in `model` back in its sharded state: after a forward without
    gradients the root group keeps full-size copies of its parameters (in its compute
    dtype), which FSDP2 drops at the next reshard, so a merge must write the shards it keeps.
    Groups above `model` are out of its reach: merge the root."""
    fsdp = loaded_fsdp()
    if fsdp is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


def _copy_bytes(found: dict[str, LowRankAdapter]) -> int:
    """The bytes of the adapters' kept base copies in this process: of a copy sharded by
    FSDP2 (a DTensor), this rank's shard."""
    copies = [a.base_copy for a in found.values() if a.base_copy is not None]
    local = [c.to_local() if hasattr(c, "to_local") else c for c in copies]
    return sum(c.numel() * c.element_size() for c in local)


def merge(model: nn.Module, *, exact: bool = False) -> int:
    """Merge every unmerged adapter of `model` (see `LowRankAdapter.merge`); return the bytes
    kept for bit-exact unmerging (`exact=True`: one copy of each merged base weight, in its
    dtype, this rank's shard of it under FSDP2; 0 otherwise). Every adapter is checked
    before any weight is written."""
    exact = require_flag("exact", exact)
    found = adapters(model)
    resharded(model)
    _refresh_ties(model, found)
    pending = {name: a for name, a in found.items() if not a.merged}
    proven = {}
    for name, adapter in pending.items():
        with _about(name):
            adapter.check_mergeable()
            proven[name] = adapter.check_merged_weight(adapter.base.weight)
    with torch.no_grad():
        for name, adapter in pending.items():
            with _about(name):
                adapter._write_merged(exact, proven[name])
    return _copy_bytes(found)


def unmerge(model: nn.Module) -> None:
    """Unmerge every merged adapter of `model`, checking all before writing any."""
    found = {name: a for name, a in adapters(model).items() if a.merged}
    resharded(model)
    proven = {}
    for name, adapter in found.items():
        with _about(name):
            adapter.check_unmergeable()
            if adapter.base_copy is None:
                proven[name] = adapter.check_merged_weight(adapter.base.weight, sign=-1)
    with torch.no_grad():
        for name, adapter in found.items():
            with _about(name):
                adapter._write_unmerged(proven.get(name))


def _unwrap(model: nn.Module) -> nn.Module:
    """Put every adapter's base layer back in its place; return the model (or the base, when
    `model` is itself an adapter)."""
    parents = _parents(model)
    for adapter in adapters(model).values():
        for parent, key in parents.get(id(adapter), ()):
            setattr(parent, key, adapter.base)
    return model.base if isinstance(model, LowRankAdapter) else model


def _require_unsharded_adapters(found: dict[str, LowRankAdapter], action: str) -> None:
    """`TargetError` where FSDP2's `fully_shard` was applied to an adapter itself: its group
    holds the base layer's parameters and gathers them in the adapter's forward hooks, so
    the base put back in the adapter's place would be left outside every group, its
    parameters shards that no forward gathers."""
    sharded = [name or "the model" for name, adapter in found.items() if sharded_itself(adapter)]
    if sharded:
        raise TargetError(
            f"cannot {action}: fully_shard was applied to adapter(s) "
            f"{sharded[:_MAX_NAMES_SHOWN]} themselves, whose FSDP2 group holds the base "
            "layer's parameters; put back in its place, the base would run on its shards "
            "with no group to gather them. Gather the model first (get_model_state_dict with "
            "full_state_dict=True, loaded into an unsharded copy), or merge in place "
            "(lowrank.nn.merge) and keep the adapters"
        )


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block, every adapter of `model` runs its base layer alone, as PEFT's
    `disable_adapter()` context does (the base model's output, for a DPO reference, say):
    no branch, no dropout, `weight` the base's. The adapters stay in place, trainable, and
    are enabled again at exit, an exception's too; blocks nest. A merged adapter, whose base
    weight holds `W + ΔW`, is a `MergeError` naming it before any is disabled (unmerge
    first), and so is the forward of one merged inside the block; so is an adapter started
    with `init="pissa"`, whose base holds `W − ΔW₀`."""
    found = adapters(model)
    for state, why in (
        ("merged", "merged: a merged adapter's base weight holds W + ΔW, so disabling it "
         "would not give the base model; lowrank.nn.unmerge(model) first"),
        ("residual", "started from init='pissa': their base holds W − ΔW₀, not the original "
         "W, so disabling them would not give the base model"),
    ):  # fmt: skip
        named = [name for name, adapter in found.items() if getattr(adapter, state)]
        if named:
            raise MergeError(f"{len(named)} adapter(s) {named[:_MAX_NAMES_SHOWN]} {why}")
    before = [(adapter, adapter.disabled) for adapter in found.values()]
    for adapter, _ in before:
        adapter.disabled = True
    try:
        yield
    finally:
        for adapter, flag in before:
            adapter.disabled = flag


@contextmanager
def reuse_dora_factors(model: nn.Module) -> Iterator[None]:
    """Inside the block, each DoRA adapter of `model` keeps its factor `g = m / ‖W + s·ΔW‖`
    from one call to the next where no gradient can flow into it (an eval forward under
    `torch.no_grad`), and reuses it while W, the factors, the magnitude and the settings of
    its math are the ones it was computed from (`lowrank.nn.reuse`: object, storage, version
    counter, layout). Writes that bypass the version counter (`weight.data.copy_(…)`, a NumPy
    or DLPack view, a kernel on the pointer) go unseen, which is why this is asked for, not
    the default: make no such write inside the block. At exit the factors are freed and each
    adapter computes `g` on every call again; blocks nest."""
    found = [m for m in model.modules() if isinstance(m, LowRankAdapter)]
    before = [(adapter, adapter.dora_reuse.enabled) for adapter in found]
    for adapter in found:
        adapter.dora_reuse.enabled = True
    try:
        yield
    finally:
        for adapter, flag in before:
            adapter.dora_reuse.enabled = flag
            if not flag:
                adapter.dora_reuse.clear()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the base layers back: a plain model computing what the
    adapted one did (base parameters stay frozen). Returns `model` (its base if `model` is
    an adapter). Changes nothing if a merge would fail, or where `fully_shard` was applied
    to an adapter itself (`TargetError`: its base would be left outside every FSDP2 group)."""
    _require_unsharded_adapters(adapters(model), "merge_and_unload")
    merge(model)
    for adapter in adapters(model).values():
        adapter.base_copy = None
        adapter.merged_factors = None
    return _unwrap(model)


def unload(model: nn.Module) -> nn.Module:
    """Put the base layers back without their adapters (unmerging merged ones first): the
    original model's values, its parameters still frozen as `inject` left them. Returns
    `model` (its base if `model` is an adapter). `MergeError` and nothing changed where an
    adapter started from `init="pissa"`: its base holds `W − ΔW₀`, not W
    (`merge_and_unload` gives the trained model); `TargetError` and nothing changed where
    `fully_shard` was applied to an adapter itself (see `merge_and_unload`)."""
    found = adapters(model)
    _require_unsharded_adapters(found, "unload")
    residual = [name for name, adapter in found.items() if adapter.residual]
    if residual:
        raise MergeError(
            f"adapter(s) {residual[:_MAX_NAMES_SHOWN]} started from init='pissa': their base "
            "holds W − ΔW₀, not the original W; merge_and_unload gives the trained model"
        )
    unmerge(model)
    return _unwrap(model)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors alone, `{"<module name>.<factor>": tensor}` (factor names as in
    `lowrank.nn.variants`, plus `scale` where trainable, `magnitude` `(out,)` of a DoRA
    adapter, and `residual` (True) for an adapter whose base holds `W − ΔW₀` of a PiSSA
    start); tensors share the parameters' memory, as `state_dict()` does: under FSDP2 the
    shards (DTensors), every group resharded first, since the full-size copies a forward
    without gradients leaves are freed at the next reshard."""
    found = adapters(model)
    resharded(model)
    state = {}
    for name, adapter in found.items():
        tensors = adapter.adapter_tensors()
        if adapter.residual:
            tensors["residual"] = torch.tensor(True, device="cpu")
        state.update({_key(name, key): tensor.detach() for key, tensor in tensors.items()})
    return state


def _key(name: str, key: str) -> str:
    return f"{name}.{key}" if name else key


def _require_same_start(
    found: dict[str, LowRankAdapter], state: Mapping[str, object]
) -> dict[str, object]:
    """`state` without its `residual` flags, each adapter it loads into checked to have
    started as its factors did: factors trained beside a base that holds `W − ΔW₀` give
    another model beside `W`, and the reverse."""
    flags = {_key(name, "residual"): name for name in found}
    saved = {flags[key]: state_flag(key, value) for key, value in state.items() if key in flags}
    rest = {key: value for key, value in state.items() if key not in flags}
    touched = {name for name, adapter in found.items()
               if any(_key(name, key) in rest for key in adapter.adapter_tensors())}  # fmt: skip
    for name in sorted(touched | saved.keys()):
        residual = saved.get(name, False)
        if residual != found[name].residual:
            raise StateDictError(f"the adapter at {name!r} {start_mismatch(residual)}")
    return rest


def _validated(
    found: dict[str, LowRankAdapter], state: Mapping[str, object], strict: bool
) -> dict[str, dict[str, torch.Tensor]]:
    """`state` checked against the adapters and split per adapter: `{name: {key: tensor}}`."""
    if not isinstance(state, Mapping):
        raise StateDictError(f"an adapter state dict must be a mapping, got {type(state).__name__}")
    state = _require_same_start(found, state)
    own = {
        (f"{name}.{key}" if name else key): (name, key, tensor)
        for name, adapter in found.items()
        for key, tensor in adapter.adapter_tensors().items()
    }
    unknown = [key for key in state if key not in own]
    missing = [key for key in own if key not in state] if strict else []
    if unknown or missing:
        raise StateDictError(
            f"the adapter state dict does not fit the model's adapters: "
            f"{len(unknown)} unexpected key(s) {unknown[:_MAX_NAMES_SHOWN]}, "
            f"{len(missing)} missing {missing[:_MAX_NAMES_SHOWN]}; the model's adapter keys "
            f"look like {list(own)[:_MAX_NAMES_SHOWN]}"
        )
    split: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, local, current = own[key]
        tensor = require_tensor(key, value)
        _require_storable(key, tensor, current)
        if local == "scale" and tensor.ndim == 0:  # a trainable scale saved 0-d
            tensor = tensor.reshape(1)
        if tensor.shape != current.shape:
            raise ShapeError(
                f"{key} has shape {tuple(tensor.shape)}, but the adapter's is "
                f"{tuple(current.shape)}"
            )
        if tensor.is_meta:
            raise StateDictError(f"{key} is a meta tensor: it holds no values to load")
        _require_writable(key, tensor, current)
        require_finite(key, tensor)
        split.setdefault(name, {})[local] = _as_stored(key, tensor, current)
    return split


def _require_storable(key: str, tensor: torch.Tensor, current: torch.Tensor) -> None:
    """`DTypeError` unless `tensor` is of a kind the adapter's `current` tensor holds without
    losing values: a real floating tensor, or for a complex adapter (over a complex layer)
    a complex one too; complex values would lose their imaginary parts in real factors."""
    if not (current.is_complex() and tensor.is_complex()):
        require_float(key, tensor)


def _require_writable(key: str, tensor: torch.Tensor, current: torch.Tensor) -> None:
    """`StateDictError` where copying `tensor` into the adapter's `current` would fail halfway
    through a load: a sharded (DTensor) target and a plain value or the other way round, or
    a target made under `torch.inference_mode` written outside it."""
    kinds = [type(t.detach()) for t in (current, tensor)]
    if kinds[0] is not kinds[1]:
        names = [k.__name__ for k in kinds]
        raise StateDictError(
            f"{key} is a {names[0]} in the model (sharded by FSDP2 where a DTensor) but a "
            f"{names[1]} in the state; load a state of the same kind (the sharded model's own "
            "adapter_state_dict), or gather the model's parameters first"
        )
    if current.is_inference() and not torch.is_inference_mode_enabled():
        raise StateDictError(
            f"{key} was made under torch.inference_mode(), so it can be written only there: "
            "load inside inference mode, or inject the adapters outside it"
        )


def _as_stored(key: str, tensor: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """`tensor` in the dtype and on the device of the adapter's `current` tensor, as loading
    stores it (so that a merge uses the values kept), always a copy: a state may hold the
    model's own factors under other names (`adapter_state_dict` shares their memory), which
    writing the adapters one by one would change before they are read; `NonFiniteError`
    where a finite value overflows that dtype."""
    if current.is_meta:
        return tensor
    stored = tensor.detach().to(device=current.device, dtype=current.dtype, copy=True)
    if not all_finite(stored):
        largest = float(tensor.detach().abs().max())
        raise NonFiniteError(
            f"{key} (|value| up to {largest:.4g}) overflows the adapter's {current.dtype}"
        )
    return stored


def _new_weight(
    adapter: LowRankAdapter, factors: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(W, W merged with factors)`: W the kept copy, or the current weight less the current
    ΔW when merged, else the current weight."""
    weight = adapter.base.weight
    if adapter.merged:
        if adapter.base_copy is not None:
            weight = adapter.base_copy
        else:
            weight = adapter.merged_weight(weight, sign=-1)
    return weight, adapter.merged_weight(weight, factors)


def _replace_factors(
    model: nn.Module, state: Mapping[str, object], *, strict: bool, merge_all: bool, exact: bool
) -> int:
    """Load `state` into the adapters; merged ones (every one with `merge_all`) end merged
    with the new factors. All checks (keys, shapes, finiteness, mergeability, overflow) run
    before anything is written."""
    strict, exact = require_flag("strict", strict), require_flag("exact", exact)
    found = adapters(model)
    resharded(model)
    _refresh_ties(model, found)
    new = _validated(found, state, strict)
    chosen = {name: a for name, a in found.items() if merge_all or name in new}

    def factors(name: str, adapter: LowRankAdapter) -> dict[str, torch.Tensor]:
        return {**adapter.plain_tensors(), **new.get(name, {})}

    for name, adapter in chosen.items():
        if adapter.merged or merge_all:
            with _about(name):
                adapter.check_mergeable()
                _new_weight(adapter, factors(name, adapter))
    with torch.no_grad():
        for name, adapter in chosen.items():
            tensors = adapter.adapter_tensors()
            weight = None
            if adapter.merged or merge_all:
                unmerged, weight = _new_weight(adapter, factors(name, adapter))
                if exact and not adapter.merged:
                    adapter.base_copy = adapter.base.weight.detach().clone()
            for key, tensor in new.get(name, {}).items():
                tensors[key].copy_(tensor)
            if weight is not None:
                # before the write: `unmerged` may be the base weight itself
                kept = adapter.factors_in_weight(unmerged=unmerged)
                adapter.base.weight.copy_(weight)
                adapter.merged = True
                adapter.merged_factors = kept
    return _copy_bytes(found)


def load_adapter_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True
) -> None:
    """Load an `adapter_state_dict` into the model's adapters (all keys needed with
    `strict`). A merged adapter stays merged, with the new ΔW (its hot swap: see
    `swap_adapter`). Raises `StateDictError`, `ShapeError`, `DTypeError`,
    `NonFiniteError` or `MergeError` and changes nothing when anything does not fit."""
    _replace_factors(model, state, strict=strict, merge_all=False, exact=False)


def swap_adapter(
    model: nn.Module, adapter_state: Mapping[str, torch.Tensor], *, exact: bool = False
) -> int:
    """Replace the adapter of every wrapped layer with `adapter_state` (an
    `adapter_state_dict` with every key), leaving every adapter merged with it.

    A merged adapter's base weight is restored first: bit-exactly from the copy that
    `merge(exact=True)` kept (the result then equals a fresh merge bit for bit), else by
    subtracting the old ΔW, which drifts in bf16/fp16 over many swaps. `exact=True` makes
    adapters not yet merged keep such a copy. Returns the bytes those copies hold (this
    rank's shards under FSDP2). Changes nothing if a check fails.
    """
    return _replace_factors(model, adapter_state, strict=True, merge_all=True, exact=exact)


def set_requires_grad(model: nn.Module, requires_grad: bool = True) -> None:
    """Set `requires_grad` of every adapter's trainable tensors in `model` (the factors, a
    trainable `scale`, DoRA's `magnitude`: what `inject` leaves trainable) and of nothing
    else, as PEFT's `set_requires_grad` does: after `model.requires_grad_(False)` (a frozen
    reference copy, say), `set_requires_grad(model)` trains the adapters again with their base
    layers and the rest of the model frozen (`adapter.requires_grad_()` would unfreeze its
    base layer too). `TargetError` for a model without adapters, or, with `requires_grad`,
    for factors made under `torch.inference_mode` (inference tensors, which take no
    gradient), naming the adapter, or where a flag would change on an adapter that
    `DistributedDataParallel` or FSDP has wrapped already (set the flags before wrapping: an
    engine knows only the parameters it found trainable then); nothing changes then."""
    requires_grad = require_flag("requires_grad", requires_grad)
    found = adapters(model)
    if not found:
        raise TargetError(f"{type(model).__name__} holds no lowrank.nn adapters")
    changed = {f"{name}.{key}": (adapter, tensor) for name, adapter in found.items()
               for key, tensor in adapter.adapter_tensors().items()
               if tensor.requires_grad != requires_grad}  # fmt: skip
    if requires_grad:
        inference = next((key for key, (_, t) in changed.items() if t.is_inference()), None)
        if inference is not None:
            raise TargetError(
                f"{inference} was made under torch.inference_mode (an inference tensor), "
                "which takes no gradient; inject the adapters outside inference mode to train "
                "them"
            )
    wrapped = _wrapped_by_engines(model) if changed else {}
    for key, (adapter, tensor) in changed.items():
        wrapper = wrapped.get(id(adapter))
        if wrapper is None and getattr(tensor, "device_mesh", None) is not None:
            wrapper = "a distributed engine (its tensors are DTensors)"
        if wrapper is not None:
            raise TargetError(
                f"{key} is wrapped by {wrapper} already, which knows only the parameters it "
                "found trainable when it wrapped the model: a factor trained after it would "
                "train outside it, each rank its own (or one frozen after it breaks its "
                "gradient reduction); set the flags before wrapping the model"
            )
    for _, tensor in changed.values():
        tensor.requires_grad_(requires_grad)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, frozen)` parameter counts of `model`, shared parameters counted once
    (`TargetError` for an uninitialised lazy module)."""
    _require_initialised(require_module("model", model))
    trainable = frozen = 0
    for parameter in model.parameters():
        if parameter.requires_grad:
            trainable += parameter.numel()
        else:
            frozen += parameter.numel()
    return trainable, frozen
