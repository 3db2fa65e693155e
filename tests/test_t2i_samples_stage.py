"""The text-to-image samples a stage=bidiffuser run logs (callbacks/t2i_samples.py, in the default callbacks)
are the pictures its exported weights draw: a pipeline built from `bidiffuser.safetensors` the way eval,
chat and serve build it (`easygen.factories.build_bidiffuser`) draws the same prompts pixel for pixel.
With the live U-ViT instead of the EMA one the pictures differ and this fails."""

from __future__ import annotations

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from easygen.factories import build_bidiffuser
from tests.conftest import compose_at

COMMON = [
    "data.synthetic.n=40",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "model.bidiffuser.sampler.steps=2",
    "model.bidiffuser.clip_fit.steps=5",
    "model.bidiffuser.clip_fit.batch_size=8",
    "logger=none",
    "callbacks.caption_eval=null",
    "stage.monitor=null",
]


def test_logged_samples_are_what_the_export_draws(tmp_path):
    from easygen.stages.train import train_stage

    out = tmp_path / "run"
    cfg = compose_at(tmp_path, out, [*COMMON, "stage=bidiffuser", "trainer.max_steps=2", "stage.val_every=2"])
    prompts = list(cfg.callbacks.t2i_samples.prompts)
    res = train_stage(cfg)
    logged = sorted(out.rglob("samples/*.png"))
    assert len(logged) == len(prompts), logged
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["bidiffuser"]["weights"] = res["artifacts"]["bidiffuser_weights"]
    pipe = build_bidiffuser({"model": model, "seed": cfg.seed})
    drawn = pipe.generate(prompts)
    for path, picture in zip(logged, drawn):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(picture)), path
    # the prompts are drawn differently (the pictures follow the text, not only the seed)
    assert not np.array_equal(np.asarray(drawn[0]), np.asarray(drawn[1]))
