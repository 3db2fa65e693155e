"""The OpenAI-compatible API (FastAPI) over the shared engine (engine.py).

    GET  /v1/models                 the one model this server serves
    POST /v1/chat/completions       OpenAI's chat format; `image_url` parts (data: URLs, or files under
                                    stage.allowed_image_dir); `stream: true` as server-sent events
    POST /v1/images/generations     BiDiffuser text-to-image, pictures as `b64_json` PNGs
    GET  /health                    queue length and counts of served, failed and cancelled requests
    GET  /metrics                   Prometheus metrics (easygen/serve/metrics.py)

With a key (stage.api_key or EASYGEN_API_KEY) every /v1 route and /metrics want `Authorization: Bearer
KEY` (compared in constant time) and answer 401 otherwise.

Pictures the model draws in a conversation (its `<Img>description</Img>` answers, paper section 3) come
back in an extra field beside the text: `choices[0].message.images` (streamed: a `delta.images` chunk
before the last one), a list of `{"b64_json", "mime_type": "image/png", "prompt", "seed", "size"}`.
The `content` is the model's answer as it is, tags included. Extra request fields: `draw` (false skips
the drawings), `seed` (sampling and drawings). System messages are accepted and not used (the model's
conversation template has its own). One picture per conversation, as in the terminal chat: a message
with a new picture starts the conversation the model sees (earlier messages are left out).

Errors are OpenAI's JSON, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status
(400 bad request, 401 no or wrong key, 404 unknown model or route, 413 body too large, 503 queue full
with `Retry-After`, 500 server error). Pictures are sent inline and their files removed once sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from easygen.serve.engine import (
    ChatRequest,
    DrawRequest,
    Engine,
    InputError,
    QueueFull,
    check_text,
    decode_picture,
)
from easygen.serve.metrics import CONTENT_TYPE, ServeMetrics
from easygen.serve.settings import ServeSettings

RETRY_AFTER_S = 1  # what a 503 asks a client to wait
ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/images/generations", "/metrics", "/health")
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error", 503: "server_error", 500: "server_error"}
UNSUPPORTED = ("stop", "tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs",
               "logit_bias", "audio", "prediction")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status
    )


def _error_from(exc: BaseException) -> JSONResponse:
    if isinstance(exc, InputError):
        return error_response(exc.status, exc.message, exc.param, exc.code)
    if isinstance(exc, QueueFull):
        response = error_response(503, str(exc), code="server_busy")
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response
    return error_response(500, f"the model failed on this request: {type(exc).__name__}: {exc}")


def _error_event(exc: BaseException) -> str:
    body = json.loads(_error_from(exc).body)
    return f"data: {json.dumps(body)}\n\n"


# ----------------------------------------------------------------------------------------------------
# request parsing


async def read_json(request: Request, limit: int) -> dict:
    too_large = InputError(
        f"the request body is over the server's limit of {limit} bytes ({limit / 2**20:.0f} MiB, "
        "stage.max_request_mb)",
        code="request_too_large",
        status=413,
    )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    if not body.strip():
        raise InputError("the request body is empty: send a JSON object", code="invalid_json")
    try:
        data = json.loads(bytes(body))
    except UnicodeDecodeError:
        raise InputError("the request body is not UTF-8 JSON", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise InputError(
            f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    return data


def _check_model(body: dict, settings: ServeSettings) -> None:
    model = body.get("model")
    if model is not None and model != settings.model_id:
        raise InputError(
            f"The model `{model}` does not exist: this server serves `{settings.model_id}` (GET /v1/models)",
            param="model",
            code="model_not_found",
            status=404,
        )


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise InputError(f"{key}={value!r} must be {what} in [{lo:g}, {hi:g}]", param=key)
    return value


def read_image_url(url, param: str, settings: ServeSettings) -> tuple[bytes, str]:
    """The bytes of an `image_url`: a base64 data: URL, or a local file under `allowed_image_dir`; remote
    URLs are never fetched."""
    if not isinstance(url, str) or not url:
        raise InputError(f"{param} must be a non-empty string URL", param=param)
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise InputError(
                f"{param}: a data: URL must be base64, `data:image/png;base64,...`", param=param, code="invalid_image"
            )
        try:
            return base64.b64decode(payload, validate=True), f"{param} (data URL)"
        except (binascii.Error, ValueError):
            raise InputError(f"{param}: the data URL's base64 is malformed", param=param, code="invalid_image") from None
    scheme = urlparse(url).scheme.lower()
    if scheme not in ("", "file") and not (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        raise InputError(
            f"{param}: {scheme}: URLs are not fetched by this server; send the picture as a base64 data: URL "
            "(or as a file under stage.allowed_image_dir)",
            param=param,
            code="remote_image_url",
        )
    if settings.allowed_image_dir is None:
        raise InputError(
            f"{param}: local files are off; send a base64 data: URL, or start the server with "
            "stage.allowed_image_dir=FOLDER",
            param=param,
            code="image_path_not_allowed",
        )
    path = Path(unquote(urlparse(url).path)) if scheme == "file" else Path(url)
    if not path.is_absolute():
        path = settings.allowed_image_dir / path
    resolved = path.resolve()
    if not resolved.is_relative_to(settings.allowed_image_dir):
        raise InputError(
            f"{param}: {path} is outside the folder this server may read ({settings.allowed_image_dir})",
            param=param,
            code="image_path_not_allowed",
        )
    if not resolved.is_file():
        raise InputError(f"{param}: {path} does not exist (or is not a file)", param=param, code="invalid_image")
    if resolved.stat().st_size > settings.max_request_bytes:
        raise InputError(
            f"{param}: {path} is over {settings.max_request_bytes} bytes", param=param, code="image_too_large"
        )
    return resolved.read_bytes(), str(path)


def _parts(content, param: str) -> tuple[str, list[tuple[str, object]]]:
    """A message's text and its (param, url) images."""
    if isinstance(content, str):
        return check_text(content, param), []
    if not isinstance(content, list):
        raise InputError(f"{param} must be a string or a list of content parts", param=param)
    texts, images = [], []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(check_text(part.get("text"), f"{where}.text"))
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            images.append((f"{where}.image_url.url", url))
        else:
            raise InputError(
                f"{where}: content parts of type {kind!r} are not supported (use `text` and `image_url`)",
                param=where,
            )
    return "\n".join(texts), images


