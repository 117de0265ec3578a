"""The layers adapters now take: grouped and depthwise convolutions (against float64 convs
with a per-group einsum ΔW, counts and bounds), nn.Embedding and transformers' Conv1D
(against the real PEFT), the inference path of conv adapters, and the settings object."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowrank import DTypeError, LowRankError, MergeError, TargetError
from lowrank.bounds import max_useful_rank, param_count
from lowrank.io import model_adapter, save_adapter
from lowrank.nn import (
    AdapterConfig,
    LoRAConv,
    LoRAConv1D,
    LoRAEmbedding,
    count_parameters,
    inject,
    merge,
    merge_and_unload,
)
from lowrank.report import count_model

CONVS = {1: nn.Conv1d, 2: nn.Conv2d}
F_CONVS = {1: F.conv1d, 2: F.conv2d}


def randomise(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def grouped_reference_delta(adapter: LoRAConv) -> torch.Tensor:
    """Block-diagonal ΔW `(out, in/g, *k)` in float64, one einsum per group (no lowrank code)."""
    g = adapter.base.groups
    p = {n: t.detach().double() for n, t in adapter.named_parameters() if t.requires_grad}
    blocks = []
    for j in range(g):
        if adapter.form == "cp":
            rank = p["out_factor"].shape[1]
            out = p["out_factor"].chunk(g)[j]
            inp = p["in_factor"].chunk(g)[j]
            spatial = [p[f"spatial_factors.{i}"][:, j * rank:(j + 1) * rank]
                       for i in range(len(adapter.kernel_size))]  # fmt: skip
            letters = "abc"[: len(spatial)]
            spec = ",".join(["oz", "iz", *[f"{c}z" for c in letters]]) + "->oi" + letters
            blocks.append(torch.einsum(spec, out, inp, *spatial))
            continue
        up = p["up"].chunk(g)[j].flatten(1)
        if adapter.form == "tucker2":
            down = p["down"].chunk(g)[j].flatten(1)
            mid = p["mid"].chunk(g)[j]
            blocks.append(torch.einsum("tp,pq...,qs->ts...", up, mid, down))
        else:
            blocks.append(torch.tensordot(up, p["down"].chunk(g)[j], dims=1))
    return adapter.scale * torch.cat(blocks)


@st.composite
def grouped_cases(draw):
    form = draw(st.sampled_from(["lora", "tucker2", "cp"]))
    dims = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 3))
    per_in, per_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    in_ch, out_ch = (groups, groups) if depthwise else (groups * per_in, groups * per_out)
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = tuple(draw(st.integers(0, 1)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    rank = draw(st.integers(1, 3))
    spatial = tuple(d * (k - 1) + 1 + draw(st.integers(0, 2))
                    for k, d in zip(kernel, dilation, strict=True))  # fmt: skip
    return form, groups, in_ch, out_ch, kernel, stride, padding, dilation, rank, spatial


@given(grouped_cases())
def test_grouped_conv_adapter_equals_grouped_conv_with_block_diagonal_update(case):
    form, groups, in_ch, out_ch, kernel, stride, padding, dilation, rank, spatial = case
    base = CONVS[len(kernel)](in_ch, out_ch, kernel, stride, padding, dilation, groups,
                              dtype=torch.float64)  # fmt: skip
    adapter = LoRAConv(base, rank, alpha=2.0, form=form)
    randomise(adapter)
    x = torch.randn(2, in_ch, *spatial, dtype=torch.float64)
    weight = base.weight.detach() + grouped_reference_delta(adapter)
    expected = F_CONVS[len(kernel)](x, weight, base.bias, stride, padding, dilation, groups)
    torch.testing.assert_close(adapter(x), expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), expected, rtol=1e-12, atol=1e-12)
    trainable, _ = count_parameters(adapter)
    assert trainable == param_count(form, in_ch, out_ch, kernel, rank, groups=groups)
    adapter.merge()
    torch.testing.assert_close(base.weight.detach(), weight, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["lora", "tucker2", "cp"])
@pytest.mark.parametrize(("channels", "groups"), [(8, 1), (8, 2), (12, 4), (6, 6)])
def test_grouped_bounds_match_the_counts_of_real_modules(form, channels, groups):
    """`count(r_max) < dense ≤ count(r_max + 1)` with counts of built modules and the dense
    weight's own size."""
    base = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, device="meta")
    dense = base.weight.numel()
    r_max = max_useful_rank(form, channels, channels, (3, 3), groups=groups)

    def count(rank: int) -> int:
        return count_parameters(LoRAConv(base, rank, form=form))[0]

    if r_max:
        assert count(r_max) < dense
    assert count(r_max + 1) >= dense
    if groups == channels:  # depthwise: only CP (8R < 9 at R = 1) ever saves parameters
        assert r_max == (1 if form == "cp" else 0)


