"""`lowrank.io` against diffusers for the LoRA files of video and image DiTs that name a
model's modules in its original layout, or under sd-scripts' `lora_unet` prefix: Wan 2.x
(musubi-tuner's `lora_unet_blocks_0_self_attn_q`, ComfyUI's and ai-toolkit's
`diffusion_model.blocks.0.self_attn.q.…`) and Qwen-Image
(`lora_unet_transformer_blocks_0_attn_to_q`, `diffusion_model.transformer_blocks.0.attn.to_q.…`).
Each file's merge into, and application onto, the diffusers model are compared with what
diffusers' own loader and `fuse_lora` make of it; files lowrank writes from it load in
diffusers to the same weights. The models are tiny configs of the real diffusers classes."""

from __future__ import annotations

import copy

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
        # a block's modulation is a parameter (diffusers' scale_shift_table), no module
        ({"diffusion_model.blocks.0.modulation.lora_A.weight": (2, 16),
          "diffusion_model.blocks.0.modulation.lora_B.weight": (96, 2)}, True,
         r"transformer\.blocks\.0\.modulation"),
        # an I2V layer against a T2V model, which has no image attention
        ({"lora_unet_blocks_0_cross_attn_k_img.lora_down.weight": (2, 16),
          "lora_unet_blocks_0_cross_attn_k_img.lora_up.weight": (16, 2)}, False,
         "lora_unet_blocks_0_cross_attn_k_img"),
    ],
)  # fmt: skip
def test_a_wan_layer_of_no_module_is_named(tmp_path, keys, image, named):
    """A Wan layer that is no module of the diffusers base is a `TargetError` naming it, the
    layers beside it notwithstanding: the merge writes nothing and the model is not changed."""
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
    state = copy.deepcopy(transformer.state_dict())
    with pytest.raises(errors.TargetError, match=named):
        apply_adapter(transformer, lora)
    assert listing(tmp_path) == before and digest([lora, base]) == inputs
    assert all(torch.equal(v, state[k]) for k, v in transformer.state_dict().items())


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
    """A Qwen-Image layer past the base's blocks is a `TargetError` naming it; the merge
    writes nothing."""
    transformer, _ = qwen
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for block in (0, 1):
        stem = f"lora_unet_transformer_blocks_{block}_attn_to_q"
        tensors[f"{stem}.lora_down.weight"] = torch.randn(2, 16, generator=g)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(16, 2, generator=g)
    lora = tmp_path / "qwen_lora.safetensors"
    save_file(tensors, str(lora))
    base = save_state(transformer.state_dict(), tmp_path / "transformer.safetensors")
    before = listing(tmp_path)
    named = "lora_unet_transformer_blocks_1_attn_to_q"
    with pytest.raises(errors.TargetError, match=named):
        load_adapter(lora, base=transformer)
    with pytest.raises(errors.TargetError, match=named):
        merge_checkpoint(base, lora, tmp_path / "merged.safetensors")
    assert listing(tmp_path) == before
