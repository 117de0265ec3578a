"""Factor forms from a dense weight: truncated SVD → `LoRA`, HOSVD + HOOI → `Tucker2`,
ALS → `CP`, with rank selection by rank, energy fraction, singular-value ratio or
parameter budget; and, in factor space without the dense ΔW, `resize` (a lower rank of a
form) and `combine` (one LoRA for a weighted sum of forms).

Weights are `(out, in)` or `(out, in, *k)` with 1-, 2- or 3-D kernels, in any float dtype
on any device. Work happens in float32 (float64 for float64 input) on a detached copy scaled
to max |W| = 1; factors come back in the input's dtype and device, with no autograd history
and the norm split evenly between them, so bf16 factors neither underflow nor overflow. The
math, the error guard of the randomised SVD and the measurements against TensorLy are in
`docs/decompose.md`; the factor-space algebra of `resize` and `combine` in
`docs/factor_tools.md`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _factor_space as space
from ._als import cp_als
from ._checks import (
    HALF_DTYPES,
    all_finite,
    require_choice,
    require_finite,
    require_flag,
    require_float,
    require_fraction,
    require_int,
    require_list,
    require_ndim,
    require_nonnegative,
    require_seed,
    require_tensor,
    require_values,
    require_weights,
    wider_dtype_advice,
    work_dtype,
)
from ._hooi import HOOI_SWEEPS, HOOI_TOL, hooi
from ._svd import (
    AUTO_MAX_SKETCH_FRACTION,
    converged,
    exact_svd,
    prefer_randomized,
    randomized_svd,
)
from .errors import ArgumentError, DeviceError, NonFiniteError, RankError, ShapeError
from .forms import (
    CP,
    LoRA,
    Tucker2,
    as_lora,
    device_of,
    dtype_of,
    rank_pair,
    require_factor_space,
    require_rank,
    rounded_factors,
)
from .rank_selection import budget_rank, energy_rank, pick_criterion, rank_rule, ratio_rank

__all__ = [
    "budget_rank",
    "combine",
    "cp",
    "energy_rank",
    "ratio_rank",
    "resize",
    "svd",
    "tucker2",
]

METHODS = ("auto", "adaptive", "exact", "randomized")
FIRST_SKETCH = 64
_LAYOUT = "(out, in) or (out, in, *k) with a 1-, 2- or 3-D kernel"


def _prepare(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Validate `weight`; return a detached compute-dtype copy scaled to max |W| = 1, and max |W|.

    A zero weight comes back unscaled, with scale 1. A weight on the meta device (a shape with
    no values) is a `DeviceError`.
    """
    require_tensor("weight", weight)
    require_float("weight", weight)
    require_ndim("weight", weight, (2, 3, 4, 5), _LAYOUT)
    require_values("weight", weight)
    if weight.numel() == 0:
        raise ShapeError(f"weight must have no empty axis, got shape {tuple(weight.shape)}")
    require_finite("weight", weight)
    work = weight.detach().to(work_dtype(weight.dtype))
    peak = float(work.abs().max())
    if peak == 0.0:
        return work.clone(), 1.0
    return work / peak, peak


def _require_rank(name: str, value: object, low: int, high: int, why: str) -> int:
    """`value` as an int in [low, high], else `RankError` naming `name` and saying `why`."""
    rank = require_int(name, value, error=RankError)
    if not low <= rank <= high:
        raise RankError(f"{name} must lie in [{low}, {high}] ({why}), got {rank}")
    return rank


def _energy_total(matrix: torch.Tensor) -> float:
    """‖matrix‖²_F, summed in float64 (no square root taken and squared back)."""
    flat = matrix.reshape(-1).double()
    return float(torch.dot(flat, flat))


def _sketch_rank(
    matrix: torch.Tensor,
    criterion: str,
    value: float,
    *,
    oversample: int,
    n_iter: int,
    seed: int | None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], int] | None:
    """Energy/ratio rank from growing randomised sketches, or None when exact SVD must decide.

    A sketch of l columns decides when the rank r it picks is at most l − oversample and its
    top r directions have converged (`_svd.converged`), or when it spans the whole matrix;
    the sketch doubles from 64 while l ≤ min(m, n)/4.
    """
    full = min(matrix.shape)
    sketch = min(full, FIRST_SKETCH)
    total = _energy_total(matrix)
    while True:
        triplets = randomized_svd(matrix, sketch, n_iter, seed)
        values = triplets[1]
        if criterion == "energy":
            rank = energy_rank(values, value, total)
        else:
            rank = ratio_rank(values, value)
            rank = rank if rank < len(values) else None
        if sketch == full:
            return triplets, rank or full
        fits = rank is not None and rank <= sketch - oversample
        if fits and converged(values, rank, n_iter, total):
            return triplets, rank
        sketch *= 2
        if sketch > AUTO_MAX_SKETCH_FRACTION * full:
            return None


