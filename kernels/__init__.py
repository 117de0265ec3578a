"""Triton kernels of lowrank, installed as `lowrank.kernels`.

`lora_linear` is the fused unmerged LoRA linear layer (forward and backward); see
docs/kernels.md for its kernels, regimes and cost floor.
"""

from lowrank.errors import ArgumentError

from .lora import LoRALinearFunction, lora_dropout_mask, lora_linear

__all__ = ["ArgumentError", "LoRALinearFunction", "lora_dropout_mask", "lora_linear"]
