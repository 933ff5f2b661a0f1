"""ONNX Runtime engine: one model version on one device, fed by the dynamic batcher.

The compute loop calls `step()`; each step runs at most one batch. Validation, batching and
per-request results are `engines.tensor_engine.TensorEngine`'s, shared with TensorRT; this module
chooses execution providers, opens the session and runs a feed dict through it (with IO binding
on CUDA devices, `engines.onnx.iobinding`).
"""
from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

from daemon.errors import FerryError, InternalError, InvalidInput
from daemon.tensor_bytes import BYTES
from engines.base import ModelInfo, ModelSpec, TensorSpec
from engines.onnx.iobinding import CudaIOBinding
from engines.tensor_engine import DimNames, TensorEngine, load_error

__all__ = ["OnnxEngine", "select_providers", "session_options"]

log = logging.getLogger(__name__)

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
    "tensor(string)": BYTES,
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
        raise load_error(f"unknown device {device!r} (expected 'cpu' or 'cuda:N')")
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
        raise load_error(f"device {device} needs CUDAExecutionProvider, which this onnxruntime "
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


class OnnxEngine(TensorEngine):
    engine_name = "onnx"
    runtime_name = "onnxruntime"

    def __init__(self) -> None:
        super().__init__()
        self._session: ort.InferenceSession | None = None
        self._binding: CudaIOBinding | None = None

    @property
    def io_binding(self) -> CudaIOBinding | None:
        """The IO-binding runner on CUDA devices; None on the CPU (or with `[onnx] io_binding =
        false`)."""
        return self._binding

    # -- lifecycle --------------------------------------------------------------------------

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        options = spec.section("onnx")
        providers = select_providers(device, options, ort.get_available_providers())
        path = spec.path / (spec.weights or "model.onnx")
        try:
            session = ort.InferenceSession(str(path), sess_options=session_options(options),
                                           providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT's errors derive from Exception directly
            raise load_error(f"cannot load {path}: {exc}") from exc
        inputs, dim_names = _graph_tensors(session.get_inputs())
        outputs, out_dims = _graph_tensors(session.get_outputs())
        self._configure(spec, inputs, outputs, dim_names, out_dims)
        binding = options.get("io_binding", True)
        if not isinstance(binding, bool):
            raise InvalidInput("onnx.io_binding must be true or false",
                               code="invalid_model_config", param="onnx.io_binding")
        cuda = dict(providers).get("CUDAExecutionProvider")
        if cuda is not None and binding:
            self._binding = CudaIOBinding(session, cuda["device_id"])
        self._session = session
        if options.get("warmup", True):
            self._warm_up()
        log.info("loaded %s v%d on %s (providers %s, io binding %s)", spec.name, spec.version,
                 device, session.get_providers(), self._binding is not None)
        return ModelInfo(name=spec.name, version=spec.version, platform="onnxruntime_onnx",
                         kind="tensor", inputs=list(self._inputs.values()),
                         outputs=list(self._outputs.values()), max_batch_size=self._max_batch,
                         extra={"providers": session.get_providers(), "device": device,
                                "io_binding": self._binding is not None})

    def unload(self) -> None:
        self._session = None
        self._binding = None
        self._reset_queue()

    # -- running ----------------------------------------------------------------------------

    def _loaded(self) -> bool:
        return self._session is not None

    def _execute(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if any(a.dtype == object for a in feeds.values()):
            # string tensors live on the host: no IO binding for them
            feeds = {n: _ort_strings(n, a) if a.dtype == object else a for n, a in feeds.items()}
            return [_bytes_of(v) for v in self._session.run(names, feeds, _QUIET_RUN)]
        if self._binding is not None:
            return self._binding.run(names, feeds, _QUIET_RUN)
        return self._session.run(names, feeds, _QUIET_RUN)

    def _run_error(self, exc: Exception) -> FerryError:
        if isinstance(exc, FerryError):
            return exc
        if isinstance(exc, InvalidArgument):
            return InvalidInput(f"the model rejected the input: {exc}", code="invalid_input")
        node = _failed_node(exc)
        if node is not None:
            return InvalidInput(
                f"the model could not run on this input ({node}): its shapes or values are "
                "outside what the graph supports (model.toml max_shape can declare the bounds "
                "so that such inputs are refused before they reach the model)",
                code="model_rejected_input")
        return InternalError(f"inference failed: {exc}", code="inference_failed")


# onnxruntime logs every failed run to stderr itself; a failure is already answered (and, when
# it is the server's, logged) by Ferry, so a client sending bad inputs cannot flood the journal.
_QUIET_RUN = ort.RunOptions()
_QUIET_RUN.log_severity_level = 4
_NODE_FAILURE = re.compile(r"while running (\w+) node\. Name:'([^']*)' Status Message: "
                           r"(?:\S+:\d+ [^\n]*? was false\. )?([^\n]*)")


def _ort_strings(name: str, arr: np.ndarray) -> np.ndarray:
    """BYTES elements as the str objects onnxruntime's string tensors take (it would str() a
    bytes object into "b'...'"). ONNX strings are UTF-8: other bytes are the client's 400."""
    try:
        return np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(arr)
    except UnicodeDecodeError:
        raise InvalidInput(f"input {name!r}: this ONNX model takes strings, and an element is "
                           "not valid UTF-8", code="invalid_data", param=name) from None


def _bytes_of(value: np.ndarray) -> np.ndarray:
    """A string output as BYTES (an object array of UTF-8 bytes); other outputs unchanged."""
    if value.dtype != object and value.dtype.kind != "U":
        return value
    return np.vectorize(lambda s: s.encode("utf-8", "surrogatepass"), otypes=[object])(value)


def _failed_node(exc: Exception) -> str | None:
    """'<op> node <name>: <reason>' when onnxruntime failed inside one node of the graph on
    this request's data (a broadcast of mismatched dims, an index out of range): the graph
    loaded and ran its warm-up, so the input is what it cannot take. None otherwise (memory,
    provider and other failures stay server errors)."""
    if not isinstance(exc, (Fail, RuntimeException)):   # RuntimeException: e.g. Cast of "x"
        return None
    text = str(exc)
    match = _NODE_FAILURE.search(text)
    if match is None or "alloc" in text.lower():
        return None
    op, name, reason = match.groups()
    return f"{op} node {name!r}: {reason.strip()[:300]}"


def _graph_tensors(args: list[Any]) -> tuple[dict[str, TensorSpec], DimNames]:
    """TensorSpecs (-1 for dynamic dims) and symbolic dim names of ORT NodeArgs."""
    specs, names = {}, {}
    for arg in args:
        if arg.type not in _ORT_DTYPES:
            raise load_error(f"tensor {arg.name!r} has unsupported type {arg.type}")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
        specs[arg.name] = TensorSpec(arg.name, _ORT_DTYPES[arg.type], shape)
        names[arg.name] = tuple(d if isinstance(d, str) else None for d in arg.shape)
    return specs, names
