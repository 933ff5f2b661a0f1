"""A KV-cache event subscriber written from vLLM's published definition, for the tests.

vLLM's `vllm/distributed/kv_events.py` (and its `examples/online_serving/kv_events_subscriber.py`)
define the batch as msgspec Structs with array_like=True and tagged events, sent as three frames
(topic, 8-byte big-endian sequence number, msgpack payload):

    KVEventBatch(ts: float, events: list[BlockStored | BlockRemoved | AllBlocksCleared],
                 data_parallel_rank: int | None = None)
    BlockStored(block_hashes: list[int], parent_block_hash: int | None, token_ids: list[int],
                block_size: int, lora_id: int | None, medium: str | None,
                lora_name: str | None, extra_keys: list | None = None, ...)
    BlockRemoved(block_hashes: list[int], medium: str | None)
    AllBlocksCleared()

This decoder is independent of Ferry's encoder: it reads arrays by position as msgspec does,
ignoring trailing fields it does not know.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

__all__ = ["Batch", "Stored", "Removed", "Cleared", "Subscriber", "decode_batch"]


@dataclass
class Stored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


@dataclass
class Removed:
    block_hashes: list[int]
    medium: str | None


@dataclass
class Cleared:
    pass


@dataclass
class Batch:
    seq: int
    topic: bytes
    ts: float
    events: list[Stored | Removed | Cleared]
    data_parallel_rank: int | None


def _event(raw: list[Any]) -> Stored | Removed | Cleared:
    tag, fields = raw[0], raw[1:]
    if tag == "BlockStored":
        hashes, parent, tokens, block_size, lora_id, medium = fields[:6]
        assert all(isinstance(h, int) and 0 <= h < 1 << 64 for h in hashes)
        return Stored(hashes, parent, tokens, block_size, lora_id, medium)
    if tag == "BlockRemoved":
        return Removed(fields[0], fields[1])
    if tag == "AllBlocksCleared":
        return Cleared()
    raise AssertionError(f"unknown event tag {tag!r}")


def decode_batch(topic: bytes, seq: bytes, payload: bytes) -> Batch:
    assert len(seq) == 8
    raw = msgpack.unpackb(payload, raw=False)
    assert isinstance(raw, list) and 2 <= len(raw) <= 3, raw
    ts, events = raw[0], raw[1]
    assert isinstance(ts, float)
    return Batch(int.from_bytes(seq, "big"), topic, ts, [_event(e) for e in events],
                 raw[2] if len(raw) > 2 else None)


class Subscriber:
    """A SUB socket on one endpoint, subscribed to every topic."""

    def __init__(self, endpoint: str) -> None:
        self.sock: zmq.Socket = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)

    def recv(self, timeout_s: float) -> Batch | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        frames = self.sock.recv_multipart()
        assert len(frames) == 3, frames
        return decode_batch(*frames)

    def events_until(self, done: Any, timeout_s: float) -> list[Stored | Removed | Cleared]:
        """Events received until `done(events)` holds; fails after `timeout_s`."""
        out: list[Stored | Removed | Cleared] = []
        deadline = time.monotonic() + timeout_s
        while not done(out):
            left = deadline - time.monotonic()
            assert left > 0, f"expected events did not arrive; got {out}"
            batch = self.recv(left)
            if batch is not None:
                out.extend(batch.events)
        return out

    def close(self) -> None:
        self.sock.close(0)
