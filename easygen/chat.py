"""Chat with pictures: a conversation about an image, answered by the LLM through the
projector, and pictures drawn by BiDiffuser text-to-image whenever the model answers with
`<Img>description</Img>`.

`ChatSession` is plain PyTorch; the terminal front end is `python run.py stage=chat` (or
`python -m easygen.chat` with the same `key=value` options), which builds the models from config.
"""

from __future__ import annotations

import argparse
import json
import re
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TextStreamer

from easygen.images import ImageFileError, load_image_file
from easygen.llm.templates import IMAGE_MARKER, encode, render

IMG_TAG = re.compile(r"<Img>(.+?)</Img>", re.DOTALL)

COMMANDS = (
    ("/image PATH", "attach a picture to the next question (a new picture starts a new conversation)"),
    ("/draw PROMPT", "draw a picture from PROMPT with BiDiffuser text-to-image; prints where it is saved"),
    ("/reset", "forget the conversation and its picture"),
    ("/help", "list these commands"),
    ("/quit", "end the chat (so do Ctrl-D and Ctrl-C)"),
)
COMMAND_HELP = "\n".join(f"  {name:14s}{what}" for name, what in COMMANDS)


class ChatSession:
    """One conversation: `ask(text, image=None)` returns the answer and the paths of pictures drawn."""

    def __init__(
        self,
        model,
        bidiffuser,
        collator,
        out_dir: str | Path,
        image_size: int,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        num_beams: int = 1,
    ):
        self.model, self.bidiffuser, self.collator = model, bidiffuser, collator
        self.out_dir = Path(out_dir)
        self.image_size = image_size
        self.gen = dict(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=max(temperature, 1e-5),
            top_p=top_p,
            num_beams=num_beams,
        )
        self.turns: list[dict] = []
        self.features: torch.Tensor | None = None
        self.n_pictures = 0
        self.dropped = 0  # exchanges dropped from the front of the history by the last `ask`

    def reset(self) -> None:
        self.turns, self.features = [], None

    def prompt_tokens(self, turns: list[dict]) -> int:
        """Tokens of the generation prompt for `turns` (rendered as the eval collator renders them)."""
        c = self.collator
        has_marker = any(IMAGE_MARKER in t["value"] for t in turns)
        n_img = c.num_image_tokens
        if has_marker and self.features is not None and c.image_tokens_from_features:
            n_img = self.features.shape[0]
        rendered = render(
            c.template,
            turns,
            n_img if has_marker else 0,
            bos=c.bos,
            eos=c.eos,
            prompt_only=True,
            sample_id="chat",
        )
        from transformers.utils import logging as hf_logging

        # a history longer than the tokenizer's model_max_length is expected here (it is trimmed next)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return len(encode(c.tokenizer, rendered, placeholder_id=c.pad_id, sample_id="chat").input_ids)
        finally:
            hf_logging.set_verbosity(verbosity)

    def _fit_history(self) -> int:
        """Drop the oldest (question, answer) pairs until the prompt fits the collator's max_length; the
        picture stays (its marker moves to the oldest question kept). Returns the pairs dropped; a question
        too long to fit alone is a ValueError and leaves the history as it was."""
        limit = self.collator.max_length
        turns, dropped = list(self.turns), 0
        while len(turns) > 1 and self.prompt_tokens(turns) > limit:
            had_picture = IMAGE_MARKER in turns[0]["value"]
            del turns[:2]
            dropped += 1
            if had_picture:
                turns[0] = {"from": "human", "value": f"{IMAGE_MARKER} {turns[0]['value']}"}
        n = self.prompt_tokens(turns)
        if n > limit:
            raise ValueError(
                f"the message is too long: its prompt has {n} tokens > model.max_length={limit} "
                "(shorten it, or raise model.max_length)"
            )
        self.turns[:] = turns
        return dropped

    def ask(
        self,
        text: str,
        image: str | Path | torch.Tensor | None = None,
        on_text: Callable[[str], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
        features: torch.Tensor | None = None,
    ) -> tuple[str, list[Path]]:
        """Answer `text` (about `image`, a file or a [3, H, W] tensor, when given; or about a picture's
        BiDiffuser `features` [L, D], as stage=extract writes them). `on_text` receives the answer as it
        streams; `on_notice` a line when older turns were dropped to fit the context."""
        if not text.strip():
            raise ValueError("empty message")
        if image is not None and features is not None:
            raise ValueError("give a picture or its features, not both")
        if image is not None:
            if self.bidiffuser is None:
                raise ValueError("no BiDiffuser in this chat (it answers about given features): no pictures")
            # decoded first: a bad file leaves the conversation as it was
            pixels = image if isinstance(image, torch.Tensor) else load_image_file(image, self.image_size)
            with torch.no_grad():
                features = self.bidiffuser.i2t_features(pixels[None].to(self.bidiffuser.device))[0]
        if features is not None:
            if self.features is not None:
                self.reset()  # one picture per conversation: a new picture starts a new one
            self.features = features.float().cpu()
            text = f"{IMAGE_MARKER} {text}"
        self.turns.append({"from": "human", "value": text})
        try:
            self.dropped = self._fit_history()
            if self.dropped and on_notice is not None:
                on_notice(
                    f"(history trimmed: the {self.dropped} oldest exchange(s) dropped to fit "
                    f"model.max_length={self.collator.max_length}"
                    + ("; the picture is kept)" if self.features is not None else ")")
                )
            answer = self._answer(on_text)
        except BaseException:
            self.turns.pop()  # a failed or interrupted question leaves no trace in the history
            raise
        self.turns.append({"from": "gpt", "value": answer})
        return answer, self.draw(answer)

    def _answer(self, on_text) -> str:
        sample = {
            "id": "chat",
            "kind": "conversation",
            "conversations": list(self.turns),
            "features": self.features if any(IMAGE_MARKER in t["value"] for t in self.turns) else None,
        }
        batch = self.collator([sample])
        device = next(self.model.parameters()).device
        feats = batch["features"].to(device) if batch["features"] is not None else None
        streamer = _Streamer(self.collator.tokenizer, on_text) if on_text else None
        return self.model.generate(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            features=feats,
            image_positions=batch["image_positions"].to(device),
            has_image=batch["has_image"].to(device),
            streamer=streamer,
            **self.gen,
        )[0]

    def draw(self, answer: str) -> list[Path]:
        """Every `<Img>description</Img>` in an answer becomes a picture saved in `out_dir`."""
        return self.draw_prompts([d.strip() for d in IMG_TAG.findall(answer) if d.strip()])

    def draw_prompts(self, descriptions: list[str]) -> list[Path]:
        """BiDiffuser text-to-image for each description (what `/draw PROMPT` asks for), saved in `out_dir`."""
        if not descriptions:
            return []
        if self.bidiffuser is None:
            raise ValueError("no BiDiffuser in this chat (it answers about given features): no drawing")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for img in self.bidiffuser.generate(descriptions):
            self.n_pictures += 1
            path = self.out_dir / f"picture_{self.n_pictures:03d}.png"
            img.save(path)
            paths.append(path)
        return paths


class _Streamer(TextStreamer):
    """transformers' ``TextStreamer`` (which decodes the tokens as they arrive and hands on whole words)
    sending its text to ``on_text`` instead of stdout."""

    def __init__(self, tokenizer, on_text):
        # skip_prompt: generate first puts the prompt's ids (none here: the prompt goes in as embeddings)
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text, self.started = on_text, False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.started:
            # the answer's first token carries its leading space ("ASSISTANT: a ..."); the prompt has one
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.on_text(text)
        if stream_end:
            self.on_text("\n")


class _AnswerPrinter:
    """Streams an answer after `ASSISTANT: `, written with its first text (notices come before it)."""

    def __init__(self, stdout):
        self.stdout, self.started = stdout, False

    def __call__(self, text: str) -> None:
        if not self.started:
            self.started = True
            self.stdout.write("ASSISTANT: ")
        self.stdout.write(text)
        self.stdout.flush()


class _Repl:
    """The terminal loop's state (the picture waiting for the next question, the transcript, the errors
    shown) and one method per command."""

    def __init__(self, session: ChatSession, stdout, features: torch.Tensor | None = None) -> None:
        self.session, self.stdout = session, stdout
        self.pending_image, self.pending_path = None, None
        self.pending_features = features  # given features: the first question is about them
        self.log: list[dict] = []
        self.errors: list[str] = []

    def say(self, text: str) -> None:
        self.stdout.write(text)

    def error(self, message: str) -> None:
        self.say(f"[error] {message}\n")
        self.errors.append(message)

    def handle(self, line: str) -> None:
        command, _, arg = line.partition(" ")
        handler = {"/help": self.help, "/image": self.image, "/reset": self.reset, "/draw": self.draw}.get(command)
        if handler is not None:
            handler(arg.strip())
        elif command.startswith("/") and command[1:].isalpha():
            self.error(f"unknown command {command}; /help lists the commands")
        else:
            self.ask(line)

    def help(self, _arg: str) -> None:
        self.say("Commands:\n" + COMMAND_HELP + "\nAnything else is a question for the assistant.\n")

    def image(self, arg: str) -> None:
        if not arg:
            return self.error("/image needs a path: /image PATH")
        try:
            self.pending_image = load_image_file(arg, self.session.image_size)
        except (FileNotFoundError, ImageFileError) as e:
            return self.error(f"{e}; no picture attached")
        self.pending_path = arg
        self.say(f"(picture {arg} attached to the next question)\n")

    def reset(self, _arg: str) -> None:
        self.session.reset()
        self.pending_image, self.pending_path = None, None
        self.say("(conversation reset: history and picture forgotten)\n")

    def draw(self, arg: str) -> None:
        if not arg:
            return self.error("/draw needs a description: /draw PROMPT")
        try:
            pics = self.session.draw_prompts([arg])
        except KeyboardInterrupt:
            return self.say("\n(drawing interrupted)\n")
        except ValueError as e:
            return self.error(str(e))
        for p in pics:
            self.say(f"[picture saved to {p}]\n")
        self.log.append({"user": f"/draw {arg}", "draw": arg, "pictures": [str(p) for p in pics]})

    def ask(self, line: str) -> None:
        stream = _AnswerPrinter(self.stdout)
        try:
            answer, pics = self.session.ask(line, image=self.pending_image, on_text=stream,
                                            on_notice=lambda notice: self.say(notice + "\n"),
                                            features=self.pending_features)
        except KeyboardInterrupt:
            return self.say("\n(answer interrupted)\n")
        except (FileNotFoundError, ValueError) as e:
            self.say("\n" if stream.started else "")
            return self.error(str(e))
        entry = {"user": line, "assistant": answer, "pictures": [str(p) for p in pics]}
        if self.pending_path is not None:
            entry["image"] = self.pending_path
        self.pending_image, self.pending_path, self.pending_features = None, None, None
        for p in pics:
            self.say(f"[picture saved to {p}]\n")
        self.log.append(entry)


def repl(
    session: ChatSession, stdin=sys.stdin, stdout=sys.stdout, transcript: Path | None = None,
    features: torch.Tensor | None = None,
) -> list[str]:
    """The terminal loop; the commands are `COMMANDS`. Returns the errors shown (a bad picture, a message
    too long, an unknown command); the conversation goes on after each. `features` (a picture's BiDiffuser
    features) go with the first question."""
    state = _Repl(session, stdout, features)
    state.say("EasyGen chat. /image PATH attaches a picture, /draw PROMPT draws one, /help lists the commands.\n")
    while True:
        try:  # Ctrl-C while the prompt is being written counts as at the prompt too
            state.say("USER: ")
            stdout.flush()
            line = stdin.readline()
        except KeyboardInterrupt:
            state.say("\n(chat ended)\n")
            break
        if line and not stdin.isatty():
            state.say(line if line.endswith("\n") else line + "\n")  # a script's lines show in the log
        if not line or line.strip() == "/quit":
            state.say("\n(chat ended)\n" if not line else "(chat ended)\n")
            break
        if line.strip():
            state.handle(line.strip())
    if transcript is not None:
        transcript.parent.mkdir(parents=True, exist_ok=True)
        transcript.write_text(json.dumps(state.log, indent=2))
    return state.errors


def main(argv: list[str] | None = None) -> None:
    """`python -m easygen.chat key=value ...` = `python run.py stage=chat key=value ...`; `--prompt TEXT` and
    `--image PATH` are `stage.prompt` / `stage.image` (one answer, for scripts)."""
    parser = argparse.ArgumentParser(
        prog="python -m easygen.chat",
        description=__doc__,
        epilog="Commands at the USER: prompt:\n" + COMMAND_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prompt", help="one question, answered once (stage.prompt)")
    parser.add_argument("--image", help="a picture for that question (stage.image)")
    parser.add_argument(
        "--script", help="a file of user lines, `/image PATH` attaching pictures (stage.script)"
    )
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.image and not args.prompt:
        parser.error("--image needs --prompt")
    for key in ("prompt", "image", "script"):
        value = getattr(args, key)
        if value is not None:
            # quoted so that Hydra's override grammar keeps spaces, commas and brackets as text
            escaped = value.replace("'", "\\'")
            overrides.append(f"stage.{key}='{escaped}'")
    root = Path(__file__).resolve().parents[1]
    sys.argv = [str(root / "run.py"), "stage=chat", *overrides]
    runpy.run_path(str(root / "run.py"), run_name="__main__")


if __name__ == "__main__":
    main()
