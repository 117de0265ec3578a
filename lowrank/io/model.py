"""Adapter files and models: an `Adapter` merged into a model's weights (`apply_adapter`)
or injected as trainable `lowrank.nn` modules (`inject_adapter`), and a model's trained
adapter modules back into an `Adapter` (`model_adapter`)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._checks import require_module, require_real
from .._tensors import gathered, sharded_like
from ..conv import centre_tap
from ..errors import DeviceError, DTypeError, MergeError, ShapeError, TargetError
from ..forms import DoRA, Factors, LoRA, Tucker2
from ..nn import inject
from ..nn.fit import is_conv1d, weight_is_computed
from ..nn.layers import LowRankAdapter
from ..nn.model import adapters as adapter_modules
from ..nn.model import resharded
from ..nn.ties import tied_names
from .adapter import Adapter, form_name
from .files import PathLike
from .merge import dora_of, dora_squares, merged_blocks, row_blocks
from .names import layer_parameter, parameter_key
from .quantized import FLOAT8, SCALE_NAMES
from .store import adapter_from


def apply_adapter(
    model: nn.Module,
    adapter: PathLike | Adapter,
    weight: float = 1.0,
    *,
    component: str | None = None,
) -> list[str]:
    """Merge `weight · ΔW` of every layer into `model`'s weights in place ("fuse"); a DoRA
    layer's weight becomes `m ⊙ (W + ΔW) / (‖W + ΔW‖ + eps)`, the weight PEFT's and LyCORIS'
    forward passes compute on each call, at `weight=1` only (`MergeError` otherwise). A
    base weight or bias the adapter saves beside its layers (`Adapter.base_weights`: PEFT's
    `save_embedding_layers`, `modules_to_save`, `bias`) takes the place of the module's own
    first, as PEFT loads it.

    Each layer must name a module of `model` with a matching weight (kohya names are
    mapped through `model`'s module names; `component` picks one model of a pipeline
    adapter), held as a plain floating-point parameter with real data: a `lowrank.nn`
    adapter, a parametrized or hook-computed weight (`weight_norm`) or a weight tied to
    another module's is a `MergeError`, one on the meta device a `DeviceError`. Every
    merged weight is computed and checked finite before any is written, so an error leaves
    `model` unchanged. Returns the merged module names. A weight sharded by FSDP2 (a
    DTensor) is merged whole, gathered from every rank (a collective: call it on every
    rank), and each rank writes its own shard; every FSDP2 group of `model` is resharded
    first, as `lowrank.nn.merge` does.
    """
    scale = require_real("weight", weight)
    require_module("model", model)
    resharded(model)  # FSDP2's full-size copies, which the next reshard drops, hold no merge
    fitted = adapter_from(adapter).for_model(model, component)
    layers = fitted.layers
    saved = _saved_weights(fitted)
    label = str(getattr(adapter, "source", None) or adapter)
    modules = {name: _plain_weight(model, name) for name in {**layers, **saved}}
    seen: dict[tuple[int, str], str] = {}
    for name, module in modules.items():
        held = (id(module), layer_parameter(name)[1])
        if held in seen:
            raise TargetError(
                f"layers {seen[held]!r} and {name!r} name one module (registered under "
                "both names); keep one of them"
            )
        seen[held] = name
    weighted = [name for name in layers if layer_parameter(name)[1] == "weight"]
    ties_of = tied_names(model, [modules[name] for name in weighted])
    for name, ties in zip(weighted, ties_of, strict=True):
        if ties:
            raise MergeError(
                f"the weight of module {name!r} is also {', '.join(map(repr, ties))} (tied "
                "weights), which applying the adapter would change too; untie them first"
            )
    merged = {}
    with torch.no_grad():
        for name in modules:
            param = getattr(modules[name], layer_parameter(name)[1])
            whole = gathered(param.detach())
            if name in saved:  # PEFT loads the saved weight in place of the model's
                whole = saved[name].to(device=whole.device, dtype=whole.dtype)
            if name not in layers:
                merged[name] = sharded_like(whole, param)
                continue
            updates = [(layers[name], scale, label)]
            dora, squares = dora_of(updates, name), None
            if dora is not None and dora.axis == 1:  # norms over all rows: a first pass
                squares = dora_squares(row_blocks(whole), dora, param.dtype)
            merging = merged_blocks(row_blocks(whole), updates, param.dtype, name, None, squares)
            blocks = list(merging)
            # a sharded weight's own part of the merged one
            merged[name] = sharded_like(torch.cat(blocks) if blocks else whole.clone(), param)
        for name, value in merged.items():
            getattr(modules[name], layer_parameter(name)[1]).copy_(value)
    return list(merged)


def _saved_weights(adapter: Adapter) -> dict[str, torch.Tensor]:
    """`adapter.base_weights` (resolved against a model: those that differ from its own)
    keyed as layers are: `<module>` for its weight, `<module>.bias` for its bias."""
    return {key.removesuffix(".weight"): t for key, t in adapter.base_weights.items()}


def _plain_weight(model: nn.Module, name: str) -> nn.Module:
    """The module of layer `name` of `model` if the parameter the layer updates (its weight,
    or the bias of a `<module>.bias` layer) is a plain floating-point parameter with real
    data that a merge can write into; else `MergeError`, `DTypeError` or `DeviceError`."""
    name, parameter = layer_parameter(name)
    module = model.get_submodule(name)
    if isinstance(module, LowRankAdapter):
        raise MergeError(
            f"module {name!r} is a lowrank.nn adapter, whose weight is W + ΔW computed on each "
            f"call; apply to its base ({name}.base), or merge_and_unload the model first"
        )
    param = getattr(module, parameter)
    held = [*module._parameters.values(), *module._buffers.values()]
    stored = isinstance(param, nn.Parameter) or any(param is t for t in held)
    if parametrize.is_parametrized(module, parameter) or not stored:
        computed = weight_is_computed(module) or "its weight is computed on each access"
        raise MergeError(
            f"cannot apply an adapter to module {name!r}: {computed}, so the merged weight "
            "would be lost or distorted; remove it first (torch.nn.utils.parametrize."
            "remove_parametrizations, torch.nn.utils.remove_weight_norm)"
        )
    if not param.is_floating_point():
        raise DTypeError(
            f"{name}.{parameter} is {param.dtype}: an adapter merges into floating-point "
            "weights only"
        )
    scales = [n for n in SCALE_NAMES if isinstance(getattr(module, n, None), torch.Tensor)]
    if param.dtype in FLOAT8 and parameter == "weight" and scales:
        raise DTypeError(
            f"{name}.weight is {param.dtype} stored with the scale {name}.{scales[0]} (the weights "
            "are their product): an adapter merged here would be added to the float8 values; "
            "merge into the checkpoint (merge_checkpoint, which requantizes), or dequantize "
            "the model first"
        )
    if param.is_meta:
        raise DeviceError(
            f"{name}.{parameter} is on the meta device, which holds no values to merge into; load "
            "the model's weights first"
        )
    return module


def _spec(name: str, form: Factors) -> dict[str, object]:
    if isinstance(form, LoRA):
        return {"r": form.rank, "form": "lora", "scale": form.scale}
    if isinstance(form, Tucker2):
        return {"r": list(form.rank), "form": "tucker2", "scale": form.scale}
    # a bias's or norm's dense difference (1-D) has no LoRA to convert to
    convert = "" if len(form.shape) == 1 else ", or convert it to LoRA with a rank"
    raise TargetError(
        f"layer {name!r} is a {form_name(form)}, which lowrank.nn has no trainable module for; "
        f"merge it with apply_adapter{convert}"
    )


def _stored_in_transpose(module: nn.Module | None) -> bool:
    """Whether `module` stores its weight `(in, out)` while its adapter module holds ΔW
    `(out, in)`: a transformers `Conv1D` or an `nn.Embedding`."""
    return is_conv1d(module) or isinstance(module, nn.Embedding)


def _swap_layout(name: str, form: Factors, module: nn.Module | None) -> Factors:
    """`form` in the other layout of `module`'s ΔW (the weight's as stored ↔ its adapter
    module's): transposed where `_stored_in_transpose`, else as it is."""
    if not _stored_in_transpose(module):
        return form
    if not isinstance(form, LoRA):
        raise TargetError(
            f"layer {name!r} is a {form_name(form)} on the {type(module).__name__}, whose weight "
            "is stored (in, out); only LoRA layers go between files and modules there"
        )
    return form.transposed()


