"""Merging into and extracting from quantized checkpoints (`lowrank.io.quantized`).

Scaled float8 weights stand for `W = W8 · s` per tensor, output channel or block. The
references here are written from that formula in float64: dequantize, add ΔW = Σ w·B A by
hand, decide each block's scale (kept where the merged values fit, else absmax / 448
rounded up to the scale's dtype) and round to nearest float8 by searching the table of all
256 float8 values (ties to the even code). lowrank merges and divides in float64 and rounds
once; an entry whose float64 quotient lies within 1e-5 (relative) of a midpoint between two
float8 values may still round to the other one here (a rule left wider than the merge needs,
1e-9 in `test_io_quantized_fuzz.py`): only such entries may differ, by one step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from io_helpers import digest, listing, save_sharded
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowrank.io.files
import lowrank.io.merge
from lowrank import LoRA
from lowrank.cli import main
from lowrank.errors import DTypeError, FileFormatError, LowRankError, NonFiniteError
from lowrank.io import Adapter, apply_adapter, extract_adapter, load_adapter, merge_checkpoint

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FMAX = 448.0
TOP = {E4M3: (448.0, 464.0), torch.float8_e5m2: (57344.0, 61440.0)}
"""Each float8 dtype's largest value, and that plus half its step there: the least |q|
that rounds past it (to Inf, or clipped in `float8_e4m3fn`)."""


def _table(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite value of `dtype` (float64, sorted) and its code."""
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    values = codes.view(dtype).to(torch.float64)
    keep = torch.isfinite(values) & ~((values == 0) & (codes >= 128))  # one zero
    order = torch.argsort(values[keep])
    return values[keep][order], codes[keep].to(torch.int64)[order]


def round_fp8(q: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """`q` (float64) rounded to nearest `dtype` value, ties to the even code, found in the
    value table; and where `q` lies within 1e-5 (relative) of a midpoint (a tie in float32)."""
    values, codes = _table(dtype)
    assert bool((q.abs() < TOP[dtype][1]).all()), "the reference would overflow"
    return _nearest(q, values, codes, 1e-5)


def _nearest(
    q: torch.Tensor, values: torch.Tensor, codes: torch.Tensor, tie: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`q` (float64) rounded to the nearest of `values` (sorted, float64; their `codes`),
    ties to the even code; and where `q` lies within `tie` (relative) of a midpoint."""
    flat = q.reshape(-1)
    hi = torch.searchsorted(values, flat).clamp(1, len(values) - 1)
    lo = hi - 1
    dlo, dhi = (flat - values[lo]).abs(), (values[hi] - flat).abs()
    pick = torch.where(
        dlo < dhi, lo, torch.where(dhi < dlo, hi, torch.where(codes[lo] % 2 == 0, lo, hi))
    )
    near = ((dlo - dhi).abs() <= tie * flat.abs()).reshape(q.shape)
    return values[pick].reshape(q.shape), near


def round_once(q: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`q` (float64) rounded once to nearest `dtype`, as float64: float32 by the IEEE cast
    from float64 (one rounding); bfloat16 and float16 found in the table of all 65,536 values,
    ties to the even code (torch casts float64 to them through float32, rounding twice).
    And where `q` lies within 1e-9 (relative) of a midpoint, which a ΔW summed in another
    order may put on the other side."""
    if dtype == torch.float32:
        return q.to(torch.float32).double(), torch.zeros(q.shape, dtype=torch.bool)
    codes = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = codes.view(dtype).to(torch.float64)
    keep = torch.isfinite(values) & ~((values == 0) & (codes < 0))  # one zero
    order = torch.argsort(values[keep])
    values, codes = values[keep][order], codes[keep].to(torch.int64)[order]
    assert bool((q.abs() < values.max()).all()), "the reference would overflow"
    return _nearest(q, values, codes, 1e-9)


def expand(grid: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """The scale of each entry of a 2-D weight of `shape`, blocks of `block` (last partial)."""
    return grid.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[
        : shape[0], : shape[1]
    ]


def block_peaks_ref(
    w: torch.Tensor, block: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """The largest |entry| of `w (out, in)` in each block of a `grid` of `block`s (the last
    row and column of blocks partial), in `w`'s dtype."""
    out, cols = w.shape
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=w.dtype)
    padded[:out, :cols] = w.abs()
    return padded.reshape(grid[0], block[0], grid[1], block[1]).amax(dim=(1, 3))


def quantize_ref(
    w: torch.Tensor, grid: torch.Tensor, block: tuple[int, int], scale_dtype, dtype=E4M3
):
    """The float64 reference of a merge's output of the merged weight `w (out, in)` (float64)
    with the stored `grid`, float8 `dtype`: `(float8 values, scale grid, near-tie mask)`."""
    largest, bound = TOP[dtype]
    out, cols = w.shape
    gr, gc = grid.shape
    peaks = block_peaks_ref(w, block, (gr, gc))
    stored = grid.to(torch.float64)
    keep = (peaks == 0) | (peaks / stored.abs() < bound)
    fresh = torch.empty_like(stored)
    for i in range(gr):
        for j in range(gc):
            need = peaks[i, j].item() / largest
            s = torch.tensor(need, dtype=torch.float64).to(scale_dtype)
            while s.double().item() < need:  # rounded down: the next value of its dtype
                s = torch.nextafter(s, torch.tensor(math.inf, dtype=scale_dtype))
            fresh[i, j] = s.double()
    chosen = torch.where(keep, stored, fresh)
    values, near = round_fp8(w / expand(chosen, block, (out, cols)), dtype)
    return values, chosen, near


def check_scale(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`got` (a merge's scale) is `ref` (the reference's grid), but where the reference
    chose a new scale from the float64 peak, one a float32 merge finds from the float32
    merged values (2⁻²³ relative at most); `got` as a float64 grid of `ref`'s shape."""
    got = got.double().reshape(ref.shape)
    assert bool(((got - ref).abs() <= 4e-7 * ref.abs()).all()), (got, ref)
    return got


def assert_bytes(out8: torch.Tensor, ref: torch.Tensor, near: torch.Tensor) -> None:
    """`out8` (float8) equals `ref` (float64 values) but at near-ties, one step apart there."""
    got = out8.to(torch.float64).reshape(ref.shape)
    differ = got != ref
    assert not bool((differ & ~near).any()), f"{int((differ & ~near).sum())} entries differ"
    values, _ = _table(out8.dtype)
    steps = (torch.searchsorted(values, got) - torch.searchsorted(values, ref)).abs()
    assert int(steps.max()) <= 1


def peft_adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int):
    """A PEFT LoRA folder: module → (A (r, in), B (out, r)), alpha = r (scale 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": sorted(factors)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def lora(out: int, cols: int, r: int, seed: int, size: float = 0.1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(r, cols, generator=gen) * size, torch.randn(out, r, generator=gen) * size


def quantized(
    w: torch.Tensor, block: tuple[int, int], grid_shape, scale_dtype=torch.float32, dtype=E4M3
):
    """`w (out, in)` quantized to `dtype` by absmax per block: `(float8 weight, scale grid)`."""
    out, cols = w.shape
    gr, gc = grid_shape
    peaks = block_peaks_ref(w, block, (gr, gc))
    grid = (peaks / TOP[dtype][0]).to(scale_dtype)
    return (w / expand(grid.float(), block, (out, cols))).to(dtype), grid


def comfyui_scaled(gen: torch.Generator):
    """A ComfyUI scaled-fp8 state: a `scaled_fp8` marker, a linear `(6, 8)` and a 3×3
    convolution `(4, 3, 3, 3)` scaled per tensor (`scale_weight` 0-d, absmax / 448), the
    linear with a `scale_input`; `(s_lin, s_conv, state)`."""
    lin, conv = torch.randn(6, 8, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    s_lin, s_conv = lin.abs().max() / FMAX, conv.abs().max() / FMAX
    state = {
        "scaled_fp8": torch.empty(0, dtype=E4M3),
        "net.lin.weight": (lin / s_lin).to(E4M3),
        "net.lin.scale_weight": s_lin.reshape(()),
        "net.lin.scale_input": torch.tensor(1.0),
        "net.conv.weight": (conv / s_conv).to(E4M3),
        "net.conv.scale_weight": s_conv.reshape(()),
    }
    return s_lin, s_conv, state


def test_the_reported_merge_into_a_per_tensor_scale(tmp_path):
    """The reproduction of the report: one `weight_scale` (compressed-tensors layout, 0-d);
    the stored scale holds the merged values, so it is kept and the float8 bytes equal the
    reference's (the old merge added ΔW to the raw float8 values: ΔW times 1/s)."""
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    s = w.abs().max() / FMAX
    w8 = (w / s).to(E4M3)
    base = tmp_path / "base.safetensors"
    save_file(
        {"fc.weight": w8, "fc.weight_scale": s.reshape(()).float(), "fc.bias": torch.zeros(8)},
        str(base),
    )
    a, b = torch.randn(4, 16) * 0.1, torch.randn(8, 4) * 0.1
    peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 4)
    report = merge_checkpoint(base, [tmp_path / "ad"], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    merged = w8.double() * s.double() + b.double() @ a.double()
    ref, scale, near = quantize_ref(merged, s.reshape(1, 1), (8, 16), torch.float32)
    assert float(scale) == float(s)
    assert torch.equal(out["fc.weight_scale"], s.reshape(()).float())
    assert out["fc.weight"].dtype == E4M3
    assert_bytes(out["fc.weight"], ref, near)
    assert not bool(near.any())  # exact here
    assert torch.equal(out["fc.bias"], torch.zeros(8))
    assert report["requantized_tensors"] == ["fc.weight"] and report["rescaled_tensors"] == []


def test_per_channel_bfloat16_scales_with_config_and_input_scale(tmp_path):
    """compressed-tensors FP8-dynamic's layout: `weight_scale (out, 1)` (bfloat16 here), an
    `input_scale`, `config.json` with strategy `channel`: two adapters weighted 0.5 and −1;
    other tensors, the metadata and `input_scale` are copied as they are."""
    torch.manual_seed(1)
    w = torch.randn(6, 10)
    w8, grid = quantized(w, (1, 10), (6, 1), torch.bfloat16)
    folder = tmp_path / "base"
    folder.mkdir()
    save_file(
        {
            "m.fc.weight": w8,
            "m.fc.weight_scale": grid,
            "m.fc.input_scale": torch.tensor([0.25]),
            "m.norm.weight": torch.ones(10),
        },
        str(folder / "model.safetensors"),
        metadata={"format": "pt", "note": "kept"},
    )
    config = {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                }
            },
        }
    }
    (folder / "config.json").write_text(json.dumps(config))
    (a1, b1), (a2, b2) = lora(6, 10, 2, 1), lora(6, 10, 3, 2)
    one = peft_adapter(tmp_path / "one", {"m.fc": (a1, b1)}, 2)
    two = peft_adapter(tmp_path / "two", {"m.fc": (a2, b2)}, 3)
    merge_checkpoint(
        folder / "model.safetensors", [one, two], tmp_path / "out.safetensors", weights=[0.5, -1.0]
    )
    out = load_file(tmp_path / "out.safetensors")
    delta = 0.5 * b1.double() @ a1.double() - b2.double() @ a2.double()
    merged = w8.double() * grid.double() + delta
    ref, scale, near = quantize_ref(merged, grid, (1, 10), torch.bfloat16)
    assert out["m.fc.weight_scale"].dtype == torch.bfloat16
    assert torch.equal(out["m.fc.weight_scale"].double(), scale)
    assert_bytes(out["m.fc.weight"], ref, near)
    assert torch.equal(out["m.fc.input_scale"], torch.tensor([0.25]))
    assert torch.equal(out["m.norm.weight"], torch.ones(10))
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}


