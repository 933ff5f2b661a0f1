"""Diffusion serving: Ferry's step-level batching vs one diffusers pipeline call per request.

Same model (a diffusers directory, default: the digits demo model), same process, same run.
At each concurrency C, C clients each keep one request in flight (closed loop) until
`--requests` have completed:

- ferry: the DiffusionEngine's loop; every request joins the running batch at the next step.
- ferry batch_invariant: the same loop with `batch_invariant = true` (each row in a forward of
  its own: a seed's bytes do not depend on its company).
- naive: diffusers' StableDiffusionPipeline, one `pipe(...)` call per request, in arrival order
  (a request waits for the calls before it), PNG-encoded the same way.

    python -m benchmarks.bench_diffusion --model var/demo/digits-diffusion/1 --steps 20

Prints images/s and p50/p99 request latency per (mode, concurrency) as a Markdown table.
"""
from __future__ import annotations

import argparse
import io
import time
import tomllib
from pathlib import Path

import numpy as np

PROMPTS = [f"a handwritten {d}" for d in range(10)]


def _quant(lat: list[float]) -> tuple[float, float]:
    arr = np.asarray(lat)
    return float(np.quantile(arr, 0.5)), float(np.quantile(arr, 0.99))


def bench_ferry(root: Path, conc: int, total: int, steps: int, guidance: float,
                invariant: bool = False) -> dict:
    from engines.base import ModelSpec, TensorRequest
    from engines.diffusion.engine import DiffusionEngine

    sections = tomllib.loads((root / "model.toml").read_text())
    sections = {k: v for k, v in sections.items() if isinstance(v, dict)}
    sections.setdefault("diffusion", {})["max_batch"] = 16
    sections["diffusion"]["batch_invariant"] = invariant
    engine = DiffusionEngine()
    engine.load(ModelSpec("bench", 1, "diffusion", root, weights="pipeline", sections=sections),
                "cpu")
    sent = done = 0
    start: dict[str, float] = {}
    lat: list[float] = []

    def send() -> None:
        nonlocal sent
        rid = f"r{sent}"
        engine.submit(TensorRequest(rid, {
            "prompt": np.array([PROMPTS[sent % 10].encode()], dtype=object),
            "seed": np.array([sent]), "num_inference_steps": np.array([steps]),
            "guidance_scale": np.array([guidance])}))
        start[rid] = time.perf_counter()
        sent += 1

    t0 = time.perf_counter()
    for _ in range(min(conc, total)):
        send()
    while done < total:
        for res in engine.step():
            assert res.error is None, res.error
            lat.append(time.perf_counter() - start.pop(res.id))
            done += 1
            if sent < total:
                send()
    wall = time.perf_counter() - t0
    rows = 1.0 if invariant else engine.stats()["avg_rows_per_step"]   # rows per forward
    engine.unload()
    p50, p99 = _quant(lat)
    return {"images_s": total / wall, "p50": p50, "p99": p99, "rows": rows}


def bench_naive(root: Path, conc: int, total: int, steps: int, guidance: float) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    extra = {} if (root / "pipeline" / "vae").is_dir() else {"vae": None}
    pipe = StableDiffusionPipeline.from_pretrained(
        str(root / "pipeline"), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    size = unet.config.sample_size
    # Closed loop with one server: the C clients' requests queue; request k arrives when
    # request k - C finishes, so its latency is its wait plus its own call.
    finish: list[float] = []
    lat: list[float] = []
    t0 = time.perf_counter()
    for k in range(total):
        arrival = t0 if k < conc else finish[k - conc]
        gen = torch.Generator().manual_seed(k)
        latents = torch.randn((1, unet.config.in_channels, size, size), generator=gen)
        out = pipe(PROMPTS[k % 10], num_inference_steps=steps, guidance_scale=guidance,
                   latents=latents, generator=gen, output_type="latent",
                   height=8 * size, width=8 * size).images
        if pipe.vae is not None:
            out = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample
        img = ((out[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        px = img.permute(1, 2, 0).numpy()
        Image.fromarray(px[:, :, 0] if px.shape[2] == 1 else px).save(io.BytesIO(), "PNG")
        now = time.perf_counter()
        finish.append(now)
        lat.append(now - arrival)
    wall = time.perf_counter() - t0
    p50, p99 = _quant(lat)
    return {"images_s": total / wall, "p50": p50, "p99": p99, "rows": 1.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="version dir with pipeline/")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    print("| mode | concurrency | images/s | p50 s | p99 s | rows/forward |")
    print("|---|---|---|---|---|---|")
    for conc in [int(c) for c in args.concurrency.split(",")]:
        modes = (("ferry step-level", bench_ferry),
                 ("ferry batch_invariant", lambda *a: bench_ferry(*a, invariant=True)),
                 ("naive pipeline", bench_naive))
        for mode, fn in modes:
            r = fn(args.model, conc, max(args.requests, conc), args.steps, args.guidance)
            print(f"| {mode} | {conc} | {r['images_s']:.2f} | {r['p50']:.3f} | "
                  f"{r['p99']:.3f} | {r['rows']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