_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _trained_modules(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """The tensors of `model` trained beside its adapters, as PEFT saves them:
    `({"<module>.weight" / ".bias": copy}, [modules_to_save], bias)`.

    A module whose own weight and bias all require gradients (`inject` froze them, so they
    were unfrozen to train) is saved whole, as PEFT's `modules_to_save`. Biases trained alone
    (the weight frozen) are PEFT's `bias` setting (`_trained_biases`). `TargetError` naming
    the parameter for one a file cannot hold: a trainable base weight inside an adapter, a
    module with its weight trainable and its bias frozen (PEFT saves and loads such a
    module whole), or a trainable parameter named otherwise than `weight` / `bias`."""
    adapters = adapter_modules(model)
    bases = {id(a.base): name for name, a in adapters.items()}
    inside = {id(sub) for a in adapters.values() for sub in a.modules()}
    tensors: dict[str, torch.Tensor] = {}
    names: list[str] = []
    biases: dict[str, tuple[nn.Parameter, bool]] = {}  # {"<module>.bias": (it, adapted)}
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, LowRankAdapter):
            continue
        # an adapter's base is the adapted module, named as PEFT names it: the adapter's path
        path = bases.get(id(module), name)
        if own.get("bias") is not None:
            biases[f"{path}.bias"] = (own["bias"], id(module) in bases)
        trained = [key for key, p in own.items() if p.requires_grad]
        if not trained or (trained == ["bias"] and "weight" in own):
            continue  # a bias trained alone is PEFT's `bias` setting (`_trained_biases`)
        where = f"{name}.{trained[0]}" if name else trained[0]
        if id(module) in inside:
            raise TargetError(
                f"parameter {where!r} of an adapted layer's base requires gradients: an adapter "
                "file holds the adapters, their bases' biases and whole modules trained beside "
                "them, not a trained base weight; freeze it, or save the model "
                "(lowrank.nn.merge_and_unload)"
            )
        frozen = [key for key in own if key not in trained]
        if set(own) - {"weight", "bias"} or frozen:
            raise TargetError(
                f"parameter {where!r} requires gradients, but its module {name!r} holds "
                f"{sorted(own)} with {sorted(frozen) or 'none'} frozen: an adapter file saves a "
                "module trained beside the adapters whole, its weight and bias (PEFT's "
                "modules_to_save); train all of them or freeze it"
            )
        names.append(name)
        for key, p in own.items():
            tensors[f"{name}.{key}"] = gathered(p).detach().clone()
            biases.pop(f"{name}.{key}", None)  # saved whole, whatever `bias` says
    tensors.update(_also_matched(model, names, inside))
    saved, mode = _trained_biases(biases)
    tensors.update(saved)
    return tensors, names, mode


