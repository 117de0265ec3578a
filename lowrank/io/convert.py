"""`convert_adapter`: an adapter file in another format, exactly where the format allows.

Kohya stores alpha per layer, PEFT and diffusers in a config: alphas are carried over so
that every layer keeps its scale bit for bit (per-module patterns included; an rsLoRA
scale stored as kohya's alpha / r comes back to the last ulp).
Tucker2 (`lora_mid`) layers fold exactly into LoCon for formats without a mid factor.
LoHa and LoKr layers, and the dense differences of weights (`Full`), have no LoRA
equivalent: only with a `rank` are they replaced by their truncated SVD, and the relative
error of each is reported; without one, PEFT output is PEFT's LoHa or LoKr adapter type,
and a bias's or norm's dense difference (1-D) goes to LyCORIS only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from tqdm import tqdm

from .. import decompose
from .._checks import require_flag, require_int, require_name
from .._factor_space import log_vector_norm, relative_of_logs
from ..errors import ConversionError, RankError
from ..forms import (
    CP,
    DoRA,
    Factors,
    Full,
    LoHa,
    LoKr,
    LoRA,
    Tucker2,
    dtype_of,
    recompose,
    update_of,
)
from .adapter import form_name
from .files import PathLike
from .formats import TRAITS, require_format
from .formats.common import full_refusal, magnitude_refusal, parameter_refusal
from .formats.peft import lora_bias_layer
from .layouts import resolved_for
from .names import PARAMETERS, Base, layer_parameter
from .store import load_adapter, require_new_output, save_adapter, written_layers


def _relative_error(approx: Factors, reference: torch.Tensor) -> float:
    """‖ΔW(approx) − reference‖ / ‖reference‖ in float64, each norm with its tensor's peak
    divided out, so that no square leaves float64's range (`_factor_space.relative_of_logs`)."""
    diff = recompose(approx.to(torch.float64)) - reference
    return relative_of_logs(log_vector_norm(diff), log_vector_norm(reference))


def approximate(form: Factors | DoRA, rank: int) -> tuple[LoRA | DoRA, float]:
    """The truncated SVD of `form`'s ΔW at `min(rank, full)` as a `LoRA` (scale 1, in the
    form's dtype) and its relative error ‖ΔW − LoRA‖ / ‖ΔW‖, measured in float64; a DoRA's
    update so, its magnitude kept."""
    if isinstance(form, DoRA):
        update, error = approximate(form.update, rank)
        return form.with_update(update), error
    reference = recompose(form.to(torch.float64))
    full = min(reference.shape[0], reference[0].numel())
    lora = decompose.svd(reference, rank=min(rank, full), method="exact").to(dtype_of(form))
    return lora, _relative_error(lora, reference)


def _needs_lora(form: Factors | DoRA, to: str, rank: int | None) -> bool:
    """Whether `form` becomes a LoRA in `to`: a CP anywhere, a Full outside LyCORIS, a
    LoHa / LoKr where `to` cannot hold it (outside LyCORIS; in PEFT, whose LoHa / LoKr types
    hold it, when a rank asks for LoRA); a DoRA where its update does, and over a LoHa / LoKr
    outside LyCORIS (PEFT's DoRA is over a LoRA only)."""
    if isinstance(form, DoRA):
        product = isinstance(form.update, (LoHa, LoKr)) and not TRAITS[to].lycoris_forms
        return product or _needs_lora(form.update, to, rank)
    if isinstance(form, CP):
        return True
    if isinstance(form, Full):
        return not TRAITS[to].lycoris_forms
    held = TRAITS[to].lycoris_forms or (TRAITS[to].product_types and rank is None)
    return isinstance(form, (LoHa, LoKr)) and not held


