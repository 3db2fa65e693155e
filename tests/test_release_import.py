"""The released EasyGen's published weights -> `python -m easygen.stages.import_release` -> an export whose
answers equal the paper's forward: the four-part input sequence (tokens of "USER: <Img>" with BOS, the
projector's 77 rows, "</Img> " and the question each tokenised on their own without BOS) through a plain
`LlamaForCausalLM` with the adapter applied by peft, token ids from sentencepiece itself. The tiny files
are written in the published format by `easygen.llm.release_sample` (a sentencepiece model trained here,
peft's own adapter files). Bad inputs stop with one line and leave nothing in OUT; the paper's folder
and folders whose load would leave tensors missing or unexpected are refused wherever an LLM loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from easygen.errors import ConfigError
from easygen.export import load_export
from easygen.llm.collate import EasyGenCollator
from easygen.llm.loading import load_llm
from easygen.llm.release import PROJECTOR_PREFIX
from easygen.llm.release_sample import write_release_sample
from easygen.llm.templates import CAPTION_PROMPTS, VQA_SUFFIX
from easygen.llm.tokenization import load_llama_sentencepiece
from easygen.stages.import_release import import_release, release_model_config
from easygen.stages.import_release import main as import_main
from tests.conftest import ROOT

QUESTIONS = ["What colour is the cat?", "How many people are there?", "Is it raining?",
             "What is on the plate?", "Where is the train?"]


# ----------------------------------------------------------------------------------------------------
# the paper's forward, re-derived from the published files with transformers, peft and sentencepiece


class PaperModel:
    def __init__(self, llm_dir: Path, lora_dir: Path | None, dtype=torch.float32):
        config = json.loads((llm_dir / "config.json").read_text())
        config = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "torch_dtype")}
        state = {}
        for f in sorted(llm_dir.glob("*.safetensors")):
            state.update(load_file(str(f)))
        for f in sorted(llm_dir.glob("pytorch_model*.bin")):
            state.update(torch.load(f, weights_only=True))
        self.proj = {k[len(PROJECTOR_PREFIX):]: state.pop(k).float() for k in list(state) if k.startswith(PROJECTOR_PREFIX)}
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        llama = LlamaForCausalLM(LlamaConfig(**config)).to(dtype)
        llama.load_state_dict(state, strict=True)
        self.model = (PeftModel.from_pretrained(llama, str(lora_dir)) if lora_dir else llama).eval().float()
        self.sp = spm.SentencePieceProcessor(model_file=str(llm_dir / "tokenizer.model"))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(features, self.proj["fc1.weight"], self.proj["fc1.bias"]))
        return F.linear(h, self.proj["fc2.weight"], self.proj["fc2.bias"])

    def inputs(self, features: torch.Tensor, question: str) -> torch.Tensor:
        embed = self.model.get_input_embeddings()
        parts = [
            embed(torch.tensor([[1] + self.sp.encode("USER: <Img>")])),
            self.project(features)[None],
            embed(torch.tensor([self.sp.encode("</Img> ")])),
            embed(torch.tensor([self.sp.encode(question)])),
        ]
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def next_logits(self, features, question) -> torch.Tensor:
        return self.model(inputs_embeds=self.inputs(features, question)).logits[0, -1]

    @torch.no_grad()
    def greedy(self, features, question, max_new_tokens: int) -> list[int]:
        out = self.model.generate(inputs_embeds=self.inputs(features, question), max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=2, pad_token_id=0, use_cache=True)
        ids = out[0].tolist()
        return ids[: ids.index(2) + 1] if 2 in ids else ids


def caption_text(prompt: str) -> str:
    return f"{prompt} ASSISTANT:"


def vqa_text(question: str) -> str:
    return f"{question}{VQA_SUFFIX} ASSISTANT:"


def samples(features: torch.Tensor) -> tuple[list[dict], list[str]]:
    """Five caption and five VQA samples as the eval stage and the chat give them to the collator, and the
    question text of each in the paper's forward."""
    out, texts = [], []
    for i, prompt in enumerate(CAPTION_PROMPTS[:5]):
        if i == 0:  # the eval stage's caption sample
            out.append({"id": f"c{i}", "kind": "caption", "captions": ["x"], "features": features[i]})
        else:  # the chat's turn
            out.append({"id": f"c{i}", "kind": "conversation", "features": features[i],
                        "conversations": [{"from": "human", "value": f"<image> {prompt}"}]})
        texts.append(caption_text(prompt))
    for i, question in enumerate(QUESTIONS):
        out.append({"id": f"q{i}", "kind": "vqa", "question": question, "answers": ["x"], "features": features[5 + i]})
        texts.append(vqa_text(question))
    return out, texts