def _trained_biases(
    biases: Mapping[str, tuple[nn.Parameter, bool]],
) -> tuple[dict[str, torch.Tensor], str]:
    """The biases trained alone, as PEFT's `bias` setting saves them, from `biases`
    (`{"<module>.bias": (parameter, whether its module is adapted)}`, modules saved whole
    left out): `({}, "none")` where none trains; the biases of the adapted modules and
    `"lora_only"` where those are the ones that train; every bias and `"all"` where every
    one trains (PEFT trains and saves the biases of its LoRA layers' base layers, or every
    parameter named `bias`). Any other choice is a `TargetError` naming a frozen bias, as
    PEFT would train it on, and one that trains."""
    trained = [key for key, (p, _) in biases.items() if p.requires_grad]
    if not trained:
        return {}, "none"
    adapted = [key for key, (_, of_adapter) in biases.items() if of_adapter]
    if trained == adapted:
        mode, keys = "lora_only", adapted
    elif len(trained) == len(biases):
        mode, keys = "all", list(biases)
    else:
        # the frozen bias closest to a setting: an adapted module's if only such train
        choice = adapted if set(trained) <= set(adapted) else list(biases)
        frozen = next(key for key in choice if key not in trained)
        raise TargetError(
            f"bias {trained[0]!r} requires gradients but {frozen!r} is frozen: PEFT trains "
            "and saves the biases of every adapted module (bias='lora_only') or of every "
            "module (bias='all'); unfreeze the rest of one of those sets, or freeze the others"
        )
    return {key: gathered(biases[key][0]).detach().clone() for key in keys}, mode