def svd(
    weight: torch.Tensor,
    rank: int | None = None,
    *,
    energy: float | None = None,
    ratio: float | None = None,
    max_params: int | None = None,
    method: str = "auto",
    oversample: int = 10,
    n_iter: int = 4,
    seed: int | None = None,
) -> LoRA:
    """Truncated SVD of `weight (out, in, *k)` flattened to `(out, in·K)`, as a `LoRA`.

    Give exactly one of `rank`, `energy` (smallest rank keeping that fraction of ‖W‖²_F),
    `ratio` (keep σ_i ≥ ratio·σ₁) or `max_params` (largest rank with `LoRA.count` ≤ it).
    `method`: "exact" (LAPACK), "randomized" (Gaussian sketch of rank + `oversample`
    columns, `n_iter` power iterations, drawn from `seed`), "auto" (randomised iff
    min(out, in·K) ≥ 256 and the sketch is ≤ a quarter of it, and kept only if the sketch's
    spectral gap shows it converged, `_svd.converged`; else exact) or "adaptive" (as
    "auto", but a sketch that has not converged is doubled while it stays ≤ a quarter of
    min(out, in·K) before the exact SVD is used). Energy and ratio fall back to the exact
    SVD when no sketch that small decides the rank ("auto" and "adaptive" alike).

    Returns `down (r, in, *k)`, `up (out, r, 1, …)` (`(r, in)`, `(out, r)` for a linear
    weight) with `up = U √S`, `down = √S Vh`, in the weight's dtype and device.
    """
    criterion = pick_criterion(rank=rank, energy=energy, ratio=ratio, max_params=max_params)
    require_choice("method", method, METHODS)
    oversample = require_int("oversample", oversample, minimum=0)
    n_iter = require_int("n_iter", n_iter, minimum=0)
    if seed is not None:
        seed = require_seed("seed", seed)
    matrix, peak = _prepare(weight)
    out_features, in_features = weight.shape[:2]
    matrix = matrix.reshape(out_features, -1)
    rows, cols = matrix.shape
    full = min(rows, cols)
    shape_text = f"weight {tuple(weight.shape)} flattened to ({rows}, {cols})"
    if criterion == "rank":
        target = _require_rank("rank", rank, 1, full, f"min(out, in·K) of {shape_text}")
    elif criterion == "max_params":
        target = min(full, budget_rank(in_features, out_features, weight.shape[2:], max_params))
    elif criterion == "energy" and require_fraction("energy", energy) == 1.0:
        # everything (no float sum of σ² decides where "all" is reached); a zero weight: 1
        target = full if bool(matrix.any()) else 1
    else:
        fraction = require_fraction(criterion, energy if criterion == "energy" else ratio)
        found = None
        if method != "exact" and (method == "randomized" or prefer_randomized(rows, cols, 1)):
            found = _sketch_rank(
                matrix, criterion, fraction, oversample=oversample, n_iter=n_iter, seed=seed
            )
        if found is None:
            triplets = exact_svd(matrix)
            if criterion == "energy":
                target = energy_rank(triplets[1], fraction, _energy_total(matrix)) or full
            else:
                target = ratio_rank(triplets[1], fraction)
        else:
            triplets, target = found
        return _lora(triplets, target, peak, weight)
    sketch = min(full, target + oversample)
    if method == "randomized" and sketch < full:
        return _lora(randomized_svd(matrix, sketch, n_iter, seed), target, peak, weight)
    grow = method in ("auto", "adaptive")
    total = _energy_total(matrix) if grow else 0.0
    while grow and sketch < full and prefer_randomized(rows, cols, sketch):
        triplets = randomized_svd(matrix, sketch, n_iter, seed)
        if converged(triplets[1], target, n_iter, total):
            return _lora(triplets, target, peak, weight)
        if method == "auto":
            break
        sketch *= 2
    return _lora(exact_svd(matrix), target, peak, weight)


