"""Loading the decoder-only LLM of EasyGen (Vicuna-7B in the paper) and tiny stand-ins for tests.

Everything loads from local folders (``local_files_only=True``): a hub id that is not a folder on
disk is an error, never a download. Every load is checked (``load_checked``): the released EasyGen's
folder (``model_type: diffllama``, easygen/llm/release.py) and any folder whose load leaves tensors
missing, unexpected or of another shape stop with one line instead of giving a model with random parts. ``build_tiny_llm`` builds a random ``LlamaForCausalLM`` matched to
a locally trained tokenizer; ``llama_7b_config`` is the real Llama-7B / Vicuna-7B shape, for random or
meta-device models in benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from easygen.errors import ConfigError
from easygen.llm.release import refuse_release_folder


def load_checked(path, key: str = "model.llm.path", auto_class=AutoModelForCausalLM, **kwargs):
    """``auto_class.from_pretrained`` of the local folder ``path``, refused with one line (a ConfigError
    naming ``key``) when it is the released EasyGen's folder or when the load leaves any tensor missing,
    unexpected or mismatched in shape (transformers would initialise or drop them and only report it)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"LLM folder not found: {folder} (models load from local folders only)")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"LLM folder {folder} has no config.json")
    refuse_release_folder(folder, key)
    model, info = auto_class.from_pretrained(
        str(folder), local_files_only=True, output_loading_info=True, **kwargs
    )
    problems = []
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in (info.get(what) or []))
        if names:
            problems.append(f"{len(names)} {what.replace('_', ' ')} (e.g. {names[0]})")
    if problems:
        raise ConfigError(
            f"{key}={folder}: loading it as {type(model).__name__} leaves {', '.join(problems)}: the weights do not "
            "belong to the model its config.json describes"
        )
    return model


def load_llm(path, dtype=None, trust_remote_code: bool = False, attn_implementation: str = "sdpa",
             key: str = "model.llm.path"):
    """Return ``(AutoModelForCausalLM, tokenizer)`` from the local folder ``path`` (checked: ``load_checked``)."""
    folder = Path(path)
    model = load_checked(
        folder,
        key=key,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        str(folder), trust_remote_code=trust_remote_code, local_files_only=True
    )
    return model, tokenizer


def build_tiny_llm(tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A random ``LlamaForCausalLM`` with the tokenizer's vocabulary and special tokens."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def llama_7b_config(**overrides):
    """The Llama-7B / Vicuna-7B shape (6.74B parameters)."""
    kwargs = dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)
