"""The tiny FlanT5 stand-in's tokenizer is a real T5 tokenizer, and the Mid-Align collator and model use it
as T5 does.

Every expected id below comes from ``sentencepiece.SentencePieceProcessor`` reading the same
``spiece.model`` the tokenizer was built from (or from transformers' own ``T5ForConditionalGeneration``),
never from the collator's output: T5 has no BOS, the encoder input and the labels end with ``</s>`` (id 1),
label padding is -100, and the decoder starts from the pad id 0 (``_shift_right``).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from easygen.llm.templates import CAPTION_PROMPTS, IGNORE_INDEX, VQA_SUFFIX
from easygen.llm.tokenization import build_t5_tokenizer

CORPUS = [
    *CAPTION_PROMPTS,
    VQA_SUFFIX,
    "a small red circle on the left on a black background",
    "a large blue square at the top on a white background",
    "what colour is the shape?",
    "where is the shape?",
]
EXTRA_IDS = 100


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(tokenizer, its cache folder, a SentencePieceProcessor on the folder's spiece.model)."""
    import sentencepiece as spm

    cache = tmp_path_factory.mktemp("t5-tok")
    tok = build_t5_tokenizer(CORPUS, vocab_size=512, extra_ids=EXTRA_IDS, cache_dir=cache)
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    return tok, folder, sp