def _also_matched(model: nn.Module, names: list[str], inside: set[int]) -> dict[str, torch.Tensor]:
    """The weights and biases (copies, as they are) of the modules of `model` other than
    `names` that PEFT's `modules_to_save=names` also saves whole, as it matches each name
    as a suffix of module paths (`classifier` names DistilBERT's `pre_classifier` too):
    its load needs them in the file (a `KeyError` otherwise), and they load unchanged.
    `TargetError` naming the module where it holds an adapter (PEFT would save it whole,
    adapter and all) or a parameter other than a weight or bias."""
    tensors: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        matched = [n for n in names if path != n and path.endswith(n)]
        if not matched or path in names:
            continue
        adapted = id(module) in inside or any(
            isinstance(sub, LowRankAdapter) for sub in module.modules()
        )
        odd = [key for key, _ in module.named_parameters()
               if key.rpartition(".")[2] not in ("weight", "bias")]  # fmt: skip
        if adapted or odd:
            why = "holds an adapter" if adapted else f"holds parameter {odd[0]!r}"
            raise TargetError(
                f"module {path!r} {why}, but PEFT's modules_to_save={matched} would save it "
                f"whole beside the trained {matched[0]!r} (PEFT matches the names as suffixes "
                "of module paths): rename or freeze one of them"
            )
        for key, p in module.named_parameters():
            tensors[f"{path}.{key}"] = gathered(p).detach().clone()
    return tensors


