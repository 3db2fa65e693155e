"""Test helper: a diffusers ``AutoencoderKL`` state dict under LDM's key names, to write the LDM
``autoencoder_kl.pth`` files that easygen/bidiffuser/autoencoder.py loads (through diffusers'
``convert_ldm_vae_checkpoint``, the forward map). Only the tests write LDM files.

LDM numbers the decoder's ``up`` levels from the highest resolution, diffusers' ``up_blocks`` from the
lowest; the mid-block attention's q, k, v and proj_out are 1x1 convs in LDM, Linear layers in diffusers.
"""

from __future__ import annotations

import re

import torch

_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet_param(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{'nin_shortcut' if head == 'conv_shortcut' else head}.{tail}"


def diffusers_to_ldm_key(key: str, num_levels: int) -> str:
    """One diffusers ``AutoencoderKL`` key under its LDM name (``num_levels``: 4 for KL-f8)."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet_param(m[3])}"
    if m := re.fullmatch(
        r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)",
        key,
    ):
        return f"{m[1]}.mid.attn_1.{_ATTN[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet_param(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{_resnet_param(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    raise KeyError(f"not a diffusers AutoencoderKL key: {key!r}")


def diffusers_to_ldm_state_dict(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict under LDM names (attention Linear weights -> 1x1 convs)."""
    out = {}
    for key, value in sd.items():
        if re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key):
            value = value[:, :, None, None]
        out[diffusers_to_ldm_key(key, num_levels)] = value
    return out
