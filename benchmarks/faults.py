"""Fault benchmark: kill -9 parts of a loaded daemon and count what clients lose.

A fixed mixed load runs against `ferry serve` on the demo models (digits, minilm, smollm2 with
float weights, digits-diffusion), all on 127.0.0.1: HTTP KServe JSON requests to `digits`, HTTP
embeddings from `minilm`, ZMQ requests to `digits`, and 8 greedy SSE streams (completions, 48
tokens, `ignore_eos`), each restarted as soon as it ends. First the 8 streams run once without
faults: that run is the reference text of each prompt. Then the engine is killed `--kills`
times, then an HTTP worker, then the ZMQ frontend, each when the daemon has been ready for
STABLE_S and at least 6 streams are mid-way. Per fault:

- failed: tensor requests (HTTP, ZMQ) and streams that ended in an error, from the kill until
  the next fault;
- streams in flight at the kill, how many of them went on to finish, and token differences:
  streams (in flight at the kill or started after it) whose text or token count differs from
  the reference (a duplicated or lost token shows as one);
- ready: seconds from the kill until /readyz answers 200 again ("stayed" if it never turned red);
- first served: seconds from the kill until the first tensor request sent after it was served
  (ZMQ requests for the ZMQ frontend's fault, HTTP ones otherwise);
- the supervisor's own breakdown of each engine restart (spawned, answered, announced, each
  model loaded), read from its log.

    python -m benchmarks.faults [--kills 5] [--standby off|imports|models] [--out benchmarks/out/faults.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    from daemon.children import STABLE_S  # noqa: E402
except ImportError:     # a daemon from before restarts without backoff (for a before/after run)
    STABLE_S = 5.0
from tests.integration.daemon_proc import Daemon, http_get, wait_until  # noqa: E402

PROMPTS = [
    "The history of the printing press", "A recipe for bread starts with",
    "The three laws of motion are", "Once upon a time in a small village",
    "The best way to learn a language is", "Photosynthesis is the process",
    "In the year 2050, cities will", "The rules of chess say that",
]
MAX_TOKENS = 48
TENSOR_PERIOD_S = 0.05     # each of the 5 tensor clients: at most 20 requests/s (100/s in all)
ZMQ_TIMEOUT_S = 5.0        # a ZMQ request lost with its frontend fails after this


@dataclass(slots=True)
class Record:
    kind: str           # http | zmq | stream
    sent: float         # time.monotonic()
    done: float
    ok: bool
    error: str = ""
    prompt: int = -1    # streams: index into PROMPTS
    text: str = ""
    tokens: int = 0     # streams: usage.completion_tokens


@dataclass(slots=True)
class Fault:
    what: str
    at: float
    pid: int
    back_at: float = 0.0              # when the benchmark saw it back (new pid, ready)
    ready_s: float | None = None      # None: /readyz never turned red
    first_served_s: float | None = None
    failed_http: int = 0
    failed_zmq: int = 0
    failed_streams: int = 0
    in_flight: int = 0
    continued: int = 0
    token_diffs: int = 0
    compared: int = 0
    recovery_log: str = ""
    errors: list[str] = field(default_factory=list)


def build_repo(root: Path) -> Path:
    """The demo repository, smollm2 with float weights (greedy text is then exact)."""
    from tests.model_cache import prepare
    demo = prepare()
    for name in ("digits", "minilm", "digits-diffusion"):
        (root / name).symlink_to(demo / name, target_is_directory=True)
    vdir = root / "smollm2" / "1"
    vdir.mkdir(parents=True)
    for f in (demo / "smollm2" / "1").iterdir():
        if f.name != "model.toml":
            (vdir / f.name).symlink_to(f)
    toml = (demo / "smollm2" / "1" / "model.toml").read_text()
    (vdir / "model.toml").write_text(toml + 'weight_format = "float"\n')
    return root


class Load:
    """The mixed load; every finished request is a Record."""

    def __init__(self, d: Daemon) -> None:
        from daemon.demo import digits_split
        self.d = d
        self.x = digits_split()[1].astype(np.float32)
        self.records: list[Record] = []
        self.active: dict[int, dict[str, Any]] = {}     # stream worker → its current stream
        self.stop = asyncio.Event()

    async def _paced(self, period_s: float, started: float) -> None:
        """Sleep until the next tick of a fixed-rate loop (no catching up after a stall)."""
        await asyncio.sleep(max(0.0, period_s - (time.monotonic() - started)))

    async def http_digits(self, s: Any, k: int) -> None:
        i = k
        while not self.stop.is_set():
            row = self.x[i % len(self.x)]
            body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                "data": row.tolist()}]}
            t = time.monotonic()
            await self._timed("http", s.post(self.d.url + "/v2/models/digits/infer", json=body))
            await self._paced(TENSOR_PERIOD_S, t)
            i += 7

    async def http_embeddings(self, s: Any) -> None:
        i = 0
        while not self.stop.is_set():
            body = {"model": "minilm", "input": [f"fault sentence {i}"]}
            t = time.monotonic()
            await self._timed("http", s.post(self.d.url + "/v1/embeddings", json=body))
            await self._paced(TENSOR_PERIOD_S, t)
            i += 1

    async def _timed(self, kind: str, request: Any) -> None:
        sent = time.monotonic()
        try:
            async with request as r:
                await r.read()
                ok, err = r.status == 200, "" if r.status == 200 else f"HTTP {r.status}"
        except Exception as exc:     # a dropped connection is what is being counted
            ok, err = False, f"{type(exc).__name__}: {exc}"[:200]
        self.records.append(Record(kind, sent, time.monotonic(), ok, err))

    async def zmq_digits(self) -> None:
        from frontends.client import AsyncFerryClient
        client = AsyncFerryClient(self.d.zmq_endpoint, timeout_s=ZMQ_TIMEOUT_S)
        i = 0
        try:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    await client.infer("digits", {"pixels": self.x[i % len(self.x)][None]})
                    ok, err = True, ""
                except Exception as exc:
                    ok, err = False, f"{type(exc).__name__}: {exc}"[:200]
                self.records.append(Record("zmq", sent, time.monotonic(), ok, err))
                await self._paced(TENSOR_PERIOD_S, sent)
                i += 1
        finally:
            await client.close()

    async def stream(self, s: Any, k: int, once: bool = False) -> None:
        while not self.stop.is_set():
            state: dict[str, Any] = {"pieces": 0, "sent": time.monotonic()}
            self.active[k] = state
            rec = await self._one_stream(s, k, state)
            self.records.append(rec)
            if once:
                return

    async def _one_stream(self, s: Any, k: int, state: dict[str, Any]) -> Record:
        body = {"model": "smollm2", "prompt": PROMPTS[k], "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        text, tokens, err = [], 0, ""
        try:
            async with s.post(self.d.url + "/v1/completions", json=body) as r:
                if r.status != 200:
                    err = f"HTTP {r.status}"
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        err = json.dumps(event["error"])[:200]
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    for choice in event.get("choices", []):
                        text.append(choice.get("text", ""))
                        state["pieces"] += 1
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"[:200]
        return Record("stream", state["sent"], time.monotonic(), not err and tokens > 0, err,
                      k, "".join(text), tokens)


class ReadyWatch(threading.Thread):
    """Polls /readyz every 20 ms; keeps (time, status) samples."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.samples, self.stopping = url, [], threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                status = http_get(self.url + "/readyz", timeout=2.0)[0]
            except (OSError, ValueError):
                status = 0
            self.samples.append((time.monotonic(), status))
            time.sleep(0.02)

    def ready_again(self, t0: float, end: float) -> float | None:
        """Seconds from t0 to the first 200 after the last red sample before `end`; None: it
        never turned red."""
        after = [(t, s) for t, s in list(self.samples) if t0 <= t < end]
        red = [i for i, (_, s) in enumerate(after) if s != 200]
        if not red:
            return None
        later = [t for t, s in after[red[-1]:] if s == 200]
        return later[0] - t0 if later else float("nan")

    def ready_since(self) -> float:
        """How long /readyz has answered 200 without a break (0 if it does not now)."""
        since = None
        for t, s in reversed(list(self.samples)):
            if s != 200:
                break
            since = t
        return 0.0 if since is None else time.monotonic() - since


