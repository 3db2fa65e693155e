"""A training checkpoint -> an export folder that loads without this framework's training code:

    python -m easygen.stages.export RUN/checkpoints/last.ckpt OUT

The checkpoint may be a file, a sharded `strategy=fsdp` folder or a DeepSpeed folder (consolidated on
the fly). Its stored config rebuilds the models the way the stage built them (frozen parts from their
sources, tiny presets from their seed), the trained tensors are loaded on top, LoRA adapters are merged,
and `easygen.export.export_model` writes the folder: the LLM in transformers format, the projector, the
BiDiffuser in UniDiffuser's key format, and a config that `stage=chat` and `stage=eval` accept:

    python run.py --config-dir OUT +export=easygen stage=chat
    python run.py --config-dir OUT +export=easygen stage=eval task=coco_caption

This is the config layer's half; the folder format and `load_export` are plain PyTorch (`easygen.export`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from easygen.errors import ConfigError
from easygen.export import export_model
from easygen.lit.bidiffuser_module import BiDiffuserModule
from easygen.lit.log_setup import single_handler
from easygen.stages.build import lightning_module
from easygen.stages.consolidate import load_full_checkpoint

log = logging.getLogger("easygen")


def module_from_checkpoint(checkpoint: dict, source: str = "checkpoint"):
    """The stage's LightningModule, built from the checkpoint's config, with its trained tensors loaded.
    Keys the module does not have are an error (the checkpoint belongs to another model)."""
    cfg = (checkpoint.get("hyper_parameters") or {}).get("cfg")
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"{source}: no `hyper_parameters.cfg` in the checkpoint: not written by this framework's stages"
        )
    init = cfg.get("init_from")
    if init and not Path(str(init)).exists():
        log.warning("%s: init_from=%s is gone; the checkpoint's own tensors are used", source, init)
        cfg = {**cfg, "init_from": None}
    module = lightning_module(cfg)
    # the checkpoint carries the projector's feature statistics (model.projector.standardize): nothing is
    # fitted here (that is a training callback), so no training data is read
    module.configure_model()
    state = checkpoint["state_dict"]
    own = module.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        raise ConfigError(f"{source}: tensors this model does not have, e.g. {unexpected[:3]}")
    bad = sorted(k for k in state if own[k].shape != state[k].shape)
    if bad:
        raise ConfigError(f"{source}: shapes differ for {bad[:3]}")
    module.load_state_dict(state, strict=False)
    projector = getattr(getattr(module, "model", None), "projector", None)
    if getattr(projector, "needs_fit", False):
        log.warning(
            "%s: model.projector.standardize is on but the checkpoint holds no fitted feature statistics; "
            "features pass unscaled",
            source,
        )
    return module.eval()


def export_checkpoint(ckpt: str, out: str) -> Path:
    checkpoint = load_full_checkpoint(ckpt)
    module = module_from_checkpoint(checkpoint, source=str(ckpt))
    model_cfg = module.cfg["model"]
    if isinstance(module, BiDiffuserModule):
        raise ConfigError(
            f"{ckpt} is a stage=bidiffuser checkpoint: its run folder already holds bidiffuser/uvit_ema.pth "
            "(UniDiffuser's format); export the EasyGen checkpoint of a pretrain or instruct run"
        )
    if not module.standalone_llm_export:
        raise ConfigError(f"{ckpt}: exporting the FlanT5 variant is not supported (decoder-only LLMs only)")
    return export_model(
        out,
        llm=module.model.llm,
        tokenizer=module.tokenizer,
        projector=module.model.projector,
        model_config=model_cfg,
        bidiffuser=module.bidiffuser,
        source=str(Path(ckpt).resolve()),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m easygen.stages.export", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "checkpoint", help="a checkpoint of stage=pretrain or stage=instruct (file or sharded folder)"
    )
    ap.add_argument("out", help="the folder to write")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    single_handler()
    torch.set_grad_enabled(False)
    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    print(f"exported to {out}\n  python run.py --config-dir {out} +export=easygen stage=chat")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
