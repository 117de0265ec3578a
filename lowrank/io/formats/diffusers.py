"""diffusers LoRA files, as `save_lora_weights` writes and `load_lora_weights` reads them.

One safetensors file (`pytorch_lora_weights.safetensors` in a folder, or any file name)
with PEFT-style keys under the pipeline component: `unet.<module>.lora_A.weight` /
`.lora_B.weight`, `text_encoder.<module>.…`. The LoRA settings of each component are in
the safetensors metadata `lora_adapter_metadata`, a JSON object whose keys are
`<component>.<PEFT setting>` (`unet.r`, `unet.lora_alpha`, `unet.rank_pattern`, …).
Without it diffusers takes alpha = rank (scale 1), and so does this reader.

A diffusion model's file whose keys name its modules in the original layout (a DiT's, or
a Stable Diffusion UNet's LDM modules), `diffusion_model.<module>.lora_A.weight`
(ComfyUI's, ai-toolkit's; ComfyUI's text encoders' layers beside it,
`text_encoders.clip_l.transformer.<module>.…`), is read by `kohya.read_original`.

A model's own file (`save_lora_adapter` of a `UNet2DConditionModel`, a Flux or SD3
transformer) has the same keys without the component, and its metadata is that model's
plain PEFT config (`r`, `lora_alpha`, `alpha_pattern`, …); its layers are read without a
component.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ...errors import FileFormatError
from ..adapter import Adapter
from ..files import Staging, parse_json, require_safetensors, save_small
from . import dora, kohya
from .common import adapter_tensors, lora_only
from .peft import check_config, config_for, lora_layers, require_supported_keys

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<part>[AB])\.weight$")
"""A factor's key: `layer` is `<component>.<module>` in a pipeline's file, `<module>` in a
model's."""
DEFAULT_COMPONENT = "unet"
COMPONENTS = frozenset({
    "unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "transformer_2",
    "transformer_ref", "prior", "decoder", "connectors", "text_conditioner", "controlnet",
})  # fmt: skip
"""Pipeline components diffusers loads LoRA weights into (its pipelines'
`_lora_loadable_modules`, diffusers 0.42), the first name of a pipeline file's keys."""


def weights_path(path: Path) -> Path:
    """The weights file of a diffusers LoRA given as a file or as its folder."""
    return path / WEIGHTS_NAME if path.is_dir() else path


def _settings(metadata: dict[str, str], source: Path) -> dict | None:
    """The `lora_adapter_metadata` JSON object, or None without one."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        flat = parse_json(text)
    except (ValueError, RecursionError) as err:
        raise FileFormatError(f"{source}: {METADATA_KEY} is not valid JSON: {err}") from None
    if not isinstance(flat, dict):
        raise FileFormatError(f"{source}: metadata {METADATA_KEY} must be a JSON object")
    return flat


def _by_component(settings: dict, source: Path) -> dict[str, dict]:
    """Each component's LoRA settings from `<component>.<setting>` keys."""
    configs: dict[str, dict] = {}
    for key, value in settings.items():
        component, _, setting = key.partition(".")
        configs.setdefault(component, {})[setting] = value
    return {c: check_config(v, f"{source} ({METADATA_KEY} of {c})") for c, v in configs.items()}


def _has_components(keys: list[str], settings: dict | None) -> bool:
    """Whether the keys start with a pipeline component (`save_lora_weights`) rather than at
    the model's own modules (`save_lora_adapter`). The metadata says which: the pipeline's
    settings are `<component>.<setting>`, the model's a plain PEFT config, whose setting names
    hold no dot. Without metadata, the first name decides: one of `COMPONENTS` or not."""
    if settings:
        return all("." in key for key in settings)
    return any(key.partition(".")[0] in COMPONENTS for key in keys)


def _uses_dora(config: dict | None, magnitudes: dict) -> bool:
    """Whether diffusers loads a model's layers as DoRA: as its config says, and without
    one (no metadata) where the keys hold DoRA magnitudes, as diffusers tells."""
    return bool(config.get("use_dora")) if config is not None else bool(magnitudes)


