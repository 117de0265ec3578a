"""Adapters into dense weights on disk (`merge_checkpoint`), and the merge arithmetic that
`lowrank.io.model` shares: row blocks of `W + Σ weight_i · ΔW_i`, or of a DoRA layer's
`m ⊙ (W + ΔW) / ‖W + ΔW‖`.

Merging computes `W + Σ weight_i · ΔW_i` in float32 (float64 for a float64 weight or
output) and stores the result in the weight's dtype (or the one asked for), checking that it
is finite before and after that cast (a float8 weight stored with a scale: `W8 · s` and
the sum in float64, rounded once to float8 with a fitted scale, `lowrank.io.quantized`, or
to the dtype asked for, the scale left out).
A DoRA layer depends on the base weight: it merges
alone into its weight, at weight 1 (`dora_of`). Everything that can be checked before
writing is: the adapters' layers against the base's modules and shapes, the weights, the
output paths.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .._checks import (
    DTYPE_NAMES,
    all_finite,
    overflow_bound,
    require_flag,
    require_list,
    require_name,
    require_weights,
    work_dtype,
)
from .._tensors import outside_autocast
from ..errors import (
    ArgumentError,
    DTypeError,
    FileFormatError,
    MergeError,
    NonFiniteError,
    OutputPathError,
    ShapeError,
    TargetError,
)
from ..forms import DoRA, Factors, add_dense, update_of
from .adapter import Adapter, joined_base_weights
from .checkpoint import INDEX_SUFFIX, Checkpoint, CheckpointWriter, companion_files
from .files import (
    Blocks,
    PathLike,
    Scratch,
    Staging,
    ends_in_separator,
    holds_weights,
    output_path,
    read_json,
    require_outputs,
    require_outside_folders,
    require_reachable,
    same_path,
)
from .module_types import tied_weights
from .names import parameter_key
from .quantized import (
    FLOAT8,
    Quantization,
    Requantized,
    ScaledWeight,
    block_peaks,
    dequantized_blocks,
    fitted_scale,
    metadata_without,
    require_no_packed,
    rounded,
    rounded_blocks,
    stored_scale,
    unmatched_refusal,
)
from .store import adapter_files, adapter_from, adapter_readings

CHUNK_ELEMENTS = 1 << 21  # rows merged at a time: 8 MiB of float32


def row_blocks(weight: torch.Tensor) -> Iterator[torch.Tensor]:
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


def dora_of(updates: Sequence[tuple[Factors | DoRA, float, str]], where: str) -> DoRA | None:
    """The DoRA layer among a weight's `updates`, or None; `MergeError` naming `where` and
    the adapters where a DoRA layer is not alone at weight 1. Its merge depends on the base
    weight, so beside another layer the result depends on their order (and PEFT's merge of
    two DoRA adapters in turn differs from its forward pass of both), and PEFT, LyCORIS and
    ComfyUI each weight it otherwise (the LoRA's scale inside the norm; the rescaling;
    the merged weight's change)."""
    doras = [(form, scale, source) for form, scale, source in updates if isinstance(form, DoRA)]
    if not doras:
        return None
    form, scale, source = doras[0]
    if scale != 1.0:  # at weight 0 too: PEFT's merge is then m ⊙ W / ‖W‖, LyCORIS' W + ΔW
        raise MergeError(
            f"{where}: {source}'s layer is a DoRA, which merges at weight 1 only (got "
            f"{scale:g}): its merge is not linear in ΔW, and PEFT (the LoRA's scale inside the "
            "norm), LyCORIS (the rescaling) and ComfyUI (the merged weight's change) weight "
            "it each their own way"
        )
    if len(updates) > 1:
        sources = ", ".join(source for _, _, source in updates)
        raise MergeError(
            f"{where}: {source}'s layer is a DoRA, merged as m ⊙ (W + ΔW) / ‖W + ΔW‖ from the "
            f"base weight W, and {sources} all adapt it: the result would depend on their "
            "order; merge them one after another (the output of one the base of the next)"
        )
    return form


def dora_squares(
    blocks: Iterable[torch.Tensor], form: DoRA, out_dtype: torch.dtype
) -> torch.Tensor:
    """The sums of squares of `W + ΔW` over the output and kernel axes, `(1, in, 1…)`, of a
    DoRA with one magnitude per input channel (`axis=1`), for `W` given as row `blocks`: the
    first pass of its merge, in the dtype the merge sums in (float64 where that cannot hold
    them, `DoRA.squares`)."""
    squares: torch.Tensor | None = None
    start = 0
    for weight in blocks:
        accumulate = work_dtype(weight.dtype, out_dtype)
        rows = slice(start, start + weight.shape[0])
        start = rows.stop
        total = weight.to(accumulate, copy=True, memory_format=torch.contiguous_format)
        with outside_autocast(total):
            add_dense(total, form.update.to(device=weight.device, dtype=accumulate), 1.0, rows)
        block = form.squares(total)  # float64 where float32 cannot hold it
        if squares is not None:
            summed = squares + block
            # a float32 sum past float32's range, of blocks within it
            block = summed if bool(torch.isfinite(summed).all()) else squares.double() + block
        squares = block
    assert squares is not None  # a weight has rows
    return squares


def merged_blocks(
    blocks: Iterable[torch.Tensor],
    updates: Sequence[tuple[Factors | DoRA, float, str]],
    out_dtype: torch.dtype,
    where: str,
    scratch: Scratch | None = None,
    squares: torch.Tensor | None = None,
    owned: bool = False,
) -> Iterator[torch.Tensor]:
    """`weight + Σ w·ΔW` for `weight` given as consecutive row `blocks`, accumulated in
    float32 (float64 for a float64 weight or `out_dtype`), cast to `out_dtype` and checked
    finite, block by block; for a DoRA layer (alone, `dora_of`) `m ⊙ (W + ΔW) / (‖W + ΔW‖
    + eps)`, which needs the norms of the whole weight first where they run over its rows
    (`axis=1`: `squares` from `dora_squares`).

    Each block's ΔW rows come from the factors of those rows only, so the memory this needs
    is one block and its ΔW, never the whole weight, a float32 copy of it or of ΔW. With
    `scratch`, the sum and the cast reuse its buffers: each block yielded is valid until
    the next is drawn. With `owned`, the blocks are the caller's to overwrite: one already
    contiguous in the dtype of the sum is summed in place.
    """
    forms: list[tuple[Factors, float]] | None = None
    dora = dora_of(updates, where)
    limit = overflow_bound(out_dtype)
    start = 0
    for weight in blocks:
        accumulate = work_dtype(weight.dtype, out_dtype)
        if forms is None:
            _require_weights_fit(updates, accumulate, where)
            if dora is not None:  # LyCORIS' eps is that of the weight's dtype
                dora = dora.for_dtype(weight.dtype).to(device=weight.device, dtype=accumulate)
                forms = [(dora.update, 1.0)]
            else:
                forms = [(form.to(device=weight.device, dtype=accumulate), scale)
                         for form, scale, _ in updates]  # fmt: skip
        rows = slice(start, start + weight.shape[0])
        start = rows.stop
        if owned and weight.dtype == accumulate and weight.is_contiguous():
            total = weight
        elif scratch is None:
            total = weight.to(accumulate, copy=True, memory_format=torch.contiguous_format)
        else:
            total = scratch.take("sum", weight.shape, accumulate).copy_(weight)
        with outside_autocast(total):  # ΔW in the accumulator's dtype inside autocast too
            for form, scale in forms:
                add_dense(total, form, scale, rows)
            if dora is not None:
                norms = dora.squares(total) if squares is None else squares
                dora.rescale_(total, norms, rows)
        low, high = (float(v) for v in torch.aminmax(total))  # NaN propagates, Inf is extreme
        if not (math.isfinite(low) and math.isfinite(high)) and accumulate != torch.float64:
            # a product of factors can overflow float32 where ΔW does not (huge factors, a
            # tiny scale): that block again in float64, as `recompose` does
            total = _merged_in_float64(weight, updates, rows, squares)
            low, high = (float(v) for v in torch.aminmax(total))
        if not (math.isfinite(low) and math.isfinite(high)):
            bad = int((~torch.isfinite(total)).sum())
            sources = ", ".join(source for _, _, source in updates)
            zero = " (a DoRA norm ‖W + ΔW‖ of 0?)" if dora is not None and not dora.eps else ""
            raise NonFiniteError(
                f"{where}: merging {sources} gives {bad} NaN/Inf value(s) in rows {rows.start}–"
                f"{rows.stop - 1}{zero}"
            )
        if total.dtype == torch.float64 and out_dtype.itemsize < 4:
            block = rounded(total, out_dtype)  # a cast would round twice, through float32
        elif scratch is None or out_dtype == total.dtype:
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
    weight: torch.Tensor,
    updates: Sequence[tuple[Factors | DoRA, float, str]],
    rows: slice,
    squares: torch.Tensor | None,
) -> torch.Tensor:
    """`weight + Σ w·ΔW[rows]` summed in float64 (rows `rows` of the whole weight), or a
    DoRA layer's merge of them (`squares`: as for `merged_blocks`)."""
    total = weight.to(torch.float64, copy=True, memory_format=torch.contiguous_format)
    with outside_autocast(total):
        for form, scale, _ in updates:
            if isinstance(form, DoRA):  # LyCORIS' eps is that of the weight's dtype
                form = form.for_dtype(weight.dtype)
            wide = form.to(device=weight.device, dtype=torch.float64)
            add_dense(total, update_of(wide), scale, rows)
            if isinstance(wide, DoRA):
                norms = wide.squares(total) if squares is None else squares.to(torch.float64)
                wide.rescale_(total, norms, rows)
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
        if block.dtype == torch.float64 and dtype.itemsize < 4:
            cast = rounded(block, dtype)  # a cast would round twice, through float32
        else:
            cast = scratch.take("cast", block.shape, dtype).copy_(block)
        if not all_finite(cast) and bool((torch.isinf(cast) & torch.isfinite(block)).any()):
            raise NonFiniteError(f"{where}: casting {block.dtype} to {cast.dtype} overflows")
        yield cast


