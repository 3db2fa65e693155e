"""Which checkpoint a run resumes from (`ckpt_path=PATH|last`) and whether it fits this run's settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from easygen.errors import ConfigError
from easygen.lit.strategies import META_FILENAME, is_sharded_checkpoint
from easygen.stages.common import container, differences, flatten


def complete_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint folder with both its tensor index and its metadata."""
    return path.is_file() or is_sharded_checkpoint(path)


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was saved at (its metadata, not its file name)."""
    meta = path / META_FILENAME if path.is_dir() else path
    return int(torch.load(meta, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))


def resolve_ckpt(ckpt_path, out: Path) -> str | None:
    """`ckpt_path` as a path: `last` is the newest complete `last*.ckpt` of the run directory `out`."""
    if ckpt_path in (None, "", "null"):
        return None
    if str(ckpt_path) == "last":
        folder = out / "checkpoints"
        # `.last.ckpt.old` is the previous sharded checkpoint when a crash hit the swap of a newer one
        found = [
            p for p in [*folder.glob("last*.ckpt"), *folder.glob(".last*.ckpt.old")] if complete_checkpoint(p)
        ]
        if not found:
            raise ConfigError(
                f"ckpt_path=last but {folder} has no complete last.ckpt: set ckpt_path=/path/to.ckpt"
            )
        return str(max(found, key=lambda p: (checkpoint_step(p), p.stat().st_mtime)))
    if not Path(str(ckpt_path)).exists():
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not exist: set ckpt_path to a checkpoint file or `last`"
        )
    return str(ckpt_path)


# settings that decide the model's parameters and optimizer groups: a checkpoint resumes only under the same
RESUME_KEYS = ("model.", "lora.", "stage.module", "stage.train_llm", "stage.train_lm_head", "stage.objective",
               "stage.freeze_unused_heads", "stage.train_caption_decoder")


def check_resume(cfg, ckpt: str) -> None:
    """Resuming under other model, LoRA or trainable-part settings than the checkpoint was saved with fails
    deep inside the optimizer's state loading; say which settings differ instead, and how to restore them."""
    path = Path(ckpt)
    meta = torch.load(path / META_FILENAME if path.is_dir() else path, map_location="cpu", weights_only=False,
                      mmap=True)
    saved = (meta.get("hyper_parameters") or {}).get("cfg")
    if not saved:
        return

    def flat(c):
        return {k: v for k, v in flatten(c).items() if k.startswith(RESUME_KEYS)}

    diff = differences(flat(saved), json.loads(json.dumps(flat(container(cfg)), default=str)))
    if diff:
        raise ConfigError(
            f"ckpt_path={ckpt} was saved with other settings than this run has: {'; '.join(diff)}. "
            "Resume with the overrides the run was started with (e.g. lora=on), or start a new run"
        )