def _lora(
    triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rank: int,
    peak: float,
    weight: torch.Tensor,
) -> LoRA:
    """`LoRA` from the first `rank` SVD triplets of W / peak, with √(peak·S) on each side."""
    u, values, vh = triplets
    root = values[:rank].clamp_min(0).sqrt() * math.sqrt(peak)
    out_features = weight.shape[0]
    tail = (1,) * (weight.ndim - 2)
    up = (u[:, :rank] * root).reshape(out_features, rank, *tail)
    down = (root[:, None] * vh[:rank]).reshape(rank, *weight.shape[1:])
    return LoRA(down.to(weight), up.to(weight))


def _rank_pair(rank: object) -> tuple[int, int]:
    """Tucker2 inner ranks `(r_out, r_in)` from an int (both) or a pair of ints, else
    `RankError` naming the entry."""
    return rank_pair(require_rank("tucker2", rank))


def _tucker_ranks(rank: object, shape: Sequence[int]) -> tuple[int, int]:
    """`(r_out, r_in)` from an int or a pair, checked against `shape (out, in, *k)`."""
    out_features, in_features = shape[:2]
    taps = math.prod(shape[2:])
    r_out, r_in = _rank_pair(rank)
    where = f"for weight {tuple(shape)}"
    r_out = _require_rank("r_out", r_out, 1, out_features, f"at most out = {out_features} {where}")
    r_in = _require_rank("r_in", r_in, 1, in_features, f"at most in = {in_features} {where}")
    if r_out > r_in * taps or r_in > r_out * taps:
        raise RankError(
            f"ranks (r_out, r_in) = ({r_out}, {r_in}) {where} need r_out ≤ r_in·K and "
            f"r_in ≤ r_out·K with K = {taps}: a larger one only adds zero directions"
        )
    return r_out, r_in


def tucker2(
    weight: torch.Tensor,
    rank: int | tuple[int, int],
    *,
    n_iter: int = HOOI_SWEEPS,
    tol: float = HOOI_TOL,
) -> Tucker2:
    """Tucker-2 of `weight (out, in, *k)` on its channel modes: HOSVD, then ≤ `n_iter` HOOI sweeps.

    `rank` is an int (both ranks) or `(r_out, r_in)` with 1 ≤ r_out ≤ out, 1 ≤ r_in ≤ in,
    r_out ≤ r_in·K and r_in ≤ r_out·K. Stops when a sweep lowers the relative error by less
    than `tol`; `n_iter=0` gives the HOSVD. Returns `down (r_in, in, 1…)`,
    `mid (r_out, r_in, *k)`, `up (out, r_out, 1…)` with equal Frobenius norms.
    """
    work, peak = _prepare(weight)
    r_out, r_in = _tucker_ranks(rank, weight.shape)
    n_iter, tol = require_int("n_iter", n_iter, minimum=0), require_nonnegative("tol", tol)
    out_features, in_features, *kernel = weight.shape
    u_out, core, u_in = hooi(work.reshape(out_features, in_features, -1), r_out, r_in, n_iter, tol)
    # Scale up by a, down by b, mid by peak/(ab) so all three have norm
    # (peak ‖core‖ √(r_out r_in))^⅓, with peak's cube root taken apart: peak ‖core‖ can
    # overflow a float where each factor's scale cannot. The three shares of peak multiply
    # back to it to a few ulps at any magnitude (`root`); a·b·mid_scale cancels unit_root.
    unit = float(torch.linalg.vector_norm(core, dtype=torch.float64)) * math.sqrt(r_out * r_in)
    unit_root = unit ** (1 / 3) if unit > 0 else 1.0
    peak_root = space.root(peak, 3)
    a = unit_root / math.sqrt(r_out) * peak_root
    b = unit_root / math.sqrt(r_in) * peak_root
    mid_scale = peak_root * math.sqrt(r_out * r_in) / unit_root**2
    tail = (1,) * len(kernel)
    up = (u_out * a).reshape(out_features, r_out, *tail)
    down = (u_in.T * b).reshape(r_in, in_features, *tail)
    mid = (core * mid_scale).reshape(r_out, r_in, *kernel)
    return Tucker2(down.to(weight), mid.to(weight), up.to(weight))


