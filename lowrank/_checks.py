"""Argument checks shared by the forms, decompositions, adapter modules and kernels.

Each check raises a typed error from `lowrank.errors` that names the tensor and
says what was expected.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import (
    ArgumentError,
    DeviceError,
    DTypeError,
    LowRankError,
    NonFiniteError,
    RankError,
    ShapeError,
)

if sys.version_info >= (3, 11):
    from re import _compiler as _regex_compiler
    from re import _constants as _regex_ops
    from re import _parser as _regex_parser
else:  # the same modules under their old names
    import sre_compile as _regex_compiler
    import sre_constants as _regex_ops
    import sre_parse as _regex_parser

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in FLOAT_DTYPES}
"""`{"float16": torch.float16, …}`: the float dtypes by the names options and files use."""
MAX_ELEMENTS = 2**63 - 1
"""The most entries a tensor can index (torch sizes are int64)."""


HALF_DTYPES = (torch.float16, torch.bfloat16)
"""The half-precision float dtypes, whose sums and scaled products run in float32."""


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype sums over factors or weights of `dtypes` run in: float64 where one is
    float64, float32 for every other float dtype (float8 included, which torch cannot
    promote)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def wider_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The float dtype of the next larger range: float32 for float16 and the float8 types,
    float64 for bfloat16 (whose range is float32's) and float32; None past float64."""
    if dtype == torch.float16 or dtype.itemsize == 1:
        return torch.float32
    return None if dtype == torch.float64 else torch.float64


def wider_dtype_advice(dtype: torch.dtype, what: str) -> str:
    """What to do when values overflow `dtype`: do `what` (e.g. "recompose it") in
    `wider_dtype(dtype)`, or, past float64, that no dtype holds them."""
    wider = wider_dtype(dtype)
    if wider is None:
        return "float64 is the widest dtype"
    return f"{what} in a wider dtype (form.to({wider}))"


def not_a_tensor(name: str, value: object) -> DTypeError:
    """The `DTypeError` for `value`, given as `name`, which is not a tensor (for checks that
    test `isinstance` themselves, where each call counts)."""
    return DTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def require_tensor(name: str, value: object) -> torch.Tensor:
    """Return `value` if it is a dense tensor (`require_dense`), else raise `DTypeError`
    naming it."""
    if not isinstance(value, torch.Tensor):
        raise not_a_tensor(name, value)
    require_dense(name, value)
    return value


def require_float(name: str, tensor: torch.Tensor) -> None:
    """Raise `DTypeError` unless `tensor` is fp16, bf16, fp32 or fp64."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise DTypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {tensor.dtype}"
        )


def require_float_dtype(name: str, value: object) -> torch.dtype:
    """`value` if it is one of the float dtypes factors are held in (`FLOAT_DTYPES`), else
    `DTypeError` naming `name`: a bool would be read as `torch.bool`, an int as a device."""
    if not isinstance(value, torch.dtype) or value not in FLOAT_DTYPES:
        raise DTypeError(
            f"{name} must be a floating-point torch.dtype (float16, bfloat16, float32 or "
            f"float64), got {type(value).__name__} {value!r}"
        )
    return value


def require_dense(name: str, tensor: torch.Tensor) -> None:
    """Raise `DTypeError` unless `tensor` is dense (strided layout, not nested): sparse and
    nested tensors hold their values elsewhere, and kernels read them as strided memory."""
    if tensor.layout != torch.strided or tensor.is_nested:
        kind = "a nested tensor" if tensor.is_nested else f"layout {tensor.layout}"
        raise DTypeError(f"{name} must be a dense tensor, got {kind}")


def vmap_batched(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is batched by `torch.vmap` (`torch.func.vmap`), also beneath other
    `torch.func` wrappers (`grad` inside `vmap`): such a tensor has no storage of its own,
    so its values cannot be read on the host (`.item()`, `.tolist()`, `float()`)."""
    # torch has no public test for this; `torch.func` itself unwraps its tensors this way,
    # one transform level at a time
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


def require_unbatched(what: str, tensors: dict[str, torch.Tensor], instead: str) -> None:
    """Raise `DTypeError` naming those of `tensors` that `torch.vmap` batches: `what` says
    which values the operation reads on the host (vmap cannot give them for each entry of a
    batch), `instead` what to call instead."""
    batched = [name for name, tensor in tensors.items() if vmap_batched(tensor)]
    if batched:
        verb = "is" if len(batched) == 1 else "are"
        raise DTypeError(
            f"{what}, which torch.vmap cannot give for each entry of a batch, and "
            f"{', '.join(batched)} {verb} batched by vmap: {instead}"
        )


