"""The persistent TMA form of the LoRA GEMM (Hopper and later; see docs/kernels.md).

`lora_gemm_tma_kernel` computes what `lora_gemm_kernel` computes,
`y = x Wᵀ + bias + c · mask(t Bᵀ)`, with the base GEMM in the compute-bound shape's fast form:

- one program per SM walks work items (a row block and `TILES_N` consecutive N tiles) in
  grouped-M order: no tail of short-lived programs, no scheduling gap between items;
- `x` and `W` tiles arrive by TMA (`cp.async.bulk.tensor`) through host-side tensor
  descriptors: one bulk copy per tile instead of per-thread address arithmetic, and the
  descriptor pads ragged edges with zeros, so the K loop has no masks.

`t` comes either from a float32 buffer that `shrink_kernel` wrote (`SHRINK` off: the epilogue
reads it `SLAB_R` columns at a time, any rank; the "persistent" regime) or from the K loop of
an item's first tile, `t = mask(x) Aᵀ` with A tiles loaded by pointer (`SHRINK`, r ≤
`MAX_BLOCK_R`; the "persistent_fused" regime), kept in registers for the item's other tiles.

TMA needs the last dimension of `x` and `W` contiguous, the other strides and the base
address 16-byte aligned (`tma_ready`); `W` may be stored `(N, K)` (the forward's weight) or
`(K, N)` (the dx GEMM's `weightᵀ`), a constexpr `W_N_MAJOR` choosing which.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._lora_gemm import (
    INTERPRET,
    _add_adapter,
    _fitting,
    _item_origin,
    _keep,
    _priced,
    _store_t,
    _store_tile,
    _tune_bench,
)

_TMA_ALIGN = 16  # bytes: TMA's alignment of the base address and of every non-last stride
_FLAT_MAX_SLABS = 2  # unrolled t slabs a flattened loop takes (sm_90a: four took 344 KiB)


def _set_tile_shapes(nargs: dict) -> None:
    """Autotune pre-hook: each descriptor's box is the config's tile."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bk, bn] if nargs["W_N_MAJOR"] else [bn, bk]
    if nargs["Y_DESC"]:  # else `y_desc` is `x_desc` itself, a stand-in the kernel never reads
        nargs["y_desc"].block_shape = [bm, bn // 2]


def _config(
    bm: int,
    bn: int,
    bk: int,
    group: int,
    warps: int,
    stages: int,
    flatten: bool = False,
    tiles: int = 1,
) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "FLATTEN": flatten,
            "TILES_N": tiles}  # fmt: skip
    return triton.Config(meta, num_warps=warps, num_stages=stages, pre_hook=_set_tile_shapes)


TMA_CONFIGS = [
    _config(64, 128, 64, 8, 4, 4),
    _config(64, 128, 64, 8, 8, 4),  # registers for the dx GEMM's dropout (three accumulators)
    _config(128, 128, 64, 8, 4, 4),
    _config(128, 128, 64, 8, 8, 4),
    _config(128, 128, 128, 8, 8, 3),
    _config(128, 256, 64, 8, 8, 3),
    _config(256, 128, 64, 8, 8, 3),
    # one loop over tiles and K steps, so the next tile's loads overlap this tile's epilogue
    # (one N tile per item; t from its buffer in at most two unrolled slabs, or the fused
    # shrink's t in registers)
    _config(128, 128, 64, 8, 8, 4, flatten=True),
    _config(128, 256, 64, 8, 8, 3, flatten=True),
    _config(256, 128, 64, 8, 8, 3, flatten=True),
    # the fused shrink only: the N tiles of an item share one t
    _config(128, 128, 64, 8, 8, 4, tiles=4),
    _config(128, 256, 64, 8, 8, 3, tiles=2),
    _config(128, 256, 64, 8, 8, 3, tiles=4),
]
"""Candidate tiles of `lora_gemm_tma_kernel` on a GPU (pruned per call by `_prune_tma`)."""

_INTERPRETER_TMA = [_config(16, 32, 32, 2, 4, 1, tiles=2)]  # TILES_N = 2: the walk runs too


