"""Triton kernels of the fused LoRA linear (see docs/kernels.md for the maths and the regimes).

Four kernels, each taking every operand by strides so transposed or sliced views need no copy:

- `lora_gemm_kernel`: `y = x Wᵀ + bias + c · mask(t Bᵀ)` for a `(M, K)` activation, a
  `(N, K)` weight and a `(N, R)` expand factor. `t (M, R)` is either computed in the K loop
  from a `(R, K)` shrink factor (`SHRINK`, `R ≤ BLOCK_R ≤ MAX_BLOCK_R`, optionally storing it
  once per row block, `EMIT_T`) or read from a buffer, `BLOCK_R` columns at a time (the "extra
  K slab" of the two-phase regime, any `R`). Dropout masks the shrink's input (`DROP_IN`,
  forward) or the adapter term of the output (`DROP_OUT`, dx).
- `shrink_kernel`: `t = mask(x) Aᵀ` in float32, the first phase of the two-phase regime; one
  program per (row block, `BLOCK_R` columns of `t`, split of K: split-K for few rows).
- `reduce_rows_kernel`: `scale · Σ_m g[m, :]ᵀ mask(x)[m, :]`, the weight gradients `d_down`
  and `d_up` (reductions over the M rows): float32 partial sums per row split, or the gradient
  itself, scaled, cast and in its final layout, when the rows take one split.
- `lora_backward_kernel`: the whole backward of up to `ONE_PASS_MAX_ROWS` rows in one launch:
  the `dx` tiles as `lora_gemm_kernel` computes them, and beside each its columns of `d_down`
  from the `g` already in registers and the `x` tile, and a share of `d_up`'s rows from the
  `dy` tiles; one row block writes the gradients whole, several write float32 partials per
  row block that the launcher sums.

The dropout mask of element `(m, j)` of the `(M, in)` activation is word `j mod 4` of
Philox-4x32-10 keyed by `seed` at counter `(j div 4, m, 0, 0)`, so every kernel regenerates
the same mask from one Philox call per four elements, and no offset `m · in + j` can overflow.

Autotuning: the candidate tiles are pruned per call to those whose pipelined shared memory and
float32 accumulators fit the device (`_prune_gemm`, `_prune_shrink`, `_prune_reduce`,
`_prune_one_pass`); the keys hold every constexpr that changes the kernel, and candidates are
timed briefly (`_tune_bench`) so that a benchmark grid does not spend its time tuning.
"""

from __future__ import annotations

import functools
import math
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MAX_BLOCK_R = 128
"""Widest slab of the rank dimension a program holds; larger ranks are walked in slabs."""

EPILOGUE_SLAB_R = 32
"""Rank columns of `t` per step when the GEMM's epilogue reads `t` from memory (two-phase)."""

_DEFAULT_SMEM = 232_448  # H100/H200 opt-in shared memory per block, bytes
_SMEM_MARGIN = 8 * 1024  # layout-conversion scratch and barriers beside the pipeline buffers
_MAX_ACC_PER_THREAD = 160  # float32 accumulator registers per thread before spilling looms


def _config(
    bm: int, bn: int, bk: int, group: int, warps: int, stages: int, tiles: int = 1
) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "TILES_N": tiles}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


GEMM_CONFIGS = [
    # decode / small M: narrow N tiles so the grid fills the machine while W streams
    _config(16, 32, 256, 1, 4, 4),
    _config(16, 64, 128, 1, 4, 5),
    _config(16, 128, 128, 1, 4, 4),
    _config(16, 64, 64, 1, 4, 3),  # small footprint: fits the fused shrink at r = 128, fp32
    _config(32, 64, 128, 4, 4, 4),
    _config(64, 64, 128, 8, 4, 4),
    # medium and large M: the usual Hopper tensor-core tiles
    _config(64, 128, 64, 8, 4, 4),
    _config(128, 128, 64, 8, 4, 4),
    _config(128, 128, 64, 8, 8, 3),
    _config(128, 256, 64, 8, 8, 3),
    _config(256, 128, 64, 8, 8, 3),
    # the fused shrink only: several N tiles per program share one t (TILES_N > 1)
    _config(16, 64, 128, 1, 4, 5, tiles=2),
    _config(16, 128, 64, 1, 4, 4, tiles=2),
    _config(16, 64, 64, 1, 4, 3, tiles=4),
    _config(64, 128, 64, 8, 4, 4, tiles=4),
    _config(128, 128, 64, 8, 8, 3, tiles=4),
    _config(128, 256, 64, 8, 8, 3, tiles=2),
    _config(128, 256, 64, 8, 8, 3, tiles=4),
]
"""Candidate tiles of `lora_gemm_kernel` on a GPU (pruned per call by `_prune_gemm`)."""

ROW_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(16, 256, 4, 4), (16, 128, 4, 3), (32, 128, 4, 4), (64, 128, 4, 4),
                         (128, 64, 8, 3)]
]  # fmt: skip
"""Candidate tiles of `shrink_kernel` (pruned per call by `_prune_shrink`)."""

REDUCE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(32, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 4), (128, 128, 8, 3),
                         (128, 64, 4, 3)]
]  # fmt: skip
"""Candidate tiles of `reduce_rows_kernel` (BLOCK_M must divide the launcher's 128-row unit)."""

ONE_PASS_MAX_ROWS = 1024
"""Most rows the one-pass backward takes (above it, the separate reductions)."""

ONE_PASS_BLOCK_M = 64
"""Rows per row block of `lora_backward_kernel` above 64 rows (fewer rows take one block)."""


def _one_pass_config(bn: int, bk: int, warps: int, stages: int, tiles: int) -> triton.Config:
    meta = {"BLOCK_N": bn, "BLOCK_K": bk, "TILES_N": tiles}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


