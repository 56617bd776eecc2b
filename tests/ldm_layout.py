"""Test helper: a diffusers SD pipeline's weights in the original (LDM / CompVis) single-file key layout, the one
A1111 checkpoints use. Written as the inverse of what diffusers' single-file loader reads
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``), so that a model saved here must load back to the same weights."""

from __future__ import annotations

import re

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _rename(rest: str, pairs) -> str:
    for new, old in pairs:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]  # diffusers name → LDM name
    per_block = unet.config.layers_per_block + 1
    out = {}
    for key, value in unet.state_dict().items():
        if key in top:
            ldm = top[key]
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            ldm = f"input_blocks.{1 + int(m[1]) * per_block + int(m[2])}.0.{_rename(m[3], UNET_RESNET)}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            ldm = f"input_blocks.{1 + int(m[1]) * per_block + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            ldm = f"input_blocks.{1 + int(m[1]) * per_block + per_block - 1}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            ldm = f"middle_block.{2 * int(m[1])}.{_rename(m[2], UNET_RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            ldm = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            ldm = f"output_blocks.{int(m[1]) * per_block + int(m[2])}.0.{_rename(m[3], UNET_RESNET)}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            ldm = f"output_blocks.{int(m[1]) * per_block + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            has_attention = hasattr(unet.up_blocks[int(m[1])], "attentions")
            ldm = f"output_blocks.{int(m[1]) * per_block + per_block - 1}.{2 if has_attention else 1}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + ldm] = value
    return out


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    top = DIFFUSERS_TO_LDM_MAPPING["vae"]  # diffusers name → LDM name
    last = len(vae.config.up_block_types) - 1
    out = {}
    for key, value in vae.state_dict().items():
        if key in top:
            ldm = top[key]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            ldm = f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            ldm = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            ldm = f"decoder.up.{last - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            ldm = f"decoder.up.{last - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            ldm = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            ldm = f"{m[1]}.mid.attn_1.{_rename(m[2], VAE_ATTENTION)}"
            if value.ndim == 2:  # LDM's attention projections are 1×1 convolutions
                value = value[:, :, None, None]
        else:
            raise KeyError(f"no LDM name for VAE key {key}")
        out["first_stage_model." + ldm] = value
    return out


def sd_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """UNet, VAE and the SD 1.x text encoder (``cond_stage_model.transformer.text_model.…``) in one dict."""
    text = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in pipe.text_encoder.state_dict().items()
            if not k.startswith("text_model.")}
    text.update({f"cond_stage_model.transformer.{k}": v for k, v in pipe.text_encoder.state_dict().items()
                 if k.startswith("text_model.")})
    return {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **text}