def parse_chat(body: dict, settings: ServeSettings) -> ChatRequest:
    """OpenAI chat request -> ChatRequest (the picture decoded); raises InputError naming the field."""
    _check_model(body, settings)
    for key in UNSUPPORTED:
        if body.get(key):
            raise InputError(f"{key} is not supported by this server", param=key, code="unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise InputError(f"n={body.get('n')!r}: this server returns one choice (n=1)", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {role, content} objects", param="messages")
    turns: list[list] = []  # [role, text, images]; consecutive messages of one role are joined
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InputError(f"{param} must be an object with role and content", param=param)
        role = msg.get("role")
        if role in ("system", "developer"):
            continue  # the conversation template (easygen/llm/templates.py) has its own system prompt
        if role not in ("user", "assistant"):
            raise InputError(
                f"{param}.role={role!r}: expected user, assistant or system", param=f"{param}.role"
            )
        if role == "user":
            text, images = _parts(msg.get("content"), f"{param}.content")
        else:
            text, images = _parts(msg.get("content") or "", f"{param}.content")
            if images:
                raise InputError(f"{param}: assistant messages carry no pictures", param=f"{param}.content")
        if len(images) > 1:
            raise InputError(f"{param}: one picture a message", param=f"{param}.content")
        if turns and turns[-1][0] == role:
            turns[-1][1] = "\n".join(t for t in (turns[-1][1], text) if t)
            turns[-1][2] += images
            if len(turns[-1][2]) > 1:
                raise InputError(f"{param}: one picture a message", param=f"{param}.content")
        else:
            turns.append([role, text, images])
    if not turns or turns[-1][0] != "user":
        raise InputError("the last message must be the user's question", param="messages")
    if turns[0][0] != "user":
        raise InputError("the conversation must start with a user message", param="messages")
    # one picture per conversation (easygen/chat.py): the last picture's message starts it
    first = max((k for k, t in enumerate(turns) if t[2]), default=None)
    kept = turns[first:] if first is not None else turns
    question = kept[-1][1]
    if not question.strip():
        raise InputError(
            "the last user message has no text (an empty prompt): ask something" + (" about the picture"
                                                                                     if kept[-1][2] else ""),
            param="messages",
            code="empty_prompt",
        )
    history = [(kept[k][1], kept[k + 1][1]) for k in range(0, len(kept) - 1, 2)]
    image = None
    if first is not None:
        param, url = turns[first][2][0]
        data, name = read_image_url(url, param, settings)
        image = decode_picture(data, name, settings.image_size, settings.max_image_pixels, param=param)
    limit = settings.max_new_tokens_limit
    max_new = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_new = _number({key: max_new}, key, settings.max_new_tokens, 1, limit, integer=True)
    draw = body.get("draw", True)
    if not isinstance(draw, bool):
        raise InputError(f"draw={draw!r} must be true or false", param="draw")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"seed={seed!r} must be an integer", param="seed")
    top_p = _number(body, "top_p", settings.top_p, 0.0, 1.0)
    if top_p <= 0:
        raise InputError("top_p must be in (0, 1]", param="top_p")
    return ChatRequest(
        question=question,
        history=history,
        image=image,
        max_new_tokens=int(max_new),
        temperature=float(_number(body, "temperature", settings.temperature, 0.0, 2.0)),
        top_p=float(top_p),
        seed=seed,
        draw=draw,
    )


