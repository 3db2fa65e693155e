"""Tokenizers built locally, for the tiny presets (nothing is downloaded).

A byte-level BPE is trained on a small corpus (the synthetic captions, the prompt templates and a
base vocabulary of common English words) and wrapped as a transformers ``PreTrainedTokenizerFast``
with the special tokens of the family it stands in for:

- ``"llama"``: ``<unk>``, ``<s>`` (bos), ``</s>`` (eos), pad = unk, as Llama/Vicuna;
- ``"gpt2"``: ``<|endoftext|>`` (bos = eos = unk) plus ``<|EOS|>`` as UniDiffuser's caption decoder adds;
- ``"clip"``: ``<|startoftext|>``, ``<|endoftext|>`` (pad = eos), fixed length padding as CLIP uses.

Byte-level BPE never maps text to ``<unk>``: any string round-trips, so a user's question in the
chat stage tokenises even when its words were not in the corpus.

The tiny FlanT5 stand-in (``"t5"``, ``build_t5_tokenizer``) is not a BPE but what T5 really uses: a
sentencepiece unigram model (``spiece.model``) trained locally with T5's special ids (``<pad>`` = 0,
``</s>`` = 1, ``<unk>`` = 2, no BOS), wrapped as ``transformers.T5TokenizerFast`` with the sentinel
tokens ``<extra_id_0..N-1>`` after the pieces (``<extra_id_0>`` has the highest id), as the released
T5/FlanT5 tokenizers are (T5: Raffel et al. 2020, JMLR; the sentinels of span corruption, §3.1.4).

``LlamaSentencePieceTokenizer`` is Llama's tokenizer as the paper's code loads it (``use_fast=False``, the
legacy behaviour): ``[BOS] + sentencepiece.encode(text)`` straight from ``tokenizer.model``, text split
only at special tokens. transformers' own Llama tokenizer is a converted fast one; the released EasyGen
was trained on the slow one's ids, so the imported model uses this class
(``easygen.factories.sentencepiece_tokenizer``).
"""

from __future__ import annotations

import hashlib
import io
import json
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, T5TokenizerFast
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

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
    if kind == "t5":
        return build_t5_tokenizer(
            corpus, vocab_size=vocab_size, model_max_length=model_max_length, cache_dir=cache_dir
        )
    if kind not in SPECIALS:
        raise ValueError(f"tokenizer kind must be one of {sorted([*SPECIALS, 't5'])}, got {kind!r}")
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


# T5's sentencepiece layout: pad, eos, unk first; no BOS (the decoder starts from the pad id).
T5_SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
# Every letter, digit and punctuation mark once, so a user's question does not fall to <unk>
# character by character (characters outside the corpus still do, as with the released T5 vocabulary).
T5_ALPHABET = " ".join(string.ascii_letters + string.digits + string.punctuation)


def train_t5_spiece(corpus: Iterable[str], vocab_size: int) -> bytes:
    """A sentencepiece unigram model (the serialised ``spiece.model``) with T5's settings.

    ``vocab_size`` is an upper bound: a small corpus supports only so many unigram pieces, and the
    trainer stops there (``hard_vocab_limit=False``). One thread, no sampling: the same corpus gives
    the same model.
    """
    import sentencepiece as spm

    sentences = [line for line in corpus if line.strip()]
    if not sentences:
        raise ValueError("train_t5_spiece: the corpus has no non-empty line")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece=T5_SPECIALS["pad_token"],
        eos_piece=T5_SPECIALS["eos_token"],
        unk_piece=T5_SPECIALS["unk_token"],
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buf.getvalue()


