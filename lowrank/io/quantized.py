"""Quantized base checkpoints: float8 weights stored with a scale, read as the weights they
stand for and requantized after a merge, and integer-packed weights, which are refused.

A scaled float8 weight is `W = W8 · s`: its float8 values (`float8_e4m3fn`, `float8_e5m2`
or ROCm's FNUZ variants) times the scale of the block each lies in, over the weight's 2-D
view `(out, in·K)`. A merge into it is computed in float64, where `W8 · s` is exact, and
rounded once to float8 (`rounded`). The conventions read:

- compressed-tensors (llm-compressor's `*-FP8`, `*-FP8-dynamic`, `*-FP8-BLOCK`, read by
  vLLM): `<m>.weight_scale`, per tensor `(1,)`, per output channel `(out, 1)`, per block
  `(⌈out/b₀⌉, ⌈in/b₁⌉)` (`block_structure`) or per group `(out, in/g)` (`group_size`);
  `config.json`'s `quantization_config` has `quant_method: compressed-tensors`. ComfyUI's
  quantized checkpoints store a per-tensor `<m>.weight_scale` alike.
- transformers' fine-grained FP8 (DeepSeek-V3, Qwen3-FP8; `quant_method: fp8`):
  `<m>.weight_scale_inv`, one per block of `weight_block_size` (the last row and column of
  blocks partial where the shape is no multiple of it), or one per tensor without a block
  size. The stored value multiplies, whatever its name says.
- ComfyUI's scaled fp8 checkpoints (a `scaled_fp8` marker tensor): `<m>.scale_weight`,
  per tensor; musubi-tuner's per channel `(out, 1)` or per block of `in/n` columns
  `(out, n, 1)`.

Written dequantized instead (`merge_checkpoint`'s `dtype`), the weight is `W8 · s` (merged
or not) in float64 rounded once to float16, bfloat16 or float32 (`rounded_blocks`).

Activation scales (`input_scale`, `scale_input`) and markers are copied as they are (left
out with the scales, `Quantization.auxiliary`, where the weights are dequantized, and the
modules left out of ComfyUI's `_quantization_metadata`, `metadata_without`). A
scale of another shape, two scales for one weight, a zero point, a scale name no
convention uses, or a block size that `config.json` contradicts is a `FileFormatError`
naming the tensor. Integer-packed weights (GPTQ / AWQ `qweight`, compressed-tensors
`weight_packed`, bitsandbytes 4-bit and int8, integer weights with a scale) have no exact
merge into their stored form: `DTypeError` naming the tensor and the quantization.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._checks import all_finite, overflow_bound, require_finite
from ..errors import DTypeError, FileFormatError, NonFiniteError, ShapeError, TargetError
from .checkpoint import Checkpoint
from .files import INT_DIGITS, Scratch, config_at, holds_weights, parse_json

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
"""The float8 dtypes of numbers a safetensors file holds (`F8_E4M3`, `F8_E5M2`, and ROCm's
`F8_E4M3FNUZ`, `F8_E5M2FNUZ`)."""

SCALE_NAMES = {
    "weight_scale": "compressed-tensors / ComfyUI",
    "weight_scale_inv": "transformers fine-grained FP8",
    "scale_weight": "ComfyUI scaled fp8",
}
"""`<module>.<name>` of a float8 weight's scale → the convention that stores it so."""

ACTIVATION_SCALES = frozenset({"input_scale", "scale_input", "output_scale", "k_scale",
                               "v_scale", "q_scale"})  # fmt: skip
"""Scales of a module's activations (static FP8 inputs, a KV cache): no part of its weight."""

CACHE_SCALES = frozenset({"k_scale", "v_scale", "q_scale"})
"""Scales of an attention module's FP8 KV cache (`self_attn.k_scale`): what a checkpoint's
`quantization_config` (its `kv_cache_scheme`) describes, like its scaled weights."""

LAYER_MARKERS = frozenset({"comfy_quant"})
"""Tensors `<module>.<name>` that say how a module's weight is quantized (ComfyUI's mixed
precision: its format as JSON bytes)."""

QUANTIZATION_METADATA = "_quantization_metadata"
"""The safetensors metadata entry of ComfyUI's quantized checkpoints: JSON whose `layers`
maps each quantized module to its format."""

MERGE_ADVICE = "merge into the unquantized checkpoint and quantize the result afterwards"

_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_PACKED_LEAVES = {
    "qweight": "GPTQ / AWQ (qweight, qzeros, scales)",
    "weight_packed": "compressed-tensors pack-quantized (weight_packed, weight_shape)",
    "SCB": "bitsandbytes int8 (LLM.int8(): weight int8, SCB)",
}
_WEIGHT_PARTS = {
    **dict.fromkeys(("absmax", "quant_map", "nested_absmax", "quant_state.bitsandbytes__nf4",
                     "quant_state.bitsandbytes__fp4"), "bitsandbytes 4-bit (nf4 / fp4)"),
    **dict.fromkeys(("_data", "_scale"), "optimum-quanto (weight._data, weight._scale)"),
}  # fmt: skip
"""Keys `<module>.weight.<suffix>` saved beside (or for) a quantized weight → its format."""