@pytest.mark.parametrize("shape", [(10, 19), (8, 16), (3, 5)])
def test_block_scales_with_partial_edge_blocks(tmp_path, shape):
    """transformers' fine-grained FP8: `weight_scale_inv` per block of `weight_block_size`
    `[4, 8]` from `config.json`, the last blocks partial where the shape is no multiple of
    it; compared with the float64 reference, and the output dequantized by transformers' own
    helper is the merged weight within half a float8 step of its block."""
    out_f, in_f = shape
    block = (4, 8)
    grid_shape = (math.ceil(out_f / 4), math.ceil(in_f / 8))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    w8, grid = quantized(w, block, grid_shape)
    folder = tmp_path / "base"
    folder.mkdir()
    save_file(
        {"layers.0.proj.weight": w8, "layers.0.proj.weight_scale_inv": grid},
        str(folder / "model.safetensors"),
    )
    config = {
        "quantization_config": {
            "quant_method": "fp8",
            "weight_block_size": [4, 8],
            "activation_scheme": "dynamic",
        }
    }
    (folder / "config.json").write_text(json.dumps(config))
    a, b = lora(out_f, in_f, 2, 4, size=0.3)
    ad = peft_adapter(tmp_path / "ad", {"layers.0.proj": (a, b)}, 2)
    merge_checkpoint(folder, [ad], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    merged = w8.double() * expand(grid.double(), block, shape) + b.double() @ a.double()
    _, scale, _ = quantize_ref(merged, grid, block, torch.float32)
    scale = check_scale(out["layers.0.proj.weight_scale_inv"], scale)
    ref, near = round_fp8(merged / expand(scale, block, shape))  # with the scale chosen
    assert_bytes(out["layers.0.proj.weight"], ref, near)
    helper = pytest.importorskip("transformers.integrations.finegrained_fp8")
    back = helper._dequantize_fp8_weight(
        out["layers.0.proj.weight"], out["layers.0.proj.weight_scale_inv"], [4, 8], torch.float64
    )
    steps = expand(scale, block, shape) * 32  # the float8 step at 448, the largest
    assert bool(((back - merged).abs() <= steps / 2).all())
    # the input read as transformers reads it: lowrank's dequantization is the same W8 · s
    mine = helper._dequantize_fp8_weight(w8, grid, [4, 8], torch.float64)
    assert torch.equal(mine, w8.double() * expand(grid.double(), block, shape))


def test_comfyui_scaled_fp8_marker_and_a_conv_weight(tmp_path):
    """ComfyUI's scaled fp8: a `scaled_fp8` marker, `<m>.scale_weight` 0-d, written before
    its weight in key order (its scale is decided before either is written); on a linear
    layer and on a 3×3 convolution (per tensor), with `scale_input` copied."""
    gen = torch.Generator().manual_seed(5)
    s_lin, s_conv, state = comfyui_scaled(gen)
    base = tmp_path / "model.safetensors"
    save_file(state, str(base))
    a, b = lora(6, 8, 2, 6)
    down = torch.randn(2, 3, 3, 3, generator=gen) * 0.1
    up = torch.randn(4, 2, 1, 1, generator=gen) * 0.1
    kohya = {
        "lora_unet_net_lin.lora_down.weight": a,
        "lora_unet_net_lin.lora_up.weight": b,
        "lora_unet_net_lin.alpha": torch.tensor(2.0),
        "lora_unet_net_conv.lora_down.weight": down,
        "lora_unet_net_conv.lora_up.weight": up,
        "lora_unet_net_conv.alpha": torch.tensor(2.0),
    }
    save_file(kohya, str(tmp_path / "k.safetensors"))
    merge_checkpoint(base, [tmp_path / "k.safetensors"], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert out["scaled_fp8"].dtype == E4M3 and out["scaled_fp8"].numel() == 0
    assert torch.equal(out["net.lin.scale_input"], torch.tensor(1.0))
    for name, w8, s, delta in (
        ("lin", state["net.lin.weight"], s_lin, b.double() @ a.double()),
        (
            "conv",
            state["net.conv.weight"],
            s_conv,
            torch.einsum("or,rikl->oikl", up[:, :, 0, 0].double(), down.double()),
        ),
    ):
        merged = (w8.double() * s.double() + delta).reshape(w8.shape[0], -1)
        ref, scale, near = quantize_ref(merged, s.reshape(1, 1), merged.shape, torch.float32)
        assert torch.equal(out[f"net.{name}.scale_weight"].double().reshape(1, 1), scale)
        assert out[f"net.{name}.scale_weight"].shape == ()
        assert_bytes(out[f"net.{name}.weight"], ref, near)


def test_a_sharded_checkpoint_with_scales_in_another_shard(tmp_path):
    """Shards and an index, a weight and its scale in different shards, per-channel scales
    (float32): the output has the same shards, and the merged weights."""
    gen = torch.Generator().manual_seed(7)
    state, weights = {}, {}
    for i in range(3):
        w = torch.randn(5, 12, generator=gen)
        w8, grid = quantized(w, (1, 12), (5, 1))
        state[f"h.{i}.fc.weight"], state[f"h.{i}.fc.weight_scale"] = w8, grid
        weights[i] = (w8, grid)
    index = save_sharded(state, tmp_path / "base", 2)
    shards = json.loads(index.read_text())["weight_map"]
    assert shards["h.0.fc.weight"] != shards["h.0.fc.weight_scale"]
    factors = {f"h.{i}.fc": lora(5, 12, 2, 10 + i) for i in (0, 2)}
    ad = peft_adapter(tmp_path / "ad", factors, 2)
    merge_checkpoint(index, [ad], tmp_path / "out")
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == shards
    out = {}
    for shard in set(shards.values()):
        out.update(load_file(tmp_path / "out" / shard))
    for i in range(3):
        w8, grid = weights[i]
        delta = (
            factors[f"h.{i}.fc"][1].double() @ factors[f"h.{i}.fc"][0].double()
            if i != 1
            else torch.zeros(5, 12, dtype=torch.float64)
        )
        ref, scale, near = quantize_ref(
            w8.double() * grid.double() + delta, grid, (1, 12), torch.float32
        )
        assert torch.equal(out[f"h.{i}.fc.weight_scale"].double(), scale)
        assert_bytes(out[f"h.{i}.fc.weight"], ref, near)
    assert torch.equal(out["h.1.fc.weight"].view(torch.uint8), weights[1][0].view(torch.uint8))


@pytest.mark.parametrize("dtype", [E4M3, torch.float8_e5m2])
def test_values_past_the_stored_scale_get_a_larger_one(tmp_path, dtype):
    """A merged value past 464 · s (448 and half the step above it; 61,440 · s in
    float8_e5m2) would be clipped (or Inf) with the stored scale: that channel's scale
    becomes absmax / 448 (57,344) rounded up to float32, the others keep theirs, and no
    value is clipped (each within half a step of W + ΔW)."""
    largest = TOP[dtype][0]
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(8))
    w8, grid = quantized(w, (1, 6), (4, 1), dtype=dtype)
    base = tmp_path / "base.safetensors"
    save_file({"fc.weight": w8, "fc.weight_scale": grid}, str(base))
    column = int(w8[2].float().abs().argmax())  # row 2's largest |value|, 448·s, plus 200·s
    a = torch.zeros(1, 6)
    a[0, column] = 1.0
    b = torch.zeros(4, 1)
    b[2, 0] = float(grid[2, 0]) * largest / 2 * math.copysign(1.0, float(w8[2, column]))
    ad = peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 1)
    report = merge_checkpoint(base, [ad], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    merged = w8.double() * grid.double() + b.double() @ a.double()
    _, scale, _ = quantize_ref(merged, grid, (1, 6), torch.float32, dtype)
    assert not torch.equal(scale[2], grid[2].double())
    assert torch.equal(scale[[0, 1, 3]], grid[[0, 1, 3]].double())
    scale = check_scale(out["fc.weight_scale"], scale)
    assert float(scale[2, 0]) >= float(merged[2].abs().max()) / largest * (1 - 2**-23)
    ref, near = round_fp8(merged / scale, dtype)
    assert out["fc.weight"].dtype == dtype
    assert_bytes(out["fc.weight"], ref, near)
    back = out["fc.weight"].double() * out["fc.weight_scale"].double()
    half_top = TOP[dtype][1] - largest  # half the step at the largest value, the widest
    assert bool(((back - merged).abs() <= scale * half_top).all())
    assert report["rescaled_tensors"] == ["fc.weight_scale"]


def _refused(tmp_path, state, error, words, config=None, adapter_module="fc", shape=(8, 16)):
    folder = tmp_path / "base"
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    ad = peft_adapter(tmp_path / "ad", {adapter_module: lora(*shape, 2, 0)}, 2)
    before = digest([folder, ad])
    out = tmp_path / "out"
    out.mkdir(parents=True)
    with pytest.raises(error) as caught:
        merge_checkpoint(folder / "model.safetensors", [ad], out / "merged.safetensors")
    assert isinstance(caught.value, LowRankError)
    for word in words:
        assert word in str(caught.value)
    assert listing(out) == set()
    assert digest([folder, ad]) == before
    return caught.value


W8 = torch.randn(8, 16, generator=torch.Generator().manual_seed(9)).to(E4M3)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"fc.weight_scale": torch.ones(3)}, ["fc.weight_scale", "(3,)", "fits no convention"]),
        ({"fc.weight_scale": torch.ones(3, 5)}, ["fc.weight_scale", "(3, 5)", "equal blocks"]),
        (
            {"fc.weight_scale": torch.ones(()), "fc.scale_weight": torch.ones(())},
            ["fc.weight", "two scales", "fc.scale_weight", "fc.weight_scale"],
        ),
        (
            {"fc.weight_scale": torch.ones(()), "fc.weight_zero_point": torch.zeros(())},
            ["fc.weight_zero_point", "convention"],
        ),
        ({"fc.weight_scale_2": torch.ones(())}, ["fc.weight_scale_2", "convention"]),
        ({"fc.weight_scale": torch.ones(8, 1, dtype=torch.int32)}, ["fc.weight_scale", "int32"]),
        ({"fc.weight_scale": torch.ones(0, 4)}, ["fc.weight_scale", "(0, 4)", "no scale"]),
        ({"fc.weight_scale": torch.ones(8, 0)}, ["fc.weight_scale", "(8, 0)", "no scale"]),
        ({"fc.weight_scale": torch.ones(8, 0, 1)}, ["fc.weight_scale", "(8, 0, 1)", "no scale"]),
    ],
)
def test_scales_of_unknown_convention_are_refused(tmp_path, extra, words):
    """A scale that fits no convention (one without entries: a ZeroDivisionError before), two
    scales, a zero point or an unknown scale name: `FileFormatError` naming the tensor,
    nothing written, the inputs untouched."""
    _refused(tmp_path, {"fc.weight": W8, **extra}, FileFormatError, words)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_scale_beside_a_wider_weight_is_refused(tmp_path, dtype):
    """A `weight_scale` beside a bfloat16 or float32 weight: no convention scales such a
    weight, so whether the scale multiplies it cannot be told (the merge added ΔW to it
    and kept the scale, which a reader multiplying it would apply to ΔW too)."""
    weight = W8.to(torch.float32).to(dtype)
    _refused(tmp_path, {"fc.weight": weight, "fc.weight_scale": torch.tensor(0.5)},
             FileFormatError, ["fc.weight", "fc.weight_scale", "float8 weights only"])  # fmt: skip


def test_a_grid_of_blocks_without_config_json_is_read_only_where_it_tells_them(tmp_path):
    """An (8, 6) weight quantized in blocks of 4×4 (the last column of blocks partial) has a
    2×2 grid, which also divides it into equal blocks of 4×3: without the config.json that
    gives the block size it is refused, naming the scale and config.json (it was read as
    4×3 blocks, silently scaling columns 3 and 4 by the wrong scale); with it, the merge is
    the float64 reference's."""
    w = torch.randn(8, 6, generator=torch.Generator().manual_seed(60))
    w8, grid = quantized(w, (4, 4), (2, 2))
    state = {"fc.weight": w8, "fc.weight_scale_inv": grid}
    _refused(tmp_path / "bare", state, FileFormatError,
             ["fc.weight_scale_inv", "(2, 2)", "config.json", "cannot be told"],
             shape=(8, 6))  # fmt: skip
    folder = tmp_path / "with"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [4, 4]}}
    (folder / "config.json").write_text(json.dumps(config))
    a, b = lora(8, 6, 2, 61)
    ad = peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 2)
    merge_checkpoint(folder / "model.safetensors", [ad], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    merged = w8.double() * expand(grid.double(), (4, 4), (8, 6)) + b.double() @ a.double()
    ref, scale, near = quantize_ref(merged, grid, (4, 4), torch.float32)
    check_scale(out["fc.weight_scale_inv"], scale)
    assert_bytes(out["fc.weight"], ref, near)


def test_a_block_size_config_json_contradicts_is_refused(tmp_path):
    """`weight_scale_inv (2, 2)` on an (8, 16) weight reads as blocks of 4×8, but
    `config.json` says `[128, 128]` (one block): `FileFormatError` naming both."""
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    _refused(
        tmp_path,
        {"fc.weight": W8, "fc.weight_scale_inv": torch.ones(2, 2)},
        FileFormatError,
        ["fc.weight_scale_inv", "(2, 2)", "config.json", "[128, 128]"],
        config,
    )
    config = {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "config_groups": {"g": {"weights": {"strategy": "block", "block_structure": [8, 8]}}},
        }
    }
    _refused(
        tmp_path / "ct",
        {"fc.weight": W8, "fc.weight_scale": torch.ones(2, 2)},
        FileFormatError,
        ["fc.weight_scale", "(2, 2)", "[[8, 8]]"],
        config,
    )


