"""`stage=eval task=coco_caption|vqa|t2i`: evaluates a checkpoint (`ckpt_path=` or `init_from=`) on the
test split across ranks and writes `results.json` plus the per-sample predictions (`predictions.json`,
COCO results format for captions) so that others can check the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_class
from pycocoevalcap.cider.cider import Cider

from callbacks.caption_eval import CaptionEvalCallback
from callbacks.progress import StepProgressBar
from data_modules.stage_datamodule import StageDataModule
from data_modules.synthetic_reader import attribute_accuracy, parse_caption, read_picture
from easygen.checkpoint import loaded_weights
from easygen.errors import ConfigError
from easygen.metrics import clip_score, fid_score, ptb_tokenize, require_torch_fidelity, vqa_scores
from easygen.stages import build
from easygen.stages.checkpoints import resolve_ckpt
from easygen.stages.common import container, ensure_data, output_dir


def _module(cfg):
    """The LightningModule the model config names (`model.module`: EasyGenModule, or EasyGenT5Module
    for the FlanT5 presets), with the checkpoint as `init_from`."""
    plain = container(cfg)
    if cfg.get("ckpt_path") and not cfg.get("init_from"):
        plain["init_from"] = resolve_ckpt(cfg.ckpt_path, output_dir(cfg))
    if not plain["model"].get("module"):
        raise ConfigError(
            "model.module is not set: name the LightningModule of the model's LLM side, e.g. "
            "model.module=easygen.lit.easygen_module.EasyGenModule (conf/model/*.yaml)"
        )
    return get_class(plain["model"]["module"])(plain)


def eval_stage(cfg) -> dict:
    task = str(cfg.task)
    if task not in ("coco_caption", "vqa", "t2i"):
        raise ConfigError(f"unknown task={task}: choose task=coco_caption|vqa|t2i")
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    ensure_data(cfg)
    module = _module(cfg)
    if task == "t2i":
        return t2i_eval(cfg, module, out)
    dm = build.datamodule(cfg, module)
    cb = VQAEvalCallback(prefix="test") if task == "vqa" else CaptionEvalCallback(prefix="test")
    trainer = build.trainer(
        cfg,
        logger=False,
        callbacks=[cb, *([StepProgressBar()] if cfg.trainer.enable_progress_bar else [])],  # "Evaluating"
        enable_checkpointing=False,
    )
    trainer.validate(module, dataloaders=dm.test_dataloader(), verbose=False)
    preds = cb.last_predictions
    if trainer.is_global_zero:
        (out / "predictions.json").write_text(json.dumps(prediction_rows(task, preds), indent=1))
    metrics = {f"test/{k}": float(v) for k, v in cb.last_scores.items()}
    return {
        "global_step": 0,
        "task": task,
        "metrics": metrics,
        "best": {},
        "checkpoints": {},
        "num_samples": len(preds),
        "loaded": loaded_weights(module),
        "artifacts": {"predictions": str(out / "predictions.json")},
    }


def _result_id(key: str) -> int | str:
    """COCO and VQAv2 ids are integers in their results files (``cocoid``, ``question_id``); other
    sets keep their string ids."""
    return int(key) if key.isdigit() else key


def prediction_rows(task: str, predictions: dict[str, str]) -> list[dict]:
    """Per-sample predictions in the official results formats, sorted by id: COCO captions
    ``[{"image_id", "caption"}]``, VQAv2 ``[{"question_id", "answer"}]``."""
    field, text = ("image_id", "caption") if task == "coco_caption" else ("question_id", "answer")
    rows = [{field: _result_id(k), text: v} for k, v in predictions.items()]
    return sorted(rows, key=lambda r: (isinstance(r[field], str), r[field]))


class VQAEvalCallback(CaptionEvalCallback):
    """The caption callback's gathering and de-duplication, scored by the VQAv2 accuracy rule."""

    def score(self, predictions: dict, references: dict) -> dict:
        return vqa_scores(predictions, references)


