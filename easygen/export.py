"""A trained EasyGen as a folder that loads without the training code (plain PyTorch + transformers).

Layout of an export folder::

    llm/                         the LLM in transformers format (LoRA adapters merged in) + its tokenizer
    projector.safetensors        the projector (keys of ``easygen.llm.projector.Projector``)
    bidiffuser/uvit.pth          the U-ViT in UniDiffuser's original key format (UniDiffuser's tools read it)
    bidiffuser/bidiffuser.safetensors   every BiDiffuser part (VAE, CLIPs, caption decoder, U-ViT)
    trained.safetensors          the projector under ``model.projector.*``, what `init_from=` reads
    export/easygen.yaml          the config for `python run.py --config-dir OUT +export=easygen stage=chat|eval`
    model/easygen_export.yaml    the model config it selects (the LLM from llm/, BiDiffuser from bidiffuser/)
    easygen.json                 the same as JSON, plus the projector's shape for `load_export`

``export_model`` writes it from built models; ``load_export`` reads it back as an ``EasyGen`` with its
tokenizer, using transformers' ``from_pretrained`` and nothing of this project's training side. Building
the models from a training checkpoint's config is the config layer's job (``easygen.stages.export``, also
the command-line front end:
``python -m easygen.stages.export CKPT OUT``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from easygen.bidiffuser import save_uvit
from easygen.checkpoint import load_state_dict_file, save_state_dict_file
from easygen.llm.lora import merge_lora
from easygen.llm.model import EasyGen
from easygen.llm.projector import Projector

EXPORT_CONFIG = "easygen.json"


def _plain_llm(llm):
    """A transformers model with any LoRA adapters folded in (on a copy: the caller's model keeps them)."""
    if hasattr(llm, "merge_and_unload"):
        return merge_lora(copy.deepcopy(llm))
    return llm


def _yaml(value, indent: int = 0) -> str:
    """Minimal YAML for nested dicts of scalars and lists (JSON scalars are valid YAML)."""
    pad = " " * indent
    lines = []
    for k, v in value.items():
        if isinstance(v, dict) and v:
            lines.append(f"{pad}{k}:")
            lines.append(_yaml(v, indent + 2))
        else:
            lines.append(f"{pad}{k}: {json.dumps(v)}")
    return "\n".join(lines)


def _write_bidiffuser(folder: Path, bidiffuser: torch.nn.Module, uvit: torch.nn.Module | None) -> None:
    """`uvit.pth` in UniDiffuser's key format and every part of the pipeline in one safetensors file."""
    folder.mkdir()
    save_uvit(uvit if uvit is not None else bidiffuser.uvit, folder / "uvit.pth")
    state = {k: v.detach().cpu().contiguous() for k, v in bidiffuser.state_dict().items()}
    if uvit is not None:
        state.update({f"uvit.{k}": v.detach().cpu().contiguous() for k, v in uvit.state_dict().items()})
    save_state_dict_file(state, folder / "bidiffuser.safetensors")


def _write_configs(tmp: Path, name: str, model: dict, rest: dict) -> None:
    """`+export=easygen` selects the export's own model config (model/easygen_export.yaml, complete: a
    merge onto the run's model config would mix the factories' arguments) and sets the rest (init_from)."""
    (tmp / "export").mkdir()
    (tmp / "model").mkdir()
    (tmp / "model" / "easygen_export.yaml").write_text(
        f"# the model of the export in {name}/ (written by easygen.export)\n" + _yaml(model) + "\n"
    )
    (tmp / "export" / "easygen.yaml").write_text(
        "# @package _global_\n# python run.py --config-dir <this folder> +export=easygen stage=chat|eval\n"
        "defaults:\n  - override /model: easygen_export\n" + _yaml(rest) + "\n"
    )


def export_model(
    out: str | os.PathLike,
    *,
    llm,
    tokenizer,
    projector: torch.nn.Module,
    model_config: dict,
    bidiffuser: torch.nn.Module | None = None,
    uvit: torch.nn.Module | None = None,
    source: str | None = None,
) -> Path:
    """Write the export folder (see the module docstring) into ``out``, atomically: it is written under a
    temporary name beside ``out`` and renamed at the end.

    ``model_config`` is the ``model`` config the models were built from; the exported config points its
    LLM at ``llm/`` (``preset: pretrained``) and its BiDiffuser weights at ``bidiffuser/``. ``uvit`` (default:
    ``bidiffuser.uvit``) is the network written in UniDiffuser's format, e.g. an EMA copy.
    """
    out = Path(out).resolve()
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    plain = _plain_llm(llm)
    plain.save_pretrained(str(tmp / "llm"), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / "llm"))
    proj = {k: v.detach().cpu() for k, v in projector.state_dict().items()}
    save_state_dict_file(proj, tmp / "projector.safetensors")
    save_state_dict_file({f"model.projector.{k}": v for k, v in proj.items()}, tmp / "trained.safetensors")

    model = copy.deepcopy(model_config)
    model["module"] = "easygen.lit.easygen_module.EasyGenModule"  # exports are decoder-only LLMs
    llm_dir = str(out / "llm")
    model.setdefault("llm", {}).update(
        preset="pretrained", path=llm_dir, dtype="float32", trust_remote_code=False,
        # the factories conf/model/vicuna7b.yaml names, pointed at llm/ (the tiny presets' ones are replaced)
        tokenizer={"_target_": "easygen.factories.pretrained_tokenizer", "path": llm_dir, "trust_remote_code": False},
        net={"_target_": "easygen.factories.pretrained_llm", "path": llm_dir, "dtype": "float32",
             "trust_remote_code": False},
    )
    if bidiffuser is not None:
        _write_bidiffuser(tmp / "bidiffuser", bidiffuser, uvit)
        model.setdefault("bidiffuser", {})["weights"] = str(out / "bidiffuser" / "bidiffuser.safetensors")

    linears = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    written_uvit = uvit if uvit is not None else (bidiffuser.uvit if bidiffuser is not None else None)
    meta = {
        "format": "easygen-export/1",
        "source": source,
        "projector": {
            "in_dim": linears[0].in_features,
            "hidden_dim": linears[0].out_features,
            "out_dim": linears[-1].out_features,
            "standardize_tokens": int(getattr(projector, "standardize_tokens", 0)),
        },
        # `easygen.bidiffuser.load_uvit("bidiffuser/uvit.pth", **uvit_config)` rebuilds the network
        "uvit_config": dataclasses.asdict(written_uvit.config) if written_uvit is not None else None,
        # what `stage=chat` / `stage=eval` need: the model config, the projector weights, no adapters
        "config": {"model": model, "init_from": str(out / "trained.safetensors"), "lora": {"enabled": False}},
    }
    (tmp / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2))
    _write_configs(tmp, out.name, model, {k: v for k, v in meta["config"].items() if k != "model"})
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def load_export(
    folder: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
):
    """``(EasyGen, tokenizer)`` from an export folder, through transformers and the projector file only."""
    folder = Path(folder)
    meta_path = folder / EXPORT_CONFIG
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not an EasyGen export: {EXPORT_CONFIG} is missing")
    meta = json.loads(meta_path.read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "llm"), local_files_only=True)
    llm = AutoModelForCausalLM.from_pretrained(str(folder / "llm"), local_files_only=True, dtype=dtype)
    p = meta["projector"]
    projector = Projector(
        int(p["in_dim"]), int(p["hidden_dim"]), int(p["out_dim"]), int(p.get("standardize_tokens", 0))
    )
    projector.load_state_dict(load_state_dict_file(folder / "projector.safetensors"))
    model = EasyGen(llm, projector.to(llm.dtype), tokenizer=tokenizer)
    return model.to(device).eval(), tokenizer