def read(path: Path) -> Adapter:
    """A diffusers LoRA file (or its folder) as an `Adapter`: layers named
    `<component>.<module>` for a pipeline's file, `<module>` for a model's."""
    weights = require_safetensors(weights_path(path))
    tensors, metadata = adapter_tensors(weights)
    if kohya.original_layout(tensors):  # ComfyUI's / ai-toolkit's DiT LoRAs
        return kohya.read_original(path, weights, tensors, metadata)
    settings = _settings(metadata, weights)
    tensors, magnitudes = dora.magnitudes(tensors, weights)
    require_supported_keys([key for key in tensors if KEY.match(key) is None], weights)
    layer_of = {}
    for key in tensors:
        match = KEY.match(key)
        if match is None:
            raise FileFormatError(
                f"{weights}: key {key!r} is not a diffusers LoRA factor (expected "
                "[<component>.]<module>.lora_A.weight / .lora_B.weight)"
            )
        layer_of[key] = match["layer"]
    if not _has_components(list(tensors), settings):
        config = None if settings is None else check_config(settings, f"{weights} ({METADATA_KEY})")
        modules = {layer: layer for layer in layer_of.values()}
        layers, alphas = lora_layers(tensors, modules, config, weights)
        layers = dora.with_magnitudes(layers, magnitudes, _uses_dora(config, magnitudes), weights)
        rslora = bool(config and config.get("use_rslora", False))
        transposed = bool(config and config.get("fan_in_fan_out", False))
        return Adapter(layers, "diffusers", alphas=alphas, rslora=rslora, metadata=metadata,
                       source=path, fan_in_fan_out=transposed)  # fmt: skip
    configs = {} if settings is None else _by_component(settings, weights)
    strays = [key for layer, (key, _) in magnitudes.items() if layer not in layer_of.values()]
    if strays:
        raise FileFormatError(
            f"{weights}: key {strays[0]!r} is a DoRA magnitude of a layer with no lora_A / lora_B"
        )
    by_component: dict[str, dict[str, str]] = {}
    for key, layer in layer_of.items():
        component, _, module = layer.partition(".")
        if not module:
            raise FileFormatError(
                f"{weights}: key {key!r} names no module under a pipeline component "
                "(expected <component>.<module>.lora_A.weight)"
            )
        by_component.setdefault(component, {})[layer] = module
    # Each component's scales follow its own use_rslora (diffusers loads each with its own
    # config). The adapter states alphas one way: per √r only if every component does; the
    # alphas of a component stated the other way are not kept, so writers derive them from
    # the scales (`Adapter.alpha`: alpha = scale · r), as for an rsLoRA written to kohya.
    flags = {c: bool(configs.get(c, {}).get("use_rslora", False)) for c in by_component}
    rslora = all(flags.values())
    layers, alphas = {}, {}
    for component, modules in by_component.items():
        found, stated = lora_layers(tensors, modules, configs.get(component), weights)
        mine = {layer: m for layer, m in magnitudes.items() if layer in modules}
        uses = _uses_dora(configs.get(component) if settings else None, mine)
        layers.update(dora.with_magnitudes(found, mine, uses, weights))
        if flags[component] == rslora:
            alphas.update(stated)
    return Adapter(
        layers,
        "diffusers",
        components=tuple(sorted(by_component)),
        alphas=alphas,
        rslora=rslora,
        metadata=metadata,
        source=path,
        fan_in_fan_out=any(config.get("fan_in_fan_out", False) for config in configs.values()),
    )


def write(adapter: Adapter, out: Path, staging: Staging, component: str | None) -> list[Path]:
    """Stage a diffusers LoRA file: `out` itself if it ends in `.safetensors` (in any case,
    as `store.planned_outputs` and the command line read it), else
    `out/pytorch_lora_weights.safetensors`. Names without a component go under
    `component` (default `unet`)."""
    if not adapter.components:
        adapter = adapter.with_component(component or DEFAULT_COMPONENT)
    tensors, flat = {}, {}
    for name in adapter.components:
        part, magnitudes = dora.peft_split(adapter.select(name), "diffusers")
        layers = lora_only(part, "diffusers", mid=False)
        for module, form in layers.items():
            tensors[f"{name}.{module}.lora_A.weight"] = form.down
            tensors[f"{name}.{module}.lora_B.weight"] = form.up
        tensors.update({f"{name}.{m}.lora_magnitude_vector": t for m, t in magnitudes.items()})
        config = {**config_for(part, layers), "use_dora": bool(magnitudes)}
        flat.update({f"{name}.{k}": v for k, v in config.items()})
    target = out if out.suffix.lower() == ".safetensors" else staging.folder(out) / WEIGHTS_NAME
    metadata = {"format": "pt", METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True)}
    save_small(staging, tensors, target, metadata)
    return [target]
