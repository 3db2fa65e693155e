"""`stage=chat`: the terminal conversation (or `stage.prompt=... [stage.image=...]` for one answer, or
`stage.script=FILE` with one user line a row, `/image PATH` lines attaching pictures)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import torch


def build_session(cfg):
    from easygen.chat import ChatSession
    from lit_modules.builders import is_t5
    from lit_modules.easygen_module import EasyGenModule
    from lit_modules.errors import ConfigError
    from lit_modules.runner import container, output_dir

    plain = container(cfg)
    if is_t5(plain):
        raise ConfigError(
            "stage=chat streams from a decoder-only LLM; model.llm.preset=t5|tiny-t5 is not supported"
        )
    plain["stage"]["feature_source"] = "on_the_fly"
    torch.manual_seed(int(cfg.seed))
    module = EasyGenModule(plain)
    module.configure_model()
    module.eval()
    s = cfg.stage
    return ChatSession(
        module.model,
        module.bidiffuser,
        module.eval_collator,
        output_dir(cfg) / "pictures",
        image_size=int(cfg.model.image_size),
        max_new_tokens=int(s.max_new_tokens),
        temperature=float(s.temperature),
        top_p=float(s.top_p),
        num_beams=int(s.num_beams),
    )


def chat_stage(cfg) -> dict:
    from easygen.chat import repl
    from lit_modules.errors import ConfigError
    from lit_modules.runner import output_dir

    s = cfg.stage
    if s.get("image") and not Path(str(s.image)).is_file():
        raise ConfigError(f"stage.image={s.image} does not exist: set stage.image to a picture file")
    if s.get("script") and not Path(str(s.script)).is_file():
        raise ConfigError(f"stage.script={s.script} does not exist: set stage.script to a text file")
    session = build_session(cfg)
    out = output_dir(cfg)
    transcript = out / "transcript.json"
    if s.get("prompt"):
        stdin = io.StringIO((f"/image {s.image}\n" if s.get("image") else "") + f"{s.prompt}\n")
    elif s.get("script"):
        stdin = io.StringIO(Path(str(s.script)).read_text())
    else:
        stdin = sys.stdin
    repl(session, stdin=stdin, stdout=sys.stdout, transcript=transcript)
    return {
        "global_step": 0,
        "metrics": {},
        "best": {},
        "checkpoints": {},
        "artifacts": {"transcript": str(transcript), "pictures": str(out / "pictures")},
    }
