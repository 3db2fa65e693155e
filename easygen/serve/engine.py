"""The one model behind the server: a `ChatSession` (easygen/chat.py) shared by the web demo and the API,
run by a single worker thread that takes jobs first come, first served, so that concurrent users wait in
line instead of colliding on one model.

A job is stateless: it carries the conversation so far (the (question, answer) pairs since its picture),
the new question, the picture as a decoded tensor and the sampling settings. The worker rebuilds the
session's turns from it (the picture's `<image>` marker on the first question, as ChatSession.ask puts it),
asks, and reports through the job's `sink` callable: ("text", delta) while the answer streams,
("notice", line) when older turns were dropped to fit the context, ("pictures", [Picture]) for the
`<Img>description</Img>` drawings (EasyGen's text-to-image path through BiDiffuser, paper section 3),
then ("done", Result), or ("error", exception) / ("cancelled", None).

Every file the engine writes (generated pictures) goes under its temporary folder.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from easygen.chat import IMG_TAG, ChatSession
from easygen.images import load_image
from easygen.llm.templates import IMAGE_MARKER


class InputError(ValueError):
    """A request the server refuses; `status`, `param` and `code` become OpenAI's error JSON (api.py)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


class QueueFull(RuntimeError):
    """More jobs waiting than `max_queue`."""


class Cancelled(Exception):
    """Raised inside the generation when the job's client went away (stops transformers' generate)."""


@dataclass
class Picture:
    """A picture BiDiffuser drew: the PNG file in the engine's temporary folder and its description."""

    path: Path
    prompt: str
    seed: int

    def png(self) -> bytes:
        return self.path.read_bytes()


@dataclass
class ChatRequest:
    question: str
    history: list[tuple[str, str]] = field(default_factory=list)
    image: torch.Tensor | None = None  # [3, S, S] in [0, 1] (easygen.images.load_image)
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # sampling seed (temperature > 0) and the drawings' seed
    draw: bool = True  # draw the answer's <Img>...</Img> descriptions


@dataclass
class DrawRequest:
    prompts: list[str]
    seed: int | None = None


@dataclass
class Result:
    answer: str
    pictures: list[Picture]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "length" when the answer used all of max_new_tokens
    dropped: int = 0  # exchanges dropped from the front of the history to fit model.max_length
    seconds: float = 0.0


class Job:
    """One request in the engine's line; `cancel()` stops it at its next streamed token (or before it
    starts)."""

    _ids = itertools.count(1)

    def __init__(self, request, sink: Callable[[tuple], None]):
        self.id = next(self._ids)
        self.request, self.sink = request, sink
        self.cancelled = threading.Event()
        self.finished = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class _CancelStreamer:
    """Wraps the session's streamer: every token generate hands it first checks the job, so a client that
    went away stops the generation at the next token (whatever the streamer makes of the tokens)."""

    def __init__(self, inner, job: Job):
        self.inner, self.job = inner, job

    def put(self, value):
        if self.job.cancelled.is_set():
            raise Cancelled
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


