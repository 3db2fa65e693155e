"""`stage=chat`: the terminal conversation (or `stage.prompt=... [stage.image=...]` for one answer, or
`stage.script=FILE` with one user line a row; `stage.features=FILE.npy` asks about a picture's extracted
BiDiffuser features instead of a picture, with no BiDiffuser built). Commands at the prompt: `easygen.chat.COMMANDS`
(`/image PATH`, `/draw PROMPT`, `/reset`, `/help`, `/quit`)."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from easygen.chat import ChatSession, repl
from easygen.errors import ConfigError
from easygen.factories import is_t5
from easygen.images import ImageFileError, load_image_file
from easygen.lit.easygen_module import EasyGenModule
from easygen.stages.common import container, output_dir

log = logging.getLogger("easygen")

_STATS_WARNING = "no fitted statistics in init_from"


class _DropStatsWarning(logging.Filter):
    """Without init_from there are no fitted projector statistics to miss: the untrained-weights warning
    says what matters, so the standardiser's warning (easygen/lit/easygen_module.py) is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _STATS_WARNING not in record.getMessage()


def untrained_warning(plain: dict) -> str:
    preset = plain["model"]["llm"].get("preset")
    what = "the LLM and the projector" if preset in ("tiny", "llama7b-random") else "the projector"
    return (
        f"stage=chat without init_from: {what} have untrained random weights, so the answers are noise. "
        "Pass init_from=RUN/easygen/trained.safetensors (or a .ckpt) written by stage=pretrain/instruct, "
        "or chat with an export: python run.py --config-dir EXPORT +export=easygen stage=chat"
    )


def read_features(cfg) -> torch.Tensor:
    """`stage.features`: one picture's BiDiffuser features, a `[model.num_image_tokens, model.feature_dim]`
    float array in a .npy file (what stage=extract writes per sample)."""
    path = Path(str(cfg.stage.features))
    want = (int(cfg.model.num_image_tokens), int(cfg.model.feature_dim))
    if not path.is_file():
        raise ConfigError(f"stage.features={path} does not exist: set it to a .npy file of shape {list(want)}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError(f"stage.features={path} is not a .npy array ({e})") from None
    if array.dtype.kind != "f" or tuple(array.shape) != want:
        raise ConfigError(
            f"stage.features={path}: a {array.dtype} array of shape {list(array.shape)}; expected float {list(want)} "
            "(model.num_image_tokens x model.feature_dim)"
        )
    if not np.isfinite(array).all():
        raise ConfigError(f"stage.features={path}: holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def build_session(cfg):
    plain = container(cfg)
    if is_t5(plain):
        raise ConfigError(
            "stage=chat streams from a decoder-only LLM; model.llm.preset=t5|tiny-t5 is not supported"
        )
    # given features need no BiDiffuser: the LLM side alone answers
    plain["stage"]["feature_source"] = "extracted" if plain["stage"].get("features") else "on_the_fly"
    torch.manual_seed(int(cfg.seed))
    module = EasyGenModule(plain)
    untrained = not plain.get("init_from")
    drop = _DropStatsWarning()
    if untrained:
        log.warning(untrained_warning(plain))
        log.addFilter(drop)
    try:
        module.configure_model()
    finally:
        log.removeFilter(drop)
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
    s = cfg.stage
    features = read_features(cfg) if s.get("features") else None
    if features is not None and s.get("image"):
        raise ConfigError("stage.features and stage.image both set: the chat answers about one picture")
    if s.get("image"):
        if not s.get("prompt"):
            raise ConfigError(
                f"stage.image={s.image} needs stage.prompt (the question about it); in the interactive chat, "
                "attach a picture with /image PATH"
            )
        try:  # decoded before any model is built: a bad file costs no start-up
            load_image_file(str(s.image), int(cfg.model.image_size))
        except FileNotFoundError:
            raise ConfigError(
                f"stage.image={s.image} does not exist: set stage.image to a picture file"
            ) from None
        except ImageFileError as e:
            raise ConfigError(f"stage.image: {e}") from None
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
    errors = repl(session, stdin=stdin, stdout=sys.stdout, transcript=transcript, features=features)
    if s.get("prompt") and errors:
        raise ConfigError(f"stage.prompt: {errors[0]}")
    return {
        "global_step": 0,
        "metrics": {},
        "best": {},
        "checkpoints": {},
        "artifacts": {"transcript": str(transcript), "pictures": str(out / "pictures")},
    }