def test_factors_of_a_grouped_adapter_point_to_delta_weight():
    adapter = LoRAConv(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(TargetError, match="per group"):
        adapter.factors()


# -- nn.Embedding and transformers Conv1D against the real PEFT -------------------------------


def peft_model(model: nn.Module, targets: list[str], **config):
    peft = pytest.importorskip("peft")
    lora_config = peft.LoraConfig(target_modules=targets, init_lora_weights=False, **config)
    return peft.get_peft_model(model, lora_config)


def copy_peft_factors(peft_wrapped: nn.Module, ours: nn.Module) -> None:
    """PEFT's random factors into our adapters of the same names (`lora_A` → down,
    `lora_B` → up; embeddings: `lora_embedding_A/B`)."""
    with torch.no_grad():
        for name, module in peft_wrapped.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.r:
                continue
            target = ours.get_submodule(name.removeprefix("base_model.model."))
            if module.lora_embedding_A:
                down, up = module.lora_embedding_A["default"], module.lora_embedding_B["default"]
            else:
                down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
            target.down.copy_(down)
            target.up.copy_(up.reshape(target.up.shape))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, padding_idx=0)
        self.proj = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


@pytest.mark.parametrize("rslora", [False, True])
def test_embedding_adapter_equals_peft(rslora):
    torch.manual_seed(0)
    model = TinyLM()
    ours = copy.deepcopy(model)
    names = inject(ours, ["embed", "proj"], rank=4, alpha=8, rslora=rslora)
    assert names == ["embed", "proj"] and isinstance(ours.embed, LoRAEmbedding)
    theirs = peft_model(model, ["embed", "proj"], r=4, lora_alpha=8, use_rslora=rslora)
    copy_peft_factors(theirs, ours)
    ids = torch.tensor([[0, 3, 19, 7], [5, 5, 1, 0]])
    torch.testing.assert_close(ours(ids), theirs(ids), rtol=1e-6, atol=1e-6)
    ours(ids).square().sum().backward()
    assert ours.embed.down.grad[:, 0].abs().sum() == 0  # padding_idx gets no gradient
    merged_ours = merge_and_unload(ours)
    merged_theirs = theirs.merge_and_unload()
    assert type(merged_ours.embed) is nn.Embedding
    torch.testing.assert_close(merged_ours.embed.weight, merged_theirs.embed.weight,
                               rtol=1e-6, atol=1e-6)  # fmt: skip


def tiny_gemma():
    transformers = pytest.importorskip("transformers")
    config = transformers.GemmaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=8,
                                      tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return transformers.GemmaForCausalLM(config).eval()


