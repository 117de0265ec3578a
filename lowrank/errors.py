"""Typed errors raised by lowrank.

Every error names the tensor (or module, or file) at fault and what was expected, so the
message says what to fix. Each class also derives from the matching builtin
(`ValueError`, `TypeError`, ...) so callers can catch either.
"""

from __future__ import annotations


class LowRankError(Exception):
    """Base class of every error lowrank raises on purpose."""


class ShapeError(LowRankError, ValueError):
    """A tensor has the wrong number of dimensions or the wrong size along one."""


class RankError(LowRankError, ValueError):
    """A rank is below 1, above what the shape allows, or inconsistent between factors."""


class NonFiniteError(LowRankError, ValueError):
    """A tensor holds NaN or Inf where finite values are required."""


class DTypeError(LowRankError, TypeError):
    """A tensor has a dtype the operation does not support, dtypes disagree, or an operand
    is not of the kind it takes (not a tensor where a tensor is needed, a form that the
    operation does not handle); numbers and flags of the wrong type are `ArgumentError`s
    (`RankError` for ranks)."""


class DeviceError(LowRankError, ValueError):
    """Tensors that must live on one device do not."""


class GeometryError(LowRankError, ValueError):
    """A convolution's stride/padding/dilation/groups make an identity not hold."""


class TargetError(LowRankError, ValueError):
    """A module-name target matches nothing, or a matched module does not fit the form."""


class ArgumentError(LowRankError, ValueError):
    """A scalar argument (a probability, seed, backend or method name) is out of its range."""


class FileFormatError(LowRankError, ValueError):
    """A file is missing, unreadable, corrupt, a pickle, or in a layout lowrank does not know."""


class OutputPathError(LowRankError, ValueError):
    """An output path names one of the inputs, or cannot be written."""


class ConversionError(LowRankError, ValueError):
    """An adapter cannot be stored in the requested format exactly, and no rank was given to
    approximate it."""


class MergeError(LowRankError, ValueError):
    """Merging an adapter would change what it must not: a weight tied to another module, or
    one computed by a parametrization or a `weight_norm` hook."""


class StateDictError(LowRankError, ValueError):
    """A state dict's keys do not fit the model's adapters (missing, unexpected or ambiguous)."""
