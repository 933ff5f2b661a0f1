"""Building TensorRT engines (`.plan`) from ONNX, and caching them beside the model.

A model opts in with `[tensorrt] build_from = "model.onnx"` in its model.toml. The engine is
built for one optimisation profile: the batch dimension runs from 1 through `max_batch_size`
with TensorRT's kernels tuned for the batch the dynamic batcher aims for (the largest preferred
batch size); every other dynamic dimension takes its range from `[tensorrt] dims`, keyed by the
ONNX symbolic dimension name (`sequence = [1, 128, 256]`) or by `"<input>:<axis>"`.

Builds take seconds to minutes and a plan only runs on the GPU model and TensorRT version that
built it, so plans are cached in `<version dir>/.trt-cache/<GPU name>-trt<version>/`, named by
a hash of the ONNX file, the build options and the profile. Engines on identical GPUs share one
build through a file lock. The profile and option checks here are pure (no TensorRT, no GPU).

    [tensorrt]
    build_from = "model.onnx"
    fp16 = false                    # allow FP16 kernels
    workspace_mb = 1024             # builder scratch memory limit; default: TensorRT's
    opt_batch_size = 16             # default: the largest [batching] preferred size, else max
    optimization_level = 3          # 0..5, TensorRT's builder optimisation level
    cache = true
    dims = { sequence = [1, 128, 256] }
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from daemon.errors import InvalidInput
from engines.base import TensorSpec
from engines.tensor_engine import DimNames, load_error

__all__ = ["CACHE_DIR", "TRT_DTYPES", "BuildOptions", "ShapeRange", "OnnxGraph", "read_onnx",
           "compute_profile", "cache_dir_name", "plan_cache_path", "cached_or_built",
           "build_plan"]

log = logging.getLogger(__name__)

CACHE_DIR = ".trt-cache"
# numpy dtype names TensorRT engines take and return (TensorRT has no float64 or int16 I/O).
TRT_DTYPES = frozenset({"float32", "float16", "int8", "int32", "int64", "bool", "uint8"})
_KEYS = ("build_from", "fp16", "workspace_mb", "opt_batch_size", "optimization_level", "cache",
         "dims")


@dataclass(slots=True, frozen=True)
class BuildOptions:
    """The validated `[tensorrt]` table of a model.toml."""

    build_from: str | None = None
    fp16: bool = False
    workspace_mb: int | None = None
    opt_batch_size: int | None = None
    optimization_level: int | None = None
    cache: bool = True
    dims: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @classmethod
    def from_section(cls, section: dict[str, Any], max_batch_size: int) -> BuildOptions:
        """Raise `InvalidInput` (invalid_model_config) naming the bad key."""
        for key in section:
            if key not in _KEYS:
                raise _config_error(key, f"unknown key; [tensorrt] takes {', '.join(_KEYS)}")
        build_from = section.get("build_from")
        if build_from is not None and (
                not isinstance(build_from, str) or not build_from or os.path.isabs(build_from)
                or ".." in PurePosixPath(build_from).parts or "\\" in build_from):
            raise _config_error("build_from", "must be a file name inside the version directory")
        for key in ("fp16", "cache"):
            if not isinstance(section.get(key, False), bool):
                raise _config_error(key, "must be true or false")
        workspace = _optional_int(section, "workspace_mb", 1, None)
        level = _optional_int(section, "optimization_level", 0, 5)
        opt = _optional_int(section, "opt_batch_size", 1, max(max_batch_size, 1))
        if opt is not None and not max_batch_size:
            raise _config_error("opt_batch_size", "needs max_batch_size > 0")
        return cls(build_from=build_from, fp16=section.get("fp16", False),
                   workspace_mb=workspace, opt_batch_size=opt, optimization_level=level,
                   cache=section.get("cache", True), dims=_dims(section.get("dims", {})))


@dataclass(slots=True, frozen=True)
class ShapeRange:
    """One input's shapes in an optimisation profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(slots=True)
