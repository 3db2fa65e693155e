"""Throughput of the two LLM training steps of EasyGen, ours against the reference configuration.

1. Alignment (the paper's training recipe "pretrain"): frozen Llama-7B-shape LLM, 77 image tokens + ~100 text tokens per
   sample, projector trainable, batch 32. The reference (EasyGen/LLaVA code: transformers + SDPA,
   gradient checkpointing, batches padded to their longest sample in random order) against ours: no
   checkpointing (a frozen LLM stores no weight gradients, so the activations fit) and length-bucketed
   batches (samples sorted by length before batching, so caption batches carry little padding).
2. LoRA: rank 8 on every Linear but lm_head, 16 x 512 tokens, AdamW on the adapters. Reference:
   transformers + peft with gradient checkpointing; ours: without checkpointing when memory allows.

Both run in the same process on the same random weights; the script prints samples/s, real tokens/s,
MFU against 989 TFLOP/s (dense bf16 H100/H200) and ours/reference ratios. ``--tiny`` runs a small model
on CPU (a smoke run; its MFU means nothing).

    python experiments/bench_llm.py --tiny
    python experiments/bench_llm.py            # on one GPU, bf16, Llama-7B shape
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from easygen.llm.loading import llama_7b_config
from easygen.llm.lora import apply_lora
from easygen.llm.model import EasyGen
from easygen.llm.projector import Projector

PEAK_FLOPS = 989e12
PROMPT_TOKENS = 6  # "<s>USER: <Img>" before the image span


def synth_alignment_pool(n: int, n_img: int, text_mean: int, vocab: int, seed: int):
    """Sample lengths of caption-like prompts: text part uniform in [0.4, 1.6] x mean."""
    rng = random.Random(seed)
    pool = []
    for _ in range(n):
        text = rng.randint(int(0.4 * text_mean), int(1.6 * text_mean))
        length = PROMPT_TOKENS + n_img + text
        answer = min(text - 1, rng.randint(8, 20))  # the caption is the learned tail
        pool.append((length, answer))
    return pool


def make_batch(items, n_img, feat_dim, vocab, device):
    width = max(length for length, _ in items)
    b = len(items)
    ids = torch.randint(3, vocab, (b, width), device=device)
    mask = torch.zeros(b, width, dtype=torch.long, device=device)
    labels = torch.full((b, width), -100, dtype=torch.long, device=device)
    for i, (length, answer) in enumerate(items):
        mask[i, :length] = 1
        labels[i, length - answer : length] = ids[i, length - answer : length]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "features": torch.randn(b, n_img, feat_dim, device=device),
        "image_positions": torch.full((b,), PROMPT_TOKENS, device=device),
        "has_image": torch.ones(b, dtype=torch.bool, device=device),
    }


def batches(pool, batch_size, bucket: bool, seed: int):
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    if bucket:
        order.sort(key=lambda i: pool[i][0])
    groups = [[pool[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]
    groups = [g for g in groups if len(g) == batch_size]
    if bucket:
        random.Random(seed + 1).shuffle(groups)  # bucketed, but not in length order over the epoch
    return groups


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def set_checkpointing(llm, on: bool):
    """transformers 5 renamed gradient checkpointing to activation checkpointing; accept both."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        if on:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.activation_checkpointing_disable()
    elif on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_disable()


def timed(step, batches_, warmup, device):
    for b in batches_[:warmup]:
        step(b)
    sync(device)
    t0 = time.perf_counter()
    for b in batches_[warmup:]:
        step(b)
    sync(device)
    return time.perf_counter() - t0


