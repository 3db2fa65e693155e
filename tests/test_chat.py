"""Chat with pictures on the tiny preset, through the real CLI: the tiny LLM is first trained (a few hundred
plain steps) on a chat-with-pictures conversation so that it really answers with `<Img>...</Img>`; then
`python run.py stage=chat` runs a scripted two-turn conversation (a picture and a question, then a
request that BiDiffuser draws), and `python -m easygen.chat --prompt ...` answers one text-only question
and saves the picture it asks for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import ROOT, SAFE_PATHS, compose

SMALL = ["data.synthetic.n=40", "model.bidiffuser.sampler.steps=2", "model.max_length=192", "logger=none"]
CAPTION = "a small red circle on the left on a black background"
DRAW = "Draw it for me."
ONE_SHOT = "Draw a large blue square at the top."
SQUARE = "a large blue square at the top on a white background"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny models gain nothing from more, and a shared CPU makes two spin."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _paths(tmp, out):
    return [f"paths.data_dir={tmp}/data", f"paths.log_dir={tmp}/logs", f"hydra.run.dir={out}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A picture file and tiny EasyGen weights (LLM + projector) that learned two chat-with-pictures samples."""
    from easygen.checkpoint import save_state_dict_file
    from easygen.images import load_image_file
    from lit_modules.easygen_module import EasyGenModule
    from lit_modules.runner import container

    tmp = tmp_path_factory.mktemp("chat")
    cfg = compose(
        [
            *SMALL,
            "stage=chat",
            f"paths.data_dir={tmp}/data",
            f"paths.root_dir={tmp}",
            f"paths.output_dir={tmp}/out",
            f"paths.work_dir={tmp}",
            f"paths.log_dir={tmp}/logs",
        ]
    )
    OmegaConf.resolve(cfg)
    plain = container(cfg)
    plain["stage"]["feature_source"] = "on_the_fly"
    torch.manual_seed(int(cfg.seed))
    module = EasyGenModule(plain)
    module.configure_model()
    size = int(cfg.model.image_size)
    picture = tmp / "circle.png"
    img = Image.new("RGB", (size, size), (0, 0, 0))
    img.paste((220, 30, 30), (8, 24, 24, 40))
    img.save(picture)
    # the features the chat will compute for this file: same loader, same seeded BiDiffuser
    pixels = load_image_file(picture, size)
    feats = module.bidiffuser.i2t_features(pixels[None])[0].float()
    samples = [
        {
            "id": "dialogue",
            "kind": "conversation",
            "features": feats,
            "conversations": [
                {"from": "human", "value": "<image> Describe the image concisely."},
                {"from": "gpt", "value": CAPTION},
                {"from": "human", "value": DRAW},
                {"from": "gpt", "value": f"Here it is: <Img>{CAPTION}</Img>"},
            ],
        },
        {
            "id": "text-only",
            "kind": "conversation",
            "conversations": [
                {"from": "human", "value": ONE_SHOT},
                {"from": "gpt", "value": f"<Img>{SQUARE}</Img>"},
            ],
        },
    ]
    model = module.model
    for p in model.llm.parameters():
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = module.train_collator(samples)
    for _ in range(300):
        loss = model(
            batch["input_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
            features=batch["features"],
            image_positions=batch["image_positions"],
            has_image=batch["has_image"],
        ).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 2e-3:
            break
    assert loss.item() < 1e-2, f"the tiny LLM did not learn the chat samples (loss {loss.item():.4f})"
    weights = tmp / "chat.safetensors"
    save_state_dict_file(
        {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}, weights
    )
    return {"tmp": tmp, "picture": picture, "weights": weights}


def _png_ok(path, size=64):
    with Image.open(path) as im:
        return im.format == "PNG" and im.size == (size, size)


def test_scripted_two_turn_chat_draws_a_picture(trained, run_env):
    tmp = trained["tmp"]
    out = tmp / "session"
    script = tmp / "script.txt"
    script.write_text(f"/image {trained['picture']}\nDescribe the image concisely.\n{DRAW}\n")
    r = subprocess.run(
        [
            sys.executable,
            "run.py",
            "stage=chat",
            *SMALL,
            f"init_from={trained['weights']}",
            f"stage.script={script}",
            *_paths(tmp, out),
        ],
        cwd=ROOT,
        env={**run_env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    transcript = json.loads((out / "transcript.json").read_text())
    assert [t["user"] for t in transcript] == ["Describe the image concisely.", DRAW]
    # the first answer comes from the picture's features (learned for exactly these features)
    assert transcript[0]["assistant"] == CAPTION and transcript[0]["pictures"] == []
    assert transcript[1]["assistant"] == f"Here it is: <Img>{CAPTION}</Img>"
    (pic,) = transcript[1]["pictures"]
    assert pic.startswith(str(out)) and _png_ok(pic)
    assert f"[picture saved to {pic}]" in r.stdout
    assert f"ASSISTANT: {CAPTION}" in r.stdout  # streamed to the terminal
    res = json.loads((out / "results.json").read_text())
    assert res["stage"] == "chat" and res["artifacts"]["transcript"] == str(out / "transcript.json")


def test_one_shot_text_only_prompt_via_module_entry(trained, run_env):
    tmp = trained["tmp"]
    out = tmp / "oneshot"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "easygen.chat",
            "--prompt",
            ONE_SHOT,
            *SMALL,
            f"init_from={trained['weights']}",
            *_paths(tmp, out),
        ],
        cwd=ROOT,
        env={**run_env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    (turn,) = json.loads((out / "transcript.json").read_text())
    assert turn["assistant"] == f"<Img>{SQUARE}</Img>"
    (pic,) = turn["pictures"]
    assert _png_ok(pic) and f"[picture saved to {pic}]" in r.stdout


def test_one_shot_with_image_and_missing_image(trained, run_env):
    """`stage.prompt=... stage.image=...`: one answer about a picture; a missing picture is a one-line error."""
    tmp = trained["tmp"]
    out = tmp / "oneshot-image"
    args = [
        sys.executable,
        "run.py",
        "stage=chat",
        *SMALL,
        f"init_from={trained['weights']}",
        "stage.prompt=Describe the image concisely.",
        *_paths(tmp, out),
    ]
    r = subprocess.run(
        [*args, f"stage.image={trained['picture']}"],
        cwd=ROOT,
        env={**run_env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    (turn,) = json.loads((out / "transcript.json").read_text())
    assert turn["assistant"] == CAPTION and turn["pictures"] == []
    # a missing picture stops the stage with the key's name before any model is built
    from lit_modules.chat_stage import chat_stage
    from lit_modules.errors import ConfigError

    cfg = compose([*SMALL, "stage=chat", "stage.prompt=hello", f"stage.image={tmp}/nope.png", *SAFE_PATHS])
    with pytest.raises(ConfigError, match=r"stage\.image=.*nope\.png"):
        chat_stage(cfg)


def test_chat_session_streams_and_resets(trained):
    """In-process: a text-only turn, then the streamed text equals the returned answer."""
    from easygen.chat import ChatSession
    from lit_modules.chat_stage import build_session

    tmp = trained["tmp"]
    cfg = compose(
        [
            *SMALL,
            "stage=chat",
            f"init_from={trained['weights']}",
            f"paths.data_dir={tmp}/data",
            f"paths.root_dir={tmp}",
            f"paths.output_dir={tmp}/inproc",
            f"paths.work_dir={tmp}",
            f"paths.log_dir={tmp}/logs",
        ]
    )
    OmegaConf.resolve(cfg)
    session = build_session(cfg)
    assert isinstance(session, ChatSession)
    chunks = []
    answer, pics = session.ask(ONE_SHOT, on_text=chunks.append)
    assert answer == f"<Img>{SQUARE}</Img>" and "".join(chunks).strip() == answer
    assert len(pics) == 1 and pics[0].parent == tmp / "inproc" / "pictures"
    with pytest.raises(ValueError, match="empty"):
        session.ask("  ")
