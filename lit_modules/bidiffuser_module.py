"""The LightningModule of BiDiffuser fine-tuning (`stage=bidiffuser`, SPEC §3, §5): the U-ViT trained
with the paper's two-conditional loss (or the reference's / UniDiffuser's, by configuration) on
image-caption pairs, an EMA of its weights, and validation captions from the EMA network through the
caption decoder. The frozen encoders run on the fly; their outputs are the training targets."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import lightning.pytorch as pl
import torch

from lit_modules.builders import build_bidiffuser
from lit_modules.datamodule import log_skipped
from lit_modules.optim import build_optimizer


def _stack_images(samples: list[dict]) -> torch.Tensor:
    missing = [s.get("id", "?") for s in samples if s.get("image") is None]
    if missing:
        raise ValueError(f"samples {missing[:5]} have no decoded image: the BiDiffuser stage needs pixels")
    return torch.stack([torch.as_tensor(s["image"]) for s in samples])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full_state(module: torch.nn.Module) -> dict:
    """Every rank calls this; sharded (FSDP2) tensors are gathered."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in module.state_dict().items()}


class BiDiffuserModule(pl.LightningModule):
    needs_images = True

    def __init__(self, cfg: dict):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.stage_cfg = cfg["stage"]
        self.strict_loading = False
        self.bidiffuser = None
        self.ema_uvit = None
        self.rng = random.Random(int(cfg.get("seed", 0)))
        self.last_batch_size = 0
        self.last_num_tokens = 0

    # -- data -----------------------------------------------------------------------------------
    def collate(self, samples: list[dict]) -> dict:
        return {
            "ids": [s.get("id", "?") for s in samples],
            "images": _stack_images(samples),
            "captions": [self.rng.choice(s["captions"]) for s in samples],
        }

    def eval_collate(self, samples: list[dict]) -> dict:
        return {
            "ids": [s.get("id", "?") for s in samples],
            "images": _stack_images(samples),
            "references": [list(s["captions"]) for s in samples],
        }

    # -- model ----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.bidiffuser is not None:
            return
        pipe = build_bidiffuser(self.cfg)
        for p in pipe.uvit.parameters():
            p.requires_grad_(True)
        if self.stage_cfg.get("train_caption_decoder"):
            for p in pipe.caption_decoder.gpt.parameters():
                p.requires_grad_(True)
            for p in pipe.caption_decoder.decode_prefix.parameters():
                p.requires_grad_(True)
        pipe.uvit.train()
        self.bidiffuser = pipe
        self.ema_uvit = copy.deepcopy(pipe.uvit).eval().requires_grad_(False)
        if self.device_mesh is not None:
            from lit_modules.fsdp import shard_uvit

            # the EMA copy is sharded the same way, so that its shards line up with the live ones
            shard_uvit(self.bidiffuser.uvit, self.device_mesh, self.cfg.get("strategy") or {})
            shard_uvit(self.ema_uvit, self.device_mesh, self.cfg.get("strategy") or {})

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        from easygen.bidiffuser.loss import bidiffuser_loss

        pipe = self.bidiffuser
        with torch.no_grad():
            enc = pipe.encode_images(batch["images"])
            clip_text = pipe.clip_text(batch["captions"])
        y0 = pipe.caption_decoder.encode_prefix(clip_text).detach()
        s = self.stage_cfg
        losses = bidiffuser_loss(
            pipe.uvit, pipe.schedule, enc["z"], enc["clip_img"], y0, objective=s.get("objective", "bidiffuser"),
            alpha=float(s.get("alpha", 1.0)), shared_timestep=bool(s.get("shared_timestep", False)),
            clean_img_term=bool(s.get("clean_img_term", False)),
        )
        loss = losses["loss"]
        bs = batch["images"].shape[0]
        if s.get("train_caption_decoder"):
            dec_loss = self.caption_decoder_loss(batch["captions"], clip_text)
            loss = loss + dec_loss
            self.log("train/loss_caption_decoder", dec_loss, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/loss_img", losses["loss_img"], batch_size=bs)
        self.log("train/loss_text", losses["loss_text"], batch_size=bs)
        self.last_batch_size = bs
        log_skipped(self)
        return loss

    def caption_decoder_loss(self, captions: list[str], clip_text: torch.Tensor) -> torch.Tensor:
        """Teacher-forced loss of the caption decoder on the captions it should recover from their latents."""
        dec = self.bidiffuser.caption_decoder
        tok = dec.tokenizer
        ids = [tok(c, add_special_tokens=False)["input_ids"][: 60] + [dec.eos_token_id] for c in captions]
        width = max(len(x) for x in ids)
        tokens = torch.zeros(len(ids), width, dtype=torch.long, device=clip_text.device)
        mask = torch.zeros_like(tokens)
        for i, x in enumerate(ids):
            tokens[i, : len(x)] = torch.tensor(x, device=tokens.device)
            mask[i, : len(x)] = 1
        return dec(tokens, clip_text, mask)

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # EMA with the usual warmup (decay grows as (1+n)/(10+n) up to ema_decay), so short runs move too
        step = self.trainer.global_step
        decay = min(float(self.stage_cfg.get("ema_decay", 0.9999)), (1 + step) / (10 + step))
        ema_p = [_local(p) for p in self.ema_uvit.parameters()]
        src_p = [_local(p.detach()) for p in self.bidiffuser.uvit.parameters()]
        torch._foreach_lerp_(ema_p, [p.to(e.dtype) for p, e in zip(src_p, ema_p)], 1.0 - decay)

    def validation_step(self, batch, batch_idx):
        return self.predict_captions(batch)

    @torch.no_grad()
    def predict_captions(self, batch):
        live = self.bidiffuser.uvit
        self.bidiffuser.uvit = self.ema_uvit
        try:
            texts = self.bidiffuser.caption(batch["images"])
        finally:
            self.bidiffuser.uvit = live
        return {"ids": batch["ids"], "predictions": texts, "references": batch["references"]}

    def generate_images(self, prompts: list[str]):
        return self.bidiffuser.generate(prompts)

    def flops_per_sample(self) -> float:
        return float(self.bidiffuser.uvit.flops_per_sample(train=True))

    # -- optimisation and checkpoints -------------------------------------------------------------
    def configure_optimizers(self):
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        return build_optimizer(self.trainer.model.named_parameters(), self.cfg["optim"], int(total))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad} | {
            f"ema_uvit.{n}" for n, _ in self.ema_uvit.named_parameters()
        }
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def ema_pipeline_state(self) -> dict:
        """The whole pipeline's weights with the EMA U-ViT in place of the live one."""
        sd = {k: v for k, v in _full_state(self.bidiffuser).items() if not k.startswith("uvit.")}
        sd.update({f"uvit.{k}": v for k, v in _full_state(self.ema_uvit).items()})
        return sd

    def export_artifacts(self, out: Path) -> dict:
        """`bidiffuser/uvit_ema.pth` (UniDiffuser's key format, `load_uvit` reads it) and
        `bidiffuser/bidiffuser.safetensors` (every part, for `model.bidiffuser.weights`)."""
        from easygen.bidiffuser import save_uvit
        from easygen.checkpoint import save_state_dict_file

        folder = Path(out) / "bidiffuser"
        state = self.ema_pipeline_state()  # collective under FSDP: every rank gathers
        if self.trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            uvit = copy.deepcopy(self.ema_uvit) if self.device_mesh is None else None
            if uvit is None:
                from easygen.bidiffuser import load_uvit

                uvit = load_uvit({k[5:]: v for k, v in state.items() if k.startswith("uvit.")})
            save_uvit(uvit, folder / "uvit_ema.pth")
            save_state_dict_file({k: v.contiguous() for k, v in state.items()}, folder / "bidiffuser.safetensors")
        return {"uvit_ema": str(folder / "uvit_ema.pth"), "bidiffuser_weights": str(folder / "bidiffuser.safetensors")}
