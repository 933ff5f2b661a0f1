"""Text <-> token ids for the LLM frontends (the engine itself only sees ids).

Built on the `tokenizers` library, either from a `tokenizer.json` or from the vocabulary a GGUF
file carries in its metadata. For GGUF byte-level BPE vocabularies (`tokenizer.ggml.model =
"gpt2"`) the pre-tokenizer is chosen by `tokenizer.ggml.pre`, the way llama.cpp chooses its split
regex, because merges only reproduce the training-time tokens when text is split the same way
(SmolLM, StarCoder: one digit per piece; Llama 3: the tiktoken-style regex). SentencePiece
vocabularies (`"llama"`: Llama 2, Mistral, TinyLlama) are tokenized by engines.llm.tokenizer_spm.

Generation stops on every end-of-generation token the file lists, as llama.cpp's EOG set does:
the eos/eot/eom ids, the FIM pad/repo/separator tokens, and tokens spelled like an end of turn
(<|endoftext|>, <|im_end|>, <|eot_id|>, ...): SmolLM2 ends turns with <|im_end|> but also
emits <|endoftext|>.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from daemon.errors import InvalidInput
from engines.llm.chat import render_chat
from engines.llm.config import ModelLoadFailed
from engines.llm.tokenizer_spm import SpmTokenizer

__all__ = ["Tokenizer", "IncrementalDecoder", "max_token_bytes", "end_of_generation_ids",
           "gguf_tokenizer_meta"]

log = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4                  # llama.cpp token types
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GGUF `tokenizer.ggml.pre` values, grouped by the split llama.cpp applies before BPE.
_DIGIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"}
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "megrez"}
# Token texts llama.cpp counts as end of generation (and retypes to control when they are not).
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|eom_id|>", "<EOT>")
# FIM tokens that end generation too, found by id key or else by text.
_FIM_EOG = {"fim_pad": ("<|fim_pad|>", "<fim-pad>", "<PAD>"),
            "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>"),
            "fim_sep": ("<|file_sep|>",)}
_META_KEYS = ("model", "pre", "tokens", "token_type", "scores", "merges", "bos_token_id",
              "add_bos_token", "add_eos_token", "add_space_prefix", "eos_token_id",
              "eot_token_id", "eom_token_id", "unknown_token_id", "fim_pad_token_id",
              "fim_rep_token_id", "fim_sep_token_id")


def gguf_tokenizer_meta(metadata: dict[str, Any]) -> dict[str, Any]:
    """The `tokenizer.ggml.*` values of a GGUF file's metadata, keyed without the prefix."""
    return {k: metadata.get(f"tokenizer.ggml.{k}") for k in _META_KEYS}


def end_of_generation_ids(meta: dict[str, Any]) -> tuple[int, ...]:
    """Every token that ends a generation (llama.cpp's EOG set), the eos id first."""
    tokens = meta.get("tokens") or []
    n = len(tokens)

    def valid(tid: Any) -> bool:
        return isinstance(tid, int) and 0 <= tid < n

    found = [meta.get(k) for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    for key, texts in _FIM_EOG.items():
        tid = meta.get(f"{key}_token_id")
        found.append(tid if valid(tid) else next(
            (i for i, t in enumerate(tokens) if t in texts), None))
    found += [i for i, t in enumerate(tokens) if t in _EOG_TEXTS]
    return tuple(dict.fromkeys(t for t in found if valid(t)))


def _byte_alphabet() -> set[str]:
    from tokenizers import pre_tokenizers

    return set(pre_tokenizers.ByteLevel.alphabet())


def _pre_tokenizer(pre: str | None) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if pre in _DIGIT_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT if pre in _QWEN2_PRE else None
    if split is not None:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in (None, "default", "gpt-2", "gpt2"):
        log.warning("GGUF pre-tokenizer %r is not known; splitting text as GPT-2 does", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _gguf_backend(meta: dict[str, Any], path: Path, eog: tuple[int, ...]) -> Any:
    """The tokenizer backend for GGUF tokenizer metadata: a byte-level BPE
    `tokenizers.Tokenizer` ('gpt2') or a SentencePiece one ('llama')."""
    kind = meta.get("model")
    if kind == "llama":
        from engines.llm.tokenizer_spm import spm_from_gguf_metadata
        try:
            return spm_from_gguf_metadata(meta, control=eog)
        except ValueError as exc:
            raise ModelLoadFailed(f"{path}: bad SentencePiece vocabulary: {exc}") from exc
    if kind != "gpt2":
        raise ModelLoadFailed(f"{path}: GGUF tokenizer model {kind!r} is not supported (Ferry "
                              f"reads byte-level BPE, 'gpt2', and SentencePiece, 'llama')")
    try:
        return _bpe_backend(meta, eog)
    except Exception as exc:  # tokenizers raises a bare Exception on inconsistent merges
        raise ModelLoadFailed(f"{path}: bad byte-level BPE vocabulary: {exc}") from exc


def _bpe_backend(meta: dict[str, Any], eog: tuple[int, ...]) -> Any:
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, processors

    tokens = meta["tokens"]
    types = list(meta.get("token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"{len(types)} token types for {len(tokens)} tokens")
    for tid in eog:                             # llama.cpp retypes end-of-turn tokens
        types[tid] = _CONTROL
    merges = [tuple(m.split(" ", 1)) for m in meta.get("merges") or []]
    pre = meta.get("pre")
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 ignore_merges=pre in _LLAMA3_PRE))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    alphabet = _byte_alphabet()
    # Control tokens (<|im_start|>) must match whole in text and vanish with skip_special_tokens;
    # ones spelled outside the byte alphabet are llama.cpp mislabels and stay plain vocabulary.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types)
                                if k == _CONTROL and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED])
    bos = meta.get("bos_token_id")
    if meta.get("add_bos_token") and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
            special_tokens=[(tokens[bos], bos)])
    return backend


