"""Launchers of the Triton LoRA-linear kernels: forward, backward and the dropout mask.

Same interface as `_lora_torch` (see there for the meaning of `t` and `c = scale / (1 − p)`);
`t` is kept in float32 here. Four regimes:

- `"fused"` computes the shrink inside the base GEMM's K loop, on the first of the `TILES_N`
  N tiles a program walks (one launch; only for r ≤ `MAX_BLOCK_R`);
- `"two_phase"` computes it once in `shrink_kernel` and joins it to the GEMM as extra K slabs
  in the epilogue (no extra tensor-core work per N tile, one more read of x);
- `"persistent"` is two-phase with the base GEMM in `lora_gemm_tma_kernel`: one program per
  SM, tiles fed by TMA (Hopper or later, TMA-aligned operands; elsewhere it runs two-phase);
- `"persistent_fused"` is fused in that kernel: the shrink in the K loop of the first of the
  `TILES_N` tiles of each work item (r ≤ `MAX_BLOCK_R`; without TMA it runs fused).

A fixed rule on the row count and the rank picks the regime (`pick_regime`, from what an H100
measured); `LOWRANK_LORA_REGIME` forces one, or `measure` times each once per shape instead
(`resolve_regime`). Every launch runs on the operands' CUDA device.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import types
from collections.abc import Callable

import torch
import triton

from lowrank._checks import require_choice
from lowrank.errors import ArgumentError

from . import _lora_torch
from ._lora_gemm import (
    EPILOGUE_SLAB_R,
    MAX_BLOCK_R,
    ONE_PASS_BLOCK_M,
    ONE_PASS_MAX_ROWS,
    _prune_gemm,
    _prune_one_pass,
    keep_mask_kernel,
    lora_backward_kernel,
    lora_gemm_kernel,
    reduce_rows_kernel,
    shrink_kernel,
)
from ._lora_gemm_tma import _prune_tma, descriptors, lora_gemm_tma_kernel, tma_ready
from ._lora_torch import keep_threshold

FUSED_MAX_ROWS = 1024
"""Largest row count for which the rule picks the fused regime (r ≤ `MAX_BLOCK_R`). On an H100
(bf16, 4096 × 4096, r = 16) fused was the fastest forward at 16 and 1024 rows (1.08× dense as
a graph replay at 16, 1.30× at 1024; persistent_fused 1.49× and 1.34×)."""

PERSISTENT_FUSED_MAX_ROWS = 4096
PERSISTENT_FUSED_MAX_RANK = 16
"""Above `FUSED_MAX_ROWS`, up to these rows and this rank, the rule picks persistent_fused
where TMA reads the operands: on the H100 it was the fastest at 4096³, r = 16 (1.13× dense,
persistent 1.17×, fused 1.39×), and its shrink's extra tensor-core work grows with r (at
8192 × 4096 × 14336, r = 64, it took 1.33× where persistent took 1.08×)."""

REGIMES = ("fused", "two_phase", "persistent", "persistent_fused")
"""The regimes of the forward and dx GEMMs (see the module docstring)."""

REGIME_ENV = "LOWRANK_LORA_REGIME"
"""Environment variable choosing the regime of every call: one of `REGIMES`, "auto" (the rule
of `pick_regime`) or "measure" (time each candidate once per shape and keep the fastest)."""

MEASURE = "measure"

BACKWARD_ENV = "LOWRANK_LORA_BACKWARD"
"""Environment variable choosing how the backward runs: "auto" (the default: the one-pass
backward for at most `ONE_PASS_AUTO_MAX_ROWS` rows, else the separate one), "separate" (the
`dx` GEMM, then one reduction launch per weight gradient) or "one_pass"
(`lora_backward_kernel`, every gradient in one launch, wherever `one_pass_fits`)."""

ONE_PASS_AUTO_MAX_ROWS = 16
"""Most rows for which "auto" runs the one-pass backward: on an H100 a bf16 training step of
16 × 4096 × 4096, r = 16, took 1.31× the dense frozen step with it and 1.45× without (CUDA
graph replays; `results/lora_linear-cuda-h100-2026-11-27.json`); more rows are untimed."""

BACKWARDS = ("auto", "separate", "one_pass")

EXPAND_ENV = "LOWRANK_LORA_EXPAND"
"""Environment variable choosing where the persistent regime's GEMM adds the adapter term
`c · mask(t Bᵀ)`: "first" (the default: before the K loop, as the accumulator's start, with
`y` stored by TMA) or "epilogue" (after the K loop). On an H100 the forward with the expand
first took 1.02× dense where the epilogue took 1.06× (8192 × 4096 × 14336, r = 64) and 1.10×
where it took 1.15× (4096³, r = 16; `results/lora_linear-cuda-h100-2026-11-27.json`)."""

EXPANDS = ("epilogue", "first")

_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None
"""CPython's dict behind `os.environ` on POSIX (encoded keys and values), which every
`os.environ` write updates: reading it is one dict lookup, where `os.environ.get` runs three
Python frames (about 0.8 µs a call on this project's CPU, paid per launch at decode sizes).
Writes through `os.environ` (and `monkeypatch.setenv`, `mock.patch.dict`) reach it; replacing
`os.environ` by another object does not."""

_ENCODED = {name: os.fsencode(name) for name in (REGIME_ENV, BACKWARD_ENV, EXPAND_ENV)}


def _env(name: str, default: str) -> str:
    """`os.environ.get(name, default)` for a name of `_ENCODED`, through `_ENVIRON` where it
    exists."""
    if _ENVIRON is None:
        return os.environ.get(name, default)
    value = _ENVIRON.get(_ENCODED[name])
    return default if value is None else os.fsdecode(value)


_INTERPRETER_PROGRAMS = 3  # persistent programs under the interpreter: each walks several tiles
_SHRINK_INSIDE = ("fused", "persistent_fused")  # regimes whose GEMM computes t in its K loop
_WITHOUT_TMA = {"persistent": "two_phase", "persistent_fused": "fused"}

_ROWS_PER_SPLIT_UNIT = 128  # a multiple of every BLOCK_M of `reduce_rows_kernel`
_MIN_ROWS_PER_SPLIT = 512

SPLIT_K_MAX_ROWS = 64
"""Most rows for which the shrink splits its K loop over programs (split-K): with few rows
its grid (row blocks × rank slabs) is a program or two, each reading all of `A`."""

_K_PER_SPLIT_UNIT = 256  # a multiple of every BLOCK_K of `shrink_kernel`
_MAX_K_SPLITS = 64


def _precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision for float32 operands, following torch's matmul setting: "tf32"
    (`torch.set_float32_matmul_precision("high")` or "medium"), else "tf32x3" (three tf32
    products that keep float32's accuracy on the tensor cores; its registers spill in most
    tiles, so "auto" sends such calls to cuBLAS and only `backend="triton"` runs it);
    16-bit operands ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def _next_power_of_2(n: int) -> int:
    """The least power of two ≥ `n` (≥ 1); plain Python, as this runs on every call."""
    return 1 << max(n - 1, 0).bit_length()


def _block_r(rank: int) -> int:
    """The rank slab: a power of two ≥ 16 (`tl.dot`'s smallest K), at most `MAX_BLOCK_R`."""
    return min(MAX_BLOCK_R, max(16, _next_power_of_2(rank)))


def slab_r(block_r: int, shrink_inside: bool) -> int:
    """Rank columns the GEMM's epilogue takes per step: all of `t` when it is in registers
    (fused), else `EPILOGUE_SLAB_R` columns of the float32 buffer at a time (two-phase)."""
    return block_r if shrink_inside else min(block_r, EPILOGUE_SLAB_R)


def static_slabs(rank: int, shrink_inside: bool, first: bool) -> bool:
    """Whether the persistent kernel unrolls `t`'s slabs (`STATIC_SLABS`): without the fused
    shrink, for every r ≤ `MAX_BLOCK_R` with the expand first, else for a single slab."""
    if shrink_inside:
        return False
    block_r = _block_r(rank)
    return rank <= MAX_BLOCK_R if first else block_r <= slab_r(block_r, False)


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the operands' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _m_bucket(rows: int) -> int:
    return min(_next_power_of_2(rows), 4096)


def _check_regime(regime: str, source: str = "regime", measure: bool = False) -> str:
    """`regime` if it is "auto", one of `REGIMES` or (where `measure` allows) "measure"."""
    return require_choice(source, regime, ("auto", *((MEASURE,) if measure else ()), *REGIMES))


def pick_regime(
    rows: int,
    rank: int,
    regime: str = "auto",
    tma: bool = False,
    fits: Callable[[str], bool] | None = None,
) -> str:
    """The rule: `"fused"` for at most `FUSED_MAX_ROWS` rows and r ≤ `MAX_BLOCK_R`; else, where
    the operands are `tma` ready, `"persistent_fused"` for at most `PERSISTENT_FUSED_MAX_ROWS`
    rows and r ≤ `PERSISTENT_FUSED_MAX_RANK`, `"persistent"` otherwise; else `"two_phase"`.
    A fused regime for which `fits(regime)` is false (its pruner keeps only a fallback tile,
    as for float32 at r = 128) gives way to `"persistent"` (`tma`) or `"two_phase"`. A forced
    regime is returned as it is.

    A forced fused regime with a rank over `MAX_BLOCK_R` is an error: the K loop holds the
    whole `(BLOCK_M, r)` shrink accumulator and a `(BLOCK_K, r)` A tile per pipeline stage.
    """
    _check_regime(regime)
    if regime in _SHRINK_INSIDE and rank > MAX_BLOCK_R:
        raise ArgumentError(f"the {regime} regime takes r <= {MAX_BLOCK_R}, got r = {rank}")
    if regime != "auto":
        return regime
    unfused = "persistent" if tma else "two_phase"
    if rows <= FUSED_MAX_ROWS and rank <= MAX_BLOCK_R:
        rule = "fused"
    elif tma and rows <= PERSISTENT_FUSED_MAX_ROWS and rank <= PERSISTENT_FUSED_MAX_RANK:
        rule = "persistent_fused"
    else:
        return unfused
    return rule if fits is None or fits(rule) else unfused


@functools.cache
def _fused_fits(
    regime: str,
    m_bucket: int,
    out_features: int,
    dtype: torch.dtype,
    w_n_major: bool,
    block_r: int,
    drop_in: bool,
    drop_out: bool,
    precision: str,
) -> bool:
    """Whether the pruner of `regime`'s kernel (a fused one) keeps a tile that fits the device,
    rather than only its fallback, for a GEMM of these sizes and flags."""
    probe = torch.empty(0, dtype=dtype)
    flags = {"BLOCK_R": block_r, "SHRINK": True, "SLAB_R": block_r, "DROP_IN": drop_in,
             "DROP_OUT": drop_out, "PRECISION": precision, "EXPAND_FIRST": False,
             "STATIC_SLABS": False, "Y_DESC": y_by_tma(False, dtype.itemsize)}  # fmt: skip
    if regime == "persistent_fused":
        x_desc = types.SimpleNamespace(base=probe)
        named = {"m_bucket": m_bucket, "N": out_features, "x_desc": x_desc}
        return _real_tile(_prune_tma(lora_gemm_tma_kernel.configs, named, **flags))
    named = {"m_bucket": m_bucket, "N": out_features, "x_ptr": probe,
             "stride_wn": 1 if w_n_major else 2}  # fmt: skip
    return _real_tile(_prune_gemm(lora_gemm_kernel.configs, named, **flags))


def y_by_tma(first: bool, element_size: int) -> bool:
    """Whether the persistent kernel stores a `y` of `element_size`-byte values by TMA (where
    `tma_writable`): with the expand first always; after the K loop (the epilogue forms) in
    16-bit dtypes only, since a float32 half tile staged for the store (16 KB) would take
    persistent_fused's one full float32 tile, 64×128×64 in four stages (213,024 B on sm_90a),
    past the shared-memory budget, leaving only a three-stage fallback."""
    return first or element_size == 2


def shrink_fusable(w: torch.Tensor) -> bool:
    """Whether a kernel that computes the shrink in its K loop (the fused regimes and the
    one-pass backward) may read the GEMM operand `w (N, K)`: where `w` is N-major (the `dx`
    GEMM's `Wᵀ`, or the forward's `W` stored transposed), only if its row stride is a multiple
    of 16 elements and its start 16-byte aligned, the variant Triton compiles for such
    arguments. On an H100 (Triton 3.6) those K loops read shared memory out of range or
    returned a wrong `dx` at every fp16 `in` of 122 to 127 tried, in 37 and 64 rows, while
    `in = 128` and the unfused kernels on the same operands were right
    (`benchmarks/probe_shapes.py`); the other variants are declined alike, float32 too (it
    passed at `in = 123`), since no run has shown them right."""
    if w.stride(0) != 1:
        return True
    return w.stride(1) % 16 == 0 and w.data_ptr() % 16 == 0


def _real_tile(kept: list[triton.Config]) -> bool:
    """Whether a pruner kept a config of its own list, not the fallback it makes when none
    fits."""
    return not any(getattr(c, "fallback", False) for c in kept)


_chosen_configs: dict[tuple, triton.Config] = {}
_tuning = threading.Lock()


def _launch(kernel, grid: Callable[[dict], tuple], key: tuple, *args, **constexprs) -> None:
    """`kernel[grid](*args, **constexprs)` for an autotuned `kernel`, through Triton's
    autotuner only on the first call per `key`; later calls launch the config it chose.

    Triton's autotuner rebuilds its cache key from every argument on every call, tens of µs
    of Python for these 30-45-argument kernels (more than the GPU work at decode sizes).
    `key` must hold every runtime value the kernel's autotune key and config pruner read
    (sizes, dtypes, W's layout); the constexprs are added to it here. The choice is kept as
    the candidate of `kernel.configs` it equals (a disk-cached tuning comes back as a new but
    equal `Config`) and used only while it is still one of them; a pruner's fallback with its
    stages cut equals none, so such launches always go through the autotuner, as does every
    launch after the candidates change.
    """
    full_key = (kernel, *key, *constexprs.values())
    config = _chosen_configs.get(full_key)
    if config is None or not any(config is c for c in kernel.configs):
        with _tuning:  # `best_config` is the autotuner's state: read it before another call
            kernel[grid](*args, **constexprs)
            chosen = kernel.best_config
            member = next((c for c in kernel.configs if c == chosen), None)
            if member is not None:
                _chosen_configs[full_key] = member
        return
    options = config.all_kwargs()
    if config.pre_hook is not None:
        named = dict(zip(kernel.arg_names, args, strict=False))  # constexprs come by name
        config.pre_hook({**named, **constexprs, **options})
    kernel.fn[grid](*args, **constexprs, **options)


def expand_first() -> bool:
    """Whether the persistent regime adds the adapter term first (`$LOWRANK_LORA_EXPAND`,
    "first" unless set)."""
    return require_choice(EXPAND_ENV, _env(EXPAND_ENV, "first"), EXPANDS) == "first"


def _measurable(x: torch.Tensor) -> bool:
    """Whether regimes can be timed now: compiled kernels, and no CUDA graph being captured."""
    return x.is_cuda and not torch.cuda.is_current_stream_capturing()


def _time_ms(fn: Callable[[], object]) -> float:
    """Median time of `fn` in ms (a short `do_bench`: this runs once per shape key)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))


@functools.cache
def _candidates(fused: bool, tma: bool) -> tuple[str, ...]:
    """The regimes "measure" times: the fused ones if they can run (`fused`: r ≤
    `MAX_BLOCK_R` and a `w` they may read, `shrink_fusable`);
    the persistent ones if the operands are `tma` ready, else two-phase (the persistent
    regime's pointer-kernel twin: on an H100 it lost to another regime at every point timed,
    by 1.2× to 3.6×)."""
    without = ("two_phase",) if tma else tuple(_WITHOUT_TMA)
    return tuple(r for r in REGIMES if (fused or r not in _SHRINK_INSIDE)
                 and r not in without)  # fmt: skip


_measured_regimes: dict[tuple, str] = {}
_measuring = threading.Lock()


def resolve_regime(
    rows: int,
    rank: int,
    regime: str,
    x: torch.Tensor,
    key: tuple,
    run: Callable[[str], object],
    tma: bool = False,
    fits: Callable[[str], bool] | None = None,
    fusable: bool = True,
) -> str:
    """The regime to run: the caller's, else `$LOWRANK_LORA_REGIME`, else `pick_regime`'s rule.

    The rule is fixed, so every process runs the same kernels for a shape and no first call
    pays for timing. `LOWRANK_LORA_REGIME=measure` instead times every regime that applies
    (`_candidates`: the fused ones for r ≤ `MAX_BLOCK_R`, the persistent ones where the
    operands are `tma` ready, else two-phase) once per `key` (dtype, M bucket, N, K, rank slab,
    W's layout and the kernel flags; `tma` is added to it) and keeps the fastest, as Triton's
    autotuner does for tiles; where nothing can be timed (CPU, a CUDA graph capture) the rule
    decides. A forced persistent regime without `tma` runs its pointer-kernel twin (two-phase
    or fused). `fits` is the rule's (see `pick_regime`); without `fusable` (`shrink_fusable`)
    the fused regimes are not measured.
    """
    if regime == "auto":
        regime = _check_regime(_env(REGIME_ENV, "auto"), REGIME_ENV, measure=True)
    if regime not in ("auto", MEASURE):
        regime = pick_regime(rows, rank, regime, tma)  # checks r against a fused regime
        return regime if tma else _WITHOUT_TMA.get(regime, regime)
    if regime == "auto":
        return pick_regime(rows, rank, regime, tma, fits)
    candidates = _candidates(rank <= MAX_BLOCK_R and fusable, tma)
    if len(candidates) == 1:
        return candidates[0]
    key = (*key, tma)  # the same shape with TMA-unready operands has fewer candidates
    measured = _measured_regimes.get(key)
    if measured in candidates:  # also under graph capture: replay it
        return measured
    if not _measurable(x):
        return pick_regime(rows, rank, "auto", tma, fits)
    with _measuring:
        if key not in _measured_regimes:
            times = {n: _time_ms(lambda n=n: run(n)) for n in candidates}
            _measured_regimes[key] = min(times, key=times.__getitem__)
    return _measured_regimes[key]


def k_splits(rows: int, cols: int) -> tuple[int, int]:
    """`(splits, columns per split)` of the shrink's K loop: for at most `SPLIT_K_MAX_ROWS`
    rows, up to `_MAX_K_SPLITS` splits of `_K_PER_SPLIT_UNIT` columns or a multiple of it;
    otherwise one split."""
    if rows > SPLIT_K_MAX_ROWS or cols == 0:
        return 1, max(cols, 1)
    splits = max(1, min(triton.cdiv(cols, _K_PER_SPLIT_UNIT), _MAX_K_SPLITS))
    per_split = _K_PER_SPLIT_UNIT * triton.cdiv(cols, _K_PER_SPLIT_UNIT * splits)
    return triton.cdiv(cols, per_split), per_split


def _shrink(x: torch.Tensor, a: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """`mask(x) aᵀ` in float32: `x (M, K)`, `a (R, K)` (any strides) → `(M, R)`.

    Few rows split K over programs (`k_splits`): each writes a float32 partial, and torch sums
    them in a fixed order, so `t` is the same on every run.
    """
    rows, cols = x.shape
    rank = a.shape[0]
    t = torch.empty((rows, rank), device=x.device, dtype=torch.float32)
    splits, per_split = k_splits(rows, cols)
    target = t.unsqueeze(0) if splits == 1 else t.new_empty((splits, rows, rank))
    block_r = _block_r(rank)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(rank, block_r), splits)  # noqa: E731
    key = (_m_bucket(rows), cols, per_split, x.dtype, a.dtype)
    _launch(
        shrink_kernel, grid, key,
        x, a, target, rows, cols, rank, _m_bucket(rows), per_split,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1),
        target.stride(0), target.stride(1), target.stride(2),
        seed, keep_threshold(p),
        DROP=p > 0, PRECISION=_precision(x.dtype), BLOCK_R=block_r,
    )  # fmt: skip
    if splits > 1:
        torch.sum(target, 0, out=t)
    return t


def _gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    c: float,
    dropout: tuple[int, float, str],
    regime: str,
    emit_t: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`y = x wᵀ + bias + c · mask(t bᵀ)` with `t = mask(x) aᵀ`, one kernel (plus the shrink).

    Views of any strides: `x (M, K)`, `w (N, K)`, `a (R, K)`, `b (N, R)`. `dropout = (seed, p,
    where)`: the mask of the `(M, in)` activation, applied to the shrink's input (`where="in"`,
    `in = K`) or to the adapter term of `y` (`"out"`, `in = N`). Returns `y` and, if `emit_t`,
    `t`.
    """
    rows, cols = x.shape
    out_features, rank = b.shape
    first = expand_first()  # read (and checked) on every call, whichever regime runs
    fusable = shrink_fusable(w)

    tma = tma_ready(x, w)

    def run(chosen: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if chosen in _SHRINK_INSIDE and not fusable:  # a forced fused regime: its unfused twin
            chosen = "persistent" if tma and chosen == "persistent_fused" else "two_phase"
        return _gemm_in_regime(x, w, a, b, bias, c, dropout, chosen, emit_t, first)

    _, p, where = dropout
    precision, m_bucket, block_r = _precision(x.dtype), _m_bucket(rows), _block_r(rank)
    key = (x.device, x.dtype, precision, m_bucket, out_features, cols, block_r,
           w.stride(1) != 1, where, p > 0, bias is not None, emit_t, first, fusable)  # fmt: skip

    def fits(fused: str) -> bool:
        drop_in, drop_out = p > 0 and where == "in", p > 0 and where == "out"
        return fusable and _fused_fits(fused, m_bucket, out_features, x.dtype, w.stride(0) == 1,
                                       block_r, drop_in, drop_out, precision)  # fmt: skip

    return run(resolve_regime(rows, rank, regime, x, key, run, tma, fits, fusable))


def _gemm_in_regime(
    x: torch.Tensor,
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    c: float,
    dropout: tuple[int, float, str],
    regime: str,
    emit_t: bool,
    first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_gemm` in the given regime, one of `REGIMES` (the persistent ones need `tma_ready`);
    `first`: the persistent regime adds the adapter term before its K loop (`expand_first`)."""
    rows, cols = x.shape
    out_features, rank = b.shape
    seed, p, where = dropout
    y = torch.empty((rows, out_features), device=x.device, dtype=x.dtype)
    shrink_inside = regime in _SHRINK_INSIDE
    block_r = _block_r(rank)
    if shrink_inside:
        t = torch.empty((rows, rank), device=x.device, dtype=torch.float32) if emit_t else None
    else:
        t = _shrink(x, a, seed, p if where == "in" else 0.0)
    if regime in _WITHOUT_TMA:
        _persistent_gemm(x, w, a, b, t, bias, y, c, dropout, shrink_inside, first)
        return y, t
    t_arg = t if t is not None else _no_t(y)
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(rows, meta["BLOCK_M"])
        * triton.cdiv(triton.cdiv(out_features, meta["BLOCK_N"]), meta["TILES_N"]),
    )
    key = (_m_bucket(rows), out_features, cols, x.dtype, w.stride(0) == 1)
    _launch(
        lora_gemm_kernel, grid, key,
        x, w, a, b, t_arg, bias if bias is not None else y, y,
        rows, out_features, cols, rank, _m_bucket(rows),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), t_arg.stride(0), t_arg.stride(1), y.stride(0), y.stride(1),
        bias.stride(0) if bias is not None else 0,
        c, seed, keep_threshold(p),
        SHRINK=shrink_inside, EMIT_T=shrink_inside and emit_t,
        DROP_IN=p > 0 and where == "in" and shrink_inside, DROP_OUT=p > 0 and where == "out",
        HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype), BLOCK_R=block_r,
        SLAB_R=slab_r(block_r, shrink_inside),
    )  # fmt: skip
    return y, t


def _no_t(y: torch.Tensor) -> torch.Tensor:
    """A `(1, 1)` float32 stand-in for `t` where the kernel neither reads nor writes it (the
    fused regimes in inference): one per device, not an allocation per call. A tensor
    subclass (a fake tensor of `torch.export`, say) gets its own, never the cached one."""
    if type(y) is not torch.Tensor:
        return y.new_empty((1, 1), dtype=torch.float32)
    return _cached_no_t(y.device)


@functools.cache
def _cached_no_t(device: torch.device) -> torch.Tensor:
    return torch.empty((1, 1), device=device, dtype=torch.float32)


def _programs(device: torch.device) -> int:
    """Persistent programs: one per SM (a few under the interpreter)."""
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _persistent_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    t: torch.Tensor | None,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    c: float,
    dropout: tuple[int, float, str],
    shrink_inside: bool,
    first: bool = False,
) -> None:
    """`y = x wᵀ + bias + c · mask(t bᵀ)` by the persistent TMA kernel, into `y`.

    `shrink_inside`: `t = mask(x) aᵀ` is computed in the K loop (and stored into `t` if it is
    given); otherwise `t (M, R)` is the float32 buffer the shrink kernel wrote, and with
    `first` its term starts the accumulator before the K loop. `y` is stored by TMA where
    `y_by_tma` and `tma_writable`, else by pointer. `dropout` as in `_gemm`.
    """
    rows, cols = x.shape
    out_features, rank = b.shape
    seed, p, where = dropout
    first = first and not shrink_inside
    y_store = y if y_by_tma(first, y.element_size()) else None
    x_desc, w_desc, y_desc, w_n_major = descriptors(x, w, y_store)
    y_tma = y_desc is not x_desc
    programs = _programs(x.device)
    block_r = _block_r(rank)
    slab = slab_r(block_r, shrink_inside)
    t_arg = t if t is not None else _no_t(y)
    items = lambda meta: (  # noqa: E731
        triton.cdiv(rows, meta["BLOCK_M"])
        * triton.cdiv(triton.cdiv(out_features, meta["BLOCK_N"]), meta["TILES_N"])
    )
    grid = lambda meta: (min(programs, items(meta)),)  # noqa: E731
    key = (_m_bucket(rows), out_features, cols, x.dtype)
    _launch(
        lora_gemm_tma_kernel, grid, key,
        x_desc, w_desc, y_desc, a, b, t_arg, bias if bias is not None else y, y,
        rows, out_features, cols, rank, _m_bucket(rows),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), t_arg.stride(0), t_arg.stride(1),
        y.stride(0), y.stride(1), bias.stride(0) if bias is not None else 0,
        c, seed, keep_threshold(p),
        W_N_MAJOR=w_n_major, SHRINK=shrink_inside, EMIT_T=shrink_inside and t is not None,
        DROP_IN=p > 0 and where == "in" and shrink_inside, DROP_OUT=p > 0 and where == "out",
        HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype), BLOCK_R=block_r,
        SLAB_R=slab, EXPAND_FIRST=first,
        STATIC_SLABS=static_slabs(rank, shrink_inside, first),
        Y_DESC=y_tma,
    )  # fmt: skip


def row_splits(rows: int) -> tuple[int, int]:
    """`(splits, rows per split)` of the weight-gradient reduction over `rows` rows: up to 64
    splits of at least `_MIN_ROWS_PER_SPLIT` rows, each a multiple of 128 rows."""
    splits = max(1, min(triton.cdiv(rows, _MIN_ROWS_PER_SPLIT), 64))
    per_split = _ROWS_PER_SPLIT_UNIT * triton.cdiv(rows, _ROWS_PER_SPLIT_UNIT * splits)
    return triton.cdiv(rows, per_split), per_split


def _reduce_rows(
    g: torch.Tensor, x: torch.Tensor, c: float, seed: int, p: float, out: torch.Tensor
) -> torch.Tensor:
    """`out = c · gᵀ mask(x)` `(R, K)` for `g (M, R)`, `x (M, K)`; mask only if `p > 0`.

    `out` may have any strides and float dtype. Rows that take one split are reduced straight
    into `out` (one launch); more splits write float32 partials that torch sums into it.
    """
    rows, cols = x.shape
    rank = g.shape[1]
    splits, per_split = row_splits(rows)
    if splits == 1:
        target = out.unsqueeze(0)
    else:
        target = torch.empty((splits, rank, cols), device=x.device, dtype=torch.float32)
    block_r = _block_r(rank)
    grid = lambda meta: (triton.cdiv(cols, meta["BLOCK_K"]), splits, triton.cdiv(rank, block_r))  # noqa: E731
    key = (cols, per_split, g.dtype, x.dtype, target.dtype)
    _launch(
        reduce_rows_kernel, grid, key,
        g, x, target, rows, cols, rank, per_split,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1),
        target.stride(0), target.stride(1), target.stride(2),
        c, seed, keep_threshold(p),
        DROP=p > 0, PRECISION=_precision(x.dtype), BLOCK_R=block_r,
    )  # fmt: skip
    if splits > 1:
        out.copy_(target.sum(0))
    return out


SPLIT_MAX_SCALE = 2.0**64
"""Largest `|c|` (`c = scale / (1 − p)`) the kernels take in bfloat16 and float32. Their expand
splits `c` as `c_t · 2^e` with `e = ⌈log₂|c|⌉`, `2^e` on the second operand (`up`; `down` in
`dx`), which stays finite for entries below `2^(128 − e)`: up to `2^64` here. A larger `c` (a
scale near float32's limit) runs the torch path instead, which scales the product and so
gives every output that is finite. float16 moves `e` per tile to keep both operands finite."""


def _unsplittable(c: float, dtype: torch.dtype) -> bool:
    """Whether `c` is beyond what the bfloat16 and float32 kernels' scale split takes."""
    return abs(c) > SPLIT_MAX_SCALE and dtype != torch.float16


def _in_memory(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """`tensors` with their values in memory, as the kernels read them: a negative view (the
    imaginary part of a conjugate, `z.conj().imag`, whose memory holds the negated values and
    whose sign torch applies lazily) is copied with the sign applied; a ZeroTensor (the output
    gradient autograd passes back through `torch.sgn`, say), which has no memory, is made a
    tensor of zeros, as torch's own ops treat it (`0 · Inf` is NaN there too); others stay as
    they are."""
    return tuple(_materialised(t) for t in tensors)


def _materialised(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` as `_in_memory` passes it to the kernels."""
    if t is None:
        return None
    if t._is_zerotensor():
        return torch.zeros(t.shape, dtype=t.dtype, device=t.device)
    return t.resolve_neg() if t.is_neg() else t


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    p: float,
    seed: int,
    keep_t: bool,
    regime: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`y (M, out)` and, if `keep_t`, `t = mask(x) downᵀ (M, r)` in float32."""
    if _unsplittable(scale / (1.0 - p), x.dtype):
        y, t = _lora_torch.forward(x, weight, down, up, bias, scale, p, seed, keep_t)
        return y, t.float() if t is not None else None
    x, weight, down, up, bias = _in_memory(x, weight, down, up, bias)
    dropout = (seed, p, "in")
    with _on_device(x):
        y, t = _gemm(x, weight, down, up, bias, scale / (1.0 - p), dropout, regime, keep_t)
    return y, t if keep_t else None


ONE_PASS_MAX_PARTIAL_BYTES = 64 * 2**20
"""Most bytes of float32 partials (`row blocks × r × (in + out) × 4`) the one-pass backward
writes; a larger backward keeps the separate reductions."""

_ONE_PASS_GROUP_M = 8  # row blocks side by side in the one-pass grid (W tiles shared in L2)


def _one_pass_block_m(rows: int) -> int:
    """Rows per row block of the one-pass backward: all of them up to 64, else 64."""
    return max(16, _next_power_of_2(rows)) if rows <= ONE_PASS_BLOCK_M else ONE_PASS_BLOCK_M


def backward_choice() -> str:
    """`$LOWRANK_LORA_BACKWARD` ("auto" unless set), checked against `BACKWARDS`."""
    return require_choice(BACKWARD_ENV, _env(BACKWARD_ENV, "auto"), BACKWARDS)


def one_pass_applies(
    rows: int, rank: int, in_features: int, out_features: int, need_x: bool
) -> bool:
    """Whether `$LOWRANK_LORA_BACKWARD` asks for the one-pass backward ("one_pass", or "auto"
    with at most `ONE_PASS_AUTO_MAX_ROWS` rows) and it can run: `dx` is needed, at most
    `ONE_PASS_MAX_ROWS` rows, `g` fits in registers (r ≤ `MAX_BLOCK_R`), and the float32
    partials of several row blocks stay within `ONE_PASS_MAX_PARTIAL_BYTES`."""
    choice = backward_choice()
    wanted = choice == "one_pass" or (choice == "auto" and rows <= ONE_PASS_AUTO_MAX_ROWS)
    return wanted and need_x and one_pass_fits(rows, rank, in_features, out_features)


def one_pass_fits(rows: int, rank: int, in_features: int, out_features: int) -> bool:
    """Whether `lora_backward_kernel` takes this backward: at most `ONE_PASS_MAX_ROWS` rows,
    r ≤ `MAX_BLOCK_R`, and partials within `ONE_PASS_MAX_PARTIAL_BYTES`."""
    if rows > ONE_PASS_MAX_ROWS or rank > MAX_BLOCK_R:
        return False
    blocks = triton.cdiv(rows, _one_pass_block_m(rows))
    partials = 0 if blocks == 1 else blocks * rank * (in_features + out_features) * 4
    return partials <= ONE_PASS_MAX_PARTIAL_BYTES


@functools.cache
def _one_pass_tiles_fit(
    rows: int,
    rank: int,
    in_features: int,
    dtype: torch.dtype,
    w_n_major: bool,
    drop: bool,
    precision: str,
) -> bool:
    """Whether `lora_backward_kernel`'s pruner keeps a tile that fits the device, rather than
    only its fallback (float32 in 64-row blocks, say): else the separate backward runs."""
    flags = {"BLOCK_M": _one_pass_block_m(rows), "BLOCK_R": _block_r(rank), "DROP": drop,
             "PRECISION": precision}  # fmt: skip
    named = {"N": in_features, "dy_ptr": torch.empty(0, dtype=dtype),
             "stride_wn": 1 if w_n_major else 2}  # fmt: skip
    return _real_tile(_prune_one_pass(lora_backward_kernel.configs, named, **flags))


def _one_pass_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    t: torch.Tensor | None,
    c: float,
    seed: int,
    p: float,
    need_down: bool,
    need_up: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`(dx, d_down, d_up)` by `lora_backward_kernel`: `dy (M, out)`, `x (M, in)`, `t (M, r)`
    float32 (needed for `d_up`); any strides. One row block writes the weight gradients
    directly; several write float32 partials `(blocks, r, in)` and `(blocks, out, r)`, summed
    here in a fixed order (deterministic)."""
    rows, out_features = dy.shape
    in_features = x.shape[1]
    rank = down.shape[0]
    block_m = _one_pass_block_m(rows)
    blocks = triton.cdiv(rows, block_m)
    dx = torch.empty((rows, in_features), device=dy.device, dtype=dy.dtype)
    d_down = down.new_empty(down.shape) if need_down else None
    d_up = up.new_empty(up.shape) if need_up else None

    def target(grad: torch.Tensor | None) -> torch.Tensor:
        """Where the kernel writes `grad`: itself (one block), float32 partials, or nowhere."""
        if grad is None:
            return dx.unsqueeze(0)  # a stand-in, never written
        if blocks == 1:
            return grad.unsqueeze(0)
        return torch.empty((blocks, *grad.shape), device=dy.device, dtype=torch.float32)

    dd, du = target(d_down), target(d_up)
    t_arg = t if t is not None else _no_t(dx)
    w, a, b = weight.t(), up.t(), down.t()  # the dx GEMM's Wᵀ, shrink and expand: views
    grid = lambda meta: (  # noqa: E731
        blocks * triton.cdiv(triton.cdiv(in_features, meta["BLOCK_N"]), meta["TILES_N"]),
    )
    key = (in_features, out_features, dy.dtype, w.stride(0) == 1)
    _launch(
        lora_backward_kernel, grid, key,
        dy, w, a, b, x, t_arg, dx, dd, du,
        rows, in_features, out_features, rank,
        dy.stride(0), dy.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), x.stride(0), x.stride(1), t_arg.stride(0), t_arg.stride(1),
        dx.stride(0), dx.stride(1), dd.stride(0), dd.stride(1), dd.stride(2),
        du.stride(0), du.stride(1), du.stride(2),
        c, seed, keep_threshold(p),
        NEED_DOWN=need_down, NEED_UP=need_up, DROP=p > 0, PRECISION=_precision(dy.dtype),
        BLOCK_R=_block_r(rank), BLOCK_M=block_m, GROUP_M=_ONE_PASS_GROUP_M,
    )  # fmt: skip
    if blocks > 1:
        for grad, partials in ((d_down, dd), (d_up, du)):
            if grad is not None:
                grad.copy_(partials.sum(0))
    return dx, d_down, d_up


def _separate_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    t: torch.Tensor | None,
    c: float,
    seed: int,
    p: float,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`(dx, d_down, d_up)` by the `dx` GEMM (which also yields `g = dy up`), then one
    reduction launch per weight gradient; each only where `needs` says so."""
    need_x, _, need_down, need_up, _ = needs
    dx = g = d_down = d_up = None
    if need_x:
        dropout = (seed, p, "out")
        dx, g = _gemm(dy, weight.t(), up.t(), down.t(), None, c, dropout, "auto", need_down)
    if need_down:
        if g is None:
            g = _shrink(dy, up.t(), seed, 0.0)
        d_down = _reduce_rows(g, x, c, seed, p, down.new_empty(down.shape))
    if need_up:  # reduced as `(r, out)` into the transposed view of a row-major `(out, r)`
        d_up = _reduce_rows(t, dy, c, seed, 0.0, up.new_empty(up.shape).t()).t()
    return dx, d_down, d_up


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    t: torch.Tensor | None,
    scale: float,
    p: float,
    seed: int,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients `(dx, d_weight, d_down, d_up, d_bias)`, each only where `needs` says so.

    `dx = dy W + c · mask(g down)` runs the forward's GEMM kernel with `dy` as the activation,
    `Wᵀ` as the weight, `upᵀ` as the shrink and `downᵀ` as the expand (dropout on its output);
    it also yields `g = dy up`. The two weight-gradient reductions over M share one kernel.
    Where `one_pass_applies`, its tiles fit (`_one_pass_tiles_fit`) and it may read `Wᵀ`
    (`shrink_fusable`), `lora_backward_kernel` computes `dx`, `d_down` and `d_up` in one
    launch instead. `d_weight` is cuBLAS's `dyᵀ x`, `d_bias` a column sum. `t` (needed for
    `d_up`) is recomputed where it is None.
    """
    need_x, need_w, need_down, need_up, need_bias = needs
    c = scale / (1.0 - p)
    if _unsplittable(c, dy.dtype):  # `t` recomputed in the operands' dtype, as that path keeps it
        return _lora_torch.backward(dy, x, weight, down, up, None, scale, p, seed, needs)
    dy, x, weight, down, up = _in_memory(dy, x, weight, down, up)
    with _on_device(x):
        if need_up and t is None:
            t = _shrink(x, down, seed, p)
        rows, rank, in_features = dy.shape[0], down.shape[0], x.shape[1]
        if one_pass_applies(rows, rank, in_features, dy.shape[1], need_x) and (
            shrink_fusable(weight.t())
        ) and (
            _one_pass_tiles_fit(rows, rank, in_features, dy.dtype, weight.stride(1) == 1, p > 0,
                                _precision(dy.dtype))
        ):
            dx, d_down, d_up = _one_pass_backward(
                dy, x, weight, down, up, t, c, seed, p, need_down, need_up
            )
        else:
            dx, d_down, d_up = _separate_backward(
                dy, x, weight, down, up, t, c, seed, p, needs
            )
        d_weight = (dy.t() @ x).to(weight.dtype) if need_w else None
        d_bias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_bias else None
    return dx, d_weight, d_down, d_up, d_bias


def keep_mask(seed: int, p: float, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """The `(rows, cols)` boolean keep-mask the kernels apply to an `(rows, cols)` activation."""
    out = torch.empty((rows, cols), device=device, dtype=torch.int8)
    grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 64))
    with _on_device(out):
        keep_mask_kernel[grid](out, rows, cols, seed, keep_threshold(p), BLOCK_M=16, BLOCK_K=64)
    return out.bool()