@pytest.mark.parametrize("hard", [False, True])
def test_scaled_embedding_adapter_equals_peft_on_gemma(hard):
    """Gemma's embedding multiplies its lookup by `embed_scale` (√16 = 4): PEFT multiplies
    the branch by it too, so the layer computes `embed_scale · (W + ΔW)[ids]` and merges."""
    model = tiny_gemma()
    ours = copy.deepcopy(model)
    inject(ours, ["embed_tokens"], rank=2, alpha=4, hard=hard)
    theirs = peft_model(model, ["embed_tokens"], r=2, lora_alpha=4)
    copy_peft_factors(theirs, ours)
    ids = torch.tensor([[1, 5, 9, 2, 31]])
    embed = ours.model.embed_tokens
    with torch.no_grad():
        delta = (embed.up.double() @ embed.down.double()).T * embed.scale
        expected = 4.0 * (embed.base.weight.double() + delta)[ids]
        torch.testing.assert_close(embed(ids).double(), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    merged_ours, merged_theirs = merge_and_unload(ours), theirs.merge_and_unload()
    torch.testing.assert_close(merged_ours.model.embed_tokens.weight,
                               merged_theirs.model.embed_tokens.weight, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(merged_ours(ids).logits, merged_theirs(ids).logits,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


class MixedNet(nn.Module):
    """Every adapted layer kind: a lookup, a GPT-2 `Conv1D`, a convolution, a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
        self.embed = nn.Embedding(20, 6)
        self.c_fc = conv1d(8, 6)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.c_fc(self.embed(ids)).transpose(1, 2)
        return self.head(F.relu(self.conv(hidden)).transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_factors_over_a_half_precision_base_equal_peft(dtype):
    """PEFT keeps the factors of a bfloat16/float16 model in float32 (`autocast_adapter_dtype`),
    and diffusers' LoRA scripts cast them so (`cast_training_params`): the branch then runs in
    float32 and the layer's output keeps the base's dtype (it was a raw dtype RuntimeError,
    and a float32 output from an embedding)."""
    torch.manual_seed(0)
    model = MixedNet().to(dtype)
    ours = copy.deepcopy(model)
    targets = ["embed", "c_fc", "conv", "head"]
    inject(ours, targets, rank=2, alpha=4, dropout=0.25)
    for parameter in ours.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    theirs = peft_model(model, targets, r=2, lora_alpha=4, lora_dropout=0.25, fan_in_fan_out=True)
    copy_peft_factors(theirs, ours)
    ids = torch.tensor([[0, 3, 19, 7], [5, 5, 1, 2]])
    for train in (True, False):
        ours.train(train), theirs.train(train)
        torch.manual_seed(1)
        got = ours(ids)
        torch.manual_seed(1)
        want = theirs(ids)
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        got.float().square().sum().backward()
        want.float().square().sum().backward()
        for name in targets:
            layer = ours.get_submodule(name)
            peft_layer = theirs.base_model.model.get_submodule(name)
            if name == "embed":
                a, b = peft_layer.lora_embedding_A, peft_layer.lora_embedding_B
                pair = (a["default"], b["default"])
            else:
                pair = (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)
            for factor, grad in zip((layer.down, layer.up), (p.grad for p in pair), strict=True):
                assert factor.grad.dtype == torch.float32
                torch.testing.assert_close(factor.grad, grad.reshape(factor.shape), rtol=1e-5,
                                           atol=1e-6)  # fmt: skip
                factor.grad = None
        theirs.zero_grad()
    # a traced graph casts the branch input as the model does (it ran float32 factors on the
    # bfloat16 input: a raw dtype RuntimeError)
    traced = torch.fx.symbolic_trace(ours)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(traced(ids), theirs(ids), rtol=0, atol=0)



def test_factor_dtype_float32_over_a_bfloat16_llama_equals_peft_through_adam_steps():
    """`factor_dtype=torch.float32` is PEFT's default over a bfloat16 model
    (`autocast_adapter_dtype`): float32 factors, forward, gradients and three Adam steps equal
    PEFT's (`get_peft_model`, the same factors) bit for bit, with dropout. Without the setting
    the factors were bfloat16, the branch and its gradients rounded to bfloat16."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    ours = copy.deepcopy(model)
    targets = ["q_proj", "v_proj", "down_proj"]
    inject(ours, targets, rank=4, alpha=8, dropout=0.1, factor_dtype=torch.float32)
    theirs = peft_model(model, targets, r=4, lora_alpha=8, lora_dropout=0.1)
    copy_peft_factors(theirs, ours)
    ids = torch.tensor([[1, 5, 30, 7, 2], [4, 4, 9, 0, 11]])
    ours.train(), theirs.train()

    def trainable(net):
        return [(n.removeprefix("base_model.model."), p) for n, p in net.named_parameters()
                if p.requires_grad]  # fmt: skip

    mine, peft_params = trainable(ours), trainable(theirs)
    assert len(mine) == len(peft_params) == 6
    assert {p.dtype for _, p in mine} == {p.dtype for _, p in peft_params} == {torch.float32}
    opt_ours = torch.optim.Adam([p for _, p in mine], lr=1e-2)
    opt_theirs = torch.optim.Adam([p for _, p in peft_params], lr=1e-2)
    for step in range(3):
        torch.manual_seed(10 + step)
        got = ours(ids).logits
        torch.manual_seed(10 + step)
        want = theirs(ids).logits
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        got.float().square().mean().backward()
        want.float().square().mean().backward()
        peft_grads = {n.replace(".lora_A.default.weight", ".down")
                      .replace(".lora_B.default.weight", ".up"): p.grad
                      for n, p in peft_params}  # fmt: skip
        for name, param in mine:
            torch.testing.assert_close(param.grad, peft_grads[name], rtol=0, atol=0)
        opt_ours.step(), opt_theirs.step()
        opt_ours.zero_grad(), opt_theirs.zero_grad()
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=0)



@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_factor_dtype_float32_merges_and_saves_as_peft_does(tmp_path, dora):
    """float32 factors (and DoRA magnitudes, float32 in PEFT too) over a bfloat16 model: the
    forward, `merge_and_unload` (ΔW rounded once to the bfloat16 weight) and a written PEFT
    folder, loaded by PEFT, equal PEFT's bit for bit."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).to(torch.bfloat16)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    ours = copy.deepcopy(base)
    inject(ours, ["0", "2"], rank=2, alpha=4, factor_dtype=torch.float32, dora=dora)
    theirs = peft_model(copy.deepcopy(base), ["0", "2"], r=2, lora_alpha=4, use_dora=dora)
    copy_peft_factors(theirs, ours)
    with torch.no_grad():
        for name in ("0", "2"):
            if dora:
                magnitude = theirs.base_model.model.get_submodule(name).lora_magnitude_vector
                assert ours.get_submodule(name).magnitude.dtype == torch.float32
                ours.get_submodule(name).magnitude.copy_(magnitude["default"].weight)
        assert torch.equal(ours(x), theirs(x))
        save_adapter(model_adapter(ours), tmp_path / "out", format="peft")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
        assert torch.equal(loaded(x), ours(x))
        merged = merge_and_unload(copy.deepcopy(ours))
        assert merged[0].weight.dtype == torch.bfloat16
        assert torch.equal(merged(x), theirs.merge_and_unload()(x))

def test_factor_dtype_is_checked_and_defaults_to_the_base_weights():
    """`None` keeps the base weight's dtype; a pattern takes a name; anything but a float
    dtype is an error naming the module or pattern."""
    base = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(torch.bfloat16)
    model = copy.deepcopy(base)
    inject(model, {"0": {}, "1": {"factor_dtype": "float64"}}, rank=2)
    assert model[0].down.dtype == model[0].up.dtype == torch.bfloat16
    assert model[1].down.dtype == model[1].up.dtype == torch.float64
    model = copy.deepcopy(base)
    inject(model, ["0"], rank=2, factor_dtype=torch.float32, trainable_scale=True)
    assert {p.dtype for p in model[0].parameters() if p.requires_grad} == {torch.float32}
    for bad in ("float32", torch.int8, 4):
        with pytest.raises(DTypeError, match=r"module '0': factor_dtype must be a floating"):
            inject(copy.deepcopy(base), ["0"], rank=2, factor_dtype=bad)
    with pytest.raises(TargetError, match=r"target '0': factor_dtype must be a floating.*'fp32'"):
        inject(copy.deepcopy(base), {"0": {"factor_dtype": "fp32"}}, rank=2)
    fused = copy.deepcopy(base)
    inject(fused, ["0"], rank=2, fused=True, factor_dtype=torch.float32)
    with pytest.raises(DTypeError, match=r"fused LoRALinear \(4 → 3, rank 2\) has torch.float32"):
        fused(torch.ones(1, 4, dtype=torch.bfloat16))

def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_conv1d_adapter_equals_peft_on_gpt2():
    model = tiny_gpt2()
    ours = copy.deepcopy(model)
    names = inject(ours, ["c_attn", "c_proj"], rank=2, alpha=4)
    assert {type(ours.get_submodule(n)) for n in names} == {LoRAConv1D}
    theirs = peft_model(model, ["c_attn", "c_proj"], r=2, lora_alpha=4, fan_in_fan_out=True)
    copy_peft_factors(theirs, ours)
    ids = torch.tensor([[1, 5, 9, 2, 31]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    merged_ours, merged_theirs = merge_and_unload(ours), theirs.merge_and_unload()
    for name in names:
        torch.testing.assert_close(merged_ours.get_submodule(name).weight,
                                   merged_theirs.get_submodule(name).weight,
                                   rtol=1e-6, atol=1e-6)  # fmt: skip


def test_tie_weights_after_injecting_into_a_tied_lm_head_ties_its_base():
    """transformers' `tie_weights()` assigns the embedding's weight to whatever holds the LM
    head's place: an adapter passes it to its base, so the tie holds (logits as the model's
    plus the adapter's update, computed by hand) and merging still refuses; a merged adapter
    refuses the assignment, which would drop its ΔW, and nothing changes."""
    model = tiny_gpt2()
    inject(model, ["lm_head"], rank=2)
    head, embed = model.lm_head, model.transformer.wte
    nn.init.normal_(head.up)
    model.tie_weights()
    assert head.base.weight is embed.weight
    ids = torch.tensor([[1, 5, 9, 2, 31]])
    with torch.no_grad():
        hidden = model.transformer(ids).last_hidden_state.double()
        delta = head.up.double() @ head.down.double() * head.scale
        expected = hidden @ (embed.weight.double() + delta).T
        torch.testing.assert_close(model(ids).logits.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(MergeError, match="tied"):
        merge(model)
    untied = tiny_gpt2()
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    inject(untied, ["lm_head"], rank=2)
    merge(untied)
    before = untied.lm_head.base.weight.detach().clone()
    with pytest.raises(MergeError, match="merged LoRALinear"):
        untied.lm_head.weight = untied.transformer.wte.weight
    assert torch.equal(untied.lm_head.base.weight, before)
    assert untied.lm_head.base.weight is not untied.transformer.wte.weight


def test_fusing_a_batch_norm_into_an_adapted_conv_is_refused_and_after_unload_is_exact():
    """torch's `fuse_conv_bn_eval` assigns a weight and bias computed from the layer's
    effective weight `W + ΔW`: into an adapter, whose branch adds ΔW to its base, that would
    count ΔW twice, so it is refused by name; the model itself is untouched. After
    `merge_and_unload` the fused layer equals the conv-then-norm, computed in float64."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    inject(model, ["0"], rank=2)
    nn.init.normal_(model[0].up)
    x = torch.randn(2, 3, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model.double()(x.double()).detach()
    model.float()
    with pytest.raises(TargetError, match="bias of a LoRAConv"):
        fuse_conv_bn_eval(model[0], model[1])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    dense = merge_and_unload(model)
    fused = fuse_conv_bn_eval(dense[0], dense[1])
    torch.testing.assert_close(fused(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_all_linear_selects_what_peft_selects():
    model = tiny_gpt2()
    ours = copy.deepcopy(model)
    names = inject(ours, "all-linear", rank=2)
    theirs = peft_model(model, "all-linear", r=2, fan_in_fan_out=True)
    assert sorted(names) == sorted(theirs.targeted_module_names)
    assert "lm_head" not in names


def tiny_transformers_models():
    """Tiny random models of other architectures (tied heads, encoder-decoders, two towers,
    a Conv1d front end), built from configs."""
    tf = pytest.importorskip("transformers")
    size = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32}  # fmt: skip
    tower = {**size, "vocab_size": 32, "max_position_embeddings": 16}
    return {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**tower, num_key_value_heads=1)),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=32)),
        "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(**tower)),
        "clip": lambda: tf.CLIPModel(tf.CLIPConfig(
            text_config=tower, vision_config={**size, "image_size": 16, "patch_size": 8},
            projection_dim=8)),
        "whisper": lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=32,
            num_mel_bins=8, max_source_positions=8, max_target_positions=16, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["llama", "t5", "bert", "clip", "whisper"])
