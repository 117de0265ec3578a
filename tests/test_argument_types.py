"""Every public entry point, every argument, every kind of value: the call either succeeds
with a finite result or raises a `lowrank.errors.LowRankError` naming what is wrong, never
another exception (a `TypeError` from deep inside torch, an `IndexError`, `re.error`, …).

One rule for numbers holds throughout: a number is an `int`, a `float` or a NumPy scalar
(a `bool` is not), a count, rank or size is an int, and a string that looks like a number
is not one. Each case below replaces one argument of a valid call by the drawn value;
`VALUES` are always tried (as hypothesis examples), generated ones on top.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lowrank.kernels import lora_dropout_mask, lora_linear
from safetensors.torch import save_file
from torch import nn

import lowrank
from lowrank import CP, DoRA, LoHa, LoKr, LoRA, LowRankError, Tucker2, decompose
from lowrank import io as lio
from lowrank import nn as lnn
from lowrank.nn.layers import adapter_class

VALUES = [
    None, True, False, 0, 1, 2, 3, -1, 2.0, 2.5, 0.5, -0.5, 1e-3, 1e300, -1e300, 10**400,
    -(10**400), math.nan, math.inf, -math.inf, 2**63, 2**64, 2**70, -(2**64), "3", "0.5", "",
    "lora",
    "re:[", 1j, 2 + 0j, np.int64(2), np.float32(0.5), np.float64(math.nan), np.bool_(True),
    torch.tensor(2.0), torch.tensor([1.0, 2.0]), torch.tensor(3), (3,), [3, 3], (3.5, 3),
    (2, 2), [1.0, 1.0], {}, {"r": 2}, object(), nn.Linear(2, 2), torch.float16, "float16",
    torch.eye(3).to_sparse(),
]  # fmt: skip
"""Values every case tries, of every kind the rule has to sort out."""

generated = st.one_of(
    st.integers(-4, 8),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.complex_numbers(max_magnitude=10),
    st.booleans(),
    st.tuples(st.integers(-2, 5), st.integers(-2, 5)),
    st.lists(st.floats(-2, 2), max_size=3),
    st.sampled_from([np.int32(3), np.uint8(2), np.float16(0.25), np.float64(-1.5)]),
)


def _finite(result: object) -> bool:
    """Whether every number in `result` (tensors, forms, modules, containers) is finite."""
    if isinstance(result, torch.Tensor):
        return result.is_meta or not result.is_floating_point() or bool(result.isfinite().all())
    if isinstance(result, (LoRA, Tucker2, CP, LoHa, LoKr, DoRA)):
        return all(_finite(t) for t in result.named_factors().values())
    if isinstance(result, nn.Module):
        return all(_finite(p) for p in result.parameters())
    if isinstance(result, (int, Fraction)):
        return True
    if isinstance(result, float):
        return math.isfinite(result)
    if isinstance(result, dict):
        return all(_finite(v) for v in result.values())
    if isinstance(result, (list, tuple)):
        return all(_finite(v) for v in result)
    return True


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


WEIGHT = _randn(6, 4, 3, 3)
LINEAR = _randn(6, 8)
LORA = LoRA(_randn(2, 4, 3, 3), _randn(6, 2, 1, 1), 0.5)
TUCKER = Tucker2(_randn(2, 4, 1, 1), _randn(3, 2, 3, 3), _randn(6, 3, 1, 1))
CPF = CP(_randn(6, 2), _randn(4, 2), (_randn(3, 2), _randn(3, 2)), _randn(2))
HALF = LoRA(_randn(2, 4, 3, 3), _randn(6, 2, 1, 1))
X, W, DOWN, UP = _randn(5, 8), _randn(6, 8), _randn(2, 8), _randn(6, 2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 6)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.emb = nn.Embedding(10, 4)


def _inject(**settings: object) -> list[str]:
    return lnn.inject(Net(), "fc", **{"rank": 2, **settings})


def _lora_linear_in_range(scale: object) -> torch.Tensor | None:
    """`lora_linear` at `scale`, or None where the exact output is beyond float32 (where an
    Inf is the right float32 answer, as `F.linear` gives it)."""
    y = lora_linear(X, W, DOWN, UP, scale)
    x, w, down, up = (t.double() for t in (X, W, DOWN, UP))
    exact = x @ w.T + float(scale) * (x @ down.T) @ up.T
    return y if float(exact.abs().max()) < torch.finfo(torch.float32).max / 2 else None


def _config(**fields: object) -> lnn.AdapterConfig:
    """An `AdapterConfig` of rank 2 built directly, not through `AdapterConfig.build`."""
    return lnn.AdapterConfig(**{"rank": 2, **fields})


def _adapted() -> nn.Module:
    model = Net()
    lnn.inject(model, "fc", rank=2)
    return model


def _state() -> dict[str, torch.Tensor]:
    return lnn.adapter_state_dict(_adapted())


Case = Callable[[object], object]

CORE: dict[str, Case] = {
    # forms
    "LoRA.down": lambda v: LoRA(v, _randn(6, 2)),
    "LoRA.scale": lambda v: LoRA(_randn(2, 4), _randn(6, 2), v),
    "Tucker2.mid": lambda v: Tucker2(TUCKER.down, v, TUCKER.up),
    "Tucker2.scale": lambda v: Tucker2(TUCKER.down, TUCKER.mid, TUCKER.up, v),
    "CP.spatial_factors": lambda v: CP(_randn(6, 2), _randn(4, 2), v),
    "CP.weights": lambda v: CP(_randn(6, 2), _randn(4, 2), (), v),
    "CP.scale": lambda v: CP(_randn(6, 2), _randn(4, 2), (), None, v),
    "LoHa.first": lambda v: LoHa(v, HALF),
    "LoHa.scale": lambda v: LoHa(HALF, HALF, v),
    "LoKr.w1": lambda v: LoKr(v, _randn(3, 2, 3)),
    "LoKr.scale": lambda v: LoKr(_randn(2, 2), _randn(3, 2, 3), v),
    "LoRA.with_kernel": lambda v: LoRA(_randn(2, 36), _randn(6, 2)).with_kernel(v),
    "LoKr.with_kernel": lambda v: LoKr(_randn(2, 2), _randn(3, 18)).with_kernel(v),
    "DoRA.update": lambda v: DoRA(v, _randn(6, 1)),
    "DoRA.magnitude": lambda v: DoRA(LoRA(_randn(2, 4), _randn(6, 2)), v),
    "DoRA.axis": lambda v: DoRA(LoRA(_randn(2, 4), _randn(6, 2)), _randn(6, 1), v),
    "DoRA.eps": lambda v: DoRA(LoRA(_randn(2, 4), _randn(6, 2)), _randn(6, 1), 0, v),
    "DoRA.merged": lambda v: DoRA(LoRA(_randn(2, 4), _randn(6, 2)), _randn(6, 1)).merged(v),
    "recompose": lambda v: lowrank.recompose(v),
    "fold": lambda v: lowrank.fold(v),
    "as_lora": lambda v: lowrank.as_lora(v),
    "scale_from_alpha.alpha": lambda v: lowrank.scale_from_alpha(v, 8),
    "scale_from_alpha.rank": lambda v: lowrank.scale_from_alpha(8, v),
    "scale_from_alpha.rslora": lambda v: lowrank.scale_from_alpha(8, 8, rslora=v),
    "alpha_from_scale.scale": lambda v: lowrank.alpha_from_scale(v, 8),
    "alpha_from_scale.rank": lambda v: lowrank.alpha_from_scale(1.0, v),
    # convolution geometry
    "centre_tap.delta": lambda v: lowrank.centre_tap(v, 3, spatial_dims=2),
    "centre_tap.kernel_size": lambda v: lowrank.centre_tap(_randn(2, 3), v, spatial_dims=2),
    "centre_tap.spatial_dims": lambda v: lowrank.centre_tap(_randn(2, 3), 3, spatial_dims=v),
    "inflate.weight": lambda v: lowrank.inflate(v, 3),
    "inflate.depth": lambda v: lowrank.inflate(WEIGHT, v),
    "check_centre_tap": lambda v: lowrank.check_centre_tap(v),
    # bounds
    "param_count.form": lambda v: lowrank.param_count(v, 4, 6, (3,), 2),
    "param_count.in_features": lambda v: lowrank.param_count("lora", v, 6, (3,), 2),
    "param_count.out_features": lambda v: lowrank.param_count("cp", 4, v, (3,), 2),
    "param_count.kernel_size": lambda v: lowrank.param_count("lora", 4, 6, v, 2),
    "param_count.rank": lambda v: lowrank.param_count("lora", 4, 6, (3,), v),
    "param_count.tucker2_rank": lambda v: lowrank.param_count("tucker2", 4, 6, (3,), v),
    "param_count.groups": lambda v: lowrank.param_count("lora", 4, 6, (3,), 2, groups=v),
    "max_useful_rank.form": lambda v: lowrank.max_useful_rank(v, 4, 6, (3,)),
    "max_useful_rank.kernel_size": lambda v: lowrank.max_useful_rank("tucker2", 4, 6, v),
    "max_useful_rank.groups": lambda v: lowrank.max_useful_rank("lora", 4, 6, groups=v),
    "crossover_rank.form_b": lambda v: lowrank.crossover_rank("lora", v, 4, 6, (3, 3)),
    "crossover_rank.in_features": lambda v: lowrank.crossover_rank("lora", "cp", v, 6),
    "forward_flops.rank": lambda v: lowrank.forward_flops("lora", 4, 6, (3,), v, (8,)),
    "forward_flops.spatial": lambda v: lowrank.forward_flops("lora", 4, 6, (3,), 2, v),
    "unmerged_overhead.rank": lambda v: lowrank.unmerged_overhead("cp", 4, 6, (3,), v),
    # decompositions
    "svd.weight": lambda v: decompose.svd(v, 2),
    "svd.rank": lambda v: decompose.svd(WEIGHT, v),
    "svd.energy": lambda v: decompose.svd(WEIGHT, energy=v),
    "svd.ratio": lambda v: decompose.svd(WEIGHT, ratio=v),
    "svd.max_params": lambda v: decompose.svd(WEIGHT, max_params=v),
    "svd.method": lambda v: decompose.svd(WEIGHT, 2, method=v),
    "svd.oversample": lambda v: decompose.svd(LINEAR, 2, method="randomized", oversample=v),
    "svd.n_iter": lambda v: decompose.svd(LINEAR, 2, method="randomized", n_iter=v),
    "svd.seed": lambda v: decompose.svd(LINEAR, 2, method="randomized", seed=v),
    "tucker2.rank": lambda v: decompose.tucker2(WEIGHT, v),
    "tucker2.n_iter": lambda v: decompose.tucker2(WEIGHT, 2, n_iter=v),
    "tucker2.tol": lambda v: decompose.tucker2(WEIGHT, 2, tol=v),
    "cp.rank": lambda v: decompose.cp(WEIGHT, v, n_iter=3),
    "cp.n_iter": lambda v: decompose.cp(WEIGHT, 2, n_iter=v),
    "cp.tol": lambda v: decompose.cp(WEIGHT, 2, n_iter=3, tol=v),
    "cp.seed": lambda v: decompose.cp(WEIGHT, 2, n_iter=3, seed=v),
    "cp.weights": lambda v: decompose.cp(WEIGHT, 2, n_iter=3, weights=v),
    "resize.form": lambda v: decompose.resize(v, 1),
    "resize.rank": lambda v: decompose.resize(LORA, v),
    "resize.tucker2_rank": lambda v: decompose.resize(TUCKER, v),
    "resize.energy": lambda v: decompose.resize(LORA, energy=v),
    "resize.ratio": lambda v: decompose.resize(CPF, ratio=v),
    "resize.to": lambda v: decompose.resize(TUCKER, 1, to=v),
    "resize.return_error": lambda v: decompose.resize(LORA, 1, return_error=v),
    "combine.forms": lambda v: decompose.combine(v),
    "combine.weights": lambda v: decompose.combine([LORA, TUCKER], v),
    "combine.weight": lambda v: decompose.combine([LORA, TUCKER], [1.0, v]),
    "combine.rank": lambda v: decompose.combine([LORA, TUCKER], rank=v),
    "energy_rank.energy": lambda v: decompose.energy_rank(torch.tensor([3.0, 2.0]), v, 13.0),
    "energy_rank.total": lambda v: decompose.energy_rank(torch.tensor([3.0, 2.0]), 0.5, v),
    "energy_rank.values": lambda v: decompose.energy_rank(v, 0.5, 13.0),
    "ratio_rank.ratio": lambda v: decompose.ratio_rank(torch.tensor([3.0, 2.0]), v),
    "budget_rank.max_params": lambda v: decompose.budget_rank(4, 6, (3,), v),
    "budget_rank.kernel_size": lambda v: decompose.budget_rank(4, 6, v, 100),
    # kernels
    "lora_linear.x": lambda v: lora_linear(v, W, DOWN, UP),
    "lora_linear.scale": lambda v: _lora_linear_in_range(v),
    "lora_linear.bias": lambda v: lora_linear(X, W, DOWN, UP, bias=v),
    "lora_linear.dropout_p": lambda v: lora_linear(X, W, DOWN, UP, dropout_p=v, seed=1),
    "lora_linear.seed": lambda v: lora_linear(X, W, DOWN, UP, dropout_p=0.5, seed=v),
    "lora_linear.backend": lambda v: lora_linear(X, W, DOWN, UP, backend=v),
    "lora_dropout_mask.x": lambda v: lora_dropout_mask(v, 0.5, 0),
    "lora_dropout_mask.dropout_p": lambda v: lora_dropout_mask(X, v, 0),
    "lora_dropout_mask.seed": lambda v: lora_dropout_mask(X, 0.5, v),
    "lora_dropout_mask.backend": lambda v: lora_dropout_mask(X, 0.5, 0, backend=v),
    # modules
    "inject.model": lambda v: lnn.inject(v, "fc", rank=2),
    "inject.targets": lambda v: lnn.inject(Net(), v, rank=2),
    "inject.config": lambda v: lnn.inject(Net(), "fc", v),
    "inject.rank": lambda v: _inject(rank=v),
    "inject.form": lambda v: _inject(form=v),
    "inject.alpha": lambda v: _inject(alpha=v),
    "inject.scale": lambda v: _inject(scale=v),
    "inject.dropout": lambda v: _inject(dropout=v),
    "inject.rslora": lambda v: _inject(alpha=4, rslora=v),
    "inject.init": lambda v: _inject(init=v),
    "inject.factors": lambda v: _inject(factors=v),
    "inject.settings": lambda v: lnn.inject(Net(), {"fc": {"r": v}}),
    "inject.pattern_alpha": lambda v: lnn.inject(Net(), {"fc": {"r": 2, "alpha": v}}),
    "AdapterConfig.rslora": lambda v: lnn.inject(Net(), "fc", _config(alpha=4, rslora=v)),
    "AdapterConfig.trainable_scale": lambda v: lnn.inject(Net(), "fc", _config(trainable_scale=v)),
    "AdapterConfig.hard": lambda v: lnn.inject(Net(), "fc", _config(hard=v)),
    "AdapterConfig.fused": lambda v: lnn.inject(Net(), "fc", _config(fused=v)),
    "LoRALinear.base": lambda v: lnn.LoRALinear(v, 2),
    "LoRALinear.rank": lambda v: lnn.LoRALinear(nn.Linear(8, 6), v),
    "LoRALinear.alpha": lambda v: lnn.LoRALinear(nn.Linear(8, 6), 2, v),
    "LoRAConv.rank": lambda v: lnn.LoRAConv(nn.Conv2d(4, 6, 3, padding=1), v, form="tucker2"),
    "LoRAEmbedding.dropout": lambda v: lnn.LoRAEmbedding(nn.Embedding(10, 4), 2, dropout=v),
    "count_model.rank": lambda v: lowrank.count_model(Net(), "conv", rank=v, form="tucker2"),
    "count_model.dtype": lambda v: lowrank.count_model(Net(), "fc", rank=2, dtype=v),
    "plan.config": lambda v: lnn.plan(Net(), "fc", v),
    "check_fit.config": lambda v: lnn.check_fit("fc", nn.Linear(8, 6), v),
    "layer_sizes": lambda v: lnn.layer_sizes(v),
    "AdapterConfig.build": lambda v: lnn.AdapterConfig.build(v),
    "merge.exact": lambda v: lnn.merge(_adapted(), exact=v),
    "load_adapter_state_dict.state": lambda v: lnn.load_adapter_state_dict(_adapted(), v),
    "load_adapter_state_dict.strict": lambda v: lnn.load_adapter_state_dict(
        _adapted(), {}, strict=v
    ),
    "swap_adapter.exact": lambda v: lnn.swap_adapter(_adapted(), _state(), exact=v),
    "unload": lambda v: lnn.unload(v),
    "count_parameters": lambda v: lnn.count_parameters(v),
    "merge_and_unload": lambda v: lnn.merge_and_unload(v),
    "adapter_state_dict": lambda v: lnn.adapter_state_dict(v),
}


@pytest.mark.parametrize("method", ["weighted_out", "in_kernel"])
@pytest.mark.parametrize(
    "dtype",
    [True, False, 0, 1, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn,
     "float32", np.float32, float],
)  # fmt: skip
def test_cp_products_take_float_dtypes(method, dtype):
    """`CP.weighted_out(dtype)` / `in_kernel(dtype)` take a float dtype only: True gave a
    bool tensor, torch.int64 truncated the factors, 0 raised torch's RuntimeError (read as
    a device) or gave the factors' dtype. `DTypeError` naming dtype."""
    with pytest.raises(lowrank.DTypeError, match=r"dtype must be a floating-point torch\.dtype"):
        getattr(CPF, method)(dtype)