class Tokenizer:
    def __init__(self, backend: Any, *, bos_id: int | None, eos_ids: tuple[int, ...],
                 chat_template: str | None) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.max_token_bytes = (backend.max_token_bytes if isinstance(backend, SpmTokenizer)
                                else max_token_bytes(backend))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        from engines.llm.gguf_loader import read_gguf

        return cls.from_gguf_file(read_gguf(Path(path)))

    @classmethod
    def from_gguf_file(cls, gf: Any) -> Tokenizer:
        """From a parsed engines.llm.gguf_loader.GGUFFile; ModelLoadFailed when its vocabulary
        is missing, of a kind Ferry does not read, or inconsistent."""
        meta = gguf_tokenizer_meta(gf.metadata)
        if not meta["tokens"]:
            raise ModelLoadFailed(f"{gf.path}: GGUF file carries no tokenizer vocabulary")
        eog = end_of_generation_ids(meta)
        bos = meta["bos_token_id"]
        return cls(_gguf_backend(meta, gf.path, eog),
                   bos_id=bos if isinstance(bos, int) and 0 <= bos < len(meta["tokens"]) else None,
                   eos_ids=eog, chat_template=gf.get("tokenizer.chat_template"))

    @classmethod
    def from_file(cls, tokenizer_json: str | Path) -> Tokenizer:
        """Load tokenizer.json; special tokens and the chat template come from the HF files
        beside it (tokenizer_config.json, chat_template.jinja, generation_config.json)."""
        from tokenizers import Tokenizer as Backend

        path = Path(tokenizer_json)
        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ModelLoadFailed(f"{path}: not a readable tokenizer.json: {exc}") from exc
        config = _read_json(path.parent / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):      # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = path.parent / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        bos_id = _token_id(backend, config.get("bos_token"))
        eos = _read_json(path.parent / "generation_config.json").get("eos_token_id")
        eos_ids = (eos if isinstance(eos, list) else [eos] if eos is not None
                   else [_token_id(backend, config.get("eos_token"))])
        return cls(backend, bos_id=bos_id, eos_ids=tuple(e for e in eos_ids if e is not None),
                   chat_template=template)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               continuation: bool = False) -> str:
        """`continuation`: the ids continue a text (generated tokens after a prompt), so a
        SentencePiece tokenizer keeps the first token's leading space."""
        if isinstance(self.backend, SpmTokenizer):
            return self.backend.decode(ids, skip_special_tokens, continuation)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            template: str | None = None, **variables: Any) -> str:
        """Render `messages` with `template` (an override) or the model's own template."""
        source = template or self.chat_template
        if not source:
            raise InvalidInput("this model has no chat template; use the completions API or "
                               "configure [llm] chat_template", param="messages")
        eos = self.eos_ids[0] if self.eos_ids else None
        variables.setdefault("bos_token", self.token_text(self.bos_id) or "")
        variables.setdefault("eos_token", self.token_text(eos) or "")
        return render_chat(source, messages, add_generation_prompt, **variables)


