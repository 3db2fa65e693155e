"""The import of the released EasyGen used with pictures: `stage=eval` and `python -m easygen.serve` on
`--config-dir OUT +export=easygen` prompt the model exactly as the paper's code does and answer what the
paper's forward answers. The release sample's projector takes the tiny BiDiffuser's features
(`write_release_sample(feature_dim=64)`, `conf/model/tiny.yaml`: 16 rows of 64), and the tiny BiDiffuser is
set by overrides (`TINY_BIDIFFUSER`); the paper's forward (tests/test_release_import.py: transformers'
Llama with the adapter applied by peft, token ids from sentencepiece) answers from the features that same
BiDiffuser computes in this process for the same pictures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import sentencepiece as spm
import torch

from easygen.clean_text import clean_text
from easygen.images import load_image_file
from easygen.llm.release_sample import write_release_sample
from easygen.llm.templates import CAPTION_PROMPTS, VQA_SUFFIX
from easygen.stages.import_release import import_release, release_model_config
from tests.conftest import ROOT, compose_at
from tests.test_release_import import PaperModel, caption_text, vqa_text
from tests.test_serve_api import Server, circle_picture, data_url, server_env

pytestmark = pytest.mark.usefixtures("one_thread")

# model=tiny's BiDiffuser (random weights from `seed`) in place of the paper's v1 files
TINY_BIDIFFUSER = [
    "model.bidiffuser.preset=tiny", "model.bidiffuser.uvit=null", "model.bidiffuser.autoencoder=null",
    "model.bidiffuser.clip_image=null", "model.bidiffuser.clip_text=null", "model.bidiffuser.caption_decoder=null",
    "model.bidiffuser.gpt2_tokenizer=null", "model.image_size=64", "model.num_image_tokens=16",
    "model.bidiffuser.sampler.steps=2", "model.bidiffuser.sampler.cfg_scale=0", "logger=none",
]
ROWS = 16  # the tiny BiDiffuser's feature rows
QUESTION = "What colour is the cat?"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release-use")
    paths = write_release_sample(tmp / "downloads", feature_dim=64, num_image_tokens=ROWS)
    out = import_release(paths["llm"], tmp / "export", lora_dir=paths["lora"], model_config=release_model_config())
    return tmp, paths, out


@pytest.fixture(scope="module")
def paper(release):
    _, paths, _ = release
    return PaperModel(paths["llm"], paths["lora"])


def paper_ids(sp: spm.SentencePieceProcessor, question: str, rows: int = ROWS) -> list[int]:
    """The paper's four-part sequence with `rows` placeholders where the projected features go."""
    return [1, *sp.encode("USER: <Img>"), *[0] * rows, *sp.encode("</Img> "), *sp.encode(question)]


def export_cfg(out: Path, data: Path, run: Path, overrides=()):
    """What `run.py --config-dir OUT +export=easygen ...` composes."""
    return compose_at(data, run, [f"hydra.searchpath=[file://{out}]", "+export=easygen", *TINY_BIDIFFUSER,
                                  *overrides])


def answer_text(paper: PaperModel, ids: list[int]) -> str:
    return paper.sp.decode([i for i in ids if i != 2]).strip()


# ----------------------------------------------------------------------------------------------------
# stage=eval


def _test_samples(root: Path) -> list[dict]:
    import webdataset as wds

    from data_modules.shards import expand_urls

    pattern = str(next(root.glob("synthetic-*")) / "test" / "*.tar")
    return [json.loads(s["json"]) for url in expand_urls(pattern) for s in wds.WebDataset(url, shardshuffle=False)]


