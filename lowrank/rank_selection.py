"""Rank selection for the truncated SVD: fixed rank, energy fraction, singular-value ratio,
parameter budget.

Each rule maps singular values (or a parameter budget) to one integer rank. The
definitions are in `docs/decompose.md` ("Rank selection").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._checks import (
    require_finite,
    require_float,
    require_fraction,
    require_int,
    require_ndim,
    require_nonnegative,
    require_tensor,
    require_values,
)
from .bounds import require_layer
from .errors import ArgumentError, RankError, ShapeError
from .forms import LoRA


def pick_criterion(**given: object) -> str:
    """The name of the one keyword in `given` (the rules a caller accepts: `rank`, `energy`,
    `ratio`, `max_params`) that is not None; `RankError` naming those rules otherwise."""
    chosen = [name for name, value in given.items() if value is not None]
    if len(chosen) != 1:
        *first, last = given
        rules = f"{', '.join(first)} or {last}" if first else last
        found = ", ".join(chosen) if chosen else "none"
        raise RankError(f"give exactly one of {rules} to choose the rank; got {found}")
    return chosen[0]


def rank_rule(
    rank: object = None, energy: object = None, ratio: object = None
) -> tuple[str, float]:
    """The one of `rank` (an int ≥ 1), `energy` or `ratio` (in (0, 1]) that is given, checked:
    `("rank", r)`, `("energy", f)` or `("ratio", f)`; `RankError` otherwise."""
    criterion = pick_criterion(rank=rank, energy=energy, ratio=ratio)
    if criterion == "rank":
        return criterion, require_int("rank", rank, minimum=1, error=RankError)
    return criterion, require_fraction(criterion, energy if criterion == "energy" else ratio)


def _require_values(singular_values: object) -> torch.Tensor:
    """`singular_values` if it is a floating `(n,)` tensor with n ≥ 1 of finite values ≥ 0 in
    descending order, else a typed error."""
    values = require_tensor("singular_values", singular_values)
    require_float("singular_values", values)
    require_ndim("singular_values", values, (1,), "(n,)")
    require_values("singular_values", values)
    if not len(values):
        raise ShapeError("singular_values must hold at least one value, got shape (0,)")
    require_finite("singular_values", values)
    if bool((values < 0).any()) or bool((values[1:] > values[:-1]).any()):
        raise ArgumentError(
            "singular_values must be ≥ 0 and in descending order (as an SVD gives them), got "
            f"{values[:4].tolist()}{' …' if len(values) > 4 else ''}"
        )
    return values


def energy_rank(singular_values: torch.Tensor, energy: float, total: float) -> int | None:
    """Smallest r with `Σ_{i<r} σ_i² ≥ energy · total`, or None if the values never reach it.

    `singular_values (n,)` in descending order; `energy` in (0, 1]; `total` is ‖W‖²_F, a
    finite number ≥ 0. Sums run in float64; a sum within `_TIE_ULPS` units of the values' dtype
    below the threshold reaches it (singular values carry that much rounding).
    """
    singular_values = _require_values(singular_values)
    energy = require_fraction("energy", energy)
    total = require_nonnegative("total", total)
    if not math.isfinite(total):
        raise ArgumentError(
            f"total must be a finite ‖W‖²_F, got {total}; for values whose squares leave "
            "float64's range, pass the values and the total divided by σ₁ and σ₁²"
        )
    if total == 0.0:
        return 1
    captured = torch.cumsum(singular_values.double() ** 2, 0)
    reached = torch.nonzero(captured >= energy * total * (1 - _tie(singular_values)))
    return int(reached[0]) + 1 if len(reached) else None


def ratio_rank(singular_values: torch.Tensor, ratio: float) -> int:
    """Number of σ_i ≥ ratio · σ_1 (at least 1); `singular_values (n,)` in descending order,
    `ratio` in (0, 1]. A value within `_TIE_ULPS` units of the values' dtype below the
    threshold reaches it."""
    singular_values = _require_values(singular_values)
    ratio = require_fraction("ratio", ratio)
    values = singular_values.double()
    if float(values[0]) == 0.0:
        return 1
    threshold = ratio * values[0] * (1 - _tie(singular_values))
    return max(1, int((values >= threshold).sum()))


_TIE_ULPS = 8
"""How many units in the last place of the singular values' dtype a sum or a value may fall
short of a rule's threshold and still reach it: an SVD in float32 returns 7/10 of σ₁ as
0.69999999 σ₁, which a ratio of 0.7 must keep, as float64 does."""


def _tie(values: torch.Tensor) -> float:
    """The relative slack `_TIE_ULPS · eps` of `values`' dtype."""
    return _TIE_ULPS * torch.finfo(values.dtype).eps


def budget_rank(
    in_features: int, out_features: int, kernel_size: Sequence[int], max_params: int
) -> int:
    """Largest r with `LoRA.count(in, out, kernel_size, r) ≤ max_params` (unbounded above).

    `LoRA.count` is linear in r, so this is one integer division; raises `RankError` if
    even rank 1 does not fit (`ShapeError` for sizes that are not positive ints).
    """
    in_features, out_features, kernel_size = require_layer(in_features, out_features, kernel_size)
    budget = require_int("max_params", max_params, error=RankError)
    per_rank = LoRA.count(in_features, out_features, kernel_size, 1)
    rank = budget // per_rank if budget > 0 else 0
    if rank < 1:
        raise RankError(
            f"max_params={budget} is below the {per_rank} parameters of a rank-1 LoRA of a "
            f"({out_features}, {in_features}{''.join(f', {k}' for k in kernel_size)}) weight"
        )
    return rank
