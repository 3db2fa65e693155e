"""The one model behind the server, shared by the web demo and the API: a scheduler thread that decodes
the answers of concurrent requests together (continuous batching, easygen/serve/batching.py) and draws
their pictures together.

A job is stateless: it carries the conversation so far (the (question, answer) pairs since its picture),
the new question, the picture as a decoded tensor and the sampling settings. Jobs wait in line (at most
`max_queue`); at every token boundary the scheduler admits waiting chats while the batch has room (at most
`max_batch` answers): their pictures' BiDiffuser image-to-text features are computed in one batch, their
prompts (the conversation rebuilt as ChatSession.ask builds it, easygen/chat.py: the picture's `<image>`
marker on the first question, older exchanges dropped to fit model.max_length) are prefilled in one
forward pass, and they join the running batch; an answer leaves the batch when it ends. The pictures of
`<Img>description</Img>` answers (EasyGen's text-to-image path through BiDiffuser, paper section 3) and
the drawing requests waiting at that moment are drawn in one BiDiffuser batch per seed.

A job reports through its `sink` callable: ("text", delta) while the answer streams, ("notice", line)
when older turns were dropped to fit the context, ("pictures", [Picture]) for its drawings, then
("done", Result), or ("error", exception) / ("cancelled", None).

Every file the engine writes (generated pictures) goes under its temporary folder; a picture is removed
when its request no longer needs it (`Picture.discard`), and at most `keep_pictures` stay in any case.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from easygen.chat import IMG_TAG, ChatSession, _Streamer
from easygen.images import load_image
from easygen.llm.templates import IMAGE_MARKER
from easygen.serve.batching import BatchDecoder, Row

log = logging.getLogger("easygen")


class InputError(ValueError):
    """A request the server refuses; `status`, `param` and `code` become OpenAI's error JSON (api.py)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


class QueueFull(RuntimeError):
    """More jobs waiting than `max_queue` (or the server is shutting down): try again later."""


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

    def discard(self) -> None:
        """The request is done with the file (the API sent it inline)."""
        self.path.unlink(missing_ok=True)


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
        self.ended = False  # its last event is on its way (Engine._end)
        self.arrived = time.perf_counter()
        self.first_text: float | None = None  # when its first text was streamed

    def cancel(self) -> None:
        self.cancelled.set()


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




@dataclass
class _Answer:
    """A chat job while its answer decodes: the row's owner in the batch."""

    job: Job
    streamer: _Streamer
    seed: int  # the drawings' seed
    prompt_tokens: int
    dropped: int
    row: Row | None = None
    answer: str = ""
    descriptions: list[str] = field(default_factory=list)


