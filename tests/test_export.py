"""Export: a LoRA instruct checkpoint (adapters + projector only) -> `python -m easygen.stages.export`
-> a folder that a fresh process loads with transformers alone and that gives the same logits as the
checkpoint; its U-ViT file is in UniDiffuser's key format; `stage=eval` accepts its config; a sharded
checkpoint consolidates to one file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

TRAIN = [
    "stage=instruct",
    "lora=on",
    "data.synthetic.n=80",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "model.bidiffuser.sampler.steps=4",
    "logger=none",
    "callbacks.caption_eval=null",
    "stage.monitor=null",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "optim.lr=1e-2",
]

PROBE = """
import sys, torch
from easygen.export import load_export
model, tok = load_export(sys.argv[1])
batch = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    out = model(batch["input_ids"], batch["attention_mask"], features=batch["features"],
                image_positions=batch["image_positions"], has_image=batch["has_image"])
torch.save(out.logits, sys.argv[3])
"""


def _probe_batch(module, n_tokens: int, feature_dim: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(module.tokenizer), (2, 40), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "features": torch.randn(2, n_tokens, feature_dim, generator=g),
        "image_positions": torch.tensor([3, 10]),
        "has_image": torch.tensor([True, True]),
    }


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    import os

    tmp = tmp_path_factory.mktemp("export")
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    run = tmp / "run"
    r = subprocess.run(
        [
            sys.executable,
            "run.py",
            *TRAIN,
            f"paths.data_dir={tmp}/data",
            f"paths.log_dir={tmp}/logs",
            f"hydra.run.dir={run}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    out = tmp / "exported"
    r = subprocess.run(
        [sys.executable, "-m", "easygen.stages.export", str(run / "checkpoints" / "last.ckpt"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return tmp, run, out, env


def test_export_loads_in_a_fresh_process_with_the_same_logits(lora_run):
    from easygen.stages.consolidate import load_full_checkpoint
    from easygen.stages.export import module_from_checkpoint

    tmp, run, out, env = lora_run
    ckpt = load_full_checkpoint(run / "checkpoints" / "last.ckpt")
    keys = set(ckpt["state_dict"])
    # a LoRA checkpoint holds the adapters and the projector only
    assert keys and all("lora_" in k or k.startswith("model.projector.") for k in keys), sorted(keys)[:5]
    assert any("lora_" in k for k in keys) and any(k.startswith("model.projector.") for k in keys)

    module = module_from_checkpoint(ckpt)
    m = module.cfg["model"]
    batch = _probe_batch(module, int(m["num_image_tokens"]), int(m["feature_dim"]))
    with torch.no_grad():
        ref = module.model(
            batch["input_ids"],
            batch["attention_mask"],
            features=batch["features"],
            image_positions=batch["image_positions"],
            has_image=batch["has_image"],
        ).logits
    # the adapters matter: the same model without them gives other logits
    base = module.model.llm.get_base_model()
    with torch.no_grad(), module.model.llm.disable_adapter():
        plain = base(
            inputs_embeds=module.model.embed(
                batch["input_ids"], batch["features"], batch["image_positions"], batch["has_image"]
            ),
            attention_mask=batch["attention_mask"],
        ).logits
    assert (plain - ref).abs().max() > 1e-4

    torch.save(batch, tmp / "batch.pt")
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), str(tmp / "batch.pt"), str(tmp / "logits.pt")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp / "logits.pt", weights_only=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # a plain transformers folder: no adapter weights, loadable by from_pretrained
    from safetensors import safe_open

    with safe_open(str(out / "llm" / "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())


def test_export_writes_unidiffuser_uvit_and_a_config_the_stages_accept(lora_run):
    from easygen.bidiffuser import load_uvit
    from easygen.checkpoint import load_state_dict_file
    from easygen.stages.consolidate import load_full_checkpoint
    from easygen.stages.export import module_from_checkpoint

    tmp, run, out, env = lora_run
    module = module_from_checkpoint(load_full_checkpoint(run / "checkpoints" / "last.ckpt"))
    raw = load_state_dict_file(out / "bidiffuser" / "uvit.pth")
    assert "pos_embed" in raw and any(
        k.startswith("in_blocks.0.attn.qkv") for k in raw
    )  # UniDiffuser's names
    meta = json.loads((out / "easygen.json").read_text())
    uvit = load_uvit(out / "bidiffuser" / "uvit.pth", **meta["uvit_config"])
    for k, v in module.bidiffuser.uvit.state_dict().items():
        torch.testing.assert_close(uvit.state_dict()[k], v, atol=0, rtol=0)
    meta = json.loads((out / "easygen.json").read_text())
    assert (
        meta["config"]["model"]["llm"]["preset"] == "pretrained"
        and meta["config"]["lora"]["enabled"] is False
    )
    assert (out / "export" / "easygen.yaml").is_file()

    # the exported config composes with the stages (what `--config-dir OUT +export=easygen` does)
    from tests.conftest import compose_resolved

    for stage in ("eval", "chat"):
        cfg = compose_resolved([f"hydra.searchpath=[file://{out}]", "+export=easygen", f"stage={stage}"])
        assert cfg.model.llm.path == str(out / "llm") and cfg.init_from == str(out / "trained.safetensors")
        assert cfg.model.bidiffuser.weights == str(out / "bidiffuser" / "bidiffuser.safetensors")
        assert cfg.lora.enabled is False


@pytest.mark.slow
def test_stage_eval_runs_on_the_export(lora_run):
    tmp, run, out, env = lora_run
    ev = tmp / "eval"
    r = subprocess.run(
        [
            sys.executable,
            "run.py",
            "--config-dir",
            str(out),
            "+export=easygen",
            "stage=eval",
            "data.synthetic.n=80",
            "data.eval_batch_size=8",
            "model.bidiffuser.sampler.steps=4",
            "logger=none",
            f"paths.data_dir={tmp}/data",
            f"paths.log_dir={tmp}/logs",
            f"hydra.run.dir={ev}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads((ev / "results.json").read_text())
    assert res["num_samples"] == 8 and "test/CIDEr" in res["metrics"]
    (load,) = [e for e in res["loaded"] if e["key"] == "init_from"]  # the export's trained weights were used
    assert load["path"].endswith("trained.safetensors") and load["tensors"] >= 4