def parse_images(body: dict, settings: ServeSettings) -> DrawRequest:
    _check_model(body, settings)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt must be a non-empty description of the picture", param="prompt", code="empty_prompt")
    if len(prompt) > settings.max_prompt_chars:
        raise InputError(
            f"prompt has {len(prompt)} characters, over the limit of {settings.max_prompt_chars}",
            param="prompt",
            code="prompt_too_long",
        )
    n = _number(body, "n", 1, 1, settings.max_images, integer=True)
    side = settings.image_size
    size = body.get("size")
    if size not in (None, "auto", f"{side}x{side}"):
        raise InputError(f"size={size!r}: this model draws {side}x{side} pictures", param="size")
    if body.get("response_format") not in (None, "b64_json"):
        raise InputError(
            f"response_format={body.get('response_format')!r}: this server returns pictures as b64_json only",
            param="response_format",
        )
    if body.get("stream"):
        raise InputError("stream is not supported for image generation", param="stream")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"seed={seed!r} must be an integer", param="seed")
    return DrawRequest(prompts=[prompt.strip()] * int(n), seed=seed)


# ----------------------------------------------------------------------------------------------------
# the app


def _picture_json(p, side: int) -> dict:
    return {
        "b64_json": base64.b64encode(p.png()).decode("ascii"),
        "mime_type": "image/png",
        "prompt": p.prompt,
        "seed": p.seed,
        "size": f"{side}x{side}",
    }


class ClientGone(Exception):
    """The client closed its connection while its request waited or ran."""


class _Stream:
    """A job's events delivered to the event loop (the worker thread calls `sink`)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def sink(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next(self, request: Request | None = None, job=None) -> tuple:
        """The next event; while waiting, a client that went away cancels the job."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    job.cancel()
                    raise ClientGone from None


def route_of(path: str) -> str:
    """A request's route for the metrics' labels (a bounded set)."""
    for route in ROUTES:
        if path == route or path.startswith(route + "/"):
            return route
    return "/v1/other" if path.startswith("/v1/") else "web"


