"""PEFT's LoHa and LoKr adapters (`LoHaConfig`, `LoKrConfig`): a PEFT folder whose config says
`peft_type` `"LOHA"` or `"LOKR"`.

Keys are `base_model.model.<module>.<part>` with LyCORIS' part names and layouts
(`formats.kohya`): `hada_w1_a (out, r)`, `hada_w1_b (r, in·K)`, …, with Tucker cores
`hada_t1 (r, r, *k)` and then `a (r, out)`, `b (r, in)`; `lokr_w1 (a, c)` or `lokr_w1_a (a, r)`,
`lokr_w1_b (r, c)`; `lokr_w2 (b, d, *k)`, or `lokr_w2_a (b, r)`, `lokr_w2_b (r, d·K)`, or with
`lokr_t2 (r, r, *k)`: `lokr_w2_a (r, b)`, `lokr_w2_b (r, d)`. PEFT (0.21) builds them on
`nn.Linear`, `nn.Conv1d` and `nn.Conv2d` only, a `Conv1d`'s core as `(r, r, k, 1)`.

The scale is `alpha / r` for every layer, `r` and `alpha` from the first `rank_pattern` /
`alpha_pattern` key that matches the module (as for LoRA, `peft.pattern_key`), else `r` /
`alpha` — a LoKr whose `w1` and `w2` are both dense included (LyCORIS gives that one scale 1).
Which parts a layer has is PEFT's choice, not the file's: a Tucker core where
`use_effective_conv2d` is set and the kernel is beyond 1×1; for LoKr, `out` and `in` split by
`factorization(·, decompose_factor)` into `(a, b)` and `(c, d)`, `w2` factored where
`r < max(b, d) / 2`, `w1` factored where `decompose_both` and `r < max(a, c) / 2`. The reader
refuses files whose parts disagree with the config (PEFT would not load them as they are); the
writer derives a config under which PEFT builds every layer's parts, or refuses the layer.
Whole base weights PEFT saves beside the parts (`peft.SAVED_KEY`: `lm_head.base_layer.weight`
of a LoHa on `lm_head`, the trained copy of a `modules_to_save` head) are read into
`Adapter.base_weights` and written back, as for LoRA.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ...errors import ConversionError, FileFormatError
from ...forms import (
    Factors,
    Full,
    LoHa,
    LoKr,
    LoRA,
    Tucker2,
    alpha_from_scale,
    kernel_volume,
    scale_from_alpha,
)
from ..adapter import Adapter, form_name
from ..files import Staging, pickle_refusal, read_json, require_safetensors, save_small
from ..names import targets_parameter
from .common import adapter_tensors, build, exact_fold, full_refusal, one_dtype
from .kohya import _form as lycoris_form
from .kohya import _parts as lycoris_parts
from .peft import (
    CONFIG_NAME,
    PICKLED_WEIGHTS_NAME,
    PREFIX,
    WEIGHTS_NAME,
    all_linear,
    all_linear_reason,
    check_model_fields,
    model_fields,
    require_adaptable,
    require_supported_keys,
    saved_tensors,
    saved_weights,
    selection,
)
from .peft import _check_selection as check_selection
from .peft import _exact as exact_pattern
from .peft import _number as json_number
from .peft import _require_setting as require_setting
from .peft import (
    module_settings as peft_settings,
)

TYPES = {"LOHA": LoHa, "LOKR": LoKr}
"""PEFT's `peft_type` of each form it has an adapter type for."""
_PARTS = {
    "LOHA": "hada_w[12]_[ab]|hada_t[12]",
    "LOKR": "lokr_w[12]|lokr_w[12]_[ab]|lokr_t2",
}
_FLAGS = {"LOHA": ("use_effective_conv2d",),
          "LOKR": ("use_effective_conv2d", "decompose_both")}  # fmt: skip
_CORES = ("hada_t1", "hada_t2", "lokr_t2")
_CONV1D_DENSE_W2 = (
    "a LoKr on a Conv1d with a dense lokr_w2 (b, d, k), which PEFT computes as torch.kron of "
    "the 2-D w1 and the 3-D w2 reshaped to the weight: ΔW's entries in another order than "
    "w1 ⊗ w2, which lowrank's LoKr does not represent"
)


