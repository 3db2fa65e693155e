"""Files that ship with the package: the embedded default's trained tiny weights (`tiny/`).

`tiny/bidiffuser.safetensors` and `tiny/llm.safetensors` are what `python -m easygen.stages.tiny_weights`
writes (the tiny recipe's BiDiffuser and LLM, trained on the synthetic set from random weights); the tiny
preset (conf/model/tiny.yaml) names them through the `${easygen.asset:NAME}` config resolver, as a real
preset names UniDiffuser's and Vicuna's downloaded weights."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def is_shipped(path) -> bool:
    """Whether `path` is one of these files (a preset's own weights, which init_from or a recipe may replace)."""
    return bool(path) and Path(str(path)).resolve().is_relative_to(ROOT)


def asset(name: str) -> str:
    """The absolute path of a shipped file (`tiny/llm.safetensors`); the caller checks that it exists."""
    return str(ROOT / name)
