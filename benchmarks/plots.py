"""PNG plots of one comparison run (benchmarks/out/peers.json) for RESULTS.md.

- `tensor_latency.png`: p50 and p99 latency against achieved throughput, one line per system,
  the common p99 bound dashed;
- `llm_throughput.png`: aggregate output tokens/s and p99 TTFT against concurrency.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_tensor", "plot_llm", "plot_all"]


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")          # no display on servers
    import matplotlib.pyplot as plt
    return plt


def plot_tensor(tensor: dict[str, Any], out: Path) -> Path | None:
    systems = [s for s in tensor.get("systems", []) if s.get("sweep")]
    if not systems:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for k, s in enumerate(systems):
        pts = sorted((r["throughput_rps"], r["latency_ms"]["p50"], r["latency_ms"]["p99"])
                     for r in s["sweep"] if r["latency_ms"])
        xs = [p[0] for p in pts]
        color = f"C{k}"
        ax.plot(xs, [p[2] for p in pts], "o-", color=color, label=f"{s['name']} p99")
        ax.plot(xs, [p[1] for p in pts], "x--", color=color, alpha=0.6, label=f"{s['name']} p50")
    ax.axhline(tensor["p99_bound_ms"], color="grey", ls=":", label="p99 bound")
    ax.set_yscale("log")
    ax.set_xlabel("achieved throughput (requests/s, open-loop Poisson)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"MiniLM embeddings, 1 sentence ({tensor.get('sequence_tokens')} tokens) "
                 "per request")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_llm(llm: dict[str, Any], out: Path) -> Path | None:
    systems = [s for s in llm.get("systems", []) if s.get("levels")]
    if not systems:
        return None
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for k, s in enumerate(systems):
        levels = s["levels"]
        cs = [r["concurrency"] for r in levels]
        a1.plot(cs, [r["tokens_per_s"] for r in levels], "o-", color=f"C{k}", label=s["name"])
        a2.plot(cs, [(r["ttft_ms"] or {}).get("p99", float("nan")) for r in levels], "o-",
                color=f"C{k}", label=f"{s['name']} p99")
        a2.plot(cs, [(r["ttft_ms"] or {}).get("p50", float("nan")) for r in levels], "x--",
                color=f"C{k}", alpha=0.6, label=f"{s['name']} p50")
    levels = sorted({r["concurrency"] for s in systems for r in s["levels"]})
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent streams (closed loop)")
        ax.grid(True, which="both", alpha=0.3)
    a1.set_ylabel("aggregate output tokens/s")
    a1.set_title(f"SmolLM2-135M Q4_1, {llm.get('max_tokens')} tokens/request")
    a2.set_ylabel("time to first token (ms)")
    a2.set_yscale("log")
    a2.set_title("TTFT")
    a1.legend(fontsize=8)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_all(results: dict[str, Any], plot_dir: Path) -> list[Path]:
    plot_dir.mkdir(parents=True, exist_ok=True)
    made = [plot_tensor(results.get("tensor") or {}, plot_dir / "tensor_latency.png"),
            plot_llm(results.get("llm") or {}, plot_dir / "llm_throughput.png")]
    return [p for p in made if p is not None]
