"""LoadShedder's judgement from engine stats (frontends/load_shed.py), with a fake engine."""
from __future__ import annotations

import asyncio

import pytest

from daemon import protocol as P
from daemon.config import load_config
from daemon.errors import ConfigError, EngineDied, Overloaded
from frontends.load_shed import LoadShedder


class FakeEngine:
    def __init__(self, waiting: int, running: int, oldest: float = 0.0) -> None:
        self.models = {"m:1": {"waiting": waiting, "running": running, "max_num_seqs": 2,
                               "oldest_waiting_s": oldest}}
        self.queries = 0

    async def call(self, engine: str, msg: P.Message, timeout_s: float) -> P.Message:
        self.queries += 1
        return P.StatsReply(msg.id, {"models": self.models})  # type: ignore[attr-defined]


def shedder(eng: FakeEngine, **limits: float) -> LoadShedder:
    s = LoadShedder(eng.call)
    s.reconfigure({"load_shedding": limits})
    return s


def test_off_by_default_and_asks_nothing():
    eng = FakeEngine(waiting=100, running=2)
    s = LoadShedder(eng.call)
    asyncio.run(s.check("e", "m", 1))
    assert eng.queries == 0


def test_free_batch_slots_admit_and_sent_requests_count_until_the_next_snapshot():
    eng = FakeEngine(waiting=0, running=0)
    s = shedder(eng, max_waiting=1)

    async def run() -> None:
        await s.check("e", "m", 1)      # runs at once (2 free slots)
        await s.check("e", "m", 1)
        await s.check("e", "m", 1)      # the one queued request allowed
        with pytest.raises(Overloaded) as caught:
            await s.check("e", "m", 1)  # would be the second waiting
        assert caught.value.status == 429 and caught.value.code == "overloaded"
    asyncio.run(run())


def test_a_refusal_is_rechecked_on_a_fresh_snapshot():
    eng = FakeEngine(waiting=5, running=2)
    s = shedder(eng, max_waiting=2)

    async def run() -> None:
        with pytest.raises(Overloaded):
            await s.check("e", "m", 1)
        eng.models["m:1"].update(waiting=0, running=0)   # the queue drained meanwhile
        s._snaps["e"].asked_at -= 0.5                     # a snapshot no longer fresh
        await s.check("e", "m", 1)
    asyncio.run(run())


def test_a_dead_engine_s_last_queue_refuses_nothing_and_a_slow_one_s_still_does():
    eng = FakeEngine(waiting=5, running=2)
    s = shedder(eng, max_waiting=2)
    answer = eng.call

    async def dead(engine: str, msg: P.Message, timeout_s: float) -> P.Message:
        raise EngineDied("engine e is not available")

    async def slow(engine: str, msg: P.Message, timeout_s: float) -> P.Message:
        raise asyncio.TimeoutError

    async def run() -> None:
        with pytest.raises(Overloaded):
            await s.check("e", "m", 1)               # a full queue seen
        s.call = slow
        s._snaps["e"].asked_at -= 2.0                 # stale: refreshed before it is believed
        with pytest.raises(Overloaded):
            await s.check("e", "m", 1)               # busy, not gone: the last view stands
        s.call = dead
        s._snaps["e"].asked_at -= 2.0
        await s.check("e", "m", 1)                   # gone: no 429 (the dispatcher says 503)
        s.call = answer                              # back, and as full as before
        s._snaps["e"].asked_at -= 2.0
        with pytest.raises(Overloaded):
            await s.check("e", "m", 1)
    asyncio.run(run())


def test_queue_wait_limit_counts_the_head_s_age():
    eng = FakeEngine(waiting=1, running=2, oldest=4.0)
    s = shedder(eng, max_queue_wait_s=3.0)
    with pytest.raises(Overloaded) as caught:
        asyncio.run(s.check("e", "m", 1))
    assert caught.value.retry_after >= 4
    eng.models["m:1"]["oldest_waiting_s"] = 0.5
    s._snaps["e"].asked_at = 0.0
    asyncio.run(s.check("e", "m", 1))


def test_precheck_refuses_only_when_every_engine_would_and_counts_nothing():
    full, idle = FakeEngine(waiting=3, running=2), FakeEngine(waiting=0, running=0)
    engines = {"full": full, "idle": idle}

    async def call(engine: str, msg: P.Message, timeout_s: float) -> P.Message:
        return await engines[engine].call(engine, msg, timeout_s)
    s = LoadShedder(call)
    s.reconfigure({"load_shedding": {"max_waiting": 2}})

    async def run() -> None:
        await s.precheck(["full", "idle"], "m", 1)       # the idle engine has room
        with pytest.raises(Overloaded):
            await s.precheck(["full"], "m", 1)
        await s.precheck([], "m", 1)                     # nothing known: nothing refused
        assert s._sent == {}
    asyncio.run(run())


@pytest.mark.parametrize("key,value", [("server.max_waiting", -1),
                                       ("server.max_waiting", 1.5),
                                       ("server.max_queue_wait_s", -0.1),
                                       ("server.max_queue_wait_s", float("nan")),
                                       ("server.max_queue_wait_s", "soon")])
def test_bad_limits_fail_the_config_naming_the_key(key, value):
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, overrides={key: value})
    assert caught.value.key == key


def test_limits_default_off_and_reach_the_shedder_through_the_placement_config():
    cfg = load_config(env={}, overrides={"server.max_waiting": 8,
                                         "server.max_queue_wait_s": 2.5})
    assert (load_config(env={}).server.max_waiting,
            load_config(env={}).server.max_queue_wait_s) == (0, 0.0)
    s = LoadShedder(FakeEngine(0, 0).call)
    s.reconfigure({"load_shedding": {"max_waiting": cfg.server.max_waiting,
                                     "max_queue_wait_s": cfg.server.max_queue_wait_s}})
    assert s.limits.on and (s.limits.max_waiting, s.limits.max_queue_wait_s) == (8, 2.5)
