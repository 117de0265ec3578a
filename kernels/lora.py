"""`lora_linear`: an unmerged LoRA linear layer as one fused op with a fused backward.

`y = x weightᵀ + bias + scale · (drop(x) downᵀ) upᵀ`, PEFT's semantics: dropout acts on the
adapter branch's input only. CUDA tensors run the Triton kernels; CPU tensors run a plain
torch path, or the same Triton kernels when `TRITON_INTERPRET=1` (the tests). The kernels and
their regimes are described in docs/kernels.md.
"""

from __future__ import annotations

import math
import os
from types import ModuleType

import torch
from torch.autograd import forward_ad

from lowrank._checks import (
    FLOAT_DTYPES,
    require_applied_scale,
    require_choice,
    require_float,
    require_ndim,
    require_number,
    require_probability,
    require_real_type,
    require_same_dtype_device,
    require_seed,
    require_tensor,
)
from lowrank.errors import ArgumentError, DeviceError, DTypeError, RankError, ShapeError

from . import _lora_torch

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")
"""Device types with an autocast state to ask about (a literal list: torch 2.11's dynamo cannot
trace `torch.amp.is_autocast_available`, which would break a compiled graph here)."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_TRITON_OPS: list[ModuleType] = []  # `_lora_triton` once imported: an import per call costs 1 µs


def _triton_ops() -> ModuleType:
    """The Triton ops module, imported on first use (so that torch-only calls never import
    Triton)."""
    if not _TRITON_OPS:
        from . import _lora_triton

        _TRITON_OPS.append(_lora_triton)
    return _TRITON_OPS[0]


def _exact_float32(x: torch.Tensor) -> bool:
    """Whether `x` is a CUDA float32 tensor under `torch.set_float32_matmul_precision("highest")`
    (torch's default): cuBLAS's float32 GEMMs then serve it best, since the kernels' float32
    products that keep float32's accuracy ("tf32x3") spill registers."""
    return x.is_cuda and x.dtype == torch.float32 and (
        torch.get_float32_matmul_precision() == "highest"
    )


def _resolve_backend(backend: str, x: torch.Tensor) -> ModuleType:
    """The ops module for `backend` and `x`'s device and dtype ("auto": Triton where it runs)."""
    if require_choice("backend", backend, BACKENDS) == "torch":
        return _lora_torch
    runs = x.is_cuda or (x.is_cpu and _interpreting())  # the interpreter takes CPU tensors
    if backend == "auto":
        usable = runs and (x.is_cuda or x.dtype != torch.bfloat16) and not _exact_float32(x)
        return _triton_ops() if usable and x.dtype in TRITON_DTYPES else _lora_torch
    if x.dtype not in TRITON_DTYPES:
        raise DTypeError(f"the Triton backend takes float16, bfloat16 or float32, got {x.dtype}")
    if not runs:
        raise DeviceError(
            f"the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}"
        )
    if x.is_cpu and x.dtype == torch.bfloat16:
        raise DTypeError(
            "the Triton backend cannot run bfloat16 in Triton's interpreter (its tl.dot returns "
            "wrong values there): use float16 or float32, or backend='torch'"
        )
    return _triton_ops()


def _well_formed(x: object, weight: object, down: object, up: object, bias: object) -> bool:
    """Whether the operands pass every check of `_check_operands` (a quick test for the
    common case; any doubt goes to the checks that name what is wrong)."""
    try:
        dtype, device = x.dtype, x.device
        out_features, in_features = weight.shape
        rank = down.shape[0]
        return (
            dtype in FLOAT_DTYPES
            and all(isinstance(t, torch.Tensor) for t in (x, weight, down, up))
            and x.layout == weight.layout == down.layout == up.layout == torch.strided
            and weight.dtype == down.dtype == up.dtype == dtype
            and weight.device == down.device == up.device == device
            and x.ndim >= 1
            and x.shape[-1] == in_features
            and down.shape == (rank, in_features)
            and rank >= 1
            and up.shape == (out_features, rank)
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype == dtype
                                  and bias.device == device and bias.shape == (out_features,)
                                  and bias.layout == torch.strided))
        )  # fmt: skip
    except (AttributeError, TypeError, ValueError, IndexError, RuntimeError):  # nested: Runtime
        return False


