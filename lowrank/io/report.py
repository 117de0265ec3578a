"""`inspect_adapter`: what an adapter file holds, layer by layer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from .._text import aligned, sizes_text
from ..forms import DORA_AXES, DoRA, alpha_rank
from .adapter import (
    Adapter,
    form_name,
    listed_rank,
    per_component,
    require_known_layout,
    require_used_component,
)
from .files import PathLike
from .names import Base
from .store import adapter_files, adapter_from

_METADATA_SHOWN = 2000


def inspect_adapter(
    path: PathLike | Adapter,
    *,
    base: Base | Mapping[str, Base] | None = None,
    component: str | None = None,
) -> dict[str, Any]:
    """A JSON-ready description of an adapter file (or an `Adapter`).

    Keys: `path`, `format`, `components`, `module_names` (whether layer names are module
    paths, or kohya names awaiting a base), `layers` (per layer: `name`, `form`, `rank`,
    `alpha` (a LoKr with dense `w1` and `w2`: a PEFT config's, else None), `scale`,
    `shape` of ΔW, `params`, `dtype`, and `dora`: for a DoRA layer the channels its
    magnitude runs along, `"out"` or `"in"`, else None), `forms` (count per form), `totals`
    (`layers`, `params`, `bytes` of factors, `file_bytes` on disk), the base modules it
    targets (`targets`), the shapes of whole base weights and biases it saves beside its
    layers, which PEFT loads in place of the base's (`base_weights`, `Adapter.base_weights`;
    against a base, those that differ from it and those of `modules_to_save` modules) and
    the file's metadata. With `base`, kohya names are mapped to
    module paths and every layer is checked against the base; with bases per component,
    `component` names the model of layers that name none (as in `Adapter.resolve`). An
    adapter whose config says `fan_in_fan_out` needs a base that tells the module types
    (`FileFormatError`).
    """
    adapter = adapter_from(path)
    placed = per_component(base) and adapter.has_plain_layers
    require_used_component(component, placed, adapter.source or "the adapter")
    if base is not None:
        adapter = adapter.resolve(base, component)
    require_known_layout(adapter)
    rows = []
    for name, form in adapter.items():
        dtypes = sorted(
            {str(t.dtype).removeprefix("torch.") for t in form.named_factors().values()}
        )
        # a LoKr with dense w1 and w2 has no rank that alpha is divided by: PEFT still
        # scales it by its config's alpha / r (shown), LyCORIS by 1 whatever alpha says
        alpha = adapter.alpha(name) if alpha_rank(form) is not None else None
        if alpha_rank(form) is None and adapter.format == "peft":
            alpha = adapter.alphas.get(name)
        rows.append(
            {
                "name": name,
                "form": form_name(form),
                "rank": listed_rank(form),
                "alpha": alpha,
                "scale": form.scale,
                "shape": list(form.shape),
                "params": form.num_params,
                "dtype": "/".join(dtypes),
                "dora": DORA_AXES[form.axis] if isinstance(form, DoRA) else None,
            }
        )
    files = adapter_files(adapter.source, adapter.format) if adapter.source else []
    metadata = {
        k: v if len(v) <= _METADATA_SHOWN else v[:_METADATA_SHOWN] + "…"
        for k, v in adapter.metadata.items()
    }
    return {
        "path": str(adapter.source) if adapter.source else None,
        "format": adapter.format,
        "components": list(adapter.components),
        "module_names": not adapter.kohya_names,
        "rslora": adapter.rslora,
        "layers": rows,
        "forms": dict(Counter(row["form"] for row in rows)),
        "totals": {
            "layers": len(rows),
            "params": adapter.num_params,
            "bytes": adapter.nbytes,
            "file_bytes": sum(f.stat().st_size for f in files if f.exists()),
        },
        "targets": sorted(adapter.layers),
        "base_weights": {k: list(t.shape) for k, t in sorted(adapter.base_weights.items())},
        "metadata": metadata,
    }


def format_report(report: dict[str, Any]) -> str:
    """`inspect_adapter`'s report as a plain-text table."""
    totals = report["totals"]
    forms = ", ".join(f"{n} {form}" for form, n in report["forms"].items())
    names = "module paths" if report["module_names"] else "kohya names (give --base to map)"
    lines = [
        f"{report['path']}: {report['format']} adapter, {totals['layers']} layers ({forms})",
        f"{totals['params']:,} parameters, {totals['bytes']:,} bytes of factors, "
        f"{totals['file_bytes']:,} bytes on disk; names: {names}",
    ]
    if report["components"]:
        lines.append(f"components: {', '.join(report['components'])}")
    if report["base_weights"]:
        saved = ", ".join(f"{k} {sizes_text(s)}" for k, s in report["base_weights"].items())
        lines.append(f"base weights saved in place of the base's: {saved}")
    table = [["layer", "form", "rank", "alpha", "scale", "ΔW shape", "params", "dtype"]]
    for row in report["layers"]:
        rank = row["rank"]
        table.append(
            [
                row["name"],
                row["form"],
                "—" if rank is None else sizes_text(rank),
                "—" if row["alpha"] is None else f"{row['alpha']:g}",
                f"{row['scale']:.6g}",
                sizes_text(row["shape"]),
                f"{row['params']:,}",
                row["dtype"],
            ]
        )
    return "\n".join([*lines, "", *aligned(table, left=(0, 1, 7))])
