"""What each factor form is inside an adapter module: its parameters, their initialisation,
their dense ΔW and the branch it runs on a linear-like layer and on a convolution.

One `Variant` per form (`VARIANTS[form]`); adding a form is adding one class here and its
dataclass in `lowrank.forms` (recomposition and count). Shapes, for a layer `in → out`
with kernel `*k` (`()` for a linear layer), `groups` g (1 but for grouped convolutions,
which get one adapter of the rank per group) and unit axes `1…`:

| form | parameters |
|---|---|
| `lora` | `down (g·r, in/g, *k)`, `up (out, r, 1…)` |
| `centre_tap` | `down (r, in, 1…)`, `up (out, r, 1…)` |
| `tucker2` | `down (g·r_in, in/g, 1…)`, `mid (g·r_out, r_in, *k)`, `up (out, r_out, 1…)` |
| `cp` | `out_factor (out, R)`, `in_factor (in, R)`, `spatial_factors[i] (k_i, g·R)` |

The factor next to the output (`up`, `out_factor`) starts at zero and the others
Kaiming-uniform, so ΔW = 0 at first and the first backward reaches the zero factor.
Group j owns rows `j·out/g …` of the output factor and the j-th block of the others.
An adapter may instead start from given factors (`parameters_of` maps a `lowrank.forms`
object onto the parameters) or from the form of its rank nearest to the base weight
(`nearest`, PiSSA's start).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import decompose
from ..conv import centre_tap
from ..forms import CP, Factors, LoRA, Rank, Tucker2, as_lora, rank_pair

Conv = Callable[..., torch.Tensor]
Factorset = Mapping[str, torch.Tensor]
Sizes = tuple[int, int, tuple[int, ...], int]
Project = Callable[[torch.Tensor], torch.Tensor]


def init_factor(tensor: torch.Tensor, *, zero: bool = False) -> None:
    """Fill a factor in place as a new adapter starts it: zero (the output factor, so that
    ΔW = 0) or Kaiming-uniform with `a = √5`, as `nn.Linear` and PEFT draw theirs."""
    if zero:
        nn.init.zeros_(tensor)
    else:
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def _factor(shape: Sequence[int], factory: dict, *, zero: bool = False) -> nn.Parameter:
    tensor = torch.empty(tuple(shape), **factory)
    init_factor(tensor, zero=zero)
    return nn.Parameter(tensor)


def _on_axis(value: Sequence[int], axis: int, default: int) -> tuple[int, ...]:
    return tuple(v if i == axis else default for i, v in enumerate(value))


class Variant:
    """The module-side definition of one form (PEFT's `LoraVariant` idea).

    `create` registers the parameters on the adapter; `grouped` returns them with a leading
    group axis; `dense` is one group's ΔW; `linear` and `conv` run the branch.
    """

    name = ""
    # the number a saved state records for the form (`LowRankAdapter.get_extra_state`):
    # fixed, so that states of one version load in the next
    code = -1
    names: tuple[str, ...] = ()
    output = "up"
    # whether the conv branch reads inputs off each output's own position (the kernel's
    # off-centre taps), which the base's padding then supplies
    reads_borders = True

    def create(self, adapter: nn.Module, sizes: Sizes, rank: Rank, factory: dict) -> None:
        """Register the factors for a layer of `sizes = (in, out, kernel, groups)`."""
        raise NotImplementedError

    def grouped(self, factors: Factorset, groups: int) -> tuple[torch.Tensor, ...]:
        """The factors (`{name: tensor}`, the adapter's parameter names) with a leading
        `groups` axis, each slice one group's factors."""
        raise NotImplementedError

    def form(self, *factors: torch.Tensor) -> Factors:
        """One group's factors as a `lowrank.forms` object (scale 1)."""
        raise NotImplementedError

    def form_shape(self, dense_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the ΔW a `form` of this variant stands for, on a layer whose ΔW is
        `dense_shape`."""
        return dense_shape

    def parameters_of(self, form: Factors) -> dict[str, torch.Tensor] | None:
        """The factors of `form` under the adapter's parameter names (ungrouped, the form's
        scale left out), or `None` when `form` is no form of this variant."""
        raise NotImplementedError

    def nearest(self, weight: torch.Tensor, rank: Rank) -> Factors:
        """The form of `rank` nearest to `weight (out, in, *k)` in Frobenius norm (scale 1):
        the truncated SVD (`lowrank.decompose`) or its Tucker2 / CP counterpart."""
        raise NotImplementedError

    def dense(self, kernel: tuple[int, ...], *factors: torch.Tensor) -> torch.Tensor:
        """One group's ΔW `(out/g, in/g, *k)` at scale 1 (`kernel` is the layer's)."""
        return self.form(*factors).to_dense()

    def linear(self, adapter: nn.Module, project: Project) -> torch.Tensor:
        """The branch of a linear-like layer, `(…, out)`; `project(w)` maps the layer's input
        by a `(rank, in)` matrix `w` (a product, or an embedding lookup)."""
        raise NotImplementedError

    def conv(
        self, adapter: nn.Module, x: torch.Tensor, conv: Conv, geometry: dict, groups: int
    ) -> torch.Tensor:
        """The branch of a convolution `(N, in, *S) → (N, out, *S')`; `geometry` holds the
        base's `stride`, `padding` and `dilation`."""
        raise NotImplementedError


class LoRAVariant(Variant):
    """`up · down`: a k×k (base geometry) then a 1×1 convolution, or two products."""

    name = "lora"
    code = 0
    names = ("down", "up")

    def _down_kernel(self, kernel: tuple[int, ...]) -> tuple[int, ...]:
        return kernel

    def create(self, adapter: nn.Module, sizes: Sizes, rank: Rank, factory: dict) -> None:
        in_f, out_f, kernel, groups = sizes
        ones = (1,) * len(kernel)
        adapter.down = _factor((groups * rank, in_f // groups, *self._down_kernel(kernel)), factory)
        adapter.up = _factor((out_f, rank, *ones), factory, zero=True)

    def grouped(self, factors: Factorset, groups: int) -> tuple[torch.Tensor, ...]:
        down, up = factors["down"], factors["up"]
        return (
            down.reshape(groups, -1, *down.shape[1:]),
            up.reshape(groups, -1, *up.shape[1:]),
        )

    def form(self, down: torch.Tensor, up: torch.Tensor) -> Factors:
        return LoRA(down, up)

    def parameters_of(self, form: Factors) -> dict[str, torch.Tensor] | None:
        if not isinstance(form, (LoRA, Tucker2, CP)):
            return None
        lora = as_lora(form)
        return {"down": lora.down, "up": lora.up}

    def nearest(self, weight: torch.Tensor, rank: Rank) -> Factors:
        return decompose.svd(weight, rank)  # type: ignore[arg-type]

    def linear(self, adapter: nn.Module, project: Project) -> torch.Tensor:
        return F.linear(project(adapter.down), adapter.up)

    def conv(
        self, adapter: nn.Module, x: torch.Tensor, conv: Conv, geometry: dict, groups: int
    ) -> torch.Tensor:
        return conv(conv(x, adapter.down, groups=groups, **geometry), adapter.up, groups=groups)


class CentreTapVariant(LoRAVariant):
    """LoRA with a 1×1 `down`: two 1×1 convolutions, ΔW in the kernel's centre tap (only on
    size-keeping convolutions); plain LoRA on a linear layer."""

    name = "centre_tap"
    code = 1
    reads_borders = False

    def _down_kernel(self, kernel: tuple[int, ...]) -> tuple[int, ...]:
        return (1,) * len(kernel)

    def dense(self, kernel: tuple[int, ...], *factors: torch.Tensor) -> torch.Tensor:
        delta = super().dense(kernel, *factors)
        return centre_tap(delta, kernel) if kernel else delta

    def form_shape(self, dense_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*dense_shape[:2], *(1 for _ in dense_shape[2:]))

    def nearest(self, weight: torch.Tensor, rank: Rank) -> Factors:
        """The truncated SVD of the kernel's centre tap, the one tap ΔW reaches."""
        kernel = weight.shape[2:]
        tap = weight[(..., *(k // 2 for k in kernel))]
        lora = decompose.svd(tap, rank)  # type: ignore[arg-type]
        ones = (1,) * len(kernel)
        return LoRA(lora.down.reshape(*lora.down.shape, *ones),
                    lora.up.reshape(*lora.up.shape, *ones))  # fmt: skip

    def conv(
        self, adapter: nn.Module, x: torch.Tensor, conv: Conv, geometry: dict, groups: int
    ) -> torch.Tensor:
        return conv(conv(x, adapter.down, groups=groups), adapter.up, groups=groups)


class Tucker2Variant(Variant):
    """1×1 `down`, k×k `mid` (base geometry), 1×1 `up` (LyCORIS `lora_mid`)."""

    name = "tucker2"
    code = 2
    names = ("down", "mid", "up")

    def create(self, adapter: nn.Module, sizes: Sizes, rank: Rank, factory: dict) -> None:
        in_f, out_f, kernel, groups = sizes
        r_out, r_in = rank_pair(rank)
        ones = (1,) * len(kernel)
        adapter.down = _factor((groups * r_in, in_f // groups, *ones), factory)
        adapter.mid = _factor((groups * r_out, r_in, *kernel), factory)
        adapter.up = _factor((out_f, r_out, *ones), factory, zero=True)

    def grouped(self, factors: Factorset, groups: int) -> tuple[torch.Tensor, ...]:
        return tuple(
            factors[name].reshape(groups, -1, *factors[name].shape[1:]) for name in self.names
        )

    def form(self, down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor) -> Factors:
        return Tucker2(down, mid, up)

    def parameters_of(self, form: Factors) -> dict[str, torch.Tensor] | None:
        if not isinstance(form, Tucker2):
            return None
        return {"down": form.down, "mid": form.mid, "up": form.up}

    def nearest(self, weight: torch.Tensor, rank: Rank) -> Factors:
        return decompose.tucker2(weight, rank)

    def linear(self, adapter: nn.Module, project: Project) -> torch.Tensor:
        return F.linear(F.linear(project(adapter.down), adapter.mid), adapter.up)

    def conv(
        self, adapter: nn.Module, x: torch.Tensor, conv: Conv, geometry: dict, groups: int
    ) -> torch.Tensor:
        hidden = conv(x, adapter.down, groups=groups)
        hidden = conv(hidden, adapter.mid, groups=groups, **geometry)
        return conv(hidden, adapter.up, groups=groups)


class CPVariant(Variant):
    """Rank-R CP: a 1×1 `in → R`, one depthwise convolution per spatial axis, a 1×1 `R → out`
    (Lebedev et al. 2015)."""

    name = "cp"
    code = 3
    names = ("out_factor", "in_factor")
    output = "out_factor"

    def create(self, adapter: nn.Module, sizes: Sizes, rank: Rank, factory: dict) -> None:
        in_f, out_f, kernel, groups = sizes
        adapter.out_factor = _factor((out_f, rank), factory, zero=True)
        adapter.in_factor = _factor((in_f, rank), factory)
        adapter.spatial_factors = nn.ParameterList(
            _factor((k, groups * rank), factory) for k in kernel
        )

    def grouped(self, factors: Factorset, groups: int) -> tuple[torch.Tensor, ...]:
        out_factor, in_factor = factors["out_factor"], factors["in_factor"]
        rank = out_factor.shape[1]
        axes = sorted(int(k.rpartition(".")[2]) for k in factors if k.startswith("spatial"))
        spatial = (factors[f"spatial_factors.{axis}"] for axis in axes)
        return (
            out_factor.reshape(groups, -1, rank),
            in_factor.reshape(groups, -1, rank),
            *(s.reshape(s.shape[0], groups, rank).transpose(0, 1) for s in spatial),
        )

    def form(
        self, out_factor: torch.Tensor, in_factor: torch.Tensor, *spatial: torch.Tensor
    ) -> Factors:
        return CP(out_factor, in_factor, spatial)

    def parameters_of(self, form: Factors) -> dict[str, torch.Tensor] | None:
        if not isinstance(form, CP):
            return None
        tensors = {"out_factor": form.weighted_out(), "in_factor": form.in_factor}
        tensors.update({f"spatial_factors.{i}": f for i, f in enumerate(form.spatial_factors)})
        return tensors

    def nearest(self, weight: torch.Tensor, rank: Rank) -> Factors:
        return decompose.cp(weight, rank)  # type: ignore[arg-type]

    def linear(self, adapter: nn.Module, project: Project) -> torch.Tensor:
        return F.linear(project(adapter.in_factor.t()), adapter.out_factor)

    def conv(
        self, adapter: nn.Module, x: torch.Tensor, conv: Conv, geometry: dict, groups: int
    ) -> torch.Tensor:
        kernel = tuple(s.shape[0] for s in adapter.spatial_factors)
        ones = (1,) * len(kernel)
        rank = adapter.out_factor.shape[1]
        in_factor = adapter.in_factor.reshape(groups, -1, rank).transpose(1, 2)
        hidden = conv(x, in_factor.reshape(groups * rank, -1, *ones), groups=groups)
        stride, padding, dilation = geometry["stride"], geometry["padding"], geometry["dilation"]
        for axis, spatial in enumerate(adapter.spatial_factors):
            hidden = conv(
                hidden,
                spatial.t().reshape(groups * rank, 1, *_on_axis(kernel, axis, 1)),
                stride=_on_axis(stride, axis, 1),
                padding=padding if isinstance(padding, str) else _on_axis(padding, axis, 0),
                dilation=_on_axis(dilation, axis, 1),
                groups=groups * rank,
            )
        out_factor = adapter.out_factor.reshape(adapter.out_factor.shape[0], rank, *ones)
        return conv(hidden, out_factor, groups=groups)


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (LoRAVariant(), CentreTapVariant(), Tucker2Variant(), CPVariant())
}
