"""Adapter files and dense checkpoints: read, write, convert and merge; extract, resize and
combine adapters in factor space.

Formats (auto-detected on load): PEFT folders, kohya / sd-scripts and LyCORIS
`.safetensors` (LoRA, LoCon, Tucker, LoHa, LoKr, dense differences `diff` / `diff_b`),
diffusers LoRA files. Everything is
safetensors (a pickle is refused unread), every write is atomic and never replaces an
input, and dense checkpoints (one file or shards with an index) are streamed one tensor
at a time. See `docs/files.md` for the key schemes and what is exact.
"""

from .adapter import Adapter
from .checkpoint import Checkpoint, CheckpointWriter, TensorInfo
from .convert import convert_adapter
from .factor_tools import combine_adapters, extract_adapter, resize_adapter
from .files import Staging
from .formats import FORMATS as FORMATS
from .merge import merge_checkpoint
from .model import apply_adapter, inject_adapter, model_adapter
from .report import inspect_adapter
from .store import load_adapter, save_adapter

__all__ = [
    "Adapter",
    "Checkpoint",
    "CheckpointWriter",
    "Staging",
    "TensorInfo",
    "apply_adapter",
    "combine_adapters",
    "convert_adapter",
    "extract_adapter",
    "inject_adapter",
    "inspect_adapter",
    "load_adapter",
    "merge_checkpoint",
    "model_adapter",
    "resize_adapter",
    "save_adapter",
]