def require_ndim(name: str, tensor: torch.Tensor, ndims: Sequence[int], layout: str) -> None:
    """Raise `ShapeError` unless `tensor.ndim` is one of `ndims`; `layout` names the axes."""
    if tensor.ndim not in ndims:
        allowed = " or ".join(str(n) for n in ndims)
        raise ShapeError(
            f"{name} must have {allowed} dimensions {layout}, got shape {tuple(tensor.shape)}"
        )


def require_shapes(
    what: str, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, Sequence[int]]
) -> None:
    """Raise `ShapeError` naming the first of `tensors` (`{name: tensor}`, `what`'s) whose
    shape is not `expected[name]`; names `expected` lacks are not checked."""
    for name, tensor in tensors.items():
        shape = expected.get(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ShapeError(
                f"{what} {name!r} has shape {tuple(tensor.shape)}, but {tuple(shape)} was expected"
            )


_FP8_CHUNK = 2**24
"""Float8 entries widened to float16 at a time by `all_finite` (32 MiB)."""


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds no NaN and no Inf.

    For a floating tensor this reads its min and max (`aminmax` propagates NaN, and an Inf
    is an extreme), one pass with no boolean copy: many times faster on CPU than
    `isfinite(tensor).all()`, which matters on multi-GB checkpoints. Float8 tensors, which
    `aminmax` does not take, are widened to float16 (which holds every float8 value, NaN and
    Inf included) a chunk at a time.
    """
    if not tensor.is_floating_point():
        return bool(torch.isfinite(tensor).all())
    if not tensor.numel():
        return True
    if tensor.element_size() == 1:
        flat = tensor.detach().reshape(-1)
        return all(all_finite(part.to(torch.float16)) for part in flat.split(_FP8_CHUNK))
    low, high = torch.aminmax(tensor.detach())
    return math.isfinite(float(low)) and math.isfinite(float(high))


def overflow_bound(dtype: torch.dtype) -> float:
    """The magnitude from which a cast to floating `dtype` no longer rounds to a finite value
    (round to nearest): the largest finite value plus half the spacing below it. A value this
    large becomes Inf, or in a saturating float8 dtype is clipped to the largest (there the
    bound itself, a tie, still rounds to the largest: refusing it is conservative by one
    value)."""
    info = torch.finfo(dtype)
    top = math.frexp(info.max)[1] - 1  # the largest value's binary exponent
    return info.max + math.ldexp(info.eps, top) / 2


def require_values(name: str, tensor: torch.Tensor) -> None:
    """`DeviceError` naming `name` if `tensor` is on the meta device (a shape, no values)."""
    if tensor.is_meta:
        raise DeviceError(
            f"{name} {tuple(tensor.shape)} is on the meta device, which holds shapes but no "
            "values; this needs real data (load it onto a CPU or GPU first)"
        )


def require_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise `NonFiniteError` if `tensor` holds NaN or Inf."""
    if not all_finite(tensor):
        wide = tensor.to(torch.float16) if tensor.element_size() == 1 else tensor  # float8
        bad = int((~torch.isfinite(wide)).sum())
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


def require_int(
    name: str,
    value: object,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    error: type[LowRankError] = ArgumentError,
) -> int:
    """`value` as an int if it is an `int` or a NumPy integer (not a `bool`, a float, a string
    or a tensor) in `[minimum, maximum]` (either end may be open); else `error` naming `name`.

    Counts, ranks, sizes and seeds go through here, so `3.0` and `"3"` are refused alike.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        if maximum is None:
            expected = f"at least {minimum}"
        elif minimum is None:
            expected = f"at most {maximum}"
        else:
            expected = f"an integer in [{minimum}, {maximum}]"
        raise error(f"{name} must be {expected}, got {number}")
    return number


def is_index(value: object) -> bool:
    """Whether `value` indexes as an integer: an `int`, a NumPy integer or an integer tensor
    of one element (what `operator.index` takes), and not a bool of any kind, which torch
    and NumPy would index as 0 or 1 (`torch.tensor(True)`, `np.True_`)."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return False
    try:
        return isinstance(operator.index(value), int)
    except TypeError:  # a float, a float tensor, a string
        return False


def require_ints(
    name: str,
    value: object,
    *,
    minimum: int | None = None,
    max_length: int | None = None,
    error: type[LowRankError] = ArgumentError,
) -> tuple[int, ...]:
    """`value` as a tuple of ints if it is a tuple or list (not a string, a number or a tensor)
    of at most `max_length` entries, each as `require_int` with `minimum` demands; else `error`
    naming `name` (and the entry at fault)."""
    if not isinstance(value, (tuple, list)):
        raise error(f"{name} must be a tuple of integers, got {type(value).__name__} {value!r}")
    if max_length is not None and len(value) > max_length:
        raise error(f"{name} must have at most {max_length} entries, got {tuple(value)}")
    return tuple(
        require_int(f"{name}[{i}]", entry, minimum=minimum, error=error)
        for i, entry in enumerate(value)
    )


def require_seed(name: str, value: object, bits: int = 64) -> int:
    """`value` as an int in [0, 2**bits) (`require_int`), else `ArgumentError` naming `name`."""
    seed = require_int(name, value)
    if not 0 <= seed < 2**bits:
        raise ArgumentError(f"{name} must be at least 0 and below 2**{bits}, got {seed}")
    return seed


def require_real_type(name: str, value: object) -> object:
    """`value` itself if it is a real number: an `int`, a `float` or a NumPy scalar of either
    kind (not a `bool`, a string, a tensor or a complex number); else `ArgumentError` naming
    it. Its value is not looked at (a float torch.compile traces symbolically passes)."""
    if type(value) is float or type(value) is int:  # the usual case, without the ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(
            f"{name} must be a number (an int, a float or a NumPy scalar; not a bool, a string "
            f"or a tensor), got {type(value).__name__} {value!r}"
        )
    return value


