"""ONNX Runtime engine: one model version on one device, fed by the dynamic batcher.

The compute loop calls `step()`; each step runs at most one batch. Inputs are validated in
`submit()` so a request that can never run is refused at once and never poisons a batch; if a
batch still fails inside ONNX Runtime, its requests are re-run one by one so only the culprit
gets the error.
"""
from __future__ import annotations

import logging
import re
import time
from collections import Counter
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from daemon.errors import Cancelled, DeadlineExceeded, FerryError, InternalError, InvalidInput
from engines.base import Engine, ModelInfo, ModelSpec, TensorRequest, TensorResult, TensorSpec
from engines.batching import BatchConfig, DynamicBatcher, Padding, collate, split

__all__ = ["OnnxEngine", "select_providers", "session_options"]

log = logging.getLogger(__name__)

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def select_providers(device: str, options: dict[str, Any],
                     available: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Execution providers for `device`, best first: TensorRT (when `[onnx] tensorrt` is set),
    CUDA on the device's index, then CPU for the ops the GPU providers lack."""
    if device == "cpu":
        return [("CPUExecutionProvider", {})]
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise _load_error(f"unknown device {device!r} (expected 'cpu' or 'cuda:N')")
    index = int(match.group(1) or 0)
    providers: list[tuple[str, dict[str, Any]]] = []
    trt = options.get("tensorrt")
    if trt:
        if "TensorrtExecutionProvider" in available:
            extra = trt if isinstance(trt, dict) else {}
            providers.append(("TensorrtExecutionProvider", {**extra, "device_id": index}))
        else:
            log.warning("onnx.tensorrt is set but TensorrtExecutionProvider is not available; "
                        "using CUDA on %s", device)
    if "CUDAExecutionProvider" not in available:
        # Silently running a GPU-placed model on the CPU would wreck latency: refuse instead.
        raise _load_error(f"device {device} needs CUDAExecutionProvider, which this onnxruntime "
                          f"lacks (install onnxruntime-gpu); available: {list(available)}")
    cuda = options.get("cuda") if isinstance(options.get("cuda"), dict) else {}
    providers.append(("CUDAExecutionProvider", {**cuda, "device_id": index}))
    providers.append(("CPUExecutionProvider", {}))
    return providers


def session_options(options: dict[str, Any]) -> ort.SessionOptions:
    """Session options from the model's `[onnx]` table."""
    so = ort.SessionOptions()
    for key, attr in (("intra_op_threads", "intra_op_num_threads"),
                      ("inter_op_threads", "inter_op_num_threads")):
        value = options.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInput(f"onnx.{key} must be a non-negative integer",
                                   code="invalid_model_config", param=f"onnx.{key}")
            setattr(so, attr, value)
    level = options.get("graph_optimization", "all")
    if level not in _OPT_LEVELS:
        raise InvalidInput(f"onnx.graph_optimization must be one of {sorted(_OPT_LEVELS)}",
                           code="invalid_model_config", param="onnx.graph_optimization")
    so.graph_optimization_level = _OPT_LEVELS[level]
    if options.get("allow_spinning") is False:
        # Spinning threads cut latency but burn idle cores; hosts sharing CPUs can turn it off.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class OnnxEngine(Engine):
    kind = "tensor"

    def __init__(self) -> None:
        self._session: ort.InferenceSession | None = None
        self._inputs: dict[str, TensorSpec] = {}
        self._outputs: dict[str, TensorSpec] = {}
        self._dim_names: dict[str, tuple[str | None, ...]] = {}   # input -> symbolic dim names
        self._max_batch = 0
        self._batcher = DynamicBatcher(BatchConfig())
        self._counts: Counter[str] = Counter()
        self._batch_sizes: Counter[int] = Counter()
        self._compute_s = 0.0

    # -- lifecycle --------------------------------------------------------------------------

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        options = spec.section("onnx")
        providers = select_providers(device, options, ort.get_available_providers())
        path = spec.path / (spec.weights or "model.onnx")
        try:
            session = ort.InferenceSession(str(path), sess_options=session_options(options),
                                           providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT's errors derive from Exception directly
            raise _load_error(f"cannot load {path}: {exc}") from exc
        inputs, self._dim_names = _graph_tensors(session.get_inputs())
        outputs, out_dims = _graph_tensors(session.get_outputs())
        self._inputs = _merge_declared(inputs, spec.inputs, "input")
        self._outputs = _merge_declared(outputs, spec.outputs, "output")
        self._max_batch = spec.max_batch_size
        self._check_batch_dim()
        config = BatchConfig.from_section(spec.section("batching"), spec.max_batch_size)
        self._batcher = DynamicBatcher(config, self._padding(config.pad_values, out_dims))
        self._session = session
        if options.get("warmup", True):
            self._warm_up()
        log.info("loaded %s v%d on %s (providers %s)", spec.name, spec.version, device,
                 session.get_providers())
        return ModelInfo(name=spec.name, version=spec.version, platform="onnxruntime_onnx",
                         kind="tensor", inputs=list(self._inputs.values()),
                         outputs=list(self._outputs.values()), max_batch_size=self._max_batch,
                         extra={"providers": session.get_providers(), "device": device})

    def unload(self) -> None:
        self._session = None
        self._batcher = DynamicBatcher(self._batcher.config, self._batcher.padding)

    # -- requests ---------------------------------------------------------------------------

    def submit(self, request: TensorRequest) -> None:  # type: ignore[override]
        if self._session is None:
            raise FerryError("model is not loaded", code="model_unavailable", status=503)
        if not isinstance(request, TensorRequest):
            raise InvalidInput("the onnx engine serves tensor requests only")
        self._validate(request)
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
                "compute_s": self._compute_s}

    # -- internals --------------------------------------------------------------------------

    def _run(self, batch: list[TensorRequest], start: float) -> list[TensorResult]:
        batched = self._max_batch > 0
        feeds = collate(batch, self._batcher.padding, batched)
        wanted = None if any(r.outputs is None for r in batch) else \
            {n for r in batch for n in r.outputs}
        names = [n for n in self._outputs if wanted is None or n in wanted]
        t0 = time.monotonic()
        try:
            values = self._session.run(names, feeds)
        except Exception as exc:  # noqa: BLE001 - ORT's errors derive from Exception directly
            if len(batch) > 1:
                # One bad request must not fail its batch-mates: re-run each alone.
                return [res for req in batch for res in self._run([req], start)]
            self._counts["failed"] += 1
            log.warning("request %s failed in onnxruntime: %s", batch[0].id, exc)
            return [TensorResult(batch[0].id, error=_run_error(exc),
                                 queue_s=start - batch[0].arrival)]
        compute = time.monotonic() - t0
        rows = sum(next(iter(r.inputs.values())).shape[0] for r in batch) if batched else 1
        self._batch_sizes[rows] += 1
        self._compute_s += compute
        try:
            outputs = split(dict(zip(names, values)), batch, self._batcher.padding, batched)
        except FerryError as exc:               # the graph broke its batch-dim promise
            self._counts["failed"] += len(batch)
            return [TensorResult(r.id, error=exc, queue_s=start - r.arrival) for r in batch]
        return [TensorResult(req.id, outputs=out, queue_s=start - req.arrival, compute_s=compute,
                             batch_size=rows) for req, out in zip(batch, outputs)]

    def _expired(self, request: TensorRequest, now: float) -> TensorResult:
        self._counts["expired"] += 1
        return TensorResult(request.id, queue_s=now - request.arrival, error=DeadlineExceeded(
            f"request {request.id} passed its deadline after {now - request.arrival:.3f} s queued"))

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
            if not isinstance(arr, np.ndarray) or arr.dtype.name != spec.dtype:
                got = arr.dtype.name if isinstance(arr, np.ndarray) else type(arr).__name__
                raise InvalidInput(f"input {name!r} must be {spec.dtype}, got {got}",
                                   code="invalid_dtype", param=name)
            if arr.ndim != len(spec.shape) or 0 in arr.shape or any(
                    want not in (-1, got) for want, got in zip(spec.shape, arr.shape)):
                raise InvalidInput(f"input {name!r} must have shape {list(spec.shape)} (-1: any "
                                   f"size > 0), got {list(arr.shape)}", code="invalid_shape",
                                   param=name)
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
                raise _load_error(f"max_batch_size {self._max_batch} needs a dynamic first "
                                  f"dimension, but {spec.name!r} has shape {list(spec.shape)}")

    def _padding(self, values: dict[str, int | float],
                 out_dims: dict[str, tuple[str | None, ...]]) -> Padding | None:
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
                  if self._dim_names[n][a] is not None}
        unpad = {out: tuple((axis, *source[dim]) for axis, dim in enumerate(dims)
                            if axis and dim in source)
                 for out, dims in out_dims.items()}
        return Padding(values=dict(values), axes=axes, unpad={k: v for k, v in unpad.items() if v})

    def _warm_up(self) -> None:
        """One tiny run so the first real request does not pay for kernel selection."""
        feeds = {name: np.zeros([1 if d == -1 else d for d in spec.shape], dtype=spec.dtype)
                 for name, spec in self._inputs.items()}
        try:
            self._session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - a model may reject all-zero input; not fatal
            log.warning("warm-up run failed (the model may reject zero inputs): %s", exc)