def convert_adapter(
    path: PathLike,
    out: PathLike,
    to: str,
    *,
    base: Base | Mapping[str, Base] | None = None,
    rank: int | None = None,
    component: str | None = None,
    prefix: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Convert the adapter at `path` to format `to` at `out`; return a report.

    `to` is `peft`, `kohya`, `lycoris` or `diffusers`. `base` (checkpoint path, module or
    dict, per component if needed) maps kohya names to module paths, which PEFT and
    diffusers need, and gives LyCORIS' flattened convolution layers their kernel.
    `rank` allows LoHa / LoKr / Full layers (a DoRA's update too, its magnitude kept) to
    become rank-`rank` LoRA layers by truncated SVD in formats without them (and in PEFT,
    whose LoHa and LoKr adapter types hold those as they are without a rank; a 1-D Full
    layer, a bias's or norm's, is a `ConversionError`); without it they are a
    `ConversionError`, and a `rank` no layer needs is a `RankError` (it would be ignored);
    a DoRA layer in a format without DoRA (kohya) is a `ConversionError` whatever the rank.
    `component` and `prefix` are as in `save_adapter`; with `base` given per component,
    `component` also names the model of layers that name none (a PEFT folder's), and where
    it would change nothing it is an `ArgumentError`. The report lists the `folded` Tucker2
    layers and the `approximated` ones with their rank and relative error.
    """
    to = require_format(to)
    progress = require_flag("progress", progress)
    component = require_name("component", component)
    if rank is not None:
        rank = require_int("rank", rank, minimum=1, error=RankError)
    adapter = load_adapter(path)
    require_new_output(out, to, [adapter], base=base)
    adapter = written_layers(resolved_for(adapter, base, component, to), to, component)
    doras = [n for n, f in adapter.items() if isinstance(f, DoRA)]
    if doras and not TRAITS[to].dora:  # no rank would help: the magnitude has no place
        raise ConversionError(
            f"{adapter.source}: {magnitude_refusal(doras[0], adapter[doras[0]], to)}"
        )
    on_parameters = [n for n in adapter.layers if layer_parameter(n)[1] in PARAMETERS]
    if on_parameters:  # no format holds them, and no rank makes them a LoRA
        where = f"{adapter.source}: " if adapter.source else ""
        raise ConversionError(where + parameter_refusal(on_parameters[0]))
    lossy = [n for n, f in adapter.items() if _needs_lora(f, to, rank)
             and not (TRAITS[to].lora_bias and lora_bias_layer(adapter, n))]  # fmt: skip
    for name in lossy:  # a bias's or norm's dense difference has no LoRA
        if isinstance(adapter[name], Full) and len(adapter[name].shape) == 1:
            where = f"{adapter.source}: " if adapter.source else ""
            raise ConversionError(where + full_refusal(name, adapter[name], to))
    if lossy and rank is None:
        raise ConversionError(
            f"{adapter.source}: layer {lossy[0]!r} is a {form_name(adapter[lossy[0]])} "
            f"({len(lossy)} such layers), which {to} files cannot hold; pass a rank to "
            "approximate them by truncated SVD (the error is reported)"
            + (", or convert to lycoris" if not TRAITS[to].lycoris_forms else "")
        )
    if rank is not None and not lossy:
        updates = [update_of(f) for f in adapter.layers.values()]
        if any(isinstance(form, (LoHa, LoKr, Full)) for form in updates):
            why = (f"{to} files hold its LoHa, LoKr and Full layers as they are (to make LoRA "
                   "layers of them, convert to peft, kohya or diffusers)")  # fmt: skip
        else:
            why = f"{adapter.source or 'the adapter'} has no LoHa, LoKr or Full layer"
        raise RankError(
            f"rank={rank} approximates LoHa / LoKr / Full layers by LoRA where the output format "
            f"cannot hold them, and {why}: nothing would use it"
        )
    # LyCORIS stores a LoHa / LoKr convolution flattened, (out, in·K); every LoRA format
    # stores a convolution's factors with its kernel, which only the base can give.
    unknown_kernel = [
        n for n in lossy if len(adapter[n].shape) == 2 and not isinstance(adapter[n], Full)
    ]
    if unknown_kernel and base is None:
        raise ConversionError(
            f"{adapter.source}: layer {unknown_kernel[0]!r} has a 2-D ΔW, which LyCORIS also "
            f"uses for flattened convolutions; give the base so that the {to} factors get "
            "the layer's real shape"
        )
    layers = dict(adapter.layers)
    approximated = []
    for name in tqdm(lossy, desc="approximating", unit="layer", disable=None if progress else True):
        layers[name], error = approximate(layers[name], rank)  # type: ignore[arg-type]
        approximated.append(
            {
                "name": name,
                "form": form_name(adapter[name]),
                "rank": layers[name].rank,
                "relative_error": error,
            }
        )
    written = save_adapter(
        replace(adapter, layers=layers), out, to, component=component, prefix=prefix, base=base
    )
    folded = [n for n, f in layers.items() if isinstance(update_of(f), Tucker2)]
    folded = [] if TRAITS[to].mid else folded
    return {
        "input": str(path),
        "from": adapter.format,
        "to": to,
        "output": [str(p) for p in written],
        "layers": len(layers),
        "folded": folded,
        "approximated": approximated,
    }


def format_conversion(report: dict[str, Any]) -> str:
    """`convert_adapter`'s report as text."""
    lines = [
        f"{report['input']} ({report['from']}) → {', '.join(report['output'])} "
        f"({report['to']}): {report['layers']} layers"
    ]
    if report["folded"]:
        lines.append(f"{len(report['folded'])} Tucker layers folded exactly into LoCon")
    for row in report["approximated"]:
        lines.append(
            f"{row['name']}: {row['form']} → LoRA rank {row['rank']}, "
            f"relative error {row['relative_error']:.3g}"
        )
    return "\n".join(lines)
