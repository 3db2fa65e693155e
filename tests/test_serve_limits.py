"""`python -m easygen.serve` serving many users, through the real CLI in a subprocess (tiny model, random
weights): eight official `openai` clients at once get the answers they get alone; the API key; the
Prometheus metrics parsed with prometheus_client's own parser; back-pressure (503 with Retry-After);
the warning when listening beyond loopback without a key; and SIGTERM ending the server within 10 s with
its temporary folder removed."""

from __future__ import annotations

import io
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.test_serve_api import Server as ApiServer
from tests.test_serve_api import data_url, server_args, server_env

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "s3cret-key-for-tests"
MODEL = "easygen-tiny"
QUESTIONS = ["What is in the picture?", "Describe the image concisely.", "Which colour is the shape?",
             "Where is it?", "Is the background dark?", "How many shapes are there?", "What shape is it?",
             "Tell me about this picture in a few words."]


class Server(ApiServer):
    """The API tests' server with the web demo off, its folders under `tmp`."""

    def __init__(self, args: list[str], tmp: Path, env_extra: dict | None = None):
        self.tmp = tmp
        (tmp / "cwd").mkdir(exist_ok=True)
        env = server_env(tmp)
        env.update(env_extra or {})
        # random weights (not the shipped trained ones): their answers run to max_tokens
        super().__init__(["stage.web=false", "model.bidiffuser.weights=null", "model.llm.weights=null",
                          *server_args(tmp, args)], tmp / "cwd", env, start_timeout=240)


def noise_png(seed: int) -> bytes:
    img = Image.effect_noise((64, 64), 40 + 10 * seed).convert("RGB")
    img.paste((40 * seed % 256, 200, 90), (8 * seed % 40, 10, 8 * seed % 40 + 16, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """The key from EASYGEN_API_KEY; features not kept, so that each answer's picture goes through
    BiDiffuser with the others waiting at that moment."""
    srv = Server(["stage.feature_cache=0"], tmp_path_factory.mktemp("serve-keyed"), {"EASYGEN_API_KEY": KEY})
    yield srv
    assert srv.stop() == 0, srv.output[-5000:]


def scrape(srv: Server) -> dict:
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def value(values: dict, name: str, **labels) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_eight_clients_at_once_get_their_answers_alone(keyed):
    """Eight official clients at once, each with its own picture, question and answer length (four
    streamed): token for token what each gets alone, and the server decoded them together."""
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    before = scrape(keyed)

    def ask(i: int) -> tuple[str, int]:
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(noise_png(i))}},
            {"type": "text", "text": QUESTIONS[i]}]}]
        kwargs = dict(model=MODEL, messages=messages, max_tokens=6 + 5 * i, extra_body={"draw": False})
        if i % 2:
            chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                         **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, chunks[-1].usage.completion_tokens
        r = client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    after = scrape(keyed)
    alone = [ask(i) for i in range(8)]
    assert together == alone
    assert len({text for text, _ in alone}) == 8 and all(text for text, _ in alone)
    # the untrained model never ends early: each answer is as long as its max_tokens
    assert [n for _, n in alone] == [6 + 5 * i for i in range(8)]
    multi = (value(after, "easygen_decode_batch_rows_count") - value(after, "easygen_decode_batch_rows_bucket",
                                                                       le="1.0")) - (
        value(before, "easygen_decode_batch_rows_count") - value(before, "easygen_decode_batch_rows_bucket",
                                                                   le="1.0"))
    assert multi >= 5, "the eight requests were not decoded together"


