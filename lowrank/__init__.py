"""lowrank: numerics of low-rank adaptation (LoRA) for linear and convolution weights.

The factor forms (`LoRA`, `Tucker2`, `CP`) and their dense recomposition live in
`lowrank.forms`; convolution geometry in `lowrank.conv`; decompositions in
`lowrank.decompose`; the fused Triton kernels in `lowrank.kernels`.
"""

from .conv import centre_tap, check_centre_tap, inflate
from .errors import (
    ArgumentError,
    DeviceError,
    DTypeError,
    GeometryError,
    LowRankError,
    NonFiniteError,
    RankError,
    ShapeError,
    TargetError,
)
from .forms import CP, LoRA, Tucker2, fold, recompose, scale_from_alpha

__all__ = [
    "CP",
    "ArgumentError",
    "DTypeError",
    "DeviceError",
    "GeometryError",
    "LoRA",
    "LowRankError",
    "NonFiniteError",
    "RankError",
    "ShapeError",
    "TargetError",
    "Tucker2",
    "centre_tap",
    "check_centre_tap",
    "fold",
    "inflate",
    "recompose",
    "scale_from_alpha",
]