@pytest.mark.parametrize(
    ("state", "module", "words"),
    [
        (
            {
                "fc.qweight": torch.zeros(2, 8, dtype=torch.int32),
                "fc.qzeros": torch.zeros(1, 1, dtype=torch.int32),
                "fc.scales": torch.ones(1, 8, dtype=torch.float16),
                "fc.g_idx": torch.zeros(16, dtype=torch.int32),
            },
            "fc",
            ["fc.qweight", "GPTQ"],
        ),
        (
            {
                "fc.weight_packed": torch.zeros(8, 2, dtype=torch.int32),
                "fc.weight_scale": torch.ones(8, 1),
                "fc.weight_shape": torch.tensor([8, 16]),
            },
            "fc",
            ["fc.weight_packed", "pack-quantized"],
        ),
        (
            {
                "fc.weight": torch.zeros(64, 1, dtype=torch.uint8),
                "fc.weight.absmax": torch.ones(2),
                "fc.weight.quant_map": torch.ones(16),
                "fc.weight.quant_state.bitsandbytes__nf4": torch.zeros(10, dtype=torch.uint8),
            },
            "fc",
            ["fc.weight.", "bitsandbytes 4-bit"],
        ),
        (
            {"fc.weight": torch.zeros(8, 16, dtype=torch.int8), "fc.SCB": torch.ones(8)},
            "fc",
            ["fc.SCB", "bitsandbytes int8"],
        ),
        (
            {
                "fc.weight": torch.zeros(8, 16, dtype=torch.int8),
                "fc.weight_scale": torch.ones(8, 1),
            },
            "fc",
            ["fc.weight", "torch.int8 weights with a scale"],
        ),
        (
            {"fc.weight._data": W8, "fc.weight._scale": torch.ones(8, 1)},
            "fc",
            ["fc.weight._", "optimum-quanto"],
        ),
    ],
)
def test_integer_packed_weights_are_refused(tmp_path, state, module, words):
    """GPTQ / AWQ, compressed-tensors pack-quantized, bitsandbytes 4-bit and int8, int8
    with a scale, optimum-quanto's layout (which lowrank does not read): `DTypeError`
    naming the tensor and the quantization, saying to merge into the unquantized
    checkpoint; nothing written, inputs untouched."""
    _refused(
        tmp_path,
        {**state, "other.weight": torch.ones(2, 2)},
        DTypeError,
        [*words, "unquantized checkpoint"],
        adapter_module=module,
    )


def test_a_kohya_adapter_on_a_gptq_checkpoint_is_refused_as_quantized(tmp_path):
    """A kohya layer name matches no `.weight` of a GPTQ checkpoint (its modules hold
    `qweight`): the refusal says the checkpoint is integer-packed."""
    folder = tmp_path / "base"
    folder.mkdir()
    save_file(
        {"blk.fc.qweight": torch.zeros(2, 8, dtype=torch.int32), "blk.fc.scales": torch.ones(1, 8)},
        str(folder / "model.safetensors"),
    )
    a, b = lora(8, 16, 2, 0)
    save_file(
        {"lora_unet_blk_fc.lora_down.weight": a, "lora_unet_blk_fc.lora_up.weight": b},
        str(tmp_path / "k.safetensors"),
    )
    with pytest.raises(DTypeError, match=r"blk\.fc\.qweight"):
        merge_checkpoint(
            folder / "model.safetensors", [tmp_path / "k.safetensors"], tmp_path / "out.safetensors"
        )
    assert not (tmp_path / "out.safetensors").exists()


def test_dtype_leaves_an_integer_packed_module_s_tensors_as_they_are(tmp_path):
    """`dtype=bfloat16` with an adapter on a plain layer beside a GPTQ module: the plain
    layer is merged and stored in bfloat16, the GPTQ module's float32 scales keep their
    dtype and bytes (rounded to bfloat16, they changed every weight the packed codes
    stand for)."""
    gptq = {"q.qweight": torch.arange(16, dtype=torch.int32).reshape(2, 8),
            "q.qzeros": torch.zeros(1, 1, dtype=torch.int32),
            "q.scales": torch.full((1, 8), 0.0123456)}  # fmt: skip
    gen = torch.Generator().manual_seed(31)
    w = torch.randn(6, 5, generator=gen)
    save_file({**gptq, "p.weight": w}, str(tmp_path / "base.safetensors"))
    a, b = lora(6, 5, 2, seed=32)
    peft_adapter(tmp_path / "ad", {"p": (a, b)}, 2)
    merge_checkpoint(tmp_path / "base.safetensors", [tmp_path / "ad"],
                     tmp_path / "out.safetensors", dtype="bfloat16")  # fmt: skip
    out = load_file(tmp_path / "out.safetensors")
    for key, tensor in gptq.items():
        assert out[key].dtype == tensor.dtype and torch.equal(out[key], tensor), key
    assert out["p.weight"].dtype == torch.bfloat16
    ref = w.double() + b.double() @ a.double()
    assert torch.allclose(out["p.weight"].double(), ref, rtol=2**-8, atol=0)


def test_a_dtype_too_narrow_for_the_dequantized_weight_is_refused(tmp_path):
    """`dtype=float16` for a scaled weight whose `W8 · s` passes float16's range (448 · 1000):
    `NonFiniteError` naming the weight, nothing written (the scale is not kept to hold it)."""
    folder = tmp_path / "base"
    folder.mkdir()
    w8 = W8.clone()
    w8[0, 0] = 448.0
    save_file(
        {"fc.weight": w8, "fc.weight_scale": torch.tensor(1000.0)}, str(folder / "m.safetensors")
    )
    ad = peft_adapter(tmp_path / "ad", {"fc": lora(8, 16, 2, 0)}, 2)
    with pytest.raises(NonFiniteError, match=r"fc\.weight.*overflow torch\.float16"):
        merge_checkpoint(
            folder / "m.safetensors", [ad], tmp_path / "o.safetensors", dtype="float16"
        )
    assert not (tmp_path / "o.safetensors").exists()


