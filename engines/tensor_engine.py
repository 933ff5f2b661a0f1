"""What every fixed-graph tensor engine shares: request validation, the dynamic batcher, running
a batch, splitting its outputs per request, and the counters behind `stats()`.

ONNX Runtime (`engines.onnx.engine`) and TensorRT (`engines.tensorrt.engine`) differ only in how
they load a model and run one feed dict; everything a client can observe about a tensor request
(error codes, batching, deadlines, cancellation) lives here, once. Inputs are validated in
`submit()` so a request that can never run is refused at once and never poisons a batch; if a
batch still fails inside the runtime, its requests are re-run one by one so only the culprit
gets the error.
"""
from __future__ import annotations

import abc
import logging
import time
from collections import Counter
from typing import Any

import numpy as np

from daemon.errors import Cancelled, DeadlineExceeded, FerryError, InternalError, InvalidInput
from daemon.tensor_bytes import BYTES, wire_dtype
from engines.base import Engine, ModelSpec, TensorRequest, TensorResult, TensorSpec
from engines.batching import BatchConfig, DynamicBatcher, Padding, collate, split
from engines.inference_stats import InferenceStats

__all__ = ["TensorEngine", "DimNames", "merge_declared", "load_error"]

log = logging.getLogger(__name__)

# input or output name -> one symbolic name per axis ("batch", "sequence"), None where unnamed
DimNames = dict[str, tuple[str | None, ...]]


