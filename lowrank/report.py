"""Whole-model adapter reports: parameters, file bytes and optimizer-state bytes.

`count_model` reads only module types and sizes, never weights, so it works on a model
built on the `meta` device. Conventions: "% trainable" is adapter parameters over all
parameters after injection (base + adapters, as PEFT prints it); file bytes are tensor
data only (no file header or key names); Adam keeps two fp32 moments per trainable
parameter, 8 bytes each (gradients and master weights not included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._text import aligned, sizes_text
from .bounds import Rank
from .errors import DTypeError
from .nn.config import AdapterConfig
from .nn.fit import layer_sizes
from .nn.model import adapters, plan
from .targets import Targets

ADAM_BYTES_PER_PARAM = 8


@dataclass(frozen=True)
class LayerRow:
    """One adapted module: its name, weight shape, form, rank and parameter counts."""

    name: str
    kind: str
    shape: tuple[int, ...]
    form: str
    rank: Rank
    base_params: int
    adapter_params: int

    def to_dict(self) -> dict[str, object]:
        """The row as JSON-ready values."""
        rank = list(self.rank) if isinstance(self.rank, tuple) else self.rank
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "form": self.form,
            "rank": rank,
            "base_params": self.base_params,
            "adapter_params": self.adapter_params,
        }


@dataclass(frozen=True)
class ModelReport:
    """Per-layer rows and totals of an adapter on a model; `str()` is a table."""

    model: str
    rows: tuple[LayerRow, ...]
    base_params: int
    dtype: torch.dtype
    earlier_params: int = 0
    """Trainable parameters of the adapters the model already holds (earlier `inject`
    calls), counted apart from `base_params`."""

    @property
    def adapter_params(self) -> int:
        """Parameters the adapters add (all trainable)."""
        return sum(row.adapter_params for row in self.rows)

    @property
    def percent_trainable(self) -> float:
        """100 · (adapter + earlier) / (base + adapter + earlier): the share `inject` leaves
        trainable."""
        trainable = self.adapter_params + self.earlier_params
        return 100.0 * trainable / (self.base_params + trainable)

    @property
    def adapter_bytes(self) -> int:
        """Bytes of the adapter tensors in `dtype` (a safetensors file adds a small header)."""
        return self.adapter_params * self.dtype.itemsize

    @property
    def adapter_adam_bytes(self) -> int:
        """Adam state for training the adapters: two fp32 moments per parameter."""
        return ADAM_BYTES_PER_PARAM * self.adapter_params

    @property
    def full_bytes(self) -> int:
        """Bytes of every base parameter in `dtype`: the file full fine-tuning writes."""
        return self.base_params * self.dtype.itemsize

    @property
    def full_adam_bytes(self) -> int:
        """Adam state for full fine-tuning: two fp32 moments per base parameter."""
        return ADAM_BYTES_PER_PARAM * self.base_params

    def to_dict(self) -> dict[str, object]:
        """Rows and totals as JSON-ready values."""
        return {
            "model": self.model,
            "dtype": str(self.dtype).removeprefix("torch."),
            "rows": [row.to_dict() for row in self.rows],
            "totals": {
                "base_params": self.base_params,
                "adapter_params": self.adapter_params,
                "earlier_adapter_params": self.earlier_params,
                "percent_trainable": self.percent_trainable,
                "adapter_bytes": self.adapter_bytes,
                "adapter_adam_bytes": self.adapter_adam_bytes,
                "full_finetune_params": self.base_params,
                "full_finetune_bytes": self.full_bytes,
                "full_finetune_adam_bytes": self.full_adam_bytes,
            },
        }

    def __str__(self) -> str:
        header = ("layer", "shape", "form", "rank", "base params", "adapter params")
        body = [
            (
                row.name,
                sizes_text(row.shape),
                row.form,
                sizes_text(row.rank),
                f"{row.base_params:,}",
                f"{row.adapter_params:,}",
            )
            for row in self.rows
        ]
        rule = tuple("-" * max(len(r[i]) for r in (header, *body)) for i in range(len(header)))
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [*aligned([header, rule, *body], left=(0, 1, 2)), ""]
        lines += [
            f"model               {self.model}: {len(self.rows)} adapted layers",
            f"base parameters     {self.base_params:,}",
            *([f"earlier adapters    {self.earlier_params:,} (already in the model)"]
              if self.earlier_params else []),
            f"adapter parameters  {self.adapter_params:,} ({self.percent_trainable:.4f}% "
            "of all parameters trainable)",
            f"adapter file        {_bytes(self.adapter_bytes)} ({dtype})",
            f"adapter Adam state  {_bytes(self.adapter_adam_bytes)} (2 fp32 moments)",
            f"full fine-tuning    {self.base_params:,} trainable, file "
            f"{_bytes(self.full_bytes)}, Adam state {_bytes(self.full_adam_bytes)}",
        ]
        return "\n".join(lines)


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit} ({count:,} B)"
    return f"{count:,} B"


def count_model(
    model: nn.Module,
    targets: Targets,
    config: AdapterConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    **settings: object,
) -> ModelReport:
    """What an adapter on the modules `targets` names would add to `model`, exactly.

    `targets`, `config` and the keyword settings (`rank=`, `form=`, `alpha=`, …) are as for
    `lowrank.nn.inject`, which builds modules with exactly these counts (a shared module is
    counted once). Only sizes are read, so a model on the `meta` device is counted without
    allocating it. On a model that already holds adapters, their trainable factors count as
    `earlier_params`, apart from the base (frozen ones stay in it). Raises `TargetError`
    naming the module or pattern for a target that matches nothing or a layer the form does
    not fit. Ties are not looked for (sizes alone cannot show them): `inject` with
    `init="pissa"` also refuses a layer whose weight another module holds, which this counts.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DTypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    rows = []
    for target in plan(model, targets, AdapterConfig.build(config, **settings)):
        module, spec = target.module, target.config
        sizes = layer_sizes(module)
        rows.append(
            LayerRow(
                name=target.name,
                kind=type(module).__name__,
                shape=tuple(module.weight.shape),
                form=spec.form,
                rank=spec.rank,  # type: ignore[arg-type]
                base_params=sum(p.numel() for p in module.parameters()),
                adapter_params=sizes.adapter_params(spec),
            )
        )
    held = {id(t): t.numel() for adapter in adapters(model).values()
            for t in adapter.adapter_tensors().values() if t.requires_grad}  # fmt: skip
    earlier = sum(held.values())
    base = sum(p.numel() for p in model.parameters()) - earlier
    return ModelReport(type(model).__name__, tuple(rows), base, dtype, earlier)
