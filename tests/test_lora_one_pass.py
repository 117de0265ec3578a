"""The one-pass backward (`LOWRANK_LORA_BACKWARD=one_pass`): `dx`, `d_down` and `d_up` of up to
`ONE_PASS_MAX_ROWS` rows from one launch of `lora_backward_kernel` (plus the sums of its
per-row-block partials above 64 rows), against float64.

Run in Triton's interpreter (float32 and float16); each test also records which path ran, so a
silent fallback to the separate reductions would fail it. The compiled kernel is checked on a GPU
by `test_one_pass_compiled_on_cuda` (`TRITON_INTERPRET=0`, part of `make gpu-check`).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lowrank.kernels import ArgumentError, _lora_gemm, _lora_triton, lora_linear
from test_lora_dropout import check_masked_gradients
from test_lora_linear import (
    COMPILED_CUDA,
    INTERPRETING,
    TOL,
    check_op,
    check_tensors,
    compiled_cuda_only,
    interpreter_only,
    make,
    reference,
    rel,
)

pytestmark = pytest.mark.long  # among the suite's longest modules: scheduled first


@pytest.fixture
def one_pass(monkeypatch):
    """Ask for the one-pass backward; record the launches of each backward path."""
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, "one_pass")
    calls = {"one_pass": 0, "reduce": 0}

    def counting(name, launch):
        def counted(*args, **kwargs):
            calls[name] += 1
            return launch(*args, **kwargs)

        return counted

    monkeypatch.setattr(_lora_triton, "_one_pass_backward",
                        counting("one_pass", _lora_triton._one_pass_backward))  # fmt: skip
    monkeypatch.setattr(_lora_triton, "_reduce_rows",
                        counting("reduce", _lora_triton._reduce_rows))  # fmt: skip
    return calls


# (leading dims, in, out, r): one row; ragged tiles in every dimension; r = 1 and r = 128;
# leading dims; 64 rows (one row block, `in` a whole number of tiles); 65 and 3 × 70 rows
# (row blocks of 64, the last ragged: float32 partials summed).
ONE_PASS_SHAPES = [
    ((1,), 6, 42, 1),
    ((37,), 123, 42, 5),
    ((2, 3), 64, 17, 8),
    ((20,), 40, 30, 128),
    ((64,), 96, 70, 16),
    ((65,), 40, 33, 6),
    ((3, 70), 48, 40, 9),
]


@interpreter_only
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        pytest.param(shape, dtype, id=f"{dtype}-{shape}",
                     marks=() if dtype == torch.float16 or i % 3 == 0 else pytest.mark.exhaustive)
        for dtype in (torch.float32, torch.float16)
        for i, shape in enumerate(ONE_PASS_SHAPES)
    ],
)  # fmt: skip
def test_one_pass_gradients_match_float64(one_pass, shape, dtype):
    check_op(*shape, dtype, backend="triton", weight_grad=True)
    assert one_pass == {"one_pass": 1, "reduce": 0}


@interpreter_only
@settings(max_examples=8, deadline=None)
@given(
    rows=st.integers(1, 160),
    fan_in=st.integers(1, 40),
    fan_out=st.integers(1, 40),
    rank=st.integers(1, 20),
    p=st.sampled_from([0.0, 0.4]),
)
def test_one_pass_random_shapes_match_float64(rows, fan_in, fan_out, rank, p):
    """Any rows (one row block or several), sizes and rank, with or without dropout."""
    ran = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(_lora_triton.BACKWARD_ENV, "one_pass")
        launch = _lora_triton._one_pass_backward
        patch.setattr(_lora_triton, "_one_pass_backward", lambda *a: ran.append(1) or launch(*a))
        if p == 0.0:
            check_op((rows,), fan_in, fan_out, rank, torch.float32, "triton")
        elif rows * fan_in >= 32:  # room for a mask with kept and dropped entries
            check_masked_gradients("triton", torch.float32, rows, fan_in, fan_out, rank, p=p)
        else:
            return
    assert ran == [1]


@interpreter_only
@pytest.mark.parametrize(
    ("dtype", "rows"),
    [
        pytest.param(dtype, rows, id=f"{rows}-{dtype}",
                     marks=() if dtype == torch.float16 or rows == 64 else pytest.mark.exhaustive)
        for dtype in (torch.float32, torch.float16)
        for rows in (7, 64, 150)
    ],
)  # fmt: skip
def test_one_pass_gradients_use_the_forward_mask(one_pass, dtype, rows):
    check_masked_gradients("triton", dtype, rows, 70, 33, 17)
    assert one_pass == {"one_pass": 1, "reduce": 0}


@interpreter_only
@pytest.mark.parametrize(
    ("rows", "tiles"),
    [(19, 1), (140, 3), *(pytest.param(*case, marks=pytest.mark.exhaustive)
                          for case in ((19, 3), (140, 1)))],
)  # fmt: skip
def test_one_pass_tile_walks(one_pass, monkeypatch, tiles, rows):
    """Programs walking 1 or 3 N tiles of 16 (in = 40: 3 tiles, the last ragged; so 3 or 1
    programs of a row block share d_up's K steps), each writing its own columns of dx and
    d_down; with one row block, and with three (140 rows, grouped-M order)."""
    config = _lora_gemm._one_pass_config(16, 16, 4, 1, tiles)
    monkeypatch.setattr(_lora_gemm.lora_backward_kernel, "configs", [config])
    monkeypatch.setattr(_lora_gemm.lora_backward_kernel, "cache", {})
    check_op((rows,), 40, 70, 6, torch.float32, "triton")
    check_masked_gradients("triton", torch.float16, rows, 40, 70, 6)
    assert one_pass == {"one_pass": 2, "reduce": 0}


@interpreter_only
@pytest.mark.parametrize("rows", [9, 100])
@pytest.mark.parametrize(
    ("wants", "written"),
    [
        ((True, True, False), ("x", "down")),  # up frozen: t is not kept, d_up not written
        ((True, False, True), ("x", "up")),
        ((True, False, False), ("x",)),
    ],
)
def test_one_pass_writes_only_the_gradients_asked_for(one_pass, wants, written, rows):
    x, weight, down, up, b = make((rows,), 40, 24, 4, torch.float16)
    ours = [t.clone().requires_grad_(w) for t, w in zip((x, down, up), wants, strict=True)]
    theirs = [t.double().requires_grad_(w) for t, w in zip((x, down, up), wants, strict=True)]
    y = lora_linear(ours[0], weight, ours[1], ours[2], 0.6, b, backend="triton")
    y_ref = reference(theirs[0], weight, theirs[1], theirs[2], 0.6, b)
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.half())
    y_ref.backward(dy)
    for name, a, r in zip(("x", "down", "up"), ours, theirs, strict=True):
        if name in written:
            assert rel(a.grad, r.grad) < TOL[torch.float16], name
        else:
            assert a.grad is None, name
    assert one_pass == {"one_pass": 1, "reduce": 0}


@interpreter_only
@pytest.mark.parametrize(
    ("shape", "x_grad"),
    [
        (((1025,), 24, 20, 5), True),  # more rows than one pass takes
        (((12,), 24, 20, 200), True),  # r over MAX_BLOCK_R: g does not fit in registers
        (((12,), 24, 20, 5), False),  # no dx: nothing for the one pass to share
    ],
    ids=str,
)
def test_one_pass_falls_back_where_it_cannot_run(one_pass, shape, x_grad):
    lead, fan_in, fan_out, rank = shape
    x, weight, down, up, b = make(lead, fan_in, fan_out, rank, torch.float32)
    ours = [x.clone().requires_grad_(x_grad), down.clone().requires_grad_(),
            up.clone().requires_grad_()]  # fmt: skip
    theirs = [x.double().requires_grad_(x_grad), down.double().requires_grad_(),
              up.double().requires_grad_()]  # fmt: skip
    y = lora_linear(ours[0], weight, ours[1], ours[2], 0.6, b, backend="triton")
    y_ref = reference(theirs[0], weight, theirs[1], theirs[2], 0.6, b)
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.float())
    y_ref.backward(dy)
    for a, r in zip(ours, theirs, strict=True):
        assert (a.grad is None) == (r.grad is None)
        if r.grad is not None:
            assert rel(a.grad, r.grad) < TOL[torch.float32]
    assert one_pass == {"one_pass": 0, "reduce": 2}


@pytest.mark.guarded
@pytest.mark.skipif(not (INTERPRETING or COMPILED_CUDA), reason="Triton: interpreter or CUDA")
@pytest.mark.parametrize(("fan_in", "ran"), [(123, "reduce"), (120, "reduce"), (128, "one_pass")])
def test_one_pass_declines_a_weight_with_a_row_stride_off_16(monkeypatch, fan_in, ran):
    """fp16 `W (out, in)`: `Wᵀ` is N-major in the `dx` GEMM, its row stride `in`; off 16
    elements the separate backward runs (the one-pass kernel faulted at in = 123 on an H100)."""
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, "one_pass")
    paths = []
    one, reduce = _lora_triton._one_pass_backward, _lora_triton._reduce_rows
    monkeypatch.setattr(_lora_triton, "_one_pass_backward",
                        lambda *a: paths.append("one_pass") or one(*a))  # fmt: skip
    monkeypatch.setattr(_lora_triton, "_reduce_rows",
                        lambda *a, **k: paths.append("reduce") or reduce(*a, **k))  # fmt: skip
    check_tensors(*make((37,), fan_in, 42, 5, torch.float16))
    assert paths and set(paths) == {ran}


def test_one_pass_is_the_default_up_to_16_rows(monkeypatch):
    applies = _lora_triton.one_pass_applies
    monkeypatch.delenv(_lora_triton.BACKWARD_ENV, raising=False)
    assert applies(16, 16, 4096, 4096, True)
    assert not applies(17, 16, 4096, 4096, True)
    assert not applies(16, 16, 4096, 4096, False)  # no dx wanted: the reductions alone
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, "auto")
    assert applies(1, 8, 64, 64, True) and not applies(1024, 8, 64, 64, True)
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, "separate")
    assert not applies(16, 16, 4096, 4096, True)
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, "one_pass")
    assert applies(16, 16, 4096, 4096, True)
    assert not applies(16, 16, 4096, 4096, False)
    assert applies(_lora_gemm.ONE_PASS_MAX_ROWS, 16, 4096, 4096, True)  # 16 blocks: 8 MiB
    assert not applies(_lora_gemm.ONE_PASS_MAX_ROWS + 1, 16, 4096, 4096, True)
    assert applies(64, 128, 14336, 14336, True)  # one row block: no partials
    assert not applies(1024, 128, 4096, 14336, True)  # 16 blocks: 151 MiB of partials
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, "fused")
    with pytest.raises(ArgumentError, match="LOWRANK_LORA_BACKWARD must be one of"):
        applies(16, 16, 4096, 4096, True)


@pytest.mark.parametrize("name", [_lora_triton.REGIME_ENV, _lora_triton.BACKWARD_ENV,
                                  _lora_triton.EXPAND_ENV])  # fmt: skip
def test_settings_are_read_as_os_environ_holds_them(monkeypatch, name):
    monkeypatch.delenv(name, raising=False)
    assert _lora_triton._env(name, "default") == "default"
    for value in ("one_pass", "", "é"):
        monkeypatch.setenv(name, value)
        assert _lora_triton._env(name, "default") == value == os.environ[name]
    monkeypatch.delenv(name)
    assert _lora_triton._env(name, "x") == "x"


@interpreter_only
def test_a_bad_backward_choice_fails_at_the_forward(monkeypatch):
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, "fused")
    x = torch.randn(4, 8, requires_grad=True)
    weight, down, up = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ArgumentError, match="LOWRANK_LORA_BACKWARD must be one of"):
        lora_linear(x, weight, down, up, backend="triton")
    assert x.grad is None


@interpreter_only
def test_one_pass_falls_back_where_its_partials_would_be_too_large(one_pass, monkeypatch):
    monkeypatch.setattr(_lora_triton, "ONE_PASS_MAX_PARTIAL_BYTES", 1000)
    check_op((100,), 24, 20, 5, torch.float32, "triton")  # 2 blocks × 5 × 44 × 4 B = 1760 B
    check_op((64,), 24, 20, 5, torch.float32, "triton")  # one block: no partials
    assert one_pass == {"one_pass": 1, "reduce": 2}


@pytest.mark.parametrize(("cols", "walks"), [(4096, True), (123, False), (1000, False)])
def test_one_pass_walks_several_n_tiles_only_where_every_tile_is_full(cols, walks):
    flags = {"BLOCK_M": 16, "BLOCK_R": 16, "DROP": False}
    named = {"dy_ptr": torch.empty(0, dtype=torch.bfloat16), "N": cols, "stride_wn": 1}
    kept = _lora_gemm._prune_one_pass(_lora_gemm.ONE_PASS_CONFIGS, named, **flags)
    assert kept and any(c.kwargs["TILES_N"] > 1 for c in kept) == walks


@pytest.mark.parametrize(("dtype", "block_r", "narrow_walk"),
                         [(torch.float32, 16, True), (torch.float32, 64, False),
                          (torch.bfloat16, 64, True)])  # fmt: skip
def test_one_pass_float32_walks_narrow_tiles_only_at_small_ranks(dtype, block_r, narrow_walk):
    """sm_90a compiles of the 64-wide, 4-warp tile walking four N tiles in 16-row blocks
    (`make compile-check`): float32 took 172-176 registers at r = 16, and spilled 48-224 B at
    r = 64 (every gradient, with and without dropout); bf16 took at most 238, no spill."""
    flags = {"BLOCK_M": 16, "BLOCK_R": block_r, "DROP": False, "PRECISION": "tf32"}
    named = {"dy_ptr": torch.empty(0, dtype=dtype), "N": 4096, "stride_wn": 1}
    kept = _lora_gemm._prune_one_pass(_lora_gemm.ONE_PASS_CONFIGS, named, **flags)
    shapes = [(c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["TILES_N"]) for c in kept]
    assert ((64, 4, 4) in shapes) == narrow_walk
    assert not any(getattr(c, "fallback", False) for c in kept)


@compiled_cuda_only
@pytest.mark.parametrize(
    "shape", [((1,), 6, 42, 1), ((37,), 123, 42, 5), ((2, 3), 64, 17, 8),
              ((16,), 2048, 1024, 128), ((64,), 4096, 1536, 32), ((300,), 1000, 520, 16),
              ((1024,), 4096, 4096, 16)], ids=str,
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_one_pass_compiled_on_cuda(one_pass, shape, dtype):
    """Every gradient no worse than eager torch's in the same dtype (or TOL), then with
    dropout against float64 on the kernels' own mask."""
    lead, fan_in, fan_out, rank = shape
    tensors = [t.cuda() for t in make(lead, fan_in, fan_out, rank, dtype)]
    ours = [t.clone().requires_grad_(i != 1) for i, t in enumerate(tensors)]
    eager = [t.clone().requires_grad_(i != 1) for i, t in enumerate(tensors)]
    theirs = [t.double().requires_grad_(i != 1) for i, t in enumerate(tensors)]
    y = lora_linear(*ours[:4], scale=0.7, bias=ours[4], backend="triton")
    x, weight, down, up, b = eager
    y_eager = (x @ weight.t() + b) + 0.7 * (x @ down.t()) @ up.t()
    y_ref = reference(*theirs[:4], 0.7, theirs[4])
    dy = torch.randn(y.shape, dtype=torch.float64, device="cuda")
    for out in (y, y_eager, y_ref):
        out.backward(dy.to(out.dtype))
    for i, name in ((0, "x"), (2, "down"), (3, "up"), (4, "bias")):
        ours_err, eager_err = rel(ours[i].grad, theirs[i].grad), rel(eager[i].grad, theirs[i].grad)
        assert ours_err <= max(2 * eager_err, TOL[dtype]), name
    rows = tensors[0].numel() // fan_in
    check_masked_gradients("triton", dtype, rows, fan_in, fan_out, rank, device="cuda")
    # one pass runs where its pruner keeps a real tile (always in 16 bits here; float32, in
    # tf32x3, only at the smallest sizes), else the separate backward with its two reductions
    precision = _lora_triton._precision(dtype)
    fusable = _lora_triton.shrink_fusable(tensors[1].t())  # Wᵀ as the dx GEMM reads it
    ran = [fusable and _lora_triton._one_pass_tiles_fit(rows, rank, fan_in, dtype, True, drop,
                                                        precision)
           for drop in (False, True)]  # fmt: skip
    assert one_pass == {"one_pass": sum(ran), "reduce": 2 * (2 - sum(ran))}
    if dtype != torch.float32 and fusable:
        assert ran == [True, True]


def test_one_pass_gives_way_where_its_pruner_keeps_only_a_fallback_tile(monkeypatch):
    """With the GPU's candidate tiles on the H100's shared memory, as `make compile-check`
    reports them: float32 in 64-row blocks (100 rows) has only the fallback, bf16 at 16 rows
    real tiles; so the first runs the separate backward."""
    monkeypatch.setattr(_lora_gemm.lora_backward_kernel, "configs", _lora_gemm.ONE_PASS_CONFIGS)
    monkeypatch.setattr(_lora_gemm, "_smem_limit", lambda: 232_448)
    _lora_triton._one_pass_tiles_fit.cache_clear()
    try:
        fits = _lora_triton._one_pass_tiles_fit
        assert not fits(100, 16, 4096, torch.float32, True, False, "tf32")
        assert fits(16, 16, 4096, torch.bfloat16, True, False, "tf32")
        assert fits(1024, 16, 4096, torch.bfloat16, True, True, "tf32")
        assert not fits(1024, 128, 4096, torch.bfloat16, True, False, "tf32")
    finally:
        _lora_triton._one_pass_tiles_fit.cache_clear()


@interpreter_only
def test_one_pass_runs_the_separate_backward_where_its_tiles_do_not_fit(one_pass, monkeypatch):
    monkeypatch.setattr(_lora_triton, "_one_pass_tiles_fit", lambda *args: False)
    check_op((20,), 24, 20, 5, torch.float32, "triton")
    assert one_pass == {"one_pass": 0, "reduce": 2}
