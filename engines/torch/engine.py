"""PyTorch engine: a TorchScript module (`.pt`) or an exported program (`.pt2`) on one device,
fed by the dynamic batcher it shares with ONNX Runtime and TensorRT (`TensorEngine`).

`engines.torch.program` loads the file and states its tensors; this module runs a feed dict
through it under `torch.inference_mode()`: host arrays become tensors without a copy on the
CPU (read-only shared-memory views are copied first, since a model may write its input in
place), and go through pinned staging memory to and from a CUDA device. A model that raises on
a request's data (an index out of range, shapes its ops cannot combine) is the client's 400
`model_rejected_input`, as an ONNX node failure is.

    [torch]
    num_threads = 4       # intra-op threads (FERRY_TORCH_THREADS overrides; 0: torch's default)
    compile = false       # exported programs: true or a torch.compile mode ("max-autotune")
    warmup = true         # run zeros at load: checks outputs against model.toml, warms kernels
"""
from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import numpy as np

from daemon.errors import FerryError, InternalError, InvalidInput
from engines.base import ModelInfo, ModelSpec, TensorSpec
from engines.tensor_engine import TensorEngine, load_error
from engines.torch.archive import ArchiveKind
from engines.torch.program import UNBOUNDED, Program, load_program

__all__ = ["TorchEngine", "TorchOptions", "THREADS_ENV"]

log = logging.getLogger(__name__)

THREADS_ENV = "FERRY_TORCH_THREADS"     # the LLM engine reads it too: one torch per process
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_KEYS = {"num_threads", "compile", "warmup"}
_PLATFORMS = {ArchiveKind.TORCHSCRIPT: "pytorch_libtorch", ArchiveKind.EXPORTED: "pytorch_export"}
# Failures of the model's own code on a request's data; anything else stays a server error.
_CLIENT_FAULTS = (RuntimeError, IndexError, ValueError, AssertionError)


class _OutputMismatch(Exception):
    """The model returned something its declared outputs do not describe."""


class TorchOptions:
    """The model's `[torch]` table, validated."""

    __slots__ = ("num_threads", "compile", "warmup")

    def __init__(self, section: dict[str, Any]) -> None:
        unknown = set(section) - _KEYS
        if unknown:
            raise _config(f"unknown [torch] keys {sorted(unknown)}; known: {sorted(_KEYS)}",
                          "torch")
        threads = section.get("num_threads", 0)
        if not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= 1024:
            raise _config("torch.num_threads must be an integer in 0..1024", "torch.num_threads")
        raw = os.environ.get(THREADS_ENV, "").strip()
        if raw:
            if not raw.isdigit():
                raise load_error(f"{THREADS_ENV}={raw!r} must be a non-negative integer")
            threads = int(raw) or threads
        mode = section.get("compile", False)
        if mode is True:
            mode = "default"
        if mode is not False and mode not in _COMPILE_MODES:
            raise _config(f"torch.compile must be true, false or one of {list(_COMPILE_MODES)}",
                          "torch.compile")
        warmup = section.get("warmup", True)
        if not isinstance(warmup, bool):
            raise _config("torch.warmup must be true or false", "torch.warmup")
        self.num_threads: int = threads
        self.compile: str | None = mode or None
        self.warmup: bool = warmup


