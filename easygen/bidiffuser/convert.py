"""U-ViT checkpoint formats: the original UniDiffuser key names and diffusers' ``UniDiffuserModel`` port.

The original names (``uvit_v1.pth``, EasyGen's ``nnet_ema.pth`` / ``uvit_bi.pth``) are the ones ``UViT`` uses.
diffusers (``thu-ml/unidiffuser-v1`` ``unet/``) renames every module, splits each ``attn.qkv`` into
``to_q/to_k/to_v`` (three equal row chunks) and keeps a dead copy of the patch embedding under
``transformer.pos_embed.proj``; that copy is dropped on load and re-written on save so diffusers can read our
files. Shapes alone fix most config fields (``infer_config``); the head count (head dim 64 in UniDiffuser)
and the split of the position table between text tokens and patches are assumed unless given.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

import torch

from easygen.checkpoint import load_state_dict_file, save_state_dict_file

from .uvit import UViT, UViTConfig

Format = Literal["original", "diffusers"]

# Top-level modules outside the blocks: original prefix -> diffusers prefix.
_TOP = {
    "patch_embed.proj.": "vae_img_in.proj.",
    "clip_img_embed.": "clip_img_in.",
    "text_embed.": "text_in.",
    "token_embedding.": "data_type_token_embedding.",
    "norm.": "transformer.norm_out.",
    "decoder_pred.": "vae_img_out.",
    "clip_img_out.": "clip_img_out.",
    "text_out.": "text_out.",
}
_TOP_PARAMS = {"pos_embed": "pos_embed", "pos_embed_token": "data_type_pos_embed_token"}
# Inside a transformer block: original -> diffusers (qkv is handled separately).
_BLOCK = {
    "norm2.": "norm1.",
    "attn.proj.": "attn1.to_out.0.",
    "norm3.": "norm3.",
    "mlp.fc1.": "ff.net.0.proj.",
    "mlp.fc2.": "ff.net.2.",
}
_DEAD_PATCH_COPY = "transformer.pos_embed.proj."
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def detect_format(state_dict: dict[str, torch.Tensor]) -> Format:
    keys = state_dict.keys()
    if "patch_embed.proj.weight" in keys or any(k.startswith("in_blocks.") for k in keys):
        return "original"
    if "vae_img_in.proj.weight" in keys or any(k.startswith("transformer.transformer_") for k in keys):
        return "diffusers"
    sample = sorted(keys)[:5]
    raise ValueError(
        "state dict is neither an original UniDiffuser U-ViT (expected 'patch_embed.proj.weight', "
        f"'in_blocks.*') nor a diffusers UniDiffuserModel (expected 'vae_img_in.proj.weight'); first keys: {sample}"
    )


def _swap_prefix(key: str, table: dict[str, str]) -> str | None:
    for a, b in table.items():
        if key.startswith(a):
            return b + key[len(a) :]
    return None


def _block_to_diffusers(rest: str, value: torch.Tensor, prefix: str, out: dict[str, torch.Tensor]) -> bool:
    if rest.startswith("attn.qkv."):
        kind = rest[len("attn.qkv.") :]
        for name, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
            out[f"{prefix}attn1.{name}.{kind}"] = chunk
        return True
    new = _swap_prefix(rest, _BLOCK)
    if new is None:
        return False
    out[prefix + new] = value
    return True


def original_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _TOP_PARAMS:
            out[_TOP_PARAMS[key]] = value
            continue
        m = re.match(r"in_blocks\.(\d+)\.(.+)", key)
        if m and _block_to_diffusers(m[2], value, f"transformer.transformer_in_blocks.{m[1]}.", out):
            continue
        if key.startswith("mid_block.") and _block_to_diffusers(
            key[len("mid_block.") :], value, "transformer.transformer_mid_block.", out
        ):
            continue
        m = re.match(r"out_blocks\.(\d+)\.(.+)", key)
        if m:
            base = f"transformer.transformer_out_blocks.{m[1]}."
            if m[2].startswith("skip_linear."):
                out[base + "skip." + m[2]] = value
                continue
            if m[2].startswith("norm1."):
                out[base + "skip.norm." + m[2][len("norm1.") :]] = value
                continue
            if _block_to_diffusers(m[2], value, base + "block.", out):
                continue
        new = _swap_prefix(key, _TOP)
        if new is None:
            raise KeyError(f"original U-ViT key {key!r} has no diffusers counterpart")
        out[new] = value
        if key.startswith("patch_embed.proj."):
            # diffusers' UTransformer2DModel owns an unused PatchEmbed; its loader expects the weights.
            out[_DEAD_PATCH_COPY + key[len("patch_embed.proj.") :]] = value
    return out


def diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inv_top = {b: a for a, b in _TOP.items()}
    inv_params = {b: a for a, b in _TOP_PARAMS.items()}
    inv_block = {b: a for a, b in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}

    def block(rest: str, value: torch.Tensor, prefix: str) -> bool:
        m = re.match(r"attn1\.(to_q|to_k|to_v)\.(weight|bias)$", rest)
        if m:
            qkv.setdefault(f"{prefix}attn.qkv.{m[2]}", {})[m[1]] = value
            return True
        new = _swap_prefix(rest, inv_block)
        if new is None:
            return False
        out[prefix + new] = value
        return True

    for key, value in sd.items():
        if key.startswith(_DEAD_PATCH_COPY):
            continue
        if key in inv_params:
            out[inv_params[key]] = value
            continue
        m = re.match(r"transformer\.transformer_in_blocks\.(\d+)\.(.+)", key)
        if m and block(m[2], value, f"in_blocks.{m[1]}."):
            continue
        if key.startswith("transformer.transformer_mid_block.") and block(
            key[len("transformer.transformer_mid_block.") :], value, "mid_block."
        ):
            continue
        m = re.match(r"transformer\.transformer_out_blocks\.(\d+)\.(.+)", key)
        if m:
            base = f"out_blocks.{m[1]}."
            if m[2].startswith("skip.skip_linear."):
                out[base + m[2][len("skip.") :]] = value
                continue
            if m[2].startswith("skip.norm."):
                out[base + "norm1." + m[2][len("skip.norm.") :]] = value
                continue
            if m[2].startswith("block.") and block(m[2][len("block.") :], value, base):
                continue
        new = _swap_prefix(key, inv_top)
        if new is None:
            raise KeyError(f"diffusers UniDiffuserModel key {key!r} has no original counterpart")
        out[new] = value
    for key, parts in qkv.items():
        if set(parts) != {"to_q", "to_k", "to_v"}:
            raise KeyError(f"{key}: diffusers checkpoint has only {sorted(parts)} of to_q/to_k/to_v")
        out[key] = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]], dim=0)
    return out


def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return sd if detect_format(sd) == "original" else diffusers_to_original(sd)


def infer_config(state_dict: dict[str, torch.Tensor], **known) -> dict:
    """UViTConfig fields implied by weight shapes (either key format).

    The position table holds 3 + num_text_tokens + num_patches rows, so one of num_text_tokens / img_size must
    be assumed: a given value (in ``known``) wins, else 77 text tokens (CLIP's length). num_heads assumes
    UniDiffuser's head dim of 64 unless given.
    """
    sd = to_original(state_dict)
    need = ("patch_embed.proj.weight", "pos_embed", "text_embed.weight", "clip_img_embed.weight")
    for k in need:
        if k not in sd:
            raise KeyError(f"cannot infer U-ViT config: state dict has no {k!r}")
    D, in_chans, p, _ = sd["patch_embed.proj.weight"].shape
    n_in = len({k.split(".")[1] for k in sd if k.startswith("in_blocks.")})
    cfg = dict(
        in_chans=in_chans,
        patch_size=p,
        embed_dim=D,
        depth=2 * n_in,
        num_heads=max(D // 64, 1),
        text_dim=sd["text_embed.weight"].shape[1],
        clip_img_dim=sd["clip_img_embed.weight"].shape[1],
        qkv_bias="mid_block.attn.qkv.bias" in sd,
    )
    if "mid_block.mlp.fc1.weight" in sd:
        cfg["mlp_ratio"] = sd["mid_block.mlp.fc1.weight"].shape[0] / D
    cfg.update({k: v for k, v in known.items() if k in UViTConfig.__dataclass_fields__})
    rows = sd["pos_embed"].shape[1] - 3  # t_img, t_text, clip_img
    if "num_text_tokens" in known and "img_size" not in known:
        num_patches = rows - known["num_text_tokens"]
        side = int(round(max(num_patches, 0) ** 0.5))
        if side * side != num_patches:
            raise ValueError(
                f"pos_embed has {rows + 3} rows: with num_text_tokens={known['num_text_tokens']} the "
                f"{num_patches} patch rows are not a square grid"
            )
        cfg["img_size"] = side * cfg["patch_size"]
    elif "img_size" in known and "num_text_tokens" not in known:
        cfg["num_text_tokens"] = rows - (known["img_size"] // cfg["patch_size"]) ** 2
    elif "img_size" not in known:
        num_patches = rows - 77
        side = int(round(max(num_patches, 0) ** 0.5))
        if num_patches <= 0 or side * side != num_patches:
            raise ValueError(
                f"pos_embed has {rows + 3} rows, which does not fit 77 text tokens plus a square patch grid; "
                "pass num_text_tokens or img_size"
            )
        cfg["num_text_tokens"], cfg["img_size"] = 77, side * cfg["patch_size"]
    return cfg


def _read_source(source) -> dict[str, torch.Tensor]:
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        for name in _DIFFUSERS_WEIGHTS:
            if (path / name).is_file():
                return load_state_dict_file(path / name)
        raise FileNotFoundError(f"{path}: folder holds none of {_DIFFUSERS_WEIGHTS}")
    return load_state_dict_file(path)


def load_uvit(source, **config) -> UViT:
    """Build a UViT from a checkpoint file, a diffusers ``unet/`` folder or a state dict (either key format).

    Config fields are inferred from shapes and overridden by ``config``; loading is strict.
    """
    sd = to_original(_read_source(source))
    cfg = UViTConfig(**infer_config(sd, **config))
    model = UViT(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"U-ViT checkpoint does not match {cfg}:\n  missing keys: {missing}\n  unexpected keys: {unexpected}"
        )
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise ValueError(
                f"U-ViT checkpoint key {k!r}: expected shape {tuple(v.shape)}, got {tuple(sd[k].shape)}"
            )
    model.load_state_dict(sd, strict=True)
    return model


def diffusers_config(cfg: UViTConfig) -> dict:
    """The ``unet/config.json`` diffusers' UniDiffuserModel needs for this network (v1 structure)."""
    return {
        "_class_name": "UniDiffuserModel",
        "text_dim": cfg.text_dim,
        "clip_img_dim": cfg.clip_img_dim,
        "num_text_tokens": cfg.num_text_tokens,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.embed_dim // cfg.num_heads,
        "in_channels": cfg.in_chans,
        "out_channels": cfg.in_chans,
        "num_layers": cfg.depth + 1,
        "dropout": 0.0,
        "attention_bias": cfg.qkv_bias,
        "sample_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "activation_fn": "gelu",
        "norm_type": "layer_norm",
        "block_type": "unidiffuser",
        "pre_layer_norm": False,
        "use_timestep_embedding": False,
        "norm_elementwise_affine": True,
        "use_patch_pos_embed": False,
        "ff_final_dropout": True,
        "use_data_type_embedding": True,
    }


def save_uvit(model: UViT, path: str | os.PathLike, format: Format = "original") -> None:
    """Save weights; original names by default (UniDiffuser's tools read them).

    For ``format="diffusers"`` a path without a checkpoint suffix is a ``unet/`` folder: the weights go to
    ``diffusion_pytorch_model.safetensors`` next to a ``config.json``.
    """
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if format == "original":
        save_state_dict_file(sd, path)
        return
    if format != "diffusers":
        raise ValueError(f"format must be 'original' or 'diffusers', got {format!r}")
    sd = original_to_diffusers(sd)
    path = Path(path)
    if path.suffix:
        save_state_dict_file(sd, path)
        return
    path.mkdir(parents=True, exist_ok=True)
    save_state_dict_file(sd, path / _DIFFUSERS_WEIGHTS[0])
    (path / "config.json").write_text(json.dumps(diffusers_config(model.config), indent=2))
