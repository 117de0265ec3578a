"""Compile the LoRA kernels for a GPU architecture on a machine without one, and read off their
resources: shared memory, registers, spills, and whether the K loop was software-pipelined.

The interpreter runs the kernels' arithmetic on a CPU but never the compiler, so it cannot show
a config that overflows shared memory, spills registers, or a loop the pipeliner gave up on.
This module runs the real compiler (Triton → PTX → `ptxas`, which ships with Triton) on every
config that `_lora_gemm`'s pruners keep for each launch the library makes, with arguments
specialised the way the runtime specialises them (ints equal to 1 become constants, multiples of
16 are marked divisible).

    python benchmarks/compile_check.py --arch 90 --out report.json

needs `TRITON_INTERPRET` unset (the interpreter replaces the compiler). `--configs largest`
compiles, of each launch, one config per loop structure (the largest tile: `largest_per_loop`);
`--configs one`, the quicker check `make test` runs, one config per launch (the largest of
the flattened loop where the pruner keeps one: `largest_of_launch`). The configs nearest the
shared-memory and register limits are not necessarily among them, so the full grid stays the
check of those.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING
from unittest import mock

from lowrank.kernels._lora_torch import keep_threshold

if TYPE_CHECKING:
    import triton

SMEM_OPTIN = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
"""Opt-in shared memory per block (bytes) by compute capability, from NVIDIA's tuning guides."""

SPILL_ALLOWANCE = 128
"""Spill bytes tolerated per thread: a few spilled registers stay in L1; more cost bandwidth."""

DTYPES = {"float16": ("fp16", 2), "bfloat16": ("bf16", 2), "float32": ("fp32", 4)}

KERNELS = ("lora_gemm_kernel", "lora_gemm_tma_kernel", "shrink_kernel", "reduce_rows_kernel",
           "lora_backward_kernel")  # fmt: skip


@dataclass(frozen=True)
class Pointer:
    """A pointer argument: its Triton element type and element size in bytes."""

    dtype: str
    size: int

    def element_size(self) -> int:
        return self.size


@dataclass
class Descriptor:
    """A TMA descriptor argument: the described tensor's element type and the box (tile) shape,
    which the kernel's autotune pre-hook sets from the config."""

    base: Pointer
    block_shape: list[int] = field(default_factory=lambda: [16, 16])

    def signature(self) -> str:
        return f"tensordesc<{self.base.dtype}[{', '.join(map(str, self.block_shape))}]>"


@dataclass(frozen=True)
class Launch:
    """One kernel launch the library makes: runtime argument values and constexprs."""

    case: str
    kernel: str
    args: dict
    constexprs: dict
    forced: bool = False  # launched only when the caller forces it (`backend="triton"`)


@dataclass
class Compiled:
    """What the compiler made of one (launch, config)."""

    case: str
    kernel: str
    dtype: str
    config: dict
    constexprs: dict
    shared_bytes: int
    registers: int  # per thread, from the log of the `ptxas` run that built the cubin
    spill_bytes: int
    pipelined: bool
    tensor_core: str
    compile_s: float
    tma: bool = False
    fallback: bool = False
    forced: bool = False
    loop_instructions: list[int] = field(default_factory=list)  # innermost loops, largest first
    binary_registers: int = 0  # per thread, as the cubin itself declares them (`cuobjdump`)
    notes: list[str] = field(default_factory=list)


def _pointer(dtype: str) -> Pointer:
    name, size = DTYPES[dtype]
    return Pointer(name, size)


