"""Soak: mixed traffic against one `ferry serve` for a while, watching for leaks.

Traffic, each kind a closed loop of its own: KServe JSON and KServe binary (digits), ZeroMQ
inline and through a registered shared-memory region (digits), OpenAI embeddings (MiniLM) and,
when the demo repository has the LLM, OpenAI chat completions (SmolLM2), every other one
streamed. Every `--sample-s` seconds it records the RSS of every daemon process (supervisor,
engines, frontends, keyed by role) and the ferry-* segments in /dev/shm (count, and bytes
actually backed by pages). At the end it compares the first and the last third of the samples:
memory is "flat" when the last third's mean is within 5 % (or 16 MiB for RSS, 4 MiB for shm)
of the first third's. A warm-up (`--warmup-s`) runs before the first sample: allocator arenas,
ORT and torch caches grow during the first requests by design.

    python -m benchmarks.soak [--minutes 10] [--sample-s 10] [--no-llm] [--out FILE]

Writes JSON to benchmarks/out/soak-<UTC time>.json unless --out says otherwise. Not part of CI.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.daemon_proc import SHM, Daemon  # noqa: E402

RSS_SLACK, SHM_SLACK, REL_SLACK = 16 << 20, 4 << 20, 0.05


@dataclass(slots=True)
class Traffic:
    """Counts and latencies of one kind of request."""

    ok: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    last_error: str = ""

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies or [0.0]) * 1e3
        return {"ok": self.ok, "errors": self.errors, "p50_ms": round(float(np.median(lat)), 3),
                "p99_ms": round(float(np.percentile(lat, 99)), 3), "last_error": self.last_error}


# -- sampling ------------------------------------------------------------------------------------

def _role(proc: Any) -> tuple[str, str]:
    """(role, daemon instance) of a daemon process, from its command line."""
    cmd = proc.cmdline()
    if "daemon.child" in cmd:
        role = cmd[cmd.index("daemon.child") + 1]
        args = json.loads(cmd[cmd.index("daemon.child") + 2])
        return {"engine": f"engine-{args.get('engine_id')}",
                "http": f"http{args.get('worker')}"}.get(role, role), args.get("instance", "")
    return "supervisor", ""


def _arena_used(url: str) -> float:
    """Engine arena bytes in use, as /metrics reports them (blocks the frontends still hold)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "ferry_shm_arena_used_bytes" for s in f.samples)


def sample(d: Daemon) -> dict[str, Any]:
    import psutil
    root = psutil.Process(d.proc.pid)  # type: ignore[union-attr]
    rss: dict[str, int] = {}
    instances = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            role, instance = _role(proc)
            rss[role] = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        instances.add(instance)
    # this daemon's segments and this client's registered regions (other daemons may share
    # the host); st_blocks is what is backed by pages where the filesystem reports it
    ours = tuple(f"ferry-{i}-" for i in instances if i) + (f"fyc-{os.getpid()}-",)
    size = backed = count = 0
    for seg in SHM.iterdir():
        if seg.name.startswith(ours):
            try:
                st = seg.stat()
            except FileNotFoundError:
                continue
            count, size, backed = count + 1, size + st.st_size, backed + st.st_blocks * 512
    return {"t": time.time(), "rss": rss, "rss_total": sum(rss.values()),
            "shm_segments": count, "shm_bytes": size, "shm_backed_bytes": backed,
            "arena_used_bytes": _arena_used(d.url)}


def flatness(series: list[float], slack: float) -> dict[str, Any]:
    third = max(1, len(series) // 3)
    first, last = statistics.fmean(series[:third]), statistics.fmean(series[-third:])
    limit = max(first * (1 + REL_SLACK), first + slack)
    return {"first_third_mean": round(first), "last_third_mean": round(last),
            "growth": round(last - first), "growth_pct": round(100 * (last - first) / first, 2)
            if first else 0.0, "flat": last <= limit}


# -- traffic -------------------------------------------------------------------------------------

async def loop(name: str, stats: dict[str, Traffic], stop: asyncio.Event,
               one: Callable[[int], Awaitable[None]]) -> None:
    t = stats.setdefault(name, Traffic())
    i = 0
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            await one(i)
            t.ok += 1
            t.latencies.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - a soak counts every failure, whatever it is
            t.errors += 1
            t.last_error = repr(exc)[:300]
        i += 1


def _kserve_binary(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "probabilities",
                                    "parameters": {"binary_data": True}}]}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                "Content-Type": "application/octet-stream"}


class Requests:
    """One request of each kind; `i` varies the batch size and the content."""

    def __init__(self, d: Daemon, session: Any, x: np.ndarray, zmq_inline: Any,
                 zmq_shm: Any) -> None:
        self.d, self.s, self.x = d, session, x
        self.zmq_inline, self.zmq_shm = zmq_inline, zmq_shm

    async def _post_json(self, path: str, body: dict) -> bytes:
        async with self.s.post(self.d.url + path, json=body) as r:
            raw = await r.read()
            if r.status != 200:
                raise RuntimeError(f"{path}: {r.status} {raw[:200]!r}")
            return raw

    async def kserve_json(self, i: int) -> None:
        rows = self.x[i % 300:i % 300 + 1 + i % 8]
        await self._post_json("/v2/models/digits/infer", {"inputs": [{
            "name": "pixels", "datatype": "FP32", "shape": list(rows.shape),
            "data": rows.reshape(-1).tolist()}]})

    async def kserve_binary(self, i: int) -> None:
        body, headers = _kserve_binary(self.x[i % 300:i % 300 + 1 + i % 16])
        async with self.s.post(self.d.url + "/v2/models/digits/infer", data=body,
                               headers=headers) as r:
            if r.status != 200:
                raise RuntimeError(f"binary: {r.status}")
            await r.read()

    async def zmq_plain(self, i: int) -> None:
        await self.zmq_inline.infer("digits", {"pixels": self.x[i % 300:i % 300 + 1 + i % 32]})

    async def zmq_region(self, i: int) -> None:
        # 64 rows through the client's registered region, by reference
        await self.zmq_shm.infer("digits", {"pixels": np.tile(self.x[i % 300], (64, 1))},
                                 use_shm=True)

    async def embeddings(self, i: int) -> None:
        await self._post_json("/v1/embeddings", {"model": "minilm",
                                                 "input": [f"soak sentence {i}", "ferry"]})

    async def chat(self, i: int) -> None:
        await self._post_json("/v1/chat/completions", {
            "model": "smollm2", "max_tokens": 16, "temperature": 0.7, "seed": i,
            "stream": i % 2 == 1,
            "messages": [{"role": "user", "content": f"Say something about {i}."}]})