class Engine:
    """The model, its line of jobs and the running batch. `submit` returns at once; the scheduler thread
    runs the jobs (see the module's docstring) and reports through each job's sink."""

    def __init__(
        self,
        session: ChatSession,
        tmp_dir: str | Path,
        *,
        max_queue: int = 32,
        max_batch: int = 16,
        image_seed: int | None = None,
        feature_cache: int = 32,
        keep_pictures: int = 256,
        metrics=None,
    ):
        self.model, self.bidiffuser, self.collator = session.model, session.bidiffuser, session.collator
        self.tokenizer = self.collator.tokenizer
        self.image_size = int(session.image_size)
        self.max_length = int(self.collator.max_length)
        self.tmp_dir = Path(tmp_dir)
        self.pictures_dir = self.tmp_dir / "pictures"
        self.max_queue, self.max_batch = int(max_queue), int(max_batch)
        if self.max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be at least 1")
        self.image_seed = int(image_seed) if image_seed is not None else int(self.bidiffuser.seed)
        self.metrics = metrics
        tok = getattr(self.model, "tokenizer", None) or self.tokenizer
        self.decoder = BatchDecoder(self.model, tok.eos_token_id)
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._feature_cache = int(feature_cache)
        self._kept: deque[Path] = deque()
        self._keep_pictures = int(keep_pictures)
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.pending = 0  # submitted, not finished (waiting, decoding or drawing)
        self.stats = {"served": 0, "errors": 0, "cancelled": 0}
        self._thread = threading.Thread(target=self._loop, name="easygen-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ line

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: ChatRequest | DrawRequest, sink: Callable[[tuple], None]) -> Job:
        job = Job(request, sink)
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"the server is busy: {len(self._waiting)} requests are waiting "
                    f"(stage.max_queue={self.max_queue}); try again shortly"
                )
            self._waiting.append(job)
            self.pending += 1
            self._gauges()
            self._cond.notify()
        return job

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs, cancel the waiting ones and the running batch (each stops at its next token),
        and wait up to `timeout` seconds for the scheduler to end."""
        with self._cond:
            self._closing = True
            waiting = list(self._waiting)
            self._waiting.clear()
            for row in self.decoder.rows:
                row.owner.job.cancel()
            self._cond.notify_all()
        for job in waiting:
            self._end(job, "cancelled", None)
        self._thread.join(timeout)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.batch_size.set(len(self.decoder.rows))

    def _end(self, job: Job, kind: str, value) -> None:
        """The job's last event (once), counted."""
        outcome = {"done": "served", "error": "errors", "cancelled": "cancelled"}[kind]
        with self._cond:
            if job.ended:
                return
            job.ended = True
            self.stats[outcome] += 1
            self.pending -= 1
        if self.metrics is not None:
            what = "draw" if isinstance(job.request, DrawRequest) else "chat"
            self.metrics.outcomes.labels(what, {"errors": "error"}.get(outcome, outcome)).inc()
            if kind == "done":
                self.metrics.latency.labels(what).observe(time.perf_counter() - job.arrived)
        try:
            job.sink((kind, value))
        finally:
            job.finished.set()

    # ------------------------------------------------------------------ the scheduler

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self.decoder.rows and not self._closing:
                    self._cond.wait()
                if self._closing and not self.decoder.rows:
                    return
                chats, draws, kept = [], [], deque()
                room = self.max_batch - len(self.decoder.rows)
                while self._waiting:  # first come first served; drawings take no place in the batch
                    job = self._waiting.popleft()
                    if isinstance(job.request, DrawRequest):
                        draws.append(job)
                    elif room > 0:
                        chats.append(job)
                        room -= 1
                    else:
                        kept.append(job)
                self._waiting = kept
                self._gauges()
            try:
                self._iterate(chats, draws)
            except Exception as exc:  # noqa: BLE001 - the model failed: every job of this round hears it
                log.exception("the engine failed on a batch")
                for job in [*(row.owner.job for row in self.decoder.rows), *chats, *draws]:
                    self._end(job, "error", exc)
                self.decoder.reset()
            with self._cond:
                self._gauges()

    def _iterate(self, chats: list[Job], draws: list[Job]) -> None:
        """One token boundary: a token for every running answer, the admitted chats prefilled into the
        batch, then the drawings of the answers that ended and of the waiting drawing requests."""
        ended: list[_Answer] = []
        dec = self.decoder
        if dec.rows:
            self._leave([r for r in dec.rows if r.owner.job.cancelled.is_set()], cancelled=True)
        rows = list(dec.rows)
        if rows:
            dec.step()
            self._stream(rows)
            ended += self._finished(rows)
        joined = self._admit([j for j in chats if not self._cancelled(j)])
        ended += self._finished(joined)
        if self.metrics is not None and (rows or joined):
            self.metrics.batch_rows.observe(len(rows) + len(joined))
        draws = [j for j in draws if not self._cancelled(j)]
        self._finish(ended, draws)

    def _cancelled(self, job: Job) -> bool:
        if job.cancelled.is_set():
            self._end(job, "cancelled", None)
            return True
        return False

    def _stream(self, rows: list[Row]) -> None:
        """Each row's newest token to its client (rows that picked the end token have none)."""
        n = 0
        for row in rows:
            a: _Answer = row.owner
            if row.finish_reason == "stop":
                continue
            n += 1
            try:
                a.streamer.put(torch.tensor([row.tokens[-1]]))
            except Cancelled:
                a.job.cancel()
        if self.metrics is not None:
            self.metrics.generated(n)

    def _finished(self, rows: list[Row]) -> list[_Answer]:
        """Rows that ended or whose client left, out of the batch; the ended answers."""
        done = [r for r in rows if r.finished and not r.owner.job.cancelled.is_set()]
        self._leave([r for r in rows if r.owner.job.cancelled.is_set()], cancelled=True)
        self._leave(done, cancelled=False)
        answers = []
        for row in done:
            a: _Answer = row.owner
            try:
                a.streamer.end()
            except Cancelled:
                self._end(a.job, "cancelled", None)
                continue
            a.answer = self.tokenizer.decode(row.tokens, skip_special_tokens=True).strip()
            if a.job.request.draw:
                a.descriptions = [d.strip() for d in IMG_TAG.findall(a.answer) if d.strip()]
            answers.append(a)
        return answers

    def _leave(self, rows: list[Row], cancelled: bool) -> None:
        if not rows:
            return
        self.decoder.drop(rows)
        if cancelled:
            for row in rows:
                self._end(row.owner.job, "cancelled", None)

    # ------------------------------------------------------------------ admission

    def _admit(self, jobs: list[Job]) -> list[Row]:
        """Features for the jobs' pictures in one batch, their prompts, one prefill; returns their rows."""
        if not jobs:
            return []
        try:
            features = self.features([j.request.image for j in jobs if j.request.image is not None])
        except Exception as exc:  # noqa: BLE001 - reported to these jobs; the running batch goes on
            for job in jobs:
                self._end(job, "error", exc)
            return []
        samples, answers = [], []
        it = iter(features)
        for job in jobs:
            feats = next(it) if job.request.image is not None else None
            try:
                sample, answer = self._prepare(job, feats)
            except Exception as exc:  # noqa: BLE001 - a refused prompt (too long, empty): this job only
                self._end(job, "error", exc)
                continue
            samples.append(sample)
            answers.append(answer)
        if not samples:
            return []
        batch = self.collator(samples)
        rows = []
        for i, a in enumerate(answers):
            req: ChatRequest = a.job.request
            generator = None
            if req.temperature > 0 and req.seed is not None:
                generator = torch.Generator(device=self.decoder.device).manual_seed(int(req.seed))
            a.prompt_tokens = int(batch["attention_mask"][i].sum())
            a.row = Row(a, req.max_new_tokens, temperature=req.temperature, top_p=req.top_p, generator=generator)
            rows.append(a.row)
        self.decoder.join(rows, batch)
        self._stream(rows)
        return rows

    def _prepare(self, job: Job, feats: torch.Tensor | None) -> tuple[dict, _Answer]:
        """The job's conversation as the eval collator's sample, as ChatSession.ask builds it."""
        req: ChatRequest = job.request
        session = ChatSession(self.model, self.bidiffuser, self.collator, self.pictures_dir, self.image_size)
        session.features = feats
        marker = f"{IMAGE_MARKER} " if feats is not None else ""
        for i, (question, answer) in enumerate(req.history):
            session.turns.append({"from": "human", "value": (marker if i == 0 else "") + question})
            session.turns.append({"from": "gpt", "value": answer})
        if not req.question.strip():
            raise InputError("empty message", param="messages", code="empty_prompt")
        question = (marker if not req.history else "") + req.question
        session.turns.append({"from": "human", "value": question})
        try:
            dropped = session._fit_history()
        except ValueError as exc:  # one question too long for model.max_length (chat.py)
            raise InputError(str(exc), param="messages", code="context_length_exceeded") from None
        if dropped:
            job.sink(("notice", f"(history trimmed: the {dropped} oldest exchange(s) dropped to fit "
                                f"model.max_length={self.max_length}"
                                + ("; the picture is kept)" if feats is not None else ")")))

        def on_text(delta: str) -> None:
            if job.cancelled.is_set():
                raise Cancelled
            if job.first_text is None:
                job.first_text = time.perf_counter()
                if self.metrics is not None:
                    self.metrics.ttft.observe(job.first_text - job.arrived)
            job.sink(("text", delta))

        streamer = _Streamer(self.tokenizer, _HoldTrailingSpace(on_text))
        streamer.next_tokens_are_prompt = False  # the prompt goes in as embeddings: every token is new
        seed = self.image_seed if req.seed is None else int(req.seed)
        sample = {
            "id": f"request-{job.id}",
            "kind": "conversation",
            "conversations": list(session.turns),
            "features": feats if any(IMAGE_MARKER in t["value"] for t in session.turns) else None,
        }
        return sample, _Answer(job, streamer, seed, 0, dropped)

    def features(self, pictures: list[torch.Tensor]) -> list[torch.Tensor]:
        """BiDiffuser i2t features of pictures ([3, S, S] each), as ChatSession.ask computes them: the
        pictures not seen lately in one batch (with the sampler's shared noise a picture's features do not
        depend on its batch; without it, one call each), kept for the next turns (a stateless API client
        sends its picture again with every question)."""
        keys = [hashlib.sha256(p.numpy().tobytes()).hexdigest() for p in pictures]
        missing = {}
        for key, pixels in zip(keys, pictures):
            if key not in self._features and key not in missing:
                missing[key] = pixels
        computed = {}
        if missing:
            stack = torch.stack(list(missing.values())).to(self.bidiffuser.device)
            with torch.no_grad():
                if self.bidiffuser.shared_noise:
                    feats = self.bidiffuser.i2t_features(stack).float().cpu()
                else:
                    feats = torch.cat([self.bidiffuser.i2t_features(p[None]) for p in stack]).float().cpu()
            computed = dict(zip(missing, feats))
        out = []
        for key in keys:
            if key in computed:
                out.append(computed[key])
            else:
                self._features.move_to_end(key)
                out.append(self._features[key])
        if self._feature_cache > 0:
            for key, feats in computed.items():
                self._features[key] = feats
            while len(self._features) > self._feature_cache:
                self._features.popitem(last=False)
        return out

    # ------------------------------------------------------------------ endings and drawings

    def _finish(self, answers: list[_Answer], draws: list[Job]) -> None:
        """Draw every picture asked for (the answers' <Img> descriptions, the drawing requests), then end
        the jobs."""
        items: list[tuple[str, int]] = []
        for a in answers:
            items += [(d, a.seed) for d in a.descriptions]
        for job in draws:
            req: DrawRequest = job.request
            base = self.image_seed if req.seed is None else int(req.seed)
            items += [(p, base + i) for i, p in enumerate(req.prompts)]  # one seed each: n pictures differ
        try:
            paths = self.draw(items)
        except Exception as exc:  # noqa: BLE001 - reported to the jobs that asked for pictures
            for job in [a.job for a in answers if a.descriptions] + draws:
                self._end(job, "error", exc)
            answers = [a for a in answers if not a.descriptions]
            draws, paths = [], []
        made = [Picture(path, d, seed) for path, (d, seed) in zip(paths, items)]
        for a in answers:
            pictures, made = made[:len(a.descriptions)], made[len(a.descriptions):]
            if pictures:
                a.job.sink(("pictures", pictures))
            row = a.row
            self._end(a.job, "done", Result(
                answer=a.answer,
                pictures=pictures,
                prompt_tokens=a.prompt_tokens,
                completion_tokens=len(row.tokens),
                finish_reason=row.finish_reason,
                dropped=a.dropped,
                seconds=time.perf_counter() - a.job.arrived,
            ))
        for job in draws:
            pictures, made = made[:len(job.request.prompts)], made[len(job.request.prompts):]
            job.sink(("pictures", pictures))
            self._end(job, "done", Result(answer="", pictures=pictures,
                                          seconds=time.perf_counter() - job.arrived))

    def draw(self, items: list[tuple[str, int]]) -> list[Path]:
        """BiDiffuser text-to-image for (description, seed) pairs, saved as PNGs in the pictures folder: one
        batch per seed (with the sampler's shared noise a picture does not depend on its batch; without
        it, one call each)."""
        if not items:
            return []
        self.pictures_dir.mkdir(parents=True, exist_ok=True)
        images: dict[int, Image.Image] = {}
        groups: dict[int, list[int]] = {}
        for i, (_, seed) in enumerate(items):
            groups.setdefault(seed if self.bidiffuser.shared_noise else -1 - i, []).append(i)
        for indices in groups.values():
            seed = items[indices[0]][1]
            for i, img in zip(indices, self.bidiffuser.generate([items[i][0] for i in indices], seed=seed)):
                images[i] = img
        paths = []
        for i in range(len(items)):
            path = self.pictures_dir / f"picture_{uuid.uuid4().hex[:12]}.png"
            images[i].save(path, format="PNG")
            paths.append(path)
            self._kept.append(path)
        while len(self._kept) > self._keep_pictures:  # the folder's bound, whoever still holds a picture
            self._kept.popleft().unlink(missing_ok=True)
        if self.metrics is not None:
            self.metrics.pictures.inc(len(paths))
        return paths
