"""Continuous batching in the server (easygen/serve/batching.py, easygen/serve/engine.py), in process on the
tiny model with random weights: answers decoded together equal transformers' own `generate` on each prompt
alone (EasyGen.generate), sampling follows transformers' top-p rule and a seeded answer repeats, pictures'
features and drawings computed in one batch equal those computed one by one, and the engine's answers with
a batch of 4 equal its answers one request at a time."""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from easygen.llm.templates import IMAGE_MARKER
from easygen.serve.batching import BatchDecoder, Row, top_p_filter
from easygen.serve.engine import ChatRequest, DrawRequest, Engine
from easygen.serve.metrics import ServeMetrics
from tests.conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["What is in the picture?", "hello", "Describe the image concisely.",
             "a much longer question about the many shapes, colours and backgrounds of the picture", "and then?"]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from easygen.stages.chat import build_session

    tmp = tmp_path_factory.mktemp("serve-batching")
    # random weights (not the shipped trained ones): their answers run to max_new_tokens
    cfg = compose(["stage=serve", "model.bidiffuser.weights=null", "model.llm.weights=null",
                   "model.bidiffuser.sampler.steps=2", "logger=none", f"paths.data_dir={tmp}/data",
                   f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/out"])
    return build_session(cfg)


def pictures(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 64, 64, generator=g)


def sample(question: str, feats=None) -> dict:
    marker = f"{IMAGE_MARKER} " if feats is not None else ""
    return {"id": question, "kind": "conversation", "features": feats,
            "conversations": [{"from": "human", "value": marker + question}]}


def test_batch_decoder_equals_generate_alone(session):
    """Five prompts (three with pictures, every length different), two joining after two tokens of the first
    three; each row's tokens equal EasyGen.generate's (transformers' greedy search, KV cache) on it alone."""
    col, model = session.collator, session.model
    feats = session.bidiffuser.i2t_features(pictures(3)).float()
    samples = [sample(QUESTIONS[0], feats[0]), sample(QUESTIONS[1]), sample(QUESTIONS[2], feats[1]),
               sample(QUESTIONS[3], feats[2]), sample(QUESTIONS[4])]
    lengths = [20, 7, 13, 30, 9]
    alone = []
    for smp, n in zip(samples, lengths):
        b = col([smp])
        _, ids = model.generate(b["input_ids"], b["attention_mask"], features=b["features"],
                                image_positions=b["image_positions"], has_image=b["has_image"], max_new_tokens=n,
                                return_ids=True)
        eos = col.tokenizer.eos_token_id
        alone.append([t for t in ids[0].tolist() if t != eos])
    dec = BatchDecoder(model, col.tokenizer.eos_token_id)
    rows = [Row(i, n) for i, n in enumerate(lengths)]
    dec.join(rows[:3], col(samples[:3]))
    widths = []
    for _ in range(2):
        dec.step()
    dec.join(rows[3:], col(samples[3:]))
    while dec.rows:
        dec.drop([r for r in dec.rows if r.finished])
        if dec.rows:
            widths.append(len(dec.rows))
            dec.step()
    assert max(widths) == 5 and min(widths) == 1  # all five together, then rows left as they ended
    for row, ref, n in zip(rows, alone, lengths):
        assert row.tokens == ref, (row.owner, row.tokens, ref)
        assert len(row.tokens) == n and row.finish_reason == "length"


def test_top_p_filter_is_transformers_rule():
    g = torch.Generator().manual_seed(1)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        scores = torch.randn(64, generator=g) * 3
        ours = top_p_filter(scores, top_p)
        theirs = TopPLogitsWarper(top_p)(None, scores[None].clone())[0]
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), top_p
        assert torch.equal(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_seeded_sampling_repeats_and_seeds_differ(session):
    col, model = session.collator, session.model
    batch = col([sample(QUESTIONS[1])])

    def sampled(seed):
        dec = BatchDecoder(model, None)
        row = Row(0, 24, temperature=1.5, top_p=0.95, generator=torch.Generator().manual_seed(seed))
        dec.join([row], batch)
        while not row.finished:
            dec.step()
        return row.tokens

    assert sampled(5) == sampled(5)
    assert sampled(5) != sampled(6)


def test_features_and_drawings_in_one_batch_equal_one_by_one(session, tmp_path):
    engine = Engine(session, tmp_path, max_batch=4, feature_cache=0)
    try:
        pics = list(pictures(4))
        together = engine.features(pics)
        for p, f in zip(pics, together):
            alone = engine.features([p])[0]
            torch.testing.assert_close(f, alone, rtol=0, atol=1e-4)
        items = [("a red circle", 7), ("a blue square on a white background", 7), ("a green cross", 9)]
        paths = engine.draw(items)
        for path, item in zip(paths, items):
            (single,) = engine.draw([item])
            a = np.asarray(_png(path), dtype=int)
            b = np.asarray(_png(single), dtype=int)
            assert np.abs(a - b).max() <= 1, item  # the same picture (a rounding step apart at most)
    finally:
        engine.close()


def _png(path):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB").copy()


def run_engine(session, tmp, requests, max_batch):
    """Submit every request at once; the answers, and the most answers the engine decoded together."""
    metrics = ServeMetrics()
    engine = Engine(session, tmp, max_batch=max_batch, feature_cache=0, metrics=metrics)
    sinks = [queue.Queue() for _ in requests]
    try:
        jobs = [engine.submit(r, q.put) for r, q in zip(requests, sinks)]
        results = []
        for job, q in zip(jobs, sinks):
            assert job.finished.wait(300)
            events = []
            while not q.empty():
                events.append(q.get())
            kind, value = events[-1]
            assert kind == "done", events[-1]
            streamed = "".join(v for k, v in events if k == "text")
            assert streamed == value.answer  # the stream adds up to the final answer
            results.append((value.answer, value.completion_tokens, value.finish_reason, len(value.pictures)))
    finally:
        engine.close()
    rows = metrics.registry.get_sample_value("easygen_decode_batch_rows_bucket", {"le": "1.0"})
    count = metrics.registry.get_sample_value("easygen_decode_batch_rows_count")
    return results, count - rows


def test_engine_batch_answers_equal_one_at_a_time(session, tmp_path):
    """Seven requests (pictures, histories, drawings, lengths) with max_batch=4 and max_batch=1: the same
    answers; with 4, most steps decode more than one answer."""
    pics = pictures(3)
    requests = [
        ChatRequest(QUESTIONS[0], image=pics[0], max_new_tokens=12),
        ChatRequest(QUESTIONS[1], max_new_tokens=5),
        ChatRequest(QUESTIONS[2], image=pics[1], history=[("what colour?", "red")], max_new_tokens=20),
        DrawRequest(["a red circle", "a red circle"], seed=3),
        ChatRequest(QUESTIONS[3], image=pics[2], max_new_tokens=16),
        ChatRequest(QUESTIONS[4], history=[("hi", "hello"), ("who?", "me")], max_new_tokens=9),
        ChatRequest(QUESTIONS[2], image=pics[1], max_new_tokens=3, temperature=1.0, seed=11),
    ]
    batched, multi_steps = run_engine(session, tmp_path / "b4", requests, max_batch=4)
    alone, single_steps = run_engine(session, tmp_path / "b1", requests, max_batch=1)
    assert batched == alone
    assert multi_steps > 5 and single_steps == 0
    assert [r[1] for r in batched if r[0]] == [12, 5, 20, 16, 9, 3]


def test_cancel_and_queue_limit(session, tmp_path):
    from easygen.serve.engine import QueueFull

    engine = Engine(session, tmp_path, max_batch=1, max_queue=1, feature_cache=0)
    events = [queue.Queue() for _ in range(3)]
    try:
        first = engine.submit(ChatRequest(QUESTIONS[1], max_new_tokens=200), events[0].put)
        assert events[0].get(timeout=60)[0] == "text"  # decoding: the batch (1) is full
        second = engine.submit(ChatRequest(QUESTIONS[1], max_new_tokens=4), events[1].put)
        with pytest.raises(QueueFull, match="max_queue=1"):
            engine.submit(ChatRequest(QUESTIONS[1]), events[2].put)
        first.cancel()
        assert second.finished.wait(60) and first.finished.wait(60)
        assert engine.stats == {"served": 1, "errors": 0, "cancelled": 1} and engine.pending == 0
    finally:
        engine.close()
    done = threading.Event()
    with pytest.raises(QueueFull, match="shutting down"):
        engine.submit(ChatRequest(QUESTIONS[1]), lambda e: done.set())
