"""Scaled products in the precision that keeps them: GEMMs with the scale as their alpha
(float64 where the scale leaves the dtype's range), half-precision products whose gradients
are summed and scaled in float32, products scaled by a (trainable) tensor scale with
gradients formed in float32 too, products rounded to a narrower dtype a block of rows at a
time, and bounds on the magnitudes that products of factors reach."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwd

from ._checks import HALF_DTYPES, work_dtype


def scaled_mm(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale · left @ right`, `left (m, r)`, `right (r, n)`, the scale applied inside the GEMM
    (its `alpha`): no pass over the product, and no `scale · left` that could leave the range
    where the product does not. A scale outside the factors' dtype's range (a float32 LoRA at
    scale 1e40 with factors of 1e-20) takes the product in float64 instead, rounded once to
    their dtype. Float16/bfloat16 operands that autograd records get their gradients summed
    and scaled in float32 before rounding (`_NarrowScaledMM`), and so do operands carrying a
    forward-mode tangent (`forward_ad.make_dual`, `torch.func.jvp`)."""
    if scale == 1.0:
        # torch's backward of mm is one GEMM per operand, summed in float32 and rounded once
        # (no scale left to multiply in after the rounding)
        return torch.mm(left, right)
    if not gemm_alpha(scale, left.dtype):
        return scaled_mm(left.double(), right.double(), scale).to(left.dtype)
    # dynamo cannot trace an autograd.Function with a custom jvp: compiled graphs keep
    # torch's own GEMM backward
    narrow = left.dtype in HALF_DTYPES and not torch.compiler.is_compiling()
    if narrow and (_needs_grad(left, right) or _has_tangent(left, right)):
        return _NarrowScaledMM.apply(left, right, scale)
    return _alpha_mm(left, right, scale)