def output_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
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
    """Write `base + Σ weights[i] · ΔW_i` of every adapter as a dense checkpoint at `out`;
    a DoRA layer's weight becomes `m ⊙ (W + ΔW) / (‖W + ΔW‖ + eps)` (`lowrank.DoRA`).

    `base` is a safetensors file, a sharded checkpoint's index
    (`model.safetensors.index.json`) or its folder; `out` is written the same way (a file,
    or a folder with the same shards and index). An `out` ending in a path separator, or an
    existing folder, takes a one-file checkpoint under the base's file name; where `base` is
    given as a folder (or an index), the folder's other files (`config.json`, a
    tokenizer's; `checkpoint.companion_files`) are copied into the output folder too, a
    `config.json` stating `dtype` and without the `quantization_config` of float8 weights
    written dequantized (the report's `copied_files`, `rewritten_files`). `adapters` are files /
    PEFT folders or `Adapter`s, `weights` one number each (default 1). Each adapter's layers are
    matched to the base's `<module>.weight` keys (a bias layer's to `<module>.bias`: `Full`
    dense differences, `W + diff`, `b + diff_b`; kohya names through the base's module names;
    `component` picks one model of a pipeline adapter). A base weight or bias an adapter saves
    beside its layers (`Adapter.base_weights`: PEFT's `save_embedding_layers`,
    `modules_to_save`, `bias`) takes the place of the base's, as PEFT loads it, before the
    layers are added (`ShapeError` where the shapes differ; `MergeError` where two adapters save
    different ones). Merging streams each base
    tensor a block of rows at a time and accumulates in float32 (float64 for a float64
    weight or `dtype`); floating tensors are stored in `dtype` (`float16`, `bfloat16`,
    `float32`, `float64`) or their own dtype, float64 values rounded once to it (a torch
    cast to a 16-bit or float8 dtype rounds twice, through float32). A float8 weight stored
    with a scale (compressed-tensors `weight_scale`, transformers' fine-grained FP8
    `weight_scale_inv`, ComfyUI's `scale_weight`; per tensor, channel or block,
    `lowrank.io.quantized`) is merged
    as `W8 · s + Σ w·ΔW` and requantized to its dtype (round to nearest), each block keeping
    its scale where the merged values fit and getting `absmax / float8 max` (rounded up to the
    scale's dtype) where not, all in float64 and rounded once (`lowrank.io.quantized`:
    exact). With `dtype` given, every such weight, merged or not, is written dequantized
    instead: `W8 · s` (`+ Σ w·ΔW`) in float64 rounded once to `dtype`, its scale, its
    module's activation scales (`input_scale`, `scale_input`, …) and ComfyUI's markers
    (`scaled_fp8`, `<module>.comfy_quant`) and the FP8 KV cache's scales (`k_scale`,
    `v_scale`, `q_scale`) left out (`Quantization.dequantized_away`; the report's
    `dequantized_tensors` and `dropped_tensors`), and the module out of the layers of
    ComfyUI's `_quantization_metadata`; the `quantization_config` of the `config.json`
    beside the base must then be left out of the output's (done in a copy into a folder).

    Errors, raised before anything is written where they can be: `TargetError` (a layer
    with no module in the base), `MergeError` (a weight tied to another where the
    checkpoint tells of it, `layouts.tied_weights`: ΔW would change both; a DoRA layer
    beside another layer on its weight, or at a weight other than 1, `dora_of`), `ShapeError`,
    `NonFiniteError` (NaN/Inf factors or scales, or a merged or dequantized weight that is
    not finite or overflows its dtype), `DTypeError` (a layer on integer-packed weights:
    GPTQ, AWQ, bitsandbytes, compressed-tensors `pack-quantized`), `FileFormatError` (a
    float8 weight's scale of unknown or contradicted convention), `OutputPathError` (`out`
    is an input or cannot be written; a file `out` ends in a separator, which names a
    folder; a folder `out` holds another checkpoint's index, or the one file or index of
    the other layout: an older merge that loaders would take for this one),
    `FileFormatError` (an unreadable or corrupt input, a companion file included). A
    failure leaves no output. A sharded output replaces the checkpoint of the same index
    name in `out`, whose shards it does not have are removed once its index is in place
    (`CheckpointWriter`). Returns a report of what was merged.
    """
    progress = require_flag("progress", progress)
    component = require_name("component", component)
    checkpoint = Checkpoint(base)
    given = out  # a folder where it ends in a separator, but never one named as a file
    out = output_path(
        out, lambda path: not checkpoint.sharded and path.suffix.lower() == ".safetensors"
    )
    require_reachable(out, OutputPathError, "write")
    into_folder = checkpoint.sharded or ends_in_separator(given) or out.is_dir()
    if not checkpoint.sharded and into_folder:  # the file under its own name in the folder
        indexes = sorted(out.glob(f"*{INDEX_SUFFIX}")) if out.is_dir() else []
        if indexes:
            raise OutputPathError(
                f"output folder {out} holds the index {indexes[0].name} of a sharded "
                f"checkpoint, which loaders of the folder would take for the merged "
                f"{checkpoint.path.name}: remove it or write to another folder"
            )
        out = out / checkpoint.path.name
    if isinstance(adapters, (str, os.PathLike, Adapter)):
        sources = [adapters]
    else:
        sources = require_list("adapters", adapters, "adapter paths or Adapters")
    if not sources:
        raise ArgumentError("give at least one adapter to merge")
    scales = require_weights("weights", weights, len(sources), "adapters")
    out_dtype = output_dtype(dtype)
    updates: dict[str, list[tuple[Factors | DoRA, float, str]]] = {}
    fitted_adapters: list[tuple[Adapter, str, float]] = []
    inputs = list(checkpoint.inputs)
    readings: dict[Path, str] = {}
    rows = []
    quantization = Quantization(checkpoint)
    for source, scale in zip(sources, scales, strict=True):
        adapter = adapter_from(source)
        label = str(adapter.source or "adapter")
        if adapter.source:
            inputs += adapter_files(adapter.source, adapter.format)
            readings.update(adapter_readings(adapter.source, adapter.format))
        packed = quantization.packed_module(adapter.layers)
        if packed is not None:
            raise quantization.refusal(f"{packed}.weight", f"merging {label}")
        try:
            fitted = adapter.for_model(checkpoint, component)
        except (ShapeError, TargetError) as error:
            refusal = unmatched_refusal(quantization, error, label)
            if refusal is not None:
                raise refusal from error
            raise
        layers = fitted.layers
        fitted_adapters.append((fitted, label, scale))
        require_no_packed(quantization, map(parameter_key, layers), f"merging {label}")
        for module, form in layers.items():
            key = parameter_key(module)
            if not holds_weights(checkpoint.infos[key].dtype):
                raise DTypeError(
                    f"{checkpoint.path}: {key} is {checkpoint.infos[key].dtype}; {label} merges "
                    "into floating-point weights only (a quantized checkpoint?)"
                )
            updates.setdefault(key, []).append((form, scale, label))
        rows.append({"adapter": label, "weight": scale, "layers": len(layers)})
    replaced = joined_base_weights(fitted_adapters, MergeError)  # PEFT loads them in place
    # the merged file, or the folder of a sharded checkpoint
    doras = {key: dora_of(found, f"{checkpoint.path}: {key}") for key, found in updates.items()}
    weights_merged = [key.removesuffix(".weight") for key in updates if key.endswith(".weight")]
    ties = tied_weights(checkpoint, weights_merged)
    for module, names in ties.items():
        labels = ", ".join(label for _, _, label in updates[f"{module}.weight"])
        raise MergeError(
            f"{checkpoint.path}: {module}.weight, which {labels} adapts, is also "
            f"{', '.join(names)}: tied weights, which the merge would change too; untie them "
            "first (save the model with tie_word_embeddings=False, which stores each as its own "
            f"tensor), or leave {module!r} out of the adapter"
        )
    scaled_keys = [*updates, *replaced]
    if out_dtype is not None:  # every scaled weight is written dequantized, merged or not
        scaled_keys += [k for k, info in checkpoint.infos.items() if info.dtype in FLOAT8]
    plans = _scaled_plans(quantization, scaled_keys)
    # the scales, activation scales and markers of weights written dequantized, the KV cache's
    dropped = sorted(quantization.dequantized_away) if out_dtype is not None else []
    metadata = None
    if out_dtype is not None:  # and ComfyUI's list of quantized layers without them
        modules = quantization.scaled_modules
        metadata = {f: metadata_without(m, modules) for f, m in checkpoint.metadata.items()}
    for key in sorted(plans.keys() & replaced.keys()):
        if replaced[key].element_size() == 1:  # float8 values, which stand for no weights alone
            raise DTypeError(
                f"{checkpoint.path}: {key} is float8 stored with the scale {plans[key].scale}, "
                f"and an adapter saves a whole {replaced[key].dtype} tensor in its place: its "
                "float8 values stand for weights only with a scale of their own, which the "
                "adapter does not give; save the whole tensor dequantized (float16, bfloat16 "
                "or float32) or leave it out"
            )
    folder = out if checkpoint.sharded else out.parent
    if into_folder and same_path(folder, checkpoint.path.parent):
        raise OutputPathError(
            f"output folder {folder} is the folder of the checkpoint {checkpoint.path} "
            "given as input; write to a new folder (inputs are never overwritten)"
        )
    model_folder = isinstance(base, (str, os.PathLike)) and (
        checkpoint.sharded or os.path.isdir(base)
    )
    dequantizing = out_dtype is not None and bool(plans)
    companions = (
        _companions(checkpoint, folder, out_dtype, dequantizing)
        if model_folder and into_folder
        else []
    )
    inputs += [source for source, _, _ in companions]
    require_outputs([out, *(target for _, target, _ in companions)], inputs, readings)
    if isinstance(base, (str, os.PathLike)):
        require_outside_folders(out, [Path(base)], "the merged checkpoint")
    packed = tuple(f"{module}." for module in quantization.packed)  # codes, scales, zeros
    dtypes = {
        k: out_dtype if out_dtype and holds_weights(info.dtype) and not k.startswith(packed)
        else info.dtype
        for k, info in checkpoint.infos.items()
    }

    scratch = Scratch()

    def values(plan: ScaledWeight) -> Iterator[torch.Tensor]:
        """The merged weight of `plan` in float64 (`W8 · s` exact, ΔW rounded once), as
        row blocks, each the caller's to overwrite until the second block after it is
        drawn (in `scratch`'s buffers)."""
        key, where = plan.weight, f"{checkpoint.path}: {plan.weight}"

        def source(buffers: Scratch) -> Iterator[torch.Tensor]:
            if key in replaced:  # the saved weight, as it stands, in place of W8 · s
                whole = replaced[key].to(torch.float64)
                return (buffers.take("dequantized", b.shape, b.dtype).copy_(b)
                        for b in row_blocks(whole))  # fmt: skip
            return dequantized_blocks(checkpoint, plan, CHUNK_ELEMENTS, torch.float64, buffers)

        if key not in updates:
            return source(scratch)
        # a LyCORIS DoRA's eps is that of the float8 weight's dtype, not of the float64 sum
        stored = checkpoint.infos[key].dtype
        found = [(form.for_dtype(stored) if isinstance(form, DoRA) else form, weight, source_)
                 for form, weight, source_ in updates[key]]  # fmt: skip
        dora, squares = dora_of(found, where), None
        if dora is not None and dora.axis == 1:  # norms over all rows: a first pass, in
            # buffers of its own (the writer may still be writing the last block of the
            # tensor before, from `scratch`'s, while this pass reads every block)
            squares = dora_squares(source(Scratch()), dora, torch.float64)
        return merged_blocks(source(scratch), found, torch.float64, where, None, squares,
                             owned=True)  # fmt: skip

    # a block whose merged values its stored scale cannot hold gets a larger one, known once
    # its rows are merged: in the same pass where the scale is written after the weight and
    # a grid row's weight rows fit one row block, else from a first pass over the weight
    requantized = plans if out_dtype is None else {}
    order = {key: i for i, key in enumerate(checkpoint.infos)}
    one_pass = {
        key for key, plan in requantized.items()
        if order[plan.scale] > order[key] and _block_rows(checkpoint, key) >= plan.block[0]
    }  # fmt: skip
    scales = {
        plan.scale: fitted_scale(
            plan,
            stored_scale(checkpoint, plan),
            block_peaks(plan, values(plan)),
            checkpoint.infos[plan.weight].dtype,
            f"{checkpoint.path}: {plan.weight}",
        )
        for key, plan in requantized.items()
        if key not in one_pass
    }
    pending: dict[str, Requantized] = {}  # scale key → its weight's, written before it

    def merged(key: str) -> tuple[str, Blocks]:
        where = f"{checkpoint.path}: {key}"
        if key in requantized:
            plan = plans[key]
            rows, stored = checkpoint.infos[key].shape[0], stored_scale(checkpoint, plan)
            requantizer = Requantized(plan, rows, stored, dtypes[key], where, scratch,
                                      scales.get(plan.scale))  # fmt: skip
            pending[plan.scale] = requantizer
            return key, requantizer.blocks(values(plan))
        if key in plans:  # dequantized, rounded once to `dtype`
            return key, rounded_blocks(values(plans[key]), dtypes[key], where)
        if key in pending:  # its weight's blocks are all written: the scale is complete
            scales[key] = pending.pop(key).scale
        if key in scales:
            return key, scales[key]
        blocks = checkpoint.row_blocks(key, CHUNK_ELEMENTS, scratch)
        if key in replaced:  # PEFT loads the saved weight into the base's dtype, then merges
            blocks = row_blocks(replaced[key].to(checkpoint.infos[key].dtype))
        if key in updates:
            dora, squares = doras[key], None
            if dora is not None and dora.axis == 1:  # norms over all rows: a first pass
                first = checkpoint.row_blocks(key, CHUNK_ELEMENTS)  # own buffers, not scratch's
                if key in replaced:
                    first = row_blocks(replaced[key].to(checkpoint.infos[key].dtype))
                squares = dora_squares(first, dora, dtypes[key])
            return key, merged_blocks(blocks, updates[key], dtypes[key], where, scratch, squares)
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
        writer = CheckpointWriter(checkpoint, out, staging, dtypes, dropped, metadata)
        if checkpoint.sharded:  # its files in the folder `out`, and those they make obsolete
            require_outputs([*writer.outputs, *writer.obsolete], inputs, readings)
        for source, target, content in companions:  # first: a failure costs no merging
            _stage_copy(staging, source, target, content)
        writer.write_all(merged(key) for key in stream if key in writer.kept)
    return {
        "base": str(checkpoint.path),
        "output": [str(p) for p in writer.outputs],
        "copied_files": [str(target) for _, target, _ in companions],
        "rewritten_files": [str(target) for _, target, content in companions if content],
        "dtype": None if out_dtype is None else str(out_dtype).removeprefix("torch."),
        "adapters": rows,
        "merged_tensors": len(updates),  # and `replaced_tensors`: keys of saved base weights
        "replaced_tensors": sorted(replaced),
        "requantized_tensors": sorted(requantized),
        "dequantized_tensors": sorted(plans.keys() - requantized.keys()),
        "dropped_tensors": dropped,
        "rescaled_tensors": sorted(
            key for key, scale in scales.items() if not torch.equal(scale, checkpoint.get(key))
        ),
        "tensors": len(checkpoint.infos),
    }