def model_adapter(model: nn.Module) -> Adapter:
    """The `lowrank.nn` adapters of `model` as an `Adapter` (module paths, each layer's form
    with its scale; copies, detached from training), ready for `save_adapter` and the other
    file tools: what the model computes, so a merged adapter gives the factors its merge
    put in the weight.

    A layer of a transformers `Conv1D` or an `nn.Embedding` holds ΔW as the weight is
    stored, `(in, out)`, and is a parameter target (`<module>.weight`), as PEFT's
    `target_parameters` names it, named in `Adapter.conv1d` / `Adapter.embeddings` too:
    PEFT files (but those with dropout, which hold them as PEFT's module and embedding
    LoRAs) and lowrank's kohya / LyCORIS files keep it so, and `inject_adapter` /
    `apply_adapter` read it back. An adapter's own `factors()`
    are in its module's `(out, in)` layout, which a file would take for the stored one. A
    centre tap's 1×1 `down` gets the convolution's kernel, zero but for its centre. Grouped
    convolutions (one factor set per group) have no such form, and an adapter started with
    `init="pissa"` holds no update of the original weight (`TargetError`). A DoRA adapter
    (`dora=True`) is a `lowrank.DoRA` layer (its magnitude, PEFT's `lora_magnitude_vector`,
    LyCORIS' `dora_scale`; no eps; axis 1 on a `Conv1D`, whose weight is stored
    `(in, out)`, which PEFT output holds as the module DoRA PEFT runs on a `Conv1D`,
    `fan_in_fan_out`). A model on the meta device has no values (`DeviceError`). A module under
    several names is written under its first (PEFT then adapts that name alone). A model
    wrapped by `torch.compile` (`_orig_mod`) or by `DistributedDataParallel` / `DataParallel`
    (`module`) is unwrapped, so that names are those of the model itself. Factors sharded
    by FSDP2 (DTensors) are gathered whole, a collective: call it on every rank.

    Modules trained beside the adapters (their weight and bias unfrozen after `inject`: a
    classification head) are PEFT's `modules_to_save`: their tensors go into
    `Adapter.base_weights` and their names into `Adapter.model["modules_to_save"]`, which
    PEFT files hold and PEFT loads in place of the base's (other formats refuse them), with
    the tensors, as they are, of the other modules PEFT saves whole under those names,
    which it matches as suffixes of module paths (`classifier` names DistilBERT's
    `pre_classifier` too).
    Biases trained alone (the weights frozen: PEFT's `bias`) go into `base_weights` too, with
    `Adapter.model["bias"]`: `"lora_only"` where the biases of the adapted modules train,
    all of them and no other (PEFT saves them as `<module>.base_layer.bias`); `"all"` where
    every bias of the model trains (PEFT's `bias="all"` trains and saves every parameter
    named `bias`). `TargetError` naming a trainable parameter that a file cannot hold (see
    `_trained_modules`, `_trained_biases`), where the trained value would otherwise be left
    out unnoticed, or PEFT would train on with another set of biases.

    The adapters' dropout is `Adapter.model["lora_dropout"]` (where nonzero), which a PEFT
    LoRA folder's config states, so that PEFT trains on with it (`is_trainable=True`; its
    `Conv1D` and embedding layers then go in as PEFT's module and embedding LoRAs, since
    PEFT loads no dropout beside a parameter target). A config holds one value: adapters
    with different dropouts give the largest (embeddings and `hard=True` layers, which drop
    nothing, run none in PEFT either).
    """
    model = require_module("model", model)
    while isinstance(model, _WRAPPERS) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, _WRAPPERS) else model._orig_mod
    resharded(model)  # FSDP2's unsharded copies may be in its compute dtype
    layers: dict[str, Factors] = {}
    targets, conv1d, tables = [], [], []
    for name, adapter in adapter_modules(model).items():
        if adapter.residual:
            raise TargetError(
                f"module {name!r} started from init='pissa': its base holds W − ΔW₀, so its "
                "factors are no adapter of the original model; save ΔW − ΔW₀ instead "
                "(lowrank.combine([factors, start], [1, -1]), docs/nn.md)"
            )
        tensors = adapter.merged_factors if adapter.merged else None
        tensors = tensors if tensors is not None else adapter.plain_tensors()
        tensors = {key: gathered(tensor) for key, tensor in tensors.items()}
        if any(t.is_meta for t in tensors.values()):
            raise DeviceError(f"module {name!r} is on the meta device: its factors hold no values")
        with torch.no_grad():
            try:
                form = adapter.factors({k: t.detach().clone() for k, t in tensors.items()})
            except (ShapeError, TargetError) as err:  # a factor of another shape than built
                raise type(err)(f"module {name!r}: {err}") from None
        kernel = tuple(getattr(adapter.base, "kernel_size", ()))
        if adapter.variant.name == "centre_tap" and kernel:
            form = LoRA(centre_tap(form.down, kernel), form.up, form.scale)
        layers[name] = _swap_layout(name, form, adapter.base)
        if adapter.dora:  # a magnitude per output channel, shaped against the stored weight
            magnitude = tensors["magnitude"].detach().clone()
            axis = 1 if _stored_in_transpose(adapter.base) else 0  # a Conv1D's (in, out)
            shape = [1] * (len(kernel) + 2)
            shape[axis] = -1
            layers[name] = DoRA(layers[name], magnitude.reshape(shape), axis=axis, eps=0.0)
        if _stored_in_transpose(adapter.base):
            targets.append(f"{name}.weight")
        if is_conv1d(adapter.base):
            conv1d.append(f"{name}.weight")
        if isinstance(adapter.base, nn.Embedding):
            tables.append(f"{name}.weight")
    if not layers:
        raise TargetError(f"{type(model).__name__} holds no lowrank.nn adapters")
    tensors, trained, bias = _trained_modules(model)
    saved: dict[str, object] = {"modules_to_save": trained} if trained else {}
    if bias != "none":
        saved["bias"] = bias
    dropout = max(float(a.dropout) for a in adapter_modules(model).values())
    if dropout:
        saved["lora_dropout"] = dropout
    return Adapter(layers, target_parameters=tuple(targets), model=saved, base_weights=tensors,
                   conv1d=tuple(conv1d), embeddings=tuple(tables))  # fmt: skip


