"""`stage=bidiffuser`: the tiny preset trained from precomputed encoder outputs lowers both losses; the EMA
follows its warmup formula step by step and the exported `uvit_ema.pth` reads back through `load_uvit` with
the same outputs; batches take the shards' encoder outputs (caption and text latent paired) or fall back to
the pixels; the reference objective freezes the heads it never scores; a checkpoint that does not fit is one
line naming the key."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import ROOT, compose_at

BASE = [
    # from the preset's random weights (not the shipped trained ones): the tests watch training start
    "model.bidiffuser.weights=null",
    "model.llm.weights=null",
    "data.synthetic.n=40",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "model.bidiffuser.sampler.steps=2",
    "model.bidiffuser.train_caption_decoder=false",
    "logger=none",
    "callbacks.caption_eval=null",
]
SMALL = [*BASE, "stage=bidiffuser", "stage.monitor=null"]


def make_cfg(data_dir: Path, out: Path, overrides=(), base=SMALL):
    return compose_at(data_dir, out, [*base, *overrides])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic set and its copy with encoder outputs (stage=extract stage.what=encoders)."""
    from easygen.stages.extract import extract_stage

    d = tmp_path_factory.mktemp("bidiffuser-data")
    cfg = make_cfg(
        d,
        d / "extract",
        base=BASE,
        overrides=["stage=extract", "stage.what=encoders", "stage.splits=[train,val]"],
    )
    shards = Path(extract_stage(cfg)["artifacts"]["shards"])
    return d, shards


def on_shards(shards: Path) -> list[str]:
    return [
        f"data.train=[{{urls:'{shards}/train/*.tar',weight:1.0}}]",
        f"data.val='{shards}/val/*.tar'",
        f"data.test='{shards}/val/*.tar'",
    ]


def samples(urls) -> list[dict]:
    from data_modules.shards import ShardIndexDataset

    ds = ShardIndexDataset(urls, image_size=64)
    return [ds[i] for i in range(len(ds))]


@torch.no_grad()
def fixed_losses(uvit, schedule, batch) -> dict[str, float]:
    """Both losses of the paper's objective on one batch with fixed latent draws, indices and noise."""
    from easygen.bidiffuser.autoencoder import sample_latent
    from easygen.bidiffuser.loss import bidiffuser_loss

    g = torch.Generator().manual_seed(0)
    z0 = sample_latent(batch["moments"], g)
    out = bidiffuser_loss(uvit, schedule, z0, batch["clip_img"], batch["text_latents"], generator=g)
    return {k: float(v) for k, v in out.items()}