def test_cp_products_in_float_dtypes():
    """In each float dtype the products are those of the float64 factors, rounded."""
    out, inp, k1, k2, w = (
        t.double() for t in (CPF.out_factor, CPF.in_factor, *CPF.spatial_factors, CPF.weights)
    )
    weighted = out * w
    kernel = torch.einsum("ir,jr,kr->rijk", inp, k1, k2).reshape(2, -1)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tol = {"rtol": 1e-2, "atol": 1e-2} if dtype in (torch.float16, torch.bfloat16) else {}
        got = CPF.weighted_out(dtype)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), weighted, **tol)
        got = CPF.in_kernel(dtype)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), kernel, **tol)


FORMS = {
    "LoRA": LORA, "Tucker2": TUCKER, "CP": CPF, "LoHa": LoHa(HALF, HALF),
    "LoKr": LoKr(_randn(2, 2), _randn(3, 2, 3, 3)),
}  # fmt: skip


@pytest.mark.parametrize(
    "bound",
    [torch.tensor(True), torch.tensor([True]), True, np.True_, torch.tensor(1.0), 1.0, "1"],
    ids=repr,
)
@pytest.mark.parametrize("form", sorted(FORMS))
def test_rows_bounds_are_integers(form, bound):
    """A bool is no index: `LoKr.to_dense(slice(0, torch.tensor(True)))` returned one row
    (torch indexes a bool tensor as 1). Every form refuses a bool or non-integer bound of
    `rows`; integer tensors and NumPy integers give the rows of the dense ΔW."""
    factors = FORMS[form]
    for rows in (slice(0, bound), slice(bound, None)):
        with pytest.raises(lowrank.ArgumentError, match="integer channel indices"):
            factors.to_dense(rows)
    dense = factors.to_dense()
    for start, stop in ((np.int64(1), torch.tensor(3)), (torch.tensor([0]), np.int32(2))):
        torch.testing.assert_close(
            factors.to_dense(slice(start, stop)), dense[int(start) : int(stop)]
        )


