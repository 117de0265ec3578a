"""`Adapter`: the layers of an adapter file as factor forms, and where they came from.

Layer names are module paths in the model the adapter targets. Files made for a pipeline
(kohya, diffusers) say which of its models a layer belongs to; the name then starts with
that component: `unet.down_blocks.0.attentions.0.proj_in`, `text_encoder.text_model.…`,
and `components` lists them. A kohya file read without its base model keeps kohya's own
names (`lora_unet_down_blocks_0_…`, `kohya_names=True`) until `resolve` maps them to
module paths. `for_model` turns either kind into plain module paths of one model. A kohya
layer on a module that the base splits in several (Flux's fused `qkv` in a diffusers
transformer) becomes one layer per module.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .._checks import (
    require_flag,
    require_mapping,
    require_name,
    require_path,
    require_probability,
    require_regex,
    require_strings,
)
from ..errors import (
    ArgumentError,
    DTypeError,
    FileFormatError,
    LowRankError,
    NonFiniteError,
    ShapeError,
    TargetError,
)
from ..forms import (
    CP,
    DoRA,
    Factors,
    Full,
    LoHa,
    LoKr,
    LoRA,
    Tucker2,
    alpha_from_scale,
    alpha_rank,
    dora_refusal,
    scale_from_alpha,
    update_of,
)
from ..targets import named_suffix
from .checkpoint import Checkpoint, shard_note
from .module_types import (
    base_output_layer,
    kinds,
    may_be_output_layer,
    omitted_ties,
    tells_module_types,
)
from .names import (
    BIAS,
    PARAMETERS,
    SD_CHECKPOINT_UNET,
    Base,
    Piece,
    bias_shapes,
    clip_text_names,
    kohya_components,
    layer_parameter,
    ldm_unet_names,
    module_shapes,
    original_names,
    original_parameter,
    parameter_shapes,
    resolve_stems,
    sd_checkpoint_refusal,
    split_stem,
    targets_parameter,
)

FORM_TYPES = (LoRA, Tucker2, CP, LoHa, LoKr, Full, DoRA)
THROUGH_PEFT = ("peft", "diffusers")
"""The formats whose files load through PEFT's LoRA layers (`formats.TRAITS`: not
kohya-named), which run a transformers `Conv1D`'s module LoRA transposed."""
MODEL_FIELDS = {"base_model_name_or_path": str, "revision": str, "task_type": str,
                "auto_mapping": dict, "modules_to_save": list, "bias": str,
                "lora_dropout": float}  # fmt: skip
"""A PEFT config's fields naming the model an adapter is for, those saying which whole
tensors of it the adapter saves (`modules_to_save`, `bias`), and the dropout its LoRA
layers were trained with (`lora_dropout`), with their types: kept through lowrank's tools
(`Adapter.model`)."""


def saved_module_regex(name: str) -> str:
    """The regex PEFT matches a `modules_to_save` entry `name` (a regex itself) by, with
    `re.match` on a module's name: whole dotted components of it."""
    return rf"(^|.*\.){name}($|\..*)"


