"""TensorRT engine: a serialized engine (`.plan`) run by the TensorRT 10 runtime on one CUDA
device, fed by the dynamic batcher it shares with the ONNX engine (`TensorEngine`).

The plan is either the version's weights (`weights = "model.plan"`) or built from ONNX and
cached (`[tensorrt] build_from = "model.onnx"`, see `engines.tensorrt.build`). Device memory is
PyTorch's: one device buffer per I/O tensor, sized for the profile's largest shapes and bound to
the execution context once at load, so a batch only sets input shapes, copies inputs in through
pinned staging buffers, enqueues, and copies the outputs it was asked for back into pinned host
memory, all on the engine's own CUDA stream, with one synchronisation per batch.

This module imports without TensorRT, CUDA or a GPU; `load()` reports what is missing as
`model_load_failed`.
"""
from __future__ import annotations

import logging
import math
import re
import threading
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from daemon.errors import InternalError, InvalidInput
from daemon.repository_spec import weights_sha256
from engines.base import ModelInfo, ModelSpec, TensorSpec
from engines.batching import BatchConfig
from engines.tensor_engine import DimNames, TensorEngine, load_error, merge_declared
from engines.tensorrt.build import (BuildOptions, ShapeRange, build_plan, cached_or_built,
                                    compute_profile, plan_cache_path, read_onnx)

__all__ = ["TensorRTEngine", "cuda_index", "import_tensorrt", "numpy_dtype"]

log = logging.getLogger(__name__)

# TensorRT DataType names -> numpy dtype names; BF16, FP8, INT4 and FP4 have no numpy twin.
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32",
           "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}
_LOGGERS: dict[str, Any] = {}
_LOGGER_LOCK = threading.Lock()             # models load on worker threads


def cuda_index(device: str) -> int:
    """The CUDA ordinal of "cuda" / "cuda:N"; `model_load_failed` for any other device."""
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise load_error(f"the tensorrt engine runs on CUDA devices (cuda:N) only; this engine "
                         f"process serves {device!r}")
    return int(match.group(1) or 0)