def test_zero_scales_of_zero_rows(tmp_path):
    """Per-channel scales of 0 for rows of zeros (a quantizer's scale for them): a row the
    merge leaves zero keeps its scale and zeros (the merge divided 0 by 0 before, and
    failed an assertion), a row the adapter makes nonzero gets a scale from its own peak;
    the others are the reference's. Extracting against the merged checkpoint's source
    finds the changed layer, not a layer equal by a 0/0."""
    gen = torch.Generator().manual_seed(21)
    w = torch.randn(4, 8, generator=gen)
    w[1:3] = 0
    w8, grid = quantized(w, (1, 8), (4, 1))
    assert torch.equal(grid[1:3], torch.zeros(2, 1))
    w8[1:3] = 0  # 0 / 0 in the helper
    base = tmp_path / "base.safetensors"
    save_file({"fc.weight": w8, "fc.weight_scale": grid}, str(base))
    a, b = lora(4, 8, 2, seed=22)
    b[1] = 0
    peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 2)
    merge_checkpoint(base, [tmp_path / "ad"], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    merged = w8.double() * grid.double() + b.double() @ a.double()
    rows = [0, 2, 3]
    ref, scale, near = quantize_ref(merged[rows], grid[rows], (1, 8), torch.float32)
    check_scale(out["fc.weight_scale"][rows], scale)
    assert float(out["fc.weight_scale"][2]) > 0
    assert_bytes(out["fc.weight"][rows], ref, near)
    assert float(out["fc.weight_scale"][1]) == 0
    assert torch.equal(out["fc.weight"][1].float(), torch.zeros(8))
    tuned = (w + torch.randn(4, 8, generator=gen) * 0.01).bfloat16()
    save_file({"fc.weight": tuned}, str(tmp_path / "tuned.safetensors"))
    report = extract_adapter(base, tmp_path / "tuned.safetensors", tmp_path / "x",
                             rank=4, dtype="float64")  # fmt: skip
    assert report["skipped"] == []
    ref = tuned.double() - w8.double() * grid.double()
    got = load_adapter(tmp_path / "x")["fc"].to_dense().double()
    assert float((got - ref).norm() / ref.norm()) < 1e-5  # Δ in float32


# --- extract ----------------------------------------------------------------------------


@pytest.mark.parametrize("scaled", ["base", "tuned"])
def test_extract_between_a_scaled_and_a_bfloat16_checkpoint(tmp_path, scaled):
    """A per-channel scaled float8 release quantized from a bfloat16 model, as the base
    (the bfloat16 model fine-tuned in one layer is the tuned) or as the tuned (the fine-tune
    quantized; the bfloat16 model the base): the untouched layer is the bfloat16 weight
    quantized (skipped), the changed one is extracted at full rank as the difference of the
    weights (`W8 · s` for the scaled one), and the scales are no `other_changes`."""
    gen = torch.Generator().manual_seed(11)
    keep, tune = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    keep, tune = keep.bfloat16(), tune.bfloat16()
    change = (torch.randn(6, 2, generator=gen) @ torch.randn(2, 8, generator=gen)).bfloat16()
    tuned = (tune.float() + change.float()).bfloat16()
    before, after = (tune, tuned) if scaled == "base" else (tuned, tune)
    k8, kg = quantized(keep.float(), (1, 8), (6, 1))
    b8, bg = quantized(before.float(), (1, 8), (6, 1))
    quantized_side = {"a.weight": k8, "a.weight_scale": kg, "b.weight": b8, "b.weight_scale": bg,
                      "b.input_scale": torch.tensor(0.5)}  # fmt: skip
    plain_side = {"a.weight": keep, "b.weight": after}
    sides = {scaled: quantized_side, ({"base", "tuned"} - {scaled}).pop(): plain_side}
    save_file(sides["base"], str(tmp_path / "base.safetensors"))
    save_file(sides["tuned"], str(tmp_path / "tuned.safetensors"))
    report = extract_adapter(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                             tmp_path / "ad", rank=6, dtype="float32")  # fmt: skip
    assert report["skipped"] == ["a"]
    assert report["other_changes"] == []
    dequantized = b8.double() * bg.double()
    ref = after.double() - dequantized if scaled == "base" else dequantized - after.double()
    got = load_adapter(tmp_path / "ad")["b"].to_dense().double()
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_extract_between_two_scaled_checkpoints(tmp_path):
    """Both scaled (per tensor, different scales): equal weights `W8 · s` are no change
    even in other bytes; a changed one is extracted from the dequantized weights."""
    gen = torch.Generator().manual_seed(12)
    w8 = torch.randn(5, 7, generator=gen).to(E4M3)
    same = {"a.weight": w8, "a.weight_scale": torch.tensor(0.5)}
    halved = (w8.float() * 2).to(E4M3)  # W8 · 0.5 = (2 W8) · 0.25, exact in float8
    other8 = torch.randn(5, 7, generator=gen).to(E4M3)
    save_file(
        {**same, "b.weight": w8.clone(), "b.weight_scale": torch.tensor(0.5)},
        str(tmp_path / "base.safetensors"),
    )
    save_file(
        {
            "a.weight": halved,
            "a.weight_scale": torch.tensor(0.25),
            "b.weight": other8,
            "b.weight_scale": torch.tensor(0.75),
        },
        str(tmp_path / "tuned.safetensors"),
    )
    report = extract_adapter(
        tmp_path / "base.safetensors",
        tmp_path / "tuned.safetensors",
        tmp_path / "ad",
        rank=5,
        dtype="float64",
    )
    assert report["skipped"] == ["a"]
    ref = other8.double() * 0.75 - w8.double() * 0.5
    got = load_adapter(tmp_path / "ad")["b"].to_dense().double()
    assert float((got - ref).norm() / ref.norm()) < 1e-6  # Δ in float32


@pytest.mark.parametrize("arithmetic", [torch.bfloat16, torch.float32])
def test_extract_skips_a_release_quantized_with_a_rounded_quotient(tmp_path, arithmetic):
    """An FP8 release quantized as quantizers do, `(W / s).to(float8)` with the quotient
    rounded first (compressed-tensors: bfloat16 weights and scales, divided in bfloat16;
    others in float32): where that quotient lands on a midpoint of two float8 values, the
    even one is stored, which the exact quotient may not round to. The untouched layer is
    still skipped (it was extracted as changed: its quantization error as an adapter); a
    layer with one entry a float8 step off is not."""
    gen = torch.Generator().manual_seed(21)
    weights = torch.randn(64, 32, generator=gen).bfloat16()
    scale = (weights.float().abs().amax(1, keepdim=True) / FMAX).to(arithmetic)
    w8 = (weights.to(arithmetic) / scale).to(E4M3)  # the quantizer's own rounding
    exact, _ = round_fp8(weights.double() / scale.double())
    assert bool((w8.double() != exact).any())  # some entries differ from one rounding
    off = w8.clone()
    off[5, 3] = (off[5, 3].float() * 1.5 + 1).to(E4M3)
    save_file({"a.weight": w8, "a.weight_scale": scale, "b.weight": off,
               "b.weight_scale": scale.clone()}, str(tmp_path / "base.safetensors"))  # fmt: skip
    tuned = {"a.weight": weights, "b.weight": weights.clone()}
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    report = extract_adapter(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                             tmp_path / "ad", rank=1, dtype="float32")  # fmt: skip
    assert report["skipped"] == ["a"]
    assert list(load_adapter(tmp_path / "ad").layers) == ["b"]


@pytest.mark.parametrize("scaled", ["base", "tuned", "both"])
@pytest.mark.parametrize("changed", [False, True])
def test_extract_compares_scaled_weights_a_block_of_rows_at_a_time(
    tmp_path, monkeypatch, scaled, changed
):
    """A scaled weight no target names (`a`, blocks of 4×4 rows and columns) is compared
    with the other checkpoint's a block of rows at a time (3 rows here, across the scale
    blocks' row edges), never read whole or as a whole float64 copy (both were, 8 or 16
    bytes per float8 entry: gigabytes for one large weight); unchanged it is no
    `other_changes`, and one entry changed in its last row is."""
    import lowrank.io.factor_tools as factor_tools
    from lowrank.io.checkpoint import Checkpoint

    gen = torch.Generator().manual_seed(13)
    plain_a = torch.randn(12, 8, generator=gen).bfloat16()
    _, grid = quantized(plain_a.float(), (4, 4), (3, 2))
    # quantized as a merge quantizes: the float64 quotient rounded once (table search)
    a8 = round_fp8(plain_a.double() / expand(grid.double(), (4, 4), (12, 8)))[0].to(E4M3)
    b = torch.randn(6, 8, generator=gen)
    quantized_side = {"a.weight": a8, "a.weight_scale": grid, "b.weight": b}
    plain_side = {"a.weight": plain_a, "b.weight": b}
    sides = {"base": quantized_side, "tuned": plain_side}
    if scaled == "tuned":
        sides = {"base": plain_side, "tuned": quantized_side}
    if scaled == "both":
        sides = {"base": quantized_side, "tuned": dict(quantized_side)}
    tuned = sides["tuned"] = dict(sides["tuned"])
    tuned["b.weight"] = b + torch.outer(torch.ones(6), torch.ones(8))
    if changed:  # one entry of the last row, past a float8 step and a bfloat16 one
        edited = tuned["a.weight"].float()
        edited[11, 7] = edited[11, 7] * 2 + (1 if scaled == "base" else 64)
        tuned["a.weight"] = edited.to(tuned["a.weight"].dtype)
    for side, state in sides.items():
        save_file(state, str(tmp_path / f"{side}.safetensors"))
    read: dict[str, int] = {}
    row_blocks, get = Checkpoint.row_blocks, Checkpoint.get

    def spied_blocks(self, key, elements, scratch=None):
        for block in row_blocks(self, key, elements, scratch):
            read[key] = max(read.get(key, 0), block.numel())
            yield block

    def spied_get(self, key):
        tensor = get(self, key)
        read[key] = max(read.get(key, 0), tensor.numel())
        return tensor

    monkeypatch.setattr(Checkpoint, "row_blocks", spied_blocks)
    monkeypatch.setattr(Checkpoint, "get", spied_get)
    monkeypatch.setattr(factor_tools, "CHUNK_ELEMENTS", 24)
    report = extract_adapter(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                             tmp_path / "ad", rank=1, dtype="float32", targets=["b"])  # fmt: skip
    assert report["other_changes"] == (["a.weight"] if changed else [])
    assert read["a.weight"] <= 24, read


def test_extract_refuses_an_integer_packed_checkpoint(tmp_path):
    save_file(
        {
            "fc.qweight": torch.zeros(2, 8, dtype=torch.int32),
            "fc.scales": torch.ones(1, 8),
            "head.weight": torch.ones(2, 2),
        },
        str(tmp_path / "base.safetensors"),
    )
    save_file(
        {"fc.weight": torch.ones(8, 16), "head.weight": torch.ones(2, 2)},
        str(tmp_path / "tuned.safetensors"),
    )
    with pytest.raises(DTypeError, match=r"fc\.qweight.*GPTQ.*unquantized checkpoints"):
        extract_adapter(
            tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "ad", rank=1
        )
    assert not (tmp_path / "ad").exists()


def test_apply_adapter_refuses_a_scaled_float8_module():
    """A model whose linear layer holds a float8 weight and its scale (transformers'
    `FP8Linear` keeps `weight_scale_inv` beside it): `apply_adapter` would add ΔW to the
    float8 values, so it refuses (`DTypeError` naming both), the weight unchanged."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False))
    model[0].weight.data = W8.clone()
    model[0].register_buffer("weight_scale_inv", torch.tensor(0.01))
    down, up = lora(8, 16, 2, 0)
    adapter = Adapter({"0": LoRA(down, up)})
    with pytest.raises(DTypeError, match=r"0\.weight.*0\.weight_scale_inv"):
        apply_adapter(model, adapter)
    assert torch.equal(model[0].weight.view(torch.uint8), W8.view(torch.uint8))


def test_a_peft_dora_merged_into_a_scaled_weight(tmp_path):
    """A PEFT DoRA layer (magnitude per output channel, no eps) on a per-tensor scaled
    weight: `m ⊙ (W + ΔW) / ‖W + ΔW‖` of the dequantized W, requantized (the magnitudes
    push the largest value past the stored scale, so the scale is raised)."""
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(6, 8, generator=gen)
    s = w.abs().max() / FMAX
    w8 = (w / s).to(E4M3)
    base = tmp_path / "base.safetensors"
    save_file({"fc.weight": w8, "fc.weight_scale": s.reshape(1)}, str(base))
    a, b = lora(6, 8, 2, 14)
    magnitude = torch.rand(6, generator=gen) * 4 + 1
    folder = peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 2)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.fc.lora_magnitude_vector"] = magnitude
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    merge_checkpoint(base, [folder], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    v = w8.double() * s.double() + b.double() @ a.double()
    merged = magnitude.double()[:, None] * v / v.norm(dim=1, keepdim=True)
    _, scale, _ = quantize_ref(merged, s.reshape(1, 1), (6, 8), torch.float32)
    assert float(scale) > float(s)
    scale = check_scale(out["fc.weight_scale"], scale)
    ref, near = round_fp8(merged / scale)
    assert_bytes(out["fc.weight"], ref, near)


def test_the_command_line_names_the_first_three_raised_scales(tmp_path, capsys):
    """Five weights whose scales a merge raises: the line counts them and names the first
    three (it named all: tens of thousands for the experts of a large model); `--json` lists
    every one."""
    state, factors = {}, {}
    for i in range(5):
        w8, grid = quantized(torch.randn(4, 6, generator=torch.Generator().manual_seed(i)),
                             (4, 6), (1, 1))  # fmt: skip
        state |= {f"m{i}.weight": w8, f"m{i}.weight_scale": grid.reshape(1)}
        b = torch.zeros(4, 1)
        b[0, 0] = float(grid) * 2000  # past the stored scale's range
        factors[f"m{i}"] = (torch.ones(1, 6), b)
    save_file(state, str(tmp_path / "base.safetensors"))
    ad = peft_adapter(tmp_path / "ad", factors, 1)
    args = ["merge", str(tmp_path / "base.safetensors"), str(ad), "-o"]
    assert main([*args, str(tmp_path / "out.safetensors")]) == 0
    text = capsys.readouterr().out
    assert ("5 scaled float8 weights requantized (5 larger scales: m0.weight_scale, "
            "m1.weight_scale, m2.weight_scale, …)") in text  # fmt: skip
    assert "m3.weight_scale" not in text
    assert main([*args, str(tmp_path / "out2.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rescaled_tensors"] == [f"m{i}.weight_scale" for i in range(5)]


def test_the_command_line_says_what_it_requantized_and_refuses_in_one_line(tmp_path, capsys):
    """`lowrank merge` of a scaled base names the scales it raised; of a GPTQ one, exits 2
    with the refusal on one line and writes nothing."""
    w8, grid = quantized(torch.randn(4, 6, generator=torch.Generator().manual_seed(15)),
                         (1, 6), (4, 1))  # fmt: skip
    save_file({"fc.weight": w8, "fc.weight_scale": grid}, str(tmp_path / "base.safetensors"))
    a, b = torch.ones(1, 6), torch.zeros(4, 1)
    b[0, 0] = float(grid[0, 0]) * 2000  # row 0 needs a larger scale
    ad = peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 1)
    status = main(["merge", str(tmp_path / "base.safetensors"), str(ad), "-o",
                   str(tmp_path / "out.safetensors")])  # fmt: skip
    text = capsys.readouterr().out
    assert status == 0
    assert "1 scaled float8 weights requantized (1 larger scales: fc.weight_scale)" in text
    save_file({"fc.qweight": torch.zeros(2, 6, dtype=torch.int32), "fc.scales": torch.ones(1, 6)},
              str(tmp_path / "gptq.safetensors"))  # fmt: skip
    status = main(["merge", str(tmp_path / "gptq.safetensors"), str(ad), "-o",
                   str(tmp_path / "gptq-out.safetensors")])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "fc.qweight" in err and "GPTQ" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "gptq-out.safetensors").exists()


@pytest.mark.parametrize(
    ("name", "stored_shape", "config"),
    [
        ("scale_weight", (6, 3, 1), None),  # musubi-tuner: (out, n, 1), blocks of in/n columns
        ("weight_scale", (6, 3), {"quantization_config": {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"g": {"weights": {"strategy": "group", "group_size": 4}}}}}),
    ],
)  # fmt: skip
def test_per_group_scales_along_the_input(tmp_path, name, stored_shape, config):
    """Scales per output channel and group of 4 input columns, as musubi-tuner stores them
    (`(out, n, 1)`) and compressed-tensors' group strategy (`(out, in/g)`, `group_size` in
    `config.json`): the scale keeps its stored shape, the bytes the reference's."""
    w = torch.randn(6, 12, generator=torch.Generator().manual_seed(16))
    w8, grid = quantized(w, (1, 4), (6, 3))
    folder = tmp_path / "base"
    folder.mkdir()
    save_file({"fc.weight": w8, f"fc.{name}": grid.reshape(stored_shape)},
              str(folder / "model.safetensors"))  # fmt: skip
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    a, b = lora(6, 12, 2, 17, size=0.4)
    ad = peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 2)
    merge_checkpoint(folder / "model.safetensors", [ad], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert out[f"fc.{name}"].shape == stored_shape
    merged = w8.double() * expand(grid.double(), (1, 4), (6, 12)) + b.double() @ a.double()
    _, scale, _ = quantize_ref(merged, grid, (1, 4), torch.float32)
    scale = check_scale(out[f"fc.{name}"], scale)
    ref, near = round_fp8(merged / expand(scale, (1, 4), (6, 12)))
    assert_bytes(out["fc.weight"], ref, near)


# --- tensors of codes and other dtypes safetensors holds ---------------------------------


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _other_dtypes(seed: int) -> dict[str, torch.Tensor]:
    """One tensor of each dtype safetensors holds beyond the usual ones: MX-style codes
    (`F8_E8M0`, here also under a weight's name), ROCm's float8 (`FNUZ`) and a complex64
    rotary table."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "mx.weight": torch.randint(100, 140, (4, 3), generator=gen, dtype=torch.uint8).view(
            torch.float8_e8m0fnu
        ),
        "mx.weight_scale_e8": torch.randint(100, 140, (4, 1), generator=gen,
                                            dtype=torch.uint8).view(torch.float8_e8m0fnu),
        "rope.freqs": torch.randn(3, 2, generator=gen, dtype=torch.complex64),
        "nz.weight": torch.randn(4, 6, generator=gen).to(torch.float8_e4m3fnuz),
    }  # fmt: skip


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_tensors_of_codes_are_copied_byte_for_byte(tmp_path, dtype):
    """A checkpoint holding F8_E8M0, complex64 and float8 FNUZ tensors is read (it was
    refused: "a dtype torch lacks"); merging an adapter on its float32 layer copies them
    byte for byte in their dtypes (with `dtype`, only the float32 weight changes dtype and
    the FNUZ one, which holds numbers), and the merged layer is the float64 W + B A rounded
    (to within float32's accumulation)."""
    others = _other_dtypes(0)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 5, generator=gen)
    save_file({**others, "fc.weight": w}, str(tmp_path / "base.safetensors"))
    a, b = lora(6, 5, 2, seed=2)
    peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 2)
    merge_checkpoint(tmp_path / "base.safetensors", [tmp_path / "ad"],
                     tmp_path / "out.safetensors", dtype=dtype)  # fmt: skip
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        out = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    for key in ("mx.weight", "mx.weight_scale_e8", "rope.freqs"):
        assert out[key].dtype == others[key].dtype and _bytes(out[key]) == _bytes(others[key])
    nz = others["nz.weight"]
    if dtype is None:
        assert out["nz.weight"].dtype == nz.dtype and _bytes(out["nz.weight"]) == _bytes(nz)
    else:
        assert torch.equal(out["nz.weight"], nz.to(torch.float32).to(torch.bfloat16))
    ref = w.double() + b.double() @ a.double()
    assert out["fc.weight"].dtype == (torch.bfloat16 if dtype else torch.float32)
    step = 2.0**-7 if dtype else 2.0**-22  # accumulated in float32, rounded once to dtype
    assert torch.allclose(out["fc.weight"].double(), ref, rtol=step, atol=0)