async def reference(d: Daemon) -> dict[int, Record]:
    import aiohttp
    load = Load(d)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(300)) as s:
        await asyncio.gather(*(load.stream(s, k, once=True) for k in range(len(PROMPTS))))
    refs = {r.prompt: r for r in load.records}
    bad = [r for r in refs.values() if not r.ok or r.tokens != MAX_TOKENS]
    if bad:
        raise RuntimeError(f"the reference run failed: {bad[:2]}")
    return refs


def _pid(d: Daemon, role: str) -> int:
    return wait_until(lambda: (d.child_pids(role) or [0])[0], 60, f"a {role} process")


async def inject(d: Daemon, load: Load, watch: ReadyWatch, what: str,
                 last_at: float, last_back: float, standbys: int) -> Fault:
    """Wait for a steady daemon with streams mid-way (and `standbys` standby processes started
    so far ready), kill `what`, wait for it to be back."""
    deadline = time.monotonic() + 180
    while not (watch.ready_since() > STABLE_S + 0.5
               and time.monotonic() - last_back > STABLE_S + 0.5
               and all(a["sent"] > last_at for a in load.active.values())
               and sum(1 for a in load.active.values() if a["pieces"] >= 2) >= 6
               and d.log().count("standby engine for") >= standbys):
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon did not settle before the fault")
        await asyncio.sleep(0.05)
    role = {"engine": "engine", "http worker": "http", "zmq frontend": "zmq"}[what]
    pid = _pid(d, role)
    fault = Fault(what, time.monotonic(), pid)
    os.kill(pid, signal.SIGKILL)

    def back() -> bool:
        pids = d.child_pids(role)
        return bool(pids) and pid not in pids and watch.ready_since() > 0.1
    await asyncio.to_thread(wait_until, back, 120, f"the {what} to be back")
    fault.back_at = time.monotonic()
    return fault