def ours(export: Path, batch_samples: list[dict]):
    model, tokenizer = load_export(export)
    template = json.loads((export / "easygen.json").read_text())["config"]["model"]["template"]
    collator = EasyGenCollator(tokenizer, template=template, max_length=2048, num_image_tokens=77)
    collator.eval_mode = True
    return model, collator(batch_samples)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release")
    paths = write_release_sample(tmp / "downloads")
    out = import_release(paths["llm"], tmp / "export", lora_dir=paths["lora"], model_config=release_model_config())
    return paths, out


@pytest.fixture(scope="module")
def features():
    return torch.randn(10, 77, 768, generator=torch.Generator().manual_seed(5))


def test_template_is_the_papers_token_sequence(release):
    paths, out = release
    sp = spm.SentencePieceProcessor(model_file=str(paths["llm"] / "tokenizer.model"))
    model, batch = ours(out, samples(torch.zeros(10, 77, 768))[0][5:6])
    want = [1, *sp.encode("USER: <Img>"), *[0] * 77, *sp.encode("</Img> "), *sp.encode(vqa_text(QUESTIONS[0]))]
    assert batch["input_ids"][0].tolist() == want
    assert batch["image_positions"].tolist() == [1 + len(sp.encode("USER: <Img>"))]
    # the project's Vicuna v1.1 template tokenises "</Img> What ..." in one piece: not the paper's sequence
    vicuna = EasyGenCollator(model.tokenizer, template="vicuna_v1.1", max_length=2048, num_image_tokens=77)
    vicuna.eval_mode = True
    assert vicuna(samples(torch.zeros(10, 77, 768))[0][5:6])["input_ids"][0].tolist() != want


def test_slow_tokenizer_is_sentencepiece(release):
    paths, _ = release
    tok = load_llama_sentencepiece(paths["llm"])
    sp = spm.SentencePieceProcessor(model_file=str(paths["llm"] / "tokenizer.model"))
    for text in ["USER: <Img>", "</Img> ", "Describe the image concisely. ASSISTANT:", "  two  spaces ",
                 "héllo wörld 42", vqa_text("What is it?")]:
        assert tok(text)["input_ids"] == [1, *sp.encode(text)], text
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert tok.decode(sp.encode("héllo wörld 42")) == sp.decode(sp.encode("héllo wörld 42")) == "héllo wörld 42"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_import_equals_the_papers_forward(release, features):
    paths, out = release
    paper = PaperModel(paths["llm"], paths["lora"])
    batch_samples, texts = samples(features)
    model, batch = ours(out, batch_samples)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], features=batch["features"],
                       image_positions=batch["image_positions"], has_image=batch["has_image"]).logits[:, -1]
    diffs = []
    for i, text in enumerate(texts):
        ref = paper.next_logits(features[i], text)
        diffs.append(float((logits[i] - ref).abs().max()))
    print(f"max |logit difference| over 5 caption + 5 VQA prompts: {max(diffs):.2e}")
    assert max(diffs) <= 1e-5, diffs
    # the adapter matters here: the paper's model without it gives other logits
    bare = PaperModel(paths["llm"], None)
    assert float((bare.next_logits(features[0], texts[0]) - logits[0]).abs().max()) > 1e-2
    # greedy answers, token for token (KV cache, stop at </s>)
    _, ids = model.generate(batch["input_ids"], batch["attention_mask"], features=batch["features"],
                            image_positions=batch["image_positions"], has_image=batch["has_image"],
                            max_new_tokens=12, return_ids=True)
    for i, text in enumerate(texts):
        want = paper.greedy(features[i], text, 12)
        got = ids[i].tolist()
        got = got[: got.index(2) + 1] if 2 in got else got
        assert got == want, (i, got, want)


