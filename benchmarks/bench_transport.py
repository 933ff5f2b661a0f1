"""Transport overheads, side by side in one run on one machine:

1. raw ZeroMQ ipc round trip (the floor) vs Ferry's ZMQ client round trip on an identity model
   (client → zmq frontend → engine → back; the engine's own compute time is subtracted);
2. Ferry's KServe HTTP infer vs a bare aiohttp server that parses the same JSON and echoes it;
3. one 16 MiB float32 tensor through the client's shared-memory region vs an inline ZMQ frame vs
   HTTP binary vs HTTP JSON.

    python -m benchmarks.bench_transport [--n 2000] [--out benchmarks/out/transport.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.daemon_proc import Daemon, free_port  # noqa: E402


def make_identity_repo(root: Path) -> Path:
    """`identity` (dynamic float32 vector in, same out), no batching delay."""
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    vdir = root / "identity" / "1"
    vdir.mkdir(parents=True)
    onnx.save(model, vdir / "model.onnx")
    (vdir / "model.toml").write_text('engine = "onnx"\nweights = "model.onnx"\nmax_batch_size = 0\n'
                                     '[batching]\nmax_queue_delay_us = 0\n')
    return root


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def summary(samples_s: list[float]) -> dict[str, float]:
    us = [s * 1e6 for s in samples_s]
    return {"p50_us": pct(us, 50), "p99_us": pct(us, 99), "mean_us": statistics.fmean(us),
            "n": len(us)}


# -- 1. raw zmq floor ------------------------------------------------------------------------

def _echo_server(endpoint: str, ready: mp.Event) -> None:
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    ready.set()
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[1].bytes == b"stop":
            break
        sock.send_multipart(frames, copy=False)


def raw_zmq_rtt(n: int, payload: bytes, rt: Path) -> dict[str, float]:
    import zmq
    endpoint = f"ipc://{rt}/raw-echo.sock"
    ready = mp.Event()
    proc = mp.Process(target=_echo_server, args=(endpoint, ready), daemon=True)
    proc.start()
    ready.wait(10)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    header = b"h" * 64
    samples = []
    for i in range(n + 100):
        t0 = time.perf_counter()
        sock.send_multipart([header, payload], copy=False)
        sock.recv_multipart(copy=False)
        if i >= 100:
            samples.append(time.perf_counter() - t0)
    sock.send_multipart([b"stop"])
    proc.join(5)
    sock.close(0)
    return summary(samples)


def ferry_zmq_rtt(n: int, endpoint: str, x: np.ndarray) -> tuple[dict, dict]:
    from daemon import protocol as P
    from frontends.client import FerryClient
    with FerryClient(endpoint) as c:
        samples, compute = [], []
        for i in range(n + 100):
            msg = P.Infer(f"b{i}", "identity", 0, [P.TensorRef("x", "float32", x.shape, frame=0)])
            t0 = time.perf_counter()
            reply, _ = c.send_raw(P.encode(msg, [x]))
            dt = time.perf_counter() - t0
            assert isinstance(reply, P.InferResult), reply
            if i >= 100:
                samples.append(dt)
                compute.append(reply.compute_us * 1e-6)
    return summary(samples), summary(compute)


# -- 2. HTTP vs bare aiohttp -----------------------------------------------------------------

def _bare_aiohttp(port: int, ready: mp.Event) -> None:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        arr = np.asarray(body["inputs"][0]["data"], dtype=np.float32)
        return web.json_response({"outputs": [{"name": "y", "datatype": "FP32",
                                               "shape": list(arr.shape),
                                               "data": arr.tolist()}]})
    app = web.Application()
    app.router.add_post("/echo", handle)
    import uvloop
    uvloop.install()
    ready.set()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def http_rtt(url: str, n: int, x: np.ndarray) -> dict[str, float]:
    import aiohttp
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.tolist()}]})
    samples = []
    async with aiohttp.ClientSession() as s:
        for i in range(n + 100):
            t0 = time.perf_counter()
            async with s.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                assert r.status == 200
            if i >= 100:
                samples.append(time.perf_counter() - t0)
    return summary(samples)


# -- 3. a 16 MiB tensor ----------------------------------------------------------------------

def big_tensor_runs(endpoint: str, url: str, reps: int) -> dict[str, dict]:
    from frontends.client import FerryClient
    x = np.random.default_rng(0).random(4 << 20, dtype=np.float32)   # 16 MiB
    out: dict[str, dict] = {}
    with FerryClient(endpoint) as c:
        c.register_region("bench-big", 40 << 20)
        for name, kw in (("zmq_shm", {"use_shm": True}), ("zmq_inline", {})):
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                y = c.infer("identity", {"x": x}, **kw)["y"]
                samples.append(time.perf_counter() - t0)
                assert y.shape == x.shape
            out[name] = summary(samples)

    async def http_runs() -> None:
        import aiohttp
        head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [x.size],
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}}).encode()
        binary_headers = {"Inference-Header-Content-Length": str(len(head)),
                          "Content-Type": "application/octet-stream"}
        json_body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                            "shape": [x.size], "data": x.tolist()}]})
        async with aiohttp.ClientSession() as s:
            for name, data, headers in (
                    ("http_binary", head + x.tobytes(), binary_headers),
                    ("http_json", json_body, {"Content-Type": "application/json"})):
                samples = []
                for _ in range(reps if name == "http_binary" else max(2, reps // 4)):
                    t0 = time.perf_counter()
                    async with s.post(url, data=data, headers=headers) as r:
                        await r.read()
                        assert r.status == 200, await r.text()
                    samples.append(time.perf_counter() - t0)
                out[name] = summary(samples)
    asyncio.run(http_runs())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--big-reps", type=int, default=12)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "transport.json"))
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fyb", dir="/tmp"))
    repo = make_identity_repo(tmp / "models")
    d = Daemon(repo, workers=1, server_extra="max_body_mb = 512").start()
    results: dict[str, object] = {}
    try:
        small = np.ones(64, np.float32)
        results["raw_zmq"] = raw_zmq_rtt(args.n, small.tobytes(), tmp)
        results["ferry_zmq"], results["ferry_zmq_compute"] = ferry_zmq_rtt(
            args.n, d.zmq_endpoint, small)
        port = free_port()
        ready = mp.Event()
        bare = mp.Process(target=_bare_aiohttp, args=(port, ready), daemon=True)
        bare.start()
        ready.wait(10)
        time.sleep(0.5)   # run_app binds after `ready`; a missed first connect is retried
        results["bare_aiohttp"] = asyncio.run(
            http_rtt(f"http://127.0.0.1:{port}/echo", args.n // 2, small))
        bare.terminate()
        results["ferry_http"] = asyncio.run(
            http_rtt(d.url + "/v2/models/identity/infer", args.n // 2, small))
        results["big_16mib"] = big_tensor_runs(d.zmq_endpoint, d.url + "/v2/models/identity/infer",
                                               args.big_reps)
    finally:
        assert d.stop() == 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(render(results))
    return 0


def render(r: dict) -> str:
    raw, fz, comp = r["raw_zmq"]["p50_us"], r["ferry_zmq"]["p50_us"], r["ferry_zmq_compute"]["p50_us"]
    bare, fh = r["bare_aiohttp"]["p50_us"], r["ferry_http"]["p50_us"]
    big = r["big_16mib"]
    lines = [
        "| measurement (p50) | value | ratio |",
        "|---|---|---|",
        f"| raw ZMQ ipc round trip (64 B header + 256 B) | {raw:.0f} µs | 1.00 |",
        f"| Ferry ZMQ client round trip, identity model | {fz:.0f} µs | {fz / raw:.2f}× raw |",
        f"| … of which engine compute | {comp:.0f} µs | |",
        f"| Ferry ZMQ overhead (round trip − compute) | {fz - comp:.0f} µs | {(fz - comp) / raw:.2f}× raw |",
        f"| bare aiohttp JSON echo | {bare:.0f} µs | 1.00 |",
        f"| Ferry KServe HTTP JSON infer, identity model | {fh:.0f} µs | {fh / bare:.2f}× bare |",
    ]
    base = big["zmq_shm"]["p50_us"]
    for name in ("zmq_shm", "zmq_inline", "http_binary", "http_json"):
        v = big[name]["p50_us"]
        lines.append(f"| 16 MiB tensor round trip: {name} | {v / 1000:.1f} ms | {v / base:.2f}× shm |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
