"""`strategy=auto|ddp|fsdp|deepspeed` -> a Lightning strategy, with the checks that must fail before
training starts (a GPU asked for where there is none, DeepSpeed without CUDA)."""

from __future__ import annotations

import importlib.util

import torch

from lit_modules.errors import ConfigError


def wants_gpu(trainer_cfg) -> bool:
    return str(trainer_cfg.get("accelerator", "auto")) in ("gpu", "cuda")


def check_accelerator(trainer_cfg) -> None:
    if wants_gpu(trainer_cfg) and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.accelerator=gpu but no CUDA GPU is visible on this machine: "
            "set trainer.accelerator=cpu (or auto) or run where a GPU is"
        )


def build_strategy(strategy_cfg, trainer_cfg):
    name = str(strategy_cfg.get("name", "auto"))
    check_accelerator(trainer_cfg)
    cuda = torch.cuda.is_available() and str(trainer_cfg.get("accelerator", "auto")) != "cpu"
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            find_unused_parameters=bool(strategy_cfg.get("find_unused_parameters", False)),
            gradient_as_bucket_view=bool(strategy_cfg.get("gradient_as_bucket_view", True)),
            static_graph=bool(strategy_cfg.get("static_graph", False)),
            process_group_backend=None if cuda else "gloo",
        )
    if name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # sharding itself happens in each module's configure_model (fully_shard per block)
        return ModelParallelStrategy(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=bool(strategy_cfg.get("save_distributed_checkpoint", True)),
        )
    if name == "deepspeed":
        if not cuda:
            raise ConfigError(
                "strategy=deepspeed needs CUDA GPUs and none is visible here: "
                "use strategy=fsdp or strategy=ddp on this machine (set strategy=...)"
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("strategy=deepspeed needs the deepspeed package: pip install deepspeed")
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(
            stage=int(strategy_cfg.get("stage", 2)),
            offload_optimizer=bool(strategy_cfg.get("offload_optimizer", False)),
            offload_parameters=bool(strategy_cfg.get("offload_parameters", False)),
        )
    raise ConfigError(f"unknown strategy.name={name!r}: choose strategy=auto|ddp|fsdp|deepspeed")