@pytest.mark.parametrize("variant", [dict(fmt="bin"), dict(shards=3), dict(dtype=torch.bfloat16),
                                     dict(fmt="bin", shards=2, dtype=torch.float16)])
def test_published_variants(tmp_path, features, variant):
    paths = write_release_sample(tmp_path / "dl", **variant)
    out = import_release(paths["llm"], tmp_path / "out", lora_dir=paths["lora"], model_config=release_model_config(),
                         max_shard_bytes=200_000)
    written = sorted(p.name for p in (out / "llm").glob("*.safetensors"))
    assert len(written) > 1 and (out / "llm" / "model.safetensors.index.json").is_file()
    dtype = variant.get("dtype", torch.float32)
    # the merged weights are peft's merge_and_unload of the same adapter, bit for bit, in the stored dtype
    config = {k: v for k, v in json.loads((paths["llm"] / "config.json").read_text()).items()
              if k not in ("model_type", "architectures", "torch_dtype")}
    base = LlamaForCausalLM(LlamaConfig(**config)).to(dtype)
    base.load_state_dict(_stored(paths["llm"]), strict=True)
    merged = PeftModel.from_pretrained(base, str(paths["lora"])).merge_and_unload().state_dict()
    got = {}
    for f in written:
        got.update(load_file(str(out / "llm" / f)))
    assert set(got) == set(merged)
    for k, v in merged.items():
        assert got[k].dtype == dtype and torch.equal(got[k], v), k
    if dtype == torch.float32:
        paper = PaperModel(paths["llm"], paths["lora"])
        model, batch = ours(out, samples(features)[0][:2])
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["attention_mask"], features=batch["features"],
                           image_positions=batch["image_positions"], has_image=batch["has_image"]).logits[:, -1]
        for i, text in enumerate(samples(features)[1][:2]):
            assert float((logits[i] - paper.next_logits(features[i], text)).abs().max()) <= 1e-5


def _stored(llm_dir: Path) -> dict:
    state = {}
    for f in sorted(llm_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    for f in sorted(llm_dir.glob("pytorch_model*.bin")):
        state.update(torch.load(f, weights_only=True))
    return {k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX) and "rotary_emb" not in k}


# ----------------------------------------------------------------------------------------------------
# bad input: one line, nothing in OUT


def _fails(capsys, tmp_path, args, match: str) -> str:
    out = tmp_path / "out"
    rc = import_main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*")), "something was left in OUT"
    return err