def require_number(name: str, value: object) -> float:
    """Return `value` as a float if it is a real number (`require_real_type`); an int beyond
    float64's range is a `NonFiniteError` naming it."""
    try:
        return float(require_real_type(name, value))
    except OverflowError:
        raise NonFiniteError(
            f"{name} is beyond float64's range: got an int of {int(value).bit_length()} bits"
        ) from None


def require_real(name: str, value: object) -> float:
    """`value` as a float if it is a finite real number (`require_number`); `NonFiniteError`
    for NaN or Inf, naming `name`."""
    number = require_number(name, value)
    if not math.isfinite(number):
        raise NonFiniteError(f"{name} must be finite, got {number}")
    return number


def require_applied_scale(scale: object, dtype: torch.dtype, p: float) -> float:
    """`scale` as a finite float (`require_real`) whose applied form `c = scale / (1 − p)`
    lies within the range of the dtype a LoRA branch of `dtype` operands is summed in
    (float32; float64 for float64), where a larger one would be Inf: `NonFiniteError`."""
    value = require_real("scale", scale)
    work = work_dtype(dtype)
    applied = value / (1.0 - p)
    if not abs(applied) <= torch.finfo(work).max:
        with_p = f" / (1 − dropout_p {p!r}) = {applied:.4g}" if p else ""
        raise NonFiniteError(
            f"scale {value:.4g}{with_p} is beyond the range of {work}, where it applies"
        )
    return value


def require_weights(name: str, values: object, count: int, what: str) -> list[float]:
    """`values` as `count` finite floats, one per `what` (1 each for None): a tuple or list of
    `require_real` numbers; `ArgumentError` naming `name` otherwise."""
    if values is None:
        return [1.0] * count
    if not isinstance(values, (tuple, list)):
        raise ArgumentError(
            f"{name} must be a list of numbers, one per {what[:-1]}, got "
            f"{type(values).__name__} {values!r}"
        )
    if len(values) != count:
        raise ArgumentError(f"{count} {what} but {len(values)} {name}")
    return [require_real(f"{name}[{i}]", value) for i, value in enumerate(values)]


def require_probability(name: str, value: object) -> float:
    """Return `value` as a float if it is a number (`require_number`) in [0, 1), else raise
    `ArgumentError`."""
    number = require_number(name, value)
    if not 0 <= number < 1:
        raise ArgumentError(f"{name} must be a number in [0, 1), got {value!r}")
    return number