ONE_PASS_CONFIGS = [
    _one_pass_config(32, 256, 4, 4, 1),
    _one_pass_config(64, 128, 4, 4, 1),
    _one_pass_config(64, 64, 4, 3, 1),
    _one_pass_config(128, 128, 4, 4, 1),
    _one_pass_config(64, 128, 4, 4, 2),
    _one_pass_config(64, 64, 4, 3, 4),
    _one_pass_config(128, 64, 8, 3, 2),
]
"""Candidate tiles of `lora_backward_kernel` (its BLOCK_M is the launcher's, so that it knows
how many partials the row blocks write)."""

_INTERPRETER_GEMM = [_config(16, 32, 32, 4, 4, 1, tiles=2)]  # TILES_N = 2: both paths run
_INTERPRETER_ONE_PASS = [_one_pass_config(32, 32, 4, 1, 2)]
_INTERPRETER_ROWS = [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]


@functools.cache
def _smem_limit() -> int:
    """Shared memory one program may use on the current CUDA device (bytes)."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            optin = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
            if optin > 0:
                return optin
    except Exception:  # no device properties: assume Hopper
        pass
    return _DEFAULT_SMEM


def _fitting(configs: list[triton.Config], smem_of, regs_of=None) -> list[triton.Config]:
    """Configs whose shared memory and registers fit; else one fallback (marked `fallback`):
    the config with the fewest registers, with fewer stages until its shared memory fits."""
    limit = _smem_limit() - _SMEM_MARGIN
    kept = [c for c in configs if regs_of is None or regs_of(c) <= _MAX_ACC_PER_THREAD]
    fits = [c for c in kept if smem_of(c) <= limit]
    if fits:
        return fits
    best = min(kept or configs, key=smem_of if kept else regs_of)
    stages = best.num_stages
    while stages > 1 and smem_of(_with_stages(best, stages)) > limit:
        stages -= 1
    fallback = _with_stages(best, stages)
    fallback.fallback = True
    return [fallback]


_TF32X3_SMEM = 1.4  # shared memory of a "tf32x3" config over its "tf32" twin, at most (sm_90a)


def _priced(smem_of, constexprs: dict):
    """`smem_of` scaled for the dot precision: "tf32x3" splits each float32 operand into tf32
    parts, which took up to 1.39× the shared memory of the same tile in "tf32"."""
    if constexprs.get("PRECISION") != "tf32x3":
        return smem_of
    return lambda config: int(smem_of(config) * _TF32X3_SMEM)


def _with_stages(config: triton.Config, stages: int) -> triton.Config:
    return triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=stages,
                         pre_hook=config.pre_hook)  # fmt: skip


def _prune_gemm(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Row blocks that suit the row count, then what fits the device's shared memory.

    Decode tiles (BLOCK_M < 64) are dropped for 1024+ rows, row blocks far over the row count
    for few rows, and several N tiles per program (`TILES_N > 1`) unless the shrink is fused
    (only it gains), there are that many N tiles and every one is full. With the shrink in the
    K loop each stage also holds an A tile, and `t` is a second float32 accumulator; dropout
    on the output needs room for a masked copy of the adapter term and the Philox rounds
    besides, dropout on the fused shrink's input room for the mask of an x tile.
    """
    rows = max(16, int(named_args["m_bucket"]))
    cols = int(named_args["N"])
    size = named_args["x_ptr"].element_size()
    rank_block = int(kwargs["BLOCK_R"])
    shrink = bool(kwargs["SHRINK"])
    slab = rank_block if shrink else int(kwargs["SLAB_R"])
    accumulators = 3 if kwargs["DROP_OUT"] else 1  # the masked adapter term and Philox's state
    w_copies = 2 if int(named_args["stride_wn"]) == 1 else 1  # an N-major W (dx) is transposed

    def suits(c: triton.Config) -> bool:
        bm, bn, tiles = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["TILES_N"]
        if tiles > 1 and (not shrink or tiles > triton.cdiv(cols, bn) or cols % bn):
            return False
        return bm <= rows and (rows < 1024 or bm >= 64)

    by_rows = [c for c in configs if suits(c)]
    by_rows = by_rows or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["TILES_N"]))]

    def smem(c: triton.Config) -> int:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        stage = bm * bk + bk * bn + (bk * rank_block if shrink else 0)
        epilogue = (bm * slab + slab * bn) * size + bm * slab * 4
        return max(c.num_stages * stage * size, epilogue)

    def spilled(c: triton.Config) -> bool:
        """Tiles the estimate below fits but that compiled for sm_90a (Triton 3.9, with its own
        `ptxas` flags) with over 128 B of spills: the `dx` GEMM (W read N-major) walking four
        128×256 tiles (168 B; walking two: none; the forward's four: 32 B), and a 16-row
        tile with dropout on the fused shrink's input and 128 × 128 K × N steps (156 B; the
        narrower decode tiles: none)."""
        bm, bn, bk, tiles = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "TILES_N"))
        if w_copies == 2 and tiles > 2 and bm * bn >= 128 * 256:
            return True
        return shrink and bool(kwargs["DROP_IN"]) and bm < 64 and bk * bn >= 128 * 128

    def regs(c: triton.Config) -> float:
        if spilled(c):
            return math.inf
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        philox_in = bk if shrink and kwargs["DROP_IN"] else 0  # the mask of each x tile
        held_t = slab if c.kwargs["TILES_N"] > 1 else 0  # t stays live through later tiles
        per_row = accumulators * bn + slab + held_t + philox_in
        tf32_fused = size == 4 and shrink  # x feeds two dots: its tf32 copies stay in registers
        operands = (bm * bk + bk * bn) * w_copies if tf32_fused else 0
        return (bm * per_row + operands) / (32 * c.num_warps)

    return _fitting(by_rows, _priced(smem, kwargs), regs)


