"""A stage started from `init_from=` (eval, chat, serve, a later training stage) uses the BiDiffuser the
weights were trained with: the projector learned that BiDiffuser's image-to-text features, and
text-to-image must draw with its fine-tuned U-ViT. The checkpoint's stored config names it
(`model.bidiffuser.weights`): a Lightning checkpoint's `hyper_parameters.cfg`, and the metadata of
`easygen/trained.safetensors`. Before, `stage=eval task=t2i init_from=<the recipe's instruct checkpoint>`
drew every prompt with the preset's untrained U-ViT, and `task=coco_caption` captioned the untrained
BiDiffuser's features.

A pretrain run here trains (one step) with a BiDiffuser whose U-ViT differs from the preset's; the eval
and chat stages are then run with only `init_from`, as a user types them."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from easygen.assets import asset
from easygen.checkpoint import load_state_dict_file, save_state_dict_file, stored_config
from easygen.errors import ConfigError
from easygen.factories import build_bidiffuser
from tests.conftest import compose_at

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    "data.synthetic.n=40",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "model.bidiffuser.sampler.steps=2",
    "logger=none",
    "callbacks.caption_eval=null",
    "callbacks.t2i_samples=null",
]
PROMPT = "a large red circle in the center on a white background"


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def _pipe(data, weights):
    cfg = _plain(compose_at(data, data / "unused", [*SMALL, "stage=eval", f"model.bidiffuser.weights={weights}"]))
    return build_bidiffuser(cfg)


def _pictures(images):
    return [np.asarray(im.convert("RGB")) for im in images]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """BiDiffuser weights unlike the preset's (its U-ViT shifted), and one pretrain step trained with them."""
    from easygen.stages.train import train_stage

    root = tmp_path_factory.mktemp("init_from_bidiffuser")
    data = root / "data"
    pipe = build_bidiffuser(_plain(compose_at(data, root / "unused", [*SMALL, "stage=eval"])))
    g = torch.Generator().manual_seed(0)
    sd = {
        k: (v + 0.2 * torch.randn(v.shape, generator=g) if k.startswith("uvit.") and v.is_floating_point() else v)
        for k, v in pipe.state_dict().items()
    }
    weights = root / "bd" / "bidiffuser.safetensors"
    save_state_dict_file(sd, weights)
    out = root / "pretrain"
    cfg = compose_at(
        data,
        out,
        [*SMALL, "stage=pretrain", "trainer.max_steps=1", "stage.monitor=null", f"model.bidiffuser.weights={weights}"],
    )
    res = train_stage(cfg)
    return {"data": data, "root": root, "bd": weights, "out": out, "res": res}


def test_trained_weights_and_checkpoint_name_their_bidiffuser(trained):
    files = [Path(trained["res"]["artifacts"]["weights"]), trained["out"] / "checkpoints" / "last.ckpt"]
    for f in files:
        stored = stored_config(f)
        assert stored is not None, f
        assert stored["model"]["bidiffuser"]["weights"] == str(trained["bd"]), f
        assert stored["stage"]["name"] == "pretrain"
    # a plain state dict carries none
    plain = trained["root"] / "plain.safetensors"
    save_state_dict_file(load_state_dict_file(files[0]), plain)
    assert stored_config(plain) is None


def test_eval_t2i_from_init_from_draws_with_its_bidiffuser(trained):
    from easygen.stages.evaluate import eval_stage

    out = trained["root"] / "eval_t2i"
    weights = trained["res"]["artifacts"]["weights"]
    cfg = compose_at(trained["data"], out, [*SMALL, "stage=eval", "task=t2i", f"init_from={weights}", "stage.t2i_limit=4"])
    # the user names only the checkpoint: the preset's own (shipped) BiDiffuser is replaced by init_from's
    assert cfg.model.bidiffuser.weights == asset("tiny/bidiffuser.safetensors")
    res = eval_stage(cfg)
    assert {"key": "model.bidiffuser.weights", "path": str(trained["bd"])} in [
        {k: d[k] for k in ("key", "path")} for d in res["loaded"]
    ]
    rows = json.loads((out / "predictions.json").read_text())
    written = _pictures([Image.open(out / r["file"]) for r in rows])
    prompts = [r["prompt"] for r in rows]
    expected = _pictures(_pipe(trained["data"], trained["bd"]).generate(prompts))
    preset = _pictures(_pipe(trained["data"], "null").generate(prompts))
    for w, e, p in zip(written, expected, preset):
        assert np.array_equal(w, e)
        assert not np.array_equal(w, p)  # what the eval drew before: the preset's untrained U-ViT