def require_fraction(name: str, value: object) -> float:
    """`value` as a float if it is a number (`require_number`) in (0, 1], else `RankError`
    naming `name` (energy and ratio choose ranks)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RankError(f"{name} must be a number in (0, 1], got {type(value).__name__} {value!r}")
    try:
        fraction = float(value)
    except OverflowError:  # an int past float64's range: outside (0, 1] either way
        fraction = math.inf
    if not 0.0 < fraction <= 1.0:
        raise RankError(f"{name} must lie in (0, 1], got {value!r:.40}")
    return fraction


def require_nonnegative(name: str, value: object) -> float:
    """`value` as a float if it is a number (`require_number`) ≥ 0 (Inf included, NaN not),
    else `ArgumentError` naming `name`."""
    number = require_number(name, value)
    if not number >= 0:
        raise ArgumentError(f"{name} must be a number ≥ 0, got {number}")
    return number


def require_choice(
    name: str, value: object, choices: Sequence[str], error: type[LowRankError] = ArgumentError
) -> str:
    """`value` if it is one of the strings `choices`, else `error` naming `name` and listing
    them."""
    if not isinstance(value, str) or value not in choices:
        raise error(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _numpy_bool(value: object) -> bool:
    """Whether `value` is a NumPy bool scalar (`np.True_`, `np.False_`). NumPy is not a
    dependency: where it was never imported, no value is one of its scalars."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.bool_)


def require_flag(name: str, value: object, *, allow_int: bool = False) -> bool:
    """`value` as a bool if it is `True` or `False`, or a NumPy bool scalar (as NumPy
    scalars are numbers); with `allow_int`, an integer 0 or 1 (NumPy's included) too. A
    string "false" (truthy), a 0-d array or a tensor is no flag: `ArgumentError` naming
    `name`."""
    if isinstance(value, bool):
        return value
    if _numpy_bool(value):
        return bool(value)
    if allow_int and isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise ArgumentError(f"{name} must be true or false, got {type(value).__name__} {value!r}")


def require_name(name: str, value: object) -> str | None:
    """`value` if it is None or a non-empty string (a name, such as a pipeline component:
    an empty one would silently mean none), else `ArgumentError` naming `name`."""
    if value is None or (isinstance(value, str) and value):
        return value
    raise ArgumentError(
        f"{name} must be None or a non-empty string, got {type(value).__name__} {value!r:.80}"
    )


def require_path(name: str, value: object) -> Path:
    """`value` as a `Path` if it is a string or an `os.PathLike`, else `ArgumentError` naming
    `name`."""
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentError(f"{name} must be a path (a str or os.PathLike), got {value!r}")
    return Path(value)


def require_paths(name: str, value: object) -> list[Path]:
    """`value` as a list of `Path`s if it is an iterable (a list, a tuple, a generator such
    as `folder.glob(…)`) of strings or `os.PathLike`s, not one path itself nor a dict; else
    `ArgumentError` naming `name` (or `name[i]`, the entry at fault)."""
    if isinstance(value, (str, bytes, os.PathLike, Mapping)) or not isinstance(value, Iterable):
        raise ArgumentError(f"{name} must be a list of paths, got {type(value).__name__}")
    return [require_path(f"{name}[{i}]", path) for i, path in enumerate(value)]


def require_list(name: str, value: object, of: str) -> list:
    """`value` as a list if it is a tuple or list, else `ArgumentError` naming `name` and
    saying it holds `of`."""
    if not isinstance(value, (tuple, list)):
        raise ArgumentError(f"{name} must be a list of {of}, got {type(value).__name__}")
    return list(value)


def require_strings(name: str, value: object) -> tuple[str, ...]:
    """`value` as a tuple if it is a tuple or list of non-empty strings (a single string is
    not one: it would be read character by character), else `ArgumentError` naming `name`
    (and the entry at fault)."""
    if not isinstance(value, (tuple, list)):
        raise ArgumentError(
            f"{name} must be a tuple of strings, got {type(value).__name__} {value!r:.80}"
        )
    for i, entry in enumerate(value):
        if not isinstance(entry, str) or not entry:
            raise ArgumentError(f"{name}[{i}] must be a non-empty string, got {entry!r:.80}")
    return tuple(value)