def product_type(path: Path) -> str | None:
    """`"LOHA"` or `"LOKR"` where `path` (a PEFT folder or its weights) has a config of that
    `peft_type`; None otherwise, and where the config cannot be read (the LoRA reader then
    says why)."""
    folder = path if path.is_dir() else path.parent
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        return None
    try:
        config = read_json(config_path)
    except FileFormatError:
        return None
    kind = config.get("peft_type") if isinstance(config, dict) else None
    return kind if isinstance(kind, str) and kind in TYPES else None


def check_config(config: dict[str, Any], source: object) -> dict[str, Any]:
    """`config` (a LoHa or LoKr config) if it holds settings PEFT would accept and lowrank
    can represent, else `FileFormatError` naming the field. `rank_dropout`,
    `module_dropout`, `rank_dropout_scale` and `init_weights` act in training only."""
    kind = config["peft_type"]
    for key in ("r", "alpha"):
        require_setting(source, key, config.get(key, 8), whole=key == "r")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise FileFormatError(f"{source}: {key} must be an object, got {config[key]!r}")
        for pattern, value in patterns.items():
            require_setting(source, f"{key}[{pattern!r}]", value, whole=key == "rank_pattern")
    for key in _FLAGS[kind]:
        if not isinstance(config.get(key, False), bool):
            raise FileFormatError(f"{source}: {key} must be true or false")
    factor = config.get("decompose_factor", -1)
    if kind == "LOKR" and (isinstance(factor, bool) or not isinstance(factor, int)):
        raise FileFormatError(f"{source}: decompose_factor must be an integer, got {factor!r}")
    if config.get("target_parameters"):
        raise FileFormatError(f"{source}: target_parameters is a LoRA setting; PEFT's {kind} "
                              "adapters wrap modules only")  # fmt: skip
    check_selection(config, source)
    check_model_fields(config, source)
    return config


def module_settings(config: Mapping[str, Any], name: str, source: object) -> tuple[int, float]:
    """`(r, alpha)` of module `name` under a PEFT LoHa or LoKr config (whose alpha field is
    `alpha`)."""
    return peft_settings(config, name, source, "alpha")


