"""The OpenAI-compatible API of `python -m easygen.serve`, through the real CLI in a subprocess and the
official `openai` client (plus raw `httpx` for the wire format). The tiny LLM is first trained (a few
hundred plain steps, as in tests/test_chat.py) on a conversation about a picture so that it really answers
with words and with `<Img>...</Img>`; the pictures the server returns are compared pixel for pixel with
BiDiffuser's text-to-image run in this process on the same description and seed."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import ROOT, compose

SMALL = ["data.synthetic.n=40", "model.bidiffuser.sampler.steps=2", "model.max_length=192", "logger=none"]
CAPTION = "a small red circle on the left on a black background"
DESCRIBE = "Describe the image concisely."
DRAW = "Draw it for me."
ONE_SHOT = "Draw a large blue square at the top."
SQUARE = "a large blue square at the top on a white background"
MODEL = "easygen-tiny"
SEED = 1234  # model.bidiffuser.sampler.seed of the tiny preset: the server's default image seed

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# shared with tests/test_serve_browser.py


def circle_picture(path: Path, size: int = 64, fmt: str = "PNG") -> Path:
    img = Image.new("RGB", (size, size), (0, 0, 0))
    img.paste((220, 30, 30), (8, 24, 24, 40))
    img.save(path, format=fmt)
    return path


def train_tiny(tmp: Path) -> dict:
    """A picture file, tiny EasyGen weights that learned a two-turn conversation about it (a caption, then
    `<Img>caption</Img>`) and a text-only request to draw, and reference pictures drawn in this process."""
    from easygen.checkpoint import save_state_dict_file
    from easygen.images import load_image_file
    from easygen.lit.easygen_module import EasyGenModule
    from easygen.stages.common import container

    cfg = compose([*SMALL, "stage=chat", f"paths.data_dir={tmp}/data", f"paths.root_dir={tmp}",
                   f"paths.output_dir={tmp}/out", f"paths.work_dir={tmp}", f"paths.log_dir={tmp}/logs"])
    OmegaConf.resolve(cfg)
    plain = container(cfg)
    plain["stage"]["feature_source"] = "on_the_fly"
    torch.manual_seed(int(cfg.seed))
    module = EasyGenModule(plain)
    module.configure_model()
    picture = circle_picture(tmp / "circle.png")
    feats = module.bidiffuser.i2t_features(load_image_file(picture, 64)[None])[0].float()
    samples = [
        {"id": "dialogue", "kind": "conversation", "features": feats, "conversations": [
            {"from": "human", "value": f"<image> {DESCRIBE}"}, {"from": "gpt", "value": CAPTION},
            {"from": "human", "value": DRAW}, {"from": "gpt", "value": f"Here it is: <Img>{CAPTION}</Img>"}]},
        {"id": "text-only", "kind": "conversation", "conversations": [
            {"from": "human", "value": ONE_SHOT}, {"from": "gpt", "value": f"<Img>{SQUARE}</Img>"}]},
    ]
    model = module.model
    for p in model.llm.parameters():
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = module.train_collator(samples)
    for _ in range(300):
        loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], features=batch["features"],
                     image_positions=batch["image_positions"], has_image=batch["has_image"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 2e-3:
            break
    assert loss.item() < 1e-2, f"the tiny LLM did not learn the chat samples (loss {loss.item():.4f})"
    weights = tmp / "chat.safetensors"
    save_state_dict_file({f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}, weights)
    bd = module.bidiffuser
    reference = {
        (CAPTION, SEED): bd.generate([CAPTION], seed=SEED)[0],
        (SQUARE, SEED): bd.generate([SQUARE], seed=SEED)[0],
        (SQUARE, 7): bd.generate([SQUARE], seed=7)[0],
        (SQUARE, 8): bd.generate([SQUARE], seed=8)[0],
    }
    return {"tmp": tmp, "picture": picture, "weights": weights, "reference": reference}


class Server:
    """`python -m easygen.serve ... stage.port=0` in a subprocess, its output collected by a thread."""

    def __init__(self, args: list[str], cwd: Path, env: dict, start_timeout: float = 180):
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen([sys.executable, "-m", "easygen.serve", "stage.port=0", *args], cwd=cwd,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(start_timeout) or self.url is None:
            self.proc.kill()
            raise AssertionError("the server did not start:\n" + self.output[-5000:])

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r" at http://[^:/]+:(\d+)/", line)
            if m and self.url is None:  # reached on loopback whatever address it listens on
                self.url = f"http://127.0.0.1:{m.group(1)}"
                self._ready.set()
        self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def server_env(tmp: Path) -> dict:
    """Offline, one thread, and HOME / TMPDIR in folders of their own, so that a test can see what the
    server wrote where."""
    env = dict(os.environ)
    for name in ("home", "systmp"):
        (tmp / name).mkdir(exist_ok=True)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", HOME=str(tmp / "home"), TMPDIR=str(tmp / "systmp"),
               GRADIO_ANALYTICS_ENABLED="False", EASYGEN_ROOT_DIR=str(tmp / "root"))
    env.pop("WANDB_API_KEY", None)
    env.pop("GRADIO_TEMP_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def server_args(tmp: Path, extra=()) -> list[str]:
    return [*SMALL, f"paths.data_dir={tmp}/data", f"hydra.run.dir={tmp}/run", *extra]


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_pixels(b64: str, size: int = 64) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
        assert img.format == "PNG" and img.size == (size, size), (img.format, img.size)
        return np.asarray(img.convert("RGB"))


# ----------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    return train_tiny(tmp_path_factory.mktemp("serve-train"))


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-api")
    allowed = tmp / "allowed"
    allowed.mkdir()
    circle_picture(allowed / "circle.png")
    (tmp / "cwd").mkdir()
    srv = Server(server_args(tmp, [f"init_from={trained['weights']}", f"stage.allowed_image_dir={allowed}"]),
                 cwd=tmp / "cwd", env=server_env(tmp))
    srv.tmp = tmp
    yield srv
    code = srv.stop()
    assert code == 0, srv.output[-5000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


# ----------------------------------------------------------------------------------------------------
# the openai client


def test_models_and_a_plain_completion_that_draws(server, client, trained):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    r = client.chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": "You are helpful."}, {"role": "user", "content": ONE_SHOT}])
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == f"<Img>{SQUARE}</Img>"
    assert r.choices[0].finish_reason == "stop" and r.model == MODEL and r.object == "chat.completion"
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    (image,) = msg.model_extra["images"]  # the documented extra field beside `content`
    assert image["prompt"] == SQUARE and image["seed"] == SEED and image["mime_type"] == "image/png"
    np.testing.assert_array_equal(png_pixels(image["b64_json"]), np.asarray(trained["reference"][(SQUARE, SEED)]))
    # draw=false: the same answer, no picture
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ONE_SHOT}],
                                       extra_body={"draw": False})
    assert r.choices[0].message.content == f"<Img>{SQUARE}</Img>" and "images" not in (r.choices[0].message.model_extra or {})


def test_streamed_conversation_about_a_picture(server, client, trained):
    """A picture as a data: URL, the answer streamed; then the picture stays in context for a request to
    draw it, whose picture arrives in a `delta.images` chunk; the same picture as an allowed local file."""
    url = data_url(trained["picture"].read_bytes())
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                           {"type": "text", "text": DESCRIBE}]}]
    stream = client.chat.completions.create(model=MODEL, messages=first, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 3, texts  # token by token, not one block
    assert "".join(texts) == CAPTION
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    second = [*first, {"role": "assistant", "content": CAPTION}, {"role": "user", "content": DRAW}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=second, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"Here it is: <Img>{CAPTION}</Img>"
    images = [i for c in chunks if c.choices for i in (c.choices[0].delta.model_extra or {}).get("images", [])]
    assert len(images) == 1 and images[0]["prompt"] == CAPTION
    np.testing.assert_array_equal(png_pixels(images[0]["b64_json"]), np.asarray(trained["reference"][(CAPTION, SEED)]))
    # the same conversation with the picture as a local file under stage.allowed_image_dir
    local = (server.tmp / "allowed" / "circle.png").as_uri()
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": local}}, {"type": "text", "text": DESCRIBE}]}])
    assert r.choices[0].message.content == CAPTION


def test_concurrent_requests_wait_in_line(server, client, trained):
    """Eight clients at once, half with the picture: each gets the answer it gets alone (they decode in
    one batch; no picture or history leaks between them)."""
    from concurrent.futures import ThreadPoolExecutor

    url = data_url(trained["picture"].read_bytes())
    with_picture = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": DESCRIBE}]}]
    text_only = [{"role": "user", "content": ONE_SHOT}]

    def ask(i):
        messages = with_picture if i % 2 == 0 else text_only
        stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                extra_body={"draw": False})
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == [CAPTION, f"<Img>{SQUARE}</Img>"] * 4
    assert server.health()["pending"] == 0


def test_image_generation(server, client, trained):
    r = client.images.generate(model=MODEL, prompt=SQUARE, n=2, size="64x64", response_format="b64_json",
                               extra_body={"seed": 7})
    assert len(r.data) == 2
    for item, seed in zip(r.data, (7, 8)):  # one seed a picture: seed, seed + 1
        np.testing.assert_array_equal(png_pixels(item.b64_json), np.asarray(trained["reference"][(SQUARE, seed)]))
    with pytest.raises(openai.BadRequestError, match="64x64"):
        client.images.generate(model=MODEL, prompt=SQUARE, size="1024x1024")
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(model=MODEL, prompt=SQUARE, response_format="url")
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.images.generate(model=MODEL, prompt="  ")


def _truncated_jpeg(tmp: Path) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2]


def _huge_png() -> bytes:
    """A 50-megapixel picture (one colour: a small file that decodes to 150 MB)."""
    buf = io.BytesIO()
    Image.new("L", (7072, 7072), 128).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("case", "status", "pattern"),
    [
        ("unknown_model", 404, r"model `gpt-4o` does not exist: this server serves `easygen-tiny`"),
        ("empty_prompt", 400, r"no text \(an empty prompt\)"),
        ("not_an_image", 400, r"messages\[0\]\.content\[0\]\.image_url\.url \(data URL\) is not a picture"),
        ("truncated_jpeg", 400, r"damaged or truncated picture"),
        ("huge_picture", 400, r"7072x7072 = 50\.0 megapixels, over the server's limit of 16777216 pixels"),
        ("remote_url", 400, r"https: URLs are not fetched"),
        ("outside_folder", 400, r"is outside the folder this server may read"),
        ("too_long", 400, r"tokens > model\.max_length=192"),
        ("marker", 400, r"contains '<image>'"),
        ("bad_temperature", 400, r"temperature=5 must be a number in \[0, 2\]"),
        ("too_many_tokens", 400, r"max_tokens=100000 must be an integer in \[1, 256\]"),
    ],
)
def test_errors_through_the_client(server, client, trained, case, status, pattern):
    text = {"type": "text", "text": DESCRIBE}

    def image(url):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, text]}]

    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": DESCRIBE}]}
    if case == "unknown_model":
        kwargs["model"] = "gpt-4o"
    elif case == "empty_prompt":
        kwargs["messages"] = [{"role": "user", "content": "   "}]
    elif case == "not_an_image":
        kwargs["messages"] = image(data_url(b"just some text, not a picture", "text/plain"))
    elif case == "truncated_jpeg":
        kwargs["messages"] = image(data_url(_truncated_jpeg(server.tmp), "image/jpeg"))
    elif case == "huge_picture":
        kwargs["messages"] = image(data_url(_huge_png()))
    elif case == "remote_url":
        kwargs["messages"] = image("https://example.com/cat.png")
    elif case == "outside_folder":
        kwargs["messages"] = image(trained["picture"].as_uri())  # exists, but not under allowed_image_dir
    elif case == "too_long":
        kwargs["messages"] = [{"role": "user", "content": "describe the red circle " * 200}]
    elif case == "marker":
        kwargs["messages"] = [{"role": "user", "content": "what is <image> here?"}]
    elif case == "bad_temperature":
        kwargs["temperature"] = 5
    elif case == "too_many_tokens":
        kwargs["max_tokens"] = 100000
    for stream in (False, True):  # refused before any chunk: a plain HTTP error either way
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(stream=stream, **kwargs)
        assert info.value.status_code == status, info.value
        assert re.search(pattern, info.value.body["message"]), info.value.body
    if case == "too_long":
        assert info.value.body["code"] == "context_length_exceeded"
    assert server.proc.poll() is None  # still serving
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ONE_SHOT}],
                                          extra_body={"draw": False}).choices[0].message.content


# ----------------------------------------------------------------------------------------------------
# the wire format, without the client's leniency


def test_wire_format_with_httpx(server):
    with httpx.Client(base_url=server.url, timeout=120) as h:
        r = h.get("/v1/models")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        body = r.json()
        assert body["object"] == "list" and set(body["data"][0]) == {"id", "object", "created", "owned_by"}
        with h.stream("POST", "/v1/chat/completions", json={
                "model": MODEL, "stream": True, "messages": [{"role": "user", "content": ONE_SHOT}]}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            raw = r.read().decode()
        events = raw.split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
        assert all(e.startswith("data: {") for e in events[:-2])
        for c in chunks:
            assert c["object"] == "chat.completion.chunk" and c["model"] == MODEL and c["id"] == chunks[0]["id"]
            assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
        assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == f"<Img>{SQUARE}</Img>"
        # errors: OpenAI's JSON and status codes
        for method, path, content, status, code in [
            ("POST", "/v1/chat/completions", b'{"model": "easygen-tiny", "messages": [', 400, "invalid_json"),
            ("POST", "/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
            ("POST", "/v1/chat/completions", b"", 400, "invalid_json"),
            ("POST", "/v1/chat/completions", b"x" * (33 * 2**20), 413, "request_too_large"),
            ("GET", "/v1/completions", None, 404, "unknown_url"),
            ("GET", "/v1/models/gpt-4o", None, 404, "model_not_found"),
        ]:
            r = h.request(method, path, content=content, headers={"content-type": "application/json"})
            assert r.status_code == status, (path, r.status_code, r.text[:300])
            assert r.headers["content-type"] == "application/json"
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
            assert err["type"] == "invalid_request_error" and err["message"]
        r = h.post("/v1/chat/completions", content=b'{"messages": [}')
        assert "not valid JSON" in r.json()["error"]["message"] and "column" in r.json()["error"]["message"]


def test_client_that_disconnects_mid_stream(server, client):
    """A client that leaves after the first chunks: its generation stops (counted as cancelled) and the
    server goes on serving."""
    before = server.health()
    # sampling at a high temperature from the tiny vocabulary: a long answer (max_tokens) at ~ms a token
    body = {"model": MODEL, "stream": True, "max_tokens": 256, "temperature": 2.0, "seed": 0,
            "messages": [{"role": "user", "content": "tell me a very long story about shapes"}]}
    with httpx.Client(timeout=120) as h, h.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any('"content"' in g for g in got)
    deadline = time.time() + 60
    while time.time() < deadline:
        now = server.health()
        if now["pending"] == 0 and now["cancelled"] + now["served"] > before["cancelled"] + before["served"]:
            break
        time.sleep(0.2)
    assert now["cancelled"] == before["cancelled"] + 1 and now["served"] == before["served"], (before, now)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ONE_SHOT}],
                                       extra_body={"draw": False})
    assert r.choices[0].message.content == f"<Img>{SQUARE}</Img>"


def test_nothing_written_outside_the_servers_folder(server):
    """While serving: the pictures go under the server's temporary folder (in TMPDIR) and are gone once
    sent (the tests before drew several); nothing in the working directory or HOME; the run's folder has
    Hydra's files only."""
    tmp = server.tmp
    assert list((tmp / "cwd").iterdir()) == [] and list((tmp / "home").iterdir()) == []
    (folder,) = (tmp / "systmp").iterdir()
    assert folder.name.startswith("easygen-serve-") and (folder / "pictures").is_dir()
    assert list((folder / "pictures").iterdir()) == []
    assert sorted(p.name for p in (tmp / "run").iterdir()) == [".hydra", "serve.log"]


def test_config_errors_before_any_model_is_built(tmp_path):
    """Through the CLI: exit code 2 and the key to set; in-process: the other checks of the stage."""
    from easygen.errors import ConfigError
    from easygen.stages.serve import serve_stage

    r = subprocess.run([sys.executable, "-m", "easygen.serve", *server_args(tmp_path, [
        "stage.allowed_image_dir=/nonexistent/folder"])], cwd=tmp_path, env=server_env(tmp_path),
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-3000:])
    assert "stage.allowed_image_dir=/nonexistent/folder is not a folder" in r.stderr
    for extra, pattern in [
        (["stage.port=70000"], r"stage\.port=70000 must be a port number"),
        (["stage.max_new_tokens=999"], r"stage\.max_new_tokens=999 is over stage\.max_new_tokens_limit=256"),
        (["stage.max_image_pixels=0"], r"stage\.max_image_pixels=0 must be a positive number"),
    ]:
        cfg = compose([*SMALL, "stage=serve", f"paths.data_dir={tmp_path}/data", f"paths.root_dir={tmp_path}",
                       f"paths.output_dir={tmp_path}/out", *extra])
        with pytest.raises(ConfigError, match=pattern):
            serve_stage(cfg)
    assert not (tmp_path / "out").exists()
