"""Dense differences (`Full`): LyCORIS' `full` algorithm (`lycoris_<module>.diff`, `.diff_b`)
and ComfyUI's `diffusion_model.<module>.diff_b` / `.diff` beside LoRA factors (Wan's
distillation LoRAs: biases and norm weights). Each file's merge is compared with what
lycoris-lora's own `merge_to`, or diffusers' Wan loader + `fuse_lora`, make of it, and with the
float64 `W + diff` where diffusers drops a layer (the norms'); outputs that hold factors only
refuse them by name with nothing written."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from io_helpers import ORIGINAL_FORMS, rel, save_state, stand_in_pipeline
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank import DoRA, Full, LoRA, errors, recompose
from lowrank.cli import main
from lowrank.io import (
    Adapter,
    apply_adapter,
    combine_adapters,
    convert_adapter,
    inject_adapter,
    inspect_adapter,
    load_adapter,
    merge_checkpoint,
    resize_adapter,
    save_adapter,
)


class Net(nn.Module):
    """A linear layer and a 3×3 convolution with biases, and a layer norm."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.LayerNorm(5)


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


@pytest.fixture
def lycoris(monkeypatch):
    """The lycoris package, with its class-level preset restored after the test."""
    module = pytest.importorskip("lycoris")
    for name in ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "ENABLE_CONV"):
        monkeypatch.setattr(module.LycorisNetwork, name, getattr(module.LycorisNetwork, name))
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    return module


@pytest.fixture
def full_file(tmp_path, lycoris):
    """A LyCORIS `algo="full"` file of `net()`'s linear layer and convolution (weights and
    biases changed at random), saved by LyCORIS, and the base checkpoint."""
    model = net()
    lycoris.LycorisNetwork.apply_preset({"target_name": ["lin", "conv"]})
    network = lycoris.create_lycoris(model, 1.0, algo="full")
    network.apply_to()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=g) * 0.1)
    path = tmp_path / "full.safetensors"
    network.save_weights(str(path), torch.float32, {})
    base = save_state(net().state_dict(), tmp_path / "base.safetensors")
    return path, base


def lycoris_merged(lycoris, path, weight=1.0):
    """`net()` with the LyCORIS file `path` merged by lycoris-lora itself at `weight`."""
    model = net()
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(path), model)
    network.merge_to(weight)
    return model.state_dict()


