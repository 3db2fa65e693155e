"""The frozen image autoencoder of BiDiffuser: Stable Diffusion's KL-f8 VAE.

The network is diffusers' ``AutoencoderKL``, which is numerically the LDM autoencoder UniDiffuser
ships as ``autoencoder_kl.pth`` (ch 128, ch_mult 1,2,4,4, two res blocks, z 4). That file uses the LDM
key names; diffusers' ``convert_ldm_vae_checkpoint`` renames them (the reverse map, used to write LDM
files, lives with the tests: tests/ldm_vae.py). The helpers follow UniDiffuser's ``libs/autoencoder.py``:

- ``encode_moments``: the encoder + ``quant_conv`` output, mean and log-variance stacked (``[B, 8, h, w]``);
  this is what the BiDiffuser data pipeline stores per image;
- ``sample_latent``: ``z = (mean + exp(logvar / 2) * eps) * 0.18215`` with logvar clamped to [-30, 20];
- ``decode``: ``decoder(post_quant_conv(z / 0.18215))``, images in [-1, 1].
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from easygen.checkpoint import load_state_dict_file

SCALE_FACTOR = 0.18215

# LDM training checkpoints also carry the discriminator/LPIPS weights of the VAE loss; they are not
# part of the network.
_IGNORED_LDM_PREFIXES = ("loss.",)
# The mid-block attention's q, k, v and proj_out: 1x1 convs in LDM files, Linear layers in diffusers (the
# converter takes [:, :, 0, 0] of whatever it finds, so the shape is checked here).
_LDM_ATTN_MATRIX = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def _keys_not_converted(sd: dict[str, torch.Tensor], config: dict, expected: set[str]) -> list[str]:
    """The keys of an LDM state dict that ``convert_ldm_vae_checkpoint`` drops or renames to a name
    ``AutoencoderKL`` does not have (it passes over what it does not know). Each key is followed through
    the converter as a one-element tensor holding its position."""
    keys = list(sd)
    probe = {key: torch.tensor([i]) for i, key in enumerate(keys)}
    landed = {int(value[0]): name for name, value in convert_ldm_vae_checkpoint(probe, config).items()}
    return sorted(key for i, key in enumerate(keys) if landed.get(i) not in expected)


def _config_from_ldm(sd: dict[str, torch.Tensor], source: str, norm_num_groups: int | None = None) -> dict:
    """Read the AutoencoderKL architecture off an LDM state dict's shapes."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        in_channels = sd["encoder.conv_in.weight"].shape[1]
        out_channels = sd["decoder.conv_out.weight"].shape[0]
        latent_channels = sd["post_quant_conv.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"{source}: not an LDM autoencoder state dict (missing {err.args[0]})") from None
    levels = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.block\.", k))})
    blocks = {int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    if not levels or levels != list(range(len(levels))) or not blocks:
        raise ValueError(f"{source}: cannot read the encoder levels from keys encoder.down.<i>.block.<j>")
    widths = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels)
    # The GroupNorm group count is not in the weights: SD uses 32 everywhere.
    if norm_num_groups is None:
        if any(w % 32 for w in (ch, *widths)):
            raise ValueError(
                f"{source}: channel widths {widths} are not multiples of 32 (SD's GroupNorm groups); "
                f"pass norm_num_groups"
            )
        norm_num_groups = 32
    return dict(
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(levels),
        up_block_types=("UpDecoderBlock2D",) * len(levels),
        block_out_channels=widths,
        layers_per_block=len(blocks),
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        scaling_factor=SCALE_FACTOR,
    )


# The tiny preset's topology: the real one (4 levels, factor 8, 4 latent channels, SD's GroupNorm eps) at tiny
# widths. SD uses 32 GroupNorm groups; the tiny VAE uses 8, so that every norm its signal passes through has
# at least 4 channels per group (see tiny_autoencoder). The group count is not in the weights: an LDM file
# of the tiny VAE loads with ``load_ldm_autoencoder(path, norm_num_groups=TINY_NORM_GROUPS)``; its widths
# (80 is not a multiple of 32) make the loader refuse it without that.
TINY_WIDTHS = (32, 32, 80, 80)
TINY_NORM_GROUPS = 8


def _tiny_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=TINY_WIDTHS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=TINY_NORM_GROUPS,
        sample_size=64,
        scaling_factor=SCALE_FACTOR,
    )


