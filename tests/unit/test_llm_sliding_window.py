"""Mistral's, Qwen2's and Llama's sliding windows, against transformers on tiny random models with
a window of 5 tokens (prompts run far past it): which layers slide (Qwen2's `use_sliding_window`,
`max_window_layers`, `layer_types`; Mistral every layer, whatever `layer_types` says; Llama none,
as transformers ignores a Llama config's `sliding_window`), float logits <= 1e-4 through prefill
and decode, chunked prefill over a cached prefix, the engine's batched greedy tokens, and GGUF
files (llama.cpp's converter writes Mistral as "llama" and writes no window for it or Qwen2; a
file that carries `*.attention.sliding_window` gets it, Qwen2 only with its per-layer flags).
When every layer slides, the blocks behind the window go back to the pool (exact block ids and
reference counts with a shared prefix; the engine then runs more sequences at once, tokens
unchanged)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.llm.config import UnsupportedModelConfig
from engines.llm.kv_cache import PagedKVCache
from engines.llm.model import ForwardBatch, load_model
from engines.llm.safetensors_loader import config_from_hf
from tests.unit.test_llm_model import (BS, TOL, Seq, check_against, gguf_name, hf_logits,
                                       llama_cpp_permute, prompt)

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.timeout(120)

W = 5
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-5, attn_implementation="eager", bos_token_id=1, eos_token_id=2)
CLASSES = {"mistral": ("MistralConfig", "MistralForCausalLM"),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "llama": ("LlamaConfig", "LlamaForCausalLM")}
# name -> (arch, config kwargs beyond SHAPE, the layers transformers slides)
CASES = {
    "mistral": ("mistral", dict(sliding_window=W), (0, 1, 2)),
    # Ministral's field on a Mistral config: MistralForCausalLM ignores it
    "mistral_layer_types": ("mistral", dict(sliding_window=W, layer_types=["full_attention"] * 3),
                            (0, 1, 2)),
    "qwen2_from_layer_1": ("qwen2", dict(use_sliding_window=True, sliding_window=W,
                                         max_window_layers=1), (1, 2)),
    "qwen2_every_layer": ("qwen2", dict(use_sliding_window=True, sliding_window=W,
                                        max_window_layers=0), (0, 1, 2)),
    "qwen2_layer_types": ("qwen2", dict(use_sliding_window=True, sliding_window=W,
                                        layer_types=["sliding_attention", "full_attention",
                                                     "sliding_attention"]), (0, 2)),
}


def hf_model(arch: str, seed: int, **changes):
    config_cls, model_cls = CLASSES[arch]
    cfg = getattr(transformers, config_cls)(**{**SHAPE, **changes})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():                       # HF inits norms to 1 and biases to 0
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def hf_sliding(d: dict) -> tuple[int, ...]:
    """The layers transformers' own model slides (its attention modules' windows)."""
    arch = d["model_type"]
    cfg = getattr(transformers, CLASSES[arch][0])(**d)
    if arch == "mistral":
        return tuple(range(cfg.num_hidden_layers)) if cfg.sliding_window else ()
    if arch == "llama":
        return ()
    types = cfg.layer_types if cfg.sliding_window else []
    return tuple(i for i, t in enumerate(types) if t == "sliding_attention")


@pytest.mark.parametrize("name", list(CASES))
def test_safetensors_directory_matches_transformers_past_the_window(tmp_path, name):
    arch, changes, layers = CASES[name]
    ref = hf_model(arch, seed=1, **changes)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert (ours.cfg.sliding_window, ours.cfg.window_layers) == (W, layers)
    assert hf_sliding(ref.config.to_dict()) == layers
    check_against(ours, ref, prompt(24, 2), prefill=17)


@pytest.mark.parametrize("arch,changes", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=W, max_window_layers=2)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=W, max_window_layers=3)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=W)),      # default 28: none slide
    ("qwen2", dict(use_sliding_window=False, sliding_window=W, max_window_layers=0)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=W,
                   layer_types=["full_attention"] * 3, max_window_layers=0)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=256, max_window_layers=0)),
    ("mistral", dict(sliding_window=None)),                          # v0.2 and later
    ("mistral", dict(sliding_window=W)),
    ("mistral", dict()),                                             # absent: 4096 >= context
    ("llama", dict(sliding_window=W)),
    ("llama", dict(sliding_window=W, layer_types=["sliding_attention"] * 3)),
])
def test_the_layers_that_slide_are_the_ones_transformers_slides(arch, changes):
    d = {**SHAPE, "model_type": arch, **changes}
    if "max_window_layers" not in changes:
        d.pop("max_window_layers", None)
    cfg = config_from_hf(d)
    expected = hf_sliding({k: v for k, v in d.items() if k != "attn_implementation"})
    window = d.get("sliding_window", 4096)
    if not expected or window >= d["max_position_embeddings"]:
        assert (cfg.sliding_window, cfg.window_layers) == (None, ())
    else:
        assert (cfg.sliding_window, cfg.window_layers) == (W, expected)


def test_llama_ignores_a_window_as_transformers_does(tmp_path):
    ref = hf_model("llama", seed=3, sliding_window=W, head_dim=16)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.cfg.window_layers == ()
    check_against(ours, ref, prompt(20, 4), prefill=12)


def test_the_window_changes_the_logits():
    """The comparisons above are not vacuous: the same weights without the window differ."""
    tokens = prompt(20, 5)
    windowed = hf_logits(hf_model("mistral", seed=6, sliding_window=W), tokens)[-1]
    full = hf_logits(hf_model("mistral", seed=6, sliding_window=None), tokens)[-1]
    assert float((windowed - full).abs().max()) > 1e-2


@pytest.mark.parametrize("name", ["mistral", "qwen2_from_layer_1"])
def test_chunks_on_a_cached_prefix_and_deterministic_rows_match(tmp_path, name):
    arch, changes, _ = CASES[name]
    ref = hf_model(arch, seed=7, **changes)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    tokens = prompt(26, 8)
    chunks_match(ours, tokens, hf_logits(ref, tokens))


def chunks_match(ours, tokens: list[int], expected) -> None:
    """Prefill `tokens` in chunks shorter and longer than the window, over blocks handed out
    backwards, default and deterministic: each chunk's last logits are transformers'."""
    for deterministic in (False, True):
        kv = PagedKVCache(ours.cfg, 16, BS, torch.float32, "cpu")
        seq = Seq(tokens, list(range(15, -1, -2)))
        for n in (3, 9, 1, 6, 2, 5):             # chunks shorter and longer than the window
            new, positions = seq.chunk(n)
            batch = ForwardBatch(torch.tensor(new), torch.tensor(positions), [len(new)],
                                 [seq.cached], [seq.blocks])
            logits = ours(batch, kv, deterministic=deterministic)[0]
            torch.testing.assert_close(logits, expected[seq.cached - 1], atol=TOL, rtol=0)


def hf_greedy(ref, tokens: list[int], n: int) -> list[int]:
    out = list(tokens)
    for _ in range(n):
        out.append(int(hf_logits(ref, out)[-1].argmax()))
    return out[len(tokens):]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", ["mistral", "qwen2_layer_types"])
def test_engine_generates_what_transformers_generates(tmp_path, name):
    """Continuous batching, prefix caching and chunked prefill (12 tokens a step): every
    request's greedy tokens equal transformers'."""
    from engines.base import GenerateRequest
    from engines.llm.engine import LLMEngine, LLMOptions
    from engines.llm.sampling import SamplingParams

    arch, changes, _ = CASES[name]
    ref = hf_model(arch, seed=9, **changes)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    shared = prompt(9, 10)                       # requests sharing a cached prefix
    requests = {f"r{i}": shared + prompt(3 + 4 * i, 11 + i) for i in range(4)}
    block_bytes = PagedKVCache.bytes_per_block(model.cfg, 4, torch.float32)
    engine = LLMEngine()
    engine.start(model, LLMOptions(kv_cache_mb=256 * block_bytes / 2**20, block_size=4,
                                   max_num_seqs=4, max_batched_tokens=12))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for rid, tokens in requests.items():
        engine.submit(GenerateRequest(rid, tokens, params))
    got: dict[str, list[int]] = {}
    for _ in range(500):
        if not engine.has_work():
            break
        for out in engine.step():
            got.setdefault(out.id, []).extend(out.token_ids)
    assert not engine.has_work()
    for rid, tokens in requests.items():
        assert got[rid] == hf_greedy(ref, tokens, 10), rid


# -- GGUF --------------------------------------------------------------------------------------

def write_gguf(path, ref, arch: str, extra=None) -> None:
    """`ref` as an F32 GGUF file the way llama.cpp's converter lays it out ("llama": Q/K rows
    permuted); `extra(writer)` adds metadata."""
    cfg = ref.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if extra:
        extra(w)
    for name, tensor in ref.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            array = llama_cpp_permute(array, heads)
        w.add_tensor(gguf_name(name), np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_mistral_gguf_with_a_window_matches_transformers(tmp_path):
    ref = hf_model("mistral", seed=12, sliding_window=W)
    write_gguf(tmp_path / "m.gguf", ref, "llama", lambda w: w.add_sliding_window(W))
    ours = load_model(tmp_path / "m.gguf")
    assert (ours.cfg.sliding_window, ours.cfg.window_layers) == (W, (0, 1, 2))
    check_against(ours, ref, prompt(20, 13), prefill=12)


def test_mistral_gguf_as_llama_cpp_writes_it_runs_full_attention(tmp_path):
    """llama.cpp's converter writes Mistral v0.1 without its window (and llama.cpp runs it
    full): so does Ferry, matching transformers without the window."""
    ref = hf_model("mistral", seed=14, sliding_window=None)
    write_gguf(tmp_path / "m.gguf", ref, "llama")
    ours = load_model(tmp_path / "m.gguf")
    assert ours.cfg.window_layers == ()
    check_against(ours, ref, prompt(20, 15), prefill=12)


def test_qwen2_gguf_with_per_layer_flags_matches_transformers(tmp_path):
    _, changes, layers = CASES["qwen2_layer_types"]
    ref = hf_model("qwen2", seed=16, **changes)
    flags = [i in layers for i in range(3)]
    write_gguf(tmp_path / "m.gguf", ref, "qwen2",
               lambda w: (w.add_sliding_window(W), w.add_sliding_window_pattern(flags)))
    ours = load_model(tmp_path / "m.gguf")
    assert (ours.cfg.sliding_window, ours.cfg.window_layers) == (W, layers)
    check_against(ours, ref, prompt(20, 17), prefill=12)


def test_qwen2_gguf_whose_flags_slide_no_layer_runs_full_attention(tmp_path):
    ref = hf_model("qwen2", seed=17)
    write_gguf(tmp_path / "m.gguf", ref, "qwen2",
               lambda w: (w.add_sliding_window(W), w.add_sliding_window_pattern([False] * 3)))
    ours = load_model(tmp_path / "m.gguf")
    assert ours.cfg.window_layers == ()
    check_against(ours, ref, prompt(16, 17), prefill=10)


@pytest.mark.parametrize("arch,pattern,key", [
    ("qwen2", None, "qwen2.attention.sliding_window"),       # which layers: the file cannot say
    ("llama", 4, "llama.attention.sliding_window_pattern"),  # the integer form is not read
    ("llama", [True, False], "llama.attention.sliding_window_pattern"),   # not one per layer
])
def test_gguf_windows_not_run_are_refused_by_name(tmp_path, arch, pattern, key):
    ref = hf_model(arch, seed=18)

    def extra(w):
        w.add_sliding_window(W)
        if pattern is not None:
            w.add_sliding_window_pattern(pattern)
    write_gguf(tmp_path / "m.gguf", ref, arch, extra)
    with pytest.raises(UnsupportedModelConfig) as info:
        load_model(tmp_path / "m.gguf")
    assert info.value.param == key and key in info.value.message
    assert info.value.code == "unsupported_model_config" and info.value.status == 422


# -- blocks behind the window of a model whose every layer slides ------------------------------

def test_blocks_behind_every_layers_window_return_to_the_pool_shared_ones_stay():
    """Block ids exact: window 5, blocks of 4. A query at position t sees keys from t - 4 on, so
    once a sequence's next query is past a block, the block goes back to the pool (still in the
    prefix cache); a block another sequence shares keeps that sequence's reference."""
    from engines.llm.block_pool import BlockPool
    from engines.llm.sampling import SamplingParams
    from engines.llm.scheduler import Scheduler, SchedulerConfig
    from engines.llm.sequence import Sequence

    pool = BlockPool(16, 4)
    sched = Scheduler(pool, SchedulerConfig(4, 64, window=W))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    shared = prompt(8, 30)
    a = Sequence.create("a", shared, params, ())
    sched.add(a)
    batch = sched.schedule()
    assert a.block_table == [0, 1]
    sched.update(batch, [5])                  # a's next query (position 8) sees keys 4.. on
    assert a.num_dropped == 1 and [pool.ref_count(x) for x in (0, 1)] == [0, 1]
    assert pool.stats().cached_free == 1 and pool.num_free == 15
    b = Sequence.create("b", shared + prompt(6, 32), params, ())
    sched.add(b)
    batch = sched.schedule()                  # a decodes; b hits blocks 0 and 1
    assert (a.block_table, b.block_table, b.num_computed) == ([0, 1, 2], [0, 1, 3, 4], 8)
    assert [pool.ref_count(x) for x in (0, 1)] == [1, 2]
    sched.update(batch, [6, 7])
    # b's next query (position 14) sees keys 10.. on: b hands 0 and 1 back, but a (position 9,
    # keys 5..) still holds block 1
    assert (a.num_dropped, b.num_dropped) == (1, 2)
    assert [pool.ref_count(x) for x in (0, 1)] == [0, 1]
    assert pool.lookup(b.block_hashes[:2]) == [0, 1]      # both still in the prefix cache
    sched.abort(a)
    sched.abort(b)
    assert pool.num_free == 16 and [pool.ref_count(x) for x in range(16)] == [0] * 16


