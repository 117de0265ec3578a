"""Argument checks shared by the forms, decompositions, adapter modules and kernels.

Each check raises a typed error from `lowrank.errors` that names the tensor and
says what was expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .errors import ArgumentError, DeviceError, DTypeError, NonFiniteError, ShapeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require_tensor(name: str, value: object) -> torch.Tensor:
    """Return `value` if it is a tensor, else raise `DTypeError` naming it."""
    if not isinstance(value, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_float(name: str, tensor: torch.Tensor) -> None:
    """Raise `DTypeError` unless `tensor` is fp16, bf16, fp32 or fp64."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise DTypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {tensor.dtype}"
        )


def require_ndim(name: str, tensor: torch.Tensor, ndims: Sequence[int], layout: str) -> None:
    """Raise `ShapeError` unless `tensor.ndim` is one of `ndims`; `layout` names the axes."""
    if tensor.ndim not in ndims:
        allowed = " or ".join(str(n) for n in ndims)
        raise ShapeError(
            f"{name} must have {allowed} dimensions {layout}, got shape {tuple(tensor.shape)}"
        )


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds no NaN and no Inf.

    For a floating tensor this reads its min and max (`aminmax` propagates NaN, and an Inf
    is an extreme), one pass with no boolean copy: many times faster on CPU than
    `isfinite(tensor).all()`, which matters on multi-GB checkpoints.
    """
    if tensor.is_floating_point() and tensor.numel():
        low, high = torch.aminmax(tensor.detach())
        return math.isfinite(float(low)) and math.isfinite(float(high))
    return bool(torch.isfinite(tensor).all())


def require_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise `NonFiniteError` if `tensor` holds NaN or Inf."""
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"{name} holds {bad} NaN/Inf value(s); all entries must be finite")


def require_same_dtype_device(tensors: dict[str, torch.Tensor]) -> None:
    """Raise unless every tensor in `tensors` shares the first one's dtype and device."""
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.dtype != first.dtype:
            raise DTypeError(
                f"{name} has dtype {tensor.dtype} but {first_name} has {first.dtype}; "
                "all factors must share one dtype"
            )
        if tensor.device != first.device:
            raise DeviceError(
                f"{name} is on {tensor.device} but {first_name} is on {first.device}; "
                "all factors must share one device"
            )


def require_number(name: str, value: object) -> float:
    """Return `value` as a float if it is a real number: an `int`, a `float` or a NumPy scalar
    of either kind (not a `bool`, a string, a tensor or a complex number); else raise
    `ArgumentError` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(
            f"{name} must be a real number (int, float or a NumPy scalar), got "
            f"{type(value).__name__} {value!r}"
        )
    return float(value)


def require_real(name: str, value: object) -> float:
    """`value` as a float if it is a finite real number (`require_number`); `NonFiniteError`
    for NaN or Inf, naming `name`."""
    number = require_number(name, value)
    if not math.isfinite(number):
        raise NonFiniteError(f"{name} must be finite, got {number}")
    return number


def require_finite_scale(scale: object, name: str = "scale") -> float:
    """Return `scale` as a float: a finite real number (`require_real`)."""
    return require_real(name, scale)


def require_probability(name: str, value: object) -> float:
    """Return `value` as a float if it is a number in [0, 1), else raise `ArgumentError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ArgumentError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def require_flag(name: str, value: object) -> bool:
    """Return `value` if it is `True` or `False` (a string "false" would be truthy)."""
    if not isinstance(value, bool):
        raise ArgumentError(f"{name} must be true or false, got {value!r}")
    return value
