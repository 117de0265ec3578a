"""Small models for the nn, report and CLI tests (importable as `model_factories:<name>`)."""

from __future__ import annotations

from torch import nn


def mlp_head() -> nn.Sequential:
    """The 576 → 288 → 144 → 72 → 10 MLP head of the MNIST LoRA notebook."""
    return nn.Sequential(
        nn.Linear(576, 288),
        nn.ReLU(),
        nn.Linear(288, 144),
        nn.ReLU(),
        nn.Linear(144, 72),
        nn.ReLU(),
        nn.Linear(72, 10),
    )


class Classifier(nn.Module):
    """The 3072 → 4096 → 2048 → 10 CIFAR classifier of the LoRA fine-tuning write-up."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * 32 * 32, 4096)
        self.fc2 = nn.Linear(4096, 2048)
        self.fc3 = nn.Linear(2048, 10)


class Block(nn.Module):
    """A nested block: a size-keeping 3×3 conv, a 1×1 conv, a strided conv, two linears."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.down = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.attn = nn.ModuleDict({"to_q": nn.Linear(channels, channels, bias=False)})
        self.attn["to_v"] = nn.Linear(channels, channels, bias=False)
        self.norm = nn.GroupNorm(1, channels)


class TinyNet(nn.Module):
    """Nested modules (a ModuleList of blocks) with 1-D, 2-D and 3-D convolutions and linears."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(4), Block(6)])
        self.temporal = nn.Conv1d(5, 7, 3, padding=1)
        self.volume = nn.Conv3d(3, 4, (3, 1, 3), padding=(1, 0, 1))
        self.head = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 3))


def sd_v1_unet_config() -> dict[str, object]:
    """The diffusers `UNet2DConditionModel` config of Stable Diffusion v1."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }


def tiny_flux_config() -> dict[str, object]:
    """A diffusers `FluxTransformer2DModel` config of Flux's layout at toy sizes: one double
    and one single block, 2 heads of 16 (inner width 32, MLP 128), guidance embedding."""
    return {
        "patch_size": 1,
        "in_channels": 4,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 6, 6),
    }


def tiny_flux(seed: int = 0) -> nn.Module:
    """A diffusers `FluxTransformer2DModel` of `tiny_flux_config`, seeded."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(**tiny_flux_config())


def tiny_wan(seed: int = 0, image: bool = True) -> nn.Module:
    """A diffusers `WanTransformer3DModel` of Wan 2.1's layout at toy sizes: two blocks,
    2 heads of 8 (width 16, FFN 32), text width 16; with `image` (I2V's) an image embedder of
    width 12 and the blocks' image attention (`add_k_proj`, `add_v_proj`)."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        image_dim=12 if image else None, added_kv_proj_dim=16 if image else None)  # fmt: skip


def tiny_qwen_image(seed: int = 0) -> nn.Module:
    """A diffusers `QwenImageTransformer2DModel` at toy sizes: one block, 2 heads of 8
    (width 16, MLP 64), text width 16, 16 input channels (4 latent channels, 2×2 patches)."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))  # fmt: skip


def tiny_hunyuan_video(seed: int = 0) -> nn.Module:
    """A diffusers `HunyuanVideoTransformer3DModel` at toy sizes: one double, one single and
    one token-refiner block, 2 heads of 8 (width 16, MLP 32), text width 16, pooled text 8,
    guidance embedding, 1×1×1 patches."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4))  # fmt: skip


def tiny_ltx_video(seed: int = 0) -> nn.Module:
    """A diffusers `LTXVideoTransformer3DModel` at toy sizes: one block, 2 heads of 8 (width
    16, FFN 64), 4 latent channels, text width 16."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=16)  # fmt: skip


def tiny_architectures() -> dict[str, object]:
    """Builders of tiny random transformers / diffusers models (grouped-query attention,
    GPT-2's `Conv1D` and tied head, encoder-decoders, a Conv1d front end, UNet and VAE
    convolutions), for comparing target selection and counts with PEFT. Imports both
    libraries: call it after `pytest.importorskip`."""
    import diffusers
    import transformers as tf

    size = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 32, "vocab_size": 32, "max_position_embeddings": 16}  # fmt: skip
    return {
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**size, num_key_value_heads=1)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0,
            eos_token_id=0)),
        "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(**size)),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=32)),
        "whisper": lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=32,
            num_mel_bins=8, max_source_positions=8, max_target_positions=16, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)),
        "unet": lambda: diffusers.UNet2DConditionModel(
            sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
            cross_attention_dim=8, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        "vae": lambda: diffusers.AutoencoderKL(
            block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4),
    }  # fmt: skip
