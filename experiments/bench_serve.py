"""Load test of `python -m easygen.serve`: N streamed chat requests, at most C at a time, against a local
server; reports requests served, errors (must be 0), and p50/p95 of the time to the first token and of
the whole answer.

    python experiments/bench_serve.py [--n 32] [--concurrency 8] [--max-tokens 32] [--url http://127.0.0.1:PORT]
                                      [-- key=value ...]

Without --url it starts the server itself on the embedded default (tiny models, CPU, random weights:
the answers are noise, every one max-tokens long) on a free port, with OMP_NUM_THREADS=1, and stops it
after. Every other request carries a picture (a base64 data: URL, a synthetic-set drawing,
data_modules/synthetic.py), so half the requests also run BiDiffuser's image-to-text features (cached
per picture by the engine, easygen/serve/engine.py). Only loopback URLs are accepted. Exits 1 on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

from data_modules.synthetic import draw, sample_attributes

ROOT = Path(__file__).resolve().parents[1]


def start_server(tmp: Path, overrides: list[str]) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "easygen.serve", "stage.port=0", "logger=none", f"hydra.run.dir={tmp}/run",
           f"paths.data_dir={tmp}/data", *overrides]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            m = re.search(r" at (http://127\.0\.0\.1:\d+)/", line)
            if m and not found:
                found.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(300) or not found:
        proc.kill()
        raise SystemExit("the server did not start")
    return proc, found[0]


def pictures(k: int) -> list[str]:
    rng = random.Random(0)
    urls = []
    for _ in range(k):
        buf = io.BytesIO()
        draw(sample_attributes(rng), 64, rng).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


async def one(client: httpx.AsyncClient, url: str, i: int, max_tokens: int, picture: str | None) -> dict:
    content: list[dict] = [{"type": "text", "text": f"Describe the image concisely. ({i})"}]
    if picture is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": picture}})
    body = {"model": None, "stream": True, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}
    body.pop("model")
    start = time.perf_counter()
    first, done, error, n_chunks = None, False, None, 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        error = event["error"]["message"]
                        break
                    delta = event["choices"][0]["delta"]
                    if delta.get("content"):
                        n_chunks += 1
                        if first is None:
                            first = time.perf_counter() - start
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    if error is None and not done:
        error = "the stream ended without [DONE]"
    return {"ttft": first, "total": time.perf_counter() - start, "error": error, "chunks": n_chunks}


async def run(url: str, n: int, concurrency: int, max_tokens: int) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)
    pics = pictures(4)

    async def bounded(client, i):
        async with gate:
            return await one(client, url, i, max_tokens, pics[i % 4] if i % 2 == 0 else None)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return await asyncio.gather(*(bounded(client, i) for i in range(n)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="requests in all")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--url", help="a running server (loopback only); without it one is started")
    parser.add_argument("overrides", nargs="*", help="key=value options of the server it starts")
    args = parser.parse_args(argv)
    if not 1 <= args.concurrency <= 64 or not 1 <= args.n <= 1000:
        parser.error("--concurrency must be in [1, 64] and --n in [1, 1000]")
    proc = None
    with tempfile.TemporaryDirectory(prefix="easygen-bench-serve-") as tmp:
        if args.url:
            host = urlparse(args.url).hostname
            if host not in ("127.0.0.1", "localhost", "::1"):
                parser.error(f"--url {args.url}: only a server on this machine (127.0.0.1, localhost)")
            url = args.url.rstrip("/")
        else:
            t0 = time.perf_counter()
            proc, url = start_server(Path(tmp), args.overrides)
            print(f"server up at {url} in {time.perf_counter() - t0:.1f} s", flush=True)
        try:
            t0 = time.perf_counter()
            results = asyncio.run(run(url, args.n, args.concurrency, args.max_tokens))
            wall = time.perf_counter() - t0
            health = httpx.get(url + "/health", timeout=30).json()
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    errors = [r["error"] for r in results if r["error"]]
    ok = [r for r in results if not r["error"]]
    ttft = np.array([r["ttft"] for r in ok if r["ttft"] is not None])
    total = np.array([r["total"] for r in ok])

    def pct(a, q):
        return float(np.percentile(a, q)) if len(a) else float("nan")

    report = {
        "n": args.n,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "served": len(ok),
        "errors": len(errors),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
        "total_p50_s": pct(total, 50),
        "total_p95_s": pct(total, 95),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "server_counts": {k: health.get(k) for k in ("served", "errors", "cancelled")},
    }
    print(
        f"{report['served']}/{args.n} served, {report['errors']} errors, concurrency {args.concurrency}, "
        f"max_tokens {args.max_tokens}\n"
        f"time to first token  p50 {report['ttft_p50_s']:.3f} s  p95 {report['ttft_p95_s']:.3f} s\n"
        f"total                p50 {report['total_p50_s']:.3f} s  p95 {report['total_p95_s']:.3f} s\n"
        f"wall {wall:.2f} s, {report['requests_per_s']:.2f} requests/s"
    )
    print(json.dumps(report))
    for e in errors[:5]:
        print("error:", e, file=sys.stderr)
    if errors:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