def test_every_v1_route_wants_the_key(keyed):
    for key in ("wrong-key", KEY + "x", KEY[:-1]):
        client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            client.models.list()
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.AuthenticationError):
            client.images.generate(model=MODEL, prompt="a red circle")
    with httpx.Client(base_url=keyed.url, timeout=60) as h:
        for method, path in [("GET", "/v1/models"), ("GET", "/v1/models/easygen-tiny"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/images/generations"), ("GET", "/v1/nothing"), ("GET", "/metrics")]:
            for headers in ({}, {"Authorization": "Basic " + KEY}, {"Authorization": KEY}):
                r = h.request(method, path, headers=headers)
                assert r.status_code == 401, (path, headers, r.status_code)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
        assert h.get("/health").status_code == 200
        assert h.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"] == MODEL


def test_metrics_parse_and_move(keyed):
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    before = scrape(keyed)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Draw a red circle."}],
                                       max_tokens=7, stream=True, stream_options={"include_usage": True})
    tokens = list(r)[-1].usage.completion_tokens
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ""}])
    client.images.generate(model=MODEL, prompt="a blue square", n=2)
    httpx.get(keyed.url + "/v1/models", timeout=30)  # no key: 401
    after = scrape(keyed)
    moved = [(name, labels, value(after, name, **labels) - value(before, name, **labels)) for name, labels in [
        ("easygen_requests_total", {"route": "/v1/chat/completions", "status": "200"}),
        ("easygen_requests_total", {"route": "/v1/chat/completions", "status": "400"}),
        ("easygen_requests_total", {"route": "/v1/images/generations", "status": "200"}),
        ("easygen_requests_total", {"route": "/v1/models", "status": "401"}),
        ("easygen_time_to_first_token_seconds_count", {}),
        ("easygen_request_latency_seconds_count", {"kind": "chat"}),
        ("easygen_request_latency_seconds_count", {"kind": "draw"}),
        ("easygen_generated_tokens_total", {}),
        ("easygen_pictures_drawn_total", {}),
    ]]
    assert [m[2] for m in moved] == [1, 1, 1, 1, 1, 1, 1, tokens, 2], moved
    assert ("easygen_queue_depth", ()) in after and ("easygen_batch_size", ()) in after
    assert ("easygen_tokens_per_second", ()) in after and value(after, "easygen_tokens_per_second") > 0


def test_busy_server_answers_503_with_retry_after(tmp_path):
    """One answer at a time and one waiting: a long drawing holds the engine, a chat waits, the next
    request is refused with 503 and Retry-After, and is served once the line is free."""
    srv = Server(["stage.max_batch=1", "stage.max_queue=1", "model.bidiffuser.sampler.steps=400"], tmp_path)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        pool = ThreadPoolExecutor(2)
        drawing = pool.submit(client.images.generate, model=MODEL, prompt="a red circle", n=3)
        deadline = time.time() + 60
        while not ((h := srv.health())["pending"] == 1 and h["waiting"] == 0) and time.time() < deadline:
            time.sleep(0.02)  # the drawing taken up by the engine
        waiting = pool.submit(client.chat.completions.create, model=MODEL, max_tokens=4,
                              messages=[{"role": "user", "content": "hello"}])
        while srv.health()["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.02)
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_busy"
        assert "stage.max_queue=1" in r.json()["error"]["message"]
        assert not drawing.done(), "the drawing ended before the check: raise its sampler steps"
        assert len(drawing.result().data) == 3 and waiting.result().choices[0].message.content
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
        assert r.status_code == 200
    finally:
        assert srv.stop() == 0, srv.output[-5000:]


def test_warning_beyond_loopback_and_sigterm_within_10_s(tmp_path):
    """Listening on 0.0.0.0 without a key prints one warning line; SIGTERM with an answer streaming ends
    the process (exit 0) within 10 s and removes the server's temporary folder."""
    srv = Server(["stage.host=0.0.0.0", "stage.max_new_tokens_limit=100000", "model.max_length=100000"], tmp_path)
    warnings = [line for line in srv.lines if "WARNING" in line and "without an API key" in line]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0], srv.output[-3000:]
    (folder,) = (tmp_path / "systmp").glob("easygen-serve-*")
    got = []

    def stream():
        body = {"stream": True, "max_tokens": 100000, "messages": [{"role": "user", "content": "go on"}]}
        try:
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    got.append(line)
        except httpx.HTTPError:
            got.append("closed")

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    deadline = time.time() + 60
    while len(got) < 5 and time.time() < deadline:
        time.sleep(0.05)
    assert len(got) >= 5 and srv.health()["decoding"] == 1
    start = time.perf_counter()
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(timeout=30)
    took = time.perf_counter() - start
    assert code == 0 and took < 10, (code, took, srv.output[-3000:])
    assert not folder.exists()
    reader.join(30)
    assert not any("[DONE]" in g for g in got)  # the 100000-token answer was cut short, not finished