def _companions(
    checkpoint: Checkpoint, folder: Path, dtype: torch.dtype | None, dequantizing: bool
) -> list[tuple[Path, Path, bytes | None]]:
    """`(source, target, content)` for each of the base folder's `companion_files`, to be
    written in `folder` beside the merged checkpoint: its bytes (`content` None) or, for a
    `config.json` whose model the merge changes, the JSON changed to match (`_config_for`):
    `torch_dtype` / `dtype` (whichever it has, and those of nested models) set to the `dtype`
    the weights are written in, and, where
    scaled float8 weights are written `dequantizing`, no `quantization_config` (nor the older
    `compression_config`), by which a loader would build quantized layers and look for the
    scales left out. `FileFormatError` for such a `config.json` that is not JSON."""
    found = []
    for source in companion_files(checkpoint.path.parent):
        content = None
        if source.name == "config.json" and dtype is not None:
            config = read_json(source)
            if isinstance(config, dict):
                changed = _config_for(config, str(dtype).removeprefix("torch."), dequantizing)
                if changed != config:
                    content = (json.dumps(changed, indent=2, ensure_ascii=False) + "\n").encode()
        found.append((source, folder / source.name, content))
    return found


def _config_for(config: dict[str, Any], dtype: str, dequantizing: bool) -> dict[str, Any]:
    """`config` (a `config.json`'s object) stating `dtype` in its `torch_dtype` / `dtype`,
    and in those of the models it nests (a multimodal model's `text_config`,
    `vision_config`: objects with a `model_type`), whose weights the output holds in `dtype`
    too; without `quantization_config` / `compression_config` where `dequantizing`. Keys
    keep their order."""
    changed = {}
    for key, value in config.items():
        if dequantizing and key in ("quantization_config", "compression_config"):
            continue
        if key in ("torch_dtype", "dtype"):
            value = dtype
        elif isinstance(value, dict) and "model_type" in value:
            value = _config_for(value, dtype, dequantizing)
        changed[key] = value
    return changed


