"""The conv benchmark's comparators (benchmarks/lora_conv.py): every method built for one
layout and dtype runs in it, and building one layout's methods leaves the others' alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import lora_conv as bench


def test_every_method_runs_in_the_layout_and_dtype_it_was_built_for():
    """float64 stands in for the GPU's bf16: a base layer left in float32 (LyCORIS keeps its
    own outside its registered modules) fails the call, as it did on an H100."""
    pytest.importorskip("lycoris")
    torch.manual_seed(0)
    base = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    built = bench.methods(base, 2, "cpu", torch.float64, torch.channels_last)
    assert {"dense", "lycoris_bypass", "peft", "lowrank_lora"} <= set(built)
    dense = built["dense"](x)
    for name, module in built.items():
        with torch.no_grad():
            out = module(x)
        assert out.dtype == torch.float64 and out.shape == dense.shape, name
    assert base.weight.dtype == torch.float32  # the caller's base is not converted
    assert base.weight.is_contiguous()
    nchw = bench.methods(base, 2, "cpu", torch.float32, torch.contiguous_format)
    assert nchw["dense"].weight.is_contiguous()
    assert built["dense"].weight.is_contiguous(memory_format=torch.channels_last)
