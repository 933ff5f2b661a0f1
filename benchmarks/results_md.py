"""Render one comparison run (run_all's results dict) as the peers section of RESULTS.md.

RESULTS.md is shared: only the text between `<!-- peers:begin -->` and `<!-- peers:end -->` is
replaced (the markers are appended if missing); every other section stays as it was.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["BEGIN", "END", "render", "splice", "goals"]

BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"


def splice(existing: str, section: str) -> str:
    """`existing` with the text between the markers replaced by `section`."""
    block = f"{BEGIN}\n{section.strip()}\n{END}"
    start, end = existing.find(BEGIN), existing.find(END)
    if start == -1 or end == -1 or end < start:
        return existing.rstrip("\n") + "\n\n" + block + "\n"
    return existing[:start] + block + existing[end + len(END):]


def _f(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _sys(section: dict[str, Any], name: str) -> dict[str, Any]:
    return next((s for s in section.get("systems", []) if s["name"] == name), {})


def _level(system: dict[str, Any], c: int) -> dict[str, Any]:
    return next((r for r in system.get("levels", []) if r["concurrency"] == c), {})


def _best(system: dict[str, Any]) -> float | None:
    best = system.get("best")
    return best["throughput_rps"] if best else (0.0 if system.get("sweep") else None)


def goals(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met?) — met is None where the run could not measure it."""
    out: list[tuple[str, str, bool | None]] = []
    llm = r.get("llm") or {}
    f, l = _sys(llm, "ferry-sse"), _sys(llm, "llama-server")
    f16, l16 = _level(f, 16), _level(l, 16)
    ratio = _ratio(f16.get("tokens_per_s"), l16.get("tokens_per_s"))
    out.append(("LLM aggregate tokens/s at 16 streams ≥ 1.5× llama.cpp server",
                f"{_f(ratio, 2)}×", None if ratio is None else ratio >= 1.5))
    for c in llm.get("concurrency", []):
        ft = (_level(f, c).get("ttft_ms") or {}).get("p99")
        lt = (_level(l, c).get("ttft_ms") or {}).get("p99")
        met = None if ft is None or lt is None else ft <= lt
        out.append((f"p99 TTFT ≤ llama.cpp server's ({c} streams)",
                    f"{_f(ft, 0)} ms vs {_f(lt, 0)} ms", met))
    tensor = r.get("tensor") or {}
    fb = _best(_sys(tensor, "ferry-kserve-json"))
    for peer in ("ray-serve", "bentoml"):
        pb = _best(_sys(tensor, peer))
        ratio = _ratio(fb, pb)
        measured = f"{_f(ratio, 2)}× ({_f(fb)} vs {_f(pb)} req/s)"
        met = None if fb is None or pb is None else fb >= 3 * pb
        if pb == 0:         # no ratio to judge: say so rather than call it met
            met, measured = None, (f"{peer} stayed above the bound at every rate tried; "
                                   f"Ferry {_f(fb)} req/s")
        out.append((f"tensor throughput at equal p99 ≥ 3× {peer}", measured, met))
    t = r.get("transport") or {}
    if t.get("raw_zmq"):
        raw = t["raw_zmq"]["p50_us"]
        over = t["ferry_zmq"]["p50_us"] - t["ferry_zmq_compute"]["p50_us"]
        out.append(("ZMQ client overhead ≤ 1.5× raw ZMQ round trip",
                    f"{over / raw:.2f}× ({over:.0f} µs vs {raw:.0f} µs)", over <= 1.5 * raw))
    return out


def _machine(m: dict[str, Any]) -> str:
    return (f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM, {m.get('os')}, "
            f"Python {m.get('python')}, torch {m.get('torch')}, onnxruntime "
            f"{m.get('onnxruntime')}; peers: {m.get('peers')}. Load average before/after the "
            f"run: {m.get('load_before')} / {m.get('load_after')} (2 cores; other work on this "
            f"shared machine runs beside the benchmark). Run took {m.get('wall_min')} min, "
            f"{m.get('date')}.")


