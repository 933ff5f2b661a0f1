"""Structured outputs: generation constrained to a JSON schema, a regex, a list of choices or a
grammar, with llguidance (a Rust grammar engine, CPU wheel, no dependencies).

Why llguidance rather than xgrammar: both compute a token mask per step from a grammar over the
model's vocabulary. llguidance installs as one 3 MB wheel and builds its vocabulary index from
the `tokenizers` JSON Ferry already holds (0.3 s for SmolLM2's 49k tokens, once per model); a
mask then takes ~2 ms and a new grammar ~1 ms to compile, and it needs no GPU. xgrammar pulls
in triton and transformers (hundreds of MB on a CPU host) for the same masks.

A constraint travels in the engine's sampling parameters as `structured`:

    {"type": "json_object"}                        any JSON object
    {"type": "json_schema", "schema": {...}}       JSON valid against the schema
    {"type": "regex", "pattern": "..."}
    {"type": "choice", "choices": ["a", "b"]}      exactly one of the strings
    {"type": "grammar", "grammar": "..."}          EBNF (GBNF, `root ::= ...`) or Lark

Each sequence gets its own matcher (`Sequence.matcher`): the sampler masks that row's logits
to the tokens the matcher allows (free rows of the same batch are untouched), and every sampled
token advances it; the sequence ends ("stop") when the grammar is complete. Matchers are built
by deep-copying a compiled template kept in a bounded LRU cache per constraint, so a schema is
compiled once however many requests use it. A constraint that cannot compile is a 400
`invalid_grammar` carrying the library's message; HTTP workers check that before a request
reaches an engine (`validate_structured`), so a streamed request gets a plain 400 too. This
module does not import torch (HTTP workers use it). The engine computes the next masks of a
step's constrained rows in a thread while the forward pass runs (`allowed_tokens`, parallel
across rows), and engines/llm/sampling.py applies them as one masked fill.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from daemon.errors import InvalidInput

__all__ = ["GrammarCompiler", "check_structured", "validate_structured", "allowed_tokens",
           "STRUCTURED_TYPES"]

log = logging.getLogger(__name__)

STRUCTURED_TYPES = ("json_object", "json_schema", "regex", "choice", "grammar")
_CACHE_SIZE = 64
_MAX_SPEC_BYTES = 256 << 10
# Compact JSON (no free whitespace between tokens): a small model offered unbounded whitespace
# can spend its whole max_tokens on it, as vLLM's disable_any_whitespace guards against.
_JSON_OPTIONS = {"whitespace_flexible": False}


def _bad(why: str) -> InvalidInput:
    return InvalidInput(f"structured output: {why}", code="invalid_grammar",
                        param="response_format")


def check_structured(spec: Any) -> dict[str, Any] | None:
    """Validate the shape of a `structured` parameter (None: unconstrained)."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") not in STRUCTURED_TYPES:
        raise _bad(f"must be an object whose type is one of {', '.join(STRUCTURED_TYPES)}")
    kind = spec["type"]
    need = {"json_schema": ("schema", dict), "regex": ("pattern", str),
            "choice": ("choices", list), "grammar": ("grammar", str)}.get(kind)
    if need is not None:
        key, typ = need
        if not isinstance(spec.get(key), typ):
            raise _bad(f"{kind} needs '{key}' ({typ.__name__})")
    if kind == "choice" and (not spec["choices"]
                             or not all(isinstance(c, str) and c for c in spec["choices"])):
        raise _bad("choice needs a non-empty list of non-empty strings")
    if len(json.dumps(spec)) > _MAX_SPEC_BYTES:
        raise _bad(f"the constraint is larger than {_MAX_SPEC_BYTES >> 10} KiB")
    return spec


def grammar_text(spec: dict[str, Any]) -> str:
    """The llguidance grammar text of a checked constraint."""
    import llguidance
    matcher = llguidance.LLMatcher
    kind = spec["type"]
    if kind == "json_object":
        return matcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if kind == "json_schema":
        try:
            return matcher.grammar_from_json_schema(spec["schema"], defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise _bad(f"bad JSON schema: {exc}") from exc
    if kind == "regex":
        return matcher.grammar_from_regex(spec["pattern"])
    if kind == "choice":
        return matcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in spec["choices"]))
    from llguidance.gbnf_to_lark import any_to_lark
    try:                                  # GBNF / EBNF (vLLM's guided_grammar) or Lark
        text = any_to_lark(spec["grammar"])
    except Exception as exc:              # the converter raises plain errors for bad input
        raise _bad(f"bad EBNF grammar: {exc}") from exc
    return matcher.grammar_from_lark(text)


