"""Load test of `python -m easygen.serve`: N streamed chat requests, at most C at a time, against a local
server; reports requests served, errors (must be 0), and p50/p95 of the time to the first token and of
the whole answer.

    python experiments/bench_serve.py [--n 32] [--concurrency 8] [--max-tokens 32] [--url http://127.0.0.1:PORT]
                                      [-- key=value ...]
    python experiments/bench_serve.py --compare [--n 64] [-- key=value ...]

Without --url it starts the server itself on the embedded default (tiny models, CPU, random weights:
the answers are noise, every one max-tokens long) on a free port, with OMP_NUM_THREADS=1, and stops it
after. Every other request carries a picture (a base64 data: URL, a synthetic-set drawing,
data_modules/synthetic.py, a different one for each request), so half the requests also run BiDiffuser's
image-to-text features. Only loopback URLs are accepted. Exits 1 on any error.

--compare runs the same load against a server with stage.max_batch=1 (one answer at a time: the
reference) and one with the default batch (stage.max_batch=16), both started first: 16 clients at once,
64 new tokens each, half with a picture, streamed (requests per second, also per second of the server's
CPU time, which the rest of a shared machine disturbs less; time to first token and whole answer,
p50/p95), then 4 clients, each load in two halves sent to the servers in the order A B, B A; then one
client alone, its requests to the two servers in turns. It prints both rows and their ratios, and the
machine's load average before and after.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_modules.synthetic import draw, sample_attributes  # noqa: E402


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


def pictures(k: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
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


async def run(url: str, n: int, concurrency: int, max_tokens: int, seed: int = 0) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)
    pics = pictures(n, seed)  # one picture each: no request finds its features kept from another

    async def bounded(client, i):
        async with gate:
            return await one(client, url, i, max_tokens, pics[i] if i % 2 == 0 else None)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return await asyncio.gather(*(bounded(client, i) for i in range(n)))


def pct(a, q) -> float:
    return float(np.percentile(a, q)) if len(a) else float("nan")


def summarise(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if not r["error"]]
    ttft = np.array([r["ttft"] for r in ok if r["ttft"] is not None])
    total = np.array([r["total"] for r in ok])
    return {
        "served": len(ok),
        "errors": len(results) - len(ok),
        "error_messages": [r["error"] for r in results if r["error"]][:5],
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
        "total_p50_s": pct(total, 50),
        "total_p95_s": pct(total, 95),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(url: str, n: int, concurrency: int, max_tokens: int, seed: int) -> dict:
    t0 = time.perf_counter()
    results = asyncio.run(run(url, n, concurrency, max_tokens, seed))
    return summarise(results, time.perf_counter() - t0)


async def alternate(urls: list[str], n: int, max_tokens: int) -> list[list[dict]]:
    """One client alone: n requests to each server, taking turns (A B, A B, B A, B A, ...), so that both see
    the same load from the rest of the machine."""
    pics = pictures(n, seed=7)
    out: list[list[dict]] = [[] for _ in urls]
    clients = [httpx.AsyncClient(timeout=600) for _ in urls]
    try:
        for i in range(n):
            order = list(enumerate(urls))
            for k, url in order if (i // 2) % 2 == 0 else order[::-1]:  # each order with and without a picture
                out[k].append(await one(clients[k], url, i, max_tokens, pics[i] if i % 2 == 0 else None))
    finally:
        for c in clients:
            await c.aclose()
    return out


def compare(args, overrides: list[str]) -> dict:
    """stage.max_batch=1 (the reference) and the default batch on the same load. Both servers run from the
    start (an idle one takes no CPU); the loads go to one after the other, the single client to both in
    turns."""
    names = ("max_batch=1", "default (max_batch=16)")
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="easygen-bench-serve-") as tmp:
        procs, urls = [], []
        try:
            for k, extra in enumerate((["stage.max_batch=1"], [])):
                (Path(tmp) / f"server{k}").mkdir()
                proc, url = start_server(Path(tmp) / f"server{k}", [*extra, *overrides])
                procs.append(proc)
                urls.append(url)
                measure(url, 8, 4, 8, seed=99)  # warm-up: first calls of every code path
            rows = {name: {} for name in names}
            for key, n, concurrency in (("load", args.n, 16), ("c4", 16, 4)):
                runs: dict[str, list] = {name: [] for name in names}
                for order in ((0, 1), (1, 0)):  # each server first once: both share the machine's changes
                    for k in order:
                        cpu = cpu_seconds(procs[k].pid)
                        t0 = time.perf_counter()
                        results = asyncio.run(run(urls[k], n // 2, concurrency, 64, seed=len(runs[names[k]])))
                        runs[names[k]].append((results, time.perf_counter() - t0, cpu_seconds(procs[k].pid) - cpu))
                for name in names:
                    results = [r for rs, _, _ in runs[name] for r in rs]
                    rows[name][key] = summarise(results, sum(w for _, w, _ in runs[name]))
                    rows[name][key]["server_cpu_s"] = sum(c for _, _, c in runs[name])
                    rows[name][key]["requests_per_cpu_s"] = rows[name][key]["served"] / rows[name][key]["server_cpu_s"]
            for name, results in zip(names, asyncio.run(alternate(urls, 32, 64))):
                rows[name]["c1"] = summarise(results, sum(r["total"] for r in results))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=60)
    for name in names:
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    load_after = load_average()
    ref, new = rows["max_batch=1"], rows["default (max_batch=16)"]
    header = ("| server | requests/s (16 clients) | per server CPU s | TTFT p50 / p95 (16) | total p50 / p95 (16) "
              "| TTFT p50 (4) | TTFT p50 (1) | latency p50 (1 client) | errors |")
    lines = [header, "|" + "---|" * 9]
    for name, r in rows.items():
        load = r["load"]
        errors = sum(r[k]["errors"] for k in ("load", "c1", "c4"))
        lines.append(
            f"| {name} | {load['requests_per_s']:.2f} | {load['requests_per_cpu_s']:.2f} "
            f"| {load['ttft_p50_s']:.3f} / {load['ttft_p95_s']:.3f} s "
            f"| {load['total_p50_s']:.3f} / {load['total_p95_s']:.3f} s | {r['c4']['ttft_p50_s']:.3f} s "
            f"| {r['c1']['ttft_p50_s']:.3f} s | {r['c1']['total_p50_s']:.3f} s | {errors} |"
        )
    ratio = {
        "requests_per_s": new["load"]["requests_per_s"] / ref["load"]["requests_per_s"],
        "requests_per_cpu_s": new["load"]["requests_per_cpu_s"] / ref["load"]["requests_per_cpu_s"],
        "ttft_p95_16": new["load"]["ttft_p95_s"] / ref["load"]["ttft_p95_s"],
        "ttft_p50_4": new["c4"]["ttft_p50_s"] / ref["c4"]["ttft_p50_s"],
        "ttft_p50_1": new["c1"]["ttft_p50_s"] / ref["c1"]["ttft_p50_s"],
        "latency_1": new["c1"]["total_p50_s"] / ref["c1"]["total_p50_s"],
    }
    lines.append(
        f"| ratio default / max_batch=1 | **{ratio['requests_per_s']:.2f}x** | {ratio['requests_per_cpu_s']:.2f}x "
        f"| p95 {ratio['ttft_p95_16']:.2f}x | "
        f"| {ratio['ttft_p50_4']:.2f}x | {ratio['ttft_p50_1']:.2f}x | {ratio['latency_1']:.2f}x | |"
    )
    print("\n".join(lines))
    print(f"load average (1, 5, 15 min) before: {load_before}; after: {load_after}; {os.cpu_count()} CPUs")
    report = {"rows": rows, "ratio": ratio, "load_before": load_before, "load_after": load_after}
    print(json.dumps(report))
    if any(r[k]["errors"] for r in rows.values() for k in ("load", "c1", "c4")):
        for r in rows.values():
            for k in ("load", "c1", "c4"):
                for e in r[k]["error_messages"]:
                    print("error:", e, file=sys.stderr)
        raise SystemExit(1)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="requests in all (32; --compare: 64)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--url", help="a running server (loopback only); without it one is started")
    parser.add_argument("--compare", action="store_true",
                        help="stage.max_batch=1 against the default batch on the same load (starts both servers)")
    parser.add_argument("overrides", nargs="*", help="key=value options of the server it starts")
    args = parser.parse_args(argv)
    args.n = args.n if args.n is not None else (64 if args.compare else 32)
    if not 1 <= args.concurrency <= 64 or not 1 <= args.n <= 1000:
        parser.error("--concurrency must be in [1, 64] and --n in [1, 1000]")
    if args.compare:
        if args.url:
            parser.error("--compare starts its own servers: leave --url out")
        return compare(args, args.overrides)
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
    report = {"n": args.n, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              **summarise(results, wall), "server_counts": {k: health.get(k) for k in ("served", "errors", "cancelled")}}
    errors = report.pop("error_messages")
    print(
        f"{report['served']}/{args.n} served, {report['errors']} errors, concurrency {args.concurrency}, "
        f"max_tokens {args.max_tokens}\n"
        f"time to first token  p50 {report['ttft_p50_s']:.3f} s  p95 {report['ttft_p95_s']:.3f} s\n"
        f"total                p50 {report['total_p50_s']:.3f} s  p95 {report['total_p95_s']:.3f} s\n"
        f"wall {wall:.2f} s, {report['requests_per_s']:.2f} requests/s"
    )
    print(json.dumps(report))
    for e in errors:
        print("error:", e, file=sys.stderr)
    if report["errors"]:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
