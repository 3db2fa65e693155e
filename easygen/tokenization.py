"""Tokenizers built locally, for the tiny presets (nothing is downloaded).

A byte-level BPE is trained on a small corpus (the synthetic captions, the prompt templates and a
base vocabulary of common English words) and wrapped as a transformers ``PreTrainedTokenizerFast``
with the special tokens of the family it stands in for:

- ``"llama"``: ``<unk>``, ``<s>`` (bos), ``</s>`` (eos), pad = unk, as Llama/Vicuna;
- ``"gpt2"``: ``<|endoftext|>`` (bos = eos = unk) plus ``<|EOS|>`` as UniDiffuser's caption decoder adds;
- ``"clip"``: ``<|startoftext|>``, ``<|endoftext|>`` (pad = eos), fixed length padding as CLIP uses.

Byte-level BPE never maps text to ``<unk>``: any string round-trips, so a user's question in the
chat stage tokenises even when its words were not in the corpus.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

BASE_WORDS = (
    "a an the of in on at to with and or is are was were be this that these those there here it its "
    "what which who where when how why image picture photo photograph describe description briefly "
    "concisely short caption answer question please giving give provide write summary scene shown "
    "visual content depicted present look see can you tell me about for from by as into over under "
    "left right top bottom middle center small large big little one two three four five many some "
    "red green blue yellow white black orange purple pink gray brown color colour shape circle "
    "square triangle cross stripe stripes background foreground object objects man woman dog cat "
    "yes no not user assistant system human gpt draw generate show make create new"
).split()

SPECIALS = {
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"},
    "gpt2": {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    },
    "clip": {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    },
}


def _train(corpus: list[str], kind: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(dict.fromkeys(SPECIALS[kind].values()))
    if kind == "gpt2":
        specials.append("<|EOS|>")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if kind == "llama":
        bos = SPECIALS["llama"]["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    elif kind == "clip":
        bos, eos = SPECIALS["clip"]["bos_token"], SPECIALS["clip"]["eos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            pair=f"{bos} $A {eos} $B {eos}",
            special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_tokenizer(
    kind: str = "llama",
    corpus: Iterable[str] = (),
    vocab_size: int = 512,
    model_max_length: int = 512,
    cache_dir: str | Path | None = None,
):
    """Train (or load from ``cache_dir``) a byte-level BPE tokenizer of the given family."""
    from transformers import PreTrainedTokenizerFast

    if kind not in SPECIALS:
        raise ValueError(f"tokenizer kind must be one of {sorted(SPECIALS)}, got {kind!r}")
    corpus = list(corpus) + [" ".join(BASE_WORDS)] + BASE_WORDS
    key = hashlib.sha1(json.dumps([kind, vocab_size, sorted(set(corpus))]).encode()).hexdigest()[:12]
    target = Path(cache_dir) / f"{kind}-{key}" if cache_dir is not None else None
    if target is not None and (target / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(target), local_files_only=True)
    raw = _train(corpus, kind, vocab_size)
    extra = {"additional_special_tokens": ["<|EOS|>"]} if kind == "gpt2" else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, model_max_length=model_max_length, **SPECIALS[kind], **extra
    )
    if kind == "clip":
        tok.padding_side = "right"
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(target))
    return tok
