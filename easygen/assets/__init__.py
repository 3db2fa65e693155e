"""Files that ship with the package: the embedded default's trained tiny weights (`tiny/`).

`tiny/bidiffuser.safetensors` and `tiny/llm.safetensors` are what `python -m easygen.stages.tiny_weights`
writes (the tiny recipe's BiDiffuser and LLM, trained on the synthetic set from random weights); the tiny
preset (conf/model/tiny.yaml) names them through the `${easygen.asset:NAME}` config resolver, as a real
preset names UniDiffuser's and Vicuna's downloaded weights."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def asset(name: str) -> str:
    """The absolute path of a shipped file (`tiny/llm.safetensors`); the caller checks that it exists."""
    return str(ROOT / name)