def settle(faults: list[Fault], records: list[Record], refs: dict[int, Record],
           watch: ReadyWatch, log: str) -> None:
    """Fill in each fault's counts from the records between its kill and the next fault."""
    backs = [json.loads(line) for line in log.splitlines()
             if line.startswith("{") and "is back (generation" in line]
    engine_faults = [f for f in faults if f.what == "engine"]
    for f, b in zip(engine_faults, backs[-len(engine_faults):] if engine_faults else []):
        f.recovery_log = b["msg"].split(": ", 1)[-1]
    for i, f in enumerate(faults):
        end = faults[i + 1].at if i + 1 < len(faults) else float("inf")
        mine = [r for r in records if f.at <= r.done < end]
        f.ready_s = watch.ready_again(f.at, end)
        kind = "zmq" if f.what == "zmq frontend" else "http"
        served = [r.done for r in mine if r.kind == kind and r.ok and r.sent >= f.at]
        f.first_served_s = min(served) - f.at if served else None
        f.failed_http = sum(1 for r in mine if r.kind == "http" and not r.ok)
        f.failed_zmq = sum(1 for r in mine if r.kind == "zmq" and not r.ok)
        streams = [r for r in mine if r.kind == "stream"]
        f.failed_streams = sum(1 for r in streams if not r.ok)
        f.continued = sum(1 for r in streams if r.ok and r.sent < f.at)
        f.in_flight = sum(1 for r in records if r.kind == "stream" and r.sent < f.at <= r.done)
        done = [r for r in streams if r.ok]
        f.compared = len(done)
        f.token_diffs = sum(1 for r in done if r.text != refs[r.prompt].text
                            or r.tokens != refs[r.prompt].tokens)
        f.errors = sorted({r.error for r in mine if not r.ok})[:5]