def factorization(dimension: int, factor: int) -> tuple[int, int]:
    """How PEFT and LyCORIS split a LoKr's `dimension` into `(m, n)`, `m·n = dimension`:
    `(factor, dimension / factor)` where `factor > 0` divides it; else the divisor pair
    reached by stepping `m` up through the divisors from 1 while `m < n` and the next one is
    at most `factor` (any, for `factor = -1`: the pair nearest √dimension), smaller first."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    while m < dimension // m:
        following = next(k for k in range(m + 1, dimension + 1) if dimension % k == 0)
        if following > limit:
            break
        m = following
    n = dimension // m
    return (m, n) if m <= n else (n, m)


def _kernel_beyond_one(shape: torch.Size) -> bool:
    """Whether a ΔW of `shape` is a convolution's with a kernel beyond 1×1, where PEFT's
    `use_effective_conv2d` builds Tucker cores."""
    return len(shape) > 2 and kernel_volume(shape[2:]) > 1


def _lokr_plan(
    shape: torch.Size, rank: int, config: Mapping[str, Any]
) -> tuple[tuple[int, int, int, int], bool, bool]:
    """`((a, b, c, d), dense w1, dense w2)`: the LoKr parts PEFT builds for a ΔW of `shape`
    `(out, in, *k)` at rank `rank` under `config`."""
    factor = config.get("decompose_factor", -1)
    a, b = factorization(shape[0], factor)
    c, d = factorization(shape[1], factor)
    dense_w1 = not (config.get("decompose_both", False) and rank < max(a, c) / 2)
    dense_w2 = rank >= max(b, d) / 2
    return (a, b, c, d), dense_w1, dense_w2


def _lokr_mismatch(
    form: LoKr, rank: int, config: Mapping[str, Any], *, flat: bool = False
) -> str | None:
    """What PEFT would build otherwise than `form`'s parts at rank `rank` under `config`,
    or None where it builds them (`_lokr_plan`). `flat`: `w2` is a factored `(r, d·K)` of a
    layer whose kernel (so `in = c·d`) is unknown; only the output split and `w1` are
    checked."""
    w1, w2 = form.w1, form.w2
    if flat:
        a, b = factorization(form.shape[0], config.get("decompose_factor", -1))
        c = w1.shape[1]
        dense_w1 = not (config.get("decompose_both", False) and rank < max(a, c) / 2)
        if (w1.shape[0], w2.shape[0]) != (a, b):
            return (f"w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)} split ΔW's {form.shape[0]} "
                    f"rows as {w1.shape[0]}·{w2.shape[0]}, PEFT as {a}·{b}")  # fmt: skip
        if dense_w1 != isinstance(w1, torch.Tensor):
            return f"w1 is {'factored' if dense_w1 else 'dense'}, PEFT builds it otherwise"
        return None
    (a, b, c, d), dense_w1, dense_w2 = _lokr_plan(form.shape, rank, config)
    found = (w1.shape[0], w2.shape[0], w1.shape[1], w2.shape[1])
    if found != (a, b, c, d):
        return (f"w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)} split ΔW {tuple(form.shape)} "
                f"as (a, b, c, d) = {found}, PEFT as {(a, b, c, d)}")  # fmt: skip
    for part, dense, tensor in (("w1", dense_w1, w1), ("w2", dense_w2, w2)):
        if dense != isinstance(tensor, torch.Tensor):
            built = "dense" if dense else f"factored at rank {rank}"
            return f"{part} is {'dense' if not dense else 'factored'}, PEFT builds it {built}"
    effective = config.get("use_effective_conv2d", False) and _kernel_beyond_one(form.shape)
    if isinstance(w2, Tucker2) != (effective and not dense_w2):
        return "its w2 Tucker core (lokr_t2) and use_effective_conv2d disagree"
    return None


def _layer(
    layer: str, parts: dict[str, torch.Tensor], config: Mapping[str, Any], weights: Path
) -> tuple[Factors, float]:
    """One layer's form, scaled as PEFT scales it, and its alpha."""
    kind = config["peft_type"]
    # a Conv1d's core, (r, r, k, 1), is read as a (k, 1) kernel (`adapter.fit_shape`)
    cores = [p for p in _CORES if p in parts]
    if cores and not config.get("use_effective_conv2d", False):
        raise FileFormatError(
            f"{weights}: layer {layer!r} has a Tucker core ({cores[0]}), but the config's "
            "use_effective_conv2d is false: PEFT builds none and would not load it"
        )
    if cores and kernel_volume(parts[cores[0]].shape[2:]) == 1:
        raise FileFormatError(
            f"{weights}: layer {layer!r} has a Tucker core ({cores[0]}) on a 1×1 kernel, "
            "where PEFT builds none (use_effective_conv2d skips them) and would not load it"
        )
    if "lokr_w2" in parts and parts["lokr_w2"].ndim == 3:
        raise FileFormatError(f"{weights}: layer {layer!r}: {_CONV1D_DENSE_W2}")
    form = lycoris_form(layer, parts, weights)
    if not isinstance(form, TYPES[kind]):
        raise FileFormatError(f"{weights}: layer {layer!r} is a {form_name(form)} in a PEFT "
                              f"{kind} adapter")  # fmt: skip
    rank, alpha = module_settings(config, layer.removeprefix(PREFIX), weights)
    if form.rank is not None and form.rank != rank:
        raise FileFormatError(
            f"{weights}: the config gives module {layer.removeprefix(PREFIX)!r} rank {rank}, "
            f"but its factors have rank {form.rank}"
        )
    # a factored w2 stored (r, d·K) is a linear layer's or a convolution's flattened one,
    # whose in = c·d the file does not tell
    flat = isinstance(form, LoKr) and isinstance(form.w2, LoRA) and form.w2.down.ndim == 2
    if isinstance(form, LoKr):
        why = _lokr_mismatch(form, rank, config, flat=flat)
        if why is not None:
            raise FileFormatError(
                f"{weights}: layer {layer!r}: {why} (r={rank}, decompose_both="
                f"{config.get('decompose_both', False)}, decompose_factor="
                f"{config.get('decompose_factor', -1)}), so PEFT would not load its parts"
            )
    scale = build(weights, layer, lambda: scale_from_alpha(alpha, rank))
    return build(weights, layer, lambda: replace(form, scale=scale)), alpha


