"""Fuzzing merges into scaled float8 checkpoints (`lowrank.io.quantized`) against a float64
reference written from the formula `W = W8 · s` alone.

hypothesis draws a weight (2-D, or a 4-D convolution viewed `(out, in·K)`), a layout of its
scale (per tensor, per output channel, per block of a `config.json` block size with partial
edge blocks, per equal block without one, musubi-tuner's `(out, n, 1)`, compressed-tensors'
`group_size`), the scale's dtype (float16, bfloat16, float32) and values (ordinary, tiny,
subnormal, huge, zero, negative), the float8 codes (`float8_e4m3fn` or `float8_e5m2`, with
±0 and the largest values), up to three PEFT LoRA adapters at weights of either sign or one
DoRA, and a single-file or sharded checkpoint. The merge must either give the reference's
scales and float8 bytes (and, re-read with lowrank, `W8 · s` of them), or fail with a
`LowRankError` naming the weight, writing nothing, where the reference finds no scale of
the scale's dtype that holds a block.

The reference: `ΔW = Σ w · B A` and `W8 · s` in float64 (exact: a float8 value has at most
4 significant bits, a scale at most 24), each block keeping its scale where every
`|W + ΔW| / |s|` is below the float8 dtype's rounding bound (448 and half a step, 464, for
`float8_e4m3fn`; 61,440 for `float8_e5m2`) or all are 0, else the least value of the scale's
dtype at or above `absmax / largest float8`; each entry rounded to nearest (ties to even)
by searching the table of all 256 float8 values, a 0 over a scale of 0 staying 0. Only an
entry whose quotient lies within 1e-9 (relative) of a midpoint between two float8 values
(where ΔW's own float64 rounding could decide it), or a block whose peak lies that close to
the bound, may differ.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_helpers import digest, listing, save_sharded
from safetensors.torch import load_file, save_file
from test_io_quantized import TOP as _TOP
from test_io_quantized import _table, block_peaks_ref

from lowrank.errors import LowRankError
from lowrank.io import Checkpoint, merge_checkpoint, quantized
from lowrank.io.files import Scratch
from lowrank.io.quantized import Quantization, dequantized

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FNUZ = (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
TOP = {**_TOP, FNUZ[0]: (240.0, 248.0), FNUZ[1]: (57344.0, 61440.0)}
"""Each float8 dtype's largest value and the least |q| that rounds past it."""
TIE = 1e-9
"""How close (relative) to a midpoint of two float8 values, or to the rounding bound, a
float64 quotient may lie before the reference accepts either side."""