def build_llm(args, device, dtype):
    from transformers import LlamaForCausalLM

    if args.tiny:
        cfg = llama_7b_config(
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
        cfg.vocab_size = 512
    else:
        cfg = llama_7b_config()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    with torch.device(device):
        llm = LlamaForCausalLM(cfg).to(dtype)
    return llm


def bench_alignment(args, llm, device, dtype):
    n_img, feat = 77, 768
    model = EasyGen(llm, Projector(feat, 3072, llm.config.hidden_size)).to(device)
    model.projector.to(torch.float32)  # fp32 master weights for the only trainable part
    model.freeze_llm()
    opt = torch.optim.AdamW(model.projector.parameters(), lr=2e-5)
    n_batches = args.warmup + args.steps
    pool = synth_alignment_pool(
        n_batches * args.batch, n_img, args.text_tokens, llm.config.vocab_size, args.seed
    )
    mean_len = sum(length for length, _ in pool) / len(pool)
    fpt = model.flops_per_token(seq_len=int(mean_len), training=True)

    def step(items):
        batch = make_batch(items, n_img, feat, llm.config.vocab_size, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    results = {}
    configs = [("reference", True, False), ("ours", False, args.bucket)]
    if args.bucket:
        configs.append(("ours, no bucketing", False, False))
    for name, checkpointing, bucket in configs:
        set_checkpointing(llm, checkpointing)
        # Checkpointed blocks need an input that requires grad; with inputs_embeds from the
        # projector that is already the case.
        groups = batches(pool, args.batch, bucket, args.seed)
        timed_groups = groups[args.warmup :]
        real_tokens = sum(length for g in timed_groups for length, _ in g)
        padded = sum(args.batch * max(length for length, _ in g) for g in timed_groups)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        secs = timed(step, groups, args.warmup, device)
        samples = args.steps * args.batch
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        results[name] = samples / secs
        print(
            f"alignment  {name:22s} {samples / secs:9.2f} samples/s {real_tokens / secs:11.0f} tok/s "
            f"MFU {100 * fpt * real_tokens / secs / PEAK_FLOPS:5.1f}%  padding {100 * (1 - real_tokens / padded):4.1f}%  "
            f"peak {mem:.1f} GiB"
        )
    for name in results:
        if name != "reference":
            print(f"alignment  ratio {name} / reference: {results[name] / results['reference']:.2f}x")
    return results


def bench_lora(args, llm, device, dtype):
    peft_llm = apply_lora(llm, r=8, alpha=16, dropout=0.05)
    model = EasyGen(peft_llm, Projector(768, 3072, llm.config.hidden_size)).to(device)
    model.projector.requires_grad_(False)  # text-only LoRA step: time the LLM
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # adapters in fp32 (AdamW state too), base weights stay bf16
    opt = torch.optim.AdamW(params, lr=2e-5, fused=device.type == "cuda")
    b, seq = args.lora_batch, args.lora_seq
    vocab = llm.config.vocab_size
    tokens = args.steps * b * seq
    fpt = model.flops_per_token(seq_len=seq, training=True)
    batch_list = [torch.randint(3, vocab, (b, seq), device=device) for _ in range(args.warmup + args.steps)]

    def step(ids):
        mask = torch.ones_like(ids)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(ids, mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    results = {}
    for name, checkpointing in (("reference", True), ("ours", args.lora_checkpointing)):
        set_checkpointing(peft_llm, checkpointing)
        if checkpointing:
            peft_llm.enable_input_require_grads()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        secs = timed(step, batch_list, args.warmup, device)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        results[name] = tokens / secs
        print(
            f"lora       {name:22s} {args.steps * b / secs:9.2f} samples/s {tokens / secs:11.0f} tok/s "
            f"MFU {100 * fpt * tokens / secs / PEAK_FLOPS:5.1f}%  checkpointing={checkpointing}  peak {mem:.1f} GiB"
        )
    print(f"lora       ratio ours / reference: {results['ours'] / results['reference']:.2f}x")
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small random model on CPU (smoke run)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=100)
    ap.add_argument("--lora-batch", type=int, default=16)
    ap.add_argument("--lora-seq", type=int, default=512)
    ap.add_argument("--lora-checkpointing", action="store_true", help="keep checkpointing in our LoRA step")
    ap.add_argument("--no-bucket", dest="bucket", action="store_false", help="ours without length bucketing")
    ap.add_argument("--skip", choices=("alignment", "lora"), default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        args.batch, args.lora_batch, args.lora_seq = (
            min(args.batch, 8),
            min(args.lora_batch, 4),
            min(args.lora_seq, 128),
        )
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    else:
        print(f"device: cpu  torch {torch.__version__}")
    llm = build_llm(args, device, dtype)
    if args.skip != "alignment":
        bench_alignment(args, llm, device, dtype)
    if args.skip != "lora":
        bench_lora(args, llm, device, dtype)


if __name__ == "__main__":
    main()