def read(path: Path) -> Adapter:
    """A PEFT LoHa or LoKr folder (or its `adapter_model.safetensors`) as an `Adapter`."""
    folder = path if path.is_dir() else path.parent
    pickled = folder / PICKLED_WEIGHTS_NAME
    if path.is_dir() and not (folder / WEIGHTS_NAME).exists() and pickled.is_file():
        raise pickle_refusal(pickled)
    weights = require_safetensors(folder / WEIGHTS_NAME if path.is_dir() else path)
    config_path = folder / CONFIG_NAME
    config = check_config(read_json(config_path), config_path)
    kind = config["peft_type"]
    key = re.compile(rf"^base_model\.model\.(?P<module>.+)\.(?P<part>{_PARTS[kind]})$")
    tensors, metadata = adapter_tensors(weights)
    modules = {m["module"] for k in tensors if (m := key.match(k))}
    saved, copies = saved_weights(tensors, modules, config)
    kept = {*saved, *copies}
    require_supported_keys([k for k in tensors if key.match(k) is None and k not in kept],
                           weights)  # fmt: skip
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name in kept:
            continue
        match = key.match(name)
        if match is None:
            raise FileFormatError(
                f"{weights}: key {name!r} is not a PEFT {kind} factor (expected "
                f"{PREFIX}<module>.<part>, part one of {_PARTS[kind].replace('|', ', ')})"
            )
        grouped.setdefault(match["module"], {})[match["part"]] = tensor
    for module, parts in grouped.items():
        # a convolution's parts with its kernel (`hada_t1`, a 4-D `lokr_w2`); a flattened one
        # (2-D parts) only the base tells from a linear layer's
        linear = all(part.ndim <= 2 for part in parts.values())
        field = selection(config, module, linear, config_path)
        if field is not None:
            raise FileFormatError(
                f"{weights}: module {module!r} has {kind} factors, but {config_path}'s {field} "
                f"leaves it out{all_linear_reason(config)}: PEFT would give it no layer and "
                "skip its keys"
            )
    layers, alphas = {}, {}
    for module, parts in grouped.items():
        layers[module], alphas[module] = _layer(PREFIX + module, parts, config, weights)
    return Adapter(
        layers,
        "peft",
        alphas=alphas,
        metadata=metadata,
        source=path,
        model=model_fields(config),
        base_weights={module: tensors[key] for key, module in saved.items()},
        all_linear=all_linear(config),
    )


def _folded(form: LoHa | LoKr) -> LoHa | LoKr:
    """`form` with its Tucker chains folded into their exactly equal LoRAs (`exact_fold`)."""
    if isinstance(form, LoHa):
        if isinstance(form.first, Tucker2):
            return LoHa(*one_dtype(exact_fold(form.first), exact_fold(form.second)), form.scale)
        return form
    if isinstance(form.w2, Tucker2):
        return LoKr(*one_dtype(form.w1, exact_fold(form.w2)), form.scale)
    return form


def _tucker_part(form: LoHa | LoKr) -> bool:
    """Whether `form` has Tucker chains (LoHa halves, LoKr `w2`)."""
    return isinstance(form.first if isinstance(form, LoHa) else form.w2, Tucker2)


def _factored_part(form: LoHa | LoKr) -> bool:
    """Whether `form` has a part that PEFT builds as a Tucker chain under
    `use_effective_conv2d` (both LoHa halves; a factored LoKr `w2`)."""
    return isinstance(form, LoHa) or not isinstance(form.w2, torch.Tensor)


def _effective(layers: Mapping[str, LoHa | LoKr]) -> bool:
    """`use_effective_conv2d`: set where some layer has Tucker chains on a kernel beyond 1×1
    and every such convolution's factored parts are Tucker chains (PEFT builds them so for
    every one); else the chains are folded into plain factors, exactly."""
    on_kernel = [f for f in layers.values() if _kernel_beyond_one(f.shape) and _factored_part(f)]
    return bool(on_kernel) and all(_tucker_part(f) for f in on_kernel)


