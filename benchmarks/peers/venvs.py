"""The peers' own virtualenvs under benchmarks/out/peer-venvs/, built from the package registry.

Each peer gets a separate venv so that Ray's, BentoML's and llama-cpp-python's dependency trees
never touch Ferry's test environment (or each other). llama.cpp's C++ `llama-server` is built
with CMake from the llama.cpp source vendored in the llama-cpp-python sdist — the same release
the Python binding compiles — because llama-cpp-python's own server runs one request at a time,
while `llama-server` has parallel slots and continuous batching.

    python -m benchmarks.peers.venvs [llamacpp llama-server ray bentoml]

Installing takes minutes (the llama.cpp builds compile C++ on 2 cores); `ensure()` does nothing
for a peer that is already installed. A failed install raises `PeerUnavailable` with the exact
error lines, which the results page records.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

__all__ = ["PEERS", "PeerUnavailable", "ensure", "python_of", "llama_server_binary", "main"]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "benchmarks" / "out"
VENVS = OUT / "peer-venvs"
LOGS = OUT / "logs"

# peer -> (venv name, pip requirements, import check)
_PIP = {
    "llamacpp": ("llamacpp", ["llama-cpp-python[server]"], "import llama_cpp.server"),
    "ray": ("ray", ["ray[serve]", "onnxruntime", "numpy"], "import ray.serve, onnxruntime"),
    "bentoml": ("bentoml", ["bentoml", "onnxruntime", "numpy"], "import bentoml, onnxruntime"),
}
PEERS = ("llamacpp", "llama-server", "ray", "bentoml")
# run_all sets this False unless asked to install: a benchmark run must not spend its budget
# compiling. A peer that is missing then reports the error its last install attempt left.
AUTO_INSTALL = True


class PeerUnavailable(RuntimeError):
    """A peer could not be installed or built here; the message holds the exact error."""


def python_of(peer: str) -> Path:
    return VENVS / _PIP[peer][0] / "bin" / "python"


def llama_server_binary() -> Path:
    return VENVS / "llama-server" / "build" / "bin" / "llama-server"


def _run(argv: list[str], log_name: str, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / log_name
    with open(log_path, "ab") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n".encode())
        fh.flush()
        code = subprocess.call(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd,
                               env={**os.environ, **(env or {})})
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        errors = [line for line in tail if "rror" in line] or tail[-8:]
        raise PeerUnavailable(f"`{' '.join(argv[:4])} …` exited with {code}:\n"
                              + "\n".join(errors[-12:]))


def _installed(peer: str) -> bool:
    py = python_of(peer)
    return py.exists() and subprocess.call([str(py), "-c", _PIP[peer][2]],
                                           stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL) == 0


def _ensure_pip(peer: str) -> Path:
    if _installed(peer):
        return python_of(peer)
    venv, reqs, _ = _PIP[peer]
    log.info("installing %s into %s (minutes)", " ".join(reqs), VENVS / venv)
    _run([sys.executable, "-m", "venv", str(VENVS / venv)], f"install-{peer}.log")
    # llama-cpp-python compiles llama.cpp with CMake: two jobs on this 2-core machine.
    _run([str(python_of(peer)), "-m", "pip", "install", "--no-cache-dir", *reqs],
         f"install-{peer}.log", env={"CMAKE_BUILD_PARALLEL_LEVEL": "2"})
    return python_of(peer)


def _ensure_llama_server() -> Path:
    binary = llama_server_binary()
    if binary.exists():
        return binary
    py = _ensure_pip("llamacpp")
    version = subprocess.check_output(
        [str(py), "-c", "import llama_cpp; print(llama_cpp.__version__)"], text=True).strip()
    root = VENVS / "llama-server"
    src_dir = root / "sdist"
    src_dir.mkdir(parents=True, exist_ok=True)
    _run([str(py), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          "-d", str(src_dir), f"llama-cpp-python=={version}"],
         "install-llama-server.log")
    sdist = next(src_dir.glob("llama_cpp_python-*.tar.gz"), None) or \
        next(src_dir.glob("*.tar.gz"), None)
    if sdist is None:
        raise PeerUnavailable(f"pip downloaded no sdist of llama-cpp-python {version}")
    with tarfile.open(sdist) as tar:
        tar.extractall(src_dir, filter="data")
    llama = next(src_dir.glob("*/vendor/llama.cpp"))
    build = root / "build"
    _run(["cmake", "-S", str(llama), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
          "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON"],
         "install-llama-server.log")
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", "2"],
         "install-llama-server.log")
    if not binary.exists():
        found = next(build.rglob("llama-server"), None)
        if found is None:
            raise PeerUnavailable("the llama.cpp build produced no llama-server binary")
        return found
    return binary


def _error_file(peer: str) -> Path:
    return LOGS / f"install-{peer}.error"


def ensure(peer: str) -> Path:
    """Install `peer` if needed; return its python (or, for llama-server, its binary)."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; one of {PEERS}")
    installed = llama_server_binary().exists() if peer == "llama-server" else _installed(peer)
    if not installed and not AUTO_INSTALL:
        last = _error_file(peer)
        why = last.read_text() if last.exists() else "never installed"
        raise PeerUnavailable(f"{peer} is not installed ({why}); run "
                              f"`python -m benchmarks.peers.venvs {peer}`")
    try:
        path = _ensure_llama_server() if peer == "llama-server" else _ensure_pip(peer)
    except PeerUnavailable as exc:
        _error_file(peer).write_text(str(exc))
        raise
    _error_file(peer).unlink(missing_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    failed = 0
    for peer in (argv if argv else sys.argv[1:]) or PEERS:
        try:
            print(f"{peer}: {ensure(peer)}")
        except PeerUnavailable as exc:
            failed += 1
            print(f"{peer}: UNAVAILABLE: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
