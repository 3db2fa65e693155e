"""The tiny preset's shipped weights (easygen/assets/tiny): what the preset loads, the checks on loading, and
that `python -m easygen.stages.tiny_weights` writes them again bit for bit (slow)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from easygen.assets import ROOT as ASSETS
from easygen.bidiffuser import BiDiffuser
from easygen.errors import ConfigError
from easygen.factories import build_bidiffuser, tiny_corpus, tiny_llama, tiny_tokenizer, tokenizer_fingerprint
from easygen.llm.loading import build_tiny_llm
from tests.conftest import ROOT, compose_resolved

SHIPPED = ASSETS / "tiny"


def _cfg(*overrides):
    return OmegaConf.to_container(compose_resolved(overrides), resolve=True)


def _llm(cfg):
    llm = cfg["model"]["llm"]
    tok = tiny_tokenizer(vocab_size=llm["vocab_size"], model_max_length=cfg["model"]["max_length"])
    net = {k: v for k, v in llm["net"].items() if k != "_target_"}
    return tok, tiny_llama(tok, **net)


def test_the_tiny_preset_loads_the_shipped_files_and_null_gives_random_weights():
    cfg = _cfg()
    assert cfg["model"]["llm"]["weights"] == str(SHIPPED / "llm.safetensors")
    assert cfg["model"]["bidiffuser"]["weights"] == str(SHIPPED / "bidiffuser.safetensors")
    tok, llm = _llm(cfg)
    shipped = load_file(str(SHIPPED / "llm.safetensors"))
    own = llm.state_dict()
    assert set(own) == set(shipped)
    for k, v in shipped.items():
        assert torch.equal(own[k], v.float()), k
    pipe = build_bidiffuser(cfg)
    for k, v in load_file(str(SHIPPED / "bidiffuser.safetensors")).items():
        assert torch.equal(pipe.state_dict()[k], v.float()), k
    # null: the random weights of the seed, as before any training
    cfg = _cfg("model.llm.weights=null", "model.bidiffuser.weights=null")
    _, random_llm = _llm(cfg)
    reference = build_tiny_llm(tok, seed=cfg["seed"])
    assert all(torch.equal(a, b) for a, b in zip(random_llm.state_dict().values(), reference.state_dict().values()))
    assert not torch.equal(random_llm.state_dict()["lm_head.weight"], own["lm_head.weight"])
    random_pipe = build_bidiffuser(cfg)
    reference = BiDiffuser.tiny(tiny_corpus(), seed=cfg["seed"], image_size=cfg["model"]["image_size"])
    for k, v in reference.state_dict().items():
        assert torch.equal(random_pipe.state_dict()[k], v), k
    assert not torch.equal(random_pipe.state_dict()["uvit.pos_embed"], pipe.state_dict()["uvit.pos_embed"])


def test_shipped_llm_was_trained_with_this_tokenizer():
    from safetensors import safe_open

    with safe_open(str(SHIPPED / "llm.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["tokenizer_sha256"] == tokenizer_fingerprint(tiny_tokenizer(model_max_length=96))


def test_llm_weights_of_another_tokenizer_or_shape_are_refused(tmp_path):
    tok = tiny_tokenizer(model_max_length=96)
    sd = {k: v.contiguous() for k, v in build_tiny_llm(tok, seed=0).state_dict().items()}
    other = tmp_path / "other_tokenizer.safetensors"
    save_file(sd, str(other), metadata={"tokenizer_sha256": "0" * 64})
    with pytest.raises(ConfigError, match=r"model\.llm\.weights=.*another tokenizer"):
        tiny_llama(tok, weights=str(other))
    with pytest.raises(ConfigError, match=r"model\.llm\.weights=.*does not fit the tiny LLM"):
        tiny_llama(tok, hidden_size=32, weights=str(SHIPPED / "llm.safetensors"))
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in sd.items() if k != "lm_head.weight"}, str(partial))
    with pytest.raises(ConfigError, match=r"missing \['lm_head.weight'\]"):
        tiny_llama(tok, weights=str(partial))
    with pytest.raises(ConfigError, match=r"model\.llm\.weights=.*does not exist"):
        tiny_llama(tok, weights=str(tmp_path / "absent.safetensors"))


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_tiny_weights_command_writes_the_shipped_files_again(tmp_path):
    """The documented command, as a user types it, reproduces both shipped files bit for bit."""
    out = tmp_path / "tiny"
    r = subprocess.run([sys.executable, "-m", "easygen.stages.tiny_weights", "--out", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=3000, env={**__import__("os").environ,
                                                                           "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("bidiffuser.safetensors", "llm.safetensors"):
        assert _sha256(out / name) == _sha256(SHIPPED / name), f"{name} differs from easygen/assets/tiny/{name}"
        assert f"{out / name}  sha256 " in r.stdout and "= the shipped file" in r.stdout
