"""Triton kernels of the fused LoRA linear (see docs/kernels.md for the maths and the regimes).

Three kernels, each taking every operand by strides so transposed or sliced views need no copy:

- `lora_gemm_kernel`: `y = x Wᵀ + bias + c · mask(t Bᵀ)` for a `(M, K)` activation, a
  `(N, K)` weight and a `(N, R)` expand factor. `t (M, R)` is either computed in the K loop
  from a `(R, K)` shrink factor (`SHRINK`, optionally storing it once per row block,
  `EMIT_T`) or read from a buffer (the "extra K slab" of the two-phase regime). Dropout masks
  the shrink's input (`DROP_IN`, forward) or the adapter term of the output (`DROP_OUT`, dx).
- `shrink_kernel`: `t = mask(x) Aᵀ` in float32, the first phase of the two-phase regime.
- `reduce_rows_kernel`: per-split partial sums `Σ_m g[m, :]ᵀ mask(x)[m, :]`, the weight
  gradients `d_down` and `d_up` (reductions over the M rows).

The dropout mask of element `(m, j)` of the `(M, in)` activation is
`tl.rand(seed, m · in + j) ≥ p`, so every kernel regenerates the same mask.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _config(bm: int, bn: int, bk: int, group: int, warps: int, stages: int) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def _gemm_configs() -> list[triton.Config]:
    if INTERPRET:
        return [_config(16, 32, 32, 4, 4, 1)]
    return [
        # decode / small M: narrow N tiles so the grid fills the machine while W streams
        _config(16, 32, 256, 1, 4, 4),
        _config(16, 64, 128, 1, 4, 5),
        _config(16, 128, 128, 1, 4, 4),
        _config(32, 64, 128, 4, 4, 4),
        _config(64, 64, 128, 8, 4, 4),
        # medium and large M: the usual Hopper tensor-core tiles
        _config(64, 128, 64, 8, 4, 4),
        _config(128, 128, 64, 8, 4, 4),
        _config(128, 128, 64, 8, 8, 3),
        _config(128, 256, 64, 8, 8, 3),
        _config(256, 128, 64, 8, 8, 3),
    ]


def _prune_by_rows(
    configs: list[triton.Config], named_args: dict, **_: object
) -> list[triton.Config]:
    """Drop configs whose row block is far larger than the row count (wasted MMA rows)."""
    rows = max(16, named_args["m_bucket"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= rows]
    return kept or configs[:1]


def _row_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bk, w, s in [(16, 256, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4), (128, 64, 8, 3)]
    ]


def _reduce_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bk, w, s in [(64, 64, 4, 4), (64, 128, 4, 4), (128, 128, 8, 3), (128, 64, 4, 3)]
    ]


@triton.jit
def _keep(seed, rows, cols, ld, p):
    """Dropout keep-mask of the `(rows, cols)` block of an activation with row length `ld`."""
    offsets = rows.to(tl.int64)[:, None] * ld + cols[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit
def keep_mask_kernel(out_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Write the `(M, K)` keep-mask (int8) that the other kernels generate, for tests."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep(seed, rm, rk, K, p)
    inside = (rm < M)[:, None] & (rk < K)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], keep.to(tl.int8), mask=inside)


@triton.autotune(
    configs=_gemm_configs(),
    key=["m_bucket", "N", "K", "BLOCK_R"],
    prune_configs_by={"early_config_prune": _prune_by_rows},
)
@triton.jit
def lora_gemm_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, t_ptr, bias_ptr, y_ptr,
    M, N, K, R, m_bucket,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_tm, stride_tr, stride_ym, stride_yn,
    scale, seed, p, drop_ld,
    SHRINK: tl.constexpr, EMIT_T: tl.constexpr, DROP_IN: tl.constexpr, DROP_OUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One `(BLOCK_M, BLOCK_N)` tile of `y`; grouped-M order so W tiles are reused from L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    in_m = rm < M
    in_n = rn < N
    in_r = rr < R

    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn.to(tl.int64)[None, :] * stride_wn
    a_ptrs = a_ptr + rk[:, None] * stride_ak + rr[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if SHRINK:
            a = tl.load(a_ptrs, mask=in_k[:, None] & in_r[None, :], other=0.0)
            if DROP_IN:
                x = tl.where(_keep(seed, rm, k0 + rk, drop_ld, p), x, 0.0)
            t = tl.dot(x, a, t, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    t_ptrs = t_ptr + rm.to(tl.int64)[:, None] * stride_tm + rr[None, :] * stride_tr
    t_mask = in_m[:, None] & in_r[None, :]
    if SHRINK:
        if EMIT_T:  # noqa: SIM102 (a constexpr test, then a runtime one)
            if pid_n == 0:  # one program per row block writes t
                tl.store(t_ptrs, t, mask=t_mask)
    else:
        t = tl.load(t_ptrs, mask=t_mask, other=0.0)
    b_ptrs = b_ptr + rr[:, None] * stride_br + rn.to(tl.int64)[None, :] * stride_bn
    b = tl.load(b_ptrs, mask=in_r[:, None] & in_n[None, :], other=0.0)
    ts = (t * scale).to(b.dtype)
    if DROP_OUT:
        adapter = tl.dot(ts, b, input_precision=PRECISION)
        acc += tl.where(_keep(seed, rm, rn, drop_ld, p), adapter, 0.0)
    else:
        acc = tl.dot(ts, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=in_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


@triton.autotune(
    configs=_row_configs(),
    key=["m_bucket", "K", "BLOCK_R"],
    prune_configs_by={"early_config_prune": _prune_by_rows},
)
@triton.jit
def shrink_kernel(
    x_ptr, a_ptr, t_ptr,
    M, K, R, m_bucket,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_tm, stride_tr,
    seed, p, drop_ld,
    DROP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`t[rows] = mask(x[rows]) Aᵀ` in float32 for one block of rows."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    in_m = rm < M
    in_r = rr < R
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
    a_ptrs = a_ptr + rk[:, None] * stride_ak + rr[None, :] * stride_ar
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=in_k[:, None] & in_r[None, :], other=0.0)
        if DROP:
            x = tl.where(_keep(seed, rm, k0 + rk, drop_ld, p), x, 0.0)
        t = tl.dot(x, a, t, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    t_ptrs = t_ptr + rm.to(tl.int64)[:, None] * stride_tm + rr[None, :] * stride_tr
    tl.store(t_ptrs, t, mask=in_m[:, None] & in_r[None, :])


@triton.autotune(configs=_reduce_configs(), key=["K", "BLOCK_R", "rows_per_split"])
@triton.jit
def reduce_rows_kernel(
    g_ptr, x_ptr, out_ptr,
    M, K, R, rows_per_split,
    stride_gm, stride_gr, stride_xm, stride_xk, stride_os, stride_or, stride_ok,
    seed, p, drop_ld,
    DROP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`out[split, :, cols] = Σ_{rows of split} g[m, :]ᵀ mask(x)[m, cols]` in float32.

    `rows_per_split` is a multiple of every BLOCK_M, so the splits never overlap.
    """
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    in_k = rk < K
    in_r = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    row0 = split * rows_per_split
    for m0 in range(row0, row0 + rows_per_split, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        in_m = rm < M
        g_ptrs = g_ptr + rr[:, None] * stride_gr + rm.to(tl.int64)[None, :] * stride_gm
        g = tl.load(g_ptrs, mask=in_r[:, None] & in_m[None, :], other=0.0)
        x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
        x = tl.load(x_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
        if DROP:
            x = tl.where(_keep(seed, rm, rk, drop_ld, p), x, 0.0)
        acc = tl.dot(g.to(x.dtype), x, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + split * stride_os + rr[:, None] * stride_or + rk[None, :] * stride_ok
    tl.store(out_ptrs, acc, mask=in_r[:, None] & in_k[None, :])
