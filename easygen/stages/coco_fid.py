"""`stage=eval task=coco_fid`: MS-COCO 256x256 text-to-image FID as UniDiffuser measures it (the paper's
text-to-image table: EasyGen 7.68, UniDiffuser 8.12).

- `stage.n` captions (30,000) drawn with `stage.coco_fid.seed` from the val2014 captions file, one
  picture each (BiDiffuser's text-to-image path, the noise seeded per batch);
- the reference: the val2014 pictures of that file, center-cropped to a square and resized to
  `resolution` (bicubic), as U-ViT/UniDiffuser prepare MS-COCO; the generated pictures are resized the
  same way;
- FID through torchmetrics' `FrechetInceptionDistance` (easygen/metrics/pictures.py), CLIP score
  through torchmetrics' `CLIPScore` when `stage.clip_model` is given.

It streams: pictures go through the Inception network in batches of `fid_batch` and only the running
sums of features (and of CLIP scores) are kept, in `fid_state.pt` in the output folder, written after
every batch. A run killed half way and started again with the same command (the same output folder,
`hydra.run.dir=...`) continues from the last batch written; the result equals an uninterrupted run's."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchmetrics.multimodal.clip_score import CLIPScore

from easygen.errors import ConfigError
from easygen.metrics.pictures import local_clip_loader, require_torch_fidelity, torchmetrics_fid

log = logging.getLogger(__name__)

_FID_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples",
               "fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples")  # fmt: skip


def fid_inputs(cfg) -> dict:
    """The files the task reads, checked: a ConfigError lists every key to set."""
    node = cfg.stage.coco_fid
    problems = []
    for key, what in (("annotations", "captions_val2014.json"), ("images", "the val2014 pictures folder")):
        value = node.get(key)
        if not value:
            problems.append(f"stage.coco_fid.{key} is not set ({what})")
        elif not Path(str(value)).exists():
            problems.append(f"stage.coco_fid.{key}={value} does not exist ({what})")
    inception = cfg.stage.get("inception")
    if not inception:
        problems.append("stage.inception is not set (FID Inception weights: torch-fidelity's state dict or a "
                        "TorchScript feature extractor)")  # fmt: skip
    elif not Path(str(inception)).exists():
        problems.append(f"stage.inception={inception} does not exist")
    else:
        problem = _inception_problem(str(inception))
        if problem:
            problems.append(problem)
    clip = cfg.stage.get("clip_model")
    if clip and not Path(str(clip)).exists():
        problems.append(f"stage.clip_model={clip} does not exist (null skips the CLIP score)")
    if int(cfg.stage.n) < 2:
        problems.append(f"stage.n={cfg.stage.n} must be at least 2 (FID needs a covariance)")
    if problems:
        raise ConfigError("; ".join(problems))
    return {"annotations": str(node.annotations), "images": str(node.images), "inception": str(inception),
            "clip_model": str(clip) if clip else None}  # fmt: skip


def _inception_problem(path: str) -> str | None:
    """Why `stage.inception` cannot be used, or None: a TorchScript module is used as it is; anything
    else must be torch-fidelity's FID Inception state dict, with torch-fidelity installed."""
    try:
        torch.jit.load(path, map_location="cpu")
        return None
    except (RuntimeError, ValueError):
        pass
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported as one line
        return f"stage.inception={path} is neither TorchScript nor a state dict ({type(e).__name__})"
    if not isinstance(state, dict) or not any(str(k).startswith("Conv2d_1a_3x3") for k in state):
        return f"stage.inception={path} is not torch-fidelity's FID Inception state dict (no Conv2d_1a_3x3 weights)"
    try:
        require_torch_fidelity()
    except ImportError:
        return (f"stage.inception={path} needs torch-fidelity's InceptionV3: pip install -e '.[fid]' "
                "(with a torchvision built for the installed torch)")  # fmt: skip
    return None


def draw_captions(annotations: str, n: int, seed: int) -> list[dict]:
    """`n` caption records ``{"id", "image_id", "caption"}`` drawn without replacement with `seed` from
    a COCO captions file (sorted by annotation id first, so the file's order does not matter)."""
    data = json.loads(Path(annotations).read_text())
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"{annotations}: expected a COCO captions file with an 'annotations' list")
    for k, a in enumerate(anns):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str) or "image_id" not in a:
            raise ValueError(f"{annotations}: annotations[{k}] lacks a string 'caption' or an 'image_id'")
    anns = sorted(anns, key=lambda a: a.get("id", 0))
    if n > len(anns):
        raise ValueError(f"{annotations}: stage.n={n} but the file holds {len(anns)} captions")
    picked = random.Random(seed).sample(range(len(anns)), n)
    return [{"id": anns[k].get("id"), "image_id": anns[k]["image_id"], "caption": anns[k]["caption"].strip()}
            for k in picked]  # fmt: skip