@dataclass(frozen=True)
class ScaledWeight:
    """A float8 weight `weight` (key) stored with the scale `scale` (key): each scale entry
    multiplies a `block` of `(rows, columns)` of the weight's 2-D view `(out, in·K)`, `grid`
    entries along each (the last ones partial)."""

    weight: str
    scale: str
    block: tuple[int, int]
    grid: tuple[int, int]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _flat(shape: tuple[int, ...]) -> tuple[int, int]:
    """`(out, in·K)`, the 2-D view of a weight of `shape`."""
    return shape[0], math.prod(shape[1:])


def _positive_int(value: object) -> int | None:
    """`value` as a positive integer (an int, a float of one, or its ASCII digits); None for
    anything else (a bool, a fraction, Inf, NaN, other text: `"¹"` is a digit to `str.isdigit`
    but none to `int`)."""
    if isinstance(value, str):
        digits = value.strip()
        if not (digits.isascii() and digits.isdigit()) or len(digits) > INT_DIGITS:
            return None  # more digits than `int` reads
        value = int(digits)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if value > 0 else None


def _block_pair(value: object) -> tuple[int, int] | None:
    """`value` as a block size `(rows, columns)`: two positive integers, or a string
    `"RxC"`; None otherwise."""
    if isinstance(value, str) and "x" in value:
        value = value.split("x")
    if isinstance(value, (list, tuple)) and len(value) == 2:
        rows, columns = _positive_int(value[0]), _positive_int(value[1])
        return None if rows is None or columns is None else (rows, columns)
    return None


