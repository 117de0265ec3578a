"""Which modules of a model get an adapter, with which settings, and whether it fits.

A target is a module-name pattern: a suffix of whole dotted components (`"to_q"` matches
`"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"`), a glob when it holds
`*`, `?` or `[` (`"*.attn1.to_*"`, matched against the whole name), or a regular
expression with the prefix `"re:"` (`re.fullmatch` against the whole name). `targets` is
one such string (comma-separated patterns allowed unless it is a `re:` pattern), a list
of them, or a per-pattern dict like the seed wrapper's JSON config:
`{"to_q": {"r": 8, "scale": 1.0, "trainable_scale": false, "hard": false}}`, with also
`"form"`, `"alpha"`, `"fused"` and `"dropout"` (see `AdapterSpec`).
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from .bounds import Rank, require_form, require_rank
from .conv import check_centre_tap
from .errors import ArgumentError, GeometryError, NonFiniteError, RankError, TargetError

Targets = str | Sequence[str] | Mapping[str, Mapping[str, object]]

_GLOB_CHARS = frozenset("*?[")
_CONFIG_KEYS = frozenset(
    {"r", "rank", "form", "alpha", "scale", "trainable_scale", "hard", "fused", "dropout"}
)
_MAX_NAMES_SHOWN = 3


@dataclass(frozen=True)
class AdapterSpec:
    """The adapter one module gets.

    `alpha` resolves to `scale = alpha / r` (`r_out` for a Tucker2 pair); `None`
    means scale 1. `scale` sets the scale directly (the seed config's key); give at
    most one. `trainable_scale` adds one trainable parameter; `hard` applies the update
    in weight space, on linear layers and 1×1 convolutions (it changes no count). `fused` runs a
    linear layer's base and LoRA (or centre-tap) branch as one `lowrank.kernels.lora_linear`
    (it changes no count either). `dropout` in [0, 1) drops the branch's input in training
    (PEFT's `lora_dropout`).
    """

    rank: Rank
    form: str = "lora"
    alpha: float | None = None
    scale: float | None = None
    trainable_scale: bool = False
    hard: bool = False
    fused: bool = False
    dropout: float = 0.0


@dataclass(frozen=True)
class Target:
    """A matched module: its dotted name, the module and its adapter settings."""

    name: str
    module: nn.Module
    spec: AdapterSpec


def matches(name: str, pattern: str) -> bool:
    """Whether module `name` matches `pattern` (suffix, glob or `re:` regex; see module doc)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def _parse(targets: Targets) -> dict[str, Mapping[str, object]]:
    """Patterns in order, each with its per-pattern settings (empty for plain patterns)."""
    if isinstance(targets, str):
        patterns = [targets] if targets.startswith("re:") else targets.split(",")
        parsed: dict[str, Mapping[str, object]] = {p.strip(): {} for p in patterns if p.strip()}
    elif isinstance(targets, Mapping):
        parsed = {}
        for pattern, config in targets.items():
            if not isinstance(config, Mapping):
                raise TargetError(
                    f"target {pattern!r} must map to a dict of settings (keys "
                    f"{', '.join(sorted(_CONFIG_KEYS))}), got {config!r}"
                )
            unknown = set(config) - _CONFIG_KEYS
            if unknown:
                raise TargetError(
                    f"target {pattern!r} has unknown setting(s) {sorted(unknown)}; "
                    f"known: {', '.join(sorted(_CONFIG_KEYS))}"
                )
            parsed[str(pattern)] = config
    elif isinstance(targets, Sequence) and all(isinstance(p, str) for p in targets):
        parsed = {p: {} for p in targets}
    else:
        raise TargetError(
            f"targets must be a pattern string, a list of them or a dict of per-pattern "
            f"settings, got {targets!r}"
        )
    if not parsed:
        raise TargetError("targets is empty: give at least one module-name pattern")
    return parsed


def _is_number(value: object) -> bool:
    """A real number (NumPy's included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _flag(pattern: str, key: str, value: object) -> bool:
    """A per-pattern on/off setting: JSON `true`/`false` only (a string "false" is truthy)."""
    if not isinstance(value, bool):
        raise TargetError(f"target {pattern!r}: {key} must be true or false, got {value!r}")
    return value


def _spec(
    name: str, pattern: str, config: Mapping[str, object], defaults: AdapterSpec
) -> AdapterSpec:
    if "r" in config and "rank" in config:
        raise TargetError(f"target {pattern!r} sets both 'r' and 'rank'; give one")
    rank = config.get("r", config.get("rank", defaults.rank))
    if rank is None:
        raise RankError(f"module {name!r} (target {pattern!r}) has no rank: pass rank= or 'r'")
    if isinstance(rank, list):
        rank = tuple(rank)
    flags = {key: _flag(pattern, key, config[key]) if key in config else getattr(defaults, key)
             for key in ("trainable_scale", "hard", "fused")}  # fmt: skip
    values = {}
    for key in ("alpha", "scale", "dropout"):
        value = config.get(key, getattr(defaults, key))
        if key in config and value is not None and not _is_number(value):
            raise TargetError(f"target {pattern!r}: {key} must be a number, got {value!r}")
        values[key] = float(value) if key in config and value is not None else value
    if flags["hard"] and "dropout" not in config:
        values["dropout"] = 0.0  # a default dropout: no branch input in weight space to drop
    spec = AdapterSpec(
        rank=rank,  # type: ignore[arg-type]
        form=str(config.get("form", defaults.form)),
        **values,  # type: ignore[arg-type]
        **flags,
    )
    if spec.alpha is not None and spec.scale is not None:
        raise ArgumentError(f"module {name!r} (target {pattern!r}) sets both alpha and scale")
    return spec


def resolve_targets(
    model: nn.Module,
    targets: Targets,
    *,
    rank: Rank | None = None,
    form: str = "lora",
    alpha: float | None = None,
    fused: bool = False,
    dropout: float = 0.0,
) -> list[Target]:
    """Every module of `model` that `targets` names, in `named_modules()` order.

    `rank`, `form`, `alpha`, `fused` and `dropout` are the defaults that per-pattern settings
    override.
    Raises `TargetError` for a pattern that matches no module, a module matched by two
    dict entries, or settings that are not understood.
    """
    parsed = _parse(targets)
    per_pattern = isinstance(targets, Mapping)
    defaults = AdapterSpec(rank, form, alpha, fused=fused, dropout=dropout)  # type: ignore[arg-type]
    found: dict[str, Target] = {}
    owner: dict[str, str] = {}
    for pattern, config in parsed.items():
        hits = [(n, m) for n, m in model.named_modules() if matches(n, pattern)]
        if not hits:
            names = [n for n, _ in model.named_modules() if n][-_MAX_NAMES_SHOWN:]
            raise TargetError(
                f"target {pattern!r} matches no module of {type(model).__name__} "
                f"(module names look like {names})"
            )
        for name, module in hits:
            if name in owner:
                if per_pattern:
                    raise TargetError(
                        f"module {name!r} is matched by both {owner[name]!r} and {pattern!r}"
                    )
                continue
            owner[name] = pattern
            found[name] = Target(name, module, _spec(name, pattern, config, defaults))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(found.values(), key=lambda t: order[t.name])


def layer_sizes(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """`(in, out, kernel_size)` of an `nn.Linear` (kernel `()`) or `nn.Conv1d/2d/3d`."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, ()
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return module.in_channels, module.out_channels, tuple(module.kernel_size)
    raise TargetError(
        f"{type(module).__name__} is not an nn.Linear or nn.Conv1d/2d/3d; only those take "
        "an adapter"
    )


def _require_finite_numbers(name: str, spec: AdapterSpec) -> None:
    """Raise unless `spec.alpha` and `spec.scale` are each `None` or a finite real number."""
    for key in ("alpha", "scale"):
        value = getattr(spec, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ArgumentError(f"module {name!r}: {key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise NonFiniteError(f"module {name!r}: {key} must be finite, got {value}")


def _require_dropout(name: str, spec: AdapterSpec) -> None:
    """Raise unless `spec.dropout` is a number in [0, 1), and 0 where the update is applied in
    weight space (`hard`: no branch input to drop)."""
    p = spec.dropout
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ArgumentError(f"module {name!r}: dropout must be a number in [0, 1), got {p!r}")
    if p and spec.hard:
        raise TargetError(
            f"module {name!r}: hard=True applies the update in weight space, where there is "
            "no branch input to drop out; give dropout=0"
        )


def _check_fused(name: str, module: nn.Module, spec: AdapterSpec) -> None:
    """Raise `TargetError` unless `lowrank.kernels.lora_linear` can run the adapter: a plain
    `nn.Linear` (a subclass's own forward would be bypassed), form `lora` or `centre_tap`,
    a constant scale, the update not in weight space."""
    problem = None
    if not isinstance(module, nn.Linear):
        problem = "it is a convolution (the fused kernel is for nn.Linear)"
    elif type(module).forward is not nn.Linear.forward:
        problem = f"{type(module).__name__} overrides nn.Linear.forward, which fusing would skip"
    elif spec.form not in ("lora", "centre_tap"):
        problem = f"form {spec.form!r} (the fused kernel runs 'lora' and 'centre_tap')"
    elif spec.trainable_scale:
        problem = "trainable_scale=True (the fused kernel takes a constant scale)"
    elif spec.hard:
        problem = "hard=True (the update is applied in weight space, not as a branch)"
    if problem:
        raise TargetError(f"module {name!r} cannot run fused: {problem}")


def check_fit(name: str, module: nn.Module, spec: AdapterSpec) -> None:
    """Raise `TargetError` naming the module unless its adapter can be built as specified.

    Linear layers take every form (`centre_tap` is plain LoRA there). Convolutions need
    `groups=1` and zero padding; `centre_tap` needs a size-keeping convolution
    (`lowrank.check_centre_tap`); `hard` needs a 1×1 kernel; `fused` needs a linear layer
    with form `lora` or `centre_tap`, a constant scale and no `hard`. Form and rank are
    validated, `alpha` and `scale` must be finite numbers, `dropout` in [0, 1) (0 with `hard`).
    """
    if name == "":
        raise TargetError("targets match the root module itself; it cannot be replaced")
    try:
        _, _, kernel = layer_sizes(module)
    except TargetError as err:
        raise TargetError(f"module {name!r}: {err}") from None
    require_form(spec.form, allow_dense=False)
    try:
        require_rank(spec.form, spec.rank, minimum=1)
    except RankError as err:
        raise RankError(f"module {name!r}: {err}") from None
    _require_finite_numbers(name, spec)
    _require_dropout(name, spec)
    if spec.fused:
        _check_fused(name, module, spec)
    if not kernel:
        return
    problem = None
    if module.groups != 1:
        problem = f"groups={module.groups} (adapters need groups=1)"
    elif module.padding_mode != "zeros":
        problem = f"padding_mode={module.padding_mode!r} (adapters need 'zeros')"
    elif spec.hard and any(k != 1 for k in kernel):
        problem = f"hard=True needs a 1×1 kernel, got kernel_size {kernel}"
    if problem:
        raise TargetError(f"module {name!r} does not fit the adapter: {problem}")
    if spec.form == "centre_tap":
        try:
            check_centre_tap(module)
        except GeometryError as err:
            raise TargetError(f"module {name!r} does not fit form 'centre_tap': {err}") from None