def _llm_table(llm: dict[str, Any]) -> list[str]:
    rows = ["| system | streams | requests (errors) | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | "
            "TPOT p50 | Ferry/peer tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
    ferry = _sys(llm, "ferry-sse")
    for s in llm.get("systems", []):
        if s.get("error"):
            rows.append(f"| {s['name']} | — | failed: {s['error'][:160]} | | | | | | |")
            continue
        for lv in s.get("levels", []):
            ttft, itl = lv.get("ttft_ms") or {}, lv.get("itl_ms") or {}
            tpot = lv.get("tpot_ms") or {}
            fr = _level(ferry, lv["concurrency"]).get("tokens_per_s")
            ratio = "" if s is ferry else _f(_ratio(fr, lv["tokens_per_s"]), 2) + "×"
            rows.append(f"| {s['name']} | {lv['concurrency']} | {lv['requests']} ({lv['errors']}) "
                        f"| {_f(lv['tokens_per_s'])} | "
                        f"{_f(ttft.get('p50'), 0)} ms | {_f(ttft.get('p99'), 0)} ms | "
                        f"{_f(itl.get('p50'))} ms | {_f(tpot.get('p50'))} ms | {ratio} |")
    return rows


def _tensor_table(tensor: dict[str, Any]) -> list[str]:
    bound = tensor.get("p99_bound_ms")
    rows = [f"| system | closed-loop capacity (16 clients) "
            f"| max req/s with p99 ≤ {_f(bound, 0)} ms "
            "| p50 / p99 there | Ferry JSON / system |", "|---|---|---|---|---|"]
    fb = _best(_sys(tensor, "ferry-kserve-json"))
    for s in tensor.get("systems", []):
        if s.get("error") and not s.get("capacity"):
            rows.append(f"| {s['name']} | failed: {s['error'][:160]} | | | |")
            continue
        cap = s.get("capacity") or {}
        best = s.get("best") or {}
        lat = best.get("latency_ms") or {}
        swept = "—" if not s.get("sweep") else _f(_best(s))
        rows.append(f"| {s['name']} | {_f(cap.get('throughput_rps'))} req/s | {swept} | "
                    f"{_f(lat.get('p50'))} / {_f(lat.get('p99'))} ms | "
                    f"{_f(_ratio(fb, _best(s)), 2) + '×' if s.get('sweep') else ''} |")
    return rows


def _prefix_table(llm: dict[str, Any]) -> list[str]:
    rows = ["| system | TTFT, new ~1k-token system prompt (miss) | TTFT, same prompt again (hit) "
            "| miss / hit |", "|---|---|---|---|"]
    for name, p in (llm.get("prefix") or {}).items():
        if "error" in p:
            rows.append(f"| {name} | failed: {p['error'][:160]} | | |")
            continue
        rows.append(f"| {name} | {_f(p['miss_p50_ms'], 0)} ms | {_f(p['hit_p50_ms'], 0)} ms | "
                    f"{_f(_ratio(p['miss_p50_ms'], p['hit_p50_ms']), 1)}× |")
    return rows


def _transport_rows(t: dict[str, Any]) -> list[str]:
    big = t.get("big_16mib") or {}
    if not big:
        return ["(transport benchmark did not run)"]
    base = big["zmq_shm"]["p50_us"]
    rows = ["| 16 MiB float32 round trip (p50) | time | vs shm |", "|---|---|---|"]
    for name in ("zmq_shm", "zmq_inline", "http_binary", "http_json"):
        v = big[name]["p50_us"]
        rows.append(f"| {name} | {v / 1000:.1f} ms | {v / base:.2f}× |")
    return rows


def _profiles(profiles: list[dict[str, Any]]) -> list[str]:
    lines = []
    for p in profiles:
        if p.get("error"):
            lines.append(f"- {p['label']}: py-spy failed: {p['error']}")
            continue
        top = ", ".join(f"`{n}` {s:.0%}" for n, s in p.get("self", [])[:6])
        incl = ", ".join(f"`{n}` {s:.0%}" for n, s in p.get("inclusive", [])[:8])
        lines.append(f"- **{p['label']}** ({p.get('samples')} samples of active threads) — "
                     f"self time: {top}. Inclusive: {incl}.")
    return lines


def render(r: dict[str, Any], plots: list[Path], results_dir: Path,
           reading: str = "") -> str:
    """The section's markdown; `reading` (benchmarks/peers_reading.md, written by a person after
    looking at a run) is placed after the profiles."""
    llm, tensor = r.get("llm") or {}, r.get("tensor") or {}
    out = ["## Ferry vs peers (`python -m benchmarks.run_all`)", "",
           "One run, every system on this machine in turn, same model files, same 2 cores, "
           "driven by the same load generator (benchmarks/loadgen.py) over loopback.", "",
           "Machine: " + _machine(r.get("machine", {})), "", "### Goals", "",
           "| goal | measured | met? |", "|---|---|---|"]
    for goal, measured, met in goals(r):
        out.append(f"| {goal} | {measured} | "
                   f"{'—' if met is None else ('**met**' if met else '**not met**')} |")
    out += ["", f"### LLM streaming: SmolLM2-135M Q4_1, greedy, {llm.get('max_tokens')} tokens "
            "per request, OpenAI chat SSE", "", *_llm_table(llm), "",
            "### Prefix cache: TTFT hit vs miss (one request at a time, 4 output tokens)", "",
            *_prefix_table(llm), "",
            f"### MiniLM embeddings: throughput at equal p99 ({tensor.get('sequence_tokens')} "
            "tokens per request, open-loop Poisson sweep)", "", *_tensor_table(tensor), "",
            "### Large tensors (from benchmarks/bench_transport.py, same run)", "",
            *_transport_rows(r.get("transport") or {}), ""]
    for p in plots:
        out.append(f"![{p.stem}]({p.relative_to(results_dir).as_posix()})")
    out += ["", "### Where Ferry's time goes (py-spy, under the load above)", "",
            *_profiles(r.get("profiles", [])), ""]
    if reading.strip():
        out += [reading.strip(), ""]
    if r.get("notes"):
        out += ["### Notes", "", *[f"- {n}" for n in r["notes"]], ""]
    if r.get("failures"):
        out += ["### What could not run", "", *[f"- {k}: `{v}`" for k, v in r["failures"].items()],
                ""]
    return "\n".join(out)
