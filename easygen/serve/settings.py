"""The server's settings, read from the composed config's `stage` node (conf/stage/serve.yaml); the API key
is stage.api_key, else the EASYGEN_API_KEY environment variable."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServeSettings:
    model_id: str = "easygen-tiny"
    host: str = "127.0.0.1"
    port: int = 7860
    web: bool = True
    allowed_image_dir: Path | None = None  # local pictures the API may read (file:// URLs); None: none
    max_image_pixels: int = 16_777_216  # width x height above which a picture is refused
    max_request_bytes: int = 32 * 1024 * 1024
    max_new_tokens: int = 64  # when a request gives none
    max_new_tokens_limit: int = 256  # the most a request may ask for
    temperature: float = 0.0
    top_p: float = 1.0
    image_seed: int = 1234
    max_images: int = 4  # n of /v1/images/generations
    max_prompt_chars: int = 4000  # a drawing's description
    max_queue: int = 32  # requests waiting for the model beyond this are refused (503)
    max_batch: int = 16  # answers decoded together
    api_key: str | None = None  # Bearer key of /v1 and /metrics (and the web demo's password); None: open
    image_size: int = 64
    max_length: int = 96  # model.max_length: the prompt's limit in tokens
    untrained: bool = False

    @classmethod
    def from_stage(cls, stage, *, model_name: str, image_size: int, max_length: int, image_seed: int,
                   untrained: bool) -> ServeSettings:
        allowed = stage.get("allowed_image_dir")
        key = stage.get("api_key") or os.environ.get("EASYGEN_API_KEY") or None
        return cls(
            model_id=str(stage.get("model_id") or f"easygen-{model_name}"),
            host=str(stage.host),
            port=int(stage.port),
            web=bool(stage.get("web", True)),
            allowed_image_dir=Path(str(allowed)).expanduser().resolve() if allowed else None,
            max_image_pixels=int(stage.max_image_pixels),
            max_request_bytes=int(float(stage.max_request_mb) * 1024 * 1024),
            max_new_tokens=int(stage.max_new_tokens),
            max_new_tokens_limit=int(stage.max_new_tokens_limit),
            temperature=float(stage.temperature),
            top_p=float(stage.top_p),
            image_seed=int(stage.image_seed) if stage.get("image_seed") is not None else int(image_seed),
            max_images=int(stage.max_images),
            max_prompt_chars=int(stage.max_prompt_chars),
            max_queue=int(stage.max_queue),
            max_batch=int(stage.get("max_batch", 16)),
            api_key=str(key) if key else None,
            image_size=int(image_size),
            max_length=int(max_length),
            untrained=bool(untrained),
        )
