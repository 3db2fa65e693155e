"""U-ViT network: exact equivalence with diffusers' UniDiffuserModel, checkpoint formats, structure."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import UniDiffuserModel

from easygen.bidiffuser.convert import (
    detect_format,
    diffusers_config,
    diffusers_to_original,
    infer_config,
    load_uvit,
    original_to_diffusers,
    save_uvit,
)
from easygen.bidiffuser.uvit import Block, UViT, UViTConfig
from easygen.checkpoint import load_state_dict_file, save_state_dict_file

CFG = UViTConfig.tiny()
HINTS = dict(num_heads=CFG.num_heads, num_text_tokens=CFG.num_text_tokens)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    # Every tensor random (LayerNorm affines and biases too) so a swapped or dropped key cannot go unnoticed.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0) * 0.5)


@pytest.fixture(scope="module")
def reference() -> UniDiffuserModel:
    torch.manual_seed(0)
    kwargs = {k: v for k, v in diffusers_config(CFG).items() if not k.startswith("_")}
    model = UniDiffuserModel(**kwargs).eval()
    _randomize(model, 1)
    with (
        torch.no_grad()
    ):  # diffusers' unused patch-embedding copy mirrors the real one, as in real checkpoints
        model.transformer.pos_embed.proj.weight.copy_(model.vae_img_in.proj.weight)
        model.transformer.pos_embed.proj.bias.copy_(model.vae_img_in.proj.bias)
    return model


def _inputs(batch: int = 3, size: int = CFG.img_size, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, CFG.in_chans, size, size, generator=g)
    clip = torch.randn(batch, 1, CFG.clip_img_dim, generator=g)
    text = torch.randn(batch, CFG.num_text_tokens, CFG.text_dim, generator=g)
    t_img = torch.tensor([0.0, 517.25, 1000.0][:batch])
    t_text = torch.tensor([999, 0, 3][:batch])
    return z, clip, text, t_img, t_text


def _assert_matches(ours: UViT, reference: UniDiffuserModel, tol: float = 1e-5) -> None:
    z, clip, text, t_img, t_text = _inputs()
    with torch.no_grad():
        a = ours.eval()(z, clip, text, t_img, t_text, 1)
        b = reference(z, clip, text, t_img, t_text, data_type=torch.ones(3, dtype=torch.long))
    for name, x, y in zip(("img", "clip_img", "text"), a, b):
        assert x.shape == y.shape, name
        assert (x - y).abs().max().item() <= tol, name


def test_matches_diffusers_from_diffusers_keys(reference):
    sd = reference.state_dict()
    assert detect_format(sd) == "diffusers"
    _assert_matches(load_uvit(sd, **HINTS), reference)


def test_matches_diffusers_from_original_keys(reference):
    sd = diffusers_to_original(reference.state_dict())
    assert detect_format(sd) == "original"
    assert "in_blocks.0.attn.qkv.weight" in sd and "out_blocks.1.skip_linear.weight" in sd
    _assert_matches(load_uvit(sd, **HINTS), reference)


def test_data_type_changes_output(reference):
    model = load_uvit(reference.state_dict(), **HINTS).eval()
    z, clip, text, t_img, t_text = _inputs()
    with torch.no_grad():
        one = model(z, clip, text, t_img, t_text, 1)[2]
        zero = model(z, clip, text, t_img, t_text, 0)[2]
        default = model(z, clip, text, t_img, t_text)[2]
    assert torch.equal(one, default)
    assert not torch.allclose(one, zero)


def test_key_maps_round_trip(reference):
    sd = reference.state_dict()
    back = original_to_diffusers(diffusers_to_original(sd))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_infer_config(reference):
    cfg = infer_config(reference.state_dict(), **HINTS)
    assert UViTConfig(**cfg) == CFG
    # 77 text tokens are assumed when nothing is given; a grid that does not fit is an error naming the fix.
    with pytest.raises(ValueError, match="num_text_tokens"):
        infer_config(reference.state_dict())


@pytest.mark.parametrize(
    "name,fmt",
    [
        ("uvit.pth", "original"),
        ("uvit.safetensors", "original"),
        ("unet", "diffusers"),
        ("d.bin", "diffusers"),
    ],
)
def test_save_load_round_trip(tmp_path, reference, name, fmt):
    model = load_uvit(reference.state_dict(), **HINTS)
    save_uvit(model, tmp_path / name, format=fmt)
    weights = tmp_path / name / "diffusion_pytorch_model.safetensors" if name == "unet" else tmp_path / name
    assert detect_format(load_state_dict_file(weights)) == fmt
    _assert_matches(load_uvit(tmp_path / name, **HINTS), reference, tol=0.0)


def test_diffusers_reads_our_unet_folder(tmp_path, reference):
    save_uvit(load_uvit(reference.state_dict(), **HINTS), tmp_path / "unet", format="diffusers")
    theirs = UniDiffuserModel.from_pretrained(tmp_path / "unet").eval()
    _assert_matches(load_uvit(tmp_path / "unet", **HINTS), theirs, tol=0.0)
    _assert_matches(load_uvit(reference.state_dict(), **HINTS), theirs, tol=0.0)


def test_strict_load_lists_missing_and_unexpected(reference):
    sd = diffusers_to_original(reference.state_dict())
    sd.pop("mid_block.mlp.fc2.bias")
    sd["in_blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as err:
        load_uvit(sd, **HINTS)
    assert "mid_block.mlp.fc2.bias" in str(err.value) and "in_blocks.0.extra.weight" in str(err.value)


def test_wrong_shape_names_key(reference):
    sd = diffusers_to_original(reference.state_dict())
    sd["out_blocks.0.norm3.weight"] = torch.zeros(CFG.embed_dim + 1)
    with pytest.raises(ValueError, match=r"out_blocks\.0\.norm3\.weight.*\(64,\).*\(65,\)"):
        load_uvit(sd, **HINTS)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": _Evil(str(marker))}, path)
    with pytest.raises(ValueError, match="evil.pth"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_checkpoint_unwrap_and_prefix(tmp_path):
    sd = {"module.a": torch.arange(3.0), "module.b.c": torch.ones(2, 2)}
    save_state_dict_file(sd, tmp_path / "m.pt")
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    for p in ("m.pt", "wrapped.pth"):
        got = load_state_dict_file(tmp_path / p)
        assert sorted(got) == ["a", "b.c"]
        assert torch.equal(got["a"], torch.arange(3.0))
    # Only a prefix that every key shares is stripped.
    save_state_dict_file({"module.a": torch.zeros(1), "b": torch.zeros(1)}, tmp_path / "mixed.safetensors")
    assert sorted(load_state_dict_file(tmp_path / "mixed.safetensors")) == ["b", "module.a"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_state_dict_file(tmp_path / "missing.pth")


def test_v1_size_and_flops():
    with torch.device("meta"):
        model = UViT(UViTConfig.v1())
    assert sum(p.numel() for p in model.parameters()) == 952_509_520
    assert len(model.blocks) == 31 and all(isinstance(b, Block) for b in model.blocks)
    assert abs(model.flops_per_sample(train=False) / 2.3287e12 - 1) < 0.01
    assert abs(model.flops_per_sample(train=True) / 6.986e12 - 1) < 0.01


def test_flops_count_matches_profiler():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = UViT(CFG)
    z, clip, text, t_img, t_text = _inputs(batch=1)
    # The math backend decomposes attention into matmuls the counter sees (CPU's fused kernel is not in its table).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(z, clip, text, t_img[:1], t_text[:1])
    assert abs(counter.get_total_flops() / model.flops_per_sample(train=False) - 1) < 0.01


def test_init_follows_reference():
    model = UViT(UViTConfig.tiny())
    assert torch.all(model.pos_embed_token == 0)
    assert torch.all(model.mid_block.norm2.weight == 1) and torch.all(model.mid_block.norm2.bias == 0)
    assert torch.all(model.in_blocks[0].mlp.fc1.bias == 0)
    w = model.in_blocks[0].mlp.fc1.weight
    assert 0.015 < w.std().item() < 0.025
    assert model.token_embedding.weight.std().item() > 0.5  # N(0, 1), created after the init pass


def test_no_unused_parameters_and_checkpointing():
    torch.manual_seed(0)
    model = UViT(CFG).train()
    _randomize(model, 3)
    z, clip, text, t_img, t_text = _inputs()

    def grads(m):
        m.zero_grad()
        a, b, c = m(z, clip, text, t_img, t_text)
        (a.square().mean() + b.square().mean() + c.square().mean()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = grads(model)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(plain) == sorted(names)
    assert all(g.abs().sum() > 0 for n, g in plain.items() if not n.startswith("token_embedding")), (
        "dead params"
    )
    ckpt_model = UViT(dataclasses.replace(CFG, use_checkpoint=True)).train()
    ckpt_model.load_state_dict(model.state_dict())
    ckpt = grads(ckpt_model)
    for n in names:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-6)


def test_pos_embed_interpolation():
    torch.manual_seed(0)
    model = UViT(CFG).eval()
    _randomize(model, 4)
    big = dataclasses.replace(CFG, img_size=12)
    reference = UViT(big).eval()
    sd = model.state_dict()
    side = CFG.img_size // CFG.patch_size
    others, patches = sd["pos_embed"].split([sd["pos_embed"].shape[1] - side * side, side * side], dim=1)
    grid = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False)
    sd["pos_embed"] = torch.cat([others, resized.permute(0, 2, 3, 1).reshape(1, 36, -1)], dim=1)
    reference.load_state_dict(sd)
    z, clip, text, t_img, t_text = _inputs(size=12)
    with torch.no_grad():
        for a, b in zip(model(z, clip, text, t_img, t_text), reference(z, clip, text, t_img, t_text)):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert model(z, clip, text, t_img, t_text)[0].shape == (3, 4, 12, 12)


def test_bf16_forward_keeps_dtype():
    model = UViT(CFG).to(torch.bfloat16).eval()
    z, clip, text, t_img, t_text = (x.to(torch.bfloat16) if x.is_floating_point() else x for x in _inputs())
    with torch.no_grad():
        outs = model(z, clip, text, t_img.float(), t_text)
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in outs)
