"""Adapter modules: a frozen `nn.Linear` or `nn.Conv1d/2d/3d` plus trainable low-rank factors.

`LoRALinear` and `LoRAConv` take any form: `"lora"` (LoRA; LoCon on a convolution),
`"centre_tap"` (1×1 factors on a size-keeping k×k convolution), `"tucker2"` and `"cp"`.
The output is `base(x) + scale · branch(x)`, where the branch runs the factors as linear
maps or convolutions (the base convolution's stride, padding and dilation on the spatial
factor); this equals the base layer with weight `W + ΔW`, `ΔW = delta_weight()`.
`merge()` adds ΔW into the base weight in place, `unmerge()` subtracts it again.
`inject` swaps adapters in for the modules a target pattern names (`lowrank.targets`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import require_finite_scale
from .bounds import Rank, require_form, require_rank
from .conv import centre_tap, conv_function
from .errors import ArgumentError
from .forms import CP, Factors, LoRA, Tucker2, recompose, scale_from_alpha
from .kernels import lora_linear
from .targets import AdapterSpec, Targets, check_fit, layer_sizes, resolve_targets


class LowRankAdapter(nn.Module):
    """A frozen base layer with a trainable low-rank update of one form.

    Factor parameters (shapes as in `lowrank.forms`, `*k` the base kernel, `1…` unit axes):
    `"lora"`: `down (r, in, *k)`, `up (out, r, 1…)`; `"centre_tap"`: `down (r, in, 1…)`,
    `up (out, r, 1…)`; `"tucker2"`: `down (r_in, in, 1…)`, `mid (r_out, r_in, *k)`,
    `up (out, r_out, 1…)`; `"cp"`: `out_factor (out, R)`, `in_factor (in, R)`,
    `spatial_factors[i] (k_i, R)`. The factor next to the output (`up`, `out_factor`)
    starts at zero and the others Kaiming-uniform, so ΔW = 0 at first and the first
    backward already reaches the zero factor.

    `alpha` gives `scale = alpha / r` (`r_out` for Tucker2); `scale` sets it directly;
    neither means 1. `trainable_scale` makes the scale one trainable parameter. `hard`
    runs the base layer with `W + ΔW` instead of a parallel branch (linear layers and 1×1
    convolutions).
    `fused` (linear layers, forms `lora` and `centre_tap`, constant scale) runs base and
    branch as one `lowrank.kernels.lora_linear`: the fused Triton kernels on CUDA.
    `dropout` in [0, 1) drops the branch's input in training mode, kept values scaled by
    `1 / (1 − dropout)` (PEFT's `lora_dropout`; the base layer sees all of `x`).
    """

    def __init__(
        self,
        base: nn.Module,
        rank: Rank,
        alpha: float | None = None,
        *,
        form: str = "lora",
        scale: float | None = None,
        trainable_scale: bool = False,
        hard: bool = False,
        fused: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        spec = AdapterSpec(rank, form, alpha, scale, trainable_scale, hard, fused, dropout)
        check_fit(type(base).__name__, base, spec)
        in_features, out_features, kernel = layer_sizes(base)
        rank = require_rank(form, rank, minimum=1)
        r_out, r_in = rank if isinstance(rank, tuple) else (rank, rank)
        if alpha is not None and scale is not None:
            raise ArgumentError("give alpha or scale, not both")
        resolved = (
            scale_from_alpha(alpha, r_out)
            if alpha is not None
            else require_finite_scale(1.0 if scale is None else scale)
        )
        self.base = base
        self.form = require_form(form, allow_dense=False)
        self.rank = rank
        self.kernel_size = kernel
        self.hard = hard
        self.fused = fused
        self.dropout = float(dropout)
        self.merged = False
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        weight = base.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        if trainable_scale:
            self.scale: float | nn.Parameter = nn.Parameter(torch.tensor(resolved, **factory))
        else:
            self.scale = resolved

        def factor(*shape: int, zero: bool = False) -> nn.Parameter:
            tensor = torch.empty(shape, **factory)
            if zero:
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
            return nn.Parameter(tensor)

        ones = (1,) * len(kernel)
        if self.form in ("lora", "centre_tap"):
            down_kernel = kernel if self.form == "lora" else ones
            self.down = factor(r_out, in_features, *down_kernel)
            self.up = factor(out_features, r_out, *ones, zero=True)
        elif self.form == "tucker2":
            self.down = factor(r_in, in_features, *ones)
            self.mid = factor(r_out, r_in, *kernel)
            self.up = factor(out_features, r_out, *ones, zero=True)
        else:
            self.out_factor = factor(out_features, r_out, zero=True)
            self.in_factor = factor(in_features, r_out)
            self.spatial_factors = nn.ParameterList(factor(k, r_out) for k in kernel)

    def _factors(self, scale: float) -> Factors:
        if self.form in ("lora", "centre_tap"):
            return LoRA(self.down, self.up, scale)
        if self.form == "tucker2":
            return Tucker2(self.down, self.mid, self.up, scale)
        return CP(self.out_factor, self.in_factor, tuple(self.spatial_factors), None, scale)

    def factors(self) -> Factors:
        """The adapter as a `lowrank.forms` object (a `LoRA` with a 1×1 `down` for centre tap)."""
        scale = self.scale
        return self._factors(float(scale.detach()) if isinstance(scale, torch.Tensor) else scale)

    def delta_weight(self) -> torch.Tensor:
        """ΔW, shaped like `base.weight`, scale applied; differentiable in the factors."""
        delta = recompose(self._factors(1.0))
        if self.form == "centre_tap" and self.kernel_size:
            delta = centre_tap(delta, self.kernel_size)
        return delta * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the base weight in place; the forward then runs the base layer alone."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again, restoring it up to rounding."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`base(x) + scale · branch(x)`: `(…, in) → (…, out)` or `(N, in, *S) → (N, out, *S')`."""
        if self.merged:
            return self.base(x)
        if self.hard:
            return self._with_weight(x, self.base.weight + self.delta_weight())
        branch_input = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return self.base(x) + self._branch(branch_input) * self.scale

    def extra_repr(self) -> str:
        scale = "trainable" if isinstance(self.scale, nn.Parameter) else f"{self.scale:g}"
        extra = (", fused=True" if self.fused else "") + (
            f", dropout={self.dropout:g}" if self.dropout else ""
        )
        return f"form={self.form!r}, rank={self.rank}, scale={scale}, merged={self.merged}{extra}"


def _runs_as_plain_linear(module: nn.Module) -> bool:
    """Whether `module(x)` is exactly `F.linear(x, weight, bias)`: no forward or backward hooks
    of its own and no `forward` set on the instance (the class is checked by `check_fit`).
    Hooks registered for every module (`register_module_forward_hook`) are not seen."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
             module._backward_pre_hooks)  # fmt: skip
    return not (any(hooks) or "forward" in module.__dict__)


class LoRALinear(LowRankAdapter):
    """An adapter on an `nn.Linear` (`in → out`); every form (centre tap is plain LoRA here)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(…, in) → (…, out)`; with `fused`, unmerged, one `lora_linear` call, unless the
        base layer has hooks or a replaced `forward` (offloading wrappers), which only calling
        it runs."""
        base = self.base
        if self.fused and not self.merged and _runs_as_plain_linear(base):
            p = self.dropout if self.training else 0.0
            return lora_linear(x, base.weight, self.down, self.up, self.scale, base.bias, p)
        return super().forward(x)

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base.bias)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "cp":
            return F.linear(torch.matmul(x, self.in_factor), self.out_factor)
        hidden = F.linear(x, self.down)
        if self.form == "tucker2":
            hidden = F.linear(hidden, self.mid)
        return F.linear(hidden, self.up)


def _on_axis(value: Sequence[int], axis: int, default: int) -> tuple[int, ...]:
    return tuple(v if i == axis else default for i, v in enumerate(value))


class LoRAConv(LowRankAdapter):
    """An adapter on an `nn.Conv1d/2d/3d` (groups 1, zero padding) in any form."""

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base
        conv = conv_function(len(self.kernel_size))
        return conv(x, weight, base.bias, base.stride, base.padding, base.dilation)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        conv = conv_function(len(self.kernel_size))
        geometry = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        if self.form == "lora":
            return conv(conv(x, self.down, **geometry), self.up)
        if self.form == "centre_tap":
            return conv(conv(x, self.down), self.up)
        if self.form == "tucker2":
            return conv(conv(conv(x, self.down), self.mid, **geometry), self.up)
        return self._cp_branch(x, conv)

    def _cp_branch(self, x: torch.Tensor, conv: Callable[..., torch.Tensor]) -> torch.Tensor:
        """1×1 `in → R`, one depthwise convolution per spatial axis, 1×1 `R → out`."""
        base = self.base
        ones = (1,) * len(self.kernel_size)
        rank = self.in_factor.shape[1]
        hidden = conv(x, self.in_factor.t().reshape(rank, -1, *ones))
        for axis, spatial in enumerate(self.spatial_factors):
            shape = _on_axis(self.kernel_size, axis, 1)
            padding = (
                base.padding if isinstance(base.padding, str) else _on_axis(base.padding, axis, 0)
            )
            hidden = conv(
                hidden,
                spatial.t().reshape(rank, 1, *shape),
                stride=_on_axis(base.stride, axis, 1),
                padding=padding,
                dilation=_on_axis(base.dilation, axis, 1),
                groups=rank,
            )
        return conv(hidden, self.out_factor.reshape(self.out_factor.shape[0], rank, *ones))


def adapter_for(module: nn.Module, spec: AdapterSpec) -> LowRankAdapter:
    """The `LoRALinear` or `LoRAConv` that `spec` describes, wrapping `module`."""
    cls = LoRALinear if isinstance(module, nn.Linear) else LoRAConv
    return cls(
        module,
        spec.rank,
        spec.alpha,
        form=spec.form,
        scale=spec.scale,
        trainable_scale=spec.trainable_scale,
        hard=spec.hard,
        fused=spec.fused,
        dropout=spec.dropout,
    )


def inject(
    model: nn.Module,
    targets: Targets,
    rank: Rank | None = None,
    form: str = "lora",
    alpha: float | None = None,
    fused: bool = False,
    dropout: float = 0.0,
) -> list[str]:
    """Replace every module `targets` names with an adapter around it; return their names.

    Nested modules are replaced on their own parent (`model.get_submodule`), so dotted
    names such as `"down_blocks.0.attentions.0.proj_in"` work. Every parameter of
    `model` is frozen first, so only the adapters train. All targets are checked
    (`lowrank.targets.check_fit`) before anything is replaced. `fused=True` (or `"fused"`
    in a per-pattern dict) runs linear LoRA adapters through `lowrank.kernels.lora_linear`;
    a target that cannot run fused (a convolution, say) raises `TargetError`. `dropout` (or
    `"dropout"` per pattern) drops the adapters' branch input in training.
    """
    found = resolve_targets(
        model, targets, rank=rank, form=form, alpha=alpha, fused=fused, dropout=dropout
    )
    for target in found:
        check_fit(target.name, target.module, target.spec)
    model.requires_grad_(False)
    for target in found:
        parent_name, _, child = target.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, adapter_for(target.module, target.spec))
    return [target.name for target in found]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, frozen)` parameter counts of `model`, shared parameters counted once."""
    trainable = frozen = 0
    for parameter in model.parameters():
        if parameter.requires_grad:
            trainable += parameter.numel()
        else:
            frozen += parameter.numel()
    return trainable, frozen
