"""The small diffusers UNet (fp16) and the fine-tune of it that docs/cli.md's extract, resize
and combine examples use: every weight but the cross-attention keys and values moved by a
rank-4 update and noise. Writes unet.safetensors and unet_tuned.safetensors here."""

import diffusers
import torch
from safetensors.torch import save_file

torch.manual_seed(0)
unet = diffusers.UNet2DConditionModel(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=8,
).half()
base = {k: v.contiguous() for k, v in unet.state_dict().items()}
g = torch.Generator().manual_seed(1)
tuned = {}
for key, value in base.items():
    if value.ndim >= 2 and "attn2.to_k" not in key and "attn2.to_v" not in key:
        out, fan_in = value.shape[0], value[0].numel()
        update = torch.randn(out, 4, generator=g) @ torch.randn(4, fan_in, generator=g)
        noise = torch.randn(value.shape, generator=g)
        value = (value.float() + 0.01 * update.reshape(value.shape) + 1e-4 * noise).half()
    tuned[key] = value.contiguous()
save_file(base, "unet.safetensors")
save_file(tuned, "unet_tuned.safetensors")