def test_a_merge_into_a_tensor_of_codes_is_refused(tmp_path):
    """An adapter on a weight of codes (F8_E8M0: powers of two, no sign) is a DTypeError
    naming it, and nothing is written."""
    save_file(_other_dtypes(0), str(tmp_path / "base.safetensors"))
    a, b = lora(4, 3, 1, seed=3)
    peft_adapter(tmp_path / "ad", {"mx": (a, b)}, 1)
    with pytest.raises(DTypeError, match=r"mx\.weight is torch\.float8_e8m0fnu"):
        merge_checkpoint(tmp_path / "base.safetensors", [tmp_path / "ad"],
                         tmp_path / "out.safetensors")  # fmt: skip
    assert not (tmp_path / "out.safetensors").exists()


def test_a_merge_into_a_float8_fnuz_weight(tmp_path):
    """ROCm's float8_e4m3fnuz: merged in float32 and rounded to it, as torch rounds the
    float64 W + B A (no value near a tie here: checked)."""
    gen = torch.Generator().manual_seed(4)
    w8 = torch.randn(4, 6, generator=gen).to(torch.float8_e4m3fnuz)
    save_file({"nz.weight": w8}, str(tmp_path / "base.safetensors"))
    a, b = lora(4, 6, 2, seed=5)
    peft_adapter(tmp_path / "ad", {"nz": (a, b)}, 2)
    merge_checkpoint(tmp_path / "base.safetensors", [tmp_path / "ad"],
                     tmp_path / "out.safetensors")  # fmt: skip
    merged = w8.double() + b.double() @ a.double()
    ref = merged.to(torch.float8_e4m3fnuz)
    assert torch.equal(merged.float().to(torch.float8_e4m3fnuz), ref)  # float32 rounds alike
    assert torch.equal(load_file(tmp_path / "out.safetensors")["nz.weight"], ref)


def test_extract_compares_tensors_of_codes_by_their_bytes(tmp_path):
    """Equal code tensors are no change; one byte changed in each of two E8M0 tensors (one
    named as a weight) is an `other_changes` entry, and neither is taken as a weight to
    factor."""
    base = _other_dtypes(0)
    tuned = {key: value.clone() for key, value in base.items()}
    for key in ("mx.weight", "mx.weight_scale_e8"):
        raw = tuned[key].view(torch.uint8)
        raw[0, 0] = raw[0, 0] ^ 1
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(6, 5, generator=gen)
    save_file({**base, "fc.weight": w}, str(tmp_path / "base.safetensors"))
    change = torch.randn(6, 1, generator=gen) @ torch.randn(1, 5, generator=gen)
    save_file({**tuned, "fc.weight": w + change}, str(tmp_path / "tuned.safetensors"))
    report = extract_adapter(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                             tmp_path / "ad", rank=1, dtype="float64")  # fmt: skip
    assert sorted(report["other_changes"]) == ["mx.weight", "mx.weight_scale_e8"]
    got = load_adapter(tmp_path / "ad")
    assert set(got.layers) == {"fc"}
    ref = (w + change).double() - w.double()
    assert float((got["fc"].to_dense().double() - ref).norm() / ref.norm()) < 1e-6


# --- exactness and hostile inputs ----------------------------------------------------------


def _unchanged_by_a_zero_layer(tmp_path, w8, scale):
    """`w8` with `scale` merged with a LoRA layer of zeros: the output's float8 bytes and
    scale (W + 0 needs no other)."""
    save_file({"fc.weight": w8, "fc.weight_scale": scale}, str(tmp_path / "base.safetensors"))
    out, cols = w8.shape
    ad = peft_adapter(tmp_path / "ad", {"fc": (torch.zeros(1, cols), torch.zeros(out, 1))}, 1)
    merge_checkpoint(tmp_path / "base.safetensors", [ad], tmp_path / "out.safetensors")
    return load_file(tmp_path / "out.safetensors")


@pytest.mark.parametrize(
    "scale",
    [
        torch.tensor([[2.0**-147], [0.75]]),  # float32 subnormal: W8 · s loses bits in float32
        torch.tensor([[1e-60], [1e-3]], dtype=torch.float64),  # 0 in float32
        torch.tensor([[1e300], [1e-3]], dtype=torch.float64),  # Inf in float32
    ],
)
def test_scales_float32_cannot_multiply_exactly_leave_an_unchanged_weight_as_it_is(
    tmp_path, scale
):
    """A layer of zeros changes nothing: W8 and the scale come back as they are (a −0 as 0)
    for any scale, including a subnormal float32 one (1.875 · 2⁻¹⁴⁷ rounded to
    float32's 2⁻¹⁴⁹ steps made W8 2.0 when the merge dequantized in float32) and float64
    ones beyond float32's range (the weight became zeros, or the merge failed as Inf)."""
    w8 = torch.tensor([[1.875, -1.625, 0.4375, 448.0], [-3.5, 13.0, 0.0, -0.0]]).to(E4M3)
    out = _unchanged_by_a_zero_layer(tmp_path, w8, scale)
    assert torch.equal(out["fc.weight"].float(), w8.float())  # −0 + 0 is 0
    assert out["fc.weight_scale"].dtype == scale.dtype
    assert torch.equal(out["fc.weight_scale"], scale)


def test_a_quotient_just_off_a_midpoint_rounds_to_its_side(tmp_path):
    """`(W + ΔW) / s` just above the midpoint 1.0625 of the float8 values 1 and 1.125 (by
    2⁻³⁰, which float32 does not hold) rounds up, as the float64 reference rounds it; a cast
    through float32 lands on the midpoint and rounds to even, 1."""
    w8 = torch.tensor([[1.0, 2.0]]).to(E4M3)
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0625 + 2.0**-30]], dtype=torch.float64)
    save_file({"fc.weight": w8, "fc.weight_scale": torch.tensor(1.0)},
              str(tmp_path / "base.safetensors"))  # fmt: skip
    ad = peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 1)
    merge_checkpoint(tmp_path / "base.safetensors", [ad], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    ref, _ = round_fp8(torch.tensor([[1.0625 + 2.0**-30, 2.0]], dtype=torch.float64))
    assert ref.tolist() == [[1.125, 2.0]]
    assert out["fc.weight"].double().tolist() == [[1.125, 2.0]]


def test_a_float16_scale_past_its_range_is_refused(tmp_path):
    """A block whose merged values need a scale past float16's 65,504 (here 1e9 / 448) had
    its scale stored as Inf, its values 0: now a `NonFiniteError` naming the weight and its
    scale, nothing written."""
    w8 = torch.randn(2, 4, generator=torch.Generator().manual_seed(30)).to(E4M3)
    state = {"fc.weight": w8, "fc.weight_scale": torch.tensor([[6e4]], dtype=torch.float16)}
    save_file(state, str(tmp_path / "base.safetensors"))
    a, b = torch.zeros(1, 4), torch.zeros(2, 1)
    a[0, 0], b[0, 0] = 1.0, 1e9
    ad = peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 1)
    with pytest.raises(LowRankError, match=r"fc\.weight.*float16.*fc\.weight_scale"):
        merge_checkpoint(tmp_path / "base.safetensors", [ad], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_dtype_dequantizes_scaled_weights_no_adapter_touches(tmp_path):
    """`dtype=` with an adapter on a plain layer only: the untouched scaled weight is
    written as `W8 · s` rounded once to bfloat16 (it was refused; a cast of its float8
    values and its scale alone would be other weights), its scale left out."""
    w8 = torch.randn(4, 6, generator=torch.Generator().manual_seed(31)).to(E4M3)
    s = torch.tensor([[0.0123], [0.5], [1.1], [3.3]])
    p = torch.randn(4, 6)
    save_file({"q.weight": w8, "q.weight_scale": s, "p.weight": p},
              str(tmp_path / "base.safetensors"))  # fmt: skip
    a, b = lora(4, 6, 2, 32)
    ad = peft_adapter(tmp_path / "ad", {"p": (a, b)}, 2)
    report = merge_checkpoint(tmp_path / "base.safetensors", [ad], tmp_path / "out.safetensors",
                              dtype="bfloat16")  # fmt: skip
    out = load_file(tmp_path / "out.safetensors")
    assert sorted(out) == ["p.weight", "q.weight"]
    ref, _ = round_once(w8.double() * s.double(), torch.bfloat16)
    assert out["q.weight"].dtype == torch.bfloat16
    assert torch.equal(out["q.weight"].double(), ref)
    # a plain weight is merged in float32 and cast, as before
    merged = p.double() + b.double() @ a.double()
    assert torch.allclose(out["p.weight"].double(), merged, rtol=2**-8, atol=0)
    assert report["dequantized_tensors"] == ["q.weight"]
    assert report["dropped_tensors"] == ["q.weight_scale"]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fnuz, torch.float8_e5m2fnuz])
