"""Tiny files in the released EasyGen's published format, for tests and for trying the import:

    python -m easygen.llm.release_sample --out downloads/easygen

writes ``OUT/pretrain_only_MLP/`` (the alignment output: a Llama config with ``"model_type": "diffllama"``
and ``"architectures": ["DiffLlamaForCausalLM"]``, every Llama tensor under its usual name plus the
projector as ``model.fastchat_proj.fc1/fc2.*``, Llama's sentencepiece ``tokenizer.model`` with Vicuna's
``tokenizer_config.json``), ``OUT/instruction_tunning_lora/`` (peft's ``save_pretrained`` of a LoRA with
the paper's adapter config: r 8, alpha 32, dropout 0.05, ``.*layers.*\\.(q_proj|v_proj)``, non-zero
``lora_B``) and ``OUT/features.npy`` (one picture's ``[77, 768]`` BiDiffuser feature, random). The weights
are random: the files exercise the format, not the model. ``--format bin``, ``--shards N`` and
``--dtype bfloat16|float16`` write the other published variants (``.bin`` files carry the
``rotary_emb.inv_freq`` buffers older transformers saved). ``--feature-dim 64 --image-tokens 16`` give the
projector the input width of ``model=tiny``'s BiDiffuser (``conf/model/tiny.yaml``), so that an import runs
with pictures on that tiny BiDiffuser.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from easygen.llm.release import PROJECTOR_PREFIX, RELEASE_ARCHITECTURE, RELEASE_MODEL_TYPE
from easygen.llm.templates import CAPTION_PROMPTS, IMG_CLOSE, IMG_OPEN, VQA_SUFFIX

# the paper's adapter config (instruction tuning)
ADAPTER = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": r".*layers.*\.(q_proj|v_proj)"}
SAMPLE_LINES = (
    *CAPTION_PROMPTS,
    f"USER: {IMG_OPEN} {IMG_CLOSE} Describe the image concisely. ASSISTANT: a dog on a sofa",
    f"What colour is the cat?{VQA_SUFFIX} ASSISTANT: black",
    "a red circle on a white background", "a man riding a horse on a beach", "two cats sleeping on a bed",
    "a plate of food with broccoli and rice", "a train at the station", "yes no one two three",
)
# Vicuna v1.1's tokenizer_config.json (the slow LlamaTokenizer, pad unset: pad = unk)
TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "pad_token": None, "clean_up_tokenization_spaces": False, "model_max_length": 2048,
    "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
}


def train_llama_spiece(lines=SAMPLE_LINES, vocab_size: int = 400) -> bytes:
    """A sentencepiece BPE model with Llama's settings (unk 0, bos 1, eos 2, byte fallback, dummy prefix,
    spaces kept as they are)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines) * 4), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        character_coverage=1.0, split_digits=True, num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    return buf.getvalue()


def tiny_llama(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # random embeddings/norms with some spread, so that different prompts give different logits
        for p in model.parameters():
            p.data.normal_(0.0, 0.08 if p.dim() > 1 else 0.2).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval()


def projector_tensors(in_dim: int, hidden: int, out_dim: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(hidden, in_dim, generator=g) / in_dim**0.5,
        "fc1.bias": torch.randn(hidden, generator=g) * 0.1,
        "fc2.weight": torch.randn(out_dim, hidden, generator=g) / hidden**0.5,
        "fc2.bias": torch.randn(out_dim, generator=g) * 0.1,
    }


def _save_weights(state: dict, folder: Path, fmt: str, shards: int) -> None:
    from safetensors.torch import save_file

    names = list(state)
    groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    groups = [sorted(g, key=names.index) for g in groups]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k].contiguous() for k in group}
        if fmt == "safetensors":
            save_file(part, str(folder / fname), metadata={"format": "pt"})
        else:
            torch.save(part, folder / fname)
        weight_map.update({k: fname for k in group})
    if shards > 1:
        total = sum(v.numel() * v.element_size() for v in state.values())
        (folder / f"{stem}.{ext}.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )


def write_release_sample(
    out: str | Path,
    *,
    fmt: str = "safetensors",
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    feature_dim: int = 768,
    num_image_tokens: int = 77,
    projector_hidden: int = 256,
    hidden: int = 64,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the sample (see the module docstring); returns ``{"llm", "lora", "features"}`` paths."""
    from peft import LoraConfig, get_peft_model

    out = Path(out)
    llm_dir, lora_dir = out / "pretrain_only_MLP", out / "instruction_tunning_lora"
    for d in (llm_dir, lora_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    (llm_dir / "tokenizer.model").write_bytes(train_llama_spiece())
    (llm_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (llm_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2)
    )
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(llm_dir / "tokenizer.model")).get_piece_size()
    llama = tiny_llama(vocab, hidden=hidden, seed=seed)
    config = llama.config.to_dict()
    config.update(model_type=RELEASE_MODEL_TYPE, architectures=[RELEASE_ARCHITECTURE], torch_dtype=str(dtype)[6:])
    config.pop("dtype", None)
    (llm_dir / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().to(dtype) for k, v in llama.state_dict().items()}
    proj = projector_tensors(feature_dim, projector_hidden, hidden, seed=seed + 1)
    state.update({PROJECTOR_PREFIX + k: v.to(dtype) for k, v in proj.items()})
    if fmt == "bin":  # transformers before 4.31 saved the rotary frequencies with the weights
        head_dim = hidden // llama.config.num_attention_heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        for i in range(llama.config.num_hidden_layers):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    _save_weights(state, llm_dir, fmt, shards)

    # the adapter: peft on the same Llama (the paper's model holds the projector too; it stays frozen)
    base = tiny_llama(vocab, hidden=hidden, seed=seed)
    peft_model = get_peft_model(base, LoraConfig(bias="none", task_type="CAUSAL_LM", **ADAPTER))
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(str(lora_dir))

    g = torch.Generator().manual_seed(seed + 3)
    features = out / "features.npy"
    np.save(features, torch.randn(num_image_tokens, feature_dim, generator=g).numpy().astype(np.float32))
    return {"llm": llm_dir, "lora": lora_dir, "features": features}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m easygen.llm.release_sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", choices=("safetensors", "bin"), default="safetensors")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--feature-dim", type=int, default=768,
                    help="the projector's input width: 768 (BiDiffuser v1, the paper's), 64 (model=tiny's BiDiffuser)")
    ap.add_argument("--image-tokens", type=int, default=77, help="rows of features.npy: 77 (v1), 16 (tiny)")
    args = ap.parse_args(argv)
    paths = write_release_sample(args.out, fmt=args.format, shards=args.shards, dtype=getattr(torch, args.dtype),
                                 feature_dim=args.feature_dim, num_image_tokens=args.image_tokens)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
