"""Loading the decoder-only LLM of EasyGen (Vicuna-7B in the paper) and tiny stand-ins for tests.

Everything loads from local folders (``local_files_only=True``): a hub id that is not a folder on
disk is an error, never a download. ``build_tiny_llm`` builds a random ``LlamaForCausalLM`` matched to
a locally trained tokenizer; ``llama_7b_config`` is the real Llama-7B / Vicuna-7B shape, for random or
meta-device models in benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM


def load_llm(path, dtype=None, trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
    """Return ``(AutoModelForCausalLM, tokenizer)`` from the local folder ``path``."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"LLM folder not found: {folder} (models load from local folders only)")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"LLM folder {folder} has no config.json")
    model = AutoModelForCausalLM.from_pretrained(
        str(folder),
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        local_files_only=True,
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
