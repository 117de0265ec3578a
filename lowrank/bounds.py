"""Exact parameter counts, rank bounds, crossovers and FLOPs of the factor forms.

Pure integer arithmetic on layer sizes: a linear weight `(out, in)` (`kernel_size=()`)
or a convolution weight `(out, in, *kernel_size)`. The counts are those of
`lowrank.forms` (`LoRA.count`, `Tucker2.count`, `CP.count`); every answer here is an
exact integer (or `fractions.Fraction`), never a rounded float. Derivations are in
`docs/bounds.md`. Whole-model reports (`count_model`) live in `lowrank.report`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from ._checks import require_int, require_ints
from .conv import require_odd_kernel
from .errors import GeometryError, RankError, ShapeError
from .forms import (
    ADAPTER_FORMS,
    CP,
    FORMS,
    MAX_SPATIAL_DIMS,
    LoRA,
    Rank,
    Tucker2,
    kernel_volume,
    rank_pair,
    require_form,
    require_rank,
)

__all__ = [
    "ADAPTER_FORMS",
    "FORMS",
    "Crossover",
    "Rank",
    "crossover_rank",
    "forward_flops",
    "max_useful_rank",
    "param_count",
    "require_form",
    "require_groups",
    "require_layer",
    "require_rank",
    "unmerged_overhead",
]


def _require_size(name: str, value: object) -> int:
    return require_int(name, value, minimum=1, error=ShapeError)


def require_layer(
    in_features: object, out_features: object, kernel_size: object
) -> tuple[int, int, tuple[int, ...]]:
    """Validate a layer's sizes: positive ints and a kernel tuple of 0 to 3 positive ints
    (`ShapeError` naming the one at fault)."""
    in_features = _require_size("in_features", in_features)
    out_features = _require_size("out_features", out_features)
    kernel = require_ints(
        "kernel_size", kernel_size, minimum=1, max_length=MAX_SPATIAL_DIMS, error=ShapeError
    )
    return in_features, out_features, kernel


def require_groups(in_features: int, out_features: int, groups: object) -> int:
    """Validate a convolution's `groups`: a positive int dividing both channel counts."""
    groups = _require_size("groups", groups)
    for name, channels in (("in_features", in_features), ("out_features", out_features)):
        if channels % groups:
            raise ShapeError(f"{name}={channels} is not divisible by groups={groups}")
    return groups