def test_all_linear_selects_and_counts_what_peft_does_on_other_architectures(name):
    """The output layer (T5's and Llama's `lm_head`, BERT's decoder, Whisper's `proj_out`) is
    left out, CLIP's projections are in, and the counts are PEFT's trainable parameters."""
    torch.manual_seed(0)
    model = tiny_transformers_models()[name]()
    report = count_model(model, "all-linear", rank=2)
    theirs = peft_model(copy.deepcopy(model), "all-linear", r=2)
    selected = sorted(theirs.targeted_module_names)
    assert sorted(row.name for row in report.rows) == selected
    assert sorted(inject(model, "all-linear", rank=2)) == selected
    trainable, total = theirs.get_nb_trainable_parameters()
    assert report.adapter_params == count_parameters(model)[0] == trainable
    assert report.base_params + report.adapter_params == total


def test_a_layer_called_with_more_than_its_input_is_refused_by_name():
    """Whisper's decoder calls its positional embedding with `cache_length=` (it returns
    rows of its table by position, not the lookup of the token ids it is given), BART's
    encoder calls its learned positional embedding with float embeddings (it reads their
    shape only): neither is ΔW applied to the input, so the adapter refuses them with a
    `LowRankError` naming the layer (they were a raw TypeError / RuntimeError)."""
    from lowrank import DTypeError

    model = tiny_transformers_models()["whisper"]()
    inject(model, ["decoder.embed_positions"], rank=2)
    features, ids = torch.randn(1, 8, 16), torch.tensor([[3, 5]])
    with pytest.raises(TargetError, match=r"WhisperPositionalEmbedding .*cache_length="):
        model(input_features=features, decoder_input_ids=ids)
    adapter = LoRAEmbedding(nn.Embedding(10, 4), 2)
    with pytest.raises(DTypeError, match="integer indices"):
        adapter(torch.randn(2, 3))
    with pytest.raises(TargetError, match="beyond its input"):
        adapter(torch.tensor([1, 2]), 0)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LoRAEmbedding(nn.Embedding(5, 3, max_norm=1.0), 2), "max_norm"),
        (lambda: LoRAEmbedding(nn.Embedding(5, 3), 2, dropout=0.1), "dropout"),
        (lambda: inject(nn.Sequential(nn.Embedding(5, 3)), "0", rank=2, fused=True), "fused"),
        (lambda: inject(nn.Sequential(nn.Embedding(5, 3, sparse=True)), "0", rank=2),
         "sparse=True"),
    ],
)
def test_embedding_errors(make, match):
    with pytest.raises(TargetError, match=match):
        make()


