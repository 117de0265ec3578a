"""Adapter modules on frozen layers, and the model-level calls built on them.

`config` holds the one settings object (`AdapterConfig`), `variants` what each factor form
is inside a module, `layers` the adapter modules (`LoRALinear`, `LoRAConv`,
`LoRAEmbedding`, `LoRAConv1D`), `model` how a model is walked and rewritten (`inject`,
`merge_and_unload`, `unload`, `disable_adapters`, `reuse_dora_factors`, `adapter_state_dict`,
`load_adapter_state_dict`, `swap_adapter`, `set_requires_grad`).
"""

from .config import AdapterConfig
from .fit import check_fit, layer_sizes
from .layers import LoRAConv, LoRAConv1D, LoRAEmbedding, LoRALinear, LowRankAdapter
from .model import (
    adapter_state_dict,
    adapters,
    count_parameters,
    disable_adapters,
    inject,
    load_adapter_state_dict,
    merge,
    merge_and_unload,
    plan,
    reuse_dora_factors,
    set_requires_grad,
    swap_adapter,
    unload,
    unmerge,
)

__all__ = [
    "AdapterConfig",
    "LoRAConv",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRALinear",
    "LowRankAdapter",
    "adapter_state_dict",
    "adapters",
    "check_fit",
    "count_parameters",
    "disable_adapters",
    "inject",
    "layer_sizes",
    "load_adapter_state_dict",
    "merge",
    "merge_and_unload",
    "plan",
    "reuse_dora_factors",
    "set_requires_grad",
    "swap_adapter",
    "unload",
    "unmerge",
]