SMALL_INTS = st.integers(-4, 8)
"""Sizes and ranks of tensors that a call allocates are drawn small (a valid huge one would
allocate it); huge ones come from `VALUES`, which must be refused before any allocation."""
ALLOCATING = {
    "centre_tap.kernel_size", "inflate.depth", "LoRALinear.rank", "LoRAConv.rank",
    "inject.rank", "inject.settings", "svd.oversample", "cp.rank",
}  # fmt: skip


def check(case: Case, value: object) -> None:
    """`case(value)` is finite or a `LowRankError`."""
    try:
        result = case(value)
    except LowRankError:
        return
    assert _finite(result), f"non-finite result for {value!r}"


def _with_values(test: Callable) -> Callable:
    for value in VALUES:
        test = example(value=value)(test)
    return test


@pytest.mark.parametrize("name", sorted(CORE))
def test_core_entry_points(name):
    strategy = SMALL_INTS if name in ALLOCATING else generated

    @settings(max_examples=6, deadline=None, database=None)
    @_with_values
    @given(value=strategy)
    def run(value):
        check(CORE[name], value)

    run()


FLAGS = ("rslora", "trainable_scale", "hard", "fused", "dora")


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize(
    "value", ["false", "", None, 2, 0.0, np.array(True), torch.tensor(False), [True]]
)
def test_config_flags_built_directly(flag, value):
    """An `AdapterConfig` built directly has its flags checked as `build` checks keyword
    ones: a string "false" (truthy), None, 2, a float or a tensor is no flag, and nothing is
    injected."""
    model = Net()
    with pytest.raises(lowrank.ArgumentError, match=f"{flag} must be true or false"):
        lnn.inject(model, "fc", _config(alpha=4, **{flag: value}))
    assert isinstance(model.fc, nn.Linear)