# -- conv adapters at inference: one convolution with W + ΔW where that is cheaper ------------


def convolutions_run(fn) -> int:
    """How many `aten::conv2d` calls `fn()` makes (torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key == "aten::conv2d")


def test_inference_conv_runs_one_convolution_where_cheaper():
    base = nn.Conv2d(16, 16, 3, padding=1, dtype=torch.float64)
    adapter = LoRAConv(base, 2, form="tucker2")
    randomise(adapter)
    weight = base.weight.detach() + grouped_reference_delta(adapter)
    big, small = (torch.randn(2, 16, n, n, dtype=torch.float64) for n in (16, 1))
    assert adapter.weight_space_is_cheaper(big) and not adapter.weight_space_is_cheaper(small)
    with torch.no_grad():
        for x, convolutions in ((big, 1), (small, 4)):
            expected = F.conv2d(x, weight, base.bias, padding=1)
            torch.testing.assert_close(adapter(x), expected, rtol=1e-12, atol=1e-12)
            assert convolutions_run(lambda x=x: adapter(x)) == convolutions
    assert convolutions_run(lambda: adapter(big).sum().backward()) == 4  # base and branch
    assert adapter.up.grad is not None


# -- the settings object ----------------------------------------------------------------------


def test_one_config_object_or_keywords_give_the_same_adapters():
    config = AdapterConfig(rank=(3, 2), form="tucker2", alpha=6.0, trainable_scale=True)
    by_object, by_keyword = nn.Conv2d(4, 5, 3), nn.Conv2d(4, 5, 3)
    a = LoRAConv(by_object, config=config)
    b = LoRAConv(by_keyword, (3, 2), 6.0, form="tucker2", trainable_scale=True)
    assert a.config == b.config and a.scale.item() == b.scale.item() == 3.0  # alpha / r_in
    override = LoRAConv(nn.Conv2d(4, 5, 3), config=config, rank=(4, 4))
    assert override.rank == (4, 4) and override.scale.item() == 1.5


SETTING_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 9), st.floats(allow_nan=True), st.text(max_size=3),
    st.tuples(st.integers(-1, 4), st.integers(-1, 4)),
)  # fmt: skip


@given(st.dictionaries(st.sampled_from(["rank", "form", "alpha", "rslora", "scale", "dropout",
                                        "trainable_scale", "hard", "fused", "bogus"]),
                       SETTING_VALUES, max_size=4))  # fmt: skip
def test_any_settings_build_an_adapter_or_raise_a_lowrank_error(settings):
    settings.setdefault("rank", 2)
    model = nn.Sequential(nn.Linear(4, 4))
    try:
        inject(model, "0", **settings)
    except LowRankError:
        assert type(model[0]) is nn.Linear and model[0].weight.requires_grad
        return
    adapter = model[0]
    assert count_parameters(model)[0] == adapter.num_params


def test_count_model_predicts_grouped_embedding_and_conv1d_adapters():
    model = nn.ModuleDict({
        "embed": nn.Embedding(11, 6),
        "grouped": nn.Conv2d(6, 9, 3, groups=3),
        "depthwise": nn.Conv1d(4, 4, 5, groups=4),
    })  # fmt: skip
    targets = {"embed": {"r": 2}, "grouped": {"r": [2, 3], "form": "tucker2"},
               "depthwise": {"r": 1, "form": "cp"}}  # fmt: skip
    with torch.device("meta"):
        report = count_model(copy.deepcopy(model).to("meta"), targets)
    inject(model, targets)
    assert count_parameters(model) == (report.adapter_params, report.base_params)
    assert [row.shape for row in report.rows] == [(11, 6), (9, 2, 3, 3), (4, 1, 5)]


def test_a_fused_adapter_whose_factors_have_another_dtype_says_which_and_why():
    """float32 factors over a bfloat16 linear layer: the unfused adapter runs them (PEFT's
    `autocast_adapter_dtype`), the fused one is a DTypeError naming the layer's sizes, the
    dtypes and the way out, not the kernel's bare operand check; under autocast it runs."""
    model = nn.Sequential(nn.Linear(32, 24)).to(torch.bfloat16)
    inject(model, "0", rank=4, fused=True)
    for factor in (model[0].down, model[0].up):
        factor.data = factor.data.float()
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with pytest.raises(DTypeError, match=r"fused LoRALinear \(32 → 24, rank 4\) has "
                       r"torch.float32 factors over a torch.bfloat16 base.*fused=False"):
        model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x.float()).dtype == torch.bfloat16
