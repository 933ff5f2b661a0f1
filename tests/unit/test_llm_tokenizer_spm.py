"""The SentencePiece (`tokenizer.ggml.model = "llama"`) GGUF tokenizer against the reference:
a BPE model trained here with the sentencepiece package, its vocabulary written into GGUF files
the way llama.cpp's converter writes it, compared id for id on 400 strings."""
from __future__ import annotations

import pytest

from engines.llm.config import ModelLoadFailed
from engines.llm.tokenizer import IncrementalDecoder, Tokenizer
from tests.spm_vocab import USER_DEFINED, sample_strings, train, write_spm_gguf

pytest.importorskip("sentencepiece")
pytest.importorskip("gguf")
pytestmark = pytest.mark.timeout(120)

STRINGS = sample_strings()


@pytest.fixture(scope="module", params=[True, False], ids=["space-prefix", "no-space-prefix"])
def pair(request, tmp_path_factory):
    """(sentencepiece processor, our Tokenizer read from a GGUF holding its vocabulary)."""
    sp = train(add_dummy_prefix=request.param)
    path = write_spm_gguf(tmp_path_factory.mktemp("spm") / "v.gguf", sp,
                          add_space_prefix=request.param)
    return sp, Tokenizer.from_gguf(path)


def test_ids_match_sentencepiece(pair):
    sp, tok = pair
    wrong = [(s, sp.encode(s), tok.encode(s)) for s in STRINGS if sp.encode(s) != tok.encode(s)]
    assert not wrong, f"{len(wrong)} of {len(STRINGS)} strings differ, first: {wrong[0]}"
    # the strings do reach byte fallback and whitespace-only pieces
    tokens = [tok.token_text(i) for s in STRINGS for i in tok.encode(s)]
    assert "<0xF0>" in tokens and "<0x0A>" in tokens and any(set(t) == {"▁"} for t in tokens)


def test_decode_matches_sentencepiece_and_round_trips(pair):
    sp, tok = pair
    for s in STRINGS:
        ids = tok.encode(s)
        assert tok.decode(ids) == sp.decode(ids)
        # a literal ▁ in the text comes back as a space, in SentencePiece and llama.cpp alike
        assert tok.decode(ids) == s.replace("\u2581", " ")


def test_bos_is_added_as_the_file_says(pair, tmp_path):
    sp, tok = pair
    assert tok.bos_id == sp.bos_id() == 1
    assert tok.encode("hello", add_special_tokens=True) == [1] + sp.encode("hello")
    assert tok.encode("", add_special_tokens=True) == [1] and tok.encode("") == []
    no_bos = Tokenizer.from_gguf(write_spm_gguf(tmp_path / "n.gguf", sp, add_bos=False))
    assert no_bos.encode("hello", add_special_tokens=True) == no_bos.encode("hello")


def test_special_tokens_in_text_match_whole_as_llama_cpp_does(pair):
    sp, tok = pair
    eos, tool = sp.eos_id(), sp.piece_to_id(USER_DEFINED[0])
    # the fragment after a special token gets the space prefix again (llama.cpp, HF legacy)
    assert tok.encode("a</s>b c") == tok.encode("a") + [eos] + tok.encode("b c")
    assert tok.encode("<s>hi", add_special_tokens=True) == [1, 1] + tok.encode("hi")
    assert tok.encode(f"x{USER_DEFINED[0]}y") == tok.encode("x") + [tool] + tok.encode("y")


def test_decode_of_special_tokens(pair):
    sp, tok = pair
    ids = tok.encode("hi there", add_special_tokens=True) + [sp.eos_id()]
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s>")
    assert tok.decode(ids, skip_special_tokens=False).endswith("</s>")
    prefix = " " if tok.backend.add_space_prefix else ""
    # llama.cpp keeps the space after a removed BOS; without BOS the first space goes
    assert tok.decode(ids) == prefix + "hi there"
    assert tok.decode(ids[1:]) == "hi there"
    assert tok.decode([tok.vocab_size + 5, *ids[1:]]) == "hi there"    # unknown ids vanish


def test_streamed_text_keeps_the_first_space_and_waits_for_whole_characters(pair):
    _, tok = pair
    text = "the best 😀 of times"
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids, continuation=True)
    assert "\ufffd" not in "".join(pieces)
    if tok.backend.add_space_prefix:
        assert "".join(pieces) == " " + text       # a continuation: its space is real


def test_max_token_bytes_bounds_the_token_count_from_below(pair):
    _, tok = pair
    assert tok.max_token_bytes >= 4
    for s in STRINGS:
        assert len(tok.encode(s)) >= -(-len(s.encode()) // tok.max_token_bytes)


def test_equivalent_tokenizer_json_for_structured_outputs(pair):
    # llguidance reads token bytes from an HF tokenizer.json: the converted BPE (merges by
    # score, byte fallback) must describe the same vocabulary and tokenize alike.
    from tokenizers import Tokenizer as Backend

    sp, tok = pair
    hf = Backend.from_str(tok.backend.to_str())
    assert hf.get_vocab_size() == tok.vocab_size
    same = sum(hf.encode(s, add_special_tokens=False).ids == tok.encode(s) for s in STRINGS)
    assert same == len(STRINGS)
    llguidance = pytest.importorskip("llguidance")
    llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=[sp.eos_id()])


def test_a_long_text_tokenizes_quickly(pair):
    import time

    sp, tok = pair
    text = " ".join(STRINGS) * 3                        # ~40k characters
    started = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - started < 5.0         # ~0.1 s here; generous for loaded CI
    assert ids == sp.encode(text)


def test_end_of_generation_tokens(tmp_path):
    sp = train()
    path = write_spm_gguf(tmp_path / "eog.gguf", sp,
                          extra_tokens=("<|im_end|>", "<|endoftext|>", "<|im_start|>"))
    tok = Tokenizer.from_gguf(path)
    n = sp.get_piece_size()
    assert tok.eos_ids == (sp.eos_id(), n, n + 1)        # eos first; <|im_start|> is no EOG
    assert tok.decode(tok.encode("a<|im_end|>")) == "a"      # control: skipped on decode


@pytest.mark.parametrize("change,message", [
    (dict(**{"tokenizer.ggml.scores": None}), "scores"),
    (dict(bos=10**6), "bos_token_id"),
])
def test_inconsistent_vocabularies_are_refused(tmp_path, change, message):
    import gguf

    sp = train()
    path = tmp_path / "bad.gguf"
    if "tokenizer.ggml.scores" in change:                 # scores for half the tokens
        w = gguf.GGUFWriter(str(path), "llama")
        n = sp.get_piece_size()
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(n)])
        w.add_token_scores([0.0] * (n // 2))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    else:
        write_spm_gguf(path, sp, **change)
    with pytest.raises(ModelLoadFailed, match=message) as info:
        Tokenizer.from_gguf(path)
    assert info.value.code == "model_load_failed"


def test_unsupported_tokenizer_kind_is_named(tmp_path):
    import gguf

    path = tmp_path / "wpm.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_tokenizer_model("bert")
    w.add_token_list(["[PAD]", "a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadFailed, match="'bert' is not supported"):
        Tokenizer.from_gguf(path)
