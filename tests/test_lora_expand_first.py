"""The persistent regime with the expand first (the default; `LOWRANK_LORA_EXPAND=first`): the
adapter term `c · mask(t Bᵀ)` and the bias start the accumulator before the K loop, and `y`
leaves by TMA in two halves, against float64.

Run in Triton's interpreter (float32 and float16); each test records the constexprs of every
launch of the persistent kernel, so a silent fallback (to the epilogue, to a pointer store, to
two-phase) would fail it. The compiled kernel is checked on a GPU by
`test_expand_first_compiled_on_cuda` (`TRITON_INTERPRET=0`, part of `make gpu-check`) and
compiled offline by `make compile-check`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lowrank.kernels import ArgumentError, _lora_gemm_tma, _lora_triton, lora_linear
from test_lora_dropout import check_masked_gradients
from test_lora_linear import (
    TOL,
    check_op,
    compiled_cuda_only,
    interpreter_only,
    make,
    reference,
    rel,
)


@pytest.fixture
def launches(monkeypatch, tma_constexprs):
    """Force the persistent regime with the expand first and the separate backward (`dx` a
    GEMM at any row count); the constexprs of each launch of the persistent kernel."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, "persistent")
    monkeypatch.setenv(_lora_triton.EXPAND_ENV, "first")
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, "separate")
    return tma_constexprs


@interpreter_only
@pytest.mark.parametrize(
    ("shape", "dtype", "bias", "y_tma"),
    [
        # 3 row blocks × 3 ragged N tiles of 32 (the stores' halves clipped at 72 and 40)
        (((33,), 40, 72, 6), torch.float32, True, [True, True]),
        # r = 40: two unrolled t slabs of 32
        (((3, 17), 64, 48, 40), torch.float16, False, [True, True]),
        # r = 200: the slab loop; out = 21 fp32 is 84-byte rows: y by pointer, dx two-phase
        (((12,), 24, 21, 200), torch.float32, True, [False]),
        # y by pointer after unrolled slabs
        (((12,), 24, 21, 6), torch.float32, False, [False]),
        # one row, a K smaller than the tile, r = 1
        (((1,), 8, 24, 1), torch.float32, True, [True, True]),
    ],
    ids=str,
)
def test_expand_first_matches_float64(launches, shape, dtype, bias, y_tma):
    """Forward (W read K-major) and dx (W read N-major): the output and every gradient."""
    check_op(*shape, dtype, "triton", bias=bias, weight_grad=True)
    assert [c["EXPAND_FIRST"] for c in launches] == [True] * len(y_tma)
    assert [c["Y_DESC"] for c in launches] == y_tma
    assert [c["STATIC_SLABS"] for c in launches] == [shape[3] <= 128] * len(y_tma)


@interpreter_only
@pytest.mark.parametrize(
    ("rank", "dtype"),
    [(17, torch.float32), (140, torch.float16),
     *(pytest.param(*case, marks=pytest.mark.exhaustive)
       for case in ((17, torch.float16), (140, torch.float32)))],
    ids=str,
)  # fmt: skip
def test_expand_first_masks_the_dx_adapter_term(launches, dtype, rank):
    """Dropout: the dx GEMM masks the adapter term that starts its accumulator (and not the
    `dy W` added after it); in = 72, out = 32: both GEMMs run the TMA kernel."""
    check_masked_gradients("triton", dtype, 40, 72, 32, rank)
    assert [(c["EXPAND_FIRST"], c["DROP_OUT"]) for c in launches] == [(True, False), (True, True)]


@interpreter_only
@pytest.mark.parametrize(
    ("p", "rank"),
    [
        pytest.param(p, rank, id=f"{p}-{rank}",
                     marks=() if (rank in (1, 40)) == (p == 0.0) else pytest.mark.exhaustive)
        for p in (0.0, 0.3)
        for rank in (1, 32, 40, 64)
    ],
)  # fmt: skip
def test_flattened_expand_first_matches_float64(launches, flattened, rank, p):
    """The flattened configs' code (one N tile per item), which the pruner offers with the
    expand first for up to two unrolled t slabs (r ≤ 64; `test_expand_first_flattens_up_to_two
    _slabs`). The interpreter runs the loop unflattened: the flattening itself is the
    compiler's, checked by `make compile-check` and on a GPU."""
    if p:
        check_masked_gradients("triton", torch.float32, 33, 40, 72, rank, p=p)
    else:
        check_op((33,), 40, 72, rank, torch.float32, "triton", bias=True)
    assert [c["EXPAND_FIRST"] for c in launches] == [True, True]


