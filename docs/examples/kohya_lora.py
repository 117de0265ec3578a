"""The kohya LoRA that docs/cli.md's inspect, convert and merge examples use, for the UNet of
unet_pair.py: rank 4, alpha 2, on the self-attention queries and values of its attention
blocks (LoRA) and a Tucker (`lora_mid`) layer on the 3×3 `down_blocks.1.resnets.0.conv1`,
fp16, named as sd-scripts names them. Writes lora.safetensors here."""

import torch
from safetensors.torch import save_file

g = torch.Generator().manual_seed(0)
rank, alpha = 4, 2.0
state = {}
for block, channels in [("down_blocks.0.attentions.0", 32), ("mid_block.attentions.0", 64),
                        ("up_blocks.1.attentions.0", 32), ("up_blocks.1.attentions.1", 32)]:
    for projection in ("to_q", "to_v"):
        name = f"lora_unet_{block}.transformer_blocks.0.attn1.{projection}".replace(".", "_")
        state[f"{name}.lora_down.weight"] = 0.1 * torch.randn(rank, channels, generator=g)
        state[f"{name}.lora_up.weight"] = 0.1 * torch.randn(channels, rank, generator=g)
        state[f"{name}.alpha"] = torch.tensor(alpha)
name = "lora_unet_down_blocks_1_resnets_0_conv1"  # a 32 → 64 channel 3×3 convolution
state[f"{name}.lora_down.weight"] = 0.1 * torch.randn(rank, 32, 1, 1, generator=g)
state[f"{name}.lora_mid.weight"] = 0.1 * torch.randn(rank, rank, 3, 3, generator=g)
state[f"{name}.lora_up.weight"] = 0.1 * torch.randn(64, rank, 1, 1, generator=g)
state[f"{name}.alpha"] = torch.tensor(alpha)
state = {key: value.half().contiguous() for key, value in state.items()}
save_file(state, "lora.safetensors", metadata={"ss_network_dim": "4", "ss_network_alpha": "2"})