def reference_files(annotations: str, images: str, limit: int | None) -> list[Path]:
    """The val2014 pictures of the captions file (its 'images' list, by id), up to `limit`."""
    data = json.loads(Path(annotations).read_text())
    rows = sorted(data.get("images") or [], key=lambda r: r["id"])
    if not rows:
        raise ValueError(f"{annotations}: no 'images' list to take the reference pictures from")
    files = [Path(images) / r["file_name"] for r in rows][: limit or None]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} reference picture(s) missing in {images}, e.g. {missing[0]}")
    return files


def center_crop_resize(image: Image.Image, size: int) -> torch.Tensor:
    """The central square of the picture, resized to `size` (bicubic): uint8 [3, size, size]."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def feature_extractor(path: str, resolution: int):
    """torchmetrics' FID accumulator with the Inception network at `path`: a TorchScript module mapping
    uint8 [N, 3, H, W] to [N, D] features, or torch-fidelity's FID Inception state dict."""
    try:
        net = torch.jit.load(path, map_location="cpu").eval()
    except (RuntimeError, ValueError):
        net = None
    if net is not None:
        return torchmetrics_fid()(feature=net, input_img_size=(3, resolution, resolution))
    require_torch_fidelity()
    return torchmetrics_fid()(feature=2048, feature_extractor_weights_path=path)


def _clip_metric(path: str | None):
    if not path:
        return None
    return CLIPScore(model_name_or_path=local_clip_loader(path))


def _fingerprint(cfg, inputs: dict, captions: list[dict]) -> str:
    """What the running sums depend on: a resumed run must have been started with the same settings."""
    node = cfg.stage.coco_fid
    what = {"captions": [c["id"] for c in captions], "annotations": inputs["annotations"],
            "inception": inputs["inception"], "clip": inputs["clip_model"], "resolution": int(node.resolution),
            "reference_limit": node.get("reference_limit"), "init_from": str(cfg.get("init_from")),
            "seed": int(node.seed)}  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def coco_fid(cfg, module, inputs: dict, out: Path) -> dict:
    """Run (or continue) the streaming FID; returns the task's metrics and progress."""
    node = cfg.stage.coco_fid
    size, batch = int(node.resolution), int(node.fid_batch)
    captions = draw_captions(inputs["annotations"], int(cfg.stage.n), int(node.seed))
    refs = reference_files(inputs["annotations"], inputs["images"], node.get("reference_limit"))
    fid = feature_extractor(inputs["inception"], size)
    clip = _clip_metric(inputs["clip_model"])
    state_path = out / "fid_state.pt"
    key = _fingerprint(cfg, inputs, captions)
    done = {"real": 0, "fake": 0}
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != key:
            raise ConfigError(f"{state_path} holds the sums of a run with other settings (captions, weights, "
                              "resolution): remove it or evaluate into another folder (hydra.run.dir=...)")  # fmt: skip
        for name in _FID_STATES:
            setattr(fid, name, state["fid"][name])
        if clip is not None:
            clip.score, clip.n_samples = state["clip"]["score"], state["clip"]["n_samples"]
        done = dict(state["done"])
        log.info("coco_fid: continuing from %d reference and %d generated pictures", done["real"], done["fake"])

    def checkpoint() -> None:
        _save(state_path, {"fingerprint": key, "done": done,
                           "fid": {n: getattr(fid, n) for n in _FID_STATES},
                           "clip": None if clip is None else {"score": clip.score, "n_samples": clip.n_samples}})

    start = time.perf_counter()
    with torch.no_grad():
        while done["real"] < len(refs):
            part = refs[done["real"] : done["real"] + batch]
            pics = []
            for p in part:
                with Image.open(p) as im:
                    pics.append(center_crop_resize(im, size))
            fid.update(torch.stack(pics), real=True)
            done["real"] += len(part)
            checkpoint()
        module.configure_model()
        if module.bidiffuser is None:
            raise ConfigError("task=coco_fid draws with BiDiffuser: stage.feature_source must not be 'extracted'")
        samples = out / "samples"
        while done["fake"] < len(captions):
            part = captions[done["fake"] : done["fake"] + batch]
            prompts = [c["caption"] for c in part]
            images = module.bidiffuser.generate(prompts, seed=int(node.seed) * 1_000_003 + done["fake"])
            pics = torch.stack([center_crop_resize(im, size) for im in images])
            fid.update(pics, real=False)
            if clip is not None:
                clip.update(list(pics), prompts)
            if done["fake"] < 16:  # a few pictures to look at; the rest are not kept
                samples.mkdir(parents=True, exist_ok=True)
                for c, im in zip(part, images):
                    im.save(samples / f"{c['id']}.png")
            done["fake"] += len(part)
            checkpoint()
        metrics = {"coco_fid/FID": float(fid.compute())}
        if clip is not None:
            metrics["coco_fid/CLIPScore"] = float(clip.compute())
    seconds = time.perf_counter() - start
    (out / "coco_fid_captions.json").write_text(json.dumps(captions, indent=1))
    return {"metrics": metrics, "num_samples": len(captions), "num_reference": len(refs),
            "seconds": round(seconds, 3), "artifacts": {"captions": str(out / "coco_fid_captions.json"),
                                                        "state": str(state_path), "samples": str(out / "samples")}}  # fmt: skip
