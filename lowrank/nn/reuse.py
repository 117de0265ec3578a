"""A value computed from tensors, kept for reuse while none of them has changed.

A DoRA adapter's per-channel factor `m / ‖W + s·B A‖` needs the dense `W + s·B A` each time
it is computed; in inference (no gradient to form) the same factor serves every call until
a parameter changes. `Reuse` holds one such value with a fingerprint of what it was
computed from, and gives it back only while that fingerprint still holds:

- each tensor is the same object, on the same storage (a weak reference to each: a
  `param.data = …` assignment, which leaves the version counter as it was, changes the
  storage), with the same version counter (every in-place write bumps it: an optimizer
  step, `load_state_dict`, `copy_`, a merge or unmerge), dtype, device, shape, strides,
  offset and `requires_grad`;
- the settings the value depends on (a scale, autocast, matmul precision, whether it was
  computed in inference mode) compare equal.

Tensors that keep no version counter (inference tensors) are never fingerprinted, and
`Reuse` holds no strong reference to them, so a replaced weight is freed as usual. A write that
bypasses the version counter goes unseen: through `tensor.data` (`weight.data.copy_(…)`;
torch gives `.data` a counter of its own), a NumPy or DLPack view, or a kernel launched on
the tensor's pointer; `clear` after such a write. So a value is kept only while `enabled`
(`lowrank.nn.reuse_dora_factors`), which the user asks for.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch


def _fingerprint(tensor: torch.Tensor) -> tuple:
    """What identifies `tensor`'s values without reading them: the object and its storage
    (weakly referenced), its version counter and layout."""
    return (
        weakref.ref(tensor),
        weakref.ref(tensor.untyped_storage()),
        tensor._version,
        tensor.dtype,
        tensor.device,
        tensor.shape,
        tensor.stride(),
        tensor.storage_offset(),
        tensor.requires_grad,
    )


def _holds(mark: tuple, tensor: torch.Tensor) -> bool:
    """Whether `tensor` is the one `mark` (a `_fingerprint`) was taken of, unchanged since."""
    ref, storage, version, dtype, device, shape, stride, offset, grad = mark
    return (
        ref() is tensor
        and tensor._version == version
        and storage() is tensor.untyped_storage()
        and tensor.dtype == dtype
        and tensor.device == device
        and tensor.shape == shape
        and tensor.stride() == stride
        and tensor.storage_offset() == offset
        and tensor.requires_grad == grad
    )


def trackable(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every one of `tensors` keeps a version counter (an inference tensor, made in
    `torch.inference_mode`, does not: it may change unseen)."""
    return not any(tensor.is_inference() for tensor in tensors)


class Reuse:
    """One value computed from `tensors` under `settings`, given back while both hold."""

    def __init__(self) -> None:
        self.enabled = False  # set by lowrank.nn.reuse_dora_factors
        self.clear()

    def clear(self) -> None:
        """Forget the value (and the references to what it was computed from)."""
        self._marks: tuple = ()
        self._settings: tuple | None = None
        self._value: torch.Tensor | None = None

    def get(self, tensors: Sequence[torch.Tensor], settings: tuple) -> torch.Tensor | None:
        """The value kept by `put` for these very `tensors`, unchanged since, and equal
        `settings`; None otherwise. `tensors` must be `trackable`."""
        if self._value is None or settings != self._settings or len(tensors) != len(self._marks):
            return None
        if all(_holds(mark, t) for mark, t in zip(self._marks, tensors, strict=True)):
            return self._value
        return None

    def put(self, tensors: Sequence[torch.Tensor], settings: tuple, value: torch.Tensor) -> None:
        """Keep `value`, computed from `tensors` (`trackable`) under `settings`."""
        self._marks = tuple(_fingerprint(t) for t in tensors)
        self._settings = settings
        self._value = value

    def __getstate__(self) -> dict:
        """Pickled (and deep-copied) empty: the weak references do not pickle, and a copy's
        tensors are other objects anyway."""
        return {}

    def __setstate__(self, state: dict) -> None:
        self.enabled = False
        self.clear()
