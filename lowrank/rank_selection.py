"""Rank selection for the truncated SVD: fixed rank, energy fraction, singular-value ratio,
parameter budget.

Each rule maps singular values (or a parameter budget) to one integer rank. The
definitions are in `docs/decompose.md` ("Rank selection").
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from .errors import RankError
from .forms import LoRA


def as_int(name: str, value: object) -> int:
    """`value` as an int, raising `RankError` naming `name` for bools, floats and other types."""
    if isinstance(value, bool):
        raise RankError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise RankError(f"{name} must be an integer, got {value!r}") from None


def require_fraction(name: str, value: object) -> float:
    """`value` as a float in (0, 1], else `RankError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RankError(f"{name} must be a number in (0, 1], got {value!r}")
    fraction = float(value)
    if not 0.0 < fraction <= 1.0:
        raise RankError(f"{name} must lie in (0, 1], got {fraction}")
    return fraction


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


def require_rank(name: str, value: object) -> int:
    """`value` as an int ≥ 1, else `RankError` naming `name`."""
    rank = as_int(name, value)
    if rank < 1:
        raise RankError(f"{name} must be at least 1, got {rank}")
    return rank


def rank_rule(
    rank: object = None, energy: object = None, ratio: object = None
) -> tuple[str, float]:
    """The one of `rank` (an int ≥ 1), `energy` or `ratio` (in (0, 1]) that is given, checked:
    `("rank", r)`, `("energy", f)` or `("ratio", f)`; `RankError` otherwise."""
    criterion = pick_criterion(rank=rank, energy=energy, ratio=ratio)
    if criterion == "rank":
        return criterion, require_rank("rank", rank)
    return criterion, require_fraction(criterion, energy if criterion == "energy" else ratio)


def energy_rank(singular_values: torch.Tensor, energy: float, total: float) -> int | None:
    """Smallest r with `Σ_{i<r} σ_i² ≥ energy · total`, or None if the values never reach it.

    `singular_values (n,)` in descending order; `total` is ‖W‖²_F. Sums run in float64.
    """
    if total == 0.0:
        return 1
    captured = torch.cumsum(singular_values.double() ** 2, 0)
    reached = torch.nonzero(captured >= energy * total)
    return int(reached[0]) + 1 if len(reached) else None


def ratio_rank(singular_values: torch.Tensor, ratio: float) -> int:
    """Number of σ_i ≥ ratio · σ_1 (at least 1); `singular_values (n,)` in descending order."""
    values = singular_values.double()
    if float(values[0]) == 0.0:
        return 1
    return max(1, int((values >= ratio * values[0]).sum()))


def budget_rank(
    in_features: int, out_features: int, kernel_size: Sequence[int], max_params: int
) -> int:
    """Largest r with `LoRA.count(in, out, kernel_size, r) ≤ max_params` (unbounded above).

    `LoRA.count` is linear in r, so this is one integer division; raises `RankError` if
    even rank 1 does not fit.
    """
    budget = as_int("max_params", max_params)
    per_rank = LoRA.count(in_features, out_features, kernel_size, 1)
    rank = budget // per_rank if budget > 0 else 0
    if rank < 1:
        raise RankError(
            f"max_params={budget} is below the {per_rank} parameters of a rank-1 LoRA of a "
            f"({out_features}, {in_features}{''.join(f', {k}' for k in kernel_size)}) weight"
        )
    return rank
