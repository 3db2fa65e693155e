"""`stage=serve`: the web demo (Gradio, at /) and the OpenAI-compatible API (/v1) in one process on one
model, built as the chat builds it (easygen.stages.chat.build_session). Runs until Ctrl-C / SIGTERM.
The code is in easygen/serve/ (engine.py, api.py, web.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from easygen.errors import ConfigError

log = logging.getLogger("easygen")


def _check(cfg) -> None:
    s = cfg.stage
    problems = []
    port = s.get("port")
    if not isinstance(port, int) or not 0 <= port <= 65535:
        problems.append(f"stage.port={port} must be a port number in [0, 65535] (0: a free port)")
    for key in ("max_image_pixels", "max_request_mb", "max_new_tokens", "max_new_tokens_limit", "max_images",
                "max_prompt_chars", "max_queue", "max_batch", "keep_pictures"):
        value = s.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            problems.append(f"stage.{key}={value} must be a positive number")
    if not problems and int(s.max_new_tokens) > int(s.max_new_tokens_limit):
        problems.append(
            f"stage.max_new_tokens={s.max_new_tokens} is over stage.max_new_tokens_limit={s.max_new_tokens_limit}"
        )
    allowed = s.get("allowed_image_dir")
    if allowed and not Path(str(allowed)).expanduser().is_dir():
        problems.append(f"stage.allowed_image_dir={allowed} is not a folder: set it to an existing folder (or null)")
    cache = s.get("feature_cache", 0)
    if isinstance(cache, bool) or not isinstance(cache, int) or cache < 0:
        problems.append(f"stage.feature_cache={cache} must be a whole number >= 0")
    key = s.get("api_key")
    if key is not None and (not isinstance(key, str) or not key.strip()):
        problems.append(f"stage.api_key={key!r} must be a non-empty string (or null)")
    tmp = s.get("tmp_dir")
    if tmp and not Path(str(tmp)).is_dir():
        problems.append(f"stage.tmp_dir={tmp} is not a folder: set it to an existing folder (or null)")
    if problems:
        raise ConfigError("\n".join(problems))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"stage.host={host} stage.port={port}: cannot listen there ({e.strerror or e}); choose another "
            "port (stage.port=0 picks a free one)"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; anything else (0.0.0.0, a LAN address) can be reached from outside."""
    import ipaddress

    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _server(app, log_level: str):
    """uvicorn's Server, except that Ctrl-C / SIGTERM end `run` normally (uvicorn raises the signal again
    after its shutdown, which would kill the process before the temporary folder is removed and
    results.json is written)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))


def serve_stage(cfg) -> dict:
    _check(cfg)
    s = cfg.stage
    tmp = Path(tempfile.mkdtemp(prefix="easygen-serve-", dir=str(s.tmp_dir) if s.get("tmp_dir") else None))
    # before Gradio is imported: its uploads and cache go under the server's folder, and no telemetry
    os.environ["GRADIO_TEMP_DIR"] = str(tmp / "gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sock = None
    try:
        sock = _bind(str(s.host), int(s.port))
        # the serving stack is an optional extra (pip install -e ".[serve]"): imported when it is used
        try:
            import uvicorn  # noqa: F401

            if s.get("web", True):
                import gradio  # noqa: F401

            from easygen.serve.api import create_app
        except ImportError as e:
            raise ConfigError(f"stage=serve needs the serve extra: pip install -e \".[serve]\" ({e})") from None
        from easygen.serve.engine import Engine
        from easygen.serve.metrics import ServeMetrics
        from easygen.serve.settings import ServeSettings
        from easygen.stages.chat import build_session

        session = build_session(cfg)
        settings = ServeSettings.from_stage(
            s,
            model_name=str(cfg.model.name),
            image_size=int(cfg.model.image_size),
            max_length=int(cfg.model.max_length),
            image_seed=int(session.bidiffuser.seed),
            untrained=not cfg.get("init_from"),
        )
        settings.port = sock.getsockname()[1]
        metrics = ServeMetrics()
        engine = Engine(session, tmp, max_queue=settings.max_queue, max_batch=settings.max_batch,
                        image_seed=settings.image_seed, feature_cache=int(s.get("feature_cache", 32)),
                        keep_pictures=int(s.get("keep_pictures", 256)), metrics=metrics)
        app = create_app(engine, settings, metrics)
        if settings.web:
            from easygen.serve.web import mount_web

            app = mount_web(app, engine, settings, tmp)
        if settings.api_key is None and not is_loopback(settings.host):
            print(f"WARNING: listening on {settings.host} without an API key: anyone who can reach it may use "
                  "the model; set stage.api_key=... or EASYGEN_API_KEY", file=sys.stderr, flush=True)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        url = f"http://{host}:{settings.port}"
        print(
            f"EasyGen serving {settings.model_id} at {url}/"
            + (" (web demo)" if settings.web else "")
            + f"; OpenAI-compatible API at {url}/v1; Ctrl-C stops",
            flush=True,
        )
        server = _server(app, str(s.log_level))
        try:
            server.run(sockets=[sock])
        finally:
            engine.close()
        stats = dict(engine.stats)
    finally:
        if sock is not None:
            sock.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "global_step": 0,
        "metrics": {},
        "best": {},
        "checkpoints": {},
        "artifacts": {"url": url},
        "requests": stats,
    }