class TensorEngine(Engine):
    """A model whose inputs and outputs are named numpy tensors, run a batch at a time.

    Subclasses load the model, call `_configure()` with the tensors it declares, and implement
    `_loaded()` and `_execute()`.
    """

    kind = "tensor"
    engine_name = "tensor"          # in client-facing messages: "the onnx engine ..."
    runtime_name = "the runtime"    # in log lines: "failed in onnxruntime"

    def __init__(self) -> None:
        self._inputs: dict[str, TensorSpec] = {}
        self._outputs: dict[str, TensorSpec] = {}
        self._model = ""                        # the model's name, for error messages
        self._dim_names: DimNames = {}          # input -> symbolic dim names
        self._max_batch = 0
        self._batcher = DynamicBatcher(BatchConfig())
        self._counts: Counter[str] = Counter()
        self._batch_sizes: Counter[int] = Counter()
        self._compute_s = 0.0
        self._inference = InferenceStats()      # Triton's statistics extension

    # -- what a runtime provides ------------------------------------------------------------

    @abc.abstractmethod
    def _loaded(self) -> bool:
        """True between a successful `load()` and `unload()`."""

    @abc.abstractmethod
    def _execute(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; return the outputs `names`, in that order, as host arrays."""

    def _run_error(self, exc: Exception) -> FerryError:
        """The error a request gets when `_execute` raised `exc` for it alone."""
        if isinstance(exc, FerryError):
            return exc
        return InternalError(f"inference failed: {exc}", code="inference_failed")

    def _check_input(self, name: str, arr: np.ndarray) -> None:
        """Runtime-specific limits on one input that passed the dtype and shape checks."""

    def _warmup_input(self, spec: TensorSpec) -> np.ndarray:
        shape = self._warmup_shape(spec)
        if spec.dtype == BYTES:                 # "0" parses as a number too
            return np.full(shape, b"0", dtype=object)
        return np.zeros(shape, dtype=spec.dtype)

    def _warmup_shape(self, spec: TensorSpec) -> list[int]:
        return [1 if d == -1 else d for d in spec.shape]

    # -- load-time configuration ------------------------------------------------------------

    def _configure(self, spec: ModelSpec, inputs: dict[str, TensorSpec],
                   outputs: dict[str, TensorSpec], dim_names: DimNames,
                   out_dims: DimNames) -> None:
        """Adopt the model's tensors (refined by model.toml) and build the batcher.

        Raises `model_load_failed` / `invalid_model_config` errors; changes nothing the engine
        serves with until the subclass marks itself loaded.
        """
        self._model = spec.name
        self._dim_names = dim_names
        self._inputs = merge_declared(inputs, spec.inputs, "input")
        self._outputs = merge_declared(outputs, spec.outputs, "output")
        self._max_batch = spec.max_batch_size
        self._check_batch_dim()
        config = BatchConfig.from_section(spec.section("batching"), spec.max_batch_size)
        self._batcher = DynamicBatcher(config, self._padding(config.pad_values, out_dims))

    def _reset_queue(self) -> None:
        self._batcher = DynamicBatcher(self._batcher.config, self._batcher.padding)

    # -- requests ---------------------------------------------------------------------------

    def submit(self, request: TensorRequest) -> None:  # type: ignore[override]
        if not self._loaded():
            raise FerryError("model is not loaded", code="model_unavailable", status=503)
        if not isinstance(request, TensorRequest):
            raise InvalidInput(f"the {self.engine_name} engine serves tensor requests only")
        try:
            self._validate(request)
        except FerryError:
            self._inference.failed(0.0)
            raise
        if not request.arrival:
            request.arrival = time.monotonic()
        self._batcher.add(request)
        self._counts["requests"] += 1

    def has_work(self) -> bool:
        return len(self._batcher) > 0

    def wait_hint(self) -> float | None:
        return self._batcher.wait_hint(time.monotonic())

    def step(self) -> list[TensorResult]:  # type: ignore[override]
        now = time.monotonic()
        if not self._batcher.ready(now):
            return []
        batch, expired = self._batcher.take(now)
        results = [self._expired(req, now) for req in expired]
        if batch:
            results.extend(self._run(batch, now))
        return results

    def cancel(self, request_id: str) -> list[TensorResult]:  # type: ignore[override]
        request = self._batcher.remove(request_id)
        if request is None:
            return []
        self._counts["cancelled"] += 1
        return [TensorResult(request_id, error=Cancelled(f"request {request_id} cancelled"))]

    def stats(self) -> dict[str, Any]:
        batches = sum(self._batch_sizes.values())
        rows = sum(size * n for size, n in self._batch_sizes.items())
        return {"requests": self._counts["requests"], "batches": batches,
                "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
                "avg_batch_size": rows / batches if batches else 0.0,
                "queued": len(self._batcher), "expired": self._counts["expired"],
                "cancelled": self._counts["cancelled"], "failed": self._counts["failed"],
                "compute_s": self._compute_s, "inference": self._inference.to_wire()}

    # -- running a batch --------------------------------------------------------------------

    def _run(self, batch: list[TensorRequest], start: float) -> list[TensorResult]:
        batched = self._max_batch > 0
        t_in = time.monotonic()
        feeds = collate(batch, self._batcher.padding, batched)
        wanted = None if any(r.outputs is None for r in batch) else \
            {n for r in batch for n in r.outputs}
        names = [n for n in self._outputs if wanted is None or n in wanted]
        t0 = time.monotonic()
        try:
            values = self._execute(names, feeds)
        except Exception as exc:  # noqa: BLE001 - runtimes raise their own Exception types
            if len(batch) > 1:
                # One bad request must not fail its batch-mates: re-run each alone.
                return [res for req in batch for res in self._run([req], start)]
            self._counts["failed"] += 1
            self._inference.failed(time.monotonic() - batch[0].arrival)
            log.warning("request %s failed in %s: %s", batch[0].id, self.runtime_name, exc)
            return [TensorResult(batch[0].id, error=self._run_error(exc),
                                 queue_s=start - batch[0].arrival)]
        t1 = time.monotonic()
        compute = t1 - t0
        rows_of = [next(iter(r.inputs.values())).shape[0] if batched else 1 for r in batch]
        rows = sum(rows_of) if batched else 1
        self._batch_sizes[rows] += 1
        self._compute_s += compute
        try:
            outputs = split(dict(zip(names, values)), batch, self._batcher.padding, batched)
        except FerryError as exc:               # the graph broke its batch-dim promise
            self._counts["failed"] += len(batch)
            for r in batch:
                self._inference.failed(time.monotonic() - r.arrival)
            return [TensorResult(r.id, error=exc, queue_s=start - r.arrival) for r in batch]
        t2 = time.monotonic()
        phases = (t0 - t_in, compute, t2 - t1)
        self._inference.executed(rows, phases)
        for req, n in zip(batch, rows_of):
            self._inference.succeeded(n, t2 - req.arrival, start - req.arrival, phases)
        return [TensorResult(req.id, outputs=out, queue_s=start - req.arrival, compute_s=compute,
                             batch_size=rows) for req, out in zip(batch, outputs)]

    def _expired(self, request: TensorRequest, now: float) -> TensorResult:
        self._counts["expired"] += 1
        self._inference.failed(now - request.arrival)
        return TensorResult(request.id, queue_s=now - request.arrival, error=DeadlineExceeded(
            f"request {request.id} passed its deadline after {now - request.arrival:.3f} s queued"))

    def _warm_up(self) -> None:
        """One tiny run so the first real request does not pay for kernel selection."""
        feeds = {name: self._warmup_input(spec) for name, spec in self._inputs.items()}
        try:
            self._execute(list(self._outputs), feeds)
        except Exception as exc:  # noqa: BLE001 - a model may reject all-zero input; not fatal
            log.warning("warm-up run failed (the model may reject zero inputs): %s", exc)

    # -- validation -------------------------------------------------------------------------

    def _validate(self, request: TensorRequest) -> None:
        for name in request.inputs:
            if name not in self._inputs:
                raise InvalidInput(f"unknown input {name!r}; the model takes "
                                   f"{sorted(self._inputs)}", code="unknown_input", param=name)
        sizes: dict[str, int] = {}
        for name, spec in self._inputs.items():
            arr = request.inputs.get(name)
            if arr is None:
                raise InvalidInput(f"missing input {name!r}", code="missing_input", param=name)
            if not isinstance(arr, np.ndarray) or wire_dtype(arr) != spec.dtype:
                got = wire_dtype(arr) if isinstance(arr, np.ndarray) else type(arr).__name__
                # Triton's wording, which its clients match
                raise InvalidInput(f"inference input {name!r} data-type is {got!r}, but model "
                                   f"{self._model!r} expects {spec.dtype!r}",
                                   code="invalid_dtype", param=name)
            if arr.ndim != len(spec.shape) or 0 in arr.shape or any(
                    want not in (-1, got) for want, got in zip(spec.shape, arr.shape)):
                raise InvalidInput(f"unexpected shape for input {name!r} for model "
                                   f"{self._model!r}. Expected {list(spec.shape)} (-1: any "
                                   f"size > 0), got {list(arr.shape)}", code="invalid_shape",
                                   param=name)
            if spec.max_shape is not None and any(
                    0 < bound < got for bound, got in zip(spec.max_shape, arr.shape)):
                raise InvalidInput(f"input {name!r} has shape {list(arr.shape)}; the model takes "
                                   f"at most {list(spec.max_shape)} (-1: any)",
                                   code="invalid_shape", param=name)
            self._check_input(name, arr)
            # Axes sharing a symbolic name (batch, sequence) must agree across inputs.
            for axis, dim in enumerate(self._dim_names.get(name, ())):
                if dim is not None and sizes.setdefault(dim, arr.shape[axis]) != arr.shape[axis]:
                    raise InvalidInput(f"input {name!r} axis {axis} ({dim}) is {arr.shape[axis]} "
                                       f"but another input has {sizes[dim]}",
                                       code="invalid_shape", param=name)
        self._validate_batch(request)
        if request.outputs is not None and not request.outputs:
            request.outputs = None              # none named: all of them, as in KServe v2
        if request.outputs is not None:
            for name in request.outputs:
                if name not in self._outputs:
                    raise InvalidInput(f"unknown output {name!r}; the model has "
                                       f"{sorted(self._outputs)}", code="unknown_output",
                                       param=name)

    def _validate_batch(self, request: TensorRequest) -> None:
        if not self._max_batch or not request.inputs:
            return
        rows = {arr.shape[0] for arr in request.inputs.values()}
        if len(rows) > 1:
            raise InvalidInput(f"inputs disagree on the batch size: {sorted(rows)}",
                               code="invalid_shape")
        if (n := rows.pop()) > self._max_batch:
            raise InvalidInput(f"batch of {n} exceeds max_batch_size {self._max_batch}",
                               code="batch_too_large")

    def _check_batch_dim(self) -> None:
        if not self._max_batch:
            return
        for spec in (*self._inputs.values(), *self._outputs.values()):
            if not spec.shape or spec.shape[0] != -1:
                raise load_error(f"max_batch_size {self._max_batch} needs a dynamic first "
                                 f"dimension, but {spec.name!r} has shape {list(spec.shape)}")

    def _padding(self, values: dict[str, int | float], out_dims: DimNames) -> Padding | None:
        if not values:
            return None
        axes: dict[str, tuple[int, ...]] = {}
        for name in values:
            if name not in self._inputs:
                raise InvalidInput(f"batching.pad_dims names {name!r}, which is not an input",
                                   code="invalid_model_config", param="batching.pad_dims")
            axes[name] = tuple(i for i, d in enumerate(self._inputs[name].shape) if i and d == -1)
            if not axes[name]:
                raise InvalidInput(f"batching.pad_dims: input {name!r} has no dynamic axis "
                                   "to pad", code="invalid_model_config", param="batching.pad_dims")
        # An output axis named like a padded input axis (e.g. "sequence") is cut back per request.
        source = {self._dim_names[n][a]: (n, a) for n in axes for a in axes[n]
                  if n in self._dim_names and self._dim_names[n][a] is not None}
        unpad = {out: tuple((axis, *source[dim]) for axis, dim in enumerate(dims)
                            if axis and dim in source)
                 for out, dims in out_dims.items()}
        return Padding(values=dict(values), axes=axes, unpad={k: v for k, v in unpad.items() if v})


def merge_declared(graph: dict[str, TensorSpec], declared: tuple[TensorSpec, ...],
                   what: str) -> dict[str, TensorSpec]:
    """The model's tensors, refined by model.toml's declarations where they agree."""
    merged = dict(graph)
    for spec in declared:
        have = graph.get(spec.name)
        if have is None:
            raise load_error(f"model.toml declares {what} {spec.name!r}, which the graph "
                             f"lacks; the graph has {sorted(graph)}")
        if have.dtype != spec.dtype or len(have.shape) != len(spec.shape) or any(
                -1 not in (g, d) and g != d for g, d in zip(have.shape, spec.shape)):
            raise load_error(f"model.toml declares {what} {spec.name!r} as {spec.dtype} "
                             f"{list(spec.shape)}, the graph has {have.dtype} {list(have.shape)}")
        # Keep whichever side fixes a dim: the declaration may narrow a dynamic graph dim.
        shape = tuple(g if d == -1 else d for g, d in zip(have.shape, spec.shape))
        merged[spec.name] = TensorSpec(spec.name, spec.dtype, shape, spec.max_shape)
    return merged


def load_error(message: str) -> FerryError:
    return FerryError(message, code="model_load_failed", status=422)