def test_bad_inputs(tmp_path, capsys):
    paths = write_release_sample(tmp_path / "dl", shards=2)
    llm = paths["llm"]
    # a truncated shard, then a missing one: each named
    shard = llm / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _fails(capsys, tmp_path, ["--llm", str(llm)], "model-00002-of-00002.safetensors")
    shard.unlink()
    _fails(capsys, tmp_path, ["--llm", str(llm)], "shard missing: " + str(shard))
    shard.write_bytes(data)
    # an adapter made for another base model: the first tensor whose shape differs is named
    other = write_release_sample(tmp_path / "other", hidden=32)
    _fails(capsys, tmp_path, ["--llm", str(llm), "--lora", str(other["lora"])],
           "model.layers.0.self_attn.q_proj.weight is [64, 64] here")
    # a folder without the projector's tensors
    state = {}
    for f in sorted(llm.glob("*.safetensors")):
        state.update(load_file(str(f)))
        f.unlink()
    (llm / "model.safetensors.index.json").unlink()
    save_file({k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX)}, str(llm / "model.safetensors"))
    _fails(capsys, tmp_path, ["--llm", str(llm)], "no model.fastchat_proj.* tensors")
    # a plain Llama
    config = json.loads((llm / "config.json").read_text())
    (llm / "config.json").write_text(json.dumps({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    _fails(capsys, tmp_path, ["--llm", str(llm)], "model_type 'llama'")
    # an OUT that exists and is not an export: refused, left as it was
    good = write_release_sample(tmp_path / "good")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = import_main(["--llm", str(good["llm"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "is not an EasyGen export" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------------------------------
# no silent wrong model wherever an LLM folder loads


def test_paper_folder_and_broken_folders_are_refused(release, tmp_path):
    paths, out = release
    with pytest.raises(ConfigError, match=r"model\.llm\.path=.*released EasyGen.*python -m easygen\.stages\.import_release"):
        load_llm(paths["llm"])
    # transformers alone would build its own DiffLlama from the paper's folder, lambdas random, projector dropped
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(str(paths["llm"]), output_loading_info=True)
    assert any("lambda" in k for k in info["missing_keys"]) and any("fastchat_proj" in k for k in info["unexpected_keys"])
    # an export whose llm/ lost a tensor or gained one: refused by name
    import shutil

    for what, change in (("missing", lambda sd: sd.pop("model.norm.weight")),
                         ("unexpected", lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(2)))):
        broken = tmp_path / what
        shutil.copytree(out, broken)
        sd = load_file(str(broken / "llm" / "model.safetensors"))
        change(sd)
        save_file(sd, str(broken / "llm" / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ConfigError, match=f"1 {what} keys"):
            load_export(broken)
        with pytest.raises(ConfigError, match=f"1 {what} keys"):
            load_llm(broken / "llm")


def test_chat_from_features_is_the_papers_greedy_answer(release, tmp_path):
    """`stage=chat stage.features=FILE.npy stage.temperature=0` on the import, with no BiDiffuser paths:
    the answer is the paper's greedy decode of the same features."""
    paths, out = release
    features = torch.from_numpy(np.load(paths["features"]))
    paper = PaperModel(paths["llm"], paths["lora"])
    want = paper.sp.decode([i for i in paper.greedy(features, caption_text(CAPTION_PROMPTS[0]), 6) if i != 2])
    run = tmp_path / "chat"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--config-dir", str(out), "+export=easygen", "stage=chat",
         f"stage.features={paths['features']}", f"stage.prompt='{CAPTION_PROMPTS[0]}'", "stage.temperature=0",
         "stage.max_new_tokens=6", "logger=none", f"hydra.run.dir={run}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads((run / "transcript.json").read_text())[0]["assistant"]
    assert answer == want.strip()
    # a features file of the wrong shape: one line naming the key
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((16, 768), np.float32))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--config-dir", str(out), "+export=easygen", "stage=chat",
         f"stage.features={bad}", "stage.prompt=hi", "logger=none", f"hydra.run.dir={tmp_path / 'bad'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors and "stage.features" in errors[0] and "[77, 768]" in errors[0], proc.stderr[-2000:]


def test_config_check_names_the_import_command(release):
    """`model.llm.path=` or `init_from=` the paper's folder: the config check (run before any model is
    built) names the import command."""
    from easygen.stages.checks import validate
    from tests.conftest import compose_resolved

    paths, _ = release
    for override in (f"model.llm.path={paths['llm']}", f"init_from={paths['llm']}"):
        cfg = compose_resolved(["model=vicuna7b", "stage=chat", override])
        with pytest.raises(ConfigError, match=r"python -m easygen\.stages\.import_release --llm"):
            validate(cfg)
