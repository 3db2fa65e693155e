"""`strategy=auto|ddp|fsdp|deepspeed` -> a Lightning strategy, with the checks that must fail before
training starts (a GPU asked for where there is none, DeepSpeed without CUDA).

`fsdp` is Lightning's ModelParallelStrategy (FSDP2, sharding applied per block in each module's
`configure_model`, see `lit_modules.fsdp`) with three changes:
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

from lit_modules.errors import ConfigError

META_FILENAME = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


def wants_gpu(trainer_cfg) -> bool:
    return str(trainer_cfg.get("accelerator", "auto")) in ("gpu", "cuda")


def check_accelerator(trainer_cfg) -> None:
    if wants_gpu(trainer_cfg) and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.accelerator=gpu but no CUDA GPU is visible on this machine: "
            "set trainer.accelerator=cpu (or auto) or run where a GPU is"
        )


def is_sharded_checkpoint(path: Path) -> bool:
    return (
        Path(path).is_dir()
        and (Path(path) / META_FILENAME).is_file()
        and (Path(path) / ".metadata").is_file()
    )


def _fsdp2_strategy_class():
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2Strategy(ModelParallelStrategy):
        """ModelParallelStrategy as pure data parallelism (FSDP2 over all processes), atomic sharded saves,
        and loads that skip what the checkpoint does not hold."""

        strategy_name = "easygen_fsdp2"

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
            from torch.distributed.checkpoint import save

            path = Path(self.broadcast(str(filepath)))
            tmp = path.parent / f".{path.name}.tmp"
            old = path.parent / f".{path.name}.old"
            if self.global_rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.barrier()
            state = {"state_dict": checkpoint.pop("state_dict")}
            state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
            save(state, checkpoint_id=tmp)
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

    return FSDP2Strategy


def load_sharded(path: Path, module, optimizers, strict: bool, weights_only: bool | None = None) -> dict:
    """Load a sharded (DCP) checkpoint into an FSDP2-sharded module and its optimizers; return the
    remaining metadata (step, loops, schedulers, callbacks). With `strict=False` the model keys the
    checkpoint does not hold (frozen parameters) keep their current values."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

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
        # sharding itself happens in each module's configure_model (fully_shard per block)
        return _fsdp2_strategy_class()(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=bool(strategy_cfg.get("save_distributed_checkpoint", True)),
            process_group_backend=None if cuda else "gloo",
        )
    if name == "deepspeed":
        if not cuda:
            raise ConfigError(
                "strategy=deepspeed needs CUDA GPUs and none is visible here: "
                "use strategy=fsdp or strategy=ddp on this machine (set strategy=...)"
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("strategy=deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'")
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(
            stage=int(strategy_cfg.get("stage", 2)),
            offload_optimizer=bool(strategy_cfg.get("offload_optimizer", False)),
            offload_parameters=bool(strategy_cfg.get("offload_parameters", False)),
        )
    raise ConfigError(f"unknown strategy.name={name!r}: choose strategy=auto|ddp|fsdp|deepspeed")
