"""`lowrank.io` against diffusers for the LoRA files of video and image DiTs that name a
model's modules in its original layout, or under sd-scripts' `lora_unet` prefix: Wan 2.x
(musubi-tuner's `lora_unet_blocks_0_self_attn_q`, ComfyUI's and ai-toolkit's
`diffusion_model.blocks.0.self_attn.q.…`) and Qwen-Image
(`lora_unet_transformer_blocks_0_attn_to_q`, `diffusion_model.transformer_blocks.0.attn.to_q.…`),
HunyuanVideo (`lora_unet_double_blocks_0_img_attn_qkv`, `diffusion_model.double_blocks.0…`) and
LTX-Video (`diffusion_model.transformer_blocks.0.attn1.to_q…`, `diffusion_model.patchify_proj…`).
Each file's merge into, and application onto, the diffusers model are compared with what
diffusers' own loader and `fuse_lora` make of it (with the float64 W + scale · up @ down where
diffusers refuses the layers); files lowrank writes from it load in diffusers to the same
weights. The models are tiny configs of the real diffusers classes."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from io_helpers import ORIGINAL_FORMS, digest, listing, rel, save_state, stand_in_pipeline
from safetensors.torch import load_file, save_file

from lowrank import errors
from lowrank.io import (
    apply_adapter,
    convert_adapter,
    load_adapter,
    merge_checkpoint,
)

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

# Wan's modules in its original layout (Wan-AI's checkpoints) and the diffusers
# WanTransformer3DModel's they are, written out: per block, and the whole model's
WAN_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}  # fmt: skip
WAN_TOP = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "head.head": "proj_out",
}
WAN_STYLES = ("musubi", *sorted(ORIGINAL_FORMS))


def weight_shapes(model):
    """`{module: weight shape}` of every module of `model` with a weight."""
    return {name: tuple(module.weight.shape) for name, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), torch.Tensor)}  # fmt: skip


def lora_tensors(shapes, layers, stem, parts, alphas):
    """Random LoRA tensors of rank 3 or 5 on `layers` (`{name in the file: module of
    shapes}`), keyed `stem(name) + "." + part` for the down and up `parts`, with an alpha of
    2 to 4 on the layers `alphas` lists."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i, (name, module) in enumerate(layers.items()):
        rows, cols = shapes[module]
        r = 3 + 2 * (i % 2)
        tensors[f"{stem(name)}.{parts[0]}"] = torch.randn(r, cols, generator=g) * 0.3
        tensors[f"{stem(name)}.{parts[1]}"] = torch.randn(rows, r, generator=g) * 0.3
        if name in alphas:
            tensors[f"{stem(name)}.alpha"] = torch.tensor(2.0 + i % 3)
    return tensors


def components(lora):
    """The components of a file's layers, read without a base."""
    adapter = load_adapter(lora)
    return {adapter.component_of(name) for name in adapter.layers}


def diffusers_fused(pipeline, transformer, source):
    """A copy of `transformer` with the LoRA `source` (tensors, or a file or folder) loaded by
    the pipeline's `load_lora_weights`, as diffusers converts it, and fused."""
    model = copy.deepcopy(transformer)
    pipe = pipeline(model)
    pipe.load_lora_weights(dict(source) if isinstance(source, dict) else str(source))
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()  # keeps the fused weights, under the modules' own keys
    return model


def assert_merges_as_fused(tmp_path, transformer, lora, modules, fused, forward):
    """`lora` read against `transformer` names its `modules`; merged into the transformer's
    checkpoint it changes those weights only, to diffusers' `fused` ones, and applied to the
    model it gives `fused`'s outputs."""
    before = transformer.state_dict()
    adapter = load_adapter(lora, base=transformer)
    assert sorted(adapter.layers) == sorted(f"transformer.{m}" for m in modules)
    base = save_state(before, tmp_path / "transformer.safetensors")
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    expected = fused.state_dict()
    changed = {k for k in merged if not torch.equal(merged[k], before[k])}
    assert changed == {f"{m}.weight" for m in modules}
    assert changed == {k for k in expected if not torch.equal(expected[k], before[k])}
    for key, weight in merged.items():
        assert torch.allclose(weight, expected[key], rtol=1e-5, atol=1e-6), key
    ours = copy.deepcopy(transformer)
    apply_adapter(ours, lora)
    assert rel(forward(ours), forward(transformer)) > 1e-3
    assert rel(forward(ours), forward(fused)) < 1e-5


