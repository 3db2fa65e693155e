"""`stage=all`: the whole recipe in order — BiDiffuser fine-tuning → feature extraction → alignment →
instruction tuning → evaluation — each stage composed from the same overrides plus what the previous
stages produced (no paths copied by hand). A stage whose `results.json` exists is not run again, so a
rerun after a crash continues at the stage that did not finish. A finished stage is reused only when its
fingerprint (its resolved config and the identity of the files it reads) equals the one it finished with;
otherwise `stage.on_change` says what happens: `rerun` (the old folder is kept aside), `reuse` or `error`."""

from __future__ import annotations

import glob
import json
import logging
import time
from pathlib import Path

from hydra import compose
from omegaconf import OmegaConf

from easygen.assets import is_shipped
from easygen.errors import ConfigError
from easygen.stages.baselines import baselines
from easygen.stages.common import differences, flatten, hydra_overrides, output_dir
from easygen.stages.run import finish_wandb, run_stage

log = logging.getLogger("easygen")
SKIP_OVERRIDES = ("stage", "experiment", "hydra.", "paths.output_dir", "init_from", "ckpt_path")


def _links(stage: str, done: dict, cfg=None) -> list[str]:
    """Overrides that hand the earlier stages' outputs to `stage`; a source's weight is this run's
    (`cfg.data`), not the one recorded when its shards were extracted."""
    out = []
    bd = done.get("bidiffuser", {}).get("artifacts", {})
    if bd.get("bidiffuser_weights") and stage != "bidiffuser":
        out.append(f"model.bidiffuser.weights={bd['bidiffuser_weights']}")
    ex = done.get("extract", {}).get("artifacts", {})
    if ex.get("shards") and stage in ("pretrain", "instruct", "eval"):
        root = ex["shards"]
        # each source of the data config at its extracted shards (easygen/stages/extract.py extracted_sources)
        sources = ex.get("sources") or {"train": [{"urls": f"{root}/train/*.tar", "weight": 1.0}],
                                         "val": f"{root}/val/*.tar", "test": f"{root}/test/*.tar"}
        for group in ("train", "instruct_train"):
            if sources.get(group):
                now = list((cfg.data.get(group) or []) if cfg is not None else [])
                weights = ([float(n.get("weight", 1.0)) for n in now] if len(now) == len(sources[group])
                           else [float(s["weight"]) for s in sources[group]])
                items = ",".join(f"{{urls:'{s['urls']}',weight:{w}}}" for s, w in zip(sources[group], weights))
                out.append(f"data.{group}=[{items}]")
        out += [f"data.{split}='{sources[split]}'" for split in ("val", "test") if sources.get(split)]
    prev = {"instruct": "pretrain", "eval": "instruct"}.get(stage)
    if prev and done.get(prev):
        w = done[prev].get("artifacts", {}).get("weights") or done[prev]["checkpoints"].get("last")
        if w:
            out.append(f"init_from={w}")
    return out


def compose_stage(cfg, stage: str, extra: list[str]):
    """The config of one stage of the recipe: a paper recipe's own stage config
    (`experiment=<recipe.name>/<stage>`, conf/experiment/<name>/<stage>.yaml) or `stage=<stage>`, then the
    command line's overrides, `stage.overrides.<stage>`, and the links to the earlier stages' outputs."""
    user = [o for o in hydra_overrides() if not o.lstrip("+~").startswith(SKIP_OVERRIDES)]
    per_stage = list((cfg.stage.get("overrides") or {}).get(stage) or [])
    name = (cfg.get("recipe") or {}).get("name")
    which = [f"experiment={name}/{stage}"] if name else [f"stage={stage}"]
    sub = compose(config_name="config", overrides=[*which, *user, *per_stage, *extra])
    if not cfg.stage.get("shipped_weights", True):
        # the tiny preset's shipped files are this recipe's own output (python -m easygen.stages.tiny_weights):
        # the recipe starts where they started, from the preset's random weights
        for part in ("bidiffuser", "llm"):
            if is_shipped((sub.model.get(part) or {}).get("weights")):
                sub.model[part].weights = None
    return sub