@pytest.mark.parametrize("flag", FLAGS)
def test_config_flags_as_ints(flag):
    """The ints 0 and 1 (NumPy's too) are the flags False and True, as for `build`."""
    for number, truth in ((0, False), (np.int64(1), True)):
        model = Net()
        lnn.inject(model, "fc", _config(alpha=4, **{flag: number}))
        assert getattr(model.fc.config, flag) is truth


@pytest.mark.parametrize("truth", [True, False])
def test_flags_take_numpy_bools(truth):
    """A NumPy bool is a flag, as NumPy numbers are numbers (`np.True_` was refused as "got
    bool np.True_"): every flag reads it as the Python bool, and stores a Python bool."""
    flag = np.bool_(truth)
    for key in FLAGS:
        model = Net()
        lnn.inject(model, "fc", rank=2, alpha=4, **{key: flag})
        assert getattr(model.fc.config, key) is truth
        model = Net()
        lnn.inject(model, "fc", _config(alpha=4, **{key: flag}))
        assert getattr(model.fc.config, key) is truth
    model = Net()
    lnn.inject(model, {"fc": {"r": 2, "hard": flag}})
    assert model.fc.config.hard is truth
    assert lowrank.scale_from_alpha(8, 4, rslora=flag) == (4.0 if truth else 2.0)
    assert isinstance(decompose.resize(LORA, 1, return_error=flag), tuple) is truth
    adapter = lio.Adapter({"fc": LORA_FC}, rslora=flag, kohya_names=flag)
    assert adapter.rslora is truth and adapter.kohya_names is truth
    lnn.merge(_adapted(), exact=flag)
    lnn.load_adapter_state_dict(_adapted(), _state(), strict=flag)


