"""The dynamic batcher: which queued tensor requests run together, and when.

Pure and single-threaded (the compute loop owns it; time is passed in), so every decision is
unit-testable with exact clocks. Semantics follow Triton's dynamic batcher:

- A batch goes as soon as it is full (`max_batch_size` rows, or the next request would not fit),
  or a preferred size is reached, or its oldest request has waited `max_queue_delay`.
- Batch size counts rows (dim 0), not requests: a request may carry several rows.
- Requests whose non-batch dims or dtypes differ cannot share a tensor, so the queue is split
  into groups by that signature. Axes the model declares paddable (`[batching] pad_dims`) are
  left out of the signature: such requests are padded to the longest in the batch by `collate`,
  and outputs that carry a padded axis are cut back to each request's own extent by `split`.
- Requests past their deadline are handed back by `take` as expired; they never run.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.errors import Busy, FerryError, InvalidInput
from engines.base import TensorRequest

__all__ = ["BatchConfig", "Padding", "DynamicBatcher", "collate", "split"]


@dataclass(slots=True, frozen=True)
class BatchConfig:
    max_batch_size: int = 0                 # rows; 0: the model has no batch dim, one request a run
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    default_timeout_s: float = 0.0          # 0: requests without a deadline wait forever
    max_queue_size: int = 0                 # requests; 0: unbounded. Full: Busy (back-pressure)
    pad_values: dict[str, int | float] = field(default_factory=dict)   # input -> pad value

    @classmethod
    def from_section(cls, section: dict[str, Any], max_batch_size: int) -> BatchConfig:
        """Validate a model.toml `[batching]` table; errors name the key."""
        delay = _non_negative(section, "max_queue_delay_us", 0)
        timeout = _non_negative(section, "default_timeout_ms", 0)
        preferred = section.get("preferred_batch_sizes", [])
        if not isinstance(preferred, list) or not all(
                _is_int(p) and 0 < p <= max(max_batch_size, 1) for p in preferred):
            raise _config_error("batching.preferred_batch_sizes must be a list of integers in "
                                f"1..max_batch_size ({max_batch_size})")
        queue = section.get("max_queue_size", 0)
        if not _is_int(queue) or queue < 0:
            raise _config_error("batching.max_queue_size must be a non-negative integer")
        pads = section.get("pad_dims", {})
        if not isinstance(pads, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in pads.values()):
            raise _config_error("batching.pad_dims must be a table of input name = pad value")
        return cls(max_batch_size=max_batch_size, max_queue_delay_s=delay / 1e6,
                   preferred_batch_sizes=tuple(sorted(set(preferred))),
                   default_timeout_s=timeout / 1e3, max_queue_size=queue,
                   pad_values=dict(pads))


@dataclass(slots=True, frozen=True)
class Padding:
    """Where padding happens. The engine derives it from the model's declared dims."""

    values: dict[str, int | float]                        # input -> pad value
    axes: dict[str, tuple[int, ...]]                      # input -> paddable axes (never 0)
    # output -> ((output axis, input, input axis), ...): the output axis is cut back to the
    # request's own extent of that input axis.
    unpad: dict[str, tuple[tuple[int, str, int], ...]] = field(default_factory=dict)


@dataclass(slots=True, eq=False)      # identity equality: deque.remove must not compare arrays
class _Entry:
    request: TensorRequest
    rows: int
    deadline: float | None