async def scenario(d: Daemon, kills: int, standby: bool) -> dict[str, Any]:
    import aiohttp
    refs = await reference(d)
    watch = ReadyWatch(d.url)
    watch.start()
    load = Load(d)
    faults: list[Fault] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(120)) as s:
        tasks = [asyncio.create_task(c) for c in (
            *(load.http_digits(s, k) for k in range(3)), load.http_embeddings(s),
            load.zmq_digits(), *(load.stream(s, k) for k in range(len(PROMPTS))))]
        last_at = last_back = 0.0
        for what in ["engine"] * kills + ["http worker", "zmq frontend"]:
            standbys = 1 + sum(f.what == "engine" for f in faults) if standby else 0
            faults.append(await inject(d, load, watch, what, last_at, last_back, standbys))
            last_at, last_back = faults[-1].at, faults[-1].back_at
            print(f"{what} killed and back", flush=True)
        # the streams in flight at the last fault, and a ZMQ request after it, finish first
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
                all(a["sent"] > last_at for a in load.active.values())
                and any(r.kind == "zmq" and r.ok and r.sent > last_at for r in load.records)):
            await asyncio.sleep(0.1)
        load.stop.set()
        await asyncio.gather(*tasks)
    watch.stopping.set()
    settle(faults, load.records, refs, watch, d.log())
    before = [r for r in load.records if r.done < faults[0].at]
    done = [r for r in before if r.kind == "stream" and r.ok]
    control = {"requests": len(before), "failed": sum(not r.ok for r in before),
               "streams_compared": len(done),
               "token_diffs": sum(1 for r in done if r.text != refs[r.prompt].text
                                  or r.tokens != refs[r.prompt].tokens)}
    t0 = load.records[0].sent if load.records else 0.0
    return {"faults": [{**asdict(f), "at": f.at - t0, "back_at": f.back_at - t0}
                       for f in faults],
            "before_faults": control,
            "records": [[r.kind, round(r.sent - t0, 3), round(r.done - t0, 3), r.ok, r.error]
                        for r in load.records],
            "requests": len(load.records), "streams": sum(r.kind == "stream"
                                                          for r in load.records)}


def table(result: dict[str, Any]) -> str:
    rows = ["| fault | failed HTTP / ZMQ / streams | streams in flight → finished | token "
            "differences (streams compared) | ready again | first tensor request served | "
            "engine restart (s after the kill) |", "|---|---|---|---|---|---|---|"]
    for f in result["faults"]:
        ready = "stayed ready" if f["ready_s"] is None else f"{f['ready_s']:.2f} s"
        first = "-" if f["first_served_s"] is None else f"{f['first_served_s']:.2f} s"
        rows.append(f"| {f['what']} | {f['failed_http']} / {f['failed_zmq']} / "
                    f"{f['failed_streams']} | {f['in_flight']} → {f['continued']} | "
                    f"{f['token_diffs']} ({f['compared']}) | {ready} | {first} | "
                    f"{f['recovery_log'] or '-'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5, help="engine kills")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--standby", choices=("off", "imports", "models"), default="off",
                        help="[engines] standby: a waiting engine process takes over")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    d = Daemon(build_repo(Path(tempfile.mkdtemp(prefix="faults"))), workers=args.workers,
               extra_config=f'[engines]\nstandby = "{args.standby}"\n'
               if args.standby != "off" else "")
    d.start(timeout_s=300)
    try:
        result = asyncio.run(scenario(d, args.kills, args.standby != "off"))
    finally:
        code = d.stop()
    result["exit_code"], result["standby"] = code, args.standby
    out = args.out or REPO / "benchmarks" / "out" / time.strftime(
        "faults-%Y%m%dT%H%M%SZ.json", time.gmtime())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"{result['requests']} requests ({result['streams']} streams); before the first "
          f"fault {result['before_faults']}; daemon exit code {code}; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