def gemm_launches(dtype: str, rows: int, fan_in: int, fan_out: int, rank: int) -> Iterator[Launch]:
    """The `lora_gemm_kernel` launches of one forward and backward, as `_lora_triton` makes them.

    `x (rows, in)`, `weight (out, in)`, `down (r, in)`, `up (out, r)`, all contiguous; the
    backward's dx GEMM reads `weightᵀ`, `upᵀ` and `downᵀ` as strided views.
    """
    from lowrank.kernels import _lora_triton as ops

    block_r = ops._block_r(rank)
    ptr, f32 = _pointer(dtype), _pointer("float32")
    base = dict(m_bucket=ops._m_bucket(rows), scale=0.5, seed=123_456_789,
                keep_min=keep_threshold(0.1))  # fmt: skip
    forward = dict(
        x_ptr=ptr, w_ptr=ptr, a_ptr=ptr, b_ptr=ptr, t_ptr=f32, bias_ptr=ptr, y_ptr=ptr,
        M=rows, N=fan_out, K=fan_in, R=rank,
        stride_xm=fan_in, stride_xk=1, stride_wn=fan_in, stride_wk=1, stride_ar=fan_in,
        stride_ak=1, stride_bn=rank, stride_br=1, stride_tm=rank, stride_tr=1,
        stride_ym=fan_out, stride_yn=1, stride_bias=1, **base,
    )  # fmt: skip
    dx = dict(
        forward, M=rows, N=fan_in, K=fan_out,
        stride_xm=fan_out, stride_xk=1, stride_wn=1, stride_wk=fan_in, stride_ar=1,
        stride_ak=rank, stride_bn=1, stride_br=fan_in, stride_ym=fan_in, stride_bias=0,
    )  # fmt: skip
    off = dict(DROP_IN=False, DROP_OUT=False)
    # a forced or measured regime can run either at any shape, so both are checked
    for shrink in (True, False) if rank <= ops.MAX_BLOCK_R else (False,):
        regime = "fused" if shrink else "two-phase"
        flags = dict(SHRINK=shrink, PRECISION="tf32", BLOCK_R=block_r,
                     SLAB_R=ops.slab_r(block_r, shrink), EMIT_T=shrink)  # fmt: skip
        yield Launch(f"forward {regime}", "lora_gemm_kernel", forward,
                     dict(flags, HAS_BIAS=True, **off))  # fmt: skip
        if shrink:  # the two-phase forward's dropout is the shrink kernel's
            yield Launch(f"forward {regime}, dropout", "lora_gemm_kernel", forward,
                         dict(flags, HAS_BIAS=True, **dict(off, DROP_IN=True)))  # fmt: skip
            # no gradient needed: t stays in registers
            yield Launch("forward fused, inference", "lora_gemm_kernel", forward,
                         dict(flags, HAS_BIAS=True, EMIT_T=False, **off))  # fmt: skip
        yield Launch(f"dx {regime}", "lora_gemm_kernel", dx,
                     dict(flags, HAS_BIAS=False, **off))  # fmt: skip
        yield Launch(f"dx {regime}, dropout", "lora_gemm_kernel", dx,
                     dict(flags, HAS_BIAS=False, **dict(off, DROP_OUT=True)))  # fmt: skip
    yield from persistent_launches(forward, dx, block_r)


def persistent_launches(forward: dict, dx: dict, block_r: int) -> Iterator[Launch]:
    """The `lora_gemm_tma_kernel` launches of the forward and dx GEMMs whose pointer-kernel
    arguments are `forward` and `dx`: x, W and y become TMA descriptors (the dx GEMM's W,
    `weightᵀ`, read N-major); `t` from the shrink kernel (the persistent regime, its expand
    first, by default, or after the K loop) or, for r ≤ `MAX_BLOCK_R`, from the K loop
    (persistent_fused), each with and without dropout."""
    from lowrank.kernels import _lora_triton as ops

    dropped = ("x_ptr", "w_ptr", "stride_xm", "stride_xk", "stride_wn", "stride_wk")
    rank = forward["R"]
    modes = [(False, False), (False, True)] + [(True, False)] * (block_r >= rank)
    for shrink, first in modes:
        regime = "persistent fused" if shrink else "persistent"
        regime += ", expand first" if first else ""
        slab = ops.slab_r(block_r, shrink)
        static = ops.static_slabs(rank, shrink, first)
        y_tma = ops.y_by_tma(first, forward["x_ptr"].size)
        flags = dict(PRECISION="tf32", BLOCK_R=block_r, SLAB_R=slab, SHRINK=shrink,
                     EXPAND_FIRST=first, STATIC_SLABS=static, Y_DESC=y_tma)  # fmt: skip
        for name, args, n_major, bias in (("forward", forward, False, True),
                                          ("dx", dx, True, False)):  # fmt: skip
            kept = {k: v for k, v in args.items() if k not in dropped}
            for variant in ("", ", dropout", ", inference"):
                drop = variant == ", dropout"
                x_desc = Descriptor(args["x_ptr"])  # y's stand-in where y is stored by pointer
                descs = dict(x_desc=x_desc, w_desc=Descriptor(args["w_ptr"]),
                             y_desc=Descriptor(args["y_ptr"]) if y_tma else x_desc)  # fmt: skip
                dropout = dict(DROP_IN=drop and name == "forward" and shrink,
                               DROP_OUT=drop and name == "dx")  # fmt: skip
                if drop and not any(dropout.values()):
                    continue  # the two-phase forward's dropout is the shrink kernel's
                if variant == ", inference" and not (shrink and name == "forward"):
                    continue  # only the fused forward has a t to keep or not
                constexprs = dict(flags, W_N_MAJOR=n_major, HAS_BIAS=bias, **dropout,
                                  EMIT_T=shrink and variant != ", inference")  # fmt: skip
                yield Launch(f"{name} {regime}{variant}", "lora_gemm_tma_kernel",
                             dict(kept, **descs), constexprs)  # fmt: skip