class DynamicBatcher:
    """A queue of `TensorRequest`s grouped by shape signature. Not thread-safe."""

    def __init__(self, config: BatchConfig, padding: Padding | None = None) -> None:
        self.config = config
        self.padding = padding
        self._groups: dict[tuple, deque[_Entry]] = {}
        self._group_of: dict[str, tuple] = {}       # request id -> signature
        self._deadlines = 0                         # queued entries that carry a deadline

    def __len__(self) -> int:
        return len(self._group_of)

    def add(self, request: TensorRequest) -> None:
        """Queue a request (already validated by the engine; `arrival` already set)."""
        if self.config.max_queue_size and len(self._group_of) >= self.config.max_queue_size:
            raise Busy(f"queue full ({self.config.max_queue_size} requests); retry later")
        deadline = request.deadline
        if deadline is None and self.config.default_timeout_s > 0:
            deadline = request.arrival + self.config.default_timeout_s
        rows = self._rows(request)
        if self.config.max_batch_size and rows > self.config.max_batch_size:
            raise InvalidInput(f"batch of {rows} exceeds max_batch_size "
                               f"{self.config.max_batch_size}", code="batch_too_large")
        sig = self._signature(request)
        self._groups.setdefault(sig, deque()).append(_Entry(request, rows, deadline))
        self._group_of[request.id] = sig
        self._deadlines += deadline is not None

    def remove(self, request_id: str) -> TensorRequest | None:
        """Drop a queued request (cancel); None when it is not queued."""
        sig = self._group_of.pop(request_id, None)
        if sig is None:
            return None
        queue = self._groups[sig]
        for entry in queue:
            if entry.request.id == request_id:
                queue.remove(entry)
                self._forget(entry, sig, pop_id=False)
                return entry.request
        return None

    def ready(self, now: float) -> bool:
        """True when `take(now)` has a batch to run or expired requests to answer."""
        if not self._group_of:
            return False
        if self._deadlines and any(self._expired(now)):
            return True
        return any(self._batch_len(q, now) for q in self._groups.values())

    def wait_hint(self, now: float) -> float | None:
        """Seconds until `ready()` turns true with no new arrival; None when the queue is empty."""
        if not self._group_of:
            return None
        if self.ready(now):
            return 0.0
        due = min(q[0].request.arrival + self.config.max_queue_delay_s
                  for q in self._groups.values())
        if self._deadlines:
            due = min([due, *(e.deadline for q in self._groups.values() for e in q
                              if e.deadline is not None)])
        return max(0.0, due - now)

    def take(self, now: float) -> tuple[list[TensorRequest], list[TensorRequest]]:
        """Pop the next batch (oldest ready group first) and every expired request."""
        expired = []
        for sig, entry in list(self._expired(now)):
            self._groups[sig].remove(entry)
            self._forget(entry, sig)
            expired.append(entry.request)
        ready = [(q[0].request.arrival, sig) for sig, q in self._groups.items()
                 if self._batch_len(q, now)]
        if not ready:
            return [], expired
        sig = min(ready)[1]
        queue = self._groups[sig]
        batch = []
        for _ in range(self._batch_len(queue, now)):
            entry = queue.popleft()
            self._forget(entry, sig)
            batch.append(entry.request)
        return batch, expired

    # -- internals --------------------------------------------------------------------------

    def _batch_len(self, queue: deque[_Entry], now: float) -> int:
        """How many requests from the head of `queue` to run now; 0: keep waiting."""
        cfg = self.config
        if not cfg.max_batch_size:
            return 1                                    # no batch dim: each request runs alone
        rows, count, preferred = 0, 0, 0
        for entry in queue:
            if rows + entry.rows > cfg.max_batch_size:
                return count                            # cannot grow: send what fits
            rows += entry.rows
            count += 1
            if rows in cfg.preferred_batch_sizes:
                preferred = count
        if rows == cfg.max_batch_size:
            return count
        # Same sum as wait_hint computes, so a loop that sleeps the hint finds the batch ready.
        if now >= queue[0].request.arrival + cfg.max_queue_delay_s:
            return count
        return preferred                                # the largest preferred size, if any

    def _expired(self, now: float) -> Iterable[tuple[tuple, _Entry]]:
        for sig, queue in self._groups.items():
            for entry in queue:
                if entry.deadline is not None and entry.deadline <= now:
                    yield sig, entry

    def _forget(self, entry: _Entry, sig: tuple, pop_id: bool = True) -> None:
        if pop_id:
            self._group_of.pop(entry.request.id, None)
        self._deadlines -= entry.deadline is not None
        if not self._groups[sig]:
            del self._groups[sig]

    def _rows(self, request: TensorRequest) -> int:
        if not self.config.max_batch_size or not request.inputs:
            return 1
        return int(next(iter(request.inputs.values())).shape[0])

    def _signature(self, request: TensorRequest) -> tuple:
        """Dtypes and non-batch dims of every input, paddable axes left out."""
        skip = self.config.max_batch_size > 0
        axes = self.padding.axes if self.padding else {}
        sig = []
        for name in sorted(request.inputs):
            arr = request.inputs[name]
            padded = axes.get(name, ())
            dims = tuple(-1 if i in padded else d for i, d in enumerate(arr.shape) if i or not skip)
            sig.append((name, arr.dtype.str, dims))
        return tuple(sig)