@dataclass
class Adapter:
    """`layers`: `{name: form}` with each form's scale resolved from the file's alpha. A layer
    updates the weight of the module it names, except a layer `<module>.bias`, which is a
    1-D `Full` form (a dense difference, LyCORIS' and ComfyUI's `diff_b`) of that module's
    bias, and a layer `<module>.<name>` with a name of `names.PARAMETERS` (Wan's
    `blocks.0.modulation`, diffusers' `blocks.0.scale_shift_table`), a `Full` form of that
    parameter (`names.layer_parameter`; `DTypeError` for any other form there).

    `format` is the file format it was read from (`"peft"`, `"kohya"`, `"lycoris"`,
    `"diffusers"`; None when built in memory). `alphas` keeps each layer's alpha as the
    file stated it, so writers store it unchanged when it still resolves to the layer's
    scale; `rslora` says it was stated per √r. `metadata` is the file's safetensors
    metadata (kohya's `ss_*`), `source` the path it was read from. `target_parameters` are a
    PEFT config's parameter targets (`"c_proj.weight"`): the layers they name update that
    parameter, as it is stored, rather than wrap its module; PEFT files and the metadata of
    lowrank's kohya and LyCORIS files keep them. `prefix` is the kohya prefix a kohya or
    LyCORIS file gave its component-less layers (`"lycoris"` for LyCORIS' whole-model
    wrapper; None when no layer had one): kohya and LyCORIS writers keep it. `model` holds a
    PEFT config's fields that name the model the adapter was trained for
    (`base_model_name_or_path`, `revision`, `task_type`, `auto_mapping`: what
    `AutoPeftModel…from_pretrained` loads the base by) and those naming the whole tensors it
    saves (`modules_to_save`, with the heads PEFT adds to it for a `SEQ_CLS`, `TOKEN_CLS` or
    `QUESTION_ANS` task, each a regex as PEFT matches them, refused where it holds a
    construct no matcher answers in linear time (`lowrank._checks.require_regex`); `bias`),
    and `lora_dropout`, the dropout of the LoRA branches' input in training (in [0, 1));
    PEFT LoRA writers keep them (PEFT's LoHa and LoKr
    configs have no `lora_dropout`, their `rank_dropout` / `module_dropout` drop otherwise,
    as kohya's `ss_network_dropout` and LyCORIS' `dropout` do: none of those records it).
    `pipeline`
    names models of the pipeline the adapter is for beyond those its layers name, where a
    source says so: a kohya file that names its first text encoder `lora_te1` (SDXL's and
    Flux's, beside a second one), or bases given per component to `resolve`. kohya and
    LyCORIS writers name the first text encoder `lora_te1` when `text_encoder_2` is in
    `components` or `pipeline`, else `lora_te`, as sd-scripts does. `fan_in_fan_out` says
    that a PEFT or diffusers config set `fan_in_fan_out`: its layers on transformers
    `Conv1D`s (GPT-2's) hold `ΔWᵀ`, which only the module types can tell; `resolve` against a
    base that tells them (a model, a checkpoint whose `config.json` names a transformers
    model) transposes those layers (as it does whatever the config says: PEFT runs every
    module LoRA of a `Conv1D` so) and clears it, and tools refuse the adapter while it is
    set (`FileFormatError`); a PEFT file lowrank wrote lists its `Conv1D`s in its metadata
    (`lowrank_conv1d`), by which the reader resolves them, clearing it. `embeddings` names
    (`<module>.weight`, component-less and matched as `target_parameters` are) the layers
    that are LoRAs of an `nn.Embedding`'s table as stored, `(num_embeddings,
    embedding_dim)`, which PEFT files hold as `lora_embedding_A` / `lora_embedding_B`: read
    from those keys, and found by the base's module types (or names) when an adapter is
    written as PEFT (`layouts.with_layouts`); `model_adapter`'s tables are parameter
    targets too, which PEFT files keep so but where `lora_dropout` is set (PEFT takes no
    dropout beside parameter targets; its embedding LoRA drops nothing).
    `conv1d` names (as `embeddings` does) the parameter targets known to be the weights of
    transformers `Conv1D`s, as a base that tells the module types says: those `resolve`
    finds transposed, `model_adapter`'s, and those `layouts.with_layouts` finds against the
    base (lowrank's kohya, LyCORIS and PEFT files keep them in their metadata,
    `lowrank_conv1d`); PEFT files with `lora_dropout` hold them as the module LoRAs PEFT
    runs transposed (`fan_in_fan_out`), read back as stored by that record; a base that
    contradicts it (a module no `Conv1D` where it tells the module types, a non-square
    weight whose transpose the layer's ΔW is) is refused (`require_conv1d_base`); a DoRA
    of the weight as stored with its magnitude per column (per output feature) goes into
    PEFT files as PEFT's DoRA of a `Conv1D` (`fan_in_fan_out`) only there
    (`formats.dora.peft_split`; on an `nn.Linear` it would be read transposed).
    `base_weights` holds whole weights and biases of the base a PEFT file saves beside its
    layers, keyed `<module>.weight` / `<module>.bias` by module path as its layers are named
    (`….base_layer.weight` / `.bias` of an adapted module, `….weight` / `.bias` of another):
    embedding tables (`save_embedding_layers`, on by default where `target_modules` names
    `embed_tokens` or `lm_head`, or where the vocabulary was resized), the trained copies of
    `modules_to_save` modules (the `classifier` / `score` head PEFT adds for `SEQ_CLS` and
    `TOKEN_CLS`), trained biases (`bias="all"` or `"lora_only"`). PEFT loads each in place
    of the base's tensor, which must have its shape (a vocabulary resized to it), before it
    adds the layers: merges, `apply_adapter` and `inject_adapter` do the same; `resolve`
    checks them against the base and leaves out those equal to the base's own tensor (which
    they then change nothing in), except those of `modules_to_save` modules, which PEFT
    loads only whole; PEFT writers keep them, others refuse them (`ConversionError` naming
    the key).

    `all_linear` says that a PEFT config's `target_modules` is `"all-linear"`: PEFT gives
    every linear layer a layer but a transformers model's output layer
    (`get_output_embeddings()`; of any other model it leaves none out), which the file does
    not record. A layer there PEFT skips the keys of: `resolve` and `for_model` refuse it
    (`FileFormatError`) where the base tells which it is (a model, a checkpoint whose
    `config.json` describes a transformers model, `module_types.base_output_layer`), and,
    where it does not, any layer on a module some transformers model names so
    (`module_types.may_be_output_layer`: `lm_head`, `cls.predictions.decoder`, …), and
    clear the flag; writers and tools without a base refuse such a layer while it is set.
    PEFT matches the linear layers' names as dotted suffixes, so it also gives a layer to
    any other module named `….<one of them>` (a convolution `blk.fc` beside a linear `fc`):
    a convolution's or an embedding table's layer is refused alike where the base's linear
    layers name it so in no way (`_require_linear`), and by writers and tools without a
    base while the flag is set.

    Each field is checked for its type where the adapter is built (`ArgumentError` naming
    it); lists stand for the tuples.
    """

    layers: dict[str, Factors | DoRA]
    format: str | None = None
    components: tuple[str, ...] = ()
    alphas: dict[str, float] = field(default_factory=dict)
    rslora: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    kohya_names: bool = False
    source: Path | None = None
    target_parameters: tuple[str, ...] = ()
    prefix: str | None = None
    model: dict[str, object] = field(default_factory=dict)
    pipeline: tuple[str, ...] = ()
    fan_in_fan_out: bool = False
    embeddings: tuple[str, ...] = ()
    conv1d: tuple[str, ...] = ()
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    all_linear: bool = False
    # the component of a T5's kohya layers that the bases give where the file tells none
    # (`_told`); not kept by `replace`, which every change of names goes through
    _t5: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Mapping):
            raise ArgumentError(
                f"layers must be a dict of {{name: form}}, got {type(self.layers).__name__}"
            )
        self._check_fields()
        for name, form in self.layers.items():
            if not isinstance(name, str) or not name:
                raise ArgumentError(f"adapter layer names must be non-empty strings, got {name!r}")
            if not isinstance(form, FORM_TYPES):
                raise DTypeError(
                    f"adapter layer {name!r} must be a LoRA, Tucker2, CP, LoHa, LoKr, Full or "
                    f"DoRA form, got {type(form).__name__}"
                )
            parameter = layer_parameter(name)[1]
            if parameter == "bias" and not (isinstance(form, Full) and len(form.shape) == 1):
                raise DTypeError(
                    f"adapter layer {name!r} names a module's bias, which only a 1-D Full form "
                    f"(a dense difference) updates, got a {form_name(form)} of shape "
                    f"{tuple(form.shape)}"
                )
            if parameter in PARAMETERS and not isinstance(form, Full):
                raise DTypeError(
                    f"adapter layer {name!r} names the parameter {parameter!r}, no module's "
                    f"weight, which only a Full form (a dense difference) updates, got a "
                    f"{form_name(form)} of shape {tuple(form.shape)}"
                )
            if self.components and not self.kohya_names:
                component = name.partition(".")[0]
                if component not in self.components or "." not in name:
                    raise TargetError(
                        f"adapter layer {name!r} does not start with one of its components "
                        f"{list(self.components)}"
                    )

    def _check_fields(self) -> None:
        """Every field but `layers` checked for its type (`ArgumentError` naming it), the
        sequences as tuples: writers read each one as its annotation says."""
        for name in ("format", "prefix"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ArgumentError(f"{name} must be a string or None, got {value!r:.80}")
        self.components = require_strings("components", self.components)
        self.target_parameters = require_strings("target_parameters", self.target_parameters)
        self.pipeline = require_strings("pipeline", self.pipeline)
        self.embeddings = require_strings("embeddings", self.embeddings)
        self.conv1d = require_strings("conv1d", self.conv1d)
        self.alphas = require_mapping("alphas", self.alphas, "layer name → alpha")
        self.metadata = require_mapping("metadata", self.metadata, "str → str", values=str)
        self.base_weights = require_mapping(
            "base_weights", self.base_weights, "<module>.weight or .bias → tensor",
            values=torch.Tensor,
        )
        for key, tensor in self.base_weights.items():
            if not key.endswith((".weight", BIAS)) or not tensor.is_floating_point():
                raise ArgumentError(
                    f"base_weights maps <module>.weight or <module>.bias to a floating-point "
                    f"tensor, got {key!r:.80}: a {tensor.dtype} tensor"
                )
        if self.base_weights and self.kohya_names:
            raise ArgumentError("base_weights are named by module paths, which kohya names are not")
        self.model = require_mapping("model", self.model, "PEFT config field → value")
        for key, value in self.model.items():
            if key not in MODEL_FIELDS or not isinstance(value, MODEL_FIELDS[key]):
                raise ArgumentError(
                    f"model holds {', '.join(MODEL_FIELDS)} (a dict for auto_mapping, a list "
                    f"for modules_to_save, a float for lora_dropout, else a str), got "
                    f"{key!r:.80}: {value!r:.80}"
                )
            try:  # written into a JSON config: standard JSON, no NaN
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise ArgumentError(f"model[{key!r}] is not standard JSON: {err}") from None
        if "lora_dropout" in self.model:
            require_probability("model['lora_dropout']", self.model["lora_dropout"])
        saved = require_strings("model['modules_to_save']", self.model.get("modules_to_save", []))
        for i, name in enumerate(saved):
            require_regex(f"model['modules_to_save'][{i}]", name, regex=saved_module_regex(name))
        self.rslora = require_flag("rslora", self.rslora)
        self.kohya_names = require_flag("kohya_names", self.kohya_names)
        self.fan_in_fan_out = require_flag("fan_in_fan_out", self.fan_in_fan_out)
        self.all_linear = require_flag("all_linear", self.all_linear)
        if self.source is not None:
            self.source = require_path("source", self.source)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        names = "kohya names" if self.kohya_names else "module paths"
        return (
            f"Adapter(format={self.format!r}, {len(self.layers)} layers, {names}, "
            f"components={self.components}, source={self.source})"
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __getitem__(self, name: str) -> Factors:
        return self.layers[name]

    def items(self) -> Iterator[tuple[str, Factors]]:
        """`(name, form)` pairs in the order of `layers` (a file's layers come sorted by key,
        as `safe_open` lists them)."""
        return iter(self.layers.items())

    @property
    def num_params(self) -> int:
        """Scalars in every layer's factors."""
        return sum(form.num_params for form in self.layers.values())

    @property
    def has_plain_layers(self) -> bool:
        """Whether some layers name no model of a pipeline (a PEFT folder's module paths)."""
        return "" in self._present()

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's factors in their dtypes."""
        return sum(
            t.numel() * t.element_size()
            for form in self.layers.values()
            for t in form.named_factors().values()
        )

    def alpha(
        self, name: str, form: Factors | None = None, *, rslora: bool | None = None
    ) -> float | None:
        """The alpha that stores layer `name`'s scale: the file's own when it still resolves
        to the scale, else `alpha_from_scale`. `form` replaces the layer's form (a folded or
        approximated one); `rslora` (default: the adapter's) says whether alpha is per √r.
        None for a form with no rank (a dense LoKr)."""
        form = self.layers[name] if form is None else form
        rank = alpha_rank(form)
        if rank is None:
            return None
        rslora = self.rslora if rslora is None else rslora
        stored = self.alphas.get(name)
        consistent = stored is not None and rslora == self.rslora
        if consistent and scale_from_alpha(stored, rank, rslora=rslora) == form.scale:
            return stored
        try:
            return alpha_from_scale(form.scale, rank, rslora=rslora)
        except NonFiniteError:
            per = f"√{rank}" if rslora else str(rank)
            raise NonFiniteError(
                f"layer {name!r}: its scale {form.scale:.4g} needs an alpha of scale · {per}, "
                "beyond float64's range"
            ) from None

    def require_peft_selected(
        self, base: Base | None, modules: Iterable[str] | None = None
    ) -> None:
        """`FileFormatError` naming the first of `modules` (module paths in `base`; default:
        those of the layers that name no component) PEFT gives no layer under
        `"all-linear"` (`all_linear`): `base`'s output layer, or where `base` (None: no base)
        does not tell it, one that may be; without a base, also the first layer of a
        convolution or an embedding table (by its factors), which PEFT adapts only where a
        linear layer's name is a dotted suffix of its name (`_require_linear`)."""
        if not self.all_linear:
            return
        if base is None:
            self._require_linear_told()
        if modules is None:
            modules = [layer_parameter(n)[0] for n in self.layers if self.component_of(n) == ""]
        told = base_output_layer(base)
        where = f"{self.source or 'the adapter'}: module"
        for module in modules:
            if told is not None and module == told[0]:
                raise FileFormatError(
                    f"{where} {module!r} has factors, but its PEFT config's target_modules "
                    f"'all-linear' leaves out the output layer of a transformers model "
                    f"(get_output_embeddings()), which {module!r} is in {told[1]}: PEFT "
                    "would give it no layer and skip its keys when it loads the adapter"
                )
            if told is None and may_be_output_layer(module):
                raise FileFormatError(
                    f"{where} {module!r} has factors, but its PEFT config's target_modules "
                    f"'all-linear' leaves out the output layer of a transformers model "
                    f"(get_output_embeddings()), which {module!r} may be (PEFT skips its "
                    "keys there, and adapts it in any other model), and "
                    f"{'no base' if base is None else _label(base)} tells which model it "
                    "is: give the model, or a checkpoint with the config.json describing it"
                )

    def _require_linear(
        self, modules: Iterable[str], shapes: Mapping[str, Sequence[int]], base: Base
    ) -> None:
        """`FileFormatError` naming the first of `modules` that `"all-linear"` (`all_linear`)
        leaves out as no linear layer of `base`: a convolution (a weight of more than two
        axes; a LyCORIS-style LoHa of one holds 2-D parts) or an embedding table (`kinds`)
        whose name does not end in `.<a linear layer's name>` (`_linear_layers`), as PEFT
        matches those names as dotted suffixes (a `Conv2d` `blk.fc` beside a `Linear` `fc`
        gets a layer)."""
        if not self.all_linear:
            return
        flat = {m: shapes[m] for m in modules if m in shapes}
        tables = set(kinds({m: s for m, s in flat.items() if len(s) == 2}, base).tables)
        others = {m: s for m, s in flat.items() if len(s) != 2 or m in tables}
        linear = self._linear_layers(shapes, base) if others else set()
        for module, shape in others.items():
            if named_suffix(module, linear) is not None:
                continue
            what = "an embedding table" if module in tables else f"a {tuple(shape)} weight"
            raise FileFormatError(
                f"{self.source or 'the adapter'}: module {module!r} has factors, but its "
                f"PEFT config's target_modules 'all-linear' takes nn.Linear and Conv1D "
                f"layers, and other modules only where their name ends in '.<a linear "
                f"layer's name>', and {module!r} has {what} in {_label(base)}, its name "
                "ending in none: PEFT would give it no layer and skip its keys when it loads "
                "the adapter"
            )

    @staticmethod
    def _linear_layers(shapes: Mapping[str, Sequence[int]], base: Base) -> set[str]:
        """The names PEFT turns `"all-linear"` into for `base` (`shapes`: its modules' weight
        shapes): its linear layers (2-D weights but embedding tables, `kinds`) but the
        output layer of a transformers model (`base_output_layer`), or, where `base` does
        not tell that one, any that may be (`may_be_output_layer`)."""
        flat = {m: s for m, s in shapes.items() if len(s) == 2}
        tables = set(kinds(flat, base).tables)
        told = base_output_layer(base)
        return {
            m for m in flat
            if m not in tables and (m != told[0] if told else not may_be_output_layer(m))
        }  # fmt: skip

    def _require_linear_told(self) -> None:
        """`FileFormatError` naming the first layer of a convolution or an embedding table
        (its factors' shape, `embeddings`) among those that name no component: without a
        base, nothing tells whether PEFT's `"all-linear"` reaches it (`_require_linear`)."""
        for name, form in self.layers.items():
            module, parameter = layer_parameter(name)
            if parameter != "weight" or self.component_of(name) != "":
                continue
            table = f"{module}.weight" in self.embeddings
            if len(form.shape) == 2 and not table:
                continue
            what = "an embedding table's" if table else f"a {tuple(form.shape)} convolution's"
            raise FileFormatError(
                f"{self.source or 'the adapter'}: module {module!r} has {what} factors, but "
                f"its PEFT config's target_modules 'all-linear' takes nn.Linear and Conv1D "
                f"layers, and other modules only where their name ends in '.<a linear "
                f"layer's name>' (PEFT matches those names as dotted suffixes), which no "
                "base tells: give the model, or its checkpoint"
            )

    def component_of(self, name: str) -> str:
        """The component layer `name` belongs to; "" for the whole model."""
        if self.kohya_names:
            return self._kohya_components[name] or ""
        return name.partition(".")[0] if self.components else ""

    @functools.cached_property
    def _kohya_components(self) -> dict[str, str | None]:
        """`kohya_components` of the layers, which a file's layers and metadata tell together
        (and the component bases give a T5's, `_told`)."""
        return kohya_components(self.layers, self.source, self.metadata, self._t5)

    def _told(self, components: Iterable[str]) -> Adapter:
        """The adapter whose T5 layers (sd-scripts' `lora_te3`), where its file does not tell
        their component, are in the one of `components` (those given bases, or the one
        merged into) that holds a T5 in a pipeline (`T5_COMPONENTS`): SD3's `text_encoder_3`
        where it is there (no other pipeline has one), else Flux's `text_encoder_2`, else
        Chroma's `text_encoder` where no layer is a CLIP text encoder's (`lora_te`,
        `lora_te1`). Itself for other adapters, or where none is there."""
        if not self.kohya_names or self._t5 is not None:
            return self
        prefixes = {split_stem(layer_parameter(n)[0], self.source)[0] for n in self.layers}
        if "lora_te3" not in prefixes:
            return self
        components = set(components)
        clip = bool(prefixes & {"lora_te", "lora_te1"})
        for component in ("text_encoder_3", "text_encoder_2", "text_encoder"):
            if component in components and not (component == "text_encoder" and clip):
                told = replace(self)
                told._t5 = component
                return told
        return self

    def _present(self) -> list[str]:
        return sorted({self.component_of(n) for n in self.layers})

    def _describe(self) -> str:
        shown = [c or "the whole model" for c in self._present()]
        return f"{self.source or 'the adapter'} targets {len(shown)} models ({', '.join(shown)})"

    def _choose(self, component: str | None) -> str:
        """`component` checked against the adapter's, or its only one ("" for none)."""
        present = self._present()
        if component is None:
            if len(present) > 1:
                raise TargetError(f"{self._describe()}; choose one with component= (--component)")
            return present[0] if present else ""
        if component not in present:
            raise TargetError(
                f"{self.source or 'the adapter'} has no layers for component {component!r}; "
                f"its components are {[c for c in present if c]}"
            )
        return component

    def _fit(
        self, component: str, base: Base
    ) -> tuple[dict[str, list[tuple[str, Factors]]], tuple[str, ...]]:
        """Layer name → [(module path in `base`, form fitted to its weight)], for the layers
        of one component: one module (a module path of the original Stable Diffusion UNet,
        `input_blocks.4.1.proj_in`, is the module of a diffusers UNet it is,
        `ldm_unet_names`; one of a DiT's original layout, Wan's `blocks.0.self_attn.q`, the
        module of its diffusers model it is, `original_names`), or one per module of a layer
        the base splits (`split_rows`: a kohya name, or a module path in Black Forest Labs'
        Flux layout or HunyuanVideo's, that is several modules of its diffusers model); and the
        modules whose layers a PEFT or diffusers file holds transposed (`transposed_layers`),
        whose forms here are LoRAs of the weight as stored, so parameter targets from now
        on."""
        shapes = module_shapes(base)
        mine = [n for n in self.layers if self.component_of(n) == component]
        on_parameters = [n for n in mine if layer_parameter(n)[1] in PARAMETERS]
        fitted = self._fit_parameters(on_parameters, component, base, shapes)
        mine = [n for n in mine if n not in fitted]
        # a bias layer `<module>.bias` is found as its module, and fitted to its bias
        modules_of = {n: layer_parameter(n)[0] for n in mine}
        if self.kohya_names:
            stems = {n: split_stem(modules_of[n], self.source)[1] for n in mine}
            found = resolve_stems(stems, shapes, self.source or "adapter", _label(base))
        else:
            other = clip_text_names(shapes)  # a CLIP text model's paths with(out) text_model.
            moved = original_names(shapes)  # a DiT's original modules, in a diffusers one
            ldm = ldm_unet_names(shapes)  # the LDM UNet's modules, in a diffusers UNet
            paths = {n: m[len(component) + 1 :] if component else m for n, m in modules_of.items()}
            self.require_peft_selected(base, paths.values())
            self._require_linear(paths.values(), shapes, base)
            found = {
                n: (Piece(path),) if path in shapes
                else moved.get(path) or (Piece(ldm.get(path) or other.get(path, path)),)
                for n, path in paths.items()
            }  # fmt: skip
        if any(n != m for n, m in modules_of.items()):
            shapes = {**shapes, **{m + BIAS: s for m, s in bias_shapes(base).items()}}
            found = {
                n: pieces if n == modules_of[n]
                else tuple(Piece(p.module + BIAS, p.rows) for p in pieces)
                for n, pieces in found.items()
            }  # fmt: skip
        for name, pieces in found.items():
            thing = "module" if name == modules_of[name] else "bias"
            for piece in pieces:
                if piece.module not in shapes:
                    ties = omitted_ties(base, piece.module) if thing == "module" else ()
                    why = (f": its weight is {', '.join(ties)}, stored once; an adapter on it "
                           "would change both (untie them first: save the model with "
                           "tie_word_embeddings=False)") if ties else ""  # fmt: skip
                    if SD_CHECKPOINT_UNET + piece.module in shapes:
                        why = sd_checkpoint_refusal()
                    raise TargetError(
                        f"{self.source or 'adapter'}: layer {name!r} has no {thing} "
                        f"{piece.module!r} in the base {_label(base)}{why}"
                    )
        whole = {name: pieces[0].module for name, pieces in found.items()
                 if len(pieces) == 1 and name == modules_of[name]}  # fmt: skip
        require_conv1d_base(self, whole, shapes, base)
        transposed = transposed_layers(self, whole, shapes, base)
        for name, pieces in found.items():
            where = f"{self.source or 'adapter'}: layer {name!r}"
            layer = self.layers[name]
            layer = _as_stored(layer, where) if name in transposed else layer
            fitted[name] = [
                (module, fit_shape(form, shapes[module], where))
                for module, form in split_rows(layer, pieces, where)
            ]
        return fitted, tuple(whole[name] for name in transposed)

    def _fit_parameters(
        self,
        names: Sequence[str],
        component: str,
        base: Base,
        shapes: Mapping[str, Sequence[int]],
    ) -> dict[str, list[tuple[str, Factors]]]:
        """`_fit` of the layers `names` of one component, each on a `PARAMETERS` parameter
        (a Full form): the parameter of `base` (its module weights `shapes`) its path names
        (`original_parameter`: Wan's `blocks.0.modulation` is a diffusers Wan model's
        `blocks.0.scale_shift_table`), the layer renamed to it, the form of its shape;
        `TargetError` naming the layer where `base` has none, `ShapeError` where the shapes
        differ."""
        keys = parameter_shapes(base)
        fitted = {}
        for name in names:
            path = name[len(component) + 1 :] if component else name
            key = original_parameter(path, keys, shapes)
            where = f"{self.source or 'adapter'}: layer {name!r}"
            if key is None:
                raise TargetError(
                    f"{where} is a dense difference of the parameter {path!r}, which the base "
                    f"{_label(base)} does not have"
                )
            fitted[name] = [(key, fit_shape(self.layers[name], keys[key], where))]
        return fitted

    def _weights_of(self, component: str) -> dict[str, torch.Tensor]:
        """The `base_weights` of one component's modules ("" for the whole model), keyed
        without the component."""
        cut = len(component) + 1 if component else 0
        return {k[cut:]: tensor for k, tensor in self.base_weights.items()
                if self.component_of(k) == component}  # fmt: skip

    def _fit_weights(self, component: str, base: Base) -> dict[str, torch.Tensor]:
        """The `base_weights` of one component's modules (keys without the component),
        checked against `base`: each is a weight or bias of the base of the same shape, else
        a `TargetError` or `ShapeError` naming its key (PEFT loads it in place of the base's
        only there: a vocabulary resized to it); those equal to the base's own once cast to
        its dtype (as PEFT copies them in) are left out, since they change nothing, except
        those of `modules_to_save` modules. A module of the base that the config's
        `modules_to_save` names must have all its weights and biases saved (PEFT fails to
        load the adapter otherwise): `FileFormatError` naming the first missing one."""
        mine = self._weights_of(component)
        whole = self._whole_modules(component, base, mine)
        if not mine:
            return {}
        shapes = {f"{m}.weight": s for m, s in module_shapes(base).items()}
        shapes.update((m + BIAS, s) for m, s in bias_shapes(base).items())
        kept = {}
        for key, tensor in mine.items():
            where = f"{self.source or 'the adapter'}: {key}"
            if key not in shapes:
                raise TargetError(
                    f"{where} is a whole base tensor saved beside the layers, which PEFT loads "
                    f"in place of the base's, but the base {_label(base)} has no {key!r}"
                )
            if tuple(tensor.shape) != tuple(shapes[key]):
                raise ShapeError(
                    f"{where} is a whole base tensor of shape {tuple(tensor.shape)} saved beside "
                    "the layers, which PEFT loads in place of the base's only where that has "
                    "its shape (a vocabulary resized to it, a head for as many labels), but the "
                    f"base's has shape {tuple(shapes[key])}"
                )
            own = _tensor_values(base, key)
            if key.startswith(whole) or own is None or not torch.equal(
                tensor.to(own.device, own.dtype), own
            ):
                kept[key] = tensor
        return kept

    def _whole_modules(
        self, component: str, base: Base, saved: Mapping[str, torch.Tensor]
    ) -> tuple[str, ...]:
        """`"<module>."` of each module of `base` (in `component`) that the config's
        `modules_to_save` names (by name suffix, as PEFT matches them), whose weights and
        biases PEFT loads from the adapter, all of them: `FileFormatError` naming the first
        missing from `saved` (PEFT's load fails on it)."""
        names = self.model.get("modules_to_save") or []
        if not names or not isinstance(base, (nn.Module, Checkpoint, str, os.PathLike)):
            return ()
        tensors = {f"{m}.weight" for m in module_shapes(base)}
        tensors |= {m + BIAS for m in bias_shapes(base)}
        # every module holding one, and the modules above it (a head of several layers)
        modules = {key.rsplit(".", i)[0] for key in tensors for i in range(1, key.count(".") + 1)}
        wrapped = sorted(m for m in modules if m.endswith(tuple(names)))
        for module in wrapped:
            for key in sorted(t for t in tensors if t.startswith(f"{module}.")):
                if key not in saved:
                    task = self.model.get("task_type")
                    heads = f", the heads PEFT adds for task_type {task!r} included" if task else ""
                    raise FileFormatError(
                        f"{self.source or 'the adapter'}: its config saves module {module!r} "
                        f"whole (modules_to_save={names}{heads}), but {key} of it is not in "
                        "the file; PEFT fails to load it"
                    )
        return tuple(f"{m}." for m in wrapped)

    def resolve(
        self, base: Base | Mapping[str, Base], component: str | None = None
    ) -> Adapter:
        """The adapter checked against `base`, with kohya names mapped to its module paths.

        `base` is a checkpoint (path or `Checkpoint`), an `nn.Module` or a dict of module
        name → weight shape; for an adapter with several components, a dict
        `{component: base}`. Every layer must name a module of its base whose weight ΔW
        fits (`TargetError`, `ShapeError` otherwise); LyCORIS' flattened convolution
        layers get the base's kernel (`with_kernel`). Names keep their components; layers
        that name none (a PEFT folder's module paths) given bases per component belong to
        `component`, or to the only component given, and are placed under it. The
        components given bases join `pipeline`. A PEFT or diffusers file's module LoRA of a
        transformers `Conv1D` (`lora_A (r, in)`, `lora_B (out, r)`, which PEFT runs
        transposed) becomes the LoRA of the weight as stored, `(in, out)`: `up = Aᵀ`,
        `down = Bᵀ`, its weight a parameter target, where the base tells the module types (a
        model, a checkpoint whose `config.json` names a transformers model); an adapter whose
        config says `fan_in_fan_out` against a base that does not is a `FileFormatError`.
        """
        component = require_name("component", component)
        told = self._told(base) if per_component(base) else self  # type: ignore[arg-type]
        if told is not self:
            return told.resolve(base, component)
        present = self._present()
        if per_component(base):
            bases = dict(base)  # type: ignore[arg-type]
        elif len(present) == 1:
            bases = {present[0]: base}
        else:
            raise TargetError(f"{self._describe()}; give a base for each, as {{component: base}}")
        owners = {c: c for c in present}
        if "" in owners and "" not in bases:
            owners[""] = self._owner_of_plain_layers(bases, component)
        placed: dict[str, list[tuple[str, Factors]]] = {}
        stored: list[str] = []
        weights: dict[str, torch.Tensor] = {}
        for named, owner in owners.items():
            if owner not in bases:
                raise TargetError(f"no base given for component {owner!r} of {self.source}")
            prefix = f"{owner}." if owner else ""
            fitted, transposed = self._fit(named, bases[owner])
            for name, modules in fitted.items():
                placed[name] = [(prefix + module, form) for module, form in modules]
            stored += transposed
            kept = self._fit_weights(named, bases[owner])
            weights.update((prefix + key, tensor) for key, tensor in kept.items())
        components = tuple(sorted({o for o in owners.values() if o}))
        pipeline = tuple(sorted({*self.pipeline, *(c for c in bases if c)}))
        changes = {"pipeline": pipeline, "base_weights": weights}
        return self._stored(stored, **changes)._placed(placed, components)

    def _owner_of_plain_layers(self, bases: Mapping[str, Base], component: str | None) -> str:
        """The component whose base checks the layers that name none: `component`, or the
        only one in `bases`."""
        if component is not None:
            return component
        if len(bases) == 1:
            return next(iter(bases))
        raise TargetError(
            f"{self.source or 'the adapter'} has layers that name no component and bases are "
            f"given for {sorted(bases)}; choose the one they belong to with component= "
            "(--component)"
        )

    def for_model(self, base: Base, component: str | None = None) -> Adapter:
        """The layers of one component (`component` may be omitted when the adapter targets
        one model; layers that all name no model, a PEFT folder's, belong to whichever is
        named), named by module paths of `base` and checked and fitted as in `resolve`; the
        layers of other components are left out."""
        component = require_name("component", component)
        told = self._told([component] if component else [])
        if told is not self:
            return told.for_model(base, component)
        plain = component is not None and self._present() == [""]
        chosen = "" if plain else self._choose(component)
        fitted, transposed = self._fit(chosen, base)
        weights = self._fit_weights(chosen, base)
        return self._stored(transposed, base_weights=weights)._placed(fitted, ())

    def _stored(self, modules: Sequence[str], **changes: object) -> Adapter:
        """The adapter with `changes`, resolved against bases that tell the module types:
        `modules` (paths in their component's base, `Conv1D`s whose layers are now LoRAs of
        the weight as stored) join the parameter targets and `conv1d`, and `fan_in_fan_out`
        is cleared, as is `all_linear` (`_fit` checked every layer against its base)."""
        weights = [f"{m}.weight" for m in modules]
        targets = tuple(sorted({*self.target_parameters, *weights}))
        conv1d = tuple(sorted({*self.conv1d, *weights}))
        return replace(self, target_parameters=targets, conv1d=conv1d, fan_in_fan_out=False,
                       all_linear=False, **changes)  # fmt: skip

    def renamed(self, names: Mapping[str, str], components: tuple[str, ...]) -> Adapter:
        """The layers listed in `names` (old → new name), renamed: module paths under
        `components` (`()` for plain paths); layers not listed are left out. Two layers
        given one new name are a `TargetError` naming both."""
        kept = {n: [(names[n], form)] for n, form in self.layers.items() if n in names}
        return self._placed(kept, components)

    def _placed(
        self, placed: Mapping[str, Sequence[tuple[str, Factors]]], components: tuple[str, ...]
    ) -> Adapter:
        """The layers of `placed` (old name → [(new name, form)]), each old one's alpha on
        each of its new ones: module paths under `components`. Two layers given one new
        name are a `TargetError` naming both."""
        owners: dict[str, str] = {}
        layers: dict[str, Factors] = {}
        alphas: dict[str, float] = {}
        for name, targets in placed.items():
            for target, form in targets:
                if target in owners:
                    raise TargetError(
                        f"{self.source or 'the adapter'}: layers {owners[target]!r} and "
                        f"{name!r} both name the module {target!r}; keep one of them"
                    )
                owners[target], layers[target] = name, form
                if name in self.alphas:
                    alphas[target] = self.alphas[name]
        return replace(self, layers=layers, alphas=alphas, components=components, kohya_names=False)

    def select(self, component: str | None = None) -> Adapter:
        """The layers of one component named by plain module paths (`component` may be
        omitted when the adapter targets one model); kohya names need `for_model`."""
        component = require_name("component", component)
        if self.kohya_names:
            raise TargetError(
                f"{self.source}: kohya names need the base model to become module paths"
            )
        component = self._choose(component)
        keep = [n for n in self.layers if self.component_of(n) == component]
        cut = len(component) + 1 if component else 0
        renamed = self.renamed({n: n[cut:] for n in keep}, ())
        return replace(renamed, base_weights=self._weights_of(component))

    def with_component(self, component: str) -> Adapter:
        """The adapter with every plain module path placed under `component`."""
        if self.components or self.kohya_names:
            raise TargetError(f"the adapter's names already carry components {self.components}")
        weights = {f"{component}.{k}": t for k, t in self.base_weights.items()}
        renamed = self.renamed({n: f"{component}.{n}" for n in self.layers}, (component,))
        return replace(renamed, base_weights=weights)


def _label(base: object) -> str:
    """How errors name a base: its path, its class, or a count of its modules."""
    if isinstance(base, Mapping):
        return f"of {len(base)} modules"
    if isinstance(base, nn.Module):
        return type(base).__name__
    return f"{base}{shard_note(base)}"


def _tensor_values(base: Base, key: str) -> torch.Tensor | None:
    """The values of the weight or bias `key` (`<module>.weight` / `.bias`) in `base` (a
    model, a checkpoint), or None where it holds none to compare: a dict of shapes, a
    tensor on the meta device or sharded."""
    if isinstance(base, nn.Module):
        module, _, parameter = key.rpartition(".")
        tensor = getattr(base.get_submodule(module), parameter)
        held = type(tensor) in (torch.Tensor, nn.Parameter) and not tensor.is_meta
        return tensor.detach() if held else None
    if isinstance(base, (str, os.PathLike)):
        base = Checkpoint(base)
    return base.get(key) if isinstance(base, Checkpoint) else None


def joined_base_weights(
    adapters: Sequence[tuple[Adapter, str, float]], error: type[LowRankError]
) -> dict[str, torch.Tensor]:
    """The `base_weights` of `adapters` (`(adapter, label, weight)`), one per key: those of
    an adapter weighted 0 are left out, those of one weighted above 0 are loaded as saved
    (in place of the base's, whatever the weight, as PEFT loads an adapter's whole modules at
    any strength of its update). `error` naming the adapter and a key where one that saves
    whole tensors is weighted below 0 (subtracting its update cannot take its tensors back
    out: they replace the base's), and naming the key and two adapters where they save
    different ones for it: PEFT would load the one it loads last, so the result would depend
    on their order."""
    joined: dict[str, tuple[torch.Tensor, str]] = {}
    for adapter, label, weight in adapters:
        if weight == 0.0 or not adapter.base_weights:
            continue
        if weight < 0.0:
            raise error(
                f"{label} saves whole base tensors ({next(iter(adapter.base_weights))}, "
                f"{len(adapter.base_weights)} in all), which are loaded in place of the base's: "
                f"its weight {weight:g} subtracts its update but cannot take them back out; "
                "leave its saved tensors out of the adapter, or weight it 0 or above"
            )
        for key, tensor in adapter.base_weights.items():
            held = joined.setdefault(key, (tensor, label))
            # compared as float32 where 1-byte floats, which torch.equal does not compare
            first, other = (t.to(torch.float32) if t.element_size() == 1 else t
                            for t in (held[0], tensor.to(held[0].dtype)))  # fmt: skip
            if not torch.equal(first, other):
                raise error(
                    f"{held[1]} and {label} both save a whole base tensor {key}, which PEFT "
                    "loads in place of the base's, and they differ: the result would depend on "
                    "the order they are loaded in"
                )
    return {key: tensor for key, (tensor, _) in joined.items()}


_BIAS_SETTINGS = ("none", "lora_only", "all")
"""PEFT's `bias` settings, each saving the biases the one before it does and more."""


def joined_model(adapters: Sequence[Adapter]) -> dict[str, object]:
    """The `Adapter.model` of a combination of `adapters`, whose `base_weights` are joined
    (`joined_base_weights`): `modules_to_save` every module any of them saves whole, in
    order; `bias` the widest any states (PEFT loads the saved biases by their keys whatever
    it says); each other field where every adapter stating it states the same value, else
    left out (`base_model_name_or_path` and `revision` together, unless every adapter
    naming a model names the same one at the same revision)."""
    joined: dict[str, object] = {}
    saved: list[str] = []
    for adapter in adapters:
        names = adapter.model.get("modules_to_save")
        saved += names if isinstance(names, list) else []
    if saved:
        joined["modules_to_save"] = list(dict.fromkeys(saved))
    biases = [a.model["bias"] for a in adapters if a.model.get("bias") in _BIAS_SETTINGS]
    if biases:
        joined["bias"] = max(biases, key=_BIAS_SETTINGS.index)
    for key in MODEL_FIELDS:
        values = [a.model[key] for a in adapters if key in a.model]
        if key not in joined and values and all(v == values[0] for v in values):
            joined[key] = values[0]
    # a model is its name at a revision: two revisions of one name are two models
    named = {(a.model["base_model_name_or_path"], a.model.get("revision"))
             for a in adapters if "base_model_name_or_path" in a.model}  # fmt: skip
    if len(named) > 1 or "base_model_name_or_path" not in joined:
        joined.pop("base_model_name_or_path", None)
        joined.pop("revision", None)
    return joined


def per_component(base: object) -> bool:
    """Whether `base` is `{component: base}` rather than one base (a checkpoint, a module,
    or `{module name: weight shape}`)."""
    return isinstance(base, Mapping) and bool(base) and not all(
        isinstance(v, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in v)
        for v in base.values()
    )


def require_used_component(component: str | None, used: bool, where: object) -> None:
    """`ArgumentError` where `component` is given but not `used`: it only places layers that
    name no model (a PEFT folder's) and picks or names the model of an output that does not
    name each layer's model itself (PEFT, diffusers)."""
    if component is not None and not used:
        raise ArgumentError(
            f"component={component!r} (--component) would change nothing for {where}: it "
            "places layers that name no model (a PEFT folder's) among bases given per "
            "component or beside adapters that name theirs, and names the model of PEFT and "
            "diffusers output; a kohya or LyCORIS file's model is its prefix= (--prefix)"
        )


def fit_shape(form: Factors, shape: Sequence[int], where: str) -> Factors:
    """`form`, or the same ΔW with a flattened input axis unfolded (`with_kernel`), a
    1×1 kernel dropped (a LoCon of a 1×1 convolution on a linear layer, as a projection
    that is a 1×1 convolution in one model and linear in another) or a `(k, 1)` kernel's
    unit axis dropped (PEFT's LoHa / LoKr Tucker cores on a `Conv1d`, `(r, r, k, 1)`),
    whose shape is the weight's `shape`, a DoRA's update so and its magnitude with it
    (`DoRA.with_update`); `ShapeError` naming `where` if none fits."""
    shape = tuple(shape)
    if isinstance(form, DoRA):  # its update fitted, the magnitude shaped for it
        update = fit_shape(form.update, shape, where)
        try:
            return form.with_update(update)
        except ShapeError as err:
            raise ShapeError(f"{where}: DoRA {err}") from None
    if tuple(form.shape) == shape:
        return form
    if tuple(form.shape) == (*shape, 1) and len(shape) > 2 and not isinstance(form, CP):
        return _without_last_axis(form)
    one_by_one = isinstance(form, LoRA) and all(size == 1 for size in form.down.shape[2:])
    if one_by_one and len(shape) == 2 and form.down.ndim > 2:
        flat = LoRA(form.down.flatten(1), form.up.flatten(1), form.scale)
        if tuple(flat.shape) == shape:
            return flat
    if isinstance(form, (LoRA, LoHa, LoKr)) and len(shape) > 2 and len(form.shape) == 2:
        try:
            unfolded = form.with_kernel(shape[2:])
        except ShapeError:
            unfolded = form
        if tuple(unfolded.shape) == shape:
            return unfolded
    raise ShapeError(
        f"{where}: ΔW has shape {tuple(form.shape)} but the base weight has shape {shape}"
    )


def _without_last_axis(form: Factors | torch.Tensor) -> Factors | torch.Tensor:
    """`form` with the unit last axis of its kernel dropped from every factor that has it:
    the same ΔW, one dimension fewer."""
    if isinstance(form, torch.Tensor):
        return form.squeeze(-1)
    if isinstance(form, LoRA):
        return LoRA(form.down.squeeze(-1), form.up.squeeze(-1), form.scale)
    if isinstance(form, Tucker2):
        return Tucker2(*(t.squeeze(-1) for t in (form.down, form.mid, form.up)), form.scale)
    if isinstance(form, LoHa):
        return LoHa(_without_last_axis(form.first), _without_last_axis(form.second), form.scale)
    return LoKr(form.w1, _without_last_axis(form.w2), form.scale)


def require_known_layout(
    adapter: Adapter, base: Base | None = None, *, written: bool = False
) -> None:
    """`FileFormatError` where `adapter` is read from a PEFT or diffusers config that says
    `fan_in_fan_out` (its layers on transformers `Conv1D`s hold ΔWᵀ) and not yet resolved
    against a base that tells which layers those are (`Adapter.fan_in_fan_out`), and `base`
    (None: no base) does not tell them either (`tells_module_types`). `written`: the adapter
    is about to be written as it is (`save_adapter`, whose `base` only guards its outputs),
    so only resolving it first helps."""
    if written and adapter.fan_in_fan_out:
        given = "it is not resolved against one (save_adapter writes an adapter as it is)"
        where = "to load_adapter(..., base=...) or Adapter.resolve first"
    elif adapter.fan_in_fan_out and not tells_module_types(base):
        given = "no base was given" if base is None else f"the base {base} does not tell them"
        where = ""
    else:
        return
    raise FileFormatError(
        f"{adapter.source or 'the adapter'}: its config says fan_in_fan_out: its LoRAs of "
        "transformers Conv1D layers (GPT-2's, weights stored (in, out)) hold the update "
        f"transposed, and only the module types tell which layers those are, but {given}; "
        f"give a base that tells them{' ' + where if where else ''}: the model, or its "
        "checkpoint with the config.json transformers saves beside it"
    )


def require_conv1d_base(
    adapter: Adapter, modules: Mapping[str, str], shapes: Mapping[str, Sequence[int]], base: Base
) -> None:
    """`FileFormatError` (`TargetError` for an adapter from no file) naming the first layer of
    `adapter` (`modules` maps its layers to module paths of `base`, `shapes` those modules to
    their weights' shapes) that `Adapter.conv1d` says updates a transformers `Conv1D`'s
    weight as stored where `base` says otherwise: its module is no `Conv1D` where `base`
    tells the module types (`kinds`), or the layer's ΔW is the transpose of the module's
    (non-square) weight. A PEFT file's module LoRA of a `Conv1D` is read as stored by that
    record, so a wrong one would otherwise merge as ΔWᵀ."""
    listed = {n: m for n, m in modules.items() if targets_parameter(m, adapter.conv1d)}
    if not listed:
        return
    found = None
    if tells_module_types(base):
        found = set(kinds({m: shapes[m] for m in listed.values()}, base).conv1d)
    for name, module in listed.items():
        delta, weight = tuple(adapter.layers[name].shape), tuple(shapes[module])
        if found is not None and module not in found:
            why = f"the base {_label(base)} says module {module!r} is no Conv1D"
        elif len(delta) == 2 and delta != weight and delta[::-1] == weight:
            why = (f"its ΔW has shape {delta}, the transpose of the base's weight {weight}: "
                   "its module is no Conv1D")  # fmt: skip
        else:
            continue
        error = FileFormatError if adapter.source is not None else TargetError
        raise error(
            f"{adapter.source or 'the adapter'}: layer {name!r} is recorded as the update of a "
            "transformers Conv1D's weight as stored (Adapter.conv1d, which lowrank's files "
            f"keep in their metadata), but {why}"
        )


def transposed_layers(
    adapter: Adapter, modules: Mapping[str, str], shapes: Mapping[str, Sequence[int]], base: Base
) -> tuple[str, ...]:
    """The layers of a PEFT or diffusers file (`adapter`; `modules` maps its layers to module
    paths of `base`, `shapes` those modules to their weights' shapes) that are module LoRAs
    of a transformers `Conv1D` of `base` (found by `kinds`). Both formats load through PEFT,
    which runs such a layer transposed: for `lora_A (r, in)`, `lora_B (out, r)` it adds
    `ΔWᵀ = scale · Aᵀ Bᵀ` to the `(in, out)` weight as stored, since it sets `fan_in_fan_out`
    for every `Conv1D` and clears it for every `nn.Linear`, whatever the config says. A
    parameter target (`target_parameters`) is an update as stored already. Where the config
    says `fan_in_fan_out` and `base` does not tell the module types, `FileFormatError`
    (`require_known_layout`)."""
    if adapter.format not in THROUGH_PEFT:
        return ()
    require_known_layout(adapter, base)
    wrapped = {name: module for name, module in modules.items()
               if not targets_parameter(module, adapter.target_parameters)}  # fmt: skip
    conv1d = set(kinds({m: shapes[m] for m in wrapped.values()}, base).conv1d)
    return tuple(name for name, module in wrapped.items() if module in conv1d)


def split_rows(form: Factors, pieces: Sequence[Piece], where: str) -> list[tuple[str, Factors]]:
    """`[(module, form)]`: `form` on each module of `pieces` that the layer is.

    A layer that is one module, all its rows in order, keeps its form. Otherwise each
    module's ΔW is rows of the layer's, the form's `with_rows`: a LoRA's, Tucker2's or CP's
    output factor's rows (the other factors shared, copied per module), a LoHa's halves'
    rows, a LoKr's `w1` rows where the rows are whole groups of `w2`'s, exactly. A LoKr
    whose `w2` groups straddle a piece is a `TargetError`, a layer whose ΔW has not the
    pieces' rows a `ShapeError`, naming `where`."""
    if len(pieces) == 1 and pieces[0].rows is None:
        return [(pieces[0].module, form)]
    modules = ", ".join(piece.module for piece in pieces)
    rows = max(stop for piece in pieces for _, stop in piece.rows or ())
    if form.shape[0] != rows:
        raise ShapeError(
            f"{where}: ΔW has {form.shape[0]} rows but the base's {modules} have {rows}"
        )
    split = []
    for piece in pieces:
        part = form.with_rows(piece.rows or ())
        if part is None and isinstance(form, DoRA) and form.axis != 0:
            raise TargetError(
                f"{where} is a DoRA whose norm runs over each input channel of the whole "
                f"weight, on a layer that is rows of the base's {modules}: each module's merge "
                "would need the others' rows, so no DoRA of one module holds it"
            )
        if part is None:
            form = update_of(form)
            raise TargetError(
                f"{where} is a LoKr whose w2 has {form.w2.shape[0]} rows, on a layer that is "
                f"rows of the base's {modules}: the rows of {piece.module} are no whole groups "
                "of w2's rows, so no LoKr of these factors holds them"
            )
        split.append((piece.module, part))
    return split


def _as_stored(form: Factors | DoRA, where: str) -> Factors | DoRA:
    """A PEFT module LoRA of a transformers `Conv1D`, `lora_A (r, in)` / `lora_B (out, r)`,
    as the LoRA of its weight as stored `(in, out)`, which PEFT updates by `ΔWᵀ = scale ·
    Aᵀ Bᵀ`: `up = Aᵀ (in, r)`, `down = Bᵀ (r, out)`; a DoRA of one with its magnitude per
    output feature, a column of the stored weight (`DoRA.transposed`). Any other form there
    (a PEFT LoHa or LoKr, whose layers PEFT refuses to put on a `Conv1D`) is a `TargetError`
    naming `where`: no tool runs it, and in a square layer either orientation would fit."""
    update = update_of(form)
    if not isinstance(update, LoRA) or update.down.ndim != 2:
        raise TargetError(
            f"{where} is a {form_name(update)} on a transformers Conv1D (a weight stored "
            "(in, out)), which PEFT does not load: its LoHa and LoKr adapters wrap nn.Linear, "
            "Conv1d and Conv2d modules only"
        )
    return form.transposed()


def require_no_dora(
    adapter: Adapter, what: str, error: type[LowRankError] = DTypeError
) -> None:
    """`error` naming the first DoRA layer of `adapter`, which has no ΔW of its own to
    `what` (`lowrank.forms.dora_refusal`)."""
    for name, form in adapter.items():
        if isinstance(form, DoRA):
            raise error(dora_refusal(f"{adapter.source or 'the adapter'}: layer {name!r}", what))


def listed_rank(form: Factors) -> int | list[int] | None:
    """A layer's rank as a report lists it: an int, a list for a Tucker2's pair, None for a
    dense LoKr."""
    rank = form.rank
    return list(rank) if isinstance(rank, tuple) else rank


def form_name(form: Factors | DoRA) -> str:
    """The form's class name, with LoRA on a convolution called LoCon, and a DoRA's update's
    in brackets: `DoRA (LoCon)`."""
    if isinstance(form, DoRA):
        return f"DoRA ({form_name(form.update)})"
    if isinstance(form, LoRA) and form.down.ndim > 2:
        return "LoCon"
    return type(form).__name__
