"""One stage from a composed config: check it, run `stage.program` (a function of the config returning
the results dict), write `results.json` in the run's output directory and print a summary (rank zero)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hydra.utils import get_method
from lightning.pytorch.utilities import rank_zero_only

from easygen.assets import is_shipped
from easygen.lit.log_setup import quiet_known_warnings, single_handler
from easygen.stages.checks import validate
from easygen.stages.common import hydra_choices, output_dir


def run_stage(cfg) -> dict:
    """Run the configured stage and write results.json (on rank zero); returns the results dict."""
    single_handler()  # Lightning's own console handler would print every record a second time
    quiet_known_warnings()
    validate(cfg)
    res = get_method(str(cfg.stage.program))(cfg)
    results = {"stage": str(cfg.stage.name), "choices": hydra_choices(), "output_dir": str(output_dir(cfg)), **res}
    if rank_zero_only.rank == 0:
        write_results(output_dir(cfg), results)
    return results


def write_results(out: Path, results: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)
    return path


# what to run after each stage, `{init}` being its weights
NEXT = {
    "bidiffuser": "python run.py stage=extract model.bidiffuser.weights={bidiffuser}",
    "pretrain": "python run.py stage=instruct lora=on init_from={init}   (or the whole recipe: python run.py stage=all)",
    "instruct": "python run.py stage=eval init_from={init}   or   python run.py stage=chat init_from={init}",
    "eval": "python run.py stage=chat init_from={init}",
}


# the weights a stage starts from (its `loaded` entries), named in its one-line summary
STARTS_FROM = {"model.llm.weights": "LLM", "model.bidiffuser.weights": "BiDiffuser"}


def starting_weights(results: dict) -> str:
    """`, with the shipped tiny LLM and BiDiffuser (easygen/assets/tiny)` or the files' paths; empty if none."""
    loaded = [e for e in results.get("loaded") or [] if isinstance(e, dict) and e.get("key") in STARTS_FROM]
    if not loaded:
        return ""
    names = " and ".join(STARTS_FROM[e["key"]] for e in loaded)
    if all(is_shipped(e["path"]) for e in loaded):
        return f", with the shipped tiny {names} (easygen/assets/tiny)"
    return ", with " + " and ".join(f"the {STARTS_FROM[e['key']]} of {e['path']}" for e in loaded)


def next_step(results: dict) -> str | None:
    """One line: what the stage trained, on which data, and the command that comes next."""
    stage = results.get("stage")
    artifacts = results.get("artifacts") or {}
    loaded = [e.get("path") for e in results.get("loaded") or [] if isinstance(e, dict) and e.get("key") == "init_from"]
    init = artifacts.get("weights") or (results.get("checkpoints") or {}).get("last") or (loaded or [None])[0]
    groups = sorted(results.get("optimizer_lr") or {})
    choices = results.get("choices") or {}
    what = (f"trained {', '.join(groups)} of model={choices.get('model')} for {results.get('global_step')} steps "
            f"on data={choices.get('data')}{starting_weights(results)}; " if groups else "")
    cmd = NEXT.get(str(stage))
    if cmd is None or (init is None and "{init}" in cmd):
        return f"[easygen] {what.rstrip('; ')}" if what else None
    export = choices.get("export")
    if export and init and (Path(init).parent / "export" / f"{export}.yaml").is_file():
        # a run of an export folder (`--config-dir OUT +export=NAME`, easygen/export.py): its model config and
        # weights come with the folder; `init_from=` alone would load its weights into the default model
        folder = Path(init).parent
        cmd = cmd.replace(" init_from={init}", "").replace(
            "python run.py ", f"python run.py --config-dir {folder} +export={export} ")
    return f"[easygen] {what}next: " + cmd.format(init=init, bidiffuser=artifacts.get("bidiffuser_weights"))


@rank_zero_only
def print_summary(results: dict) -> None:
    print(f"\n[easygen] stage={results['stage']} finished; outputs in {results['output_dir']}")
    metrics = dict(results.get("metrics") or {})
    metrics.update({f"best {k}": v for k, v in (results.get("best") or {}).items()})
    for k in sorted(metrics):
        if k.startswith("lr-"):  # the schedule's last value (0 at the end of a cosine decay), not a result
            continue
        v = metrics[k]
        print(f"  {k:28s} {v:.4f}" if isinstance(v, float) else f"  {k:28s} {v}")
    for k, v in (results.get("checkpoints") or {}).items():
        if v:
            print(f"  checkpoint ({k}): {v}")
    score, base = metrics.get("val/CIDEr"), metrics.get("baseline/val_constant_CIDEr")
    if isinstance(score, float) and isinstance(base, float) and base > 0:
        print(f"  val/CIDEr {score:.4f} = {score / base:.2f}x the best constant caption's {base:.4f} "
              f"(\"{results.get('baseline_caption')}\" for every picture)")
    line = next_step(results)
    if line:
        print(line)


def finish_wandb() -> None:
    """Close the W&B run of this process, if one was started (a sweep runs many in one process)."""
    try:
        import wandb  # optional: only present when the W&B logger is installed
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
