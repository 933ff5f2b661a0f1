"""Peer servers for the side-by-side benchmarks: each started on this machine, on loopback, with
the same model file as Ferry, and driven by the same load generator.

- `llamacpp`: llama.cpp's own C++ `llama-server` (built from the source inside the
  llama-cpp-python sdist) and llama-cpp-python's `llama_cpp.server`, on the SmolLM2 GGUF;
- `naive_llm`: one request at a time through Ferry's PyTorch model, no batching (the floor);
- `ray_app`, `bentoml_service`: the MiniLM ONNX file under Ray Serve and BentoML with ONNX
  Runtime and each framework's dynamic batching.

Each peer with foreign dependencies lives in its own virtualenv under
benchmarks/out/peer-venvs/ (git-ignored; `python -m benchmarks.peers.venvs` builds them).
"""
