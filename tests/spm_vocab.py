"""Tiny SentencePiece BPE models trained in the test, and GGUF files carrying their vocabulary
the way llama.cpp's converter writes it (tokens, scores, token types, special ids)."""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

USER_DEFINED = ["<tool>"]
_WORDS = ("It was the best of times, it was the worst of times, it was the age of wisdom, it "
          "was the age of foolishness, it was the epoch of belief 1859 2024 3.14").split()
_CHARS = list("abcdefghijklmnopqrstuvwxyz      ,.!?'0123456789") + list("éèñüßøå東京大阪日本語привет")


def corpus(seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    lines = ["".join(rng.choice(_CHARS) for _ in range(rng.randint(5, 80))) for _ in range(3000)]
    lines += [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 15))) for _ in range(3000)]
    return lines


def train(vocab_size: int = 1200, add_dummy_prefix: bool = True) -> Any:
    """A trained sentencepiece.SentencePieceProcessor (BPE, byte fallback, identity
    normalization, no whitespace collapsing: Llama 2's settings)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=add_dummy_prefix, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=0.99,
        user_defined_symbols=USER_DEFINED, minloglevel=2, num_threads=1)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def vocabulary(sp: Any) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and llama.cpp token types, as convert_hf_to_gguf.py derives them."""
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
             else 6 if sp.is_byte(i) else 4 if tokens[i] in USER_DEFINED else 1
             for i in range(n)]
    return tokens, scores, types


def write_spm_gguf(path: Path, sp: Any, *, add_space_prefix: bool = True,
                   extra_tokens: tuple[str, ...] = (), writer: Any = None,
                   **meta: Any) -> Path:
    """A GGUF file with `sp`'s vocabulary (plus `extra_tokens`, control-typed). `writer`: a
    gguf.GGUFWriter that already holds a model's tensors and metadata; else one with none."""
    import gguf

    tokens, scores, types = vocabulary(sp)
    for text in extra_tokens:
        tokens.append(text)
        scores.append(0.0)
        types.append(3)
    w = writer or gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(meta.pop("bos", sp.bos_id()))
    w.add_eos_token_id(meta.pop("eos", sp.eos_id()))
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(meta.pop("add_bos", True))
    w.add_add_space_prefix(add_space_prefix)
    for key, value in meta.items():
        w.add_key_value(key, value[0], value[1])
    if writer is None:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def sample_strings(seed: int = 7, n: int = 400) -> list[str]:
    """Unicode, emoji (flags: several code points), whitespace runs, tabs and newlines,
    digits, characters the vocabulary lacks (byte fallback), and the empty string."""
    rng = random.Random(seed)
    pool = _CHARS + list("\t\n\r😀🎉ÿ\u00a0\u3000\u200bΩ") + ["  ", "   ", "🇫🇷", "e\u0301"]
    fixed = ["", " ", "  ", "\n", "hello world", " hello", "hello  world", "hello\nworld\n\n",
             "\t tab", "café 東京 😀", "12345 678", "ÿ", "a" * 50, "😀😀 ok", "Ωmega",
             " leading and trailing ", "it was the best of times", "▁ already escaped"]
    lines = corpus()
    return (fixed + ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60)))
                     for _ in range(n - len(fixed) - 40)] + lines[::150][:40])