def _prune_shrink(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    rows = max(16, int(named_args["m_bucket"]))
    size = named_args["x_ptr"].element_size()
    rank_block = int(kwargs["BLOCK_R"])
    by_rows = [c for c in configs if c.kwargs["BLOCK_M"] <= rows] or configs[:1]

    def smem(c: triton.Config) -> int:
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        return c.num_stages * (bm * bk + bk * rank_block) * size

    return _fitting(by_rows, _priced(smem, kwargs))


def _prune_reduce(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    g_size = named_args["g_ptr"].element_size()
    x_size = named_args["x_ptr"].element_size()
    rank_block = int(kwargs["BLOCK_R"])

    def smem(c: triton.Config) -> int:
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        return c.num_stages * (rank_block * bm * g_size + bm * bk * x_size)

    def regs(c: triton.Config) -> float:
        return rank_block * c.kwargs["BLOCK_K"] / (32 * c.num_warps)

    return _fitting(configs, _priced(smem, kwargs), regs)


def _prune_one_pass(
    configs: list[triton.Config], named_args: dict, **kwargs
) -> list[triton.Config]:
    """Several N tiles per program only where there are that many and all are full; then what
    fits: per stage a `dy`, a `Wᵀ` and an `upᵀ` tile, and in registers `acc`, `g`, the
    `d_down` tile of the epilogue and, with dropout, the masked adapter term and Philox (and
    in float32 the operand tiles, and across a walk of N tiles `g` and the `upᵀ` tile)."""
    cols = int(named_args["N"])
    size = named_args["dy_ptr"].element_size()
    rows = int(kwargs["BLOCK_M"])
    rank_block = int(kwargs["BLOCK_R"])
    accumulators = 3 if kwargs["DROP"] else 1
    w_copies = 2 if int(named_args["stride_wn"]) == 1 else 1

    def suits(c: triton.Config) -> bool:
        bn, tiles = c.kwargs["BLOCK_N"], c.kwargs["TILES_N"]
        return tiles == 1 or (tiles <= triton.cdiv(cols, bn) and cols % bn == 0)

    kept = [c for c in configs if suits(c)] or configs[:1]

    def smem(c: triton.Config) -> int:
        bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return c.num_stages * (rows * bk + bk * bn + bk * rank_block) * size

    def regs(c: triton.Config) -> float:
        bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        per_row = accumulators * bn + 2 * rank_block  # acc, g held across the tiles
        epilogue = rank_block * bn + rows * bn  # the d_down tile and its x tile
        operands = (rows * bk + bk * bn) * w_copies if size == 4 else 0
        # float32 walking four N tiles: g, its tf32 copy and the up tile stay live across the
        # walk (sm_90a spilled up to 224 B at r = 64 in 16-row blocks without this term; its
        # two-tile walks compiled without spills)
        walk = rank_block * (2 * rows + bk) if size == 4 and c.kwargs["TILES_N"] > 2 else 0
        return (rows * per_row + epilogue + operands + walk) / (32 * c.num_warps)

    return _fitting(kept, _priced(smem, kwargs), regs)


def _tune_bench(kernel_call, quantiles):
    """Time one candidate briefly: the default 25 + 100 ms per config and key adds up to many
    minutes over a benchmark grid."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


@triton.jit
def _keep(seed, rows, cols, keep_min):
    """Dropout keep-mask of the `(rows, cols)` block of an activation: `cols` consecutive,
    the first a multiple of 4. One Philox-4x32 call per row and quad of columns gives the
    quad's four words (column `4q + i` takes word `i` of counter `(q, row, 0, 0)`); an entry is
    kept when its word's int32 magnitude (`x`, or `~x` if negative) is at least `keep_min`,
    which is `uniform(word) ≥ p` decided in integers (`_lora_torch.keep_threshold`)."""
    block_rows: tl.constexpr = rows.shape[0]
    block_cols: tl.constexpr = cols.shape[0]
    quads = tl.min(cols, axis=0) // 4 + tl.arange(0, block_cols // 4)
    zero = tl.zeros((block_rows, block_cols // 4), dtype=tl.int32)
    w0, w1, w2, w3 = tl.philox(seed, zero + quads[None, :], zero + rows[:, None], zero, zero)
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [.., q, a, b] = word 2a + b of quad q
    signed = tl.reshape(words, (block_rows, block_cols)).to(tl.int32, bitcast=True)
    return (signed ^ (signed >> 31)) >= keep_min


@triton.jit(do_not_specialize=["seed", "keep_min"])
def keep_mask_kernel(out_ptr, M, K, seed, keep_min, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Write the `(M, K)` keep-mask (int8) that the other kernels generate, for tests."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep(seed, rm, rk, keep_min)
    inside = (rm < M)[:, None] & (rk < K)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], keep.to(tl.int8), mask=inside)


@triton.jit
def _base_tile(
    x_ptr, w_ptr, a_ptr, rm, rn, M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, seed, keep_min,
    SHRINK: tl.constexpr, DROP_IN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`acc = x[rm] W[rn]ᵀ` `(BLOCK_M, BLOCK_N)` and, if `SHRINK`, `t = mask(x[rm]) Aᵀ`
    `(BLOCK_M, BLOCK_R)`, both float32, from one K loop."""
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
                x = tl.where(_keep(seed, rm, k0 + rk, keep_min), x, 0.0)
            t = tl.dot(x, a, t, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc, t


@triton.jit
def _t_slab_product(
    target, t_ptr, b_ptr, r0, rm64, rn64, in_m, in_n, R,
    stride_bn, stride_br, stride_tm, stride_tr, scale,
    PRECISION: tl.constexpr, SLAB_R: tl.constexpr,
):  # fmt: skip
    """`target + c · t[rm, r0:r0+SLAB_R] B[rn, r0:r0+SLAB_R]ᵀ`, `t` read from its float32
    buffer (`_expand`)."""
    rc = r0 + tl.arange(0, SLAB_R)
    in_rc = rc < R
    t_ptrs = t_ptr + rm64[:, None] * stride_tm + rc[None, :] * stride_tr
    slab = tl.load(t_ptrs, mask=in_m[:, None] & in_rc[None, :], other=0.0)
    b_ptrs = b_ptr + rc[:, None] * stride_br + rn64[None, :] * stride_bn
    b = tl.load(b_ptrs, mask=in_rc[:, None] & in_n[None, :], other=0.0)
    return _expand(slab, b, scale, target, PRECISION)


@triton.jit
def _exponent(v):
    """`⌊log₂ v⌋` of a normal positive float32 `v`, read exactly from its exponent bits
    (−127 for zero, and for a subnormal `v`, whose `⌊log₂ v⌋` is lower)."""
    return ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _finite_largest(v):
    """The largest finite `|v|` of a 2-D tile, as float32 (0 where none is finite)."""
    size = tl.abs(v)
    size = tl.where(size < float("inf"), size, 0.0)  # NaN fails the test too
    return tl.max(tl.max(size, axis=1), axis=0).to(tl.float32)


@triton.jit
def _fitted_exponents(v, AXIS: tl.constexpr):
    """Per rank, the least `e ≥ 0` with every finite `|v| · 2^-e` at most 65504 (float16's
    largest), for a float32 tile `v` whose ranks lie along the other axis than `AXIS`, rounded
    to float16 as a tensor-core operand: the products then carry each rank's factor `2^e` back
    in float32. A rank whose finite values are all within float16 gets `e = 0` (left as it
    is); each rank has its own `e`, so a large rank does not push a small one among float16's
    subnormals. Inf and NaN entries, which only reach their own outputs, are left out of the
    maxima. Returns int32 `(BLOCK_R,)`."""
    size = tl.abs(v)
    size = tl.where(size < float("inf"), size, 0.0)  # NaN fails the test too
    bits = tl.max(size, axis=AXIS).to(tl.float32).to(tl.int32, bitcast=True)
    # largest = (1 + f) · 2^p (p = bits >> 23 − 127), 65504 = (1 + f₁₆) · 2¹⁵: e = p − 15 when
    # f ≤ f₁₆ (the mantissa field 0x7FE000), p − 14 otherwise; negative (within float16) → 0
    e = (bits >> 23) - 142 + ((bits & 0x7FFFFF) > 0x7FE000).to(tl.int32)
    return tl.maximum(e, 0)


@triton.jit
def _power_of_2(e):
    """`2^e` as float32, exact, for int32 `e` in [−126, 127] (any shape)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _times_power_of_2(v, f):
    """`v · 2^f[row]` for a 2-D `v` and int32 `f (len(v),)` in [−252, 254]: two exact powers
    of two, as one float32 holds 2^−126 to 2^127."""
    half = f >> 1
    return v * _power_of_2(half)[:, None] * _power_of_2(f - half)[:, None]


@triton.jit
def _scaled_operands(t, b, scale):
    """The expand's operands `(c_t · t, c_b · B)` in B's dtype, `c_t · c_b = c`, one rounding
    each: `c_b = 2^e` is exact on `B`, and every such split gives the same products wherever
    neither operand leaves the dtype's normal range. By default `e = ⌈log₂|c|⌉` for
    `|c| ≥ 1` (so `c_t` lies in (½, 1]) and 0 below, which suffices in bfloat16 and float32
    up to `|c| = 2^64` (`c_b · B` finite for entries of B below 2^64; the launchers run a
    larger `c` on the torch path, `_lora_triton.SPLIT_MAX_SCALE`).

    In float16 (normal from 2⁻¹⁴ to 65504) `e` is then moved per tile, as little as the
    tile's largest finite entries need (binary exponents `k_t` of `max|c·t|`, at most one
    below it, and `k_b` of `max|B|`): up to `k_t − 13` (so `|c_t · t| < 2¹⁵`) and down to
    `15 − k_b` (so `|c_b · B| ≤ 65504`), and within those, so that neither largest entry
    falls below 2⁻⁴ (ten bits above the subnormals for the smaller ones); where no `e` keeps
    both there (a product below about 2⁻⁸), to the middle, `⌊(k_t − k_b) / 2⌋`; where no `e`
    avoids overflow (beyond about 2³⁰), to `15 − k_b`, so that `B` stays finite.
    With `c · t` zero `e = 0`, with `B` zero `e ≥ k_t − 13`; Inf and NaN entries, which only
    reach their own outputs, are left out of the maxima.

    A row whose own `c · t` is still too large for float16 at that `e` (`k_row − e > 13`)
    takes a further `2^-f[row]` (`f = k_row − 13 − e`, at most 252), which `_expand` takes
    back from the row's float32 product. Returns `(c_t · t, c_b · B, f)`, `f` int32
    `(BLOCK_M,)` (zeros outside float16)."""
    # 2^e built from its exponent bits, exactly a power of two whatever log2's rounding
    e = tl.ceil(tl.log2(tl.maximum(tl.abs(scale), 1.0))).to(tl.int32)
    shift = tl.zeros((t.shape[0],), dtype=tl.int32)
    if b.dtype == tl.float16:
        size = tl.abs(t)
        rows_t = tl.max(tl.where(size < float("inf"), size, 0.0), axis=1)  # NaN fails too
        largest_t, largest_b = tl.max(rows_t, axis=0).to(tl.float32), _finite_largest(b)
        # no float32 product to overflow; the scale as float32, which it is in a compiled kernel
        # (the interpreter holds a Python float below float32's normal range as a float64)
        k_s = _exponent(tl.abs(scale).to(tl.float32))
        k_t = _exponent(largest_t) + k_s
        k_b = _exponent(largest_b)
        fits_t, fits_b = k_t - 13, 15 - k_b  # no overflow from e ≥ fits_t, e ≤ fits_b
        low = tl.maximum(fits_t, -4 - k_b)
        high = tl.minimum(fits_b, k_t + 4)
        middle = tl.minimum(tl.maximum((k_t - k_b) >> 1, fits_t), fits_b)
        moved = tl.where(low <= high, tl.minimum(tl.maximum(e, low), high), middle)
        # where no split fits, B stays finite: the rows whose c·t is too large are shifted
        moved = tl.where(fits_t <= fits_b, moved, fits_b)
        moved = tl.where(largest_b > 0, moved, tl.maximum(e, fits_t))
        e = tl.where((largest_t > 0) & (scale != 0), moved, 0)
    e = tl.minimum(tl.maximum(e, -126), 127)
    if b.dtype == tl.float16:
        k_rows = _exponent(rows_t.to(tl.float32)) + k_s
        shift = tl.where(scale != 0, tl.minimum(tl.maximum(k_rows - 13 - e, 0), 252), 0)
        t = _times_power_of_2(t, -shift)  # before the scale: the large t stays normal
    on_b = ((e + 127) << 23).to(tl.float32, bitcast=True)
    return (t * (scale / on_b)).to(b.dtype), (b.to(tl.float32) * on_b).to(b.dtype), shift


@triton.jit
def _expand(t, b, scale, target, PRECISION: tl.constexpr):
    """`target + c · t b` in float32, for a float32 `t (BLOCK_M, R)` and `b (R, BLOCK_N)`,
    rounded to b's dtype for the tensor cores after the scale split (`_scaled_operands`). In
    float16 a row shifted by `2^-f` has its `target` row in the same units for the product,
    and both are taken back by `2^f` (exact powers of two): so a row whose `c · t` is beyond
    float16 gives the float32 sum, whose overflow is a signed Inf, where an Inf operand met
    a zero of `b` (NaN) or the Inf of another rank (Inf − Inf)."""
    ts, bs, shift = _scaled_operands(t, b, scale)
    if b.dtype == tl.float16:
        if tl.max(shift, axis=0) > 0:  # rare: the common tile keeps the plain product below
            target = _times_power_of_2(target, -shift)
            target = tl.dot(ts, bs, target, input_precision=PRECISION)
            target = _times_power_of_2(target, shift)
        else:
            target = tl.dot(ts, bs, target, input_precision=PRECISION)
    else:
        target = tl.dot(ts, bs, target, input_precision=PRECISION)
    return target


@triton.jit
def _add_adapter(
    acc, t, b_ptr, t_ptr, bias_ptr, rm, rn, M, N, R,
    stride_bn, stride_br, stride_tm, stride_tr, stride_bias, scale, seed, keep_min,
    T_IN_REGISTERS: tl.constexpr, DROP_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, SLAB_R: tl.constexpr,
    STATIC_SLABS: tl.constexpr = False, ACC_IS_ZERO: tl.constexpr = False,
):  # fmt: skip
    """`acc + c · mask(t B[rn]ᵀ) + bias[rn]`, float32 `(len(rm), len(rn))`.

    `t` is the whole rank in registers (`T_IN_REGISTERS`, R ≤ BLOCK_R) or is read from the
    `t_ptr` buffer `SLAB_R` columns at a time: in a loop over any R (narrow slabs keep the
    float32 slab's registers beside `acc` few), or unrolled over `BLOCK_R` (`STATIC_SLABS`,
    R ≤ BLOCK_R: no loop, so an enclosing loop can be flattened). Without dropout the adapter
    accumulates into `acc`; with it (`DROP_OUT`), into a second accumulator that is masked
    first, unless `acc` is zero (`ACC_IS_ZERO`: the adapter term starts the accumulator, and
    the mask is applied to it in place).
    """
    in_n = rn < N
    if T_IN_REGISTERS:
        rr = tl.arange(0, BLOCK_R)
        in_r = rr < R
        b_ptrs = b_ptr + rr[:, None] * stride_br + rn.to(tl.int64)[None, :] * stride_bn
        b = tl.load(b_ptrs, mask=in_r[:, None] & in_n[None, :], other=0.0)
        # t's padded ranks are x · 0, NaN where the row holds an Inf; against B's zero rows
        # they would make the whole row NaN where the formula has ±Inf: they must be 0
        t = tl.where(in_r[None, :], t, 0.0)
        if DROP_OUT:
            adapter = _expand(t, b, scale, tl.zeros(acc.shape, dtype=tl.float32), PRECISION)
            acc += tl.where(_keep(seed, rm, rn, keep_min), adapter, 0.0)
        else:
            acc = _expand(t, b, scale, acc, PRECISION)
    else:
        in_m = rm < M
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        apart: tl.constexpr = DROP_OUT and not ACC_IS_ZERO  # the adapter term on its own
        target = tl.zeros(acc.shape, dtype=tl.float32) if apart else acc
        if STATIC_SLABS:
            for r0 in tl.static_range(0, BLOCK_R, SLAB_R):
                target = _t_slab_product(
                    target, t_ptr, b_ptr, r0, rm64, rn64, in_m, in_n, R,
                    stride_bn, stride_br, stride_tm, stride_tr, scale, PRECISION, SLAB_R,
                )  # fmt: skip
        else:
            for r0 in tl.range(0, R, SLAB_R, num_stages=1):  # a few slabs: not worth a pipeline
                target = _t_slab_product(
                    target, t_ptr, b_ptr, r0, rm64, rn64, in_m, in_n, R,
                    stride_bn, stride_br, stride_tm, stride_tr, scale, PRECISION, SLAB_R,
                )  # fmt: skip
        if DROP_OUT:
            target = tl.where(_keep(seed, rm, rn, keep_min), target, 0.0)
        acc = acc + target if apart else target
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn * stride_bias, mask=in_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    return acc


@triton.jit
def _store_tile(acc, y_ptr, rm, rn, M, N, stride_ym, stride_yn):
    """Store the float32 `acc` as the `(rm, rn)` tile of `y`, in y's dtype."""
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _finish_tile(
    acc, t, b_ptr, t_ptr, bias_ptr, y_ptr, rm, rn, M, N, R,
    stride_bn, stride_br, stride_tm, stride_tr, stride_ym, stride_yn, stride_bias,
    scale, seed, keep_min,
    T_IN_REGISTERS: tl.constexpr, DROP_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, SLAB_R: tl.constexpr,
    STATIC_SLABS: tl.constexpr = False,
):  # fmt: skip
    """Store `acc + c · mask(t B[rn]ᵀ) + bias[rn]` (`_add_adapter`) as the `(rm, rn)` tile of
    `y`."""
    acc = _add_adapter(
        acc, t, b_ptr, t_ptr, bias_ptr, rm, rn, M, N, R,
        stride_bn, stride_br, stride_tm, stride_tr, stride_bias, scale, seed, keep_min,
        T_IN_REGISTERS, DROP_OUT, HAS_BIAS, PRECISION, BLOCK_R, SLAB_R, STATIC_SLABS,
    )  # fmt: skip
    _store_tile(acc, y_ptr, rm, rn, M, N, stride_ym, stride_yn)


@triton.jit
def _item_origin(item, num_m, num_n, GROUP_M: tl.constexpr, TILES_N: tl.constexpr):
    """`(row block, first N tile)` of work item `item` in grouped-M order: `GROUP_M` row
    blocks run side by side over their items of `TILES_N` consecutive N tiles, so programs
    that run together share W tiles in L2."""
    per_group = GROUP_M * tl.cdiv(num_n, TILES_N)
    first_m = (item // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (item % per_group) % group_rows
    first_n = ((item % per_group) // group_rows) * TILES_N
    return pid_m, first_n


@triton.jit
def _store_t(t, t_ptr, rm, M, R, stride_tm, stride_tr, BLOCK_R: tl.constexpr):
    """Store the float32 `t (BLOCK_M, BLOCK_R)` of rows `rm` (the first R columns)."""
    rr = tl.arange(0, BLOCK_R)
    t_ptrs = t_ptr + rm.to(tl.int64)[:, None] * stride_tm + rr[None, :] * stride_tr
    tl.store(t_ptrs, t, mask=(rm < M)[:, None] & (rr < R)[None, :])


@triton.autotune(
    configs=_INTERPRETER_GEMM if INTERPRET else GEMM_CONFIGS,
    key=["m_bucket", "N", "K", "BLOCK_R", "SHRINK", "EMIT_T", "DROP_IN", "DROP_OUT", "HAS_BIAS",
         "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_gemm},
    do_bench=_tune_bench,
)  # fmt: skip
@triton.jit(do_not_specialize=["seed", "keep_min"])
def lora_gemm_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, t_ptr, bias_ptr, y_ptr,
    M, N, K, R, m_bucket,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_tm, stride_tr, stride_ym, stride_yn, stride_bias,
    scale, seed, keep_min,
    SHRINK: tl.constexpr, EMIT_T: tl.constexpr, DROP_IN: tl.constexpr, DROP_OUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    SLAB_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, TILES_N: tl.constexpr,
):  # fmt: skip
    """`TILES_N` consecutive `(BLOCK_M, BLOCK_N)` tiles of `y` in one row block.

    Programs run in grouped-M order so W tiles are reused from L2. With `SHRINK` the first
    tile's K loop also computes `t` for the row block, which every tile of the program then
    uses: the shrink's extra tensor-core work is `BLOCK_R / (TILES_N · BLOCK_N)` of the GEMM's.
    """
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, first_n = _item_origin(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_n, GROUP_M, TILES_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = first_n * BLOCK_N + tl.arange(0, BLOCK_N)

    acc, t = _base_tile(
        x_ptr, w_ptr, a_ptr, rm, rn, M, N, K, R,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, seed, keep_min,
        SHRINK, DROP_IN, PRECISION, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if SHRINK and EMIT_T:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if first_n == 0:  # one program per row block writes t
            _store_t(t, t_ptr, rm, M, R, stride_tm, stride_tr, BLOCK_R)
    _finish_tile(
        acc, t, b_ptr, t_ptr, bias_ptr, y_ptr, rm, rn, M, N, R,
        stride_bn, stride_br, stride_tm, stride_tr, stride_ym, stride_yn, stride_bias,
        scale, seed, keep_min, SHRINK, DROP_OUT, HAS_BIAS, PRECISION, BLOCK_R, SLAB_R,
    )  # fmt: skip
    for step in range(1, TILES_N):
        if first_n + step < num_n:
            rn_next = (first_n + step) * BLOCK_N + tl.arange(0, BLOCK_N)
            acc, _ = _base_tile(
                x_ptr, w_ptr, a_ptr, rm, rn_next, M, N, K, R,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, seed, keep_min,
                False, False, PRECISION, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            _finish_tile(
                acc, t, b_ptr, t_ptr, bias_ptr, y_ptr, rm, rn_next, M, N, R,
                stride_bn, stride_br, stride_tm, stride_tr, stride_ym, stride_yn, stride_bias,
                scale, seed, keep_min, SHRINK, DROP_OUT, HAS_BIAS, PRECISION, BLOCK_R, SLAB_R,
            )  # fmt: skip


@triton.autotune(
    configs=_INTERPRETER_ROWS if INTERPRET else ROW_CONFIGS,
    key=["m_bucket", "K", "BLOCK_R", "k_per_split", "DROP", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_shrink},
    do_bench=_tune_bench,
)
@triton.jit(do_not_specialize=["seed", "keep_min"])
def shrink_kernel(
    x_ptr, a_ptr, t_ptr,
    M, K, R, m_bucket, k_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_ts, stride_tm, stride_tr,
    seed, keep_min,
    DROP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`t[split, rows, slab] = mask(x[rows, ks]) A[slab, ks]ᵀ` in float32 for one row block,
    one rank slab and the `k_per_split` columns `ks` of split `program_id(2)` (a multiple of
    every BLOCK_K, so the splits never overlap): the whole of `t` with one split, else the
    float32 partials the launcher sums (split-K, for few rows)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    k_first = split * k_per_split
    rk = k_first + tl.arange(0, BLOCK_K)
    in_m = rm < M
    in_r = rr < R
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk
    a_ptrs = a_ptr + rk.to(tl.int64)[:, None] * stride_ak + rr.to(tl.int64)[None, :] * stride_ar
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, min(k_per_split, K - k_first), BLOCK_K):
        in_k = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=in_k[:, None] & in_r[None, :], other=0.0)
        if DROP:
            x = tl.where(_keep(seed, rm, k0 + rk, keep_min), x, 0.0)
        t = tl.dot(x, a, t, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    t_ptrs = (
        t_ptr + split.to(tl.int64) * stride_ts + rm.to(tl.int64)[:, None] * stride_tm
        + rr[None, :] * stride_tr
    )  # fmt: skip
    tl.store(t_ptrs, t, mask=in_m[:, None] & in_r[None, :])


@triton.autotune(
    configs=_INTERPRETER_ROWS if INTERPRET else REDUCE_CONFIGS,
    key=["K", "BLOCK_R", "rows_per_split", "DROP", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_reduce},
    do_bench=_tune_bench,
)
@triton.jit(do_not_specialize=["seed", "keep_min"])
def reduce_rows_kernel(
    g_ptr, x_ptr, out_ptr,
    M, K, R, rows_per_split,
    stride_gm, stride_gr, stride_xm, stride_xk, stride_os, stride_or, stride_ok,
    scale, seed, keep_min,
    DROP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`out[split, slab, cols] = scale · Σ_{rows of split} g[m, slab]ᵀ mask(x)[m, cols]`.

    Accumulated in float32 and stored in `out`'s dtype, at any strides: float32 partials per
    split, or, with a single split, the gradient itself in its final dtype and layout.
    `rows_per_split` is a multiple of every BLOCK_M, so the splits never overlap. `g` is read
    in float32 (or x's dtype) and rounded to x's dtype for the tensor cores; a float32 `g`
    rounded to float16 first has each rank scaled by a power of two (`_fitted_exponents`).
    """
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_k = rk < K
    in_r = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    # a float32 `g` rounded to float16 has each rank (row) first scaled by 2^-e[rank]
    # (`_fitted_exponents`), e[rank] the running maximum over this split's row blocks so far:
    # `acc`'s row holds units of 2^e[rank], and is rescaled by 2^(e_old − e_new) (a power of
    # two, exact) where e grew
    fit = g_ptr.dtype.element_ty == tl.float32 and x_ptr.dtype.element_ty == tl.float16
    e = tl.zeros((BLOCK_R,), dtype=tl.int32)
    row0 = split * rows_per_split
    for m0 in range(row0, row0 + rows_per_split, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        in_m = rm < M
        g_ptrs = g_ptr + rr.to(tl.int64)[:, None] * stride_gr + rm.to(tl.int64)[None, :] * stride_gm
        g = tl.load(g_ptrs, mask=in_r[:, None] & in_m[None, :], other=0.0)
        x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk
        x = tl.load(x_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
        if DROP:
            x = tl.where(_keep(seed, rm, rk, keep_min), x, 0.0)
        if fit:
            grown = tl.maximum(e, _fitted_exponents(g, 1))
            if tl.max(grown - e, axis=0) > 0:  # 2^0 = 1 on the ranks that did not grow
                acc = acc * _power_of_2(e - grown)[:, None]
                e = grown
            g = g * _power_of_2(-e)[:, None]
        acc = tl.dot(g.to(x_ptr.dtype.element_ty), x, acc, input_precision=PRECISION)
    out_ptrs = (
        out_ptr + split.to(tl.int64) * stride_os + rr.to(tl.int64)[:, None] * stride_or
        + rk[None, :] * stride_ok
    )  # fmt: skip
    if fit:
        # 2^e first: `scale · 2^e` alone may overflow, and meet a zero sum (Inf · 0 = NaN)
        out = (acc * _power_of_2(e)[:, None] * scale).to(out_ptr.dtype.element_ty)
    else:
        out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptrs, out, mask=in_r[:, None] & in_k[None, :])


@triton.jit
def _down_tile(
    g, x_ptr, d_down_ptr, rm, rn, M, N, R,
    stride_xm, stride_xn, stride_ddr, stride_ddn, scale, seed, keep_min,
    DROP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Store `scale · g[rm]ᵀ mask(x[rm, rn])` `(R, BLOCK_N)` at columns `rn` of `d_down_ptr`
    (the gradient, or a row block's float32 partial); `g (BLOCK_M, BLOCK_R)` float32, rounded to
    x's dtype for the tensor cores (to float16 after scaling each rank by a power of two,
    `_fitted_exponents`, which the product's row takes back in float32)."""
    in_m = rm < M
    in_n = rn < N
    rr = tl.arange(0, BLOCK_R)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rn.to(tl.int64)[None, :] * stride_xn
    x = tl.load(x_ptrs, mask=in_m[:, None] & in_n[None, :], other=0.0)
    if DROP:
        x = tl.where(_keep(seed, rm, rn, keep_min), x, 0.0)
    if x_ptr.dtype.element_ty == tl.float16:  # g's ranks within float16 for the tensor cores
        e = _fitted_exponents(g, 0)  # per rank (column of g, row of the product)
        gs = (g * _power_of_2(-e)[None, :]).to(tl.float16)
        grad = tl.dot(tl.trans(gs), x, input_precision=PRECISION) * _power_of_2(e)[:, None]
    else:
        grad = tl.dot(tl.trans(g.to(x_ptr.dtype.element_ty)), x, input_precision=PRECISION)
    out_ptrs = d_down_ptr + rr[:, None] * stride_ddr + rn.to(tl.int64)[None, :] * stride_ddn
    out = (grad * scale).to(d_down_ptr.dtype.element_ty)  # after 2^e: see reduce_rows_kernel
    tl.store(out_ptrs, out, mask=(rr < R)[:, None] & in_n[None, :])


@triton.jit
def _backward_tile(
    acc, g, b_ptr, x_ptr, dx_ptr, d_down_ptr, rm, rn, M, N, R,
    stride_bn, stride_br, stride_xm, stride_xn, stride_dxm, stride_dxn,
    stride_ddr, stride_ddn, scale, seed, keep_min,
    NEED_DOWN: tl.constexpr, DROP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Store the `(rm, rn)` tile of `dx = acc + c · mask(g downᵀ[rn]ᵀ)` and, with `NEED_DOWN`,
    the columns `rn` of the row block's `d_down` term."""
    _finish_tile(
        acc, g, b_ptr, dx_ptr, dx_ptr, dx_ptr, rm, rn, M, N, R,
        stride_bn, stride_br, 0, 0, stride_dxm, stride_dxn, 0,
        scale, seed, keep_min, True, DROP, False, PRECISION, BLOCK_R, BLOCK_R,
    )  # fmt: skip
    if NEED_DOWN:
        _down_tile(
            g, x_ptr, d_down_ptr, rm, rn, M, N, R, stride_xm, stride_xn,
            stride_ddr, stride_ddn, scale, seed, keep_min, DROP, PRECISION, BLOCK_R,
        )  # fmt: skip


@triton.autotune(
    configs=_INTERPRETER_ONE_PASS if INTERPRET else ONE_PASS_CONFIGS,
    key=["N", "K", "BLOCK_M", "BLOCK_R", "NEED_DOWN", "NEED_UP", "DROP", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_one_pass},
    do_bench=_tune_bench,
)
@triton.jit(do_not_specialize=["seed", "keep_min"])
def lora_backward_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, x_ptr, t_ptr, dx_ptr, d_down_ptr, d_up_ptr,
    M, N, K, R,
    stride_dym, stride_dyk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_xm, stride_xn, stride_tm, stride_tr, stride_dxm, stride_dxn,
    stride_dds, stride_ddr, stride_ddn, stride_dus, stride_duk, stride_dur,
    scale, seed, keep_min,
    NEED_DOWN: tl.constexpr, NEED_UP: tl.constexpr, DROP: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES_N: tl.constexpr,
):  # fmt: skip
    """The backward in one launch: `N = in`, `K = out`, `R ≤ BLOCK_R`, any `M`.

    Operands as the `dx` GEMM sees them: `dy (M, K)`, `w = Wᵀ (N, K)`, `a = upᵀ (R, K)`,
    `b = downᵀ (N, R)`; and `x (M, N)`, the forward's float32 `t (M, R)`. A program takes a
    row block and `TILES_N` consecutive N tiles, in grouped-M order: the first tile's K loop
    also computes `g = dy up` (kept in registers), each tile stores `dx = dy W + c · mask(g
    down)` and, with `NEED_DOWN`, its columns of `d_down = c · gᵀ mask(x)` over the block's
    rows; with `NEED_UP` the programs of a row block then share the K steps of `d_up = c · dyᵀ
    t` over its rows (`(K, R)`, re-reading `dy` from L2). Row block `i` writes its `d_down`
    and `d_up` terms `i · stride_dds` and `i · stride_dus` into their buffers: float32 partials
    that the launcher sums, or, with one row block, the gradients themselves.
    """
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, first_n = _item_origin(tl.program_id(0), num_m, num_n, GROUP_M, TILES_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = first_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_down_block = d_down_ptr + pid_m.to(tl.int64) * stride_dds
    acc, g = _base_tile(
        dy_ptr, w_ptr, a_ptr, rm, rn, M, N, K, R,
        stride_dym, stride_dyk, stride_wn, stride_wk, stride_ar, stride_ak, seed, keep_min,
        True, False, PRECISION, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    _backward_tile(
        acc, g, b_ptr, x_ptr, dx_ptr, d_down_block, rm, rn, M, N, R,
        stride_bn, stride_br, stride_xm, stride_xn, stride_dxm, stride_dxn,
        stride_ddr, stride_ddn, scale, seed, keep_min, NEED_DOWN, DROP, PRECISION, BLOCK_R,
    )  # fmt: skip
    for step in range(1, TILES_N):
        if first_n + step < num_n:
            rn_next = (first_n + step) * BLOCK_N + tl.arange(0, BLOCK_N)
            acc, _ = _base_tile(
                dy_ptr, w_ptr, a_ptr, rm, rn_next, M, N, K, R,
                stride_dym, stride_dyk, stride_wn, stride_wk, stride_ar, stride_ak, seed,
                keep_min, False, False, PRECISION, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            _backward_tile(
                acc, g, b_ptr, x_ptr, dx_ptr, d_down_block, rm, rn_next, M, N, R,
                stride_bn, stride_br, stride_xm, stride_xn, stride_dxm, stride_dxn,
                stride_ddr, stride_ddn, scale, seed, keep_min, NEED_DOWN, DROP, PRECISION,
                BLOCK_R,
            )  # fmt: skip
    if NEED_UP:
        rr = tl.arange(0, BLOCK_R)
        in_m = rm < M
        t_ptrs = t_ptr + rm.to(tl.int64)[:, None] * stride_tm + rr[None, :] * stride_tr
        t = tl.load(t_ptrs, mask=in_m[:, None] & (rr < R)[None, :], other=0.0)
        # c · dyᵀ t as c · (dyᵀ (t / 2^e)) · 2^e, each rank (column) of t within float16; 2^e
        # before c, whose product alone may overflow and meet a zero sum (Inf · 0 = NaN)
        t_units = tl.full((BLOCK_R,), 1.0, dtype=tl.float32)
        if dy_ptr.dtype.element_ty == tl.float16:
            e = _fitted_exponents(t, 0)
            t = t * _power_of_2(-e)[None, :]
            t_units = _power_of_2(e)
        t = t.to(dy_ptr.dtype.element_ty)
        rk = tl.arange(0, BLOCK_K)
        sharing = tl.cdiv(num_n, TILES_N)  # the programs of this row block
        d_up_block = d_up_ptr + pid_m.to(tl.int64) * stride_dus
        for k0 in range((first_n // TILES_N) * BLOCK_K, K, sharing * BLOCK_K):
            in_k = (k0 + rk) < K
            dy_ptrs = (
                dy_ptr + rm.to(tl.int64)[:, None] * stride_dym
                + (k0 + rk).to(tl.int64)[None, :] * stride_dyk
            )  # fmt: skip
            dy = tl.load(dy_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
            grad = tl.dot(tl.trans(dy), t, input_precision=PRECISION)
            out_ptrs = (
                d_up_block + (k0 + rk).to(tl.int64)[:, None] * stride_duk
                + rr[None, :] * stride_dur
            )  # fmt: skip
            out = (grad * t_units[None, :] * scale).to(d_up_ptr.dtype.element_ty)
            tl.store(out_ptrs, out, mask=in_k[:, None] & (rr < R)[None, :])