def key_matches(header: str | None, key: str) -> bool:
    """`Authorization: Bearer KEY`, the key compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


class Guard:
    """ASGI middleware: the key on /v1 and /metrics (401 in OpenAI's error JSON) and the request counts by
    route and status (easygen_requests_total)."""

    def __init__(self, app, settings: ServeSettings, metrics: ServeMetrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = route_of(path)
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            protected = route.startswith("/v1") or route == "/metrics"
            if protected and self.settings.api_key is not None:
                headers = dict(scope.get("headers") or [])
                given = headers.get(b"authorization", b"").decode("latin-1")
                if not key_matches(given, self.settings.api_key):
                    response = error_response(
                        401, "a valid API key is needed: send `Authorization: Bearer KEY` (the server's "
                        "stage.api_key / EASYGEN_API_KEY)", code="invalid_api_key")
                    response.headers["WWW-Authenticate"] = "Bearer"
                    return await response(scope, receive, counted_send)
            await self.app(scope, receive, counted_send)
        finally:
            if route != "web":
                self.metrics.requests.labels(route, str(status["code"])).inc()


def create_app(engine: Engine, settings: ServeSettings, metrics: ServeMetrics | None = None) -> FastAPI:
    # no Swagger page: it loads its scripts from a CDN; the schema is at /v1/openapi.json
    app = FastAPI(title="EasyGen", docs_url=None, redoc_url=None, openapi_url="/v1/openapi.json")
    metrics = metrics if metrics is not None else engine.metrics or ServeMetrics()
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.add_middleware(Guard, settings=settings, metrics=metrics)
    started = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return _error_from(exc)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        return _error_from(exc)

    def model_card() -> dict:
        return {"id": settings.model_id, "object": "model", "created": started, "owned_by": "easygen"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def model(model: str):
        _check_model({"model": model}, settings)
        return model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, "pending": engine.pending, "waiting": engine.waiting,
                "decoding": len(engine.decoder), **engine.stats}

    @app.get("/metrics")
    async def metrics_page():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, settings.max_request_bytes)
        # decoding a large picture takes a while: off the event loop
        req = await asyncio.to_thread(parse_chat, body, settings)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InputError(f"stream={stream!r} must be true or false", param="stream")
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
        events = _Stream()
        try:
            job = engine.submit(req, events.sink)
        except QueueFull as e:
            return _error_from(e)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            first = await events.next(request, job)
        except ClientGone:
            return Response(status_code=499)
        if first[0] == "error":  # refused before any text (too long, empty): a plain HTTP error
            return _error_from(first[1])
        if stream:
            return StreamingResponse(
                _sse(first, events, job, cid, created, settings, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        event = first
        try:
            while event[0] not in ("done", "error", "cancelled"):
                event = await events.next(request, job)
        except ClientGone:
            return Response(status_code=499)
        if event[0] == "error":
            return _error_from(event[1])
        if event[0] == "cancelled":
            return error_response(500, "the request was cancelled")
        result = event[1]
        message = {"role": "assistant", "content": result.answer, "refusal": None}
        if result.pictures:
            message["images"] = [_picture_json(p, settings.image_size) for p in result.pictures]
            for p in result.pictures:
                p.discard()
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": settings.model_id,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": _usage(result),
            "system_fingerprint": None,
        }

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        body = await read_json(request, settings.max_request_bytes)
        req = parse_images(body, settings)
        events = _Stream()
        try:
            job = engine.submit(req, events.sink)
        except QueueFull as e:
            return _error_from(e)
        event = ("",)
        try:
            while event[0] not in ("done", "error", "cancelled"):
                event = await events.next(request, job)
        except ClientGone:
            return Response(status_code=499)
        if event[0] != "done":
            return _error_from(event[1]) if event[0] == "error" else error_response(500, "cancelled")
        side = settings.image_size
        data = [{"b64_json": base64.b64encode(p.png()).decode("ascii"), "revised_prompt": None, "seed": p.seed}
                for p in event[1].pictures]
        for p in event[1].pictures:
            p.discard()
        return {
            "created": int(time.time()),
            "data": data,
            "output_format": "png",
            "size": f"{side}x{side}",
        }

    routes = {"models": "GET", "chat/completions": "POST", "images/generations": "POST"}

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                   include_in_schema=False)
    async def unknown(rest: str, request: Request):
        if rest.strip("/") in routes:
            method = routes[rest.strip("/")]
            return error_response(405, f"{request.method} is not allowed on /v1/{rest}: use {method}",
                                  code="method_not_allowed")
        return error_response(404, f"no such endpoint: /v1/{rest} (this server has /v1/models, "
                                   "/v1/chat/completions and /v1/images/generations)", code="unknown_url")

    return app


def _usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


async def _sse(first, events: _Stream, job, cid: str, created: int, settings: ServeSettings, include_usage: bool):
    """OpenAI's chat.completion.chunk events, then `data: [DONE]`; a client that leaves cancels the job."""

    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": settings.model_id,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **extra,
        }
        if include_usage:
            body.setdefault("usage", None)
        return f"data: {json.dumps(body)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        event = first
        while True:
            kind, value = event
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "pictures":
                images = [_picture_json(p, settings.image_size) for p in value]
                for p in value:
                    p.discard()
                yield chunk({"images": images})
            elif kind == "error":
                yield _error_event(value)
                break
            elif kind == "cancelled":
                break
            elif kind == "done":
                yield chunk({}, finish=value.finish_reason)
                if include_usage:
                    body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": settings.model_id, "system_fingerprint": None, "choices": [],
                            "usage": _usage(value)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                break
            # "notice" (older turns dropped) has no place in OpenAI's chunks: not sent
            event = await events.next()
        finished = True
    finally:
        if not finished:
            job.cancel()  # the client went away mid-stream: stop generating at the next token