def assert_same_weights(model, expected):
    """Every weight of `model` is `expected`'s (a state dict), to float32 rounding."""
    for key, weight in model.state_dict().items():
        assert torch.allclose(weight, expected[key], rtol=1e-5, atol=1e-6), key


# ---------------------------------------------------------------------------- Wan


@pytest.fixture
def wan():
    """A tiny diffusers Wan I2V transformer and a stand-in pipeline class with the LoRA loader
    of Wan pipelines."""
    from model_factories import tiny_wan

    return tiny_wan(), stand_in_pipeline(diffusers.loaders.WanLoraLoaderMixin, ("transformer",))


def wan_out(transformer):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 4, 1, 4, 4, generator=g),
            timestep=torch.tensor([10]),
            encoder_hidden_states=torch.randn(1, 512, 16, generator=g),  # Wan's 512 text tokens
            encoder_hidden_states_image=torch.randn(1, 2, 12, generator=g),
        ).sample


def wan_tensors(transformer, style):
    """A Wan LoRA file's tensors and `{its layer: the diffusers module}`: musubi-tuner's
    (`lora_unet_blocks_0_self_attn_q`, every block layer with its alpha, as diffusers' reader
    of these files needs), or ComfyUI's / ai-toolkit's in a form of `ORIGINAL_FORMS`
    (`diffusion_model.blocks.0.self_attn.q`, the blocks' layers and the model's; alphas, where
    the form keeps them, on the blocks' layers only: diffusers 0.42 refuses the others')."""
    blocks = {f"blocks.{i}.{ours}": f"blocks.{i}.{theirs}"
              for i in range(2) for ours, theirs in WAN_BLOCK.items()}  # fmt: skip
    if style == "musubi":
        layers = blocks
        parts = ("lora_down.weight", "lora_up.weight")
        alphas = set(layers)

        def stem(name):
            return "lora_unet_" + name.replace(".", "_")
    else:
        layers = {**blocks, **WAN_TOP}
        down, up, keep = ORIGINAL_FORMS[style]
        parts, alphas = (down, up), set(blocks) if keep else set()

        def stem(name):
            return f"diffusion_model.{name}"

    return lora_tensors(weight_shapes(transformer), layers, stem, parts, alphas), layers


@pytest.mark.parametrize("style", WAN_STYLES)
def test_a_wan_file_merges_and_applies_as_diffusers_fuses_it(tmp_path, wan, style):
    """musubi-tuner's Wan LoRAs (`lora_unet_blocks_0_self_attn_q`) and ComfyUI's / ai-toolkit's
    (`diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight`, also the time, text and image
    embedders' and the head's layers) are the pipeline's `transformer`; read against a
    diffusers Wan transformer each original module is the diffusers one it is
    (`blocks.0.attn1.to_q`, `attn2.add_k_proj`, `condition_embedder.time_proj`, `proj_out`),
    and the merge and the applied forward are those of diffusers' Wan loader + `fuse_lora`."""
    transformer, pipeline = wan
    tensors, layers = wan_tensors(transformer, style)
    lora = tmp_path / "wan_lora.safetensors"
    save_file(tensors, str(lora))
    assert components(lora) == {"transformer"}
    fused = diffusers_fused(pipeline, transformer, tensors)
    assert_merges_as_fused(tmp_path, transformer, lora, layers.values(), fused, wan_out)


@pytest.mark.parametrize("style", ["musubi", "lora_A+alpha"])
def test_a_wan_file_written_back_loads_in_diffusers(tmp_path, wan, style):
    """Converted against the diffusers Wan transformer, a Wan file's layers carry diffusers'
    names (`transformer.blocks.0.attn1.to_q`): diffusers loads the diffusers output, and PEFT
    the PEFT output, to the weights diffusers fuses from the file itself. Written as kohya
    without a base, a musubi-tuner file keeps musubi-tuner's names, which diffusers reads to
    the same weights."""
    transformer, pipeline = wan
    tensors, _ = wan_tensors(transformer, style)
    lora = tmp_path / "wan_lora.safetensors"
    save_file(tensors, str(lora))
    expected = diffusers_fused(pipeline, transformer, tensors).state_dict()
    convert_adapter(lora, tmp_path / "diffusers", "diffusers", base=transformer)
    assert_same_weights(diffusers_fused(pipeline, transformer, tmp_path / "diffusers"), expected)
    convert_adapter(lora, tmp_path / "peft", "peft", base=transformer)
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(transformer), tmp_path / "peft")
    assert_same_weights(merged.merge_and_unload(), expected)
    if style == "musubi":
        convert_adapter(lora, tmp_path / "kohya.safetensors", "kohya")
        written = load_file(str(tmp_path / "kohya.safetensors"))
        assert written.keys() == tensors.keys()
        loaded = diffusers_fused(pipeline, transformer, tmp_path / "kohya.safetensors")
        assert_same_weights(loaded, expected)


