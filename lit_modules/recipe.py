"""`stage=all`: the whole recipe in order — BiDiffuser fine-tuning → feature extraction → alignment →
instruction tuning → evaluation — each stage composed from the same overrides plus what the previous
stages produced (no paths copied by hand). A stage whose `results.json` exists is not run again, so a
rerun after a crash continues at the stage that did not finish."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lit_modules.errors import ConfigError

log = logging.getLogger("easygen")
SKIP_OVERRIDES = ("stage", "hydra.", "paths.output_dir", "init_from", "ckpt_path")


def _links(stage: str, done: dict) -> list[str]:
    """Overrides that hand the earlier stages' outputs to `stage`."""
    out = []
    bd = done.get("bidiffuser", {}).get("artifacts", {})
    if bd.get("bidiffuser_weights") and stage != "bidiffuser":
        out.append(f"model.bidiffuser.weights={bd['bidiffuser_weights']}")
    ex = done.get("extract", {}).get("artifacts", {})
    if ex.get("shards") and stage in ("pretrain", "instruct", "eval"):
        root = ex["shards"]
        out += [f"data.train=[{{urls:'{root}/train/*.tar',weight:1.0}}]", f"data.val='{root}/val/*.tar'",
                f"data.test='{root}/test/*.tar'"]
    prev = {"instruct": "pretrain", "eval": "instruct"}.get(stage)
    if prev and done.get(prev):
        w = done[prev].get("artifacts", {}).get("weights") or done[prev]["checkpoints"].get("last")
        if w:
            out.append(f"init_from={w}")
    return out


def compose_stage(cfg, stage: str, extra: list[str]):
    from hydra import compose

    from lit_modules.runner import hydra_overrides

    user = [o for o in hydra_overrides() if not o.lstrip("+~").startswith(SKIP_OVERRIDES)]
    recipe = list((cfg.get("recipe") or {}).get(stage) or [])
    per_stage = list((cfg.stage.get("overrides") or {}).get(stage) or [])
    keys = {o.split("=", 1)[0].lstrip("+~") for o in user + per_stage}
    recipe = [r for r in recipe if r.split("=", 1)[0].lstrip("+~") not in keys]
    return compose(config_name="config", overrides=[*recipe, *user, f"stage={stage}", *per_stage, *extra])


def run_chain(cfg, stages, root: Path, done: dict, extra: list[str] = ()) -> dict:
    """Run `stages` in order under `root`, each from the outputs in `done` (updated in place)."""
    from lit_modules.runner import run_stage

    for stage in stages:
        sdir = root / stage
        res_file = sdir / "results.json"
        if res_file.exists():
            log.info("stage=%s already finished (%s): skipped", stage, res_file)
            done[stage] = json.loads(res_file.read_text())
            continue
        sub = compose_stage(cfg, stage, [f"paths.output_dir={sdir}", *_links(stage, done), *extra])
        if sub.stage.kind == "all":
            raise ConfigError("stage.stages may not contain 'all'")
        log.info("==== stage=%s -> %s", stage, sdir)
        done[stage] = run_stage(sub)
    return done


def run_all(cfg) -> dict:
    from lit_modules.runner import output_dir

    root = output_dir(cfg)
    stages = list(cfg.stage.stages)
    done = run_chain(cfg, stages, root, {})
    summary = {s: {"metrics": r.get("metrics", {}), "best": r.get("best", {})} for s, r in done.items()}
    final = done.get("eval") or {}
    metrics = dict(final.get("metrics", {}))
    if cfg.stage.get("baselines") and final:
        from lit_modules.baselines import baselines

        metrics.update(baselines(cfg, root, done))
        # the control: the LLM stages again on the same BiDiffuser and features, with each training caption
        # paired with another sample's picture; its test CIDEr shows what the features themselves carry
        llm_stages = [s for s in stages if s in ("pretrain", "instruct", "eval")]
        shared = {s: r for s, r in done.items() if s not in llm_stages}
        control = run_chain(cfg, llm_stages, root / "shuffled", shared, ["++stage.shuffle_features=true"])
        if "eval" in control:
            metrics["baseline/shuffled_CIDEr"] = control["eval"]["metrics"].get("test/CIDEr")
            summary["shuffled"] = {"metrics": control["eval"].get("metrics", {}), "best": {}}
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