def rounded(q: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 `q` rounded to nearest `dtype` (ties to the even code) from the value table,
    and where it lies within `TIE` of a midpoint."""
    values, codes = _table(dtype)
    flat = q.reshape(-1)
    hi = torch.searchsorted(values, flat).clamp(1, len(values) - 1)
    lo = hi - 1
    dlo, dhi = (flat - values[lo]).abs(), (values[hi] - flat).abs()
    even = torch.where(codes[lo] % 2 == 0, lo, hi)
    pick = torch.where(dlo < dhi, lo, torch.where(dhi < dlo, hi, even))
    near = (dlo - dhi).abs() <= TIE * flat.abs()
    return values[pick].reshape(q.shape), near.reshape(q.shape)


def round_up(value: float, dtype: torch.dtype) -> float:
    """The least value of `dtype` at or above `value` (≥ 0); Inf past its range."""
    s = torch.tensor(value, dtype=torch.float64).to(dtype)
    while s.double().item() < value:
        s = torch.nextafter(s, torch.tensor(math.inf, dtype=dtype))
    return s.double().item()


def grid_of(entries: torch.Tensor, block: tuple[int, int], out: int, cols: int) -> torch.Tensor:
    """The per-entry `(out, cols)` expansion of a float64 scale grid of blocks `block`."""
    expanded = entries.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return expanded[:out, :cols]


def reference(merged, stored, block, scale_dtype, dtype):
    """`(float8 values, scale grid, near-tie mask, blocks near the bound)` of the merged
    float64 weight `merged (out, cols)` for the stored float64 grid, or None where a block
    needs a scale beyond `scale_dtype`'s range."""
    largest, bound = TOP[dtype]
    out, cols = merged.shape
    gr, gc = stored.shape
    peaks = block_peaks_ref(merged.double(), block, (gr, gc))
    ratio = peaks / stored.abs()  # Inf over a scale of 0, NaN for 0 / 0
    keep = (peaks == 0) | (ratio < bound)
    edge = (peaks != 0) & ((ratio - bound).abs() <= TIE * bound)
    chosen = stored.clone()
    for i, j in zip(*torch.nonzero(~keep, as_tuple=True), strict=True):
        chosen[i, j] = round_up(peaks[i, j].item() / largest, scale_dtype)
    if not bool(torch.isfinite(chosen).all()):
        return None
    per_entry = grid_of(chosen, block, out, cols)
    q = torch.where(merged == 0, torch.zeros_like(merged), merged / per_entry)
    values, near = rounded(q, dtype)
    return values, chosen, near, edge


# --- drawing a checkpoint -------------------------------------------------------------------


def nan_free_codes(dtype: torch.dtype) -> torch.Tensor:
    """Every code of `dtype` that is a finite value."""
    codes = torch.arange(256).to(torch.uint8)
    return codes[torch.isfinite(codes.view(dtype).float())]


def scale_values(draw, count: int, scale_dtype: torch.dtype, gen: torch.Generator):
    """`count` scales of `scale_dtype`: ordinary ones (absmax-like, 1e-4 … 1), and, as drawn,
    tiny, subnormal, huge, zero and negative ones among them."""
    base = torch.rand(count, generator=gen, dtype=torch.float64) * 0.01 + 1e-4
    info = torch.finfo(scale_dtype)
    kind = st.sampled_from(["plain", "tiny", "subnormal", "huge", "zero", "negative"])
    kinds = draw(st.lists(kind, min_size=count, max_size=count))
    huge = {torch.float16: 60000.0, torch.bfloat16: 1e30, torch.float32: 1e30}[scale_dtype]
    values = []
    for value, kind in zip(base.tolist(), kinds, strict=True):
        if kind == "tiny":
            value = info.tiny * 3.0
        elif kind == "subnormal":
            value = info.tiny / 8 * 5  # 5 · 2⁻³ of the least normal: exact in each dtype
        elif kind == "huge":
            value = huge
        elif kind == "zero":
            value = 0.0
        elif kind == "negative":
            value = -value
        values.append(value)
    return torch.tensor(values, dtype=torch.float64).to(scale_dtype)


@st.composite
def layouts(draw):
    """`(shape, scale name, stored scale shape, block (rows, cols), grid, config or None)`."""
    conv = draw(st.booleans())
    out = draw(st.integers(1, 9))
    if conv:
        shape = (out, draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    else:
        shape = (out, draw(st.integers(1, 20)))
    cols = math.prod(shape[1:])
    kinds = ["tensor", "channel"] + ([] if conv else ["fp8", "ct_block", "equal", "musubi",
                                                       "ct_group"])  # fmt: skip
    kind = draw(st.sampled_from(kinds))
    config = None
    if kind == "tensor":
        name = draw(st.sampled_from(["weight_scale", "weight_scale_inv", "scale_weight"]))
        stored = draw(st.sampled_from([(), (1,), (1, 1)]))
        block = (out, cols)
    elif kind == "channel":
        name = draw(st.sampled_from(["weight_scale", "scale_weight"]))
        stored = draw(st.sampled_from([(out,), (out, 1), (out, *[1] * (len(shape) - 1))]))
        block = (1, cols)
    elif kind in ("fp8", "ct_block", "ct_group"):
        b0 = 1 if kind == "ct_group" else draw(st.integers(1, 6))
        b1 = draw(st.integers(1, 8))
        block = (b0, b1)
        stored = (-(-out // b0), -(-cols // b1))
        if kind == "fp8":
            name = "weight_scale_inv"
            settings = {"quant_method": "fp8", "weight_block_size": [b0, b1]}
        else:
            name = "weight_scale"
            weights = {"block_structure": [b0, b1]} if kind == "ct_block" else {"group_size": b1}
            settings = {"quant_method": "compressed-tensors", "format": "float-quantized",
                        "config_groups": {"group_0": {"targets": ["Linear"],
                                                      "weights": weights}}}  # fmt: skip
        config = {"quantization_config": settings}
    elif kind == "equal":  # without config.json: blocks of powers of two, or one over all
        name = "weight_scale"
        b0, b1 = (draw(st.sampled_from([d for d in range(1, n + 1)
                                        if n % d == 0 and (d == n or d & (d - 1) == 0)]))
                  for n in (out, cols))  # fmt: skip
        block, stored = (b0, b1), (out // b0, cols // b1)
    else:  # musubi-tuner: (out, n, 1), blocks of in/n columns
        name = "scale_weight"
        n = draw(st.sampled_from([d for d in range(1, cols + 1) if cols % d == 0]))
        block, stored = (1, cols // n), (out, n, 1)
    grid = (-(-out // block[0]), -(-cols // block[1]))
    assert math.prod(stored) == math.prod(grid)
    return shape, name, stored, block, grid, config


@st.composite
def cases(draw):
    shape, name, stored, block, grid, config = draw(layouts())
    dtype = draw(st.sampled_from([E4M3, E5M2, *FNUZ]))
    scale_dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    finite = nan_free_codes(dtype)
    codes = finite[torch.randint(len(finite), shape, generator=gen)]
    w8 = codes.view(dtype)
    extremes = draw(st.sampled_from(["none", "zeros", "largest"]))
    if extremes != "none":  # ±0 or ±largest at random places
        mask = torch.rand(shape, generator=gen) < 0.3
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
        value = 0.0 if extremes == "zeros" else TOP[dtype][0]
        w8 = torch.where(mask, (sign * value).to(dtype), w8)
    scale = scale_values(draw, math.prod(grid), scale_dtype, gen).reshape(stored)
    out, cols = shape[0], math.prod(shape[1:])
    # the size of ΔW relative to W's typical entry: none, within its scale, or past it
    size = draw(st.sampled_from([0.0, 1e-3, 0.3, 30.0, 3000.0]))
    per_entry = grid_of(scale.double().reshape(grid), block, out, cols)
    typical = float((w8.double().reshape(out, cols) * per_entry).abs().mean())
    typical = typical if typical > 0 else 1.0
    dora = draw(st.booleans()) and len(shape) == 2
    count = 1 if dora else draw(st.integers(1, 3))
    weights = [1.0] if dora else draw(st.lists(st.sampled_from([1.0, 0.5, -1.0, -0.25, 2.0, 0.0]),
                                               min_size=count, max_size=count))  # fmt: skip
    adapters = []
    for _ in range(count):
        r = draw(st.integers(1, 3))
        a = torch.randn(r, *shape[1:], generator=gen) * math.sqrt(size * typical)
        b = torch.randn(out, r, *[1] * (len(shape) - 2), generator=gen) * math.sqrt(size * typical)
        adapters.append((a, b))
    magnitude = torch.rand(out, generator=gen) * 4 + 0.5 if dora else None
    if dora:
        magnitude = magnitude * typical * draw(st.sampled_from([1.0, 1e3]))
    shards = draw(st.sampled_from([1, 1, 2]))
    return dict(shape=shape, name=name, stored=stored, block=block, grid=grid, config=config,
                dtype=dtype, scale_dtype=scale_dtype, w8=w8, scale=scale, adapters=adapters,
                weights=weights, magnitude=magnitude, shards=shards)  # fmt: skip


def write_adapter(folder: Path, a: torch.Tensor, b: torch.Tensor, magnitude) -> Path:
    """A PEFT folder with a LoRA (scale 1: alpha = r) on module `m.fc`, a DoRA with
    `magnitude`."""
    folder.mkdir(parents=True)
    tensors = {"base_model.model.m.fc.lora_A.weight": a.contiguous(),
               "base_model.model.m.fc.lora_B.weight": b.contiguous()}  # fmt: skip
    config = {"peft_type": "LORA", "r": a.shape[0], "lora_alpha": a.shape[0],
              "target_modules": ["fc"]}  # fmt: skip
    if magnitude is not None:
        tensors["base_model.model.m.fc.lora_magnitude_vector"] = magnitude
        config["use_dora"] = True
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def run_case(tmp: Path, case: dict) -> None:
    shape, block, grid, dtype = case["shape"], case["block"], case["grid"], case["dtype"]
    out, cols = shape[0], math.prod(shape[1:])
    w8, scale = case["w8"], case["scale"]
    key, scale_key = "m.fc.weight", f"m.fc.{case['name']}"
    other = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    # sharded, the weight and its bias in one shard, its scale in the other
    state = {key: w8, scale_key: scale, "m.fc.bias": torch.ones(out), "m.norm.weight": other}
    folder = tmp / "base"
    if case["shards"] > 1:
        base = save_sharded(state, folder, case["shards"])
    else:
        folder.mkdir()
        base = folder / "model.safetensors"
        save_file(state, str(base))
    if case["config"] is not None:
        (folder / "config.json").write_text(json.dumps(case["config"]))
    ads = [write_adapter(tmp / f"ad{i}", a, b, case["magnitude"])
           for i, (a, b) in enumerate(case["adapters"])]  # fmt: skip
    # the float64 reference
    w = w8.double().reshape(out, cols) * grid_of(scale.double().reshape(grid), block, out, cols)
    delta = torch.zeros(out, cols, dtype=torch.float64)
    for (a, b), weight in zip(case["adapters"], case["weights"], strict=True):
        delta += weight * (b.double().reshape(out, -1) @ a.double().reshape(a.shape[0], -1))
    merged = w + delta
    feasible = True
    if case["magnitude"] is not None:
        norms = merged.norm(dim=1, keepdim=True)
        feasible = bool((norms > 0).all())
        merged = case["magnitude"].double()[:, None] * merged / norms
    expected = reference(merged, scale.double().reshape(grid), block, case["scale_dtype"], dtype)
    feasible = feasible and expected is not None
    target = tmp / "out"
    target.mkdir()
    output = target / ("merged" if case["shards"] > 1 else "merged.safetensors")
    before = digest([folder, *ads])
    try:
        merge_checkpoint(base, ads, output, weights=case["weights"])
    except LowRankError as error:
        assert not feasible, f"refused a feasible merge: {error}"
        assert key in str(error) or scale_key in str(error)
        assert listing(target) == set()
        assert digest([folder, *ads]) == before
        return
    assert feasible, "merged where no scale of its dtype holds a block"
    assert digest([folder, *ads]) == before
    files = sorted(output.glob("*.safetensors")) if case["shards"] > 1 else [output]
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    assert set(tensors) == set(state)
    assert torch.equal(tensors["m.fc.bias"], state["m.fc.bias"])
    assert torch.equal(tensors["m.norm.weight"], other)
    got_scale = tensors[scale_key]
    assert got_scale.dtype == scale.dtype and got_scale.shape == scale.shape
    values, chosen, near, edge = expected
    got_grid = got_scale.double().reshape(grid)
    # a block at the bound may keep its scale or take a fresh one
    alternative = torch.where(edge, got_grid, chosen)
    assert torch.equal(got_grid, alternative), (got_grid, chosen)
    if bool(edge.any()):
        per_entry = grid_of(got_grid, block, out, cols)
        q = torch.where(merged == 0, torch.zeros_like(merged), merged / per_entry)
        values, near = rounded(q, dtype)
    got = tensors[key]
    assert got.dtype == dtype and got.shape == w8.shape
    got64 = got.double().reshape(out, cols)
    differ = got64 != values
    assert not bool((differ & ~near).any()), (got64, values)
    # re-read by lowrank, by the convention (config.json beside it): W8 · s of the reference
    if case["config"] is not None:
        (files[0].parent / "config.json").write_text(json.dumps(case["config"]))
    index = output / "model.safetensors.index.json"
    reread = Checkpoint(files[0] if case["shards"] == 1 else index)
    plan = Quantization(reread).scaled(key)
    assert plan is not None and plan.scale == scale_key
    back = dequantized(reread, plan, torch.float64).reshape(out, cols)
    want = values * grid_of(got_grid, block, out, cols)
    assert bool(((back == want) | near).all()), (back, want, got64, values)


_FUZZ = dict(deadline=None, derandomize=True,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                    HealthCheck.data_too_large])  # fmt: skip


@settings(max_examples=40, **_FUZZ)
@given(case=cases())
def test_merges_into_scaled_float8_match_the_float64_reference(tmp_path_factory, case):
    run_case(tmp_path_factory.mktemp("q"), case)


@pytest.mark.exhaustive
@settings(max_examples=1500, **_FUZZ)
@given(case=cases())
def test_merges_into_scaled_float8_match_the_float64_reference_at_length(tmp_path_factory, case):
    run_case(tmp_path_factory.mktemp("q"), case)


@pytest.mark.parametrize("dtype", [E4M3, E5M2, *FNUZ])
def test_float64_values_round_once_to_float8(dtype):
    """`rounded` and the merge's `_rounded_into` against the value table, at every midpoint
    between two float8 values and one to three float64 steps either side (where a cast
    through float32 rounds twice), at every float8 value, and at random values, of both
    signs, up to the rounding bound (exclusive), subnormals and values below the least one
    included; the two give the same codes (−0 and, in an FNUZ dtype, its one zero too)."""
    values, _ = _table(dtype)
    mids = (values[1:] + values[:-1]) / 2
    steps = [torch.nextafter(mids, mids + s * math.inf) for s in (1, -1)]
    around = [mids, values, *steps]
    for _ in range(2):
        steps = [torch.nextafter(t, t + s * math.inf) for t, s in zip(steps, (1, -1), strict=True)]
        around += steps
    gen = torch.Generator().manual_seed(0)
    largest, bound = TOP[dtype]
    spread = torch.exp2(torch.rand(4000, generator=gen, dtype=torch.float64) * 40 - 30)
    q = torch.cat([*around, spread.clamp(max=largest), torch.tensor([2.0**-200, 0.0])])
    q = torch.cat([q, -q])
    q = q[q.abs() < bound]
    want, _ = rounded(q, dtype)
    got = quantized.rounded(q, dtype)
    assert torch.equal(got.to(torch.float64), want)
    # the merge's rounding: through float32, the values whose float32 could be a midpoint
    # rounded again (laid out as 7 rows, the last partial)
    rows = torch.cat([q, q.new_zeros(-len(q) % 7)]).reshape(7, -1)
    out = torch.empty(rows.shape, dtype=dtype)
    quantized._rounded_into(rows.clone(), out, Scratch())
    assert torch.equal(out.reshape(-1)[: len(q)].to(torch.float64), want)
    assert torch.equal(out.reshape(-1)[: len(q)].view(torch.uint8), got.view(torch.uint8))
