"""Config checks that run before any work (no data written, no W&B run started, no model built): every
missing `???` key the stage reads, every configured path that does not exist, and values out of range,
reported together so that one try shows everything to fix."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from easygen.errors import ConfigError
from easygen.llm.release import refuse_release_folder

# model keys that name local files or folders (weights, tokenizers, metric models)
MODEL_PATH_KEYS = (
    "model.llm.path",
    "model.bidiffuser.uvit",
    "model.bidiffuser.autoencoder",
    "model.bidiffuser.clip_image",
    "model.bidiffuser.clip_text",
    "model.bidiffuser.caption_decoder",
    "model.bidiffuser.gpt2_tokenizer",
    "model.bidiffuser.weights",
)


def stage_needs(cfg) -> list[str]:
    """Config subtrees whose required (???) keys this stage reads."""
    kind = cfg.stage.kind
    if kind == "chat":
        # chat reads no dataset; about given features (stage.features) it builds no BiDiffuser
        return ["model.llm", "model.projector"] if cfg.stage.get("features") else ["model"]
    if kind == "all":
        return ["model", "data"]
    if kind == "extract":
        return ["model.bidiffuser", "data"]
    if kind == "eval":
        return ["model", "data"] if cfg.task != "t2i" else ["model.bidiffuser", "data"]
    if str(cfg.stage.get("module", "")).endswith("BiDiffuserModule"):
        return ["model.bidiffuser", "data"]
    needs = ["model.llm", "model.projector", "data"]
    if cfg.stage.get("feature_source", "auto") != "extracted":
        needs.append("model.bidiffuser")
    return needs


def _missing(cfg) -> list[str]:
    keys: list[str] = []
    for prefix in stage_needs(cfg):
        node = OmegaConf.select(cfg, prefix)
        if node is not None and OmegaConf.is_config(node):
            keys += [k for k in sorted(OmegaConf.missing_keys(node)) if k not in keys]
    return keys


def _select(cfg, key):
    """The value at `key`, or None where it is absent, missing (`???`) or not resolvable yet."""
    try:
        if OmegaConf.is_missing(cfg, key):
            return None
    except Exception:  # noqa: BLE001 - a parent node absent
        return None
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def _path_problems(cfg, missing: list[str]) -> list[str]:
    needs = stage_needs(cfg)
    out = []
    for key in MODEL_PATH_KEYS:
        if key in missing or not any(key.startswith(n) for n in needs):
            continue
        value = _select(cfg, key)
        if value not in (None, "") and not Path(str(value)).exists():
            out.append(f"{key}={value} does not exist: set {key} to a local path")
    for key in ("init_from",):
        value = _select(cfg, key)
        if value not in (None, "") and not Path(str(value)).exists():
            out.append(f"{key}={value} does not exist: set {key} to a checkpoint or an export folder")
    for key in ("init_from", "model.llm.path"):
        value = _select(cfg, key) if key not in missing else None
        if value not in (None, "") and Path(str(value)).is_dir():
            try:  # the released EasyGen's LLM folder loads as another model: it is imported first
                refuse_release_folder(value, key)
            except ConfigError as e:
                out.append(str(e))
    ckpt = _select(cfg, "ckpt_path")
    if ckpt not in (None, "", "last") and not Path(str(ckpt)).exists():
        out.append(f"ckpt_path={ckpt} does not exist: set ckpt_path to a checkpoint file or `last`")
    return out


def _data_problems(cfg, missing: list[str]) -> list[str]:
    if "data" not in stage_needs(cfg) or "data.root" in missing:
        return []
    root = _select(cfg, "data.root")
    if root in (None, "") or Path(str(root)).exists():
        return []
    if cfg.data.get("synthetic") and cfg.data.name == "synthetic":
        write = cfg.data.synthetic.get("write", "auto")
        default = Path(str(cfg.paths.data_dir)).resolve()
        if write is True or (write == "auto" and Path(str(root)).resolve().parent == default):
            return []  # the synthetic set is written there on first use
        return [
            f"data.root={root} does not exist: point data.root at an existing set, or add "
            f"data.synthetic.write=true to write the synthetic set there"
        ]
    return [
        f"data.root={root} does not exist: write a set there with `python -m data_modules.convert ...` "
        f"(or `python -m data_modules.synthetic --out {root}`) or set data.root to one"
    ]


def _positive(cfg, key: str, allow: tuple = ()) -> str | None:
    value = _select(cfg, key)
    if value is None or value in allow:
        return None
    try:
        ok = float(value) > 0
    except (TypeError, ValueError):
        ok = False
    return None if ok else f"{key}={value} must be a positive number"


def _range_problems(cfg) -> list[str]:
    out = [
        _positive(cfg, "optim.lr"),
        _positive(cfg, "optim.projector_lr"),
        _positive(cfg, "data.batch_size"),
        _positive(cfg, "data.eval_batch_size"),
        _positive(cfg, "trainer.max_steps", allow=(-1,)),
        _positive(cfg, "trainer.accumulate_grad_batches"),
        _positive(cfg, "global_batch_size"),
    ]
    for key, lo, hi in (("optim.warmup_ratio", 0.0, 1.0), ("optim.min_lr_ratio", 0.0, 1.0),
                        ("optim.weight_decay", 0.0, float("inf"))):
        value = _select(cfg, key)
        if value is not None and not (lo <= float(value) < hi or (hi == 1.0 and key == "optim.min_lr_ratio"
                                                                   and float(value) == 1.0)):
            out.append(f"{key}={value} must be in [{lo}, {hi})")
    if cfg.stage.get("kind") == "train" and _select(cfg, "trainer.max_steps") == -1 \
            and int(_select(cfg, "trainer.max_epochs") or -1) <= 0:
        out.append("trainer.max_steps=-1 and trainer.max_epochs=-1 would train forever: set one of them")
    return [p for p in out if p]


def _recipe_problems(cfg) -> list[str]:
    """A paper recipe run as one stage must be composed from that stage's own config, which holds its
    settings (conf/experiment/<name>/<stage>.yaml); `experiment=<name> stage=<stage>` would lack them."""
    recipe = cfg.get("recipe") or {}
    name, stage = recipe.get("name"), str(cfg.stage.name)
    if not name or cfg.stage.kind == "all" or recipe.get("stage") == stage:
        return []
    return [f"experiment={name} is the whole recipe (stage=all): run its {stage} stage with "
            f"experiment={name}/{stage} (conf/experiment/{name}/{stage}.yaml holds that stage's settings)"]


def validate(cfg) -> None:
    """Raise one ConfigError listing every problem found, one per line, each naming the key to set."""
    missing = _missing(cfg)
    problems = []
    if missing:
        problems.append(
            f"required key(s) not set: {', '.join(missing)} (e.g. {missing[0]}=/path/to/..., or once for all "
            "runs in conf/local/default.yaml)"
        )
    problems += _path_problems(cfg, missing) + _data_problems(cfg, missing) + _range_problems(cfg)
    problems += _recipe_problems(cfg)
    if str(_select(cfg, "trainer.accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append("trainer.accelerator=gpu but no CUDA GPU is visible on this machine: "
                        "set trainer.accelerator=cpu (or auto) or run where a GPU is")
    if problems:
        raise ConfigError("\n       ".join(problems))


class ValidateBeforeLaunch(Callback):
    """Hydra callback (`hydra.callbacks`): in a multirun, check the config before the sweeper or a launcher
    (SLURM) starts any job, so that a missing path fails in one line on the login node, not in every job."""

    def on_multirun_start(self, config, **kwargs) -> None:
        try:
            validate(config)
        except ConfigError as e:
            sys.stderr.write(f"error: {e}\n")
            raise SystemExit(2) from None