def _check_operands(
    x: object, weight: object, down: object, up: object, bias: object
) -> tuple[int, int, int]:
    """Validate the tensors; return `(in_features, out_features, rank)`."""
    if _well_formed(x, weight, down, up, bias):
        return weight.shape[1], weight.shape[0], down.shape[0]
    named = {"x": x, "weight": weight, "down": down, "up": up}
    if bias is not None:
        named["bias"] = bias
    for name, value in named.items():
        require_float(name, require_tensor(name, value))
    require_ndim("weight", weight, (2,), "(out, in)")
    out_features, in_features = weight.shape
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ShapeError(
            f"x must have shape (..., {in_features}) to match weight (out={out_features}, "
            f"in={in_features}), got {tuple(x.shape)}"
        )
    require_ndim("down", down, (2,), "(r, in)")
    if down.shape[1] != in_features:
        raise ShapeError(f"down must have shape (r, {in_features}), got {tuple(down.shape)}")
    rank = down.shape[0]
    if rank < 1:
        raise RankError(f"down must have rank r >= 1, got shape {tuple(down.shape)}")
    require_ndim("up", up, (2,), "(out, r)")
    if up.shape[0] != out_features:
        raise ShapeError(f"up must have shape ({out_features}, {rank}), got {tuple(up.shape)}")
    if up.shape[1] != rank:
        raise RankError(
            f"up has rank {up.shape[1]} but down has rank {rank}; expected up of shape "
            f"({out_features}, {rank})"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ShapeError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    require_same_dtype_device(named)
    return in_features, out_features, rank


def _autocast(*operands: object) -> tuple:
    """The operands as `F.linear` sees them under `torch.autocast` on `x`'s device: float16,
    bfloat16 and float32 tensors cast to the autocast dtype (float64 stays, as in autocast)."""
    x = operands[0]
    if not isinstance(x, torch.Tensor):
        return operands
    device_type = x.device.type  # e.g. "meta" has no autocast, and asking would raise
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return operands
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in TRITON_DTYPES else t
        for t in operands
    )


def _check_dropout(dropout_p: object, seed: object) -> tuple[float, int | None]:
    """Validate `dropout_p`, a number in [0, 1), and `seed`, an int in [0, 2**63) or None."""
    p = require_probability("dropout_p", dropout_p)
    return p, None if seed is None else require_seed("seed", seed, bits=63)


def _drawn(p: float, seed: int | None) -> int:
    """`seed`, or one drawn from torch's default generator when dropout needs one."""
    if seed is not None:
        return seed
    return int(torch.randint(0, 2**31 - 1, ())) if p > 0 else 0


def _drawn_transformed(p: float, seed: int | None) -> int:
    """`_drawn` under a `torch.func` transform, where `vmap` allows the seed's draw only with
    `randomness="same"` (one seed for the batch)."""
    try:
        return _drawn(p, seed)
    except RuntimeError as err:  # vmap's "error" mode refuses the draw, "different" its int
        raise ArgumentError(
            "dropout with seed=None draws one seed per call, which torch.func.vmap allows only "
            "with randomness='same': pass a seed, or vmap(..., randomness='same')"
        ) from err