def inject_adapter(
    model: nn.Module,
    adapter: PathLike | Adapter,
    *,
    component: str | None = None,
) -> list[str]:
    """Wrap `model`'s targeted modules in `lowrank.nn` adapters holding the file's factors.

    LoRA / LoCon layers become `form="lora"` adapters, Tucker2 layers `form="tucker2"`,
    each with the file's scale, ready for further training (the base stays frozen). A DoRA
    layer becomes a `dora=True` adapter with the file's factors, scale and magnitude where
    that computes exactly what the file means: a LoRA update, no eps and the norm per
    output channel (PEFT's `lora_magnitude_vector`; on a transformers `Conv1D` per column
    of the stored weight, as PEFT runs it). Any other DoRA layer (LyCORIS' `dora_scale`,
    whose norm adds eps; a norm per input channel; an update that is no LoRA) is a
    `TargetError` naming the layer and why. The adapters train with the dropout the
    adapter states (`Adapter.model["lora_dropout"]`, a PEFT config's), as PEFT's would
    (`is_trainable=True`), but on embeddings, which PEFT runs none on. Base weights and
    biases the adapter saves (`Adapter.base_weights`) are copied into the modules', as PEFT
    loads them; the modules it saves whole (PEFT's `modules_to_save`, a classification head)
    are left trainable, as `PeftModel.from_pretrained(..., is_trainable=True)` leaves them,
    so that `model_adapter` saves them again (frozen, it would leave them out), and so are
    the biases its `bias` setting trains (`"all"`: every bias; `"lora_only"`: the adapted
    modules'). Over a
    float16 or bfloat16 weight, a PEFT folder's factors and magnitudes are kept in float32,
    as `PeftModel.from_pretrained` keeps them (its `autocast_adapter_dtype`); other
    formats' (diffusers', whose loader casts them to the weight's dtype) in the weight's.
    The layers are checked against `model` first, so an error leaves it unchanged; a model
    on the meta device, whose materialisation would discard the factors, is a
    `DeviceError`.
    Returns the wrapped module names.
    """
    require_module("model", model)
    found = adapter_from(adapter).for_model(model, component)
    modules = dict(model.named_modules(remove_duplicate=False))
    layers, magnitudes = {}, {}
    for name, form in found.layers.items():
        if isinstance(form, DoRA):
            form, magnitudes[name] = _trainable_dora(name, form, modules.get(name))
        layers[name] = form
    saved = {name: _plain_weight(model, name) for name in _saved_weights(found)}
    whole = found._whole_modules("", model, found.base_weights)
    for name in layers:
        weight = getattr(modules.get(name), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_meta:
            raise DeviceError(
                f"module {name!r} is on the meta device: the file's factors would be lost when "
                "the model is materialised (to_empty); load the model's weights first, then "
                "inject the adapter"
            )
    layers = {name: _swap_layout(name, form, modules.get(name)) for name, form in layers.items()}
    dropout = found.model.get("lora_dropout", 0.0)
    targets: Mapping[str, Mapping[str, object]] = {
        f"re:{re.escape(name)}": {
            **_spec(name, form),
            "dora": name in magnitudes,
            "factor_dtype": _factor_dtype(found.format, modules.get(name)),
            **({"dropout": dropout} if _drops_input(modules, name) else {}),
        }
        for name, form in layers.items()
    }
    wrapped = inject(model, targets, factors=layers)
    with torch.no_grad():  # the wrapped modules are the bases of the adapters now
        for name, module in saved.items():
            parameter = getattr(module, layer_parameter(name)[1])
            parameter.copy_(found.base_weights[parameter_key(name)])
        for prefix in whole:  # trained whole, as PEFT's modules_to_save are
            model.get_submodule(prefix.removesuffix(".")).requires_grad_(True)
        _train_biases(model, found.model.get("bias"), [modules.get(name) for name in layers])
        for name, magnitude in magnitudes.items():  # after the bases, whose norms start m
            model.get_submodule(name).magnitude.copy_(magnitude)
    return wrapped


def _train_biases(model: nn.Module, setting: object, adapted: list[nn.Module | None]) -> None:
    """Leave trainable the biases a PEFT config's `bias` trains, as
    `PeftModel.from_pretrained(..., is_trainable=True)` does, so that `model_adapter` saves
    them again: every parameter named `bias` for `"all"`, the adapted modules' (`adapted`,
    their bases) for `"lora_only"`."""
    if setting == "all":
        for key, parameter in model.named_parameters():
            if key.rpartition(".")[2] == "bias":
                parameter.requires_grad_(True)
    elif setting == "lora_only":
        for module in adapted:
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)


