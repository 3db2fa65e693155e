"""The tiny preset's CLIP fit (easygen/bidiffuser/clip.py::fit_clip, callbacks/clip_fit.py): after it a
caption finds its own picture among held-out ones far above chance, the fit is deterministic given its seed
and refuses bad input by name; stage=bidiffuser keeps the fitted towers in its checkpoints, and a resumed run
continues with the checkpoint's towers instead of fitting again."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_modules.synthetic import captions_for, draw, sample_attributes
from easygen.bidiffuser.clip import fit_clip
from easygen.bidiffuser.pipeline import BiDiffuser
from easygen.factories import tiny_caption_corpus
from tests.conftest import compose_at


def _pairs(n: int, seed: int) -> tuple[torch.Tensor, list[list[str]]]:
    rng = random.Random(seed)
    pics, captions = [], []
    for _ in range(n):
        a = sample_attributes(rng)
        pics.append(torch.from_numpy(np.array(draw(a, 64, rng))).permute(2, 0, 1).float() / 255.0)
        captions.append(captions_for(a))
    return torch.stack(pics), captions


@torch.no_grad()
def _retrieval(pipe: BiDiffuser, images: torch.Tensor, captions: list[list[str]]) -> float:
    """Top-1 caption-to-picture retrieval among the given pictures, through the towers' own outputs
    (the text latent's mean over tokens against the CLIP image embedding, compared by a least-squares map
    fitted on the same pairs: the towers' spaces need not be aligned outside the fit's head)."""
    text = pipe.encode_texts([c[0] for c in captions]).mean(1)
    image = pipe.clip_image(images)[:, 0]
    # map text -> image space by least squares on half, score on the other half
    half = len(images) // 2
    w = torch.linalg.lstsq(text[:half], image[:half]).solution
    pred = F.normalize(text[half:] @ w, dim=-1)
    sims = pred @ F.normalize(image[half:], dim=-1).T
    return float((sims.argmax(1) == torch.arange(len(sims))).float().mean())


@pytest.fixture(scope="module")
def pairs():
    return _pairs(192, seed=3)


def _fitted(images, captions, **kwargs):
    pipe = BiDiffuser.tiny(tiny_caption_corpus(), seed=0, image_size=64)
    losses = pipe.fit_clip(images, captions, seed=0, **{"steps": 150, "batch_size": 64, **kwargs})
    return pipe, losses


def test_fit_makes_captions_find_their_pictures(pairs):
    images, captions = pairs
    before = _retrieval(BiDiffuser.tiny(tiny_caption_corpus(), seed=0, image_size=64), images, captions)
    pipe, losses = _fitted(images, captions, paraphrase=1.0)
    after = _retrieval(pipe, images, captions)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert after > max(0.3, 3 * before), (before, after)
    # the text latent comes out at unit root mean square (BiDiffuser.fit_clip)
    flat = sorted({c for caps in captions for c in caps})
    rms = float(pipe.encode_texts(flat).pow(2).mean().sqrt())
    assert abs(rms - 1.0) < 1e-4
    assert not any(p.requires_grad for p in pipe.clip_text.parameters())


def test_fit_is_deterministic_given_its_seed(pairs):
    images, captions = pairs
    a, _ = _fitted(images[:64], captions[:64], steps=5, batch_size=16)
    b, _ = _fitted(images[:64], captions[:64], steps=5, batch_size=16)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize(
    "images, captions, kwargs, message",
    [
        (torch.zeros(2, 1, 8, 8), [["a"], ["b"]], {}, r"expected images \[N, 3, H, W\]"),
        (torch.zeros(2, 3, 64, 64), [["a"]], {}, r"one list of captions per picture \(2\), got 1"),
        (torch.zeros(2, 3, 64, 64), [["a"], [" "]], {}, r"picture 1 needs a non-empty list"),
        (torch.zeros(2, 3, 64, 64), [["a"], ["b"]], {"temperature": 0}, r"temperature > 0"),
    ],
)
def test_bad_input_is_named(images, captions, kwargs, message):
    pipe = BiDiffuser.tiny(tiny_caption_corpus(), seed=0, image_size=64)
    with pytest.raises(ValueError, match=message):
        fit_clip(pipe.clip_text, pipe.clip_image, images, captions, **kwargs)


def test_resume_keeps_the_checkpointed_towers(tmp_path):
    """Two steps with the fit (5 fit steps), the checkpoint's towers then shifted by hand, and the run resumed
    for one more step: the stage's exported towers are the shifted ones (restored, not fitted again)."""
    from safetensors.torch import load_file

    from easygen.stages.train import train_stage

    common = [
        "stage=bidiffuser",
        "data.synthetic.n=40",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "model.bidiffuser.sampler.steps=2",
        "model.bidiffuser.train_caption_decoder=false",
        "model.bidiffuser.clip_fit.steps=5",
        "model.bidiffuser.clip_fit.batch_size=8",
        # the random towers the fit starts from (the shipped BiDiffuser's are fitted already)
        "model.bidiffuser.weights=null",
        "logger=none",
        "callbacks.caption_eval=null",
        "stage.monitor=null",
    ]
    out = tmp_path / "run"
    first = train_stage(compose_at(tmp_path, out, [*common, "trainer.max_steps=2"]))
    fitted = load_file(first["artifacts"]["bidiffuser_weights"])
    ckpt_path = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    towers = [k for k in ckpt["state_dict"] if k.startswith("bidiffuser.clip_text.")]
    assert towers, "the fitted CLIP towers are not in the checkpoint"
    for k in towers:
        assert torch.equal(ckpt["state_dict"][k], fitted[k.removeprefix("bidiffuser.")]), k
        ckpt["state_dict"][k] = ckpt["state_dict"][k] + 0.01
    torch.save(ckpt, ckpt_path)
    resumed = train_stage(
        compose_at(tmp_path, out, [*common, "trainer.max_steps=3", f"ckpt_path={ckpt_path}"])
    )
    final = load_file(resumed["artifacts"]["bidiffuser_weights"])
    for k in towers:
        torch.testing.assert_close(final[k.removeprefix("bidiffuser.")], ckpt["state_dict"][k], rtol=0, atol=0)
