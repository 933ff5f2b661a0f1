"""KV-cache events in vLLM's wire format, so prefix-aware routers (llm-d's KV indexer) can track
which blocks each engine holds.

The format is vLLM's (`vllm/distributed/kv_events.py`, and the decoder in its
`examples/online_serving/kv_events_subscriber.py`): msgspec Structs with `array_like=True`, events
tagged (`tag=True`: the tag is the class name), so every struct is a msgpack array, positional,
and an event's first element is its tag. msgspec writes every field of an array_like struct,
defaults included; the fields are those of the vLLM releases llm-d's indexer decodes
(`BlockStored` up to `extra_keys`; later vLLM fields default when absent, and decoders of older
releases ignore trailing ones):

    KVEventBatch     [ts: float, events: [event, ...], data_parallel_rank: int]
    BlockStored      ["BlockStored", block_hashes: [int], parent_block_hash: int | nil,
                      token_ids: [int], block_size: int, lora_id: nil, medium: "GPU",
                      lora_name: nil, extra_keys: nil]
    BlockRemoved     ["BlockRemoved", block_hashes: [int], medium: "GPU"]
    AllBlocksCleared ["AllBlocksCleared"]

A ZeroMQ message is three frames: topic, an 8-byte big-endian sequence number, the payload.

Block hashes: Ferry names a block by a 16-byte BLAKE2b chain hash (engines.llm.block_pool);
consumers (llm-d decodes `[]uint64`) want 64-bit ints, so a hash goes on the wire as its first
8 bytes read big-endian (`wire_hash`). The first block of a chain has no parent (nil), as in
vLLM; `token_ids` are the tokens of every block of the event, in order, so a consumer can
recompute its own keys.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack

__all__ = ["AllBlocksCleared", "BlockRemoved", "BlockStored", "KVEvent", "KVEventLog",
           "MEDIUM_GPU", "encode_batch", "wire_hash"]

MEDIUM_GPU = "GPU"     # vLLM's name for the device tier, whatever the device


def wire_hash(block_hash: bytes) -> int:
    """A block's chain hash as the unsigned 64-bit int the wire carries."""
    return int.from_bytes(block_hash[:8], "big")


@dataclass(slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int

    def to_wire(self) -> list[object]:
        return ["BlockStored", self.block_hashes, self.parent_block_hash, self.token_ids,
                self.block_size, None, MEDIUM_GPU, None, None]


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[int] = field(default_factory=list)

    def to_wire(self) -> list[object]:
        return ["BlockRemoved", self.block_hashes, MEDIUM_GPU]


@dataclass(slots=True)
class AllBlocksCleared:
    def to_wire(self) -> list[object]:
        return ["AllBlocksCleared"]


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def encode_batch(ts: float, events: Sequence[KVEvent], rank: int = 0) -> bytes:
    """One KVEventBatch payload."""
    return msgpack.packb([ts, [e.to_wire() for e in events], rank], use_bin_type=True)


class KVEventLog:
    """The events of one engine step, in order; the block pool appends, the engine drains.

    Consecutive stores of one chain merge into one BlockStored (as vLLM emits a request's new
    blocks together), consecutive removals into one BlockRemoved.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._events: list[KVEvent] = []

    def stored(self, block_hash: bytes, parent: bytes | None, token_ids: Sequence[int]) -> None:
        h = wire_hash(block_hash)
        p = wire_hash(parent) if parent is not None else None
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockStored) and p is not None and last.block_hashes[-1] == p:
            last.block_hashes.append(h)
            last.token_ids.extend(token_ids)
        else:
            self._events.append(BlockStored([h], p, list(token_ids), self.block_size))

    def removed(self, block_hash: bytes) -> None:
        last = self._events[-1] if self._events else None
        if not isinstance(last, BlockRemoved):
            last = BlockRemoved()
            self._events.append(last)
        last.block_hashes.append(wire_hash(block_hash))

    def cleared(self) -> None:
        self._events.append(AllBlocksCleared())

    def drain(self) -> list[KVEvent]:
        out, self._events = self._events, []
        return out
