"""The SentencePiece tokenizer of GGUF files with `tokenizer.ggml.model = "llama"` (Llama 2,
Mistral, TinyLlama, ...), built from the vocabulary the file carries: token texts, scores, types.

It behaves as llama.cpp's SPM tokenizer does, which follows SentencePiece's BPE encoder:

- encode: control, user-defined and unknown-type tokens spelled in the text are matched whole
  first (longest first). Each text fragment in between gets a leading space when
  `add_space_prefix` is set and it starts the text or follows such a token, has every space
  replaced by U+2581 (▁), and is split into characters; then the adjacent pair whose
  concatenation is a vocabulary token of the highest score is merged, again and again (the
  leftmost pair on equal scores). A final piece that is not a token becomes one `<0xXX>` byte
  token per UTF-8 byte (the unknown token where the vocabulary has no byte tokens). BOS comes
  first when `add_bos_token` says so (default: yes, as llama.cpp assumes for SPM files).
- decode: ▁ becomes a space, byte tokens are reassembled into UTF-8, control and unknown tokens
  vanish unless special tokens are kept, and the first token's leading space is removed when
  `add_space_prefix` is set (not after a removed BOS, as llama.cpp does). `continuation=True`
  keeps it: generated text continues a prompt, so its first space is real.

The object answers the parts of the `tokenizers.Tokenizer` interface the rest of Ferry calls
(`encode(...).ids`, `decode`, `id_to_token`, `token_to_id`, `get_vocab_size`, `get_vocab`), and
`to_str()` gives an equivalent `tokenizer.json` (BPE with byte fallback) for llguidance, which
constrains output by token bytes.
"""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["SpmTokenizer", "SpmEncoding"]

SPACE = "\u2581"
# llama.cpp token types
_UNDEFINED, _NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = range(7)
_BYTE_RE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(slots=True)
class SpmEncoding:
    """What `encode` returns: `.ids`, like a `tokenizers.Encoding`."""

    ids: list[int]


