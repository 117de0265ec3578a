"""Tensors as an adapter's arithmetic needs them, in `lowrank.nn` (the adapter modules) and
`lowrank.io` (merges into checkpoints and models): whole where FSDP2 shards them, and
computed outside autocast where the dtypes must be the ones asked for."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole: a DTensor (FSDP2's shard) gathered from every rank, a collective; any
    other tensor (or `torch.fx` proxy) as it is."""
    full = getattr(tensor, "full_tensor", None) if isinstance(tensor, torch.Tensor) else None
    return full() if callable(full) else tensor


def sharded_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor`, whole and the same on every rank, split as `like` is where that is a DTensor
    (FSDP2's shard): each rank keeps its own part of it under `like`'s mesh and placements,
    with no communication and differentiably; as it is otherwise (a plain tensor, or the
    proxy `torch.fx.symbolic_trace` passes for one)."""
    mesh = getattr(like, "device_mesh", None) if isinstance(like, torch.Tensor) else None
    if mesh is None:
        return tensor
    from torch.distributed.tensor import DTensor, Replicate

    # replicated to split: each rank slices its part, differentiably
    whole = DTensor.from_local(tensor, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return whole.redistribute(mesh, like.placements)


def outside_autocast(tensor: torch.Tensor) -> AbstractContextManager:
    """A context with autocast off on `tensor`'s device, for arithmetic that must run in the
    dtypes it asks for (ΔW in float32 for a merge, a PiSSA start's SVD), also when called
    inside a `torch.autocast` region."""
    device = tensor.device.type
    if not torch.amp.is_autocast_available(device):
        return nullcontext()
    return torch.autocast(device, enabled=False)