def row_launches(dtype: str, rows: int, fan_in: int, fan_out: int, rank: int) -> Iterator[Launch]:
    """`shrink_kernel` (two-phase forward, with and without dropout, and the two-phase dx's
    `dy upᵀ` on a transposed view) and `reduce_rows_kernel` (d_down, d_up) launches."""
    from lowrank.kernels import _lora_triton as ops

    block_r = ops._block_r(rank)
    ptr, f32 = _pointer(dtype), _pointer("float32")
    seed = dict(seed=123_456_789, keep_min=keep_threshold(0.1))
    common = dict(x_ptr=ptr, a_ptr=ptr, t_ptr=f32, M=rows, R=rank, m_bucket=ops._m_bucket(rows),
                  stride_xk=1, stride_ts=rows * rank, stride_tm=rank, stride_tr=1,
                  **seed)  # fmt: skip
    forward = dict(common, K=fan_in, stride_xm=fan_in, stride_ar=fan_in, stride_ak=1,
                   k_per_split=ops.k_splits(rows, fan_in)[1])  # fmt: skip
    dx = dict(common, K=fan_out, stride_xm=fan_out, stride_ar=1, stride_ak=rank,
              k_per_split=ops.k_splits(rows, fan_out)[1])  # fmt: skip
    for case, args, drop in (("shrink", forward, False), ("shrink, dropout", forward, True),
                             ("shrink dy upᵀ", dx, False)):  # fmt: skip
        yield Launch(case, "shrink_kernel", args,
                     dict(DROP=drop, PRECISION="tf32", BLOCK_R=block_r))  # fmt: skip
    splits, per_split = ops.row_splits(rows)
    for case, cols, drop in (("d_down", fan_in, True), ("d_up", fan_out, False)):
        if splits > 1:  # float32 partials `(splits, r, cols)`
            out = dict(out_ptr=f32, stride_os=rank * cols, stride_or=cols, stride_ok=1)
        elif case == "d_down":  # the gradient `(r, in)` itself
            out = dict(out_ptr=ptr, stride_os=rank * cols, stride_or=cols, stride_ok=1)
        else:  # the transposed view of the row-major `(out, r)` gradient
            out = dict(out_ptr=ptr, stride_os=rank, stride_or=1, stride_ok=rank)
        args = dict(
            g_ptr=f32, x_ptr=ptr, M=rows, K=cols, R=rank, rows_per_split=per_split,
            stride_gm=rank, stride_gr=1, stride_xm=cols, stride_xk=1, scale=0.5, **out, **seed,
        )  # fmt: skip
        yield Launch(case, "reduce_rows_kernel", args,
                     dict(DROP=drop, PRECISION="tf32", BLOCK_R=block_r))  # fmt: skip


