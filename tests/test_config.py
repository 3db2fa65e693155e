"""Every choice of every config group composes; every experiment composes and its objects instantiate
(large presets on the meta device); bad choices and missing paths fail with one line naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from easygen.errors import ConfigError
from tests.conftest import CONF, ROOT, compose_resolved

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("local", "paths", "hydra"))


def choices(group):
    """The group's options, those in sub-folders too (`experiment=easygen_vicuna7b/instruct`)."""
    return sorted(p.relative_to(CONF / group).with_suffix("").as_posix() for p in (CONF / group).rglob("*.yaml"))


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in choices(g)])
def test_every_group_choice_composes(group, choice):
    # a choice whose required keys other keys interpolate gets a value for them
    extra = {("data", "captions"): ["data.root=/tmp/shards"]}.get((group, choice), [])
    cfg = compose_resolved([f"{group}={choice}", *extra])
    assert cfg.stage.name
    if group == "stage":
        assert cfg.stage.name == choice


@pytest.mark.parametrize("experiment", choices("experiment"))
def test_every_experiment_composes_and_instantiates_on_meta(experiment):
    from transformers import T5ForConditionalGeneration

    from easygen.bidiffuser import UViT, UViTConfig
    from easygen.factories import build_projector, llama_7b_random, t5_config
    from easygen.stages.checks import validate

    cfg = compose_resolved([f"experiment={experiment}"])
    # the paper's paths are required (???) until a user sets them
    assert {"model.bidiffuser.uvit", "model.llm.path"} <= set(OmegaConf.missing_keys(cfg.model))
    plain = OmegaConf.to_container(cfg.model, resolve=True, throw_on_missing=False)
    # the real shapes on the meta device, through the factories of the random-weight presets
    with torch.device("meta"):
        uvit = UViT(UViTConfig(**{**UViTConfig.v1().__dict__, **plain["bidiffuser"]["uvit_config"]}))
        if cfg.model.llm.preset == "t5":
            llm = T5ForConditionalGeneration(t5_config(hidden_size=cfg.model.llm.hidden_size))
        else:
            llm = llama_7b_random(None, hidden_size=cfg.model.llm.hidden_size, device="meta")
        projector = build_projector({"model": plain})
    assert sum(p.numel() for p in uvit.parameters()) == 952_509_520
    assert all(p.is_meta for p in llm.parameters())
    assert llm.config.hidden_size == cfg.model.projector.out_dim == cfg.model.llm.hidden_size
    linears = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    assert (linears[0].in_features, linears[-1].out_features) == (cfg.model.feature_dim, cfg.model.llm.hidden_size)
    # the configured factories are the ones that load the weights from the (missing) paths
    assert cfg.model.llm.net._target_ in ("easygen.factories.pretrained_llm", "easygen.factories.pretrained_t5")
    for _name, cb in cfg.callbacks.items():
        if cb is not None:
            instantiate(OmegaConf.merge(cb, {"dirpath": "/tmp/ckpt"} if "dirpath" in cb else {}))
    if cfg.strategy._target_.endswith(("DDPStrategy", "FSDP2Strategy")):
        instantiate(cfg.strategy)
    # recipes ask for GPUs: on a CPU machine that is a configuration error naming the key
    if not torch.cuda.is_available() and cfg.trainer.accelerator == "gpu":
        with pytest.raises(ConfigError, match="trainer.accelerator=gpu"):
            validate(cfg)
    # a paper recipe's stage is composed from its own file, which names the stage; that stage's settings
    # differ from the whole recipe's; the whole recipe run as one stage is refused, naming the file to use
    name, stage = cfg.recipe.name, cfg.recipe.stage
    if name and stage:
        assert experiment == f"{name}/{stage}" and cfg.stage.name == stage
    elif name:
        assert cfg.stage.name == "all" and (CONF / "experiment" / name).is_dir()
        with pytest.raises(ConfigError, match=f"experiment={name}/pretrain"):
            validate(compose_resolved([f"experiment={experiment}", "stage=pretrain"]))


def test_unknown_choice_is_one_line():
    r = subprocess.run([sys.executable, "run.py", "stage=nonsense"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "stage=nonsense" in lines[0] and "pretrain" in lines[0], r.stderr


def _typed(args, cwd, timeout=300):
    """`python run.py ARGS` from `cwd`, no path overrides, as a user types it."""
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, "logger=none"], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _errors(stderr: str) -> list[str]:
    """The problems of a config error: its first line after `error: `, then one per indented line."""
    lines = stderr.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("error:"))
    return [lines[start][len("error:"):].strip(), *(line.strip() for line in lines[start + 1:])]