def t2i_eval(cfg, module, out: Path) -> dict:
    """Pictures for the test captions (the first reference of each), saved as PNGs, and their scores:

    - `test/t2i_roundtrip_CIDEr`: each picture captioned by the model itself (its image-to-text path),
      scored against the sample's references (any dataset);
    - `test/t2i_attr/<attribute>` (and `<attribute>_chance`, the most frequent true value's rate): for
      prompts that name every attribute of the synthetic set, the attributes read back from the pixels by
      `data_modules/synthetic_reader.py` (no model involved) against those the prompt names;
    - CLIP score and FID when their local weights are configured (`stage.clip_model`, `stage.inception`)."""
    # weights for the scores are read from local paths: check them before generating anything
    for key in ("clip_model", "inception"):
        value = cfg.stage.get(key)
        if value and not Path(str(value)).exists():
            raise ConfigError(
                f"stage.{key}={value} does not exist (local weights only; null skips that score)"
            )
    if cfg.stage.get("inception"):

        require_torch_fidelity()  # FID from a weights file needs the `fid` extra
    module.configure_model()
    dm = StageDataModule(
        test=cfg.data.test, image_size=int(cfg.model.image_size), batch_size=8, num_workers=0
    )
    ds = dm.eval_dataset("test")
    limit = int(cfg.stage.get("t2i_limit") or len(ds))
    samples = [s for s in (ds[i] for i in range(min(limit, len(ds)))) if s is not None]
    prompts = [s["captions"][0] for s in samples]
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(0, len(prompts), 8):
        images += module.generate_images(prompts[i : i + 8])
    for s, im in zip(samples, images):
        im.save(folder / f"{s['id']}.png")
    metrics = {"test/num_images": float(len(images))}
    roundtrip = roundtrip_captions(module, samples, images)
    metrics["test/t2i_roundtrip_CIDEr"] = cider_score(roundtrip, {s["id"]: s["captions"] for s in samples})
    readings = attribute_readings(prompts, images)
    if readings is not None:
        acc = attribute_accuracy([r for r, _ in readings], [t for _, t in readings])
        metrics.update({f"test/t2i_attr/{k}": float(v) for k, v in acc.items()})
    fake = torch.stack([torch.as_tensor(np.array(im)).permute(2, 0, 1) for im in images])
    real = torch.stack([(s["image"] * 255).round().to(torch.uint8) for s in samples])
    if cfg.stage.get("clip_model"):
        metrics["test/CLIPScore"] = float(clip_score(fake, prompts, str(cfg.stage.clip_model)))
    if cfg.stage.get("inception"):
        metrics["test/FID"] = float(fid_score(real, fake, str(cfg.stage.inception)))
    (out / "predictions.json").write_text(
        json.dumps(
            [
                {
                    "image_id": s["id"],
                    "prompt": p,
                    "file": f"images/{s['id']}.png",
                    "caption_of_picture": roundtrip[s["id"]],
                    **({"read": readings[k][0], "named": readings[k][1]} if readings is not None else {}),
                }
                for k, (s, p) in enumerate(zip(samples, prompts))
            ],
            indent=1,
        )
    )
    return {
        "global_step": 0,
        "task": "t2i",
        "metrics": metrics,
        "best": {},
        "checkpoints": {},
        "artifacts": {"images": str(folder)},
        "loaded": loaded_weights(module),
    }


def roundtrip_captions(module, samples: list[dict], images: list) -> dict[str, str]:
    """The model's own caption of each generated picture (its image-to-text path on the pixels; any
    precomputed features of the real picture are dropped), keyed by the sample's id."""
    rows = []
    for s, im in zip(samples, images):
        row = {k: v for k, v in s.items() if k != "features"}
        row["image"] = torch.as_tensor(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0
        row["id"] = f"t2i:{s['id']}"  # not the real picture's id: on-the-fly feature caches key on it
        rows.append(row)
    out = {}
    for i in range(0, len(rows), 8):
        pred = module.predict_captions(module.eval_collate(rows[i : i + 8]))
        out.update({sid.removeprefix("t2i:"): text for sid, text in zip(pred["ids"], pred["predictions"])})
    return out


def cider_score(predictions: dict[str, str], references: dict[str, list[str]]) -> float:
    """CIDEr-D of one caption per id against its references (PTB-tokenised, as pycocoevalcap scores)."""
    gts, res = ptb_tokenize({k: references[k] for k in predictions}, predictions)
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def attribute_readings(prompts: list[str], images: list) -> list[tuple[dict, dict]] | None:
    """(read from the pixels, named by the prompt) per picture, when every prompt names all of the
    synthetic set's attributes; else None (other datasets)."""
    named = [parse_caption(p) for p in prompts]
    if not named or any(v is None for n in named for v in n.values()):
        return None
    return [(read_picture(im), n) for im, n in zip(images, named)]