def test_chat_from_a_lightning_checkpoint_draws_with_its_bidiffuser(trained, capsys):
    from easygen.stages.chat import chat_stage

    out = trained["root"] / "chat"
    script = trained["root"] / "script.txt"
    script.write_text(f"/draw {PROMPT}\n")
    ckpt = trained["out"] / "checkpoints" / "last.ckpt"
    cfg = compose_at(trained["data"], out, [*SMALL, "stage=chat", f"init_from={ckpt}", f"stage.script={script}"])
    chat_stage(cfg)
    (turn,) = json.loads((out / "transcript.json").read_text())
    (path,) = turn["pictures"]
    drawn = _pictures([Image.open(path)])[0]
    assert np.array_equal(drawn, _pictures(_pipe(trained["data"], trained["bd"]).generate([PROMPT]))[0])


def test_features_for_captioning_come_from_that_bidiffuser(trained):
    from easygen.lit.easygen_module import EasyGenModule

    weights = trained["res"]["artifacts"]["weights"]
    cfg = compose_at(trained["data"], trained["root"] / "x", [*SMALL, "stage=eval", f"init_from={weights}"])
    module = EasyGenModule(_plain(cfg))
    module.configure_model()
    assert module.hparams["cfg"]["model"]["bidiffuser"]["weights"] == str(trained["bd"])
    images = torch.rand(2, 3, int(cfg.model.image_size), int(cfg.model.image_size), generator=torch.Generator().manual_seed(1))
    expected = _pipe(trained["data"], trained["bd"]).i2t_features(images)
    assert torch.equal(module.bidiffuser.i2t_features(images), expected)


def test_a_weights_setting_on_the_command_line_wins_with_a_warning(trained, caplog):
    from easygen.lit.easygen_module import EasyGenModule

    other = trained["root"] / "other.safetensors"
    shutil.copy(trained["bd"], other)
    weights = trained["res"]["artifacts"]["weights"]
    cfg = compose_at(
        trained["data"], trained["root"] / "x", [*SMALL, "stage=eval", f"init_from={weights}", f"model.bidiffuser.weights={other}"]
    )
    with caplog.at_level(logging.WARNING, logger="easygen"):
        module = EasyGenModule(_plain(cfg))
    assert module.cfg["model"]["bidiffuser"]["weights"] == str(other)
    assert f"was trained with model.bidiffuser.weights={trained['bd']}" in caplog.text
    # the same file under another name (relative to the working directory) is no difference
    caplog.clear()
    same = os.path.relpath(trained["bd"])
    cfg = compose_at(
        trained["data"], trained["root"] / "x", [*SMALL, "stage=eval", f"init_from={weights}", f"model.bidiffuser.weights={same}"]
    )
    with caplog.at_level(logging.WARNING, logger="easygen"):
        EasyGenModule(_plain(cfg))
    assert "was trained with" not in caplog.text


def test_a_moved_bidiffuser_is_named(trained):
    from easygen.lit.easygen_module import EasyGenModule

    src = Path(trained["res"]["artifacts"]["weights"])
    stored = stored_config(src)
    gone = trained["root"] / "moved" / "bidiffuser.safetensors"
    stored["model"]["bidiffuser"]["weights"] = str(gone)
    moved = trained["root"] / "moved_trained.safetensors"
    save_state_dict_file(load_state_dict_file(src), moved, config=stored)
    cfg = compose_at(trained["data"], trained["root"] / "x", [*SMALL, "stage=eval", f"init_from={moved}"])
    with pytest.raises(ConfigError, match=f"model.bidiffuser.weights={gone}, which does not exist"):
        EasyGenModule(_plain(cfg))
