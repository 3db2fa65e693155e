"""The models a stage builds, one factory per preset, named by `_target_` in `conf/model/*.yaml`
(`model.llm.tokenizer`, `model.llm.net`) and instantiated by the LightningModules: tiny random presets
built locally, real weights from local paths, real shapes with random weights. A missing path fails
naming its config key. Plain PyTorch/transformers: no Lightning, no Hydra."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from data_modules.synthetic import caption_corpus, dialogue_corpus
from easygen.bidiffuser import BiDiffuser
from easygen.checkpoint import load_state_dict_file, record_load
from easygen.errors import ConfigError
from easygen.llm.loading import build_tiny_llm, llama_7b_config, load_checked, load_llm
from easygen.llm.projector import Projector
from easygen.llm.templates import CAPTION_PROMPTS, IMG_CLOSE, IMG_OPEN, VQA_SUFFIX
from easygen.llm.tokenization import build_tokenizer, load_llama_sentencepiece

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# encoder-decoder presets: EasyGen's FlanT5 "Mid-Align" variant (paper §3.4)
T5_PRESETS = ("t5", "tiny-t5")


def is_t5(cfg: dict) -> bool:
    return cfg["model"]["llm"]["preset"] in T5_PRESETS


def require_path(value, key: str) -> str:
    if value in (None, "", "???"):
        raise ConfigError(f"{key} is required: set {key}=/path/to/...")
    if not Path(str(value)).exists():
        raise ConfigError(f"{key}={value} does not exist: set {key} to a local path")
    return str(value)


def tiny_caption_corpus() -> list[str]:
    """Text the tiny BiDiffuser's tokenizers are trained on (its text side reads captions only, and the
    `<Img>` descriptions the LLM writes are captions): every synthetic caption and the prompt templates."""
    return [*CAPTION_PROMPTS, VQA_SUFFIX, f"USER: {IMG_OPEN} {IMG_CLOSE} ASSISTANT:", *caption_corpus()]


def tiny_corpus() -> list[str]:
    """Text the tiny LLM tokenizers are trained on: `tiny_caption_corpus()` and the synthetic set's dialogue
    phrasings (draw requests, attribute questions and their answers, data_modules/synthetic.py)."""
    return [*tiny_caption_corpus(), *dialogue_corpus()]


# ----------------------------------------------------------------------------------------------------
# tokenizers (`model.llm.tokenizer`)


def tiny_tokenizer(kind: str = "llama", vocab_size: int = 512, model_max_length: int = 512,
                   cache_dir: str | None = None):
    """A tokenizer trained locally on `tiny_corpus()`: byte-level BPE with Llama's special tokens, or
    (kind `t5`) a sentencepiece unigram T5 tokenizer (pad 0 starts the decoder, </s> = 1, no BOS)."""
    return build_tokenizer(kind, tiny_corpus(), vocab_size=vocab_size, model_max_length=model_max_length,
                           cache_dir=cache_dir)


def pretrained_tokenizer(path: str | None, trust_remote_code: bool = False):
    """The tokenizer of a local transformers folder (`model.llm.path`); pad falls back to unk, then eos."""
    path = require_path(path, "model.llm.path")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def sentencepiece_tokenizer(path: str | None, model_max_length: int | None = None):
    """Llama's slow sentencepiece tokenizer from a local folder's `tokenizer.model` (`model.llm.path`): the
    ids the released EasyGen was trained with (easygen/llm/tokenization.py); pad = unk."""
    path = require_path(path, "model.llm.path")
    try:
        return load_llama_sentencepiece(path, model_max_length=model_max_length)
    except FileNotFoundError as e:
        raise ConfigError(f"model.llm.path: {e}") from None


# ----------------------------------------------------------------------------------------------------
# LLMs (`model.llm.net`); each takes the tokenizer the module built first


def tiny_llama(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0,
               weights: str | None = None):
    """A Llama matched to the tiny tokenizer (the embedded default): random from `seed`, or with the trained
    weights of `weights` (`model.llm.weights`: the shipped file easygen/assets/tiny/llm.safetensors by default)."""
    model = build_tiny_llm(tokenizer, hidden_size=hidden_size, layers=num_layers, heads=num_heads, seed=seed)
    if weights:
        load_tiny_llm(model, tokenizer, require_path(weights, "model.llm.weights"))
    return model


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id): weights trained with one tokenizer read another's ids wrongly,
    even when the vocabulary sizes agree (the tiny tokenizer is trained on `tiny_corpus()`)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return hashlib.sha256(vocab.encode()).hexdigest()


def load_tiny_llm(model, tokenizer, path: str) -> None:
    """Load a tiny LLM's weights (a state dict of the transformers model, any float dtype) written by
    `python -m easygen.stages.tiny_weights`: every tensor present with its shape, and the tokenizer the same."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    theirs = meta.get("tokenizer_sha256")
    if theirs and theirs != tokenizer_fingerprint(tokenizer):
        raise ConfigError(
            f"model.llm.weights={path} was trained with another tokenizer than this tiny tokenizer (its corpus "
            "changed): rewrite it with `python -m easygen.stages.tiny_weights`, or set model.llm.weights=null"
        )
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        raise ConfigError(
            f"model.llm.weights={path} does not fit the tiny LLM (model.llm.hidden_size/num_layers/num_heads): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, shapes differ for {bad[:3]}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})
    record_load(model, "model.llm.weights", path, len(sd))


def t5_config(tokenizer=None, hidden_size: int = 2048, num_layers: int = 24, num_heads: int = 32,
              d_ff: int | None = None, vocab_size: int = 32128) -> T5Config:
    """A gated-GELU T5 (FlanT5's architecture); the defaults are FlanT5-XL's shape."""
    kwargs = {}
    if tokenizer is not None:
        kwargs = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5Config(**{"vocab_size": vocab_size, **kwargs}, d_model=hidden_size, d_ff=d_ff or 4 * hidden_size,
                    d_kv=hidden_size // num_heads, num_layers=num_layers, num_heads=num_heads,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False)


def tiny_t5(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0,
            weights: str | None = None):
    """A random T5 matched to the tiny T5 tokenizer (the FlanT5 Mid-Align path on CPU)."""
    if weights:
        raise ConfigError("model.llm.weights: no trained tiny T5 ships; set model.llm.weights=null")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(t5_config(tokenizer, hidden_size, num_layers, num_heads)).eval()


def pretrained_t5(tokenizer, path: str | None, dtype: str | None = None, trust_remote_code: bool = False):
    """FlanT5 from a local transformers folder (`model.llm.path`)."""
    path = require_path(path, "model.llm.path")
    if not (Path(path) / "config.json").exists():
        raise ConfigError(f"model.llm.path={path} has no config.json: point it at a transformers FlanT5 folder")
    return load_checked(path, auto_class=AutoModelForSeq2SeqLM, dtype=DTYPES.get(str(dtype)),
                        trust_remote_code=trust_remote_code)


def pretrained_llm(tokenizer, path: str | None, dtype: str | None = None, trust_remote_code: bool = False):
    """A decoder-only LLM (Vicuna-7B in the paper) from a local transformers folder (`model.llm.path`)."""
    model, _ = load_llm(require_path(path, "model.llm.path"), dtype=DTYPES.get(str(dtype)),
                        trust_remote_code=trust_remote_code)
    return model


def llama_7b_random(tokenizer, vocab_size: int = 32000, hidden_size: int = 4096, dtype: str = "float32",
                    device: str | torch.device | None = None):
    """Llama-7B's shape with random weights, built directly on `device` (default: the GPU when there is
    one) in its dtype: 6.7B fp32 parameters on the host first would cost 27 GB. `device="meta"` gives
    the shapes without memory."""
    config = llama_7b_config(vocab_size=vocab_size, hidden_size=hidden_size)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES.get(str(dtype), torch.float32))
    try:
        with torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


# ----------------------------------------------------------------------------------------------------
# the projector and BiDiffuser (`model.projector`, `model.bidiffuser`)


def build_projector(cfg: dict) -> Projector:
    p = cfg["model"]["projector"]
    tokens = int(cfg["model"]["num_image_tokens"]) if p.get("standardize") else 0
    return Projector(int(p["in_dim"]), int(p["hidden_dim"]), int(p["out_dim"]), standardize_tokens=tokens)


def build_bidiffuser(cfg: dict, device: str | torch.device | None = None):
    """The assembled BiDiffuser pipeline for `model.bidiffuser`; `weights` (a previous stage's export)
    replaces every part's weights when set."""
    b = cfg["model"]["bidiffuser"]
    sampler = dict(b.get("sampler") or {})
    sample_seed = int(sampler.pop("seed", 1234))  # the sampler's seed; `seed` below builds tiny weights
    preset = b["preset"]
    if preset == "tiny":
        pipe = BiDiffuser.tiny(
            tiny_caption_corpus(), seed=int(cfg.get("seed", 0)), image_size=int(cfg["model"]["image_size"]), **sampler
        )
    elif preset == "v1-random":
        pipe = BiDiffuser.random_v1(**sampler)
    elif preset == "v1":
        keys = ("uvit", "autoencoder", "clip_image", "clip_text", "caption_decoder", "gpt2_tokenizer")
        paths = {k: require_path(b.get(k), f"model.bidiffuser.{k}") for k in keys}
        pipe = BiDiffuser.from_paths(**paths, uvit_config=dict(b.get("uvit_config") or {}), **sampler)
    else:
        raise ConfigError(f"model.bidiffuser.preset={preset!r}: choose tiny|v1|v1-random")
    pipe.seed = sample_seed
    if b.get("weights"):
        sd = load_state_dict_file(require_path(b["weights"], "model.bidiffuser.weights"))
        missing, unexpected = pipe.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if not k.startswith(("vae.", "clip_image.", "clip_text."))]:
            raise ConfigError(
                f"model.bidiffuser.weights={b['weights']} does not fit the {preset} preset: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        record_load(pipe, "model.bidiffuser.weights", b["weights"], len(sd))
    for p in pipe.parameters():
        p.requires_grad_(False)
    return pipe.eval() if device is None else pipe.eval().to(device)