def _plain_forms(adapter: Adapter, kind: str, first: str) -> dict[str, LoHa | LoKr]:
    """The layers of `adapter`, all of PEFT adapter type `kind` (that of layer `first`), on
    modules PEFT can give them (`nn.Linear`, `Conv1d`, `Conv2d`), or `ConversionError`
    naming one that is not (a `Full` one with `common.full_refusal`)."""
    layers = {}
    for name, form in adapter.items():
        if isinstance(form, Full):
            raise ConversionError(full_refusal(name, form, "PEFT"))
        if not isinstance(form, TYPES[kind]):
            raise ConversionError(
                f"layer {name!r} is a {form_name(form)}, but {first!r} makes this a PEFT "
                f"{kind} adapter: a PEFT folder holds one adapter type; pass a rank to make "
                "every layer a LoRA (truncated SVD), or write lycoris"
            )
        if isinstance(form, LoKr) and isinstance(form.w2, torch.Tensor) and form.w2.ndim == 3:
            raise ConversionError(f"layer {name!r} is {_CONV1D_DENSE_W2}; write lycoris")
        if len(form.shape) > 4:
            raise ConversionError(f"layer {name!r} has a 3-D kernel: PEFT's {kind} adapters "
                                  "have layers for nn.Linear, Conv1d and Conv2d only")  # fmt: skip
        if targets_parameter(name, (*adapter.target_parameters, *adapter.embeddings)):
            raise ConversionError(
                f"layer {name!r} updates a weight as stored (a transformers Conv1D's, an "
                f"embedding table): PEFT's {kind} adapters wrap nn.Linear, Conv1d and Conv2d "
                "modules only; write lycoris"
            )
        layers[name] = form
    return layers


