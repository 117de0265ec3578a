"""The one settings object of an adapter: its form, rank, scale and how it runs.

`AdapterConfig` is what `inject`, the adapter modules and `count_model` read. Keywords
given to any of them build one (`AdapterConfig.build`); a per-pattern dict of `inject`'s
targets (JSON-style keys, `"r"` for the rank) overrides it pattern by pattern
(`AdapterConfig.updated`); `validated` checks it for one module and resolves the scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .._checks import (
    DTYPE_NAMES,
    require_choice,
    require_flag,
    require_float_dtype,
    require_number,
    require_probability,
    require_real,
)
from ..errors import ArgumentError, LowRankError, RankError, TargetError
from ..forms import (
    Rank,
    alpha_divisor_rank,
    rank_pair,
    require_form,
    require_rank,
    scale_from_alpha,
)

_FLAGS = ("rslora", "trainable_scale", "hard", "fused", "dora")
_NUMBERS = ("alpha", "scale", "dropout")
INITS = ("default", "pissa")


@dataclass(frozen=True)
class AdapterConfig:
    """How one module is adapted.

    - `rank`: an int, or `(r_out, r_in)` for `form="tucker2"`.
    - `form`: `"lora"` (LoCon on a convolution), `"centre_tap"`, `"tucker2"` or `"cp"`.
    - `alpha`: the scale is `alpha / r` (`r_in` for a Tucker2 pair, as in files), or
      `alpha / sqrt(r)` with `rslora=True` (rank-stabilised LoRA). `scale` sets the scale
      directly; give at most one of the two; neither means scale 1.
    - `trainable_scale`: the scale is one trainable parameter.
    - `hard`: the update is applied in weight space (`W + ΔW` each forward), on linear
      layers, embeddings and 1×1 convolutions; no dropout then.
    - `fused`: a linear LoRA runs as one `lowrank.kernels.lora_linear` call.
    - `dropout` in [0, 1): the branch input is dropped in training (PEFT's `lora_dropout`).
    - `dora`: weight-decomposed LoRA (DoRA, PEFT's `use_dora`): a trainable magnitude m per
      output channel, started at `‖W + ΔW₀‖`, scales the updated weight's direction,
      `W' = m ⊙ (W + ΔW) / ‖W + ΔW‖` (the norm not differentiated); form `"lora"` only, on
      linear layers, ungrouped convolutions and `Conv1D`, without `hard`, `fused`,
      `trainable_scale` or `init="pissa"`.
    - `init`: `"default"` starts at ΔW₀ = 0 (or at the factors given to the module);
      `"pissa"` starts at the form of the rank nearest to the base weight W (its truncated
      SVD for LoRA; or the factors given) and stores `W − ΔW₀` as the frozen base, so the
      output at step 0 is that of W.
    - `factor_dtype`: the dtype of the factors (and of a trainable scale and a DoRA
      magnitude), a float `torch.dtype`; `None` (the default) takes the base weight's.
      `torch.float32` over a float16 or bfloat16 base is PEFT's default
      (`autocast_adapter_dtype`): the branch runs in float32 and the sum is rounded once to
      the base's output dtype. `fused=True` runs one dtype (or `torch.autocast`'s).

    `hard`, `fused`, `dropout`, `init` and `factor_dtype` change no parameter count; `dora`
    adds `out` per layer (the magnitude).
    """

    rank: Rank | None = None
    form: str = "lora"
    alpha: float | None = None
    rslora: bool = False
    scale: float | None = None
    trainable_scale: bool = False
    hard: bool = False
    fused: bool = False
    dropout: float = 0.0
    init: str = "default"
    dora: bool = False
    factor_dtype: torch.dtype | None = None

    @classmethod
    def build(cls, config: AdapterConfig | None = None, **settings: object) -> AdapterConfig:
        """`config` (default: all defaults) with the keyword `settings` replacing its fields.

        Keyword flags are bools or the ints 0 and 1 (`fused=1` is on; a string or a tensor is
        an `ArgumentError`); an unknown keyword raises `ArgumentError` listing the known ones.
        """
        if config is None:
            config = cls()
        elif not isinstance(config, AdapterConfig):
            raise ArgumentError(
                f"config must be a lowrank.nn.AdapterConfig, got {type(config).__name__} "
                f"{config!r}; pass rank=… and the other settings by keyword"
            )
        unknown = set(settings) - set(FIELDS)
        if unknown:
            raise ArgumentError(
                f"unknown adapter setting(s) {sorted(unknown)}; known: {', '.join(FIELDS)}"
            )
        flags = {
            key: require_flag(key, settings[key], allow_int=True)
            for key in _FLAGS
            if key in settings
        }
        return dataclasses.replace(config, **{**settings, **flags})  # type: ignore[arg-type]

    def updated(self, pattern: str, settings: Mapping[str, object]) -> AdapterConfig:
        """This config with a target pattern's own settings (JSON-style) applied.

        Keys: `"r"` or `"rank"` (a list for a Tucker2 pair), and every field name. Flags take
        `true`/`false` only, numbers must be numbers (`null` gives the field's default),
        `factor_dtype` a name (`"float32"`), a `torch.dtype` or `null`;
        `TargetError` names the pattern otherwise. A pattern with `"hard": true` and no
        `"dropout"` of its own gets dropout 0.
        """
        if not isinstance(settings, Mapping):
            raise TargetError(
                f"target {pattern!r} must map to a dict of settings (keys "
                f"{', '.join(sorted(PATTERN_KEYS))}), got {settings!r}"
            )
        unknown = set(settings) - PATTERN_KEYS
        if unknown:
            raise TargetError(
                f"target {pattern!r} has unknown setting(s) {sorted(unknown)}; "
                f"known: {', '.join(sorted(PATTERN_KEYS))}"
            )
        if "r" in settings and "rank" in settings:
            raise TargetError(f"target {pattern!r} sets both 'r' and 'rank'; give one")
        changes: dict[str, object] = {}
        rank = settings.get("r", settings.get("rank", self.rank))
        changes["rank"] = tuple(rank) if isinstance(rank, list) else rank
        for key in _FLAGS:
            if key in settings:
                try:
                    changes[key] = require_flag(key, settings[key])
                except ArgumentError as err:
                    raise TargetError(f"target {pattern!r}: {err}") from None
        for key in _NUMBERS:
            value = settings.get(key)
            if key in settings:
                try:
                    changes[key] = _DEFAULTS[key] if value is None else require_number(key, value)
                except ArgumentError as err:
                    raise TargetError(f"target {pattern!r}: {err}") from None
        for key in ("form", "init"):
            if key in settings:
                if not isinstance(settings[key], str):
                    raise TargetError(
                        f"target {pattern!r}: {key} must be a string, got {settings[key]!r}"
                    )
                changes[key] = settings[key]
        if "factor_dtype" in settings:
            dtype = settings["factor_dtype"]
            dtype = DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
            try:
                changes["factor_dtype"] = _checked_dtype("factor_dtype", dtype)
            except LowRankError as err:
                raise TargetError(f"target {pattern!r}: {err}") from None
        if changes.get("hard") and "dropout" not in settings:
            changes["dropout"] = 0.0
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def validated(self, name: str) -> AdapterConfig:
        """This config checked for the module `name`, with the rank normalised.

        Raises `RankError` (no rank, or a bad one), `ArgumentError` (form, init, a flag that
        is not a bool or the int 0 or 1, a non-number alpha/scale, both given, dropout outside
        [0, 1), `dora` with another form than `"lora"` or with `hard`, `fused`,
        `trainable_scale` or `init="pissa"`), `DTypeError` (a `factor_dtype` that is
        neither `None` nor a float `torch.dtype`), `NonFiniteError` (alpha or scale NaN/Inf) or
        `TargetError` (dropout with `hard`), each naming the module.
        """
        where = f"module {name!r}"
        require_choice(f"{where}: init", self.init, INITS)
        # a config built directly skips `build`: a string "false" would be a truthy flag
        flags = {
            key: require_flag(f"{where}: {key}", getattr(self, key), allow_int=True)
            for key in _FLAGS
        }
        if self.rank is None:
            raise RankError(f"{where} has no rank: pass rank= (or 'r' per pattern)")
        form = require_form(self.form, allow_dense=False)
        try:
            rank = require_rank(form, self.rank, minimum=1)
        except RankError as err:
            raise RankError(f"{where}: {err}") from None
        if self.alpha is not None and self.scale is not None:
            raise ArgumentError(f"{where} sets both alpha and scale; give alpha or scale, not both")
        numbers_ = {
            key: None if getattr(self, key) is None else require_real(
                f"{where}: {key}", getattr(self, key)
            )
            for key in ("alpha", "scale")
        }
        dropout = require_probability(f"{where}: dropout", self.dropout)
        if dropout and flags["hard"]:
            raise TargetError(
                f"{where}: hard=True applies the update in weight space, where there is no "
                "branch input to drop out; give dropout=0"
            )
        if flags["dora"]:
            _require_dora_fits(where, form, self.init, flags)
        changes = {"rank": rank, "form": form, "dropout": dropout, **numbers_, **flags,
                   "factor_dtype": _checked_dtype(f"{where}: factor_dtype", self.factor_dtype)}
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def r_out(self) -> int:
        """The rank next to the output: `r`, or `r_out` of a pair."""
        if self.rank is None:
            raise RankError("the adapter has no rank")
        return rank_pair(self.rank)[0]

    def resolved_scale(self) -> float:
        """`alpha / r` (`alpha / sqrt(r)` with `rslora`; `r_in` of a Tucker2 pair), else
        `scale`, else 1."""
        if self.alpha is not None:
            if self.rank is None:
                raise RankError("the adapter has no rank")
            rank = alpha_divisor_rank(self.rank)
            return scale_from_alpha(float(self.alpha), rank, rslora=self.rslora)
        return 1.0 if self.scale is None else float(self.scale)


def _checked_dtype(name: str, value: object) -> torch.dtype | None:
    """`value` if it is `None` or a float `torch.dtype`, else `DTypeError` naming `name`."""
    return None if value is None else require_float_dtype(name, value)


def _require_dora_fits(where: str, form: str, init: str, flags: dict[str, bool]) -> None:
    """`ArgumentError` naming the module where `dora=True` comes with a setting it does not
    run with: another form than `"lora"` (the magnitude scales `W + BA`), `hard` or `fused`
    (both compute `W + s·BA` without the per-channel factor), `trainable_scale` (the norm
    is taken at a fixed scale) or `init="pissa"`."""
    if form != "lora":
        raise ArgumentError(f"{where}: dora=True runs form 'lora' only, got form {form!r}")
    clash = [key for key in ("hard", "fused", "trainable_scale") if flags[key]]
    if init == "pissa":
        clash.append("init='pissa'")
    if clash:
        raise ArgumentError(
            f"{where}: dora=True cannot be combined with {', '.join(clash)} (DoRA scales each "
            "output channel of W + ΔW by magnitude / norm, which those settings do not run)"
        )


FIELDS = tuple(field.name for field in dataclasses.fields(AdapterConfig))
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(AdapterConfig)}
PATTERN_KEYS = frozenset({"r", *FIELDS})

