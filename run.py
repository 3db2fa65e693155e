"""EasyGen's single entry point.

    python run.py                                   # stage=pretrain on the embedded default (tiny, CPU)
    python run.py stage=bidiffuser|extract|pretrain|instruct|eval|chat|all
    python run.py stage=instruct lora=on strategy=fsdp trainer.devices=2
    python run.py -m optim.lr=1e-3,1e-4 seed=1,2    # sweeps: one output dir, one W&B run per job
    python run.py -m hparams_search=caption_optuna  # Optuna search maximising val/CIDEr

Environment: EASYGEN_DEBUG=smoke adds `debug=smoke` (a few steps of everything) to any command that does
not choose a `debug` config itself; EASYGEN_ROOT_DIR is where data/ and logs/ go (default: the directory
the command was started from).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from easygen.errors import ConfigError
from easygen.stages.run import finish_wandb, print_summary, run_stage

CONF = Path(__file__).resolve().parent / "conf"


def check_group_choices(argv: list[str]) -> None:
    """Fail with one line on an unknown config-group choice (Hydra's own message spans a page)."""
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups or "," in value or value in ("null", "") or "(" in value:
            continue
        if not (CONF / key / f"{value}.yaml").exists():
            options = sorted(p.stem for p in (CONF / key).glob("*.yaml"))
            sys.stderr.write(f"error: unknown {key}={value}; choose {key}=" + "|".join(options) + "\n")
            raise SystemExit(2)


def with_env_switches(argv: list[str]) -> list[str]:
    """`EASYGEN_DEBUG=NAME` is the same as typing `debug=NAME` (unless the command names a debug config)."""
    debug = os.environ.get("EASYGEN_DEBUG")
    if debug and not any(a.lstrip("+~").startswith("debug=") for a in argv):
        # beside the command's own overrides: Hydra's parser takes them as one run of positional arguments,
        # so one placed after `--cfg job` or `--config-dir DIR` would be refused
        at = next((i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")), len(argv))
        argv = [*argv[:at], f"debug={debug}", *argv[at:]]
    return argv


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        results = run_stage(cfg)
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        finish_wandb()
        raise SystemExit(2) from None
    finish_wandb()
    if results.get("stage") not in ("chat", "serve"):
        print_summary(results)
    metric = cfg.get("optimized_metric")
    if metric:
        value = (results.get("best") or {}).get(metric, (results.get("metrics") or {}).get(metric))
        return None if value is None else float(value)
    return None


if __name__ == "__main__":
    # data/ and logs/ go under the directory the command was started from; recorded once, so that DDP
    # ranks, sweep jobs and SLURM tasks (which inherit the environment) agree on it
    os.environ.setdefault("EASYGEN_ROOT_DIR", os.getcwd())
    sys.argv[1:] = with_env_switches(sys.argv[1:])
    check_group_choices(sys.argv[1:])
    main()