def test_missing_required_paths_all_at_once_before_any_work(tmp_path):
    r = _typed(["model=vicuna7b"], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    (problem,) = _errors(r.stderr)
    for key in ("model.llm.path", "model.bidiffuser.uvit", "model.bidiffuser.autoencoder", "model.bidiffuser.clip_image",
                "model.bidiffuser.clip_text", "model.bidiffuser.caption_decoder", "model.bidiffuser.gpt2_tokenizer"):
        assert key in problem, problem
    # nothing was written: not the 512-px synthetic set the preset would train on
    assert not (tmp_path / "data").exists()


def test_fake_paths_and_bad_values_reported_together(tmp_path):
    fake = [f"model.bidiffuser.{k}=/nowhere/{k}" for k in ("uvit", "autoencoder", "clip_image", "clip_text",
                                                          "caption_decoder", "gpt2_tokenizer")]
    r = _typed(["model=vicuna7b", "model.llm.path=/nowhere/llm", *fake, "optim.lr=-1", "data.batch_size=0"], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    problems = _errors(r.stderr)
    assert any("model.llm.path=/nowhere/llm does not exist" in p for p in problems), problems
    assert sum("does not exist" in p for p in problems) == 7, problems
    assert "optim.lr=-1 must be a positive number" in problems
    assert "data.batch_size=0 must be a positive number" in problems
    assert not (tmp_path / "data").exists()


def test_negative_learning_rate_is_one_line(tmp_path):
    r = _typed(["optim.lr=-1"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert _errors(r.stderr) == ["optim.lr=-1 must be a positive number"]
    assert not (tmp_path / "data").exists() and not list(tmp_path.rglob("wandb"))


def test_synthetic_root_that_does_not_exist(tmp_path):
    """A data.root that does not exist is an error, unless the synthetic set was asked to be written there."""
    target = tmp_path / "elsewhere" / "set"
    r = _typed(["stage=extract", f"data.root={target}"], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    (problem,) = _errors(r.stderr)
    assert f"data.root={target} does not exist" in problem and "data.synthetic.write=true" in problem
    assert not target.exists()
    from easygen.stages.checks import validate

    validate(compose_resolved([f"data.root={target}", "data.synthetic.write=true"]))  # no error: it may write
    with pytest.raises(ConfigError, match="data.root"):
        validate(compose_resolved(["data=captions", f"data.root={target}"]))


def test_resume_under_other_settings_names_them(tmp_path):
    """A checkpoint of a lora=on run resumed without lora=on: the settings that differ, not an optimizer
    traceback; with the same settings it passes."""
    from easygen.stages.checkpoints import check_resume

    on = compose_resolved(["stage=instruct", "lora=on"])
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"cfg": OmegaConf.to_container(on, resolve=True)}, "global_step": 3}, ckpt)
    check_resume(compose_resolved(["stage=instruct", "lora=on", "optim.lr=1e-4"]), str(ckpt))
    with pytest.raises(ConfigError) as err:
        check_resume(compose_resolved(["stage=instruct"]), str(ckpt))
    assert "lora.enabled: True -> False" in str(err.value) and "lora=on" in str(err.value)


def test_fsdp_with_gpu_accelerator_on_cpu_machine_fails_early(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = subprocess.run(
        [sys.executable, "run.py", "strategy=fsdp", "trainer.accelerator=gpu", f"paths.log_dir={tmp_path}",
         f"paths.data_dir={tmp_path}", "logger=none"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "trainer.accelerator" in last, r.stderr[-2000:]


def test_data_path_without_shards_fails_early(tmp_path):
    (tmp_path / "nothing").mkdir()
    r = subprocess.run(
        [sys.executable, "run.py", "data=captions", f"data.root={tmp_path}/nothing", f"paths.log_dir={tmp_path}",
         f"paths.data_dir={tmp_path}", "logger=none"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "data.train[0].urls" in last and "no shards" in last, r.stderr[-2000:]


def test_validation_steps_divide_max_steps():
    """stage.val_every becomes a validation interval that divides max_steps (so the last step is scored),
    including when it is larger than the run."""
    from easygen.stages.build import validation_schedule

    def interval(max_steps, every):
        cfg = OmegaConf.create({"trainer": {"max_steps": max_steps, "val_check_interval": None,
                                            "check_val_every_n_epoch": None}, "stage": {"val_every": every}})
        return validation_schedule(cfg)["val_check_interval"]

    assert interval(1500, 500) == 500
    assert interval(1000, 300) == 500  # the next divisor up
    assert interval(2, 500) == 2
    assert interval(120, None) == 120
