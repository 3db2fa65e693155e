"""Build the models a stage needs from the `model` config: tokenizers, the LLM, the projector and the
BiDiffuser pipeline (tiny random presets, real weights from local paths, or real shapes with random
weights). A missing path fails naming its config key."""

from __future__ import annotations

from pathlib import Path

import torch

from easygen.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# encoder-decoder presets: EasyGen's FlanT5 "Mid-Align" variant (SPEC §4)
T5_PRESETS = ("t5", "tiny-t5")


def is_t5(cfg: dict) -> bool:
    return cfg["model"]["llm"]["preset"] in T5_PRESETS


def require_path(value, key: str) -> str:
    if value in (None, "", "???"):
        raise ConfigError(f"{key} is required: set {key}=/path/to/...")
    if not Path(str(value)).exists():
        raise ConfigError(f"{key}={value} does not exist: set {key} to a local path")
    return str(value)


def tiny_corpus() -> list[str]:
    """Text the tiny tokenizers are trained on: every synthetic caption word and the prompt templates."""
    from easygen.templates import CAPTION_PROMPTS, IMG_CLOSE, IMG_OPEN, VQA_SUFFIX

    corpus = [*CAPTION_PROMPTS, VQA_SUFFIX, f"USER: {IMG_OPEN} {IMG_CLOSE} ASSISTANT:"]
    try:
        from data_modules.synthetic import caption_corpus

        corpus += list(caption_corpus())
    except ImportError:
        pass
    return corpus


def tokenizer_cache(cfg: dict) -> str | None:
    data_dir = (cfg.get("paths") or {}).get("data_dir")
    return str(Path(data_dir) / "tokenizers") if data_dir else None


def build_llm_tokenizer(cfg: dict):
    m = cfg["model"]["llm"]
    if m["preset"] in ("tiny", "tiny-t5"):
        from easygen.tokenization import build_tokenizer

        # tiny-t5: a sentencepiece unigram T5 tokenizer (pad 0 starts the decoder, </s> = 1, no BOS)
        return build_tokenizer(
            "t5" if m["preset"] == "tiny-t5" else "llama",
            tiny_corpus(),
            vocab_size=int(m.get("vocab_size", 512)),
            model_max_length=int(cfg["model"]["max_length"]),
            cache_dir=tokenizer_cache(cfg),
        )
    if m["preset"] == "llama7b-random":
        from easygen.tokenization import build_tokenizer

        return build_tokenizer("llama", tiny_corpus(), vocab_size=1024, cache_dir=tokenizer_cache(cfg))
    from transformers import AutoTokenizer

    path = require_path(m.get("path"), "model.llm.path")
    tok = AutoTokenizer.from_pretrained(
        path, local_files_only=True, trust_remote_code=bool(m.get("trust_remote_code"))
    )
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def build_llm(cfg: dict, tokenizer, device: str | torch.device | None = None):
    m = cfg["model"]["llm"]
    preset = m["preset"]
    if preset == "tiny":
        from easygen.llm import build_tiny_llm

        return build_tiny_llm(
            tokenizer,
            hidden_size=int(m["hidden_size"]),
            layers=int(m["num_layers"]),
            heads=int(m["num_heads"]),
            seed=int(cfg.get("seed", 0)),
        )
    if preset == "tiny-t5":
        from transformers import T5Config, T5ForConditionalGeneration

        h, heads = int(m["hidden_size"]), int(m["num_heads"])
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=h,
            d_ff=4 * h,
            d_kv=h // heads,
            num_layers=int(m["num_layers"]),
            num_heads=heads,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.get("seed", 0)))
            return T5ForConditionalGeneration(config).eval()
    if preset == "t5":
        from transformers import AutoModelForSeq2SeqLM

        path = require_path(m.get("path"), "model.llm.path")
        if not (Path(path) / "config.json").exists():
            raise ConfigError(
                f"model.llm.path={path} has no config.json: point it at a transformers FlanT5 folder"
            )
        return AutoModelForSeq2SeqLM.from_pretrained(
            path,
            dtype=DTYPES.get(str(m.get("dtype"))),
            local_files_only=True,
            trust_remote_code=bool(m.get("trust_remote_code")),
        )
    if preset == "llama7b-random":
        from transformers import LlamaForCausalLM

        from easygen.llm import llama_7b_config

        config = llama_7b_config(vocab_size=int(m.get("vocab_size", 32000)))
        config._attn_implementation = "sdpa"
        # built directly on the GPU in its dtype: 6.7B fp32 parameters on the host first would cost 27 GB
        dtype = DTYPES.get(str(m.get("dtype")), torch.float32)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")):
                return LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    if preset == "pretrained":
        from easygen.llm import load_llm

        model, _ = load_llm(
            require_path(m.get("path"), "model.llm.path"),
            dtype=DTYPES.get(str(m.get("dtype"))),
            trust_remote_code=bool(m.get("trust_remote_code")),
        )
        return model
    raise ConfigError(f"model.llm.preset={preset!r}: choose tiny|pretrained|llama7b-random|t5|tiny-t5")


