"""`stage=eval task=...`: evaluates a checkpoint (`ckpt_path=` or `init_from=`) and writes `results.json`
plus the per-sample predictions in the official results formats, so that others can check the numbers.

- `task=coco_caption|vqa|t2i`: the `data` set's test split across ranks;
- `task=dialogue`: the held-out dialogues of `data.dialogue_test` (the synthetic set's draw requests,
  attribute questions and caption requests of the test pictures; `dialogue_eval`);
- `task=nocaps|okvqa|gqa|textvqa|mmbench|vqav2_testdev`: a benchmark of the paper (easygen/stages/benchmarks.py)
  from its converted shards, its official metric and submission file;
- `task=coco_fid`: MS-COCO 256x256 text-to-image FID (easygen/stages/coco_fid.py);
- `task=all`: every benchmark whose data is configured, one table with the paper's figure beside this
  run's (printed, in `results.json` and as a W&B table); the missing ones are listed with the key to set."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_class
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from pycocoevalcap.cider.cider import Cider

from callbacks.caption_eval import CaptionEvalCallback
from callbacks.progress import StepProgressBar
from data_modules.shards import ShardIndexDataset, expand_urls
from data_modules.stage_datamodule import StageDataModule
from data_modules.synthetic_reader import ATTRIBUTES, parse_caption, read_picture
from data_modules.t2i_kinds import attribute_accuracy, kind_for
from easygen.chat import IMG_TAG
from easygen.checkpoint import loaded_weights
from easygen.errors import ConfigError
from easygen.llm.templates import IMAGE_MARKER, IMG_OPEN
from easygen.metrics import clip_score, fid_score, ptb_tokenize, require_torch_fidelity, vqa_scores
from easygen.stages import build
from easygen.stages.benchmarks import (
    ALL_TASKS,
    BENCHMARKS,
    COCO_FID_PAPER,
    Benchmark,
    check_complete,
    shard_records,
)
from easygen.stages.checkpoints import resolve_ckpt
from easygen.stages.coco_fid import coco_fid, fid_inputs
from easygen.stages.common import container, ensure_data, output_dir
from easygen.stages.run import write_results

log = logging.getLogger(__name__)
TASKS = ("coco_caption", "vqa", "t2i", "dialogue", *(b for b in BENCHMARKS if b != "coco_caption"), "coco_fid", "all")


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
    if task not in TASKS:
        raise ConfigError(f"unknown task={task}: choose task={'|'.join(TASKS)}")
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if task == "all":
        return all_stage(cfg, out)
    if (task in BENCHMARKS and task != "coco_caption") or task == "coco_fid":
        shards = benchmark_shards(cfg, task)  # a missing set stops the run before any model is built
        module = _module(cfg)
        res = run_benchmark(cfg, module, task, shards, out)
        return {"global_step": 0, "task": task, "metrics": res.pop("metrics"), "best": {}, "checkpoints": {},
                **res, "loaded": loaded_weights(module)}  # fmt: skip
    if task == "dialogue" and not cfg.data.get("dialogue_test"):
        raise ConfigError(
            f"task=dialogue needs data.dialogue_test (the held-out dialogues' shards), which data={cfg.data.name} "
            "does not set; the synthetic set has them (data=synthetic)"
        )
    ensure_data(cfg)
    module = _module(cfg)
    if task == "t2i":
        return t2i_eval(cfg, module, out)
    if task == "dialogue":
        return dialogue_eval(cfg, module, out)
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
    - `test/t2i_attr/<attribute>` (and `<attribute>_chance`, the most frequent true value's rate): on a
      set of a known kind (data_modules/t2i_kinds.py: the synthetic shapes, the patterns of
      data_modules/patterns.py; told by `data.root`'s manifest or by the prompts), the attributes read back
      from the pixels by the kind's reader (no model involved) against those the prompt names;
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
    kind = kind_for(prompts, cfg.data.get("root"))
    readings = attribute_readings(prompts, images, kind)
    if readings is not None:
        scored = [r for r in readings if r is not None]
        acc = attribute_accuracy([r for r, _ in scored], [t for _, t in scored], kind.attributes)
        metrics.update({f"test/t2i_attr/{k}": float(v) for k, v in acc.items()})
        metrics["test/t2i_attr_prompts"] = float(len(scored))
        if len(scored) < len(readings):
            first = next(i for i, r in enumerate(readings) if r is None)
            log.warning("t2i: %d of %d test prompts name not every attribute of a %s set and are not read back "
                        "(the first: sample %s, %r)", len(readings) - len(scored), len(readings), kind.name,
                        samples[first]["id"], prompts[first])
        log.info("text-to-image read back (%s set): %s", kind.name,
                 ", ".join(f"{a} {acc[a]:.3f} (chance {acc[a + '_chance']:.3f})" for a in kind.attributes
                           if a in acc))
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
                    **({"read": readings[k][0], "named": readings[k][1]} if readings and readings[k] else {}),
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
        **({"t2i_kind": kind.name} if readings is not None else {}),
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


def attribute_readings(prompts: list[str], images: list, kind=None) -> list[tuple[dict, dict] | None] | None:
    """(read from the pixels by the kind's reader, named by the prompt) per picture, None for a prompt that
    does not name every attribute of the kind (not scored; t2i_eval counts them); None in all when the set
    is of no known kind (``kind`` None: told from the prompts, data_modules/t2i_kinds.py::kind_for)."""
    kind = kind if kind is not None else kind_for(prompts)
    if kind is None or not prompts:
        return None
    named = [kind.parse_caption(p) for p in prompts]
    return [
        (kind.read_picture(im), n) if all(v is not None for v in n.values()) else None
        for im, n in zip(images, named)
    ]


# ----------------------------------------------------------------------------------------------------
# the held-out dialogues (task=dialogue)
# ----------------------------------------------------------------------------------------------------

DIALOGUE_TYPES = ("draw", "question", "caption")


def short_answer(text: str) -> str:
    """An answer as exact match compares it: lower case, outer spaces and final punctuation dropped."""
    return " ".join(text.lower().split()).strip(" .!?,;:")


def dialogue_prompt(sample: dict) -> str:
    """The user's message of a dialogue sample (a VQA sample's question, as asked before the paper's
    short-answer suffix)."""
    if sample["kind"] == "vqa":
        return sample["question"]
    return sample["conversations"][0]["value"].replace(IMAGE_MARKER, "").strip()


def read_dialogues(spec, image_size: int) -> list[dict]:
    """The held-out dialogue samples of `spec` (shards written by data_modules/synthetic.py write_dialogues),
    pictures decoded; a sample that cannot be read or has no valid `dialogue` record stops the run with one
    line naming its shard, key and field."""
    ds = ShardIndexDataset(spec, image_size=image_size)
    samples = []
    for i, (url, key, _) in enumerate(ds.index):
        s = ds[i]
        if s is None:
            raise ValueError(f"{url}: sample {key!r} cannot be read (the warning above says why)")
        d = s.get("dialogue")
        if not isinstance(d, dict) or d.get("type") not in DIALOGUE_TYPES or not isinstance(d.get("attributes"), dict):
            raise ValueError(f"{url}: sample {key!r}: field 'dialogue' must be an object with 'type' one of "
                             f"{DIALOGUE_TYPES} and the picture's 'attributes'")
        if d["type"] == "question" and d.get("attribute") not in d["attributes"]:
            raise ValueError(f"{url}: sample {key!r}: field 'dialogue.attribute' must name one of its attributes")
        if d["type"] == "caption" and not s.get("captions"):
            raise ValueError(f"{url}: sample {key!r}: a caption request needs its references in 'captions'")
        s["features"] = None  # from the pixels, as the server computes them
        samples.append(s)
    if not samples:
        raise ValueError(f"data.dialogue_test={spec}: no dialogue samples")
    return samples


def dialogue_eval(cfg, module, out: Path) -> dict:
    """The embedded default's instruction dialogues on held-out pictures (`data.dialogue_test`): every draw
    request, attribute question and caption request answered by the model (greedy, as the web demo answers
    at temperature 0; the pictures' BiDiffuser features computed from the pixels, as the server does), then:

    - `test/dialogue/draw_answered`: the fraction of draw requests answered with `<Img>description</Img>`;
      on the pictures BiDiffuser draws from those descriptions (easygen/chat.py IMG_TAG, as the server
      draws them), `draw_<attribute>` read back from the pixels (data_modules/synthetic_reader.py) against
      what the request named, beside `draw_<attribute>_chance`; `draw_described` the fraction of
      descriptions that name every requested attribute;
    - `test/dialogue/short_answer_acc`: exact match of the attribute questions' answers, `short_answer_chance`
      (always the most frequent answer of each question type), per type (`short_answer_acc/<attribute>`) and
      per form (`/typed`: the question as typed in a chat; `/vqa_prompt`: with the paper's suffix);
    - `test/dialogue/question_img_rate` and `caption_img_rate`: answers to non-draw messages that ask for a
      picture (drawing must not be the answer to everything);
    - `test/dialogue/caption_CIDEr`: the caption requests (varied phrasings, the picture's features computed
      from its pixels) against the five references."""
    samples = read_dialogues(cfg.data.dialogue_test, int(cfg.model.image_size))
    module.configure_model()
    module.eval()
    batch = int(cfg.stage.get("batch_size") or cfg.data.eval_batch_size)
    answers: dict[str, str] = {}
    for kind in DIALOGUE_TYPES:
        rows = [s for s in samples if s["dialogue"]["type"] == kind]
        for i in range(0, len(rows), batch):
            pred = module.predict_captions(module.eval_collate(rows[i : i + batch]))
            answers.update(zip(pred["ids"], pred["predictions"]))
    by_type = {k: [s for s in samples if s["dialogue"]["type"] == k] for k in DIALOGUE_TYPES}
    metrics: dict[str, float] = {f"test/dialogue/num_{k}": float(len(v)) for k, v in by_type.items()}
    rows_out = {s["id"]: {"id": s["id"], "type": s["dialogue"]["type"], "prompt": dialogue_prompt(s),
                          "answer": answers[s["id"]]} for s in samples}  # fmt: skip
    pre = "test/dialogue/"

    draws = by_type["draw"]
    if draws:
        described = {}
        for s in draws:
            tags = [d.strip() for d in IMG_TAG.findall(answers[s["id"]]) if d.strip()]
            if tags:
                described[s["id"]] = tags[0]
        metrics[pre + "draw_answered"] = len(described) / len(draws)
        drawn = [s for s in draws if s["id"] in described]
        if drawn:
            prompts = [described[s["id"]] for s in drawn]
            images = []
            for i in range(0, len(prompts), 8):
                images += module.generate_images(prompts[i : i + 8])
            folder = out / "images"
            folder.mkdir(parents=True, exist_ok=True)
            named = [s["dialogue"]["attributes"] for s in drawn]
            reads = [read_picture(im) for im in images]
            acc = attribute_accuracy(reads, named, ATTRIBUTES)
            metrics.update({f"{pre}draw_{k}": float(v) for k, v in acc.items()})
            said = [parse_caption(p) for p in prompts]
            metrics[pre + "draw_described"] = sum(
                all(w.get(a) == n[a] for a in n) for w, n in zip(said, named)) / len(drawn)
            for s, im, r, p in zip(drawn, images, reads, prompts):
                im.save(folder / f"{s['id']}.png")
                rows_out[s["id"]].update(description=p, file=f"images/{s['id']}.png", read=r,
                                         named=s["dialogue"]["attributes"])

    questions = by_type["question"]
    if questions:
        right, chance_hits = [], 0
        per: dict[str, list[bool]] = {}
        forms: dict[str, list[bool]] = {}
        for s in questions:
            attribute = s["dialogue"]["attribute"]
            expected = s["dialogue"]["attributes"][attribute]
            ok = short_answer(answers[s["id"]]) == expected
            right.append(ok)
            per.setdefault(attribute, []).append(ok)
            forms.setdefault("vqa_prompt" if s["kind"] == "vqa" else "typed", []).append(ok)
            rows_out[s["id"]].update(attribute=attribute, expected=expected, correct=ok)
        metrics[pre + "short_answer_acc"] = sum(right) / len(right)
        for attribute, oks in sorted(per.items()):
            truths = [s["dialogue"]["attributes"][attribute] for s in questions if s["dialogue"]["attribute"] == attribute]
            top = max(truths.count(v) for v in set(truths))
            chance_hits += top
            metrics[f"{pre}short_answer_acc/{attribute}"] = sum(oks) / len(oks)
            metrics[f"{pre}short_answer_chance/{attribute}"] = top / len(truths)
        metrics[pre + "short_answer_chance"] = chance_hits / len(questions)
        for form, oks in sorted(forms.items()):
            metrics[f"{pre}short_answer_acc/{form}"] = sum(oks) / len(oks)
        metrics[pre + "question_img_rate"] = sum(IMG_OPEN in answers[s["id"]] for s in questions) / len(questions)

    captions = by_type["caption"]
    if captions:
        metrics[pre + "caption_CIDEr"] = cider_score({s["id"]: answers[s["id"]] for s in captions},
                                                     {s["id"]: s["captions"] for s in captions})
        metrics[pre + "caption_img_rate"] = sum(IMG_OPEN in answers[s["id"]] for s in captions) / len(captions)
    (out / "predictions.json").write_text(json.dumps(list(rows_out.values()), indent=1))
    return {
        "global_step": 0,
        "task": "dialogue",
        "metrics": metrics,
        "best": {},
        "checkpoints": {},
        "num_samples": len(samples),
        "artifacts": {"predictions": str(out / "predictions.json"), "images": str(out / "images")},
        "loaded": loaded_weights(module),
    }


# ----------------------------------------------------------------------------------------------------
# the paper's benchmarks
# ----------------------------------------------------------------------------------------------------


class PredictionCallback(CaptionEvalCallback):
    """The caption callback's gathering across ranks and de-duplication, without scoring: the
    benchmark scores the gathered predictions with its own metric and records."""

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._records = []
        self._images = {}

    def score(self, predictions: dict, references: dict) -> dict:
        return {}


def benchmark_shards(cfg, task: str) -> list[str] | dict:
    """The shard files a benchmark is scored on (coco_caption: `data.test`; coco_fid: its files), or a
    ConfigError naming the key to set when they are missing."""
    if task == "coco_fid":
        return fid_inputs(cfg)
    if task == "coco_caption":
        ensure_data(cfg)
        return expand_urls(cfg.data.test)
    node = cfg.stage.benchmarks[task]
    folder = Path(str(node.root)) / str(node.split)
    shards = sorted(str(p) for p in folder.glob("*.tar")) if folder.is_dir() else []
    if not shards:
        raise ConfigError(
            f"no {task} shards in {folder}: write them with `{BENCHMARKS[task].converter} ... --out "
            f"{node.root}` or set stage.benchmarks.{task}.root (split folder: stage.benchmarks.{task}.split)"
        )
    return shards


def _clear_feature_cache(module) -> None:
    """On-the-fly i2t features are cached by sample id; ids repeat across benchmarks (COCO question ids)."""
    cache = getattr(module, "_feature_cache", None)
    if cache is not None:
        cache.clear()


def generate_predictions(cfg, module, shards: list[str]) -> tuple[dict[str, str], float]:
    """The model's answer to every sample of the shards (batches of `stage.batch_size`, default
    `data.eval_batch_size`; left-padded prompts, KV cache), gathered on rank zero; and the seconds taken."""
    batch = int(cfg.stage.get("batch_size") or cfg.data.eval_batch_size)
    dm = StageDataModule(test=shards, image_size=int(cfg.model.image_size), batch_size=batch, eval_batch_size=batch,
                         num_workers=int(cfg.data.get("num_workers") or 0), eval_collate_fn=module.eval_collate,
                         load_images=module.needs_images)  # fmt: skip
    cb = PredictionCallback(prefix="test", max_samples_table=0)
    trainer = build.trainer(cfg, logger=False, enable_checkpointing=False,
                            callbacks=[cb, *([StepProgressBar()] if cfg.trainer.enable_progress_bar else [])])  # fmt: skip
    _clear_feature_cache(module)
    start = time.perf_counter()
    trainer.validate(module, dataloaders=dm.test_dataloader(), verbose=False)
    return cb.last_predictions, time.perf_counter() - start


def run_benchmark(cfg, module, task: str, shards, out: Path) -> dict:
    """Generate, write the submission file, score (when the set has annotations): the benchmark's
    ``metrics`` (``<task>/<metric>``), its submission file, sample count and speed."""
    if task == "coco_fid":
        return coco_fid(cfg, module, shards, out)
    bench: Benchmark = BENCHMARKS[task]
    records = shard_records(shards)
    preds, seconds = generate_predictions(cfg, module, shards)
    res = {"num_samples": len(records), "seconds": round(seconds, 3),
           "samples_per_s": round(len(records) / seconds, 3) if seconds > 0 else None}  # fmt: skip
    if rank_zero_only.rank != 0:
        return {**res, "metrics": {}}
    path = out / bench.submission
    path.write_text(json.dumps(bench.rows(preds, records), indent=1))
    res["artifacts"] = {"predictions": str(path)}
    if bench.score is None:
        check_complete(task, preds, records)
        res["note"] = f"no annotations: upload {path.name} to EvalAI for the score"
        log.info("%s: %d answers written to %s; upload it to EvalAI for the test-dev score", task, len(preds), path)
        return {**res, "metrics": {}}
    scores = bench.score(preds, records, dict(cfg.stage))
    if scores is None:
        res["note"] = f"no references in this split: upload {path.name} to the benchmark's server"
        return {**res, "metrics": {}}
    return {**res, "metrics": {f"{task}/{k}": float(v) for k, v in scores.items()}}


def _figure(task: str, metrics: dict) -> float | None:
    """This run's headline figure in the paper's units (x100; FID as it is)."""
    if task == "coco_fid":
        v = metrics.get("coco_fid/FID")
        return None if v is None else round(float(v), 2)
    v = metrics.get(f"{task}/{BENCHMARKS[task].metric}")
    return None if v is None else round(100.0 * float(v), 2)


def all_stage(cfg, out: Path) -> dict:
    """Every benchmark whose data is configured, in the paper's order; one table of the paper's figure
    beside this run's. A benchmark without data is listed with the key to set and the others run."""
    tasks = list(cfg.stage.get("tasks") or ALL_TASKS)
    inputs, missing = {}, {}
    for task in tasks:
        try:
            inputs[task] = benchmark_shards(cfg, task)
        except ConfigError as e:
            missing[task] = str(e)
    table, metrics, details, failed = [], {}, {}, {}
    module = _module(cfg) if inputs else None
    for task in tasks:
        title = "MS-COCO 256x256 text-to-image (FID)" if task == "coco_fid" else BENCHMARKS[task].title
        paper = COCO_FID_PAPER if task == "coco_fid" else BENCHMARKS[task].paper
        row = {"benchmark": task, "title": title, "paper": paper, "this_run": None, "samples": None,
               "seconds": None, "status": ""}  # fmt: skip
        if task in missing:
            keys = dict.fromkeys(re.findall(r"stage\.[\w.]+(?<!\.)", missing[task]))
            keys = [k for k in keys if not k.endswith(".split")]
            row["status"] = f"missing: set {', '.join(keys)}" if keys else f"missing: {missing[task]}"
        else:
            folder = out / task
            folder.mkdir(parents=True, exist_ok=True)
            try:
                res = run_benchmark(cfg, module, task, inputs[task], folder)
            except (ConfigError, ValueError, FileNotFoundError, ImportError) as e:
                failed[task] = f"{type(e).__name__}: {e}"
                row["status"] = f"failed: {failed[task]}"
            else:
                metrics.update(res["metrics"])
                details[task] = {k: v for k, v in res.items() if k != "metrics"}
                row.update(this_run=_figure(task, res["metrics"]), samples=res.get("num_samples"),
                           seconds=res.get("seconds"), status=res.get("note") or "scored")  # fmt: skip
                if task == "coco_caption":
                    row["status"] = f"scored on data={cfg.data.name} (its test split)"
        table.append(row)
    print_table(table)
    log_table_to_wandb(cfg, table, metrics)
    result = {"global_step": 0, "task": "all", "metrics": metrics, "best": {}, "checkpoints": {},
              "table": table, "benchmarks": details, "missing": missing, "failed": failed,
              "loaded": loaded_weights(module) if module is not None else []}  # fmt: skip
    if failed:
        write_results(out, {"stage": str(cfg.stage.name), "output_dir": str(out), **result})
        raise RuntimeError(f"task=all: {len(failed)} benchmark(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return result


TABLE_COLUMNS = ("benchmark", "paper", "this_run", "samples", "seconds", "status")


def format_table(table: list[dict]) -> str:
    """The table as printed: one line per benchmark, the paper's figure beside this run's."""
    def cell(v):
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    rows = [[r["title"], cell(r["paper"]), cell(r["this_run"]), cell(r["samples"]), cell(r["seconds"]),
             r["status"]] for r in table]  # fmt: skip
    head = ["benchmark", "paper", "this run", "samples", "seconds", "status"]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(5)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  " + head[5]]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5] for r in rows]
    return "\n".join(lines)


def print_table(table: list[dict]) -> None:
    if rank_zero_only.rank == 0:
        print("\n" + format_table(table), flush=True)


def log_table_to_wandb(cfg, table: list[dict], metrics: dict) -> None:
    """The table as the W&B table `eval/benchmarks` (and the metrics) of the configured W&B logger."""
    if rank_zero_only.rank != 0:
        return
    for lg in build.loggers(cfg):
        if isinstance(lg, WandbLogger):
            lg.log_table(key="eval/benchmarks", columns=[*TABLE_COLUMNS, "title"],
                         data=[[r[c] for c in (*TABLE_COLUMNS, "title")] for r in table])  # fmt: skip
            if metrics:
                lg.log_metrics(metrics)
