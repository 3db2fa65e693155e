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
``python -m easygen.stages.export CKPT OUT``). ``python -m easygen.stages.import_release`` writes the same
kind of folder from the paper's published weights (no ``bidiffuser/``: BiDiffuser's files are given as
for ``model=vicuna7b``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer

from easygen.bidiffuser import save_uvit
from easygen.checkpoint import load_state_dict_file, save_state_dict_file
from easygen.llm.loading import load_checked
from easygen.llm.lora import merge_lora
from easygen.llm.model import EasyGen
from easygen.llm.projector import Projector
from easygen.llm.tokenization import load_llama_sentencepiece

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


def start_export(out: Path) -> Path:
    """The temporary folder an export is written into (beside ``out``, renamed by ``finish_export``)."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_export(tmp: Path, out: Path) -> Path:
    """``tmp`` becomes ``out`` (an earlier export there is replaced)."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def point_llm_at(model: dict, llm_dir: Path, dtype: str = "float32", tokenizer: dict | None = None) -> dict:
    """The model config with its LLM loaded from ``llm_dir`` (the factories conf/model/vicuna7b.yaml names;
    the tiny presets' ones are replaced)."""
    model = copy.deepcopy(model)
    model["module"] = "easygen.lit.easygen_module.EasyGenModule"  # exports are decoder-only LLMs
    llm_dir = str(llm_dir)
    model.setdefault("llm", {}).update(
        preset="pretrained", path=llm_dir, weights=None, dtype=dtype, trust_remote_code=False,
        tokenizer=tokenizer or {"_target_": "easygen.factories.pretrained_tokenizer", "path": llm_dir,
                                "trust_remote_code": False},
        net={"_target_": "easygen.factories.pretrained_llm", "path": llm_dir, "dtype": dtype,
             "trust_remote_code": False},
    )
    return model


def write_export_configs(
    tmp: Path,
    out: Path,
    *,
    model: dict,
    projector: dict[str, torch.Tensor],
    uvit_config: dict | None = None,
    tokenizer: str = "auto",
    source=None,
    standardize_tokens: int = 0,
) -> None:
    """The projector files and the configs of an export: ``model`` is its complete model config,
    ``projector`` the projector's state dict (``easygen.llm.projector.Projector`` keys)."""
    proj = {k: v.detach().cpu().contiguous() for k, v in projector.items()}
    save_state_dict_file(proj, tmp / "projector.safetensors")
    save_state_dict_file({f"model.projector.{k}": v for k, v in proj.items()}, tmp / "trained.safetensors")
    fc1, fc2 = proj["fc1.weight"], proj["fc2.weight"]
    meta = {
        "format": "easygen-export/1",
        "source": source,
        "projector": {
            "in_dim": int(fc1.shape[1]),
            "hidden_dim": int(fc1.shape[0]),
            "out_dim": int(fc2.shape[0]),
            "standardize_tokens": int(standardize_tokens),
        },
        # how `load_export` reads llm/'s tokenizer: transformers' AutoTokenizer, or (llama-sentencepiece)
        # Llama's slow tokenizer as the released EasyGen was trained with (easygen/llm/tokenization.py)
        "tokenizer": tokenizer,
        # `easygen.bidiffuser.load_uvit("bidiffuser/uvit.pth", **uvit_config)` rebuilds the network
        "uvit_config": uvit_config,
        # what `stage=chat` / `stage=eval` need: the model config, the projector weights, no adapters
        "config": {"model": model, "init_from": str(out / "trained.safetensors"), "lora": {"enabled": False}},
    }
    (tmp / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2))
    _write_configs(tmp, out.name, model, {k: v for k, v in meta["config"].items() if k != "model"})


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
    tmp = start_export(out)
    try:
        plain = _plain_llm(llm)
        plain.save_pretrained(str(tmp / "llm"), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "llm"))
        model = point_llm_at(model_config, out / "llm")
        if bidiffuser is not None:
            _write_bidiffuser(tmp / "bidiffuser", bidiffuser, uvit)
            model.setdefault("bidiffuser", {})["weights"] = str(out / "bidiffuser" / "bidiffuser.safetensors")
        written_uvit = uvit if uvit is not None else (bidiffuser.uvit if bidiffuser is not None else None)
        write_export_configs(
            tmp, out, model=model, projector=projector.state_dict(), source=source,
            uvit_config=dataclasses.asdict(written_uvit.config) if written_uvit is not None else None,
            standardize_tokens=int(getattr(projector, "standardize_tokens", 0)),
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_export(tmp, out)


def load_export(
    folder: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
):
    """``(EasyGen, tokenizer)`` from an export folder, through transformers and the projector file only."""
    folder = Path(folder)
    meta_path = folder / EXPORT_CONFIG
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not an EasyGen export: {EXPORT_CONFIG} is missing")
    meta = json.loads(meta_path.read_text())
    if meta.get("tokenizer") == "llama-sentencepiece":
        tokenizer = load_llama_sentencepiece(folder / "llm")
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "llm"), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    llm = load_checked(folder / "llm", key=f"{folder}/llm", dtype=dtype)
    p = meta["projector"]
    projector = Projector(
        int(p["in_dim"]), int(p["hidden_dim"]), int(p["out_dim"]), int(p.get("standardize_tokens", 0))
    )
    projector.load_state_dict(load_state_dict_file(folder / "projector.safetensors"))
    model = EasyGen(llm, projector.to(llm.dtype), tokenizer=tokenizer)
    return model.to(device).eval(), tokenizer

