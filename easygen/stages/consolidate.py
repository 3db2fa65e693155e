"""One file from a sharded checkpoint:

    python -m easygen.stages.consolidate RUN/checkpoints/last.ckpt consolidated.ckpt

A `strategy=fsdp` checkpoint is a folder (torch.distributed.checkpoint shards + Lightning's `meta.pt`);
a `strategy=deepspeed` checkpoint is a folder of ZeRO partitions. The result is an ordinary Lightning
checkpoint (full tensors, the optimizer state keyed by parameter index as `torch.optim` writes it),
which resumes under any strategy (`ckpt_path=`), feeds `init_from=` and `python -m easygen.stages.export`,
and loads with `torch.load(weights_only=True)`. Runs in one process, without GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from easygen.checkpoint import atomic_write
from easygen.lit.strategies import META_FILENAME, is_sharded_checkpoint


def is_deepspeed_checkpoint(path: Path) -> bool:
    return (
        Path(path).is_dir()
        and (Path(path) / "checkpoint").is_dir()
        and any((Path(path) / "checkpoint").glob("*model_states.pt"))
    )


def _id_keyed_optimizer(osd: dict) -> dict:
    """`get_optimizer_state_dict`'s layout (state and param_groups by parameter name) -> torch.optim's
    (by index in param_groups order), which `Optimizer.load_state_dict` accepts under any strategy."""
    groups = osd.get("param_groups", [])
    names = [n for g in groups for n in g["params"]]
    if all(isinstance(n, int) for n in names):
        return osd
    index = {n: i for i, n in enumerate(names)}
    state = {index[n]: s for n, s in osd.get("state", {}).items() if n in index}
    return {
        "state": state,
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
    }


def load_sharded_full(path: Path) -> dict:
    """The full checkpoint dict of a sharded (DCP) checkpoint folder, read in this one process.

    torch's ``dcp_to_torch_save`` gathers the shards into one ``torch.save`` file (a temporary one, in
    the system's temp folder), read back memory-mapped."""
    with tempfile.TemporaryDirectory(prefix="easygen-consolidate-") as tmp:
        full = Path(tmp) / "dcp.pt"
        dcp_to_torch_save(path, full)
        state = torch.load(full, map_location="cpu", weights_only=True, mmap=True)
    checkpoint = torch.load(path / META_FILENAME, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = state.pop("state_dict", {})
    optimizers = sorted((k for k in state if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [_id_keyed_optimizer(state.pop(k)) for k in optimizers]
    return checkpoint


def load_deepspeed_full(path: Path) -> dict:
    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise RuntimeError(
            f"{path} is a DeepSpeed checkpoint; converting it needs the deepspeed package ({e})"
        ) from None
    fd, tmp = tempfile.mkstemp(suffix=".ckpt")
    os.close(fd)
    try:
        convert_zero_checkpoint_to_fp32_state_dict(str(path), tmp)
        return torch.load(tmp, map_location="cpu", weights_only=False)
    finally:
        os.remove(tmp)


def load_full_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint as one dict, whether it is a file, a sharded FSDP folder or a DeepSpeed folder."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if is_sharded_checkpoint(path):
        return load_sharded_full(path)
    if is_deepspeed_checkpoint(path):
        return load_deepspeed_full(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise ValueError(
        f"{path} is neither a checkpoint file nor a complete sharded checkpoint folder "
        f"({META_FILENAME} and .metadata, or DeepSpeed's checkpoint/*model_states.pt): was its save interrupted?"
    )


def consolidate(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write `src` (any checkpoint form) as one checkpoint file `dst`, atomically."""
    checkpoint = load_full_checkpoint(src)
    return atomic_write(dst, lambda tmp: torch.save(checkpoint, tmp))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m easygen.stages.consolidate", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("checkpoint", help="a sharded checkpoint folder (strategy=fsdp or deepspeed) or a file")
    ap.add_argument("out", help="the consolidated checkpoint file to write")
    args = ap.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    ck = torch.load(out, map_location="cpu", weights_only=True, mmap=True)
    print(
        f"{out}: step {ck.get('global_step')}, {len(ck['state_dict'])} tensors, {len(ck.get('optimizer_states', []))} optimizer(s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
