"""Chat with pictures on the tiny preset, through the real CLI: the tiny LLM is first trained (a few hundred
plain steps) on a chat-with-pictures conversation so that it really answers with `<Img>...</Img>`; then
`python run.py stage=chat` runs a scripted two-turn conversation (a picture and a question, then a
request that BiDiffuser draws), and `python -m easygen.chat --prompt ...` answers one text-only question
and saves the picture it asks for."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
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


# one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _paths(tmp, out):
    return [f"paths.data_dir={tmp}/data", f"paths.log_dir={tmp}/logs", f"hydra.run.dir={out}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A picture file and tiny EasyGen weights (LLM + projector) that learned two chat-with-pictures samples."""
    from easygen.checkpoint import save_state_dict_file
    from easygen.images import load_image_file
    from easygen.lit.easygen_module import EasyGenModule
    from easygen.stages.common import container

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
    from easygen.errors import ConfigError
    from easygen.stages.chat import chat_stage

    cfg = compose([*SMALL, "stage=chat", "stage.prompt=hello", f"stage.image={tmp}/nope.png", *SAFE_PATHS])
    with pytest.raises(ConfigError, match=r"stage\.image=.*nope\.png"):
        chat_stage(cfg)


def test_chat_session_streams_and_resets(trained):
    """In-process: a text-only turn, then the streamed text equals the returned answer."""
    from easygen.chat import ChatSession
    from easygen.stages.chat import build_session

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


# ----------------------------------------------------------------------------------------------------
# what users do: bad pictures, long conversations, /draw, /help, /reset, Ctrl-C, no init_from.
# These use untrained tiny weights (no init_from): the answers are noise but long, which is what fills
# the context by the second turn at the tiny preset's model.max_length=96.

UNTRAINED = ["data.synthetic.n=40", "model.bidiffuser.sampler.steps=2", "logger=none"]


def _picture(path, size=64, colour=(220, 30, 30), fmt="PNG"):
    img = Image.new("RGB", (size, size), (0, 0, 0))
    img.paste(colour, (8, 24, 24, 40))
    img.save(path, format=fmt)
    return path


