"""lowrank.nn: adapter forward = base layer with W + ΔW (float64, ΔW by einsum), init and
gradient flow, merge/unmerge, inject on nested models, counts and FLOPs."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from model_factories import TinyNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lowrank import ArgumentError, NonFiniteError, RankError, ShapeError, TargetError
from lowrank import nn as lnn
from lowrank.bounds import ADAPTER_FORMS, forward_flops, param_count
from lowrank.nn import LoRAConv, LoRALinear, count_parameters, inject
from lowrank.nn import layers as nn_layers
from lowrank.nn import variants as nn_variants

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
F_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def factor_names(form: str) -> tuple[str, ...]:
    return {
        "lora": ("down", "up"),
        "centre_tap": ("down", "up"),
        "tucker2": ("down", "mid", "up"),
        "cp": ("out_factor", "in_factor"),
    }[form]


def reference_delta(adapter) -> torch.Tensor:
    """ΔW in float64 from the adapter's parameters by einsum, independent of lowrank.forms."""
    kernel = adapter.kernel_size
    p = {name: param.detach().double() for name, param in adapter.named_parameters()}
    scale = float(adapter.scale)
    out_features = adapter.base.weight.shape[0]
    if adapter.form == "cp":
        letters = "abc"[: len(kernel)]
        operands = [p["out_factor"], p["in_factor"]]
        operands += [p[f"spatial_factors.{i}"] for i in range(len(kernel))]
        spec = ",".join(["oz", "iz", *[f"{c}z" for c in letters]]) + "->oi" + letters
        return scale * torch.einsum(spec, *operands)
    up = p["up"].reshape(out_features, -1)
    if adapter.form == "tucker2":
        down = p["down"].reshape(p["down"].shape[0], -1)
        return scale * torch.einsum("tp,pq...,qs->ts...", up, p["mid"], down)
    delta = torch.tensordot(up, p["down"], dims=1)
    if adapter.form == "centre_tap" and kernel:
        full = torch.zeros(out_features, delta.shape[1], *kernel, dtype=torch.float64)
        full[(slice(None), slice(None), *(k // 2 for k in kernel))] = delta.reshape(
            out_features, -1
        )
        delta = full
    return scale * delta


def randomise(adapter, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().double() - ref).norm() / ref.norm())


@st.composite
def conv_cases(draw):
    form = draw(st.sampled_from(ADAPTER_FORMS))
    dims = draw(st.integers(1, 3))
    if form == "centre_tap":
        kernel = tuple(draw(st.sampled_from([1, 3, 5])) for _ in range(dims))
        dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
        stride = (1,) * dims
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    else:
        kernel = tuple(draw(st.integers(1, 4)) for _ in range(dims))
        dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
        stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
        if all(s == 1 for s in stride) and draw(st.booleans()):
            padding = "same"
        else:
            padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    rank = draw(st.integers(1, 4))
    if form == "tucker2" and draw(st.booleans()):
        rank = (rank, draw(st.integers(1, 4)))
    spatial = tuple(
        d * (k - 1) + 1 + draw(st.integers(0, 3)) for k, d in zip(kernel, dilation, strict=True)
    )
    return form, kernel, stride, padding, dilation, rank, spatial


@given(conv_cases(), st.integers(1, 5), st.integers(1, 5), st.booleans())
def test_conv_adapter_equals_conv_with_merged_kernel(case, in_ch, out_ch, bias):
    form, kernel, stride, padding, dilation, rank, spatial = case
    dims = len(kernel)
    base = CONVS[dims](
        in_ch, out_ch, kernel, stride, padding, dilation, bias=bias, dtype=torch.float64
    )
    adapter = LoRAConv(base, rank, alpha=3.0, form=form)
    randomise(adapter)
    x = torch.randn(2, in_ch, *spatial, dtype=torch.float64)
    weight = base.weight.detach() + reference_delta(adapter)
    expected = F_CONVS[dims](x, weight, base.bias, stride, padding, dilation)
    assert relative_error(adapter(x), expected) < 1e-12


def padded_by_hand(x: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """`x` padded as `base` pads it, from its `padding` (torch's rule for "same": the total
    `d·(k−1)` per axis, the smaller half first) and `padding_mode`."""
    if base.padding == "same":
        totals = [d * (k - 1) for k, d in zip(base.kernel_size, base.dilation, strict=True)]
        pairs = [(t // 2, t - t // 2) for t in totals]
    else:
        pairs = [(p, p) for p in base.padding]
    amounts = [a for pair in reversed(pairs) for a in pair]  # F.pad: last axis first
    return F.pad(x, amounts, mode=base.padding_mode)


@given(conv_cases(), st.sampled_from(["reflect", "replicate", "circular"]), st.integers(1, 4),
       st.integers(1, 4))  # fmt: skip
def test_conv_adapter_pads_as_its_base(case, mode, in_ch, out_ch):
    """A reflect-, replicate- or circular-padded convolution plus its branch is that
    convolution with `W + ΔW`, with gradients (the branch), without (one convolution with the
    merged kernel, where cheaper) and merged."""
    form, kernel, stride, padding, dilation, rank, spatial = case
    spatial = tuple(max(s, 3) for s in spatial)  # reflect needs padding < size
    base = CONVS[len(kernel)](in_ch, out_ch, kernel, stride, padding, dilation,
                              padding_mode=mode, dtype=torch.float64)  # fmt: skip
    model = nn.Sequential(base)
    inject(model, ["0"], rank=rank, alpha=3.0, form=form)
    randomise(model[0])
    x = torch.randn(2, in_ch, *spatial, dtype=torch.float64)
    weight = base.weight.detach() + reference_delta(model[0])
    expected = F_CONVS[len(kernel)](padded_by_hand(x, base), weight, base.bias, stride, 0,
                                    dilation)  # fmt: skip
    assert relative_error(model(x), expected) < 1e-12
    with torch.no_grad():
        assert relative_error(model(x), expected) < 1e-12
        lnn.merge(model)
        assert relative_error(model(x), expected) < 1e-12


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_grouped_conv_adapter_pads_as_its_base(mode):
    base = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, padding_mode=mode,
                     dtype=torch.float64)  # fmt: skip
    adapter = LoRAConv(base, 2)
    randomise(adapter)
    down, up = adapter.down.detach(), adapter.up.detach()[..., 0, 0]
    blocks = [torch.einsum("or,rikl->oikl", up[3 * g : 3 * g + 3], down[2 * g : 2 * g + 2])
              for g in range(2)]  # fmt: skip
    weight = base.weight.detach() + adapter.scale * torch.cat(blocks)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    expected = F.conv2d(padded_by_hand(x, base), weight, base.bias, dilation=2, groups=2)
    assert relative_error(adapter(x), expected) < 1e-12


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_a_hooked_convolution_padded_wider_than_its_kernel_merges(mode):
    """A convolution with a hook of its own (an offloading hook, say) is merged once a probe
    shows its forward plain; reflect padding needs an input wider than the padding, so a
    3×3 kernel padded by 5 was refused ('its forward raised RuntimeError on a probe')."""
    base = nn.Conv2d(4, 6, 3, padding=5, padding_mode=mode, dtype=torch.float64)
    base.register_forward_hook(lambda module, args, out: out)
    model = nn.Sequential(base)
    inject(model, ["0"], rank=2, alpha=3.0)
    randomise(model[0])
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    weight = base.weight.detach() + reference_delta(model[0])
    expected = F.conv2d(padded_by_hand(x, base), weight, base.bias)
    lnn.merge(model)
    with torch.no_grad():
        assert relative_error(model(x), expected) < 1e-12


@given(st.sampled_from(ADAPTER_FORMS), st.integers(1, 9), st.integers(1, 9), st.integers(1, 5))
def test_linear_adapter_equals_linear_with_merged_weight(form, in_f, out_f, rank):
    base = nn.Linear(in_f, out_f, dtype=torch.float64)
    adapter = LoRALinear(base, rank, form=form, scale=0.7)
    randomise(adapter)
    x = torch.randn(3, 2, in_f, dtype=torch.float64)
    expected = F.linear(x, base.weight.detach() + reference_delta(adapter), base.bias)
    assert relative_error(adapter(x), expected) < 1e-12


@pytest.mark.parametrize("form", ["lora", "tucker2", "cp"])
def test_stride_2_conv_adapter_keeps_the_base_output_grid(form):
    # The seed's parallel 1×1 branch returned a 2× larger map than a stride-2 base conv.
    base = nn.Conv2d(4, 6, 3, stride=2, padding=1, dtype=torch.float64)
    adapter = LoRAConv(base, 2, form=form)
    randomise(adapter)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    expected = F.conv2d(x, base.weight.detach() + reference_delta(adapter), base.bias, 2, 1)
    assert expected.shape == (2, 6, 5, 4)
    assert relative_error(adapter(x), expected) < 1e-12


@pytest.mark.parametrize("form", ADAPTER_FORMS)
@pytest.mark.parametrize(
    ("dtype", "device"), [(torch.bfloat16, "cpu"), (torch.float16, "cpu"), (torch.float64, "meta")]
)
def test_factors_follow_the_base_layers_dtype_and_device(form, dtype, device):
    base = nn.Conv3d(4, 6, 3, padding=1, dtype=dtype, device=device)
    adapter = LoRAConv(base, 2, form=form, trainable_scale=True)
    for name, param in adapter.named_parameters():
        assert (param.dtype, param.device.type) == (dtype, device), name
    linear = LoRALinear(nn.Linear(5, 3, dtype=dtype, device=device), 2, form=form)
    assert {(p.dtype, p.device.type) for p in linear.parameters()} == {(dtype, device)}


def test_hard_one_by_one_conv_equals_weight_space_update():
    base = nn.Conv2d(5, 3, 1, dtype=torch.float64)
    adapter = LoRAConv(base, 2, form="lora", hard=True)
    randomise(adapter)
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    expected = F.conv2d(x, base.weight.detach() + reference_delta(adapter), base.bias)
    assert relative_error(adapter(x), expected) < 1e-12
    adapter(x).sum().backward()
    assert adapter.down.grad.abs().sum() > 0 and adapter.up.grad.abs().sum() > 0


@pytest.mark.parametrize("form", ADAPTER_FORMS)
@pytest.mark.parametrize("linear", [False, True])
def test_init_starts_at_zero_and_gradients_reach_every_factor(form, linear):
    torch.manual_seed(0)
    base = nn.Linear(6, 5) if linear else nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(3, 6) if linear else torch.randn(2, 4, 5, 5)
    adapter = (LoRALinear if linear else LoRAConv)(base, 3, form=form)
    assert torch.equal(adapter(x), base(x))  # ΔW = 0 at init …
    names = factor_names(form)
    nonzero = [n for n in names if getattr(adapter, n).abs().sum() > 0]
    assert nonzero and len(nonzero) == len(names) - 1  # … yet not both factors zero
    adapter(x).square().sum().backward()
    zero_factor = next(n for n in names if n not in nonzero)
    assert getattr(adapter, zero_factor).grad.abs().sum() > 0  # first backward reaches it
    assert base.weight.grad is None and not base.weight.requires_grad
    torch.optim.SGD([p for p in adapter.parameters() if p.requires_grad], lr=0.1).step()
    adapter.zero_grad()
    adapter(x).square().sum().backward()
    for param in adapter.parameters():
        if param.requires_grad:
            assert param.grad.abs().sum() > 0


@pytest.mark.parametrize("form", ADAPTER_FORMS)
def test_merge_then_unmerge_restores_the_weight(form):
    torch.manual_seed(1)
    base = nn.Conv2d(8, 6, 3, padding=1)
    adapter = LoRAConv(base, (3, 2) if form == "tucker2" else 3, alpha=6.0, form=form)
    randomise(adapter)
    original = base.weight.detach().double().clone()
    x = torch.randn(2, 8, 6, 6)
    unmerged = adapter(x).detach()
    adapter.merge()
    adapter.merge()  # a second merge is a no-op
    assert adapter.merged
    merged_weight = original + reference_delta(adapter)
    assert relative_error(base.weight.detach(), merged_weight) < 1e-6
    assert relative_error(adapter(x).detach(), unmerged.double()) < 1e-5
    adapter.unmerge()
    adapter.unmerge()
    assert not adapter.merged
    # fp32 rounding of W + ΔW − ΔW is a few ulps of |W| + |ΔW|, element by element.
    error = (base.weight.detach().double() - original).abs()
    ulps = torch.finfo(torch.float32).eps * (original.abs() + reference_delta(adapter).abs())
    assert bool((error <= 2 * ulps).all())
    assert relative_error(adapter(x).detach(), unmerged.double()) < 1e-6


def magnitudes(adapter) -> torch.Tensor:
    """Σ|terms| of every ΔW entry in float64: `reference_delta` of the factors' magnitudes."""
    original = {name: param.detach().clone() for name, param in adapter.named_parameters()}
    with torch.no_grad():
        for param in adapter.parameters():
            param.abs_()
        total = reference_delta(adapter).abs()
        for name, param in adapter.named_parameters():
            param.copy_(original[name])
    return total


@given(
    st.sampled_from(ADAPTER_FORMS),
    st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    st.lists(st.floats(-1.0, 1.0), min_size=4, max_size=4),
    st.integers(0, 2**16),
)
def test_a_model_merge_writes_the_rounded_sum_everywhere_or_nothing(form, dtype, powers, seed):
    """Factors scaled by powers of two across their dtype's range: a model merge writes
    W + ΔW (float64 by einsum, rounded to the dtype) into every layer, finite, or raises
    `NonFiniteError` with every weight as it was; never an Inf, never some layers only."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    model = model.to(dtype)
    inject(model, ["0", "1"], rank=2, form=form, alpha=3.0)
    top = math.frexp(torch.finfo(dtype).max)[1]
    with torch.no_grad():
        for index, adapter in enumerate((model[0], model[1])):
            randomise(adapter, seed + index)
        factors = [p for p in model[1].parameters() if p.requires_grad]
        for factor, power in zip(factors, powers, strict=False):
            factor.mul_(2.0 ** round(power * top))
    before = [layer.base.weight.detach().clone() for layer in model]
    expected = [w.double() + reference_delta(layer) for w, layer in zip(before, model, strict=True)]
    sizes = [w.double().abs() + magnitudes(layer) for w, layer in zip(before, model, strict=True)]
    try:
        lnn.merge(model)
    except NonFiniteError:
        unchanged = zip(model, before, strict=True)
        assert all(torch.equal(layer.base.weight, w) for layer, w in unchanged)
        assert not any(layer.merged for layer in model)
        return
    info = torch.finfo(dtype)
    for layer, exact, size in zip(model, expected, sizes, strict=True):
        got = layer.base.weight.detach()
        assert bool(torch.isfinite(got).all())
        # one rounding to the dtype, after float32 sums a few ulps of Σ|terms| off
        allowed = info.eps * exact.abs() + 2.0**-20 * size + info.tiny
        assert bool(((got.double() - exact).abs() <= allowed).all())


def test_a_merge_refuses_a_delta_whose_float32_sums_overflow_though_its_entries_would_not():
    """Tucker2 sums `mid · down` first: 2 · 1e25 · 1e25 leaves float32, though with `up` at
    1e-36 each exact ΔW entry is about 1e14; the merge says so and writes nothing."""
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    inject(model, ["0", "1"], rank=2, form="tucker2")
    randomise(model[0])
    with torch.no_grad():
        model[1].down.fill_(1e25)
        model[1].mid.fill_(1e25)
        model[1].up.fill_(1e-36)
    before = [layer.base.weight.detach().clone() for layer in model]
    assert bool(torch.isfinite(reference_delta(model[1])).all())
    with pytest.raises(NonFiniteError, match=r"adapter '1'.*ΔW"):
        lnn.merge(model)
    assert all(torch.equal(layer.base.weight, w) for layer, w in zip(model, before, strict=True))
    with pytest.raises(NonFiniteError, match=r"ΔW"):
        model[1].merge()
    assert torch.equal(model[1].base.weight, before[1])


@pytest.mark.parametrize("replaced", ["base.weight", "up"])
def test_a_merge_with_a_weight_or_factor_of_another_shape_is_a_shape_error_first(replaced):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    inject(model, ["0", "1"], rank=2)
    for layer in model:
        randomise(layer)
    shape = (8, 6) if replaced == "base.weight" else (9, 2)
    module, _, name = replaced.rpartition(".")
    setattr(model[1].get_submodule(module), name, nn.Parameter(torch.randn(shape)))
    before = model[0].base.weight.detach().clone()
    message = {"base.weight": r"shape \(8, 6\).*ΔW has \(8, 8\)",
               "up": r"factor 'up' has shape \(9, 2\), but \(8, 2\)"}[replaced]  # fmt: skip
    with pytest.raises(ShapeError, match=rf"adapter '1'.*{message}"):
        lnn.merge(model)
    assert torch.equal(model[0].base.weight, before) and not model[0].merged


def test_a_model_merge_and_unmerge_compute_each_delta_once(monkeypatch):
    """Every adapter is checked before any weight is written; where its factors' norms bound
    W ± ΔW within the dtype, that check needs no ΔW, so each merge computes ΔW once."""
    model = nn.Sequential(*(nn.Linear(6, 6) for _ in range(3)))
    inject(model, ["0", "1", "2"], rank=2)
    for layer in model:
        randomise(layer)
    calls = []
    dense = nn_variants.LoRAVariant.dense
    monkeypatch.setattr(nn_variants.LoRAVariant, "dense",
                        lambda self, *args: calls.append(1) or dense(self, *args))  # fmt: skip
    lnn.merge(model)
    assert len(calls) == 3
    lnn.unmerge(model)
    assert len(calls) == 6


def test_alpha_scale_and_trainable_scale():
    assert LoRALinear(nn.Linear(4, 4), 4, alpha=16).scale == 4.0
    assert LoRAConv(nn.Conv2d(4, 4, 3), (4, 2), alpha=8, form="tucker2").scale == 4.0
    assert LoRALinear(nn.Linear(4, 4), 4).scale == 1.0
    adapter = LoRALinear(nn.Linear(4, 3), 2, alpha=4, trainable_scale=True)
    assert isinstance(adapter.scale, nn.Parameter) and adapter.scale.item() == 2.0
    assert "trainable" in repr(adapter)
    assert count_parameters(adapter) == (2 * (4 + 3) + 1, 4 * 3 + 3)
    randomise(adapter)
    adapter(torch.randn(5, 4)).sum().backward()
    assert adapter.scale.grad is not None and adapter.scale.grad.abs() > 0


@given(conv_cases(), st.integers(1, 6), st.integers(1, 6))
def test_trainable_parameters_equal_param_count(case, in_ch, out_ch):
    form, kernel, stride, padding, dilation, rank, _ = case
    base = CONVS[len(kernel)](in_ch, out_ch, kernel, stride, padding, dilation)
    adapter = LoRAConv(base, rank, form=form)
    trainable, frozen = count_parameters(adapter)
    assert trainable == param_count(form, in_ch, out_ch, kernel, rank)
    assert trainable == adapter.factors().num_params
    assert frozen == sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("form", ADAPTER_FORMS)
@pytest.mark.parametrize(
    ("kernel", "spatial"), [((), (7,)), ((3,), (9,)), ((3, 5), (6, 7)), ((3, 1, 3), (4, 5, 3))]
)
def test_forward_flops_match_torch_flop_counter(form, kernel, spatial):
    in_ch, out_ch, rank = 6, 10, 3
    if kernel:
        padding = tuple(k // 2 for k in kernel)
        base = CONVS[len(kernel)](in_ch, out_ch, kernel, padding=padding)
        adapter = LoRAConv(base, rank, form=form)
        x = torch.randn(1, in_ch, *spatial)
    else:
        adapter = LoRALinear(nn.Linear(in_ch, out_ch), rank, form=form)
        x = torch.randn(*spatial, in_ch)
    with FlopCounterMode(display=False) as counter:
        adapter(x)
    dense = forward_flops("dense", in_ch, out_ch, kernel, spatial=spatial)
    branch = forward_flops(form, in_ch, out_ch, kernel, rank, spatial)
    assert counter.get_total_flops() == dense + branch


@pytest.mark.parametrize("form", ["lora", "tucker2", "cp"])
def test_forward_flops_without_padding_undercount_the_forms_on_the_input_grid(form):
    """No padding makes the output grid (7×7) smaller than the input's (9×9): LoCon's `down`
    carries the kernel and stays exact; Tucker2's 1×1 `down` and CP's input factor run on the
    input grid, which the model (every factor on the output grid) undercounts."""
    adapter = LoRAConv(nn.Conv2d(16, 32, 3), 4, form=form)
    with FlopCounterMode(display=False) as counter:
        out = adapter(torch.randn(1, 16, 9, 9))
    spatial = tuple(out.shape[2:])
    model = forward_flops("dense", 16, 32, (3, 3), spatial=spatial) + forward_flops(
        form, 16, 32, (3, 3), 4, spatial
    )
    assert (counter.get_total_flops() == model) == (form == "lora")
    assert counter.get_total_flops() >= model


def test_inject_replaces_nested_modules_on_their_parents():
    torch.manual_seed(0)
    model = TinyNet()
    before = {name: m.weight.detach().clone() for name, m in model.named_modules() if "to_" in name}
    names = inject(model, ["to_q", "blocks.*.attn.to_v", "re:blocks\\.1\\.conv"], rank=2)
    assert names == [
        "blocks.0.attn.to_q",
        "blocks.0.attn.to_v",
        "blocks.1.conv",
        "blocks.1.attn.to_q",
        "blocks.1.attn.to_v",
    ]
    for name in names:
        adapter = model.get_submodule(name)
        assert isinstance(adapter, (LoRALinear, LoRAConv))
    assert isinstance(model.blocks[0].conv, nn.Conv2d)
    for module in model.modules():
        assert all("." not in key for key in module._modules)  # the seed's dotted setattr bug
    for name, weight in before.items():
        assert torch.equal(model.get_submodule(name).base.weight, weight)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == 2 * 2 * (4 + 4) + 2 * 2 * (6 + 6) + 2 * (6 * 9 + 6)
    assert all(("down" in n or "up" in n) for n, p in model.named_parameters() if p.requires_grad)


def test_inject_checks_every_target_before_replacing_any():
    model = TinyNet()
    with pytest.raises(TargetError, match=r"blocks\.0\.down"):
        inject(model, ["to_q", "blocks.0.down"], rank=2, form="centre_tap")
    assert isinstance(model.blocks[0].attn["to_q"], nn.Linear)


def test_inject_on_meta_device_allocates_nothing():
    with torch.device("meta"):
        model = TinyNet()
    inject(model, {"to_q": {"r": 2, "trainable_scale": True}, "temporal": {"r": 3}})
    assert all(p.is_meta for p in model.parameters())
    trainable, _ = count_parameters(model)
    assert trainable == (2 * (4 + 4) + 1) + (2 * (6 + 6) + 1) + 3 * (5 * 3 + 7)


def test_count_parameters_counts_shared_parameters_once():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, shared)
    assert count_parameters(model) == (12, 0)
    model.requires_grad_(False)
    assert count_parameters(model) == (0, 12)


class DoubledLinear(nn.Linear):
    """An `nn.Linear` subclass with its own forward, which a fused adapter would bypass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: LoRAConv(nn.GroupNorm(1, 4), 2), TargetError, "GroupNorm"),
        (lambda: LoRALinear(nn.Linear(4, 4), 0), RankError, "rank"),
        (lambda: LoRALinear(nn.Linear(4, 4), (2, 2)), RankError, "an int"),
        (lambda: LoRALinear(nn.Linear(4, 4), 2, form="loha"), ArgumentError, "loha"),
        (lambda: LoRALinear(nn.Linear(4, 4), 2, form="dense"), ArgumentError, "dense"),
        (lambda: LoRALinear(nn.Linear(4, 4), 2, 1.0, scale=1.0), ArgumentError, "alpha or scale"),
        (lambda: LoRALinear(nn.Linear(4, 4), 2, scale=math.nan), NonFiniteError, "scale"),
        (lambda: LoRALinear(nn.Linear(4, 4), 2, alpha=math.inf), NonFiniteError, "alpha"),
        (lambda: LoRALinear(nn.Linear(4, 4), 2, alpha="8"), ArgumentError, "alpha"),
        (
            lambda: LoRAConv(nn.Conv2d(4, 4, 3, stride=2, padding=1), 2, form="centre_tap"),
            TargetError,
            "stride",
        ),
        (lambda: LoRAConv(nn.Conv2d(4, 4, 3), 2, hard=True), TargetError, "1×1"),
        (
            lambda: LoRAConv(nn.Conv2d(4, 4, 3, padding=1, groups=2), 2, form="centre_tap"),
            TargetError,
            "groups",
        ),
        (lambda: LoRAConv(nn.Linear(4, 4), 2), TargetError, "LoRALinear"),
        (lambda: LoRAConv(nn.ConvTranspose2d(4, 4, 3), 2), TargetError, "ConvTranspose2d"),
        (lambda: inject(TinyNet(), "to_k", rank=2), TargetError, "to_k"),
        (lambda: inject(nn.Linear(3, 3), "re:.*", rank=2), TargetError, "root"),
        (lambda: inject(TinyNet(), "norm", rank=2), TargetError, "blocks.0.norm"),
        (lambda: inject(TinyNet(), "to_q"), RankError, "blocks.0.attn.to_q"),
        (lambda: LoRALinear(nn.Linear(4, 4), 2, form="cp", fused=True), TargetError, "'cp'"),
        (lambda: LoRAConv(nn.Conv2d(4, 4, 3), 2, fused=True), TargetError, "convolution"),
        (
            lambda: LoRALinear(nn.Linear(4, 4), 2, trainable_scale=True, fused=True),
            TargetError,
            "trainable_scale",
        ),
        (lambda: LoRALinear(nn.Linear(4, 4), 2, hard=True, fused=True), TargetError, "hard"),
        (lambda: inject(TinyNet(), "proj", rank=2, fused=True), TargetError, "blocks.0.proj"),
        (lambda: LoRALinear(DoubledLinear(4, 4), 2, fused=True), TargetError, "overrides"),
        (lambda: inject(TinyNet(), {"to_q": {"r": 2, "fused": "no"}}), TargetError, "fused"),
        (lambda: inject(TinyNet(), {"to_q": {"r": 2, "hard": 1}}), TargetError, "hard"),
        (lambda: LoRALinear(nn.Linear(4, 4), 2, dropout=1.0), ArgumentError, "dropout"),
        (lambda: LoRALinear(nn.Linear(4, 4), 2, dropout=math.nan), ArgumentError, "dropout"),
        (lambda: LoRAConv(nn.Conv2d(4, 4, 1), 2, hard=True, dropout=0.1), TargetError, "hard"),
    ],
)
def test_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_linear_centre_tap_is_plain_lora():
    adapter = LoRALinear(nn.Linear(5, 4, dtype=torch.float64), 2, form="centre_tap")
    assert adapter.down.shape == (2, 5) and adapter.up.shape == (4, 2)
    assert adapter.delta_weight().shape == (4, 5)


