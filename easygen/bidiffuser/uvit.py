"""BiDiffuser's network: UniDiffuser v1's multimodal U-ViT ("uvit_multi_post_ln_v1").

One transformer over the token sequence

    [t_img, t_text, data_type, text x L, clip_img, patches x (H/p * W/p)]

predicts the noise of all three modalities at once (UniDiffuser, Bao et al. 2023, Sec. 4; U-ViT, Bao et al.
2023, Fig. 1). Blocks are post-LN, the first half feeds U-Net-style long skips into the second half, and the
timesteps enter as plain sinusoidal tokens (no MLP) so that t may be continuous (DPM-Solver feeds t * 1000).
Parameter names follow the original code so that ``uvit_v1.pth`` and EasyGen's ``nnet_ema.pth`` load as-is;
``convert.py`` maps diffusers' ``UniDiffuserModel`` names onto these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class UViTConfig:
    img_size: int = 64  # latent side (512 px / 8)
    in_chans: int = 4
    patch_size: int = 2
    embed_dim: int = 1536
    depth: int = 30  # depth // 2 in-blocks, one mid-block, depth // 2 out-blocks
    num_heads: int = 24
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    text_dim: int = 64
    num_text_tokens: int = 77
    clip_img_dim: int = 512
    use_checkpoint: bool = False

    @classmethod
    def v1(cls) -> UViTConfig:
        """UniDiffuser v1 / EasyGen BiDiffuser: 952,509,520 parameters."""
        return cls()

    @classmethod
    def tiny(cls) -> UViTConfig:
        """Same structure, test-sized."""
        return cls(
            img_size=8,
            patch_size=2,
            embed_dim=64,
            depth=4,
            num_heads=4,
            text_dim=16,
            num_text_tokens=16,
            clip_img_dim=32,
        )

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps t [B] -> [B, dim], in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        # qkv rows are laid out (q|k|v) x heads x head_dim, as the original 'B L (K H D) -> K B H L D'.
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Post-LN transformer block; out-blocks first merge the long skip (Linear(2D -> D) + LayerNorm)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        # norm1 only exists on out-blocks, where it normalises the merged skip; the name is the original's.
        self.norm1 = nn.LayerNorm(dim) if skip else None
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.norm1(self.skip_linear(torch.cat([x, skip], dim=-1)))
        x = self.norm2(x + self.attn(x))
        return self.norm3(x + self.mlp(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: torch.Tensor, channels: int, h: int, w: int) -> torch.Tensor:
    """[B, h*w, p*p*C] -> [B, C, h*p, w*p]; patch vectors are laid out (p, p, C) as in the original."""
    B = x.shape[0]
    p = int(round((x.shape[2] // channels) ** 0.5))
    x = x.reshape(B, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, h * p, w * p)


class UViT(nn.Module):
    def __init__(self, config: UViTConfig):
        super().__init__()
        self.config = c = config
        D = c.embed_dim
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, D)
        self.text_embed = nn.Linear(c.text_dim, D)
        self.text_out = nn.Linear(D, c.text_dim)
        self.clip_img_embed = nn.Linear(c.clip_img_dim, D)
        self.clip_img_out = nn.Linear(D, c.clip_img_dim)
        # v1's data_type token gets its own position slot (pos_embed_token) spliced in after the two t tokens.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + 1 + c.num_text_tokens + 1 + c.num_patches, D))

        def block(skip: bool) -> Block:
            return Block(D, c.num_heads, c.mlp_ratio, c.qkv_bias, skip=skip)

        self.in_blocks = nn.ModuleList([block(False) for _ in range(c.depth // 2)])
        self.mid_block = block(False)
        self.out_blocks = nn.ModuleList([block(True) for _ in range(c.depth // 2)])
        self.norm = nn.LayerNorm(D)
        self.decoder_pred = nn.Linear(D, c.patch_size**2 * c.in_chans)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)
        # Created after the init pass, as the original does: N(0, 1) embedding and a zero position slot.
        self.token_embedding = nn.Embedding(2, D)
        self.pos_embed_token = nn.Parameter(torch.zeros(1, 1, D))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def blocks(self) -> list[Block]:
        """Every transformer block in execution order (in + mid + out), e.g. for per-block FSDP wrapping."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def _batch_vector(self, v, batch: int, device: torch.device, name: str) -> torch.Tensor:
        v = torch.as_tensor(v, device=device)
        if v.dim() == 0:
            v = v.expand(batch)
        if v.shape != (batch,):
            raise ValueError(f"{name} must be a scalar or have shape [{batch}], got {tuple(v.shape)}")
        return v

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        c = self.config
        pos = torch.cat([self.pos_embed[:, :2], self.pos_embed_token, self.pos_embed[:, 2:]], dim=1)
        side = c.img_size // c.patch_size
        if (h, w) == (side, side):
            return pos
        # Other latent sizes: resample the learned patch grid bilinearly (original interpolate_pos_emb).
        others, patches = pos.split([pos.shape[1] - c.num_patches, c.num_patches], dim=1)
        patches = patches.transpose(1, 2).reshape(1, -1, side, side)
        patches = F.interpolate(patches, size=(h, w), mode="bilinear").flatten(2).transpose(1, 2)
        return torch.cat([others, patches], dim=1)

    def forward(
        self,
        img: torch.Tensor,
        clip_img: torch.Tensor,
        text: torch.Tensor,
        t_img: torch.Tensor | float | int,
        t_text: torch.Tensor | float | int,
        data_type: torch.Tensor | int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """img [B,C,H,W] latent, clip_img [B,1,clip_img_dim], text [B,L,text_dim]; returns the three predictions."""
        c = self.config
        B, _, H, W = img.shape
        if H % c.patch_size or W % c.patch_size:
            raise ValueError(f"latent size {H}x{W} is not a multiple of patch_size {c.patch_size}")
        if text.shape[1] != c.num_text_tokens:
            raise ValueError(f"text has {text.shape[1]} tokens, the model expects {c.num_text_tokens}")
        h, w = H // c.patch_size, W // c.patch_size
        device = img.device
        img_tokens = self.patch_embed(img)
        dtype = img_tokens.dtype
        t_img = self._batch_vector(t_img, B, device, "t_img")
        t_text = self._batch_vector(t_text, B, device, "t_text")
        data_type = self._batch_vector(1 if data_type is None else data_type, B, device, "data_type").long()
        x = torch.cat(
            [
                timestep_embedding(t_img, c.embed_dim).to(dtype)[:, None],
                timestep_embedding(t_text, c.embed_dim).to(dtype)[:, None],
                self.token_embedding(data_type).to(dtype)[:, None],
                self.text_embed(text),
                self.clip_img_embed(clip_img),
                img_tokens,
            ],
            dim=1,
        )
        x = x + self._pos_embed(h, w).to(x.dtype)

        ckpt = c.use_checkpoint and self.training and torch.is_grad_enabled()

        def run(blk: Block, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
            if ckpt:
                return checkpoint(blk, x, skip, use_reentrant=False)
            return blk(x, skip)

        skips = []
        for blk in self.in_blocks:
            x = run(blk, x)
            skips.append(x)
        x = run(self.mid_block, x)
        for blk in self.out_blocks:
            x = run(blk, x, skips.pop())
        x = self.norm(x)

        L = c.num_text_tokens
        text_out, clip_img_out, img_out = x[:, 3:].split([L, 1, h * w], dim=1)
        img_out = unpatchify(self.decoder_pred(img_out), c.in_chans, h, w)
        return img_out, self.clip_img_out(clip_img_out), self.text_out(text_out)

    def flops_per_sample(self, train: bool = True) -> float:
        """Matmul FLOPs (2 per multiply-add) of one sample at config.img_size; train = forward + backward (3x)."""
        c = self.config
        D, L = c.embed_dim, c.num_text_tokens
        P = c.num_patches
        N = 3 + L + 1 + P
        hidden = int(D * c.mlp_ratio)
        per_block = 2 * N * (3 * D * D + D * D + 2 * D * hidden) + 2 * 2 * N * N * D  # linears + QK^T, AV
        blocks = (2 * (c.depth // 2) + 1) * per_block + (c.depth // 2) * 2 * N * 2 * D * D  # + skip_linear
        io = 2 * P * (c.in_chans * c.patch_size**2) * D * 2  # patch embed + decoder_pred
        io += 2 * L * c.text_dim * D * 2 + 2 * c.clip_img_dim * D * 2
        forward = float(blocks + io)
        return 3.0 * forward if train else forward