def _chat(tmp, out, *args, run_env, stdin=None, timeout=600):
    return subprocess.run(
        [sys.executable, "run.py", "stage=chat", *UNTRAINED, *args, *_paths(tmp, out)],
        cwd=ROOT,
        env={**run_env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


@pytest.mark.parametrize("what", ["not-a-picture", "truncated-jpeg"])
def test_one_shot_bad_picture_is_one_line_naming_the_file(tmp_path, run_env, what):
    if what == "not-a-picture":
        bad = tmp_path / "passwd"
        bad.write_text("root:x:0:0:root:/root:/bin/bash\n")
        why = "is not a picture PIL can read"
    else:
        # a noisy picture: its JPEG data runs well past the headers, so half of it is a picture cut short
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "full.jpg", format="JPEG")
        full = (tmp_path / "full.jpg").read_bytes()
        bad = tmp_path / "cut.jpg"
        bad.write_bytes(full[: len(full) // 2])
        why = "is a damaged or truncated picture"
    r = _chat(tmp_path, tmp_path / "out", f"stage.image={bad}", "stage.prompt=hi", run_env=run_env)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "UnidentifiedImageError" not in r.stderr
    assert r.stderr.startswith(f"error: stage.image: {bad} {why}") and r.stderr.count("\n") == 1, r.stderr


def test_scripted_session_commands_bad_picture_and_long_history(tmp_path, run_env):
    """One script through the real CLI: /help, a bad /image (the chat goes on), a picture and three questions
    (the third cannot fit with the whole history: older turns are dropped, the picture kept), /draw,
    /reset, an unknown command; and the untrained-weights warning without the fitted-statistics one."""
    picture = _picture(tmp_path / "circle.png")
    out = tmp_path / "session"
    script = tmp_path / "script.txt"
    script.write_text(
        "\n".join(
            [
                "/help",
                "/image /etc/passwd",
                f"/image {picture}",
                "Describe the image concisely.",
                "What colour is the circle?",
                "Where is it?",
                "/draw a large blue square at the top",
                "/reset",
                "/frobnicate",
                "Hello again.",
            ]
        )
        + "\n"
    )
    r = _chat(tmp_path, out, f"stage.script={script}", run_env=run_env)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    both = r.stdout + r.stderr
    assert "Traceback" not in both and "[error] sample chat" not in both
    assert "Token indices sequence length is longer" not in both  # the trimming measures, quietly
    # untrained weights are said loudly, once; no warning about fitted statistics nobody asked for
    assert (
        both.count("stage=chat without init_from: the LLM and the projector have untrained random weights")
        == 1
    )
    assert "init_from=" in both and "no fitted statistics" not in both
    for command in ("/image PATH", "/draw PROMPT", "/reset", "/help", "/quit"):
        assert f"\n  {command}" in r.stdout, command
    assert "[error] /etc/passwd is not a picture PIL can read" in r.stdout
    assert f"(picture {picture} attached to the next question)" in r.stdout
    assert (
        "(history trimmed: the 1 oldest exchange(s) dropped to fit model.max_length=96; the picture is kept)"
        in r.stdout
    )
    assert "(conversation reset: history and picture forgotten)" in r.stdout
    assert "[error] unknown command /frobnicate" in r.stdout
    transcript = json.loads((out / "transcript.json").read_text())
    assert [t["user"] for t in transcript] == [
        "Describe the image concisely.",
        "What colour is the circle?",
        "Where is it?",
        "/draw a large blue square at the top",
        "Hello again.",
    ]
    assert transcript[0]["image"] == str(picture)
    assert all(t["assistant"] for t in transcript if "assistant" in t)
    (drawn,) = transcript[3]["pictures"]
    assert drawn == str(out / "pictures" / "picture_001.png") and _png_ok(drawn)
    assert f"[picture saved to {drawn}]" in r.stdout


def test_history_trimming_keeps_the_picture(tmp_path):
    """In-process: questions about one picture past the context; every prompt fits max_length, the oldest
    exchanges go, the picture's marker stays on the oldest question kept and its features stay in use."""
    from easygen.llm.templates import IMAGE_MARKER
    from easygen.stages.chat import build_session

    cfg = compose(
        [
            *UNTRAINED,
            "stage=chat",
            f"paths.data_dir={tmp_path}/data",
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path}/out",
            f"paths.work_dir={tmp_path}",
            f"paths.log_dir={tmp_path}/logs",
        ]
    )
    OmegaConf.resolve(cfg)
    session = build_session(cfg)
    limit = session.collator.max_length
    notices = []
    session.ask("Describe the image.", image=_picture(tmp_path / "p.png"), on_notice=notices.append)
    features = session.features
    for question in ("What colour is it?", "Where is it?", "Is it big?"):
        session.ask(question, on_notice=notices.append)
        assert session.prompt_tokens(session.turns[:-1]) <= limit
        assert sum(IMAGE_MARKER in t["value"] for t in session.turns) == 1
        assert IMAGE_MARKER in session.turns[0]["value"] and session.features is features
    assert notices and all("the picture is kept" in n for n in notices)
    assert session.turns[-2]["value"].endswith("Is it big?")
    # a question that cannot fit even alone is refused and leaves the history as it was
    before = list(session.turns)
    with pytest.raises(ValueError, match=r"too long: its prompt has \d+ tokens > model.max_length=96"):
        session.ask(" ".join(["word"] * 200))
    assert session.turns == before


def test_ctrl_c_and_eof_at_the_prompt_end_cleanly(tmp_path, run_env):
    import os
    import select
    import signal
    import time

    for how in ("ctrl-c", "ctrl-d"):
        out = tmp_path / how
        proc = subprocess.Popen(
            [sys.executable, "run.py", "stage=chat", *UNTRAINED, *_paths(tmp_path, out)],
            cwd=ROOT,
            env={**run_env, "OMP_NUM_THREADS": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        seen, deadline = b"", time.time() + 600
        while b"USER: " not in seen and time.time() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                seen += os.read(proc.stdout.fileno(), 4096)
        assert b"USER: " in seen, (seen, proc.stderr.read() if proc.poll() is not None else "")
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            proc.stdin.close()  # Ctrl-D: end of input
        proc.wait(timeout=120)
        rest, err = proc.stdout.read(), proc.stderr.read()
        proc.stdin.close()
        assert proc.returncode == 0, (how, err[-3000:])
        assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err[-3000:]
        assert b"(chat ended)" in seen + rest
        assert json.loads((out / "transcript.json").read_text()) == []


def test_module_help_lists_every_command(run_env):
    from easygen.chat import COMMANDS

    r = subprocess.run(
        [sys.executable, "-m", "easygen.chat", "--help"],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "SPEC" not in r.stdout
    for command, what in COMMANDS:
        assert command in r.stdout and what in r.stdout
    assert {c.split()[0] for c, _ in COMMANDS} == {"/image", "/draw", "/reset", "/help", "/quit"}
    # the stage's own --help (conf/stage/chat.yaml) lists the same commands
    r = subprocess.run(
        [sys.executable, "run.py", "stage=chat", "--help"],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "init_from=" in r.stdout
    for command, what in COMMANDS:
        assert f"  {command:14s}{what}" in r.stdout, command