@interpreter_only
@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 70),
    fan_in=st.sampled_from([8, 16, 40, 72]),
    fan_out=st.sampled_from([4, 5, 12, 21, 40, 72]),  # 5 and 21: y stored by pointer
    rank=st.integers(1, 140),
    bias=st.booleans(),
)
def test_expand_first_random_shapes_match_float64(rows, fan_in, fan_out, rank, bias):
    """Any rows, TMA-aligned or not, any rank: the forward as float64 computes it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(_lora_triton.REGIME_ENV, "persistent")
        patch.setenv(_lora_triton.EXPAND_ENV, "first")
        x, weight, down, up, b = make((rows,), fan_in, fan_out, rank, torch.float32, bias)
        with torch.no_grad():
            y = lora_linear(x, weight, down, up, scale=0.8, bias=b)
    assert rel(y, reference(x, weight, down, up, 0.8, b)) < TOL[torch.float32]


@interpreter_only
def test_expand_setting_is_checked(monkeypatch):
    """A bad value is an error on every call, whichever regime would run (fused here)."""
    monkeypatch.setenv(_lora_triton.EXPAND_ENV, "prologue")
    monkeypatch.setenv(_lora_triton.REGIME_ENV, "fused")
    x, weight, down, up, b = make((4,), 8, 8, 2, torch.float32)
    with pytest.raises(ArgumentError, match="LOWRANK_LORA_EXPAND must be one of"):
        lora_linear(x, weight, down, up, scale=0.5, bias=b)
    monkeypatch.setenv(_lora_triton.EXPAND_ENV, "epilogue")
    assert not _lora_triton.expand_first()
    monkeypatch.delenv(_lora_triton.EXPAND_ENV)
    assert _lora_triton.expand_first()  # the default


def _tma_flags(block_r: int, first: bool, drop_out: bool = False, shrink: bool = False) -> dict:
    slab = _lora_triton.slab_r(block_r, shrink)
    static = not shrink and (block_r <= 128 if first else block_r <= slab)
    return {"BLOCK_R": block_r, "SHRINK": shrink, "SLAB_R": slab, "DROP_IN": False,
            "DROP_OUT": drop_out, "EXPAND_FIRST": first, "STATIC_SLABS": static}  # fmt: skip


def _kept(dtype: torch.dtype, rows: int, configs=_lora_gemm_tma.TMA_CONFIGS, **flags) -> list:
    desc = _lora_gemm_tma.TensorDescriptor(torch.empty(16, 16, dtype=dtype), [16, 16], [16, 1],
                                           [16, 16])  # fmt: skip
    named = {"m_bucket": rows, "N": 4096, "x_desc": desc}
    y_tma = _lora_triton.y_by_tma(flags["EXPAND_FIRST"], dtype.itemsize)
    return _lora_gemm_tma._prune_tma(configs, named, Y_DESC=y_tma, **flags)


@pytest.mark.parametrize("block_r", [16, 32, 64, 128])
def test_expand_first_flattens_up_to_two_slabs(block_r):
    """bf16-sized operands at 8192 rows: the flattened configs are offered with the expand
    first for r ≤ 64 (the epilogue offers them for r ≤ 32 only), never beside four slabs."""
    first = _kept(torch.float16, 8192, **_tma_flags(block_r, True))
    epilogue = _kept(torch.float16, 8192, **_tma_flags(block_r, False))
    assert any(c.kwargs["FLATTEN"] for c in first) == (block_r <= 64)
    assert any(c.kwargs["FLATTEN"] for c in epilogue) == (block_r <= 32)
    # a small flattened tile, whose buffers would fit: four slabs are still refused
    small = [_lora_gemm_tma._config(64, 64, 64, 8, 4, 2, flatten=flat) for flat in (True, False)]
    kept = _kept(torch.float16, 8192, small, **_tma_flags(block_r, True))
    assert any(c.kwargs["FLATTEN"] for c in kept) == (block_r <= 64)


@pytest.mark.parametrize("block_r", [16, 128])
def test_expand_first_frees_the_dx_dropout_from_narrow_tiles(block_r):
    """With dropout on the dx GEMM's output, the epilogue holds three float32 tiles (the
    accumulator, the masked adapter term, Philox's state) and keeps only 64-row tiles; the
    expand first masks the accumulator's start, two tiles, and keeps 128-row ones too."""
    first = _kept(torch.float16, 8192, **_tma_flags(block_r, True, drop_out=True))
    epilogue = _kept(torch.float16, 8192, **_tma_flags(block_r, False, drop_out=True))
    assert max(c.kwargs["BLOCK_M"] for c in epilogue) == 64
    assert max(c.kwargs["BLOCK_M"] for c in first) == 128
    assert not any(getattr(c, "fallback", False) for c in first + epilogue)


@compiled_cuda_only
@pytest.mark.parametrize(
    ("rows", "fan_in", "fan_out", "rank"),
    # many items per program (and flattened candidates); the slab loop (r > 128); out = 330
    # bf16/fp16 is 660-byte rows: y stored by pointer, and dx two-phase
    [(2000, 4096, 1536, 32), (300, 512, 384, 256), (37, 704, 330, 5)],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_expand_first_compiled_on_cuda(launches, rows, fan_in, fan_out, rank, dtype):
    """The compiled kernel on a Hopper GPU, without and with dropout: the output and every
    gradient within the dtype's tolerance of float64 (the mask read back from
    `lora_dropout_mask`)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the persistent regime needs TMA (sm_90+)")
    x, weight, down, up, b = (t.cuda() for t in make((rows,), fan_in, fan_out, rank, dtype))
    with torch.no_grad():
        y = lora_linear(x, weight, down, up, scale=0.7, bias=b, backend="triton")
    assert rel(y, reference(x, weight, down, up, 0.7, b)) < TOL[dtype]
    check_masked_gradients("triton", dtype, rows, fan_in, fan_out, rank, p=0.2, device="cuda")
    assert launches and all(c["EXPAND_FIRST"] for c in launches)
    aligned = fan_out * x.element_size() % 16 == 0
    assert [c["Y_DESC"] for c in launches] == [aligned] * len(launches)
    assert len(launches) == (3 if aligned else 2)  # the dx GEMM: persistent if dy is aligned
