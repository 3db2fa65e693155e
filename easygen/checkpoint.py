"""Reading and writing plain state-dict files safely.

Checkpoints come as safetensors or as ``torch.save`` pickles (UniDiffuser's ``uvit_v1.pth``, EasyGen's
``nnet_ema.pth``, ``caption_decoder.pth`` with its ``module.`` prefix). Pickles are read with
``weights_only=True`` so a file that would run code on load is refused instead of executed. Writes go to a
temporary file in the target folder and are moved into place with ``os.replace``, so an interrupted save never
leaves a truncated checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# the safetensors metadata entry holding the config of the stage that wrote the file (JSON)
CONFIG_METADATA_KEY = "easygen_config"


def _strip_module_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel/DDP checkpoints prefix every key with "module."; only strip when all keys have it.
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _torch_load(path: Path, **kwargs):
    """`torch.load` onto the CPU with `weights_only=True`: a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused to unpickle: the file holds objects other than tensors and plain containers "
            f"(loading it would execute code). Re-save it as a plain state dict. Details: {e}"
        ) from None


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or .pth/.pt/.bin/.ckpt onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        sd = load_file(str(path), device="cpu")
    elif suffix in TORCH_SUFFIXES:
        sd = _torch_load(path)
    else:
        raise ValueError(
            f"{path}: unknown checkpoint suffix {suffix!r}; expected one of "
            f"{SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}"
        )
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor")
    return _strip_module_prefix(dict(sd))


def save_state_dict_file(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, config: dict | None = None
) -> None:
    """Write a state dict atomically; .safetensors via safetensors, anything in TORCH_SUFFIXES via torch.save.
    `config` (the writing stage's config, safetensors only) is stored as JSON in the file's metadata, where
    `stored_config` reads it back."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown checkpoint suffix {suffix!r}")
    if config is not None and suffix not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"{path}: a config is stored in safetensors metadata only")
    metadata = {CONFIG_METADATA_KEY: json.dumps(config, default=str)} if config is not None else None
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"state dict entry {k!r} is a {type(v).__name__}, expected a tensor")
        v = v.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (tied or aliased weights): give each its own copy.
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    atomic_write(
        path,
        lambda tmp: save_file(out, tmp, metadata=metadata) if suffix in SAFETENSORS_SUFFIXES else torch.save(out, tmp),
    )


def stored_config(path: str | os.PathLike) -> dict | None:
    """The config of the stage that wrote a weights file: a Lightning checkpoint's `hyper_parameters.cfg`, or
    the JSON that `save_state_dict_file(..., config=)` put in a safetensors file's metadata. None for a file
    that carries none (a plain state dict, a file written elsewhere)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
        if not text:
            return None
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: metadata {CONFIG_METADATA_KEY!r} is not JSON ({e})") from None
        return cfg if isinstance(cfg, dict) else None
    if suffix != ".ckpt":
        return None
    obj = _torch_load(path, mmap=True)  # memory-mapped: the tensors are not read
    hp = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    cfg = hp.get("cfg") if isinstance(hp, dict) else None
    return cfg if isinstance(cfg, dict) else None


def atomic_write(path: str | os.PathLike, write) -> Path:
    """`write(tmp)` into a temporary file beside `path`, then renamed to `path`: a crash leaves the old file
    (or none), never a half-written one; the temporary file is removed on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def record_load(module: torch.nn.Module, key: str, path: str | os.PathLike, tensors: int) -> None:
    """Note on `module` that `tensors` tensors were loaded from `path` (the config key `key` named it)."""
    loads = module.__dict__.setdefault("_loaded_from", [])
    loads.append({"key": key, "path": str(path), "tensors": int(tensors)})


def loaded_weights(module: torch.nn.Module) -> list[dict]:
    """Every load `record_load` noted on `module` or its submodules: what a stage started from."""
    return [entry for m in module.modules() for entry in m.__dict__.get("_loaded_from", [])]
