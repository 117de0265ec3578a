"""PEFT LoRA adapters: a folder with `adapter_config.json` and `adapter_model.safetensors`.

Keys are `base_model.model.<module>.lora_A.weight` (`down (r, in, *k)`) and `.lora_B.weight`
(`up (out, r, 1…)`); on an `nn.Embedding`, `.lora_embedding_A (r, num_embeddings)` and
`.lora_embedding_B (embedding_dim, r)`, read as the LoRA of the table as stored
(`Adapter.embeddings`). Whole base weights and biases PEFT saves beside them (`SAVED_KEY`:
saved embeddings, `modules_to_save`, `bias`) are read into `Adapter.base_weights` and
written back the same way. PEFT's LoHa and LoKr types are
`peft_lycoris`'s. The config gives each module's rank and alpha: `r` and `lora_alpha`,
overridden by the first key of `rank_pattern` / `alpha_pattern` that matches the module
(the regular expression `(.*\\.)?(<key>)$` against its name), and `use_rslora` (scale
`alpha / sqrt(r)` instead of `alpha / r`). PEFT runs the LoRA of a transformers `Conv1D`
(GPT-2's layers, weights stored `(in, out)`) transposed whatever `fan_in_fan_out` says, and
that of an `nn.Linear` as it is; the reader keeps the factors as stored and the flag
(`Adapter.fan_in_fan_out`), and resolving against a base that tells the module types
transposes the `Conv1D` layers (`layouts.transposed_layers`); a folder lowrank writes lists
its `Conv1D`s in the safetensors metadata `lowrank_conv1d`, by which the reader does so
without a base (`recorded_conv1d`; PEFT ignores the metadata). PEFT gives a module a LoRA
layer only where `target_modules`, `exclude_modules` and `layers_to_transform` select it
(`selection`), and skips the keys of any other; the reader refuses such keys rather than
apply what PEFT would not. With `lora_bias`, a module's `….lora_B.bias (out,)` is the layer
`<module>.bias`, a `Full` form at the LoRA's scale (PEFT adds `scale · lora_B.bias` to the
bias), and such layers beside a module's LoRA are written back so (`_bias_tensors`).
`modules_to_save`, with the heads PEFT adds for a classification `task_type`
(`TASK_HEADS`), names the modules PEFT loads whole from the file and gives no LoRA layer
(`saved_modules`, `_whole`). The config helpers here serve the diffusers format too, which
stores the same settings per pipeline component (diffusers adapts the modules its keys
name, whatever they say).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ... import _regex
from ..._checks import require_finite, require_ndim, require_regex
from ...errors import ConversionError, FileFormatError, ShapeError
from ...forms import DoRA, Full, LoRA, scale_from_alpha, update_of
from ..adapter import MODEL_FIELDS, Adapter, form_name, saved_module_regex
from ..files import Staging, pickle_refusal, read_json, require_safetensors, save_small
from ..names import BIAS, layer_parameter, targets_parameter
from . import dora
from .common import (
    CONV1D_KEY,
    adapter_tensors,
    build,
    lora_only,
    recorded_list,
    stored_difference,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
EMBEDDING_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_embedding_(?P<part>[AB])$")
"""The factors of an `nn.Embedding`'s LoRA: `lora_embedding_A (r, num_embeddings)`,
`lora_embedding_B (embedding_dim, r)`; PEFT adds `ΔW = scale · (B A)ᵀ` to the table."""
EMBEDDING_PARTS = ("lora_embedding_A", "lora_embedding_B")
BIAS_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_B\.bias$")
"""A `lora_bias` adapter's bias on `lora_B`: PEFT adds `scale · lora_B.bias` to the module's
bias."""
SAVED_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+?)(?P<wrapped>\.base_layer)?\.(?P<parameter>weight|bias)$"
)
"""A whole base tensor PEFT saves beside the factors, which it loads in place of the base's
(`Adapter.base_weights`): the input and output embeddings (`save_embedding_layers`, where
`target_modules` names `embed_tokens` / `lm_head`, or where the vocabulary was resized),
the weights and biases of `modules_to_save` modules (the trained copy, keyed as the module
itself), trained biases (`bias="all"` or `"lora_only"`): `<module>.base_layer.<parameter>`
of a module with LoRA factors, `<module>.<parameter>` of another."""
WRAPPER_COPY = re.compile(r"^(?P<module>.+?)\.(?:modules_to_save|original_module)(?:\..+)?$")
"""A module path inside PEFT's wrapper of a `modules_to_save` module: `bias="all"` saves the
biases of its trained copy and of the original under these paths too, which PEFT's load
puts in no module it runs (the copy's are loaded from `<module>.bias`)."""
_UNSUPPORTED = {
    "layer_replication": "layer_replication (layers duplicated at load, keyed by new indices)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens: the update applies only after "
    "an invocation token, so it has no merged form)",
    "use_bdlora": "block-diagonal LoRA factors (use_bdlora)",
    "use_qalora": "QA-LoRA (use_qalora: pooled input features)",
    "arrow_config": "Arrow routing between adapters (arrow_config)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "kasa_config": "KaSA (kasa_config: ΔW = B·diag(lora_diag)·A over a base PEFT truncates to "
    "its largest singular components when it loads the adapter)",
    "velora_config": "VeLoRA (velora_config: a projection, lora_velora_embed, kept for training "
    "beside the factors)",
    "monteclora_config": "MonteCLoRA (monteclora_config: a sampler of perturbations of lora_A, "
    "lora_monteclora_sampler.*, beside the factors)",
}
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}  # fmt: skip
"""The modules PEFT adds to `modules_to_save` by itself for a `task_type` (its
`PeftModelFor…` classes) when it builds or loads the adapter, whatever the config lists:
it loads their trained copies from the file (and fails where one is missing). For
`SEQ_CLS` and `TOKEN_CLS` it adds them before it places the LoRA layers, so that no LoRA
layer goes in or under them (`_whole`); for `QUESTION_ANS` after."""
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
"""`init_lora_weights` values whose adapters PEFT applies to a rewritten base: W − B₀A₀ (or
LoftQ's quantised W), made again when it loads them, not the base checkpoint."""

_UNSUPPORTED_KEYS = (
    (re.compile(r"\.lora_embedding_[AB]$"), "LoRA on an embedding (lora_embedding_A/B)"),
    (re.compile(r"\.lora_magnitude_vector$"), "DoRA's magnitude (lora_magnitude_vector)"),
    (re.compile(r"\.lora_diag$"), "KaSA's singular values (lora_diag)"),
    (re.compile(r"\.lora_velora_embed$"), "VeLoRA's projection (lora_velora_embed)"),
    (re.compile(r"\.lora_monteclora_sampler\."), "MonteCLoRA's sampler (lora_monteclora_sampler)"),
    (re.compile(r"\.base_layer\.(weight|bias)$"), "a saved base tensor (save_embedding_layers, "
     "bias='all' or 'lora_only') of a module with no LoRA factors"),
    (re.compile(r"\.lora_B\.bias$"), "a bias on lora_B (lora_bias)"),
    (re.compile(r"\.(running_mean|running_var|num_batches_tracked)$"), "a batch norm's running "
     "statistics (of a modules_to_save module; only weights and biases are read)"),
)


def require_supported_keys(others: Sequence[str], weights: Path) -> None:
    """`FileFormatError` naming the first of `others` (keys of `weights` that are no LoRA
    factor) that holds a feature lowrank does not support (`_UNSUPPORTED_KEYS`: the likeliest
    cause first), naming the feature."""
    for pattern, what in _UNSUPPORTED_KEYS:
        for key in others:
            if pattern.search(key):
                raise FileFormatError(
                    f"{weights}: key {key!r} is {what}, which lowrank's file tools do not support"
                )


def unsupported_key(key: str) -> bool:
    """Whether `key` holds a feature lowrank does not support (`_UNSUPPORTED_KEYS`)."""
    return any(pattern.search(key) for pattern, _ in _UNSUPPORTED_KEYS)


def _key_regex(key: str) -> str:
    """The regex PEFT matches a `rank_pattern` / `alpha_pattern` key by (with `re.match`)."""
    return rf"(.*\.)?({key})$"


def _literal(key: str) -> tuple[str, bool] | None:
    """`lowrank._regex.literal` of `key` where its regex `_key_regex(key)` is one and holds
    it as a group: None for a key valid alone but not there (`(?s)abc`: global flags not at
    the start, an error) or valid there only (`a)|(b`, closing the group): run as regexes,
    refused or matched as `re` does."""
    try:
        _regex.literal(_key_regex(key))  # only to parse it: RegexError where it is no regex
        return _regex.literal(key)
    except _regex.RegexError:
        return None


@functools.lru_cache(maxsize=16)
def _pattern_keys(
    keys: tuple[str, ...],
) -> tuple[dict[str, int], dict[str, int], tuple[int, ...], tuple[str, ...]]:
    """`keys` (`rank_pattern` / `alpha_pattern` keys, in order) sorted for `pattern_key`:
    `{text: first index}` of the literal ones (`lowrank._regex.literal`: a module name,
    escaped or not) matched at a dotted suffix, of those anchored at the name's start
    (`^…`), and the indices of the others, regexes matched as such, and their regexes
    (`_key_regex`)."""
    suffixes: dict[str, int] = {}
    whole: dict[str, int] = {}
    others = []
    for i, key in enumerate(keys):
        found = _literal(key)
        if found is None:
            others.append(i)
        else:
            (whole if found[1] else suffixes).setdefault(found[0], i)
    return suffixes, whole, tuple(others), tuple(_key_regex(keys[i]) for i in others)


def pattern_key(patterns: Mapping[str, Any], name: str, source: object) -> str | None:
    """The first key of `patterns` whose regex `(.*\\.)?(key)$` matches module `name` (as
    `re.match` would). A literal key `L` matches where `name` is `L` or ends in `.L`, with
    no newline before that dot (`.*` crosses none), or is `L` anchored (`^L`), `$` also
    before a final newline: looked up by the name's dotted suffixes; the other keys run as
    one automaton (`lowrank._regex.first_match`)."""
    keys = tuple(patterns)
    try:
        suffixes, whole, others, regexes = _pattern_keys(keys)
        first = _regex.first_match(regexes, name)
    except _regex.RegexError:
        for key in keys:  # the key at fault
            try:
                _regex.compiled(_key_regex(key))
            except _regex.RegexError as err:
                raise FileFormatError(f"{source}: pattern {key!r} {err}") from None
        raise
    found = [] if first is None else [others[first]]
    if not suffixes and not whole:
        return None if first is None else keys[found[0]]
    for text in {name, name[:-1]} if name.endswith("\n") else {name}:
        found += [whole[text]] if text in whole else []
        starts = [0] + [i + 1 for i, char in enumerate(text) if char == "."]
        newline = text.find("\n")
        for start in starts:
            if newline != -1 and newline < start:
                break  # `(.*\\.)?` reaches no further
            if text[start:] in suffixes:
                found.append(suffixes[text[start:]])
    return keys[min(found)] if found else None


def _require_setting(source: object, key: str, value: object, *, whole: bool) -> None:
    """`FileFormatError` naming `key` unless `value` is a number (a whole one for a rank:
    `int()` would truncate 2.5 to 2)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FileFormatError(f"{source}: {key} must be a number, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # a JSON integer beyond any float
        finite = False
    if not finite:
        shown = repr(value) if isinstance(value, float) else "an integer beyond any float"
        raise FileFormatError(f"{source}: {key} must be a finite number, got {shown}")
    if whole and not float(value).is_integer():
        raise FileFormatError(f"{source}: {key} must be a whole number, got {value!r}")


def check_config(config: object, source: object) -> dict[str, Any]:
    """`config` as a dict of LoRA settings PEFT would accept, or `FileFormatError`."""
    if not isinstance(config, dict):
        raise FileFormatError(f"{source} must hold a JSON object of LoRA settings")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise FileFormatError(
            f"{source} is a PEFT {kind} adapter; lowrank reads LORA, LOHA and LOKR adapters"
        )
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise FileFormatError(f"{source} uses {what}, which lowrank does not support")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().partition("_niter_")[0] in _RESIDUAL_INITS:
        raise FileFormatError(
            f"{source}: init_lora_weights={init!r} adapters apply to the base PEFT rewrites when "
            "it loads them (W − B₀A₀), not to the base checkpoint; convert it to a plain LoRA "
            "with PEFT first (save_pretrained(..., path_initial_model_for_weight_conversion=…))"
        )
    for key in ("r", "lora_alpha"):
        _require_setting(source, key, config.get(key, 8), whole=key == "r")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise FileFormatError(f"{source}: {key} must be an object, got {config[key]!r}")
        for pattern, value in patterns.items():
            _require_setting(source, f"{key}[{pattern!r}]", value, whole=key == "rank_pattern")
    for key in ("use_rslora", "fan_in_fan_out", "lora_bias", "use_dora"):
        if not isinstance(config.get(key, False), bool):
            raise FileFormatError(f"{source}: {key} must be true or false, got {config[key]!r}")
    if config.get("lora_bias") and config.get("use_dora"):
        raise FileFormatError(f"{source} sets both lora_bias and use_dora, which PEFT refuses")
    _check_selection(config, source)
    check_model_fields(config, source)
    parameters = config.get("target_parameters") or []
    if not isinstance(parameters, list) or not all(isinstance(p, str) for p in parameters):
        raise FileFormatError(f"{source}: target_parameters must be a list of parameter names")
    others = [p for p in parameters if p.rpartition(".")[2] != "weight"]
    if others:
        raise FileFormatError(
            f"{source}: target_parameters {others[:3]} name parameters other than a module's "
            "weight (an MoE expert tensor, say), which lowrank does not support"
        )
    return config


def _check_selection(config: Mapping[str, Any], source: object) -> None:
    """`FileFormatError` unless the fields selecting modules are ones `LoraConfig` accepts:
    `target_modules` / `exclude_modules` a list of names or one regex, `layers_to_transform`
    an index or a list of them, `layers_pattern` a name (a regex) or a list of them, and the
    last two neither beside a regex `target_modules` nor `layers_pattern` alone, and
    `modules_to_save` a list of names."""
    saved = config.get("modules_to_save")
    if saved is not None and not (
        isinstance(saved, list) and all(isinstance(name, str) for name in saved)
    ):
        raise FileFormatError(f"{source}: modules_to_save must be a list of module names, got "
                              f"{saved!r}")  # fmt: skip
    for name in saved or ():  # PEFT keeps LoRA layers out of them by a regex of each (`_whole`)
        require_regex(f"{source}: modules_to_save", name, FileFormatError, saved_module_regex(name))
    for key in ("rank_pattern", "alpha_pattern"):  # checked to be objects by the caller
        for pattern in config.get(key) or {}:
            require_regex(f"{source}: {key} key", pattern, FileFormatError, _key_regex(pattern))
    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        value = config.get(key)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            patterns = value if key == "layers_pattern" else []  # names, matched as such
        elif isinstance(value, str):
            patterns = [value]
        elif value is None:
            patterns = []
        else:
            raise FileFormatError(f"{source}: {key} must be a name, a list of names or null")
        for pattern in patterns:
            layers = key == "layers_pattern"
            regex = _layer_regex(pattern) if layers else pattern
            require_regex(f"{source}: {key}", pattern, FileFormatError, regex, layer_index=layers)
    layers = config.get("layers_to_transform")
    indices = layers if isinstance(layers, list) else [] if layers is None else [layers]
    if any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
        raise FileFormatError(
            f"{source}: layers_to_transform must be a layer index or a list of them"
        )
    if isinstance(config.get("target_modules"), str):
        for key in ("layers_to_transform", "layers_pattern"):
            if config.get(key) is not None:
                raise FileFormatError(
                    f"{source}: {key} beside a regex target_modules, which PEFT refuses"
                )
    if config.get("layers_pattern") and layers is None:
        raise FileFormatError(
            f"{source}: layers_pattern without layers_to_transform, which PEFT refuses"
        )


def check_model_fields(config: Mapping[str, Any], source: object) -> None:
    """`FileFormatError` naming the field unless the fields kept as `Adapter.model`
    (`model_fields`) that lowrank uses hold what PEFT takes: `task_type` a name or null
    (it looks up the heads PEFT adds, `TASK_HEADS`), `lora_dropout` a number below 1 or
    null (PEFT gives a LoRA no dropout at 0 or below, `model_fields` keeps such as 0; at 1
    it would zero every input of the adapters, which then never trained)."""
    task = config.get("task_type")
    if task is not None and not isinstance(task, str):
        raise FileFormatError(f"{source}: task_type must be a name or null, got {task!r}")
    dropout = config.get("lora_dropout")
    if dropout is not None:
        _require_setting(source, "lora_dropout", dropout, whole=False)
        if not dropout < 1:
            raise FileFormatError(f"{source}: lora_dropout must be below 1, got {dropout!r}")


def _named(names: str | Sequence[str], module: str) -> bool:
    """Whether `names` picks `module` as PEFT matches `target_modules` / `exclude_modules`:
    a string is a regex for the whole name, a list holds names, each matching the whole
    name or a suffix of dotted components."""
    if isinstance(names, str):
        return _regex.fullmatch(names, module)
    return module in names or any(module.endswith(f".{name}") for name in names)


def _layer_regex(pattern: str) -> str:
    """PEFT's regex for the index after a component `layers_pattern` names (a regex)."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def _layer_index(module: str, patterns: str | Sequence[str] | None, source: object) -> int | None:
    """The layer index in `module`'s name as PEFT finds it for `layers_to_transform`: the
    number after the first component named by `layers_pattern` (any component with a
    component before it, without one), followed by a further component; `None` if none.
    `FileFormatError` naming `source` where a pattern can end at two places in the name,
    each followed by a different index (`lowrank._regex.layer_index`)."""
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        return None if found is None else int(found["idx"])
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        try:
            index = _regex.layer_index(_layer_regex(pattern), module)
        except _regex.RegexError as err:
            raise FileFormatError(f"{source}: layers_pattern {pattern!r} {err}") from None
        if index is not None:
            return index
    return None


def saved_modules(config: Mapping[str, Any]) -> list[str]:
    """The names of the modules PEFT loads whole from the adapter (matched as name suffixes):
    the config's `modules_to_save` and the heads PEFT adds for its `task_type`
    (`TASK_HEADS`)."""
    names = list(config.get("modules_to_save") or [])
    heads = TASK_HEADS.get(config.get("task_type"), ())  # type: ignore[arg-type]
    return names + [head for head in heads if head not in names]


def model_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config's fields kept as `Adapter.model` (`MODEL_FIELDS`), `modules_to_save` as
    PEFT completes it (`saved_modules`), so written configs state every module PEFT
    loads whole."""
    fields = {k: config[k] for k, kind in MODEL_FIELDS.items() if isinstance(config.get(k), kind)}
    if "lora_dropout" in fields:  # PEFT drops nothing at 0 or below
        fields["lora_dropout"] = max(0.0, fields["lora_dropout"])
    saved = saved_modules(config)
    if saved:
        fields["modules_to_save"] = saved
    return fields


def _whole(config: Mapping[str, Any], module: str) -> bool:
    """Whether `module` is, or lies inside, a module PEFT trains whole, which it keeps from
    every LoRA layer: one named by `modules_to_save` or a `SEQ_CLS` / `TOKEN_CLS` head
    (`TASK_HEADS`), each a regex for a whole dotted component path of the name."""
    names = list(config.get("modules_to_save") or [])
    if config.get("task_type") in ("SEQ_CLS", "TOKEN_CLS"):
        names += TASK_HEADS[config["task_type"]]
    return any(_regex.match(saved_module_regex(name), module) for name in names)


def require_adaptable(
    config: Mapping[str, Any], layers: Sequence[str], parameters: Sequence[str]
) -> None:
    """`ConversionError` naming the first of `layers` (module layers, those in `parameters`
    aside) that a written `config` would leave without a LoRA layer because PEFT trains its
    module whole (`_whole`): PEFT would skip its keys."""
    for name in layers:
        if not targets_parameter(name, parameters) and _whole(config, name):
            names = config.get("modules_to_save")
            raise ConversionError(
                f"layer {name!r} lies in a module PEFT loads whole (modules_to_save={names}, "
                f"task_type={config.get('task_type')!r}), to which PEFT gives no adapter "
                "layer: it would skip the layer's keys; leave the layer or the saved module out"
            )


ALL_LINEAR = "all-linear"
"""The `target_modules` (any case) by which PEFT targets every `nn.Linear` and transformers
`Conv1D` of the model but a transformers model's output layer (`get_output_embeddings()`),
which the file does not record: `Adapter.all_linear`, checked against the base."""


def all_linear(config: Mapping[str, Any]) -> bool:
    """Whether a PEFT config's `target_modules` is `ALL_LINEAR`."""
    targets = config.get("target_modules")
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR


def all_linear_reason(config: Mapping[str, Any]) -> str:
    """Why `"all-linear"` leaves a module out, to end an error naming it (`""` for a config
    of other `target_modules`)."""
    if not all_linear(config):
        return ""
    return (
        " (PEFT's all-linear takes nn.Linear and Conv1D layers, and other modules only where "
        "their name ends in '.<a linear layer's name>')"
    )


def selection(
    config: Mapping[str, Any], module: str, linear: bool = True, source: object = "config"
) -> str | None:
    """The config field that leaves `module` (a name after `base_model.model.`) without a
    LoRA layer when PEFT loads the adapter, or `None` if PEFT adapts it; `linear` says that
    its factors are those of a linear layer (not a convolution's nor an embedding table's);
    `source` names the config in errors.

    The rules are PEFT's: `exclude_modules` drops a module first, and `modules_to_save`
    (with the heads PEFT adds for a `SEQ_CLS` / `TOKEN_CLS` task) every module in a module
    it trains whole (`_whole`); then `target_modules`
    picks it (a regex: the whole name; a list: the whole name, or a dotted suffix, which
    `layers_to_transform` then restricts to the layers it lists). `"all-linear"`
    (`ALL_LINEAR`) picks every linear layer here, and PEFT turns it into the linear layers'
    names, which it matches as dotted suffixes: another module (a convolution, a table) with
    a dot in its name it may pick, a linear layer being named as that suffix, and the output
    layer of a transformers model (`get_output_embeddings()`) it leaves out: only the base
    tells those (`Adapter.all_linear`). A missing
    `target_modules` depends on the model type the file does not record, so it picks every
    module (`layers_to_transform` still restricting it, as PEFT fills it with names to match
    as suffixes). Weights in `target_parameters` are PEFT's parameter targets, which these
    fields do not select.
    """
    parameters = config.get("target_parameters") or ()
    if targets_parameter(module, parameters):
        return None
    excluded = config.get("exclude_modules")
    if excluded and _named(excluded, module):
        return "exclude_modules"
    if _whole(config, module):
        return "modules_to_save"
    targets = config.get("target_modules")
    if all_linear(config):  # another module only by a linear layer's name as its suffix
        return None if linear or "." in module else "target_modules"
    if isinstance(targets, str):
        return None if _named(targets, module) else "target_modules"
    if targets is not None:
        if module in targets:
            return None
        if not _named(targets, module):
            return "target_modules"
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return None
    index = _layer_index(module, config.get("layers_pattern"), source)
    wanted = layers if isinstance(layers, list) else [layers]
    return None if index in wanted else "layers_to_transform"


def pattern_name(layer: str, parameters: Sequence[str]) -> str:
    """The name `rank_pattern` / `alpha_pattern` keys match for `layer`: its weight's
    (`<layer>.weight`) where that is a parameter target, as PEFT looks them up, else its own."""
    return f"{layer}.weight" if targets_parameter(layer, parameters) else layer


def module_settings(
    config: Mapping[str, Any], name: str, source: object, alpha_field: str = "lora_alpha"
) -> tuple[int, float]:
    """`(r, alpha)` of module `name` under a PEFT config: `rank_pattern` / `alpha_pattern`
    where a key matches it, else `r` and `alpha_field` (`lora_alpha` for LoRA, `alpha` for
    PEFT's LoHa and LoKr)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank_key = pattern_key(rank_pattern, name, source)
    alpha_key = pattern_key(alpha_pattern, name, source)
    rank = rank_pattern[rank_key] if rank_key is not None else config.get("r", 8)
    alpha = alpha_pattern[alpha_key] if alpha_key is not None else config.get(alpha_field, 8)
    return int(rank), float(alpha)


def lora_layers(
    tensors: Mapping[str, Any],
    modules: Mapping[str, str],
    config: Mapping[str, Any] | None,
    source: Path,
    parts: tuple[str, str] = ("lora_A.weight", "lora_B.weight"),
) -> tuple[dict[str, LoRA], dict[str, float]]:
    """LoRA forms and alphas, keyed by layer, from the `<layer>.lora_A.weight` and
    `<layer>.lora_B.weight` tensors (`parts`: other names of down and up); `modules` maps
    each layer to the module name the config's patterns match. Without a config, alpha is
    the rank (scale 1), as diffusers assumes."""
    rslora = bool(config and config.get("use_rslora", False))
    layers, alphas = {}, {}
    for layer, module in modules.items():
        down = tensors.get(f"{layer}.{parts[0]}")
        up = tensors.get(f"{layer}.{parts[1]}")
        if down is None or up is None:
            part = parts[0] if down is None else parts[1]
            raise FileFormatError(f"{source}: layer {layer!r} has no {part}")
        rank = down.shape[0] if down.ndim else 0
        if down.ndim > 2 and up.ndim == down.ndim and 0 < up.shape[1] < rank:
            raise FileFormatError(
                f"{source}: layer {layer!r} has a lora_B {tuple(up.shape)} over fewer channels "
                f"than lora_A's {rank} rows: PEFT's LoRA on a grouped convolution (a lora_A "
                "over all input channels, a grouped lora_B, which PEFT itself does not merge), "
                "which lowrank's file tools do not support"
            )
        if config is None:
            alpha = float(rank)
        else:
            expected, alpha = module_settings(config, module, source)
            if expected != rank:
                raise FileFormatError(
                    f"{source}: the config gives module {module!r} rank {expected}, but "
                    f"{layer}.{parts[0]} has shape {tuple(down.shape)} (rank {rank})"
                )
        scale = build(source, layer, lambda a=alpha, r=rank: scale_from_alpha(a, r, rslora=rslora))
        layers[layer] = build(source, layer, lambda d=down, u=up, s=scale: LoRA(d, u, s))
        alphas[layer] = alpha
    return layers, alphas


def read(path: Path) -> Adapter:
    """A PEFT adapter folder (or its `adapter_model.safetensors`) as an `Adapter`."""
    folder = path if path.is_dir() else path.parent
    pickled = folder / PICKLED_WEIGHTS_NAME
    if path.is_dir() and not (folder / WEIGHTS_NAME).exists() and pickled.is_file():
        raise pickle_refusal(pickled)  # what older PEFT saved by default
    weights = require_safetensors(folder / WEIGHTS_NAME if path.is_dir() else path)
    config_path = folder / CONFIG_NAME
    if config_path.exists() and not config_path.is_file():
        raise FileFormatError(f"{config_path} is not a regular file; expected a PEFT config")
    if not config_path.is_file():
        raise FileFormatError(
            f"{weights} looks like PEFT weights, but {config_path} is missing; the config holds "
            "the ranks and alphas"
        )
    config = check_config(read_json(config_path), config_path)
    tensors, metadata = adapter_tensors(weights)
    tensors, magnitudes = dora.magnitudes(tensors, weights)
    biases = {}
    if config.get("lora_bias"):  # else such keys are refused as unsupported, as PEFT skips them
        biases = {m["module"]: key for key in tensors if (m := BIAS_KEY.match(key))}
    factors = [key for key in tensors if KEY.match(key) or EMBEDDING_KEY.match(key)]
    with_factors = {(KEY.match(k) or EMBEDDING_KEY.match(k))["module"] for k in factors}  # type: ignore[index]
    saved, copies = saved_weights(tensors, with_factors, config)
    kept = {*factors, *saved, *copies, *biases.values()}
    others = [key for key in tensors if key not in kept]
    require_supported_keys(others, weights)
    modules, tables = {}, {}
    for key in tensors:
        if key in saved or key in copies or key in biases.values():
            continue
        match = KEY.match(key)
        table = EMBEDDING_KEY.match(key)
        if match is None and table is None:
            raise FileFormatError(
                f"{weights}: key {key!r} is not a LoRA factor (expected "
                f"{PREFIX}<module>.lora_A.weight / .lora_B.weight, or .lora_embedding_A / "
                ".lora_embedding_B of an nn.Embedding)"
            )
        if match is not None:
            modules[PREFIX + match["module"]] = match["module"]
        else:
            tables[PREFIX + table["module"]] = table["module"]  # type: ignore[index]
    both = sorted(set(modules) & set(tables))
    if both:
        raise FileFormatError(
            f"{weights}: module {tables[both[0]]!r} has both lora_A / lora_B and "
            "lora_embedding_A / lora_embedding_B factors; PEFT gives a module one kind"
        )
    # an nn.MultiheadAttention's LoRA: `attn.lora_A` (its in_proj_weight) beside
    # `attn.base_layer.out_proj.lora_A`; a module merely named base_layer has no such parent
    adapted = {*modules.values(), *tables.values()}
    wrapped = [module for module in adapted if module.partition(".base_layer.")[0] in adapted
               and ".base_layer." in module]  # fmt: skip
    if wrapped:
        raise FileFormatError(
            f"{weights}: module {wrapped[0]!r} lies inside a PEFT wrapper (base_layer): PEFT's "
            "LoRA on an nn.MultiheadAttention (its in_proj_weight and base_layer.out_proj), "
            "which lowrank's file tools do not support"
        )
    for module in adapted:
        down = tensors.get(f"{PREFIX}{module}.lora_A.weight")
        linear = module in modules.values() and (down is None or down.ndim <= 2)
        field = selection(config, module, linear, config_path)
        if field is not None and config.get("ensure_weight_tying"):
            raise FileFormatError(
                f"{weights}: module {module!r} has LoRA factors its config does not target: "
                f"with ensure_weight_tying PEFT ties them to those of the layer tied to it (an "
                "LM head's to the input embedding's), one update of the weight they share, "
                "which lowrank's file tools do not support"
            )
        if field is not None:
            shown = {"layers_to_transform": (field, "layers_pattern"),
                     "modules_to_save": (field, "task_type")}.get(field, (field,))  # fmt: skip
            values = ", ".join(f"{k}={config[k]!r}" for k in shown if config.get(k) is not None)
            raise FileFormatError(
                f"{weights}: module {module!r} has LoRA factors, but {config_path}'s {field} "
                f"leaves it out ({values}){all_linear_reason(config)}: PEFT would give it no "
                "LoRA layer and skip its keys when it loads the adapter"
            )
    parameters = config.get("target_parameters") or ()
    keyed = {layer: pattern_name(module, parameters) for layer, module in modules.items()}
    layers, alphas = lora_layers(tensors, keyed, config, weights)
    # PEFT's ΔW of the table is scale · (B A)ᵀ: the LoRA of A (r, num_embeddings) and
    # B (embedding_dim, r), transposed, is that of the table as stored
    embedded, table_alphas = lora_layers(tensors, tables, config, weights, EMBEDDING_PARTS)
    layers.update({k: form.transposed() for k, form in embedded.items()})
    alphas.update(table_alphas)
    layers = dora.with_magnitudes(layers, magnitudes, bool(config.get("use_dora")), weights)
    named = {**modules, **tables}
    found = {named[k]: form for k, form in layers.items()}
    lora = {modules[k]: form for k, form in layers.items() if k in modules}
    found.update(_bias_layers(biases, lora, tensors, parameters, weights))
    parameters, transposed, conv1d = tuple(parameters), config.get("fan_in_fan_out", False), ()
    if CONV1D_KEY in metadata:  # the file tells its Conv1Ds, as a base would
        found, parameters, conv1d = recorded_conv1d(found, tables.values(), parameters,
                                                    metadata, weights)  # fmt: skip
        transposed = False
    return Adapter(
        found,
        "peft",
        alphas={named[k]: alpha for k, alpha in alphas.items()},
        rslora=bool(config.get("use_rslora", False)),
        metadata=metadata,
        source=path,
        target_parameters=parameters,
        fan_in_fan_out=transposed,
        conv1d=conv1d,
        model=model_fields(config),
        embeddings=tuple(sorted(f"{module}.weight" for module in tables.values())),
        base_weights={module: tensors[key] for key, module in saved.items()},
        all_linear=all_linear(config),
    )


def recorded_conv1d(
    layers: Mapping[str, Any],
    tables: Iterable[str],
    parameters: Sequence[str],
    metadata: Mapping[str, str],
    source: Path,
) -> tuple[dict[str, Any], tuple[str, ...], tuple[str, ...]]:
    """`(layers, target_parameters, conv1d)` of a PEFT file whose metadata lists the weights
    of its transformers `Conv1D`s (`CONV1D_KEY`, `<module>.weight`, as lowrank writes it):
    each listed module LoRA (`lora_A (r, in)`, `lora_B (out, r)`, which PEFT runs
    transposed on a `Conv1D` whatever `fan_in_fan_out` says) becomes the LoRA of the weight
    as stored, `(in, out)` (`up = Aᵀ`, `down = Bᵀ`; a DoRA's magnitude per column), its
    weight a parameter target, as resolving against a base that tells the module types
    makes it; listed parameter targets stay so. The listed weights are `conv1d`. A listed
    name that is no layer's weight in the file (`layers`: by module; `tables`: the modules
    of `nn.Embedding` LoRAs), or whose layer is no linear LoRA (or DoRA of one), is a
    `FileFormatError` naming `source` and the key."""
    listed = recorded_list(metadata, source, CONV1D_KEY)
    found, moved = dict(layers), []
    for name in sorted(set(listed)):
        module = name.removesuffix(".weight")
        where = f"{source}: metadata {CONV1D_KEY} lists {name!r}"
        if module == name or module not in found:
            raise FileFormatError(
                f"{where}, which is no weight of a layer in the file (expected "
                "<module>.weight of a module with LoRA factors)"
            )
        form, update = found[module], update_of(found[module])
        if module in tables or not isinstance(update, LoRA) or update.down.ndim != 2:
            what = ("an nn.Embedding's LoRA (lora_embedding_A / _B)" if module in tables
                    else f"a {form_name(form)} of ΔW shape {tuple(form.shape)}")  # fmt: skip
            raise FileFormatError(
                f"{where} as a transformers Conv1D's weight, but its layer is {what}, where a "
                "Conv1D's is the LoRA of a 2-D weight"
            )
        if not targets_parameter(module, parameters):
            found[module] = form.transposed()
            moved.append(name)
    return found, (*parameters, *moved), tuple(sorted(set(listed)))


def _bias_layers(
    biases: Mapping[str, str],
    layers: Mapping[str, Any],
    tensors: Mapping[str, Any],
    parameters: Sequence[str],
    source: Path,
) -> dict[str, Full]:
    """The layers `<module>.bias` of a `lora_bias` adapter: `Full(lora_B.bias, scale)` at the
    scale of the module's LoRA, as PEFT adds `scale · lora_B.bias` to the bias (`biases`:
    module → its key). A bias without the module's LoRA, on a parameter target (PEFT has no
    bias there) or not 1-D is a `FileFormatError` / `ShapeError` naming the key."""
    found = {}
    for module, key in biases.items():
        layer = layers.get(module)
        if layer is None or targets_parameter(module, parameters):
            why = "a parameter target" if layer is not None else "a module with no LoRA factors"
            raise FileFormatError(f"{source}: key {key!r} is a lora_B bias of {why}")
        require_ndim(f"{source}: {key}", tensors[key], (1,), "(out,)")
        found[module + BIAS] = build(source, key, lambda b=tensors[key], s=layer.scale: Full(b, s))
    return found


def saved_weights(
    tensors: Mapping[str, Any], modules: set[str], config: Mapping[str, Any]
) -> tuple[dict[str, str], list[str]]:
    """`{key: <module>.<parameter>}` of the whole base tensors among `tensors` (`SAVED_KEY`):
    `<module>.base_layer.<parameter>` of a module among `modules` (those with factors, PEFT's
    LoRA, LoHa or LoKr; not one PEFT trains whole, `_whole`), `<module>.<parameter>` of
    another (other such keys are left for `require_supported_keys`); and the keys of
    tensors inside the wrapper of a module PEFT loads whole (`saved_modules`:
    `modules_to_save`, a task's head; `WRAPPER_COPY`), which PEFT loads into no module it
    runs."""
    names = tuple(saved_modules(config))
    modules = {m for m in modules if not _whole(config, m)}  # PEFT wraps none of those
    saved, copies = {}, []
    for key in tensors:
        found = SAVED_KEY.match(key)
        # LoRA parts (lora_A.weight, lora_B.bias, …) match SAVED_KEY too
        if found is None or any(p.startswith("lora_") for p in found["module"].split(".")):
            continue
        copy = WRAPPER_COPY.match(found["module"])
        if names and copy is not None and copy["module"].endswith(names):
            copies.append(key)
        elif (found["module"] in modules) == bool(found["wrapped"]):
            saved[key] = f"{found['module']}.{found['parameter']}"
    return saved, copies


def saved_tensors(base_weights: Mapping[str, Any], layers: Mapping[str, Any]) -> dict[str, Any]:
    """The keys PEFT saves base tensors under (`SAVED_KEY`), for `Adapter.base_weights`
    (`{<module>.<parameter>: tensor}`): `<module>.base_layer.<parameter>` of a module among
    `layers` (PEFT wraps it), `<module>.<parameter>` of another."""
    found = {}
    for key, tensor in base_weights.items():
        module, _, parameter = key.rpartition(".")
        wrapped = f"{module}.base_layer.{parameter}" if module in layers else key
        found[PREFIX + wrapped] = tensor
    return found


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _exact(name: str) -> str:
    """A pattern key matching module `name` only: escaped, and anchored against suffixes."""
    return "^" + re.escape(name)


def config_for(adapter: Adapter, layers: Mapping[str, LoRA]) -> dict[str, Any]:
    """PEFT LoRA settings under which every layer gets its rank and exactly its scale.

    `r` and `lora_alpha` are the most common values; other modules go in `rank_pattern` /
    `alpha_pattern` under their names (their weights' for parameter targets, `pattern_name`),
    made exact (escaped, anchored) if a plain name would also match another module (`.` is
    a regex wildcard and keys match name suffixes).
    """
    parameters = adapter.target_parameters
    keyed = {name: pattern_name(name, parameters) for name in layers}
    ranks = {keyed[name]: form.rank for name, form in layers.items()}
    alphas = {keyed[name]: float(adapter.alpha(name, form) or 0.0) for name, form in layers.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": _number(alpha),
        "use_rslora": adapter.rslora,
        "target_modules": sorted(n for n in layers if not targets_parameter(n, parameters)),
        "bias": "none",
        "lora_dropout": 0.0,
        # module LoRAs of transformers Conv1Ds (a DoRA's, `dora.peft_split`), which PEFT runs
        # transposed; it sets the flag for every Conv1D and clears it for every nn.Linear
        "fan_in_fan_out": adapter.fan_in_fan_out,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    targeted = [f"{n}.weight" for n in sorted(layers) if targets_parameter(n, parameters)]
    if targeted:
        config["target_parameters"] = targeted
    for key in (str, _exact):
        config["rank_pattern"] = {key(n): r for n, r in ranks.items() if r != rank}
        config["alpha_pattern"] = {key(n): _number(a) for n, a in alphas.items() if a != alpha}
        if all(module_settings(config, n, "config") == (ranks[n], alphas[n]) for n in ranks):
            break
    return config


def _embedding(adapter: Adapter, name: str) -> bool:
    """Whether layer `name` is an `nn.Embedding`'s table LoRA (`Adapter.embeddings`) that is
    no parameter target, which PEFT files hold as `lora_embedding_A` / `_B`."""
    parameters = adapter.target_parameters
    return targets_parameter(name, adapter.embeddings) and not targets_parameter(name, parameters)


def lora_bias_layer(adapter: Adapter, name: str) -> bool:
    """Whether layer `name` is a `Full` difference of the bias of a module that has a layer
    of its own, no DoRA (`<module>.bias` beside `<module>`), which PEFT holds as `lora_bias`
    where that layer is a LoRA (`_bias_tensors`; PEFT refuses `lora_bias` with DoRA)."""
    module, parameter = layer_parameter(name)
    if parameter != "bias" or not isinstance(adapter.layers[name], Full):
        return False
    return module in adapter.layers and not isinstance(adapter.layers[module], DoRA)


def _stored_bias(bias: Full, scale: float) -> torch.Tensor:
    """`lora_B.bias (out,)` for which PEFT's `scale · lora_B.bias` is ΔB of `bias`: its own
    `delta` where its scale is `scale` (as read from a PEFT folder), else
    `delta · bias.scale / scale` computed in float64, in its dtype where that holds it
    exactly, else float32 (`stored_difference`); `ConversionError` for a nonzero ΔB under a
    LoRA of scale 0."""
    if bias.scale == scale:
        return bias.delta
    wide = bias.delta.to(torch.float64) * bias.scale
    if scale == 0:
        if wide.any():
            raise ConversionError(
                "its module's LoRA has scale 0, and PEFT adds scale · lora_B.bias to the bias, "
                "so no lora_B.bias stores a nonzero difference"
            )
        return torch.zeros_like(bias.delta)
    stored = stored_difference(wide / scale, bias.delta.dtype)
    require_finite(f"lora_B.bias (ΔB / {scale:.4g})", stored)
    return stored


def _bias_tensors(
    adapter: Adapter, layers: Mapping[str, LoRA], biases: Mapping[str, Full], out: Path
) -> dict[str, torch.Tensor]:
    """`<module>.lora_B.bias` of every layer of a `lora_bias` folder, keyed as written: PEFT
    gives each LoRA layer a bias on `lora_B` once the config sets `lora_bias`, and adds
    `scale · lora_B.bias` to the module's bias; a module with a layer `<module>.bias` among
    `biases` gets that ΔB (`_stored_bias`), another zeros. `ConversionError` where PEFT
    refuses `lora_bias`: on an `nn.Embedding`'s table or a parameter target; `ShapeError`
    for a ΔB of another length than its module's output."""
    first = next(iter(biases))
    for name in layers:
        if _embedding(adapter, name) or targets_parameter(name, adapter.target_parameters):
            what = "an embedding table" if _embedding(adapter, name) else "a parameter target"
            raise ConversionError(
                f"layer {first!r} is a bias difference, which PEFT holds as lora_bias, a bias "
                f"on every layer's lora_B; PEFT refuses lora_bias on layer {name!r}, {what}: "
                "write lycoris (diff_b)"
            )
    tensors = {}
    for name, form in layers.items():
        bias = biases.get(name + BIAS)
        key = f"{PREFIX}{name}.lora_B.bias"
        if bias is None:
            tensors[key] = torch.zeros(form.shape[0], dtype=form.up.dtype)
            continue
        if bias.shape[0] != form.shape[0]:
            raise ShapeError(
                f"layer {name + BIAS!r} has {bias.shape[0]} values, but layer {name!r} has "
                f"{form.shape[0]} output channels"
            )
        tensors[key] = build(out, name + BIAS, lambda b=bias, s=form.scale: _stored_bias(b, s))
    return tensors


def _dropping_layouts(adapter: Adapter) -> Adapter:
    """`adapter` with the parameter targets PEFT also holds as module layers written so
    where its `lora_dropout` (`Adapter.model`) is nonzero, which PEFT refuses beside any
    parameter target (`_runnable_dropout`): a transformers `Conv1D`'s LoRA (`Adapter.conv1d`)
    as the module LoRA PEFT runs transposed (`fan_in_fan_out`), its input dropped as in
    training, `lora_A = upᵀ`, `lora_B = downᵀ` of the stored weight's `(in, out)` LoRA; an
    embedding table's (`Adapter.embeddings`) as PEFT's LoRA of an `nn.Embedding`, which
    drops nothing (its indices), as lowrank's `LoRAEmbedding`. Without dropout they stay
    parameter targets, as read or as `model_adapter` gives them."""
    parameters = adapter.target_parameters
    if not adapter.model.get("lora_dropout") or not parameters:
        return adapter
    targeted = [n for n in adapter.layers if targets_parameter(n, parameters)]
    conv1d = [n for n in targeted
              if targets_parameter(n, adapter.conv1d) and isinstance(adapter.layers[n], LoRA)]
    moved = [*conv1d, *(n for n in targeted if targets_parameter(n, adapter.embeddings))]
    if not moved:
        return adapter
    layers = {n: f.transposed() if n in conv1d else f for n, f in adapter.items()}
    kept = tuple(p for p in parameters if not any(targets_parameter(n, (p,)) for n in moved))
    return replace(adapter, layers=layers, target_parameters=kept,
                   fan_in_fan_out=adapter.fan_in_fan_out or bool(conv1d))  # fmt: skip


def _runnable_dropout(config: dict[str, Any]) -> None:
    """`config`'s `lora_dropout` (`Adapter.model`) set to 0 where it still names parameter
    targets (other than those `_dropping_layouts` writes as module layers): PEFT refuses to
    load any other there (its `ParamWrapper` cannot drop the input of a LoRA added to a
    parameter), so the folder PEFT loads trains on without dropout."""
    if config.get("target_parameters"):
        config["lora_dropout"] = 0.0


def write(adapter: Adapter, out: Path, staging: Staging) -> list[Path]:
    """Stage a PEFT adapter folder `out` (`adapter_model.safetensors`, `adapter_config.json`).
    `Full` differences of the biases of modules with LoRA layers go in as `lora_bias`
    (`_bias_tensors`)."""
    plain, magnitudes = dora.peft_split(adapter.select(), "PEFT")
    plain = _dropping_layouts(plain)
    # beside DoRA (whose layers are LoRAs here) PEFT refuses lora_bias: left to `lora_only`
    biases = {} if magnitudes else {n: f for n, f in plain.items() if lora_bias_layer(plain, n)}
    rest = replace(plain, layers={n: f for n, f in plain.items() if n not in biases})
    layers = lora_only(rest, "PEFT", mid=False)
    tensors = {}
    for name, form in layers.items():
        if _embedding(plain, name):  # A = upᵀ, B = downᵀ (`EMBEDDING_KEY`)
            table = build(out, name, lambda f=form: f.transposed())
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = table.down
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = table.up
            continue
        tensors[f"{PREFIX}{name}.lora_A.weight"] = form.down
        tensors[f"{PREFIX}{name}.lora_B.weight"] = form.up
    tensors.update({f"{PREFIX}{n}.lora_magnitude_vector": m for n, m in magnitudes.items()})
    tensors.update(saved_tensors(plain.base_weights, layers))
    if biases:
        tensors.update(_bias_tensors(plain, layers, biases, out))
    config = {**config_for(plain, layers), **plain.model, "use_dora": bool(magnitudes),
              "lora_bias": bool(biases)}  # fmt: skip
    require_adaptable(config, list(layers), plain.target_parameters)
    _runnable_dropout(config)
    folder = staging.folder(out)
    weights, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    # the module LoRAs PEFT runs transposed (and the Conv1Ds' parameter targets), which
    # only the module types tell otherwise (`recorded_conv1d`)
    conv1d = sorted(f"{n}.weight" for n in layers if targets_parameter(n, plain.conv1d))
    metadata = {"format": "pt", **({CONV1D_KEY: json.dumps(conv1d)} if conv1d else {})}
    save_small(staging, tensors, weights, metadata)
    with staging.writing(config_path) as temp:
        temp.write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    return [weights, config_path]
