"""Prometheus metrics recorded by the frontend processes, aggregated across processes.

Every frontend (the HTTP workers, the ZMQ frontend) is its own process, so the metrics use
prometheus_client's multiprocess mode: each process writes its samples into memory-mapped files
under `PROMETHEUS_MULTIPROC_DIR`, and whichever HTTP worker answers `/metrics` sums the files of
all of them (frontends/http/metrics.py). The supervisor owns that directory: it empties it at
start (counters of a previous run must not leak into this one), exports the variable before it
spawns a child (prometheus_client decides on multiprocess mode when it is first imported), and
calls `mark_dead()` when a child exits so the live gauges of a dead process stop counting.
Counters and histograms of dead processes stay: a restarted worker must not make totals fall.

Engine-side state (KV cache, arenas, restarts) is not recorded here: the scraping worker asks the
engines for their stats at scrape time, so those numbers are exact and cost nothing per request.

Names follow the Prometheus conventions: `ferry_` prefix, base units (`_seconds`, `_bytes`),
`_total` on counters (prometheus_client appends it), no unit on plain counts.
"""
from __future__ import annotations

import contextvars
import functools
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["MULTIPROC_ENV", "prepare_dir", "mark_dead", "remove_dir", "multiproc_dir",
           "REQUESTS", "REQUEST_SECONDS", "IN_FLIGHT", "QUEUE_SECONDS", "COMPUTE_SECONDS",
           "BATCH_SIZE", "TTFT_SECONDS", "ITL_SECONDS", "PROMPT_TOKENS", "GENERATION_TOKENS",
           "track_model", "note_model", "observe_request", "observe_infer", "StreamTimer"]

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Latency buckets from 250 µs (an identity model over ipc) to a minute (a long generation).
_LATENCY = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                  1.0, 2.5)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

REQUESTS = Counter("ferry_requests", "HTTP requests answered, by route template, model and "
                   "status code.", ["route", "model", "status"])
REQUEST_SECONDS = Histogram("ferry_request_duration_seconds", "HTTP request latency from the "
                            "handler's start to its end (a whole stream for SSE and WebSocket).",
                            ["route", "model"], buckets=_LATENCY)
IN_FLIGHT = Gauge("ferry_http_requests_in_flight", "HTTP requests being handled now.",
                  multiprocess_mode="livesum")
QUEUE_SECONDS = Histogram("ferry_queue_duration_seconds", "Time a tensor request waited in the "
                          "engine's batcher before its batch ran.", ["model"], buckets=_LATENCY)
COMPUTE_SECONDS = Histogram("ferry_compute_duration_seconds", "Engine compute time of the "
                            "batch that served a tensor request.", ["model"], buckets=_LATENCY)
BATCH_SIZE = Histogram("ferry_batch_size", "Rows in the batch that served a tensor request.",
                       ["model"], buckets=_BATCH)
TTFT_SECONDS = Histogram("ferry_time_to_first_token_seconds", "Time from submitting a "
                         "generation to its first token, as the frontend saw it.", ["model"],
                         buckets=_LATENCY)
ITL_SECONDS = Histogram("ferry_inter_token_latency_seconds", "Time between consecutive tokens "
                        "of a generation.", ["model"], buckets=_TOKEN_LATENCY)
PROMPT_TOKENS = Counter("ferry_prompt_tokens", "Prompt tokens of generations that started.",
                        ["model"])
GENERATION_TOKENS = Counter("ferry_generation_tokens", "Tokens generated.", ["model"])

# The model a request resolved to, filled in by Dispatcher.resolve() deep inside a handler and
# read by the HTTP middleware: the label without every route having to report it.
_MODEL: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("ferry_metrics_model",
                                                                          default=None)


# -- the multiprocess directory (supervisor side) ---------------------------------------------

def prepare_dir(runtime_dir: Path) -> Path:
    """Create `<runtime_dir>/metrics` empty and export it for the children spawned after."""
    path = runtime_dir / "metrics"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def multiproc_dir() -> str | None:
    path = os.environ.get(MULTIPROC_ENV)
    return path if path and os.path.isdir(path) else None


def mark_dead(pid: int | None) -> None:
    """A child exited: its live gauges (in-flight requests) must stop counting."""
    if pid is None or multiproc_dir() is None:
        return
    from prometheus_client import multiprocess
    try:
        multiprocess.mark_process_dead(pid)
    except OSError as exc:   # metrics are never worth a supervisor error
        log.warning("cannot clear the metrics of process %d: %s", pid, exc)


def remove_dir(runtime_dir: Path) -> None:
    shutil.rmtree(runtime_dir / "metrics", ignore_errors=True)


# -- recording (frontend side) ------------------------------------------------------------------

def track_model() -> tuple[list[str], contextvars.Token]:
    """Start collecting the model label of the current request; reset with the token."""
    slot = [""]
    return slot, _MODEL.set(slot)


def note_model(name: str) -> None:
    slot = _MODEL.get()
    if slot is not None:
        slot[0] = name


# Label values are bounded (route templates, loaded models, status codes), so the labelled
# children are cached: `.labels()` takes a lock and builds a key on every call, a few µs each
# on the request path.
@functools.lru_cache(maxsize=4096)
def _request_children(route: str, model: str, status: str) -> tuple[Any, Any]:
    return REQUESTS.labels(route, model, status), REQUEST_SECONDS.labels(route, model)


@functools.lru_cache(maxsize=1024)
def _infer_children(model: str) -> tuple[Any, Any, Any]:
    return QUEUE_SECONDS.labels(model), COMPUTE_SECONDS.labels(model), BATCH_SIZE.labels(model)


def observe_request(route: str, model: str, status: int, seconds: float) -> None:
    count, latency = _request_children(route, model, str(status))
    count.inc()
    latency.observe(seconds)


def observe_infer(model: str, queue_us: int, compute_us: int, batch_size: int) -> None:
    """What the engine reported for one tensor request (P.InferResult)."""
    queue, compute, batch = _infer_children(model)
    queue.observe(queue_us / 1e6)
    compute.observe(compute_us / 1e6)
    if batch_size > 0:
        batch.observe(batch_size)


class StreamTimer:
    """Time to first token, inter-token latency and token counts of one generation."""

    __slots__ = ("model", "prompt_len", "start", "last")

    def __init__(self, model: str, prompt_len: int) -> None:
        self.model, self.prompt_len = model, prompt_len
        self.start = time.monotonic()
        self.last: float | None = None

    def tokens(self, msg: Any) -> None:
        """Record one `P.Tokens` message (it may carry several tokens, or none at the end)."""
        n = len(msg.token_ids)
        if n == 0:
            return
        now = time.monotonic()
        if self.last is None:
            TTFT_SECONDS.labels(self.model).observe(now - self.start)
            PROMPT_TOKENS.labels(self.model).inc(msg.prompt_tokens or self.prompt_len)
        else:
            # Tokens that arrive in one message shared the wait: spread it over them.
            gap = (now - self.last) / n
            itl = ITL_SECONDS.labels(self.model)
            for _ in range(n):
                itl.observe(gap)
        GENERATION_TOKENS.labels(self.model).inc(n)
        self.last = now
