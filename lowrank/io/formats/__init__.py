"""Adapter file formats: which one a path holds, and reading and writing each.

- `peft`: a folder, `adapter_model.safetensors` + `adapter_config.json`; keys
  `base_model.model.<module>.lora_A.weight` (`lora_embedding_A` on an `nn.Embedding`), or
  `….hada_w1_a`, `….lokr_w1` of PEFT's LoHa and LoKr adapter types (`peft_lycoris`);
- `kohya`: one `.safetensors`, layers `lora_unet_<module with _>`, `lora_te_…`;
- `lycoris`: as kohya (or `lycoris_…`), also LoHa and LoKr layers, DoRA (`dora_scale`) and
  dense differences (`diff`, `diff_b`: `Full` layers, a bias's named `<module>.bias`);
- `diffusers`: `pytorch_lora_weights.safetensors`, keys `unet.<module>.lora_A.weight`;
- a DiT's original layout (ComfyUI, ai-toolkit): `diffusion_model.<module>.lora_A.weight`
  (`diffusers`) or `….lora_down.weight` / `.alpha` (`kohya`), the pipeline's `transformer`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import ArgumentError, ConversionError, FileFormatError, TargetError
from ...forms import LoHa, LoKr
from ..adapter import Adapter
from ..files import PICKLE_SUFFIXES, Staging, header, pickle_refusal
from ..names import KOHYA_PREFIXES, split_stem
from . import diffusers, dora, kohya, peft, peft_lycoris

FORMATS = ("peft", "kohya", "lycoris", "diffusers")
_SHOWN = 3


@dataclass(frozen=True)
class Traits:
    """What a file format holds and how its layers are named."""

    kohya_named: bool
    """One `.safetensors` file with kohya's layer names (`lora_unet_…`) and `--prefix`; else
    module paths (a PEFT folder; a diffusers file or folder)."""
    mid: bool
    """Tucker2 layers keep their mid factor (`lora_mid`); else they are folded into LoRA."""
    lycoris_forms: bool
    """LoHa and LoKr layers, beside any other."""
    product_types: bool
    """LoHa and LoKr layers as adapter types of their own: every layer LoHa, or every one
    LoKr (PEFT's `LoHaConfig` and `LoKrConfig`)."""
    module_lora_only: bool
    """Its loader applies module LoRAs only, so layers that update a weight as stored (a
    transformers `Conv1D`'s `(in, out)` weight, an embedding table; PEFT's
    `target_parameters`) cannot go in at all."""
    dora: bool
    """DoRA magnitudes (PEFT's `lora_magnitude_vector`, LyCORIS' `dora_scale`)."""
    lora_bias: bool
    """A module's bias difference (a 1-D `Full` layer `<module>.bias`) beside the module's
    LoRA, as PEFT's `lora_bias` (`lora_B.bias`), in a format that holds no other `Full`."""
    lokr_scale: bool
    """A LoKr whose w1 and w2 are both dense keeps its scale (PEFT's `alpha / r`); else the
    file stores it at scale 1 (LyCORIS), so a scale has to go into its factors."""


TRAITS = {
    "peft": Traits(kohya_named=False, mid=False, lycoris_forms=False, product_types=True,
                   module_lora_only=False, dora=True, lora_bias=True, lokr_scale=True),
    "kohya": Traits(kohya_named=True, mid=True, lycoris_forms=False, product_types=False,
                    module_lora_only=False, dora=False, lora_bias=False, lokr_scale=False),
    "lycoris": Traits(kohya_named=True, mid=True, lycoris_forms=True, product_types=False,
                      module_lora_only=False, dora=True, lora_bias=False, lokr_scale=False),
    "diffusers": Traits(kohya_named=False, mid=False, lycoris_forms=False, product_types=False,
                        module_lora_only=True, dora=True, lora_bias=False, lokr_scale=False),
}  # fmt: skip


def _folder_format(path: Path) -> str:
    for entry in (path / peft.CONFIG_NAME, path / diffusers.WEIGHTS_NAME):
        if entry.exists() and not entry.is_file():
            raise FileFormatError(f"{entry} is not a regular file; expected an adapter's file")
    if (path / peft.CONFIG_NAME).is_file():
        return "peft"
    if (path / diffusers.WEIGHTS_NAME).is_file():
        return "diffusers"
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise pickle_refusal(path / pickles[0])
    found = sorted(p.name for p in path.iterdir())[:8]
    raise FileFormatError(
        f"{path} holds no adapter: expected {peft.CONFIG_NAME} + {peft.WEIGHTS_NAME} (PEFT) or "
        f"{diffusers.WEIGHTS_NAME} (diffusers); found {found}"
    )


def _file_format(path: Path, keys: list[str]) -> str:
    """The format of the adapter file `path`, which holds tensors `keys`."""
    if not keys:
        raise FileFormatError(f"{path} holds no tensors")
    # tensors of a feature beside PEFT or diffusers factors (DoRA's lora_magnitude_vector,
    # lora_B.bias, …) make the file no other format's: its reader refuses it by the feature
    factors = [k for k in keys if not peft.unsupported_key(k) and not dora.MAGNITUDE_KEY.match(k)
               and not (peft.SAVED_KEY.match(k) and not peft.KEY.match(k))]  # fmt: skip
    if kohya.original_layout(keys):  # a diffusion model's original modules (ComfyUI, ai-toolkit)
        peft_parts = any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
        return "diffusers" if peft_parts else "kohya"
    if factors and all(peft.KEY.match(k) for k in factors):
        return "peft"
    if factors and all(diffusers.KEY.match(k) for k in factors):
        return "diffusers"
    if any(_kohya_stem(key.partition(".")[0]) for key in keys):
        return "kohya"
    raise FileFormatError(
        f"{path}: unknown adapter layout; its {len(keys)} keys look like {keys[:_SHOWN]}; "
        "expected PEFT (base_model.model.<module>.lora_A.weight), kohya / LyCORIS "
        "(lora_unet_<module>.lora_down.weight, .hada_w1_a, .lokr_w1, …) or diffusers "
        "(unet.<module>.lora_A.weight, or diffusion_model.<module>.lora_A.weight)"
    )


def _kohya_stem(stem: str) -> bool:
    try:
        split_stem(stem, "")
    except FileFormatError:
        return False
    return True


def detect(path: Path) -> str:
    """The format of the adapter at `path` (a file or a folder); `FileFormatError` if none,
    or if `path` is not a safetensors file that can be read (`require_safetensors`)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    if os.path.isdir(path):  # else a file, which reading checks (`require_safetensors`)
        return _folder_format(path)
    keys = list(header(path)[0])
    if path.name == peft.WEIGHTS_NAME and (path.parent / peft.CONFIG_NAME).is_file():
        return "peft"
    return _file_format(path, keys)


def require_format(fmt: object) -> str:
    """`fmt` if it names one of `FORMATS`, else `ConversionError` listing them."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def read(path: Path) -> Adapter:
    """The adapter at `path`, in whichever format it is."""
    fmt = detect(path)
    if fmt == "peft":
        return peft_lycoris.read(path) if peft_lycoris.product_type(path) else peft.read(path)
    if fmt == "diffusers":
        return diffusers.read(path)
    return kohya.read(path)


def _require_no_base_weights(adapter: Adapter, fmt: str) -> None:
    """`ConversionError` naming the first of `adapter.base_weights`, which `fmt` files cannot
    hold."""
    if adapter.base_weights:
        key = next(iter(adapter.base_weights))
        raise ConversionError(
            f"{adapter.source or 'the adapter'}: {key} ({len(adapter.base_weights)} in all) is a "
            "whole base tensor saved beside the layers (PEFT's save_embedding_layers, "
            "modules_to_save or bias), which PEFT loads in place of the base's, and "
            f"{fmt} files cannot hold it; write peft, or give the base (base=…, --base): a "
            "saved tensor equal to the base's changes nothing and is left out"
        )


def write(
    adapter: Adapter,
    out: Path,
    staging: Staging,
    fmt: str,
    *,
    component: str | None = None,
    prefix: str | None = None,
) -> list[Path]:
    """Stage `adapter` as `fmt` at `out`; return the paths it will occupy. `prefix` (kohya
    and LyCORIS) names the layers that name no model and defaults to the adapter's own, else
    `kohya.DEFAULT_PREFIX`; given where every layer names its model (kohya names, or module
    paths under a component), it would change nothing and is an `ArgumentError`."""
    require_format(fmt)
    if not adapter.layers:
        raise ConversionError(
            f"{adapter.source or 'the adapter'} holds no layers; there is nothing to write"
        )
    if not TRAITS[fmt].kohya_named and adapter.kohya_names:
        raise TargetError(
            f"{adapter.source} names its layers kohya's way ({next(iter(adapter.layers))}); "
            f"{fmt} needs module paths: give the base model (base=…, --base) to map them"
        )
    if fmt == "peft":
        plain = adapter.select(component)
        if any(isinstance(form, (LoHa, LoKr)) for form in plain.layers.values()):
            return peft_lycoris.write(plain, out, staging)
        return peft.write(plain, out, staging)
    _require_no_base_weights(adapter, fmt)
    if fmt == "diffusers":
        return diffusers.write(adapter, out, staging, component)
    given = prefix is not None
    if prefix is None:
        prefix = adapter.prefix or kohya.DEFAULT_PREFIX
    if not isinstance(prefix, str) or prefix not in KOHYA_PREFIXES:
        raise ArgumentError(f"prefix {prefix!r} is not one of {', '.join(KOHYA_PREFIXES)}")
    if given and (adapter.kohya_names or all(adapter.component_of(n) for n in adapter.layers)):
        raise ArgumentError(
            f"prefix={prefix!r} (--prefix) would change nothing for "
            f"{adapter.source or 'the adapter'}: it names the layers that name no model, and "
            f"each of its layers names its own ({next(iter(adapter.layers))})"
        )
    return kohya.write(adapter, out, staging, fmt, prefix)