@pytest.fixture
def fused_calls(monkeypatch):
    """Records every `lora_linear` call the adapters make (and still runs it)."""
    calls = []
    run = nn_layers.lora_linear

    def recorded(*args, **kwargs):
        calls.append(args[0].shape)
        return run(*args, **kwargs)

    monkeypatch.setattr(nn_layers, "lora_linear", recorded)
    return calls


@pytest.mark.parametrize("form", ["lora", "centre_tap"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_fused_linear_adapter_matches_float64_forward_and_gradients(fused_calls, form, dtype, tol):
    """float32 runs the Triton kernels in `make test` (interpreter), float64 the torch path."""
    base = nn.Linear(24, 20, dtype=dtype)
    adapter = LoRALinear(base, 3, form=form, scale=0.7, fused=True)
    randomise(adapter)
    x = torch.randn(5, 2, 24, dtype=dtype, requires_grad=True)
    y = adapter(x)
    assert fused_calls == [(5, 2, 24)]
    leaves = [t.detach().double().requires_grad_() for t in (x, adapter.down, adapter.up)]
    weight, bias = base.weight.detach().double(), base.bias.detach().double()
    xd, down, up = leaves
    expected = F.linear(xd, weight, bias) + 0.7 * (xd @ down.t()) @ up.t()
    assert relative_error(y, expected.detach()) < tol
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.to(dtype))
    expected.backward(dy)
    for ours, theirs in zip((x, adapter.down, adapter.up), leaves, strict=True):
        assert relative_error(ours.grad, theirs.grad) < tol
    assert base.weight.grad is None


def test_fused_adapter_merged_runs_the_base_layer_alone(fused_calls):
    adapter = LoRALinear(nn.Linear(6, 4, dtype=torch.float64), 2, scale=0.5, fused=True)
    randomise(adapter)
    x = torch.randn(3, 6, dtype=torch.float64)
    unmerged = adapter(x)
    adapter.merge()
    assert relative_error(adapter(x), unmerged.detach()) < 1e-12
    assert len(fused_calls) == 1


def test_inject_fused_by_argument_and_by_per_pattern_setting():
    model = TinyNet()
    names = inject(model, "to_q", rank=2, fused=True)
    assert names and all(model.get_submodule(n).fused for n in names)
    model = TinyNet()
    inject(model, {"to_q": {"r": 2, "fused": True}, "to_v": {"r": 2}})
    fused = {n: m.fused for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert fused and all(fused[n] == n.endswith("to_q") for n in fused)


def test_a_fresh_process_imports_only_what_it_uses():
    """`import lowrank` alone gives `lowrank.io`, `lowrank.nn` and `lowrank.kernels`, as the
    docs write them, and stays cheap: the adapters reach the kernels through
    `lowrank.kernels`, so Triton loads when a kernel first runs, dynamo only under
    torch.compile, and transformers (for its `Conv1D`) only where a model has one. Then
    `count_model`, `inject`, a merge, `merge_and_unload`, `unload` and `apply_adapter` of a
    plain model work and leave `torch.distributed.fsdp` unimported (a second or so to import;
    no module is sharded before it is, so their checks for FSDP2 groups and wrappers find
    none without it). One fresh process checks it all."""
    code = """
import sys, torch
from torch import nn
import lowrank
print([m in sys.modules for m in ('triton', 'torch._dynamo', 'transformers')])
print(lowrank.io.load_adapter.__name__, lowrank.nn.inject.__name__,
      lowrank.kernels.lora_linear.__name__)
from lowrank import nn as lnn
from lowrank.io import apply_adapter, model_adapter
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
x = torch.randn(2, 4)
lowrank.count_model(model(), ["0"], rank=2)
adapted = model()
lnn.inject(adapted, ["0", "1"], rank=2)
with torch.no_grad():
    adapted[0].up.fill_(0.3)
    expected = adapted(x)
adapter = model_adapter(adapted)
lnn.merge(adapted)
lnn.unmerge(adapted)
dense = lnn.merge_and_unload(adapted)
plain = model()
lnn.inject(plain, ["0"], rank=2)
lnn.unload(plain)
applied = model()
apply_adapter(applied, adapter)
with torch.no_grad():
    print(torch.allclose(dense(x), expected, atol=1e-6),
          torch.allclose(applied(x), expected, atol=1e-6))
print(sorted(m for m in sys.modules if m.startswith("torch.distributed.fsdp")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    loaded, names, equal, fsdp = done.stdout.splitlines()
    assert loaded == "[False, False, False]"
    assert names.split() == ["load_adapter", "inject", "lora_linear"]
    assert equal == "True True"
    assert fsdp == "[]"


@pytest.mark.parametrize("wrap", ["forward_hook", "pre_hook", "instance_forward", "backward_hook"])
def test_fused_adapter_runs_the_base_layer_when_it_is_hooked(fused_calls, wrap):
    """Hooks and a replaced `forward` on the base (as offloading wrappers add) only run when the
    base is called: the adapter then takes the unfused path, and the result is the same."""
    base = nn.Linear(6, 4, dtype=torch.float64)
    if wrap == "forward_hook":
        base.register_forward_hook(lambda module, inputs, output: output + 100)
    elif wrap == "pre_hook":
        base.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 3,))
    elif wrap == "instance_forward":
        plain = base.forward
        base.forward = lambda x: plain(x) - 7
    else:
        base.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(1))
    seen = []
    adapter = LoRALinear(base, 2, scale=0.5, fused=True)
    randomise(adapter)
    x = torch.randn(3, 6, dtype=torch.float64)
    branch = 0.5 * (x @ adapter.down.detach().t()) @ adapter.up.detach().t()
    y = adapter(x.requires_grad_())
    assert relative_error(y, (base(x) + branch).detach()) < 1e-12
    assert fused_calls == []
    y.sum().backward()
    assert seen == ([1] if wrap == "backward_hook" else [])


def test_fused_adapter_on_the_meta_device_infers_the_output_shape():
    with torch.device("meta"):
        adapter = LoRALinear(nn.Linear(8, 6), 2, alpha=4, fused=True)
        y = adapter(torch.empty(3, 5, 8))
    assert y.device.type == "meta" and y.shape == (3, 5, 6)


@pytest.mark.parametrize("linear", [True, False])
def test_dropout_drops_the_branch_input_in_training_only(linear):
    """Unfused: `base(x) + scale · branch(dropout(x))` in training, torch's dropout drawn
    from the global generator; in eval mode no dropout at all."""
    if linear:
        base, x = nn.Linear(12, 7, dtype=torch.float64), torch.randn(9, 12, dtype=torch.float64)
    else:
        base = nn.Conv2d(5, 4, 3, padding=1, dtype=torch.float64)
        x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    adapter = (LoRALinear if linear else LoRAConv)(base, 3, scale=0.5, dropout=0.4)
    randomise(adapter)
    plain = (LoRALinear if linear else LoRAConv)(base, 3, scale=0.5)
    plain.load_state_dict(adapter.state_dict())
    torch.manual_seed(5)
    y = adapter(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.4, training=True)
    assert not torch.equal(dropped, x)
    expected = base(x) + (plain(dropped) - base(dropped))
    assert relative_error(y, expected.detach()) < 1e-12
    adapter.eval()
    assert relative_error(adapter(x), plain(x).detach()) < 1e-12


def test_fused_dropout_uses_the_kernels_mask_in_training_only(fused_calls):
    """Fused: lora_linear's own mask (seed drawn from the global generator), PEFT's
    semantics; eval mode passes dropout_p = 0."""
    from lowrank.kernels import lora_dropout_mask

    base = nn.Linear(24, 20)
    adapter = LoRALinear(base, 3, scale=0.6, fused=True, dropout=0.25)
    randomise(adapter)
    x = torch.randn(6, 24)
    torch.manual_seed(11)
    y = adapter(x)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    keep = lora_dropout_mask(x, 0.25, seed).double()
    xd, down, up = (t.detach().double() for t in (x, adapter.down, adapter.up))
    branch = 0.6 * ((xd * keep / 0.75) @ down.t()) @ up.t()
    expected = F.linear(xd, base.weight.detach().double(), base.bias.detach().double()) + branch
    assert 0 < int(keep.sum()) < keep.numel()
    assert relative_error(y, expected) < 2e-5
    adapter.eval()
    no_drop = F.linear(xd, base.weight.detach().double(), base.bias.detach().double())
    assert relative_error(adapter(x), no_drop + 0.6 * (xd @ down.t()) @ up.t()) < 2e-5
    assert len(fused_calls) == 2


def test_inject_passes_dropout_by_argument_and_per_pattern():
    model = TinyNet()
    inject(model, {"to_q": {"r": 2, "dropout": 0.1}, "to_v": {"r": 2}}, dropout=0.05)
    drops = {n: m.dropout for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert drops and all(p == (0.1 if n.endswith("to_q") else 0.05) for n, p in drops.items())


def test_inject_keyword_settings_and_numpy_numbers_in_per_pattern_settings():
    """Keyword defaults are taken as given (like the adapter classes take them); per-pattern
    numbers may be NumPy scalars; a default dropout skips `hard` patterns (no branch input)."""
    import numpy as np

    model = TinyNet()
    inject(model, "to_q", rank=2, fused=1)
    assert all(m.fused for m in model.modules() if isinstance(m, LoRALinear))
    model = TinyNet()
    config = {"to_q": {"r": 2, "dropout": np.float32(0.25), "alpha": np.int64(4)},
              "proj": {"r": 2, "hard": True}}  # fmt: skip
    inject(model, config, dropout=0.1)
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear | LoRAConv)}
    assert {n: m.dropout for n, m in adapters.items()} == {
        n: (0.25 if n.endswith("to_q") else 0.0) for n in adapters
    }
    assert all(m.scale == 2.0 for n, m in adapters.items() if n.endswith("to_q"))
