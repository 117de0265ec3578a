"""Adapters into dense weights: on disk (`merge_checkpoint`), in a model (`apply_adapter`),
and into trainable adapter modules (`inject_adapter`); and a model's trained adapter modules
back into an `Adapter` (`model_adapter`).

Merging computes `W + Σ weight_i · ΔW_i` in float32 (float64 for a float64 weight or
output) and stores the result in the weight's dtype (or the one asked for), checking that it
is finite before and after that cast. Everything that can be checked before writing is: the
adapters' layers against the base's modules and shapes, the weights, the output paths.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from .._checks import (
    DTYPE_NAMES,
    all_finite,
    overflow_bound,
    require_list,
    require_module,
    require_path,
    require_real,
    require_weights,
    work_dtype,
)
from ..conv import centre_tap
from ..errors import (
    ArgumentError,
    DeviceError,
    DTypeError,
    MergeError,
    NonFiniteError,
    TargetError,
)
from ..forms import Factors, LoRA, Tucker2, add_dense
from ..nn import inject
from ..nn._tensors import gathered, outside_autocast
from ..nn.fit import is_conv1d, weight_is_computed
from ..nn.layers import LowRankAdapter
from ..nn.model import adapters as adapter_modules
from ..nn.model import resharded
from ..nn.ties import tied_names
from .adapter import Adapter, form_name
from .checkpoint import Checkpoint, CheckpointWriter
from .files import Blocks, PathLike, Scratch, Staging, require_distinct, require_outside_folders
from .store import adapter_files, adapter_from

CHUNK_ELEMENTS = 1 << 21  # rows merged at a time: 8 MiB of float32


def _row_blocks(weight: torch.Tensor) -> Iterator[torch.Tensor]:
    """`weight` as consecutive blocks of whole rows of about `CHUNK_ELEMENTS` values (views)."""
    step = max(1, CHUNK_ELEMENTS // max(1, weight[0].numel()))
    return iter(weight.split(step))


def _require_weights_fit(
    updates: Sequence[tuple[Factors, float, str]], accumulate: torch.dtype, where: str
) -> None:
    """`NonFiniteError` for a merge weight, or its product with the layer's scale, beyond the
    range of `accumulate`, the dtype the merge adds it in (a float32 sum cannot hold
    weight · ΔW then)."""
    largest = torch.finfo(accumulate).max
    for form, scale, source in updates:
        if not abs(scale) <= largest:
            raise NonFiniteError(
                f"{where}: the weight {scale:.4g} of {source} is beyond the range of "
                f"{accumulate}, in which the merge adds it"
            )
        if not abs(scale * form.scale) <= largest:
            raise NonFiniteError(
                f"{where}: the scale {form.scale:.4g} of {source}'s layer (times the weight "
                f"{scale:.4g}) is beyond the range of {accumulate}, in which the merge adds it"
            )


def _merged_blocks(
    blocks: Iterable[torch.Tensor],
    updates: Sequence[tuple[Factors, float, str]],
    out_dtype: torch.dtype,
    where: str,
    scratch: Scratch | None = None,
) -> Iterator[torch.Tensor]:
    """`weight + Σ w·ΔW` for `weight` given as consecutive row `blocks`, accumulated in
    float32 (float64 for a float64 weight or `out_dtype`), cast to `out_dtype` and checked
    finite, block by block.

    Each block's ΔW rows come from the factors of those rows only, so the memory this needs
    is one block and its ΔW, never the whole weight, a float32 copy of it or of ΔW. With
    `scratch`, the sum and the cast reuse its buffers: each block yielded is valid until
    the next is drawn.
    """
    forms: list[tuple[Factors, float]] | None = None
    limit = overflow_bound(out_dtype)
    start = 0
    for weight in blocks:
        accumulate = work_dtype(weight.dtype, out_dtype)
        if forms is None:
            _require_weights_fit(updates, accumulate, where)
            forms = [(form.to(device=weight.device, dtype=accumulate), scale)
                     for form, scale, _ in updates]  # fmt: skip
        rows = slice(start, start + weight.shape[0])
        start = rows.stop
        if scratch is None:
            total = weight.to(accumulate, copy=True, memory_format=torch.contiguous_format)
        else:
            total = scratch.take("sum", weight.shape, accumulate).copy_(weight)
        with outside_autocast(total):  # ΔW in the accumulator's dtype inside autocast too
            for form, scale in forms:
                add_dense(total, form, scale, rows)
        low, high = (float(v) for v in torch.aminmax(total))  # NaN propagates, Inf is extreme
        if not (math.isfinite(low) and math.isfinite(high)) and accumulate != torch.float64:
            # a product of factors can overflow float32 where ΔW does not (huge factors, a
            # tiny scale): that block again in float64, as `recompose` does
            total = _merged_in_float64(weight, updates, rows)
            low, high = (float(v) for v in torch.aminmax(total))
        if not (math.isfinite(low) and math.isfinite(high)):
            bad = int((~torch.isfinite(total)).sum())
            sources = ", ".join(source for _, _, source in updates)
            raise NonFiniteError(
                f"{where}: merging {sources} gives {bad} NaN/Inf value(s) in rows {rows.start}–"
                f"{rows.stop - 1}"
            )
        if scratch is None or out_dtype == accumulate:
            block = total.to(out_dtype)
        else:
            block = scratch.take("cast", total.shape, out_dtype).copy_(total)
        # a value this large rounds to Inf in the cast (a float8 dtype may clip it instead)
        if max(-low, high) >= limit:
            raise NonFiniteError(
                f"{where}: the merged weight (|value| up to {max(-low, high):.4g}) overflows "
                f"{out_dtype}"
            )
        yield block


def _merged_in_float64(
    weight: torch.Tensor, updates: Sequence[tuple[Factors, float, str]], rows: slice
) -> torch.Tensor:
    """`weight + Σ w·ΔW[rows]` summed in float64 (rows `rows` of the whole weight)."""
    total = weight.to(torch.float64, copy=True, memory_format=torch.contiguous_format)
    with outside_autocast(total):
        for form, scale, _ in updates:
            add_dense(total, form.to(device=weight.device, dtype=torch.float64), scale, rows)
    return total


def _cast_blocks(
    blocks: Iterable[torch.Tensor], dtype: torch.dtype, where: str, scratch: Scratch
) -> Iterator[torch.Tensor]:
    """Each block cast to `dtype` (into `scratch`'s buffer where that changes it);
    `NonFiniteError` where a finite value overflows it."""
    for block in blocks:
        if block.dtype == dtype:
            yield block
            continue
        cast = scratch.take("cast", block.shape, dtype).copy_(block)
        if not all_finite(cast) and bool((torch.isinf(cast) & torch.isfinite(block)).any()):
            raise NonFiniteError(f"{where}: casting {block.dtype} to {cast.dtype} overflows")
        yield cast


def _output_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise DTypeError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")


def merge_checkpoint(
    base: PathLike,
    adapters: PathLike | Adapter | Sequence[PathLike | Adapter],
    out: PathLike,
    weights: Sequence[float] | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    component: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write `base + Σ weights[i] · ΔW_i` of every adapter as a dense checkpoint at `out`.

    `base` is a safetensors file, a sharded checkpoint's index
    (`model.safetensors.index.json`) or its folder; `out` is written the same way (a file,
    or a folder with the same shards and index). `adapters` are files / PEFT folders or
    `Adapter`s, `weights` one number each (default 1). Each adapter's layers are matched
    to the base's `<module>.weight` keys (kohya names through the base's module names;
    `component` picks one model of a pipeline adapter). Merging streams each base tensor
    a block of rows at a time and accumulates in float32 (float64 for a float64 weight or
    `dtype`); floating tensors are stored in `dtype`
    (`float16`, `bfloat16`, `float32`, `float64`) or their own dtype.

    Errors, raised before anything is written where they can be: `TargetError` (a layer
    with no module in the base), `ShapeError`, `NonFiniteError` (NaN/Inf factors, or a
    merged weight that is not finite or overflows its dtype), `OutputPathError` (`out`
    is an input), `FileFormatError` (an unreadable or corrupt input). A failure leaves no
    output. Returns a report of what was merged.
    """
    checkpoint = Checkpoint(base)
    out = require_path("out", out)
    if isinstance(base, (str, os.PathLike)):
        require_outside_folders(out, [Path(base)], "the merged checkpoint")
    if isinstance(adapters, (str, os.PathLike, Adapter)):
        sources = [adapters]
    else:
        sources = require_list("adapters", adapters, "adapter paths or Adapters")
    if not sources:
        raise ArgumentError("give at least one adapter to merge")
    scales = require_weights("weights", weights, len(sources), "adapters")
    out_dtype = _output_dtype(dtype)
    updates: dict[str, list[tuple[Factors, float, str]]] = {}
    inputs = list(checkpoint.inputs)
    rows = []
    for source, scale in zip(sources, scales, strict=True):
        adapter = adapter_from(source)
        label = str(adapter.source or "adapter")
        if adapter.source:
            inputs += adapter_files(adapter.source, adapter.format)
        layers = adapter.for_model(checkpoint, component).layers
        for module, form in layers.items():
            key = f"{module}.weight"
            if not checkpoint.infos[key].dtype.is_floating_point:
                raise DTypeError(
                    f"{checkpoint.path}: {key} is {checkpoint.infos[key].dtype}; {label} merges "
                    "into floating-point weights only (a quantized checkpoint?)"
                )
            updates.setdefault(key, []).append((form, scale, label))
        rows.append({"adapter": label, "weight": scale, "layers": len(layers)})
    dtypes = {
        k: out_dtype if out_dtype and info.dtype.is_floating_point else info.dtype
        for k, info in checkpoint.infos.items()
    }

    scratch = Scratch()

    def merged(key: str) -> tuple[str, Blocks]:
        where = f"{checkpoint.path}: {key}"
        blocks = checkpoint.row_blocks(key, CHUNK_ELEMENTS, scratch)
        if key in updates:
            return key, _merged_blocks(blocks, updates[key], dtypes[key], where, scratch)
        return key, _cast_blocks(blocks, dtypes[key], where, scratch)

    stream = tqdm(
        checkpoint.infos,
        total=len(checkpoint.infos),
        desc="merging",
        unit="tensor",
        disable=not progress or None,
        leave=False,
    )
    with Staging() as staging:
        writer = CheckpointWriter(checkpoint, out, staging, dtypes)
        require_distinct(writer.outputs, inputs)
        writer.write_all(merged(key) for key in stream)
    return {
        "base": str(checkpoint.path),
        "output": [str(p) for p in writer.outputs],
        "dtype": None if out_dtype is None else str(out_dtype).removeprefix("torch."),
        "adapters": rows,
        "merged_tensors": len(updates),
        "tensors": len(checkpoint.infos),
    }


def apply_adapter(
    model: nn.Module,
    adapter: PathLike | Adapter,
    weight: float = 1.0,
    *,
    component: str | None = None,
) -> list[str]:
    """Merge `weight · ΔW` of every layer into `model`'s weights in place ("fuse").

    Each layer must name a module of `model` with a matching weight (kohya names are
    mapped through `model`'s module names; `component` picks one model of a pipeline
    adapter), held as a plain floating-point parameter with real data: a `lowrank.nn`
    adapter, a parametrized or hook-computed weight (`weight_norm`) or a weight tied to
    another module's is a `MergeError`, one on the meta device a `DeviceError`. Every
    merged weight is computed and checked finite before any is written, so an error leaves
    `model` unchanged. Returns the merged module names.
    """
    scale = require_real("weight", weight)
    require_module("model", model)
    layers = adapter_from(adapter).for_model(model, component).layers
    label = str(getattr(adapter, "source", None) or adapter)
    modules = {name: _plain_weight(model, name) for name in layers}
    seen: dict[int, str] = {}
    for name, module in modules.items():
        if id(module) in seen:
            raise TargetError(
                f"layers {seen[id(module)]!r} and {name!r} name one module (registered under "
                "both names); keep one of them"
            )
        seen[id(module)] = name
    for name, ties in zip(modules, tied_names(model, list(modules.values())), strict=True):
        if ties:
            raise MergeError(
                f"the weight of module {name!r} is also {', '.join(map(repr, ties))} (tied "
                "weights), which applying the adapter would change too; untie them first"
            )
    merged = {}
    with torch.no_grad():
        for name, form in layers.items():
            param = modules[name].weight
            updates = [(form, scale, label)]
            blocks = list(_merged_blocks(_row_blocks(param), updates, param.dtype, name))
            merged[name] = torch.cat(blocks) if blocks else param.detach().clone()
        for name, value in merged.items():
            modules[name].weight.copy_(value)
    return list(merged)


def _plain_weight(model: nn.Module, name: str) -> nn.Module:
    """Module `name` of `model` if its weight is a plain floating-point parameter with real
    data that a merge can write into; else `MergeError`, `DTypeError` or `DeviceError`."""
    module = model.get_submodule(name)
    if isinstance(module, LowRankAdapter):
        raise MergeError(
            f"module {name!r} is a lowrank.nn adapter, whose weight is W + ΔW computed on each "
            f"call; apply to its base ({name}.base), or merge_and_unload the model first"
        )
    param = module.weight
    held = [*module._parameters.values(), *module._buffers.values()]
    stored = isinstance(param, nn.Parameter) or any(param is t for t in held)
    if parametrize.is_parametrized(module, "weight") or not stored:
        computed = weight_is_computed(module) or "its weight is computed on each access"
        raise MergeError(
            f"cannot apply an adapter to module {name!r}: {computed}, so the merged weight "
            "would be lost or distorted; remove it first (torch.nn.utils.parametrize."
            "remove_parametrizations, torch.nn.utils.remove_weight_norm)"
        )
    if not param.is_floating_point():
        raise DTypeError(
            f"{name}.weight is {param.dtype}: an adapter merges into floating-point weights only"
        )
    if param.is_meta:
        raise DeviceError(
            f"{name}.weight is on the meta device, which holds no values to merge into; load "
            "the model's weights first"
        )
    return module


def _spec(name: str, form: Factors) -> dict[str, object]:
    if isinstance(form, LoRA):
        return {"r": form.rank, "form": "lora", "scale": form.scale}
    if isinstance(form, Tucker2):
        return {"r": list(form.rank), "form": "tucker2", "scale": form.scale}
    raise TargetError(
        f"layer {name!r} is a {form_name(form)}, which lowrank.nn has no trainable module for; "
        "merge it with apply_adapter, or convert it to LoRA with a rank"
    )


def _stored_in_transpose(module: nn.Module | None) -> bool:
    """Whether `module` stores its weight `(in, out)` while its adapter module holds ΔW
    `(out, in)`: a transformers `Conv1D` or an `nn.Embedding`."""
    return is_conv1d(module) or isinstance(module, nn.Embedding)


def _swap_layout(name: str, form: Factors, module: nn.Module | None) -> Factors:
    """`form` in the other layout of `module`'s ΔW (the weight's as stored ↔ its adapter
    module's): transposed where `_stored_in_transpose`, else as it is."""
    if not _stored_in_transpose(module):
        return form
    if not isinstance(form, LoRA):
        raise TargetError(
            f"layer {name!r} is a {form_name(form)} on the {type(module).__name__}, whose weight "
            "is stored (in, out); only LoRA layers go between files and modules there"
        )
    return LoRA(form.up.t().contiguous(), form.down.t().contiguous(), form.scale)


_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def model_adapter(model: nn.Module) -> Adapter:
    """The `lowrank.nn` adapters of `model` as an `Adapter` (module paths, each layer's form
    with its scale; copies, detached from training), ready for `save_adapter` and the other
    file tools: what the model computes, so a merged adapter gives the factors its merge
    put in the weight.

    A layer of a transformers `Conv1D` or an `nn.Embedding` holds ΔW as the weight is
    stored, `(in, out)`, and is a parameter target (`<module>.weight`), as PEFT's
    `target_parameters` names it: PEFT files and lowrank's kohya / LyCORIS files keep it
    so, and `inject_adapter` / `apply_adapter` read it back. An adapter's own `factors()`
    are in its module's `(out, in)` layout, which a file would take for the stored one. A
    centre tap's 1×1 `down` gets the convolution's kernel, zero but for its centre. Grouped
    convolutions (one factor set per group) have no such form, and an adapter started with
    `init="pissa"` holds no update of the original weight (`TargetError`); a model on the
    meta device has no values (`DeviceError`). A module under several names is written
    under its first (PEFT then adapts that name alone). A model wrapped by `torch.compile`
    (`_orig_mod`) or by `DistributedDataParallel` / `DataParallel` (`module`) is unwrapped,
    so that names are those of the model itself. Factors sharded by FSDP2 (DTensors) are
    gathered whole, a collective: call it on every rank.
    """
    model = require_module("model", model)
    while isinstance(model, _WRAPPERS) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, _WRAPPERS) else model._orig_mod
    resharded(model)  # FSDP2's unsharded copies may be in its compute dtype
    layers: dict[str, Factors] = {}
    targets = []
    for name, adapter in adapter_modules(model).items():
        if adapter.residual:
            raise TargetError(
                f"module {name!r} started from init='pissa': its base holds W − ΔW₀, so its "
                "factors are no adapter of the original model; save ΔW − ΔW₀ instead "
                "(lowrank.combine([factors, start], [1, -1]), docs/nn.md)"
            )
        tensors = adapter.merged_factors if adapter.merged else None
        tensors = tensors if tensors is not None else adapter.plain_tensors()
        tensors = {key: gathered(tensor) for key, tensor in tensors.items()}
        if any(t.is_meta for t in tensors.values()):
            raise DeviceError(f"module {name!r} is on the meta device: its factors hold no values")
        with torch.no_grad():
            try:
                form = adapter.factors({k: t.detach().clone() for k, t in tensors.items()})
            except TargetError as err:
                raise TargetError(f"module {name!r}: {err}") from None
        kernel = tuple(getattr(adapter.base, "kernel_size", ()))
        if adapter.variant.name == "centre_tap" and kernel:
            form = LoRA(centre_tap(form.down, kernel), form.up, form.scale)
        layers[name] = _swap_layout(name, form, adapter.base)
        if _stored_in_transpose(adapter.base):
            targets.append(f"{name}.weight")
    if not layers:
        raise TargetError(f"{type(model).__name__} holds no lowrank.nn adapters")
    return Adapter(layers, target_parameters=tuple(targets))


def inject_adapter(
    model: nn.Module,
    adapter: PathLike | Adapter,
    *,
    component: str | None = None,
) -> list[str]:
    """Wrap `model`'s targeted modules in `lowrank.nn` adapters holding the file's factors.

    LoRA / LoCon layers become `form="lora"` adapters, Tucker2 layers `form="tucker2"`,
    each with the file's scale, ready for further training (the base stays frozen). The
    layers are checked against `model` first, so an error leaves it unchanged; a model on
    the meta device, whose materialisation would discard the factors, is a `DeviceError`.
    Returns the wrapped module names.
    """
    layers = adapter_from(adapter).for_model(model, component).layers
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in layers:
        weight = getattr(modules.get(name), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_meta:
            raise DeviceError(
                f"module {name!r} is on the meta device: the file's factors would be lost when "
                "the model is materialised (to_empty); load the model's weights first, then "
                "inject the adapter"
            )
    layers = {name: _swap_layout(name, form, modules.get(name)) for name, form in layers.items()}
    targets: Mapping[str, Mapping[str, object]] = {
        f"re:{re.escape(name)}": _spec(name, form) for name, form in layers.items()
    }
    return inject(model, targets, factors=layers)