@pytest.mark.parametrize("value", [np.array(True), np.array([True]), torch.tensor(True)])
def test_flags_refuse_arrays(value):
    """A NumPy array (0-d included) or a tensor is not a flag."""
    with pytest.raises(lowrank.ArgumentError, match="hard must be true or false"):
        _inject(hard=value)


def _adapter_layer(layer: str, **settings: object) -> tuple[nn.Module, torch.Tensor]:
    """An adapter of class `layer` ("LoRALinear fused": with `fused=True`) with `settings`,
    and a valid input for it."""
    from transformers.pytorch_utils import Conv1D

    if layer == "LoRALinear fused":
        settings["fused"] = True
    if layer == "LoRAEmbedding":  # indices take no dropout
        settings.pop("dropout", None)
    kernel = 1 if settings.get("hard") else 3  # hard: 1×1 convolutions only
    base, x = {
        "LoRALinear": (nn.Linear(8, 6), X),
        "LoRALinear fused": (nn.Linear(8, 6), X),
        "LoRAConv": (nn.Conv2d(4, 6, kernel, padding=kernel // 2), _randn(1, 4, 5, 5)),
        "LoRAEmbedding": (nn.Embedding(10, 4), torch.tensor([1, 2])),
        "LoRAConv1D": (Conv1D(6, 8), X),
    }[layer]
    return adapter_class(base)(base, 2, **settings), x


ADAPTER_LAYERS = ("LoRALinear", "LoRALinear fused", "LoRAConv", "LoRAEmbedding", "LoRAConv1D")
MODES = {"eval": {}, "train": {"dropout": 0.5}, "hard": {"hard": True}, "merged": {}}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("layer", ADAPTER_LAYERS)
def test_adapter_forward_takes_tensors(layer, mode):
    """An adapter's input that is not a tensor (None, a NumPy array, a list) is a
    `DTypeError` naming the adapter's input in every mode: LoRAConv raised AttributeError
    ('NoneType' object has no attribute 'requires_grad') from its own code, LoRAConv1D an
    AttributeError from transformers' `Conv1D`, the others torch's TypeError from deep
    inside."""
    if layer == "LoRALinear fused" and mode == "hard":
        pytest.skip("fused is a branch beside the base; hard has none")
    module, x = _adapter_layer(layer, **MODES[mode])
    if mode == "merged":
        lnn.merge(module)
    module.train(mode == "train")
    assert module(x).isfinite().all()
    kind = layer.split()[0]
    for value in (None, x.numpy(), x.tolist()):
        with pytest.raises(lowrank.DTypeError, match=f"input x of {kind} must be a torch.Tensor"):
            module(value)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("target", ["fc", "conv", "emb"])
def test_float8_weight_is_refused(dtype, target):
    """A float8 weight is a quantized layer, as an integer one is: `DTypeError` naming the
    module and dtype, and no module replaced (it raised NotImplementedError from
    `kaiming_uniform_`, which takes no float8)."""
    model = Net()
    getattr(model, target).to(dtype)
    with pytest.raises(lowrank.DTypeError, match=rf"'{target}' has a {dtype} weight"):
        lnn.inject(model, ["fc", "conv", "emb"], rank=2)
    assert not lnn.adapters(model)
    with pytest.raises(lowrank.DTypeError, match=str(dtype)):
        lnn.LoRALinear(nn.Linear(8, 6).to(dtype), 2)


# --- lowrank.io: numeric arguments of the file tools -----------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A base and a tuned checkpoint of one linear layer, and a PEFT adapter for it."""
    root = tmp_path_factory.mktemp("argument_types")
    base, tuned = _randn(6, 8, seed=1), _randn(6, 8, seed=2)
    save_file({"fc.weight": base}, root / "base.safetensors")
    save_file({"fc.weight": tuned}, root / "tuned.safetensors")
    adapter = lio.Adapter({"fc": LoRA(_randn(2, 8), _randn(6, 2), 0.5)})
    lio.save_adapter(adapter, root / "adapter", "peft")
    return root


_outputs = itertools.count()
LORA_FC = LoRA(_randn(2, 8), _randn(6, 2), 0.5)
ADAPTER_FIELDS = (
    "format", "components", "alphas", "rslora", "metadata", "kohya_names", "source",
    "target_parameters", "prefix", "model", "pipeline", "conv1d",
)  # fmt: skip


def _fc() -> nn.Module:
    return nn.ModuleDict({"fc": nn.Linear(8, 6)})


def _io_cases(root) -> dict[str, Case]:
    def out(suffix: str = "") -> object:
        return root / f"out{next(_outputs)}{suffix}"

    base, tuned, adapter = root / "base.safetensors", root / "tuned.safetensors", root / "adapter"

    def inside(value: object) -> object:
        """A string path under `root` (a new folder each time), never in the working
        directory; any other value as it is."""
        return root / f"named{next(_outputs)}" / value if isinstance(value, str) else value

    def extract(**kwargs: object) -> object:
        return lio.extract_adapter(base, tuned, out(), **{"rank": 2, **kwargs})

    return {
        "extract_adapter.rank": lambda v: extract(rank=v),
        "extract_adapter.energy": lambda v: extract(rank=None, energy=v),
        "extract_adapter.ratio": lambda v: extract(rank=None, ratio=v),
        "extract_adapter.conv_rank": lambda v: extract(conv_rank=v),
        "extract_adapter.form": lambda v: extract(form=v),
        "extract_adapter.format": lambda v: extract(format=v),
        "extract_adapter.dtype": lambda v: extract(dtype=v),
        "extract_adapter.device": lambda v: extract(device=v),
        "resize_adapter.rank": lambda v: lio.resize_adapter(adapter, out(), v),
        "resize_adapter.energy": lambda v: lio.resize_adapter(adapter, out(), energy=v),
        "resize_adapter.form": lambda v: lio.resize_adapter(adapter, out(), 1, form=v),
        "combine_adapters.weights": lambda v: lio.combine_adapters([adapter] * 2, out(), v),
        "combine_adapters.weight": lambda v: lio.combine_adapters([adapter], out(), [v]),
        "combine_adapters.rank": lambda v: lio.combine_adapters([adapter] * 2, out(), rank=v),
        "convert_adapter.to": lambda v: lio.convert_adapter(adapter, out(), v),
        "convert_adapter.rank": lambda v: lio.convert_adapter(adapter, out(), "peft", rank=v),
        "merge_checkpoint.weights": lambda v: lio.merge_checkpoint(
            base, [adapter], out(".safetensors"), v
        ),
        "merge_checkpoint.dtype": lambda v: lio.merge_checkpoint(
            base, [adapter], out(".safetensors"), dtype=v
        ),
        "load_adapter.path": lambda v: lio.load_adapter(v),
        "inspect_adapter.path": lambda v: lio.inspect_adapter(v),
        "Adapter.layers": lambda v: lio.Adapter(v),
        "Adapter.layer": lambda v: lio.Adapter({"fc": v}),
        **{
            f"Adapter.{field}": lambda v, field=field: lio.save_adapter(
                lio.Adapter({"fc": LORA_FC}, **{"format": "kohya", field: v}), out(), "kohya"
            )
            for field in ADAPTER_FIELDS
        },
        "save_adapter.adapter": lambda v: lio.save_adapter(v, out(), "peft"),
        "save_adapter.format": lambda v: lio.save_adapter(lio.load_adapter(adapter), out(), v),
        "save_adapter.prefix": lambda v: lio.save_adapter(
            lio.load_adapter(adapter), out(), "kohya", prefix=v
        ),
        "convert_adapter.prefix": lambda v: lio.convert_adapter(
            adapter, out(), "lycoris", prefix=v
        ),
        "save_adapter.out": lambda v: lio.save_adapter(
            lio.load_adapter(adapter), inside(v), "peft"
        ),
        "combine_adapters.adapters": lambda v: lio.combine_adapters(v, out()),
        "merge_checkpoint.base": lambda v: lio.merge_checkpoint(v, adapter, out()),
        "merge_checkpoint.adapters": lambda v: lio.merge_checkpoint(base, v, out()),
        "apply_adapter.model": lambda v: lio.apply_adapter(v, adapter),
        "apply_adapter.adapter": lambda v: lio.apply_adapter(_fc(), v),
        "apply_adapter.weight": lambda v: lio.apply_adapter(_fc(), adapter, v),
        "inject_adapter.model": lambda v: lio.inject_adapter(v, adapter),
        "inject_adapter.adapter": lambda v: lio.inject_adapter(_fc(), v),
    }


IO_CASES = sorted(_io_cases(Path()))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_parameters", "fc.weight"),  # one string, not a tuple of them
        ("target_parameters", ("fc.weight", 3)),
        ("components", "unet"),
        ("pipeline", "text_encoder_2"),
        ("alphas", [("fc", 4.0)]),
        ("metadata", {"ss_network_dim": 4}),  # safetensors metadata values are strings
        ("metadata", None),
        ("model", "base"),
        ("model", {"revision": Path("main")}),  # not JSON: it failed inside the writer
        ("model", {"modules_to_save": "head"}),  # a list of names
        ("model", {"peft_type": "LORA"}),  # not a field kept through the tools
        ("model", {"auto_mapping": {"base_model_class": Path("x")}}),
        ("model", {"auto_mapping": {"a": float("nan")}}),  # NaN is not standard JSON
        ("model", {"lora_dropout": 1.5}),  # a probability in [0, 1)
        ("model", {"lora_dropout": "0.1"}),
        ("rslora", "false"),
        ("kohya_names", 1),
        ("prefix", ["lora_unet"]),
        ("format", True),
        ("source", 3),
        ("base_weights", {"fc.weight": [[1.0]]}),
        ("base_weights", {"fc": torch.ones(6, 8)}),  # keyed <module>.weight or .bias
        ("base_weights", {"bn.running_mean": torch.ones(8)}),
        ("base_weights", {"fc.weight": torch.ones(6, 8, dtype=torch.int64)}),
    ],
)
def test_adapter_fields(field, value, tmp_path):
    """`Adapter`'s fields are checked where it is built (`ArgumentError` naming the field):
    a single string of target parameters was stored character by character, the others
    raised an AttributeError or TypeError inside a writer, or flags took "false" as true."""
    with pytest.raises(lowrank.ArgumentError, match=field):
        lio.Adapter({"fc": LORA_FC}, **{"format": "kohya", field: value})


