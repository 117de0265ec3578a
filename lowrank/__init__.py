"""lowrank: numerics of low-rank adaptation (LoRA) for linear and convolution weights.

The factor forms (`LoRA`, `Tucker2`, `CP`, and LyCORIS' `LoHa`, `LoKr`, `Full`) and their dense
recomposition, and `DoRA` (a magnitude over one of them), live in `lowrank.forms`;
convolution geometry in `lowrank.conv`;
decompositions in `lowrank.decompose`, with `resize` and `combine` (factor space, also
exported here); adapter modules in `lowrank.nn`; the fused Triton kernels in
`lowrank.kernels`; adapter files and dense checkpoints in `lowrank.io`.
"""

from . import decompose, io
from .bounds import (
    Crossover,
    crossover_rank,
    forward_flops,
    max_useful_rank,
    param_count,
    unmerged_overhead,
)
from .conv import centre_tap, check_centre_tap, inflate
from .decompose import combine, resize
from .errors import (
    ArgumentError,
    ConversionError,
    DeviceError,
    DTypeError,
    FileFormatError,
    GeometryError,
    LowRankError,
    MergeError,
    NonFiniteError,
    OutputPathError,
    RankError,
    ShapeError,
    StateDictError,
    TargetError,
)
from .forms import (
    CP,
    DoRA,
    Full,
    LoHa,
    LoKr,
    LoRA,
    Tucker2,
    alpha_from_scale,
    as_lora,
    fold,
    recompose,
    scale_from_alpha,
)
from .nn import (
    AdapterConfig,
    LoRAConv,
    LoRAConv1D,
    LoRAEmbedding,
    LoRALinear,
    count_parameters,
    inject,
    merge_and_unload,
)
from .report import ModelReport, count_model

__all__ = [
    "CP",
    "AdapterConfig",
    "ArgumentError",
    "ConversionError",
    "Crossover",
    "DTypeError",
    "DeviceError",
    "DoRA",
    "FileFormatError",
    "Full",
    "GeometryError",
    "LoHa",
    "LoKr",
    "LoRA",
    "LoRAConv",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRALinear",
    "LowRankError",
    "MergeError",
    "ModelReport",
    "NonFiniteError",
    "OutputPathError",
    "RankError",
    "ShapeError",
    "StateDictError",
    "TargetError",
    "Tucker2",
    "alpha_from_scale",
    "as_lora",
    "centre_tap",
    "check_centre_tap",
    "combine",
    "count_model",
    "count_parameters",
    "crossover_rank",
    "decompose",
    "fold",
    "forward_flops",
    "inflate",
    "inject",
    "io",
    "max_useful_rank",
    "merge_and_unload",
    "param_count",
    "recompose",
    "resize",
    "scale_from_alpha",
    "unmerged_overhead",
]