class _JobModel:
    """The EasyGen model as one job sees it: `generate` streams through a _CancelStreamer."""

    def __init__(self, model, job: Job):
        self._model, self._job = model, job

    def generate(self, *args, streamer=None, **kwargs):
        return self._model.generate(*args, streamer=_CancelStreamer(streamer, self._job), **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


class _ServeSession(ChatSession):
    """ChatSession whose drawings use the job's seed and unique file names in the engine's folder (the
    session object lives for one job; `draw_prompts` is the hook ChatSession.ask calls for `<Img>` tags)."""

    seed: int | None = None
    draw_enabled: bool = True

    def draw_prompts(self, descriptions: list[str]) -> list[Path]:
        if not descriptions or not self.draw_enabled:
            return []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for img in self.bidiffuser.generate(descriptions, seed=self.seed):
            path = self.out_dir / f"picture_{uuid.uuid4().hex[:12]}.png"
            img.save(path, format="PNG")
            paths.append(path)
        return paths


def check_text(text: str, param: str) -> str:
    """A user message as the model will read it; the picture marker is reserved for the picture's place."""
    if not isinstance(text, str):
        raise InputError(f"{param} must be a string", param=param)
    if IMAGE_MARKER in text:
        raise InputError(
            f"{param} contains {IMAGE_MARKER!r}, which marks the picture's place in the prompt: attach the "
            "picture as an image instead of typing the marker",
            param=param,
        )
    return text


def decode_picture(data: bytes, name: str, size: int, max_pixels: int, param: str | None = None) -> torch.Tensor:
    """Encoded bytes -> float [3, size, size] (easygen.images.load_image) with errors that name `name`: not a
    picture, damaged or truncated, or more than `max_pixels` pixels (refused before decoding)."""
    if not data:
        raise InputError(f"{name} is empty (0 bytes): not a picture", param=param, code="invalid_image")
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
    except UnidentifiedImageError:
        raise InputError(
            f"{name} is not a picture PIL can read (not an image file, or an unknown format)",
            param=param,
            code="invalid_image",
        ) from None
    except Image.DecompressionBombError:
        width, height = 1 << 20, 1 << 20  # beyond any limit: refused below with the limit named
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{name} is a damaged picture ({exc})", param=param, code="invalid_image") from None
    if width * height > max_pixels:
        raise InputError(
            f"{name} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the server's limit of "
            f"{max_pixels} pixels ({max_pixels / 1e6:.1f} MP, stage.max_image_pixels): send a smaller picture",
            param=param,
            code="image_too_large",
        )
    try:
        return load_image(data, size)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{name} is too large to decode: {exc}", param=param, code="image_too_large") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports a file cut short as OSError("image file is truncated ...")
        raise InputError(
            f"{name} is a damaged or truncated picture ({exc})", param=param, code="invalid_image"
        ) from None


class _HoldTrailingSpace:
    """Passes streamed text on, holding back trailing whitespace until more text follows: the streamed
    answer then equals the final one (ChatSession's streamer ends with a newline; the answer is stripped)."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit, self.held, self.started = emit, "", False

    def __call__(self, text: str) -> None:
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        if not self.started:
            body = body.lstrip()
        if body:
            self.started = True
            self.emit(body)


class Engine:
    """The model and its line of jobs. `submit` returns at once; the single worker thread runs jobs in
    order and reports through each job's sink."""

    def __init__(
        self,
        session: ChatSession,
        tmp_dir: str | Path,
        *,
        max_queue: int = 32,
        image_seed: int | None = None,
        feature_cache: int = 32,
    ):
        self.model, self.bidiffuser, self.collator = session.model, session.bidiffuser, session.collator
        self.image_size = int(session.image_size)
        self.max_length = int(self.collator.max_length)
        self.tmp_dir = Path(tmp_dir)
        self.pictures_dir = self.tmp_dir / "pictures"
        self.max_queue = int(max_queue)
        self.image_seed = int(image_seed) if image_seed is not None else int(self.bidiffuser.seed)
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._feature_cache = int(feature_cache)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="easygen-engine")
        self._lock = threading.Lock()
        self.pending = 0  # submitted, not finished (waiting or running)
        self.stats = {"served": 0, "errors": 0, "cancelled": 0}

    # ------------------------------------------------------------------ line

    def submit(self, request: ChatRequest | DrawRequest, sink: Callable[[tuple], None]) -> Job:
        with self._lock:
            if self.pending >= self.max_queue:
                raise QueueFull(
                    f"the server is busy: {self.pending} requests are waiting (stage.max_queue={self.max_queue}); "
                    "try again shortly"
                )
            self.pending += 1
        job = Job(request, sink)
        self._pool.submit(self._run, job)
        return job

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job) -> None:
        try:
            if job.cancelled.is_set():
                raise Cancelled
            if isinstance(job.request, DrawRequest):
                result = self._draw(job)
            else:
                result = self._chat(job)
        except Cancelled:
            self._count("cancelled")
            job.sink(("cancelled", None))
        except Exception as exc:  # noqa: BLE001 - reported to the job's client; the worker goes on
            self._count("errors")
            job.sink(("error", exc))
        else:
            self._count("served")
            job.sink(("done", result))
        finally:
            with self._lock:
                self.pending -= 1
            job.finished.set()

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    # ------------------------------------------------------------------ work

    def _session(self, req: ChatRequest, job: Job) -> _ServeSession:
        session = _ServeSession(
            _JobModel(self.model, job),
            self.bidiffuser,
            self.collator,
            self.pictures_dir,
            image_size=self.image_size,
            max_new_tokens=req.max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
        )
        session.seed = self.image_seed if req.seed is None else int(req.seed)
        session.draw_enabled = req.draw
        return session

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """BiDiffuser i2t features of a picture, as ChatSession.ask computes them, kept for the next turns
        (a stateless API client sends its picture again with every question)."""
        key = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()
        if key in self._features:
            self._features.move_to_end(key)
            return self._features[key]
        with torch.no_grad():
            feats = self.bidiffuser.i2t_features(pixels[None].to(self.bidiffuser.device))[0].float().cpu()
        self._features[key] = feats
        while len(self._features) > self._feature_cache:
            self._features.popitem(last=False)
        return feats

    def _chat(self, job: Job) -> Result:
        req: ChatRequest = job.request
        start = time.perf_counter()
        session = self._session(req, job)
        marker = f"{IMAGE_MARKER} " if req.image is not None else ""
        if req.image is not None:
            session.features = self.features(req.image)
        for i, (question, answer) in enumerate(req.history):
            session.turns.append({"from": "human", "value": (marker if i == 0 else "") + question})
            session.turns.append({"from": "gpt", "value": answer})
        question = (marker if not req.history else "") + req.question
        if req.temperature > 0 and req.seed is not None:
            torch.manual_seed(int(req.seed))

        def on_text(delta: str) -> None:
            if job.cancelled.is_set():
                raise Cancelled
            job.sink(("text", delta))

        try:
            answer, paths = session.ask(
                question, on_text=_HoldTrailingSpace(on_text), on_notice=lambda n: job.sink(("notice", n))
            )
        except ValueError as exc:  # an empty message, or one too long for model.max_length (chat.py)
            too_long = "too long" in str(exc)
            if not too_long and str(exc) != "empty message":
                raise
            raise InputError(
                str(exc), param="messages", code="context_length_exceeded" if too_long else "empty_prompt"
            ) from None
        descriptions = [d.strip() for d in IMG_TAG.findall(answer) if d.strip()]
        pictures = [Picture(p, d, session.seed) for p, d in zip(paths, descriptions)]
        if pictures:
            job.sink(("pictures", pictures))
        tok = self.collator.tokenizer
        completion = len(tok(answer, add_special_tokens=False).input_ids) if answer else 0
        return Result(
            answer=answer,
            pictures=pictures,
            prompt_tokens=session.prompt_tokens(session.turns[:-1]),
            completion_tokens=completion,
            finish_reason="length" if completion >= req.max_new_tokens else "stop",
            dropped=session.dropped,
            seconds=time.perf_counter() - start,
        )

    def _draw(self, job: Job) -> Result:
        req: DrawRequest = job.request
        start = time.perf_counter()
        session = _ServeSession(self.model, self.bidiffuser, self.collator, self.pictures_dir, self.image_size)
        base = self.image_seed if req.seed is None else int(req.seed)
        pictures = []
        for i, prompt in enumerate(req.prompts):  # one seed each: n pictures of one prompt differ
            if job.cancelled.is_set():
                raise Cancelled
            session.seed = base + i
            (path,) = session.draw_prompts([prompt])
            pictures.append(Picture(path, prompt, session.seed))
        job.sink(("pictures", pictures))
        return Result(answer="", pictures=pictures, seconds=time.perf_counter() - start)
