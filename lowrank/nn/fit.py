"""Which layers take an adapter, and whether one fits: a layer's sizes (`LayerSizes`), the
transformers `Conv1D` test that never imports transformers, weights a hook or
parametrization computes, and `check_fit`, the one validation of a module against an
`AdapterConfig`."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .._checks import FLOAT_DTYPES, MAX_ELEMENTS
from ..bounds import param_count
from ..conv import check_centre_tap
from ..errors import DTypeError, GeometryError, RankError, ShapeError, TargetError
from .config import AdapterConfig


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
        and rank, plus `out` with `dora` (the magnitude) and 1 for a trainable scale (unless
        `scale=False`)."""
        count = param_count(config.form, self.in_features, self.out_features, self.kernel,
                            config.rank, groups=self.groups)  # fmt: skip
        magnitude = self.out_features if config.dora else 0
        return count + magnitude + (scale and config.trainable_scale)


def transformers_conv1d() -> type | None:
    """transformers' `Conv1D` class if transformers is loaded (a model holding one must have
    loaded it), else `None`; transformers is never imported here."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def output_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The output layer of a transformers model (a `PreTrainedModel`: what its
    `get_output_embeddings()` returns, under the first name `named_modules()` gives it), which
    PEFT's `"all-linear"` leaves out; None for any other module (PEFT leaves nothing out of
    it, a submodule named `lm_head` included) or a model without one. transformers is never
    imported here.

    PEFT turns `"all-linear"` into the names of the other linear layers, which select a
    module by its whole name or as a dotted suffix of it: an output layer whose name ends in
    `.<another linear layer's name>` (`cls.predictions.decoder` beside a layer `decoder`)
    is selected after all, and so not left out (None)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    pretrained = getattr(modeling, "PreTrainedModel", None)
    if pretrained is None or not isinstance(model, pretrained):
        return None
    output = model.get_output_embeddings()
    if not isinstance(output, nn.Module):
        return None
    named = list(model.named_modules())
    name = next((n for n, m in named if m is output), None)
    if name is None:
        return None
    linear = {n for n, m in named if n != name and (isinstance(m, nn.Linear) or is_conv1d(m))}
    if any(name.endswith(f".{other}") for other in linear):
        return None
    return name, output


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
COMPUTING_HOOKS = (prune.BasePruningMethod, WeightNorm, SpectralNorm)


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
    `centre_tap` needs a size-keeping convolution
    (`lowrank.check_centre_tap`); `hard` needs a linear-like layer or a 1×1 kernel and a
    weight that is a parameter or a parametrization; `fused` needs a plain `nn.Linear`,
    form `lora` or `centre_tap`, a constant scale and no `hard`; `init="pissa"` needs
    `groups=1` (a grouped convolution's adapter holds one factor set per group), as does
    `dora`, which also needs an `nn.Linear`, a convolution or a `Conv1D` with a real weight; an
    embedding takes no dropout and no `max_norm`; a lazy module must be initialised; an
    integer or float8 weight (a quantized layer) is a `DTypeError`. A rank whose factors
    would hold more entries than a tensor can is a `RankError`.
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
    # the factors take the weight's dtype, and float8 ones can be neither initialised nor
    # multiplied: a float8 weight is a quantized layer, as an integer one is
    if isinstance(weight, torch.Tensor) and not (
        weight.dtype in FLOAT_DTYPES or weight.is_complex()
    ):
        raise DTypeError(
            f"module {name!r} has a {weight.dtype} weight (a quantized layer?); adapters "
            "need a float16, bfloat16, float32, float64 (or complex) weight"
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


def _dora_misfit(module: nn.Module, sizes: LayerSizes) -> str | None:
    """What keeps `module` from taking a DoRA adapter, or `None`: it runs on `nn.Linear`,
    ungrouped `nn.Conv1d/2d/3d` with a real weight, and transformers' `Conv1D`."""
    if not (isinstance(module, nn.Linear | nn.modules.conv._ConvNd) or is_conv1d(module)):
        return (
            "dora=True runs on nn.Linear, nn.Conv1d/2d/3d and transformers Conv1D, got a "
            f"{type(module).__name__}"
        )
    if sizes.groups != 1:
        return f"dora=True on a grouped convolution ({sizes.groups} groups) is not supported"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_complex():
        return f"dora=True with a {weight.dtype} weight (the magnitude is real)"
    return None


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
    if config.dora:
        problem = _dora_misfit(module, sizes)
        if problem:
            return problem
    if config.init == "pissa" and sizes.groups != 1:
        return (
            f"init='pissa' on a grouped convolution ({sizes.groups} groups, one factor set "
            "each) is not supported; start it from zero"
        )
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
    if isinstance(weight, torch.Tensor) and weight.is_complex() and config.factor_dtype:
        return f"factor_dtype {config.factor_dtype} (real) over a {weight.dtype} weight"
    if config.hard and any(k != 1 for k in sizes.kernel):
        return f"hard=True needs a 1×1 kernel, got kernel_size {sizes.kernel}"
    return None