def test_adapter_field_lists(tmp_path):
    """Lists stand for tuples: a kohya file keeps the target parameters it is given."""
    adapter = lio.Adapter({"fc": LORA_FC}, target_parameters=["fc.weight"], components=[])
    assert adapter.target_parameters == ("fc.weight",) and adapter.components == ()
    lio.save_adapter(adapter, tmp_path / "a.safetensors", "kohya")
    assert lio.load_adapter(tmp_path / "a.safetensors").target_parameters == ("fc.weight",)


def _file_tools(root: Path) -> dict[str, Callable[..., object]]:
    """Each file tool on a valid call into a new output under `root`, its keyword arguments
    passed on."""
    base, adapter = root / "base.safetensors", root / "adapter"

    def out(suffix: str = "") -> Path:
        return root / f"tool{next(_outputs)}{suffix}"

    return {
        "extract_adapter": lambda **kw: lio.extract_adapter(
            base, root / "tuned.safetensors", out(), 2, **kw
        ),
        "convert_adapter": lambda **kw: lio.convert_adapter(adapter, out(), "kohya", **kw),
        "resize_adapter": lambda **kw: lio.resize_adapter(adapter, out(), 1, **kw),
        "combine_adapters": lambda **kw: lio.combine_adapters([adapter], out(), **kw),
        "merge_checkpoint": lambda **kw: lio.merge_checkpoint(
            base, [adapter], out(".safetensors"), **kw
        ),
    }