def import_tensorrt() -> Any:
    """The `tensorrt` module (10 or newer), or a `model_load_failed` error saying what to do."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:     # OSError: the package without libnvinfer
        raise load_error("the tensorrt engine needs the `tensorrt` Python package (TensorRT 10 "
                         "or newer, e.g. pip install 'ferry[tensorrt]'), which cannot be "
                         f"imported here: {exc}") from None
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 10:
        raise load_error(f"the tensorrt engine needs TensorRT 10 or newer, found "
                         f"{getattr(trt, '__version__', 'unknown')}")
    return trt


def numpy_dtype(dtype: Any, tensor: str) -> str:
    """The numpy dtype name of a `tensorrt.DataType` (or its name, e.g. "HALF")."""
    key = dtype if isinstance(dtype, str) else getattr(dtype, "name", str(dtype))
    key = key.rpartition(".")[2]
    if key not in _DTYPES:
        raise load_error(f"tensor {tensor!r} is {key}, which has no numpy equivalent; "
                         f"supported: {sorted(_DTYPES)}")
    return _DTYPES[key]


def _torch_for(index: int) -> Any:
    import torch

    if not torch.cuda.is_available():
        raise load_error("the tensorrt engine needs CUDA through PyTorch (device buffers and "
                         "streams), and this torch build or host has none")
    if index >= torch.cuda.device_count():
        raise load_error(f"cuda:{index} does not exist; {torch.cuda.device_count()} CUDA "
                         "devices are visible")
    return torch


def _logger(trt: Any) -> Any:
    """One TensorRT logger per process (TensorRT keeps the first one it sees), forwarding to
    `logging` and keeping the last errors for the messages clients get."""
    with _LOGGER_LOCK:
        if "logger" not in _LOGGERS:
            _LOGGERS["logger"] = _make_logger(trt)
        return _LOGGERS["logger"]


def _make_logger(trt: Any) -> Any:
    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.ERROR, severity.ERROR: logging.ERROR,
              severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG}

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._errors: deque[str] = deque(maxlen=4)

        def log(self, sev: Any, msg: str) -> None:
            level = levels.get(sev)             # VERBOSE is dropped
            if level is None:
                return
            if level >= logging.ERROR:
                self._errors.append(msg)
            log.log(level, "tensorrt: %s", msg)

        def recent_errors(self) -> list[str]:
            errors = list(self._errors)
            self._errors.clear()
            return errors

    return Logger()


class TensorRTEngine(TensorEngine):
    engine_name = "tensorrt"
    runtime_name = "tensorrt"

    def __init__(self) -> None:
        super().__init__()
        self._torch: Any = None
        self._index = 0
        self._logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._ranges: dict[str, ShapeRange] = {}        # input -> profile 0 shapes
        self._buffers: dict[str, Any] = {}              # I/O tensor -> flat device tensor
        self._staging: dict[str, tuple[Any, np.ndarray]] = {}   # input -> pinned tensor, view

    # -- lifecycle --------------------------------------------------------------------------

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        options = BuildOptions.from_section(spec.section("tensorrt"), spec.max_batch_size)
        source_path, from_onnx = _source(spec, options)
        index = cuda_index(device)
        trt = import_tensorrt()
        torch = _torch_for(index)
        self._torch, self._index, self._logger = torch, index, _logger(trt)
        try:
            with torch.cuda.device(index):
                self._stream = torch.cuda.Stream()      # creates the CUDA context TensorRT uses
                gpu = torch.cuda.get_device_name(index)
                source, dim_names, out_dims = self._deserialize(trt, spec, options, gpu,
                                                                source_path, from_onnx)
                inputs, outputs = self._engine_tensors(trt)
                self._configure(spec, inputs, outputs, dim_names, out_dims)
                self._check_profile()
                self._context = self._engine.create_execution_context()
                if self._context is None:
                    raise load_error(f"TensorRT cannot create an execution context on {device} "
                                     f"(out of device memory?): {self._errors()}")
                self._allocate()
        except BaseException:
            self.unload()                               # give the device memory back at once
            raise
        self._warm_up()
        log.info("loaded %s v%d on %s (%s, TensorRT %s, plan %s)", spec.name, spec.version,
                 device, gpu, trt.__version__, source)
        profile = {n: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)}
                   for n, r in self._ranges.items()}
        return ModelInfo(name=spec.name, version=spec.version, platform="tensorrt_plan",
                         kind="tensor", inputs=list(self._inputs.values()),
                         outputs=list(self._outputs.values()), max_batch_size=self._max_batch,
                         extra={"device": device, "gpu": gpu, "tensorrt": trt.__version__,
                                "plan": source, "profile": profile})

    def unload(self) -> None:
        # The context holds activation memory the engine's buffers outlive: drop it first.
        self._context = None
        self._engine = None
        self._runtime = None
        self._buffers.clear()
        self._staging.clear()
        self._stream = None
        self._reset_queue()

    # -- loading ----------------------------------------------------------------------------

    def _deserialize(self, trt: Any, spec: ModelSpec, options: BuildOptions, gpu: str,
                     path: Path, from_onnx: bool) -> tuple[str, DimNames, DimNames]:
        """Deserialize the version's plan (built from ONNX first if asked); returns where it
        came from ("plan", "cache" or "built") and the ONNX dim names where there is ONNX."""
        self._runtime = trt.Runtime(self._logger)
        if not from_onnx:
            self._engine = self._runtime.deserialize_cuda_engine(_read(path))
            if self._engine is None:
                raise load_error(f"TensorRT cannot deserialize {path} (built by another "
                                 f"TensorRT version or for another GPU?): {self._errors()}")
            return "plan", {}, {}
        graph = read_onnx(path)
        inputs = merge_declared(graph.inputs, spec.inputs, "input")
        preferred = BatchConfig.from_section(spec.section("batching"),
                                             spec.max_batch_size).preferred_batch_sizes
        profile = compute_profile(inputs, graph.dim_names, spec.max_batch_size, preferred,
                                  options)
        cache = plan_cache_path(spec.path, gpu, trt.__version__, weights_sha256(path),
                                options, profile) if options.cache else None

        def build() -> bytes:
            return build_plan(trt, self._logger, path, profile, options)

        plan, source = cached_or_built(cache, build)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None and source == "cache":
            log.warning("cached TensorRT plan %s does not deserialize (%s); rebuilding", cache,
                        self._errors())
            plan, source = cached_or_built(cache, build, force=True)
            self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise load_error(f"TensorRT cannot deserialize the engine it built from "
                             f"{path}: {self._errors()}")
        return source, graph.dim_names, graph.out_dims

    def _engine_tensors(self, trt: Any) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        engine, inputs, outputs = self._engine, {}, {}
        self._ranges = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.is_shape_inference_io(name):
                raise load_error(f"tensor {name!r} is a shape tensor, which the tensorrt "
                                 "engine does not support")
            spec = TensorSpec(name, numpy_dtype(engine.get_tensor_dtype(name), name),
                              tuple(engine.get_tensor_shape(name)))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs[name] = spec
                lo, opt, hi = engine.get_tensor_profile_shape(name, 0)
                self._ranges[name] = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
            else:
                outputs[name] = spec
        return inputs, outputs

    def _check_profile(self) -> None:
        """Every shape a valid request can have must lie inside profile 0."""
        for name, spec in self._inputs.items():
            rng = self._ranges[name]
            if self._max_batch and (rng.min[0] > 1 or rng.max[0] < self._max_batch):
                raise load_error(f"the plan's optimisation profile takes batches of "
                                 f"{rng.min[0]}..{rng.max[0]} for {name!r}, but max_batch_size "
                                 f"is {self._max_batch}")
            for axis, dim in enumerate(spec.shape):
                if dim != -1 and not rng.min[axis] <= dim <= rng.max[axis]:
                    raise load_error(f"input {name!r} axis {axis} is declared {dim}, outside "
                                     f"the plan's profile {rng.min[axis]}..{rng.max[axis]}")

    def _allocate(self) -> None:
        """Device buffers at the profile's largest shapes, bound once; pinned input staging."""
        torch, ctx = self._torch, self._context
        for name, rng in self._ranges.items():
            ctx.set_input_shape(name, rng.max)
        for name, spec in (*self._inputs.items(), *self._outputs.items()):
            shape = self._ranges[name].max if name in self._inputs else \
                tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise load_error(f"output {name!r} has a data-dependent shape {list(shape)}, "
                                 "which the tensorrt engine does not support")
            dtype = getattr(torch, spec.dtype)
            numel = max(math.prod(shape), 1)
            self._buffers[name] = torch.empty(numel, dtype=dtype, device=f"cuda:{self._index}")
            ctx.set_tensor_address(name, self._buffers[name].data_ptr())
            if name in self._inputs:
                pinned = torch.empty(numel, dtype=dtype, pin_memory=True)
                self._staging[name] = (pinned, pinned.numpy())

    # -- running ----------------------------------------------------------------------------

    def _loaded(self) -> bool:
        return self._context is not None

    def _check_input(self, name: str, arr: np.ndarray) -> None:
        rng = self._ranges[name]
        for axis, dim in enumerate(arr.shape):
            if (axis or not self._max_batch) and not rng.min[axis] <= dim <= rng.max[axis]:
                raise InvalidInput(f"input {name!r} axis {axis} must be in {rng.min[axis]}.."
                                   f"{rng.max[axis]} (the TensorRT optimisation profile), got "
                                   f"{dim}", code="invalid_shape", param=name)

    def _warmup_shape(self, spec: TensorSpec) -> list[int]:
        return list(self._ranges[spec.name].opt)

    def _execute(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch, ctx, stream = self._torch, self._context, self._stream
        with torch.cuda.device(self._index), torch.cuda.stream(stream):
            try:
                for name, arr in feeds.items():             # [B, ...] each
                    if not ctx.set_input_shape(name, arr.shape):
                        raise InvalidInput(f"input {name!r} shape {list(arr.shape)} is outside "
                                           f"the TensorRT profile: {self._errors()}",
                                           code="invalid_shape", param=name)
                    pinned, view = self._staging[name]
                    # numpy does the host copy (it takes any strides, read-only shared-memory
                    # views included); the device copy from pinned memory is a true async DMA.
                    np.copyto(view[:arr.size].reshape(arr.shape), arr, casting="equiv")
                    self._buffers[name][:arr.size].copy_(pinned[:arr.size], non_blocking=True)
                shapes = [tuple(ctx.get_tensor_shape(name)) for name in names]
                if not ctx.execute_async_v3(stream.cuda_stream):
                    raise InternalError(f"TensorRT execution failed: {self._errors()}",
                                        code="inference_failed")
                hosts = []
                for name, shape in zip(names, shapes):
                    buf, numel = self._buffers[name], math.prod(shape)
                    if numel > buf.numel():
                        raise InternalError(f"output {name!r} of shape {list(shape)} outgrew "
                                            "its buffer", code="inference_failed")
                    # Fresh pinned memory per output (torch caches it): the arrays leave with
                    # the results while the next batch runs.
                    host = torch.empty(shape, dtype=buf.dtype, pin_memory=True)
                    host.view(-1).copy_(buf[:numel], non_blocking=True)
                    hosts.append(host)
            finally:
                # Staging buffers are reused: no copy from them may still be in flight.
                stream.synchronize()
        return [host.numpy() for host in hosts]

    def _errors(self) -> str:
        return "; ".join(self._logger.recent_errors()) or "no detail from TensorRT"


def _source(spec: ModelSpec, options: BuildOptions) -> tuple[Path, bool]:
    """The file the engine comes from, and whether it is ONNX to build a plan from."""
    if options.build_from is not None:
        return spec.path / options.build_from, True
    path = spec.path / (spec.weights or "model.plan")
    if path.suffix == ".onnx":
        raise InvalidInput(f"weights {path.name!r} is an ONNX model: set [tensorrt] build_from "
                           f'= "{path.name}" to build a TensorRT engine from it',
                           code="invalid_model_config", param="tensorrt.build_from")
    return path, False


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise load_error(f"cannot read {path}: {exc}") from exc