class SpmTokenizer:
    def __init__(self, tokens: list[str], scores: list[float] | None, types: list[int] | None, *,
                 bos_id: int | None, eos_id: int | None, unk_id: int | None,
                 add_bos: bool = True, add_eos: bool = False,
                 add_space_prefix: bool = True, control: Iterable[int] = ()) -> None:
        """`control`: ids to treat as control tokens whatever their type says (llama.cpp
        retypes end-of-generation tokens such as <|im_end|> this way)."""
        n = len(tokens)
        if scores is not None and len(scores) != n:
            raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        if types is not None and len(types) != n:
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        for name, tid in (("bos", bos_id), ("eos", eos_id), ("unknown", unk_id)):
            if tid is not None and not 0 <= tid < n:
                raise ValueError(f"tokenizer.ggml.{name}_token_id={tid} is outside the "
                                 f"vocabulary of {n} tokens")
        if add_bos and bos_id is None:
            raise ValueError("tokenizer.ggml.add_bos_token is set but there is no bos_token_id")
        if add_eos and eos_id is None:
            raise ValueError("tokenizer.ggml.add_eos_token is set but there is no eos_token_id")
        self.tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.scores = [float(s) for s in scores] if scores is not None else [0.0] * n
        self.types = list(types) if types is not None else [_NORMAL] * n
        for tid in control:
            self.types[tid] = _CONTROL
        self.bos_id, self.eos_id, self.add_bos, self.add_eos = bos_id, eos_id, add_bos, add_eos
        self.add_space_prefix = add_space_prefix
        self._ids = {t: i for i, t in enumerate(self.tokens)}     # a repeated text: the last id
        if unk_id is None:
            unk_id = next((i for i, k in enumerate(self.types) if k == _UNKNOWN), None)
        self.unk_id = unk_id
        self._byte_ids: list[int | None] = [
            self._ids.get(f"<0x{b:02X}>", self._ids.get(chr(b)) if b < 128 else None)
            for b in range(256)]
        # Matched whole before merging, longest first (llama.cpp's special-token partition).
        special = [i for i, k in enumerate(self.types) if k in (_CONTROL, _USER_DEFINED, _UNKNOWN)]
        self._special = sorted(special, key=lambda i: -len(self.tokens[i]))
        self._pieces = [self._piece(i, False) for i in range(n)]
        self._special_pieces = [self._piece(i, True) for i in range(n)]
        self._json: str | None = None

    # -- the tokenizers.Tokenizer surface ----------------------------------------------------

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return len(self.tokens)

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        return dict(self._ids)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else None

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    @property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of input one token stands for: a token matches at most its own
        text (▁, 3 bytes, stands for a 1-byte space), a byte token one byte, and the unknown
        token at most one character."""
        return max(4, max(len(t.encode()) for i, t in enumerate(self.tokens)
                          if self.types[i] != _BYTE))

    def encode(self, text: str, add_special_tokens: bool = False) -> SpmEncoding:
        out: list[int] = []
        if add_special_tokens and self.add_bos:
            out.append(self.bos_id)                         # type: ignore[arg-type]
        after_special = True                                # the text's start counts as one
        for fragment in self._partition(text):
            if isinstance(fragment, int):
                out.append(fragment)
                after_special = True
                continue
            if self.add_space_prefix and after_special:
                fragment = " " + fragment
            self._merge(fragment.replace(" ", SPACE), out)
            after_special = False
        if add_special_tokens and self.add_eos:
            out.append(self.eos_id)                         # type: ignore[arg-type]
        return SpmEncoding(out)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True,
               continuation: bool = False) -> str:
        n = len(self.tokens)
        ids = [t for t in ids if 0 <= t < n]              # ids past the vocabulary vanish
        strip = self.add_space_prefix and not continuation
        if skip_special_tokens and self.add_bos and ids and ids[0] == self.bos_id:
            ids, strip = ids[1:], False
        if skip_special_tokens and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        pieces = self._pieces if skip_special_tokens else self._special_pieces
        out = b"".join(pieces[t] for t in ids)
        if strip and ids and pieces[ids[0]].startswith(b" "):
            out = out[1:]                                   # the first token's added space
        return out.decode("utf-8", errors="replace")

    def to_str(self) -> str:
        """An equivalent tokenizer.json (BPE merges ordered by the merged token's score), for
        llguidance's token tables."""
        if self._json is None:
            self._json = self._backend().to_str()
        return self._json

    # -- internals ---------------------------------------------------------------------------

    def _piece(self, tid: int, special: bool) -> bytes:
        kind, text = self.types[tid], self.tokens[tid]
        if kind in (_CONTROL, _UNKNOWN):
            return text.encode() if special else b""
        if kind == _USER_DEFINED:
            return text.encode()
        if kind == _NORMAL:
            return text.replace(SPACE, " ").encode()
        if kind == _BYTE:
            match = _BYTE_RE.fullmatch(text)
            return bytes([int(match.group(1), 16)]) if match else b""
        return b""                                          # unused, undefined

    def _partition(self, text: str) -> list[str | int]:
        """Text fragments and the ids of special tokens spelled in them."""
        fragments: list[str | int] = [text] if text else []
        for tid in self._special:
            word = self.tokens[tid]
            if word not in text:
                continue
            split: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or word not in frag:
                    split.append(frag)
                    continue
                parts = frag.split(word)
                for k, part in enumerate(parts):
                    if k:
                        split.append(tid)
                    if part:
                        split.append(part)
            fragments = split
        return fragments

    def _merge(self, text: str, out: list[int]) -> None:
        """Score-ordered merging of `text`'s characters (spaces already ▁), appended to out."""
        ids, scores = self._ids, self.scores
        sym = list(text)
        nxt = list(range(1, len(sym) + 1))
        nxt[-1] = -1
        prv = list(range(-1, len(sym) - 1))
        heap: list[tuple[float, int, int, int]] = []

        def consider(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            merged = sym[left] + sym[right]
            tid = ids.get(merged)
            if tid is not None:                 # best score first, then the leftmost pair
                heapq.heappush(heap, (-scores[tid], left, right, len(merged)))

        for i in range(1, len(sym)):
            consider(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = sym[left], sym[right]
            if not a or not b or len(a) + len(b) != size:
                continue                        # one side merged since: a stale pair
            sym[left], sym[right] = a + b, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            consider(prv[left], left)
            consider(left, nxt[left])
        i = 0
        while i >= 0:
            tid = ids.get(sym[i])
            if tid is not None:
                out.append(tid)
            else:                               # byte fallback
                for byte in sym[i].encode("utf-8", errors="surrogatepass"):
                    bid = self._byte_ids[byte]
                    bid = self.unk_id if bid is None else bid
                    if bid is not None:
                        out.append(bid)
            i = nxt[i]

    def _backend(self) -> Any:
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

        ids = self._ids
        merges: list[tuple[float, int, str, str]] = []
        for tid, (text, kind) in enumerate(zip(self.tokens, self.types)):
            if kind != _NORMAL or len(text) < 2 or ids[text] != tid:
                continue
            for k in range(1, len(text)):
                if text[:k] in ids and text[k:] in ids:
                    merges.append((-self.scores[tid], tid, text[:k], text[k:]))
        merges.sort()
        unk = self.tokens[self.unk_id] if self.unk_id is not None else None
        backend = Tokenizer(models.BPE(vocab=dict(ids), merges=[(a, b) for *_, a, b in merges],
                                       unk_token=unk, fuse_unk=True, byte_fallback=True))
        steps = [normalizers.Replace(" ", SPACE)]
        if self.add_space_prefix:
            steps.insert(0, normalizers.Prepend(SPACE))
        backend.normalizer = normalizers.Sequence(steps)
        backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        backend.add_special_tokens([AddedToken(self.tokens[i], special=True, normalized=False)
                                    for i in self._special if self.types[i] != _USER_DEFINED])
        backend.add_tokens([AddedToken(self.tokens[i], special=False, normalized=False)
                            for i in self._special if self.types[i] == _USER_DEFINED])
        return backend


def spm_from_gguf_metadata(meta: dict[str, Any], control: Iterable[int] = ()) -> SpmTokenizer:
    """From the `tokenizer.ggml.*` values (keys without the prefix). ValueError when they do not
    describe a usable vocabulary."""
    tokens = meta.get("tokens")
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError("tokenizer.ggml.tokens is missing or not a list of strings")
    return SpmTokenizer(
        tokens, meta.get("scores"), meta.get("token_type"), bos_id=meta.get("bos_token_id"),
        eos_id=meta.get("eos_token_id"), unk_id=meta.get("unknown_token_id"),
        add_bos=_flag(meta.get("add_bos_token"), meta.get("bos_token_id") is not None),
        add_eos=_flag(meta.get("add_eos_token"), False),
        add_space_prefix=_flag(meta.get("add_space_prefix"), True), control=control)


def _flag(value: Any, default: bool) -> bool:
    return default if value is None else bool(value)