def cp(
    weight: torch.Tensor,
    rank: int,
    *,
    n_iter: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
    weights: bool = False,
) -> CP:
    """Rank-R CP of `weight (out, in, *k)` by ALS (≤ `n_iter` sweeps, stop at error change < `tol`).

    1 ≤ R ≤ min over modes of the product of the other modes' sizes (a rank at which every
    tensor of the shape is exact). Deterministic for a given `seed` (an int in [0, 2**64)).
    With `weights=False` the column norms λ_r are spread as λ_r^(1/N) over the N factors;
    with True the factors have unit columns and `weights (R,)` holds λ, in the weight's
    dtype, or float32 for a float16/bfloat16 weight (λ reaches `√numel · max |W|`, which
    float16 may not hold). Returns `out_factor (out, R)`, `in_factor (in, R)` and one
    `(k_j, R)` per spatial axis.
    """
    work, peak = _prepare(weight)
    shape = tuple(weight.shape)
    limit = min(work.numel() // size for size in shape)
    rank = _require_rank("rank", rank, 1, limit, f"the largest CP rank a {shape} tensor can need")
    n_iter, tol = require_int("n_iter", n_iter, minimum=1), require_nonnegative("tol", tol)
    seed = require_seed("seed", seed)
    weights = require_flag("weights", weights)
    lam, factors = cp_als(work, rank, n_iter, tol, seed)
    if weights:
        return CP(*_cp_parts(factors, weight), weights=_cp_weights(lam, peak, weight))
    # λ·peak can overflow where each factor's share (λ·peak)^(1/N) does not: root apart,
    # peak's N shares multiplying back to it to a few ulps at any magnitude (`root`).
    spread = lam.double().pow(1 / len(factors)) * space.root(peak, len(factors))
    return CP(*_cp_parts([f * spread.to(f) for f in factors], weight))


def _cp_weights(lam: torch.Tensor, peak: float, weight: torch.Tensor) -> torch.Tensor:
    """The norms `λ (R,)` of the unit-normalised tensor's CP times `peak`, on the weight's
    device in its dtype, or in float32 for a float16/bfloat16 weight (whose λ can exceed
    float16's range: `‖W‖` reaches `√numel · max |W|`); `NonFiniteError` if they overflow
    even that."""
    dtype = torch.float32 if weight.dtype in HALF_DTYPES else weight.dtype
    weights = (lam.double() * peak).to(weight.device, dtype)
    if not all_finite(weights):
        raise NonFiniteError(
            f"the CP weights λ of weight {tuple(weight.shape)} (max |W| = {peak:.4g}) overflow "
            f"{dtype}; use weights=False, which spreads λ over the factors"
        )
    return weights


def _cp_parts(
    factors: Sequence[torch.Tensor], weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """`(out_factor, in_factor, spatial_factors)` in the weight's dtype and device."""
    out_factor, in_factor, *spatial = (f.to(weight) for f in factors)
    return out_factor, in_factor, tuple(spatial)


Resizable = LoRA | Tucker2 | CP
_RESIZE_FORMS = ("lora",)


def _require_resizable(name: str, form: object) -> Resizable:
    """`form` if it is a LoRA, Tucker2 or CP form (`require_factor_space`; forms of an empty
    ΔW do not exist) with real, finite data, else `DTypeError`, `DeviceError` (factors on the
    meta device) or `NonFiniteError` naming `name` and the factor."""
    form = require_factor_space(name, form)
    for factor, tensor in form.named_factors().items():
        require_values(f"{name}.{factor}", tensor)
        require_finite(f"{name}.{factor}", tensor)
    return form


def _resize_lora(lora: LoRA, criterion: str, value: float) -> LoRA:
    """The optimal lower-rank LoRA of `lora` by QR + small SVD, in `lora`'s dtype."""
    if criterion == "rank" and value >= lora.rank:
        return lora
    core = space.lora_core(lora, work_dtype(dtype_of(lora)))
    keep = space.kept_rank(core.values, criterion, value)
    if keep >= lora.rank:
        return lora
    return space.truncated_lora(core, keep, lora)


def _resize_tucker(
    tucker: Tucker2, criterion: str, value: float | tuple[int, int], square: bool
) -> Tucker2:
    """Inner ranks of `tucker` lowered by HOOI of its QR core (`space.tucker_ranks` chooses
    them), with equal ranks (`space.squared`) when `square`."""
    parts = space.tucker_core(tucker, work_dtype(dtype_of(tucker)))
    core = parts.core
    target = space.tucker_ranks(core, criterion, value, square=square)
    if target == tuple(core.shape[:2]):
        return space.squared(tucker) if square else tucker
    small = tucker2(core, target)
    r_out, r_in = target
    out_features, in_features, *kernel = tucker.shape
    tail = (1,) * len(kernel)
    share = space.shared_peak(*parts.peaks)  # the peaks back, a third on each factor
    up = parts.q_up @ small.up.reshape(-1, r_out) * share
    down = small.down.reshape(r_in, -1) @ parts.q_down.T * share
    like = tucker.mid
    resized = Tucker2(
        down.reshape(r_in, in_features, *tail).to(like),
        (small.mid * share).reshape(r_out, r_in, *kernel).to(like),
        up.reshape(out_features, r_out, *tail).to(like),
        tucker.scale,
    )
    for name, factor in resized.named_factors().items():
        if not all_finite(factor):
            raise NonFiniteError(
                f"the resized Tucker2's {name} leaves the range of {like.dtype}; "
                + wider_dtype_advice(like.dtype, "resize the form")
            )
    return space.squared(resized) if square else resized


def resize(
    form: Resizable,
    rank: int | tuple[int, int] | None = None,
    *,
    energy: float | None = None,
    ratio: float | None = None,
    to: str | None = None,
    square: bool = False,
    return_error: bool = False,
) -> Resizable | tuple[Resizable, float]:
    """`form` at a lower rank, computed from its factors alone (never the dense ΔW).

    Give one of `rank`, `energy` (keep that share of ‖ΔW‖²) or `ratio` (keep σ_i ≥ ratio·σ₁).
    A `LoRA` (`down (r, in, *k)`, `up (out, r, 1…)`; a `CP` is first its exact LoRA,
    `as_lora`) becomes the Eckart–Young optimal LoRA of ΔW at the chosen rank
    r' ≤ min(r, out, in·K) (no LoRA needs more than ΔW's own rank, so a larger `rank` gives
    that, ΔW unchanged), by QR
    of `up (out, r)` and `downᵀ (in·K, r)` and the SVD of the r × r core:
    `up' = Q_u U_r' √Σ_r' (out, r', 1…)`, `down' = √Σ_r' V_r'ᵀ Q_dᵀ (r', in, *k)`, same
    scale, O((out + in·K) r²) work. A `Tucker2` keeps its form: HOOI of the core the QR of `up` and
    `downᵀ` leave gives it inner ranks `(r_out, r_in)`: an int `rank` sets both, a pair each;
    `energy` takes the smallest ranks (grown from each channel mode's own energy rank) whose
    result keeps that share of ‖ΔW‖²; `ratio` applies to each channel mode's singular
    values. `square=True` gives a Tucker2 equal inner ranks r_out = r_in = r, as kohya and
    LyCORIS files store one (`mid (r, r, *k)`): both aim at the larger rank, and a side with
    fewer directions is padded with zeros, ΔW unchanged. `to="lora"` folds a Tucker2 into a
    LoCon (`fold`) and resizes that instead. Ranks at or above the current ones leave the form
    as it is, except a Tucker2 inner rank above what its core can hold (`r_in > r_out · K`,
    say), which comes back trimmed to that, ΔW unchanged. Each factor is divided by its
    largest entry before the QR, so no magnitude of factors and scale overflows or underflows
    the core. With `return_error`, returns
    `(form, ‖ΔW − ΔW'‖ / ‖ΔW‖)`, measured in float64 from the factors of both forms (the
    core of the two side by side: orthonormal Q factors keep its norm), truncation and
    rounding to the form's dtype included. Derivation: `docs/factor_tools.md`.
    """
    form = _require_resizable("form", form)
    return_error = require_flag("return_error", return_error)
    square = require_flag("square", square)
    if to is not None:
        require_choice("to", to, _RESIZE_FORMS)
    if isinstance(form, Tucker2) and to is None:
        if energy is None and ratio is None and isinstance(rank, (tuple, list)):
            pair = _rank_pair(rank)
            value = tuple(
                require_int(n, r, minimum=1, error=RankError)
                for n, r in zip(("r_out", "r_in"), pair, strict=True)
            )
            criterion = "rank"
        else:
            criterion, value = rank_rule(rank, energy, ratio)
        resized = _resize_tucker(form, criterion, value, square)
        if not return_error:
            return resized
        return resized, space.tucker_gap(form, resized)
    criterion, value = rank_rule(rank, energy, ratio)
    dtype = dtype_of(form)
    lora = form if isinstance(form, LoRA) else as_lora(form.to(work_dtype(dtype)))
    resized = _resize_lora(lora, criterion, value)  # rounded to the dtype of `lora`
    if resized.down.dtype != dtype:  # a Tucker2 or CP folded in the work dtype
        resized = LoRA(*rounded_factors(resized.down, resized.up, dtype, "resize"), form.scale)
    if not return_error:
        return resized
    return resized, space.relative_gap(as_lora(form.to(torch.float64)), resized)


def combine(
    forms: Sequence[Resizable],
    weights: Sequence[float] | None = None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    ratio: float | None = None,
    return_error: bool = False,
) -> LoRA | tuple[LoRA, float]:
    """One `LoRA` whose ΔW is `Σ weights[i] · ΔW(forms[i])`, exactly in exact arithmetic.

    Each form (`LoRA`; `Tucker2` through `fold`; `CP` through `as_lora`) enters as its
    factors: `up` blocks side by side (`(out, Σ r_i, 1…)`), `down` blocks stacked
    (`(Σ r_i, in, *k)`) — the sum of the products, whatever the ranks, scales and signs of
    the weights (default 1 each). The result's scale is the largest `|weight · scale|`; each
    block carries its ratio to it, split exactly between `up` and `down` where it is a power
    of two (equal coefficients keep their factors bit for bit), as `√` on each side
    otherwise. Adding the factors themselves would give `(Σ up_i)(Σ down_i)`, which is not
    the sum (`docs/factor_tools.md`). Every form must stand for one ΔW shape (`ShapeError`
    naming both) on one device; the result has the factors' common dtype. `rank` / `energy`
    / `ratio` truncate the sum optimally in factor space (`resize`); `return_error` adds the
    result's relative error against the exact sum (truncation and rounding to the factors'
    dtype), computed in float64 from the factors.
    """
    forms = require_list("forms", forms, "LoRA, Tucker2 or CP forms")
    return_error = require_flag("return_error", return_error)
    if not forms:
        raise ArgumentError("combine needs at least one form")
    for i, form in enumerate(forms):
        _require_resizable(f"forms[{i}]", form)
        if form.shape != forms[0].shape:
            raise ShapeError(
                f"forms[0] stands for ΔW of shape {tuple(forms[0].shape)} but forms[{i}] for "
                f"{tuple(form.shape)}; combined forms must share one shape"
            )
        device = device_of(form)
        if device != device_of(forms[0]):
            raise DeviceError(f"forms[{i}] is on {device} but forms[0] on {device_of(forms[0])}")
    weights = require_weights("weights", weights, len(forms), "forms")
    dtype = dtype_of(forms[0])
    for form in forms[1:]:
        dtype = torch.promote_types(dtype, dtype_of(form))
    work = work_dtype(dtype)
    loras = [as_lora(f.to(work)) for f in forms]
    coefficients = [w * f.scale for w, f in zip(weights, loras, strict=True)]
    if not all(math.isfinite(c) for c in coefficients):
        raise NonFiniteError(
            f"weights {weights} times the forms' scales {[f.scale for f in loras]} overflow "
            "float64"
        )
    combined = _finite_sum(space.concatenate(loras, coefficients), weights)
    if rank is not None or energy is not None or ratio is not None:
        combined = _resize_lora(combined, *rank_rule(rank, energy, ratio))
    down, up = rounded_factors(combined.down, combined.up, dtype, "combine")
    combined = LoRA(down, up, combined.scale)
    if not return_error:
        return combined
    exact = space.concatenate([as_lora(f.to(torch.float64)) for f in forms], coefficients)
    return combined, space.relative_gap(exact, combined)


def _finite_sum(combined: LoRA, weights: Sequence[float]) -> LoRA:
    """`combined` if its factors are finite, else `NonFiniteError`: the weights times the
    forms' scales are too large for the factors' dtype."""
    if not all(all_finite(t) for t in combined.named_factors().values()):
        raise NonFiniteError(
            f"the combined factors overflow {combined.down.dtype}: weights {weights} times the "
            "forms' scales are too large for it (combine the forms in float64: form.to(...))"
        )
    return combined