class RecordParams(pl.Callback):
    """The live U-ViT's parameters after every optimiser step (callbacks run before the module's hook)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.bidiffuser.uvit.named_parameters()})


def test_training_lowers_both_losses_and_exports_ema(data, tmp_path):
    from easygen.bidiffuser import load_uvit
    from easygen.stages.build import datamodule, lightning_module

    data_dir, shards = data
    steps = 12
    cfg = make_cfg(
        data_dir,
        tmp_path / "run",
        [*on_shards(shards), "stage.encoder_source=precomputed", "optim.lr=2e-3", "stage.ema_decay=0.99"],
    )
    pl.seed_everything(0)
    module = lightning_module(cfg)
    module.configure_model()
    start = copy.deepcopy(module.bidiffuser.uvit).eval()
    eval_batch = module.collate(samples(f"{shards}/train/*.tar")[:24])
    assert "images" not in eval_batch and eval_batch["moments"].shape[0] == 24
    before = fixed_losses(start, module.bidiffuser.schedule, eval_batch)

    record = RecordParams()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[record],
    )
    trainer.fit(module, datamodule=datamodule(cfg, module))
    assert trainer.global_step == steps and len(record.steps) == steps
    after = fixed_losses(module.bidiffuser.uvit.eval(), module.bidiffuser.schedule, eval_batch)
    assert after["loss_img"] < 0.8 * before["loss_img"], (before, after)
    assert after["loss_text"] < 0.8 * before["loss_text"], (before, after)

    # the EMA is the warmup recurrence over the live weights after each step, and nothing else
    ema = {k: v.detach().clone() for k, v in start.named_parameters()}
    for n, live in enumerate(record.steps):
        decay = min(0.99, (1 + n) / (10 + n))
        ema = {k: torch.lerp(ema[k], live[k], 1 - decay) for k in ema}
    assert module.ema.num_updates == steps
    for k, v in module.ema_uvit.named_parameters():
        torch.testing.assert_close(v, ema[k], rtol=1e-5, atol=1e-6)
        assert not v.requires_grad

    # the export: UniDiffuser's key format, read back by load_uvit with the recorded config, same outputs
    art = module.export_artifacts(tmp_path / "run")
    config = json.loads(Path(art["uvit_config"]).read_text())
    loaded = load_uvit(art["uvit_ema"], **config).eval()
    sd = torch.load(art["uvit_ema"], map_location="cpu", weights_only=True)
    assert "mid_block.attn.qkv.weight" in sd and "in_blocks.0.norm2.weight" in sd
    g = torch.Generator().manual_seed(1)
    c = loaded.config
    inputs = (
        torch.randn(3, c.in_chans, c.img_size, c.img_size, generator=g),
        torch.randn(3, 1, c.clip_img_dim, generator=g),
        torch.randn(3, c.num_text_tokens, c.text_dim, generator=g),
        torch.tensor([0.0, 500.0, 999.0]),
        torch.tensor([999.0, 10.0, 0.0]),
        1,
    )
    ema_state = module.ema_uvit.state_dict()
    assert loaded.state_dict().keys() == ema_state.keys()
    assert all(torch.equal(v, ema_state[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        # the same weights; outputs equal up to the last bits a GEMM's blocking may change with alignment
        for a, b in zip(loaded(*inputs), module.ema_uvit.eval()(*inputs)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        live = module.bidiffuser.uvit(*inputs)
    assert not torch.equal(live[2], loaded(*inputs)[2])  # the EMA, not the live network, was exported


def test_batches_from_encoder_outputs_or_pixels(data, tmp_path):
    from easygen.stages.build import lightning_module

    data_dir, shards = data
    module = lightning_module(make_cfg(data_dir, tmp_path / "run", on_shards(shards)))
    module.configure_model()
    pipe = module.bidiffuser
    extracted = samples(f"{shards}/train/shard-000000.tar")[:6]
    batch = module.collate(extracted)
    assert set(batch) == {"ids", "captions", "moments", "clip_img", "text_latents"}
    # each sample's text latent is the one of the caption drawn for it
    for caption, y in zip(batch["captions"], batch["text_latents"]):
        torch.testing.assert_close(y, pipe.encode_texts([caption])[0], rtol=2e-3, atol=2e-3)
    targets = module.encoder_targets(batch)
    assert targets["z0"].shape == (6, 4, 8, 8) and torch.equal(targets["y0"], batch["text_latents"])

    raw_cfg = make_cfg(data_dir, tmp_path / "raw")
    raw = samples(str(raw_cfg.data.train[0].urls))[:6]
    batch = module.collate(raw)  # auto: the plain shards carry none, so the encoders run on the pixels
    assert "images" in batch and "moments" not in batch
    targets = module.encoder_targets(batch)
    torch.testing.assert_close(targets["y0"], pipe.encode_texts(batch["captions"]))

    module.encoder_source = "precomputed"
    with pytest.raises(
        ValueError, match=r"stage.encoder_source=precomputed but sample '.+' of shard .+\.tar"
    ):
        module.collate(raw)
    module.encoder_source = "online"
    assert "images" in module.collate(extracted)

    # a text latent array that does not match the json's captions names shard, key and member
    broken = dict(extracted[0], captions=extracted[0]["captions"] + ["one caption too many"])
    module.encoder_source = "auto"
    with pytest.raises(ValueError, match=r"key '.+', member \.text_latents\.npy: expected shape"):
        module.collate([broken])


def test_reference_objective_freezes_unused_heads(data, tmp_path):
    from easygen.bidiffuser.loss import bidiffuser_loss
    from easygen.lit.bidiffuser_module import shared_timestep_for
    from easygen.stages.build import lightning_module

    data_dir, shards = data
    batch_samples = samples(f"{shards}/train/shard-000000.tar")[:4]

    def grads(overrides):
        cfg = make_cfg(data_dir, tmp_path / "run", [*on_shards(shards), *overrides])
        module = lightning_module(cfg)
        module.configure_model()
        t = module.encoder_targets(module.collate(batch_samples))
        s = cfg.stage
        out = bidiffuser_loss(
            module.bidiffuser.uvit,
            module.bidiffuser.schedule,
            t["z0"],
            t["clip0"],
            t["y0"],
            objective=s.objective,
            shared_timestep=shared_timestep_for(s),
            clean_img_term=s.clean_img_term,
        )
        out["loss"].backward()
        return shared_timestep_for(s), {
            n: p.grad for n, p in module.bidiffuser.uvit.named_parameters() if p.requires_grad
        }

    shared, g = grads(["stage.objective=reference"])
    assert shared is True
    assert not any(n.startswith(("clip_img_out.", "decoder_pred.")) for n in g)
    assert all(v is not None and v.abs().sum() > 0 for v in g.values()), [
        n for n, v in g.items() if v is None
    ]
    # without the freeze those heads are trainable but never reached: DDP would need its unused search
    _, g = grads(["stage.objective=reference", "stage.freeze_unused_heads=false"])
    assert g["clip_img_out.weight"] is None and g["decoder_pred.weight"] is None
    # the clean-image term scores the latent head, so it trains; the paper's objective trains every head
    _, g = grads(["stage.objective=reference", "stage.clean_img_term=true"])
    assert "decoder_pred.weight" in g and "clip_img_out.weight" not in g
    shared, g = grads([])
    assert shared is False and all(v is not None for v in g.values()) and "clip_img_out.weight" in g


def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    from easygen.bidiffuser import UViT, UViTConfig

    sd = UViT(UViTConfig.tiny()).state_dict()
    wrong_shape = dict(sd, **{"text_out.weight": torch.zeros(3, 64)})
    missing = {k: v for k, v in sd.items() if not k.startswith("mid_block.")}
    paths = {"wrong_shape": tmp_path / "wrong_shape.pth", "missing": tmp_path / "missing.pth"}
    torch.save(wrong_shape, paths["wrong_shape"])
    torch.save(missing, paths["missing"])
    return paths


def _v1_overrides(tmp_path: Path, uvit: Path) -> list[str]:
    # the other parts only need to exist: the U-ViT is read first and fails
    other = tmp_path / "other"
    other.mkdir(exist_ok=True)
    return [
        "model.bidiffuser.preset=v1",
        f"model.bidiffuser.uvit={uvit}",
        "+model.bidiffuser.uvit_config.num_heads=4",
        "+model.bidiffuser.uvit_config.num_text_tokens=16",
        *[
            f"model.bidiffuser.{k}={other}"
            for k in ("autoencoder", "clip_image", "clip_text", "caption_decoder", "gpt2_tokenizer")
        ],
    ]


def test_bad_checkpoint_is_one_line(data, tmp_path):
    from easygen.errors import ConfigError
    from easygen.stages.build import lightning_module

    data_dir, _ = data
    for name, path in _bad_checkpoints(tmp_path).items():
        module = lightning_module(make_cfg(data_dir, tmp_path / "run", _v1_overrides(tmp_path, path)))
        with pytest.raises(ConfigError) as err:
            module.configure_model()
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"model.bidiffuser.uvit={path}"), msg
        assert ("expected shape (16, 64), got (3, 64)" if name == "wrong_shape" else "missing keys:") in msg


@pytest.mark.slow
def test_bad_checkpoint_cli(data, tmp_path, run_env):
    data_dir, _ = data
    path = _bad_checkpoints(tmp_path)["missing"]
    r = subprocess.run(
        [
            sys.executable,
            "run.py",
            *SMALL,
            *_v1_overrides(tmp_path, path),
            f"paths.data_dir={data_dir}",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"model.bidiffuser.uvit={path}" in errors[0] and "missing keys" in errors[0]
    assert "Traceback" not in r.stderr


def test_ema_warmup_and_module_copy():
    from easygen.bidiffuser.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    ema = EMA(model, decay=0.5, warmup=True)
    assert ema.module is not model and not any(p.requires_grad for p in ema.module.parameters())
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())  # shadows kept in fp32
    assert [ema.decay_at(n) for n in (0, 1, 10)] == [0.1, 2 / 11, 0.5]
    expected = {k: v.float().clone() for k, v in model.named_parameters()}
    for n in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        used = ema.update(model)
        assert used == min(0.5, (1 + n) / (10 + n))
        expected = {k: torch.lerp(expected[k], v.float(), 1 - used) for k, v in model.named_parameters()}
    for k, v in ema.module.named_parameters():
        torch.testing.assert_close(v, expected[k])
    other = EMA(torch.nn.Linear(4, 3), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 3 and other.warmup and other.decay == 0.5
    for k, v in other.module.named_parameters():
        assert torch.equal(v, expected[k])
    assert EMA(model, decay=0.9).decay_at(0) == 0.9  # no warmup: the reference's constant rate


def test_online_encoder_outputs_are_cached_per_picture(data, tmp_path):
    """model.encoder_cache_size: the frozen encoders run once per picture and caption; later batches read
    the same moments, CLIP embeddings and CLIP text states back (the latent is still drawn per step)."""
    from easygen.stages.build import lightning_module

    data_dir, _ = data
    cfg = make_cfg(data_dir, tmp_path / "run", ["stage.encoder_source=online", "model.encoder_cache_size=64",
                                                "model.bidiffuser.train_caption_decoder=true"])
    module = lightning_module(cfg)
    module.configure_model()
    pipe = module.bidiffuser
    batch = module.collate(samples(f"{data_dir}/synthetic-64px-n40-seed0/train/*.tar")[:6])
    first = module.encoder_targets(batch)
    assert len(module._image_cache) == 6 and len(module._text_cache) == len(set(batch["captions"]))
    calls = []  # the VAE's encoder, hooked: are the pictures encoded again?
    hook = pipe.vae.encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        second = module.encoder_targets(batch)
    finally:
        hook.remove()
    assert calls == []
    enc = pipe.encode_images(batch["images"])
    torch.testing.assert_close(torch.stack([module._image_cache[i][0] for i in batch["ids"]]), enc["moments"])
    torch.testing.assert_close(second["clip0"], enc["clip_img"])
    torch.testing.assert_close(second["y0"], first["y0"])
    torch.testing.assert_close(second["clip_text"], pipe.clip_text(batch["captions"]))
    assert not torch.equal(first["z0"], second["z0"])  # a fresh posterior draw each step
    # off: nothing kept
    cfg0 = make_cfg(data_dir, tmp_path / "run0", ["stage.encoder_source=online", "model.encoder_cache_size=0"])
    m0 = lightning_module(cfg0)
    m0.configure_model()
    m0.encoder_targets(m0.collate(samples(f"{data_dir}/synthetic-64px-n40-seed0/train/*.tar")[:4]))
    assert m0._image_cache == {} and m0._text_cache == {}