def _prune_tma(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Row blocks no larger than the rows need (the smallest for few rows); flattened loops
    (one N tile per item) with the fused shrink or where `t`'s slabs are unrolled
    (`STATIC_SLABS`, at most two); several N tiles per item only with the fused shrink and at
    most the number of N tiles; then what fits shared memory and registers.

    Shared memory holds `num_stages` x and W tiles (and A tiles with the fused shrink), and
    after the K loop a `t` and a B slab and the float32 slab's layout change; a flattened
    loop buffers the slab ahead (storing `y` by pointer, also the tile's change of layout for
    the store). Half a `y` tile staged for its TMA store (`Y_DESC`; with the expand first
    always, as its flattened loop took as much with a pointer store) stays beside the
    pipeline, and so do the expand first's unrolled slabs (terms fitted to what sm_90a
    compiles took, within the 8 KB margin; `make compile-check` holds every kept config to the
    hardware's limit). Registers hold the float32 accumulator (three with dropout on the
    output after the K loop: the masked adapter term and Philox's state; two with the expand
    first, where the mask is applied to the accumulator's start), `t` (counted twice when
    fused, as the sm_90a compiles need) or its slab, and with dropout on the fused shrink's
    input the mask of an x tile.
    """
    rows = max(16, int(named_args["m_bucket"]))
    cols = int(named_args["N"])
    size = named_args["x_desc"].base.element_size()
    rank_block = int(kwargs["BLOCK_R"])
    shrink = bool(kwargs["SHRINK"])
    slab = rank_block if shrink else int(kwargs["SLAB_R"])
    slabs = 1 if shrink else rank_block // slab
    first = bool(kwargs["EXPAND_FIRST"])
    # a flattened loop needs one inner loop: t in registers (the fused shrink, one N tile per
    # item) or unrolled slabs, of which sm_90a compiles fit two, not four
    flat = shrink or (bool(kwargs["STATIC_SLABS"]) and slabs <= _FLAT_MAX_SLABS)
    accumulators = (2 if first else 3) if kwargs["DROP_OUT"] else 1
    smallest = min(c.kwargs["BLOCK_M"] for c in configs)

    def suits(c: triton.Config) -> bool:
        tiles, bn = c.kwargs["TILES_N"], c.kwargs["BLOCK_N"]
        if tiles > 1 and (not shrink or tiles > triton.cdiv(cols, bn) or cols % bn):
            return False
        return c.kwargs["BLOCK_M"] <= max(rows, smallest) and (flat or not c.kwargs["FLATTEN"])

    by_rows = [c for c in configs if suits(c)]
    runnable = [c for c in configs if flat or not c.kwargs["FLATTEN"]]
    by_rows = by_rows or [min(runnable, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["TILES_N"]))]

    def smem(c: triton.Config) -> int:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        a_tile = bk * rank_block if shrink else 0
        pipeline = c.num_stages * (bm * bk + bk * bn + a_tile) * size
        around = (bm * slab + slab * bn) * size + bm * slab * 4
        slab_bytes = bm * slab * 4 + slab * bn * size
        y_tma = bool(kwargs["Y_DESC"])
        staged = bm * bn // 2 * size if first or y_tma else 0
        if not first:
            if c.kwargs["FLATTEN"]:  # the slabs buffered ahead (and a pointer store's relayout)
                return pipeline + (staged + slab_bytes if y_tma else 3 * slab_bytes)
            return max(pipeline, around) + staged
        if c.kwargs["FLATTEN"]:  # every unrolled slab held beside the pipeline
            return pipeline + staged + slabs * slab_bytes
        return pipeline + staged + (bm * slab * 4 if kwargs["STATIC_SLABS"] else 0)

    def regs(c: triton.Config) -> float:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        philox_in = 2 * bk if shrink and kwargs["DROP_IN"] else 0  # Triton 3.6 spilled at bk
        held_t = 2 * slab if shrink else slab  # fused: t and its operand copy (sm_90a compiles)
        return bm * (accumulators * bn + held_t + philox_in) / (32 * c.num_warps)

    return _fitting(by_rows, _priced(smem, kwargs), regs)


@functools.cache
def _has_tma(device_index: int) -> bool:
    """Whether CUDA device `device_index` (-1: the current one) has TMA (compute capability 9+)."""
    index = torch.cuda.current_device() if device_index < 0 else device_index
    return torch.cuda.get_device_capability(index)[0] >= 9


def _rows_apart(t: torch.Tensor, stride: int, width: int) -> bool:
    """Rows of `width` elements `stride` apart: 16-byte aligned, and not overlapping."""
    size = t.element_size()
    aligned = t.data_ptr() % _TMA_ALIGN == 0 and (stride * size) % _TMA_ALIGN == 0
    return aligned and stride >= width


def tma_ready(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `x (M, K)` and `w (N, K)` can be read by TMA: a Hopper-or-later GPU (or the
    interpreter), `x` row-major and `w` row- or column-major, 16-byte aligned, rows that do
    not overlap (a broadcast stride of 0 does not qualify)."""
    if x.is_cuda:
        if not _has_tma(x.device.index if x.device.index is not None else -1):
            return False
    elif not INTERPRET:
        return False
    cols = x.shape[1]
    if x.stride(1) != 1 or not _rows_apart(x, x.stride(0), cols):
        return False
    if w.stride(1) == 1:
        return _rows_apart(w, w.stride(0), cols)
    return w.stride(0) == 1 and _rows_apart(w, w.stride(1), w.shape[0])


