"""Shared fixtures: compose the real configs (conf/) and keep every run's files in a temp folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import easygen.stages.common  # noqa: F401  (registers the ${easygen.asset:NAME} resolver, as run.py's imports do)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def compose(overrides=(), return_hydra_config=False):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


SAFE_PATHS = ["paths.root_dir=/tmp/easygen-test", "paths.output_dir=/tmp/easygen-test/out",
              "paths.work_dir=/tmp/easygen-test"]


def compose_resolved(overrides=()):
    """Compose with concrete paths and resolve every interpolation (required `???` keys stay missing)."""
    cfg = compose([*SAFE_PATHS, *overrides])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return cfg


def compose_at(data_dir, out, overrides=()):
    """Compose with every path under `data_dir` and the run's output in `out`, resolved."""
    cfg = compose(
        [
            f"paths.data_dir={data_dir}",
            f"paths.root_dir={data_dir}",
            f"paths.output_dir={out}",
            f"paths.work_dir={data_dir}",
            f"paths.log_dir={data_dir}/logs",
            *overrides,
        ]
    )
    OmegaConf.resolve(cfg)
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the tiny models gain nothing from more, and a shared CPU makes two spin."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def run_env(tmp_path):
    """Environment for subprocess runs of run.py: offline W&B, no hub, data and logs under tmp_path."""
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("WANDB_API_KEY", None)
    return env