def require_mapping(name: str, value: object, of: str, *, values: type = object) -> dict:
    """`value` as a dict if it is a mapping with string keys and values of type `values`,
    else `ArgumentError` naming `name` and saying it maps names to `of`."""
    if not isinstance(value, Mapping):
        raise ArgumentError(
            f"{name} must be a dict of {of}, got {type(value).__name__} {value!r:.80}"
        )
    for key, entry in value.items():
        if not isinstance(key, str) or not isinstance(entry, values):
            raise ArgumentError(f"{name} must be a dict of {of}, got {key!r:.80}: {entry!r:.80}")
    return dict(value)


def require_module(name: str, value: object) -> torch.nn.Module:
    """Return `value` if it is a `torch.nn.Module`, else `ArgumentError` naming `name`."""
    if not isinstance(value, torch.nn.Module):
        raise ArgumentError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


MAX_PATTERN_LENGTH = 1000
"""The longest regex `require_regex` takes (module-name patterns are a few dozen characters)."""
MAX_NAME_LENGTH = 512
"""The longest tensor key or module name `require_names` takes from a file (real ones are
under 300 characters: a PEFT key with its `base_model.model.` prefix, a kohya key). Matching
a regex costs time polynomial in a name's length, of the degree `MAX_WIDE_REPEATS` bounds:
at this length the slowest regexes `require_regex` takes match in about a second
(`.*?.*?.*?y`), in a few with the free optional parts and run (≈ 3–6 s on a busy core:
`a?a?.*?.*?.*?` then 15 a's and a `b`, `.*.*.+a?(?:a|b|ab)y`)."""
MAX_WIDE_REPEATS = 3
"""The most repeats of a count ranging over more than two values (`*`, `+`, `{2,}`,
`{0,5}`) `require_regex` takes one after another in a regex (`_wide_repeats`), PEFT's own
wrapping (`(.*\\.)?(key)$`) included. Each multiplies by up to a name's length the ways
`re` tries to match it: with `k` of them, matching takes time growing as the `k`-th power
of the name's length."""
OPTIONALS_PER_REPEAT = 6
"""Optional parts (`?`) that `_wide_repeats` counts as one wide repeat: each doubles the ways
`re` may try, where a wide repeat multiplies them by up to `MAX_NAME_LENGTH` (2⁹; 2⁶ keeps a
margin). `FREE_OPTIONALS` of them are free (PEFT wraps a pattern key in one, `(.*\\.)?`,
and users write keys in the same form); a chain of them is not (`"a?" * 28 + "a" * 28` took
12.5 s against 29 characters)."""
FREE_OPTIONALS = 2
"""Optional parts `require_regex` takes beyond `MAX_WIDE_REPEATS` (each at most doubles the
time)."""
FREE_RUN = 16
"""Characters a regex may match one by one after its repeats for nothing (a few times the
steps `re` takes for an arrival anyway: `self_attn\\.q_proj`); each doubling of a longer
run counts as an optional part (`_run_cost`: `.*.*.*` then 100 literal characters took
8.5 s on a name of 512)."""

_REPEATS = frozenset(
    getattr(_regex_ops, op)
    for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
    if hasattr(_regex_ops, op)  # possessive repeats are new in Python 3.11
)


def _ambiguous(items: object, repeated: bool) -> bool:
    """Whether the parsed regex `items` (a `re` parser subpattern: `(op, argument)` pairs)
    holds, inside a repeat of more than one pass (`repeated` for an enclosing one), a
    repeat of a variable count (`?`, `*`, `{1,2}`), an alternation (`|`, `(?(1)…|…)`) or a
    backreference. Such a regex can match a string in exponentially many ways, and `re`,
    a backtracking matcher, tries them all before it fails: `(a|aa)*c` on `n` a's takes
    time growing as 1.6ⁿ. An optional part (`(.*\\.)?`) multiplies the ways by at most the
    string's length."""
    for op, argument in items:  # type: ignore[attr-defined]
        if op in _REPEATS:
            low, high, body = argument
            if repeated and high != low:
                return True
            if _ambiguous(body, repeated or high > 1):
                return True
        elif op is _regex_ops.BRANCH:
            if repeated or any(_ambiguous(branch, repeated) for branch in argument[1]):
                return True
        elif op is _regex_ops.GROUPREF_EXISTS:  # (?(1)yes|no): an alternation too
            _, yes, no = argument
            if repeated or _ambiguous(yes, repeated) or (no and _ambiguous(no, repeated)):
                return True
        elif op is _regex_ops.GROUPREF:
            if repeated:
                return True
        elif op is _regex_ops.SUBPATTERN:  # (group, flags added, flags removed, body)
            if _ambiguous(argument[-1], repeated):
                return True
        elif op in (_regex_ops.ASSERT, _regex_ops.ASSERT_NOT):  # (direction, body)
            if _ambiguous(argument[1], repeated):
                return True
        elif getattr(_regex_ops, "ATOMIC_GROUP", None) is op and _ambiguous(argument, repeated):
            return True
    return False


