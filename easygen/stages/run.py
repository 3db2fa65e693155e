"""One stage from a composed config: check it, run `stage.program` (a function of the config returning
the results dict), write `results.json` in the run's output directory and print a summary (rank zero)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hydra.utils import get_method
from lightning.pytorch.utilities import rank_zero_only

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


def finish_wandb() -> None:
    """Close the W&B run of this process, if one was started (a sweep runs many in one process)."""
    try:
        import wandb  # optional: only present when the W&B logger is installed
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