@pytest.mark.parametrize(
    ("keys", "image", "named"),
    [
        # a block past the model's two
        ({"lora_unet_blocks_2_self_attn_q.lora_down.weight": (2, 16),
          "lora_unet_blocks_2_self_attn_q.lora_up.weight": (16, 2)}, True,
         "lora_unet_blocks_2_self_attn_q"),
        # an I2V layer against a T2V model, which has no image attention
        ({"lora_unet_blocks_0_cross_attn_k_img.lora_down.weight": (2, 16),
          "lora_unet_blocks_0_cross_attn_k_img.lora_up.weight": (16, 2)}, False,
         "lora_unet_blocks_0_cross_attn_k_img"),
    ],
)  # fmt: skip
def test_a_wan_layer_of_no_module_is_named(tmp_path, keys, image, named):
    """A Wan layer that is no module of the diffusers base is a `TargetError` naming it, the
    layers beside it notwithstanding: the merge and the conversion write nothing and the model
    is not changed."""
    from model_factories import tiny_wan

    transformer = tiny_wan(image=image)
    g = torch.Generator().manual_seed(4)
    tensors = {k: torch.randn(*s, generator=g) for k, s in keys.items()}
    prefix = "lora_unet_" if next(iter(keys)).startswith("lora_unet_") else "diffusion_model."
    first = "blocks_0_self_attn_q." if prefix == "lora_unet_" else "blocks.0.self_attn.q."
    tensors[f"{prefix}{first}lora_down.weight"] = torch.randn(2, 16, generator=g)
    tensors[f"{prefix}{first}lora_up.weight"] = torch.randn(16, 2, generator=g)
    lora = tmp_path / "wan_lora.safetensors"
    save_file(tensors, str(lora))
    base = save_state(transformer.state_dict(), tmp_path / "transformer.safetensors")
    inputs, before = digest([lora, base]), listing(tmp_path)
    with pytest.raises(errors.TargetError, match=named):
        load_adapter(lora, base=transformer)
    with pytest.raises(errors.TargetError, match=named):
        merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    with pytest.raises(errors.TargetError, match=named):
        convert_adapter(lora, tmp_path / "diffusers", "diffusers", base=transformer)
    state = copy.deepcopy(transformer.state_dict())
    with pytest.raises(errors.TargetError, match=named):
        apply_adapter(transformer, lora)
    assert listing(tmp_path) == before and digest([lora, base]) == inputs
    assert all(torch.equal(v, state[k]) for k, v in transformer.state_dict().items())