class OnnxGraph:
    """The inputs and outputs of an ONNX file, read without running it."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    dim_names: DimNames                 # input -> symbolic dim names
    out_dims: DimNames                  # output -> symbolic dim names


def read_onnx(path: Path) -> OnnxGraph:
    """Graph inputs (initializers left out) and outputs, with -1 for dynamic dims."""
    try:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
    except ImportError:
        raise load_error("building a TensorRT engine from ONNX needs the `onnx` package "
                         "(pip install onnx)") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf and OS errors alike mean "unreadable"
        raise load_error(f"cannot read {path}: {exc}") from exc
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    tensors = []
    for values in ([v for v in graph.input if v.name not in weights], list(graph.output)):
        specs, names = {}, {}
        for value in values:
            tensor = value.type.tensor_type
            if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
                raise load_error(f"ONNX tensor {value.name!r} has no tensor type with a shape")
            try:
                dtype = tensor_dtype_to_np_dtype(tensor.elem_type).name
            except (KeyError, TypeError, ValueError):
                dtype = f"ONNX element type {tensor.elem_type}"
            if dtype not in TRT_DTYPES:
                raise load_error(f"ONNX tensor {value.name!r} is {dtype}, which TensorRT "
                                 f"engines do not take; supported: {sorted(TRT_DTYPES)}")
            dims = tensor.shape.dim
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                          for d in dims)
            specs[value.name] = TensorSpec(value.name, dtype, shape)
            names[value.name] = tuple(d.dim_param or None for d in dims)
        tensors.append((specs, names))
    (inputs, dim_names), (outputs, out_dims) = tensors
    return OnnxGraph(inputs, outputs, dim_names, out_dims)


def compute_profile(inputs: dict[str, TensorSpec], dim_names: DimNames, max_batch_size: int,
                    preferred: tuple[int, ...], options: BuildOptions) -> dict[str, ShapeRange]:
    """The optimisation profile: (min, opt, max) of every input.

    The batch dim (dim 0 when `max_batch_size` > 0) spans 1..max_batch_size, tuned for the
    largest preferred batch size: under load the batcher sends batches of that size. Fixed dims
    are fixed; other dynamic dims come from `options.dims`.
    """
    opt_batch = options.opt_batch_size or (max(preferred) if preferred else max_batch_size)
    profile = {}
    for name, spec in inputs.items():
        ranges = []
        for axis, dim in enumerate(spec.shape):
            if axis == 0 and max_batch_size:
                if dim != -1:
                    raise load_error(f"max_batch_size {max_batch_size} needs a dynamic first "
                                     f"dimension, but {name!r} has shape {list(spec.shape)}")
                ranges.append((1, opt_batch, max_batch_size))
            elif dim != -1:
                ranges.append((dim, dim, dim))
            else:
                ranges.append(_dim_range(name, axis, dim_names.get(name, ()), options))
        lo, opt, hi = (tuple(r[i] for r in ranges) for i in range(3))
        profile[name] = ShapeRange(lo, opt, hi)
    return profile


def _dim_range(name: str, axis: int, symbols: tuple[str | None, ...],
               options: BuildOptions) -> tuple[int, int, int]:
    symbol = symbols[axis] if axis < len(symbols) else None
    for key in (symbol, f"{name}:{axis}"):
        if key is not None and key in options.dims:
            return options.dims[key]
    hint = symbol or f"{name}:{axis}"
    raise InvalidInput(f"input {name!r} axis {axis} is dynamic: give its range as [tensorrt] "
                       f'dims = {{ "{hint}" = [min, opt, max] }}, or fix it in [[inputs]] shape',
                       code="invalid_model_config", param="tensorrt.dims")


def cache_dir_name(gpu_name: str, trt_version: str) -> str:
    """A directory name for plans built on `gpu_name` by TensorRT `trt_version`."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", f"{gpu_name}-trt{trt_version}").strip("-.") or "gpu"