def _config(message: str, param: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_model_config", param=param)


class TorchEngine(TensorEngine):
    engine_name = "torch"
    runtime_name = "pytorch"

    def __init__(self) -> None:
        super().__init__()
        self._torch: Any = None
        self._program: Program | None = None
        self._call: Any = None                  # the module, or its torch.compile wrapper
        self._device = "cpu"
        self._cuda = False
        self._threads = 0

    # -- lifecycle --------------------------------------------------------------------------

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        import torch

        opts = TorchOptions(spec.section("torch"))
        self._torch, self._device = torch, _device(torch, device)
        self._cuda = self._device.startswith("cuda")
        self._threads = opts.num_threads
        self._apply_threads()
        path = spec.path / (spec.weights or "model.pt")
        t0 = time.monotonic()
        program = load_program(spec, path, self._device)
        if opts.compile and program.kind is ArchiveKind.TORCHSCRIPT:
            raise _config("torch.compile applies to exported programs (.pt2); TorchScript runs "
                          "through its own optimiser", "torch.compile")
        self._configure(spec, program.inputs, program.outputs, program.dim_names,
                        program.out_dims)
        self._check_ranges(program)
        self._call = program.module
        if opts.compile:
            self._call = torch.compile(program.module, mode=opts.compile, dynamic=True)
        self._program = program
        try:
            if opts.warmup:
                self._probe()
            if opts.compile and self._max_batch > 1:
                # Dynamo specializes a batch of 1; a batch of 2 compiles the dynamic graph now,
                # not in the compute loop at the first batched request (seconds, every model
                # on this engine stalled behind it).
                self._probe(rows=2)
        except BaseException:
            self.unload()
            raise
        load_s = time.monotonic() - t0
        log.info("loaded %s v%d on %s (%s, %d threads, compile %s) in %.2f s", spec.name,
                 spec.version, self._device, program.kind.value, torch.get_num_threads(),
                 opts.compile, load_s)
        return ModelInfo(name=spec.name, version=spec.version, platform=_PLATFORMS[program.kind],
                         kind="tensor", inputs=list(self._inputs.values()),
                         outputs=list(self._outputs.values()), max_batch_size=self._max_batch,
                         extra={"device": self._device, "format": program.kind.value,
                                "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "compile": opts.compile, "load_s": round(load_s, 3),
                                "memory_bytes": program.memory_bytes})

    def unload(self) -> None:
        self._program = None
        self._call = None
        self._reset_queue()

    def _check_ranges(self, program: Program) -> None:
        """max_batch_size must lie inside the batch range the program was exported for."""
        if not self._max_batch:
            return
        for name, axes in program.ranges.items():
            lo, hi = axes[0] if axes else (1, UNBOUNDED)
            if lo > 1 or (hi != UNBOUNDED and hi < self._max_batch):
                raise load_error(f"the program takes batches of {lo}..{'any' if hi < 0 else hi} "
                                 f"for {name!r}, but max_batch_size is {self._max_batch}: "
                                 "export with dynamic_shapes={..: {0: Dim('batch', min=1, "
                                 f"max={self._max_batch})}}}}")

    def _probe(self, rows: int = 1) -> None:
        """Run zeros through the model: its outputs must be what model.toml and the program
        state. A run that raises is a mismatch only when every dim was fixed (then the zeros
        had a shape a request could have); with dynamic dims at 1 it may just be too small."""
        feeds = {name: self._warmup_input(spec) for name, spec in self._inputs.items()}
        if rows > 1:
            feeds = {name: np.repeat(arr, rows, axis=0) for name, arr in feeds.items()}
        for _ in range(2 if self._running().kind is ArchiveKind.TORCHSCRIPT else 1):
            try:                                 # TorchScript optimises on its second run
                self._execute(list(self._outputs), feeds)
            except _OutputMismatch as exc:
                raise load_error(f"model.toml and the model disagree: {exc}") from None
            except FerryError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever the model raises
                skip = 1 if self._max_batch else 0
                fixed = all(d != -1 for s in self._inputs.values() for d in s.shape[skip:])
                if fixed:
                    raise load_error(f"the model fails on zeros of the declared input shapes "
                                     f"({_first_line(exc)}): do model.toml's [[inputs]] "
                                     "match forward()?") from None
                log.warning("warm-up run failed (the model may reject zero inputs): %s",
                            _first_line(exc))
                return

    # -- running ----------------------------------------------------------------------------

    def _loaded(self) -> bool:
        return self._program is not None

    def _running(self) -> Program:
        if self._program is None:
            raise FerryError("model is not loaded", code="model_unavailable", status=503)
        return self._program

    def _warmup_shape(self, spec: TensorSpec) -> list[int]:
        axes = self._program.ranges.get(spec.name, ()) if self._program else ()
        lows = [max(lo, 1) for lo, _ in axes] or [1] * len(spec.shape)
        return [lo if d == -1 else d for d, lo in zip(spec.shape, lows)]

    def _check_input(self, name: str, arr: np.ndarray) -> None:
        axes = self._program.ranges.get(name, ()) if self._program else ()
        for axis, ((lo, hi), dim) in enumerate(zip(axes, arr.shape)):
            if dim < lo or (hi != UNBOUNDED and dim > hi):
                raise InvalidInput(f"input {name!r} axis {axis} must be in {lo}.."
                                   f"{'any' if hi < 0 else hi} (the range the program was "
                                   f"exported for), got {dim}", code="invalid_shape",
                                   param=name)

    def _execute(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch, program = self._torch, self._running()
        self._apply_threads()
        with torch.inference_mode():
            args = [self._to_device(feeds[name]) for name in program.inputs]
            if program.in_spec is not None:
                from torch.utils._pytree import tree_unflatten
                call_args, kwargs = tree_unflatten(args, program.in_spec)
                result = self._call(*call_args, **kwargs)
            else:
                result = self._call(*args)
            values = self._by_name(result)
            outs = [self._to_host(values[name], name) for name in names]
            if self._cuda:
                torch.cuda.current_stream(self._device).synchronize()
        return [t.numpy() for t in outs]

    def _to_device(self, arr: np.ndarray) -> Any:
        torch = self._torch
        if not arr.flags.writeable or any(s < 0 for s in arr.strides):
            arr = arr.copy()        # shared memory may be read-only; from_numpy needs strides >= 0
        host = torch.from_numpy(arr)
        if not self._cuda:
            return host
        pinned = torch.empty(arr.shape, dtype=host.dtype, pin_memory=True)
        pinned.copy_(host)
        return pinned.to(self._device, non_blocking=True)

    def _to_host(self, value: Any, name: str) -> Any:
        torch, spec = self._torch, self._outputs[name]
        if not isinstance(value, torch.Tensor):
            raise _OutputMismatch(f"output {name!r} is a {type(value).__name__}, not a tensor")
        got = str(value.dtype).removeprefix("torch.")
        if got != spec.dtype or value.dim() != len(spec.shape) or any(
                want not in (-1, have) for want, have in zip(spec.shape, value.shape)):
            raise _OutputMismatch(f"output {name!r} is {got} {list(value.shape)}, declared "
                                  f"{spec.dtype} {list(spec.shape)}")
        if not self._cuda:
            return value.detach()
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        return host

    def _by_name(self, result: Any) -> dict[str, Any]:
        program, names = self._running(), list(self._outputs)
        if isinstance(result, dict):
            keys = program.output_keys or tuple(names)
            missing = [k for k in keys if k not in result]
            if missing:
                raise _OutputMismatch(f"the model's dict lacks {missing}; it has "
                                      f"{sorted(map(str, result))}")
            return {name: result[key] for name, key in zip(names, keys)}
        values = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(values) != len(names):
            raise _OutputMismatch(f"the model returned {len(values)} values, model.toml "
                                  f"declares {len(names)} outputs {names}")
        return dict(zip(names, values))

    def _apply_threads(self) -> None:
        # Intra-op threads are per calling thread under OpenMP: set on the thread that runs.
        if self._threads and self._torch.get_num_threads() != self._threads:
            self._torch.set_num_threads(self._threads)

    def _run_error(self, exc: Exception) -> FerryError:
        if isinstance(exc, FerryError):
            return exc
        if isinstance(exc, _OutputMismatch):
            return InternalError(f"the model's output does not match its declaration: {exc}",
                                 code="inference_failed")
        text = str(exc)
        if isinstance(exc, MemoryError) or "out of memory" in text.lower():
            return InternalError(f"inference failed: {_first_line(exc)}", code="inference_failed")
        if isinstance(exc, _CLIENT_FAULTS):
            return InvalidInput(
                f"the model could not run on this input ({_first_line(exc)}): its shapes or "
                "values are outside what the model supports (model.toml max_shape can declare "
                "the bounds so that such inputs are refused before they reach the model)",
                code="model_rejected_input")
        return InternalError(f"inference failed: {exc}", code="inference_failed")


def _device(torch: Any, device: str) -> str:
    if device == "cpu":
        return device
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise load_error(f"unknown device {device!r} (expected 'cpu' or 'cuda:N')")
    index = int(match.group(1) or 0)
    if not torch.cuda.is_available():
        raise load_error(f"device {device} needs a CUDA build of PyTorch and a GPU; this torch "
                         f"({torch.__version__}) sees none")
    if index >= torch.cuda.device_count():
        raise load_error(f"cuda:{index} does not exist; {torch.cuda.device_count()} CUDA "
                         "devices are visible")
    return f"cuda:{index}"


def _first_line(exc: BaseException) -> str:
    """The reason only: TorchScript puts its serialized and original source (server paths) in
    front of the error's own last line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith("The following operation failed in the TorchScript"):
        lines = lines[-1:]
    return (lines[0] if lines else type(exc).__name__)[:300]
