"""Adapter modules: a frozen layer plus trainable low-rank factors of one form.

`LoRALinear` (`nn.Linear`), `LoRAConv` (`nn.Conv1d/2d/3d`, grouped and depthwise ones
included), `LoRAEmbedding` (`nn.Embedding`) and `LoRAConv1D` (transformers' `Conv1D`, a
linear layer storing its weight as `(in, out)`). Each output is `base(x) + scale · branch(x)`,
which equals the base layer with weight `W + ΔW` (`delta_weight()`, in the base weight's
layout); the factors are those of `lowrank.nn.variants`. `merge()` writes `W + ΔW` into the
base weight, computed in float32 and checked finite first; `unmerge()` takes it out again,
bit-exactly when the merge kept a copy (`merge(exact=True)`). The merged state, the start
and a fixed scale are part of `state_dict()` (key `_extra_state`), and a state dict of the
un-adapted layer (`weight`, `bias`) loads into the base. An adapter may start from given
factors or, with `init="pissa"`, from the form nearest to W, its base then holding
`W − ΔW₀`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .._checks import MAX_ELEMENTS, all_finite, overflow_bound, require_finite, work_dtype
from ..bounds import param_count
from ..conv import check_centre_tap, conv_function
from ..errors import (
    ArgumentError,
    DTypeError,
    GeometryError,
    MergeError,
    NonFiniteError,
    RankError,
    ShapeError,
    StateDictError,
    TargetError,
)
from ..forms import Factors
from ..kernels import lora_linear
from .config import AdapterConfig
from .ties import found_ties
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


@dataclass(frozen=True)
class LayerSizes:
    """A layer's `in → out` sizes, kernel (`()` but for convolutions) and groups."""

    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()
    groups: int = 1

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """ΔW's shape in `(out, in/groups, *k)` order."""
        return (self.out_features, self.in_features // self.groups, *self.kernel)

    def adapter_params(self, config: AdapterConfig, *, scale: bool = True) -> int:
        """Parameters of `config`'s adapter on this layer: `lowrank.param_count` of its form
        and rank, plus 1 for a trainable scale (unless `scale=False`)."""
        count = param_count(config.form, self.in_features, self.out_features, self.kernel,
                            config.rank, groups=self.groups)  # fmt: skip
        return count + (scale and config.trainable_scale)


def transformers_conv1d() -> type | None:
    """transformers' `Conv1D` class if transformers is loaded (a model holding one must have
    loaded it), else `None`; transformers is never imported here."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is a transformers `Conv1D` (GPT-2's `c_attn`, `c_proj`, …)."""
    cls = transformers_conv1d()
    return cls is not None and isinstance(module, cls)


def layer_sizes(module: nn.Module) -> LayerSizes:
    """The sizes of a layer that takes an adapter; `TargetError` for any other module."""
    if isinstance(module, nn.Linear):
        return LayerSizes(module.in_features, module.out_features)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        kernel = tuple(module.kernel_size)
        return LayerSizes(module.in_channels, module.out_channels, kernel, module.groups)
    if isinstance(module, nn.Embedding):
        return LayerSizes(module.num_embeddings, module.embedding_dim)
    if is_conv1d(module):
        return LayerSizes(*module.weight.shape)
    raise TargetError(
        f"{type(module).__name__} is not an nn.Linear, nn.Conv1d/2d/3d, nn.Embedding or "
        "transformers Conv1D; only those take an adapter"
    )


# Forward pre-hooks that recompute a parameter from others before each forward.
_COMPUTING_HOOKS = (prune.BasePruningMethod, WeightNorm, SpectralNorm)


def weight_is_computed(module: nn.Module) -> str | None:
    """Why `module.weight` is not a plain parameter (a parametrization, or a forward pre-hook
    such as `torch.nn.utils.weight_norm` that recomputes it), or `None` if it is one."""
    if parametrize.is_parametrized(module, "weight"):
        names = [type(p).__name__ for p in module.parametrizations["weight"]]
        return f"its weight is computed by the parametrization(s) {names}"
    if not isinstance(module._parameters.get("weight"), nn.Parameter):
        hooks = [type(h).__name__ for h in module._forward_pre_hooks.values()]
        return f"its weight is not a parameter but computed before each forward (hooks {hooks})"
    return None


def check_fit(name: str, module: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """`config` validated for the module `name`, or a `TargetError` naming it.

    Linear layers, embeddings and Conv1D take every form (`centre_tap` is plain LoRA there);
    convolutions need zero padding; `centre_tap` needs a size-keeping convolution
    (`lowrank.check_centre_tap`); `hard` needs a linear-like layer or a 1×1 kernel and a
    weight that is a parameter or a parametrization; `fused` needs a plain `nn.Linear`,
    form `lora` or `centre_tap`, a constant scale and no `hard`; an embedding takes no
    dropout and no `max_norm`; a lazy module must be initialised; an integer weight (a
    quantized layer) is a `DTypeError`. A rank whose factors would hold more entries than a
    tensor can is a `RankError`.
    """
    if name == "":
        raise TargetError("targets match the root module itself; it cannot be replaced")
    config = AdapterConfig.build(config)
    try:
        sizes = layer_sizes(module)
    except TargetError as err:
        raise TargetError(f"module {name!r}: {err}") from None
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise TargetError(
            f"module {name!r} is an uninitialised lazy module ({type(module).__name__}): run "
            "one forward pass first so that its sizes are known"
        )
    if isinstance(weight, torch.Tensor) and not (weight.is_floating_point() or weight.is_complex()):
        raise DTypeError(
            f"module {name!r} has a {weight.dtype} weight (a quantized layer?); adapters "
            "need a floating-point weight"
        )
    config = config.validated(name)
    if config.form == "centre_tap" and sizes.kernel:
        try:
            check_centre_tap(module)
        except GeometryError as err:
            raise TargetError(f"module {name!r} does not fit form 'centre_tap': {err}") from None
    try:
        count = sizes.adapter_params(config, scale=False)
    except ShapeError as err:  # a zero-width layer or kernel
        raise TargetError(f"module {name!r} cannot take an adapter: {err}") from None
    if count > MAX_ELEMENTS:
        raise RankError(
            f"module {name!r}: rank {config.rank} gives {count} adapter parameters, more than "
            f"a tensor can hold ({MAX_ELEMENTS})"
        )
    problem = _misfit(module, sizes, config)
    if problem:
        raise TargetError(f"module {name!r} does not fit the adapter: {problem}")
    return config


def _misfit(module: nn.Module, sizes: LayerSizes, config: AdapterConfig) -> str | None:
    """What keeps `module` from taking the adapter `config` describes, or `None`."""
    if config.fused:
        if not isinstance(module, nn.Linear):
            kind = "a convolution" if sizes.kernel else f"a {type(module).__name__}"
            return f"fused=True needs an nn.Linear (the fused kernel is a linear LoRA), got {kind}"
        if type(module).forward is not nn.Linear.forward:
            return f"{type(module).__name__} overrides nn.Linear.forward, which fusing would skip"
        if config.form not in ("lora", "centre_tap"):
            return f"fused=True with form {config.form!r} (the fused kernel runs 'lora')"
        if config.trainable_scale:
            return "fused=True with trainable_scale=True (the kernel takes a constant scale)"
        if config.hard:
            return "fused=True with hard=True (the update is applied in weight space)"
    computed = weight_is_computed(module)
    if config.hard and computed and not parametrize.is_parametrized(module, "weight"):
        return f"hard=True reads the weight directly, but {computed}"
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return "an embedding with max_norm renormalises its rows in place on lookup"
        if config.dropout:
            return "an embedding takes integer indices, which dropout cannot apply to (dropout=0)"
        if module.sparse:
            return "an embedding with sparse=True gives sparse gradients, which factors cannot take"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_complex() and (config.hard or config.fused):
        flag = "hard=True" if config.hard else "fused=True"
        return f"{flag} with a {weight.dtype} weight (only an unfused branch runs complex)"
    if sizes.kernel:
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (adapters need 'zeros')"
        if config.hard and any(k != 1 for k in sizes.kernel):
            return f"hard=True needs a 1×1 kernel, got kernel_size {sizes.kernel}"
    return None


class LowRankAdapter(nn.Module):
    """A frozen base layer with a trainable low-rank update of one form.

    Built from an `AdapterConfig` (`config=`) and/or its fields by keyword:
    `LoRALinear(base, 8, alpha=16, form="lora", dropout=0.1)`. The factors (shapes in
    `lowrank.nn.variants`) take the base weight's dtype and device; the base's parameters
    are frozen. `weight` and `bias` are the effective ones (`W + ΔW` unless merged), for
    parents that read a child's weight instead of calling it (`nn.MultiheadAttention`).
    `merged`, `residual` and a fixed scale are saved in `state_dict()` (`get_extra_state`)
    and checked and restored on load.
    """

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
        self.config = config
        self.sizes = layer_sizes(base)
        self.merged = False
        self.residual = False
        self.shares_weight_with: tuple[str, ...] = ()
        self.register_buffer("base_copy", None, persistent=False)
        self.merged_factors: dict[str, torch.Tensor] | None = None
        weight = base.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        scale = config.resolved_scale()
        # a trainable scale is stored in the weight's dtype; a fixed one multiplies in the
        # dtype torch computes that dtype's products in (float32 for half precision), and
        # the fused kernel splits it between operands where neither overflows
        held = weight.dtype if config.trainable_scale else work_dtype(weight.dtype)
        if not abs(scale) < overflow_bound(held):
            how = "stored" if config.trainable_scale else "applied"
            raise DTypeError(
                f"scale {scale:g} (alpha / r or the scale given) is beyond {held}, in which "
                f"the adapter on {type(base).__name__} ({weight.dtype} weight) holds it "
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
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        # the mode of the layer it stands for: dropout only where the model is training
        self.training = base.training
        self.register_state_dict_post_hook(_save_as_merged)
        self.register_load_state_dict_pre_hook(_map_base_keys)
        self.register_load_state_dict_post_hook(_apply_loaded_state)

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
        `None` (with `init="pissa"`) takes `variant.nearest` of the base weight at the
        adapter's rank. Raises `TargetError` (grouped convolutions), `DTypeError` (a form
        this variant cannot hold), `ShapeError` (a ΔW or factor shape that does not fit),
        `ArgumentError` (a zero adapter scale) or `NonFiniteError` (NaN/Inf, or a ΔW beyond
        the adapter's dtype)."""
        if self.groups != 1:
            raise TargetError(
                f"initial factors for a grouped convolution ({self.groups} groups, one factor "
                "set each) are not supported; start it from zero"
            )
        if form is None:
            weight = self.to_weight_layout(self.base.weight.detach())
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
        share = abs(ratio) ** (1 / len(tensors))
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
    def fused(self) -> bool:
        """Whether a linear LoRA runs as one `lora_linear` call."""
        return self.config.fused

    @property
    def dropout(self) -> float:
        """Dropout probability of the branch input in training."""
        return self.config.dropout

    @property
    def num_params(self) -> int:
        """Trainable adapter parameters: `lowrank.param_count` of the form (+1 for a
        trainable scale)."""
        return self.sizes.adapter_params(self.config)

    def factor_tensors(self) -> dict[str, torch.Tensor]:
        """`{name: parameter}` of the factors (no base weights, no scale)."""
        return {
            name: param
            for name, param in self.named_parameters()
            if not name.startswith("base.") and name != "scale"
        }

    def reset_parameters(self) -> None:
        """Draw the factors again as a new adapter starts them: the output factor (`up`, CP's
        `out_factor`) zero, the others Kaiming-uniform, so ΔW = 0; a trainable scale back to
        the settings' value. For a model built on the meta device and materialised with
        `to_empty`, whose factors hold whatever memory they got. The base layer is left to its
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
        """The factors and, where trainable, `scale`: what `adapter_state_dict` saves."""
        tensors = self.factor_tensors()
        if isinstance(self.scale, nn.Parameter):
            tensors["scale"] = self.scale
        return tensors

    def plain_tensors(self) -> Factorset:
        """`adapter_tensors`, or a `TargetError` where a factor is computed (a
        parametrization, pruning or an old-style weight/spectral norm hook on the adapter
        itself): the branch's forward runs it, but ΔW as a weight needs the factors as they
        are stored."""
        computed = set(self.parametrizations) if parametrize.is_parametrized(self) else set()
        for hook in self._forward_pre_hooks.values():
            if isinstance(hook, _COMPUTING_HOOKS):
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

    def factors(self, factors: Factorset | None = None) -> Factors:
        """The adapter (or `factors`, as `adapter_tensors` gives them: a `scale` entry
        replaces the trainable scale) as a `lowrank.forms` object, scale applied (ungrouped
        layers only; a centre tap is a `LoRA` with a 1×1 `down`)."""
        if self.groups != 1:
            raise TargetError(
                f"this adapter has one factor set per group ({self.groups} groups); "
                "delta_weight() gives their block-diagonal ΔW"
            )
        factors = factors if factors is not None else self.plain_tensors()
        scale = factors.get("scale", self.scale)
        value = float(scale.detach()) if isinstance(scale, torch.Tensor) else scale
        tensors = self.variant.grouped({k: t for k, t in factors.items() if k != "scale"}, 1)
        return dataclasses.replace(self.variant.form(*(t[0] for t in tensors)), scale=value)

    def delta(
        self, factors: Factorset | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """ΔW `(out, in/groups, *k)` of `factors` (default: the adapter's own; a `scale`
        entry replaces the trainable scale), scale applied, computed in `dtype` (default: the
        factors'); differentiable."""
        delta, scale = self._unscaled_delta(factors, dtype)
        return delta * scale

    def _unscaled_delta(
        self, factors: Factorset | None, dtype: torch.dtype | None
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """`delta(factors, dtype)` at scale 1, and the scale it multiplies (a 0-d tensor in
        `dtype` where trainable)."""
        factors = factors or self.plain_tensors()
        tensors = self.variant.grouped(factors, self.groups)
        if dtype is not None:
            tensors = tuple(t.to(dtype) for t in tensors)
        dense = functools.partial(self.variant.dense, self.kernel_size)
        if self.groups == 1:
            delta = dense(*(t[0] for t in tensors))
        else:
            delta = torch.vmap(dense)(*tensors).flatten(0, 1)
        scale = factors.get("scale", self.scale)
        if isinstance(scale, torch.Tensor):
            scale = gathered(scale)  # a sharded scale (FSDP2 outside its forward): its value
        scale = _zero_d(scale)
        if isinstance(scale, torch.Tensor) and dtype is not None:
            scale = scale.to(dtype)
        return delta, scale

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW `(out, in, *k)` in the layout of the base weight (the same, but for embeddings
        and Conv1D, which store `(in, out)`)."""
        return delta

    def delta_weight(self) -> torch.Tensor:
        """ΔW shaped like `base.weight`, scale applied; differentiable in the factors."""
        return self.to_weight_layout(self.delta())

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight: `base.weight` when merged, else `base.weight + ΔW`."""
        if self.merged:
            return self.base.weight
        return self.base.weight + self.delta_weight().to(self.base.weight.dtype)

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
        mismatch = None if self.hard or _runs_plain(base) else self._merge_mismatch()
        if mismatch is not None:
            raise MergeError(
                f"cannot merge into {type(base).__name__}, whose forward is its class's own or "
                f"has hooks: {mismatch}; keep the adapter unmerged, or build it with "
                "hard=True, which runs that forward with W + ΔW"
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
        if not weight.is_floating_point() or not weight.numel() or weight.element_size() == 1:
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
        # ties as they are now, beyond the adapter (`lowrank.nn.merge` looks across its
        # model); a tie `inject` recorded is dropped only once a search of every live
        # module finds none, and its names are kept while any tie remains
        recorded = self.shares_weight_with
        fresh = found_ties(self, [self.base], "the adapter", always=bool(recorded))[0]
        self.shares_weight_with = tuple(dict.fromkeys((*recorded, *fresh))) if fresh else ()
        self.check_mergeable()
        self._write_merged(exact)

    def _write_merged(self, exact: bool, proven: bool | None = None) -> None:
        """`merge` once `check_mergeable` has passed; `proven` as `check_merged_weight`
        returned it (computed here if None)."""
        weight = self.base.weight
        if proven is None:
            proven = self._sum_is_finite(weight, None, 1)
        copy = weight.detach().clone() if exact else None
        self._sum(weight, None, 1, proven=proven, write=True)
        self.base_copy = copy
        self.merged = True
        self.merged_factors = self.factors_in_weight()

    def factors_in_weight(
        self, factors: Factorset | None = None
    ) -> dict[str, torch.Tensor] | None:
        """A copy of `factors` (default: the adapter's own) as just merged into the weight, for
        `unmerge` to take out that ΔW; None on the meta device, where there are no values."""
        factors = factors if factors is not None else self.plain_tensors()
        if any(tensor.is_meta for tensor in factors.values()):
            return None
        return {key: tensor.detach().clone() for key, tensor in factors.items()}

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

    def _probes(self) -> list[torch.Tensor]:
        """Small float32 inputs of the base layer's kind for `_merge_mismatch`, tried in
        turn: a batch of one sequence of 3 rows of `in` features, then 3 rows alone."""
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, self.sizes.in_features, generator=generator)
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
                delta = torch.randn(weight.shape, generator=generator, device=weight.device)
                delta *= size
                plain = functional_call(base, state, (probe,))
                state["weight"] = state["weight"] + delta
                merged = functional_call(base, state, (probe,))
                branch = self._with_weight(probe, delta, bias=False)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`base(x) + scale · branch(x)` (dropout on the branch input in training), the base
        with `W + ΔW` under `hard`, the base alone when merged."""
        if self.merged:
            return self.base(x)
        if self.hard:
            if _runs_plain(self.base):
                return self._with_weight(x, self.weight)
            # the base's own forward (a subclass's, its hooks) with W + ΔW in place of W
            return functional_call(self.base, {"weight": self.weight}, (x,))
        branch_input = F.dropout(x, self.dropout, self.training) if self.dropout else x
        out = self.base(x)
        branch = self._branch(branch_input) * _zero_d(self.scale)
        if not _runs_plain(self.base) and branch.shape != out.shape:  # its own padding, say
            raise TargetError(
                f"the base layer ({type(self.base).__name__}) gave an output of shape "
                f"{tuple(out.shape)} but the adapter's branch {tuple(branch.shape)}: its forward "
                "computes something else than its weight and settings describe, which the branch "
                "cannot follow"
            )
        return out + branch

    def extra_repr(self) -> str:
        scale = "trainable" if isinstance(self.scale, nn.Parameter) else f"{self.scale:g}"
        extra = (", fused=True" if self.fused else "") + (
            f", dropout={self.dropout:g}" if self.dropout else ""
        )
        groups = f", groups={self.groups}" if self.groups != 1 else ""
        groups += f", init={self.config.init!r}" if self.config.init != "default" else ""
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


def _runs_plain(module: nn.Module) -> bool:
    """Whether calling `module` runs only the plain operation of its kind (`F.linear`, the
    convolution, the lookup): its class's `forward` is torch's (or transformers' `Conv1D`),
    not a subclass's, and it has no forward or backward hooks of its own and no `forward` set
    on the instance. Hooks registered for every module (`register_module_forward_hook`) are
    not seen."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
             module._backward_pre_hooks)  # fmt: skip
    return _plain_forward(module) and not (any(hooks) or "forward" in module.__dict__)


def _plain_forward(module: nn.Module) -> bool:
    """Whether `module`'s class runs torch's (or transformers' `Conv1D`) own `forward`."""
    return getattr(type(module).forward, "__module__", None) in _PLAIN_FORWARDS


class LoRALinear(LowRankAdapter):
    """An adapter on an `nn.Linear` (`in → out`); every form (centre tap is plain LoRA here)."""

    in_features, out_features = _of_base("in_features"), _of_base("out_features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(…, in) → (…, out)`; with `fused`, unmerged, one `lora_linear` call, unless the
        base layer has hooks or a replaced `forward` (offloading wrappers), which only calling
        it runs."""
        base = self.base
        if self.fused and not self.merged and _runs_plain(base):
            p = self.dropout if self.training else 0.0
            return lora_linear(x, base.weight, self.down, self.up, self.scale, base.bias, p)
        return super().forward(x)

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

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.variant.linear(self, lambda w: self._lookup(x, w.t()))


class LoRAConv(LowRankAdapter):
    """An adapter on an `nn.Conv1d/2d/3d` (zero padding) in any form; a grouped or depthwise
    convolution gets one factor set per group (a block-diagonal ΔW).

    Without gradients for the factors (inference) and outside dropout, the layer runs one
    convolution with `W + ΔW` where recomposing ΔW costs fewer multiply-adds than the
    branch (`weight_space_is_cheaper`); the result is the same up to rounding.
    """

    in_channels, out_channels = _of_base("in_channels"), _of_base("out_channels")
    stride, padding, dilation = _of_base("stride"), _of_base("padding"), _of_base("dilation")
    padding_mode, output_padding = _of_base("padding_mode"), _of_base("output_padding")
    transposed = _of_base("transposed")

    def _with_weight(
        self, x: torch.Tensor, weight: torch.Tensor, *, bias: bool = True
    ) -> torch.Tensor:
        base = self.base
        conv = conv_function(len(self.kernel_size))
        return conv(x, weight, base.bias if bias else None, base.stride, base.padding,
                    base.dilation, base.groups)  # fmt: skip

    def _probes(self) -> list[torch.Tensor]:
        base = self.base
        generator = torch.Generator().manual_seed(0)
        geometry = zip(base.kernel_size, base.dilation, base.stride, strict=True)
        spatial = [(k - 1) * d + 2 * s + 1 for k, d, s in geometry]
        x = torch.randn(1, base.in_channels, *spatial, generator=generator)
        return [x.to(base.weight.device)]

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        conv = conv_function(len(self.kernel_size))
        geometry = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        return self.variant.conv(self, x, conv, geometry, self.groups)

    def weight_space_is_cheaper(self, x: torch.Tensor) -> bool:
        """Whether recomposing ΔW (about `dense · r` multiply-adds) costs less than running the
        branch on `x` (`positions · adapter parameters`)."""
        sizes = self.sizes
        channels = x.shape[-len(sizes.kernel) - 1]
        positions = x.numel() // channels // math.prod(self.base.stride)
        dense = math.prod(sizes.dense_shape)
        return positions * self.num_params > dense * self.config.r_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(N, in, *S) → (N, out, *S')`."""
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        dropping = self.training and self.dropout
        if (
            not (self.merged or self.hard or needs_grad or dropping)
            and _runs_plain(self.base)
            and not self.base.weight.is_complex()
            and self.weight_space_is_cheaper(x)
        ):
            return self._with_weight(x, self.weight)
        return super().forward(x)


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


def _save_as_merged(
    module: LowRankAdapter, state_dict: dict, prefix: str, _meta: dict
) -> None:
    """State-dict post-hook: a merged adapter's factors are saved as they were merged
    (`merged_factors`), so that the state's weight holds their ΔW even where the factors
    changed since; a shard (FSDP2's DTensor) is saved as the one kept at the merge."""
    if not module.merged or module.merged_factors is None:
        return
    for key, tensor in module.merged_factors.items():
        saved = state_dict.get(prefix + key)
        if not isinstance(saved, torch.Tensor) or saved.is_meta or tensor.is_meta:
            continue
        if tensor.shape != saved.shape:
            continue
        if type(saved.detach()) is not torch.Tensor:  # a shard: kept with its placements
            same = getattr(tensor, "placements", None) == getattr(saved, "placements", ())
            if same and type(tensor) is type(saved.detach()):
                state_dict[prefix + key] = tensor.to(dtype=saved.dtype)
            continue
        merged = tensor.to(device=saved.device, dtype=saved.dtype)
        if not torch.equal(merged, saved.detach()):  # changed since: keep_vars aside
            state_dict[prefix + key] = merged


def _base_names(module: LowRankAdapter) -> set[str]:
    """The names of the base layer's own parameters, buffers and submodules."""
    base = module.base
    return set(base._parameters) | set(base._buffers) | set(base._modules)


def _map_base_keys(
    module: LowRankAdapter,
    state_dict: dict,
    prefix: str,
    _meta: dict,
    _strict: bool,
    _missing: list,
    _unexpected: list,
    _errors: list,
) -> None:
    """Load pre-hook: keys of the un-adapted layer (`prefix.weight`) go to the base
    (`prefix.base.weight`); the saved state (`saved_state`) sets the merged flag (a
    checkpoint that carries the base weight without it is unmerged), and a fixed scale saved
    loads into a trainable one. Factors may not load into a merged adapter without its base
    weight: the weight would keep the old ΔW."""
    base_names = _base_names(module)
    own = {name.split(".")[0] for name in module.factor_tensors()}
    own |= {"scale", "base", _EXTRA, *_OLD_FLAGS}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        head = key[len(prefix):].split(".")[0]
        target = prefix + "base." + key[len(prefix):]
        if head in base_names and head not in own and target not in state_dict:
            state_dict[target] = state_dict.pop(key)
    assign = bool(_meta.get("assign_to_params_buffers", False))
    has_weight, has_factors, saved = refuse_load(module, state_dict, prefix, assign=assign)
    held = module.scale
    if isinstance(held, nn.Parameter) and saved.scale is not None and not saved.scale_entry:
        # a fixed scale saved (0-d, or in the saved state) loads as the (1,) one, in its
        # dtype and place (a meta one's place is the state's, for `assign=True`)
        place = None if held.is_meta else held.device
        state_dict[prefix + "scale"] = saved.scale.reshape(1).to(dtype=held.dtype, device=place)
    if not isinstance(held, nn.Parameter):
        state_dict.pop(prefix + "scale", None)  # equal to the fixed one (`refuse_load`)
    for name in _OLD_FLAGS:
        state_dict.pop(prefix + name, None)
    merged, residual = saved.merged, saved.residual
    if not has_weight:
        merged = residual = None  # the flags describe the base weight, which stays as it is
    elif residual is None and has_factors:
        residual = False  # W and factors saved from an adapter that started from zero
    if has_weight and merged is None:
        merged = False
    factor_keys = [prefix + name for name in module.adapter_tensors()]
    module._loading = _Loading(
        merged, has_weight and not has_factors, factor_keys, residual, prefix + _EXTRA
    )


# the saved state's key (torch's name for a module's extra state), and the keys of the
# flags a state saved before it held
_EXTRA = "_extra_state"
_OLD_FLAGS = ("merged", "residual")


@dataclass(frozen=True)
class SavedState:
    """What a state says of an adapter beside its tensors: whether the base weight it holds
    is merged (W + ΔW) and whether it holds `W − ΔW₀` of a PiSSA start (None: not said),
    the one-element scale its factors were trained at (None: not said), whether that is a
    trainable scale's `(1,)` entry (else a fixed one recorded), whether the scale was
    trainable but the state lacks it, and the adapter form it records (None: not said)."""

    merged: bool | None
    residual: bool | None
    scale: torch.Tensor | None
    scale_entry: bool = False
    scale_missing: bool = False
    form: str | None = None


def saved_state(state_dict: dict, prefix: str) -> SavedState:
    """The `SavedState` of `state_dict` under `prefix`: from `<prefix>_extra_state`
    (`LowRankAdapter.get_extra_state`) and `<prefix>scale`, or from the `merged`, `residual`
    and 0-d `scale` entries of a state saved before the extra state; `StateDictError` for an
    extra state that is not one."""
    key = prefix + _EXTRA
    extra = state_dict.get(key)
    scale = state_dict.get(prefix + "scale")
    entry = isinstance(scale, torch.Tensor) and scale.ndim == 1
    if extra is None:
        merged, residual = (state_dict.get(prefix + name) for name in _OLD_FLAGS)
        return SavedState(
            None if merged is None else state_flag(prefix + "merged", merged),
            None if residual is None else state_flag(prefix + "residual", residual),
            scale if isinstance(scale, torch.Tensor) else None,
            scale_entry=entry,
        )
    fits = isinstance(extra, torch.Tensor) and extra.shape == (5,) and not extra.is_meta
    if not fits or not extra.is_floating_point():
        raise StateDictError(
            f"{key} must be an adapter's saved state, a floating-point tensor [merged, "
            f"residual, trainable, scale, form] of shape (5,) with values, got {_shown(extra)}"
        )
    merged, residual, trainable, fixed, code = extra.double().tolist()
    form = next((v.name for v in VARIANTS.values() if v.code == code), None)
    if form is None:
        raise StateDictError(f"{key}[4] must be the code of an adapter form, got {code!r}")
    trainable = state_flag(f"{key}[2] (trainable)", trainable)
    merged = state_flag(f"{key}[0] (merged)", merged)
    residual = state_flag(f"{key}[1] (residual)", residual)
    recorded = {"merged": merged, "residual": residual}
    # flags as an earlier version saved them (and `adapter_state_dict` saves `residual`),
    # and a 0-d scale beside a fixed one recorded (a `(1,)` one is a trainable adapter's
    # own, in a template filled in place): refused where they say otherwise
    for name, value in recorded.items():
        flag = state_dict.get(prefix + name)
        if flag is not None and state_flag(prefix + name, flag) != value:
            raise StateDictError(
                f"this state's {prefix}{name} says {not value}, but its {key} records "
                f"{value}: keep one of them"
            )
    older = isinstance(scale, torch.Tensor) and scale.ndim == 0 and not trainable
    older = older and scale.is_floating_point() and not scale.is_meta
    if older and float(scale.double()) != float(torch.tensor(fixed, dtype=scale.dtype)):
        raise StateDictError(
            f"this state's {prefix}scale is {float(scale)!r}, but its {key} records the "
            f"fixed scale {fixed!r}: keep one of them"
        )
    # a fixed scale recorded is the one the factors were trained at, whatever `scale`
    # entry lies beside it (a template filled in place holds a trainable adapter's own)
    trained = scale if isinstance(scale, torch.Tensor) else None
    return SavedState(
        merged,
        residual,
        trained if trainable else extra[3:4],
        scale_entry=trainable and entry,
        scale_missing=trainable and trained is None,
        form=form,
    )


class _Loading(NamedTuple):
    """What a load pre-hook found, for the post-hook: the merged and residual flags to set
    (None: left as they are), whether the state held the base weight alone, the factor keys
    and the saved state's key (neither counts as missing then)."""

    merged: bool | None
    base_only: bool
    factor_keys: list[str]
    residual: bool | None
    extra_key: str


def loaded_parts(
    module: LowRankAdapter, state_dict: dict, prefix: str
) -> tuple[bool, bool, SavedState]:
    """Whether `state_dict` holds, under `prefix`, the base layer's weight (as `base.weight`
    or as the un-adapted layer's `weight`) and any of the adapter's tensors, and its
    `SavedState`."""
    has_weight = prefix + "base.weight" in state_dict or prefix + "weight" in state_dict
    has_factors = any(prefix + name in state_dict for name in module.adapter_tensors())
    return has_weight, has_factors, saved_state(state_dict, prefix)


def _shown(value: object) -> str:
    """`value` in an error message: a tensor by its dtype and shape, anything else by repr."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def state_flag(key: str, value: object) -> bool:
    """A saved `merged` / `residual` flag as a bool: 0 or 1 as a one-element tensor of any
    real dtype (`state_dict` writes a bool one; a state cast wholesale to float16 holds a
    float one), a bool or a number (NumPy's included); else `StateDictError` naming `key`."""
    if isinstance(value, torch.Tensor):
        number = None
        if value.numel() == 1 and not value.is_meta and not value.is_complex():
            number = float(value.reshape(()))
    elif isinstance(value, (str, bytes)):
        number = None
    else:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            number = None
    if number in (0.0, 1.0):
        return bool(number)
    raise StateDictError(
        f"{key} must be a saved flag, 0 or 1 (a one-element tensor), got {_shown(value)}"
    )


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole: a DTensor (FSDP2's shard) gathered from every rank, a collective; any
    other tensor as it is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def _zero_d(scale: float | torch.Tensor) -> float | torch.Tensor:
    """A trainable `(1,)` scale as a 0-d view: a 0-d tensor never promotes a product's dtype,
    so a bf16 branch under autocast stays bf16, as with a constant scale."""
    return scale.reshape(()) if isinstance(scale, torch.Tensor) else scale


def outside_autocast(tensor: torch.Tensor) -> AbstractContextManager:
    """A context with autocast off on `tensor`'s device, for arithmetic that must run in the
    dtypes it asks for (ΔW in float32 for a merge, a PiSSA start's SVD), also when called
    inside a `torch.autocast` region."""
    device = tensor.device.type
    if not torch.amp.is_autocast_available(device):
        return nullcontext()
    return torch.autocast(device, enabled=False)


def refuse_load(
    module: LowRankAdapter, state_dict: dict, prefix: str, *, assign: bool = False
) -> tuple[bool, bool, SavedState]:
    """`loaded_parts` of `state_dict` for `module` (under `prefix`), or `StateDictError` if
    it cannot load into `module` as it stands: a base weight without the adapter and from
    another start would lose (or gain) ΔW₀; a merged base weight without all the factors
    merged into it, or merged at another scale than `module`'s fixed one, would sit beside
    other ones; factors without the base weight into a merged adapter would keep the old
    ΔW, and factors whose flag says they started otherwise than `module` would sit beside
    the wrong base; a factor of another form, and a scale other than `module`'s fixed one,
    would load into a different model (torch's hooks never see `strict`, so these are
    refused in either mode, as torch refuses another shape). `ShapeError` for a factor or
    weight of another shape (`_require_loaded_shapes`). `assign` is `load_state_dict`'s
    (a trainable scale then takes the state's dtype)."""
    has_weight, has_factors, saved = loaded_parts(module, state_dict, prefix)
    residual = saved.residual
    where = f"the adapter at {prefix[:-1]!r}"
    _refuse_other_form(module, state_dict, prefix, saved)
    _require_loaded_shapes(module, state_dict, prefix)
    merged = has_weight and bool(saved.merged)
    if merged:
        absent = [name for name in module.factor_tensors() if prefix + name not in state_dict]
        if absent:
            raise StateDictError(
                f"{where}: this state's base weight holds W + ΔW of its factors, but it lacks "
                f"{', '.join(absent)}; beside the adapter's own it would not be the model it was "
                "saved from: load it with all its factors, or save it unmerged"
            )
    _refuse_other_scale(module, saved, prefix, merged=merged, assign=assign)
    if has_weight and not has_factors and bool(residual) != module.residual:
        if module.residual:
            raise StateDictError(
                f"{where} started from init='pissa', so its base holds W − ΔW₀; a base "
                "weight saved without that start would lose ΔW₀: load the checkpoint before "
                "inject, or a state dict saved from an adapted model"
            )
        raise StateDictError(
            f"{where} started from zero, but this base weight holds W − ΔW₀ of a PiSSA "
            "start: beside these factors it would not be the model it was saved from (load "
            "its factors with it)"
        )
    if has_factors and not has_weight:
        if module.merged:
            raise StateDictError(
                f"{where} is merged, so its base weight holds the current ΔW: unmerge it "
                "before loading other factors, or use lowrank.nn.load_adapter_state_dict"
            )
        if residual is not None and residual != module.residual:
            raise StateDictError(f"{where} {start_mismatch(residual)}")
    return has_weight, has_factors, saved


def _refuse_other_scale(
    module: LowRankAdapter, saved: SavedState, prefix: str, *, merged: bool, assign: bool
) -> None:
    """`StateDictError` where the `saved` state holds a scale (trainable, or the fixed one
    a state records) other than `module`'s fixed scale, or lacks its trainable one: the
    factors were trained at it, and a merged state's base weight holds ΔW at it, which
    unmerging would take out at the other; and where a merged state records no scale.
    `NonFiniteError` where a finite, nonzero scale overflows or underflows the dtype of
    `module`'s trainable one (the state's own with `assign`, which keeps it)."""
    value = saved.scale
    where = f"the adapter at {prefix[:-1]!r}"
    trainable = isinstance(module.scale, nn.Parameter)
    if saved.scale_missing and not trainable:
        raise StateDictError(
            f"{where} has the fixed scale {module.scale!r}, but this state's factors were "
            f"trained with a trainable scale that it lacks ({prefix}scale): load it with that "
            "entry, or inject with trainable_scale=True"
        )
    if value is None:
        if merged:
            raise StateDictError(
                f"{where}: this state's base weight holds W + ΔW, but the state records no "
                f"scale ({prefix}scale) to say at which scale it was merged; add it "
                "(torch.tensor(scale, dtype=torch.float64)) or save the state unmerged"
            )
        return
    if isinstance(value, torch.Tensor) and type(value.detach()) is not torch.Tensor:
        if trainable:
            return  # a shard (FSDP2's DTensor) into a shard: the engine's own
        value = gathered(value)  # a collective, as the load of a sharded model is
    number = None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
        number = float(value.reshape(()).double()) if value.is_floating_point() else None
    if trainable and isinstance(value, torch.Tensor) and value.is_complex():
        raise StateDictError(
            f"{prefix}scale must be real, got a {value.dtype} tensor: the adapter's scale is "
            f"{module.scale.dtype}"
        )
    if trainable and number is None:
        return  # torch's to load
    if number is None:
        raise StateDictError(
            f"{prefix}scale must be a one-element floating-point tensor, got {value!r}"
        )
    if trainable:
        kept = assign and saved.scale_entry
        dtype = value.dtype if kept else module.scale.dtype
        stored = float(torch.tensor(number, dtype=dtype))
        if math.isfinite(number) and (not math.isfinite(stored) or (number and not stored)):
            raise NonFiniteError(
                f"{prefix}scale = {number!r} {'over' if stored else 'under'}flows the "
                f"adapter's {dtype} scale (to {stored!r}): inject with a wider dtype to load it"
            )
        return
    # a state cast wholesale (to bfloat16, say) holds the scale rounded to its dtype
    if number == float(torch.tensor(module.scale, dtype=value.dtype)):
        return
    if merged:
        raise StateDictError(
            f"{where} has scale {module.scale!r}, but this state's base weight holds W + ΔW "
            f"merged at scale {number!r}: unmerging would take out another ΔW; inject with "
            "the alpha (or scale) it was saved with"
        )
    raise StateDictError(
        f"{where} has the fixed scale {module.scale!r}, but this state's factors are at "
        f"scale {number!r}: inject with trainable_scale=True (or that scale) to load it, or "
        "load its factors alone (lowrank.nn.load_adapter_state_dict) to keep the adapter's"
    )


# names under a PEFT layer (`lora_A.<adapter>.weight`, …), never under an adapter here
_PEFT_NAMES = frozenset(
    ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
     "lora_magnitude_vector", "lora_dropout")
)  # fmt: skip


def _refuse_other_form(
    module: LowRankAdapter, state_dict: dict, prefix: str, saved: SavedState
) -> None:
    """`StateDictError` where the state under `prefix` is of another adapter form: its saved
    state records another form, it holds factors only another form has (a Tucker2 state's
    `mid` in a LoRA adapter), or a PEFT layer's entries. Found before torch, which in a
    strict load copies every other key before it reports them. Other keys the adapter lacks
    are torch's to report, or to ignore under `strict=False`."""
    base_names = _base_names(module)
    heads = {key[len(prefix):].split(".")[0] for key in state_dict if key.startswith(prefix)}
    where = f"the adapter at {prefix[:-1]!r} ({module.config.form}, rank {module.rank})"
    peft = sorted((heads & _PEFT_NAMES) - base_names)
    if peft:
        raise StateDictError(
            f"{where} has no {', '.join(prefix + h for h in peft)}: this is a PEFT model's "
            "state; save it as a PEFT adapter (save_pretrained) and load that with "
            "lowrank.io (inject_adapter, apply_adapter)"
        )
    others = {name for variant in VARIANTS.values() for name in variant.names}
    foreign = sorted(heads & (others - set(module.variant.names)))
    if foreign and saved.form in (None, module.variant.name):
        raise StateDictError(
            f"{where} has no {', '.join(prefix + n for n in foreign)}: a state of another "
            "adapter form; inject with the settings it was saved with"
        )
    form = saved.form
    whole = any(prefix + name in state_dict for name in ("base.weight", "weight", "merged"))
    if form is None and whole:
        # a whole state (base weight or flags) without a record, as earlier versions saved
        # it, holds every factor of its form: exactly another form's are that form's
        own = set(module.variant.names)
        found = {name for name in others if prefix + name in state_dict}
        form = next((v.name for v in VARIANTS.values() if set(v.names) == found != own), None)
    if form not in (None, module.variant.name):
        raise StateDictError(
            f"{where}: this state is of the {form} form; inject with the settings it was "
            "saved with"
        )


def _require_loaded_shapes(module: LowRankAdapter, state_dict: dict, prefix: str) -> None:
    """`ShapeError` naming the key where `state_dict` holds a factor or the base weight of
    another shape than `module`'s (another rank): found before torch copies anything, which
    it would do for every other key before reporting the mismatch; `StateDictError` for
    one that is no tensor, which torch would report only after the copies too."""
    keys = [prefix + name for name in module.adapter_tensors()]
    for key in (*keys, prefix + "base.weight", prefix + "weight"):
        value = state_dict.get(key)
        if value is not None and not isinstance(value, torch.Tensor):
            raise StateDictError(f"{key} must be a tensor, got {_shown(value)}")
    for name, current in module.adapter_tensors().items():
        value = state_dict.get(prefix + name)
        if not isinstance(value, torch.Tensor) or (name == "scale" and value.ndim == 0):
            continue  # a 0-d scale loads as the (1,) one (`_map_base_keys`)
        if value.shape != current.shape:
            raise ShapeError(
                f"{prefix}{name} has shape {tuple(value.shape)}, but the adapter's is "
                f"{tuple(current.shape)} (rank {module.rank})"
            )
    for key in (prefix + "base.weight", prefix + "weight"):
        value = state_dict.get(key)  # the weight read only then (a parametrization computes it)
        if isinstance(value, torch.Tensor) and value.shape != module.base.weight.shape:
            raise ShapeError(
                f"{key} has shape {tuple(value.shape)}, but the adapted layer's weight is "
                f"{tuple(module.base.weight.shape)}"
            )


def start_mismatch(saved_residual: bool) -> str:
    """Why factors saved with `saved_residual` cannot load into an adapter that started the
    other way."""
    how = (
        "started from zero, but these factors were trained from init='pissa' (beside a "
        "base holding W − ΔW₀)"
        if saved_residual
        else "started from init='pissa' (its base holds W − ΔW₀), but these factors were "
        "trained beside the base weight W"
    )
    return f"{how}: the model would not be the one they were saved from"


def _apply_loaded_state(module: LowRankAdapter, incompatible: object) -> None:
    """Load post-hook: set the loaded merged state; a state without the saved state (one of
    the un-adapted layer, or saved before it) does not count it missing, and a checkpoint
    of the un-adapted layer lacks the factors, which then keep their values instead of
    counting as missing."""
    loading = module.__dict__.pop("_loading", None)
    if loading is None:
        return
    merged, base_only, factor_keys, residual, extra_key = loading
    missing = incompatible.missing_keys  # type: ignore[attr-defined]
    missing[:] = [key for key in missing if key != extra_key]
    if residual is not None:
        module.residual = bool(residual)
    if merged is not None:
        module.merged = merged
        module.base_copy = None
        # the loaded weight holds ΔW of the loaded factors: unmerge takes out that one
        module.merged_factors = module.factors_in_weight() if merged else None
    if base_only:
        # factors that hold no values (a model built on the meta device) stay missing
        kept = {prefix_key for prefix_key, factor in zip(
            factor_keys, module.adapter_tensors().values(), strict=True) if not factor.is_meta}
        missing[:] = [key for key in missing if key not in kept]

