"""The released EasyGen (the paper's published weights) -> an export folder:

    python -m easygen.stages.import_release --llm pretrain_only_MLP --lora instruction_tunning_lora --out OUT

``--llm`` is the paper's alignment output (``model_type: diffllama``, the projector as
``model.fastchat_proj.*``), ``--lora`` its instruction-tuning adapter (peft). OUT is the kind of folder
``python -m easygen.stages.export`` writes: a plain transformers Llama (adapter merged), the projector, and
a config whose model is ``conf/model/vicuna7b.yaml`` with its LLM in ``OUT/llm`` and the paper's prompt
(template ``easygen``). BiDiffuser's files are given as for ``model=vicuna7b``:

    python run.py --config-dir OUT +export=easygen stage=chat model.bidiffuser.uvit=uvit_bi.pth ...
    python run.py --config-dir OUT +export=easygen stage=chat stage.features=FEATURES.npy stage.prompt=...

Reading the published format and writing the Llama are plain PyTorch (``easygen.llm.release``); this
module assembles the export folder (``easygen.export``) and is the command-line front end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from easygen.errors import ConfigError
from easygen.export import EXPORT_CONFIG, finish_export, point_llm_at, start_export, write_export_configs
from easygen.llm.release import convert_release

CONF = Path(__file__).resolve().parents[2] / "conf"


def release_model_config() -> dict:
    """conf/model/vicuna7b.yaml resolved on its own (the paper's model: BiDiffuser v1, 77 image tokens,
    512-pixel pictures); its required BiDiffuser paths stay `???`, set on the command line."""
    node = OmegaConf.create({"model": OmegaConf.load(CONF / "model" / "vicuna7b.yaml")})
    return OmegaConf.to_container(node, resolve=True, throw_on_missing=False)["model"]


def import_release(
    llm_dir: str | Path,
    out: str | Path,
    *,
    model_config: dict | None = None,
    lora_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write an export folder from the paper's LLM folder and, when given, its LoRA adapter: ``llm/`` a
    plain Llama (adapter merged) with the paper's tokenizer, the projector, and the configs: the model
    config (default ``release_model_config()``) with its LLM in ``llm/``, read by the paper's slow
    tokenizer, and the paper's prompt (template ``easygen``). OUT is written under a temporary name and
    renamed at the end; an OUT that exists must be an export (it is replaced)."""
    llm_dir, out = Path(llm_dir), Path(out).resolve()
    if out.exists() and not (out / EXPORT_CONFIG).is_file():
        raise ConfigError(f"--out {out} exists and is not an EasyGen export ({EXPORT_CONFIG} missing): choose another")
    model_config = dict(model_config or release_model_config())
    tmp = start_export(out)
    try:
        projector, plain, adapter_cfg = convert_release(llm_dir, tmp / "llm", lora_dir, max_shard_bytes)
        fc1, fc2 = projector["fc1.weight"], projector["fc2.weight"]
        model = point_llm_at(
            model_config, out / "llm", dtype=plain["dtype"],
            tokenizer={"_target_": "easygen.factories.sentencepiece_tokenizer", "path": str(out / "llm"),
                       "model_max_length": int(model_config.get("max_length") or 2048)},
        )
        model["template"] = "easygen"  # the paper's prompt, token for token (easygen/llm/templates.py)
        model["feature_dim"] = int(fc1.shape[1])
        model["projector"] = {"in_dim": int(fc1.shape[1]), "hidden_dim": int(fc1.shape[0]),
                              "out_dim": int(fc2.shape[0]), "standardize": False}
        model["llm"]["hidden_size"] = int(plain["hidden_size"])
        source = {"llm": str(llm_dir.resolve()), "lora": str(Path(lora_dir).resolve()) if lora_dir else None,
                  "lora_config": adapter_cfg, "format": "EasyGen release (DiffLlamaForCausalLM + peft LoRA)"}
        write_export_configs(tmp, out, model=model, projector=projector, tokenizer="llama-sentencepiece",
                             source=source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_export(tmp, out)


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m easygen.stages.import_release", description=__doc__.split("\n\n")[0])
    ap.add_argument("--llm", required=True, help="the paper's LLM folder (alignment output, model_type diffllama)")
    ap.add_argument("--lora", help="the paper's LoRA adapter folder (instruction tuning), merged into the LLM")
    ap.add_argument("--out", required=True, help="the export folder to write")
    ap.add_argument("--max-shard-size", default="5G", help="largest llm/ weights file (default 5G)")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        out = import_release(
            args.llm, args.out, lora_dir=args.lora, model_config=release_model_config(),
            max_shard_bytes=parse_size(args.max_shard_size),
        )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    print(
        f"imported to {out} in {time.time() - t0:.1f} s\n"
        f"  python run.py --config-dir {out} +export=easygen stage=chat stage.features=FEATURES.npy "
        "stage.prompt='Describe the image concisely.'\n"
        "  (pictures: add model.bidiffuser.uvit=uvit_bi.pth and the other model.bidiffuser.* paths)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
