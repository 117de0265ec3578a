"""The persistent TMA variant of the two-phase LoRA GEMM (Hopper and later; see docs/kernels.md).

`lora_gemm_tma_kernel` computes what `lora_gemm_kernel` computes with the shrink outside
(`y = x Wᵀ + bias + c · mask(t Bᵀ)`, `t (M, R)` read from a float32 buffer in the epilogue),
but its base GEMM is the compute-bound shape's fast form:

- one program per SM walks the output tiles in grouped-M order (no tail of short-lived
  programs, and each program's next tile is launched without a scheduling gap);
- `x` and `W` tiles arrive by TMA (`cp.async.bulk.tensor`) through host-side tensor
  descriptors: one bulk copy per tile instead of per-thread address arithmetic, and the
  descriptor pads ragged edges with zeros, so the K loop has no masks.

TMA needs the last dimension of each operand contiguous, the other strides and the base
address 16-byte aligned (`tma_ready`); `W` may be stored `(N, K)` (the forward's weight) or
`(K, N)` (the dx GEMM's `weightᵀ`), a constexpr `W_N_MAJOR` choosing which. The epilogue is
`_lora_gemm._finish_tile` with `t` read `SLAB_R` columns at a time, so any rank works.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._lora_gemm import INTERPRET, _finish_tile, _fitting, _tune_bench

_TMA_ALIGN = 16  # bytes: TMA's alignment of the base address and of every non-last stride


def _set_tile_shapes(nargs: dict) -> None:
    """Autotune pre-hook: each descriptor's box is the config's tile."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bk, bn] if nargs["W_N_MAJOR"] else [bn, bk]


def _config(
    bm: int, bn: int, bk: int, group: int, warps: int, stages: int, flatten: bool = False
) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "FLATTEN": flatten}
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
    # (r ≤ EPILOGUE_SLAB_R only: the epilogue must be a single, unrolled t slab)
    _config(128, 128, 64, 8, 8, 4, flatten=True),
    _config(128, 256, 64, 8, 8, 3, flatten=True),
    _config(256, 128, 64, 8, 8, 3, flatten=True),
]
"""Candidate tiles of `lora_gemm_tma_kernel` on a GPU (pruned per call by `_prune_tma`)."""

_INTERPRETER_TMA = [_config(16, 32, 32, 2, 4, 1)]