# keys that do not change what a stage computes (where it writes, how it logs)
VOLATILE = ("paths.", "logger.", "callbacks.", "task_name", "tags", "ckpt_path", "trainer.enable_progress_bar")
FINGERPRINT = "fingerprint.json"


def _file_identity(pattern: str) -> str:
    """What a path or shard pattern points at: count, bytes and newest modification of the files."""
    paths = []
    for part in pattern.split("::"):  # shards one by one (easygen/stages/extract.py extracted_spec)
        paths += sorted(glob.glob(part)) or ([part] if Path(part).exists() else [])
    files = [f for p in paths for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*")) if f.is_file()]
    if not files:
        return "absent"
    stats = [f.stat() for f in files]
    return f"{len(files)} files, {sum(s.st_size for s in stats)} bytes, newest {max(s.st_mtime_ns for s in stats)}"


def fingerprint(sub) -> dict:
    """The stage's resolved config without its volatile keys, with each input file's identity beside it."""
    flat = flatten(OmegaConf.to_container(sub, resolve=True))
    out = {k: v for k, v in flat.items() if not k.startswith(VOLATILE)}
    inputs = [k for k in out if k in ("init_from", "model.bidiffuser.weights", "data.val", "data.test",
                                      "data.dialogue_test")
              or (k.startswith(("data.train", "data.instruct_train")) and k.endswith(".urls"))]
    for key in inputs:
        if isinstance(out[key], str):
            out[f"{key} (files)"] = _file_identity(out[key])
    return json.loads(json.dumps(out, default=str))


def _finished(stage: str, sdir: Path, fp: dict, policy: str) -> bool:
    """Whether the finished stage in `sdir` can stand for this one (else its folder is moved aside)."""
    if not (sdir / "results.json").exists():
        return False
    fp_file = sdir / FINGERPRINT
    old = json.loads(fp_file.read_text()) if fp_file.exists() else {}
    diff = differences(old, fp) if fp_file.exists() else ["(it has no fingerprint: written by an older version)"]
    if not old or diff:
        what = f"stage={stage} in {sdir} finished with another config: " + "; ".join(diff)
        if policy == "reuse":
            log.warning("%s; reused as stage.on_change=reuse says", what)
            return True
        if policy == "error":
            raise ConfigError(f"{what}. Set stage.on_change=rerun to run it again or stage.on_change=reuse "
                              "to keep it")
        aside = sdir.with_name(f"{sdir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        sdir.rename(aside)
        log.warning("%s; running it again (the old one moved to %s; stage.on_change=reuse keeps it instead)",
                    what, aside)
        return False
    log.info("stage=%s already finished with this config (%s): skipped", stage, sdir)
    return True


def wandb_names(cfg, sdir: Path) -> list[str]:
    """One W&B run per stage, named after the stage (`pretrain`, `shuffled/pretrain`, `t2i/eval`) and
    grouped under the recipe's run (`all-<recipe folder>`), so that the dashboard shows the recipe as one
    group; without them every stage's metrics went to the first stage's run."""
    if "wandb" not in (cfg.get("logger") or {}):
        return []
    top = output_dir(cfg)
    name = sdir.relative_to(top).as_posix()
    return [f"logger.wandb.group='all-{top.name}'", f"++logger.wandb.run_name='{name}'"]


def run_chain(cfg, stages, root: Path, done: dict, extra: list[str] = ()) -> dict:
    """Run `stages` in order under `root`, each from the outputs in `done` (updated in place)."""
    policy = str(cfg.stage.get("on_change", "rerun"))
    if policy not in ("rerun", "reuse", "error"):
        raise ConfigError(f"stage.on_change={policy}: choose rerun, reuse or error")
    for stage in stages:
        sdir = root / stage
        sub = compose_stage(cfg, stage, [f"paths.output_dir={sdir}", *_links(stage, done, cfg),
                                         *wandb_names(cfg, sdir), *extra])
        if sub.stage.kind == "all":
            raise ConfigError("stage.stages may not contain 'all'")
        fp = fingerprint(sub)
        if _finished(stage, sdir, fp, policy):
            done[stage] = json.loads((sdir / "results.json").read_text())
            continue
        log.info("==== stage=%s -> %s", stage, sdir)
        try:
            done[stage] = run_stage(sub)
        finally:
            finish_wandb()  # the next stage's logger starts a W&B run of its own
        # taken again now that the stage's inputs surely exist (the first writes the synthetic set)
        (sdir / FINGERPRINT).write_text(json.dumps(fingerprint(sub), indent=1))
    return done


def run_all(cfg) -> dict:
    root = output_dir(cfg)
    stages = list(cfg.stage.stages)
    done = run_chain(cfg, stages, root, {})
    summary = {s: {"metrics": r.get("metrics", {}), "best": r.get("best", {})} for s, r in done.items()}
    final = done.get("eval") or {}
    metrics = dict(final.get("metrics", {}))
    if cfg.stage.get("baselines") and final:
        metrics.update(baselines(cfg, root, done))
        # the control: the LLM stages again on the same BiDiffuser and features, with each training caption
        # paired with another sample's picture; its test CIDEr shows what the features themselves carry
        llm_stages = [s for s in stages if s in ("pretrain", "instruct", "eval")]
        shared = {s: r for s, r in done.items() if s not in llm_stages}
        control = run_chain(cfg, llm_stages, root / "shuffled", shared, ["++stage.shuffle_features=true"])
        if "eval" in control:
            metrics["baseline/shuffled_CIDEr"] = control["eval"]["metrics"].get("test/CIDEr")
            summary["shuffled"] = {"metrics": control["eval"].get("metrics", {}), "best": {}}
    if cfg.stage.get("t2i", True) and final and "eval" in stages:  # +stage.t2i=false skips it
        # text-to-image of the final model on the test captions: the pictures read back from the pixels
        # (synthetic set) and captioned by the model itself (any set); easygen/stages/evaluate.py t2i_eval
        t2i = run_chain(cfg, ["eval"], root / "t2i", {s: r for s, r in done.items() if s != "eval"}, ["task=t2i"])
        if "eval" in t2i:
            metrics.update({k: v for k, v in t2i["eval"]["metrics"].items() if k.startswith("test/t2i")})
            summary["t2i"] = {"metrics": t2i["eval"].get("metrics", {}), "best": {}}
    if cfg.stage.get("dialogue", True) and final and "eval" in stages and cfg.data.get("dialogue_test"):
        # the instruction dialogues on held-out pictures (draw requests, attribute questions, caption
        # requests): easygen/stages/evaluate.py dialogue_eval; +stage.dialogue=false skips it
        dialogue = run_chain(cfg, ["eval"], root / "dialogue", {s: r for s, r in done.items() if s != "eval"},
                             ["task=dialogue"])
        if "eval" in dialogue:
            metrics.update({k: v for k, v in dialogue["eval"]["metrics"].items() if k.startswith("test/dialogue/")})
            summary["dialogue"] = {"metrics": dialogue["eval"].get("metrics", {}), "best": {}}
    print_table(summary)
    return {"global_step": sum(int(r.get("global_step", 0)) for r in done.values()), "metrics": metrics,
            "best": {}, "stages": summary, "stage_dirs": {s: str(root / s) for s in done}, "checkpoints": {}}


def print_table(summary: dict) -> None:
    print("\n[easygen] recipe summary")
    for stage, r in summary.items():
        vals = {**r.get("metrics", {}), **{f"best {k}": v for k, v in r.get("best", {}).items()}}
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(vals.items()) if isinstance(v, float)
                          and not k.startswith(("perf/", "lr-")))
        print(f"  {stage:11s} {shown}")
