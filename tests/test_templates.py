"""Prompt rendering and label masking against real tokenisers: a sentencepiece Llama tokenizer (legacy
and non-legacy, where label masks usually drift) and the local byte-level BPE."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from easygen.llm.collate import EasyGenCollator
from easygen.llm.templates import CAPTION_PROMPTS, IGNORE_INDEX, Template, encode, render
from easygen.llm.tokenization import build_tokenizer

N_IMG = 6
WORDS = (
    "a an the dog cat man woman sitting standing on in with of red blue green ball table sofa street "
    "picture image photo describe what is this color how many two three yes no please giving short answer "
    "draw show me"
).split()


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    lines += ["USER: ASSISTANT: <Img> </Img> [INST] [/INST] <<SYS>> <</SYS>>"] * 20 + list(CAPTION_PROMPTS)
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"),
        model_prefix=str(d / "tokenizer"),
        vocab_size=400,  # 256 byte-fallback pieces + ~140 merges
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return d


def _tokenizer(kind, sp_dir):
    if kind == "bpe":
        return build_tokenizer("llama", [" ".join(WORDS)] + list(CAPTION_PROMPTS), vocab_size=400)
    import transformers

    cls_name, legacy = kind.split(":")
    cls = getattr(transformers, cls_name)
    tok = cls.from_pretrained(str(sp_dir), legacy=legacy == "legacy")
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


KINDS = [
    "bpe",
    "LlamaTokenizer:legacy",
    "LlamaTokenizer:nonlegacy",
    "LlamaTokenizerFast:legacy",
    "LlamaTokenizerFast:nonlegacy",
]


@pytest.fixture(scope="module", params=KINDS)
def tok(request, sp_model):
    return _tokenizer(request.param, sp_model)


def _samples():
    feats = lambda v: np.full((N_IMG, 8), v, np.float32)  # noqa: E731
    return [
        {
            "id": "cap0",
            "kind": "caption",
            "captions": ["a dog on the sofa", "a brown dog"],
            "features": feats(1),
        },
        {
            "id": "conv_text",
            "kind": "conversation",
            "conversations": [
                {"from": "human", "value": "draw me a red ball"},
                {"from": "gpt", "value": "<Img>a red ball on the table</Img>"},
                {"from": "human", "value": "and a cat"},
                {"from": "gpt", "value": "<Img>a cat sitting</Img>"},
            ],
        },
        {
            "id": "conv_img",
            "kind": "conversation",
            "features": feats(2),
            "conversations": [
                {"from": "human", "value": "<image>\nwhat is this"},
                {"from": "gpt", "value": "two cats"},
                {"from": "human", "value": "what color"},
                {"from": "gpt", "value": "blue"},
            ],
        },
        {
            "id": "vqa0",
            "kind": "vqa",
            "question": "how many dogs?",
            "answers": ["two", "two", "three"],
            "features": feats(3),
        },
    ]


def _expected_answers(sample):
    if sample["kind"] == "vqa":
        return ["two"]
    if sample["kind"] == "caption":
        return None  # randomly chosen among the captions
    return [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]


def _learned_runs(labels):
    runs, cur = [], []
    for x in labels.tolist():
        if x == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(x)
    if cur:
        runs.append(cur)
    return runs


def test_batch_masks_and_image_spans(tok):
    collator = EasyGenCollator(tok, num_image_tokens=N_IMG, seed=0)
    samples = _samples()
    batch = collator(samples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == mask.shape
    assert batch["has_image"].tolist() == [True, False, True, True]
    assert batch["features"].shape == (3, N_IMG, 8)
    assert batch["image_positions"][1].item() == -1
    # Right padding: padded columns are masked and never learned.
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1
    for b, sample in enumerate(samples):
        assert mask[b, : lengths[b]].all()
        # Every learned run decodes to one answer followed by the EOS token, in order.
        runs = _learned_runs(labels[b])
        answers = _expected_answers(sample) or [
            c for c in sample["captions"] if tok.decode(runs[0]).strip().startswith(c)
        ]
        assert len(runs) == len(answers), (sample["id"], [tok.decode(r) for r in runs])
        for run, answer in zip(runs, answers):
            assert run[-1] == tok.eos_token_id
            assert tok.decode(run[:-1]).strip() == answer
        # Learned tokens are the input tokens themselves (HF shifts labels inside the loss).
        learned = labels[b] != IGNORE_INDEX
        assert torch.equal(labels[b][learned], ids[b][learned])
        start = batch["image_positions"][b].item()
        if start >= 0:
            span = slice(start, start + N_IMG)
            assert (labels[b, span] == IGNORE_INDEX).all()
            assert (ids[b, span] == collator.pad_id).all()
            assert tok.decode(ids[b, :start]).endswith("<Img>")
            assert tok.decode(ids[b, start + N_IMG : lengths[b]]).strip().startswith("</Img>")
        # Everything up to the first answer (system prefix, user turn, role names) is masked.
        first_learned = int(learned.nonzero()[0])
        assert tok.decode(ids[b, :first_learned]).rstrip().endswith(("ASSISTANT:", "ASSISTANT"))


def test_eval_mode_left_pads_and_stops_at_assistant(tok):
    collator = EasyGenCollator(tok, num_image_tokens=N_IMG)
    collator.eval_mode = True
    samples = _samples()
    batch = collator(samples)
    assert "labels" not in batch
    assert batch["references"][0] == samples[0]["captions"]
    mask = batch["attention_mask"]
    assert mask[:, -1].all()  # left padding: every row ends at the last column
    for b in range(len(samples)):
        real = batch["input_ids"][b][mask[b].bool()]
        assert tok.decode(real).rstrip().endswith("ASSISTANT:")
        start = batch["image_positions"][b].item()
        if start >= 0:
            assert mask[b, start:].all()
            assert tok.decode(batch["input_ids"][b, :start], skip_special_tokens=True).endswith("<Img>")
    assert CAPTION_PROMPTS[0] in tok.decode(batch["input_ids"][0])


def test_broken_template_raises_naming_sample(tok):
    # The role prefix runs into the answer ("...th" + "e ..."), so the boundary falls inside a token.
    broken = Template(
        name="broken", user_format="USER: {content} ASSISTANT: th", answer_format="e {content}{eos}"
    )
    rendered = render(
        broken, [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "dog"}], 0, eos=tok.eos_token
    )
    with pytest.raises(ValueError, match="sample bad_sample_7"):
        encode(tok, rendered, sample_id="bad_sample_7")


def test_llama2_and_plain_templates(tok):
    for name in ("llama_2", "plain"):
        collator = EasyGenCollator(tok, template=name, num_image_tokens=N_IMG)
        batch = collator(_samples())
        for b, sample in enumerate(_samples()):
            answers = _expected_answers(sample)
            if answers:
                runs = _learned_runs(batch["labels"][b])
                assert [tok.decode(r, skip_special_tokens=True).strip() for r in runs] == answers


def test_errors_and_truncation(tok):
    collator = EasyGenCollator(tok, num_image_tokens=N_IMG)
    sample = _samples()[2]
    with pytest.raises(ValueError, match="conv_img.*cut through the image span"):
        EasyGenCollator(tok, num_image_tokens=N_IMG, max_length=5)([sample])
    full = collator([sample])["input_ids"].shape[1]
    short = EasyGenCollator(tok, num_image_tokens=N_IMG, max_length=full - 3)
    out = short([sample])
    assert out["input_ids"].shape[1] == full - 3 and short.num_truncated == 1
    with pytest.raises(ValueError, match="no_feat.*marker"):
        collator([{"id": "no_feat", "kind": "caption", "captions": ["a dog"]}])
    with pytest.raises(ValueError, match="x1.*'kind'"):
        collator([{"id": "x1", "kind": "poem"}])
    with pytest.raises(ValueError, match="two_img"):
        collator(
            [
                {
                    "id": "two_img",
                    "kind": "conversation",
                    "features": np.zeros((N_IMG, 8), np.float32),
                    "conversations": [
                        {"from": "human", "value": "<image> <image>"},
                        {"from": "gpt", "value": "no"},
                    ],
                }
            ]
        )


def test_legacy_and_nonlegacy_tokenise_differently_but_mask_right(sp_model):
    text = "ASSISTANT: blue</s>USER: what"
    legacy = _tokenizer("LlamaTokenizer:legacy", sp_model)
    modern = _tokenizer("LlamaTokenizer:nonlegacy", sp_model)
    a = legacy(text, add_special_tokens=False)["input_ids"]
    b = modern(text, add_special_tokens=False)["input_ids"]
    assert a != b  # the drift that breaks hard-coded offsets
    for t in (legacy, modern):
        runs = _learned_runs(EasyGenCollator(t, num_image_tokens=N_IMG)([_samples()[2]])["labels"][0])
        assert [t.decode(r[:-1]).strip() for r in runs] == ["two cats", "blue"]


def test_seeded_prompt_and_caption_choice(tok):
    sample = _samples()[0]

    def draws(seed):
        collator = EasyGenCollator(tok, num_image_tokens=N_IMG, seed=seed)
        return [tuple(collator([sample])["input_ids"][0].tolist()) for _ in range(12)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)
    texts = [tok.decode(ids) for ids in draws(3)]
    assert len({t.split("</Img>")[1].split("ASSISTANT")[0] for t in texts}) > 1  # prompts vary
    assert any("a brown dog" in t for t in texts) and any("a dog on the sofa" in t for t in texts)


def test_deferred_features_mark_image_rows_without_features(tok):
    samples = [
        {"id": "c1", "kind": "caption", "captions": ["a dog"]},
        {"id": "v1", "kind": "vqa", "question": "what?", "answers": ["dog"]},
    ]
    with pytest.raises(ValueError, match="c1"):
        EasyGenCollator(tok, num_image_tokens=N_IMG)(samples)
    batch = EasyGenCollator(tok, num_image_tokens=N_IMG, deferred_features=True)(samples)
    assert batch["has_image"].tolist() == [True, True] and batch["features"] is None
    assert (batch["image_positions"] > 0).all()