def descriptors(
    x: torch.Tensor, w: torch.Tensor, y: torch.Tensor | None = None
) -> tuple[TensorDescriptor, TensorDescriptor, TensorDescriptor, bool]:
    """TMA descriptors of `x (M, K)`, `w (N, K)` and `y (M, N)`, and whether `w` is stored
    N-major. Without `y`, or where TMA cannot write `y` (`tma_writable`), the third is `x`'s
    own descriptor: a stand-in for a kernel that stores `y` by pointer.

    The tile shapes are placeholders until the autotuner's pre-hook sets the chosen config's.
    An N-major `w` (a `(K, N)` row-major tensor seen transposed) is described as `(K, N)`.
    """
    w_n_major = w.stride(1) != 1
    stored = w.t() if w_n_major else w
    x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [16, 16])
    w_desc = TensorDescriptor(stored, list(stored.shape), list(stored.stride()), [16, 16])
    y_desc = x_desc
    if y is not None and tma_writable(y):
        y_desc = TensorDescriptor(y, list(y.shape), list(y.stride()), [16, 16])
    return x_desc, w_desc, y_desc, w_n_major


def tma_writable(y: torch.Tensor) -> bool:
    """Whether TMA can store `y (M, N)`: row-major, rows 16-byte aligned and not overlapping."""
    return y.stride(1) == 1 and _rows_apart(y, y.stride(0), y.shape[1])


