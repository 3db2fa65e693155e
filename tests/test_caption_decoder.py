"""Caption decoder: beam search against diffusers' port of UniDiffuser's ``generate_beam`` and against
exhaustive enumeration; checkpoint loading; the teacher-forced training loss."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers.pipelines.deprecated.unidiffuser.modeling_text_decoder import UniDiffuserTextDecoder
from transformers import GPT2Config, GPT2LMHeadModel

from easygen.bidiffuser.caption_decoder import CaptionDecoder
from easygen.llm.tokenization import build_tokenizer

CORPUS = ["a red circle on a blue background", "two white squares", "a green triangle at the top"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("gpt2", CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def decoder(tokenizer):
    dec = CaptionDecoder.tiny(tokenizer, feature_dim=64, text_dim=16, seed=0).eval()
    with torch.no_grad():
        # peaked distributions (no near-ties) and an <|EOS|> likely enough to stop beams at different steps
        for p in dec.gpt.parameters():
            p.mul_(20)
        wte = dec.gpt.transformer.wte.weight
        wte[dec.eos_token_id] *= 3.0
    return dec


def _reference(dec: CaptionDecoder) -> UniDiffuserTextDecoder:
    cfg = dec.gpt.config
    ref = UniDiffuserTextDecoder(
        prefix_length=16,
        prefix_inner_dim=cfg.n_embd,
        prefix_hidden_dim=dec.text_dim,
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
    ).eval()
    ref.load_state_dict({k.replace("gpt.", "transformer.", 1): v for k, v in dec.state_dict().items()})
    return ref


def test_beam_search_matches_unidiffuser_reference(decoder):
    ref = _reference(decoder)
    y = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0))
    prefix = decoder.decode_prefix(y)
    tokens, lengths, scores = decoder.generate_beam(prefix, beam_size=5, max_length=12)
    assert tokens.shape[:2] == lengths.shape == scores.shape == (4, 5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert len(set(lengths.flatten().tolist())) > 2  # some beams stopped early, some ran to the end
    for b in range(4):
        ref_tokens, ref_lengths = ref.generate_beam(
            input_embeds=prefix[b : b + 1], eos_token_id=decoder.eos_token_id, beam_size=5, entry_length=12
        )
        assert lengths[b].tolist() == ref_lengths.tolist()
        for k in range(5):
            assert tokens[b, k, : lengths[b, k]].tolist() == ref_tokens[k, : ref_lengths[k]].tolist()


def _full_log_probs(dec: CaptionDecoder, prefix: torch.Tensor, seq: list[int]) -> torch.Tensor:
    """log p(seq[j] | prefix, seq[:j]) by recomputing the whole sequence (no cache)."""
    embeds = torch.cat([prefix, dec.gpt.transformer.wte(torch.tensor([seq]))], dim=1) if seq else prefix
    logits = dec.gpt(inputs_embeds=embeds).logits[0, prefix.shape[1] - 1 :]
    logp = logits.float().softmax(-1).log()
    return logp[torch.arange(len(seq)), torch.tensor(seq)] if seq else logp[:0, 0]


def test_cached_scores_equal_full_recomputation(decoder):
    y = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    prefix = decoder.decode_prefix(y)
    tokens, lengths, scores = decoder.generate_beam(prefix, beam_size=4, max_length=12)
    with torch.no_grad():
        for b in range(2):
            for k in range(4):
                seq = tokens[b, k, : lengths[b, k]].tolist()
                full = _full_log_probs(decoder, prefix[b : b + 1], seq)
                torch.testing.assert_close(scores[b, k], full.sum() / len(seq), rtol=1e-5, atol=1e-5)


def _tiny_vocab_decoder(vocab: int, seed: int) -> CaptionDecoder:
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        initializer_range=0.7,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return CaptionDecoder(GPT2LMHeadModel(config), tokenizer=None, text_dim=4).eval()


def _brute_force(dec, prefix, vocab, eos, max_length):
    """Every hypothesis the reference can end with (...EOS within max_length, or max_length tokens without
    EOS), scored by full recomputation; best first."""
    out = []
    others = [t for t in range(vocab) if t != eos]
    with torch.no_grad():
        for n in range(1, max_length + 1):
            seqs = [
                [*body, last]
                for body in itertools.product(others, repeat=n - 1)
                for last in ([eos, *others] if n == max_length else [eos])
            ]
            ids = torch.tensor(seqs)
            embeds = torch.cat([prefix.expand(len(seqs), -1, -1), dec.gpt.transformer.wte(ids)], dim=1)
            logp = dec.gpt(inputs_embeds=embeds).logits[:, prefix.shape[1] - 1 : -1].float().softmax(-1).log()
            total = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1).sum(-1)
            out += [(float(t) / n, seq) for t, seq in zip(total, seqs)]
    return sorted(out, key=lambda s: -s[0])


@pytest.mark.parametrize(
    ("vocab", "max_length", "beam"),
    [
        (5, 2, 5),
        (5, 3, 85),
        (4, 4, 40),
    ],  # beam = vocab is exact for 2 steps; wider beams hold every hypothesis
)
@pytest.mark.parametrize("seed", [0, 1])
def test_beam_search_is_exhaustive_when_wide_enough(vocab, max_length, beam, seed):
    dec = _tiny_vocab_decoder(vocab, seed)
    eos = vocab - 1
    prefix = dec.decode_prefix(torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(seed)))
    ranking = _brute_force(dec, prefix, vocab, eos, max_length)
    tokens, lengths, scores = dec.generate_beam(
        prefix, beam_size=beam, max_length=max_length, eos_token_id=eos
    )
    best = tokens[0, 0, : lengths[0, 0]].tolist()
    assert best == ranking[0][1]
    assert scores[0, 0].item() == pytest.approx(ranking[0][0], abs=1e-5)
    if beam >= len(ranking):
        found = {
            tuple(tokens[0, k, : lengths[0, k]].tolist()): float(s)
            for k, s in enumerate(scores[0])
            if torch.isfinite(s)
        }
        assert set(found) == {tuple(q) for _, q in ranking}
        for score, seq in ranking:
            assert found[tuple(seq)] == pytest.approx(score, abs=1e-5)


def test_load_unidiffuser_checkpoint(decoder, tokenizer, tmp_path):
    sd = {f"module.{k}": v.clone() for k, v in decoder.state_dict().items()}
    sd["module.gpt.transformer.h.0.attn.bias"] = torch.ones(1, 1, 8, 8)  # old transformers' causal buffer
    sd["module.clip_projection.weight"] = torch.zeros(3, 3)  # not part of the decoder: ignored
    torch.save(sd, tmp_path / "caption_decoder.pth")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    loaded = CaptionDecoder.load(tmp_path / "caption_decoder.pth", tmp_path / "gpt2", n_head=2)
    assert not any(p.requires_grad for p in loaded.parameters())
    y = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert loaded.generate_captions(y, max_length=10) == decoder.generate_captions(y, max_length=10)
    torch.testing.assert_close(
        loaded.encode_prefix(decoder.decode_prefix(y)), decoder.encode_prefix(decoder.decode_prefix(y))
    )

    wrong_vocab = build_tokenizer("gpt2", CORPUS, vocab_size=280)
    wrong_vocab.save_pretrained(tmp_path / "gpt2-other")
    with pytest.raises(ValueError, match="vocabulary"):
        CaptionDecoder.load(tmp_path / "caption_decoder.pth", tmp_path / "gpt2-other", n_head=2)
    del sd["module.gpt.transformer.h.1.mlp.c_fc.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(
        ValueError, match=r"broken\.pth.*missing \['gpt\.transformer\.h\.1\.mlp\.c_fc\.weight'\]"
    ):
        CaptionDecoder.load(tmp_path / "broken.pth", tmp_path / "gpt2", n_head=2)


def test_training_loss_teaches_captions(tokenizer):
    dec = CaptionDecoder.tiny(tokenizer, feature_dim=64, text_dim=16, seed=1).train()
    captions = ["a red circle", "two white squares"]
    eos = dec.eos_token_id
    ids = [tokenizer(c)["input_ids"] + [eos] for c in captions]
    T = max(map(len, ids))
    tokens = torch.tensor([s + [0] * (T - len(s)) for s in ids])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in ids])
    features = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))

    # padded positions and the prefix do not count: changing a padded token leaves the loss unchanged
    other = tokens.clone()
    other[mask == 0] = 7
    with torch.no_grad():
        torch.testing.assert_close(dec(tokens, features, mask), dec(other, features, mask))

    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = dec(tokens, features, mask)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    dec.eval()
    with torch.no_grad():
        y = dec.encode_prefix(features)
    assert dec.generate_captions(y, max_length=12) == captions