def _prune_tma(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Row blocks no larger than the rows need (the smallest for few rows), flattened loops
    only where the epilogue is one `t` slab, then what fits shared memory and registers.

    Shared memory holds `num_stages` x and W tiles, or in the epilogue a `t` and a B slab and
    the float32 slab's layout change; registers hold the float32 accumulator (three with
    dropout on the output: the masked adapter term and Philox's state) and the `t` slab.
    """
    rows = max(16, int(named_args["m_bucket"]))
    size = named_args["x_desc"].base.element_size()
    slab = int(kwargs["SLAB_R"])
    one_slab = int(kwargs["BLOCK_R"]) <= slab
    accumulators = 3 if kwargs["DROP_OUT"] else 1
    smallest = min(c.kwargs["BLOCK_M"] for c in configs)
    by_rows = [c for c in configs if c.kwargs["BLOCK_M"] <= max(rows, smallest)
               and (one_slab or not c.kwargs["FLATTEN"])]  # fmt: skip

    def smem(c: triton.Config) -> int:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        pipeline = c.num_stages * (bm * bk + bk * bn) * size
        epilogue = (bm * slab + slab * bn) * size + bm * slab * 4
        if c.kwargs["FLATTEN"]:  # the flattened loop also buffers the t and B slabs ahead
            return pipeline + 3 * (bm * slab * 4 + slab * bn * size)
        return max(pipeline, epilogue)

    def regs(c: triton.Config) -> float:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return bm * (accumulators * bn + slab) / (32 * c.num_warps)

    return _fitting(by_rows, smem, regs)


@functools.cache
def _has_tma(device_index: int) -> bool:
    """Whether CUDA device `device_index` (-1: the current one) has TMA (compute capability 9+)."""
    index = torch.cuda.current_device() if device_index < 0 else device_index
    return torch.cuda.get_device_capability(index)[0] >= 9


def tma_ready(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `x (M, K)` and `w (N, K)` can be read by TMA: a Hopper-or-later GPU (or the
    interpreter), `x` row-major and `w` row- or column-major, 16-byte aligned, rows that do
    not overlap (a broadcast stride of 0 does not qualify)."""
    if x.is_cuda:
        if not _has_tma(x.device.index if x.device.index is not None else -1):
            return False
    elif not INTERPRET:
        return False
    size = x.element_size()

    def rows_apart(t: torch.Tensor, stride: int, width: int) -> bool:
        """Rows of `width` elements `stride` apart: aligned, and not overlapping."""
        aligned = t.data_ptr() % _TMA_ALIGN == 0 and (stride * size) % _TMA_ALIGN == 0
        return aligned and stride >= width

    cols = x.shape[1]
    if x.stride(1) != 1 or not rows_apart(x, x.stride(0), cols):
        return False
    if w.stride(1) == 1:
        return rows_apart(w, w.stride(0), cols)
    return w.stride(0) == 1 and rows_apart(w, w.stride(1), w.shape[0])


def descriptors(
    x: torch.Tensor, w: torch.Tensor
) -> tuple[TensorDescriptor, TensorDescriptor, bool]:
    """TMA descriptors of `x (M, K)` and `w (N, K)`, and whether `w` is stored N-major.

    The tile shapes are placeholders until the autotuner's pre-hook sets the chosen config's.
    An N-major `w` (a `(K, N)` row-major tensor seen transposed) is described as `(K, N)`.
    """
    w_n_major = w.stride(1) != 1
    stored = w.t() if w_n_major else w
    x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [16, 16])
    w_desc = TensorDescriptor(stored, list(stored.shape), list(stored.stride()), [16, 16])
    return x_desc, w_desc, w_n_major


@triton.autotune(
    configs=_INTERPRETER_TMA if INTERPRET else TMA_CONFIGS,
    key=["m_bucket", "N", "K", "BLOCK_R", "W_N_MAJOR", "DROP_OUT", "HAS_BIAS", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_tma},
    do_bench=_tune_bench,
)
@triton.jit(do_not_specialize=["seed"])
def lora_gemm_tma_kernel(
    x_desc, w_desc, b_ptr, t_ptr, bias_ptr, y_ptr,
    M, N, K, R, m_bucket,
    stride_bn, stride_br, stride_tm, stride_tr, stride_ym, stride_yn, stride_bias,
    scale, seed, p,
    W_N_MAJOR: tl.constexpr, DROP_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, SLAB_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
):  # fmt: skip
    """Every `(BLOCK_M, BLOCK_N)` tile of `y`, program `i` taking tiles `i, i + P, …` of the
    grouped-M order (`P` programs, one per SM): TMA-fed K loop, then the two-phase epilogue.

    `FLATTEN` (R ≤ BLOCK_R, the epilogue's slabs unrolled) lets Triton flatten the tile and
    K loops into one software pipeline, so a tile's epilogue overlaps the next tile's loads.
    """
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLATTEN):
        first_m = (tile // per_group) * GROUP_M
        group_rows = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % group_rows
        pid_n = (tile % per_group) // group_rows
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([off_m, k0])
            w = w_desc.load([k0, off_n]) if W_N_MAJOR else w_desc.load([off_n, k0]).T
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        _finish_tile(
            acc, acc, b_ptr, t_ptr, bias_ptr, y_ptr, rm, rn, M, N, R,
            stride_bn, stride_br, stride_tm, stride_tr, stride_ym, stride_yn, stride_bias,
            scale, seed, p, False, DROP_OUT, HAS_BIAS, PRECISION, BLOCK_R, SLAB_R, FLATTEN,
        )  # fmt: skip
