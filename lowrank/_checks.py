"""Argument checks shared by the forms, decompositions, adapter modules and kernels.

Each check raises a typed error from `lowrank.errors` that names the tensor and
says what was expected.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from . import _regex
from .errors import (
    ArgumentError,
    DeviceError,
    DTypeError,
    LowRankError,
    NonFiniteError,
    RankError,
    ShapeError,
)

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


@functools.cache
def overflow_bound(dtype: torch.dtype) -> float:
    """The magnitude from which a cast to floating `dtype` no longer rounds to a finite value
    (round to nearest): the largest finite value plus half the spacing below it (65,520 for
    float16; 464 for `float8_e4m3fn`, 248 for `float8_e4m3fnuz`, 61,440 for `float8_e5m2`
    and `float8_e5m2fnuz`). A value this large becomes Inf, NaN (an FNUZ float8) or, in a
    saturating float8 dtype, the largest (the bound itself, a tie, still rounds to the
    largest there: refusing it is conservative by one value). A float8 dtype's is read from
    its 128 non-negative codes (`torch.finfo(float8_e5m2fnuz).eps` is half its step)."""
    if dtype.itemsize == 1:
        codes = torch.arange(128, dtype=torch.uint8).view(dtype).to(torch.float64)
        top, below = codes[torch.isfinite(codes)].topk(2).values.tolist()
        return top + (top - below) / 2
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
    """Raise `NonFiniteError` if `tensor` holds NaN or Inf (`DeviceError` for a meta
    tensor, which holds no values to check: `require_values`)."""
    require_values(name, tensor)
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


MAX_PATTERN_LENGTH = 2**13
"""The longest regex `require_regex` takes: 8 KiB, room for a regex listing the module
names of many layers (patterns people write are a few dozen characters)."""
MAX_NAME_LENGTH = 512
"""The longest tensor key or module name `require_names` takes from a file (real ones are
under 300 characters: a PEFT key with its `base_model.model.` prefix, a kohya key).
Matching a regex takes time linear in a name's length times the regex's automaton
(`lowrank._regex`): with this bound and `lowrank._regex.MAX_STATES`, a regex built to be
slowest takes ≈ 1–2 s on one name (`benchmarks/results/pattern_matching-cpu.json`; real
ones microseconds); a name of megabytes would take it hours, and `re` itself, on
`.*\\.(q_proj|v_proj)`, seconds."""


def require_regex(
    what: str,
    pattern: str,
    error: type[LowRankError] = ArgumentError,
    regex: str | None = None,
    *,
    layer_index: bool = False,
) -> None:
    """`error` naming `what` (the field or option) and `pattern` unless `pattern` is at most
    `MAX_PATTERN_LENGTH` characters and `regex` (the regex built from it that is matched;
    default `pattern` itself) is one `lowrank._regex` matches: one Python's `re` compiles,
    holding no backreference, conditional, atomic group or possessive repeat, whose
    automaton has at most `lowrank._regex.MAX_STATES` states; with `layer_index`, PEFT's
    regex reading a layer index after it (`lowrank._regex.layer_regex`). Called before any
    name is matched."""
    shown = f"{pattern[:80]!r}{'…' if len(pattern) > 80 else ''}"
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise error(
            f"{what} {shown} is longer than {MAX_PATTERN_LENGTH} ({len(pattern)} characters)"
        )
    regex = pattern if regex is None else regex
    try:
        if layer_index:
            _regex.layer_regex(regex)
        else:
            _regex.compiled(regex)
    except _regex.RegexError as err:
        added = (
            "" if regex == pattern else f" (positions count in {regex[:200]!r}, the regex matched)"
        )
        raise error(f"{what} {shown} {err}{added}") from None


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