@triton.jit
def _tma_tile(
    acc, x_desc, w_desc, a_ptr, off_m, off_n, rm, K, R, stride_ar, stride_ak, seed, keep_min,
    SHRINK: tl.constexpr, DROP_IN: tl.constexpr, W_N_MAJOR: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`acc + x[rm] W[off_n:]ᵀ` `(BLOCK_M, BLOCK_N)` from TMA-fed tiles and, if `SHRINK`,
    `t = mask(x[rm]) Aᵀ` `(BLOCK_M, BLOCK_R)` in the same K loop, both float32."""
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([off_m, k0])
        w = w_desc.load([k0, off_n]) if W_N_MAJOR else w_desc.load([off_n, k0]).T
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if SHRINK:
            a_ptrs = a_ptr + (k0 + rk)[:, None] * stride_ak + rr[None, :] * stride_ar
            a = tl.load(a_ptrs, mask=((k0 + rk) < K)[:, None] & (rr < R)[None, :], other=0.0)
            if DROP_IN:
                x = tl.where(_keep(seed, rm, k0 + rk, keep_min), x, 0.0)
            t = tl.dot(x, a, t, input_precision=PRECISION)
    return acc, t


@triton.jit
def _store_y(acc, y_desc, y_ptr, off_m, off_n, M, N, stride_ym, stride_yn,
             Y_DESC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Store the float32 `acc` as the `(off_m, off_n)` tile of `y`: by TMA in two halves of
    `BLOCK_N / 2` columns (`Y_DESC`: the copy engine clips ragged edges, and a half's staging
    buffer is half the tile's), else by pointer."""
    if Y_DESC:
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        y_desc.store([off_m, off_n], left.to(y_desc.dtype))
        y_desc.store([off_m, off_n + BLOCK_N // 2], right.to(y_desc.dtype))
    else:
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        _store_tile(acc, y_ptr, rm, rn, M, N, stride_ym, stride_yn)


@triton.autotune(
    configs=_INTERPRETER_TMA if INTERPRET else TMA_CONFIGS,
    key=["m_bucket", "N", "K", "BLOCK_R", "W_N_MAJOR", "SHRINK", "EMIT_T", "DROP_IN", "DROP_OUT",
         "HAS_BIAS", "PRECISION", "EXPAND_FIRST", "STATIC_SLABS", "Y_DESC"],
    prune_configs_by={"early_config_prune": _prune_tma},
    do_bench=_tune_bench,
)  # fmt: skip
@triton.jit(do_not_specialize=["seed", "keep_min"])
def lora_gemm_tma_kernel(
    x_desc, w_desc, y_desc, a_ptr, b_ptr, t_ptr, bias_ptr, y_ptr,
    M, N, K, R, m_bucket,
    stride_ar, stride_ak, stride_bn, stride_br, stride_tm, stride_tr, stride_ym, stride_yn,
    stride_bias, scale, seed, keep_min,
    W_N_MAJOR: tl.constexpr, SHRINK: tl.constexpr, EMIT_T: tl.constexpr, DROP_IN: tl.constexpr,
    DROP_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, SLAB_R: tl.constexpr, EXPAND_FIRST: tl.constexpr,
    STATIC_SLABS: tl.constexpr, Y_DESC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FLATTEN: tl.constexpr,
    TILES_N: tl.constexpr,
):  # fmt: skip
    """Every tile of `y`: program `i` takes work items `i, i + P, …` (`P` programs, one per
    SM) of the grouped-M order, an item being a row block and `TILES_N` consecutive N tiles.

    With `SHRINK` the K loop of an item's first tile also computes `t`, which the item's other
    tiles reuse (and which the item starting at N tile 0 stores, `EMIT_T`); without it `t` is
    read from `t_ptr`, `SLAB_R` columns at a time (unrolled over `BLOCK_R` with
    `STATIC_SLABS`, R ≤ BLOCK_R): after the K loop, or with `EXPAND_FIRST` before it, as the
    accumulator's start (bias and dropout mask included), so the K loop is the tile's last
    work. `y` leaves by TMA where it can (`Y_DESC`), else by pointer. `FLATTEN` (`TILES_N =
    1`; static slabs or the fused shrink) lets Triton flatten the item and K loops into one
    software pipeline, so a tile's epilogue overlaps the next tile's loads.
    """
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    items = num_m * tl.cdiv(num_n, TILES_N)
    for item in tl.range(tl.program_id(0), items, tl.num_programs(0), flatten=FLATTEN):
        pid_m, first_n = _item_origin(item, num_m, num_n, GROUP_M, TILES_N)
        off_m = pid_m * BLOCK_M
        off_n = first_n * BLOCK_N
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if EXPAND_FIRST:
            acc = _add_adapter(
                acc, acc, b_ptr, t_ptr, bias_ptr, rm, rn, M, N, R,
                stride_bn, stride_br, stride_tm, stride_tr, stride_bias, scale, seed, keep_min,
                False, DROP_OUT, HAS_BIAS, PRECISION, BLOCK_R, SLAB_R, STATIC_SLABS, True,
            )  # fmt: skip
        acc, t = _tma_tile(
            acc, x_desc, w_desc, a_ptr, off_m, off_n, rm, K, R, stride_ar, stride_ak,
            seed, keep_min, SHRINK, DROP_IN, W_N_MAJOR, PRECISION, BLOCK_R, BLOCK_M, BLOCK_K,
        )  # fmt: skip
        if SHRINK and EMIT_T:  # noqa: SIM102 (a constexpr test, then a runtime one)
            if first_n == 0:  # one item per row block writes t
                _store_t(t, t_ptr, rm, M, R, stride_tm, stride_tr, BLOCK_R)
        if not EXPAND_FIRST:
            acc = _add_adapter(
                acc, t, b_ptr, t_ptr, bias_ptr, rm, rn, M, N, R,
                stride_bn, stride_br, stride_tm, stride_tr, stride_bias, scale, seed, keep_min,
                SHRINK, DROP_OUT, HAS_BIAS, PRECISION, BLOCK_R, SLAB_R, STATIC_SLABS,
            )  # fmt: skip
        _store_y(acc, y_desc, y_ptr, off_m, off_n, M, N, stride_ym, stride_yn, Y_DESC,
                 BLOCK_M, BLOCK_N)  # fmt: skip
        for step in tl.static_range(1, TILES_N):
            if first_n + step < num_n:
                off_n = (first_n + step) * BLOCK_N
                rn = off_n + tl.arange(0, BLOCK_N)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                if EXPAND_FIRST:
                    acc = _add_adapter(
                        acc, acc, b_ptr, t_ptr, bias_ptr, rm, rn, M, N, R, stride_bn,
                        stride_br, stride_tm, stride_tr, stride_bias, scale, seed, keep_min,
                        False, DROP_OUT, HAS_BIAS, PRECISION, BLOCK_R, SLAB_R, STATIC_SLABS, True,
                    )  # fmt: skip
                acc, _ = _tma_tile(
                    acc, x_desc, w_desc, a_ptr, off_m, off_n, rm, K, R, stride_ar, stride_ak,
                    seed, keep_min, False, False, W_N_MAJOR, PRECISION, BLOCK_R, BLOCK_M,
                    BLOCK_K,
                )  # fmt: skip
                if not EXPAND_FIRST:
                    acc = _add_adapter(
                        acc, t, b_ptr, t_ptr, bias_ptr, rm, rn, M, N, R, stride_bn,
                        stride_br, stride_tm, stride_tr, stride_bias, scale, seed, keep_min,
                        SHRINK, DROP_OUT, HAS_BIAS, PRECISION, BLOCK_R, SLAB_R, STATIC_SLABS,
                    )  # fmt: skip
                _store_y(acc, y_desc, y_ptr, off_m, off_n, M, N, stride_ym, stride_yn, Y_DESC,
                         BLOCK_M, BLOCK_N)  # fmt: skip