FILE_TOOLS = sorted(_file_tools(Path()))


@pytest.mark.parametrize("tool", FILE_TOOLS)
def test_progress_is_a_flag(tool, files):
    """`progress` is a flag: a string "false" (truthy) showed a progress bar, and None, an
    int, an array or a tensor were read by their truth. `ArgumentError` before anything is
    written; `np.True_` is a flag as elsewhere."""
    call = _file_tools(files)[tool]
    before = set(files.iterdir())
    for value in ("false", "", None, 0, 1, np.array(True), torch.tensor(False)):
        with pytest.raises(lowrank.ArgumentError, match="progress must be true or false"):
            call(progress=value)
    assert set(files.iterdir()) == before
    call(progress=np.False_)


@pytest.mark.parametrize("value", [2.5, 0, "", ["unet"], b"unet", np.str_("")])
def test_component_is_a_name(value, files):
    """`component` is None or a non-empty string: with a plain PEFT adapter, 2.5 was ignored
    or taken as "whichever component" (`load_adapter`, `apply_adapter`, `merge_checkpoint`)
    and "" silently meant none. `ArgumentError` naming it; the model is unchanged and
    nothing is written."""
    adapter = files / "adapter"
    model = _fc()
    weight, before = model.fc.weight.detach().clone(), set(files.iterdir())
    calls = [
        lambda: lio.load_adapter(adapter, base=_fc(), component=value),
        lambda: lio.apply_adapter(model, adapter, component=value),
        lambda: lio.inject_adapter(model, adapter, component=value),
        lambda: lio.load_adapter(adapter).for_model(_fc(), value),
        lambda: lio.save_adapter(
            lio.load_adapter(adapter), files / "component", "diffusers", component=value
        ),
        *(lambda tool=tool: tool(component=value) for tool in _file_tools(files).values()),
    ]
    for call in calls:
        with pytest.raises(lowrank.ArgumentError, match="component must be None or a non-emp"):
            call()
    assert set(files.iterdir()) == before
    assert isinstance(model.fc, nn.Linear) and torch.equal(model.fc.weight, weight)


