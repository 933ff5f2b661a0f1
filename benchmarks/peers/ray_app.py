"""Ray Serve serving the MiniLM ONNX file with ONNX Runtime and `@serve.batch`.

Runs inside the Ray venv (benchmarks/out/peer-venvs/ray), not Ferry's; imports nothing of
Ferry. One replica, as Ferry has one engine; `@serve.batch` with Ferry's max batch size (32)
and Ray's default wait (`batch_wait_timeout_s` 0.01 s, the value its docs recommend starting
from).

    RAY_USAGE_STATS_ENABLED=0 python benchmarks/peers/ray_app.py --onnx model.onnx --port 8200

POST / {"input_ids": [[...]], "attention_mask": [[...]]} → {"embeddings": [[...384 floats]]}
"""
from __future__ import annotations

import argparse
import signal
import threading

import numpy as np


def build(onnx_path: str, max_batch: int, wait_s: float):
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=1, max_ongoing_requests=256)
    class Embedder:
        def __init__(self) -> None:
            import onnxruntime as ort
            self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_s)
        async def embed(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
            width = max(ids.shape[0] for ids, _ in rows)
            ids = np.zeros((len(rows), width), np.int64)                  # [B, S]
            mask = np.zeros((len(rows), width), np.int64)
            for k, (i, m) in enumerate(rows):
                ids[k, :len(i)], mask[k, :len(m)] = i, m
            out = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            return list(out)                                              # B × [384]

        async def __call__(self, request: Request) -> JSONResponse:
            if request.method == "GET":                   # readiness: the app is deployed
                return JSONResponse({"ready": True})
            body = await request.json()
            ids = np.asarray(body["input_ids"], np.int64)
            mask = np.asarray(body["attention_mask"], np.int64)
            rows = [await self.embed((ids[k], mask[k])) for k in range(ids.shape[0])]
            return JSONResponse({"embeddings": [r.tolist() for r in rows]})

    return Embedder.bind()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--wait-s", type=float, default=0.01)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    import ray
    from ray import serve
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build(args.onnx, args.max_batch, args.wait_s), name="minilm", route_prefix="/")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("READY", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