def build_projector(cfg: dict):
    from easygen.projector import Projector

    p = cfg["model"]["projector"]
    tokens = int(cfg["model"]["num_image_tokens"]) if p.get("standardize") else 0
    return Projector(int(p["in_dim"]), int(p["hidden_dim"]), int(p["out_dim"]), standardize_tokens=tokens)


def build_bidiffuser(cfg: dict, device: str | torch.device | None = None):
    """The assembled BiDiffuser pipeline for `model.bidiffuser`; `weights` (a previous stage's export)
    replaces every part's weights when set."""
    from easygen.bidiffuser import BiDiffuser

    b = cfg["model"]["bidiffuser"]
    sampler = dict(b.get("sampler") or {})
    sample_seed = int(sampler.pop("seed", 1234))  # the sampler's seed; `seed` below builds tiny weights
    preset = b["preset"]
    if preset == "tiny":
        pipe = BiDiffuser.tiny(
            tiny_corpus(), seed=int(cfg.get("seed", 0)), image_size=int(cfg["model"]["image_size"]), **sampler
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
        from easygen.checkpoint import load_state_dict_file, record_load

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


def meta_models(cfg: dict) -> dict:
    """The preset's networks at their real shapes on the meta device (no memory, no weights): how
    a recipe is checked on a machine that could not hold it."""
    from easygen.bidiffuser import UViT, UViTConfig

    m = cfg["model"]
    b = m["bidiffuser"]
    uvit_cfg = UViTConfig.tiny() if b["preset"] == "tiny" else UViTConfig.v1()
    uvit_cfg = UViTConfig(**{**uvit_cfg.__dict__, **dict(b.get("uvit_config") or {})})
    out = {}
    with torch.device("meta"):
        out["uvit"] = UViT(uvit_cfg)
        out["projector"] = build_projector(cfg)
        llm = m["llm"]
        if llm["preset"] == "tiny-t5":
            from transformers import T5Config, T5ForConditionalGeneration

            h, heads = int(llm["hidden_size"]), int(llm["num_heads"])
            out["llm"] = T5ForConditionalGeneration(
                T5Config(
                    vocab_size=int(llm["vocab_size"]),
                    d_model=h,
                    d_ff=4 * h,
                    d_kv=h // heads,
                    num_layers=int(llm["num_layers"]),
                    num_heads=heads,
                    feed_forward_proj="gated-gelu",
                )
            )
        elif llm["preset"] == "t5":
            from transformers import T5Config, T5ForConditionalGeneration

            out["llm"] = T5ForConditionalGeneration(
                T5Config(
                    d_model=2048,
                    d_ff=5120,
                    num_layers=24,
                    num_heads=32,
                    d_kv=64,
                    vocab_size=32128,
                    feed_forward_proj="gated-gelu",
                )
            )
        elif llm["preset"] == "tiny":
            from transformers import LlamaConfig, LlamaForCausalLM

            h = int(llm["hidden_size"])
            out["llm"] = LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=int(llm["vocab_size"]),
                    hidden_size=h,
                    intermediate_size=4 * h,
                    num_hidden_layers=int(llm["num_layers"]),
                    num_attention_heads=int(llm["num_heads"]),
                )
            )
        else:
            from transformers import LlamaForCausalLM

            from easygen.llm import llama_7b_config

            out["llm"] = LlamaForCausalLM(llama_7b_config(hidden_size=int(llm["hidden_size"])))
    return out