def _ends_before(body: object, following: object) -> bool:
    """Whether a repeat of the one-character `body` (a `re` parser subpattern) can end only
    where its run of characters ends, as the item `following` it (the first item inside it,
    for a group) is a literal character that `body` cannot match (`\\d+\\.`, `[^.]*\\.`,
    `(\\d+)\\.`): then what follows is tried at one place only, not at each place the run
    could end."""
    op, argument = following  # type: ignore[misc]
    while op is _regex_ops.SUBPATTERN and argument[-1]:
        op, argument = argument[-1][0]
    if op is not _regex_ops.LITERAL or len(body) != 1:  # type: ignore[arg-type]
        return False
    one = _regex_parser.SubPattern(body.state, list(body))  # type: ignore[attr-defined]
    # ignoring case whatever the flags (`(?i:…)` sets them on a group, not on `body`): a
    # character of another case than the literal's would end the run too
    flags = body.state.flags | re.IGNORECASE  # type: ignore[attr-defined]
    return _regex_compiler.compile(one, flags).fullmatch(chr(argument)) is None


def _choices(branches: Sequence[object]) -> Fraction:
    """What an alternation of `branches` (`re` parser subpatterns) counts in `_wide_repeats`:
    `log₂ k` optional parts (rounded up), `k` the most alternatives that can match at one
    place, as `re` tries each in turn. Those starting with different ASCII literal
    characters (`q_proj|v_proj`, case ignored) cannot; an alternative starting otherwise
    (`.*`, `[qk]`, nothing) may match wherever another does."""
    firsts: list[str | None] = []
    for branch in branches:
        op, argument = branch[0] if branch else (None, None)  # type: ignore[index]
        while op is _regex_ops.SUBPATTERN and argument[-1]:
            op, argument = argument[-1][0]
        if op is _regex_ops.LITERAL and argument < 128:
            firsts.append(chr(argument).lower())
        elif op is _regex_ops.AT and argument is _regex_ops.AT_END:
            firsts.append("\n")  # `$` matches at the end or before a final newline only
        else:
            firsts.append(None)
    keyed = [first for first in firsts if first is not None]
    most = len(firsts) - len(keyed) + max((keyed.count(k) for k in keyed), default=0)
    return Fraction((most - 1).bit_length(), OPTIONALS_PER_REPEAT)


class _Reach(NamedTuple):
    """Where `_wide_repeats` stands in a regex: the repeats (`ways`) by which `re` reaches
    it from the regex's start, those of them that can match nothing (`empty`: optional
    parts and choices; a wide repeat matches nothing one way only), and the characters
    matched one by one since `ways` last grew (`run`), each tried at every arrival."""

    ways: Fraction = Fraction(0)
    empty: Fraction = Fraction(0)
    run: int = 0


_SINGLE = frozenset(
    (_regex_ops.LITERAL, _regex_ops.NOT_LITERAL, _regex_ops.ANY, _regex_ops.IN,
     _regex_ops.CATEGORY)
)  # fmt: skip