def one_pass_launches(
    dtype: str, rows: int, fan_in: int, fan_out: int, rank: int
) -> Iterator[Launch]:
    """`lora_backward_kernel` launches (`LOWRANK_LORA_BACKWARD=one_pass`, where
    `one_pass_fits`): every gradient, and `dx` with one weight gradient; each with and without
    dropout. Operands as `_one_pass_backward` passes them: `weightᵀ`, `upᵀ` and `downᵀ` as
    strided views; one row block writes the gradients (`d_up` row-major `(out, r)`), several
    write float32 partials."""
    from lowrank.kernels import _lora_triton as ops

    if not ops.one_pass_fits(rows, rank, fan_in, fan_out):
        return
    ptr, f32 = _pointer(dtype), _pointer("float32")
    block_m = ops._one_pass_block_m(rows)
    grads = ptr if rows <= block_m else f32  # the gradients, or the row blocks' partials
    args = dict(
        dy_ptr=ptr, w_ptr=ptr, a_ptr=ptr, b_ptr=ptr, x_ptr=ptr, t_ptr=f32, dx_ptr=ptr,
        d_down_ptr=grads, d_up_ptr=grads, M=rows, N=fan_in, K=fan_out, R=rank,
        stride_dym=fan_out, stride_dyk=1, stride_wn=1, stride_wk=fan_in, stride_ar=1,
        stride_ak=rank, stride_bn=1, stride_br=fan_in, stride_xm=fan_in, stride_xn=1,
        stride_tm=rank, stride_tr=1, stride_dxm=fan_in, stride_dxn=1,
        stride_dds=rank * fan_in, stride_ddr=fan_in, stride_ddn=1,
        stride_dus=fan_out * rank, stride_duk=rank, stride_dur=1,
        scale=0.5, seed=123_456_789, keep_min=keep_threshold(0.1),
    )  # fmt: skip
    block = dict(PRECISION="tf32", BLOCK_R=ops._block_r(rank), BLOCK_M=block_m,
                 GROUP_M=ops._ONE_PASS_GROUP_M)  # fmt: skip
    for case, down, up in (("", True, True), (", d_down only", True, False),
                           (", d_up only", False, True)):  # fmt: skip
        for drop in (False, True):
            name = f"one-pass backward{case}{', dropout' if drop else ''}"
            yield Launch(name, "lora_backward_kernel", args,
                         dict(block, NEED_DOWN=down, NEED_UP=up, DROP=drop))  # fmt: skip


def _signature(jit, args: dict, constexprs: dict, backend) -> tuple[dict, dict, dict]:
    """Triton signature, constexprs and attributes, specialised as the runtime would."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, attrs, consts = {}, {}, dict(constexprs)
    unspecialised = set(jit.do_not_specialize or ())
    for index, name in enumerate(jit.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, Descriptor):
            signature[name] = value.signature()
            continue
        if isinstance(value, Pointer):
            signature[name] = "*" + value.dtype
            attrs[(index,)] = backend.parse_attr("D")  # torch allocations are 16-byte aligned
            continue
        specialise = name not in unspecialised and index not in unspecialised
        kind, attr = native_specialize_impl(BaseBackend, value, False, specialise, True)
        if kind == "constexpr":
            signature[name] = "constexpr"
            consts[name] = attr
            continue
        signature[name] = kind
        if attr:
            attrs[(index,)] = backend.parse_attr(attr)
    return signature, consts, attrs


def _ptxas_resources(log: str) -> tuple[int, int]:
    """Registers per thread and spill-store bytes, from the log of `ptxas -v`."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output: {log[:500]}")
    return int(registers.group(1)), int(spills.group(1))


def _compile(source, target, options: dict):
    """`triton.compile`, and the log of the `ptxas -v` run that assembled the kernel: Triton's
    own (its flags, hence its register allocation: Triton 3.9 passes `--regAllocOptLevel=2`,
    3.6 does not), printed when `dump_ptxas_log` is set and kept beside the kernel in Triton's
    cache, so that a cached kernel (no ptxas run) has it too."""
    import triton
    from triton import knobs
    from triton.runtime.cache import get_cache_manager

    knobs.nvidia.dump_ptxas_log = True
    for fresh in (False, True):  # a kernel cached without its log is compiled again
        printed = io.StringIO()
        with knobs.compilation.scope(), contextlib.redirect_stdout(printed):
            knobs.compilation.always_compile = fresh
            kernel = triton.compile(source, target=target, options=options)
        cache = get_cache_manager(kernel.hash)
        if "Used" in printed.getvalue():
            cache.put(printed.getvalue(), "ptxas.log", binary=False)
            return kernel, printed.getvalue()
        if (kept := cache.get_file("ptxas.log")) is not None:
            with open(kept) as handle:
                return kernel, handle.read()
    raise RuntimeError(f"Triton printed no ptxas log for {kernel.name}")


def _size(config: triton.Config) -> tuple[float, int]:
    """Accumulator elements per warp, then operand elements buffered across the stages."""
    kw = config.kwargs
    bm, bn, tiles = kw.get("BLOCK_M", 1), kw.get("BLOCK_N", 1), kw.get("TILES_N", 1)
    buffered = config.num_stages * (bm + bn * tiles) * kw.get("BLOCK_K", 1)
    return bm * bn * tiles / config.num_warps, buffered


