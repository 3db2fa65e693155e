"""Soak of `python -m easygen.serve`: minutes of mixed good and bad traffic from concurrent clients against a
server on this machine, watching the server process for leaks.

    python experiments/soak_serve.py [--minutes 10] [--clients 8] [--max-requests 200000] [-- key=value ...]

It starts the server itself on the embedded default (tiny models, CPU, random weights, OMP_NUM_THREADS=1,
loopback, a free port, stage.max_request_mb=1 so that an oversized body is cheap to send) and stops it
after. Each client picks, request after request until the time or the request count is up:

- valid chats: text only or with a picture (a data: URL, one of 64 synthetic-set drawings), a history or
  none, streamed or not, 1 to 48 new tokens, greedy or seeded sampling;
- drawings (/v1/images/generations, 1 or 2 pictures);
- every bad input the server refuses (bad JSON, unknown model or route, unsupported options, damaged,
  truncated, oversized or remote pictures, prompts too long, out-of-range settings, a body over the limit),
  each expected to get its own 4xx status;
- streamed chats whose client disconnects after a few chunks.

A valid request fails unless it gets 200 and, streamed, `data: [DONE]`; a bad one fails unless it gets its
4xx. Every 10 s it samples the server's resident memory (VmRSS), open file descriptors and the files in its
temporary folder (generated pictures are removed once sent). Reports: requests and failures per kind,
resident memory after the first (warm-up) minute and at the end, descriptors before and after (both with
no client connected, the server idle), pictures left, and p50/p95 latency of valid requests per minute.
Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_modules.synthetic import draw, sample_attributes  # noqa: E402
from experiments.bench_serve import start_server  # noqa: E402

SAMPLE_EVERY_S = 10.0


def png_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def picture_pool(k: int) -> list[str]:
    rng = random.Random(0)
    return [png_url(draw(sample_attributes(rng), 64, rng)) for _ in range(k)]


def bad_inputs() -> list[tuple[str, str, object, int]]:
    """(name, path, body (dict, or bytes sent as is), expected status): inputs the server refuses."""
    noise = Image.effect_noise((128, 128), 60).convert("RGB")
    buf = io.BytesIO()
    noise.save(buf, format="JPEG", quality=90)
    truncated = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()[: len(buf.getvalue()) // 2]).decode()
    huge = io.BytesIO()
    Image.new("L", (8000, 7000)).save(huge, format="PNG")  # 56 megapixels, a small file
    huge_url = "data:image/png;base64," + base64.b64encode(huge.getvalue()).decode()
    text = "data:image/png;base64," + base64.b64encode(b"this is not a picture").decode()

    def chat(content="hello", **extra):
        return {"messages": [{"role": "user", "content": content}], **extra}

    def pic(url):
        return chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}])

    c, g = "/v1/chat/completions", "/v1/images/generations"
    return [
        ("invalid JSON", c, b'{"messages": [}', 400),
        ("empty body", c, b"", 400),
        ("JSON list", c, b"[1, 2]", 400),
        ("unknown model", c, chat(model="gpt-4o"), 404),
        ("unsupported tools", c, chat(tools=[{"type": "function"}]), 400),
        ("n=2", c, chat(n=2), 400),
        ("no messages", c, {"messages": []}, 400),
        ("bad role", c, {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ("picture marker typed", c, chat("look at <image> please"), 400),
        ("empty question", c, chat("   "), 400),
        ("question too long", c, chat("word " * 3000), 400),
        ("max_tokens too large", c, chat(max_tokens=100000), 400),
        ("temperature out of range", c, chat(temperature=5), 400),
        ("top_p 0", c, chat(top_p=0), 400),
        ("draw not a bool", c, chat(draw="yes"), 400),
        ("seed not an integer", c, chat(seed="abc"), 400),
        ("stream not a bool", c, chat(stream="yes"), 400),
        ("malformed base64", c, pic("data:image/png;base64,@@@@"), 400),
        ("not a picture", c, pic(text), 400),
        ("truncated JPEG", c, pic(truncated), 400),
        ("56-megapixel picture", c, pic(huge_url), 400),
        ("remote URL", c, pic("https://example.com/cat.png"), 400),
        ("local file (not allowed)", c, pic("file:///etc/hostname"), 400),
        ("two pictures", c, chat([{"type": "image_url", "image_url": {"url": text}},
                                  {"type": "image_url", "image_url": {"url": text}}, {"type": "text", "text": "x"}]),
         400),
        ("body over the limit", c, chat("x" * (1024 * 1024 + 10)), 413),
        ("drawing: empty prompt", g, {"prompt": " "}, 400),
        ("drawing: prompt too long", g, {"prompt": "y" * 5000}, 400),
        ("drawing: wrong size", g, {"prompt": "a red circle", "size": "1024x1024"}, 400),
        ("drawing: url format", g, {"prompt": "a red circle", "response_format": "url"}, 400),
        ("drawing: too many", g, {"prompt": "a red circle", "n": 99}, 400),
        ("drawing: stream", g, {"prompt": "a red circle", "stream": True}, 400),
        ("unknown route", "/v1/completions", chat(), 404),
        ("wrong method", "GET " + c, None, 405),
    ]


class Soak:
    def __init__(self, url: str, deadline: float, max_requests: int, seed: int):
        self.url, self.deadline, self.max_requests = url, deadline, max_requests
        self.rng = random.Random(seed)
        self.pictures = picture_pool(64)
        self.bad = bad_inputs()
        self.started = time.perf_counter()
        self.records: list[dict] = []  # kind, ok, minute, latency (valid), status, note

    def record(self, kind: str, ok: bool, t0: float, note: str = "", valid: bool = True, ttft=None) -> None:
        now = time.perf_counter()
        self.records.append({"kind": kind, "ok": ok, "minute": int((t0 - self.started) // 60), "valid": valid,
                             "latency": now - t0, "ttft": ttft, "note": note})

    def _chat_body(self, rng: random.Random) -> tuple[str, dict]:
        picture = rng.random() < 0.5
        question = rng.choice(["Describe the image concisely.", "What colour is the shape?", "Where is it?",
                               "Tell me a story.", "hello"])
        first: object = question
        if picture:
            first = [{"type": "image_url", "image_url": {"url": rng.choice(self.pictures)}},
                     {"type": "text", "text": question}]
        messages = [{"role": "user", "content": first}]
        if rng.random() < 0.3:
            messages += [{"role": "assistant", "content": "a small red circle"},
                         {"role": "user", "content": "and the background?"}]
        body = {"messages": messages, "max_tokens": rng.randint(1, 48), "draw": rng.random() < 0.5}
        if rng.random() < 0.3:
            body.update(temperature=0.8, seed=rng.randint(0, 10**6))
        return ("chat+picture" if picture else "chat"), body

    async def valid_chat(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        kind, body = self._chat_body(rng)
        stream = rng.random() < 0.5
        body["stream"] = stream
        kind += " streamed" if stream else ""
        t0 = time.perf_counter()
        try:
            if not stream:
                r = await client.post(self.url + "/v1/chat/completions", json=body)
                ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
                return self.record(kind, ok, t0, "" if ok else f"HTTP {r.status_code} {r.text[:200]}")
            first, done = None, False
            async with client.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return self.record(kind, False, t0, f"HTTP {r.status_code} {(await r.aread())[:200]!r}")
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: ") and first is None and '"content"' in line:
                        first = time.perf_counter() - t0
                    if '"error"' in line:
                        return self.record(kind, False, t0, line[:200])
            self.record(kind, done, t0, "" if done else "no [DONE]", ttft=first)
        except (httpx.HTTPError, ValueError, KeyError) as e:
            self.record(kind, False, t0, f"{type(e).__name__}: {e}")

    async def drawing(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        n = rng.choice([1, 2])
        body = {"prompt": rng.choice(["a red circle", "a large blue square at the top on a white background",
                                      "a small green cross"]), "n": n}
        if rng.random() < 0.5:
            body["seed"] = rng.randint(0, 1000)
        t0 = time.perf_counter()
        try:
            r = await client.post(self.url + "/v1/images/generations", json=body)
            ok = r.status_code == 200 and len(r.json()["data"]) == n
            self.record("drawing", ok, t0, "" if ok else f"HTTP {r.status_code} {r.text[:200]}")
        except (httpx.HTTPError, ValueError, KeyError) as e:
            self.record("drawing", False, t0, f"{type(e).__name__}: {e}")

    async def bad_input(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        name, path, body, status = rng.choice(self.bad)
        t0 = time.perf_counter()
        try:
            if path.startswith("GET "):
                r = await client.get(self.url + path[4:])
            elif isinstance(body, bytes):
                r = await client.post(self.url + path, content=body, headers={"content-type": "application/json"})
            else:
                r = await client.post(self.url + path, json=body)
            error = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
            ok = r.status_code == status and bool(error.get("message"))
            self.record("bad input", ok, t0, "" if ok else f"{name}: HTTP {r.status_code} {r.text[:200]}", valid=False)
        except (httpx.HTTPError, ValueError) as e:
            self.record("bad input", False, t0, f"{name}: {type(e).__name__}: {e}", valid=False)

    async def disconnect(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 200,
                "stream": True}
        if rng.random() < 0.5:
            body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": rng.choice(self.pictures)}},
                                              {"type": "text", "text": "Describe it at length."}]
        t0 = time.perf_counter()
        try:
            async with client.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= rng.randint(2, 6):
                        break  # leaving the block closes the connection mid-stream
            self.record("disconnect mid-stream", r.status_code == 200, t0, valid=False)
        except httpx.HTTPError as e:
            self.record("disconnect mid-stream", False, t0, f"{type(e).__name__}: {e}", valid=False)

    async def client(self, i: int) -> None:
        rng = random.Random(self.rng.random())
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            while time.time() < self.deadline and len(self.records) < self.max_requests:
                x = rng.random()
                if x < 0.55:
                    await self.valid_chat(client, rng)
                elif x < 0.65:
                    await self.drawing(client, rng)
                elif x < 0.90:
                    await self.bad_input(client, rng)
                else:
                    await self.disconnect(client, rng)

    async def run(self, clients: int) -> None:
        await asyncio.gather(*(self.client(i) for i in range(clients)))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> dict[str, int]:
    """The server's open descriptors by kind (socket, anon_inode:[eventpoll], pipe, a file's folder)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":[")[0] if ":[" in target and not target.startswith("anon_inode") else target
        kind = str(Path(kind).parent) if kind.startswith("/") and kind != "/dev/null" else kind
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def files_under(folder: Path) -> tuple[int, int]:
    """(PNG pictures, all files) under the server's temporary folder."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.suffix == ".png" and p.parent.name == "pictures" for p in files), len(files)


def wait_idle(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if httpx.get(url + "/health", timeout=30).json()["pending"] == 0:
            return
        time.sleep(0.2)


async def sampler(pid: int, folder: Path, samples: list[dict], started: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        pictures, files = files_under(folder)
        samples.append({"t": time.perf_counter() - started, "rss_mib": rss_mib(pid), "fds": fds(pid),
                        "pictures": pictures, "files": files})
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)
        except TimeoutError:
            pass


async def soak(url: str, pid: int, folder: Path, minutes: float, clients: int, max_requests: int) -> tuple:
    s = Soak(url, time.time() + minutes * 60, max_requests, seed=0)
    samples: list[dict] = []
    stop = asyncio.Event()
    watch = asyncio.create_task(sampler(pid, folder, samples, s.started, stop))
    await s.run(clients)
    stop.set()
    await watch
    return s, samples


def pct(a, q) -> float:
    return float(np.percentile(a, q)) if len(a) else float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8, help="clients at once")
    parser.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests")
    parser.add_argument("overrides", nargs="*", help="key=value options of the server it starts")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 240 or not 1 <= args.clients <= 64 or not 1 <= args.max_requests <= 10**6:
        parser.error("--minutes in (0, 240], --clients in [1, 64], --max-requests in [1, 1e6]")
    with tempfile.TemporaryDirectory(prefix="easygen-soak-") as tmp:
        tmp = Path(tmp)
        (tmp / "server-tmp").mkdir()
        proc, url = start_server(tmp, ["stage.host=127.0.0.1", "stage.max_request_mb=1",
                                       f"stage.tmp_dir={tmp / 'server-tmp'}", *args.overrides])
        try:
            (folder,) = (tmp / "server-tmp").iterdir()
            warm = Soak(url, time.time() + 15, 10**6, seed=1)  # warm-up: every kind once or more
            asyncio.run(warm.run(2))
            wait_idle(url)
            time.sleep(1.0)
            fds_start, rss_warm, kinds_start = fds(proc.pid), rss_mib(proc.pid), fd_kinds(proc.pid)
            load_start = os.getloadavg()
            s, samples = asyncio.run(soak(url, proc.pid, folder, args.minutes, args.clients, args.max_requests))
            wait_idle(url)
            time.sleep(1.0)
            fds_end, rss_end, kinds_end = fds(proc.pid), rss_mib(proc.pid), fd_kinds(proc.pid)
            pictures_end, files_end = files_under(folder)
            health = httpx.get(url + "/health", timeout=30).json()
            load_end = os.getloadavg()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    records = s.records
    rss_after_minute = next((x["rss_mib"] for x in samples if x["t"] >= 60), rss_warm)
    by_kind: dict[str, list[int]] = {}
    for r in records:
        counts = by_kind.setdefault(r["kind"], [0, 0])
        counts[0] += 1
        counts[1] += not r["ok"]
    minutes = sorted({r["minute"] for r in records})
    per_minute = []
    for m in minutes:
        lat = [r["latency"] for r in records if r["minute"] == m and r["valid"] and r["ok"]]
        ttft = [r["ttft"] for r in records if r["minute"] == m and r["ttft"] is not None]
        per_minute.append({"minute": m + 1, "valid": len(lat), "all": sum(r["minute"] == m for r in records),
                           "p50_s": pct(lat, 50), "p95_s": pct(lat, 95), "ttft_p50_s": pct(ttft, 50),
                           "ttft_p95_s": pct(ttft, 95)})
    failures = [r for r in records if not r["ok"]]
    valid_failures = [r for r in failures if r["valid"]]
    report = {
        "minutes": args.minutes, "clients": args.clients, "requests": len(records),
        "valid_requests": sum(r["valid"] for r in records), "valid_failures": len(valid_failures),
        "other_failures": len(failures) - len(valid_failures), "by_kind": by_kind,
        "rss_mib": {"after_warm_up": rss_warm, "after_first_minute": rss_after_minute, "end": rss_end,
                    "growth_from_first_minute_pct": 100 * (rss_end / rss_after_minute - 1),
                    "growth_from_warm_up_pct": 100 * (rss_end / rss_warm - 1),
                    "max": max(x["rss_mib"] for x in samples)},
        "fds": {"start": fds_start, "end": fds_end, "max": max(x["fds"] for x in samples), "kinds_start": kinds_start,
                "kinds_end": kinds_end},
        "pictures": {"max_during": max(x["pictures"] for x in samples), "left_at_end": pictures_end,
                     "files_at_end": files_end},
        "server_counts": {k: health.get(k) for k in ("served", "errors", "cancelled")},
        "per_minute": per_minute,
        "load_average": {"start": load_start, "end": load_end, "cpus": os.cpu_count()},
    }
    print("| kind | requests | failures |\n|---|---|---|")
    for kind, (n, bad) in sorted(by_kind.items()):
        print(f"| {kind} | {n} | {bad} |")
    print("\n| minute | valid requests | all requests | latency p50 / p95 | streamed TTFT p50 / p95 |\n|---|---|---|---|---|")
    for m in per_minute:
        print(f"| {m['minute']} | {m['valid']} | {m['all']} | {m['p50_s']:.3f} / {m['p95_s']:.3f} s "
              f"| {m['ttft_p50_s']:.3f} / {m['ttft_p95_s']:.3f} s |")
    r = report["rss_mib"]
    print(f"\nresident memory: {r['after_warm_up']:.1f} MiB after warm-up, {r['after_first_minute']:.1f} MiB after "
          f"the first minute, {r['end']:.1f} MiB at the end ({r['growth_from_first_minute_pct']:+.1f} % from the first "
          f"minute, {r['growth_from_warm_up_pct']:+.1f} % from the warm-up), "
          f"max {r['max']:.1f}")
    print(f"open descriptors: {fds_start} before, {fds_end} after (max {report['fds']['max']} during); by kind "
          f"before {kinds_start}, after {kinds_end}")
    print(f"pictures in the server's folder: at most {report['pictures']['max_during']} at a sample, "
          f"{pictures_end} at the end ({files_end} files in all)")
    print(f"valid requests failed: {len(valid_failures)}; other failures: {report['other_failures']}; "
          f"load average start {load_start}, end {load_end}, {os.cpu_count()} CPUs")
    print(json.dumps(report))
    for f in failures[:10]:
        print("failure:", f["kind"], f["note"], file=sys.stderr)
    if failures:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
