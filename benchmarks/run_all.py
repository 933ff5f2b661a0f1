"""The whole side-by-side comparison in one command, then RESULTS.md's peers section rewritten.

    python -m benchmarks.run_all                 # ~15 min on a 2-core machine (peers installed)
    python -m benchmarks.run_all --only llm      # or tensor / transport
    python -m benchmarks.peers.venvs             # install the peers first (minutes; once)

In order: the transport benchmark (bench_transport.py, called as is); MiniLM on Ferry, Ray Serve
and BentoML; SmolLM2 on Ferry, llama.cpp's llama-server, llama-cpp-python's server and the naive
baseline. Within each part every server is up at once but only one is loaded at a time, the
systems taking turns at each load level, so that noise from the rest of this shared machine
lands on each alike (idle servers cost little; Ray's idle daemons cost the others a few %).
py-spy samples Ferry's engine and HTTP processes during an extra pass at the heaviest
load. A peer that cannot be installed or started is recorded with its exact error; the rest
still runs. Raw numbers go to benchmarks/out/peers.json, plots to benchmarks/plots/.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import llm_suite, plots, results_md, tensor_suite  # noqa: E402
from benchmarks import targets as T  # noqa: E402
from benchmarks.loadgen import run_closed  # noqa: E402
from benchmarks.peers import llamacpp, venvs  # noqa: E402
from benchmarks.peers.process import PeerFailed, PeerProcess  # noqa: E402
from benchmarks.pyspy import Profiler  # noqa: E402
from tests.integration.daemon_proc import Daemon, free_port  # noqa: E402

__all__ = ["main"]

log = logging.getLogger("benchmarks.run_all")
OUT = REPO / "benchmarks" / "out"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
PLOTS = REPO / "benchmarks" / "plots"
THREADS = 2


def demo_models() -> Path:
    from daemon.demo import prepare_demo_models
    key = hashlib.sha256((REPO / "daemon" / "demo.py").read_bytes()).hexdigest()[:12]
    models = Path(os.environ.get("FERRY_TEST_MODELS", REPO / "var" / "test-models")) / key
    prepare_demo_models(models)
    return models


def repo_of(models: Path, *names: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="fyrun"))
    for name in names:
        (root / name).symlink_to(models / name, target_is_directory=True)
    return root


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines()
        if line.startswith("Model name")), platform.processor())
    os_name = next((line.split("=", 1)[1].strip().strip('"') for line in
                    Path("/etc/os-release").read_text().splitlines()
                    if line.startswith("PRETTY_NAME=")), platform.platform())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram, 1), "os": os_name,
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "peers": peer_versions(),
            "load_before": round(os.getloadavg()[0], 1),
            "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M")}


def peer_versions() -> str:
    found = []
    for peer, mod in (("ray", "ray"), ("bentoml", "bentoml"), ("llamacpp", "llama_cpp")):
        py = venvs.python_of(peer)
        if py.exists():
            v = subprocess.run([str(py), "-c", f"import {mod}; print({mod}.__version__)"],
                               capture_output=True, text=True).stdout.strip()
            if v:
                found.append(f"{mod} {v}")
    return ", ".join(found) or "none installed"


def profile_during(pids: dict[str, int], seconds: float, drive: Any, tag: str) -> list[dict]:
    """Sample each pid with py-spy while `drive()` (a coroutine factory) runs load."""
    slug = re.sub(r"[^a-z0-9]+", "-", tag.lower()).strip("-")
    profs = [Profiler(pid, seconds, OUT / "profiles" / f"{slug}-{label.replace(' ', '-')}.txt",
                      label=f"{tag}: {label}").start() for label, pid in pids.items()]
    try:
        asyncio.run(drive())
    except Exception as exc:   # the profile pass only informs; its numbers are not reported
        log.warning("profiling load for %s failed: %s", tag, exc)
    return [p.finish() for p in profs]


def ferry_pids(d: Daemon) -> dict[str, int]:
    pids = {"engine": d.child_pids("engine")[0]}
    pids.update({f"http worker {k}": pid for k, pid in enumerate(d.child_pids("http"))})
    return pids


# -- the three parts ----------------------------------------------------------------------------

def run_transport(r: dict[str, Any], n: int) -> None:
    from benchmarks import bench_transport
    out = OUT / "transport.json"
    code = bench_transport.main(["--n", str(n), "--out", str(out)])
    if code == 0:
        r["transport"] = json.loads(out.read_text())


def _start_tensor_peers(r: dict[str, Any], onnx: Path) -> list[tuple[PeerProcess, Any]]:
    up = []
    for make, name in ((tensor_suite.ray_peer, "ray-serve"),
                       (tensor_suite.bentoml_peer, "bentoml")):
        try:
            proc, target_of = make(onnx, free_port())
            up.append((proc.start(timeout_s=240.0), target_of))
        except (PeerFailed, venvs.PeerUnavailable, OSError) as exc:
            log.error("%s unavailable: %s", name, exc)
            r["failures"][name] = f"{type(exc).__name__}: {exc}"
    return up


def run_tensor(r: dict[str, Any], models: Path, cfg: tensor_suite.TensorConfig) -> None:
    """Ferry and both peers up at once; capacities, then the rate sweep in turns."""
    model_dir = models / "minilm" / "1"
    inputs = tensor_suite.minilm_inputs(model_dir)
    d = Daemon(repo_of(models, "minilm"), workers=2).start()
    peers: list[tuple[PeerProcess, Any]] = []
    try:
        peers = _start_tensor_peers(r, model_dir / "model.onnx")
        targets = tensor_suite.ferry_targets(d.url, d.zmq_endpoint, inputs)
        targets += [target_of(inputs) for _, target_of in peers]
        extras = {"ferry-kserve-binary", "ferry-zmq-inline", "ferry-zmq-shm"}  # capacity only
        swept = {t.name for t in targets if cfg.sweep_ferry_extras or t.name not in extras}
        systems = asyncio.run(tensor_suite.measure_interleaved(targets, swept, cfg))
        for s in systems:
            if s.error:
                r["failures"][s.name] = s.error
        target = tensor_suite.ferry_targets(d.url, d.zmq_endpoint, inputs)[0]

        async def drive() -> None:
            await target.open()
            try:
                await run_closed(target, cfg.concurrency, duration_s=8.0)
            finally:
                await target.close()
        r["profiles"] += profile_during(ferry_pids(d), 7.0, drive,
                                        "MiniLM KServe JSON, 16 clients")
    finally:
        for proc, _ in peers:
            proc.stop()
        d.stop()
    r["tensor"] = {"p99_bound_ms": cfg.p99_bound_ms,
                   "sequence_tokens": int(inputs["input_ids"].shape[1]),
                   "systems": [s.to_dict() for s in systems]}


def _prefix(r: dict[str, Any], name: str, url: str, extra: dict,
            cfg: llm_suite.LLMConfig) -> None:
    try:
        r["llm"]["prefix"][name] = asyncio.run(
            llm_suite.prefix_runs(url, "smollm2", extra, cfg, name))
    except Exception as exc:   # recorded; the rest still runs
        log.exception("prefix runs on %s failed", name)
        r["llm"]["prefix"][name] = {"error": f"{type(exc).__name__}: {exc}"}


def _llm_peers(gguf: Path, c_max: int) -> list[tuple[str, Any]]:
    """(name, port -> PeerProcess) for every LLM peer."""
    naive = (lambda port: PeerProcess(
        "naive-torch", [sys.executable, "-m", "benchmarks.peers.naive_llm", "--gguf", str(gguf),
                        "--port", str(port), "--threads", str(THREADS)],
        f"http://127.0.0.1:{port}/health", venvs.LOGS / "peer-naive.log", cwd=REPO))
    return [("llama-server", lambda port: llamacpp.llama_server(gguf, port, threads=THREADS,
                                                                 parallel=c_max)),
            ("llama-cpp-python", lambda port: llamacpp.llama_cpp_python(gguf, port,
                                                                         threads=THREADS)),
            ("naive-torch", naive)]


def _start_peers(r: dict[str, Any], gguf: Path, c_max: int) -> dict[str, PeerProcess]:
    started = {}
    for name, make in _llm_peers(gguf, c_max):
        try:
            started[name] = make(free_port()).start(timeout_s=300)
        except (PeerFailed, venvs.PeerUnavailable, OSError) as exc:
            log.error("%s unavailable: %s", name, exc)
            r["failures"][name] = f"{type(exc).__name__}: {exc}"
            r["llm"]["systems"].append({"name": name, "error": str(exc)[:300], "levels": []})
    return started


def _llm_targets(d: Daemon, peers: dict[str, PeerProcess], cfg: llm_suite.LLMConfig,
                 eos: tuple[int, ...]) -> list[Any]:
    msgs, n = llm_suite.story_messages, cfg.max_tokens
    extra = llamacpp.request_extra("ferry", eos)
    out = [T.ChatStream("ferry-sse", d.url, "smollm2", msgs, max_tokens=n, extra=extra),
           T.WsStream("ferry-ws", d.url, "smollm2", msgs, max_tokens=n, extra=extra)]
    for name, proc in peers.items():
        url = proc.ready_url.split("/", 3)
        out.append(T.ChatStream(name, "/".join(url[:3]), "smollm2", msgs, max_tokens=n,
                                extra=llamacpp.request_extra(name, eos)))
    return out


def _profile_llm(r: dict[str, Any], d: Daemon, cfg: llm_suite.LLMConfig,
                 eos: tuple[int, ...]) -> None:
    c = cfg.concurrency[-1]
    target = T.ChatStream("ferry-sse", d.url, "smollm2", llm_suite.story_messages,
                          max_tokens=cfg.max_tokens, extra=llamacpp.request_extra("ferry", eos))

    async def drive() -> None:
        await target.open()
        try:
            await run_closed(target, c, requests=c, timeout_s=600.0, first_index=50_000)
        finally:
            await target.close()
    r["profiles"] += profile_during(ferry_pids(d), 10.0, drive, f"SmolLM2 SSE, {c} streams")


def run_llm(r: dict[str, Any], models: Path, cfg: llm_suite.LLMConfig) -> None:
    """Every LLM server up at once (idle ones cost no CPU), then the levels round-robin."""
    from engines.llm.tokenizer import Tokenizer
    gguf = (models / "smollm2" / "1" / "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
    eos = Tokenizer.from_gguf(gguf).eos_ids
    r["llm"] = {"max_tokens": cfg.max_tokens, "concurrency": list(cfg.concurrency),
                "rounds": cfg.rounds, "systems": [], "prefix": {}}
    d = Daemon(repo_of(models, "smollm2"), workers=2,
               env={"FERRY_TORCH_THREADS": str(THREADS)}).start(timeout_s=300)
    peers: dict[str, PeerProcess] = {}
    try:
        peers = _start_peers(r, gguf, cfg.concurrency[-1])
        results = asyncio.run(llm_suite.round_robin(_llm_targets(d, peers, cfg, eos), cfg))
        for name, res in results.items():
            if isinstance(res, Exception):
                r["failures"][name] = f"{type(res).__name__}: {res}"
                r["llm"]["systems"].append({"name": name, "error": str(res)[:300],
                                            "levels": []})
            else:
                r["llm"]["systems"].append({"name": name, "levels": [x.to_dict() for x in res]})
        _prefix(r, "ferry", d.url, llamacpp.request_extra("ferry", eos), cfg)
        if "llama-server" in peers:
            url = "/".join(peers["llama-server"].ready_url.split("/", 3)[:3])
            _prefix(r, "llama-server", url, llamacpp.request_extra("llama-server", eos), cfg)
        _profile_llm(r, d, cfg, eos)
    finally:
        for proc in peers.values():
            proc.stop()
        d.stop()


# -- main -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["transport", "tensor", "llm"], action="append")
    ap.add_argument("--transport-n", type=int, default=1000)
    ap.add_argument("--p99-bound-ms", type=float, default=100.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    ap.add_argument("--render-only", action="store_true",
                    help="re-render RESULTS.md and the plots from benchmarks/out/peers.json")
    ap.add_argument("--install", action="store_true",
                    help="install missing peers first (minutes; else they are reported missing)")
    ap.add_argument("--quick", action="store_true",
                    help="a few seconds per system, to check the pipeline (implies --no-write)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.render_only:
        return write_results(json.loads((OUT / "peers.json").read_text()), PLOTS, write=True)
    parts = args.only or ["transport", "tensor", "llm"]
    venvs.AUTO_INSTALL = args.install
    started = time.monotonic()
    r: dict[str, Any] = {"machine": machine(), "profiles": [], "failures": {}, "notes": []}
    previous = OUT / "peers.json"
    if args.only and previous.exists():
        # A partial run keeps the other parts of the last full run (they are labelled by it).
        old = json.loads(previous.read_text())
        r.update({k: old[k] for k in ("transport", "tensor", "llm") if k in old and k not in parts})
        r["notes"].append(f"This page merges a run of {', '.join(parts)} with earlier results "
                          "for the other parts.")
    models = demo_models()
    tcfg = tensor_suite.TensorConfig(p99_bound_ms=args.p99_bound_ms)
    lcfg = llm_suite.LLMConfig(max_tokens=args.max_tokens)
    if args.quick:
        args.no_write, args.transport_n = True, 200
        tcfg.capacity_s, tcfg.step_s = 2.0, 2.0
        lcfg = llm_suite.LLMConfig(max_tokens=8, concurrency=(1, 4), rounds=1, prefix_trials=1)
    if "transport" in parts:
        run_transport(r, args.transport_n)
    if "tensor" in parts:
        run_tensor(r, models, tcfg)
    if "llm" in parts:
        run_llm(r, models, lcfg)
    r["machine"]["load_after"] = round(os.getloadavg()[0], 1)
    r["machine"]["wall_min"] = round((time.monotonic() - started) / 60, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("peers-quick.json" if args.quick else "peers.json")).write_text(json.dumps(r, indent=2))
    return write_results(r, OUT / "plots-quick" if args.quick else PLOTS,
                         write=not args.no_write)


def write_results(r: dict[str, Any], plot_dir: Path, write: bool) -> int:
    made = plots.plot_all(r, plot_dir)
    notes = RESULTS.parent / "peers_reading.md"
    section = results_md.render(r, made, RESULTS.parent,
                                notes.read_text() if notes.exists() else "")
    print(section)
    if write:
        RESULTS.write_text(results_md.splice(RESULTS.read_text(), section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