def plan_cache_path(version_dir: Path, gpu_name: str, trt_version: str, onnx_sha256: str,
                    options: BuildOptions, profile: dict[str, ShapeRange]) -> Path:
    """Where the plan for this exact ONNX file, options, profile, GPU and TensorRT lives."""
    key = json.dumps({"onnx": onnx_sha256, "options": asdict(options),
                      "profile": {n: asdict(r) for n, r in profile.items()}}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return version_dir / CACHE_DIR / cache_dir_name(gpu_name, trt_version) / f"{digest}.plan"


def cached_or_built(cache: Path | None, build: Any, *, force: bool = False) -> tuple[bytes, str]:
    """The plan at `cache` if present (unless `force`), else `build()`'s, stored at `cache`.

    Returns (plan, "cache" | "built"). A cache that cannot be written (a read-only model
    repository) only costs a rebuild on the next load.
    """
    if cache is None:
        return build(), "built"
    with _build_lock(cache):
        if cache.is_file() and not force:
            try:
                return cache.read_bytes(), "cache"
            except OSError as exc:
                log.warning("cannot read the cached TensorRT plan %s: %s", cache, exc)
        plan = build()
        try:
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_bytes(plan)
            os.replace(tmp, cache)
            for stale in cache.parent.glob("*.plan"):   # older options/profiles of this version
                if stale != cache:
                    stale.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot cache the TensorRT plan at %s (%s); the next load rebuilds it",
                        cache, exc)
        return plan, "built"


@contextlib.contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    """Engines on identical GPUs loading one version build once: the rest wait, then read."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield                           # read-only repository: build without sharing
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                    # closing releases the lock


def build_plan(trt: Any, logger: Any, onnx_path: Path, profile: dict[str, ShapeRange],
               options: BuildOptions) -> bytes:
    """Parse `onnx_path` and build a serialized engine for `profile` (TensorRT 10 API)."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)         # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise load_error(f"TensorRT cannot parse {onnx_path}: {errors}")
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(profile):
        raise load_error(f"the TensorRT network takes inputs {sorted(names)}, the profile "
                         f"covers {sorted(profile)}")
    config = builder.create_builder_config()
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    shapes = builder.create_optimization_profile()
    for name, rng in profile.items():
        shapes.set_shape(name, rng.min, rng.opt, rng.max)
    if config.add_optimization_profile(shapes) < 0:
        raise load_error(f"TensorRT refused the optimisation profile {profile}")
    log.info("building a TensorRT engine from %s (profile %s); this can take minutes",
             onnx_path, {n: (r.min, r.opt, r.max) for n, r in profile.items()})
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise load_error(f"TensorRT could not build an engine from {onnx_path}: "
                         f"{'; '.join(logger.recent_errors()) or 'see the log'}")
    return memoryview(plan).tobytes()


def _optional_int(section: dict[str, Any], key: str, lo: int, hi: int | None) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (
            hi is not None and value > hi):
        bounds = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise _config_error(key, f"must be an integer in {bounds}")
    return value


def _dims(value: Any) -> dict[str, tuple[int, int, int]]:
    if not isinstance(value, dict):
        raise _config_error("dims", "must be a table of dimension = [min, opt, max]")
    out = {}
    for name, rng in value.items():
        if not (isinstance(rng, list) and len(rng) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) for v in rng)
                and 1 <= rng[0] <= rng[1] <= rng[2]):
            raise _config_error("dims", f"{name} must be [min, opt, max] with "
                                        f"1 <= min <= opt <= max, got {rng!r}")
        out[name] = (rng[0], rng[1], rng[2])
    return out


def _config_error(key: str, message: str) -> InvalidInput:
    return InvalidInput(f"tensorrt.{key} {message}", code="invalid_model_config",
                        param=f"tensorrt.{key}")
