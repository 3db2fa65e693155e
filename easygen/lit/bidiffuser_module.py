"""The LightningModule of BiDiffuser fine-tuning (`stage=bidiffuser`, the paper's BiDiffuser objective and
training recipe): the U-ViT trained
with the paper's two-conditional loss (or the reference's / UniDiffuser's, by configuration) on
image-caption pairs, an EMA of its weights, and validation captions from the EMA network through the
caption decoder.

The training targets are the frozen encoders' outputs: read from the shards when they carry them
(`stage=extract stage.what=encoders` writes VAE moments, the CLIP image embedding and each caption's text
latent, as the reference trains from precomputed features), computed from the pixels otherwise
(`stage.encoder_source`: auto | precomputed | online)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from data_modules.encoder_outputs import ENCODER_MEMBERS, ShardMembers, encoder_outputs
from data_modules.stage_datamodule import log_skipped
from easygen.bidiffuser import load_uvit, save_uvit
from easygen.bidiffuser.autoencoder import sample_latent
from easygen.bidiffuser.ema import EMA
from easygen.bidiffuser.loss import bidiffuser_loss
from easygen.checkpoint import save_state_dict_file
from easygen.errors import ConfigError
from easygen.factories import build_bidiffuser
from easygen.lit.fsdp import shard_uvit
from easygen.lit.optim import build_optimizer

ENCODER_SOURCES = ("auto", "precomputed", "online")


def _stack_images(samples: list[dict]) -> torch.Tensor:
    missing = [s.get("id", "?") for s in samples if s.get("image") is None]
    if missing:
        raise ValueError(f"samples {missing[:5]} have no decoded image: the BiDiffuser stage needs pixels")
    return torch.stack([torch.as_tensor(s["image"]) for s in samples])


def _full_state(module: torch.nn.Module) -> dict:
    """Every rank calls this; sharded (FSDP2) tensors are gathered."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
        for k, v in module.state_dict().items()
    }


def unused_heads(objective: str, clean_img_term: bool) -> list[str]:
    """U-ViT output heads that get no gradient under `objective`.

    The reference objective only scores the text output (and, with its clean-image term, the latent
    output): the CLIP-image head, and the latent head without that term, never reach the loss. Frozen,
    they leave DDP no unused parameters to search for and the optimiser nothing to decay."""
    if objective != "reference":
        return []
    return ["clip_img_out"] if clean_img_term else ["clip_img_out", "decoder_pred"]


def shared_timestep_for(stage_cfg: dict) -> bool:
    """`stage.shared_timestep`, where null means the objective's own: the reference draws one index per batch."""
    value = stage_cfg.get("shared_timestep")
    if value is None:
        return stage_cfg.get("objective", "bidiffuser") == "reference"
    return bool(value)


CLIP_TOWERS = ("bidiffuser.clip_text.", "bidiffuser.clip_image.")


def _one_line(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(msg).split())