def _drops_input(modules: Mapping[str, nn.Module], name: str) -> bool:
    """Whether the adapter of module `name` (of `modules`, a model's by name) runs a config's
    dropout, as PEFT's LoRA layers do: not on an embedding (indices, which PEFT's drops
    nothing of), nor on an `nn.MultiheadAttention`'s `out_proj`, whose weight it reads
    (`W + ΔW`, no branch input)."""
    parent = modules.get(name.rpartition(".")[0]) if "." in name else None
    return not isinstance(modules.get(name), nn.Embedding) and not isinstance(
        parent, nn.MultiheadAttention
    )


def _factor_dtype(format: str, module: nn.Module | None) -> torch.dtype | None:
    """float32 for a PEFT folder's factors (and DoRA magnitude) over a float16 or bfloat16
    weight, as `PeftModel.from_pretrained` keeps them (`autocast_adapter_dtype`): the
    branch, and a DoRA's norm and magnitude, then run in float32 as PEFT's do; else `None`
    (the weight's dtype)."""
    weight = getattr(module, "weight", None)
    half = isinstance(weight, torch.Tensor) and weight.dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if format == "peft" and half else None


def _trainable_dora(name: str, form: DoRA, module: nn.Module | None) -> tuple[LoRA, torch.Tensor]:
    """`(update, magnitude (out,))` of DoRA layer `name` (both as the weight is stored) for a
    `dora=True` adapter on `module`, where that adapter computes `m ⊙ (W + ΔW) / (‖W + ΔW‖
    + eps)` exactly: a LoRA update, eps 0 and the norm per output channel (axis 0 of the
    stored weight; axis 1 of a `Conv1D`'s, stored `(in, out)`); else `TargetError` naming
    the layer and what differs."""
    where = f"layer {name!r} is a {form_name(form)}"
    channel_axis = 1 if is_conv1d(module) else 0
    if not isinstance(form.update, LoRA):
        why = "a DoRA adapter of lowrank.nn trains a LoRA update only"
    elif form.eps is None:
        why = "its norm adds the eps of the weight's dtype (LyCORIS'), which a DoRA adapter's "
        why += "does not"
    elif form.eps != 0:
        why = f"its norm adds eps = {form.eps:g}, which a DoRA adapter's does not"
    elif form.axis != channel_axis:
        why = "its norm runs per input channel; a DoRA adapter's runs per output channel"
    else:
        return form.update, form.magnitude.reshape(-1)
    raise TargetError(
        f"{where}, which no lowrank.nn adapter computes exactly: {why}; merge it with "
        "apply_adapter instead"
    )
