"""Write the embedded default's trained tiny weights (easygen/assets/tiny/) from random weights.

    python -m easygen.stages.tiny_weights --out DIR [--work DIR]

The tiny preset (conf/model/tiny.yaml) starts from these files as a real preset starts from UniDiffuser's
and Vicuna's published weights. They come from the tiny recipe itself, run from random weights on the
synthetic set at seed 42 (`python run.py stage=all` with `model.bidiffuser.weights=null
model.llm.weights=null`, its BiDiffuser, extract, pretrain and instruct stages):

- `bidiffuser.safetensors`: the whole BiDiffuser pipeline after `stage=bidiffuser` (U-ViT EMA weights,
  tiny VAE, the CLIP towers fitted to each other, the caption decoder), as float16;
- `llm.safetensors`: the tiny Llama after `stage=instruct` (the LLM alone, without the projector), as
  float16, with the sha256 of the tiny tokenizer's vocabulary in its metadata.

`python run.py` (stage=pretrain) then aligns a new projector to them: the paper's first stage (section 3.3),
the LLM frozen. Both files are deterministic given the code: the command prints their sha256 and whether
they equal the shipped files (tests/test_tiny_weights.py checks it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from easygen.assets import ROOT

SHIPPED = ROOT / "tiny"
RUN_PY = Path(__file__).resolve().parents[2] / "run.py"
STAGES = "[bidiffuser,extract,pretrain,instruct]"
# the recipe from random weights; everything else is the tiny preset's and the stages' defaults
OVERRIDES = ["stage=all", f"stage.stages={STAGES}", "model.bidiffuser.weights=null", "model.llm.weights=null",
             "seed=42", "logger=none", "data=synthetic"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def as_float16(sd: dict) -> dict:
    return {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def pack(run_dir: Path, out: Path) -> dict[str, Path]:
    """The two files from a finished recipe folder (its `bidiffuser/` and `instruct/` stages)."""
    from transformers import AutoTokenizer

    from easygen.factories import tokenizer_fingerprint

    bidiffuser = run_dir / "bidiffuser" / "bidiffuser" / "bidiffuser.safetensors"
    trained = run_dir / "instruct" / "easygen" / "trained.safetensors"
    for path in (bidiffuser, trained):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the recipe in {run_dir} did not finish")
    out.mkdir(parents=True, exist_ok=True)
    files = {"bidiffuser": out / "bidiffuser.safetensors", "llm": out / "llm.safetensors"}
    save_file(as_float16(load_file(str(bidiffuser))), str(files["bidiffuser"]))
    prefix = "model.llm."
    llm = {k[len(prefix):]: v for k, v in load_file(str(trained)).items() if k.startswith(prefix)}
    if not llm:
        raise ValueError(f"{trained} holds no LLM weights (keys under {prefix!r}): was stage.train_llm false?")
    # the tokenizer the LLM was trained with, as the instruct stage saved it beside its weights
    tokenizer = AutoTokenizer.from_pretrained(str(trained.parent / "tokenizer"), local_files_only=True)
    save_file(as_float16(llm), str(files["llm"]),
              metadata={"tokenizer_sha256": tokenizer_fingerprint(tokenizer), "made_by": "easygen.stages.tiny_weights"})
    return files


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(prog="python -m easygen.stages.tiny_weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where the two files go (easygen/assets/tiny to replace them)")
    parser.add_argument("--work", default=None, help="where the recipe runs (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="easygen-tiny-weights-") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        run_dir = work / "recipe"
        env = {**os.environ, "EASYGEN_ROOT_DIR": str(work)}
        env.pop("EASYGEN_DEBUG", None)  # the shipped files are the full recipe's
        cmd = [sys.executable, str(RUN_PY), *OVERRIDES, f"hydra.run.dir={run_dir}"]
        print("running:", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=work, env=env, check=True)
        out = Path(args.out).resolve()
        files = pack(run_dir, out)
        report = {}
        for name, path in files.items():
            digest = sha256(path)
            shipped = SHIPPED / path.name
            same = shipped.is_file() and sha256(shipped) == digest
            report[name] = digest
            print(f"{path}  sha256 {digest}  {path.stat().st_size / 1e6:.2f} MB  "
                  f"{'= the shipped file' if same else 'differs from ' + str(shipped)}")
        return report


if __name__ == "__main__":
    main()
