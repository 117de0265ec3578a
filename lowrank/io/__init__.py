"""Adapter files and dense checkpoints: read, write, convert and merge.

Formats (auto-detected on load): PEFT folders, kohya / sd-scripts and LyCORIS
`.safetensors` (LoRA, LoCon, Tucker, LoHa, LoKr), diffusers LoRA files. Everything is
safetensors (a pickle is refused unread), every write is atomic and never replaces an
input, and dense checkpoints (one file or shards with an index) are streamed one tensor
at a time. See `docs/files.md` for the key schemes and what is exact.
"""

from .adapter import Adapter
from .checkpoint import Checkpoint, CheckpointWriter, TensorInfo
from .convert import convert_adapter
from .files import Staging
from .formats import FORMATS as FORMATS
from .merge import apply_adapter, inject_adapter, merge_checkpoint
from .report import inspect_adapter
from .store import load_adapter, save_adapter

__all__ = [
    "Adapter",
    "Checkpoint",
    "CheckpointWriter",
    "Staging",
    "TensorInfo",
    "apply_adapter",
    "convert_adapter",
    "inject_adapter",
    "inspect_adapter",
    "load_adapter",
    "merge_checkpoint",
    "save_adapter",
]
