"""One generation request as the scheduler and sampler see it."""
from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from engines.llm.sampling import SamplingParams

__all__ = ["SeqStatus", "Sequence", "SeqTiming"]


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class SeqTiming:
    """A traced request's times in the engine (time.monotonic() seconds) and steps."""

    scheduled: float = 0.0               # first forward pass it took part in
    first_token: float = 0.0
    steps: int = 0                       # forward passes it took part in
    prefill_steps: int = 0               # of those, the ones that computed prompt tokens

    def step(self, now: float, prefill: bool) -> None:
        if not self.scheduled:
            self.scheduled = now
        self.steps += 1
        self.prefill_steps += prefill

    def wire(self, received: float, ended: float) -> list[int]:
        """daemon/protocol.py TRACING's Tokens.timing."""
        us = lambda t: int(t * 1e6)  # noqa: E731
        return [us(received), us(self.scheduled or ended), us(self.first_token), us(ended),
                self.steps, self.prefill_steps]


@dataclass(slots=True, eq=False)
class Sequence:
    id: str
    token_ids: list[int]                 # prompt + generated; recompute after preemption
    num_prompt: int                      # length of the client's prompt
    params: SamplingParams
    stop_ids: frozenset[int]             # eos (unless ignore_eos) + stop_token_ids
    arrival: float = 0.0
    generator: torch.Generator | None = None
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0                # leading tokens whose K/V sit in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)   # chain hashes of full blocks
    num_published: int = 0               # leading blocks offered to the prefix cache
    # leading blocks handed back to the pool because every layer's window has passed them;
    # their block_table entries are stale (never written, and read only outside the window)
    num_dropped: int = 0
    num_cached: int = 0                  # prompt tokens served by the prefix cache (1st admit)
    admitted: bool = False               # admitted at least once (stats count the first time)
    first_emitted: bool = False
    last_token_at: float = 0.0           # time.monotonic() of the latest token (latency stats)
    finish_reason: str | None = None
    matcher: Any = None                  # structured outputs: its grammar's state, or None
    timing: SeqTiming | None = None      # traced requests only

    @classmethod
    def create(cls, req_id: str, prompt_ids: list[int], params: SamplingParams,
               eos_ids: Iterable[int], arrival: float = 0.0,
               device: str | torch.device = "cpu") -> Sequence:
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.update(eos_ids)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed)
        # params.resume: the prompt's tail is output delivered before a failover
        return cls(id=req_id, token_ids=list(prompt_ids),
                   num_prompt=len(prompt_ids) - params.resume,
                   params=params, stop_ids=frozenset(stops), arrival=arrival, generator=gen)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the KV cache: 1 while decoding, more during (re)prefill."""
        return len(self.token_ids) - self.num_computed

    def append(self, token_id: int) -> str | None:
        """Add a sampled token; returns the finish reason when this token ends the request."""
        self.token_ids.append(token_id)
        if self.matcher is not None:
            # The mask only offered tokens the grammar accepts; a complete grammar ends it.
            if not self.matcher.consume_token(token_id) or self.matcher.is_stopped():
                return "stop"
        if token_id in self.stop_ids:
            return "stop"
        if len(self.token_ids) - self.num_prompt >= self.params.max_tokens:
            return "length"
        return None