class LoRALinearFunction(torch.autograd.Function):
    """Autograd of `lora_linear` on a 2-D `x (M, in)`; saves `t = drop(x) downᵀ (M, r)`.

    `t` is saved rather than recomputed: it is `r` numbers per row, while recomputing it
    would read all of `x` again. The dropout mask is not saved: the backward regenerates it
    from the seed.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        down: torch.Tensor,
        up: torch.Tensor,
        bias: torch.Tensor | None,
        scale: float,
        p: float,
        seed: int,
        ops: ModuleType,
    ) -> torch.Tensor:
        keep_t = ctx.needs_input_grad[3]
        y, t = ops.forward(x, weight, down, up, bias, scale, p, seed, keep_t=keep_t)
        ctx.save_for_backward(x, weight, down, up, t)
        ctx.scale, ctx.p, ctx.seed, ctx.ops = scale, p, seed, ops
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> tuple:
        x, weight, down, up, t = ctx.saved_tensors
        ops = ctx.ops
        if torch.is_grad_enabled():  # `create_graph`: the gradients are differentiated again,
            ops, t = _lora_torch, None  # so torch ops, and `t` recomputed with its history
        dx, d_weight, d_down, d_up, d_bias = ops.backward(
            dy, x, weight, down, up, t, ctx.scale, ctx.p, ctx.seed, tuple(ctx.needs_input_grad[:5])
        )
        return dx, d_weight, d_down, d_up, d_bias, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`x weightᵀ + bias + scale · (drop(x) downᵀ) upᵀ`, shape `(..., out)`.

    Args:
        x: `(..., in)` activations; any leading dims, any strides.
        weight: `(out, in)` base weight (frozen unless it requires grad).
        down: `(r, in)` shrink factor `A`.
        up: `(out, r)` expand factor `B`.
        scale: the adapter scale `s` (e.g. `alpha / r`).
        bias: optional `(out,)`.
        dropout_p: dropout probability in [0, 1) on the adapter branch's input; kept values are
            scaled by `1 / (1 − p)`.
        seed: dropout seed; None draws one from torch's default generator (so
            `torch.manual_seed` makes runs reproducible). The backward reuses the same mask.
        backend: "auto" (Triton on CUDA, and on CPU under `TRITON_INTERPRET=1`; torch
            otherwise, and for CUDA float32 under float32 matmul precision "highest"),
            "triton" or "torch". Both draw the same mask for a seed.

    All tensors share one float dtype and device (Triton: float16, bfloat16, float32). Under
    `torch.autocast`, float16/bfloat16/float32 operands are first cast to the autocast dtype,
    as `F.linear` casts them (gradients flow back through the casts).
    """
    x, weight, down, up, bias = _autocast(x, weight, down, up, bias)
    in_features, out_features, _ = _check_operands(x, weight, down, up, bias)
    p, seed = _check_dropout(dropout_p, seed)
    if torch.compiler.is_compiling():
        # dynamo may trace the scale as a symbolic float, whose value it cannot test: the op
        # checks it when it runs
        scale = require_real_type("scale", scale)
        scale = scale if isinstance(scale, float) else require_number("scale", scale)
    else:
        scale = require_applied_scale(scale, x.dtype, p)
    ops = _resolve_backend(backend, x)
    x2d = x if x.ndim == 2 else x.reshape(math.prod(x.shape[:-1]), in_features)
    if x2d.shape[0] == 0 or in_features == 0 or out_features == 0:
        ops = _lora_torch
    operands = (x2d, weight, down, up, bias)
    if _transformed():  # torch ops, which the transform batches or differentiates itself
        y = _lora_torch.composite(*operands, scale, p, _drawn_transformed(p, seed))
    elif torch.compiler.is_compiling():
        # one opaque op: the launchers and the seeded mask stay out of the trace (and dynamo
        # in torch 2.11 gives this autograd.Function all-zero gradients when it traces it)
        y = _traced(operands, scale, p, seed, "torch" if ops is _lora_torch else "triton")
    else:
        y = _run(operands, scale, p, _drawn(p, seed), ops)
    return y if x.ndim == 2 else y.reshape(*x.shape[:-1], out_features)


def _traced(
    operands: tuple, scale: float, p: float, seed: int | None, backend: str
) -> torch.Tensor:
    """`y (M, out)` through the `lowrank::lora_linear_fwd` op, which torch.compile keeps whole
    (its backward op too). A dropout seed left to draw is drawn inside the graph, so every
    call of the compiled code draws a new one."""
    from ._lora_op import lora_linear_fwd

    seed_tensor = None
    if p > 0 and seed is None:
        seed_tensor = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    keep_t = torch.is_grad_enabled() and operands[3].requires_grad
    y, _ = lora_linear_fwd(*operands, scale, p, seed or 0, seed_tensor, keep_t, backend)
    return y


def _transformed() -> bool:
    """Whether a `torch.func` transform or a forward-mode AD level is active: the kernels
    would read only the primal values of its wrapped or dual tensors."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def _run(operands: tuple, scale: float, p: float, seed: int, ops: ModuleType) -> torch.Tensor:
    """`y (M, out)` from validated 2-D operands, through autograd only if a gradient is due."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands):
        if ops is not _lora_torch:  # a bad $LOWRANK_LORA_BACKWARD fails before the forward runs
            ops.backward_choice()
        return LoRALinearFunction.apply(*operands, scale, p, seed, ops)
    y, _ = ops.forward(*operands, scale, p, seed, keep_t=False)  # no autograd node: µs saved
    return y


def lora_dropout_mask(
    x: torch.Tensor, dropout_p: float, seed: int, backend: str = "auto"
) -> torch.Tensor:
    """The boolean keep-mask, shape of `x (..., in)`, that `lora_linear` draws for these args."""
    require_float("x", require_tensor("x", x))
    if x.ndim == 0:
        raise ShapeError("x must have shape (..., in), got a 0-dimensional tensor")
    p, seed = _check_dropout(dropout_p, seed)
    ops = _resolve_backend(backend, x)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    mask = ops.keep_mask(_drawn(p, seed), p, rows, x.shape[-1], x.device)
    return mask.reshape(x.shape)
