"""llama.cpp on the SmolLM2 GGUF Ferry serves, with the same thread count.

- `llama_server()`: llama.cpp's C++ `llama-server` with `--parallel` slots and continuous
  batching (its default), the context split across the slots (`-c` = slots × per-slot context);
- `llama_cpp_python()`: llama-cpp-python's `llama_cpp.server` (FastAPI), which serves one
  request at a time (it has no parallel slots; later requests wait for the model lock).

Both speak OpenAI's `/v1/chat/completions` with SSE and render the chat template from the GGUF.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.peers import venvs
from benchmarks.peers.process import PeerProcess

__all__ = ["llama_server", "llama_cpp_python", "request_extra"]


def llama_server(gguf: Path, port: int, *, threads: int, parallel: int,
                 slot_context: int = 2048) -> PeerProcess:
    binary = venvs.ensure("llama-server")
    argv = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-tb", str(threads), "-np", str(parallel),
            "-c", str(parallel * slot_context), "--cont-batching", "--jinja"]
    return PeerProcess("llama-server", argv, f"http://127.0.0.1:{port}/health",
                       venvs.LOGS / "peer-llama-server.log")


def llama_cpp_python(gguf: Path, port: int, *, threads: int, context: int = 4096) -> PeerProcess:
    py = venvs.ensure("llamacpp")
    argv = [str(py), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(context), "--model_alias", "smollm2",
            # By default a new request interrupts the one streaming: queue them instead.
            "--interrupt_requests", "False"]
    return PeerProcess("llama-cpp-python", argv, f"http://127.0.0.1:{port}/v1/models",
                       venvs.LOGS / "peer-llama-cpp-python.log")


def request_extra(kind: str, eos_ids: tuple[int, ...]) -> dict:
    """Request fields that make each server decode greedily for exactly max_tokens tokens.

    Ferry and llama-server take vLLM's `ignore_eos`; llama-cpp-python has no such field, so its
    end-of-sequence tokens are banned through `logit_bias` instead.
    """
    if kind == "llama-cpp-python":
        return {"temperature": 0, "logit_bias": {str(e): -100 for e in eos_ids}}
    return {"temperature": 0, "ignore_eos": True}