def _run_cost(run: int) -> Fraction:
    """What a run of `run` characters matched one by one counts in `_wide_repeats`: one
    optional part per doubling beyond `FREE_RUN` characters (`log₂(run / FREE_RUN)`,
    rounded up), up to a name's length (`MAX_NAME_LENGTH`: one repeat at most)."""
    doublings = ((min(run, MAX_NAME_LENGTH) - 1) // FREE_RUN).bit_length() if run else 0
    return Fraction(doublings, OPTIONALS_PER_REPEAT)


def _wide_repeats(
    items: object, at: _Reach, following: object = None, multiline: bool = False
) -> tuple[_Reach, Fraction]:
    """How many repeats of a count ranging over more than two values (`*`, `+`, `{2,}`,
    `{0,5}`) the parsed regex `items` (a `re` parser subpattern) holds one after another,
    nested ones included, as `(reach, most)`: where the walk stands at the end of `items`
    (`_Reach`, from `at` before them) and the most anywhere so far, which `require_regex`
    bounds. `following` is the item after `items`, `multiline` whether `^` matches after a
    newline.

    Each wide repeat multiplies by up to a name's length the ways `re` reaches what follows;
    an optional part (`?`, `{m,m+1}`) counts `1 / OPTIONALS_PER_REPEAT` (it doubles them).
    Of an alternation's alternatives, which `re` tries one at a time, the most any one
    holds, plus `_choices` (`.*a.*|.*b.*` holds 2 and an optional part). A run of
    characters matched one by one costs its length at each arrival (`_run_cost`:
    `.*.*.*` then 100 a's took 8.5 s on `a` × 512). A repeat of one character that the
    literal after it cannot be (`\\d+\\.`, `(\\d+)\\.`, `_ends_before`) ends in one place:
    it multiplies nothing, but scanning its run costs up to a name's length at each
    arrival, one repeat more there, as does a backreference. A lookahead or lookbehind is
    matched on its own wherever the regex reaches it, and `re` never backtracks into it:
    its repeats count after those before it but not before those after it, and one with a
    repeat counts as an optional part (the time at each place is its own plus the rest's):
    `(?=.*a).*b` holds 1 and an optional part. A `^` (not in multiline mode) or `\\A` is
    reached at the name's start only: what follows is reached only by the ways that match
    nothing before it (`empty`)."""
    most = at.ways
    items = list(items)  # type: ignore[call-overload]
    for i, (op, argument) in enumerate(items):
        after = items[i + 1] if i + 1 < len(items) else following
        inner = at.ways
        if op in _REPEATS:
            low, high, body = argument
            once = high - low > 1 and after is not None and _ends_before(body, after)
            wide = high - low > 1 and not once
            optional = Fraction(high - low == 1, OPTIONALS_PER_REPEAT)
            start = _Reach(at.ways + wide + optional, at.empty + optional, 0)
            end, inner = _wide_repeats(body, start, None, multiline)
            if once:  # scanned to its end at each arrival, then what follows reached once
                end, inner = at, max(inner, at.ways + 1)
            elif end.ways == at.ways:  # a fixed count of a fixed part: `high` runs of it
                end = at._replace(run=at.run + high * end.run)
            else:  # the body's characters were tried at each arrival inside the repeat
                end = end._replace(run=0)
            at = end
            inner = max(inner, at.ways + _run_cost(at.run))
        elif op is _regex_ops.BRANCH:
            walks = [_wide_repeats(b, at, after, multiline) for b in argument[1]]
            choices = _choices(argument[1])
            ways = max(end.ways for end, _ in walks) + choices
            empty = max(end.empty for end, _ in walks) + choices
            run = 0 if choices else max(end.run for end, _ in walks)
            at, inner = _Reach(ways, empty, run), max(most for _, most in walks)
        elif op is _regex_ops.GROUPREF_EXISTS:  # (?(1)yes|no): the group decides which
            _, yes, no = argument
            walks = [_wide_repeats(b, at, after, multiline) for b in (yes, no or [])]
            at = _Reach(*(max(end[k] for end, _ in walks) for k in range(3)))
            inner = max(most for _, most in walks)
        elif op is _regex_ops.SUBPATTERN:  # (group, flags added, flags removed, body)
            _, added, removed, body = argument
            inside = (multiline or bool(added & re.MULTILINE)) and not removed & re.MULTILINE
            at, inner = _wide_repeats(body, at, after, inside)
        elif op in (_regex_ops.ASSERT, _regex_ops.ASSERT_NOT):  # (direction, body)
            end, inner = _wide_repeats(argument[1], at._replace(run=0), None, multiline)
            grown = inner > at.ways + _run_cost(end.run)
            at = at._replace(ways=at.ways + Fraction(grown, OPTIONALS_PER_REPEAT),
                             run=0 if grown else at.run + end.run)  # fmt: skip
        elif getattr(_regex_ops, "ATOMIC_GROUP", None) is op:
            at, inner = _wide_repeats(argument, at, after, multiline)
        elif op is _regex_ops.AT and (
            argument is _regex_ops.AT_BEGINNING_STRING
            or (argument is _regex_ops.AT_BEGINNING and not multiline)
        ):
            at = _Reach(at.empty, at.empty, 0)
        elif op in _SINGLE:
            at = at._replace(run=at.run + 1)
            inner = at.ways + _run_cost(at.run)
        elif op is _regex_ops.GROUPREF:  # compares up to a name's length of characters
            inner = at.ways + 1
        most = max(most, inner)
    return at, max(most, at.ways + _run_cost(at.run))


def _repeats_text(count: Fraction) -> str:
    """`count` (`_wide_repeats`) in words: "4 repeats and 1 optional part"."""
    whole = int(count)
    optional = int((count - whole) * OPTIONALS_PER_REPEAT)
    parts = f" and {optional} optional part{'s' * (optional > 1)}" if optional else ""
    return f"{whole} repeats{parts}"


def require_regex(
    what: str, pattern: str, error: type[LowRankError] = ArgumentError, regex: str | None = None
) -> None:
    """`error` naming `what` (the field or option) and `pattern` unless `pattern` is at most
    `MAX_PATTERN_LENGTH` characters and `regex` (the regex built from it that is matched;
    default `pattern` itself) is a regex whose matching takes no time exponential in the
    name's length (`_ambiguous`: no optional or repeated part, alternation or backreference
    inside a part repeated more than once; `(.*\\.)?x`, `.*\\.(q|v)_proj` and
    `layers\\.\\d+\\.` pass, `(a|aa)*c`, `(a+)+` and `(\\.\\d+)*` do not), with at most
    `MAX_WIDE_REPEATS` repeats of a count ranging over more than two values and
    `FREE_OPTIONALS` optional parts or choices (`_wide_repeats`: `(.*\\.)?(.*q_proj)$` and
    `^(?=.*layers)(?!.*vision).*proj.*` pass, `(.*\\.)?(.*a.*b.*)$` does not; on a name of
    `MAX_NAME_LENGTH` characters the slowest that pass match in seconds). Called
    before any matching: `re` has no time limit, so such a pattern on a long name would hang
    the caller."""
    shown = f"{pattern[:80]!r}{'…' if len(pattern) > 80 else ''}"
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise error(
            f"{what} {shown} is longer than {MAX_PATTERN_LENGTH} ({len(pattern)} characters)"
        )
    regex = pattern if regex is None else regex
    try:
        re.compile(regex)
        parsed = _regex_parser.parse(regex)
        ambiguous = _ambiguous(parsed, False)
        multiline = bool(parsed.state.flags & re.MULTILINE)
        wide = _wide_repeats(parsed, _Reach(), multiline=multiline)[1]
    except (re.error, OverflowError, RecursionError) as err:  # a{10**11}; nested too deep
        raise error(f"{what} {shown} is not a valid regular expression: {err}") from None
    if ambiguous:
        raise error(
            f"{what} {shown} can take time exponential in a name's length to match: it "
            "repeats ('*', '+', '{m,n}') a part that itself holds an optional or repeated "
            "part, an alternative ('|') or a backreference; write it without nesting them"
        )
    if wide > MAX_WIDE_REPEATS + Fraction(FREE_OPTIONALS, OPTIONALS_PER_REPEAT):
        added = "" if regex == pattern else f" (as {regex!r}, the regex matched)"
        raise error(
            f"{what} {shown} holds {_repeats_text(wide)} ('*', '+', '{{m,}}', '{{m,n}}'; "
            f"{OPTIONALS_PER_REPEAT} optional parts, each a '?', a choice of alternatives '|' "
            f"or a doubling of a run of characters beyond {FREE_RUN}, count as one){added}, "
            "more than "
            f"{MAX_WIDE_REPEATS}: matching it can take time growing as a name's length to "
            "that power; write it with fewer"
        )


def require_names(source: object, names: Iterable[str], error: type[LowRankError]) -> None:
    """`error` naming `source` (a file) and the start of the first of `names` (tensor keys,
    module names read from it) longer than `MAX_NAME_LENGTH` characters. Called where a
    file's names are read, before any regex matches them."""
    for name in names:
        if len(name) > MAX_NAME_LENGTH:
            raise error(
                f"{source}: key {name[:80]!r}… is {len(name)} characters long, more than "
                f"{MAX_NAME_LENGTH} (real tensor keys are a few hundred at most)"
            )