def no_dummy_prefix(sp):
    """The same model with ``add_dummy_prefix`` off: how non-legacy T5 encodes text after a special token."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


TEXTS = [
    "a small red circle on the left on a black background",
    "Describe the image concisely.",
    "what colour is the shape? please giving an short answer.",
    "  leading,  doubled   and trailing spaces ",
    "two lines\nAnswer: red",
    "Numbers 12 and (brackets) & symbols!",
    "unseen characters: \u00e9t\u00e9 \u4e2d",
]


def test_a_real_t5_tokenizer(built, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import T5TokenizerFast

    tok, folder, sp = built
    assert isinstance(tok, T5TokenizerFast)
    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    assert proto.trainer_spec.model_type == 1  # UNIGRAM
    # T5's ids: <pad> 0, </s> 1, <unk> 2, no BOS, in the sentencepiece model and in the tokenizer
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert (tok.pad_token, tok.eos_token, tok.unk_token, tok.bos_token) == ("<pad>", "</s>", "<unk>", None)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    # sentinels follow the pieces, <extra_id_0> last (the released T5 vocabulary's order)
    assert len(tok) == sp.get_piece_size() + EXTRA_IDS <= 512
    for i in (0, 1, EXTRA_IDS - 1):
        assert tok.convert_tokens_to_ids(f"<extra_id_{i}>") == len(tok) - 1 - i
    for i in range(sp.get_piece_size()):
        assert tok.convert_ids_to_tokens(i) == sp.id_to_piece(i)
    # T5TokenizerFast converts the bare spiece.model (as a released checkpoint without tokenizer.json
    # would be loaded) to the same tokenizer as the cached one
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "spiece.model", bare / "spiece.model")
    from_spiece = T5TokenizerFast.from_pretrained(str(bare), extra_ids=EXTRA_IDS)
    assert len(from_spiece) == len(tok)
    for text in [*TEXTS, "a <extra_id_0> red"]:
        assert from_spiece(text)["input_ids"] == tok(text)["input_ids"], text


def test_deterministic_and_cached(built, tmp_path):
    tok, folder, _ = built
    again = build_t5_tokenizer(CORPUS, vocab_size=512, extra_ids=EXTRA_IDS, cache_dir=tmp_path)
    (folder2,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert folder2.name == folder.name
    assert (folder2 / "spiece.model").read_bytes() == (folder / "spiece.model").read_bytes()
    cached = build_t5_tokenizer(CORPUS, vocab_size=512, extra_ids=EXTRA_IDS, cache_dir=tmp_path)
    for text in TEXTS:
        assert again(text)["input_ids"] == cached(text)["input_ids"] == tok(text)["input_ids"]


def test_too_small_vocab_names_the_config_key():
    with pytest.raises(ValueError, match="model.llm.vocab_size"):
        build_t5_tokenizer(CORPUS, vocab_size=EXTRA_IDS + 8, extra_ids=EXTRA_IDS)
    with pytest.raises(ValueError, match="model.llm.vocab_size"):
        # fewer pieces than the corpus has characters
        build_t5_tokenizer(CORPUS, vocab_size=EXTRA_IDS + 40, extra_ids=EXTRA_IDS)


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_matches_sentencepiece(built, text):
    tok, _, sp = built
    expected = sp.encode(text)
    assert tok(text, add_special_tokens=False)["input_ids"] == expected
    # T5 appends </s> itself and has no BOS
    assert tok(text)["input_ids"] == expected + [1]
    # transformers writes <unk> where sentencepiece writes ⁇
    known = [i for i in expected if i != sp.unk_id()]
    assert tok.decode(known) == sp.decode(known)


@pytest.mark.parametrize("legacy", [True, False])
def test_text_after_a_special_token(built, legacy):
    """T5Tokenizer(legacy=True) encodes each chunk between special tokens on its own, with sentencepiece's
    dummy prefix; legacy=False (transformers < 5's sentencepiece T5Tokenizer) leaves the prefix off the
    chunks after a special token. transformers 5's tokenizers-backed T5Tokenizer builds its Metaspace
    pre-tokenizer with ``prepend_scheme="always"`` whatever ``legacy`` says, so there both give the legacy
    encoding. The collator never tokenises text containing special tokens (it appends ``</s>`` by id), so
    its ids do not depend on this."""
    from transformers import T5Tokenizer, T5TokenizerFast

    tok, folder, sp = built
    before, after = "describe the image", ". a red circle"
    sentinel = tok.convert_tokens_to_ids("<extra_id_0>")
    legacy_ids = sp.encode(before) + [sentinel] + sp.encode(after)
    non_legacy_ids = sp.encode(before) + [sentinel] + no_dummy_prefix(sp).encode(after)
    assert legacy_ids != non_legacy_ids  # the text tells the two apart
    text = f"{before}<extra_id_0>{after}"
    fast = T5TokenizerFast.from_pretrained(str(folder), legacy=legacy)
    got = fast(text, add_special_tokens=False)["input_ids"]
    if T5Tokenizer is T5TokenizerFast or legacy:
        assert got == legacy_ids
    else:
        slow = T5Tokenizer.from_pretrained(str(folder), legacy=False)
        assert slow(text, add_special_tokens=False)["input_ids"] == non_legacy_ids


# -- the collator and the model with this tokenizer ----------------------------------------------


def tiny_t5(tok):
    from easygen.factories import tiny_t5 as build

    return build(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0)


def real_ids(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


SAMPLES = [
    {"id": "c", "kind": "caption", "captions": ["a small red circle on the left on a black background"]},
    {
        "id": "v",
        "kind": "vqa",
        "question": "what colour is the shape?",
        "answers": ["red", "red", "blue"],
        "captions": ["a small red circle on the left"],
    },
    {
        "id": "d",
        "kind": "conversation",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": "It is red."},
            {"from": "human", "value": "Where is it?"},
            {"from": "gpt", "value": "On the left, on a black background."},
        ],
        "captions": ["a large blue square at the top"],
    },
]
# what the T5 prompt of each sample is (easygen/llm/t5_collate.py: the image marker dropped, earlier answers
# as "Answer: ...", turns joined by newlines); the caption prompt is one of CAPTION_PROMPTS
PROMPTS = {
    "v": ["what colour is the shape?" + VQA_SUFFIX],
    "d": ["What colour is the shape?\nAnswer: It is red.\nWhere is it?"],
    "c": list(CAPTION_PROMPTS),
}
ANSWERS = {
    "c": "a small red circle on the left on a black background",
    "v": "red",
    "d": "On the left, on a black background.",
}
CAPTIONS = {"c": ANSWERS["c"], "v": "a small red circle on the left", "d": "a large blue square at the top"}


def test_collator_inputs_labels_and_decoder_starts(built):
    from easygen.llm.t5_collate import T5Collator

    tok, _, sp = built
    col = T5Collator(tok, max_length=64, max_target_length=32)
    samples = [dict(s, features=torch.randn(4, 8)) for s in SAMPLES]
    batch = col(samples)
    eos, pad = sp.eos_id(), sp.pad_id()
    for b, sid in enumerate(batch["ids"]):
        # encoder input: the prompt's pieces then </s>, no BOS; padding is <pad> 0 outside the mask
        row, mask = batch["input_ids"][b], batch["attention_mask"][b]
        assert real_ids(row, mask) in [sp.encode(p) + [eos] for p in PROMPTS[sid]], sid
        assert (row[~mask.bool()] == pad).all()
        # labels: the answer's pieces then </s>, -100 after
        labels = batch["labels"][b]
        expected = sp.encode(ANSWERS[sid]) + [eos]
        assert labels[: len(expected)].tolist() == expected
        assert (labels[len(expected) :] == IGNORE_INDEX).all()
        # the caption the feature-matching term encodes, as an encoder input
        cap, cap_mask = batch["caption_input_ids"][b], batch["caption_attention_mask"][b]
        assert real_ids(cap, cap_mask) == sp.encode(CAPTIONS[sid]) + [eos]
        assert (cap[~cap_mask.bool()] == pad).all()
    assert (batch["labels"] == IGNORE_INDEX).any()  # the batch really has label padding

    model = tiny_t5(tok)
    # the embedding covers the whole tokenizer, sentinels included, and no more
    assert model.get_input_embeddings().num_embeddings == len(tok) == model.lm_head.out_features
    assert (model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id) == (
        pad,
        pad,
        eos,
    )
    # decoder inputs = labels shifted right, starting from the pad id, -100 replaced by the pad id
    labels = batch["labels"]
    start = torch.full((labels.shape[0], 1), pad, dtype=torch.long)
    decoder_inputs = torch.cat([start, labels[:, :-1]], 1).masked_fill(
        torch.cat([start, labels[:, :-1]], 1) == IGNORE_INDEX, pad
    )
    assert torch.equal(model._shift_right(labels), decoder_inputs)
    with torch.no_grad():
        from_labels = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        explicit = model(
            batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_inputs
        )
    torch.testing.assert_close(from_labels.logits, explicit.logits, rtol=0, atol=0)
    loss = F.cross_entropy(
        explicit.logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="mean"
    )
    torch.testing.assert_close(from_labels.loss, loss)
    # the largest id (<extra_id_0>) is a valid input
    with torch.no_grad():
        model(torch.tensor([[len(tok) - 1, eos]]), decoder_input_ids=torch.tensor([[pad]]))


def test_collator_truncates_keeping_eos(built):
    from easygen.llm.t5_collate import T5Collator

    tok, _, sp = built
    col = T5Collator(tok, max_length=64, max_target_length=5)
    answer = "a small red circle on the left on a black background"
    batch = col([{"id": "c", "kind": "caption", "captions": [answer], "features": torch.randn(4, 8)}])
    assert batch["labels"][0].tolist() == sp.encode(answer)[:4] + [sp.eos_id()]
    assert col.num_truncated >= 1


def test_generation_starts_from_pad(built):
    """EasyGenT5.generate: the decoder starts from <pad> 0, and the decoded text is sentencepiece's decoding
    of the generated pieces (special ids and sentinels dropped)."""
    from easygen.llm.projector import Projector
    from easygen.llm.t5 import EasyGenT5
    from easygen.llm.t5_collate import T5Collator

    tok, _, sp = built
    model = tiny_t5(tok)
    m = EasyGenT5(model, Projector(8, 16, model.config.d_model)).eval()
    col = T5Collator(tok, max_length=64)
    col.eval_mode = True
    batch = col([dict(s, features=torch.randn(4, 8)) for s in SAMPLES[:2]])
    out = m.generate(
        batch["input_ids"], batch["attention_mask"], features=batch["features"], max_new_tokens=6
    )
    assert (out[:, 0] == sp.pad_id()).all() and out.shape[1] > 1
    specials = {sp.pad_id(), sp.eos_id(), sp.unk_id()}
    for row, text in zip(out.tolist(), tok.batch_decode(out, skip_special_tokens=True)):
        pieces = [i for i in row if i not in specials and i < sp.get_piece_size()]
        assert text == sp.decode(pieces)


@pytest.mark.slow
def test_tiny_t5_pretrain_then_eval_cli(tmp_path):
    """`model=tiny_t5` through run.py: two pretrain steps, then stage=eval task=coco_caption from
    the checkpoint; the scores in results.json are those of the predictions written to predictions.json."""
    import json
    import os

    from easygen.metrics import caption_scores
    from tests.test_eval_stage import TINY, _run, _test_samples

    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    env.pop("WANDB_API_KEY", None)
    common = [
        "model=tiny_t5",
        *TINY,
        f"paths.data_dir={tmp_path}/data",
        f"paths.log_dir={tmp_path}/logs",
    ]
    _run(
        ["stage=pretrain", *common, "trainer.max_steps=2", "callbacks.caption_eval=null",
         "stage.monitor=train/loss", "stage.monitor_mode=min", f"hydra.run.dir={tmp_path}/pre"],
        env,
    )  # fmt: skip
    # the run's tokenizer is the cached T5 one, next to its spiece.model
    (folder,) = list((tmp_path / "data" / "tokenizers").glob("t5-*"))
    assert (folder / "spiece.model").exists() and (folder / "tokenizer.json").exists()
    out = tmp_path / "eval"
    _run(
        ["stage=eval", "task=coco_caption", f"ckpt_path={tmp_path}/pre/checkpoints/last.ckpt", *common,
         f"hydra.run.dir={out}"],
        env,
    )  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    rows = json.loads((out / "predictions.json").read_text())
    samples = _test_samples(str(next((tmp_path / "data").glob("synthetic-*")) / "test" / "*.tar"))
    refs = {s["id"]: s["captions"] for s in samples}
    preds = {str(r["image_id"]): r["caption"] for r in rows}
    assert res["num_samples"] == len(refs) == len(rows) and set(preds) == set(refs)
    expected = caption_scores(preds, {k: refs[k] for k in sorted(refs)})
    assert res["metrics"] == {f"test/{k}": v for k, v in expected.items()}