class Quantization:
    """What a checkpoint's keys and the `config.json` beside it say of its quantized weights.

    `scaled(key)` is the `ScaledWeight` of a float8 weight with a scale (None for any other
    tensor); `packed` maps each module whose weight is integer-packed to one of its tensors
    and the quantization's name.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.config_path = checkpoint.path.parent / "config.json"
        config = config_at(self.config_path) or {}
        settings = config.get("quantization_config")
        self.settings: Mapping[str, object] = settings if isinstance(settings, dict) else {}
        self.leaves: dict[str, set[str]] = {}
        for key in checkpoint.infos:
            module, _, leaf = key.rpartition(".")
            self.leaves.setdefault(module, set()).add(leaf)
        self.packed = self._packed()

    def _packed(self) -> dict[str, tuple[str, str]]:
        infos = self.checkpoint.infos
        found: dict[str, tuple[str, str]] = {}
        for key, info in infos.items():
            module, _, leaf = key.rpartition(".")
            if leaf in _PACKED_LEAVES:
                found.setdefault(module, (key, _PACKED_LEAVES[leaf]))
            elif (
                leaf == "weight"
                and not holds_weights(info.dtype)
                and (self.leaves.get(module, set()) & set(SCALE_NAMES))
            ):
                found.setdefault(module, (key, f"{info.dtype} weights with a scale"))
            for suffix, name in _WEIGHT_PARTS.items():
                if key.endswith(f".weight.{suffix}"):
                    found.setdefault(key[: -len(f".weight.{suffix}")], (key, name))
        return found

    def refusal(self, key: str, tool: str, advice: str = MERGE_ADVICE) -> DTypeError:
        """The `DTypeError` for `tool` on the weight `key` of an integer-packed module."""
        module = key.removesuffix(".weight")
        tensor, name = self.packed[module]
        return DTypeError(
            f"{self.checkpoint}: {tensor} is quantized as {name}, packed codes with scales "
            f"that no weight {tool} computes has exactly and that lowrank does not unpack; "
            f"{advice}"
        )

    @property
    def scaled_modules(self) -> set[str]:
        """The modules whose `.weight` is float8 stored beside a scale."""
        return {
            module
            for module, leaves in self.leaves.items()
            if leaves & set(SCALE_NAMES)
            and (weight := self.checkpoint.infos.get(f"{module}.weight")) is not None
            and weight.dtype in FLOAT8
        }

    @property
    def auxiliary(self) -> set[str]:
        """The keys that are parts of float8 weights stored scaled rather than weights: each
        one's scale, its module's activation scales and ComfyUI's `comfy_quant` marker, and
        ComfyUI's `scaled_fp8` marker."""
        found = {key for key in self.checkpoint.infos if key.rpartition(".")[2] == "scaled_fp8"}
        for module in self.scaled_modules:
            named = self.leaves[module] & (set(SCALE_NAMES) | ACTIVATION_SCALES | LAYER_MARKERS)
            found |= {f"{module}.{leaf}" for leaf in named}
        return found

    @property
    def dequantized_away(self) -> set[str]:
        """The keys a merge writing every scaled weight dequantized leaves out: `auxiliary`,
        and where there is any such weight, the KV cache's scales (`CACHE_SCALES`), which the
        `quantization_config` to be removed with them describes."""
        found = self.auxiliary
        if self.scaled_modules:
            found |= {key for key in self.checkpoint.infos
                      if key.rpartition(".")[2] in CACHE_SCALES}  # fmt: skip
        return found

    def packed_module(self, names: Iterable[str]) -> str | None:
        """The first integer-packed module that one of `names` (layer names: module paths,
        perhaps under a component or a prefix) names, or None."""
        for name in names:
            for module in self.packed:
                if name == module or name.endswith(f".{module}") or module.endswith(f".{name}"):
                    return module
        return None

    def _config_blocks(self) -> list[tuple[int, int]] | None:
        """The block sizes `(rows, columns)` `config.json` states for scale grids: its
        `weight_block_size` (`quant_method: fp8`), or each config group's `block_structure`
        and `(1, group_size)` (compressed-tensors); None where it has no quantization config
        of either method (the scales' shapes alone then tell)."""
        method = self.settings.get("quant_method")
        if method == "fp8":
            stated = self.settings.get("weight_block_size")
            if stated is None:
                return []
            pair = _block_pair(stated)
            if pair is None:
                raise FileFormatError(
                    f"{self.config_path}: quantization_config.weight_block_size is {stated!r}; "
                    "expected two positive integers"
                )
            return [pair]
        if method != "compressed-tensors":
            return None
        blocks = []
        groups = self.settings.get("config_groups")
        for group in (groups or {}).values() if isinstance(groups, dict) else ():
            weights = group.get("weights") if isinstance(group, dict) else None
            if not isinstance(weights, dict):
                continue
            if weights.get("block_structure") is not None:
                pair = _block_pair(weights["block_structure"])
                if pair is None:
                    raise FileFormatError(
                        f"{self.config_path}: a config group's block_structure is "
                        f"{weights['block_structure']!r}; expected two positive integers"
                    )
                blocks.append(pair)
            size = weights.get("group_size")
            # no groups: None, or -1 (per channel) as some configs write it
            if size is not None and not (type(size) is int and size <= 0):
                columns = _positive_int(size)
                if columns is None:
                    raise FileFormatError(
                        f"{self.config_path}: a config group's group_size is {size!r}; "
                        "expected a positive integer"
                    )
                blocks.append((1, columns))
        return blocks

    def scaled(self, key: str) -> ScaledWeight | None:
        """The `ScaledWeight` of the float8 weight `key` where a scale is stored beside it,
        None for a tensor without one (a plain float8 weight too); `FileFormatError` naming
        the tensor where the scale's convention is unknown or contradicted, or a scale lies
        beside a weight of a wider dtype (which no convention scales)."""
        info = self.checkpoint.infos[key]
        module = key.removesuffix(".weight")
        leaves = self.leaves.get(module, set())
        if info.dtype not in FLOAT8 and key.endswith(".weight") and leaves & set(SCALE_NAMES):
            scale = sorted(leaves & set(SCALE_NAMES))[0]
            raise FileFormatError(
                f"{self.checkpoint}: {key} is {str(info.dtype).removeprefix('torch.')} and "
                f"stored beside {module}.{scale}, a scale the conventions lowrank reads give "
                "float8 weights only (W = W8 · scale); whether it multiplies this weight "
                "cannot be told, so nothing is merged into it"
            )
        if info.dtype not in FLOAT8 or not key.endswith(".weight") or 0 in info.shape:
            return None  # an empty weight has nothing to merge
        names = sorted(leaves & set(SCALE_NAMES))
        where = f"{self.checkpoint}: {key} ({str(info.dtype).removeprefix('torch.')})"
        unknown = sorted(leaf for leaf in leaves - set(SCALE_NAMES) - ACTIVATION_SCALES
                         if "scale" in leaf or "zero_point" in leaf)  # fmt: skip
        if unknown:
            raise FileFormatError(
                f"{where} is stored beside {module}.{unknown[0]}, a scale or zero point of no "
                f"convention lowrank reads ({', '.join(SCALE_NAMES)}: W = W8 · scale); its "
                "values cannot be told from the float8 ones, so nothing is merged into it"
            )
        if not names:
            return None
        if len(names) > 1:
            raise FileFormatError(
                f"{where} has two scales, {module}.{names[0]} and {module}.{names[1]}; one "
                "convention stores one"
            )
        scale = f"{module}.{names[0]}"
        scale_info = self.checkpoint.infos[scale]
        if not info.shape:
            raise FileFormatError(f"{where} is 0-d, which no convention stores with a scale")
        if scale_info.dtype not in _SCALE_DTYPES:
            raise FileFormatError(
                f"{where}: its scale {scale} is {scale_info.dtype}; the conventions lowrank "
                "reads store scales in float16, bfloat16, float32 or float64"
            )
        block = self._block(info.shape, scale_info.shape, names[0], f"{where}: its scale {scale}")
        out, cols = _flat(info.shape)
        grid = (_ceil(out, block[0]), _ceil(cols, block[1]))
        # a block past the weight's edge (a config's block size of 2⁴⁰) covers the weight:
        # the same grid, and rows are padded to whole blocks of the weight's width only
        block = (min(block[0], out), min(block[1], cols))
        return ScaledWeight(key, scale, block, grid)

    def _block(
        self, shape: tuple[int, ...], scale: tuple[int, ...], name: str, where: str
    ) -> tuple[int, int]:
        """The block `(rows, columns)` of the 2-D view of a weight of `shape` that each entry
        of a scale of shape `scale` (stored as `name`) covers; `FileFormatError` (`where`)
        where the shape fits no convention, or `config.json`'s block size contradicts it."""
        out, cols = _flat(shape)
        if 0 in scale:
            raise FileFormatError(
                f"{where} has shape {tuple(scale)}, which holds no scale for the weight "
                f"{tuple(shape)}"
            )
        blocks = self._config_blocks()
        strict = name == "weight_scale_inv" and self.settings.get("quant_method") == "fp8"
        if strict:  # transformers reads one grid, of weight_block_size (or one scale)
            block = blocks[0] if blocks else (out, cols)
            grid = (_ceil(out, block[0]), _ceil(cols, block[1]))
            if tuple(scale) == grid or (grid == (1, 1) and math.prod(scale) == 1):
                return block
            raise FileFormatError(
                f"{where} has shape {tuple(scale)}, but {self.config_path} gives "
                f"weight_block_size {list(blocks[0]) if blocks else None}, for which a weight "
                f"{tuple(shape)} has {grid[0]}×{grid[1]} scales"
            )
        if math.prod(scale) == 1:
            return out, cols
        if tuple(scale) in ((out,), (out, 1), (out, *[1] * (len(shape) - 1))):
            return 1, cols  # one per output channel, of a convolution's too
        musubi = len(scale) == 3 and scale[0] == out and scale[2] == 1  # viewed (out, n, in/n)
        if len(shape) == 2 and musubi and cols % scale[1] == 0:
            return 1, cols // scale[1]
        if len(shape) == 2 and len(scale) == 2:
            if blocks is not None:
                for block in blocks:
                    if (_ceil(out, block[0]), _ceil(cols, block[1])) == tuple(scale):
                        return block
                raise FileFormatError(
                    f"{where} has shape {tuple(scale)}, which no block size of "
                    f"{self.config_path} ({[list(b) for b in blocks]}) gives a weight "
                    f"{tuple(shape)}"
                )
            # equal blocks, as transformers reads a grid, where no other block size gives it:
            # blocks of b with ⌈n/b⌉ = g are many (a (384, 300) weight's 3×3 grid of 128×128
            # blocks, the last column partial, divides it into 128×100 too), but of powers of
            # two only n/g where that is one (or g = 1, one block over all)
            if all(n % g == 0 and (g == 1 or (n // g) & (n // g - 1) == 0)
                   for n, g in ((out, scale[0]), (cols, scale[1]))):  # fmt: skip
                return out // scale[0], cols // scale[1]
            raise FileFormatError(
                f"{where} has shape {tuple(scale)}, which does not divide the weight "
                f"{tuple(shape)} into equal blocks of powers of two, and no config.json beside "
                "the checkpoint gives the block size (quantization_config.weight_block_size, or "
                "a config group's block_structure): the blocks cannot be told"
            )
        raise FileFormatError(
            f"{where} has shape {tuple(scale)}, which fits no convention for a weight "
            f"{tuple(shape)}: one scale, one per output channel ({out}, 1), or a 2-D grid of "
            "blocks of a 2-D weight"
        )


def _row_groups(plan: ScaledWeight, start: int, rows: int) -> torch.Tensor:
    """The scale-grid row of each weight row `start … start + rows − 1`."""
    return torch.arange(start, start + rows) // plan.block[0]


def _row_scales(plan: ScaledWeight, grid: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """The scales of rows `start … start + rows − 1`, `(rows, grid columns, 1)`, to
    broadcast over their `_blocked` views."""
    return grid[_row_groups(plan, start, rows)].unsqueeze(-1)


def _blocked(plan: ScaledWeight, block: torch.Tensor) -> torch.Tensor:
    """`block` (rows of the weight) as its 2-D view zero-padded to whole column blocks,
    `(rows, grid columns, block columns)` (a view where the last block is whole)."""
    flat = block.reshape(block.shape[0], -1)
    extra = plan.grid[1] * plan.block[1] - flat.shape[1]
    if extra:
        flat = F.pad(flat, (0, extra))
    return flat.reshape(block.shape[0], plan.grid[1], plan.block[1])


def _divided(
    plan: ScaledWeight, block: torch.Tensor, grid: torch.Tensor, start: int
) -> torch.Tensor:
    """`block` (float64 rows `start …` of the weight) divided by the scale of each entry, as
    its zero-padded 2-D view; 0 for a 0 over a scale of 0 (a quantizer's scale for a block
    of zeros), ±Inf for another value over it (no float8 value stands for it)."""
    scales = _row_scales(plan, grid, start, block.shape[0])
    blocked = _blocked(plan, block)
    quotient = blocked / scales
    if bool((scales == 0).any()):
        quotient = torch.where((scales == 0) & (blocked == 0), 0.0, quotient)
    return quotient.reshape(block.shape[0], -1)


def rounded(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `values` (finite ones below `overflow_bound(dtype)`) rounded once to nearest `dtype`
    (a float8 dtype, float16, bfloat16, float32 or float64), ties to even. torch casts
    float64 to float8, float16 and bfloat16 through float32, rounding twice (a value just
    off a midpoint of two values of `dtype` can round to the midpoint, then to the even
    side); rounded to float32 *to odd* first (toward zero, its last bit set where that was
    inexact), the second rounding is exact: float32 keeps 13 more bits than float16 (20
    more than float8, 16 than bfloat16), and an odd last bit is never a midpoint."""
    if dtype in (torch.float32, torch.float64):
        return values.to(dtype)  # one rounding (none to float64)
    near = values.to(torch.float32)
    error = values - near  # exact in float64: below half a float32 step of `values`
    bits = near.view(torch.int32)  # sign and magnitude: ±1 steps |near| away from zero
    bits = bits - (error * near < 0).to(torch.int32)  # past `values`: one step toward zero
    bits = bits | (error != 0).to(torch.int32)
    once = bits.view(torch.float32).to(dtype)
    if not all_finite(values):  # NaN and ±Inf as a cast makes them (the bits above: NaN)
        once = torch.where(torch.isfinite(values), once, values.to(dtype))
    return once


def rounded_blocks(
    blocks: Iterable[torch.Tensor], dtype: torch.dtype, where: str
) -> Iterator[torch.Tensor]:
    """Each float64 row block of a weight (`W8 · s` dequantized, `dequantized_blocks`, or
    merged) rounded once to nearest `dtype` (float16, bfloat16, float32, `rounded`);
    `NonFiniteError` (`where`) for a value that would round past its range (or NaN)."""
    start = 0
    for block in blocks:
        rows = block.shape[0]
        peak = float(block.abs().max()) if block.numel() else 0.0
        if not peak < overflow_bound(dtype):
            bad = (
                f"hold {int(block.isnan().sum())} NaN value(s)" if math.isnan(peak)
                else f"(|value| up to {peak:.4g}) overflow {dtype}"
            )  # fmt: skip
            raise NonFiniteError(
                f"{where}: rows {start}–{start + rows - 1} of the dequantized weight {bad}"
            )
        yield rounded(block, dtype)
        start += rows


def metadata_without(metadata: dict[str, str], modules: Iterable[str]) -> dict[str, str]:
    """A file's safetensors `metadata` with the `modules` (written dequantized) left out of
    ComfyUI's `_quantization_metadata` layers (named as the module, or a dotted suffix of it),
    the entry itself where it lists no other; as it is where it holds no such JSON."""
    try:
        content = parse_json(metadata.get(QUANTIZATION_METADATA, ""))
    except (ValueError, RecursionError):  # no JSON, or nested past Python's parser
        return metadata
    layers = content.get("layers") if isinstance(content, dict) else None
    if not isinstance(layers, dict):
        return metadata
    names = set(modules)

    def dequantized(layer: str) -> bool:
        return any(m == layer or m.endswith(f".{layer}") for m in names)

    kept = {layer: conf for layer, conf in layers.items() if not dequantized(layer)}
    rest = {k: v for k, v in metadata.items() if k != QUANTIZATION_METADATA}
    if not kept:
        return rest
    return {**rest, QUANTIZATION_METADATA: json.dumps({**content, "layers": kept})}


def stored_scale(checkpoint: Checkpoint, plan: ScaledWeight) -> torch.Tensor:
    """The scale tensor of `plan` as stored; `NonFiniteError` naming it for NaN/Inf."""
    scale = checkpoint.get(plan.scale)
    require_finite(f"{checkpoint}: {plan.scale}", scale)
    return scale


_HALF_CODES = {torch.float8_e4m3fn: 2.0**8, torch.float8_e5m2: 1.0}
"""The float8 dtypes whose codes `_halves` rewrites as float16 bits, and what the float16
value must be multiplied by to give the float8 one."""


def _halves(codes: torch.Tensor, scratch: Scratch) -> torch.Tensor | None:
    """float8 `codes` (`_HALF_CODES`) as float16 values (in `scratch`'s `"half"` buffer):
    `2⁻⁸ · value` for `float8_e4m3fn`, the value itself for `float8_e5m2`; None where a code
    is NaN in `float8_e4m3fn` (its float16 would be finite). A torch cast of float8 converts
    one value at a time; these are a few vectorised integer passes.

    `float8_e5m2` is float16 without its low byte: the code shifted up 8 bits. A
    `float8_e4m3fn` code `s eeee mmm` shifted up 7 bits, bit 14 cleared, is the float16
    `s 0eeee mmm0000000`: exponent field `e` under float16's bias 15 instead of 7, so
    `(1 + m/8) · 2^(e−15)` for `e > 0` and `(m/8) · 2^−14` (float16's subnormals) for
    `e = 0`, both `2⁻⁸` times the float8 value. Sign-extended from int8, the shift fills
    bits 15 and 14 with the sign."""
    signed = codes.view(torch.int8)
    # NaN is S.1111.111: 0x7F, the largest int8, or 0xFF, the largest uint8
    if codes.dtype == torch.float8_e4m3fn and codes.numel() and (
        int(signed.amax()) == 0x7F or int(codes.view(torch.uint8).amax()) == 0xFF
    ):
        return None
    bits = scratch.take("half", codes.shape, torch.int16).copy_(signed)
    if codes.dtype == torch.float8_e5m2:
        return bits.bitwise_left_shift_(8).view(torch.float16)
    return bits.bitwise_left_shift_(7).bitwise_and_(~0x4000).view(torch.float16)


def _column_blocks(plan: ScaledWeight, flat: torch.Tensor) -> list[tuple[torch.Tensor, slice]]:
    """Views of `flat` (rows of the weight's 2-D view, `(rows, cols)`) over its scale blocks:
    `(rows, blocks, block columns)` over the whole column blocks and `(rows, 1, rest)` over
    a partial last one, each with the grid columns it covers."""
    width = plan.block[1]
    whole = flat.shape[1] // width
    views = []
    if whole:
        views.append((flat[:, : whole * width].unflatten(1, (whole, width)), slice(0, whole)))
    if flat.shape[1] % width:
        views.append((flat[:, whole * width :].unsqueeze(1), slice(whole, whole + 1)))
    return views


def dequantized_blocks(
    checkpoint: Checkpoint,
    plan: ScaledWeight,
    elements: int,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
) -> Iterator[torch.Tensor]:
    """The weight of `plan` as `W8 · s` in `dtype` (float32: rounded once, and a scale
    beyond its range is Inf or 0; float64: exact for a scale of float16, bfloat16 or float32,
    a float8 value of at most 4 significant bits times one of at most 24), in consecutive
    blocks of whole rows of about `elements` values (`Checkpoint.row_blocks`).

    With `scratch` and float64, each block lies in its `"dequantized"` buffer (valid until
    the second block after, the caller's to overwrite), the float8 codes read as float16
    (`_halves`) where their dtype allows: `half · (2⁸ · s)` is `W8 · s`, both products
    exact (a power of two times a scale is exact short of float64's range, checked)."""
    grid = stored_scale(checkpoint, plan).reshape(plan.grid).to(dtype)
    factor = _HALF_CODES.get(checkpoint.infos[plan.weight].dtype)
    fast = scratch is not None and dtype == torch.float64 and factor is not None
    if fast and all_finite(grid * factor):
        yield from _decoded_blocks(checkpoint, plan, elements, grid, factor, scratch)
        return
    start = 0
    for block in checkpoint.row_blocks(plan.weight, elements):
        rows = block.shape[0]
        scaled = _blocked(plan, block.to(dtype)) * _row_scales(plan, grid, start, rows)
        yield scaled.reshape(rows, -1)[:, : math.prod(block.shape[1:])].reshape(block.shape)
        start += rows


def _decoded_blocks(
    checkpoint: Checkpoint, plan: ScaledWeight, elements: int, grid: torch.Tensor,
    factor: float, scratch: Scratch,
) -> Iterator[torch.Tensor]:  # fmt: skip
    """`dequantized_blocks` in float64 through `_halves` (float64 scales `grid`, the float16
    values' `factor`), each block in `scratch`'s `"dequantized"` buffer."""
    start = 0
    for codes in checkpoint.row_blocks(plan.weight, elements, scratch):
        rows = codes.shape[0]
        values = scratch.take("dequantized", codes.shape, torch.float64)
        halves = _halves(codes, scratch)
        scales = _row_scales(plan, grid, start, rows)
        if halves is None:  # NaN codes: the cast makes them NaN, which the caller reports
            values.copy_(codes)
        else:
            values.copy_(halves)
            scales = scales * factor
        for view, columns in _column_blocks(plan, values.view(rows, -1)):
            view.mul_(scales[:, columns])
        yield values
        start += rows


def dequantized(
    checkpoint: Checkpoint, plan: ScaledWeight, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The whole weight of `plan` as `W8 · s` in `dtype` (`dequantized_blocks`), of the
    stored weight's shape."""
    (whole,) = dequantized_blocks(checkpoint, plan, 1 << 62, dtype)  # one block of all rows
    return whole


def equal_weights(
    first: tuple[Checkpoint, ScaledWeight], second: tuple[Checkpoint, ScaledWeight],
    elements: int,
) -> bool:  # fmt: skip
    """Whether two scaled weights of one shape stand for equal weights, `W8 · s` of each
    exact in float64 (for scales of float16, bfloat16 or float32), compared a block of about
    `elements` values at a time (`Checkpoint.row_blocks`: the same rows in both)."""
    pairs = zip(*(dequantized_blocks(checkpoint, plan, elements, torch.float64)
                  for checkpoint, plan in (first, second)), strict=True)  # fmt: skip
    return all(torch.equal(mine, theirs) for mine, theirs in pairs)


QUOTIENT_ROUNDING = 2.0**-8
"""The relative error `rounds_to` allows a quantizer's quotient `W / s`: bfloat16's unit
roundoff (compressed-tensors divides bfloat16 weights by a bfloat16 scale in bfloat16,
others in float32), so that a quotient it rounded onto a midpoint of two float8 values and
then to the even one is that weight quantized too."""


def rounds_to(checkpoint: Checkpoint, plan: ScaledWeight, other: Checkpoint, elements: int) -> bool:
    """Whether the stored weight of `plan` is the tensor `other` holds under its key (a
    floating tensor of its shape) quantized with its stored scale: each float8 value the
    nearest to the quotient `W / s` (in float64), or, where that lies within
    `QUOTIENT_ROUNDING` (relative) of a midpoint of two float8 values, the other of the two
    (a quantizer divides in bfloat16 or float32, rounding the quotient before it rounds to
    float8). Read a block of about `elements` values at a time (`Checkpoint.row_blocks`:
    the same rows of both)."""
    dtype = checkpoint.infos[plan.weight].dtype
    grid = stored_scale(checkpoint, plan).reshape(plan.grid).to(torch.float64)
    bound, start = overflow_bound(dtype), 0
    pairs = zip(other.row_blocks(plan.weight, elements),
                checkpoint.row_blocks(plan.weight, elements), strict=True)  # fmt: skip
    for values, stored in pairs:
        flat = _divided(plan, values.to(torch.float64), grid, start)
        flat = flat[:, : math.prod(values.shape[1:])]
        if not bool((flat.abs() < bound).all()):  # NaN too
            return False
        held = stored.reshape(flat.shape).to(torch.float32)
        # the roundings of the interval's ends: every number within it rounds to one of
        # them (one value but where a midpoint lies inside); an end past the float8 range
        # rounds to Inf or NaN, which no stored value equals (-0 equals 0)
        low, high = (rounded(flat * (1 + side * QUOTIENT_ROUNDING), dtype).to(torch.float32)
                     for side in (-1, 1))  # fmt: skip
        if not bool(((held == low) | (held == high)).all()):
            return False
        start += values.shape[0]
    return True


def _row_peaks(plan: ScaledWeight, flat: torch.Tensor) -> torch.Tensor:
    """The largest |value| of each row of `flat` (float64 rows of the weight's 2-D view,
    finite) in each column block, `(rows, grid columns)`: `max(max v, −min v)`, exactly
    `max |v|` with no copy of `|flat|`."""
    peaks = flat.new_empty(flat.shape[0], plan.grid[1])
    for view, columns in _column_blocks(plan, flat):
        torch.maximum(view.amax(-1), view.amin(-1).neg_(), out=peaks[:, columns])
    return peaks


def _add_peaks(plan: ScaledWeight, peaks: torch.Tensor, flat: torch.Tensor, start: int) -> None:
    """Raise the block peaks `peaks` (float64 `grid`) to the largest |value| of the rows
    `flat` (weight rows `start …`) in each block."""
    rows = flat.shape[0]
    per_row = _row_peaks(plan, flat)
    # rows padded with zeros (no |value| exceeds them) to whole blocks of the grid
    first, before = divmod(start, plan.block[0])
    after = -(before + rows) % plan.block[0]
    per_block = F.pad(per_row, (0, 0, before, after)).reshape(-1, plan.block[0], plan.grid[1])
    found = per_block.amax(1)
    held = peaks[first : first + found.shape[0]]
    torch.maximum(held, found, out=held)


def block_peaks(plan: ScaledWeight, blocks: Iterable[torch.Tensor]) -> torch.Tensor:
    """The largest |value| in each block of the scale grid, float64 `grid`, of a weight
    given as consecutive finite float64 row `blocks`."""
    peaks = torch.zeros(plan.grid, dtype=torch.float64)
    start = 0
    for block in blocks:
        _add_peaks(plan, peaks, block.reshape(block.shape[0], -1), start)
        start += block.shape[0]
    return peaks


def _fitted(
    grid: torch.Tensor, peaks: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, bool]:
    """`fitted_scale` of the scale blocks `grid` (stored dtype) with merged peaks `peaks`,
    block by block, and whether every block's scale holds it."""
    bound = overflow_bound(dtype)
    fits = (peaks == 0) | (peaks / grid.to(torch.float64).abs() < bound)
    needed = peaks / torch.finfo(dtype).max
    fresh = needed.to(grid.dtype)
    above = torch.nextafter(fresh, fresh.new_tensor(math.inf))  # where the cast rounded down
    fresh = torch.where(fresh.double() < needed, above, fresh)
    chosen = torch.where(fits, grid, fresh)
    wide = chosen.to(torch.float64).abs()
    return chosen, bool((torch.isfinite(wide) & ((peaks == 0) | (peaks / wide < bound))).all())


def fitted_scale(
    plan: ScaledWeight, stored: torch.Tensor, peaks: torch.Tensor, dtype: torch.dtype, where: str
) -> torch.Tensor:
    """The scale to store with the merged weight, of `stored`'s shape and dtype: each block's
    stored scale where its merged values (largest |value| `peaks`) divided by it round to a
    finite `dtype` value (below `overflow_bound`), else `peak / dtype's largest`, rounded up
    to the scale's dtype, so no value is clipped (all in float64, `peaks` too).
    `NonFiniteError` (`where`) where no scale of that dtype holds a block (a float16 scale
    past 65,504)."""
    chosen, holds = _fitted(stored.reshape(plan.grid), peaks, dtype)
    if not holds:
        raise NonFiniteError(
            f"{where}: the merged weight (|value| up to {float(peaks.max()):.4g}) needs a scale "
            f"beyond the range of {stored.dtype}, the dtype of {plan.scale}"
        )
    return chosen.reshape(stored.shape)


def _rounded_into(values: torch.Tensor, out: torch.Tensor, scratch: Scratch) -> None:
    """float64 `values` (finite, below `overflow_bound` of float8 `out`'s dtype; rows of
    a weight's 2-D view, `(rows, cols)`, none empty) rounded once to nearest into `out` (of
    their shape), as `rounded` rounds them.

    A cast through float32 rounds twice, `near = fl32(v)` then `fl8(near)`, and errs only
    where `near` is a midpoint of two float8 values (or the overflow bound, past the largest)
    that `v` is not: every such boundary is a float32 (at most one bit more than a float8
    value), and rounding to float32 keeps `v`'s side of it (monotonic, each float32 its own
    rounding), so `fl8(near)` is `v` rounded once unless `near` is a boundary. A boundary
    has no float32 mantissa bit set below float8's last bit and the one after it; the values
    whose `near` has none there (the float8 values too) are rounded by `rounded`, found in
    the rows whose least such bits are 0."""
    near = scratch.take("near", values.shape, torch.float32).copy_(values)
    out.copy_(near)
    bits = near.view(values.shape[0], -1).view(torch.int32).bitwise_and_(_LOW_BITS[out.dtype])
    rows = (bits.amin(1) == 0).nonzero().view(-1)
    if rows.numel():
        row, column = (bits[rows] == 0).nonzero(as_tuple=True)
        found = rows[row] * bits.shape[1] + column
        out.view(-1)[found] = rounded(values.reshape(-1)[found], out.dtype)


_MANTISSA_BITS = dict(zip(FLOAT8, (3, 2, 3, 2), strict=True))
_LOW_BITS = {dtype: (1 << (23 - bits - 1)) - 1 for dtype, bits in _MANTISSA_BITS.items()}
"""Each float8 dtype's float32 mantissa bits below its last bit and the one after it (of
float32's 23)."""


class Requantized:
    """A merged scaled float8 weight rounded to its float8 dtype `dtype` as its float64 row
    blocks come (`rows` of them in all), and the scale stored with it (`scale`, of
    `stored`'s shape and dtype).

    With `scale` given (from `fitted_scale`, a first pass over the whole weight), each block
    is divided by its blocks' scales and rounded once (`rounded`). Without, the scales are
    decided as the blocks come, `fitted_scale` of each grid row once its last weight row is
    in, and its rows divided and rounded then: one pass, holding at most one block's rows
    (blocks of at least `plan.block[0]` rows, the last one excepted). `scale` is complete
    once `blocks` is exhausted; where a block's scale cannot hold it, `fitted_scale` of the
    whole weight raises (its peaks read from the blocks left)."""

    def __init__(
        self, plan: ScaledWeight, rows: int, stored: torch.Tensor, dtype: torch.dtype,
        where: str, scratch: Scratch, scale: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        self.plan, self.rows, self.stored, self.dtype = plan, rows, stored, dtype
        self.where = where
        self.scratch = scratch
        self.decided = scale is not None
        self.grid = (scale if scale is not None else stored).reshape(plan.grid).clone()
        self.peaks = torch.zeros(plan.grid, dtype=torch.float64)

    @property
    def scale(self) -> torch.Tensor:
        """The scale to store with the weight (`fitted_scale`), of `stored`'s shape."""
        return self.grid.reshape(self.stored.shape)

    def blocks(self, merged: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The float8 row blocks of the weight of the float64 row blocks `merged` (finite;
        the caller's to overwrite, each until the second block after it is drawn)."""
        plan = self.plan
        pending: tuple[torch.Tensor, int] | None = None  # rows of a grid row not all in yet
        ready = self.grid.shape[0] if self.decided else 0  # grid rows with a final scale
        stream = iter(merged)
        start = 0
        for block in stream:
            flat = block.reshape(block.shape[0], -1)
            end = start + flat.shape[0]
            if not self.decided:
                _add_peaks(plan, self.peaks, flat, start)
                last = plan.grid[0] if end == self.rows else end // plan.block[0]
                if last > ready:
                    chosen, holds = _fitted(self.grid[ready:last], self.peaks[ready:last],
                                            self.dtype)  # fmt: skip
                    if not holds:
                        self._raise(stream, end)
                    self.grid[ready:last] = chosen
                    ready = last
            done = min(end, ready * plan.block[0])
            pieces = [] if pending is None else [pending]
            assert pending is None or done >= start  # a grid row spans two blocks at most
            pieces.append((flat[: done - start], start))
            pending = (flat[done - start :], done) if done < end else None
            count = sum(piece.shape[0] for piece, _ in pieces)
            if count:
                out = self.scratch.take("float8", (count, *block.shape[1:]), self.dtype)
                rows = 0
                for piece, first in pieces:
                    into = out.view(count, -1)[rows : rows + piece.shape[0]]
                    self._quantize(piece, first, into)
                    rows += piece.shape[0]
                yield out
            start = end

    def _quantize(self, flat: torch.Tensor, start: int, out: torch.Tensor) -> None:
        """Rows `flat` (float64, weight rows `start …`) divided by their blocks' scales in
        place and rounded once into float8 `out`. Every quotient is below `overflow_bound`:
        `|v| ≤ peak` and rounding is monotonic, so `fl(|v| / |s|) ≤ fl(peak / |s|)`, which
        `fitted_scale` keeps below it; 0 over a scale of 0 (a block of zeros) is 0."""
        if not flat.shape[0]:
            return
        scales = _row_scales(self.plan, self.grid.to(torch.float64), start, flat.shape[0])
        zero = bool((scales == 0).any())
        for view, columns in _column_blocks(self.plan, flat):
            divisor = scales[:, columns]
            if zero:
                undefined = (divisor == 0) & (view == 0)
                view.div_(divisor).masked_fill_(undefined, 0.0)
            else:
                view.div_(divisor)
        _rounded_into(flat, out, self.scratch)

    def _raise(self, stream: Iterator[torch.Tensor], start: int) -> None:
        """`fitted_scale`'s error for the whole weight, its peaks read from `stream` on."""
        for block in stream:
            _add_peaks(self.plan, self.peaks, block.reshape(block.shape[0], -1), start)
            start += block.shape[0]
        fitted_scale(self.plan, self.stored, self.peaks, self.dtype, self.where)
        raise AssertionError("fitted_scale raises where a block's scale cannot hold it")


def require_no_packed(quantization: Quantization, keys: Iterable[str], tool: str) -> None:
    """`DTypeError` (`Quantization.refusal`) for the first of `keys` (`<module>.weight`)
    whose module is integer-packed."""
    for key in keys:
        if key.removesuffix(".weight") in quantization.packed:
            raise quantization.refusal(key, tool)


def unmatched_refusal(
    quantization: Quantization, error: ShapeError | TargetError, label: str
) -> DTypeError | None:
    """Where `label`'s layers could not be matched to a checkpoint that holds integer-packed
    weights (whose modules show no `.weight` of their shape), the `DTypeError` that says so,
    naming one of them; None for a checkpoint without any."""
    if not quantization.packed:
        return None
    tensor, name = next(iter(quantization.packed.values()))
    return DTypeError(
        f"{label} does not fit {quantization.checkpoint} ({error}); its weights are "
        f"integer-packed ({tensor}: {name}), which have no exact form to merge into: "
        f"{MERGE_ADVICE}"
    )
