"""Chat with pictures (SPEC §4): a conversation about an image, answered by the LLM through the
projector, and pictures drawn by BiDiffuser text-to-image whenever the model answers with
`<Img>description</Img>`.

`ChatSession` is plain PyTorch; the terminal front end is `python run.py stage=chat` (or
`python -m easygen.chat` with the same `key=value` options), which builds the models from config.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from easygen.images import load_image_file
from easygen.templates import IMAGE_MARKER

IMG_TAG = re.compile(r"<Img>(.+?)</Img>", re.DOTALL)


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

    def reset(self) -> None:
        self.turns, self.features = [], None

    def ask(
        self,
        text: str,
        image: str | Path | torch.Tensor | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> tuple[str, list[Path]]:
        if not text.strip():
            raise ValueError("empty message")
        if image is not None:
            if self.features is not None:
                self.reset()  # one picture per conversation: a new picture starts a new one
            pixels = image if isinstance(image, torch.Tensor) else load_image_file(image, self.image_size)
            with torch.no_grad():
                self.features = (
                    self.bidiffuser.i2t_features(pixels[None].to(self.bidiffuser.device))[0].float().cpu()
                )
            text = f"{IMAGE_MARKER} {text}"
        self.turns.append({"from": "human", "value": text})
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
        answer = self.model.generate(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            features=feats,
            image_positions=batch["image_positions"].to(device),
            has_image=batch["has_image"].to(device),
            streamer=streamer,
            **self.gen,
        )[0]
        self.turns.append({"from": "gpt", "value": answer})
        return answer, self.draw(answer)

    def draw(self, answer: str) -> list[Path]:
        """Every `<Img>description</Img>` in an answer becomes a picture saved in `out_dir`."""
        descriptions = [d.strip() for d in IMG_TAG.findall(answer) if d.strip()]
        if not descriptions:
            return []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for img in self.bidiffuser.generate(descriptions):
            self.n_pictures += 1
            path = self.out_dir / f"picture_{self.n_pictures:03d}.png"
            img.save(path)
            paths.append(path)
        return paths


class _Streamer:
    """Prints text as tokens arrive (transformers' streamer protocol: put / end)."""

    def __init__(self, tokenizer, on_text):
        self.tok, self.on_text, self.ids, self.shown = tokenizer, on_text, [], 0

    def put(self, value):
        self.ids += value.reshape(-1).tolist()
        # the answer's first token carries its leading space ("ASSISTANT: a ..."); the prompt already has one
        text = self.tok.decode(self.ids, skip_special_tokens=True).lstrip()
        if len(text) > self.shown:
            self.on_text(text[self.shown :])
            self.shown = len(text)

    def end(self):
        self.on_text("\n")


def repl(session: ChatSession, stdin=sys.stdin, stdout=sys.stdout, transcript: Path | None = None) -> None:
    """The terminal loop. `/image PATH` attaches a picture to the next question, `/reset`, `/quit`."""
    pending_image = None
    log = []
    stdout.write("EasyGen chat. /image PATH attaches a picture, /reset starts over, /quit ends.\n")
    while True:
        stdout.write("USER: ")
        stdout.flush()
        line = stdin.readline()
        if line and not stdin.isatty():
            stdout.write(line if line.endswith("\n") else line + "\n")  # a script's lines show in the log
        if not line or line.strip() == "/quit":
            stdout.write("" if line else "\n")
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/image "):
            pending_image = line.split(" ", 1)[1].strip()
            stdout.write(f"(picture {pending_image} attached to the next question)\n")
            continue
        if line == "/reset":
            session.reset()
            continue
        stdout.write("ASSISTANT: ")
        try:
            answer, pics = session.ask(
                line, image=pending_image, on_text=lambda t: (stdout.write(t), stdout.flush())
            )
        except (FileNotFoundError, ValueError) as e:
            stdout.write(f"\n[error] {e}\n")
            continue
        pending_image = None
        for p in pics:
            stdout.write(f"[picture saved to {p}]\n")
        log.append({"user": line, "assistant": answer, "pictures": [str(p) for p in pics]})
    if transcript is not None:
        import json

        transcript.parent.mkdir(parents=True, exist_ok=True)
        transcript.write_text(json.dumps(log, indent=2))


def main(argv: list[str] | None = None) -> None:
    """`python -m easygen.chat key=value ...` = `python run.py stage=chat key=value ...`; `--prompt TEXT` and
    `--image PATH` are `stage.prompt` / `stage.image` (one answer, for scripts)."""
    import argparse
    import runpy

    parser = argparse.ArgumentParser(prog="python -m easygen.chat", description=__doc__)
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