# Normalizers by how many times shorter (in UTF-8 bytes) they can make a text: NFC composes three
# Hangul jamo (9 bytes) into one syllable (3), lowercasing turns the Kelvin sign (3) into "k".
# One not listed (Strip, StripAccents, BertNormalizer's control-character removal) can delete
# any amount of text, so no bound holds.
_SHRINK = {"NFD": 1, "Prepend": 1, "NFC": 3, "NFKC": 3, "NFKD": 3, "Lowercase": 3}
# Pre-tokenizers that keep every byte of the text (WhitespaceSplit and the like drop spaces).
_KEEPING_PRE = {"ByteLevel", "Digits", "Metaspace", "Split", "Punctuation", "UnicodeScripts"}


def max_token_bytes(backend: Any) -> int | None:
    """The most bytes of input text one token can stand for, so that a text of N UTF-8 bytes is
    at least ceil(N / this) tokens and an over-long prompt is refused without tokenizing it.
    None when the tokenizer can turn unboundedly many bytes into one token or none (WordPiece's
    [UNK] for an over-long word, fused unknowns, normalizers that delete text)."""
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("unk_token") and model.get("fuse_unk")):
        return None
    pres = _flatten(spec.get("pre_tokenizer"), "pretokenizers")
    if any(p.get("type") not in _KEEPING_PRE or p.get("behavior") == "Removed" for p in pres):
        return None
    byte_level = any(p.get("type") == "ByteLevel" for p in pres)
    if not (byte_level or model.get("byte_fallback") or model.get("unk_token")):
        return None                         # characters outside the vocabulary vanish
    shrink = 1
    for norm in _flatten(spec.get("normalizer"), "normalizers"):
        kind = norm.get("type")
        if kind == "Replace":
            pattern = (norm.get("pattern") or {}).get("String")
            if pattern is None or len(norm.get("content", "").encode()) < len(pattern.encode()):
                return None
        elif kind in _SHRINK:
            shrink *= _SHRINK[kind]
        else:
            return None
    alphabet = _byte_alphabet() if byte_level else set()
    # A byte-level vocabulary entry spells one byte per character; anything else (added tokens,
    # "▁" for a space, "<0x41>") is counted by its UTF-8 length, which is never less.
    longest = max(len(t) if alphabet and set(t) <= alphabet else len(t.encode())
                  for t in backend.get_vocab(with_added_tokens=True))
    return max(longest, 4) * shrink         # 4: an unknown character becomes one [UNK]


def _flatten(node: Any, children: str) -> list[dict[str, Any]]:
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [leaf for child in node.get(children) or [] for leaf in _flatten(child, children)]
    return [node]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadFailed(f"{path}: unreadable: {exc}") from exc
    return value if isinstance(value, dict) else {}


def _token_id(backend: Any, token: Any) -> int | None:
    if isinstance(token, dict):             # {"content": "<s>", ...} in older configs
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


class IncrementalDecoder:
    """Streaming detokenization: feed ids as they are generated, get the new text.

    Decodes a short window of recent ids rather than single tokens, because a token's text
    depends on its neighbours (a multi-byte character split across byte-level tokens, leading
    spaces some decoders strip). Text ending in U+FFFD is an unfinished character: the part
    before it is emitted, the rest waits for more ids (or `flush`).
    """

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tok
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0        # window start: ids before it are settled and emitted
        self._read = 0          # ids before it have been emitted in full
        self._emitted = 0       # chars of the text after `_read` already emitted

    def _pending(self) -> str:
        def decode(ids: list[int]) -> str:
            return self.tok.decode(ids, self.skip_special_tokens, continuation=True)
        prefix = decode(self.ids[self._prefix:self._read])
        return decode(self.ids[self._prefix:])[len(prefix):]

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self._pending()
        if text.endswith("\ufffd"):
            stable = text.rstrip("\ufffd")
            delta = stable[self._emitted:]
            self._emitted = max(self._emitted, len(stable))
            return delta
        return self._settle(text)

    def flush(self) -> str:
        """Whatever is held back (a character that never completed comes out as U+FFFD)."""
        return self._settle(self._pending())

    def _settle(self, text: str) -> str:
        delta = text[self._emitted:]
        self._prefix, self._read, self._emitted = self._read, len(self.ids), 0
        return delta