def collate(requests: list[TensorRequest], padding: Padding | None = None,
            batched: bool = True) -> dict[str, np.ndarray]:
    """One feed dict for the batch: inputs concatenated along dim 0, padded where declared.

    A lone request's arrays are passed through untouched (no copy).
    """
    if len(requests) == 1 or not batched:
        return requests[0].inputs
    feeds = {}
    for name in requests[0].inputs:
        arrays = [r.inputs[name] for r in requests]
        axes = padding.axes.get(name, ()) if padding else ()
        if axes and any(a.shape[1:] != arrays[0].shape[1:] for a in arrays):
            feeds[name] = _pad_concat(arrays, axes, padding.values[name])
        else:
            feeds[name] = np.concatenate(arrays, axis=0)
    return feeds


def _pad_concat(arrays: list[np.ndarray], axes: tuple[int, ...], value: int | float) -> np.ndarray:
    """Concatenate along dim 0, each array padded to the largest extent on `axes`."""
    shape = list(arrays[0].shape)
    shape[0] = sum(a.shape[0] for a in arrays)
    for axis in axes:
        shape[axis] = max(a.shape[axis] for a in arrays)
    out = np.empty(shape, dtype=arrays[0].dtype)
    offset = 0
    for arr in arrays:
        rows = slice(offset, offset + arr.shape[0])
        out[(rows, *(slice(0, d) for d in arr.shape[1:]))] = arr
        # The pad region is the union of one slab per padded axis; writing only it (rather than
        # filling the whole buffer first) touches each byte once.
        for axis in axes:
            if arr.shape[axis] < shape[axis]:
                slab = [slice(None)] * len(shape)
                slab[0], slab[axis] = rows, slice(arr.shape[axis], None)
                out[tuple(slab)] = value
        offset += arr.shape[0]
    return out


def split(outputs: dict[str, np.ndarray], requests: list[TensorRequest],
          padding: Padding | None = None, batched: bool = True) -> list[dict[str, np.ndarray]]:
    """Per-request views of the batch outputs, only the outputs each request asked for."""
    if len(requests) == 1 or not batched:
        req = requests[0]
        return [outputs if req.outputs is None else {n: outputs[n] for n in req.outputs}]
    unpad = padding.unpad if padding else {}
    total = sum(next(iter(r.inputs.values())).shape[0] for r in requests)
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise FerryError(f"output {name!r} has shape {arr.shape}, expected a batch dim of "
                             f"{total}", code="inference_failed", status=500)
    results, offset = [], 0
    for req in requests:
        rows = next(iter(req.inputs.values())).shape[0]
        names = outputs if req.outputs is None else req.outputs
        mine = {}
        for name in names:
            view = outputs[name][offset:offset + rows]
            cuts = [(axis, req.inputs[src].shape[src_axis])
                    for axis, src, src_axis in unpad.get(name, ())
                    if req.inputs[src].shape[src_axis] < view.shape[axis]]
            if cuts:
                index = [slice(None)] * view.ndim
                for axis, extent in cuts:
                    index[axis] = slice(0, extent)
                # Contiguous so the sender can ship it zero-copy as one buffer.
                view = np.ascontiguousarray(view[tuple(index)])
            mine[name] = view
        results.append(mine)
        offset += rows
    return results


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _non_negative(section: dict[str, Any], key: str, default: int) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _config_error(f"batching.{key} must be a non-negative number")
    return float(value)


def _config_error(message: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_model_config")