async def run_traffic(d: Daemon, seconds: float, llm: bool, stats: dict[str, Traffic]) -> None:
    import aiohttp

    from daemon.demo import digits_split
    from frontends.client import AsyncFerryClient
    _, x_test, _, _ = digits_split()
    stop = asyncio.Event()
    zmq_inline = AsyncFerryClient(d.zmq_endpoint, timeout_s=60)
    zmq_shm = AsyncFerryClient(d.zmq_endpoint, timeout_s=60)
    await zmq_shm.register_region("soak-region", 4 << 20)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(120)) as s:
        r = Requests(d, s, x_test.astype(np.float32), zmq_inline, zmq_shm)
        kinds: list[tuple[str, Callable[[int], Awaitable[None]], int]] = [
            ("kserve_json", r.kserve_json, 2), ("kserve_binary", r.kserve_binary, 2),
            ("zmq_inline", r.zmq_plain, 2), ("zmq_shm", r.zmq_region, 2),
            ("openai_embeddings", r.embeddings, 1)]
        if llm:
            kinds.append(("openai_chat", r.chat, 2))
        tasks = [asyncio.create_task(loop(name, stats, stop, fn))
                 for name, fn, width in kinds for _ in range(width)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
    await zmq_inline.close()
    await zmq_shm.close()


# -- main ----------------------------------------------------------------------------------------

def demo_repo(root: Path, llm: bool) -> Path:
    from daemon.demo import prepare_demo_models
    import hashlib
    key = hashlib.sha256((REPO / "daemon" / "demo.py").read_bytes()).hexdigest()[:12]
    demo = REPO / "var" / "test-models" / key
    prepare_demo_models(demo)
    for name in ("digits", "minilm", *(("smollm2",) if llm else ())):
        (root / name).symlink_to(demo / name, target_is_directory=True)
    return root


async def soak(d: Daemon, args: argparse.Namespace, llm: bool) -> dict[str, Any]:
    stats: dict[str, Traffic] = {}
    samples: list[dict[str, Any]] = []
    total_s = args.warmup_s + args.minutes * 60
    traffic = asyncio.create_task(run_traffic(d, total_s, llm, stats))
    await asyncio.sleep(args.warmup_s)
    while not traffic.done():
        samples.append(await asyncio.to_thread(sample, d))
        done = sum(t.ok for t in stats.values())
        last = samples[-1]
        print(f"[{len(samples):3d}] rss {last['rss_total'] >> 20} MiB, shm "
              f"{last['shm_bytes'] >> 20} MiB in {last['shm_segments']} segments "
              f"({last['shm_backed_bytes'] >> 20} MiB "
              f"backed), engine arena {int(last['arena_used_bytes']) >> 10} KiB used, "
              f"{done} requests", flush=True)
        await asyncio.wait({traffic}, timeout=args.sample_s)
    await traffic
    roles = sorted({r for s in samples for r in s["rss"]})
    return {
        "minutes": args.minutes, "warmup_s": args.warmup_s, "sample_s": args.sample_s,
        "llm": llm, "traffic": {k: t.summary() for k, t in sorted(stats.items())},
        "rss_total": flatness([s["rss_total"] for s in samples], RSS_SLACK),
        "rss_by_role": {r: flatness([s["rss"].get(r, 0) for s in samples], RSS_SLACK)
                        for r in roles},
        "shm": flatness([s["shm_bytes"] for s in samples], SHM_SLACK),
        "shm_backed": flatness([s["shm_backed_bytes"] for s in samples], SHM_SLACK),
        "engine_arena_used": flatness([s["arena_used_bytes"] for s in samples], SHM_SLACK),
        "shm_segments": sorted({s["shm_segments"] for s in samples}),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=20.0)
    parser.add_argument("--no-llm", action="store_true", help="leave out the chat traffic")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import importlib.util
    import tempfile
    llm = not args.no_llm and importlib.util.find_spec("engines.llm.engine") is not None
    d = Daemon(demo_repo(Path(tempfile.mkdtemp(prefix="soak")), llm), workers=2)
    d.start(timeout_s=300)
    try:
        result = asyncio.run(soak(d, args, llm))
    finally:
        code = d.stop()
    result["exit_code"] = code
    out = args.out or REPO / "benchmarks" / "out" / time.strftime(
        "soak-%Y%m%dT%H%M%SZ.json", time.gmtime())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    word = lambda key: "flat" if result[key]["flat"] else "GROWING"  # noqa: E731
    print(f"RSS {word('rss_total')}, shm {word('shm')} (backed {word('shm_backed')}, engine "
          f"arena {word('engine_arena_used')}); written to {out}")
    errors = sum(t["errors"] for t in result["traffic"].values())
    flat = all(result[k]["flat"] for k in ("rss_total", "shm", "shm_backed", "engine_arena_used"))
    return 0 if flat and not errors and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
