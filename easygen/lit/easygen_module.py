"""The LightningModule of the LLM side: alignment (`stage=pretrain`) and instruction tuning
(`stage=instruct`, `lora=off|on`), evaluation by generation, with a decoder-only LLM (Vicuna-7B in the
paper). What is frozen, where the image features come from and which loss runs are configuration
(SPEC §4, §5). A variant with another kind of LLM subclasses it and overrides the steps that differ
(`build_model`, `forward_loss`, `generate_texts`, ...); `model.module` names the class a model config
trains."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from data_modules.stage_datamodule import log_skipped
from easygen.assets import is_shipped
from easygen.checkpoint import load_state_dict_file, record_load, save_state_dict_file, stored_config
from easygen.clean_text import clean_text
from easygen.errors import ConfigError
from easygen.factories import build_bidiffuser, build_projector
from easygen.lit.config import instantiate
from easygen.lit.fsdp import shard_easygen
from easygen.lit.optim import build_optimizer
from easygen.llm.collate import EasyGenCollator
from easygen.llm.lora import apply_lora, save_merged
from easygen.llm.model import EasyGen

log = logging.getLogger("easygen")


class EasyGenModule(pl.LightningModule):
    # builds the training and evaluation batches from the samples (prompt template, image marker, labels)
    collator_class = EasyGenCollator
    # the LLM is a decoder-only transformers model that `easygen.export` can write as a standalone folder
    # (`stage.export_merged`, `python -m easygen.stages.export`)
    standalone_llm_export = True

    def __init__(self, cfg: dict):
        super().__init__()
        cfg = bidiffuser_of_init_from(cfg)
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.stage_cfg = cfg["stage"]
        self.lora_cfg = cfg.get("lora") or {"enabled": False}
        # frozen parts come back from their sources; checkpoints hold what was trained
        self.strict_loading = False
        self.feature_source = self.stage_cfg.get("feature_source", "auto")
        # the "shuffled images" control: captions trained against other samples' pictures
        self.shuffle_features = bool(self.stage_cfg.get("shuffle_features", False))
        self.check_config()
        self.tokenizer = instantiate(cfg["model"]["llm"]["tokenizer"])
        m = cfg["model"]
        kw = dict(
            template=m["template"],
            max_length=int(m["max_length"]),
            num_image_tokens=int(m["num_image_tokens"]),
        )
        # caption-as-image: features come from the captions in the step, no pixels are loaded
        kw["deferred_features"] = self.feature_source == "captions"
        self.train_collator = self.collator_class(self.tokenizer, seed=int(cfg.get("seed", 0)), **kw)
        self.eval_collator = self.collator_class(self.tokenizer, seed=0, **kw)
        self.eval_collator.eval_mode = True
        self.model = None
        self.bidiffuser = None
        self.last_batch_size = 0
        self.last_num_tokens = 0
        self._feature_cache: dict[str, torch.Tensor] = {}

    def check_config(self) -> None:
        """Settings this LLM cannot train with, refused before anything is built (none here)."""

    # -- data -----------------------------------------------------------------------------------
    @property
    def needs_images(self) -> bool:
        # with caption-as-image training, evaluation still reads the pictures (i2t features of the
        # real image: what the model will see at inference)
        return self.feature_source in ("auto", "on_the_fly", "captions")

    def collate(self, samples: list[dict]) -> dict:
        batch = self.train_collator(samples)
        if self.feature_source == "captions":
            # caption-as-image (SPEC §4): a reference caption stands in for the picture
            rng = self.train_collator.rng  # seeded: hash() of strings changes from run to run
            pictured = [s for s, h in zip(samples, batch["has_image"].tolist()) if h]
            missing = [s.get("id", "?") for s in pictured if not s.get("captions")]
            if missing:
                raise ValueError(f"samples {missing[:3]}: stage.feature_source=captions needs the 'captions' of "
                                 "every sample with a picture (they stand in for it)")
            batch["feature_texts"] = [rng.choice(s["captions"]) for s in pictured]
            batch["images"] = None  # read for evaluation only
        return batch

    def eval_collate(self, samples: list[dict]) -> dict:
        return self.eval_collator(samples)

    # -- model ----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        llm = instantiate(self.cfg["model"]["llm"]["net"], tokenizer=self.tokenizer)
        if self.cfg["model"]["llm"].get("gradient_checkpointing"):
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = self.build_model(llm)
        if self.feature_source != "extracted":
            self.bidiffuser = build_bidiffuser(self.cfg)
        self._set_trainable()
        if self.cfg.get("init_from"):
            self.load_weights(self.cfg["init_from"])
        if getattr(self.model.projector, "needs_fit", False) and self.stage_cfg.get("kind") != "train":
            # eval/chat read the statistics from init_from; without them the features pass unchanged
            # (training fits them at fit start: callbacks/feature_standardizer.py)
            log.warning("model.projector.standardize: no fitted statistics in init_from; features unscaled")
        if self.device_mesh is not None:
            self.shard(self.device_mesh, getattr(self.trainer.strategy, "sharding", {}))

    def build_model(self, llm: nn.Module) -> nn.Module:
        """The LLM and the projector assembled: image tokens spliced into the LLM's input embeddings."""
        return EasyGen(llm, build_projector(self.cfg), tokenizer=self.tokenizer)

    def shard(self, device_mesh, strategy_cfg: dict) -> None:
        """FSDP2 (`strategy=fsdp`): one unit per decoder layer (easygen/lit/fsdp.py)."""
        shard_easygen(self, device_mesh, strategy_cfg)

    @property
    def llm(self):
        """The language model inside the EasyGen wrapper."""
        return self.model.llm

    def _set_trainable(self) -> None:
        m = self.model
        for p in m.parameters():
            p.requires_grad_(False)
        for p in m.projector.parameters():
            p.requires_grad_(True)
        self._set_llm_trainable(m)

    def _set_llm_trainable(self, m: nn.Module) -> None:
        """What of the LLM trains: LoRA adapters (`lora=on`), the whole LLM (`stage.train_llm`), the
        lm_head (`stage.train_lm_head`), or nothing."""
        # eval/chat load adapters trained by instruct, so they apply LoRA too
        uses_adapters = self.stage_cfg.get("train_llm") or self.stage_cfg.get("kind") in ("eval", "chat")
        if self.lora_cfg.get("enabled") and uses_adapters:
            m.llm = apply_lora(
                m.llm,
                r=int(self.lora_cfg["r"]),
                alpha=int(self.lora_cfg["alpha"]),
                dropout=float(self.lora_cfg["dropout"]),
                target_modules=self.lora_cfg.get("target_modules", "all-linear"),
            )
        elif self.stage_cfg.get("train_llm"):
            for p in m.llm.parameters():
                p.requires_grad_(True)
        if self.stage_cfg.get("train_lm_head") and not self.lora_cfg.get("enabled"):
            for p in m.llm.get_output_embeddings().parameters():
                p.requires_grad_(True)
        m.llm.train(self.stage_cfg.get("train_llm", False))

    def load_weights(self, path: str) -> None:
        """Start from a previous stage's weights (a Lightning checkpoint or a state dict file)."""
        if not Path(path).exists():
            raise ConfigError(
                f"init_from={path} does not exist: set init_from to a checkpoint of an earlier stage"
            )
        sd = load_state_dict_file(path)
        own = self.state_dict()
        picked = {k: v for k, v in sd.items() if k in own and k.startswith("model.")}
        if not picked:
            raise ConfigError(
                f"init_from={path} holds no weights of this model (expected keys under 'model.')"
            )
        bad = [k for k, v in picked.items() if own[k].shape != v.shape]
        if bad:
            raise ConfigError(f"init_from={path}: shapes differ for {bad[:5]}")
        self.load_state_dict(picked, strict=False)
        record_load(self, "init_from", path, len(picked))
        log.info("loaded %d tensors from %s", len(picked), path)

    def on_fit_start(self) -> None:
        # after the callbacks' on_fit_start: callbacks/feature_standardizer.py fits the statistics there
        if getattr(self.model.projector, "needs_fit", False):
            raise ConfigError(
                "model.projector.standardize=true but nothing fitted the projector's feature statistics: keep "
                "callbacks.feature_standardizer (conf/callbacks/default.yaml) or set model.projector.standardize=false"
            )

    # -- features -------------------------------------------------------------------------------
    def image_features(self, batch: dict, use_cache: bool = True) -> torch.Tensor | None:
        if not bool(batch["has_image"].any()):
            return None
        if batch.get("features") is not None and self.feature_source in ("auto", "extracted"):
            return batch["features"]
        if self.feature_source == "extracted":
            raise ConfigError(
                "stage.feature_source=extracted but the shards carry no features: run stage=extract "
                "and point data.* at its output, or set stage.feature_source=on_the_fly"
            )
        with torch.no_grad():
            if self.feature_source == "captions" and batch.get("feature_texts"):
                return self.bidiffuser.text_features(batch["feature_texts"])
            if batch.get("images") is None:
                raise ValueError(
                    f"batch {batch['ids'][:3]}...: image samples carry neither features nor pixels"
                )
            return self.cached_i2t(batch) if use_cache else self.bidiffuser.i2t_features(batch["images"])

    def cached_i2t(self, batch: dict) -> torch.Tensor:
        """i2t features on the fly, kept per sample id (up to `model.feature_cache_size`) so that later
        epochs do not run the 50-step sampler again for the same picture (the stage=extract idea, in memory)."""
        ids = [i for i, h in zip(batch["ids"], batch["has_image"].tolist()) if h]
        limit = int(self.cfg["model"].get("feature_cache_size") or 0)
        if not limit:
            return self.bidiffuser.i2t_features(batch["images"])
        todo = [k for k, i in enumerate(ids) if i not in self._feature_cache]
        if todo:
            feats = self.bidiffuser.i2t_features(batch["images"][todo])
            for k, f in zip(todo, feats):
                if len(self._feature_cache) < limit:
                    self._feature_cache[ids[k]] = f.detach().to("cpu", torch.float16)
            if len(todo) == len(ids):
                return feats
            fresh = dict(zip([ids[k] for k in todo], feats))
        else:
            fresh = {}
        dev = batch["images"].device
        return torch.stack(
            [fresh[i] if i in fresh else self._feature_cache[i].to(dev, torch.float32) for i in ids]
        )

    def shuffled(self, feats: torch.Tensor) -> torch.Tensor:
        """The batch's image features permuted across samples by a seeded derangement (no caption keeps
        its own picture): the "shuffled images" control of the recipe. The permutation depends on the
        seed and the global step only, so a rerun trains on the same mismatched pairs."""
        n = feats.shape[0]
        if n < 2:
            return feats
        gen = torch.Generator().manual_seed(int(self.cfg.get("seed", 0)) * 1_000_003 + int(self.global_step))
        return feats[derangement(n, gen).to(feats.device)]

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        feats = self.image_features(batch)
        if self.shuffle_features and feats is not None:
            feats = self.shuffled(feats)
        out = self.forward_loss(batch, feats)
        bs = batch["input_ids"].shape[0]
        self.last_batch_size = bs
        self.last_num_tokens = int(batch["attention_mask"].sum())
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        log_skipped(self)
        return out.loss

    def forward_loss(self, batch: dict, feats: torch.Tensor | None):
        """The model's output on a training batch (`.loss`: the LM loss on the answer tokens)."""
        return self.model(
            batch["input_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
            features=feats,
            image_positions=batch["image_positions"],
            has_image=batch["has_image"],
        )

    def validation_step(self, batch, batch_idx):
        return self.predict_captions(batch)

    def test_step(self, batch, batch_idx):
        return self.predict_captions(batch)

    @torch.no_grad()
    def predict_captions(self, batch, max_new_tokens: int | None = None, num_beams: int | None = None):
        feats = self.image_features(batch)
        max_new_tokens = int(max_new_tokens or self.stage_cfg.get("max_new_tokens", 24))
        num_beams = int(num_beams or self.stage_cfg.get("num_beams", 1))
        texts = self.generate_texts(batch, feats, max_new_tokens, num_beams)
        # whole sequences were decoded (special tokens skipped); what a byte-level BPE leaves that is not
        # text (U+FFFD of invalid UTF-8, control bytes) is dropped: easygen/clean_text.py
        texts = [clean_text(t) for t in texts]
        out = {"ids": list(batch["ids"]), "predictions": texts, "references": batch["references"]}
        if batch.get("images") is not None and len(batch["images"]) == int(batch["has_image"].sum()):
            # the pictures ([3, H, W] in [0, 1]) beside their ids, for the sample tables of
            # callbacks/caption_eval.py; the collator stacks the pictures of image samples only
            pictures = iter(batch["images"])
            out["images"] = [next(pictures) if h else None for h in batch["has_image"].tolist()]
        return out

    def generate_texts(
        self, batch: dict, feats: torch.Tensor | None, max_new_tokens: int, num_beams: int
    ) -> list[str]:
        """The decoded answers to the batch's prompts (greedy or beam search)."""
        return self.model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            features=feats,
            image_positions=batch["image_positions"],
            has_image=batch["has_image"],
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
        )

    def generate_images(self, prompts: list[str]):
        if self.bidiffuser is None:
            raise RuntimeError("text-to-image needs the BiDiffuser (stage.feature_source is 'extracted')")
        return self.bidiffuser.generate(prompts)

    def flops_per_sample(self) -> float:
        seq = max(1, self.last_num_tokens // max(1, self.last_batch_size))
        return self.flops_per_token(seq) * seq

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of a `seq_len`-token sample (easygen/llm/model.py)."""
        return float(self.model.flops_per_token(seq_len=seq_len, training=True))

    # -- optimisation and checkpoints -------------------------------------------------------------
    def configure_optimizers(self):
        total = (
            self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        )
        return build_optimizer(self.trainer.model.named_parameters(), self.cfg["optim"], int(total))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # keep what was trained: the projector, LoRA adapters or the LLM; frozen parts load from their sources
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in trainable or ".projector.feature_" in k
        }

    def trained_state(self) -> dict:
        """What this stage trained (projector, LoRA adapters or LLM), gathered to full tensors.
        Every rank calls it under FSDP."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            # the projector's fitted feature statistics (model.projector.standardize) travel with it
            if k in trainable or ".projector.feature_" in k
        }

    def export_artifacts(self, out: Path) -> dict:
        """`easygen/trained.safetensors`: the trained weights, which the next stage's `init_from` reads."""
        state = self.trained_state()
        path = Path(out) / "easygen" / "trained.safetensors"
        if self.trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            # the config travels with the weights: a later init_from finds the BiDiffuser they were
            # trained with (bidiffuser_of_init_from)
            save_state_dict_file(state, path, config=self.cfg)
            self.tokenizer.save_pretrained(str(path.parent / "tokenizer"))
        artifacts = {"weights": str(path)}
        if self.lora_cfg.get("enabled") and self.stage_cfg.get("export_merged") and self.standalone_llm_export:
            artifacts["merged_llm"] = str(self.export_merged(Path(out) / "easygen" / "merged"))
        return artifacts

    def export_merged(self, folder: Path) -> Path:
        """The LoRA adapters folded into the LLM's weights: a standalone transformers folder (safetensors,
        config, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads without peft; the projector
        stays in `trained.safetensors`."""
        if self.device_mesh is not None:
            raise ConfigError("stage.export_merged needs an unsharded model: merge from a single-process run")
        if self._trainer is None or self.trainer.is_global_zero:
            save_merged(self.model.llm, self.tokenizer, folder)
        return folder