def test_a_lycoris_full_file_merges_and_applies_as_lycoris_merges_it(tmp_path, lycoris,
                                                                     full_file):  # fmt: skip
    """`lycoris_lin.diff` / `.diff_b` are the layers `lycoris_lin` and `lycoris_lin.bias`
    (Full, scale 1, no alpha); merged into the checkpoint and applied to the model they give
    LyCORIS' own merge, weights and biases, and nothing else changes."""
    path, base = full_file
    adapter = load_adapter(path)
    assert adapter.format == "lycoris"
    assert {n: type(f) for n, f in adapter.items()} == dict.fromkeys(
        ["lycoris_conv", "lycoris_conv.bias", "lycoris_lin", "lycoris_lin.bias"], Full
    )
    expected = lycoris_merged(lycoris, path)
    before = net().state_dict()
    merge_checkpoint(base, path, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    changed = {k for k in merged if not torch.equal(merged[k], before[k])}
    assert changed == {"lin.weight", "lin.bias", "conv.weight", "conv.bias"}
    for key, value in merged.items():
        assert torch.equal(value, expected[key]), key
    model = net()
    assert sorted(apply_adapter(model, path)) == ["conv", "conv.bias", "lin", "lin.bias"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_an_alpha_beside_a_full_difference_is_ignored_as_lycoris_ignores_it(
    tmp_path, lycoris, full_file
):
    """An `alpha` beside `diff` (LyCORIS' full module and ComfyUI's `diff` patch both add the
    difference unscaled and never read it) is ignored: the merge is lycoris-lora's own merge
    of the same file, and W + diff, not W + alpha · diff (it was refused)."""
    path, base = full_file
    tensors = load_file(str(path))
    with_alpha = tmp_path / "full_alpha.safetensors"
    stems = [k.removesuffix(".diff") for k in tensors if k.endswith(".diff")]
    alphas = {f"{stem}.alpha": torch.tensor(4.0) for stem in stems}
    save_file({**tensors, **alphas}, str(with_alpha))
    expected = lycoris_merged(lycoris, with_alpha)
    before = net().state_dict()
    assert rel(expected["lin.weight"], before["lin.weight"].double()
               + tensors["lycoris_lin.diff"].double()) < 1e-7  # fmt: skip
    assert {n: type(f) for n, f in load_adapter(with_alpha).items()} == dict.fromkeys(
        ["lycoris_conv", "lycoris_conv.bias", "lycoris_lin", "lycoris_lin.bias"], Full
    )
    merge_checkpoint(base, with_alpha, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for key, value in merged.items():
        assert torch.equal(value, expected[key]), key


def test_inject_refuses_full_layers_by_name(tmp_path):
    """`lowrank.nn` has no module for a dense difference: `inject_adapter` is a `TargetError`
    naming the layer, the model unchanged; a bias's (1-D) is offered no LoRA conversion,
    which no rank gives it, a weight's is."""
    g = torch.Generator().manual_seed(2)
    for key, shape, offered in (("diff_b", (5,), False), ("diff", (5, 6), True)):
        path = tmp_path / f"{key}.safetensors"
        save_file({f"lycoris_lin.{key}": torch.randn(shape, generator=g)}, str(path))
        model = net()
        with pytest.raises(errors.TargetError, match=r"'lin(\.bias)?' is a Full") as caught:
            inject_adapter(model, path)
        assert ("convert it to LoRA" in str(caught.value)) == offered
        assert all(torch.equal(v, net().state_dict()[k]) for k, v in model.state_dict().items())


def test_a_weighted_full_merge_is_linear(tmp_path, lycoris, full_file):
    """At weight w a dense difference merges to `W + w · diff`, `b + w · diff_b`: against the
    float64 sum, and against LyCORIS' merge at multiplier w."""
    path, base = full_file
    tensors = load_file(str(path))
    merge_checkpoint(base, path, tmp_path / "merged.safetensors", weights=[-0.75])
    merged = load_file(str(tmp_path / "merged.safetensors"))
    before = net().state_dict()
    theirs = lycoris_merged(lycoris, path, weight=-0.75)
    for module in ("lin", "conv"):
        for parameter, part in (("weight", "diff"), ("bias", "diff_b")):
            key = f"{module}.{parameter}"
            want = before[key].double() - 0.75 * tensors[f"lycoris_{module}.{part}"].double()
            assert rel(merged[key], want) < 1e-7, key
            assert rel(theirs[key], want) < 1e-7, key


def test_a_full_file_written_as_lycoris_loads_in_lycoris(tmp_path, lycoris, full_file):
    """Converted to LyCORIS (without a base, and with module paths against it), a full
    file keeps `diff` / `diff_b` bit for bit, and lycoris-lora merges the output as the
    input."""
    path, _ = full_file
    convert_adapter(path, tmp_path / "same.safetensors", "lycoris")
    assert load_file(str(tmp_path / "same.safetensors")).keys() == load_file(str(path)).keys()
    convert_adapter(path, tmp_path / "paths.safetensors", "lycoris", base=net())
    # the module paths, bias layers' too, are recorded: read back without the base
    assert sorted(load_adapter(tmp_path / "paths.safetensors").layers) == [
        "conv", "conv.bias", "lin", "lin.bias"
    ]  # fmt: skip
    expected = lycoris_merged(lycoris, path)
    for written in ("same", "paths"):
        out = tmp_path / f"{written}.safetensors"
        for key, tensor in load_file(str(out)).items():
            assert torch.equal(tensor, load_file(str(path))[key]), key
        got = lycoris_merged(lycoris, out)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert sorted(load_adapter(out, base=net()).layers) == sorted(
            load_adapter(path, base=net()).layers
        )


@pytest.mark.parametrize("to", ["diffusers", "kohya"])
def test_a_dense_difference_is_refused_where_a_format_holds_factors_only(tmp_path, full_file,
                                                                         to):  # fmt: skip
    """diffusers and kohya files hold factors only: a full file is a `ConversionError`
    naming the layer, and with a rank too where the layer is a bias's (no LoRA approximates a
    1-D difference); nothing is written."""
    path, _ = full_file
    out = tmp_path / "out.safetensors"
    refused = r"layer '(lin|conv)(\.bias)?' is a dense difference.*lycoris"
    with pytest.raises(errors.ConversionError, match=refused):
        convert_adapter(path, out, to, base=net())
    with pytest.raises(errors.ConversionError, match=r"'(lin|conv)\.bias'.*1-D"):
        convert_adapter(path, out, to, base=net(), rank=2)
    assert not out.exists()


def test_a_full_file_goes_to_peft_with_a_rank_its_biases_as_lora_bias(tmp_path, full_file):
    """PEFT holds a bias's difference beside its module's LoRA (`lora_bias`): a full file
    without a rank is a `ConversionError` naming a weight's difference (which needs one),
    nothing written; with a rank the weights' become LoRAs and the biases' `lora_B.bias`,
    which PEFT's `merge_and_unload` adds to the biases exactly as the file's `diff_b`."""
    peft = pytest.importorskip("peft")
    path, _ = full_file
    with pytest.raises(errors.ConversionError, match=r"layer '(lin|conv)' is a Full.*rank"):
        convert_adapter(path, tmp_path / "out", "peft", base=net())
    assert not (tmp_path / "out").exists()
    convert_adapter(path, tmp_path / "out", "peft", base=net(), rank=2)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    merged = peft.PeftModel.from_pretrained(net(), tmp_path / "out").merge_and_unload()
    diffs = load_file(str(path))
    for module in ("lin", "conv"):
        want = net().state_dict()[f"{module}.bias"].double() + diffs[f"lycoris_{module}.diff_b"]
        assert rel(merged.state_dict()[f"{module}.bias"], want) < 1e-6, module


@pytest.mark.parametrize("to", ["peft", "diffusers"])
def test_a_bias_difference_beside_a_dora_layer_is_refused_as_a_dense_difference(tmp_path, to):
    """A LyCORIS DoRA layer with a `diff_b` (read first, as `lin.bias`) written as PEFT or
    diffusers: the bias is refused as the dense difference it is, not as a plain LoRA beside
    DoRA layers; nothing is written."""
    g = torch.Generator().manual_seed(4)
    path = tmp_path / "dora_bias.safetensors"
    save_file({"lycoris_lin.lora_down.weight": torch.randn(2, 6, generator=g),
               "lycoris_lin.lora_up.weight": torch.randn(5, 2, generator=g),
               "lycoris_lin.dora_scale": torch.rand(5, 1, generator=g) + 0.5,
               "lycoris_lin.diff_b": torch.randn(5, generator=g)}, str(path))  # fmt: skip
    adapter = load_adapter(path, base=net())
    assert isinstance(adapter.layers["lin"], DoRA) and isinstance(adapter.layers["lin.bias"], Full)
    out = tmp_path / ("out" if to == "peft" else "out.safetensors")
    with pytest.raises(errors.ConversionError, match=r"'lin\.bias' is a dense difference.*1-D"):
        save_adapter(adapter, out, to)
    assert not out.exists()


def test_a_weight_difference_converts_to_lora_by_svd_with_a_rank(tmp_path):
    """A weight's dense difference (no bias) becomes its truncated SVD at `rank` in a LoRA
    format, with the error reported: exact at full rank against the float64 `diff`."""
    g = torch.Generator().manual_seed(5)
    diff = torch.randn(5, 6, generator=g, dtype=torch.float64)
    path = tmp_path / "full.safetensors"
    save_file({"lycoris_lin.diff": diff}, str(path))
    report = convert_adapter(path, tmp_path / "peft", "peft", base=net(), rank=5)
    assert report["approximated"][0]["form"] == "Full"
    layer = load_adapter(tmp_path / "peft").layers["lin"]
    assert rel(recompose(layer), diff) < 1e-12


def test_full_layers_combine_exactly_and_do_not_resize(tmp_path, full_file):
    """Two adapters' dense differences combine to `Σ w · diff` (float64 reference); resizing
    one is a `DTypeError` naming the layer, and nothing is written."""
    path, _ = full_file
    tensors = load_file(str(path))
    other = {k: v.flip(0) for k, v in tensors.items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    combine_adapters([path, tmp_path / "other.safetensors"], tmp_path / "sum.safetensors",
                     weights=[0.5, -2.0])  # fmt: skip
    summed = load_file(str(tmp_path / "sum.safetensors"))
    assert summed.keys() == tensors.keys()
    for key, value in summed.items():
        assert rel(value, 0.5 * tensors[key].double() - 2.0 * other[key].double()) < 1e-7
    with pytest.raises(errors.DTypeError, match=r"lycoris_conv.*dense difference"):
        resize_adapter(path, tmp_path / "small.safetensors", rank=1)
    assert not (tmp_path / "small.safetensors").exists()


def test_resizing_dense_differences_advises_a_conversion_that_works(tmp_path, full_file,
                                                                     capsys):
    """A LyCORIS full file (weights' `diff` and biases' `diff_b`) does not resize: the
    `DTypeError` advises `lowrank convert ADAPTER --to peft --rank R --base BASE` (PEFT
    keeps the bias differences as `lora_bias`); it advised `--to kohya`, which refuses the
    biases' differences. Followed, the advice gives a folder that resizes, and the resized
    folder loads in PEFT to the float64 `W + svd_R(diff)`, `b + diff_b` of the file. A
    file of weights' differences alone is advised kohya, which holds it."""
    peft = pytest.importorskip("peft")
    path, base = full_file
    tensors = load_file(str(path))
    advice = r"lowrank convert ADAPTER --to peft --rank R --base BASE"
    with pytest.raises(errors.DTypeError, match=r"lycoris_conv.*dense difference.*" + advice):
        resize_adapter(path, tmp_path / "small.safetensors", rank=1)
    with pytest.raises(errors.ConversionError, match=r"conv\.bias"):  # kohya cannot hold them
        convert_adapter(path, tmp_path / "k.safetensors", "kohya", rank=2, base=base)
    assert main(["convert", str(path), "-o", str(tmp_path / "lora"), "--to", "peft",
                 "--rank", "2", "--base", str(base)]) == 0  # fmt: skip
    assert main(["resize", str(tmp_path / "lora"), "-o", str(tmp_path / "small"),
                 "--rank", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    model = peft.PeftModel.from_pretrained(net(), tmp_path / "small").merge_and_unload()
    plain = net().state_dict()
    for name in ("lin", "conv"):
        diff = tensors[f"lycoris_{name}.diff"].double()
        u, s, vh = torch.linalg.svd(diff.flatten(1), full_matrices=False)
        truncated = (u[:, :1] * s[:1]) @ vh[:1]  # rank 2, then its best rank 1: the same
        want = plain[f"{name}.weight"].double() + truncated.reshape(diff.shape)
        assert rel(model.state_dict()[f"{name}.weight"], want) < 1e-5, name
        want_bias = plain[f"{name}.bias"].double() + tensors[f"lycoris_{name}.diff_b"].double()
        assert rel(model.state_dict()[f"{name}.bias"], want_bias) < 1e-6, name
    weights_only = {k: v for k, v in tensors.items() if not k.endswith("diff_b")}
    save_file(weights_only, str(tmp_path / "weights.safetensors"))
    with pytest.raises(errors.DTypeError, match=r"--to kohya --rank R --base BASE"):
        resize_adapter(tmp_path / "weights.safetensors", tmp_path / "w.safetensors", rank=1)
    convert_adapter(tmp_path / "weights.safetensors", tmp_path / "w.safetensors", "kohya",
                    rank=2, base=base)  # fmt: skip
    resize_adapter(tmp_path / "w.safetensors", tmp_path / "w1.safetensors", rank=1)


def test_inspect_lists_full_layers(full_file):
    """`inspect_adapter` lists each dense difference as a Full layer with its shape and
    parameter count, no rank and no alpha."""
    path, _ = full_file
    rows = {row["name"]: row for row in inspect_adapter(path)["layers"]}
    assert rows["lycoris_lin.bias"]["form"] == "Full"
    assert rows["lycoris_lin.bias"]["shape"] == [5]
    assert rows["lycoris_conv"]["params"] == 4 * 3 * 3 * 3
    assert rows["lycoris_conv"]["rank"] is None and rows["lycoris_conv"]["alpha"] is None


@pytest.mark.parametrize(
    ("keys", "error", "named"),
    [
        ({"lycoris_lin.diff": (5, 6), "lycoris_lin.lora_down.weight": (2, 6),
          "lycoris_lin.lora_up.weight": (5, 2)}, errors.FileFormatError, "lycoris_lin"),
        ({"lycoris_lin.diff": (5, 6), "lycoris_lin.alpha": (2,)}, errors.FileFormatError,
         r"lycoris_lin\.alpha must be a scalar"),
        ({"lycoris_lin.diff": (5, 6), "lycoris_lin.hada_w1_a": (5, 2)}, errors.FileFormatError,
         "lycoris_lin"),
        ({"lycoris_lin.diff_b": (5, 1)}, errors.ShapeError, r"lycoris_lin\.diff_b"),
        ({"lycoris_lin.diff": (6, 5)}, errors.ShapeError, "lycoris_lin"),
        ({"lycoris_norm.diff_b": (5,), "lycoris_lin.diff_b": (7,)}, errors.ShapeError,
         r"lycoris_lin\.bias"),
    ],
)  # fmt: skip
def test_a_dense_difference_that_does_not_fit_is_named(tmp_path, keys, error, named):
    """A `diff` beside factors or an alpha that is no scalar, a `diff_b` that is not 1-D, or a
    difference whose shape is not its parameter's is refused naming it, and nothing is
    written."""
    g = torch.Generator().manual_seed(4)
    path = tmp_path / "bad.safetensors"
    save_file({k: torch.randn(s, generator=g) for k, s in keys.items()}, str(path))
    base = save_state(net().state_dict(), tmp_path / "base.safetensors")
    with pytest.raises(error, match=named):
        merge_checkpoint(base, path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_bias_layer_is_a_one_dimensional_full_form():
    """An adapter layer named `<module>.bias` holds a 1-D Full form (`DTypeError` naming it
    otherwise), and `apply_adapter` refuses a bias the module does not have."""
    with pytest.raises(errors.DTypeError, match=r"'lin\.bias'.*1-D Full"):
        Adapter({"lin.bias": Full(torch.zeros(5, 6))})
    model = nn.Linear(4, 3, bias=False)
    before = model.weight.clone()
    with pytest.raises(errors.TargetError, match=r"'0\.bias' has no bias '0\.bias'"):
        apply_adapter(nn.Sequential(model), Adapter({"0.bias": Full(torch.ones(3))}))
    assert torch.equal(model.weight, before)


@given(
    rows=st.integers(1, 6),
    tail=st.lists(st.integers(1, 3), max_size=3),
    scale=st.floats(0.01, 4) | st.floats(-4, -0.01),
    cut=st.integers(0, 5),
)
def test_a_full_form_is_its_scaled_difference(rows, tail, scale, cut):
    """ΔW of `Full(delta, scale)` is `scale · delta` (float64 reference), its rows `ΔW[rows]`,
    and `with_rows` of two blocks their concatenation; the count is `numel`."""
    g = torch.Generator().manual_seed(rows * 7 + len(tail))
    delta = torch.randn(rows, *tail, generator=g)
    form = Full(delta, scale)
    want = scale * delta.double()
    assert rel(recompose(form), want) < 1e-6
    start = min(cut, rows - 1)
    assert torch.allclose(form.to_dense(slice(start, rows)).double(), want[start:], atol=1e-6)
    blocks = [(start, rows), (0, start)] if start else [(0, rows)]
    split = form.with_rows(blocks)
    assert torch.equal(split.delta, torch.cat([delta[a:b] for a, b in blocks]))
    assert form.num_params == delta.numel() and form.rank is None


# ---------------------------------------------------------------------------- Wan


WAN_NORMS = {
    "norm3": "norm2", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
}  # fmt: skip


def wan_full_tensors(transformer, style):
    """A Wan distillation LoRA's tensors in ComfyUI's layout (lightx2v's): each block layer a
    LoRA (`ORIGINAL_FORMS[style]`) with a `diff_b`, the blocks' norms' weights (and `norm3`'s
    bias) and the head's weight and bias as `diff` / `diff_b`; and `{norm's weight or bias
    key in the file: the diffusers parameter}`."""
    from test_io_interop_dits import WAN_BLOCK, weight_shapes

    shapes = weight_shapes(transformer)
    down, up, keep = ORIGINAL_FORMS[style]
    g = torch.Generator().manual_seed(1)
    tensors, norms = {}, {}
    for i in range(2):
        for ours, theirs in WAN_BLOCK.items():
            rows, cols = shapes[f"blocks.{i}.{theirs}"]
            stem = f"diffusion_model.blocks.{i}.{ours}"
            tensors[f"{stem}.{down}"] = torch.randn(3, cols, generator=g) * 0.3
            tensors[f"{stem}.{up}"] = torch.randn(rows, 3, generator=g) * 0.3
            if keep:
                tensors[f"{stem}.alpha"] = torch.tensor(2.0)
            tensors[f"{stem}.diff_b"] = torch.randn(rows, generator=g) * 0.1
        for ours, theirs in WAN_NORMS.items():
            key = f"diffusion_model.blocks.{i}.{ours}.diff"
            tensors[key] = torch.randn(16, generator=g) * 0.1
            norms[key] = f"blocks.{i}.{theirs}.weight"
        key = f"diffusion_model.blocks.{i}.norm3.diff_b"
        tensors[key] = torch.randn(16, generator=g) * 0.1
        norms[key] = f"blocks.{i}.norm2.bias"
    # the head as a dense difference of its weight and bias (diffusers: `proj_out`)
    rows, cols = shapes["proj_out"]
    tensors["diffusion_model.head.head.diff"] = torch.randn(rows, cols, generator=g) * 0.1
    tensors["diffusion_model.head.head.diff_b"] = torch.randn(rows, generator=g) * 0.1
    return tensors, norms


@pytest.mark.parametrize("style", ["lora_down", "lora_A"])
def test_a_wan_file_with_bias_and_norm_differences_merges_as_diffusers_fuses_it(tmp_path,
                                                                                style):  # fmt: skip
    """A Wan LoRA with `diff_b` beside each layer's factors, `diff` of its norms' weights and
    `diff` / `diff_b` of its head (lightx2v's distillation LoRAs) reads against a diffusers
    Wan transformer with the norms and biases at their diffusers names (`blocks.0.norm2`,
    `attn1.norm_q`, `attn1.to_q.bias`, `proj_out`); merged and applied, every weight and bias
    diffusers' Wan loader + `fuse_lora` fuses (`diff_b` as PEFT's `lora_B.bias`, the head's
    `diff` as a `lora_A` under an identity `lora_B`) is diffusers', and the norms' weights and
    bias, which diffusers drops, are the float64 `W + diff`."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from model_factories import tiny_wan
    from test_io_interop_dits import diffusers_fused, wan_out

    transformer = tiny_wan()
    pipeline = stand_in_pipeline(diffusers.loaders.WanLoraLoaderMixin, ("transformer",))
    tensors, norms = wan_full_tensors(transformer, style)
    lora = tmp_path / "wan_lora.safetensors"
    save_file(tensors, str(lora))
    adapter = load_adapter(lora, base=transformer)
    assert adapter.format == "lycoris"
    assert {"transformer.blocks.0.attn1.to_q.bias", "transformer.blocks.1.norm2",
            "transformer.blocks.1.norm2.bias", "transformer.blocks.0.attn2.norm_added_k",
            } <= adapter.layers.keys()  # fmt: skip
    fused = diffusers_fused(pipeline, transformer, tensors).state_dict()
    before = transformer.state_dict()
    expected = dict(fused)
    for key, parameter in norms.items():
        expected[parameter] = before[parameter].double() + tensors[key].double()
    base = save_state(before, tmp_path / "transformer.safetensors")
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    changed = {k for k in merged if not torch.equal(merged[k], before[k])}
    diffusers_changed = {k for k in fused if not torch.equal(fused[k], before[k])}
    assert {"blocks.0.attn1.to_q.bias", "proj_out.weight", "proj_out.bias"} <= diffusers_changed
    assert changed == diffusers_changed | set(norms.values())
    ours = copy.deepcopy(transformer)
    apply_adapter(ours, lora)
    for key, weight in merged.items():
        assert torch.allclose(weight.double(), expected[key].double(), rtol=1e-6, atol=1e-7), key
        assert torch.equal(ours.state_dict()[key], weight), key
    reference = copy.deepcopy(transformer)
    reference.load_state_dict({k: v.float() for k, v in expected.items()})
    assert rel(wan_out(ours), wan_out(transformer)) > 1e-3
    assert rel(wan_out(ours), wan_out(reference)) < 1e-5


def test_a_wan_modulation_difference_merges_into_the_scale_shift_table(tmp_path):
    """lightx2v's Wan LoRAs hold dense differences of each block's modulation and the
    head's (`diffusion_model.blocks.0.modulation.diff (1, 6, dim)`, `head.modulation.diff
    (1, 2, dim)`), parameters that a diffusers Wan model calls `blocks.0.scale_shift_table`
    and `scale_shift_table`, of the same shape and order (shift, scale, gate, …). Merged
    into the diffusers checkpoint and applied to the model, each is float64 `W + diff`
    (diffusers 0.42's Wan loader drops them: its fused `scale_shift_table`s are unchanged)
    and the LoRA beside them is diffusers' fused weight; merged into a checkpoint in Wan's
    own layout it updates `blocks.0.modulation` itself (they were a `TargetError`). A
    modulation difference of another shape is a `ShapeError`, one converted to a kohya or
    LyCORIS file a `ConversionError`, and a LoRA on a modulation a `DTypeError`, each
    naming it."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from model_factories import tiny_wan
    from test_io_interop_dits import diffusers_fused

    transformer = tiny_wan()
    pipeline = stand_in_pipeline(diffusers.loaders.WanLoraLoaderMixin, ("transformer",))
    g = torch.Generator().manual_seed(5)
    stem = "diffusion_model.blocks.0.self_attn.q"
    tensors = {f"{stem}.lora_down.weight": torch.randn(2, 16, generator=g),
               f"{stem}.lora_up.weight": torch.randn(16, 2, generator=g),
               f"{stem}.alpha": torch.tensor(2.0)}  # fmt: skip
    diffs = {"blocks.0.modulation": "blocks.0.scale_shift_table",
             "blocks.1.modulation": "blocks.1.scale_shift_table",
             "head.modulation": "scale_shift_table"}  # fmt: skip
    before = transformer.state_dict()
    for ours, theirs in diffs.items():
        tensors[f"diffusion_model.{ours}.diff"] = torch.randn(before[theirs].shape, generator=g)
    lora = tmp_path / "wan_lora.safetensors"
    save_file(tensors, str(lora))
    fused = diffusers_fused(pipeline, transformer, tensors).state_dict()
    assert all(torch.equal(fused[theirs], before[theirs]) for theirs in diffs.values())
    expected = dict(fused)
    for ours, theirs in diffs.items():
        diff = tensors[f"diffusion_model.{ours}.diff"].double()
        expected[theirs] = before[theirs].double() + diff
    base = save_state(before, tmp_path / "transformer.safetensors")
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    changed = {k for k in merged if not torch.equal(merged[k], before[k])}
    assert changed == {"blocks.0.attn1.to_q.weight", *diffs.values()}
    ours = copy.deepcopy(transformer)
    apply_adapter(ours, lora)
    for key, weight in merged.items():
        assert torch.allclose(weight.double(), expected[key].double(), rtol=1e-6, atol=1e-7), key
        assert torch.equal(ours.state_dict()[key], weight), key
    # a checkpoint in Wan's own layout: the parameters under their own names
    original = {"blocks.0.modulation": before["blocks.0.scale_shift_table"],
                "blocks.1.modulation": before["blocks.1.scale_shift_table"],
                "head.modulation": before["scale_shift_table"],
                "blocks.0.self_attn.q.weight": before["blocks.0.attn1.to_q.weight"]}  # fmt: skip
    base = save_state(original, tmp_path / "wan_original.safetensors")
    merge_checkpoint(base, lora, tmp_path / "merged_original.safetensors")
    merged = load_file(str(tmp_path / "merged_original.safetensors"))
    for ours, theirs in diffs.items():
        assert torch.equal(merged[ours], expected[theirs].float()), ours
    with pytest.raises(errors.ConversionError, match=r"blocks\.0\.scale_shift_table"):
        convert_adapter(lora, tmp_path / "out.safetensors", "lycoris", base=transformer)
    tensors["diffusion_model.head.modulation.diff"] = torch.randn(1, 6, 16, generator=g)
    save_file(tensors, str(lora))
    with pytest.raises(errors.ShapeError, match=r"head\.modulation"):
        merge_checkpoint(base, lora, tmp_path / "bad.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    assert not (tmp_path / "bad.safetensors").exists()
    # a LoRA on it: no low-rank factors make a parameter's difference (no module has it)
    save_file({"diffusion_model.blocks.0.modulation.lora_A.weight": torch.randn(2, 16),
               "diffusion_model.blocks.0.modulation.lora_B.weight": torch.randn(96, 2)},
              str(lora))  # fmt: skip
    with pytest.raises(errors.DTypeError, match=r"'transformer\.blocks\.0\.modulation'.*Full"):
        load_adapter(lora)


@pytest.mark.parametrize(("to", "rank"), [("peft", None), ("peft", 2), ("kohya", 2),
                                           ("lycoris", None)])  # fmt: skip
def test_a_modulation_difference_is_refused_by_every_conversion_as_no_file_holds_it(
    tmp_path, to, rank
):
    """A dense difference of Wan's `modulation` (no module's weight) is written in no
    format, whatever the rank: a `ConversionError` naming the layer and saying to merge it,
    and nothing written (the advice was to pass a rank, which then failed building a LoRA
    of the parameter, a `DTypeError`, or to write LyCORIS, which refuses it too)."""
    lora = tmp_path / "wan.safetensors"
    save_file({"diffusion_model.blocks.0.modulation.diff": torch.randn(1, 6, 8),
               "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.randn(2, 8),
               "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.randn(8, 2)},
              str(lora))  # fmt: skip
    out = tmp_path / ("out" if to == "peft" else "out.safetensors")
    with pytest.raises(errors.ConversionError, match=r"'transformer\.blocks\.0\.modulation'"
                       r".*no adapter file.*merge it"):  # fmt: skip
        convert_adapter(lora, out, to, rank=rank)
    assert not out.exists()


def test_resizing_a_modulation_difference_advises_the_merge_which_works(tmp_path, capsys):
    """`resize` (and a truncating or plain `combine`) of a file with a dense difference of
    Wan's `modulation` cannot write it (no adapter file holds it, and it has no rank to
    lower): a `ConversionError` naming the layer and advising `lowrank merge BASE ADAPTER
    -o OUT` (it advised `lowrank convert --to kohya --rank R`, which refuses the same layer),
    nothing written. Following the advice merges the file to the float64 `W + diff` and
    `W + scale · up @ down`. An adapter weighted 0 in a combination adds none of its layers,
    so its modulation difference is no obstacle."""
    g = torch.Generator().manual_seed(7)
    tensors = {"diffusion_model.blocks.0.modulation.diff": torch.randn(1, 6, 8, generator=g),
               "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.randn(4, 8, generator=g),
               "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.randn(8, 4, generator=g),
               "diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(2.0)}  # fmt: skip
    lora = tmp_path / "wan.safetensors"
    save_file(tensors, str(lora))
    advice = r"'transformer\.blocks\.0\.modulation'.*lowrank merge BASE ADAPTER -o OUT"
    for to in ("kohya", "lycoris", "peft"):
        out = tmp_path / ("out" if to == "peft" else "out.safetensors")
        with pytest.raises(errors.ConversionError, match=advice):
            resize_adapter(lora, out, 2, format=to)
        with pytest.raises(errors.ConversionError, match=advice):
            combine_adapters([lora], out, rank=2, format=to)
        with pytest.raises(errors.ConversionError, match=advice):
            combine_adapters([lora, lora], out, format=to)
        assert not out.exists()
    assert main(["resize", str(lora), "-o", str(tmp_path / "r.safetensors"), "--rank", "2"]) == 2
    message = capsys.readouterr().err
    assert "modulation" in message and "lowrank merge BASE ADAPTER -o OUT" in message
    assert not (tmp_path / "r.safetensors").exists()
    # the advice, followed: the base in Wan's own layout, merged with the file
    base_state = {"blocks.0.modulation": torch.randn(1, 6, 8, generator=g),
                  "blocks.0.ffn.0.weight": torch.randn(8, 8, generator=g),
                  "blocks.0.ffn.0.bias": torch.randn(8, generator=g)}  # fmt: skip
    base = save_state(base_state, tmp_path / "wan_base.safetensors")
    merged_path = tmp_path / "merged.safetensors"
    assert main(["merge", str(base), str(lora), "-o", str(merged_path)]) == 0
    merged = load_file(str(merged_path))
    up = tensors["diffusion_model.blocks.0.ffn.0.lora_up.weight"].double()
    down = tensors["diffusion_model.blocks.0.ffn.0.lora_down.weight"].double()
    expected = {
        "blocks.0.modulation": base_state["blocks.0.modulation"].double()
        + tensors["diffusion_model.blocks.0.modulation.diff"].double(),
        "blocks.0.ffn.0.weight": base_state["blocks.0.ffn.0.weight"].double() + 0.5 * up @ down,
        "blocks.0.ffn.0.bias": base_state["blocks.0.ffn.0.bias"].double(),
    }
    for key, want in expected.items():
        assert rel(merged[key], want) < 1e-7, key
    # weighted 0, the file's layers are left out of a combination, its difference too
    other = tmp_path / "other.safetensors"
    save_file({k: v for k, v in tensors.items() if "modulation" not in k}, str(other))
    combine_adapters([lora, other], tmp_path / "c.safetensors", weights=[0.0, 1.0])
    combined = load_adapter(tmp_path / "c.safetensors")
    assert list(combined.layers) == ["transformer.blocks.0.ffn.0"]


def test_a_wan_full_file_converts_to_lycoris_and_back(tmp_path):
    """Converted to LyCORIS against the diffusers base, a Wan file with bias and norm
    differences keeps every layer exactly (`…_attn1_to_q.diff_b`, `…_norm2.diff`), and merges
    to the same checkpoint as the file itself."""
    pytest.importorskip("diffusers")
    from model_factories import tiny_wan

    transformer = tiny_wan()
    tensors, _ = wan_full_tensors(transformer, "lora_down")
    lora = tmp_path / "wan_lora.safetensors"
    save_file(tensors, str(lora))
    out = tmp_path / "wan_lycoris.safetensors"
    convert_adapter(lora, out, "lycoris", base=transformer)
    written = load_file(str(out))
    assert "lora_transformer_blocks_0_attn1_to_q.diff_b" in written
    assert "lora_transformer_blocks_1_norm2.diff" in written
    assert "lora_transformer_blocks_1_norm2.diff_b" in written
    assert written["lora_transformer_proj_out.diff"].shape == transformer.proj_out.weight.shape
    base = save_state(transformer.state_dict(), tmp_path / "transformer.safetensors")
    merge_checkpoint(base, lora, tmp_path / "a.safetensors")
    merge_checkpoint(base, out, tmp_path / "b.safetensors")
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the norms' differences: PEFT holds a bias's only beside its module's LoRA (lora_bias)
    with pytest.raises(errors.ConversionError, match=r"layer '[\w.]*norm[\w.]*' is a dense"):
        convert_adapter(lora, tmp_path / "peft", "peft", base=transformer)
    assert not (tmp_path / "peft").exists()


def test_a_fused_flux_bias_difference_splits_with_its_rows(tmp_path):
    """A ComfyUI Flux layer on the fused `double_blocks.0.img_attn.qkv` with a `diff_b` is
    the diffusers transformer's `attn.to_q`, `to_k`, `to_v`: each bias gains its rows of
    `diff_b` and each weight its rows of `up @ down` (float64 references)."""
    pytest.importorskip("diffusers")
    from model_factories import tiny_flux

    transformer = tiny_flux()
    g = torch.Generator().manual_seed(6)
    stem = "diffusion_model.double_blocks.0.img_attn.qkv"
    tensors = {f"{stem}.lora_A.weight": torch.randn(2, 32, generator=g),
               f"{stem}.lora_B.weight": torch.randn(96, 2, generator=g),
               f"{stem}.diff_b": torch.randn(96, generator=g)}  # fmt: skip
    lora = tmp_path / "flux_lora.safetensors"
    save_file(tensors, str(lora))
    before = transformer.state_dict()
    base = save_state(before, tmp_path / "transformer.safetensors")
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    delta = tensors[f"{stem}.lora_B.weight"].double() @ tensors[f"{stem}.lora_A.weight"].double()
    want = {}
    for i, module in enumerate(("to_q", "to_k", "to_v")):
        rows = slice(32 * i, 32 * (i + 1))
        key = f"transformer_blocks.0.attn.{module}"
        want[f"{key}.weight"] = before[f"{key}.weight"].double() + delta[rows]
        want[f"{key}.bias"] = before[f"{key}.bias"].double() + tensors[f"{stem}.diff_b"][rows]
    assert {k for k in merged if not torch.equal(merged[k], before[k])} == want.keys()
    for key, value in want.items():
        assert rel(merged[key], value) < 1e-6, key


# ---------------------------------------------------------------------------- PEFT lora_bias


def test_a_peft_lora_bias_adapter_merges_as_peft_merges_it(tmp_path):
    """PEFT's `lora_bias=True` adds `scale · lora_B.bias` to each module's bias: the layers
    `<module>.bias` (Full at the LoRA's scale) merge and apply to PEFT's `merge_and_unload`,
    convert to LyCORIS as `diff_b = scale · lora_B.bias`."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["lin", "conv"], lora_bias=True)
    model = peft.get_peft_model(net(), config)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
    model.save_pretrained(tmp_path / "peft")
    expected = model.merge_and_unload().state_dict()
    adapter = load_adapter(tmp_path / "peft")
    assert isinstance(adapter.layers["lin.bias"], Full)
    assert adapter.layers["lin.bias"].scale == 1.5
    before = net().state_dict()
    base = save_state(before, tmp_path / "base.safetensors")
    merge_checkpoint(base, tmp_path / "peft", tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    ours = net()
    apply_adapter(ours, tmp_path / "peft")
    changed = {k for k in merged if not torch.equal(merged[k], before[k])}
    assert changed == {"lin.weight", "lin.bias", "conv.weight", "conv.bias"}
    for key, value in merged.items():
        assert torch.allclose(value, expected[key], rtol=1e-6, atol=1e-7), key
        assert torch.equal(ours.state_dict()[key], value), key
    convert_adapter(tmp_path / "peft", tmp_path / "l.safetensors", "lycoris")
    written = load_file(str(tmp_path / "l.safetensors"))
    lora_b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert torch.equal(written["lora_unet_lin.diff_b"],
                       lora_b["base_model.model.lin.lora_B.bias"] * 1.5)  # fmt: skip


def peft_bias_folder(peft, folder, targets, seed, **settings):
    """PEFT's LoRA on `targets` of `net()` (r=4, alpha 3, `settings`), its LoRA tensors drawn
    at random (the `lora_B.bias` too, with `lora_bias`), saved by PEFT at `folder`; returns
    PEFT's `merge_and_unload` state."""
    config = peft.LoraConfig(r=4, lora_alpha=3, target_modules=targets, **settings)
    model = peft.get_peft_model(net(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
    model.save_pretrained(folder)
    return model.merge_and_unload().state_dict()


def peft_merged(peft, folder):
    """`net()` with the PEFT folder loaded by PEFT and merged (`merge_and_unload`)."""
    return peft.PeftModel.from_pretrained(net(), folder).merge_and_unload().state_dict()


def test_a_peft_lora_bias_adapter_is_written_back_as_peft_loads_it(tmp_path):
    """The layers `<module>.bias` of a `lora_bias` folder go back into PEFT folders as
    `lora_B.bias` with `lora_bias: true`: converted bit for bit (read back to the same
    layers), resized (the biases kept exactly, as PEFT's merge shows), and combined — with a
    plain PEFT LoRA on another module, whose `lora_B.bias` is written as zeros, and weights
    whose scales differ from the biases' (stored as ΔB / scale) — to folders whose
    `merge_and_unload` in PEFT equals the weighted sum of PEFT's own merges (float64), and
    lowrank's merge of the same output."""
    peft = pytest.importorskip("peft")
    merged = peft_bias_folder(peft, tmp_path / "peft", ["lin", "conv"], 8, lora_bias=True)
    other = peft_bias_folder(peft, tmp_path / "plain", ["conv"], 9)
    before = net().state_dict()
    convert_adapter(tmp_path / "peft", tmp_path / "again", "peft")
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    source = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert source.keys() == again.keys()
    assert all(torch.equal(source[k], again[k]) for k in source)
    first, second = load_adapter(tmp_path / "peft"), load_adapter(tmp_path / "again")
    assert first.layers.keys() == second.layers.keys() == {"lin", "lin.bias", "conv", "conv.bias"}
    for name, form in first.items():
        assert form.scale == second.layers[name].scale, name
        assert all(torch.equal(t, second.layers[name].named_factors()[k])
                   for k, t in form.named_factors().items()), name  # fmt: skip
    loaded = peft_merged(peft, tmp_path / "again")
    assert all(torch.equal(loaded[k], merged[k]) for k in merged)
    report = resize_adapter(tmp_path / "peft", tmp_path / "resized", 2)
    assert {r["name"]: r["rank"] for r in report["layers"]} == {
        "lin": 2, "conv": 2, "lin.bias": None, "conv.bias": None}  # fmt: skip
    resized = load_file(str(tmp_path / "resized" / "adapter_model.safetensors"))
    for module in ("lin", "conv"):
        key = f"base_model.model.{module}.lora_B.bias"
        assert torch.equal(resized[key], source[key]), module
    loaded = peft_merged(peft, tmp_path / "resized")
    for module in ("lin", "conv"):
        assert torch.equal(loaded[f"{module}.bias"], merged[f"{module}.bias"]), module
    weights = (0.5, -2.0)  # the LoRAs' scales become 1.5, the biases' 0.375
    combine_adapters([tmp_path / "peft", tmp_path / "plain"], tmp_path / "both", weights)
    loaded = peft_merged(peft, tmp_path / "both")
    base = save_state(before, tmp_path / "base.safetensors")
    merge_checkpoint(base, tmp_path / "both", tmp_path / "merged.safetensors")
    ours = load_file(str(tmp_path / "merged.safetensors"))
    for key in ("lin.weight", "lin.bias", "conv.weight", "conv.bias"):
        value = before[key]
        want = value.double() + sum(w * (m[key].double() - value.double())
                                    for w, m in zip(weights, (merged, other), strict=True))
        assert rel(loaded[key], want) < 1e-6, key
        assert rel(ours[key], loaded[key]) < 1e-6, key
    layers = {n: f for n, f in first.items() if n != "conv.bias"}
    save_adapter(replace(first, layers=layers), tmp_path / "lin_bias", "peft")
    written = load_file(str(tmp_path / "lin_bias" / "adapter_model.safetensors"))
    assert not written["base_model.model.conv.lora_B.bias"].any()
    loaded = peft_merged(peft, tmp_path / "lin_bias")
    assert torch.equal(loaded["conv.bias"], before["conv.bias"])
    assert all(torch.equal(loaded[k], merged[k]) for k in merged if k != "conv.bias")


def test_a_bfloat16_bias_difference_keeps_its_bits_through_a_scale(tmp_path):
    """LyCORIS' `diff_b` holds no scale, so a `lora_B.bias` goes in times its LoRA's scale,
    and a `diff_b` goes into PEFT divided by it: for bfloat16 tensors and a scale of 0.75 or
    1.5 neither fits bfloat16's 8 bits. The written tensors are the float64 products to
    float32's precision (PEFT's merge of the converted folder too), not rounded to
    bfloat16 (a relative error near 2⁻⁹)."""
    peft = pytest.importorskip("peft")
    peft_bias_folder(peft, tmp_path / "peft", ["lin"], 8, lora_bias=True)  # scale 3 / 4
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(str(weights)).items()}, str(weights))
    convert_adapter(tmp_path / "peft", tmp_path / "l.safetensors", "lycoris")
    lora_b = load_file(str(weights))["base_model.model.lin.lora_B.bias"]
    written = load_file(str(tmp_path / "l.safetensors"))["lora_unet_lin.diff_b"]
    assert rel(written, lora_b.double() * 0.75) < 1e-7
    g = torch.Generator().manual_seed(3)
    diff_b = torch.randn(5, generator=g).bfloat16()
    save_file({"lora_unet_lin.lora_down.weight": torch.randn(2, 6, generator=g).bfloat16(),
               "lora_unet_lin.lora_up.weight": torch.randn(5, 2, generator=g).bfloat16(),
               "lora_unet_lin.alpha": torch.tensor(3.0),
               "lora_unet_lin.diff_b": diff_b}, str(tmp_path / "diff_b.safetensors"))  # fmt: skip
    convert_adapter(tmp_path / "diff_b.safetensors", tmp_path / "back", "peft", base=net())
    merged = peft.PeftModel.from_pretrained(net(), tmp_path / "back").merge_and_unload()
    want = net().lin.bias.double() + diff_b.double()
    assert rel(merged.lin.bias, want) < 1e-6


def test_bias_differences_peft_cannot_hold_as_lora_bias_are_refused_by_name(tmp_path):
    """PEFT's `lora_bias` puts a bias on every LoRA layer's `lora_B` and adds it times the
    layer's scale: a bias difference beside a LoRA on an embedding table (PEFT refuses
    `lora_bias` there), a nonzero one under a LoRA of scale 0, and one whose module has no
    layer are each a `ConversionError` naming the layer, with nothing written; one of
    another length than the module's output is a `ShapeError`."""
    g = torch.Generator().manual_seed(6)
    lin = LoRA(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 0.5)
    table = LoRA(torch.randn(2, 8, generator=g), torch.randn(10, 2, generator=g))
    bias = Full(torch.randn(5, generator=g))
    cases = (
        ({"lin": lin, "lin.bias": bias, "emb": table}, {"embeddings": ("emb.weight",)},
         errors.ConversionError, r"'emb', an embedding table"),
        ({"lin": replace(lin, scale=0.0), "lin.bias": bias}, {},
         errors.ConversionError, r"'lin\.bias'.*scale 0"),
        ({"lin": lin, "conv.bias": Full(torch.randn(4, generator=g))}, {},
         errors.ConversionError, r"'conv\.bias' is a dense difference.*lora_bias"),
        ({"lin": lin, "lin.bias": Full(torch.randn(4, generator=g))}, {},
         errors.ShapeError, r"'lin\.bias' has 4 values"),
    )  # fmt: skip
    for layers, fields, error, named in cases:
        with pytest.raises(error, match=named):
            save_adapter(Adapter(layers, **fields), tmp_path / "out", "peft")
        assert not (tmp_path / "out").exists()
