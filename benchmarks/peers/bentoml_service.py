"""BentoML serving the MiniLM ONNX file with ONNX Runtime and its adaptive batching.

Runs inside the BentoML venv (benchmarks/out/peer-venvs/bentoml), not Ferry's; imports nothing
of Ferry. One worker, as Ferry has one engine; `batchable=True` with Ferry's max batch size (32)
and BentoML's default `max_latency_ms` (its adaptive dispatcher picks the wait itself).

A batchable BentoML API takes exactly one argument, so ids and mask travel stacked:

    BENCH_ONNX=model.onnx bentoml serve benchmarks.peers.bentoml_service:MiniLM --port 8300
    POST /embed {"tokens": [[[ids...], [mask...]]]}  ([B, 2, S] int64) → [[...384 floats]]

BentoML concatenates requests along the batch axis, so all rows in one batch must share a
sequence length; the benchmark sends one fixed sentence, so they do.
"""
from __future__ import annotations

import os

import bentoml
import numpy as np


@bentoml.service(workers=1, traffic={"timeout": 60})
class MiniLM:
    def __init__(self) -> None:
        import onnxruntime as ort
        self.session = ort.InferenceSession(os.environ["BENCH_ONNX"],
                                            providers=["CPUExecutionProvider"])

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=32)
    def embed(self, tokens: np.ndarray) -> np.ndarray:
        tokens = tokens.astype(np.int64, copy=False)                          # [B, 2, S]
        return self.session.run(None, {"input_ids": tokens[:, 0],
                                       "attention_mask": tokens[:, 1]})[0]    # [B, 384]
