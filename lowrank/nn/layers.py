"""Adapter modules: a frozen layer plus trainable low-rank factors of one form.

`LoRALinear` (`nn.Linear`), `LoRAConv` (`nn.Conv1d/2d/3d`, grouped and depthwise ones
included), `LoRAEmbedding` (`nn.Embedding`) and `LoRAConv1D` (transformers' `Conv1D`, a
linear layer storing its weight as `(in, out)`). Each output is `base(x) + scale · branch(x)`,
which equals the base layer with weight `W + ΔW` (`delta_weight()`, in the base weight's
layout); the factors are those of `lowrank.nn.variants`. `merge()` writes `W + ΔW` into the
base weight, computed in float32 and checked finite first; `unmerge()` takes it out again,
bit-exactly when the merge kept a copy (`merge(exact=True)`). The merged state, the start
and a fixed scale are part of `state_dict()` (key `_extra_state`), and a state dict of the
un-adapted layer (`weight`, `bias`) loads into the base (`lowrank.nn.state`); which layers
fit which settings is `lowrank.nn.fit`'s. An adapter may start from given
factors or, with `init="pissa"`, from the form nearest to W, its base then holding
`W − ΔW₀`. With `dora=True` a magnitude `m (out,)` scales each output channel of
`W + ΔW` by `m / ‖W + ΔW‖` (PEFT's DoRA; `docs/nn.md`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from .._checks import (
    all_finite,
    not_a_tensor,
    overflow_bound,
    require_finite,
    require_shapes,
    work_dtype,
)
from .._factor_space import root
from .._products import scaled
from .._tensors import gathered, outside_autocast, sharded_like
from ..conv import check_centre_tap, conv_function
from ..errors import (
    ArgumentError,
    DTypeError,
    GeometryError,
    MergeError,
    NonFiniteError,
    ShapeError,
    TargetError,
)
from ..forms import Factors
from ..kernels import lora_linear
from .config import AdapterConfig
from .fit import COMPUTING_HOOKS, check_fit, layer_sizes, weight_is_computed
from .reuse import Reuse, trackable
from .state import apply_loaded_state, map_base_keys, save_as_merged
from .ties import current_ties
from .variants import VARIANTS, Factorset, Variant, init_factor

_PENDING: ContextVar[list | None] = ContextVar("lowrank_pending_residuals", default=None)


@contextmanager
def deferred_residuals() -> Iterator[list]:
    """Within, an adapter built with `init="pissa"` checks `W − ΔW₀` but leaves its base
    weight as it is and appends itself to the yielded list; the caller writes the residuals
    (`LowRankAdapter.write_residual`) once every adapter it builds has succeeded."""
    pending: list = []
    token = _PENDING.set(pending)
    try:
        yield pending
    finally:
        _PENDING.reset(token)


_INPUTS = (torch.Tensor, torch.fx.Proxy)
"""What an adapter's forward takes: a tensor, or the proxy `torch.fx.symbolic_trace` passes
for one while it traces the model."""


def _zero_d(scale: float | torch.Tensor) -> float | torch.Tensor:
    """A trainable `(1,)` scale as a 0-d view: a 0-d tensor never promotes a product's dtype,
    so a bf16 branch under autocast stays bf16, as with a constant scale."""
    return scale.reshape(()) if isinstance(scale, torch.Tensor) else scale


def _fitting_branch(out: torch.Tensor, branch: torch.Tensor, base: str) -> torch.Tensor:
    """`branch`, the adapter's output over a base layer (class `base`) with a forward of its
    own, where its shape is that of the base's output `out`; else `TargetError` (that forward
    pads otherwise, say, which the branch cannot follow, and a sum would broadcast).
    Wrapped for torch.fx, so a traced graph checks the shapes of each call."""
    if branch.shape != out.shape:
        raise TargetError(
            f"the base layer ({base}) gave an output of shape {tuple(out.shape)} but the "
            f"adapter's branch {tuple(branch.shape)}: its forward computes something else than "
            "its weight and settings describe, which the branch cannot follow"
        )
    return branch


torch.fx.wrap("_fitting_branch")


def _require_input_alone(adapter: str, base: str, args: tuple, kwargs: dict) -> None:
    """`TargetError` where an adapter (class `adapter` over a layer of class `base`) was
    called with arguments beyond its input. Wrapped for torch.fx: an adapter traced as the
    root of a graph has `*args` and `**kwargs` placeholders, checked at each call."""
    if args or kwargs:
        given = [type(a).__name__ for a in args] + [f"{k}=" for k in kwargs]
        raise TargetError(
            f"{adapter} over {base} was called with arguments beyond its input x "
            f"({', '.join(given)}): that layer's forward computes from more than x, which the "
            "adapter's branch, ΔW applied to x, cannot follow; leave it out of the targets"
        )


torch.fx.wrap("_require_input_alone")


class LowRankAdapter(nn.Module):
    """A frozen base layer with a trainable low-rank update of one form.

    Built from an `AdapterConfig` (`config=`) and/or its fields by keyword:
    `LoRALinear(base, 8, alpha=16, form="lora", dropout=0.1)`. The factors (shapes in
    `lowrank.nn.variants`) take the base weight's device and its dtype, or `factor_dtype`'s
    where given; the base's parameters
    are frozen. `weight` and `bias` are the effective ones (`W + ΔW` unless merged), for
    parents that read a child's weight instead of calling it (`nn.MultiheadAttention`).
    `merged`, `residual` and a fixed scale are saved in `state_dict()` (`get_extra_state`)
    and checked and restored on load. `disabled` (set by `lowrank.nn.disable_adapters`)
    runs the base layer alone.
    """

    # the base layer alone in `forward` and `weight`; a class default, so that an adapter
    # object made before the flag existed reads it too
    disabled: bool = False

    def __init__(
        self,
        base: nn.Module,
        rank: int | tuple[int, int] | None = None,
        alpha: float | None = None,
        *,
        config: AdapterConfig | None = None,
        factors: Factors | None = None,
        **settings: object,
    ) -> None:
        super().__init__()
        given = {"rank": rank, "alpha": alpha}
        settings.update({key: value for key, value in given.items() if value is not None})
        config = check_fit(type(base).__name__, base, AdapterConfig.build(config, **settings))
        if not isinstance(self, adapter_class(base)):
            raise TargetError(
                f"{type(self).__name__} cannot wrap a {type(base).__name__}: use "
                f"{adapter_class(base).__name__} (or lowrank.nn.inject)"
            )
        self.base = base
        try:
            self._build(config, factors)
        except BaseException:
            # a failed adapter (kept alive by its traceback) holds no layer that a later
            # merge would take for one a second module runs
            del self.base
            raise

    def _build(self, config: AdapterConfig, factors: Factors | None) -> None:
        """The rest of `__init__` once `base` is set: factors, scale, start, hooks."""
        base = self.base
        self.config = config
        self.sizes = layer_sizes(base)
        self.merged = False
        self.residual = False
        self.shares_weight_with: tuple[str, ...] = ()
        self.register_buffer("base_copy", None, persistent=False)
        self.merged_factors: dict[str, torch.Tensor] | None = None
        self.dora_reuse = Reuse()  # DoRA's factor m / ‖W + ΔW‖, reused in inference
        weight = base.weight
        dtype = config.factor_dtype or weight.dtype
        factory = {"device": weight.device, "dtype": dtype}
        scale = config.resolved_scale()
        # a trainable scale is stored in the factors' dtype; a fixed one multiplies in the
        # dtype torch computes that dtype's products in (float32 for half precision), and
        # the fused kernel splits it between operands where neither overflows
        held = dtype if config.trainable_scale else work_dtype(dtype)
        if not abs(scale) < overflow_bound(held):
            how = "stored" if config.trainable_scale else "applied"
            raise DTypeError(
                f"scale {scale:g} (alpha / r or the scale given) is beyond {held}, in which "
                f"the adapter on {type(base).__name__} ({dtype} factors) holds it "
                f"{how} (largest {torch.finfo(held).max:g}): it would be Inf, and every "
                "output NaN or Inf; choose a smaller alpha or scale, or a wider dtype"
            )
        # a trainable scale is one element of shape (1,), as FSDP2 takes no 0-d parameter
        self.scale: float | nn.Parameter = (
            nn.Parameter(torch.tensor([scale], **factory)) if config.trainable_scale else scale
        )
        sizes = self.sizes
        self.variant.create(
            self, (sizes.in_features, sizes.out_features, sizes.kernel, sizes.groups),
            config.rank, factory,
        )  # fmt: skip
        # the shapes ΔW is computed from and written into, as built (`_sum_is_finite`)
        self.built_shapes = {n: tuple(t.shape) for n, t in self.factor_tensors().items()}
        self.built_shapes["base.weight"] = tuple(weight.shape)
        if factors is not None or config.init == "pissa":
            self._start(factors)
        if config.dora:
            # m starts at ‖W + ΔW₀‖, so the layer starts as W + ΔW₀ (PEFT's start)
            with torch.no_grad():
                norm = self.dora_norm(weight, None, work_dtype(self.up.dtype))
            self.magnitude = nn.Parameter(norm.to(self.up.dtype))
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        # the mode of the layer it stands for: dropout only where the model is training
        self.training = base.training
        self.register_state_dict_post_hook(save_as_merged)
        self.register_load_state_dict_pre_hook(map_base_keys)
        self.register_load_state_dict_post_hook(apply_loaded_state)

    def _start(self, form: Factors | None) -> None:
        """Set the factors to `form` (with `init="pissa"` and no form: the form nearest to
        W) so that the adapter's ΔW₀ equals `form`'s; with `init="pissa"`, then write
        `W − ΔW₀` (computed in float32, rounded once) into the base weight, or leave it to
        the caller inside `deferred_residuals`. Checks everything before writing the base."""
        start = self.initial_factors(form)
        with torch.no_grad():
            for name, tensor in start.items():
                self.get_parameter(name).copy_(tensor)
        if self.config.init != "pissa":
            return
        try:
            self.check_mergeable()
        except MergeError as err:
            raise TargetError(f"init='pissa' writes W − ΔW₀ into the base weight: {err}") from None
        pending = _PENDING.get()
        if pending is None:
            self.write_residual()
        else:
            self.check_merged_weight(self.base.weight, sign=-1)
            pending.append(self)

    @torch.no_grad()
    def write_residual(self) -> None:
        """Replace the base weight W by `W − ΔW` of the current factors (the `init="pissa"`
        start), rounded once; `NonFiniteError` and nothing written if it overflows,
        `MergeError` if the base already holds a residual."""
        if self.residual:
            raise MergeError(
                "the base weight already holds W − ΔW₀; subtracting ΔW again would lose it"
            )
        weight = self.base.weight
        self._sum(weight, None, -1, proven=self._sum_is_finite(weight, None, -1), write=True)
        self.residual = True

    def initial_factors(self, form: Factors | None) -> dict[str, torch.Tensor]:
        """`form`'s factors as this adapter's parameters (`{name: tensor}`, their dtype),
        rescaled so that `scale · branch` has `form`'s ΔW: the ratio `form.scale / scale`
        is split evenly over the factors in magnitude, its sign going to the output factor.
        `None` (with `init="pissa"`) takes `variant.nearest` of the base weight (gathered
        whole where FSDP2 shards it) at the adapter's rank. Raises `TargetError` (grouped
        convolutions), `DTypeError` (a form this variant cannot hold), `ShapeError` (a ΔW
        or factor shape that does not fit), `ArgumentError` (a zero adapter scale) or
        `NonFiniteError` (NaN/Inf, or a ΔW beyond the adapter's dtype)."""
        if self.groups != 1:
            raise TargetError(
                f"initial factors for a grouped convolution ({self.groups} groups, one factor "
                "set each) are not supported; start it from zero"
            )
        if form is None:
            weight = self.to_weight_layout(gathered(self.base.weight.detach()))
            if weight.is_meta:
                raise TargetError(
                    "init='pissa' needs the base weight's values, not the meta device"
                )
            with outside_autocast(weight):
                form = self.variant.nearest(weight, self.rank)
        tensors = self.variant.parameters_of(form)
        if tensors is None:
            raise DTypeError(
                f"a {self.form!r} adapter cannot start from a {type(form).__name__} form"
            )
        expected = self.variant.form_shape(self.sizes.dense_shape)
        if tuple(form.shape) != expected:
            raise ShapeError(
                f"initial factors stand for ΔW of shape {tuple(form.shape)}, but a "
                f"{self.form!r} adapter of this layer needs {expected}"
            )
        own = self.factor_tensors()
        current = float(self.scale.detach()) if isinstance(self.scale, torch.Tensor) else self.scale
        if current == 0 and form.scale != 0:
            raise ArgumentError("the adapter's scale is 0, so no factors give it a nonzero ΔW")
        ratio = form.scale / current if current != 0 else 1.0  # both 0: ΔW = 0 either way
        share = root(abs(ratio), len(tensors))  # shares multiply back to |ratio| to ulps
        start = {}
        for name, tensor in tensors.items():
            target = own[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ShapeError(
                    f"initial factor {name!r} has shape {tuple(tensor.shape)}, but the adapter's "
                    f"is {tuple(target.shape)} (rank {self.rank})"
                )
            signed = -share if ratio < 0 and name == self.variant.output else share
            value = tensor.to(work_dtype(tensor.dtype)) * signed
            start[name] = value.to(target)
            # in the adapter's dtype where it holds values (a meta adapter holds none)
            checked = value if start[name].is_meta else start[name]
            if not checked.is_meta:
                require_finite(f"initial factor {name!r}", checked)
        self._require_delta_fits(start)
        return start

    def _require_delta_fits(self, start: dict[str, torch.Tensor]) -> None:
        """`NonFiniteError` unless the ΔW of factors `start` (computed in float32, float64
        for float64 factors) fits their dtype, in which the adapter's branch adds it."""
        dtype = next(iter(start.values())).dtype
        if any(t.is_meta for t in start.values()):
            return
        with torch.no_grad(), outside_autocast(next(iter(start.values()))):
            delta = self.delta(start, work_dtype(dtype))
            low, high = torch.aminmax(delta) if delta.numel() else (torch.zeros(()),) * 2
        largest = max(-float(low), float(high))  # NaN if ΔW holds one
        if not largest < overflow_bound(dtype):
            raise NonFiniteError(
                f"the initial factors give ΔW up to {largest:.4g} in magnitude, beyond "
                f"{dtype}, the adapter's dtype"
            )

    @property
    def variant(self) -> Variant:
        """The form's definition (`lowrank.nn.variants.VARIANTS[form]`)."""
        return VARIANTS[self.config.form]

    @property
    def form(self) -> str:
        """The factor form's name."""
        return self.config.form

    @property
    def rank(self) -> int | tuple[int, int]:
        """The rank (a pair `(r_out, r_in)` for Tucker2)."""
        return self.config.rank  # type: ignore[return-value]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """The base kernel (`()` for linear-like layers)."""
        return self.sizes.kernel

    @property
    def groups(self) -> int:
        """The base convolution's groups (one adapter of the rank per group)."""
        return self.sizes.groups

    @property
    def hard(self) -> bool:
        """Whether the update runs in weight space."""
        return self.config.hard

    @property
    def dora(self) -> bool:
        """Whether a magnitude per output channel scales the updated weight (DoRA)."""
        return self.config.dora

    @property
    def fused(self) -> bool:
        """Whether a linear LoRA runs as one `lora_linear` call."""
        return self.config.fused

    @property
    def dropout(self) -> float:
        """Dropout probability of the branch input in training."""
        return self.config.dropout

    @property
    def num_params(self) -> int:
        """Trainable adapter parameters: `lowrank.param_count` of the form (+`out` for a
        DoRA magnitude, +1 for a trainable scale)."""
        return self.sizes.adapter_params(self.config)

    def factor_tensors(self) -> dict[str, torch.Tensor]:
        """`{name: parameter}` of the factors (no base weights, no scale, no DoRA
        magnitude)."""
        return {
            name: param
            for name, param in self.named_parameters()
            if not name.startswith("base.") and name not in ("scale", "magnitude")
        }

    def reset_parameters(self) -> None:
        """Draw the factors again as a new adapter starts them: the output factor (`up`, CP's
        `out_factor`) zero, the others Kaiming-uniform, so ΔW = 0; a trainable scale back to
        the settings' value. For a model built on the meta device and materialised with
        `to_empty`, whose factors hold whatever memory they got; a DoRA magnitude back to
        ‖W‖ of the base's current weight. The base layer is left to its
        own `reset_parameters`. A merged adapter, or one whose base holds `W − ΔW₀`
        (`init="pissa"`), is a `MergeError`: its base depends on the factors."""
        if self.merged or self.residual:
            state = "merged" if self.merged else "started from init='pissa'"
            raise MergeError(
                f"this adapter is {state}, so its base weight holds its factors' ΔW; new "
                "factors would change the layer (unmerge first, or build a new adapter)"
            )
        output = self.variant.output
        with torch.no_grad():
            for name, factor in self.factor_tensors().items():
                init_factor(factor, zero=name == output)
            if isinstance(self.scale, nn.Parameter):
                self.scale.fill_(self.config.resolved_scale())
            if self.dora:
                weight = self.base.weight
                self.magnitude.copy_(self.dora_norm(weight, None, work_dtype(weight.dtype)))

    def get_extra_state(self) -> torch.Tensor:
        """The adapter's state beside its tensors, saved as `<name>._extra_state`: `[merged,
        residual, trainable, scale, form]` (float64, on the host) — whether the base weight
        holds W + ΔW, whether it holds `W − ΔW₀` of a PiSSA start, whether the scale is
        trainable (0 or 1), the fixed scale (0 for a trainable one, saved as its own `scale`
        entry) and the form's `Variant.code`. torch's distributed state-dict tools map the
        key with the module's own, and a load checks a state against it (`refuse_load`)."""
        trainable = isinstance(self.scale, nn.Parameter)
        fixed = 0.0 if trainable else float(self.scale)
        flags = [float(self.merged), float(self.residual), float(trainable), fixed]
        flags.append(float(self.variant.code))
        return torch.tensor(flags, dtype=torch.float64, device="cpu")

    def set_extra_state(self, state: object) -> None:
        """Nothing to do: the load hooks read `state` (`saved_state`) before torch calls this,
        and set the flags once the tensors are loaded."""

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The factors, `scale` where trainable and DoRA's `magnitude` `(out,)`: what
        `adapter_state_dict` saves."""
        tensors = self.factor_tensors()
        if isinstance(self.scale, nn.Parameter):
            tensors["scale"] = self.scale
        if "magnitude" in self._parameters:  # DoRA's, once built
            tensors["magnitude"] = self.magnitude
        return tensors

    def plain_tensors(self) -> Factorset:
        """`adapter_tensors`, or a `TargetError` where a factor is computed (a
        parametrization, pruning or an old-style weight/spectral norm hook on the adapter
        itself): the branch's forward runs it, but ΔW as a weight needs the factors as they
        are stored."""
        computed = set(self.parametrizations) if parametrize.is_parametrized(self) else set()
        for hook in self._forward_pre_hooks.values():
            if isinstance(hook, COMPUTING_HOOKS):
                computed.add(getattr(hook, "name", None) or getattr(hook, "_tensor_name", "?"))
        if computed:
            raise TargetError(
                f"{type(self).__name__}: factor(s) {sorted(computed)} are computed (a "
                "parametrization, pruning or weight/spectral norm on the adapter), which ΔW as "
                "a weight (a merge, a swap, an adapter file, a weight-space forward) cannot "
                "read; make them plain first (torch.nn.utils.parametrize."
                "remove_parametrizations, torch.nn.utils.prune.remove, "
                "torch.nn.utils.remove_weight_norm)"
            )
        return self.adapter_tensors()

    def _whole(self, factors: Factorset) -> dict[str, torch.Tensor]:
        """`factors` gathered whole (FSDP2's DTensors, a collective: the products of unevenly
        sharded factors do not propagate as DTensors), each of the shape it was built with
        (`ShapeError` naming it: a factor replaced by one of another shape would not split
        into its groups, nor fit the others; an adapter pickled before the shapes were kept
        has none to check)."""
        whole = {key: gathered(tensor) for key, tensor in factors.items()}
        require_shapes(f"{type(self).__name__}'s factor", whole,
                       getattr(self, "built_shapes", {}))  # fmt: skip
        return whole

    def factors(self, factors: Factorset | None = None) -> Factors:
        """The adapter (or `factors`, as `adapter_tensors` gives them: a `scale` entry
        replaces the trainable scale) as a `lowrank.forms` object, scale applied (ungrouped
        layers only; a centre tap is a `LoRA` with a 1×1 `down`). Factors sharded by FSDP2
        (DTensors) are gathered whole, a collective: call it on every rank."""
        if self.groups != 1:
            raise TargetError(
                f"this adapter has one factor set per group ({self.groups} groups); "
                "delta_weight() gives their block-diagonal ΔW"
            )
        # a sharded scale's one element is on one rank only: gathered, every rank has it
        factors = self._whole(factors if factors is not None else self.plain_tensors())
        scale = factors["scale"] if "scale" in factors else gathered(self.scale)
        value = float(scale.detach()) if isinstance(scale, torch.Tensor) else scale
        tensors = self.variant.grouped({k: t for k, t in factors.items() if k != "scale"}, 1)
        return dataclasses.replace(self.variant.form(*(t[0] for t in tensors)), scale=value)

    def delta(
        self, factors: Factorset | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """ΔW `(out, in/groups, *k)` of `factors` (default: the adapter's own; a `scale`
        entry replaces the trainable scale), scale applied, in `dtype` (default: the
        factors'), whole (factors sharded by FSDP2 are gathered, a collective): the product
        of the factors summed in `work_dtype` (float32 for float16 and bfloat16), multiplied
        by the scale, fixed or trainable, there and rounded once (under autocast, in the
        dtype autocast runs the product in); differentiable, the gradients of half-precision
        factors and scale formed in float32 and rounded once."""
        factors = factors or self.plain_tensors()
        dtype = dtype or factors[self.variant.output].dtype
        work = dtype if dtype.is_complex else work_dtype(dtype)  # complex as it is
        delta, scale = self._unscaled_delta(factors, work)
        # autocast may have run the product in its narrower dtype, which ΔW then keeps
        return scaled(delta, scale).to(dtype if delta.dtype == work else delta.dtype)

    def _unscaled_delta(
        self, factors: Factorset | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """ΔW `(out, in/groups, *k)` of `factors` (as for `delta`) at scale 1, computed from
        the factors cast to `dtype`, and the scale it multiplies (a 0-d tensor in `dtype`
        where trainable)."""
        factors = self._whole(factors or self.plain_tensors())
        tensors = tuple(t.to(dtype) for t in self.variant.grouped(factors, self.groups))
        dense = functools.partial(self.variant.dense, self.kernel_size)
        if self.groups == 1:
            delta = dense(*(t[0] for t in tensors))
        else:
            delta = torch.vmap(dense)(*tensors).flatten(0, 1)
        scale = _zero_d(factors["scale"] if "scale" in factors else gathered(self.scale))
        if isinstance(scale, torch.Tensor):
            scale = scale.to(dtype)
        return delta, scale

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW `(out, in, *k)` in the layout of the base weight (the same, but for embeddings
        and Conv1D, which store `(in, out)`)."""
        return delta

    def delta_weight(self) -> torch.Tensor:
        """ΔW shaped like `base.weight`, scale applied (summed and scaled in float32 for
        half-precision factors and rounded once, as `delta`); differentiable in the factors
        and a trainable scale."""
        return self.to_weight_layout(self.delta())

    def __setattr__(self, name: str, value: object) -> None:
        """Assigning `weight` assigns the base layer's: code that ties the layer it finds in
        a model's place to another (transformers' `tie_weights()` of an adapted LM head)
        ties the base, and the merge checks then see the tie. A merged adapter refuses it
        (`MergeError`): the new weight would hold no ΔW for `unmerge` to take back out.
        Assigning `bias` is a `TargetError`: code that assigns both (torch's
        `fuse_conv_bn_eval`) computes them from the effective weight `W + ΔW`, which the
        branch would then add to a second time."""
        if name == "bias" and "base" in self._modules:
            raise TargetError(
                f"cannot assign the bias of a {type(self).__name__}: code that rewrites a "
                "layer's weight and bias (fusing a batch norm into a convolution, say) computes "
                "them from W + ΔW, to which the branch would add ΔW again; call "
                "lowrank.nn.merge_and_unload first, or assign the base layer's (adapter.base.bias)"
            )
        if name == "weight" and "base" in self._modules:
            if self.merged:
                raise MergeError(
                    f"cannot assign the weight of a merged {type(self).__name__}: unmerge it "
                    "first (the new weight holds no ΔW to take back out)"
                )
            setattr(self._modules["base"], name, value)
        else:
            super().__setattr__(name, value)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight: `base.weight` when merged, else `base.weight + ΔW` (with
        `dora`, `m ⊙ (W + ΔW) / ‖W + ΔW‖`, the norm not differentiated; a weight FSDP2
        shards is then gathered whole, a collective, and each rank gets its own part);
        `base.weight` while `disabled` (`MergeError` if merged then)."""
        if self.disabled:
            self._require_unmerged_while_disabled()
            return self.base.weight
        if self.merged:
            return self.base.weight
        weight = self.base.weight
        if not self.dora:
            return weight + sharded_like(self.delta_weight().to(weight.dtype), weight)
        # the norm of each output channel spans every shard (FSDP2): computed whole, and
        # each rank keeps its own part of the result
        whole = gathered(weight)
        updated = whole + self.delta_weight().to(weight.dtype)
        with torch.no_grad():
            norm = self.dora_norm(whole, None, work_dtype(weight.dtype))
        magnitude = gathered(self.magnitude)
        factor = self._per_channel(magnitude / norm.to(magnitude.dtype), weight.ndim - 1)
        # channels first in ΔW's `(out, in, *k)` layout, which is its own inverse
        result = self.to_weight_layout(factor * self.to_weight_layout(updated)).to(weight.dtype)
        return sharded_like(result, weight)

    @staticmethod
    def _per_channel(values: torch.Tensor, trailing: int) -> torch.Tensor:
        """`values (out,)` shaped `(out, 1…)` with `trailing` unit axes, to multiply the
        output channels of a weight (`weight.ndim − 1`) or a layer's output (the kernel's
        axes: none for a linear layer, whose channels are last)."""
        return values.reshape(-1, *(1,) * trailing)

    def dora_norm(
        self, weight: torch.Tensor, factors: Factorset | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """`‖W + s·ΔW‖ (out,)` in `dtype`: the norm of each output channel of the updated
        weight (over its input and kernel axes), ΔW of `factors` (default: the adapter's)."""
        return self._dora_updated(weight, factors, dtype)[1]

    def _dora_updated(
        self, weight: torch.Tensor, factors: Factorset | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(W + s·ΔW, its norm per output channel (out,))`, both in `dtype`, the first in
        ΔW's `(out, in, *k)` layout (a `Conv1D`'s weight `(in, out)` transposed); whole where
        FSDP2 shards `weight` (gathered, a collective)."""
        delta, scale = self._unscaled_delta(factors, dtype)
        weight = self.to_weight_layout(gathered(weight))  # the layout swap is its own inverse
        if delta.shape != weight.shape:
            raise ShapeError(
                f"{type(self.base).__name__}'s weight has shape {tuple(weight.shape)} (as "
                f"(out, in, *k)), but the factors' ΔW has {tuple(delta.shape)} (a weight or "
                "factor replaced by one of another shape?)"
            )
        updated = weight.to(dtype) + scale * delta
        return updated, torch.linalg.vector_norm(updated, dim=tuple(range(1, updated.ndim)))

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return getattr(self.base, "bias", None)

    def check_mergeable(self) -> None:
        """Raise `MergeError` if writing into the base weight would be wrong: the weight is
        tied to another module's (`shares_weight_with`, set by `inject`) or computed, or the
        base's class has its own `forward` beside an unfused branch (`W + ΔW` in its weight
        equals the branch only where that forward is the plain operation of its weight), or
        it cannot be written here (`check_writable`)."""
        base = self.base
        self.check_writable()
        computed = weight_is_computed(base)
        if computed:
            raise MergeError(
                f"cannot merge into {type(base).__name__}: {computed}, so W + ΔW would be "
                "lost or distorted; remove it first (torch.nn.utils.parametrize."
                "remove_parametrizations, torch.nn.utils.prune.remove, "
                "torch.nn.utils.remove_weight_norm) or keep the adapter unmerged"
            )
        if self.shares_weight_with:
            raise MergeError(
                f"cannot merge into {type(base).__name__}: its weight is also "
                f"{', '.join(map(repr, self.shares_weight_with))} (tied weights), which "
                "merging would change too; untie them or keep the adapter unmerged"
            )
        unplain = None if self.hard else _unplain(base)
        mismatch = None if unplain is None else self._merge_mismatch()
        if mismatch is not None:
            raise MergeError(
                f"cannot merge into {type(base).__name__} ({unplain}): {mismatch}; keep the "
                "adapter unmerged, or build it with hard=True, which runs that forward with "
                "W + ΔW"
            )

    def check_unmergeable(self) -> None:
        """`MergeError` where taking ΔW out of the base weight would be lost: the weight has
        become computed since the merge (pruning, `weight_norm`, a parametrization), so a
        write would reach a temporary and leave W + ΔW stored; or `check_writable`."""
        self.check_writable()
        computed = weight_is_computed(self.base)
        if computed:
            raise MergeError(
                f"cannot unmerge from {type(self.base).__name__}: {computed} since the merge, "
                "so W − ΔW would be written into a temporary and W + ΔW stay stored; remove it "
                "first (torch.nn.utils.parametrize.remove_parametrizations, "
                "torch.nn.utils.prune.remove, torch.nn.utils.remove_weight_norm), then unmerge"
            )

    def check_writable(self) -> None:
        """`MergeError` where the base weight cannot be written in place here: a tensor made
        under `torch.inference_mode()`, written outside it; or no tensor at all (a layer
        swapped for a quantized one, whose `weight` is a method)."""
        weight = getattr(self.base, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise MergeError(
                f"cannot write into {type(self.base).__name__}'s weight: it is a "
                f"{type(weight).__name__}, not a tensor (a quantized layer?); merge before "
                "quantizing"
            )
        if weight.is_inference() and not torch.is_inference_mode_enabled():
            raise MergeError(
                f"cannot write into {type(self.base).__name__}'s weight: it was made under "
                "torch.inference_mode(), so it can be written only there; merge inside "
                "inference mode, or load the base outside it"
            )

    def merged_weight(
        self, weight: torch.Tensor, factors: Factorset | None = None, *, sign: int = 1
    ) -> torch.Tensor:
        """`weight ± ΔW`, computed in float32 (float64 for a float64 weight) and rounded
        once to the weight's dtype; `NonFiniteError` if ΔW holds NaN/Inf or the sum
        overflows the dtype where `weight` was finite. `W − ΔW` of a merged adapter takes out
        the ΔW its merge put in (`merged_factors`), whatever happened to its factors since
        (an optimiser step, say)."""
        proven = self._sum_is_finite(weight, factors, sign)
        return self._sum(weight, factors, sign, proven=proven, write=False)

    def _sum(
        self,
        weight: torch.Tensor,
        factors: Factorset | None,
        sign: int,
        *,
        proven: bool,
        write: bool,
    ) -> torch.Tensor:
        """`merged_weight`, written into `weight` in place where `write` (and then returned);
        `proven` (`_sum_is_finite`) skips the checks for NaN/Inf, which a bound has ruled
        out. Raises before writing anything."""
        if not weight.is_floating_point():
            raise DTypeError(
                f"cannot merge into {type(self.base).__name__}: its weight is {weight.dtype}, and "
                "a merge writes real floating weights; keep the adapter unmerged"
            )
        if factors is None and sign < 0 and self.merged_factors is not None:
            factors = {k: t.to(weight.device) for k, t in self.merged_factors.items()}
        if self.dora:
            return self._written(weight, self._dora_sum(weight, factors, sign), write)
        accumulate = work_dtype(weight.dtype)
        with torch.no_grad(), outside_autocast(weight):
            dense, scale = self._unscaled_delta(factors, accumulate)
            dense = self.to_weight_layout(dense)
            if dense.shape != weight.shape:
                raise ShapeError(
                    f"cannot merge into {type(self.base).__name__}: its weight has shape "
                    f"{tuple(weight.shape)}, but the factors' ΔW has {tuple(dense.shape)} (a "
                    "weight or factor replaced by one of another shape?)"
                )
            dense = sharded_like(dense, weight)  # a sharded weight's own part of ΔW
            if dense.is_meta:
                result = torch.add(weight.to(accumulate), dense * scale, alpha=sign)
                return self._written(weight, result.to(weight.dtype), write)
            # the scale multiplies inside the sum (its alpha): W ± s·ΔW₁ in one pass over ΔW
            alpha = sign * float(scale)
            if proven:
                if write and dense.dtype == weight.dtype:
                    return weight.add_(dense, alpha=alpha)
                # ΔW is this call's own: the sum goes into it (W widened exactly)
                result = torch.add(weight, dense, alpha=alpha, out=dense)
                return self._written(weight, result.to(weight.dtype), write)
            delta = dense * scale
            try:
                require_finite("ΔW", delta)
            except NonFiniteError as err:
                raise NonFiniteError(
                    f"cannot merge into {type(self.base).__name__}: {err} (the factors hold "
                    "NaN/Inf or overflow)"
                ) from None
            result = torch.add(weight.to(accumulate), dense, alpha=alpha).to(weight.dtype)
            overflow = 0
            if not all_finite(result):
                overflow = int((~torch.isfinite(result) & torch.isfinite(weight)).sum())
            if not overflow:
                return self._written(weight, result, write)
        raise NonFiniteError(
            f"cannot merge into {type(self.base).__name__}: W {'+' if sign > 0 else '−'} "
            f"ΔW overflows {weight.dtype} at {overflow} entries (largest |ΔW| "
            f"{float(delta.abs().max()):.3g}); the weight is left unchanged"
        )

    def _dora_sum(
        self, weight: torch.Tensor, factors: Factorset | None, sign: int
    ) -> torch.Tensor:
        """DoRA's `merged_weight`: `m ⊙ (W + ΔW) / ‖W + ΔW‖` (sign 1), or for sign −1 of a
        merged adapter `W' ⊙ n / m − ΔW`, with `n` the norm its merge divided by, and W's own
        channels where `m / n` was 0 (as its merge kept them, `_zeroed_channels`); computed
        in float32 (float64 for a float64 weight) and rounded once. `NonFiniteError` where a
        value is not finite (a zero norm, say), `MergeError` where the norm of
        the merge is not known (the adapter was loaded merged). A weight FSDP2 shards is
        computed whole (each channel's norm spans the shards) and split as it is; on the meta
        device, the shapes alone."""
        factors = factors if factors is not None else self.plain_tensors()
        accumulate = work_dtype(weight.dtype)
        sharded, weight = weight, gathered(weight)
        # on the meta device nothing has values: only the shapes are checked and computed
        meta = weight.is_meta or any(tensor.is_meta for tensor in factors.values())
        with torch.no_grad(), outside_autocast(weight):
            magnitude = gathered(factors["magnitude"]).to(weight.device, accumulate)
            if sign > 0:
                updated, norm = self._dora_updated(weight, factors, accumulate)
                factor = self._per_channel(magnitude / norm, weight.ndim - 1)
                result = self.to_weight_layout(factor * updated)
            else:
                if "norm" not in factors and not meta:
                    raise MergeError(
                        f"cannot unmerge the DoRA adapter on {type(self.base).__name__}: the "
                        "norm ‖W + ΔW‖ its merge divided by is not known (it was loaded "
                        "merged), so W cannot be recovered; load the unmerged base weight"
                    )
                # (a meta adapter keeps no norm: any `(out,)` tensor stands in for it)
                norm = gathered(factors.get("norm", magnitude)).to(weight.device, accumulate)
                delta, scale = self._unscaled_delta(factors, accumulate)
                factor = self._per_channel(magnitude / norm, weight.ndim - 1)
                unmerged = self.to_weight_layout(weight.to(accumulate)) / factor - scale * delta
                if "zeroed" in factors:  # channels the merge set to 0, W's as it kept them
                    index = factors["zeroed"].to(weight.device)
                    unmerged[index] = factors["zeroed_rows"].to(unmerged)
                result = self.to_weight_layout(unmerged)
            result = result.to(weight.dtype)
            if not meta and not all_finite(result):
                bad = int((~torch.isfinite(result)).sum())
                raise NonFiniteError(
                    f"cannot {'merge into' if sign > 0 else 'unmerge from'} "
                    f"{type(self.base).__name__}: the DoRA weight m ⊙ (W + ΔW) / ‖W + ΔW‖ is "
                    f"NaN/Inf at {bad} entries (a zero norm or magnitude, NaN/Inf factors or "
                    "an overflow); the weight is left unchanged"
                )
        return sharded_like(result, sharded)

    @staticmethod
    def _written(weight: torch.Tensor, result: torch.Tensor, write: bool) -> torch.Tensor:
        """`result`, or `weight` with `result` copied into it where `write`."""
        return weight.copy_(result) if write else result

    def check_merged_weight(
        self, weight: torch.Tensor, factors: Factorset | None = None, *, sign: int = 1
    ) -> bool:
        """Raise where `merged_weight(weight, factors, sign=sign)` would, computing ΔW only
        where a bound cannot rule its failures out: True where the bound did
        (`_sum_is_finite`), False where `merged_weight` ran."""
        if self._sum_is_finite(weight, factors, sign):
            return True
        self.merged_weight(weight, factors, sign=sign)
        return False

    def _sum_is_finite(self, weight: torch.Tensor, factors: Factorset | None, sign: int) -> bool:
        """Whether `merged_weight` is sure to succeed, from norms alone.

        Every form's ΔW entry is a sum of products holding one entry of each factor (a
        contraction whose summed indices each join two factors), so by Cauchy–Schwarz and
        Hölder it is at most `|scale| · Π ‖F‖_F`, and every partial product on the way to it
        at most `Π max(1, ‖F‖_F)` (scale included). With those within a quarter of the
        working dtype's range, ΔW is finite; with `max|W| + 2·bound` within half the weight
        dtype's range (the factor 2 covers the rounding of the sums), so is `W ± ΔW`. False
        where a bound is not to be had cheaply: meta, sharded or float8 tensors, an empty
        or non-floating weight, a computed factor, or shapes other than those the adapter was
        built with (`built_shapes`), each for `merged_weight` to report."""
        if self.dora or not weight.is_floating_point() or not weight.numel():
            return False
        if weight.element_size() == 1:
            return False
        if factors is None and sign < 0 and self.merged_factors is not None:
            factors = self.merged_factors
        if factors is None:
            try:
                factors = self.plain_tensors()
            except TargetError:
                return False
        scale = factors.get("scale", self.scale)
        tensors = [weight, *(t for k, t in factors.items() if k != "scale")]
        if isinstance(scale, torch.Tensor):
            tensors.append(scale)
        if any(type(t) not in (torch.Tensor, nn.Parameter) or t.is_meta for t in tensors):
            return False
        shapes = {k: tuple(t.shape) for k, t in factors.items() if k != "scale"}
        if {**shapes, "base.weight": tuple(weight.shape)} != getattr(self, "built_shapes", None):
            return False
        with torch.no_grad():
            norms = [float(torch.linalg.vector_norm(t, dtype=torch.float64)) for t in tensors[1:]]
            low, high = torch.aminmax(weight)
        if not isinstance(scale, torch.Tensor):
            norms.append(abs(float(scale)))
        largest = max(-float(low), float(high))
        bound = math.prod(norms)
        partial = math.prod(max(1.0, n) for n in norms)
        work_max = torch.finfo(work_dtype(weight.dtype)).max
        return partial <= work_max / 4 and largest + 2 * bound <= torch.finfo(weight.dtype).max / 2

    @torch.no_grad()
    def merge(self, *, exact: bool = False) -> None:
        """Write `W + ΔW` into the base weight; the forward then runs the base alone.

        `exact=True` keeps a copy of W (`base_copy`, the weight's bytes) so that `unmerge`
        restores it bit for bit. Raises (and changes nothing) where `check_mergeable` or
        `merged_weight` does. A second merge is a no-op.
        """
        if self.merged:
            return
        self.shares_weight_with = self.current_ties()
        self.check_mergeable()
        self._write_merged(exact)

    def current_ties(self) -> tuple[str, ...]:
        """What else holds the base weight now, beyond the adapter (`lowrank.nn.merge` looks
        across its model): a tie `inject` recorded (`shares_weight_with`) is dropped only
        once a search of every live module finds none, and its names are kept while any tie
        remains; `()` where none does."""
        return current_ties(self, [self], "the adapter")[0]

    def _write_merged(self, exact: bool, proven: bool | None = None) -> None:
        """`merge` once `check_mergeable` has passed; `proven` as `check_merged_weight`
        returned it (computed here if None)."""
        weight = self.base.weight
        if proven is None:
            proven = self._sum_is_finite(weight, None, 1)
        copy = weight.detach().clone() if exact else None
        kept = self.factors_in_weight(unmerged=weight)
        self._sum(weight, None, 1, proven=proven, write=True)
        self.base_copy = copy
        self.merged = True
        self.merged_factors = kept

    def factors_in_weight(
        self, factors: Factorset | None = None, *, unmerged: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor] | None:
        """A copy of `factors` (default: the adapter's own) as merged into the weight, for
        `unmerge` to take out that ΔW; None on the meta device, where there are no values.
        With `dora`, the weight `unmerged` (before the merge) gives `norm`, the `(out,)`
        norm ‖W + ΔW‖ the merge divides by, which `unmerge` needs (without it, none), and
        the channels of W the merge sets to 0 (`_zeroed_channels`)."""
        factors = factors if factors is not None else self.plain_tensors()
        if any(tensor.is_meta for tensor in factors.values()):
            return None
        kept = {key: tensor.detach().clone() for key, tensor in factors.items()}
        if self.dora and unmerged is not None and not unmerged.is_meta:
            with torch.no_grad(), outside_autocast(unmerged):
                norm = self.dora_norm(unmerged, factors, work_dtype(unmerged.dtype))
                kept["norm"] = norm
                kept.update(self._zeroed_channels(unmerged, factors["magnitude"], norm))
        return kept

    def _zeroed_channels(
        self, weight: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The output channels of `weight` (before a DoRA merge) that the merge sets to 0,
        where `m / ‖W + ΔW‖` is 0 (a zero magnitude), and from which `W' ⊙ n / m` cannot
        recover W: `{"zeroed": their indices (k,), "zeroed_rows": those channels of W
        (k, in, *k) in ΔW's layout, in the weight's dtype}`, for `unmerge` to put back;
        `{}` where there are none. A weight FSDP2 shards is read whole."""
        factor = gathered(magnitude).to(norm) / norm
        index = torch.nonzero(factor == 0).flatten()
        if not index.numel():
            return {}
        rows = self.to_weight_layout(gathered(weight).detach())[index.to(weight.device)]
        return {"zeroed": index, "zeroed_rows": rows.clone()}

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW out of the base weight again: the kept copy where `merge(exact=True)` made
        one (bit-exact), else `W − ΔW` (rounded once). A no-op when not merged."""
        if not self.merged:
            return
        self.check_unmergeable()
        self._write_unmerged()

    def _write_unmerged(self, proven: bool | None = None) -> None:
        """`unmerge` once `check_unmergeable` has passed; `proven` as `check_merged_weight`
        returned it for `sign=-1` (computed here if None)."""
        weight = self.base.weight
        if self.base_copy is not None:
            weight.copy_(self.base_copy)
            self.base_copy = None
        else:
            if proven is None:
                proven = self._sum_is_finite(weight, None, -1)
            self._sum(weight, None, -1, proven=proven, write=True)
        self.merged = False
        self.merged_factors = None

    def _with_weight(
        self, x: torch.Tensor, weight: torch.Tensor, *, bias: bool = True
    ) -> torch.Tensor:
        """The base layer's operation with `weight` (in its layout) in place of its own (and
        its bias unless `bias=False`)."""
        raise NotImplementedError

    def _delta_output(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """What the branch adds for a weight-space update `delta`: the base's operation with
        `delta` as its weight and no bias."""
        return self._with_weight(x, delta, bias=False)

    def _probes(self) -> list[torch.Tensor]:
        """Small float32 inputs of the base layer's kind for `_merge_mismatch`, tried in
        turn: a batch of one sequence of 3 rows of `in` features, then 3 rows alone."""
        generator = torch.Generator().manual_seed(0)
        # float32 whatever torch's default dtype (`torch.set_default_dtype`)
        x = torch.randn(1, 3, self.sizes.in_features, generator=generator, dtype=torch.float32)
        return [x.to(self.base.weight.device), x[0].to(self.base.weight.device)]

    def _merge_mismatch(self) -> str | None:
        """Why a merge would change what the base layer computes, or None: its forward (hooks
        included) is run on a small probe (`_probes`, the first it takes), in float32 outside
        autocast, with `W + D` and with `W` for a random `D` as large as `W`, and must differ
        by the plain operation of `D` (to 1e-2 of it: far below what transforming the weight
        gives, above bfloat16 arithmetic). A property of the layer, not of the factors. The
        forward and hooks run on copies of its tensors."""
        base = self.base
        tensors = dict((*base.named_parameters(), *base.named_buffers()))
        weight = tensors.get("weight")
        if weight is None or weight.is_meta or type(weight) not in (torch.Tensor, nn.Parameter):
            return (
                "its weight is not a plain tensor here (meta, sharded or missing), so its "
                "forward cannot be tried"
            )
        if not weight.is_floating_point():
            return f"its weight is {weight.dtype}, which a merge does not write"
        reason = None
        for probe in self._probes():
            reason, ran = self._probe_merge(tensors, probe)
            if ran:  # a probe the layer took decides; the next only where it could not run
                return reason
        return reason

    def _probe_merge(
        self, tensors: dict[str, torch.Tensor], probe: torch.Tensor
    ) -> tuple[str | None, bool]:
        """`_merge_mismatch` on one probe input, and whether the layer took that input (ran
        and gave tensors of the plain operation's shape)."""
        base, weight = self.base, tensors["weight"]
        with torch.no_grad(), outside_autocast(weight):
            try:
                state = {name: t.to(torch.float32, copy=True) if t.is_floating_point()
                         else t.clone() for name, t in tensors.items()}  # fmt: skip
                generator = torch.Generator(device=weight.device).manual_seed(0)
                size = float(state["weight"].abs().max()) or 1.0
                delta = torch.randn(weight.shape, generator=generator, device=weight.device,
                                    dtype=torch.float32)  # fmt: skip
                delta *= size
                plain = functional_call(base, state, (probe,))
                state["weight"] = state["weight"] + delta
                merged = functional_call(base, state, (probe,))
                branch = self._delta_output(probe, delta)
                if not all(isinstance(t, torch.Tensor) for t in (plain, merged)):
                    return "its forward returns something other than a tensor", False
                if not (merged.shape == plain.shape == branch.shape):
                    shapes = f"{tuple(merged.shape)} where the plain operation gives"
                    return f"its forward gives shape {shapes} {tuple(branch.shape)}", False
                if merged.dtype != plain.dtype or not merged.is_floating_point():
                    return f"its forward returns {merged.dtype}, not a real float", True
                gap = torch.linalg.vector_norm((merged - plain - branch).double())
                scale = torch.linalg.vector_norm(branch.double())
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # the layer's own code, run on a probe
                return f"its forward raised {type(err).__name__} on a probe: {err}", False
            if not gap <= 1e-2 * scale:
                return ("with W + ΔW in its weight it does not compute the layer plus the "
                        "adapter's branch (it transforms its weight, say)"), True  # fmt: skip
        return None, True

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        """The factors' branch at scale 1."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """`base(x) + scale · branch(x)` (dropout on the branch input in training), the base
        with `W + ΔW` under `hard`, the base alone when merged. `DTypeError` for an `x`
        that is not a tensor; `TargetError` for any further argument (a positional
        embedding's `cache_length` or `position_ids`): the branch is the operation of ΔW on
        `x` alone, which a base computing from other inputs does not follow."""
        _require_input_alone(type(self).__name__, type(self.base).__name__, args, kwargs)
        if not isinstance(x, _INPUTS):
            raise not_a_tensor(f"the input x of {type(self).__name__}", x)
        if self.disabled:
            self._require_unmerged_while_disabled()
            return self.base(x)
        return self._run(x)

    def _require_unmerged_while_disabled(self) -> None:
        """`MergeError` for a disabled adapter that is merged: its base weight holds
        `W + ΔW`, so the base alone is not the layer without its adapter."""
        if self.merged:
            raise MergeError(
                f"{type(self).__name__} on {type(self.base).__name__} was merged while its "
                "adapters were disabled (lowrank.nn.disable_adapters): its base weight holds "
                "W + ΔW, so it cannot run without its adapter; unmerge it"
            )

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` of a tensor `x`: the layers' own paths go first, then this one."""
        if self.merged:
            return self.base(x)
        # traced (torch.fx), ΔW of the factors as they are now would be a constant of the
        # graph: a plain layer takes the branch instead, `base(x) + scale · branch(x)`, the
        # same function (its operation is linear in its weight) reading the factors per call
        traced_plain = isinstance(x, torch.fx.Proxy) and _runs_plain(self.base)
        if self.hard and not traced_plain:
            if not isinstance(getattr(self.base, "weight", None), _INPUTS):
                raise TargetError(
                    f"hard=True runs the base layer with W + ΔW in place of its weight, but the "
                    f"base ({type(self.base).__name__}) holds no weight tensor (a quantized "
                    "layer put in its place after inject, say)"
                )
            if _runs_plain(self.base):
                return self._with_weight(x, self.weight)
            if sharded_itself(self.base):
                raise TargetError(
                    f"hard=True runs the base layer's own forward with W + ΔW in place of its "
                    f"weight, but fully_shard was applied to the base layer itself "
                    f"({type(self.base).__name__}): its forward puts the gathered W back, and "
                    "ΔW would be lost; shard the adapter or a module above it instead"
                )
            if isinstance(x, torch.fx.Proxy):
                raise TargetError(
                    f"torch.fx cannot trace hard=True over {type(self.base).__name__}, which "
                    "runs its own forward: the adapter passes it W + ΔW for its weight "
                    "(torch.func.functional_call), which takes tensors, not proxies; trace it "
                    "with hard=False, or use torch.export or torch.compile"
                )
            # the base's own forward (a subclass's, its hooks) with W + ΔW in place of W
            return functional_call(self.base, {"weight": self.weight}, (x,))
        branch_input = self._in_factor_dtype(x)
        if self.dropout:
            branch_input = F.dropout(branch_input, self.dropout, self._training(x))
        if self.dora and isinstance(x, torch.fx.Proxy):
            raise TargetError(
                f"torch.fx cannot trace a DoRA adapter ({type(self).__name__}): the norm "
                "‖W + ΔW‖ it divides by is computed in a dtype chosen from its tensors' "
                "dtypes, which a trace does not know; use torch.export or torch.compile"
            )
        out = self.base(x)
        if self.dora:
            return self._dora_output(out, branch_input)
        branch, scale = self._branch(branch_input), _zero_d(self.scale)
        # a trainable scale's gradient, Σ G ⊙ branch, summed in float32 (`scaled`)
        branch = scaled(branch, scale) if isinstance(scale, torch.Tensor) else branch * scale
        if not _runs_plain(self.base):  # a forward of its own may pad otherwise, say
            branch = _fitting_branch(out, branch, type(self.base).__name__)
        # factors kept wider than the base (float32 over bfloat16, as PEFT keeps them):
        # the sum in the wider dtype, rounded once to the base's output dtype
        return (out + branch).to(out.dtype)

    def _dora_output(self, out: torch.Tensor, branch_input: torch.Tensor) -> torch.Tensor:
        """DoRA's output from the base's `out = W x + b` and the branch input (dropped out in
        training), as PEFT computes it: with `g = m / ‖W + s·ΔW‖` (the norm not
        differentiated), `out + (g − 1) ⊙ W x̃ + g ⊙ s·B A x̃`. `x̃` is the dropped input,
        and `W x̃` computed from it, in training with dropout; else `x̃ = x` and `W x` is
        `out − b`, so the layer is `g ⊙ (W + s·ΔW) x + b`."""
        if sharded_itself(self.base):
            raise TargetError(
                f"a DoRA adapter divides by the norm of its base layer's weight and takes its "
                f"bias back out of the output, but fully_shard was applied to the base layer "
                f"itself ({type(self.base).__name__}): outside its own forward that holds "
                "only this rank's shards; shard the adapter or a module above it instead"
            )
        weight, bias = self.base.weight, self.bias
        trailing = len(self.kernel_size)  # a convolution's output: (N, out, *S)
        factor = self._dora_factor(weight, trailing)
        if self.dropout and self.training:
            base_out = self._with_weight(branch_input, weight.to(branch_input.dtype), bias=False)
        else:
            base_out = out if bias is None else out - self._per_channel(bias, trailing)
        dora = (factor - 1) * base_out + factor * self._branch(branch_input) * self.scale
        return (out + dora).to(out.dtype)

    def _dora_factor(self, weight: torch.Tensor, trailing: int) -> torch.Tensor:
        """DoRA's `g = m / ‖W + s·ΔW‖` `(out, 1…)` (`trailing` unit axes), the norm not
        differentiated. Where no gradient can flow into it (grad mode off, or none of W, the
        factors, the magnitude and a trainable scale requires grad), the last call's `g` is
        reused, inside `lowrank.nn.reuse_dora_factors`, while none of those tensors nor the
        settings of its math have changed since (`lowrank.nn.reuse`); not while tracing,
        compiling, capturing a CUDA graph, under a `torch.func` transform, nor in a process
        with a process group (DDP's and FSDP's collectives write parameters in place, which
        may leave their version counters as they were)."""
        magnitude, factors = self.magnitude, self.plain_tensors()
        tensors = (weight, *factors.values())  # the magnitude among the adapter's tensors
        reusable = self.dora_reuse.enabled and _may_reuse(tensors)
        if reusable:
            settings = (self.config, self.scale, trailing, *_math_settings(weight.device.type))
            factor = self.dora_reuse.get(tensors, settings)
            if factor is not None:
                return factor
        with torch.no_grad():
            norm = self.dora_norm(weight, factors, work_dtype(magnitude.dtype))
        factor = self._per_channel(magnitude / norm.to(magnitude.dtype), trailing)
        if reusable:
            self.dora_reuse.put(tensors, settings, factor)
        return factor

    def train(self, mode: bool = True) -> LowRankAdapter:
        """`nn.Module.train`; into training, the reused DoRA factor is freed."""
        if mode:
            self.dora_reuse.clear()
        return super().train(mode)

    def _apply(self, fn: object, *args: object, **kwargs: object) -> LowRankAdapter:
        """`nn.Module._apply` (`to`, `cuda`, `half`, …), freeing the reused DoRA factor."""
        self.dora_reuse.clear()
        return super()._apply(fn, *args, **kwargs)

    def __setstate__(self, state: dict) -> None:
        """`nn.Module.__setstate__`; an adapter pickled without a `dora_reuse` gets one."""
        super().__setstate__(state)
        self.__dict__.setdefault("dora_reuse", Reuse())

    def _training(self, x: torch.Tensor) -> bool | torch.fx.Proxy:
        """`self.training`; for a traced `x` (torch.fx), a node of the graph reading it at each
        call, so that the graph's `train()` and `eval()` switch the dropout as the model's do
        (a bool would be a constant of the graph, the mode it was traced in)."""
        if not isinstance(x, torch.fx.Proxy):
            return self.training
        tracer = x.tracer
        path = tracer.path_of_module(self)
        return tracer.create_proxy("get_attr", f"{path}.training" if path else "training", (), {})

    def _in_factor_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """The branch input `x` in the factors' dtype where it is a floating (or complex)
        tensor of another of its kind (float32 factors over a bfloat16 base layer, complex128
        over complex64); a traced input (torch.fx), whose dtype is known only when the graph
        runs, always cast to the factor's dtype (and device) as the graph then holds it (a
        no-op where they agree; the graph may be converted, `traced.double()`, after tracing)."""
        factor = self._parameters.get(self.variant.output)
        factor = factor if factor is not None else getattr(self, self.variant.output)
        if isinstance(x, torch.fx.Proxy):
            return x.to(factor)  # the factor a node of the graph: its dtype read per call
        dtype = factor.dtype
        floating = x.is_floating_point() or x.is_complex()
        if floating and x.is_complex() == dtype.is_complex and x.dtype != dtype:
            return x.to(dtype)
        return x

    def extra_repr(self) -> str:
        scale = "trainable" if isinstance(self.scale, nn.Parameter) else f"{self.scale:g}"
        extra = (", fused=True" if self.fused else "") + (
            f", dropout={self.dropout:g}" if self.dropout else ""
        )
        groups = f", groups={self.groups}" if self.groups != 1 else ""
        groups += f", init={self.config.init!r}" if self.config.init != "default" else ""
        groups += ", dora=True" if self.dora else ""
        return (
            f"form={self.form!r}, rank={self.rank}, scale={scale}{groups}, "
            f"merged={self.merged}{extra}"
        )


def _of_base(name: str) -> property:
    """A read-only attribute that is the base layer's `name`, for code that reads a layer's
    geometry (`conv.stride[0]`, `lm_head.out_features`) from whatever module holds its place."""
    return property(lambda self: getattr(self.base, name), doc=f"The base layer's `{name}`.")


_PLAIN_FORWARDS = ("torch.nn.modules.linear", "torch.nn.modules.conv", "torch.nn.modules.sparse",
                   "transformers.pytorch_utils")  # fmt: skip
"""Modules whose layers' `forward` is the plain operation an adapter can run itself."""


def _may_reuse(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether a value computed from `tensors` may be reused (`LowRankAdapter._dora_factor`):
    no gradient can flow into it, every tensor keeps a version counter, and nothing but
    eager code in one process writes them (no compile or trace, no `torch.func` transform,
    no process group), nor is a CUDA graph captured (whose replays would read a kept value
    as a constant, though the tensors change between them)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None:
        return False
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    return trackable(tensors)


def _math_settings(device: str) -> tuple:
    """The global settings that change what `‖W + s·ΔW‖` computes to on `device`: autocast
    (on, dtype), float32 matmul precision, and inference mode (a value computed there is an
    inference tensor, which autograd must not save outside it)."""
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else None
    return (autocast, dtype, torch.get_float32_matmul_precision(),
            torch.is_inference_mode_enabled())  # fmt: skip


def _runs_plain(module: nn.Module) -> bool:
    """Whether calling `module` runs only the plain operation of its kind (`F.linear`, the
    convolution padded by its `padding_mode`, the lookup): `_unplain` finds nothing."""
    return _unplain(module) is None


def _unplain(module: nn.Module) -> str | None:
    """What makes calling `module` other than the plain operation of its kind, or None: its
    class's `forward` is not torch's (or transformers' `Conv1D`); it has forward or backward
    hooks of its own or a `forward` set on the instance; a convolution's `_conv_forward`,
    which torch's `forward` calls, is not torch's; an embedding's lookup
    renormalises (`max_norm` set after `inject`). Hooks registered for every module
    (`register_module_forward_hook`) are not seen."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
             module._backward_pre_hooks)  # fmt: skip
    if not _plain_forward(module):
        return "its forward is its class's own"
    if any(hooks) or "forward" in module.__dict__:
        return "it has hooks or a forward of its own"
    if isinstance(module, nn.modules.conv._ConvNd) and "_conv_forward" in module.__dict__:
        return "it has a _conv_forward of its own"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return f"its lookup renormalises the rows it reads (max_norm={module.max_norm})"
    return None


def loaded_fsdp() -> ModuleType | None:
    """`torch.distributed.fsdp` where this process has imported it, else None: no module is
    sharded by FSDP (`fully_shard` or `FullyShardedDataParallel`) before it is, and its
    import (a second or so) is not for a process that never shards."""
    if not torch.distributed.is_available():
        return None
    return sys.modules.get("torch.distributed.fsdp")


def sharded_itself(module: nn.Module) -> bool:
    """Whether FSDP2's `fully_shard` was applied to `module` itself: its forward hooks put
    the gathered parameters in place at each call, over any given for the call."""
    fsdp = loaded_fsdp()
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def _plain_forward(module: nn.Module) -> bool:
    """Whether `module`'s class runs torch's (or transformers' `Conv1D`) own `forward`, and
    for a convolution torch's own `_conv_forward`, which that `forward` calls."""
    methods = (type(module).forward, getattr(type(module), "_conv_forward", None))
    return all(getattr(m, "__module__", None) in _PLAIN_FORWARDS for m in methods if m)


class LoRALinear(LowRankAdapter):
    """An adapter on an `nn.Linear` (`in → out`); every form (centre tap is plain LoRA here)."""

    in_features, out_features = _of_base("in_features"), _of_base("out_features")

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """`(…, in) → (…, out)`; with `fused`, unmerged, one `lora_linear` call, unless the
        base layer has hooks or a replaced `forward` (offloading wrappers), which only calling
        it runs, or `x` is traced (torch.fx): the kernel takes tensors, so the graph gets the
        unfused branch, the same function."""
        base = self.base
        traced = isinstance(x, torch.fx.Proxy)
        if self.fused and not self.merged and not traced and _runs_plain(base):
            mixed = self.down.dtype != base.weight.dtype
            if mixed and not torch.is_autocast_enabled(x.device.type):
                raise DTypeError(
                    f"a fused LoRALinear ({self.in_features} → {self.out_features}, rank "
                    f"{self.rank}) has {self.down.dtype} factors over a {base.weight.dtype} "
                    "base weight: fused=True runs one dtype (or torch.autocast's); keep the "
                    "factors in the base's (factor_dtype=None), or use fused=False, which "
                    "runs them in their own dtype over the base as PEFT does"
                )
            p = self.dropout if self.training else 0.0
            return lora_linear(x, base.weight, self.down, self.up, self.scale, base.bias, p)
        return super()._run(x)

    def _with_weight(
        self, x: torch.Tensor, weight: torch.Tensor, *, bias: bool = True
    ) -> torch.Tensor:
        return F.linear(x, weight, self.base.bias if bias else None)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.variant.linear(self, lambda w: F.linear(x, w))


class LoRAConv1D(LowRankAdapter):
    """An adapter on transformers' `Conv1D` (GPT-2): `y = x @ W + b` with `W (in, out)`."""

    nf, nx = _of_base("nf"), _of_base("nx")

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t()

    def _with_weight(
        self, x: torch.Tensor, weight: torch.Tensor, *, bias: bool = True
    ) -> torch.Tensor:
        return F.linear(x, weight.t(), self.base.bias if bias else None)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.variant.linear(self, lambda w: F.linear(x, w))


class LoRAEmbedding(LowRankAdapter):
    """An adapter on an `nn.Embedding` (`num_embeddings → embedding_dim`, as PEFT does):
    `down (r, num_embeddings)` is looked up like the table, `up (dim, r)`; ΔW of the table
    `(num, dim)` is `(up @ down)ᵀ`."""

    num_embeddings, embedding_dim = _of_base("num_embeddings"), _of_base("embedding_dim")
    padding_idx, max_norm = _of_base("padding_idx"), _of_base("max_norm")
    norm_type, scale_grad_by_freq = _of_base("norm_type"), _of_base("scale_grad_by_freq")
    sparse = _of_base("sparse")

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t()

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base
        return F.embedding(x, table, base.padding_idx, None, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)  # fmt: skip

    def _with_weight(
        self, x: torch.Tensor, weight: torch.Tensor, *, bias: bool = True
    ) -> torch.Tensor:
        return self._lookup(x, weight)

    def _probes(self) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        rows = self.base.weight.shape[0]
        chosen = [0, rows - 1, *torch.randint(rows, (16,), generator=generator).tolist()]
        if self.base.padding_idx is not None:
            chosen.append(self.base.padding_idx % rows)
        ids = torch.tensor(chosen).to(self.base.weight.device)
        return [ids, ids[None]]

    def _embed_scale(self) -> torch.Tensor | float | None:
        """The number a scaled embedding's own `forward` multiplies its lookup by (its
        `embed_scale`: Gemma's √dim, mBART's), or None. The branch is multiplied by it too, as
        PEFT does, so the output is `embed_scale · (W + ΔW)[x]`, the layer with `W + ΔW`.
        Read only where the class's `forward` is its own (torch's never scales), and only a
        number or a one-element tensor (PEFT ignores others too)."""
        base = self.base
        scale = getattr(base, "embed_scale", None)
        if _plain_forward(base) or isinstance(scale, bool):
            return None
        if isinstance(scale, int | float):
            return float(scale)  # multiplied as a number: no tensor made per call
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale.reshape(())
        return None

    def _scaled_by_embed_scale(self, out: torch.Tensor) -> torch.Tensor:
        scale = self._embed_scale()
        if isinstance(scale, torch.Tensor):
            scale = scale.to(out.dtype)
        return out if scale is None else out * scale

    def _delta_output(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self._scaled_by_embed_scale(self._lookup(x, delta))

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """`(…) → (…, dim)` of integer indices `x`."""
        if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()):
            raise DTypeError(
                f"the input x of LoRAEmbedding over {type(self.base).__name__} is {x.dtype}, "
                "but an embedding adapter looks up integer indices (a layer whose forward "
                "takes other inputs, such as BART's learned positional embedding, which reads "
                "only their shape, cannot be adapted: leave it out of the targets)"
            )
        traced = isinstance(x, torch.fx.Proxy)
        if self.hard and not self.merged and traced and _runs_plain(self.base):
            # traced: the lookup of W + ΔW, ΔW's table `(num, dim)` computed in the graph from
            # the factors of each call; the branch would look up the same rows, but its `up`
            # would get gradients from `padding_idx` rows and not scaled by `scale_grad_by_freq`
            delta, scale = self.variant.linear(self, lambda w: w.t()), _zero_d(self.scale)
            delta = scaled(delta, scale) if isinstance(scale, torch.Tensor) else delta * scale
            weight = self.base.weight
            return self._lookup(x, weight + delta.to(weight.dtype))
        return super()._run(x)

    def _in_factor_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """Integer indices `x`, as they are: the lookup reads the factors in their dtype."""
        return x

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.variant.linear(self, lambda w: self._lookup(x, w.t()))
        return self._scaled_by_embed_scale(branch)


class LoRAConv(LowRankAdapter):
    """An adapter on an `nn.Conv1d/2d/3d` in any form; a grouped or depthwise convolution
    gets one factor set per group (a block-diagonal ΔW). The branch pads its input as the
    base does (`padding_mode`), so the layer computes the base with `W + ΔW`.

    Without gradients for the factors (inference) and outside dropout, a plain convolution
    (torch's `forward` and `_conv_forward`, no hooks) runs as one convolution
    with `W + ΔW` where recomposing ΔW costs fewer multiply-adds than the branch
    (`weight_space_is_cheaper`); the result is the same up to rounding.
    """

    in_channels, out_channels = _of_base("in_channels"), _of_base("out_channels")
    stride, padding, dilation = _of_base("stride"), _of_base("padding"), _of_base("dilation")
    padding_mode, output_padding = _of_base("padding_mode"), _of_base("output_padding")
    transposed = _of_base("transposed")

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | str]:
        """`x` as the base convolution pads it, and the padding its convolution then adds:
        `(x, padding)` for zero padding; for `reflect`, `replicate` or `circular`, `x` padded
        that way (torch's own amounts) and no further padding. Padding copies values within
        each channel, so it commutes with the branch's 1×1 channel mixing: every form's branch
        run on the padded input is ΔW's convolution as the base computes its own."""
        base = self.base
        if base.padding_mode == "zeros":
            return x, base.padding
        amounts = base._reversed_padding_repeated_twice
        return F.pad(x, amounts, mode=base.padding_mode), (0,) * len(self.kernel_size)

    def _with_weight(
        self, x: torch.Tensor, weight: torch.Tensor, *, bias: bool = True
    ) -> torch.Tensor:
        base = self.base
        conv = conv_function(len(self.kernel_size))
        x, padding = self._padded(x)
        return conv(x, weight, base.bias if bias else None, base.stride, padding,
                    base.dilation, base.groups)  # fmt: skip

    def _probes(self) -> list[torch.Tensor]:
        base = self.base
        generator = torch.Generator().manual_seed(0)
        geometry = zip(base.kernel_size, base.dilation, base.stride, strict=True)
        # wider than the padding on every side: reflect padding needs an input wider than it
        pad = max(base._reversed_padding_repeated_twice, default=0)
        spatial = [(k - 1) * d + 2 * s + 1 + pad for k, d, s in geometry]
        x = torch.randn(1, base.in_channels, *spatial, generator=generator, dtype=torch.float32)
        return [x.to(base.weight.device)]

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        conv = conv_function(len(self.kernel_size))
        x, padding = self._padded(x) if self.variant.reads_borders else (x, base.padding)
        geometry = {"stride": base.stride, "padding": padding, "dilation": base.dilation}
        return self.variant.conv(self, x, conv, geometry, self.groups)

    def weight_space_is_cheaper(self, x: torch.Tensor) -> bool:
        """Whether recomposing ΔW (about `dense · r` multiply-adds) costs less than running the
        branch on `x` (`positions · adapter parameters`)."""
        sizes = self.sizes
        channels = x.shape[-len(sizes.kernel) - 1]
        positions = x.numel() // channels // math.prod(self.base.stride)
        dense = math.prod(sizes.dense_shape)
        return positions * self.num_params > dense * self.config.r_out

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """`(N, in, *S) → (N, out, *S')`."""
        if not self.variant.reads_borders:  # a centre tap: its geometry may change after inject
            try:
                check_centre_tap(self.base)
            except GeometryError as err:
                raise TargetError(
                    f"a centre-tap adapter is a 1×1 branch, which equals its ΔW only on a "
                    f"size-keeping convolution, and its base no longer is one: {err}"
                ) from None
        # a traced input (torch.fx) takes the branch, right for every input the graph gets
        traced = isinstance(x, torch.fx.Proxy)
        needs_grad = traced or (
            torch.is_grad_enabled()
            and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        )
        dropping = self.training and self.dropout
        if (
            not (self.merged or self.hard or self.dora or needs_grad or dropping)
            and _runs_plain(self.base)
            and not self.base.weight.is_complex()
            and self.weight_space_is_cheaper(x)
        ):
            return self._with_weight(x, self.weight)
        return super()._run(x)


def adapter_class(module: nn.Module) -> type[LowRankAdapter]:
    """The adapter class for a layer: `LoRALinear`, `LoRAConv`, `LoRAEmbedding`, `LoRAConv1D`."""
    layer_sizes(module)
    if isinstance(module, nn.Linear):
        return LoRALinear
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    if isinstance(module, nn.modules.conv._ConvNd):
        return LoRAConv
    return LoRAConv1D