def bidiffuser_of_init_from(cfg: dict) -> dict:
    """The config with the BiDiffuser (and tiny LLM) that `init_from`'s weights were trained with.

    The projector (and LoRA) learned the features of one BiDiffuser (paper §3: the LLM reads BiDiffuser's
    image-to-text features), and text-to-image draws with the same one. A checkpoint holds only what its
    stage trained, but its stored config names that BiDiffuser (`model.bidiffuser.weights`, set by the
    recipe or the command line). When this run leaves `model.bidiffuser.weights` unset or at the preset's
    own shipped file (easygen/assets), it is taken from there, so `stage=eval|chat|serve init_from=RUN/...`
    uses the fine-tuned BiDiffuser of the run it comes from, not the preset's own weights. A value set here
    wins (with a warning when it differs). `model.llm.weights` (the tiny LLM a projector was aligned to)
    follows the same rule."""
    init = cfg.get("init_from")
    if not init or not Path(str(init)).is_file():
        return cfg  # no init_from, or a missing one: load_weights names it
    stored = stored_config(init) or {}
    model = dict(cfg["model"])
    llm, theirs_llm = dict(model["llm"]), ((stored.get("model") or {}).get("llm") or {})
    if (theirs_llm.get("preset") == llm.get("preset") and "weights" in theirs_llm and is_shipped(llm.get("weights"))
            and not _same(theirs_llm["weights"], llm["weights"])):
        log.info("model.llm.weights=%s (the LLM init_from=%s was trained with)", theirs_llm["weights"], init)
        model["llm"] = {**llm, "weights": theirs_llm["weights"],
                        "net": {**llm.get("net", {}), "weights": theirs_llm["weights"]}}
    theirs_b = (stored.get("model") or {}).get("bidiffuser") or {}
    b = model["bidiffuser"]
    theirs, ours = theirs_b.get("weights"), b.get("weights")
    if theirs_b.get("preset") != b.get("preset") or not theirs or _same(theirs, ours):
        return {**cfg, "model": model}
    if ours and not is_shipped(ours):
        log.warning(
            "init_from=%s was trained with model.bidiffuser.weights=%s; this run uses %s", init, theirs, ours
        )
        return {**cfg, "model": model}
    if not Path(str(theirs)).is_file():
        raise ConfigError(
            f"init_from={init} was trained with model.bidiffuser.weights={theirs}, which does not exist: set "
            "model.bidiffuser.weights to that BiDiffuser's weights (bidiffuser/bidiffuser.safetensors of its "
            "stage=bidiffuser run)"
        )
    log.info("model.bidiffuser.weights=%s (the BiDiffuser init_from=%s was trained with)", theirs, init)
    return {**cfg, "model": {**model, "bidiffuser": {**b, "weights": theirs}}}


def _same(a, b) -> bool:
    if not a or not b:
        return not a and not b
    return Path(str(a)).resolve() == Path(str(b)).resolve()


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of range(n) with no fixed point (n >= 2), by rejection: about e
    draws on average."""
    if n < 2:
        raise ValueError(f"no derangement of {n} element(s)")
    ar = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == ar).any()):
            return perm
