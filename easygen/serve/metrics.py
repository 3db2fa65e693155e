"""The server's Prometheus metrics (`GET /metrics`, the text exposition format, through prometheus_client).

One registry per server (not prometheus_client's global one), so that servers built in one process do
not share counts:

    easygen_requests_total{route, status}         HTTP requests answered, by route and status code
    easygen_time_to_first_token_seconds           a chat answer's first streamed text, from its arrival
    easygen_request_latency_seconds{kind}         a request's whole time in the engine (chat | draw)
    easygen_queue_depth                           requests waiting for the model
    easygen_batch_size                            answers decoding together now
    easygen_decode_batch_rows                     answers per decoding step (histogram)
    easygen_generated_tokens_total                tokens the LLM generated
    easygen_tokens_per_second                     generated tokens per second over the last 10 s
    easygen_pictures_drawn_total                  pictures BiDiffuser drew (drawings and <Img> answers)
    easygen_engine_requests_total{kind, outcome}  requests the engine ended: served | error | cancelled
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    def __init__(self, window_s: float = 10.0):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("easygen_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.ttft = Histogram("easygen_time_to_first_token_seconds",
                              "Seconds from a chat request's arrival to its first streamed text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("easygen_request_latency_seconds",
                                 "Seconds from a request's arrival to its end in the engine", ["kind"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("easygen_queue_depth", "Requests waiting for the model", registry=r)
        self.batch_size = Gauge("easygen_batch_size", "Answers decoding together now", registry=r)
        self.batch_rows = Histogram("easygen_decode_batch_rows", "Answers per decoding step", buckets=ROWS_BUCKETS,
                                    registry=r)
        self.tokens = Counter("easygen_generated_tokens", "Tokens the LLM generated", registry=r)
        self.pictures = Counter("easygen_pictures_drawn", "Pictures BiDiffuser drew", registry=r)
        self.outcomes = Counter("easygen_engine_requests", "Requests the engine ended, by kind and outcome",
                                ["kind", "outcome"], registry=r)
        tps = Gauge("easygen_tokens_per_second", f"Generated tokens per second over the last {window_s:g} s",
                    registry=r)
        tps.set_function(self.tokens_per_second)
        self._window = float(window_s)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def generated(self, n: int) -> None:
        """`n` tokens generated now (one decoding step)."""
        if n <= 0:
            return
        self.tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self._window:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / self._window

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