def test_a_scaled_float8_fnuz_weight_is_merged_as_w8_times_s(tmp_path, dtype):
    """ROCm's float8 FNUZ stored with a `weight_scale` is `W8 · s` as the other float8
    dtypes are (the merge added ΔW to its float8 values, ignoring the scale): the bytes are
    the reference's, rounded from the float64 merge with the kept scale."""
    gen = torch.Generator().manual_seed(33)
    w8 = torch.randn(4, 6, generator=gen).to(dtype)
    grid = torch.tensor([[0.01], [0.02], [0.5], [0.003]])
    save_file({"fc.weight": w8, "fc.weight_scale": grid}, str(tmp_path / "base.safetensors"))
    a, b = lora(4, 6, 2, 34, size=0.05)
    ad = peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 2)
    merge_checkpoint(tmp_path / "base.safetensors", [ad], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    merged = w8.double() * grid.double() + b.double() @ a.double()
    largest = torch.finfo(dtype).max
    assert float((merged / grid.double()).abs().max()) < largest  # the scales are kept
    values, _ = _table(dtype)
    q = (merged / grid.double()).reshape(-1)
    nearest = values[(q[:, None] - values[None, :]).abs().argmin(1)].reshape(4, 6)
    assert torch.equal(out["fc.weight_scale"], grid)
    assert torch.equal(out["fc.weight"].double(), nearest)


@pytest.mark.parametrize(
    "settings",
    [
        {"quant_method": "fp8", "weight_block_size": [math.inf, 8]},
        {"quant_method": "fp8", "weight_block_size": [True, 8]},
        {"quant_method": "fp8", "weight_block_size": [1.5, 8]},
        {"quant_method": "compressed-tensors",
         "config_groups": {"g": {"weights": {"block_structure": [math.inf, 8]}}}},
        {"quant_method": "compressed-tensors",
         "config_groups": {"g": {"weights": {"group_size": 2.5}}}},
        {"quant_method": "compressed-tensors",
         "config_groups": {"g": {"weights": {"group_size": True}}}},
        {"quant_method": "fp8", "weight_block_size": ["\u00b9", 8]},
        {"quant_method": "fp8", "weight_block_size": ["9" * 5000, 8]},
    ],
)  # fmt: skip
def test_block_sizes_that_are_no_positive_integers_are_refused(tmp_path, settings):
    """`config.json` block sizes of Infinity (an OverflowError before), a bool or a
    fraction (read as 1), a superscript digit or more digits than `int` reads (ValueErrors
    before): `FileFormatError` naming config.json, nothing written."""
    _refused(
        tmp_path,
        {"fc.weight": W8, "fc.weight_scale_inv": torch.ones(8, 2)},
        FileFormatError,
        ["config.json", "positive integer"],
        {"quantization_config": settings},
    )


@pytest.mark.parametrize("stated", [[1, 2**40], [2**40, 2**40], ["1", str(10**30)]])
def test_a_block_size_past_the_weight_s_edge(tmp_path, stated):
    """`weight_block_size` wider than the weight: one block spans each row (or the whole
    weight), as `⌈in/b⌉ = 1` says; the merge pads rows to the weight's width, not the block's
    (it tried to allocate 2⁴⁰ columns per row: a RuntimeError, or all memory for 2³⁰).
    Compared with the float64 reference of the per-row (per-tensor) layout."""
    torch.manual_seed(3)
    w = torch.randn(8, 16)
    rows = 1 if stated[0] == 1 or stated[0] == "1" else 8
    grid_shape = (8 // rows, 1)
    w8, grid = quantized(w, (rows, 16), grid_shape)
    folder = tmp_path / "base"
    folder.mkdir()
    save_file({"fc.weight": w8, "fc.weight_scale_inv": grid}, str(folder / "model.safetensors"))
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": stated}}
    (folder / "config.json").write_text(json.dumps(config))
    a, b = lora(8, 16, 2, 4, size=0.5)
    ad = peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 2)
    merge_checkpoint(folder / "model.safetensors", [ad], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    merged = w8.double() * expand(grid.double(), (rows, 16), (8, 16)) + b.double() @ a.double()
    ref, scale, near = quantize_ref(merged, grid, (rows, 16), torch.float32)
    check_scale(out["fc.weight_scale_inv"], scale)
    assert_bytes(out["fc.weight"], ref, near)


def test_a_float8_tensor_saved_whole_in_place_of_a_scaled_weight_is_refused(tmp_path):
    """A PEFT folder saving a float8 tensor whole in place of a scaled weight (its values
    stand for no weights without a scale): `DTypeError` naming the weight and its scale
    (the merge failed with torch's NotImplementedError comparing float8 tensors); saved in
    place of a plain float8 weight, it is that weight's values, merged as such."""
    gen = torch.Generator().manual_seed(35)
    saved = torch.randn(8, 16, generator=gen).to(E4M3)
    save_file({"q.weight": W8, "q.weight_scale": torch.tensor(0.01), "p.weight": W8.clone()},
              str(tmp_path / "base.safetensors"))  # fmt: skip
    for module in ("q", "p"):
        folder = peft_adapter(tmp_path / module, {"k": lora(8, 16, 2, 36)}, 2)
        tensors = load_file(folder / "adapter_model.safetensors")
        tensors[f"base_model.model.{module}.weight"] = saved
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(target_modules=["k"], modules_to_save=[module])
        (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({"q.weight": W8, "q.weight_scale": torch.tensor(0.01), "p.weight": W8.clone(),
               "k.weight": torch.randn(8, 16, generator=gen)},
              str(tmp_path / "base.safetensors"))  # fmt: skip
    with pytest.raises(DTypeError, match=r"q\.weight.*q\.weight_scale.*float8_e4m3fn"):
        merge_checkpoint(tmp_path / "base.safetensors", [tmp_path / "q"],
                         tmp_path / "out.safetensors")  # fmt: skip
    assert not (tmp_path / "out.safetensors").exists()
    report = merge_checkpoint(tmp_path / "base.safetensors", [tmp_path / "p"],
                              tmp_path / "out.safetensors")  # fmt: skip
    assert report["replaced_tensors"] == ["p.weight"]
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["p.weight"].view(torch.uint8), saved.view(torch.uint8))


def test_a_float8_e5m2fnuz_value_below_its_rounding_bound_keeps_the_scale(tmp_path):
    """57,344 + 3,000 rounds to float8_e5m2fnuz's largest, 57,344 (its step there is
    8,192; 61,440 is the bound), so the scale is kept; `torch.finfo`'s eps for it is half
    its step, by which the bound read 59,392 and the scale was raised."""
    dtype = torch.float8_e5m2fnuz
    w8 = torch.tensor([[57344.0, 1.0]]).to(dtype)
    save_file({"fc.weight": w8, "fc.weight_scale": torch.tensor(1.0)},
              str(tmp_path / "base.safetensors"))  # fmt: skip
    ad = peft_adapter(tmp_path / "ad", {"fc": (torch.tensor([[1.0, 0.0]]),
                                               torch.tensor([[3000.0]]))}, 1)  # fmt: skip
    report = merge_checkpoint(tmp_path / "base.safetensors", [ad], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert report["rescaled_tensors"] == []
    assert float(out["fc.weight_scale"]) == 1.0
    assert out["fc.weight"].double().tolist() == [[57344.0, 1.0]]


def test_a_layer_cancelling_most_of_a_weight_rounds_as_the_reference(tmp_path):
    """W = 448 · s (s = float32 0.1) and ΔW = −W + 0.531256 · s: the quotient lies 6e-6
    above the midpoint 0.53125 of the float8 values 0.5 and 0.5625 (outside the 1e-5
    near-tie rule), so it rounds up. In float32, `W8 · s` and the sum rounded by
    2.7e-6 of W, ten times the quotient's distance from the tie, and it rounded down."""
    s = torch.tensor(0.1)
    w = 448 * s.double()
    save_file({"fc.weight": torch.tensor([[448.0, 1.0]]).to(E4M3), "fc.weight_scale": s},
              str(tmp_path / "base.safetensors"))  # fmt: skip
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    b = (-w + (0.53125 + 6e-6) * s.double()).reshape(1, 1)
    ad = peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 1)
    merge_checkpoint(tmp_path / "base.safetensors", [ad], tmp_path / "out.safetensors")
    merged = torch.tensor([[w + float(b), 0.1]], dtype=torch.float64) / s.double()
    ref, near = round_fp8(merged)
    assert not bool(near.any()) and ref.tolist() == [[0.5625, 1.0]]
    assert load_file(tmp_path / "out.safetensors")["fc.weight"].double().tolist() == [[0.5625, 1.0]]


def test_a_per_channel_scale_of_shape_out_by_1_on_a_convolution(tmp_path):
    """A 3×3 convolution's float8 weight with a scale `(out, 1)`, one per output channel
    as on a linear layer, is merged as such (it was refused, by a message listing `(out,
    1)` as a layout it reads)."""
    gen = torch.Generator().manual_seed(40)
    conv = torch.randn(3, 2, 3, 3, generator=gen)
    grid = conv.reshape(3, -1).abs().amax(1, keepdim=True) / FMAX
    w8 = (conv / grid[:, :, None, None]).to(E4M3)
    save_file({"c.weight": w8, "c.weight_scale": grid}, str(tmp_path / "base.safetensors"))
    down = torch.randn(2, 2, 3, 3, generator=gen) * 0.1
    up = torch.randn(3, 2, 1, 1, generator=gen) * 0.1
    peft_adapter(tmp_path / "ad", {"c": (down, up)}, 2)
    merge_checkpoint(tmp_path / "base.safetensors", [tmp_path / "ad"],
                     tmp_path / "out.safetensors")  # fmt: skip
    out = load_file(tmp_path / "out.safetensors")
    delta = up[:, :, 0, 0].double() @ down.reshape(2, -1).double()
    merged = w8.double().reshape(3, -1) * grid.double() + delta
    ref, scale, near = quantize_ref(merged, grid, (1, 18), torch.float32)
    assert torch.equal(out["c.weight_scale"].double(), scale)
    assert_bytes(out["c.weight"].reshape(3, -1), ref, near)


def test_a_plain_float8_e5m2fnuz_merge_up_to_its_bound(tmp_path):
    """An unscaled float8_e5m2fnuz weight of 57,344 (its largest) plus 3,000 rounds back to
    57,344 (its step there is 8,192): merged, not refused as an overflow (the bound was
    taken from `torch.finfo`'s eps, half the dtype's step: 59,392 instead of 61,440); past
    61,440 it is refused."""
    dtype = torch.float8_e5m2fnuz
    w = torch.full((1, 1), 57344.0).to(dtype)
    save_file({"fc.weight": w}, str(tmp_path / "base.safetensors"))
    for delta, fits in ((3000.0, True), (4200.0, False)):
        folder = peft_adapter(tmp_path / f"ad{delta}", {"fc": (torch.ones(1, 1),
                                                                 torch.full((1, 1), delta))}, 1)
        out = tmp_path / f"out{delta}.safetensors"
        if fits:
            merge_checkpoint(tmp_path / "base.safetensors", [folder], out)
            assert float(load_file(out)["fc.weight"].double()) == 57344.0
        else:
            with pytest.raises(LowRankError, match=r"fc\.weight"):
                merge_checkpoint(tmp_path / "base.safetensors", [folder], out)
            assert not out.exists()


LAYOUTS = {
    # name: (weight shape, block, scale grid, scale name, config.json)
    "per tensor": ((6, 10), (6, 10), (1, 1), "weight_scale", None),
    "per channel": ((6, 10), (1, 10), (6, 1), "weight_scale", None),
    "blocks": ((10, 19), (4, 8), (3, 3), "weight_scale_inv", {"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [4, 8], "activation_scheme": "dynamic"}}),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_dtype_writes_scaled_weights_dequantized(tmp_path, layout, dtype):
    """`dtype=`: an adapted scaled weight is `W8 · s + ΔW` in float64 rounded once to `dtype`,
    an untouched one `W8 · s` rounded once; their scales and activation scales are left out
    (the re-read output holds none), the report names them, the input is unchanged."""
    shape, block, grid_shape, name, config = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(41)
    state, stored = {}, {}
    for module in ("fc", "other"):
        w8, grid = quantized(torch.randn(shape, generator=gen), block, grid_shape)
        grid = grid.reshape(1) if layout == "per tensor" else grid
        state |= {f"m.{module}.weight": w8, f"m.{module}.{name}": grid}
        stored[module] = w8.double() * expand(grid.double().reshape(grid_shape), block, shape)
    state |= {"m.fc.input_scale": torch.tensor([0.25]), "m.norm.weight": torch.randn(10)}
    folder = tmp_path / "base"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    before = digest([folder])
    a, b = lora(*shape, 2, 42, size=0.3)
    ad = peft_adapter(tmp_path / "ad", {"m.fc": (a, b)}, 2)
    name_ = str(dtype).removeprefix("torch.")
    report = merge_checkpoint(folder, [ad], tmp_path / "out.safetensors", weights=[0.5],
                              dtype=name_)  # fmt: skip
    out = load_file(tmp_path / "out.safetensors")
    assert sorted(out) == ["m.fc.weight", "m.norm.weight", "m.other.weight"]
    assert all(t.dtype == dtype for t in out.values())
    ref, _ = round_once(stored["other"], dtype)
    assert torch.equal(out["m.other.weight"].double(), ref)
    ref, near = round_once(stored["fc"] + 0.5 * (b.double() @ a.double()), dtype)
    differ = out["m.fc.weight"].double() != ref
    assert not bool((differ & ~near).any()), f"{int((differ & ~near).sum())} entries differ"
    assert torch.equal(out["m.norm.weight"], state["m.norm.weight"].to(dtype))
    assert report["dequantized_tensors"] == ["m.fc.weight", "m.other.weight"]
    assert report["dropped_tensors"] == sorted(
        ["m.fc.input_scale", f"m.fc.{name}", f"m.other.{name}"]
    )
    assert report["requantized_tensors"] == [] and report["dtype"] == name_
    assert digest([folder]) == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_dequantized_weight_just_below_a_midpoint_rounds_down(tmp_path, dtype):
    """`W8 · s` within 2⁻²⁴ (relative) below the midpoint of two `dtype` values whose upper
    one is even: torch's cast from float64 rounds it to float32's midpoint, then up to the
    even value; rounded once, it is the value below."""
    step = torch.finfo(dtype).eps  # the spacing above 1
    target = 1 + 1.5 * step  # between 1 + step (odd) and 1 + 2·step (even)
    w8 = torch.full((2, 4), 1.25).to(E4M3)
    s = torch.tensor(target / 1.25, dtype=torch.float32)
    while s.double() * 1.25 >= target:
        s = torch.nextafter(s, torch.tensor(0.0))
    exact = w8.double() * s.double()
    assert float(exact.to(dtype)[0, 0]) == 1 + 2 * step  # the double rounding this avoids
    ref, _ = round_once(exact, dtype)
    assert float(ref[0, 0]) == 1 + step
    save_file({"fc.weight": w8, "fc.weight_scale": s.reshape(1), "g.weight": torch.ones(4, 4)},
              str(tmp_path / "base.safetensors"))  # fmt: skip
    ad = peft_adapter(tmp_path / "ad", {"g": lora(4, 4, 1, 43)}, 1)
    merge_checkpoint(tmp_path / "base.safetensors", [ad], tmp_path / "out.safetensors",
                     dtype=str(dtype).removeprefix("torch."))  # fmt: skip
    assert torch.equal(load_file(tmp_path / "out.safetensors")["fc.weight"].double(), ref)


def test_a_dequantized_block_layout_matches_transformers(tmp_path):
    """transformers' fine-grained FP8 dequantization of the same blocks: its exact helper
    (float64, partial edge blocks) rounded once is lowrank's bfloat16 output, and its
    loader's `Fp8Dequantize` (`dequantize=True`, whole blocks only, in float32) is lowrank's
    float32 output byte for byte."""
    helper = pytest.importorskip("transformers.integrations.finegrained_fp8")
    gen = torch.Generator().manual_seed(44)
    edge8, edge_grid = quantized(torch.randn(10, 19, generator=gen), (4, 8), (3, 3))
    whole8, whole_grid = quantized(torch.randn(8, 16, generator=gen), (4, 8), (2, 2))
    save_file({"edge.weight": edge8, "edge.weight_scale_inv": edge_grid,
               "whole.weight": whole8, "whole.weight_scale_inv": whole_grid,
               "g.weight": torch.ones(4, 4)}, str(tmp_path / "model.safetensors"))  # fmt: skip
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [4, 8]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ad = peft_adapter(tmp_path / "ad", {"g": lora(4, 4, 1, 45)}, 1)
    for dtype in ("bfloat16", "float32"):
        merge_checkpoint(tmp_path / "model.safetensors", [ad], tmp_path / f"{dtype}.safetensors",
                         dtype=dtype)  # fmt: skip
    bf16 = load_file(tmp_path / "bfloat16.safetensors")
    f32 = load_file(tmp_path / "float32.safetensors")
    for key, w8, grid in (("edge", edge8, edge_grid), ("whole", whole8, whole_grid)):
        theirs = helper._dequantize_fp8_weight(w8, grid, [4, 8], torch.float64)
        ref, _ = round_once(theirs, torch.bfloat16)
        assert torch.equal(bf16[f"{key}.weight"].double(), ref)
    loader = helper.Fp8Dequantize(None)._dequantize_one(whole8, whole_grid, torch.float32)
    assert torch.equal(f32["whole.weight"], loader)


def test_a_sharded_base_dequantized_with_scales_in_another_shard(tmp_path):
    """A sharded base whose scales all lie in a shard of their own: `dtype=bfloat16` writes
    the weights dequantized, the index lists no scale, and the shard of scales alone is
    not written (an older one in the folder, listed by the index it replaces, is removed)."""
    gen = torch.Generator().manual_seed(46)
    state, stored = {}, {}
    for i in range(3):
        w8, grid = quantized(torch.randn(5, 12, generator=gen), (1, 12), (5, 1))
        state |= {f"h.{i}.fc.weight": w8, f"h.{i}.fc.weight_scale": grid}
        stored[i] = w8.double() * grid.double()
    state["norm.weight"] = torch.randn(12, generator=gen)
    index = save_sharded(state, tmp_path / "base", 2)
    shards = json.loads(index.read_text())["weight_map"]
    assert {shards[f"h.{i}.fc.weight_scale"] for i in range(3)} == {
        "model-00002-of-00002.safetensors"
    } != {shards[f"h.{i}.fc.weight"] for i in range(3)}
    (tmp_path / "out").mkdir()
    save_sharded({"x": torch.ones(1), "y": torch.ones(1)}, tmp_path / "out", 2)  # an older one
    factors = {f"h.{i}.fc": lora(5, 12, 2, 47 + i) for i in (0, 2)}
    ad = peft_adapter(tmp_path / "ad", factors, 2)
    report = merge_checkpoint(index, [ad], tmp_path / "out", dtype="bfloat16")
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    kept = {k: v for k, v in shards.items() if not k.endswith("weight_scale")}
    assert out_index["weight_map"] == kept
    assert listing(tmp_path / "out") == {"model.safetensors.index.json",
                                         "model-00001-of-00002.safetensors"}  # fmt: skip
    out = load_file(tmp_path / "out" / "model-00001-of-00002.safetensors")
    assert sorted(out) == sorted(kept)
    assert out_index["metadata"]["total_size"] == sum(t.numel() * 2 for t in out.values())
    for i in range(3):
        delta = (factors[f"h.{i}.fc"][1].double() @ factors[f"h.{i}.fc"][0].double()
                 if i != 1 else 0.0)  # fmt: skip
        ref, near = round_once(stored[i] + delta, torch.bfloat16)
        differ = out[f"h.{i}.fc.weight"].double() != ref
        assert not bool((differ & ~near).any())
    assert report["output"] == [str(tmp_path / "out" / "model-00001-of-00002.safetensors"),
                                str(tmp_path / "out" / "model.safetensors.index.json")]  # fmt: skip


def test_a_dequantized_comfyui_checkpoint_drops_its_marker(tmp_path):
    """ComfyUI's scaled fp8 with `dtype=bfloat16`: the `scaled_fp8` marker, `scale_weight`
    and `scale_input` are left out (a loader seeing the marker would read the plain
    weights as scaled), the linear and the untouched 3×3 convolution are `W8 · s` (+ ΔW)
    rounded once, and a float8 weight without a scale is cast as it was."""
    gen = torch.Generator().manual_seed(48)
    s_lin, s_conv, state = comfyui_scaled(gen)
    plain8 = torch.randn(3, 3, generator=gen).to(E4M3)
    state["net.plain.weight"] = plain8
    save_file(state, str(tmp_path / "model.safetensors"))
    a, b = lora(6, 8, 2, 49)
    save_file({"lora_unet_net_lin.lora_down.weight": a, "lora_unet_net_lin.lora_up.weight": b,
               "lora_unet_net_lin.alpha": torch.tensor(2.0)},
              str(tmp_path / "k.safetensors"))  # fmt: skip
    report = merge_checkpoint(tmp_path / "model.safetensors", [tmp_path / "k.safetensors"],
                              tmp_path / "out.safetensors", dtype="bfloat16")  # fmt: skip
    out = load_file(tmp_path / "out.safetensors")
    assert sorted(out) == ["net.conv.weight", "net.lin.weight", "net.plain.weight"]
    ref, near = round_once(state["net.lin.weight"].double() * s_lin.double()
                           + b.double() @ a.double(), torch.bfloat16)  # fmt: skip
    assert not bool(((out["net.lin.weight"].double() != ref) & ~near).any())
    ref, _ = round_once(state["net.conv.weight"].double() * s_conv.double(), torch.bfloat16)
    assert out["net.conv.weight"].shape == (4, 3, 3, 3)
    assert torch.equal(out["net.conv.weight"].double(), ref)
    assert torch.equal(out["net.plain.weight"], plain8.to(torch.bfloat16))
    assert report["dropped_tensors"] == ["net.conv.scale_weight", "net.lin.scale_input",
                                         "net.lin.scale_weight", "scaled_fp8"]  # fmt: skip


@pytest.mark.parametrize("entry", ["[" * 100_000, '{"layers": {"fc": 1}, "n": 1' + "0" * 5000 + "}",
                                   "{not json"])  # fmt: skip
def test_a_quantization_metadata_entry_that_is_no_readable_json_is_kept(tmp_path, entry):
    """A `_quantization_metadata` entry nested past Python's parser (a RecursionError
    before), holding an integer of 5,001 digits (parsed in quadratic time before) or no JSON
    at all: the dequantizing merge writes it as it is, no loader reading it, and the weight
    `W8 · s + ΔW` rounded once."""
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(50))
    s = w.abs().max() / FMAX
    w8 = (w / s).to(E4M3)
    save_file({"fc.weight": w8, "fc.weight_scale": s.reshape(())}, str(tmp_path / "m.safetensors"),
              metadata={"_quantization_metadata": entry})  # fmt: skip
    a, b = lora(8, 16, 2, 51)
    ad = peft_adapter(tmp_path / "ad", {"fc": (a, b)}, 2)
    merge_checkpoint(tmp_path / "m.safetensors", [ad], tmp_path / "out.safetensors",
                     dtype="bfloat16")  # fmt: skip
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as handle:
        assert handle.metadata() == {"_quantization_metadata": entry}
        got = handle.get_tensor("fc.weight").double()
    ref, near = round_once(w8.double() * s.double() + b.double() @ a.double(), torch.bfloat16)
    assert not bool(((got != ref) & ~near).any())


def test_the_command_line_dequantizes_with_a_dtype(tmp_path, capsys):
    """`lowrank merge --dtype bfloat16` of a scaled base: one line saying how many weights
    were dequantized, which tensors were left out and that config.json's
    quantization_config must go; the output holds no scale."""
    gen = torch.Generator().manual_seed(50)
    w8, grid = quantized(torch.randn(4, 6, generator=gen), (1, 6), (4, 1))
    save_file({"fc.weight": w8, "fc.weight_scale": grid, "fc.input_scale": torch.tensor([0.5])},
              str(tmp_path / "base.safetensors"))  # fmt: skip
    ad = peft_adapter(tmp_path / "ad", {"fc": lora(4, 6, 1, 51)}, 1)
    status = main(["merge", str(tmp_path / "base.safetensors"), str(ad), "-o",
                   str(tmp_path / "out.safetensors"), "--dtype", "bfloat16"])  # fmt: skip
    text = capsys.readouterr().out
    assert status == 0 and len(text.splitlines()) == 1
    assert (
        "1 scaled float8 weights dequantized to bfloat16, 2 scale and marker tensors left out "
        "(fc.input_scale, fc.weight_scale): a config.json beside the output must not keep its "
        "quantization_config"
    ) in text
    assert sorted(load_file(tmp_path / "out.safetensors")) == ["fc.weight"]


def test_a_weight_saved_whole_in_place_of_a_scaled_one_with_a_dtype(tmp_path):
    """A PEFT folder saving a float32 tensor in place of a scaled weight (`modules_to_save`),
    merged with `dtype=bfloat16`: the saved weights, rounded once, its scale left out; saved
    as float8 values (no weights without a scale) it is still a `DTypeError`."""
    gen = torch.Generator().manual_seed(52)
    base = {"q.weight": W8, "q.weight_scale": torch.tensor(0.01),
            "k.weight": torch.randn(8, 16, generator=gen)}  # fmt: skip
    save_file(base, str(tmp_path / "base.safetensors"))
    for name, saved in (("wide", torch.randn(8, 16, generator=gen)), ("fp8", W8)):
        folder = peft_adapter(tmp_path / name, {"k": lora(8, 16, 2, 53)}, 2)
        tensors = load_file(folder / "adapter_model.safetensors")
        tensors["base_model.model.q.weight"] = saved
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(target_modules=["k"], modules_to_save=["q"])
        (folder / "adapter_config.json").write_text(json.dumps(config))
    report = merge_checkpoint(tmp_path / "base.safetensors", [tmp_path / "wide"],
                              tmp_path / "out.safetensors", dtype="bfloat16")  # fmt: skip
    out = load_file(tmp_path / "out.safetensors")
    saved = load_file(tmp_path / "wide" / "adapter_model.safetensors")["base_model.model.q.weight"]
    ref, _ = round_once(saved.double(), torch.bfloat16)
    assert torch.equal(out["q.weight"].double(), ref) and "q.weight_scale" not in out
    assert report["replaced_tensors"] == ["q.weight"]
    with pytest.raises(DTypeError, match=r"q\.weight.*q\.weight_scale.*float8_e4m3fn"):
        merge_checkpoint(tmp_path / "base.safetensors", [tmp_path / "fp8"],
                         tmp_path / "out8.safetensors", dtype="bfloat16")  # fmt: skip
    assert not (tmp_path / "out8.safetensors").exists()


@pytest.mark.parametrize("with_int8", [True, False])
def test_a_dequantized_comfyui_mixed_precision_layer_leaves_its_markers(tmp_path, with_int8):
    """ComfyUI's mixed-precision checkpoints: `<m>.comfy_quant` (the format as JSON bytes)
    and `_quantization_metadata` in the file's metadata listing the quantized layers. With
    `dtype=bfloat16` the float8 layer's `comfy_quant` is left out and the layer taken out of
    the metadata's list (ComfyUI would load the plain weight as float8 by either); an int8
    layer, copied as it is, keeps both (the entry goes when it lists no other layer)."""
    gen = torch.Generator().manual_seed(54)
    w = torch.randn(4, 6, generator=gen)
    s = w.abs().max() / FMAX
    marker = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                          dtype=torch.uint8)  # fmt: skip
    state = {"net.a.weight": (w / s).to(E4M3), "net.a.weight_scale": s.reshape(()),
             "net.a.input_scale": torch.tensor(1.0), "net.a.comfy_quant": marker,
             "net.b.weight": torch.randn(4, 4, generator=gen)}  # fmt: skip
    layers = {"net.a": {"format": "float8_e4m3fn"}}
    if with_int8:
        int8 = torch.tensor(list(json.dumps({"format": "int8_blockwise"}).encode()),
                            dtype=torch.uint8)  # fmt: skip
        state |= {"net.c.weight": torch.ones(4, 4, dtype=torch.int8),
                  "net.c.weight_scale": torch.ones(1, 1), "net.c.comfy_quant": int8}  # fmt: skip
        layers["net.c"] = {"format": "int8_blockwise", "group_size": 4}
    quant = json.dumps({"format_version": "1.0", "layers": layers})
    save_file(state, str(tmp_path / "model.safetensors"),
              metadata={"_quantization_metadata": quant, "note": "kept"})  # fmt: skip
    ad = peft_adapter(tmp_path / "ad", {"net.b": lora(4, 4, 1, 55)}, 1)
    report = merge_checkpoint(tmp_path / "model.safetensors", [ad], tmp_path / "out.safetensors",
                              dtype="bfloat16")  # fmt: skip
    out = load_file(tmp_path / "out.safetensors")
    assert report["dropped_tensors"] == ["net.a.comfy_quant", "net.a.input_scale",
                                         "net.a.weight_scale"]  # fmt: skip
    ref, _ = round_once(state["net.a.weight"].double() * s.double(), torch.bfloat16)
    assert torch.equal(out["net.a.weight"].double(), ref)
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        metadata = f.metadata()
    if with_int8:
        assert json.loads(metadata.pop("_quantization_metadata")) == {
            "format_version": "1.0", "layers": {"net.c": layers["net.c"]}}  # fmt: skip
        assert torch.equal(out["net.c.weight"], state["net.c.weight"])
        assert torch.equal(out["net.c.comfy_quant"], int8)
    assert metadata == {"note": "kept"}


@pytest.mark.parametrize(("dtype", "value", "once"), [
    ("bfloat16", 1 + 3 * 2**-8 - 2**-30, 1 + 2**-7),
    ("float16", 1 + 3 * 2**-11 - 2**-40, 1 + 2**-10),
])  # fmt: skip
def test_a_float64_base_is_rounded_once_to_dtype(tmp_path, dtype, value, once):
    """A float64 weight just below the midpoint of two `dtype` values, stored in `dtype`,
    merged (ΔW = 0 · B A) or only cast: the nearer value (torch's cast rounds through
    float32, to the midpoint, then to the even side: one step too far); Inf and NaN stay."""
    w = torch.tensor([[value, value], [math.inf, math.nan]], dtype=torch.float64)
    base = tmp_path / "base.safetensors"
    save_file({"a.weight": w[:1].clone(), "b.weight": w.clone()}, str(base))
    assert float(torch.tensor(value, dtype=torch.float64).to(getattr(torch, dtype))) != once
    peft_adapter(tmp_path / "ad", {"a": (torch.ones(1, 2), torch.zeros(1, 1))}, 1)
    merge_checkpoint(base, [tmp_path / "ad"], tmp_path / "out.safetensors", dtype=dtype)
    out = load_file(tmp_path / "out.safetensors")
    assert out["a.weight"].tolist() == [[once, once]]
    assert out["b.weight"][0].tolist() == [once, once]
    assert out["b.weight"][1, 0] == math.inf and math.isnan(out["b.weight"][1, 1])


def test_a_nan_in_a_scaled_weight_written_dequantized_is_named_as_nan(tmp_path):
    """A float8 NaN code (0x7F in `float8_e4m3fn`) in a scaled weight the merge writes
    dequantized (`dtype`): a NonFiniteError that says NaN (it said the weight overflowed),
    nothing written."""
    w8 = torch.zeros(2, 4, dtype=torch.uint8)
    w8[1, 2] = 0x7F
    save_file({"fc.weight": w8.view(E4M3), "fc.weight_scale": torch.tensor(0.5),
               "g.weight": torch.ones(2, 2)}, str(tmp_path / "base.safetensors"))  # fmt: skip
    peft_adapter(tmp_path / "ad", {"g": lora(2, 2, 1, seed=41)}, 1)
    out = tmp_path / "out.safetensors"
    with pytest.raises(NonFiniteError, match=r"fc\.weight.* 1 NaN value"):
        merge_checkpoint(tmp_path / "base.safetensors", [tmp_path / "ad"], out, dtype="bfloat16")
    assert not out.exists()


def test_a_dequantized_checkpoint_leaves_out_its_kv_cache_scales(tmp_path):
    """compressed-tensors FP8 with an FP8 KV cache: `self_attn.k_scale` / `v_scale` hang on
    the attention module, which has no weight of its own; written dequantized (`dtype`),
    whose `quantization_config` must go, they go too (they were kept, cast to bfloat16).
    Without a scaled weight (a bfloat16 model whose KV cache alone is FP8) they stay."""
    w8 = torch.randn(4, 6, generator=torch.Generator().manual_seed(51)).to(E4M3)
    cache = {"m.self_attn.k_scale": torch.tensor(0.25), "m.self_attn.v_scale": torch.tensor(0.5)}
    for scaled in (True, False):
        weights = ({"m.self_attn.q_proj.weight": w8,
                    "m.self_attn.q_proj.weight_scale": torch.tensor(0.5)} if scaled
                   else {"m.self_attn.q_proj.weight": torch.randn(4, 6)})  # fmt: skip
        base = tmp_path / f"base{scaled}.safetensors"
        save_file({**weights, **cache, "p.weight": torch.ones(3, 3)}, str(base))
        ad = peft_adapter(tmp_path / "ad", {"p": lora(3, 3, 1, 52)}, 1)
        out = tmp_path / f"out{scaled}.safetensors"
        report = merge_checkpoint(base, [ad], out, dtype="bfloat16")
        kept = set(load_file(out))
        assert (kept & set(cache)) == (set() if scaled else set(cache))
        assert set(report["dropped_tensors"]) >= (set(cache) if scaled else set())


@pytest.mark.parametrize(
    ("chunk", "block", "name", "dtype"),
    [
        (120, (8, 5), "weight_scale_inv", E4M3),  # rows of 10 per block: grid rows span two
        (96, (8, 4), "weight_scale_inv", E5M2),  # rows of 8 per block: grid rows align
        (48, (8, 5), "weight_scale_inv", E4M3),  # rows of 4 per block: a first pass for scales
        (120, (1, 12), "scale_weight", E4M3),  # per channel, the scale before its weight
    ],
)
def test_merges_reading_many_row_blocks(tmp_path, monkeypatch, chunk, block, name, dtype):
    """A weight read a few rows at a time (`CHUNK_ELEMENTS` made small): with the scale
    after its weight, scales are decided as the rows come, a grid row of blocks spanning two
    row blocks or aligned with them; with blocks taller than a row block, or the scale
    before its weight (ComfyUI's `scale_weight`), from a first pass. Every layout gives the
    float64 reference's scales and float8 bytes; some blocks keep their scale, others
    (ΔW pushes their peak past the float8 range) get absmax / largest."""
    monkeypatch.setattr(lowrank.io.merge, "CHUNK_ELEMENTS", chunk)
    shape = (37, 12)
    grid_shape = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(61))
    w8, grid = quantized(w, block, grid_shape, dtype=dtype)
    stored = grid.reshape(shape[0], 1) if block[1] == shape[1] else grid
    save_file({"m.fc.weight": w8, f"m.fc.{name}": stored}, str(tmp_path / "base.safetensors"))
    if name == "weight_scale_inv":
        config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}
        (tmp_path / "config.json").write_text(json.dumps(config))
    a, b = lora(*shape, 2, 62, size=0.4)
    ad = peft_adapter(tmp_path / "ad", {"m.fc": (a, b)}, 2)
    merge_checkpoint(tmp_path / "base.safetensors", [ad], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    merged = w8.double() * expand(grid.double(), block, shape) + b.double() @ a.double()
    ref, scale, near = quantize_ref(merged, grid, block, torch.float32, dtype)
    kept = scale == grid.double()
    assert bool(kept.any()) and not bool(kept.all())
    assert torch.equal(out[f"m.fc.{name}"].double().reshape(scale.shape), scale)
    assert_bytes(out["m.fc.weight"], ref, near)


@pytest.mark.parametrize("code", [0x7F, 0xFF])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_a_nan_code_in_a_merged_scaled_weight_is_named(tmp_path, code, dtype):
    """A `float8_e4m3fn` NaN code (0x7F or 0xFF, S.1111.111) in a scaled weight an adapter
    merges into, requantized or written dequantized: a NonFiniteError naming the weight and
    the NaN, nothing written."""
    w8 = torch.full((2, 4), 0x38, dtype=torch.uint8)  # 1.0
    w8[1, 2] = code
    save_file({"fc.weight": w8.view(E4M3), "fc.weight_scale": torch.tensor(0.5)},
              str(tmp_path / "base.safetensors"))  # fmt: skip
    peft_adapter(tmp_path / "ad", {"fc": lora(2, 4, 1, seed=63)}, 1)
    out = tmp_path / "out.safetensors"
    with pytest.raises(NonFiniteError, match=r"fc\.weight.* 1 NaN/Inf value"):
        merge_checkpoint(tmp_path / "base.safetensors", [tmp_path / "ad"], out, dtype=dtype)
    assert not out.exists()


class _WrittenWhenTheNextIs:
    """A stand-in for `write_safetensors`' writer thread at its slowest the contract allows:
    each block's bytes are read only once the next block is drawn (`Future.result()` is
    called before the next write is submitted)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        class Deferred:
            def result(self):
                return fn(*args)

        return Deferred()


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_a_dora_per_input_channel_on_a_scaled_weight_leaves_the_tensor_before_intact(
    tmp_path, monkeypatch, dtype
):
    """A LyCORIS DoRA with one magnitude per input channel (`dora_scale (1, in)`) on a scaled
    float8 weight needs a first pass over the weight for its norms; that pass reads every
    row block while the writer may still be writing the last block of the tensor before
    (its bias, here). Its buffers are its own: the bias is written as it was (it was
    overwritten by the weight's float8 codes)."""
    monkeypatch.setattr(lowrank.io.files, "ThreadPoolExecutor", _WrittenWhenTheNextIs)
    monkeypatch.setattr(lowrank.io.merge, "CHUNK_ELEMENTS", 16)  # weight rows 4 at a time
    gen = torch.Generator().manual_seed(64)
    w8, grid = quantized(torch.randn(8, 4, generator=gen), (1, 4), (8, 1))
    bias = torch.arange(1.0, 5.0)  # 16 bytes, as many as a row block of the weight
    save_file({"fc.bias": bias, "fc.weight": w8, "fc.weight_scale": grid},
              str(tmp_path / "base.safetensors"))  # fmt: skip
    down, up = lora(8, 4, 2, 65)
    save_file({"lora_unet_fc.lora_down.weight": down, "lora_unet_fc.lora_up.weight": up,
               "lora_unet_fc.alpha": torch.tensor(2.0),
               "lora_unet_fc.dora_scale": torch.rand(1, 4, generator=gen) + 0.5},
              str(tmp_path / "dora.safetensors"))  # fmt: skip
    out = tmp_path / "out.safetensors"
    merge_checkpoint(tmp_path / "base.safetensors", [tmp_path / "dora.safetensors"], out,
                     dtype=dtype)  # fmt: skip
    assert torch.equal(load_file(out)["fc.bias"], bias)
