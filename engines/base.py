"""The engine interface: what every model runtime (ONNX Runtime, the LLM engine, TensorRT) offers.

An engine hosts one model version on one device inside an engine process. The engine process's
compute loop calls `step()` on every hosted engine; engines never touch sockets. Requests arrive
through `submit()` already decoded into numpy arrays or token ids; results leave as the records
returned by `step()`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TensorSpec", "ModelSpec", "ModelInfo", "TensorRequest", "TensorResult",
    "GenerateRequest", "TokenOutput", "ProgressOutput", "Engine",
]


@dataclass(slots=True, frozen=True)
class TensorSpec:
    name: str
    dtype: str                      # numpy dtype name: "float32", "int64", ...
    shape: tuple[int, ...]          # -1 marks a dynamic dimension (the batch dim included)
    # Upper bounds of dynamic dims that the graph cannot state (MiniLM's 512 positions); -1 or
    # None: unbounded. A longer input would otherwise fail deep inside the runtime.
    max_shape: tuple[int, ...] | None = None


@dataclass(slots=True, frozen=True)
class ModelSpec:
    """A parsed `model.toml`. Engine-specific sections stay as dicts in `sections`."""

    name: str
    version: int
    engine: str                     # "onnx" | "llm" | "tensorrt"
    path: Path                      # models/<name>/<version>/
    weights: str | None = None      # file name inside `path`; None lets the engine pick
    sha256: str | None = None
    max_batch_size: int = 0         # 0: the model takes no batch dimension
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    sections: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        value = self.sections.get(name, {})
        return value if isinstance(value, dict) else {}


@dataclass(slots=True)
class ModelInfo:
    """What an engine reports after load: the metadata the frontends serve."""

    name: str
    version: int
    platform: str                   # "onnxruntime_onnx", "ferry_llm", "tensorrt_plan"
    kind: str                       # "tensor" | "llm"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. LLM context length, vocab size


@dataclass(slots=True)
class TensorRequest:
    id: str
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None = None      # None: every output
    deadline: float | None = None         # time.monotonic() seconds; CLOCK_MONOTONIC is host-wide
    arrival: float = 0.0                  # time.monotonic() when the engine received it
    progress: bool = False                # the caller wants ProgressOutput records


@dataclass(slots=True)
class ProgressOutput:
    """A step of one image of a tensor request that asked for progress (the diffusion engine);
    the request still ends with its TensorResult."""

    id: str
    image: int
    step: int                             # steps done, 1..steps
    steps: int


@dataclass(slots=True)
class TensorResult:
    id: str
    outputs: dict[str, np.ndarray] | None = None
    error: Exception | None = None        # a daemon.errors.FerryError
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_size: int = 0


@dataclass(slots=True)
class GenerateRequest:
    id: str
    prompt_ids: list[int]
    params: Any                           # engines.llm.sampling.SamplingParams
    arrival: float = 0.0
    traced: bool = False                  # time it: its finishing TokenOutput carries `timing`


@dataclass(slots=True)
class TokenOutput:
    """New tokens of one request from one engine step (streamed as they come)."""

    id: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finished: bool = False
    finish_reason: str | None = None      # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    cached_tokens: int = 0                # prompt tokens served from the prefix cache
    error: Exception | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None   # per token, best first
    # a traced request's finishing output: [received, first scheduled, first token (0: none),
    # ended] in CLOCK_MONOTONIC µs, then steps and prefill steps (daemon/protocol.py TRACING)
    timing: list[int] | None = None


class Engine(abc.ABC):
    """One model version hosted on one device. Not thread-safe: only the compute loop calls it."""

    kind: str = "tensor"

    @abc.abstractmethod
    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        """Load weights from `spec.path` onto `device` ("cpu", "cuda:0") and warm up.

        Raises `daemon.errors.FerryError` (code `model_load_failed`) when the files are bad.
        """

    @abc.abstractmethod
    def submit(self, request: TensorRequest | GenerateRequest) -> None:
        """Queue a request. Raises `FerryError` (4xx) at once for inputs it can never serve."""

    @abc.abstractmethod
    def step(self) -> list[TensorResult | TokenOutput]:
        """Do at most one unit of work (one batch, one decode step) and return what finished.

        Returns an empty list when nothing is ready yet (e.g. a batch still filling).
        """

    @abc.abstractmethod
    def has_work(self) -> bool:
        """True while queued or running requests exist."""

    def wait_hint(self) -> float | None:
        """Seconds the loop may sleep before `step()` has something to do; None: no timer."""
        return 0.0 if self.has_work() else None

    @abc.abstractmethod
    def cancel(self, request_id: str) -> list[TensorResult | TokenOutput]:
        """Drop a request and free what it holds at once; returns its final record, if any."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Release every resource. Pending requests must have been failed or finished."""

    def stats(self) -> dict[str, Any]:
        """Counters for /metrics and tests (batch sizes, KV blocks free, prefix hits...)."""
        return {}