def param_count(
    form: str,
    in_features: int,
    out_features: int,
    kernel_size: Sequence[int] = (),
    rank: Rank | None = None,
    *,
    groups: int = 1,
) -> int:
    """Parameters of `form` for a weight `(out, in/groups, *kernel_size)`.

    `"dense"` is the weight itself, `out·in·K / groups` (`rank` ignored). `"lora"` is LoRA on
    a linear weight or LoCon on a convolution, `"centre_tap"` 1×1 factors on a k×k kernel
    (odd kernel sizes), `"tucker2"` takes an int or `(r_out, r_in)`, `"cp"` the CP rank.
    A grouped convolution gets one adapter of that rank per group, so every count is
    `groups` times the count of one group's `(out/groups, in/groups, *k)` weight; it takes
    no centre tap, whose 1×1 branch mixes every input channel (`GeometryError`, as
    `check_centre_tap`). Rank 0 counts 0 parameters.
    """
    form = require_form(form)
    in_features, out_features, kernel = require_layer(in_features, out_features, kernel_size)
    groups = require_groups(in_features, out_features, groups)
    if groups > 1 and form == "centre_tap":
        raise GeometryError(
            f"a centre tap needs groups=1 (its 1×1 branch mixes every input channel), got "
            f"groups={groups}"
        )
    if groups > 1:
        per_group = (in_features // groups, out_features // groups, kernel, rank)
        return groups * param_count(form, *per_group)
    if form == "dense":
        return out_features * in_features * kernel_volume(kernel)
    if rank is None:
        raise RankError(f"form {form!r} needs a rank")
    r = require_rank(form, rank)
    if form == "tucker2":
        return Tucker2.count(in_features, out_features, kernel, rank_pair(r))
    if form == "cp":
        return CP.count(in_features, out_features, kernel, r)
    if form == "centre_tap":
        require_odd_kernel(kernel)
        kernel = ()
    return LoRA.count(in_features, out_features, kernel, r)


def _quadratic(count: Callable[[int], int]) -> tuple[int, int, int]:
    """`(a, b, c)` with `count(r) = a r² + b r + c` exactly, read from `count(0..2)`."""
    c0, c1, c2 = count(0), count(1), count(2)
    a = (c2 - 2 * c1 + c0) // 2
    return a, c1 - c0 - a, c0


def _largest_below(count: Callable[[int], int], limit: int) -> int:
    """The largest r ≥ 0 with `count(r) < limit`, where `count` is a quadratic with no
    constant term whose ranks ≥ 1 below `limit` form a prefix 1 … R (0 if empty): an
    integer-square-root guess, then verified against `count` itself."""
    a, b, c = _quadratic(count)
    slack = limit - 1 - c
    r = slack // b if a == 0 else (math.isqrt(b * b + 4 * a * slack) - b) // (2 * a)
    while count(r + 1) < limit:
        r += 1
    while r > 0 and count(r) >= limit:
        r -= 1
    return r


def max_useful_rank(
    form: str,
    in_features: int,
    out_features: int,
    kernel_size: Sequence[int] = (),
    *,
    groups: int = 1,
) -> int:
    """The largest rank at which `form` has strictly fewer parameters than the dense weight.

    0 where no rank does. For `"tucker2"` the rank is `r_out = r_in = r`. Exact: the
    root of the (at most quadratic) count by `math.isqrt`, checked with `param_count`.
    With `groups`, both counts scale by `groups`, so the bound is that of one group.
    """
    form = require_form(form, allow_dense=False)
    sizes = (in_features, out_features, kernel_size)
    dense = param_count("dense", *sizes, groups=groups)
    return _largest_below(lambda r: param_count(form, *sizes, r, groups=groups), dense)


@dataclass(frozen=True)
class Crossover:
    """Where one form stops (or starts) having fewer parameters than another.

    `rank`: the largest rank ≥ 1 at which `form_a` has strictly fewer parameters than
    `form_b`; 0 if at no rank; `None` if there is no largest (`form_a` stays smaller).
    When `rank` is finite, `form_a` is smaller exactly at ranks 1 … `rank` and `form_b`
    is no larger at every rank above it. `since`: when `rank` is `None`, the smallest
    rank from which `form_a` is smaller at every rank (1: at every rank at all).
    `above`: the form with fewer parameters at large ranks, `None` if the counts are
    equal at every rank.
    """

    form_a: str
    form_b: str
    rank: int | None
    above: str | None
    since: int | None = None

    def __str__(self) -> str:
        a, b = self.form_a, self.form_b
        if self.above is None:
            return f"{a} and {b} have equal counts at every rank"
        if self.rank is None:
            where = "at every rank" if self.since == 1 else f"from rank {self.since} on"
            return f"{a} has fewer parameters than {b} {where}"
        if self.rank == 0:
            return f"{a} never has fewer parameters than {b}"
        return (
            f"{a} has fewer parameters than {b} up to rank {self.rank}; "
            f"above it {b} has as few or fewer"
        )


def crossover_rank(
    form_a: str,
    form_b: str,
    in_features: int,
    out_features: int,
    kernel_size: Sequence[int] = (),
) -> Crossover:
    """The largest rank at which `form_a` has strictly fewer parameters than `form_b`.

    The difference of the counts is `a r² + b r + c` (Tucker2 with `r_out = r_in = r`;
    `c ≠ 0` only against `"dense"`, where `a = 0`), so for ranks ≥ 1 it changes sign at
    most once; see `Crossover` for the result and `docs/bounds.md` for the derivation.
    """
    form_a, form_b = require_form(form_a), require_form(form_b)
    sizes = (in_features, out_features, kernel_size)

    def diff(r: int) -> int:
        return param_count(form_a, *sizes, r) - param_count(form_b, *sizes, r)

    a, b, c = _quadratic(diff)
    if a == b == c == 0:
        return Crossover(form_a, form_b, 0, None)
    if a < 0 or (a == 0 and b < 0):
        # form_a wins for large ranks; it loses (diff ≥ 0) exactly on a prefix 1 … since-1.
        since = _largest_below(lambda r: c - diff(r), 1 + c) + 1
        return Crossover(form_a, form_b, None, form_a, since)
    if diff(1) >= 0:
        return Crossover(form_a, form_b, 0, form_b)
    return Crossover(form_a, form_b, _largest_below(lambda r: diff(r) - c, -c), form_b)


def forward_flops(
    form: str,
    in_features: int,
    out_features: int,
    kernel_size: Sequence[int] = (),
    rank: Rank | None = None,
    spatial: Sequence[int] = (),
    *,
    groups: int = 1,
) -> int:
    """FLOPs (2 per multiply-add) of one sample through `form` run as its factor layers.

    `spatial` is the output grid (`()` for one token; `(seq,)` for a sequence; `(h, w)`
    for a 2-D convolution). Each factor, run as a linear map or convolution on that
    grid, costs its number of parameters in multiply-adds per output position, so the
    count is `2 · ∏spatial · param_count(...)` (`groups` as there). That takes every factor
    at the output resolution: exact for LoRA and the centre tap, and for the other forms
    where the output grid is the input's (stride 1, "same" padding); see `docs/bounds.md`
    for the others.
    """
    positions = math.prod(require_ints("spatial", spatial, minimum=1, error=ShapeError))
    count = param_count(form, in_features, out_features, kernel_size, rank, groups=groups)
    return 2 * positions * count


def unmerged_overhead(
    form: str,
    in_features: int,
    out_features: int,
    kernel_size: Sequence[int] = (),
    rank: Rank | None = None,
    *,
    groups: int = 1,
) -> Fraction:
    """FLOPs of the unmerged layer (base + adapter branch) over those of the dense layer.

    Exactly `1 + param_count(form) / param_count("dense")`; the grid cancels. A merged
    adapter costs nothing extra (ratio 1).
    """
    dense = param_count("dense", in_features, out_features, kernel_size, groups=groups)
    extra = param_count(form, in_features, out_features, kernel_size, rank, groups=groups)
    return 1 + Fraction(extra, dense)