def test_eval_stage_uses_the_papers_prompt_and_answers(release, paper, tmp_path):
    """`run.py --config-dir OUT +export=easygen stage=eval task=coco_caption` end to end on tiny synthetic
    data: every test picture's caption is the paper's greedy decode of the tiny BiDiffuser's features of
    that picture; the collator the stage builds from the export's config gives the paper's token ids for a
    caption sample and a VQA sample."""
    from easygen.stages import build
    from easygen.stages.evaluate import _module

    _, paths, out = release
    data, run = tmp_path / "data", tmp_path / "eval"
    small = ["stage=eval", "task=coco_caption", "data.synthetic.n=40", "data.eval_batch_size=8",
             "stage.max_new_tokens=8"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--config-dir", str(out), "+export=easygen", *small,
         *TINY_BIDIFFUSER, f"paths.data_dir={data}", f"paths.log_dir={tmp_path}/logs", f"hydra.run.dir={run}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the command it suggests next chats with the same export folder (its config, not the default model's)
    assert f"next: python run.py --config-dir {out} +export=easygen stage=chat\n" in proc.stdout, proc.stdout[-2000:]
    predictions = {str(r["image_id"]): r["caption"] for r in json.loads((run / "predictions.json").read_text())}
    test = _test_samples(data)
    assert sorted(predictions) == sorted(str(s["id"]) for s in test) and len(test) >= 4

    # the module, collator and test batches the stage builds from the export's config
    cfg = export_cfg(out, data, tmp_path / "inproc", small)
    module = _module(cfg)
    assert module.cfg["model"]["template"] == "easygen"
    sp = paper.sp
    feats = torch.zeros(ROWS, 64)
    batch = module.eval_collate([
        {"id": "c", "kind": "caption", "captions": ["x"], "features": feats},
        {"id": "q", "kind": "vqa", "question": QUESTION, "answers": ["x"], "features": feats},
    ])
    for row, text in zip(batch["input_ids"].tolist(), [caption_text(CAPTION_PROMPTS[0]), vqa_text(QUESTION)]):
        want = paper_ids(sp, text)
        assert row[-len(want):] == want and set(row[: -len(want)]) <= {0}, (row, want)  # left padding

    module.configure_model()
    module.eval()
    dm = build.datamodule(cfg, module)
    dm.setup("test")
    seen = 0
    for batch in dm.test_dataloader():
        want_ids = paper_ids(sp, caption_text(CAPTION_PROMPTS[0]))
        assert all(row[-len(want_ids):] == want_ids for row in batch["input_ids"].tolist())
        with torch.no_grad():
            features = module.bidiffuser.i2t_features(batch["images"]).float()
        for sid, f in zip(batch["ids"], features):
            want = clean_text(answer_text(paper, paper.greedy(f, caption_text(CAPTION_PROMPTS[0]), 8)))
            assert predictions[str(sid)] == want, (sid, predictions[str(sid)], want)
            seen += 1
    assert seen == len(test)
    # the answers depend on the features: the paper's model given zeros in their place answers otherwise
    blank = clean_text(answer_text(paper, paper.greedy(torch.zeros(ROWS, 64), caption_text(CAPTION_PROMPTS[0]), 8)))
    assert blank not in set(predictions.values())


# ----------------------------------------------------------------------------------------------------
# python -m easygen.serve


@pytest.fixture(scope="module")
def server(release):
    tmp, _, out = release
    (tmp / "cwd").mkdir(exist_ok=True)
    srv = Server(["--config-dir", str(out), "+export=easygen", *TINY_BIDIFFUSER, "stage.web=false",
                  f"paths.data_dir={tmp}/data", f"hydra.run.dir={tmp}/serve"], cwd=tmp / "cwd", env=server_env(tmp))
    yield srv
    assert srv.stop() == 0, srv.output[-5000:]


def test_server_answers_with_the_papers_prompt_and_greedy_decode(release, paper, server, tmp_path):
    """Through the official `openai` client: a picture and a question; `usage.prompt_tokens` is the length of
    the paper's sequence and the greedy answer (temperature 0) is the paper's greedy decode of the tiny
    BiDiffuser's features of that picture, built here as the server builds its session."""
    from easygen.stages.chat import build_session

    tmp, _, out = release
    picture = circle_picture(tmp_path / "circle.png")
    cfg = export_cfg(out, tmp / "data", tmp_path / "session", ["stage=serve"])
    session = build_session(cfg)
    with torch.no_grad():
        features = session.bidiffuser.i2t_features(load_image_file(picture, 64)[None])[0].float()

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    (model,) = [m.id for m in client.models.list().data]
    # (what the user types, the question text of the paper's sequence); a VQA question typed with the
    # paper's short-answer suffix, as the eval stage's VQA samples carry it
    for asked, text in ((CAPTION_PROMPTS[0], caption_text(CAPTION_PROMPTS[0])),
                        (QUESTION + VQA_SUFFIX, vqa_text(QUESTION))):
        reply = client.chat.completions.create(
            model=model, temperature=0, max_tokens=8,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(picture.read_bytes())}},
                {"type": "text", "text": asked}]}],
        )
        assert reply.usage.prompt_tokens == len(paper_ids(paper.sp, text)), (asked, reply.usage)
        want = answer_text(paper, paper.greedy(features, text, 8))
        assert reply.choices[0].message.content == want, (asked, reply.choices[0].message.content, want)
        # the answer depends on the features: the paper's model given zeros in their place answers otherwise
        assert answer_text(paper, paper.greedy(torch.zeros(ROWS, 64), text, 8)) != want