def test_a_model_with_full_attention_layers_keeps_its_blocks(tmp_path):
    from engines.llm.engine import LLMEngine, LLMOptions

    _, changes, _ = CASES["qwen2_from_layer_1"]          # layer 0 attends to everything
    hf_model("qwen2", seed=19, **changes).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    engine = LLMEngine()
    block_bytes = PagedKVCache.bytes_per_block(model.cfg, 4, torch.float32)
    engine.start(model, LLMOptions(kv_cache_mb=32 * block_bytes / 2**20, block_size=4))
    assert engine.scheduler.cfg.window is None


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("deterministic", [False, True])
def test_freed_blocks_let_more_sequences_run_and_tokens_stay_transformers(tmp_path,
                                                                          deterministic):
    """Mistral, every layer windowed: 4 requests of 34-46 tokens in a 24-block pool (96 slots:
    with every block kept they would not all fit) run together without a preemption, sharing a
    cached prefix, and each request's greedy tokens equal transformers' (deterministic mode
    too, whose rows read their block tables from the start)."""
    from engines.base import GenerateRequest
    from engines.llm.engine import LLMEngine, LLMOptions
    from engines.llm.sampling import SamplingParams

    ref = hf_model("mistral", seed=20, sliding_window=W)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    shared = prompt(9, 21)
    requests = {f"r{i}": shared + prompt(3 + 4 * i, 22 + i) for i in range(4)}
    block_bytes = PagedKVCache.bytes_per_block(model.cfg, 4, torch.float32)
    engine = LLMEngine()
    engine.start(model, LLMOptions(kv_cache_mb=24 * block_bytes / 2**20, block_size=4,
                                   max_num_seqs=4, max_batched_tokens=12,
                                   deterministic=deterministic))
    assert engine.scheduler.cfg.window == W and engine.pool.num_blocks == 24
    params = SamplingParams(max_tokens=22, temperature=0.0, ignore_eos=True)
    for rid, tokens in requests.items():
        engine.submit(GenerateRequest(rid, tokens, params))
    got: dict[str, list[int]] = {}
    most_running = 0
    for _ in range(500):
        if not engine.has_work():
            break
        for out in engine.step():
            got.setdefault(out.id, []).extend(out.token_ids)
        most_running = max(most_running, len(engine.scheduler.running))
    assert not engine.has_work()
    assert engine.scheduler.num_preemptions == 0 and most_running == 4
    assert engine.pool.num_free == 24
    for rid, tokens in requests.items():
        assert got[rid] == hf_greedy(ref, tokens, 22), rid