def tiny_autoencoder(seed: int = 0, linear: bool = True) -> AutoencoderKL:
    """The tiny preset's KL autoencoder: the real topology at tiny widths (``TINY_WIDTHS``, 8 GroupNorm
    groups). ``linear``: weights set as :func:`set_tiny_weights` describes (an encoder with a trained one's
    character and a decoder that inverts it); False keeps every weight random, with a sharp posterior
    (for tests of the checkpoint formats). Everything is in the state dict: the LDM file of either loads
    back through :func:`load_ldm_autoencoder` to the same function."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(**_tiny_config())
        if linear:
            set_tiny_weights(vae, torch.Generator().manual_seed(seed))
        else:
            sharpen_posterior(vae, gain=TINY_MEAN_GAIN)
    return vae


# A trained KL-f8 encoder's latent is close to a fixed linear map of the picture's colours pooled over each
# 8x8 cell (what SD's cheap latent previews rely on) plus local structure; a random one mixes colour,
# brightness and texture through GroupNorms and SiLUs, so that even the colour of a plain shape is hard to
# read off its latent. The tiny preset's weights give it that character with plain AutoencoderKL weights:
#
# - latent channels 0-2 are the 8x8-pooled R, G, B (in [-1, 1]) times TINY_COLOUR_GAIN: a colour copy at the
#   input, a 2x2 mean at each downsampling;
# - latent channel 3 is local structure (edges and extent): a random projection of the random residual
#   blocks of the two full-width levels (amplified by TINY_TEXTURE) over a random colour mix;
# - the decoder is the inverse of the colour part: channels 0-2 / TINY_COLOUR_GAIN, repeated over each
#   8x8 cell (nearest-neighbour upsampling), every residual branch and attention off;
# - the two output norms (encoder and decoder) must be a fixed scale, not a per-picture one: each signal
#   channel x sits in its GroupNorm group beside -x and beside two channels that hold +-NORM_ANCHOR
#   everywhere (conv biases). The group mean is then 0 and its variance (sum of x^2 + 2 NORM_ANCHOR^2) /
#   channels per group, which the picture moves by a relative 1e-5 at most; the norm's weight undoes that
#   fixed scale. The SiLU after each norm works in its linear range (input offset by LINEAR_OFFSET, taken
#   back out by the next conv's bias).
NORM_ANCHOR = 1024.0  # >> the signal (|x| <= ~4): relative picture dependence of the norm ~ 4 x^2 / anchor^2
LINEAR_OFFSET = 20.0  # the signal enters the SiLU around here: SiLU(x) = x to 1e-7 for x >= 17
TINY_TEXTURE = 3.0  # the residual blocks' output against the colour mix (random init gives ~0.1 of it)
# latents x 0.18215 of the synthetic pictures (colours in [-1, 1], spread ~0.7) then spread about 1
TINY_COLOUR_GAIN = 8.0
TINY_TEXTURE_GAIN = 20.0


def _anchored_pairs(conv: torch.nn.Conv2d, signals: int, per_group: int) -> torch.Tensor:
    """Set the 1x1 ``conv`` so that input channel i lands as +x on one output channel and -x on the next,
    ``per_group - 2`` of them (``(per_group - 2) // 2`` signals) per GroupNorm group, the group's last two
    channels holding +-NORM_ANCHOR. Returns the output channel of each +x."""
    pairs = (per_group - 2) // 2
    groups = conv.out_channels // per_group
    if pairs < 1 or signals > pairs * groups:
        raise ValueError(
            f"{signals} signals do not fit {groups} groups of {per_group} channels with their anchors"
        )
    conv.weight.zero_(), conv.bias.zero_()
    i = torch.arange(signals)
    plus = per_group * (i // pairs) + 2 * (i % pairs)
    conv.weight[plus, i, 0, 0], conv.weight[plus + 1, i, 0, 0] = 1.0, -1.0
    anchors = per_group * torch.arange(groups) + per_group - 2
    conv.bias[anchors], conv.bias[anchors + 1] = NORM_ANCHOR, -NORM_ANCHOR
    return plus


def _fixed_scale_norm(norm: torch.nn.GroupNorm, plus: torch.Tensor) -> None:
    """The GroupNorm after :func:`_anchored_pairs`: the +x channels come out as x + LINEAR_OFFSET."""
    per_group = norm.num_channels // norm.num_groups
    scale = (2.0 * NORM_ANCHOR**2 / per_group) ** 0.5  # the group's std with the signal at 0
    norm.weight.zero_(), norm.bias.zero_()
    norm.weight[plus], norm.bias[plus] = scale, LINEAR_OFFSET


def _residuals_off(blocks) -> None:
    for blk in blocks:
        for res in blk.resnets:
            res.conv2.weight.zero_(), res.conv2.bias.zero_()
        for attn in getattr(blk, "attentions", None) or []:
            attn.to_out[0].weight.zero_(), attn.to_out[0].bias.zero_()


def _copy_conv(conv: torch.nn.Conv2d, taps: slice) -> None:
    """Each channel to itself, averaged over ``taps`` x ``taps`` of the kernel (a 2x2 mean, or the centre)."""
    conv.weight.zero_(), conv.bias.zero_()
    c = torch.arange(conv.out_channels)
    n = (taps.stop - taps.start) ** 2
    conv.weight[c, c, taps, taps] = 1.0 / n


def set_tiny_weights(vae: AutoencoderKL, generator: torch.Generator, texture: float = TINY_TEXTURE) -> None:
    """Set the tiny topology's weights as described above (``texture`` 0: latent channel 3 is 0). The
    residual blocks of the first two encoder levels keep their random weights (times ``texture``)."""
    cfg = vae.config
    w = tuple(cfg.block_out_channels)
    if w != TINY_WIDTHS or cfg.norm_num_groups != TINY_NORM_GROUPS or cfg.latent_channels != 4:
        raise ValueError(
            f"set_tiny_weights expects widths {TINY_WIDTHS}, {TINY_NORM_GROUPS} groups and 4 latent channels, "
            f"got {w}, {cfg.norm_num_groups}, {cfg.latent_channels}"
        )
    enc, dec, g = vae.encoder, vae.decoder, generator
    w0 = w[0]
    with torch.no_grad():
        # ---- encoder: input colours -> (R, G, B, a random colour mix) x w0 channels
        enc.conv_in.weight.zero_(), enc.conv_in.bias.zero_()
        mix = torch.randn(w0, 3, generator=g) / 3**0.5
        mix[:3] = torch.eye(3)
        enc.conv_in.weight[:, :, 1, 1] = mix
        for level, blk in enumerate(enc.down_blocks):
            for res in blk.resnets:  # residual branches: kept x texture on the full-width levels, else off
                k = texture if level < 2 else 0.0
                res.conv2.weight.mul_(k), res.conv2.bias.mul_(k)
                res.conv2.weight[:3], res.conv2.bias[:3] = 0.0, 0.0  # channels 0-2 stay the plain colours
            for down in blk.downsamplers or []:
                _copy_conv(down.conv, slice(0, 2))  # 2x2 mean (diffusers pads right/bottom, stride 2)
        _residuals_off([enc.mid_block])
        plus = _anchored_pairs(enc.down_blocks[2].resnets[0].conv_shortcut, w0, w[2] // cfg.norm_num_groups)
        _fixed_scale_norm(enc.conv_norm_out, plus)
        out = enc.conv_out  # -> mean (4) and log-variance (4) before quant_conv
        out.weight.zero_(), out.bias.zero_()
        out.weight[torch.arange(3), plus[:3], 1, 1] = TINY_COLOUR_GAIN
        # channel 3: the texture of the other channels (their colour-mix part subtracted), unit spread
        proj = torch.randn(w0 - 3, generator=g) / (w0 - 3) ** 0.5
        out.weight[3, plus[3:], 1, 1] = TINY_TEXTURE_GAIN * proj / max(texture, 1.0)
        out.weight[3, plus[:3], 1, 1] = -TINY_TEXTURE_GAIN * (proj @ mix[3:]) / max(texture, 1.0)
        out.bias.copy_(-LINEAR_OFFSET * out.weight[:, :, 1, 1].sum(1))
        quant = vae.quant_conv  # identity on the mean, a fixed sharp log-variance
        quant.weight.zero_(), quant.bias.zero_()
        quant.weight[:4, :4, 0, 0] = torch.eye(4)
        quant.bias[4:] = TINY_LOGVAR
        # ---- decoder: latent channels 0-2 / TINY_COLOUR_GAIN, each 8x8 cell one colour
        post = vae.post_quant_conv
        post.weight.zero_(), post.bias.zero_()
        post.weight[:, :, 0, 0] = torch.eye(4)
        dec.conv_in.weight.zero_(), dec.conv_in.bias.zero_()
        dec.conv_in.weight[torch.arange(3), torch.arange(3), 1, 1] = 1.0 / TINY_COLOUR_GAIN
        _residuals_off([dec.mid_block, *dec.up_blocks])
        for blk in dec.up_blocks:
            for up in blk.upsamplers or []:
                _copy_conv(up.conv, slice(1, 2))  # after diffusers' nearest 2x: the centre tap
        plus = _anchored_pairs(dec.up_blocks[2].resnets[0].conv_shortcut, 3, w[0] // cfg.norm_num_groups)
        _fixed_scale_norm(dec.conv_norm_out, plus)
        out = dec.conv_out
        out.weight.zero_(), out.bias.zero_()
        out.weight[torch.arange(3), plus, 1, 1] = 1.0
        out.bias.fill_(-LINEAR_OFFSET)


# A trained KL-f8 VAE encodes almost deterministically (posterior std far below the spread of the means)
# and its latents times 0.18215 have about unit variance. A random encoder has neither: its log-variance
# is about 0, so a sampled latent is noise with the picture buried under it, and its means are small.
# The random tiny VAE (``linear=False``) takes the trained VAE's character: log-variance fixed at
# TINY_LOGVAR, means scaled by TINY_MEAN_GAIN.
TINY_LOGVAR = -12.0
TINY_MEAN_GAIN = 25.0


def sharpen_posterior(vae: AutoencoderKL, logvar: float = TINY_LOGVAR, gain: float = TINY_MEAN_GAIN) -> None:
    """Set ``quant_conv`` so that the posterior is sharp (fixed ``logvar``) and the means scaled by ``gain``."""
    conv = vae.quant_conv
    if conv is None:
        raise ValueError("sharpen_posterior needs an autoencoder with quant_conv")
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[:half] *= gain
        conv.bias[:half] *= gain
        conv.weight[half:] = 0.0
        conv.bias[half:] = logvar


def load_ldm_autoencoder(path: str | Path, norm_num_groups: int | None = None) -> AutoencoderKL:
    """Load an LDM-named checkpoint (``autoencoder_kl.pth``) into a diffusers ``AutoencoderKL``."""
    path = Path(path)
    sd = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith(_IGNORED_LDM_PREFIXES)}
    config = _config_from_ldm(sd, str(path), norm_num_groups)
    vae = AutoencoderKL(**config)
    expected = set(vae.state_dict())
    unknown = _keys_not_converted(sd, config, expected)
    if unknown:
        raise ValueError(f"{path}: unexpected keys for an LDM autoencoder: {unknown}")
    for key, value in sd.items():
        if _LDM_ATTN_MATRIX.fullmatch(key) and (value.ndim != 4 or value.shape[2:] != (1, 1)):
            raise ValueError(
                f"{path}: {key}: expected a 1x1 conv weight [C, C, 1, 1], got {tuple(value.shape)}"
            )
    converted = convert_ldm_vae_checkpoint(sd, config)
    missing = sorted(expected - set(converted))
    if missing:
        raise ValueError(
            f"{path}: LDM autoencoder does not match AutoencoderKL{config['block_out_channels']}: missing {missing}"
        )
    vae.load_state_dict(converted, strict=True)
    return vae


def load_autoencoder(
    path: str | Path | None = None, tiny: bool = False, norm_num_groups: int | None = None
) -> AutoencoderKL:
    """The frozen VAE: a diffusers ``vae/`` folder, an LDM ``.pth``/``.safetensors`` file, or the tiny preset.

    ``norm_num_groups`` only matters for LDM files whose widths are not multiples of SD's 32 groups.
    """
    if tiny:
        if path is not None:
            raise ValueError("load_autoencoder: give either a path or tiny=True, not both")
        vae = tiny_autoencoder()
    else:
        if path is None:
            raise ValueError("load_autoencoder: a path (diffusers vae/ folder or LDM checkpoint) is required")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"autoencoder checkpoint not found: {path}")
        if path.is_dir():
            vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
        else:
            vae = load_ldm_autoencoder(path, norm_num_groups=norm_num_groups)
    vae.eval().requires_grad_(False)
    return vae


def encode_moments(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], ``[B, 3, H, W]`` -> moments ``[B, 2 * latent, H/8, W/8]`` (mean, logvar)."""
    if images.ndim != 4 or images.shape[1] != vae.config.in_channels:
        raise ValueError(
            f"encode_moments: expected images [B, {vae.config.in_channels}, H, W], got {tuple(images.shape)}"
        )
    moments = vae.encoder(images)
    return vae.quant_conv(moments) if vae.quant_conv is not None else moments


def sample_latent(
    moments: torch.Tensor, generator: torch.Generator | None = None, shared: bool = False
) -> torch.Tensor:
    """Draw ``z ~ N(mean, exp(logvar))`` and scale it by 0.18215 (UniDiffuser's ``sample``); ``shared``: one
    noise draw for the whole batch (each sample's latent then depends on its own moments only)."""
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    shape = (1, *mean.shape[1:]) if shared else mean.shape
    eps = torch.randn(shape, generator=generator, device=mean.device, dtype=mean.dtype).expand_as(mean)
    return (mean + torch.exp(0.5 * logvar) * eps) * SCALE_FACTOR


def decode(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents (as :func:`sample_latent` returns) -> images in [-1, 1] (unclamped)."""
    z = z / SCALE_FACTOR
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    return vae.decoder(z)