def _dense_rank(form: LoKr, config: Mapping[str, Any]) -> int:
    """The least rank under which PEFT builds both parts of `form` (a LoKr with dense `w1`
    and `w2`, which has none of its own) dense: `r ≥ max(b, d) / 2`, and `r ≥ max(a, c) / 2`
    under `decompose_both`."""
    (a, c), (b, d) = form.w1.shape, form.w2.shape[:2]
    widest = max(b, d, a, c) if config.get("decompose_both", False) else max(b, d)
    return max(1, -(-widest // 2))


def _dense_setting(
    adapter: Adapter, name: str, form: LoKr, config: Mapping[str, Any]
) -> tuple[int, float]:
    """`(r, alpha)` for layer `name`, a LoKr with dense `w1` and `w2`: the file's alpha and
    the rank it stands for where they give the scale and a rank PEFT builds the parts dense
    at (a PEFT file's own), else the least such rank (`_dense_rank`) and its alpha."""
    least = _dense_rank(form, config)
    stored = adapter.alphas.get(name)
    if stored and form.scale and float(stored / form.scale).is_integer():
        rank = int(stored / form.scale)
        if rank >= least and scale_from_alpha(stored, rank) == form.scale:
            return rank, stored
    return least, alpha_from_scale(form.scale, least)


def _lokr_config(layers: Mapping[str, LoKr]) -> dict[str, Any]:
    """`decompose_factor` and `decompose_both` under which PEFT splits every layer's ΔW as
    its `w1` and `w2` do: the first factor that does (-1, then the parts' dimensions), and
    `decompose_both` where some `w1` is factored; `ConversionError` where none does."""
    sizes = sorted({n for f in layers.values() for n in f.w1.shape})
    both = any(isinstance(f.w1, LoRA) for f in layers.values())
    for factor in (-1, *sizes):
        config = {"decompose_factor": factor, "decompose_both": both}
        if all(_split_ok(f, factor) for f in layers.values()):
            return config
    name, form = next((n, f) for n, f in layers.items() if not _split_ok(f, -1))
    (a, c), (b, d) = form.w1.shape, form.w2.shape[:2]
    raise ConversionError(
        f"layer {name!r} splits out {form.shape[0]} = {a}·{b} and in {form.shape[1]} = "
        f"{c}·{d}, and PEFT splits every LoKr layer by one decompose_factor, none of which "
        "gives this adapter's splits (LyCORIS orders a split by a factor small first, PEFT "
        "does not); write lycoris"
    )


def _split_ok(form: LoKr, factor: int) -> bool:
    (a, c), (b, d) = form.w1.shape, form.w2.shape[:2]
    return (factorization(form.shape[0], factor) == (a, b)
            and factorization(form.shape[1], factor) == (c, d))  # fmt: skip


def _settings(layers: Mapping[str, Factors], ranks: Mapping[str, int],
              alphas: Mapping[str, float]) -> dict[str, Any]:  # fmt: skip
    """`r`, `alpha` (the most common values), and `rank_pattern` / `alpha_pattern` for the
    other modules, exact (escaped, anchored) where a plain name would match others too."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"r": rank, "alpha": json_number(alpha)}
    for key in (str, exact_pattern):
        config["rank_pattern"] = {key(n): r for n, r in ranks.items() if r != rank}
        config["alpha_pattern"] = {key(n): json_number(a) for n, a in alphas.items()
                                   if a != alpha}  # fmt: skip
        if all(module_settings(config, n, "config") == (ranks[n], alphas[n]) for n in layers):
            break
    return config


def _stored_parts(form: LoHa | LoKr) -> dict[str, torch.Tensor]:
    """The PEFT parts of one layer: LyCORIS' (`kohya`), a `Conv1d`'s Tucker core as PEFT
    builds it, `(r, r, k, 1)`."""
    parts = lycoris_parts(form)
    for core in _CORES:
        if core in parts and parts[core].ndim == 3:
            parts[core] = parts[core].unsqueeze(-1)
    return parts


def write(adapter: Adapter, out: Path, staging: Staging) -> list[Path]:
    """Stage a PEFT LoHa or LoKr folder `out` for `adapter` (plain module paths), whose layers
    are all LoHa or all LoKr; `ConversionError` for a layer PEFT cannot build as it is."""
    first = next(n for n, f in adapter.items() if isinstance(f, (LoHa, LoKr)))
    kind = "LOHA" if isinstance(adapter[first], LoHa) else "LOKR"
    layers = _plain_forms(adapter, kind, first)
    effective = _effective(layers)
    # Tucker chains stay only on kernels beyond 1×1 under use_effective_conv2d
    layers = {n: f if effective and _kernel_beyond_one(f.shape) else _folded(f)
              for n, f in layers.items()}  # fmt: skip
    config: dict[str, Any] = {"peft_type": kind, "use_effective_conv2d": effective}
    if kind == "LOKR":
        config.update(_lokr_config(layers))  # type: ignore[arg-type]
    ranks, alphas = {}, {}
    for name, form in layers.items():
        if form.rank is None:  # dense w1 and w2: any rank PEFT builds them dense at
            ranks[name], alphas[name] = _dense_setting(adapter, name, form, config)
        else:
            ranks[name] = form.rank
            alphas[name] = adapter.alpha(name, form, rslora=False)  # type: ignore[assignment]
        if isinstance(form, LoKr) and (why := _lokr_mismatch(form, ranks[name], config)):
            raise ConversionError(f"layer {name!r}: {why}, so PEFT would not load it; write "
                                  "lycoris")  # fmt: skip
    tensors = {}
    for name, form in layers.items():
        parts = build(out, name, lambda f=form: _stored_parts(f))
        tensors.update({f"{PREFIX}{name}.{part}": t for part, t in parts.items()})
    tensors.update(saved_tensors(adapter.base_weights, layers))
    config.update(_settings(layers, ranks, alphas))
    config.update({"target_modules": sorted(layers), "rank_dropout": 0.0, "module_dropout": 0.0,
                   "init_weights": True, "inference_mode": True})  # fmt: skip
    # a LoRA's input dropout, which LoHa and LoKr configs have no field for
    kept = {k: v for k, v in adapter.model.items() if k != "lora_dropout"}
    config = {**kept, **config}
    require_adaptable(config, list(layers), ())
    folder = staging.folder(out)
    weights, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    save_small(staging, tensors, weights, {"format": "pt"})
    with staging.writing(config_path) as temp:
        temp.write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    return [weights, config_path]