def validate_structured(spec: Any) -> dict[str, Any] | None:
    """`check_structured`, then compile the grammar without a vocabulary (a few ms; what the
    HTTP worker does so that a bad constraint is a 400 before any stream starts)."""
    spec = check_structured(spec)
    if spec is None:
        return None
    key = json.dumps(spec, sort_keys=True)
    if key in _VALID:
        _VALID.move_to_end(key)
        return spec
    import llguidance
    error = llguidance.LLMatcher.validate_grammar(grammar_text(spec))
    if error and not error.startswith("WARNING"):
        raise _bad(error.strip()[:2000])
    _VALID[key] = True
    if len(_VALID) > _CACHE_SIZE:
        _VALID.popitem(last=False)
    return spec


_VALID: OrderedDict[str, bool] = OrderedDict()     # constraints validate_structured passed


class GrammarCompiler:
    """Matchers for one model's vocabulary. The vocabulary index is built on first use."""

    def __init__(self, tokenizer_json: str | Callable[[], str | None] | None, vocab_size: int,
                 eos_ids: tuple[int, ...]):
        # the tokenizer's JSON, or what reads it on first use (a GGUF file's vocabulary takes
        # ~1 s to rebuild: not worth it on every load of a model that may never be constrained)
        self._json: str | None = tokenizer_json if isinstance(tokenizer_json, str) else None
        self._source = tokenizer_json if callable(tokenizer_json) else None
        self.vocab_size, self.eos_ids = vocab_size, eos_ids
        self._tokenizer: Any = None
        self._templates: OrderedDict[str, Any] = OrderedDict()
        self.compiled = 0                 # templates built (cache misses), for stats and tests

    @classmethod
    def for_weights(cls, path: Path, vocab_size: int, eos_ids: tuple[int, ...]
                    ) -> GrammarCompiler:
        """From a .gguf file or a Hugging Face directory (its tokenizer.json)."""
        from engines.llm.tokenizer import Tokenizer

        def read() -> str | None:
            try:
                if path.is_dir():
                    json_file = path / "tokenizer.json"
                    return json_file.read_text() if json_file.is_file() else None
                return Tokenizer.from_gguf(path).backend.to_str()
            except Exception as exc:      # structured outputs only: the model still serves
                log.warning("no tokenizer for structured outputs from %s: %s", path, exc)
                return None
        return cls(read, vocab_size, eos_ids)

    def _llt(self) -> Any:
        if self._tokenizer is None:
            if self._json is None and self._source is not None:
                self._json, self._source = self._source(), None
            if self._json is None:
                raise _bad("this model has no tokenizer Ferry can read, so it cannot be "
                           "constrained")
            import llguidance
            self._tokenizer = llguidance.LLTokenizer(
                self._json, n_vocab=self.vocab_size,
                eos_token=list(self.eos_ids) if self.eos_ids else None)
        return self._tokenizer

    def matcher(self, spec: dict[str, Any]) -> Any:
        """A fresh matcher for one sequence (InvalidInput when the constraint is bad)."""
        key = json.dumps(spec, sort_keys=True)
        template = self._templates.get(key)
        if template is None:
            import llguidance
            template = llguidance.LLMatcher(self._llt(), grammar_text(spec), log_level=0)
            if template.is_error():
                raise _bad(template.get_error().strip()[:2000])
            self.compiled += 1
            self._templates[key] = template
            if len(self._templates) > _CACHE_SIZE:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(key)
        return template.deep_copy()


_EXECUTOR: Any = None


def allowed_tokens(matchers: list[Any], vocab: int) -> np.ndarray:
    """[len(matchers), vocab] booleans: the tokens each matcher allows next. Several matchers
    are filled in parallel by llguidance's thread pool; the GIL is released throughout, so the
    engine runs this beside the forward pass."""
    import llguidance
    from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par
    global _EXECUTOR
    bitmask = np.full(((len(matchers)), (vocab + 31) // 32), -1, dtype=np.int32)
    if len(matchers) == 1:
        fill_next_token_bitmask(matchers[0], bitmask, 0)
    elif matchers:
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor(num_threads=2)
        fill_next_token_bitmask_par(_EXECUTOR, [(m, i) for i, m in enumerate(matchers)],
                                    bitmask)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab].astype(bool)
