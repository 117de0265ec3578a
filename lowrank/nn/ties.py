"""Tied weights: which modules' parameters lie over the memory of a base layer's weight,
inside a model (by name) or among the live modules outside it, so that nothing writes ΔW
into a weight another module reads."""

from __future__ import annotations

import gc
import math
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class _Place:
    """Where a weight's bytes lie: its storage (`group`; the tensor's id where it has no
    plain storage of its own), the range `[first, end)` its elements span, and, for an exact
    check, its element size, storage offset, shape and strides."""

    group: object
    first: int = 0
    end: int = 1
    layout: tuple | None = None

    @property
    def dense(self) -> bool:
        """Whether the tensor's elements fill its range (contiguous, transposed, a block)."""
        if self.layout is None:
            return True
        size, _, shape, _ = self.layout
        return math.prod(shape) * size == self.end - self.first


def _memory(tensor: torch.Tensor) -> _Place:
    """Where `tensor` lies (`_Place`); a tensor without plain storage of its own (lazy, meta,
    sparse, a DTensor, whose data_ptr is 0) is only itself, and an empty one spans nothing."""
    alone = _Place(id(tensor))
    if nn.parameter.is_lazy(tensor) or tensor.is_meta or tensor.layout != torch.strided:
        return alone
    if type(tensor.detach()) is not torch.Tensor:
        return alone
    try:
        place = tensor.untyped_storage().data_ptr()
    except RuntimeError:
        return alone
    size, offset = tensor.element_size(), tensor.storage_offset()
    if tensor.numel() == 0:
        return _Place((tensor.device, place), 0, 0)
    steps = zip(tensor.shape, tensor.stride(), strict=True)
    span = 1 + sum((n - 1) * abs(step) for n, step in steps)
    layout = (size, offset, tuple(tensor.shape), tuple(tensor.stride()))
    return _Place((tensor.device, place), offset * size, (offset + span) * size, layout)


def _overlaps(a: _Place, b: _Place) -> bool:
    """Whether `a` and `b` share a byte: their ranges meet and, unless both fill their
    ranges, an element of one is an element of the other (strided views such as the even
    and odd rows of one matrix share a range but no byte)."""
    if a.group != b.group or not (a.first < b.end and b.first < a.end):
        return False
    if a.dense and b.dense:
        return True
    if a.layout is None or b.layout is None or a.layout[0] != b.layout[0]:
        return True  # not comparable element by element: taken as shared
    size = a.layout[0]
    low, high = max(a.first, b.first) // size, -(-min(a.end, b.end) // size)
    seen = torch.zeros(high - low, dtype=torch.bool)
    first, second = (_elements(place) for place in (a, b))
    first = first[(first >= low) & (first < high)]
    second = second[(second >= low) & (second < high)]
    seen[first - low] = True
    return bool(seen[second - low].any())


def _elements(place: _Place) -> torch.Tensor:
    """The storage indices (in elements) of the tensor at `place`, flattened."""
    _, offset, shape, stride = place.layout
    index = torch.full((), offset, dtype=torch.int64)
    for n, step in zip(shape, stride, strict=True):
        index = index[..., None] + torch.arange(n, dtype=torch.int64) * step
    return index.reshape(-1)


def tied_names(
    model: nn.Module, bases: list[nn.Module], holders: list[nn.Module] | None = None
) -> list[tuple[str, ...]]:
    """For each module of `bases`, the other modules' parameters of `model` over its weight's
    memory (tied weights, transposed or sliced ones too). The same module under a second name
    is no tie unless `holders` gives the module that wraps each base (its adapter): then the
    base under any other parent (a second adapter, or the layer left registered raw) is a
    second module running that weight, named by its path."""
    owners: dict[object, list[tuple[_Place, int, int | None, str]]] = {}
    by_name: dict[str, nn.Module] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        by_name[module_name] = module
        parent = by_name[module_name.rpartition(".")[0]] if module_name else None
        for param_name, param in module._parameters.items():
            if param is not None:
                full = f"{module_name}.{param_name}" if module_name else param_name
                place = _memory(param)
                owners.setdefault(place.group, []).append((place, id(module), id(parent), full))
    ties = []
    for index, base in enumerate(bases):
        holder = id(holders[index]) if holders is not None else None
        weight = base._parameters.get("weight")
        place = _memory(weight) if weight is not None else None
        found = owners.get(place.group, []) if place is not None else []
        ties.append(tuple(dict.fromkeys(
            name for other, owner, parent, name in found
            if (owner != id(base) or holder not in (None, parent)) and _overlaps(place, other)
        )))  # fmt: skip
    return ties


def _references(parameters: dict, name: str) -> tuple[int, int]:
    """How many references the parameter `parameters[name]` has, and how many tensors use
    its storage (-1 where that cannot be told); one call, one way, so that counts compare."""
    param = parameters[name]
    try:
        users = torch._C._storage_Use_Count(param.untyped_storage()._cdata)
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        users = -1
    return sys.getrefcount(parameters[name]), users