def _graph_tensors(args: list[Any]) -> tuple[dict[str, TensorSpec],
                                             dict[str, tuple[str | None, ...]]]:
    """TensorSpecs (-1 for dynamic dims) and symbolic dim names of ORT NodeArgs."""
    specs, names = {}, {}
    for arg in args:
        if arg.type not in _ORT_DTYPES:
            raise _load_error(f"tensor {arg.name!r} has unsupported type {arg.type}")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
        specs[arg.name] = TensorSpec(arg.name, _ORT_DTYPES[arg.type], shape)
        names[arg.name] = tuple(d if isinstance(d, str) else None for d in arg.shape)
    return specs, names


def _merge_declared(graph: dict[str, TensorSpec], declared: tuple[TensorSpec, ...],
                    what: str) -> dict[str, TensorSpec]:
    """The graph's tensors, refined by model.toml's declarations where they agree."""
    merged = dict(graph)
    for spec in declared:
        have = graph.get(spec.name)
        if have is None:
            raise _load_error(f"model.toml declares {what} {spec.name!r}, which the graph "
                              f"lacks; the graph has {sorted(graph)}")
        if have.dtype != spec.dtype or len(have.shape) != len(spec.shape) or any(
                -1 not in (g, d) and g != d for g, d in zip(have.shape, spec.shape)):
            raise _load_error(f"model.toml declares {what} {spec.name!r} as {spec.dtype} "
                              f"{list(spec.shape)}, the graph has {have.dtype} {list(have.shape)}")
        # Keep whichever side fixes a dim: the declaration may narrow a dynamic graph dim.
        shape = tuple(g if d == -1 else d for g, d in zip(have.shape, spec.shape))
        merged[spec.name] = TensorSpec(spec.name, spec.dtype, shape)
    return merged


def _run_error(exc: Exception) -> FerryError:
    if isinstance(exc, InvalidArgument):
        return InvalidInput(f"the model rejected the input: {exc}", code="invalid_input")
    return InternalError(f"inference failed: {exc}", code="inference_failed")


def _load_error(message: str) -> FerryError:
    return FerryError(message, code="model_load_failed", status=422)