@pytest.mark.parametrize("form", sorted(ORIGINAL_FORMS))
def test_a_wan_vace_file_merges_as_its_float64_update(tmp_path, form):
    """A Wan VACE LoRA's VACE-block layers (`diffusion_model.vace_blocks.0.before_proj`,
    `….self_attn.q`, `….after_proj`), which diffusers 0.42's Wan loader refuses, are the
    diffusers WanVACETransformer3DModel's `vace_blocks.0.proj_in`, `attn1.to_q`, `proj_out`:
    the merge adds to each its float64 `scale · up @ down` (alpha / r, 1 without alpha), and
    the applied model holds the merged weights."""
    torch.manual_seed(0)
    transformer = diffusers.WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
        vace_layers=[0], vace_in_channels=8)  # fmt: skip
    layers = {"vace_blocks.0.before_proj": "vace_blocks.0.proj_in",
              "vace_blocks.0.self_attn.q": "vace_blocks.0.attn1.to_q",
              "vace_blocks.0.ffn.2": "vace_blocks.0.ffn.net.2",
              "vace_blocks.0.after_proj": "vace_blocks.0.proj_out",
              "blocks.1.cross_attn.o": "blocks.1.attn2.to_out.0"}  # fmt: skip
    down, up, keep = ORIGINAL_FORMS[form]
    shapes = weight_shapes(transformer)

    def stem(name):
        return f"diffusion_model.{name}"

    tensors = lora_tensors(shapes, layers, stem, (down, up), set(layers) if keep else set())
    lora = tmp_path / "vace_lora.safetensors"
    save_file(tensors, str(lora))
    before = transformer.state_dict()
    base = save_state(before, tmp_path / "transformer.safetensors")
    merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    want = {}
    for path, module in layers.items():
        d, u = (tensors[f"{stem(path)}.{part}"].double() for part in (down, up))
        alpha = tensors.get(f"{stem(path)}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / d.shape[0]
        want[f"{module}.weight"] = before[f"{module}.weight"].double() + scale * u @ d
    assert {k for k in merged if not torch.equal(merged[k], before[k])} == want.keys()
    for key, weight in want.items():
        assert rel(merged[key], weight) < 1e-6, key
    apply_adapter(transformer, lora)
    assert all(torch.equal(v, merged[k]) for k, v in transformer.state_dict().items())


# ---------------------------------------------------------------------------- Qwen-Image


@pytest.fixture
def qwen():
    """A tiny diffusers Qwen-Image transformer and a stand-in pipeline class with the LoRA
    loader of Qwen-Image pipelines."""
    from model_factories import tiny_qwen_image

    pipeline = stand_in_pipeline(diffusers.loaders.QwenImageLoraLoaderMixin, ("transformer",))
    return tiny_qwen_image(), pipeline


def qwen_out(transformer):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 4, 16, generator=g),
            encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
            encoder_hidden_states_mask=torch.ones(1, 3),
            timestep=torch.tensor([0.5]),
            img_shapes=[(1, 2, 2)],
        ).sample


def qwen_tensors(transformer, style):
    """A Qwen-Image LoRA file's tensors and `{its layer: the diffusers module}`: musubi-tuner's
    (`lora_unet_transformer_blocks_0_attn_to_q`, the blocks' linear modules with alphas),
    kohya's on every linear module (the blocks' and the model's: `lora_unet_img_in`,
    `lora_unet_norm_out_linear`), or ComfyUI's on every one in a form of `ORIGINAL_FORMS`
    (`diffusion_model.transformer_blocks.0.attn.to_q`)."""
    shapes = weight_shapes(transformer)
    layers = {name: name for name, shape in shapes.items() if len(shape) == 2}
    if style == "musubi":
        layers = {name: name for name in layers if name.startswith("transformer_blocks.")}
    if style in ("musubi", "kohya"):
        parts, alphas = ("lora_down.weight", "lora_up.weight"), set(layers)

        def stem(name):
            return "lora_unet_" + name.replace(".", "_")
    else:
        down, up, keep = ORIGINAL_FORMS[style]
        parts, alphas = (down, up), set(layers) if keep else set()

        def stem(name):
            return f"diffusion_model.{name}"

    return lora_tensors(shapes, layers, stem, parts, alphas), layers


@pytest.mark.parametrize("style", ["musubi", "kohya", *sorted(ORIGINAL_FORMS)])
def test_a_qwen_image_file_merges_and_applies_as_diffusers_fuses_it(tmp_path, qwen, style):
    """Qwen-Image LoRAs name diffusers' own modules, under sd-scripts' prefix (musubi-tuner's,
    of the blocks only: `lora_unet_transformer_blocks_0_img_mlp_net_0_proj`; or also the
    model's, `lora_unet_norm_out_linear`) or
    ComfyUI's (`diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight`): the layers are
    the pipeline's `transformer`, and the merge and the applied forward are those of
    diffusers' Qwen-Image loader + `fuse_lora`."""
    transformer, pipeline = qwen
    tensors, layers = qwen_tensors(transformer, style)
    lora = tmp_path / "qwen_lora.safetensors"
    save_file(tensors, str(lora))
    assert components(lora) == {"transformer"}
    fused = diffusers_fused(pipeline, transformer, tensors)
    assert_merges_as_fused(tmp_path, transformer, lora, layers.values(), fused, qwen_out)


