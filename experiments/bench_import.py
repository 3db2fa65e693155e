"""Peak memory and speed of `python -m easygen.stages.import_release` on a generated model of >= 1 GB.

    python experiments/bench_import.py --out /tmp/bench_import [--hidden 2048 --layers 8 --dtype float16]

Writes a Llama in the released EasyGen's published format (model_type diffllama, the projector as
model.fastchat_proj.*, Llama's tokenizer.model, a LoRA adapter with the paper's config on q/v) straight to
disk tensor by tensor, in safetensors (one file and two shards) and in .bin, then imports each in a fresh
process and reports that process's peak resident memory (VmHWM; ru_maxrss would count the forking
parent's memory too) against the model's size on disk,
its resident memory after the imports and before the work (the Python + torch baseline), and seconds per
GB. The reference run in the same process: copying the same files (`shutil.copyfile`), the floor for any
import that reads and writes every byte.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from easygen.llm.release import PROJECTOR_PREFIX, RELEASE_ARCHITECTURE, RELEASE_MODEL_TYPE  # noqa: E402
from easygen.llm.release_sample import ADAPTER, TOKENIZER_CONFIG, train_llama_spiece  # noqa: E402

CHILD = """
import sys, time
from pathlib import Path
import torch  # noqa: F401 - the baseline includes torch and transformers, as the command's process has them
import transformers  # noqa: F401
from easygen.stages.import_release import main

def hwm():  # this process's peak resident memory in bytes (VmHWM: per address space, fresh after exec)
    line = [x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM")][0]
    return int(line.split()[1]) * 1024

base = hwm()
t0 = time.time()
rc = main(sys.argv[1:])
print("RESULT", rc, base, hwm(), time.time() - t0)
"""


def tensors(hidden: int, layers: int, vocab: int, inter: int):
    """(name, shape) of a Llama in the published layout, then the projector."""
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}.self_attn.{n}.weight", (hidden, hidden)
        yield f"{p}.mlp.gate_proj.weight", (inter, hidden)
        yield f"{p}.mlp.up_proj.weight", (inter, hidden)
        yield f"{p}.mlp.down_proj.weight", (hidden, inter)
        yield f"{p}.input_layernorm.weight", (hidden,)
        yield f"{p}.post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)
    yield PROJECTOR_PREFIX + "fc1.weight", (3072, 768)
    yield PROJECTOR_PREFIX + "fc1.bias", (3072,)
    yield PROJECTOR_PREFIX + "fc2.weight", (hidden, 3072)
    yield PROJECTOR_PREFIX + "fc2.bias", (hidden,)


def write_model(folder: Path, fmt: str, shards: int, hidden: int, layers: int, dtype: torch.dtype) -> int:
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(train_llama_spiece())
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    vocab, inter = 32000, hidden * 11008 // 4096
    config = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, rms_norm_eps=1e-6,
                  max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False, model_type=RELEASE_MODEL_TYPE, architectures=[RELEASE_ARCHITECTURE],
                  torch_dtype=str(dtype)[6:])
    (folder / "config.json").write_text(json.dumps(config))
    items = list(tensors(hidden, layers, vocab, inter))
    groups = [items[i * len(items) // shards: (i + 1) * len(items) // shards] for i in range(shards)]
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map, g = {}, torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        name = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: (torch.randn(shape, generator=g) * 0.02).to(dtype) for k, shape in group}
        if fmt == "safetensors":
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
        del part
    if shards > 1:
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum((folder / n).stat().st_size for n in set(weight_map.values()))


def write_adapter(folder: Path, hidden: int, layers: int) -> None:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    state = {}
    for i in range(layers):
        for n in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{n}"
            state[f"{key}.lora_A.weight"] = torch.randn(ADAPTER["r"], hidden, generator=g) * 0.01
            state[f"{key}.lora_B.weight"] = torch.randn(hidden, ADAPTER["r"], generator=g) * 0.01
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "bias": "none", **ADAPTER}))


def run_import(llm: Path, lora: Path, out: Path) -> tuple[int, int, int, float]:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, "--llm", str(llm), "--lora", str(lora), "--out", str(out)],
                          capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if not line:
        raise SystemExit(proc.stderr[-3000:])
    rc, base, peak, secs = line[0].split()[1:]
    return int(rc), int(base), int(peak), float(secs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/bench_import")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    args = ap.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    dtype = getattr(torch, args.dtype)
    lora = root / "lora"
    write_adapter(lora, args.hidden, args.layers)
    print(f"load: {os.getloadavg()}")
    rows = []
    for fmt, shards in (("safetensors", 1), ("safetensors", 2), ("bin", 2)):
        llm = root / f"llm-{fmt}-{shards}"
        size = write_model(llm, fmt, shards, args.hidden, args.layers, dtype)
        t0 = time.time()
        copy = root / "copy"
        copy.mkdir(exist_ok=True)
        for f in llm.iterdir():
            shutil.copyfile(f, copy / f.name)
        copy_s = time.time() - t0
        shutil.rmtree(copy)
        rc, base, peak, secs = run_import(llm, lora, root / "out")
        assert rc == 0
        gb = size / 1e9
        rows.append((fmt, shards, gb, base / 1e9, peak / 1e9, peak / size, (peak - base) / size, secs / gb, copy_s / gb))
        shutil.rmtree(llm)
        shutil.rmtree(root / "out")
    print("| input | size on disk | RSS before | peak RSS | peak / size | (peak - before) / size | s/GB | copy s/GB |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt, shards, gb, base, peak, ratio, extra, sgb, cgb in rows:
        print(f"| {fmt}, {shards} file(s), {args.dtype} | {gb:.2f} GB | {base:.2f} GB | {peak:.2f} GB | {ratio:.2f}x "
              f"| {extra:.2f}x | {sgb:.1f} | {cgb:.1f} |")
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