def _alpha_mm(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale · left @ right`, `(m, r) @ (r, n)`, as one GEMM in the operands' dtype with
    `scale` as its alpha (float16/bfloat16 GEMMs sum in float32 and round once, after it)."""
    return torch.addmm(left.new_zeros(()), left, right, beta=0, alpha=scale)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an operation on `tensors` (grad mode on, one requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _has_tangent(*tensors: torch.Tensor) -> bool:
    """Whether one of `tensors` carries a forward-mode tangent at the innermost dual level
    (`forward_ad` or a `torch.func.jvp` transform), whether or not it requires grad."""
    return any(fwd.unpack_dual(t).tangent is not None for t in tensors)


class _NarrowScaledMM(torch.autograd.Function):
    """`scale · left @ right` of float16/bfloat16 operands `left (m, r)`, `right (r, n)`
    (`_alpha_mm`, bit for bit), whose derivatives are summed and scaled in float32 and
    rounded once to the operands' dtype.

    With upstream gradient `G (m, n)`: `∂L/∂left = scale · G @ rightᵀ (m, r)` and
    `∂L/∂right = scale · leftᵀ @ G (r, n)`. torch's backward of the half-precision GEMM
    rounds `G @ rightᵀ` and `leftᵀ @ G` to the operands' dtype and multiplies the scale in
    afterwards: a small scale under a large `G` gave Inf where the gradient fits float16
    (`G @ rightᵀ` of 2^20, beyond 65504, at a scale that makes the gradient 640), and a large
    scale over a small `G` scaled up a product already rounded to a float16 subnormal. Here
    each is one float32 GEMM with the scale as its alpha (`scaled_mm`), rounded once, and
    so is the forward-mode tangent. Backward and tangent are differentiable torch ops
    (double backward), and `vmap` batches them (`generate_vmap_rule`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
        return _alpha_mm(left, right, scale)

    @staticmethod
    def setup_context(
        ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor
    ) -> None:
        left, right, scale = inputs
        ctx.save_for_backward(left, right)
        ctx.save_for_forward(left, right)
        ctx.scale = scale

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        left, right = ctx.saved_tensors
        work = work_dtype(left.dtype)
        grad = grad.to(work)
        grad_left = grad_right = None
        if ctx.needs_input_grad[0]:
            grad_left = scaled_mm(grad, right.to(work).t(), ctx.scale).to(left.dtype)
        if ctx.needs_input_grad[1]:
            grad_right = scaled_mm(left.to(work).t(), grad, ctx.scale).to(right.dtype)
        return grad_left, grad_right, None

    @staticmethod
    def jvp(
        ctx: torch.autograd.function.FunctionCtx,
        left_tangent: torch.Tensor | None,
        right_tangent: torch.Tensor | None,
        _scale_tangent: None,
    ) -> torch.Tensor:
        """`scale · (ṫleft @ right + left @ ṫright) (m, n)`; an operand without a tangent
        adds no term (forward-mode AD calls this only where one has a tangent)."""
        left, right = ctx.saved_tensors
        work = work_dtype(left.dtype)
        terms = []
        if left_tangent is not None:
            terms.append(scaled_mm(left_tangent.to(work), right.to(work), ctx.scale))
        if right_tangent is not None:
            terms.append(scaled_mm(left.to(work), right_tangent.to(work), ctx.scale))
        return sum(terms[1:], terms[0]).to(left.dtype)


def scaled(delta: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """`scale · delta`, `delta` of any shape, in `delta`'s dtype, rounded once: torch forms
    the product in float32 for float16/bfloat16 (for ΔW summed in float32 and rounded to a
    narrower dtype once scaled, pass the float32 sum).

    A float `scale` outside `delta`'s dtype's range (`gemm_alpha`) multiplies in float64. A
    tensor `scale` (0-d, a trainable scale, of any float dtype) multiplies as a tensor, so
    autograd reaches it; where autograd records the product of a float16/bfloat16 `delta`,
    or a forward-mode tangent reaches it, its derivatives are formed in float32 and rounded
    once (`_NarrowScaled`)."""
    if isinstance(scale, torch.Tensor):
        # dynamo cannot trace an autograd.Function with a custom jvp: compiled graphs keep
        # torch's own backward of the product
        narrow = delta.dtype in HALF_DTYPES and not torch.compiler.is_compiling()
        if narrow and (_needs_grad(delta, scale) or _has_tangent(delta, scale)):
            return _NarrowScaled.apply(delta, scale)
        return delta * scale
    if scale == 1.0:
        return delta
    if not gemm_alpha(scale, delta.dtype):
        return (delta.double() * scale).to(delta.dtype)
    return delta * scale


class _NarrowScaled(torch.autograd.Function):
    """`scale · delta` of a float16/bfloat16 `delta` (any shape) and a 0-d tensor `scale`
    (`delta * scale`, in `delta`'s dtype), whose derivatives are formed in float32 and
    rounded once: with upstream gradient `G` (`delta`'s shape and dtype),
    `∂L/∂delta = scale · G` in `delta`'s dtype and `∂L/∂scale = Σ G ⊙ delta` in `scale`'s.

    torch's backward of `delta * scale` rounds each `G ⊙ delta` to the half-precision dtype
    before the sum: a product under half float16's smallest subnormal (2^-25: `G` and
    `delta` near 1e-4) is 0 and one beyond 65504 Inf, where their sum, ∂L/∂scale, is a
    normal float16. Here the sum is over float32 products (exact for float16 and bfloat16
    operands), rounded once, and so is the forward-mode tangent `scale · ḋelta + ṡcale ·
    delta`. `delta` and `scale` are saved as they are (no float32 copy). Backward and tangent
    are differentiable torch ops (double backward), and `vmap` batches them
    (`generate_vmap_rule`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return delta * scale

    @staticmethod
    def setup_context(
        ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor
    ) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        delta, scale = ctx.saved_tensors
        grad = grad.to(work_dtype(delta.dtype))
        grad_delta = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_delta = (grad * scale).to(delta.dtype)
        if ctx.needs_input_grad[1]:
            # float32 G times the half-precision delta: float32 products, summed in float32
            grad_scale = (grad * delta).sum().to(scale.dtype)
        return grad_delta, grad_scale

    @staticmethod
    def jvp(
        ctx: torch.autograd.function.FunctionCtx,
        delta_tangent: torch.Tensor | None,
        scale_tangent: torch.Tensor | None,
    ) -> torch.Tensor:
        """`scale · ḋelta + ṡcale · delta` (`delta`'s shape and dtype); an input without a
        tangent adds no term (forward-mode AD calls this only where one has a tangent)."""
        delta, scale = ctx.saved_tensors
        work = work_dtype(delta.dtype)
        terms = []
        if delta_tangent is not None:
            terms.append(delta_tangent.to(work) * scale)
        if scale_tangent is not None:
            terms.append(delta.to(work) * scale_tangent)
        return sum(terms[1:], terms[0]).to(delta.dtype)


_ALPHA_RANGE = 2.0**64
"""The largest `|scale|` (and its reciprocal the smallest) a float32 GEMM takes as alpha. The
GEMM may apply alpha to an operand before the product, and `alpha · operand` must stay
normal where the product is: within 2^±64 it does for any operand of magnitude between
2^-62 and 2^63 (beyond, e.g. a scale of 1e-31 on factors near 1e-10, every scaled entry is
subnormal and the product loses its low bits)."""


def gemm_alpha(scale: float, dtype: torch.dtype) -> bool:
    """Whether a GEMM in `dtype` can take `scale` as its alpha: 0, or a magnitude within
    2^±64 (`_ALPHA_RANGE`) where it computes in float32 (`work_dtype`: also for half
    precision); float64 takes every float. Other scales take the product in float64."""
    work = work_dtype(dtype)
    if work == torch.float64 or scale == 0:
        return True
    return 1 / _ALPHA_RANGE <= abs(scale) <= _ALPHA_RANGE


ROUNDING_BLOCK = 1 << 20
"""Values of each float32 block of rows `rounded_product` forms before rounding (4 MiB)."""


def rounded_product(
    left: torch.Tensor, right: torch.Tensor, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """`scale · left @ right`, `left (m, r)`, `right (r, n)`, summed in their (work) dtype
    and rounded once to `dtype`.

    A narrower `dtype` gets the product a block of about `ROUNDING_BLOCK` values of rows at
    a time, each rounded as it comes, so that no full-size float32 copy is written (its
    fresh pages cost more than the GEMM); only out-of-place ops, for autograd and `vmap`.
    """
    rows = left.shape[0]
    step = max(1, ROUNDING_BLOCK // max(1, right.shape[1]))
    if dtype == left.dtype or step >= rows:
        return scaled_mm(left, right, scale).to(dtype)
    blocks = [scaled_mm(left[i : i + step], right, scale).to(dtype) for i in range(0, rows, step)]
    return torch.cat(blocks)


def peak(tensor: torch.Tensor) -> torch.Tensor:
    """max |tensor| as a float64 scalar tensor (no host sync)."""
    return tensor.detach().abs().amax().double()


def row_sum_peak(matrix: torch.Tensor) -> torch.Tensor:
    """max over rows of the row's 1-norm, `matrix (n, r)`, as a float64 scalar tensor."""
    return matrix.detach().double().abs().sum(1).amax()


Bounds = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""`(final, largest, smallest)`: float64 scalar tensors bounding max |ΔW| / |scale|, and the
largest and the smallest of the bounds on the values the recomposition forms on the way
(ΔW / |scale| included): where `smallest` nears the work dtype's subnormals, a product
on the way may underflow although ΔW, once scaled, would not."""


def product_bounds(first: Bounds, second: Bounds) -> Bounds:
    """The bounds of an elementwise or Kronecker product of two parts with these bounds."""
    final = first[0] * second[0]
    largest = torch.maximum(final, torch.maximum(first[1], second[1]))
    return final, largest, torch.minimum(final, torch.minimum(first[2], second[2]))