class BiDiffuserModule(pl.LightningModule):
    needs_images = True

    def __init__(self, cfg: dict):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.stage_cfg = cfg["stage"]
        source = self.stage_cfg.get("encoder_source", "auto")
        if source not in ENCODER_SOURCES:
            raise ConfigError(f"stage.encoder_source={source!r}: choose {'|'.join(ENCODER_SOURCES)}")
        self.encoder_source = source
        # set by callbacks/clip_fit.py once it fitted the CLIP towers in this run: checkpoints then keep them
        self.clip_fitted = False
        self.strict_loading = False
        self.bidiffuser = None
        self.ema = None
        self.ema_uvit = None
        self.rng = random.Random(int(cfg.get("seed", 0)))
        self._worker_rng: tuple[int, random.Random] | None = None
        self.members = ShardMembers()
        self.last_batch_size = 0
        self.last_num_tokens = 0
        self._ema_step = -1
        # frozen encoders' outputs per sample id / caption (model.encoder_cache_size; 0 = off)
        self._image_cache: dict = {}
        self._text_cache: dict = {}

    # -- data -----------------------------------------------------------------------------------
    def collate(self, samples: list[dict]) -> dict:
        outputs = (
            None if self.encoder_source == "online" else [encoder_outputs(s, self.members) for s in samples]
        )
        if outputs is not None and any(o is None for o in outputs):
            if self.encoder_source == "precomputed":
                s = samples[[o is None for o in outputs].index(True)]
                raise ValueError(
                    f"stage.encoder_source=precomputed but sample {s.get('__key__')!r} of shard {s.get('__url__')} "
                    f"carries no {'/'.join(ENCODER_MEMBERS.values())}: run stage=extract stage.what=encoders "
                    "or set stage.encoder_source=auto"
                )
            outputs = None
        rng = self.pick_rng()
        picks = [rng.randrange(len(s["captions"])) for s in samples]
        batch = {
            "ids": [s.get("id", "?") for s in samples],
            "captions": [s["captions"][i] for s, i in zip(samples, picks)],
        }
        if outputs is None:
            batch["images"] = _stack_images(samples)
            return batch
        for s, o in zip(samples, outputs):
            self._check_encoder_outputs(s, o)
        batch["moments"] = torch.from_numpy(np.stack([o["moments"] for o in outputs])).float()
        batch["clip_img"] = torch.from_numpy(np.stack([o["clip_img"] for o in outputs])).float()
        batch["text_latents"] = torch.from_numpy(
            np.stack([o["text_latents"][i] for o, i in zip(outputs, picks)])
        ).float()
        return batch

    def pick_rng(self) -> random.Random:
        """The generator that draws each sample's caption. `collate` runs in the DataLoader workers when
        `data.num_workers` > 0, each on a forked copy of this module: `self.rng` would then repeat the same
        draws in every worker (every worker's n-th batch takes the same caption indices). A worker draws
        from its own generator, seeded by the per-worker seed torch gives it (`seed_everything` fixes it)."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.rng
        if self._worker_rng is None or self._worker_rng[0] != info.seed:
            self._worker_rng = (info.seed, random.Random(info.seed))
        return self._worker_rng[1]

    def _check_encoder_outputs(self, sample: dict, out: dict) -> None:
        """Shapes against the U-ViT being trained; an error names the shard, key and member."""
        where = f"shard {sample.get('__url__')}, key {sample.get('__key__')!r}"
        if self.bidiffuser is not None:
            c = self.bidiffuser.uvit.config
            expected = {
                "moments": (2 * c.in_chans, c.img_size, c.img_size),
                "clip_img": (1, c.clip_img_dim),
                "text_latents": (len(sample["captions"]), c.num_text_tokens, c.text_dim),
            }
        else:
            expected = {"text_latents": (len(sample["captions"]), *out["text_latents"].shape[1:])}
        for name, shape in expected.items():
            if tuple(out[name].shape) != shape:
                raise ValueError(
                    f"{where}, member .{ENCODER_MEMBERS[name]}: expected shape {shape} "
                    f"(one text latent per json caption), got {tuple(out[name].shape)}"
                )

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

        pipe = self._build_pipeline()
        s = self.stage_cfg
        frozen = set(unused_heads(s.get("objective", "bidiffuser"), bool(s.get("clean_img_term", False))))
        if not s.get("freeze_unused_heads", True):
            frozen = set()
        for name, p in pipe.uvit.named_parameters():
            p.requires_grad_(name.split(".")[0] not in frozen)
        if s.get("train_caption_decoder"):
            for p in pipe.caption_decoder.gpt.parameters():
                p.requires_grad_(True)
            for p in pipe.caption_decoder.decode_prefix.parameters():
                p.requires_grad_(True)
        pipe.uvit.train()
        self.bidiffuser = pipe
        self.ema = EMA(
            pipe.uvit, decay=float(s.get("ema_decay", 0.9999)), warmup=bool(s.get("ema_warmup", True))
        )
        self.ema_uvit = self.ema.module  # registered here: checkpointed as ema_uvit.*
        if self.device_mesh is not None:
            # the EMA copy is sharded the same way, so that its shards line up with the live ones
            shard_uvit(self.bidiffuser.uvit, self.device_mesh, getattr(self.trainer.strategy, "sharding", {}))
            shard_uvit(self.ema_uvit, self.device_mesh, getattr(self.trainer.strategy, "sharding", {}))

    def _build_pipeline(self):
        """The BiDiffuser of `model.bidiffuser`; a checkpoint that does not fit is one ConfigError line."""
        b = self.cfg["model"]["bidiffuser"]
        try:
            return build_bidiffuser(self.cfg)
        except ConfigError:
            raise
        except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
            where = (
                f"model.bidiffuser.uvit={b.get('uvit')}" if b.get("preset") == "v1" else "model.bidiffuser"
            )
            raise ConfigError(
                f"{where} (preset {b.get('preset')}) cannot be loaded: {_one_line(exc)}"
            ) from None

    # -- steps ----------------------------------------------------------------------------------
    def encoder_targets(self, batch: dict) -> dict[str, torch.Tensor]:
        """z0, clip0, y0 for the loss (and the captions' CLIP-L states when the caption decoder trains):
        from the batch's precomputed outputs, or the frozen encoders."""
        pipe = self.bidiffuser
        out = {}
        with torch.no_grad():
            if self.stage_cfg.get("train_caption_decoder"):
                out["clip_text"] = self.cached_clip_text(batch["captions"])
            if "moments" in batch:
                out["z0"] = sample_latent(batch["moments"].to(self.device))
                out["clip0"] = batch["clip_img"].to(self.device)
                out["y0"] = batch["text_latents"].to(self.device)
                return out
            moments, clip_img = self.cached_image_encodings(batch)
            clip_text = out["clip_text"] if "clip_text" in out else self.cached_clip_text(batch["captions"])
            out.update(
                z0=sample_latent(moments, self._generator()),
                clip0=clip_img,
                y0=pipe.caption_decoder.encode_prefix(clip_text),
            )
        return out

    def _cache_limit(self) -> int:
        return int(self.cfg["model"].get("encoder_cache_size") or 0)

    def cached_image_encodings(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen VAE's moments and the CLIP image embedding of each picture, kept per sample id (up to
        `model.encoder_cache_size`) so that later epochs skip the encoders (stage=extract's idea, in memory);
        the latent is still drawn afresh from the moments at every step."""
        pipe, ids, limit = self.bidiffuser, list(batch["ids"]), self._cache_limit()
        todo = [k for k, i in enumerate(ids) if i not in self._image_cache]
        fresh = {}
        if todo:
            enc = pipe.encode_images(batch["images"][todo])
            fresh = {ids[k]: (m, c) for k, m, c in zip(todo, enc["moments"], enc["clip_img"])}
            for i, value in fresh.items():
                if len(self._image_cache) < limit:
                    self._image_cache[i] = value
        pairs = [fresh[i] if i in fresh else self._image_cache[i] for i in ids]
        return torch.stack([m for m, _ in pairs]), torch.stack([c for _, c in pairs])

    def cached_clip_text(self, captions: list[str]) -> torch.Tensor:
        """CLIP text states of each caption, kept per caption (up to `model.encoder_cache_size` x 8)."""
        pipe, limit = self.bidiffuser, 8 * self._cache_limit()
        todo = sorted({c for c in captions if c not in self._text_cache})
        fresh = {}
        if todo:
            fresh = dict(zip(todo, pipe.clip_text(todo)))
            for c, value in fresh.items():
                if len(self._text_cache) < limit:
                    self._text_cache[c] = value
        return torch.stack([fresh[c] if c in fresh else self._text_cache[c] for c in captions])

    def _generator(self) -> torch.Generator:
        # a fresh latent draw per step (the pipeline's own default is its fixed sampler seed)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch, batch_idx):
        pipe = self.bidiffuser
        t = self.encoder_targets(batch)
        s = self.stage_cfg
        losses = bidiffuser_loss(
            pipe.uvit,
            pipe.schedule,
            t["z0"],
            t["clip0"],
            t["y0"],
            objective=s.get("objective", "bidiffuser"),
            alpha=float(s.get("alpha", 1.0)),
            shared_timestep=shared_timestep_for(s),
            clean_img_term=bool(s.get("clean_img_term", False)),
            offset_noise=float(s.get("offset_noise") or 0.0),
            cond_drop=float(s.get("cond_drop") or 0.0),
        )
        loss = losses["loss"]
        bs = t["z0"].shape[0]
        if s.get("train_caption_decoder"):
            dec_loss = self.caption_decoder_loss(batch["captions"], t["clip_text"])
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
        ids = [tok(c, add_special_tokens=False)["input_ids"][:60] + [dec.eos_token_id] for c in captions]
        width = max(len(x) for x in ids)
        tokens = torch.zeros(len(ids), width, dtype=torch.long, device=clip_text.device)
        mask = torch.zeros_like(tokens)
        for i, x in enumerate(ids):
            tokens[i, : len(x)] = torch.tensor(x, device=tokens.device)
            mask[i, : len(x)] = 1
        return dec(tokens, clip_text, mask)

    def on_train_start(self) -> None:
        self._ema_step = self.trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.trainer.global_step
        if step == self._ema_step:
            return  # gradient accumulation: no optimiser step since the last update
        self._ema_step = step
        # the warmup follows the optimiser step, so a resumed run continues the same decay schedule
        self.ema.num_updates = step - 1
        self.ema.update(self.bidiffuser.uvit)

    def validation_step(self, batch, batch_idx):
        return self.predict_captions(batch)

    @contextlib.contextmanager
    def ema_weights(self):
        """The pipeline with the EMA U-ViT in place of the live one (what the stage exports)."""
        live = self.bidiffuser.uvit
        self.bidiffuser.uvit = self.ema_uvit
        try:
            yield self.bidiffuser
        finally:
            self.bidiffuser.uvit = live

    @torch.no_grad()
    def predict_captions(self, batch):
        with self.ema_weights() as pipe:
            texts = pipe.caption(batch["images"])
        return {"ids": batch["ids"], "predictions": texts, "references": batch["references"]}

    def generate_images(self, prompts: list[str]):
        """Pictures for `prompts` from the EMA weights, as the exported BiDiffuser draws them."""
        with self.ema_weights() as pipe:
            return pipe.generate(prompts)

    def flops_per_sample(self) -> float:
        # the paper's objective runs every sample through the U-ViT twice (t2i and i2t halves)
        passes = 2 if self.stage_cfg.get("objective", "bidiffuser") == "bidiffuser" else 1
        return passes * float(self.bidiffuser.uvit.flops_per_sample(train=True))

    # -- optimisation and checkpoints -------------------------------------------------------------
    def configure_optimizers(self):
        total = (
            self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        )
        return build_optimizer(self.trainer.model.named_parameters(), self.cfg["optim"], int(total))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad} | {
            f"ema_uvit.{n}" for n, _ in self.ema_uvit.named_parameters()
        }
        if self.clip_fitted:  # frozen, but fitted in this run (callbacks/clip_fit.py): a resume needs them
            keep |= {n for n, _ in self.named_parameters() if n.startswith(CLIP_TOWERS)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def ema_pipeline_state(self) -> dict:
        """The whole pipeline's weights with the EMA U-ViT in place of the live one."""
        sd = {k: v for k, v in _full_state(self.bidiffuser).items() if not k.startswith("uvit.")}
        sd.update({f"uvit.{k}": v for k, v in _full_state(self.ema_uvit).items()})
        return sd

    def export_artifacts(self, out: Path) -> dict:
        """`bidiffuser/uvit_ema.pth` (UniDiffuser's key format, `load_uvit` reads it), `bidiffuser/uvit_config.json`
        (the fields the weights do not imply, e.g. `num_heads`: pass them to `load_uvit` or as
        `model.bidiffuser.uvit_config`) and `bidiffuser/bidiffuser.safetensors` (every part, for
        `model.bidiffuser.weights`)."""
        folder = Path(out) / "bidiffuser"
        state = self.ema_pipeline_state()  # collective under FSDP: every rank gathers
        if self.trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            config = dataclasses.asdict(self.ema_uvit.config)
            uvit = load_uvit({k[5:]: v for k, v in state.items() if k.startswith("uvit.")}, **config)
            save_uvit(uvit, folder / "uvit_ema.pth")
            (folder / "uvit_config.json").write_text(json.dumps(config, indent=2))
            save_state_dict_file(
                {k: v.contiguous() for k, v in state.items()}, folder / "bidiffuser.safetensors"
            )
        return {
            "uvit_ema": str(folder / "uvit_ema.pth"),
            "uvit_config": str(folder / "uvit_config.json"),
            "bidiffuser_weights": str(folder / "bidiffuser.safetensors"),
        }
