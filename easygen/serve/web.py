"""The web demo: a Gradio Blocks app mounted on the API's FastAPI app (one process, one model).

Attach (upload or paste) a picture and ask about it; the answer streams in. The picture stays in context
for the next questions (a new picture starts a new conversation, as in the terminal chat, easygen/chat.py).
When the model answers with `<Img>description</Img>` (EasyGen's text-to-image path, paper section 3) the
picture BiDiffuser draws appears in the conversation; the Draw button draws the typed description
directly. Examples come with pictures drawn like the synthetic set's (data_modules/synthetic.py).

Web users' answers join the engine's running batch as the API's do (stage.max_batch events at a time);
when the engine's line is full (stage.max_queue) the demo says the server is busy. With an API key
(stage.api_key / EASYGEN_API_KEY) the demo asks for it once per browser session (Gradio's login page: the
key is the password; a session cookie keeps it).
"""

from __future__ import annotations

import hmac
import html
import queue
import random
from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from data_modules.synthetic import captions_for, draw
from easygen.serve.engine import (
    ChatRequest,
    DrawRequest,
    Engine,
    InputError,
    QueueFull,
    check_text,
    decode_picture,
)
from easygen.serve.settings import ServeSettings

EXAMPLES = (  # (picture attributes or None, prompt)
    ({"shape": "circle", "colour": "red", "background": "black", "size": "large", "position": "left"},
     "Describe the image concisely."),
    ({"shape": "square", "colour": "blue", "background": "white", "size": "large", "position": "top"},
     "What colour is the shape?"),
    ({"shape": "triangle", "colour": "yellow", "background": "gray", "size": "small", "position": "center"},
     "Draw a picture like this one."),
    (None, "Draw a large green cross at the bottom on a white background."),
)
EXAMPLE_SIZE = 192  # pixels: drawn large enough to see, resized to model.image_size like any upload
CSS = """
#easygen-chat .message img { image-rendering: pixelated; width: 128px !important; height: 128px !important;
                              object-fit: contain !important; max-width: none !important; }
"""


