"""Generated captions are clean text: whole sequences decoded with the special tokens skipped, and what a
byte-level BPE leaves that is not text (U+FFFD of invalid UTF-8, control characters) dropped."""

from __future__ import annotations

import unicodedata

import lightning.pytorch as pl
import torch

from easygen.clean_text import clean_text
from tests.conftest import compose_at


def _bad(text: str) -> list[str]:
    return [c for c in text if c == "\ufffd" or unicodedata.category(c).startswith("C")]


def test_clean_text_of_a_byte_level_decode():
    from easygen.llm.tokenization import build_tokenizer

    tok = build_tokenizer("llama", ["a red circle on the left"], vocab_size=300)
    lead_byte = tok("é", add_special_tokens=False)["input_ids"][:1]  # half of a 2-byte UTF-8 character
    ids = (
        [tok.bos_token_id]
        + tok("a red circle", add_special_tokens=False)["input_ids"]
        + tok("\r\x1d", add_special_tokens=False)["input_ids"]
        + lead_byte
        + tok(" on the left", add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
    )
    raw = tok.decode(ids, skip_special_tokens=True)
    assert "\ufffd" in raw and "\r" in raw and "\x1d" in raw  # what the decoder gives
    assert clean_text(raw) == "a red circle on the left"
    assert clean_text(" a\tb\n\nc\u200b d ") == "a b c d"
    assert clean_text("une île") == "une île"  # valid non-ASCII text is kept


def test_predicted_captions_are_clean(tmp_path):
    from easygen.stages.build import datamodule, lightning_module
    from easygen.stages.common import ensure_data

    cfg = compose_at(
        tmp_path / "data",
        tmp_path / "out",
        [
            # random weights: their long, varied captions are what the cleaning is tested on
            "model.bidiffuser.weights=null",
            "model.llm.weights=null",
            "data.synthetic.n=40",
            "data.eval_batch_size=8",
            "model.bidiffuser.sampler.steps=2",
            "model.projector.standardize_samples=8",
            "stage.feature_source=captions",
            "logger=none",
            "callbacks=none",
        ],
    )
    ensure_data(cfg)
    pl.seed_everything(0)
    module = lightning_module(cfg)
    module.configure_model()
    dm = datamodule(cfg, module)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        out = module.predict_captions(batch, max_new_tokens=24)
        raw = module.model.generate(  # the same generation, decoded without cleaning
            batch["input_ids"],
            batch["attention_mask"],
            features=module.image_features(batch),
            image_positions=batch["image_positions"],
            has_image=batch["has_image"],
            max_new_tokens=24,
        )
    # the untrained tiny LLM draws arbitrary byte tokens: the raw decode holds non-text characters
    assert any(_bad(t) for t in raw), raw
    assert out["predictions"] == [clean_text(t) for t in raw]
    assert not any(_bad(t) for t in out["predictions"]), out["predictions"]
    # the pictures travel with the predictions for the sample tables
    assert len(out["images"]) == len(out["ids"]) and out["images"][0].shape[0] == 3