def largest_per_loop(configs: list[triton.Config]) -> list[triton.Config]:
    """Of each loop structure (flattened tile and K loops or not), the largest config: the
    most accumulator elements per warp, then the most operand bytes buffered across its
    stages. One compile per structure instead of one per config: every kernel and loop form
    compiles, though the config that uses the most shared memory or registers may be
    another."""

    largest: dict[bool, triton.Config] = {}
    for config in configs:
        loop = bool(config.kwargs.get("FLATTEN", False))
        if loop not in largest or _size(config) > _size(largest[loop]):
            largest[loop] = config
    return [config for config in configs if config in largest.values()]


def largest_of_launch(configs: list[triton.Config]) -> list[triton.Config]:
    """One config: the largest (as `largest_per_loop` measures) of the flattened loop where
    `configs` hold one (the loop with the most code: tile and K loops in one), else of all."""
    flattened = [c for c in configs if c.kwargs.get("FLATTEN", False)]
    return [max(flattened or configs, key=_size)] if configs else []


def compile_launch(
    launch: Launch, arch: int = 90, sass: bool = True, configs: str = "all"
) -> list[Compiled]:
    """Compile the configs the kernel's pruner keeps for `launch`: every one ("all"), the
    largest of each loop structure ("largest") or one ("one", `largest_of_launch`); one
    `Compiled` each."""
    from lowrank.kernels import _lora_gemm, _lora_gemm_tma
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    if _lora_gemm.INTERPRET:
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter compiles)")
    module = _lora_gemm_tma if launch.kernel == "lora_gemm_tma_kernel" else _lora_gemm
    autotuned = getattr(module, launch.kernel)
    jit = autotuned.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    named = {name: launch.args.get(name) for name in jit.arg_names}
    # the pruners size configs for the device's shared memory: here, the target's
    with mock.patch.object(_lora_gemm, "_smem_limit", lambda: SMEM_OPTIN[arch]):
        kept = autotuned.early_config_prune(autotuned.configs, named, **launch.constexprs)
    chosen = {"all": list, "largest": largest_per_loop, "one": largest_of_launch}[configs](kept)
    x = launch.args.get("x_ptr") or launch.args["x_desc"].base
    dtype = x.dtype
    results = []
    for config in chosen:
        constexprs = dict(launch.constexprs, **config.kwargs)
        fresh: dict[int, Descriptor] = {}  # one per descriptor object: a stand-in stays shared
        args = {k: fresh.setdefault(id(v), Descriptor(v.base)) if isinstance(v, Descriptor)
                else v for k, v in launch.args.items()}  # fmt: skip
        if config.pre_hook is not None:  # the descriptors' boxes, as at run time
            config.pre_hook({**args, **constexprs})
        signature, consts, attrs = _signature(jit, args, constexprs, backend)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        start = time.perf_counter()
        kernel, log = _compile(ASTSource(jit, signature, consts, attrs), target, options)
        elapsed = time.perf_counter() - start
        ptx = kernel.asm["ptx"]
        registers, spills = _ptxas_resources(log)
        loops = loop_bodies(_sass(kernel.asm["cubin"])) if sass else []
        tensor_core = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-"
        results.append(Compiled(
            case=launch.case, kernel=launch.kernel, dtype=dtype,
            config=dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages),
            constexprs={k: v for k, v in launch.constexprs.items()},
            shared_bytes=int(kernel.metadata.shared), registers=registers, spill_bytes=spills,
            pipelined=_pipelined(ptx, args, int(kernel.metadata.shared)),
            tensor_core=tensor_core, compile_s=round(elapsed, 3),
            tma="cp.async.bulk.tensor" in ptx,
            fallback=getattr(config, "fallback", False), forced=launch.forced,
            loop_instructions=loops[:3], binary_registers=_cubin_registers(kernel.asm["cubin"]),
        ))  # fmt: skip
    return results


def _cubin_registers(cubin: bytes) -> int:
    """Registers per thread the cubin's kernel declares, as `cuobjdump -res-usage` (shipped
    with Triton) reads them."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", handle.name],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    found = re.search(r"REG:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"unexpected cuobjdump output: {usage[:500]}")
    return int(found.group(1))


def _sass(cubin: bytes) -> str:
    """The cubin's SASS, as `nvdisasm` (shipped with Triton) prints it."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        return subprocess.run([knobs.nvidia.nvdisasm.path, handle.name], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip


_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA\b.*?\((\.L_x_\d+)\)")


def loop_bodies(sass: str) -> list[int]:
    """Instructions per iteration of each innermost loop (a backward branch whose span holds
    no other backward branch), largest first: the K loop's cost per K step."""
    labels: dict[str, int] = {}
    branches: list[tuple[int, str]] = []
    count = 0
    for line in sass.splitlines():
        if label := _LABEL.match(line):
            labels[label.group(1)] = count
        elif instruction := _INSTRUCTION.search(line):
            if branch := _BRANCH.search(instruction.group(1)):
                branches.append((count, branch.group(1)))
            count += 1
    loops = [(labels[target], at) for at, target in branches
             if target in labels and labels[target] <= at]  # fmt: skip
    innermost = [(start, end) for start, end in loops
                 if not any(start <= s and e <= end and (s, e) != (start, end)
                            for s, e in loops)]  # fmt: skip
    return sorted((end - start + 1 for start, end in innermost), reverse=True)


def _pipelined(ptx: str, args: dict, shared_bytes: int) -> bool:
    """Whether the K loop's loads overlap the math: `cp.async` copies for pointer loads; for
    TMA loads (which are asynchronous anyway) at least two stages of tile buffers in shared
    memory (`y`'s, which is stored, not counted), i.e. the next tiles in flight while the current
    ones are multiplied."""
    boxes = [d for name, d in args.items() if isinstance(d, Descriptor) and name != "y_desc"]
    if not boxes:
        return "cp.async" in ptx
    stage = sum(math.prod(d.block_shape) * d.base.size for d in boxes)
    return "cp.async.bulk.tensor" in ptx and shared_bytes >= 2 * stage


def problems(result: Compiled, arch: int = 90) -> list[str]:
    """What would fail or run slowly on the device: shared memory over the opt-in limit, register
    spills, or a K loop left unpipelined (every load waits for memory). A pruner's fallback
    (nothing fit its budget) is held only to the shared-memory limit: it must launch, and the
    regime rule (or a measurement) passes it over where the other regime is faster; so is a launch
    only a forced backend makes (float32 "tf32x3")."""
    found = []
    if result.shared_bytes > SMEM_OPTIN[arch]:
        found.append(f"shared memory {result.shared_bytes} B > {SMEM_OPTIN[arch]} B")
    if result.fallback or result.forced:  # it must launch; it runs slowly only if chosen
        return found
    if result.spill_bytes > SPILL_ALLOWANCE:
        found.append(f"{result.spill_bytes} B of register spills")
    if not result.pipelined:
        found.append("K loop not pipelined (no cp.async, or one TMA stage)")
    if result.kernel == "lora_gemm_tma_kernel" and not result.tma:
        found.append("no TMA loads (cp.async.bulk.tensor)")
    return found


def grid_launches(
    dtypes: list[str],
    rows: list[int],
    shapes: list[tuple[int, int]],
    ranks: list[int],
    precisions: tuple[str, ...] = ("tf32", "tf32x3"),
) -> Iterator[Launch]:
    """Every launch of a forward + backward over the grid, without duplicates; float32 ones
    in each of `precisions`."""
    seen = set()
    for dtype in dtypes:
        for m in rows:
            for fan_in, fan_out in shapes:
                for rank in ranks:
                    for maker in (gemm_launches, row_launches, one_pass_launches):
                        for launch in _with_precisions(maker(dtype, m, fan_in, fan_out, rank),
                                                       dtype, precisions):  # fmt: skip
                            key = json.dumps([launch.kernel, launch.constexprs, dtype,
                                              _spec_key(launch.args)], default=str)  # fmt: skip
                            if key not in seen:
                                seen.add(key)
                                yield launch


def _with_precisions(
    launches: Iterator[Launch], dtype: str, precisions: tuple[str, ...]
) -> Iterator[Launch]:
    """Float32 launches in both dot precisions torch's matmul setting can select: "tf32", and
    "tf32x3" under "highest", which only `backend="triton"` launches ("auto" sends such calls
    to cuBLAS), so it is held to the shared-memory limit alone; 16-bit launches once."""
    for launch in launches:
        if dtype != "float32" or "tf32" in precisions:
            yield launch
        if dtype == "float32" and "tf32x3" in precisions:
            yield Launch(f"{launch.case}, tf32x3", launch.kernel, launch.args,
                         dict(launch.constexprs, PRECISION="tf32x3"), forced=True)  # fmt: skip