def example_pictures(folder: Path) -> list[dict]:
    """The examples' pictures, drawn procedurally into `folder` (no binary files in the repository)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for i, (attributes, prompt) in enumerate(EXAMPLES):
        files = []
        if attributes is not None:
            path = folder / f"example_{i}_{attributes['colour']}_{attributes['shape']}.png"
            draw(attributes, EXAMPLE_SIZE, rng).save(path, format="PNG")
            files.append(str(path))
        rows.append({"text": prompt, "files": files, "caption": captions_for(attributes)[0] if attributes else None})
    return rows


def _shown(text: str) -> str:
    """Text as the chat shows it: `<Img>...</Img>` and other tags as typed, not as HTML."""
    return html.escape(text, quote=False)


def _new_state() -> dict:
    # pairs: the (question, answer) exchanges since the picture; starts: where each starts in `display`
    return {"display": [], "pairs": [], "starts": [], "picture": None, "pixels": None}


def _file_path(f) -> str:
    return f.get("path") if isinstance(f, dict) else str(f)


def build_demo(engine: Engine, settings: ServeSettings, tmp_dir: Path) -> gr.Blocks:
    examples = example_pictures(tmp_dir / "examples")

    def wait(job, q):
        """The job's events until it ends; a closed page (GeneratorExit) cancels the job."""
        done = False
        try:
            while True:
                event = q.get()
                yield event
                if event[0] in ("done", "error", "cancelled"):
                    done = True
                    return
        finally:
            if not done:
                job.cancel()

    def refuse(message: str, title: str = "Not sent") -> None:
        """A toast; the event ends normally, so the conversation stays on screen (gr.Error would cover
        every output with an error badge)."""
        gr.Warning(message, duration=15, title=title)

    def outputs(state, text_value=None, keep_box=False):
        """The outputs of every event: chat, message box (emptied, `text_value` put back, or as it is),
        state, picture."""
        if keep_box:
            box = gr.update()
        else:
            box = gr.update(value=None) if text_value is None else gr.update(value={"text": text_value, "files": []})
        return state["display"], box, state, state["picture"]

    def answer(state, question, temperature, max_new_tokens, seed):
        display = state["display"]
        start = len(display)
        display.append({"role": "user", "content": _shown(question)})
        display.append({"role": "assistant", "content": ""})
        yield outputs(state)
        request = ChatRequest(
            question=question,
            history=list(state["pairs"]),
            image=state["pixels"],
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_p=settings.top_p,
            seed=None if seed is None else int(seed),
        )
        q: queue.Queue = queue.Queue()
        try:
            job = engine.submit(request, q.put)
        except QueueFull as e:
            del display[start:]
            refuse(str(e), title="Busy")
            yield outputs(state, text_value=question)
            return
        text = ""
        for kind, value in wait(job, q):
            if kind == "text":
                text += value
                display[start + 1]["content"] = _shown(text)
                yield outputs(state)
            elif kind == "notice":
                gr.Info(value)
            elif kind == "pictures":
                for p in value:
                    display.append({"role": "assistant", "content": {"path": str(p.path), "alt_text": p.prompt}})
            elif kind == "error":
                del display[start:]
                if isinstance(value, InputError):
                    refuse(value.message)
                else:
                    refuse(f"{type(value).__name__}: {value}", title="Error")
                yield outputs(state, text_value=question)
                return
            elif kind == "done":
                result = value
                display[start + 1]["content"] = _shown(result.answer) or "(an empty answer)"
                # older exchanges ChatSession dropped to fit model.max_length are gone from the context too
                for _ in range(min(result.dropped, len(state["pairs"]))):
                    state["pairs"].pop(0)
                    state["starts"].pop(0)
                state["pairs"].append((question, result.answer))
                state["starts"].append(start)
                yield outputs(state)

    def respond(message, state, temperature, max_new_tokens, seed):
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [_file_path(f) for f in message.get("files") or []]
        problem = None
        if len(files) > 1:
            problem = "Attach one picture at a time."
        elif not files and not text:
            problem = "The message is empty: type a question (or attach a picture)."
        try:
            if text and problem is None:
                check_text(text, "the message")
            if files and problem is None:
                path = Path(files[0])
                pixels = decode_picture(path.read_bytes(), path.name, settings.image_size, settings.max_image_pixels)
        except InputError as e:
            problem = e.message
        if problem is not None:
            refuse(problem)
            yield outputs(state, text_value=text)  # the text stays in the box; the file goes
            return
        if files:
            # one picture per conversation (easygen/chat.py): the new picture starts a new one
            state["pairs"], state["starts"] = [], []
            state["picture"], state["pixels"] = str(path), pixels
            state["display"].append({"role": "user", "content": {"path": str(path), "alt_text": path.name}})
        if not text:
            yield outputs(state)
            return
        yield from answer(state, text, temperature, max_new_tokens, seed)

    def draw_picture(message, state, seed):
        text = ((message or {}).get("text") or "").strip()
        if not text or len(text) > settings.max_prompt_chars:
            refuse("Type a description in the message box, then press Draw." if not text else
                   f"The description has {len(text)} characters, over the limit of {settings.max_prompt_chars}.")
            yield outputs(state, text_value=text)
            return
        display = state["display"]
        start = len(display)
        display.append({"role": "user", "content": "Draw: " + _shown(text)})
        display.append({"role": "assistant", "content": "(drawing…)"})
        yield outputs(state)
        q: queue.Queue = queue.Queue()
        try:
            job = engine.submit(DrawRequest([text], seed=None if seed is None else int(seed)), q.put)
        except QueueFull as e:
            del display[start:]
            refuse(str(e), title="Busy")
            yield outputs(state, text_value=text)
            return
        for kind, value in wait(job, q):
            if kind == "pictures":
                display[start + 1] = {"role": "assistant", "content": {"path": str(value[0].path), "alt_text": text}}
            elif kind == "error":
                del display[start:]
                refuse(f"{type(value).__name__}: {value}", title="Error")
                yield outputs(state, text_value=text)
                return
        yield outputs(state)

    def regenerate(state, temperature, max_new_tokens, seed):
        if not state["pairs"]:
            refuse("Nothing to regenerate yet: ask a question first.")
            yield outputs(state, keep_box=True)
            return
        question, _ = state["pairs"].pop()
        start = state["starts"].pop()
        del state["display"][start:]
        yield from answer(state, question, temperature, max_new_tokens, seed)

    def clear():
        state = _new_state()
        return state["display"], gr.update(value=None), state, None

    with gr.Blocks(title="EasyGen", analytics_enabled=False) as demo:
        gr.Markdown(
            "## EasyGen: chat about a picture, and get pictures from the chat\n"
            "Attach a picture (upload, or paste it in the message box) and ask about it; ask for a picture "
            "and BiDiffuser draws it, or type a description and press **Draw**. "
            f"Model `{settings.model_id}`; API at `/v1` (OpenAI-compatible)."
            + ("\n\n*This model has untrained weights: its answers are noise.*" if settings.untrained else "")
        )
        state = gr.State(_new_state())
        with gr.Row():
            with gr.Column(scale=3):
                # plain text (escaped by _shown): the model's words and tags as they are, no markdown
                chatbot = gr.Chatbot(elem_id="easygen-chat", label="Conversation", height=420, render_markdown=False,
                                     feedback_options=None, placeholder="Attach a picture and ask about it.")
                box = gr.MultimodalTextbox(
                    elem_id="easygen-message",
                    sources=["upload"],
                    file_count="single",
                    placeholder="Ask about the picture, or ask for one…",
                    show_label=False,
                    max_plain_text_length=100000,
                )
                with gr.Row():
                    draw_btn = gr.Button("Draw", elem_id="easygen-draw", variant="secondary")
                    regen_btn = gr.Button("Regenerate", elem_id="easygen-regenerate")
                    clear_btn = gr.Button("Clear", elem_id="easygen-clear")
            with gr.Column(scale=1):
                picture = gr.Image(label="Picture in context", interactive=False, elem_id="easygen-picture",
                                   height=192, type="filepath")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0.0, 2.0, value=settings.temperature, step=0.05, label="Temperature")
                    max_new = gr.Slider(1, settings.max_new_tokens_limit, value=settings.max_new_tokens, step=1,
                                        label="Max new tokens")
                    seed = gr.Number(value=settings.image_seed, precision=0, label="Image seed")
        gr.Examples(examples=[[{"text": e["text"], "files": e["files"]}] for e in examples], inputs=[box],
                    label="Examples", cache_examples=False)

        common = dict(concurrency_limit=settings.max_batch, concurrency_id="model")
        outs = [chatbot, box, state, picture]
        box.submit(respond, [box, state, temperature, max_new, seed], outs, **common)
        draw_btn.click(draw_picture, [box, state, seed], outs, **common)
        regen_btn.click(regenerate, [state, temperature, max_new, seed], outs, **common)
        clear_btn.click(clear, None, outs)
        chatbot.clear(clear, None, outs)  # the chat's own trash button forgets the context too
    return demo


def mount_web(app: FastAPI, engine: Engine, settings: ServeSettings, tmp_dir: Path) -> FastAPI:
    demo = build_demo(engine, settings, tmp_dir)
    demo.queue(max_size=settings.max_queue + settings.max_batch, default_concurrency_limit=settings.max_batch)
    # system fonts only: nothing is fetched from the network
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    key = settings.api_key
    auth = {}
    if key is not None:
        auth = dict(
            auth=lambda _user, password: hmac.compare_digest(str(password).encode(), key.encode()),
            auth_message="This server wants its API key: type it as the password (any user name).",
        )
    return gr.mount_gradio_app(
        app,
        demo,
        path="/",
        allowed_paths=[str(tmp_dir)],
        ssr_mode=False,
        show_error=True,
        max_file_size=settings.max_request_bytes,
        theme=theme,
        css=CSS,
        footer_links=[],
        **auth,
    )