def build_t5_tokenizer(
    corpus: Iterable[str] = (),
    vocab_size: int = 512,
    extra_ids: int = 100,
    model_max_length: int = 512,
    cache_dir: str | Path | None = None,
):
    """Train (or load from ``cache_dir``) a T5 tokenizer: sentencepiece unigram + ``extra_ids`` sentinels.

    ``vocab_size`` bounds the whole vocabulary, sentinels included (the unigram model gets at most
    ``vocab_size - extra_ids`` pieces); ``len(tokenizer)`` is the exact size a model's embedding needs.
    The folder written to ``cache_dir`` holds ``spiece.model`` too, so ``T5Tokenizer.from_pretrained``
    and ``sentencepiece.SentencePieceProcessor`` can both read it.
    """
    budget = int(vocab_size) - int(extra_ids)
    if extra_ids < 0 or budget < 16:
        raise ValueError(
            f"T5 tokenizer: vocab_size={vocab_size} (model.llm.vocab_size) leaves {budget} sentencepiece "
            f"pieces after {extra_ids} extra ids; raise model.llm.vocab_size"
        )
    corpus = list(corpus) + [" ".join(BASE_WORDS), T5_ALPHABET] + BASE_WORDS
    spec = json.dumps(["t5", vocab_size, extra_ids, sorted(set(corpus))])
    key = hashlib.sha1(spec.encode()).hexdigest()[:12]
    target = Path(cache_dir) / f"t5-{key}" if cache_dir is not None else None
    kwargs = {"extra_ids": extra_ids, "model_max_length": model_max_length, **T5_SPECIALS}
    if target is not None and (target / "tokenizer.json").exists() and (target / "spiece.model").exists():
        return T5TokenizerFast.from_pretrained(str(target), local_files_only=True)
    try:
        model = train_t5_spiece(corpus, budget)
    except RuntimeError as e:  # e.g. a budget below the number of distinct characters
        raise ValueError(
            f"T5 tokenizer: sentencepiece could not train {budget} pieces (model.llm.vocab_size={vocab_size} "
            f"minus {extra_ids} extra ids): {e}"
        ) from e
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(model)
        # Converted from spiece.model by transformers itself (its T5 converter), as a released
        # T5 checkpoint without tokenizer.json would be.
        tok = T5TokenizerFast.from_pretrained(tmp, local_files_only=True, **kwargs)
        tok.vocab_file = None  # the temporary folder goes away
        if target is not None:
            target.mkdir(parents=True, exist_ok=True)
            tok.save_pretrained(str(target))
            (target / "spiece.model").write_bytes(model)
            tok.vocab_file = str(target / "spiece.model")
    return tok


class LlamaSentencePieceTokenizer(SentencePieceBackend):
    """Llama's slow (legacy) tokenizer: ``[BOS] + sentencepiece.encode(text)``; pad = unk unless given.

    Text is split at special tokens (``</s>`` in a string is the end-of-sequence id, as in the slow
    tokenizer); each piece is ``sentencepiece.encode``d with its dummy prefix. Decoding is sentencepiece's
    own (byte-fallback pieces become their characters)."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token=None,
                 **kwargs):
        for key in ("legacy", "special_tokens_pattern", "tokenizer_class", "use_default_system_prompt",
                    "add_prefix_space", "spaces_between_special_tokens"):
            kwargs.pop(key, None)
        add_bos = kwargs.pop("add_bos_token", True)
        add_eos = kwargs.pop("add_eos_token", False)
        if not add_bos or add_eos:
            raise ValueError(
                f"{vocab_file}: add_bos_token={add_bos}, add_eos_token={add_eos}; Llama's tokenizer adds BOS only"
            )
        super().__init__(vocab_file=str(vocab_file), unk_token=unk_token, bos_token=bos_token,
                         eos_token=eos_token, pad_token=pad_token if pad_token is not None else unk_token,
                         legacy=True, special_tokens_pattern="bos", **kwargs)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(list(tokens))


def load_llama_sentencepiece(folder: str | Path, model_max_length: int | None = None):
    """``LlamaSentencePieceTokenizer`` from a folder holding Llama's ``tokenizer.model`` (and optionally its
    ``tokenizer_config.json`` / ``special_tokens_map.json`` naming the special tokens)."""
    folder = Path(folder)
    model = folder / "tokenizer.model"
    if not model.is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.model (Llama's sentencepiece model)")
    specials = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if f.is_file():
            data = json.loads(f.read_text())
            for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                value = data.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if value and key not in specials:
                    specials[key] = value
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return LlamaSentencePieceTokenizer(model, **specials, **kwargs)
