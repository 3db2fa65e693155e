"""EasyGen model: the splice, equivalence with the plain transformers LLM, generation, and FlanT5 Mid-Align."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from easygen.llm.collate import EasyGenCollator
from easygen.llm.loading import build_tiny_llm, llama_7b_config, load_llm
from easygen.llm.model import EasyGen
from easygen.llm.projector import Projector
from easygen.llm.tokenization import build_tokenizer

N_IMG, FEAT = 5, 16


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("llama", ["a dog on the sofa", "two cats on a red table"], vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    llm = build_tiny_llm(tok, hidden_size=32, layers=2, heads=4, seed=0)
    return EasyGen(llm, Projector(FEAT, 64, 32), tokenizer=tok).eval()


def _samples(seed=0):
    g = np.random.default_rng(seed)
    return [
        {
            "id": "c0",
            "kind": "caption",
            "captions": ["a dog on the sofa"],
            "features": g.standard_normal((N_IMG, FEAT)),
        },
        {
            "id": "t0",
            "kind": "conversation",
            "conversations": [
                {"from": "human", "value": "show me two cats please"},
                {"from": "gpt", "value": "two cats"},
            ],
        },
        {
            "id": "v0",
            "kind": "vqa",
            "question": "what is on the table?",
            "answers": ["cats"],
            "features": g.standard_normal((N_IMG, FEAT)),
        },
    ]


def _manual_embeds(model, batch):
    """Embeddings built by hand, row by row: the reference for the vectorised splice."""
    emb = model.llm.get_input_embeddings()(batch["input_ids"]).clone()
    j = 0
    for b in range(emb.shape[0]):
        if batch["has_image"][b]:
            p = batch["image_positions"][b].item()
            emb[b, p : p + N_IMG] = model.projector(batch["features"][j])
            j += 1
    return emb


def test_text_only_logits_equal_plain_llm(model, tok):
    enc = tok(["<s>USER: a dog on the sofa ASSISTANT:"], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        ours = model(enc["input_ids"], enc["attention_mask"]).logits
        ref = model.llm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert torch.equal(ours, ref)


def test_spliced_logits_and_loss_equal_manual_inputs_embeds(model):
    batch = EasyGenCollator(model.tokenizer, num_image_tokens=N_IMG)(_samples())
    assert batch["has_image"].tolist() == [True, False, True]
    out = model(
        **{
            k: batch[k]
            for k in ("input_ids", "attention_mask", "labels", "features", "image_positions", "has_image")
        }
    )
    with torch.no_grad():
        emb = _manual_embeds(model, batch)
        ref = model.llm(inputs_embeds=emb, attention_mask=batch["attention_mask"], labels=batch["labels"])
    real = batch["attention_mask"].bool()  # padded columns differ only by their (unused) position ids
    torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)
    # Each padded row gives the logits of the same row run alone.
    for b in range(3):
        n = int(batch["attention_mask"][b].sum())
        with torch.no_grad():
            alone = model.llm(inputs_embeds=emb[b : b + 1, :n]).logits
        torch.testing.assert_close(out.logits[b : b + 1, :n], alone, rtol=0, atol=1e-5)


def test_left_padding_positions_match_unpadded(model):
    collator = EasyGenCollator(model.tokenizer, num_image_tokens=N_IMG)
    collator.eval_mode = True
    batch = collator(_samples())
    with torch.no_grad():
        out = model(
            **{
                k: batch[k]
                for k in ("input_ids", "attention_mask", "features", "image_positions", "has_image")
            }
        )
        emb = _manual_embeds(model, batch)
        for b in range(3):
            n = int(batch["attention_mask"][b].sum())
            alone = model.llm(inputs_embeds=emb[b : b + 1, -n:]).logits
            torch.testing.assert_close(out.logits[b : b + 1, -n:], alone, rtol=0, atol=1e-5)


def test_frozen_llm_trains_projector_only(model):
    model.freeze_llm()
    model.zero_grad()
    batch = EasyGenCollator(model.tokenizer, num_image_tokens=N_IMG)(_samples())
    model(
        **{
            k: batch[k]
            for k in ("input_ids", "attention_mask", "labels", "features", "image_positions", "has_image")
        }
    ).loss.backward()
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    groups = model.trainable_parameter_groups(lr=2e-5, projector_lr=1e-4)
    assert [g["name"] for g in groups] == ["projector"] and groups[0]["lr"] == 1e-4
    model.freeze_llm(train_lm_head=True)
    names = [g["name"] for g in model.trainable_parameter_groups(lr=2e-5)]
    assert names == ["projector", "llm"]
    n_head = model.llm.lm_head.weight.numel()
    frozen = model.flops_per_token(seq_len=100)
    for p in model.llm.parameters():
        p.requires_grad_(True)
    assert model.flops_per_token(seq_len=100) - frozen == pytest.approx(
        2 * (sum(m.weight.numel() for m in model.llm.modules() if isinstance(m, torch.nn.Linear)) - n_head)
    )
    model.zero_grad()


def test_flops_of_llama_7b_shape():
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        llm = LlamaForCausalLM(llama_7b_config())
    m = EasyGen(llm, Projector(768, 3072, 4096))
    n = 6.74e9 - 32000 * 4096  # matmul weights: all but the input embedding
    assert m.flops_per_token(seq_len=0, training=False) == pytest.approx(2 * n, rel=1e-3)


def _manual_greedy(model, emb, mask, steps, eos):
    """Greedy decoding without a KV cache: rerun the whole sequence every step."""
    emb, mask = emb.clone(), mask.clone()
    out = torch.full((emb.shape[0], steps), model.tokenizer.pad_token_id, dtype=torch.long)
    done = torch.zeros(emb.shape[0], dtype=torch.bool)
    for s in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False).logits[
            :, -1
        ]
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, model.tokenizer.pad_token_id), nxt)
        out[:, s] = nxt
        done |= nxt == eos
        emb = torch.cat([emb, model.llm.get_input_embeddings()(nxt)[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if done.all():
            return out[:, : s + 1]
    return out


def test_greedy_generate_equals_manual_loop_and_stop_strings_cut(model):
    collator = EasyGenCollator(model.tokenizer, num_image_tokens=N_IMG)
    collator.eval_mode = True
    batch = collator(_samples())
    keys = ("input_ids", "attention_mask", "features", "image_positions", "has_image")
    texts, ids = model.generate(**{k: batch[k] for k in keys}, max_new_tokens=12, return_ids=True)
    with torch.no_grad():
        ref = _manual_greedy(
            model, _manual_embeds(model, batch), batch["attention_mask"], 12, model.tokenizer.eos_token_id
        )
    assert torch.equal(ids[:, : ref.shape[1]], ref)
    assert texts == [t.strip() for t in model.tokenizer.batch_decode(ref, skip_special_tokens=True)]
    # Stop at a string that occurs inside the first answer: the text is cut before it.
    first = texts[0]
    assert len(first) > 4
    stop = first[len(first) // 2 : len(first) // 2 + 2]
    cut = model.generate(**{k: batch[k] for k in keys}, max_new_tokens=12, stop_strings=[stop])
    assert cut[0] == first[: first.find(stop)].strip()
    assert stop not in cut[0]


def test_load_llm_from_local_folder(tmp_path, model, tok):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_llm(tmp_path / "nowhere")
    model.llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    llm, tok2 = load_llm(tmp_path / "llm")
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        assert torch.equal(llm(ids).logits, model.llm(ids).logits)
    assert tok2("a dog")["input_ids"] == tok("a dog")["input_ids"]


def test_t5_mid_align():
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutput

    from easygen.llm.t5 import EasyGenT5

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    t5 = T5ForConditionalGeneration(cfg).eval()
    m = EasyGenT5(t5, Projector(FEAT, 64, 32), align_weight=0.5)
    ids = torch.randint(2, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.randint(2, 64, (2, 4))
    cap = torch.randint(2, 64, (2, 6))
    cap_mask = torch.ones_like(cap)
    cap_mask[0, 4:] = 0
    feats = torch.randn(2, N_IMG, FEAT)
    out = m(ids, mask, labels=labels, features=feats, caption_input_ids=cap, caption_attention_mask=cap_mask)
    with torch.no_grad():
        proj = m.projector(feats)
        enc = t5.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = t5(
            encoder_outputs=BaseModelOutput(last_hidden_state=torch.cat([proj, enc], 1)),
            attention_mask=torch.cat([torch.ones(2, N_IMG, dtype=mask.dtype), mask], 1),
            labels=labels,
        )
        cap_states = t5.encoder(input_ids=cap, attention_mask=cap_mask).last_hidden_state
        target = torch.stack([cap_states[0, :4].mean(0), cap_states[1].mean(0)])
        mse = ((proj.mean(1) - target) ** 2).mean()
    torch.testing.assert_close(out.lm_loss, ref.loss)
    torch.testing.assert_close(out.align_loss, mse)
    torch.testing.assert_close(out.loss, ref.loss + 0.5 * mse)
    out.loss.backward()
    assert all(p.grad is None for p in t5.encoder.parameters())
    assert all(p.grad is not None for p in m.projector.parameters())
    gen = m.generate(ids, mask, features=feats, max_new_tokens=3)
    assert gen.shape[0] == 2


def test_other_decoder_only_llm_and_on_the_fly_images(tok):
    """Any causal LM works (GPT-2 here); samples carrying raw images are batched for on-the-fly features."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256)
    ).eval()
    model = EasyGen(gpt2, Projector(FEAT, 64, 32), tokenizer=tok).eval()
    batch = EasyGenCollator(tok, num_image_tokens=N_IMG)(_samples())
    keys = ("input_ids", "attention_mask", "labels", "features", "image_positions", "has_image")
    with torch.no_grad():
        out = model(**{k: batch[k] for k in keys})
        emb = _manual_embeds(model, batch)
        for b in range(3):
            n = int(batch["attention_mask"][b].sum())
            alone = gpt2(inputs_embeds=emb[b : b + 1, :n]).logits
            torch.testing.assert_close(out.logits[b : b + 1, :n], alone, rtol=0, atol=1e-5)

    samples = [
        dict(s, features=None, image=torch.full((3, 8, 8), float(i))) for i, s in enumerate(_samples())
    ]
    samples[1]["image"] = None
    images = EasyGenCollator(tok, num_image_tokens=N_IMG)(samples)
    assert images["features"] is None and images["images"].shape == (2, 3, 8, 8)
    assert images["images"][1, 0, 0, 0].item() == 2.0  # the rows of the samples that have images, in order
    assert images["has_image"].tolist() == [True, False, True]
