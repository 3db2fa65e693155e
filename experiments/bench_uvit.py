"""Throughput of the BiDiffuser U-ViT against diffusers' UniDiffuserModel (the reference implementation).

Times, in one process and on the same weights, (1) a training step (bidiffuser objective: one batched forward
of t2i + i2t rows, backward, AdamW) and (2) i2t feature extraction (DPM-Solver++ 50 NFE with CFG, cond and
uncond batched). Prints samples/s, MFU against 989 TFLOP/s dense bf16 (H100/H200) with the model FLOPs of
``UViT.flops_per_sample`` (6.986 TFLOP per 512^2 training sample), and ours/reference ratios.

Precision recipes (``--precision``), so that speedups are measured, not assumed:
  autocast  fp32 weights + bf16 autocast (the reference recipe, the reference section 8 anchor: 59.9 samples/s on H200)
  bf16      bf16 weights in the network, fp32 master copy held by the optimiser step (cast after each step)
``--compile`` wraps each model in torch.compile. ``--tiny`` runs the test-sized config on CPU in seconds.

    python experiments/bench_uvit.py --tiny
    python experiments/bench_uvit.py --batch 32 --precision autocast bf16 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from easygen.bidiffuser.convert import diffusers_config, original_to_diffusers
from easygen.bidiffuser.loss import bidiffuser_loss
from easygen.bidiffuser.sampling import sample_i2t
from easygen.bidiffuser.schedule import NoiseSchedule
from easygen.bidiffuser.uvit import UViT, UViTConfig

PEAK_FLOPS = 989e12


class DiffusersAdapter(torch.nn.Module):
    """Gives diffusers' UniDiffuserModel our forward signature, so the same loss and sampler drive both."""

    def __init__(self, model, config: UViTConfig):
        super().__init__()
        self.model, self.config = model, config

    def forward(self, img, clip_img, text, t_img, t_text, data_type=None):
        B = img.shape[0]
        t_img = torch.as_tensor(t_img, device=img.device).expand(B)
        t_text = torch.as_tensor(t_text, device=img.device).expand(B)
        dt = torch.full((B,), 1 if data_type is None else int(data_type), device=img.device, dtype=torch.long)
        return self.model(img, clip_img, text, t_img, t_text, data_type=dt)


def build(kind: str, cfg: UViTConfig, state: dict, device) -> torch.nn.Module:
    if kind == "ours":
        model = UViT(cfg)
        model.load_state_dict(state)
        return model.to(device)
    from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import UniDiffuserModel

    kwargs = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    ref = UniDiffuserModel(**kwargs)
    ref.load_state_dict(original_to_diffusers(state))
    return DiffusersAdapter(ref, cfg).to(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, warmup: int, iters: int, device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def bench_train(model, cfg, precision, batch, device, warmup, iters):
    schedule = NoiseSchedule()
    amp = device.type == "cuda" and precision == "autocast"
    if precision == "bf16":
        # Network runs in bf16; the optimiser updates an fp32 master copy and casts back.
        master = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
        model.to(torch.bfloat16)
        opt = torch.optim.AdamW(master, lr=1e-5, fused=device.type == "cuda")
    else:
        master = None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    h = cfg.img_size
    z0 = torch.randn(batch, cfg.in_chans, h, h, device=device, dtype=dtype)
    c0 = torch.randn(batch, 1, cfg.clip_img_dim, device=device, dtype=dtype)
    y0 = torch.randn(batch, cfg.num_text_tokens, cfg.text_dim, device=device, dtype=dtype)
    # The bidiffuser objective runs 2 * batch rows (t2i + i2t); a "sample" below is one such row.
    rows = max(batch // 2, 1)
    z0, c0, y0 = z0[:rows], c0[:rows], y0[:rows]

    def step():
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            loss = bidiffuser_loss(model, schedule, z0, c0, y0)["loss"]
        loss.backward()
        if master is not None:
            for m, p in zip(master, model.parameters()):
                m.grad = None if p.grad is None else p.grad.float()  # diffusers has an unused copy
                p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if master is not None:
            with torch.no_grad():
                for m, p in zip(master, model.parameters()):
                    p.copy_(m)

    model.train()
    seconds = time_it(step, warmup, iters, device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return 2 * rows / seconds, mem


def bench_i2t(model, cfg, precision, batch, device, warmup, iters, steps):
    schedule = NoiseSchedule()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model.eval().to(dtype)
    h = cfg.img_size
    z = torch.randn(batch, cfg.in_chans, h, h, device=device, dtype=dtype)
    clip = torch.randn(batch, 1, cfg.clip_img_dim, device=device, dtype=dtype)
    amp = device.type == "cuda" and precision == "autocast"
    g = torch.Generator(device=device).manual_seed(1234)

    def run():
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            sample_i2t(model, schedule, z, clip, steps=steps, generator=g)

    seconds = time_it(run, warmup, iters, device)
    return batch / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="test-sized model on CPU")
    p.add_argument("--batch", type=int, default=32, help="training rows per step (t2i + i2t halves)")
    p.add_argument("--i2t-batch", type=int, default=32, help="images per i2t call (2x rows with CFG)")
    p.add_argument("--steps", type=int, default=50, help="DPM-Solver NFE for i2t")
    p.add_argument("--precision", nargs="+", default=["autocast"], choices=["autocast", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--models", nargs="+", default=["ours", "diffusers"], choices=["ours", "diffusers"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip-i2t", action="store_true")
    args = p.parse_args()

    if args.tiny:
        cfg, device = UViTConfig.tiny(), torch.device("cpu")
        args.batch, args.i2t_batch, args.steps = (
            min(args.batch, 4),
            min(args.i2t_batch, 2),
            min(args.steps, 6),
        )
        args.iters, args.warmup = min(args.iters, 3), min(args.warmup, 1)
        args.precision = [q for q in args.precision if q != "autocast"] or ["fp32"]
    else:
        cfg, device = UViTConfig.v1(), torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    state = UViT(cfg).state_dict()
    with torch.device("meta"):
        flops_train = UViT(cfg).flops_per_sample(train=True)
    flops_fwd = flops_train / 3
    print(f"config: {cfg}\ndevice: {device}; train FLOPs/sample {flops_train / 1e12:.4f} T")

    results = {}
    for precision in args.precision:
        for kind in args.models:
            model = build(kind, cfg, state, device)
            if args.compile:
                model = torch.compile(model)
            sps, mem = bench_train(model, cfg, precision, args.batch, device, args.warmup, args.iters)
            mfu = sps * flops_train / PEAK_FLOPS
            line = f"[{precision}{'+compile' if args.compile else ''}] {kind:9s} train {sps:8.2f} samples/s"
            line += f"  MFU {100 * mfu:5.1f}%  peak mem {mem:.1f} GiB"
            if not args.skip_i2t:
                ips = bench_i2t(
                    model, cfg, precision, args.i2t_batch, device, 1, max(args.iters // 3, 1), args.steps
                )
                fwd_mfu = ips * args.steps * 2 * flops_fwd / PEAK_FLOPS
                line += f" | i2t {ips:7.3f} images/s ({args.steps} NFE, CFG)  MFU {100 * fwd_mfu:5.1f}%"
            else:
                ips = float("nan")
            results[precision, kind] = (sps, ips)
            print(line, flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        if ("ours" in args.models) and ("diffusers" in args.models):
            (a, ai), (b, bi) = results[precision, "ours"], results[precision, "diffusers"]
            print(f"[{precision}] ours / diffusers: train {a / b:.3f}x  i2t {ai / bi:.3f}x")


if __name__ == "__main__":
    main()
