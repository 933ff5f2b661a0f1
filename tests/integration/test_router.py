"""Ferry behind a real router of the field: vllm-router (Rust, from PyPI) in front of three
`ferry serve` daemons with the demo LLM, each its own process on its own port, as N hosts are.

- cache-aware routing: requests sharing one of K long system prompts land on the host that
  holds it, read from each daemon's own prefix-cache counters (vllm:prefix_cache_hits_total)
  and each answer's cached_tokens; round-robin on the same fleet hits far less;
- a daemon whose queue is full refuses with 429 and the router's retry lands on its peers, and
  power_of_two, reading each daemon's /get_load, sends it nothing;
- readiness: a dead engine turns /health, /readyz and /v2/health/ready red until it is back,
  and the router routes around the host meanwhile;
- a daemon killed mid-request (SIGKILL of all its processes) is taken out of rotation, its
  request retried on a peer, client-visible failures counted;
- SIGTERM: new connections are refused at once and idle keep-alive ones closed (no 503 is
  ever sent: there is no connection to send it on), the request in flight finishes, the
  router's traffic goes to the peers.

The router's virtual environment is created on first use (tests/integration/router_proc.py);
without a reachable pip registry the module is skipped, saying so.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket

import aiohttp
import pytest

from daemon.demo import SMOLLM2_GGUF, smollm2_gguf
from tests.integration.daemon_proc import Daemon, http_get, wait_until
from tests.integration.router_proc import (FAST_FAILOVER, Router, http_status, kill_hard,
                                           router_binary)
from tests.integration.test_vllm_metrics import Streams, scrape, value

# per test; the module fixture (three daemons, and on a fresh machine the router's install)
# has its own deadlines
pytestmark = pytest.mark.timeout(60, func_only=True)

N_HOSTS = 3
MAX_NUM_SEQS = 2
MAX_WAITING = 1
BLOCK_SIZE = 16
HOLD_TOKENS = 1000          # held streams: tens of seconds of decoding on a CPU
CHAT = "/v1/chat/completions"
PROBES = ("/health", "/readyz", "/v2/health/ready")


def system_prompt(topic: str) -> str:
    """A long system prompt (≈ 200 tokens) that differs from the others from its first word."""
    return (f"{topic.capitalize()} is the subject of every answer you give. "
            + f"Answer questions on {topic} politely and briefly, citing the house rules. " * 8)


def llm_repo(root):
    version = root / "smollm2" / "1"
    version.mkdir(parents=True)
    (version / SMOLLM2_GGUF).symlink_to(smollm2_gguf().resolve())
    (version / "model.toml").write_text(
        f'engine = "llm"\nweights = "{SMOLLM2_GGUF}"\n[llm]\nkv_cache_mb = 128\n'
        f"block_size = {BLOCK_SIZE}\nmax_num_seqs = {MAX_NUM_SEQS}\nmax_batched_tokens = 512\n")
    return root


@pytest.fixture(scope="module")
def router_bin():
    binary, why = router_binary()
    if binary is None:
        pytest.skip(why)
    return binary


@pytest.fixture(scope="module")
def hosts(demo_models, router_bin, tmp_path_factory):
    repo = llm_repo(tmp_path_factory.mktemp("repo"))
    ds = [Daemon(repo, workers=1, server_extra=f"max_waiting = {MAX_WAITING}",
                 extra_config="[engines]\nrestart_backoff_s = [2.0]\n",
                 env={"FERRY_TORCH_THREADS": "1"}) for _ in range(N_HOSTS)]
    try:
        with concurrent.futures.ThreadPoolExecutor(N_HOSTS) as pool:
            list(pool.map(lambda d: d.start(timeout_s=240), ds))
        yield ds
    finally:
        with concurrent.futures.ThreadPoolExecutor(N_HOSTS) as pool:
            list(pool.map(lambda d: d.stop(check=False), ds))


def start_router(binary, hosts: list[Daemon], policy: str) -> Router:
    return Router(binary, [d.url for d in hosts], policy=policy, extra=FAST_FAILOVER).start()


# -- helpers ----------------------------------------------------------------------------------

def scrape_llm(d: Daemon) -> dict:
    """A scrape that holds the engine's families: one taken while the engine is too busy to
    answer the stats query in time lacks them, so scrape again."""
    return wait_until(lambda: (lambda f: f if "vllm:num_requests_running" in f else None)(
        scrape(d)), 20, "a scrape with the LLM engine's stats", interval=0.05)


def gauge(d: Daemon, name: str) -> float:
    return value(scrape_llm(d), name)


def chats(d: Daemon, status: str = "200") -> float:
    return chats_on(d, CHAT, status)


def chats_on(d: Daemon, route: str, status: str = "200") -> float:
    """Requests `d` answered on `route` with `status` (its ferry_requests_total)."""
    return value(scrape(d), "ferry_requests", "ferry_requests_total", route=route, status=status)


def hits_and_queries(d: Daemon) -> tuple[float, float]:
    fams = scrape_llm(d)
    return (value(fams, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total"),
            value(fams, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total"))


def chat_body(system: str, question: str, max_tokens: int = 2) -> dict:
    return {"model": "smollm2", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": question}]}


async def ask(s: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict]:
    async with s.post(url + CHAT, json=body) as r:
        raw = await r.read()
        try:
            import json
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, {"raw": raw.decode(errors="replace")[:300]}


async def rounds(url: str, systems: list[str], n: int, tag: str) -> list[list[tuple[int, dict]]]:
    """`n` rounds of one request per system prompt, the K of a round sent together."""
    out = []
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            out.append(list(await asyncio.gather(*(
                ask(s, url, chat_body(p, f"{tag} question {i}: when?")) for p in systems))))
    return out


def hit_ratio(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float:
    hits = sum(a[0] - b[0] for a, b in zip(after, before))
    queries = sum(a[1] - b[1] for a, b in zip(after, before))
    return hits / queries


def cached(answer: dict) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def router_counter(router: Router, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in router.metrics().splitlines()
               if line.startswith(name) and not line.startswith("#"))


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# -- tests ------------------------------------------------------------------------------------

def test_requests_sharing_a_system_prompt_land_on_the_host_that_caches_it(router_bin, hosts):
    systems = [system_prompt(t) for t in ("shipping", "libraries", "astronomy")]
    warm_rounds = 3
    router = start_router(router_bin, hosts, "cache_aware")
    try:
        before = [hits_and_queries(d) for d in hosts]
        served = [chats(d) for d in hosts]
        # Cold: the K first requests arrive together; no host has a prefix of them, so the
        # router sends each to its least-loaded host: one each.
        (cold,) = asyncio.run(rounds(router.url, systems, 1, "cold"))
        assert [st for st, _ in cold] == [200] * 3, cold
        assert [chats(d) - n for d, n in zip(hosts, served)] == [1, 1, 1]
        warm = asyncio.run(rounds(router.url, systems, warm_rounds, "warm"))
        after = [hits_and_queries(d) for d in hosts]
    finally:
        router.stop()
    answers = [a for r in warm for st, a in r if st == 200]
    assert len(answers) == 3 * warm_rounds, warm
    # every warm request found its whole system prompt cached where it landed (only the
    # question and the last partial block were computed), so it landed where its prompt was
    for a in answers:
        prompt = a["usage"]["prompt_tokens"]
        assert cached(a) >= prompt - 2 * BLOCK_SIZE - 16, a["usage"]
    # each host kept serving its own prompt: 1 + warm_rounds requests each, with hits
    assert [chats(d) - n for d, n in zip(hosts, served)] == [1 + warm_rounds] * 3
    gained = [a[0] - b[0] for a, b in zip(after, before)]
    least = min(cached(a) for a in answers)
    assert least >= 96 and all(g >= warm_rounds * least for g in gained), (least, gained)
    # the daemons' counters and the answers agree, token for token
    assert sum(gained) == sum(cached(a) for a in answers) + sum(cached(a) for _, a in cold)
    assert hit_ratio(before, after) > 0.5, (before, after)

    # Round robin on the same fleet, one request at a time, two fresh prompts taking turns
    # over three hosts: each visits every host in turn, so none of its first three requests
    # finds it cached where it lands (cache-aware had them all cached but the first).
    systems = [system_prompt(t) for t in ("gardening", "chemistry")]
    router = start_router(router_bin, hosts, "round_robin")
    try:
        before = [hits_and_queries(d) for d in hosts]
        for i in range(3):
            asyncio.run(rounds(router.url, systems[:1], 1, f"rr{i}"))
            asyncio.run(rounds(router.url, systems[1:], 1, f"rr{i}"))
        after = [hits_and_queries(d) for d in hosts]
    finally:
        router.stop()
    assert hit_ratio(before, after) == 0.0, (before, after)


def test_a_host_shedding_load_pushes_its_requests_to_its_peers(router_bin, hosts):
    busy, peers = hosts[0], hosts[1:]
    system = system_prompt("weather")
    rr = start_router(router_bin, hosts, "round_robin")
    p2: Router | None = None
    try:
        async def run() -> tuple[list[tuple[int, dict]], list[tuple[int, dict]], list[dict]]:
            nonlocal p2
            # fill the busy host: two running, one waiting = max_waiting; one more is refused
            async with Streams(busy.url, MAX_NUM_SEQS + MAX_WAITING, max_tokens=HOLD_TOKENS):
                await asyncio.to_thread(wait_until, lambda: gauge(
                    busy, "vllm:num_requests_waiting") == MAX_WAITING, 30, "a full queue")
                reports = [http_get(d.url + "/get_load")[1] for d in hosts]
                async with aiohttp.ClientSession() as s:
                    via_rr = [await ask(s, rr.url, chat_body(system, f"Question {i}?"))
                              for i in range(6)]
                # power_of_two compares the hosts' own /get_load: once it has polled them,
                # the busy host is never picked
                polled = chats_on(busy, "/get_load")
                p2 = await asyncio.to_thread(start_router, router_bin, hosts, "power_of_two")
                await asyncio.to_thread(wait_until, lambda: chats_on(busy, "/get_load")
                                        >= polled + 2, 20, "the router to poll /get_load")
                marks.append((chats(busy, "429"), chats(busy)))
                async with aiohttp.ClientSession() as s:
                    via_p2 = [await ask(s, p2.url, chat_body(system, f"Again {i}?"))
                              for i in range(6)]
                return via_rr, via_p2, reports
        marks: list[tuple[float, float]] = []
        refused_before, served_before = chats(busy, "429"), [chats(d) for d in hosts]
        retries_before = router_counter(rr, "vllm_router_retries_total")
        via_rr, via_p2, reports = asyncio.run(run())
        retries = router_counter(rr, "vllm_router_retries_total") - retries_before
    finally:
        rr.stop()
        if p2 is not None:
            p2.stop()
    # the load each host reports: the busy one's engine runs two and queues one
    assert reports[0]["load"] == 3 and reports[0]["num_requests_running"] == 2, reports[0]
    assert reports[0]["num_requests_waiting"] == 1 and reports[0]["models"]["smollm2"]["load"] == 3
    assert [r["load"] for r in reports[1:]] == [0, 0], reports
    # round robin: every client request succeeded; the busy host refused each attempt the
    # rotation gave it with 429 before it cost anything, and the router retried it on a peer
    assert [st for st, _ in via_rr] == [200] * 6, via_rr
    refusals = marks[0][0] - refused_before
    assert marks[0][1] == served_before[0]          # it served none of them
    assert refusals >= 2, refusals                  # every third attempt was its turn
    assert retries >= refusals, (retries, refusals)
    # power_of_two: all succeeded and not one attempt went to the busy host
    assert [st for st, _ in via_p2] == [200] * 6, via_p2
    assert (chats(busy, "429"), chats(busy)) == marks[0]
    assert sum(chats(d) for d in peers) - sum(served_before[1:]) == 12


# Reloading the engine after the kill takes 10 s on an idle 2-core machine and up to a minute
# when other work loads it; the rest of this test takes seconds.
@pytest.mark.timeout(120, func_only=True)
def test_a_dead_engine_turns_readiness_red_and_the_router_routes_around_it(router_bin, hosts):
    sick = hosts[0]
    system = system_prompt("cooking")
    router = start_router(router_bin, hosts, "cache_aware")
    try:
        assert [http_status(sick.url + p) for p in PROBES] == [200] * 3
        served = [chats(d) for d in hosts]
        (engine,) = sick.child_pids("engine")
        os.kill(engine, signal.SIGKILL)
        # every probe is red while the engine is down and restarting (backoff 2 s + load)
        wait_until(lambda: all(http_status(sick.url + p) == 503 for p in PROBES), 5,
                   "every readiness probe to report the dead engine", interval=0.02)
        # the router's next /health probe (every second) takes the host out of rotation
        wait_until(lambda: http_status(router.url + "/health") == 503, 10,
                   "the router to see the host unhealthy")
        answers = []

        async def during() -> None:
            async with aiohttp.ClientSession() as s:
                for i in range(4):
                    answers.append(await ask(s, router.url, chat_body(system, f"Q{i}?")))
        asyncio.run(during())
        down = http_status(sick.url + "/health") != 200
        wait_until(lambda: all(http_status(sick.url + p) == 200 for p in PROBES), 100,
                   "readiness to turn green once the engine is back")
    finally:
        router.stop()
    assert [st for st, _ in answers] == [200] * 4, answers
    if down:     # still restarting after the requests: none of them can have landed there
        assert chats(sick) == served[0]
    assert sum(chats(d) for d in hosts) - sum(served) == 4


def test_a_host_killed_mid_request_is_taken_out_of_rotation(router_bin, hosts):
    victim, survivors = hosts[2], hosts[:2]
    systems = [system_prompt(t) for t in ("pottery", "sailing", "beekeeping")]
    router = start_router(router_bin, hosts, "cache_aware")
    results: list[tuple[int, dict]] = []
    try:
        (cold,) = asyncio.run(rounds(router.url, systems, 1, "cold"))
        assert [st for st, _ in cold] == [200] * 3, cold

        async def run() -> None:
            stop = asyncio.Event()

            async def client(system: str) -> None:
                async with aiohttp.ClientSession() as s:
                    i = 0
                    while not stop.is_set() or i < 3:
                        results.append(await ask(s, router.url,
                                                 chat_body(system, f"Q{i}?", max_tokens=12)))
                        i += 1
            tasks = [asyncio.create_task(client(p)) for p in systems]
            # kill the victim while it is answering one of them (its own scrape is the other)
            await asyncio.to_thread(wait_until, lambda: value(
                scrape(victim), "ferry_http_requests_in_flight") >= 2, 30,
                "a request in flight on the victim", interval=0.01)
            # kill_hard blocks this loop: no answer is collected between the mark and the kill
            marks.append(len(results))
            kill_hard(victim)
            await asyncio.sleep(3.0)
            stop.set()
            await asyncio.gather(*tasks)
        marks: list[int] = []
        served = [chats(d) for d in survivors]
        asyncio.run(run())
        survivors_served = sum(chats(d) for d in survivors) - sum(served)
        health = http_status(router.url + "/health")
    finally:
        router.stop()
    failures = [r for r in results if r[0] != 200]
    # The router retries a failed attempt (reset or refused: its 5xx) on another host once the
    # victim's circuit opened (1 failure): no client sees the kill.
    assert failures == [], failures
    after = results[marks[0]:]
    assert len(after) >= 3, len(after)          # each client answered at least once more
    # every answer after the kill came from a survivor, the one interrupted by it included
    # (one answer the victim sent just before dying may still have been on its way)
    assert survivors_served >= len(after) - 1, (survivors_served, len(after))
    assert health == 503            # the router reports the dead worker unhealthy


def test_sigterm_refuses_new_connections_and_finishes_what_is_in_flight(router_bin, hosts):
    leaving, staying = hosts[1], hosts[0]
    system = system_prompt("knitting")
    router = start_router(router_bin, [staying, leaving], "round_robin")
    try:
        async def run() -> tuple[tuple[int, dict], list[tuple[int, dict]], bool]:
            # an idle keep-alive connection, opened before the drain
            idle = socket.create_connection(("127.0.0.1", leaving.port), timeout=10)
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: ferry\r\n\r\n")
            assert idle.recv(4096).startswith(b"HTTP/1.1 200")
            async with aiohttp.ClientSession() as s:
                held = asyncio.create_task(ask(s, leaving.url, chat_body(system, "Long?", 16)))
                await asyncio.to_thread(wait_until, lambda: gauge(
                    leaving, "vllm:num_requests_running") >= 1, 30,
                    "the long request to run")
                leaving.proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(wait_until, lambda: refused(leaving.port), 10,
                                        "new connections to be refused")
                # no 503 either way: the idle connection is closed (no answer), new ones refused
                # (one that races the close may still get its answer, never a 503)
                def answers_to_a_new_request() -> bytes:
                    try:
                        idle.sendall(b"GET /health HTTP/1.1\r\nHost: ferry\r\n\r\n")
                        got, reply = b"", idle.recv(4096)
                        while reply:
                            got, reply = got + reply, idle.recv(4096)
                        return got
                    except (ConnectionResetError, BrokenPipeError):
                        return b""
                    finally:
                        idle.close()
                got = await asyncio.to_thread(answers_to_a_new_request)
                assert b" 503 " not in got, got
                during = [await ask(s, router.url, chat_body(system, f"Q{i}?"))
                          for i in range(4)]
                still_running = leaving.proc.poll() is None
                return await held, during, still_running
        held, during, still_running = asyncio.run(run())
    finally:
        router.stop()
    assert held[0] == 200 and held[1]["usage"]["completion_tokens"] == 16, held
    assert [st for st, _ in during] == [200] * 4, during
    assert still_running            # the answers came while it was still draining
    assert leaving.proc.wait(30) == 0, leaving.log()[-3000:]
