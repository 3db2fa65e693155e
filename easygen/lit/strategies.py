"""The strategies `conf/strategy/*.yaml` instantiate (`_target_`): `auto` (Lightning's choice), `ddp`
(Lightning's DDPStrategy itself), `fsdp` and `deepspeed`, with the checks that must fail before training
starts (DeepSpeed without CUDA or without its package).

`fsdp` is Lightning's ModelParallelStrategy (FSDP2, sharding applied per block in each module's
`configure_model`, see `easygen.lit.fsdp`) with three changes:
- the data-parallel mesh spans every process (tensor parallel size 1), on one node or many;
- sharded (DCP) checkpoints are written into a temporary folder and swapped into place, so a crash
  during a save leaves the previous checkpoint whole;
- loading reads only the tensors the checkpoint holds: the modules save their trained parameters
  only, the frozen ones are rebuilt from their sources (`strict_loading=False`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from easygen.errors import ConfigError

META_FILENAME = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


def is_sharded_checkpoint(path: Path) -> bool:
    return (
        Path(path).is_dir()
        and (Path(path) / META_FILENAME).is_file()
        and (Path(path) / ".metadata").is_file()
    )


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy as pure data parallelism (FSDP2 over all processes), atomic sharded saves,
    and loads that skip what the checkpoint does not hold. The sharding settings (mixed precision,
    resharding, activation checkpointing) travel with the strategy: each LightningModule's
    `configure_model` reads them from `trainer.strategy.sharding` (see `easygen.lit.fsdp`)."""

    strategy_name = "easygen_fsdp2"

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        param_dtype: str = "bfloat16",
        reduce_dtype: str = "float32",
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        **kwargs,
    ) -> None:
        # tensor parallel size 1: the data-parallel mesh spans every process, on one node or many;
        # the process-group backend is Lightning's default for the device (NCCL on CUDA, gloo on CPU)
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint, **kwargs,
        )
        self.sharding = {
            "param_dtype": param_dtype,
            "reduce_dtype": reduce_dtype,
            "reshard_after_forward": reshard_after_forward,
            "activation_checkpointing": activation_checkpointing,
        }

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            tp = 1 if self._tensor_parallel_size == "auto" else int(self._tensor_parallel_size)
            self._tensor_parallel_size = tp
            self._data_parallel_size = max(1, self.num_nodes * self.num_processes // tp)
        super().setup_environment()

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:
            # one full file on rank 0, written atomically by Lightning's checkpoint IO
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.parent / f".{path.name}.tmp"
        old = path.parent / f".{path.name}.old"
        if self.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        dcp.save(state, checkpoint_id=tmp)
        if self.global_rank == 0:
            torch.save(checkpoint, tmp / META_FILENAME)
        self.barrier()
        if self.global_rank == 0:
            # the swap: at every moment either `path` or `.old` is a complete checkpoint
            shutil.rmtree(old, ignore_errors=True)
            if path.is_file():
                path.unlink()
            elif path.exists():
                os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        return load_sharded(
            path,
            self.model,
            self.optimizers,
            strict=self.lightning_module.strict_loading,
            weights_only=weights_only,
        )


def load_sharded(path: Path, module, optimizers, strict: bool, weights_only: bool | None = None) -> dict:
    """Load a sharded (DCP) checkpoint into an FSDP2-sharded module and its optimizers; return the
    remaining metadata (step, loops, schedulers, callbacks). With `strict=False` the model keys the
    checkpoint does not hold (frozen parameters) keep their current values."""
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    model_sd = get_model_state_dict(module)
    held = {k: v for k, v in model_sd.items() if f"state_dict.{k}" in saved}
    if strict and len(held) != len(model_sd):
        missing = sorted(set(model_sd) - set(held))
        raise RuntimeError(f"{path}: checkpoint lacks {len(missing)} model keys, e.g. {missing[:3]}")
    if not held:
        raise RuntimeError(f"{path}: checkpoint holds none of this model's parameters")
    wrapped = {"state_dict": held}
    dcp.load(wrapped, checkpoint_id=str(path))
    module.load_state_dict(wrapped["state_dict"], strict=False)
    for i, optim in enumerate(optimizers):
        key = f"optimizer_{i}"
        osd = {key: get_optimizer_state_dict(module, optim)}
        dcp.load(osd, checkpoint_id=str(path))
        set_optimizer_state_dict(
            module, optim, optim_state_dict=osd[key], options=StateDictOptions(cpu_offload=True)
        )
    return torch.load(
        path / META_FILENAME, map_location="cpu", weights_only=True if weights_only is None else weights_only
    )


def auto() -> str:
    """`strategy=auto`: Lightning's own choice for the machine (single device: no wrapper)."""
    return "auto"


def deepspeed(stage: int = 2, offload_optimizer: bool = False, offload_parameters: bool = False):
    """`strategy=deepspeed`: DeepSpeed ZeRO, which needs CUDA GPUs and the deepspeed package."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "strategy=deepspeed needs CUDA GPUs and none is visible here: "
            "use strategy=fsdp or strategy=ddp on this machine (set strategy=...)"
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("strategy=deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'")
    return DeepSpeedStrategy(stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters)