@pytest.mark.parametrize("style", ["musubi", "lora_A+alpha"])
def test_a_qwen_image_file_written_back_loads_in_diffusers(tmp_path, qwen, style):
    """A Qwen-Image file converted against its diffusers base loads in diffusers (diffusers
    output) and PEFT (PEFT output) to the weights diffusers fuses from the file itself;
    written as kohya without a base its layers are `lora_unet_…`, as musubi-tuner names
    them, which diffusers reads to the same weights."""
    transformer, pipeline = qwen
    tensors, layers = qwen_tensors(transformer, style)
    lora = tmp_path / "qwen_lora.safetensors"
    save_file(tensors, str(lora))
    expected = diffusers_fused(pipeline, transformer, tensors).state_dict()
    convert_adapter(lora, tmp_path / "diffusers", "diffusers", base=transformer)
    assert_same_weights(diffusers_fused(pipeline, transformer, tmp_path / "diffusers"), expected)
    convert_adapter(lora, tmp_path / "peft", "peft", base=transformer)
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(transformer), tmp_path / "peft")
    assert_same_weights(merged.merge_and_unload(), expected)
    convert_adapter(lora, tmp_path / "kohya.safetensors", "kohya")
    written = load_file(str(tmp_path / "kohya.safetensors"))
    assert {k.partition(".")[0] for k in written} == {
        "lora_unet_" + name.replace(".", "_") for name in layers
    }
    assert_same_weights(diffusers_fused(pipeline, transformer, tmp_path / "kohya.safetensors"),
                        expected)  # fmt: skip


def test_a_qwen_image_layer_of_no_module_is_named(tmp_path, qwen):
    """A file of `lora_unet_transformer_blocks_N_…` attention layers only (no module only
    Qwen-Image has, but a block no UNet has at its top) is the pipeline's `transformer`; a layer
    past the base's blocks is a `TargetError` naming it, and the merge writes nothing."""
    transformer, _ = qwen
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for block in (0, 1):
        stem = f"lora_unet_transformer_blocks_{block}_attn_to_q"
        tensors[f"{stem}.lora_down.weight"] = torch.randn(2, 16, generator=g)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(16, 2, generator=g)
    lora = tmp_path / "qwen_lora.safetensors"
    save_file(tensors, str(lora))
    assert components(lora) == {"transformer"}
    base = save_state(transformer.state_dict(), tmp_path / "transformer.safetensors")
    before = listing(tmp_path)
    named = "lora_unet_transformer_blocks_1_attn_to_q"
    with pytest.raises(errors.TargetError, match=named):
        load_adapter(lora, base=transformer)
    with pytest.raises(errors.TargetError, match=named):
        merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    assert listing(tmp_path) == before


# ---------------------------------------------------------------------------- HunyuanVideo