_COPY_BYTES = 1 << 20  # a companion file is copied this many bytes at a time


def _stage_copy(staging: Staging, source: Path, target: Path, content: bytes | None) -> None:
    """Stage `content`, or where it is None the bytes of `source`, for `target`; an error
    reading `source` is a `FileFormatError` naming it (one writing, an `OutputPathError`)."""
    with staging.writing(target) as temp, temp.open("wb") as sink:
        if content is not None:
            sink.write(content)
            return
        try:
            stream = source.open("rb")
        except OSError as err:
            raise FileFormatError(f"cannot read {source}: {err.strerror}") from None
        with stream:
            while True:
                try:
                    chunk = stream.read(_COPY_BYTES)
                except OSError as err:
                    raise FileFormatError(f"cannot read {source}: {err.strerror}") from None
                if not chunk:
                    return
                sink.write(chunk)


def _block_rows(checkpoint: Checkpoint, key: str) -> int:
    """The rows of each row block `checkpoint.row_blocks(key, CHUNK_ELEMENTS)` reads (and
    `row_blocks` splits), the last one excepted."""
    return max(1, CHUNK_ELEMENTS // max(1, math.prod(checkpoint.infos[key].shape[1:])))


def _scaled_plans(quantization: Quantization, keys: Iterable[str]) -> dict[str, ScaledWeight]:
    """The scaled float8 weights among `keys` (`Quantization.scaled`: `FileFormatError`
    for a scale of unknown or contradicted convention)."""
    return {key: plan for key in keys if (plan := quantization.scaled(key)) is not None}