@pytest.mark.parametrize("tool", ["resize_adapter", "combine_adapters"])
@pytest.mark.parametrize("value", [0, False, "", (), np.int64(0)])
def test_falsy_format_is_not_the_default(tool, value, files):
    """Only None means "the input's format": format=0, False or "" fell back to the input's
    (PEFT) and wrote it; now `ConversionError` listing the formats, nothing written."""
    before = set(files.iterdir())
    with pytest.raises(lowrank.ConversionError, match="unknown format"):
        _file_tools(files)[tool](format=value)
    assert set(files.iterdir()) == before
    assert _file_tools(files)[tool](format=None)["format"] == "peft"


@pytest.mark.parametrize("value", [3, "x", b"x", None, [3], ["x", None], {"x": 1}])
def test_save_adapter_inputs(value, tmp_path):
    """`inputs` is an iterable of paths (strings as Paths, a generator as a list): 3 raised
    TypeError ("Value after * must be an iterable"), "x" AttributeError ('str' object has
    no attribute 'resolve'); now `ArgumentError` naming it, nothing written."""
    with pytest.raises(lowrank.ArgumentError, match=r"inputs(\[\d\])? must be a"):
        lio.save_adapter(lio.Adapter({"fc": LORA_FC}), tmp_path / "a", "peft", inputs=value)
    assert not list(tmp_path.iterdir())
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"input")
    for sources in ([str(out)], (out,), (p for p in [out]), tmp_path.glob("a.*")):
        with pytest.raises(lowrank.OutputPathError, match="is the input"):
            lio.save_adapter(lio.Adapter({"fc": LORA_FC}), out, "kohya", inputs=sources)
    assert out.read_bytes() == b"input"


@pytest.mark.parametrize("name", IO_CASES)
def test_file_tool_arguments(name, files):
    case = _io_cases(files)[name]

    @settings(max_examples=2, deadline=None, database=None)
    @_with_values
    @given(value=generated)
    def run(value):
        check(case, value)

    run()