# HunyuanVideo's modules in its original layout (Tencent's checkpoints) and the diffusers
# HunyuanVideoTransformer3DModel's they are, written out; a fused projection is its modules'
# rows in turn, the final modulation its module's with the halves exchanged
HUNYUAN_LAYERS = {
    "double_blocks.0.img_attn_qkv": ("transformer_blocks.0.attn.to_q",
                                     "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"),
    "double_blocks.0.img_attn_proj": ("transformer_blocks.0.attn.to_out.0",),
    "double_blocks.0.img_mlp.fc1": ("transformer_blocks.0.ff.net.0.proj",),
    "double_blocks.0.img_mlp.fc2": ("transformer_blocks.0.ff.net.2",),
    "double_blocks.0.img_mod.linear": ("transformer_blocks.0.norm1.linear",),
    "double_blocks.0.txt_attn_qkv": ("transformer_blocks.0.attn.add_q_proj",
                                     "transformer_blocks.0.attn.add_k_proj",
                                     "transformer_blocks.0.attn.add_v_proj"),
    "double_blocks.0.txt_attn_proj": ("transformer_blocks.0.attn.to_add_out",),
    "double_blocks.0.txt_mlp.fc1": ("transformer_blocks.0.ff_context.net.0.proj",),
    "double_blocks.0.txt_mlp.fc2": ("transformer_blocks.0.ff_context.net.2",),
    "double_blocks.0.txt_mod.linear": ("transformer_blocks.0.norm1_context.linear",),
    "single_blocks.0.linear1": ("single_transformer_blocks.0.attn.to_q",
                                "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v",
                                "single_transformer_blocks.0.proj_mlp"),
    "single_blocks.0.linear2": ("single_transformer_blocks.0.proj_out",),
    "single_blocks.0.modulation.linear": ("single_transformer_blocks.0.norm.linear",),
    "txt_in.individual_token_refiner.blocks.0.self_attn_qkv": (
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_q",
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_k",
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_v"),
    "txt_in.individual_token_refiner.blocks.0.self_attn_proj": (
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_out.0",),
    "txt_in.individual_token_refiner.blocks.0.mlp.fc1": (
        "context_embedder.token_refiner.refiner_blocks.0.ff.net.0.proj",),
    "txt_in.individual_token_refiner.blocks.0.mlp.fc2": (
        "context_embedder.token_refiner.refiner_blocks.0.ff.net.2",),
    "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1": (
        "context_embedder.token_refiner.refiner_blocks.0.norm_out.linear",),
    "txt_in.input_embedder": ("context_embedder.proj_in",),
    "txt_in.t_embedder.mlp.0": ("context_embedder.time_text_embed.timestep_embedder.linear_1",),
    "txt_in.t_embedder.mlp.2": ("context_embedder.time_text_embed.timestep_embedder.linear_2",),
    "txt_in.c_embedder.linear_1": ("context_embedder.time_text_embed.text_embedder.linear_1",),
    "txt_in.c_embedder.linear_2": ("context_embedder.time_text_embed.text_embedder.linear_2",),
    "time_in.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.mlp.0": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.mlp.2": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}  # fmt: skip
HUNYUAN_LINEAR1 = 3072
"""The rows of each of q, k, v in a single block's `linear1` by which diffusers 0.42 splits it
(HunyuanVideo's width), whatever the model's."""


@pytest.fixture
def hunyuan():
    """A tiny diffusers HunyuanVideo transformer and a stand-in pipeline class with the LoRA
    loader of HunyuanVideo pipelines."""
    from model_factories import tiny_hunyuan_video

    loader = diffusers.loaders.HunyuanVideoLoraLoaderMixin
    return tiny_hunyuan_video(), stand_in_pipeline(loader, ("transformer",))


def hunyuan_out(transformer):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 4, 1, 2, 2, generator=g),
            timestep=torch.tensor([10]),
            encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
            encoder_attention_mask=torch.ones(1, 3),
            pooled_projections=torch.randn(1, 8, generator=g),
            guidance=torch.tensor([3.5]),
        ).sample


def hunyuan_tensors(transformer, style):
    """A HunyuanVideo LoRA file's tensors on every layer of `HUNYUAN_LAYERS`: musubi-tuner's
    (`lora_unet_double_blocks_0_img_attn_qkv`, with alphas) or ComfyUI's in a form of
    `ORIGINAL_FORMS` (`diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight`); and the
    `(down, up · scale)` of each layer."""
    shapes = weight_shapes(transformer)
    layers = {path: path for path in HUNYUAN_LAYERS}
    fused = {path: (sum(shapes[m][0] for m in modules), shapes[modules[0]][1])
             for path, modules in HUNYUAN_LAYERS.items()}  # fmt: skip
    if style == "musubi":
        parts, keep = ("lora_down.weight", "lora_up.weight"), True

        def stem(name):
            return "lora_unet_" + name.replace(".", "_")
    else:
        down, up, keep = ORIGINAL_FORMS[style]
        parts = (down, up)

        def stem(name):
            return f"diffusion_model.{name}"

    tensors = lora_tensors(fused, layers, stem, parts, set(layers) if keep else set())
    factors = {}
    for path in layers:
        down, up = (tensors[f"{stem(path)}.{part}"] for part in parts)
        alpha = tensors.get(f"{stem(path)}.alpha")
        factors[path] = (down, up * (1.0 if alpha is None else float(alpha) / down.shape[0]))
    return tensors, factors


def diffusers_fuse_hunyuan(pipeline, transformer, factors):
    """A copy of `transformer` with the HunyuanVideo LoRA layers `factors` (`{path: (down,
    up)}`, the scale in `up`) fused by diffusers' HunyuanVideo loader from ComfyUI's `lora_A`
    form, which it reads (alpha = r). diffusers 0.42 splits `linear1` by HunyuanVideo's sizes
    (`HUNYUAN_LINEAR1`), so the tiny layer's row blocks go in at those offsets and the split
    LoRAs are cut back to the model's rows. It also splits a refiner `self_attn_qkv`'s
    `lora_A` rows in three (a rank-r/3 down for each of q, k, v, which its `lora_B` does not
    fit) and exchanges the halves of `final_layer.adaLN_modulation.1`'s `lora_A` rows as well
    as its `lora_B`'s (`up · P · down`, not the row-swapped ΔW); those two layers go in
    under diffusers' module names, split here: each module the shared down and its rows of up
    (`norm_out.linear`: up's halves exchanged)."""
    sizes = {m: dict(transformer.named_modules())[m].weight.shape[0]
             for modules in HUNYUAN_LAYERS.values() for m in modules}  # fmt: skip
    tensors = {}
    for path, (down, up) in factors.items():
        modules = HUNYUAN_LAYERS[path]
        if path == "final_layer.adaLN_modulation.1":
            shift, scale = up.chunk(2)
            tensors["transformer.norm_out.linear.lora_A.weight"] = down
            tensors["transformer.norm_out.linear.lora_B.weight"] = torch.cat([scale, shift])
            continue
        if "self_attn_qkv" in path:
            starts = itertools.accumulate((sizes[m] for m in modules), initial=0)
            for module, start in zip(modules, starts, strict=False):
                tensors[f"transformer.{module}.lora_A.weight"] = down
                tensors[f"transformer.{module}.lora_B.weight"] = up[start : start + sizes[module]]
            continue
        if path.endswith("linear1"):
            padded = torch.zeros(3 * HUNYUAN_LINEAR1 + sizes[modules[-1]], up.shape[1])
            start = 0
            for i, module in enumerate(modules):
                offset = i * HUNYUAN_LINEAR1
                padded[offset : offset + sizes[module]] = up[start : start + sizes[module]]
                start += sizes[module]
            up = padded
        tensors[f"diffusion_model.{path}.lora_A.weight"] = down
        tensors[f"diffusion_model.{path}.lora_B.weight"] = up
    state = pipeline.lora_state_dict(tensors)
    for module in HUNYUAN_LAYERS["single_blocks.0.linear1"]:
        key = f"transformer.{module}.lora_B.weight"
        state[key] = state[key][: sizes[module]]
    return diffusers_fused(pipeline, transformer, state)


@pytest.mark.parametrize("style", WAN_STYLES)
def test_a_hunyuan_video_file_merges_and_applies_as_diffusers_fuses_it(tmp_path, hunyuan, style):
    """musubi-tuner's HunyuanVideo LoRAs (`lora_unet_double_blocks_0_img_attn_qkv`) and
    ComfyUI's (`diffusion_model.single_blocks.0.linear1.lora_A.weight`, the token refiner's and
    the embedders' too) are the pipeline's `transformer`; read against a diffusers HunyuanVideo
    transformer each original module is the diffusers module(s) it is (fused `img_attn_qkv`,
    `txt_attn_qkv`, `linear1` and the refiner's `self_attn_qkv` split by rows, the final
    modulation's halves exchanged), and the merge and the applied forward are those of
    diffusers' HunyuanVideo loader + `fuse_lora` of the same layers."""
    transformer, pipeline = hunyuan
    tensors, factors = hunyuan_tensors(transformer, style)
    lora = tmp_path / "hunyuan_lora.safetensors"
    save_file(tensors, str(lora))
    assert components(lora) == {"transformer"}
    fused = diffusers_fuse_hunyuan(pipeline, transformer, factors)
    modules = [m for ms in HUNYUAN_LAYERS.values() for m in ms]
    assert_merges_as_fused(tmp_path, transformer, lora, modules, fused, hunyuan_out)


def test_a_hunyuan_video_file_written_back_loads_in_diffusers(tmp_path, hunyuan):
    """Converted against the diffusers HunyuanVideo transformer, a musubi-tuner file's layers
    carry diffusers' names: diffusers loads the diffusers output to the weights it fuses from
    the same layers; written as kohya without a base the names are musubi-tuner's."""
    transformer, pipeline = hunyuan
    tensors, factors = hunyuan_tensors(transformer, "musubi")
    lora = tmp_path / "hunyuan_lora.safetensors"
    save_file(tensors, str(lora))
    expected = diffusers_fuse_hunyuan(pipeline, transformer, factors).state_dict()
    convert_adapter(lora, tmp_path / "diffusers", "diffusers", base=transformer)
    assert_same_weights(diffusers_fused(pipeline, transformer, tmp_path / "diffusers"), expected)
    convert_adapter(lora, tmp_path / "kohya.safetensors", "kohya")
    assert load_file(str(tmp_path / "kohya.safetensors")).keys() == tensors.keys()


def test_a_hunyuan_video_layer_of_no_module_is_named(tmp_path, hunyuan):
    """A HunyuanVideo layer past the base's blocks is a `TargetError` naming it, one whose ΔW
    rows are not its modules' a `ShapeError`; the merge writes nothing."""
    transformer, _ = hunyuan
    base = save_state(transformer.state_dict(), tmp_path / "transformer.safetensors")
    g = torch.Generator().manual_seed(4)
    cases = [("diffusion_model.single_blocks.1.linear1", 80, errors.TargetError,
              r"transformer\.single_blocks\.1\.linear1"),
             ("diffusion_model.double_blocks.0.img_attn_qkv", 40, errors.ShapeError,
              r"img_attn_qkv.* 40 rows .* 48")]  # fmt: skip
    for i, (path, rows, error, named) in enumerate(cases):
        lora = tmp_path / f"hunyuan_lora_{i}.safetensors"
        down, up = torch.randn(2, 16, generator=g), torch.randn(rows, 2, generator=g)
        save_file({f"{path}.lora_A.weight": down, f"{path}.lora_B.weight": up}, str(lora))
        before = listing(tmp_path)
        with pytest.raises(error, match=named):
            merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
        assert listing(tmp_path) == before


# ---------------------------------------------------------------------------- LTX-Video

# LTX-Video's modules outside its blocks in its original layout (Lightricks' checkpoints) that
# the diffusers LTXVideoTransformer3DModel renames; the others are named alike
LTX_RENAMED = {
    "patchify_proj": "proj_in",
    "adaln_single.linear": "time_embed.linear",
    "adaln_single.emb.timestep_embedder.linear_1": "time_embed.emb.timestep_embedder.linear_1",
    "adaln_single.emb.timestep_embedder.linear_2": "time_embed.emb.timestep_embedder.linear_2",
}


def ltx_out(transformer):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 8, 4, generator=g),
            encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
            timestep=torch.tensor([10]),
            encoder_attention_mask=torch.ones(1, 3),
            num_frames=2, height=2, width=2,
        ).sample  # fmt: skip