def _held_elsewhere(module: nn.Module) -> bool:
    """Whether anything but `module` holds its weight parameter (another module, an
    optimiser, a variable) or another tensor uses its storage (a parameter over the same
    memory, as `load_state_dict(assign=True)` of tied weights gives): more of either than
    for a parameter only a dict holds."""
    if module._parameters.get("weight") is None:
        return False
    alone = {"weight": nn.Parameter(torch.empty(1))}
    (refs, users), (refs_alone, users_alone) = (
        _references(module._parameters, "weight"), _references(alone, "weight")
    )
    return refs > refs_alone or users > users_alone


def _child_held_elsewhere(holder: nn.Module) -> bool:
    """Whether anything but `holder` holds its child `base` (another parent, a variable):
    more references than a module only a dict holds."""
    alone = {"base": nn.Module()}
    return sys.getrefcount(holder._modules["base"]) > sys.getrefcount(alone["base"])


def _outside_ties(
    model: nn.Module,
    bases: list[nn.Module],
    where: str,
    always: bool,
    children: dict[int, tuple[int, int]] | None = None,
) -> list[tuple[str, ...]]:
    """For each module of `bases`, the parameters of live modules outside `model` that are
    its weight (a tie `tied_names` cannot see from a part of a model: an LM head tied to the
    embedding of the body it was given), named by their module's type; and, for the bases in
    `children` (`{id(base): (index, id(holder))}`, wrapped ones something else holds), the
    modules outside that hold the base itself as a child other than its holder (a second
    adapter over it, or a parent running it raw). Only weights that something else holds
    are looked for, in one pass over the objects the garbage collector tracks (every weight
    with `always`: a second tensor made over the same memory from outside torch,
    `from_numpy` twice, changes no count); a tie found is confirmed after a collection, so
    that no unreachable module counts."""
    children = children or {}
    wanted: dict[object, list[tuple[_Place, int]]] = {}
    for index, base in enumerate(bases):
        if always or _held_elsewhere(base):
            place = _memory(base.weight)
            wanted.setdefault(place.group, []).append((place, index))
    if not wanted and not children:
        return [() for _ in bases]
    inside = {id(module) for module in model.modules()}

    def scan() -> list[tuple[str, ...]]:
        found: list[list[str]] = [[] for _ in bases]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fake tensors warn on data_ptr
            for obj in gc.get_objects():
                if not issubclass(type(obj), nn.Module) or id(obj) in inside:
                    continue
                outside = f"of a {type(obj).__name__} outside {where}"
                parameters = obj.__dict__.get("_parameters")  # None: a module half built
                for name, param in (parameters or {}).items():
                    place = _memory(param) if param is not None else _Place(None, 0, 0)
                    for mine, index in wanted.get(place.group, ()):
                        if _overlaps(mine, place):
                            found[index].append(f"{name} {outside}")
                for name, child in (obj.__dict__.get("_modules") or {}).items():
                    index, holder = children.get(id(child), (None, None))
                    if index is not None and holder != id(obj):
                        found[index].append(f"{name}.weight {outside}")
        return [tuple(dict.fromkeys(names)) for names in found]

    if not any(scan()):
        return [() for _ in bases]
    gc.collect()
    return scan()


def found_ties(
    model: nn.Module, bases: list[nn.Module], where: str = "the model", always: bool = False
) -> list[tuple[str, ...]]:
    """For each module of `bases` (layers not yet wrapped), the modules whose parameter is
    its weight: those in `model` (by name) and live ones outside it (`_outside_ties`, naming
    `model` as `where`, searched for every weight with `always`)."""
    inside = tied_names(model, bases)
    outside = _outside_ties(model, bases, where, always)
    return [(*mine, *theirs) for mine, theirs in zip(inside, outside, strict=True)]


def wrapped_ties(
    model: nn.Module, holders: list[nn.Module], where: str = "the model", always: bool = False
) -> list[tuple[str, ...]]:
    """`found_ties` of the `base` child of each module of `holders` (adapters): also every
    other module, in `model` or live outside it, that runs that base (a second adapter over
    it, or the layer still registered raw), since a merge changes what they compute too."""
    held = [_child_held_elsewhere(holder) for holder in holders]  # before anything here does
    bases = [holder._modules["base"] for holder in holders]
    children = {
        id(base): (index, id(holder))
        for index, (base, holder, other) in enumerate(zip(bases, holders, held, strict=True))
        if other
    }
    inside = tied_names(model, bases, holders)
    outside = _outside_ties(model, bases, where, always, children)
    return [(*mine, *theirs) for mine, theirs in zip(inside, outside, strict=True)]


def current_ties(
    model: nn.Module, adapters: list[nn.Module], where: str = "the model"
) -> list[tuple[str, ...]]:
    """For each adapter of `adapters` (in `model`), what else holds its base weight now
    (`wrapped_ties`, in one search for all of them): a tie `inject` recorded
    (`shares_weight_with`) is dropped only once a search of every live module finds none,
    and its names are kept while any tie remains; `()` where none does."""
    recorded = [adapter.shares_weight_with for adapter in adapters]
    fresh = wrapped_ties(model, adapters, where, always=any(recorded))
    return [
        tuple(dict.fromkeys((*mine, *found))) if found else ()
        for mine, found in zip(recorded, fresh, strict=True)
    ]