def _spec_key(args: dict) -> list:
    """The parts of the arguments that change the compiled kernel (besides constexprs)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    key = [args.get("m_bucket"), args.get("rows_per_split")]
    for name, value in sorted(args.items()):
        if isinstance(value, Pointer | Descriptor):
            key.append((name, str(value)))
        elif isinstance(value, int):
            key.append((name, native_specialize_impl(BaseBackend, value, False, True, True)))
    return key


def _line(result: Compiled, launch: Launch) -> str:
    """One report row: kernel, case, dtype, rank slab, tile, resources, problems after `!!`."""
    cfg = result.config
    tile = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in cfg)
    line = (
        f"{result.kernel:20s} {result.case:33s} {result.dtype:5s} "
        f"R{launch.constexprs['BLOCK_R']:<4d} {tile:12s} T{cfg.get('TILES_N', 1)} "
        f"w{cfg['num_warps']} s{cfg['num_stages']} smem={result.shared_bytes:7d} "
        f"regs={result.registers:3d} spill={result.spill_bytes:4d} "
        f"loop={(result.loop_instructions or [0])[0]:4d} {result.tensor_core}"
        + (" tma" if result.tma else "")
        + (" flattened" if cfg.get("FLATTEN") else "")
    )
    line += " (fallback)" if result.fallback else ""
    line += " (forced only)" if result.forced else ""
    return line + (f" !! {'; '.join(result.notes)}" if result.notes else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_OPTIN))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=list(DTYPES))  # fmt: skip
    parser.add_argument("--rows", nargs="+", type=int, default=[16, 128, 1024, 8192])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336"],
                        help="IN x OUT pairs")  # fmt: skip
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64, 128, 256])
    parser.add_argument("--precisions", nargs="+", choices=["tf32", "tf32x3"],
                        default=["tf32", "tf32x3"], help="float32 dot precisions")  # fmt: skip
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS),
                        help="compile only these kernels' launches")  # fmt: skip
    parser.add_argument("--skip-cases", nargs="+", default=[], metavar="CASE",
                        help="leave out the launches of these cases (names as reported, "
                             "e.g. 'forward fused, inference')")  # fmt: skip
    parser.add_argument("--no-sass", action="store_true",
                        help="no disassembly (no loop instruction counts)")
    parser.add_argument("--configs", choices=["all", "largest", "one"], default="all",
                        help="every kept config of each launch, the largest of each loop "
                             "structure, or one per launch (quicker checks)")  # fmt: skip
    parser.add_argument("--out", help="write the report (JSON) here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiler processes")
    args = parser.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x", 1)) for s in args.shapes]
    except ValueError:
        parser.error(f"--shapes takes IN x OUT pairs such as 4096x14336, got {args.shapes}")
    if any(len(s) != 2 or min(s) < 1 for s in shapes) or min(args.rows + args.ranks) < 1:
        parser.error("--shapes, --rows and --ranks take positive sizes (shapes as INxOUT)")
    launches = [launch for launch in grid_launches(args.dtypes, args.rows, shapes, args.ranks,
                                                   tuple(args.precisions))
                if launch.kernel in args.kernels]  # fmt: skip
    unknown = set(args.skip_cases) - {launch.case for launch in launches}
    if unknown:
        parser.error(f"--skip-cases names no launch of the grid: {sorted(unknown)}")
    launches = [launch for launch in launches if launch.case not in args.skip_cases]
    report = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        compiled = pool.map(compile_launch, launches, repeat(args.arch), repeat(not args.no_sass),
                            repeat(args.configs))
        for launch, results in zip(launches, compiled, strict=True):
            for result in results:
                result.notes = problems(result, args.arch)
                report.append(result)
                print(_line(result, launch), flush=True)
    bad = sum(bool(r.notes) for r in report)
    print(f"{len(report)} compiled, {bad} with problems")
    if args.out:
        import datetime

        import triton

        command = " ".join(["python benchmarks/compile_check.py", *(argv or sys.argv[1:])])
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
        header = {"arch": args.arch, "triton": triton.__version__, "command": command,
                  "date": datetime.date.today().isoformat(), "commit": commit}  # fmt: skip
        partial = args.out + ".tmp"
        with open(partial, "w") as handle:
            json.dump({**header, "results": [asdict(r) for r in report]}, handle, indent=1)
        os.replace(partial, args.out)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