@pytest.mark.parametrize("form", sorted(ORIGINAL_FORMS))
def test_an_ltx_video_file_merges_and_applies_as_diffusers_fuses_it(tmp_path, form):
    """ComfyUI's LTX-Video LoRAs name its modules in Lightricks' layout, which diffusers' are
    but for `patchify_proj` and `adaln_single` (`proj_in`, `time_embed`): read against a
    diffusers LTX-Video transformer each is the module it is, and the merge and the applied
    forward are those of diffusers' LTX-Video loader + `fuse_lora` of the same layers, given
    the renamed ones under diffusers' names (which diffusers 0.42's loader does not map), in
    the `lora_A` form with each alpha / r folded into `up` (it reads neither `lora_down` keys
    nor `.alpha` ones in these files)."""
    from model_factories import tiny_ltx_video

    transformer = tiny_ltx_video()
    pipeline = stand_in_pipeline(diffusers.loaders.LTXVideoLoraLoaderMixin, ("transformer",))
    shapes = weight_shapes(transformer)
    renamed = {theirs: ours for ours, theirs in LTX_RENAMED.items()}
    layers = {renamed.get(name, name): name for name, shape in shapes.items() if len(shape) == 2}
    assert set(LTX_RENAMED) <= layers.keys()
    down, up, keep = ORIGINAL_FORMS[form]

    def stem(name):
        return f"diffusion_model.{name}"

    tensors = lora_tensors(shapes, layers, stem, (down, up), set(layers) if keep else set())
    lora = tmp_path / "ltx_lora.safetensors"
    save_file(tensors, str(lora))
    assert components(lora) == {"transformer"}
    theirs = {}
    for path in layers:
        scale = 1.0
        if f"{stem(path)}.alpha" in tensors:
            scale = float(tensors[f"{stem(path)}.alpha"]) / tensors[f"{stem(path)}.{down}"].shape[0]
        for part, peft, factor in ((down, "lora_A", 1.0), (up, "lora_B", scale)):
            key = f"diffusion_model.{LTX_RENAMED.get(path, path)}.{peft}.weight"
            theirs[key] = tensors[f"{stem(path)}.{part}"] * factor
    fused = diffusers_fused(pipeline, transformer, theirs)
    assert_merges_as_fused(tmp_path, transformer, lora, layers.values(), fused, ltx_out)
