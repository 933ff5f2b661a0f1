"""The diffusion engine: text-to-image with Ferry's own denoising loop and step-level
continuous batching.

Every image of a request is a *row*: its own latents, its own scheduler instance (timesteps,
multistep history) and its own `torch.Generator` seeded with the image's seed, so an image
depends on its seed and parameters only, never on the other rows it shared a forward with.
Rows of the same latent shape form a bucket; each `step()` advances one bucket (round robin
over the buckets with work, so different sizes interleave fairly) by one denoising step:
one UNet forward over the bucket's active rows, conditional and unconditional halves in the
same batch (classifier-free guidance; rows with guidance_scale 1 skip the unconditional
half), then each row's scheduler step. Rows join a bucket's active set when a slot is free
and leave it the step they finish, so a 4-step request never waits behind a 50-step one.
Finished rows are decoded by the VAE (one image at a time, so the pixels do not depend on
batch company either) and PNG-encoded on a thread pool, off the compute loop. A request
submitted with `progress` set gets a ProgressOutput (image i, step s of n) for every row of it
a step advanced, ahead of its result (WebSocket progress events, frontends/http/ws.py).
stats() carries Prometheus histograms of the step and image latencies (`diffusion_latency`).

Requests are tensor requests (the Infer message; see README "Image generation"):

    inputs   prompt BYTES [1]; optional negative_prompt BYTES [1], num_inference_steps,
             guidance_scale, width, height, seed (int64; image i gets seed + i), num_images,
             latents FLOAT32 [n, C, h, w] (replaces the seeded initial noise)
    outputs  images BYTES [n] (PNG), seeds INT64 [n], latents FLOAT32 [n, C, h, w] (final)

model.toml `[diffusion]` (all optional): scheduler (euler | euler_a | ddim | ddpm | dpm++ |
pndm | lms; default: the directory's scheduler config), dtype (float32 | float16 |
bfloat16), max_batch (rows per forward, 8), default_steps (30), max_steps (150),
default_guidance (7.5), min_guidance (1; 0 for SDXL-turbo, which runs without guidance: a
guidance_scale <= 1 skips the unconditional half, as diffusers does), max_guidance (20),
width/height (default size: the UNet's native one),
min_size / max_size (pixels, 8 / 1024), max_images (4), units_per_image (what one image
counts against a key's rate limit, 1), resize (false; true: a model that only renders its native
size, like the digits demo, renders that and scales the PNG to the requested width x height with
nearest-neighbour sampling), batch_invariant (false: rows of different requests share a
forward, whose float sums can move a few pixels of an image by one level against the same seed
alone; true: each row runs in a forward of its own, so a seed gives the same PNG bytes in any
company, at the cost of the batching).
"""
from __future__ import annotations

import io
import logging
import secrets
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.errors import Cancelled, DeadlineExceeded, FerryError, InvalidInput
from engines.base import (Engine, ModelInfo, ModelSpec, ProgressOutput, TensorRequest,
                          TensorResult, TensorSpec)
from engines.diffusion import prompts
from engines.diffusion.pipeline import Networks, load_error, load_networks
from engines.llm.latency import Histogram

__all__ = ["DiffusionEngine", "DiffusionConfig", "INPUTS", "OUTPUTS"]

log = logging.getLogger(__name__)

INPUTS = {"prompt": "bytes", "negative_prompt": "bytes", "num_inference_steps": "int64",
          "guidance_scale": "float32", "width": "int64", "height": "int64", "seed": "int64",
          "num_images": "int64", "latents": "float32"}
OUTPUTS = {"images": "bytes", "seeds": "int64", "latents": "float32"}
_SCALARS = ("num_inference_steps", "guidance_scale", "width", "height", "seed", "num_images")
_MAX_PROMPT_BYTES = 8192
_LATENCY_WINDOW = 2048
_SEED_LIMIT = 2 ** 63
_ZERO_OK = frozenset({"width", "height", "min_guidance", "default_guidance"})   # may be 0
# Prometheus buckets (seconds) of one denoising step (one forward of a bucket's rows) and of an
# image from the engine's receipt of its request to its PNG: /metrics renders them as
# ferry_diffusion_step_seconds / ferry_diffusion_image_seconds (frontends/http/metrics.py).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
IMAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                 160.0, 320.0)


@dataclass(slots=True)
class DiffusionConfig:
    scheduler: str | None = None
    dtype: str = ""
    max_batch: int = 8
    default_steps: int = 30
    max_steps: int = 150
    default_guidance: float = 7.5
    min_guidance: float = 1.0
    max_guidance: float = 20.0
    width: int = 0
    height: int = 0
    min_size: int = 8
    max_size: int = 1024
    max_images: int = 4
    units_per_image: int = 1
    resize: bool = False
    batch_invariant: bool = False

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> DiffusionConfig:
        cfg = cls()
        for key, value in section.items():
            if key not in cls.__dataclass_fields__:
                raise InvalidInput(f"unknown key diffusion.{key}", code="invalid_model_config",
                                   param=f"diffusion.{key}")
            want = type(getattr(cfg, key)) if key not in ("scheduler",) else str
            if want is bool:
                ok = isinstance(value, bool)
            elif want is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, want) and not isinstance(value, bool)
            numeric = ok and want in (int, float)
            if not ok or (numeric and (value < 0 if key in _ZERO_OK else value <= 0)):
                kind = "boolean" if want is bool else f"positive {want.__name__}"
                raise InvalidInput(f"diffusion.{key} must be a {kind}",
                                   code="invalid_model_config", param=f"diffusion.{key}")
            setattr(cfg, key, want(value))
        if not cfg.min_guidance <= cfg.default_guidance <= cfg.max_guidance:
            raise InvalidInput("diffusion.default_guidance must be between min_guidance and "
                               "max_guidance", code="invalid_model_config",
                               param="diffusion.default_guidance")
        return cfg


@dataclass(eq=False)
class _Job:
    request: TensorRequest
    steps: int
    guidance: float
    width: int                       # of the PNG
    height: int
    seeds: list[int]
    gen_width: int = 0               # what the denoiser renders (differs only with resize)
    gen_height: int = 0
    cond: Any = None                 # [1, S, D] text embeddings (None: unconditional model)
    uncond: Any = None
    negative: str | None = None      # as given (SDXL zeroes the unconditional half without one)
    pooled: Any = None               # SDXL [1, P] text_embeds, cond and uncond
    uncond_pooled: Any = None
    time_ids: Any = None             # SDXL [1, 6]
    pngs: list[bytes | None] = field(default_factory=list)
    latents: list[Any] = field(default_factory=list)
    left: int = 0                    # images not yet encoded
    started: float = 0.0             # first denoising step
    done: bool = False


@dataclass(eq=False)
class _Row:
    job: _Job
    index: int
    latents: Any                     # [1, C, h, w]
    scheduler: Any
    timesteps: list[Any]
    generator: Any
    pos: int = 0


@dataclass(eq=False)
class _Bucket:
    shape: tuple[int, int]           # latent (h, w)
    active: list[_Row] = field(default_factory=list)
    waiting: deque = field(default_factory=deque)


class DiffusionEngine(Engine):
    kind = "tensor"

    def __init__(self) -> None:
        self._nets: Networks | None = None
        self._cfg = DiffusionConfig()
        self._torch: Any = None
        self._device = "cpu"
        self._dtype: Any = None
        self._name = ""
        self._queue: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._turn: deque[tuple[int, int]] = deque()    # bucket round robin
        self._encoding: list[tuple[_Job, int, Future]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._counts: Counter[str] = Counter()
        self._rows_per_step: Counter[int] = Counter()
        self._step_s: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._image_s: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._step_hist = Histogram(STEP_BUCKETS)
        self._image_hist = Histogram(IMAGE_BUCKETS)
        self._compute_s = 0.0
        self._unit = 8                   # pixel sizes must be multiples of this

    # -- load -------------------------------------------------------------------------------

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        import torch
        self._torch = torch
        self._cfg = DiffusionConfig.from_section(spec.section("diffusion"))
        dtype_name = self._cfg.dtype or ("float16" if device.startswith("cuda") else "float32")
        if dtype_name not in ("float32", "float16", "bfloat16"):
            raise InvalidInput("diffusion.dtype must be float32, float16 or bfloat16",
                               code="invalid_model_config", param="diffusion.dtype")
        self._dtype = getattr(torch, dtype_name)
        self._device = device
        root = spec.path / (spec.weights or "pipeline")
        if not root.is_dir():
            raise load_error(f"{root} is not a directory (the diffusers layout)")
        nets = load_networks(root, device, self._dtype, self._cfg.scheduler)
        levels = len(nets.unet.config.block_out_channels)
        self._unit = nets.vae_scale * 2 ** (levels - 1)
        native = nets.sample_size * nets.vae_scale
        self._cfg.width = self._cfg.width or native
        self._cfg.height = self._cfg.height or native
        self._name = spec.name
        self._nets = nets
        for side in ("width", "height"):
            self._check_size(side, getattr(self._cfg, side), config=True)
        self._pool = ThreadPoolExecutor(2, thread_name_prefix=f"png-{spec.name}")
        self._warmup()
        info = ModelInfo(spec.name, spec.version, "ferry_diffusion", "tensor",
                         [TensorSpec(n, d, (-1,) if n != "latents" else (-1, -1, -1, -1))
                          for n, d in INPUTS.items()],
                         [TensorSpec(n, d, (-1,) if n != "latents" else (-1, -1, -1, -1))
                          for n, d in OUTPUTS.items()],
                         0, {"diffusion": self.describe()})
        return info

    def describe(self) -> dict[str, Any]:
        nets, cfg = self._nets, self._cfg
        assert nets is not None
        return {"scheduler": nets.scheduler_cls.__name__, "width": cfg.width,
                "height": cfg.height, "size_multiple": self._unit, "min_size": cfg.min_size,
                "max_size": cfg.max_size, "default_steps": cfg.default_steps,
                "max_steps": cfg.max_steps, "default_guidance": cfg.default_guidance,
                "min_guidance": cfg.min_guidance, "max_guidance": cfg.max_guidance,
                "max_images": cfg.max_images,
                "max_batch": cfg.max_batch, "units_per_image": cfg.units_per_image,
                "resize": cfg.resize, "batch_invariant": cfg.batch_invariant,
                "text_conditioned": nets.cross_attention,
                "latent_channels": nets.latent_channels, "vae": nets.vae is not None,
                "sdxl": nets.text_time}

    def _warmup(self) -> None:
        prompt = np.array([b"warm up"], dtype=object)
        req = TensorRequest("warmup", {"prompt": prompt, "num_inference_steps":
                                       np.array([1]), "seed": np.array([0])})
        self.submit(req)
        deadline = time.monotonic() + 600
        while self.has_work() and time.monotonic() < deadline:
            for res in self.step():
                if res.error is not None:
                    raise load_error(f"warm-up generation failed: {res.error}")
        self._counts.clear()
        self._rows_per_step.clear()
        self._step_s.clear()
        self._image_s.clear()
        self._step_hist = Histogram(STEP_BUCKETS)
        self._image_hist = Histogram(IMAGE_BUCKETS)
        self._compute_s = 0.0

    # -- requests ---------------------------------------------------------------------------

    def submit(self, request: TensorRequest) -> None:  # type: ignore[override]
        if self._nets is None:
            raise FerryError("model is not loaded", code="model_unavailable", status=503)
        if not isinstance(request, TensorRequest):
            raise InvalidInput("the diffusion engine serves tensor requests (Infer) only")
        if request.id in self._jobs:
            raise InvalidInput(f"request id {request.id!r} is already in flight",
                               code="duplicate_id")
        job = self._parse(request)
        if not request.arrival:
            request.arrival = time.monotonic()
        self._jobs[request.id] = job
        self._queue.append(job)
        self._counts["requests"] += 1

    def _parse(self, request: TensorRequest) -> _Job:
        cfg, nets = self._cfg, self._nets
        assert nets is not None
        inputs = request.inputs
        unknown = set(inputs) - set(INPUTS)
        if unknown:
            raise InvalidInput(f"unknown input {sorted(unknown)[0]!r}; the diffusion engine "
                               f"takes {', '.join(INPUTS)}", code="invalid_input",
                               param=sorted(unknown)[0])
        for name in request.outputs or ():
            if name not in OUTPUTS:
                raise InvalidInput(f"unknown output {name!r} (images, seeds, latents)",
                                   code="invalid_output", param=name)
        steps = self._int(inputs, "num_inference_steps", cfg.default_steps, 1, cfg.max_steps)
        n = self._int(inputs, "num_images", 1, 1, cfg.max_images)
        width = self._int(inputs, "width", cfg.width, 1, 1 << 16)
        height = self._int(inputs, "height", cfg.height, 1, 1 << 16)
        self._check_size("width", width)
        self._check_size("height", height)
        guidance = self._float(inputs, "guidance_scale", cfg.default_guidance,
                               cfg.min_guidance, cfg.max_guidance)
        if "seed" in inputs:
            seed = self._int(inputs, "seed", 0, 0, _SEED_LIMIT - 1)
        else:
            seed = secrets.randbelow(2 ** 32)
        seeds = [(seed + i) % _SEED_LIMIT for i in range(n)]
        job = _Job(request, steps, guidance, width, height, seeds)
        job.gen_width, job.gen_height = (cfg.width, cfg.height) if cfg.resize else (width, height)
        job.pngs = [None] * n
        job.latents = [None] * n
        job.left = n
        prompt = self._text(inputs, "prompt")
        negative = self._text(inputs, "negative_prompt")
        if nets.cross_attention and prompt is None:
            raise InvalidInput("input 'prompt' is required", code="invalid_input",
                               param="prompt")
        if not nets.cross_attention and (prompt or negative):
            raise InvalidInput(f"model {self._name!r} is unconditional: it takes no prompt",
                               code="invalid_input", param="prompt")
        if "latents" in inputs:
            lat = inputs["latents"]
            want = (n, nets.latent_channels, job.gen_height // nets.vae_scale,
                    job.gen_width // nets.vae_scale)
            if lat.dtype != np.float32 or tuple(lat.shape) != want:
                raise InvalidInput(f"input 'latents' must be FP32 of shape {list(want)}, got "
                                   f"{lat.dtype} {list(lat.shape)}", code="invalid_input",
                                   param="latents")
            if not np.isfinite(lat).all():
                raise InvalidInput("input 'latents' holds NaN or infinity",
                                   code="invalid_input", param="latents")
        job.cond, job.negative = prompt or "", negative
        return job

    @staticmethod
    def _scalar(inputs: dict[str, np.ndarray], name: str) -> Any:
        arr = inputs[name]
        if arr.size != 1:
            raise InvalidInput(f"input {name!r} must hold one value, got shape "
                               f"{list(arr.shape)}", code="invalid_input", param=name)
        return arr.reshape(-1)[0]

    def _int(self, inputs: dict[str, np.ndarray], name: str, default: int, lo: int,
             hi: int) -> int:
        if name not in inputs:
            return default
        arr = inputs[name]
        if arr.dtype.kind not in "iu":
            raise InvalidInput(f"input {name!r} must be an integer tensor, got {arr.dtype}",
                               code="invalid_input", param=name)
        value = int(self._scalar(inputs, name))
        if not lo <= value <= hi:
            raise InvalidInput(f"{name} must be between {lo} and {hi}, got {value}",
                               code="invalid_parameter", param=name)
        return value

    def _float(self, inputs: dict[str, np.ndarray], name: str, default: float, lo: float,
               hi: float) -> float:
        if name not in inputs:
            return default
        arr = inputs[name]
        if arr.dtype.kind not in "iuf":
            raise InvalidInput(f"input {name!r} must be numeric, got {arr.dtype}",
                               code="invalid_input", param=name)
        value = float(self._scalar(inputs, name))
        if not lo <= value <= hi:     # NaN fails too
            raise InvalidInput(f"{name} must be between {lo:g} and {hi:g}, got {value}",
                               code="invalid_parameter", param=name)
        return value

    def _text(self, inputs: dict[str, np.ndarray], name: str) -> str | None:
        if name not in inputs:
            return None
        value = self._scalar(inputs, name)
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, bytes):
            raise InvalidInput(f"input {name!r} must be a BYTES tensor (UTF-8 text)",
                               code="invalid_input", param=name)
        if len(value) > _MAX_PROMPT_BYTES:
            raise InvalidInput(f"{name} is longer than {_MAX_PROMPT_BYTES} bytes",
                               code="invalid_parameter", param=name)
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"input {name!r} is not valid UTF-8", code="invalid_input",
                               param=name) from None

    def _check_size(self, side: str, value: int, config: bool = False) -> None:
        cfg = self._cfg
        unit = 1 if cfg.resize and not config else self._unit
        if value % unit or not cfg.min_size <= value <= cfg.max_size:
            multiple = f"a multiple of {unit} " if unit > 1 else "a size "
            msg = (f"{side} must be {multiple}between {cfg.min_size} and "
                   f"{cfg.max_size}, got {value}")
            if config:
                raise InvalidInput(f"diffusion.{msg}", code="invalid_model_config",
                                   param=f"diffusion.{side}")
            raise InvalidInput(msg, code="invalid_parameter", param=side)

    # -- the loop ---------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._queue or self._turn or self._encoding)

    def wait_hint(self) -> float | None:
        if self._queue or self._turn:
            return 0.0
        return 0.002 if self._encoding else None

    def step(self) -> list[TensorResult]:  # type: ignore[override]
        out = self._collect_encoded()
        out += self._expire()
        self._admit()
        if self._turn:
            self._turn.rotate(-1)
            out += self._advance(self._buckets[self._turn[-1]])
        return out

    def _admit(self) -> None:
        """Encode the queued requests' prompts and put their rows in their buckets."""
        torch, nets = self._torch, self._nets
        assert nets is not None
        while self._queue:
            job = self._queue.popleft()
            t0 = time.perf_counter()
            with torch.inference_mode():
                if nets.cross_attention:
                    c = prompts.encode(nets, job.cond, job.negative, self._device, self._dtype)
                    job.cond, job.uncond = c.cond, c.uncond
                    job.pooled, job.uncond_pooled = c.pooled, c.uncond_pooled
                    if nets.text_time:
                        job.time_ids = torch.tensor(
                            [prompts.time_ids(job.gen_height, job.gen_width)],
                            dtype=self._dtype, device=self._device)
                else:
                    job.cond = job.uncond = None
                shape = (job.gen_height // nets.vae_scale, job.gen_width // nets.vae_scale)
                given = job.request.inputs.get("latents")
                for i, seed in enumerate(job.seeds):
                    gen = torch.Generator(device=self._device).manual_seed(seed)
                    sched = nets.scheduler_cls.from_config(nets.scheduler_config)
                    sched.set_timesteps(job.steps, device=self._device)
                    if given is not None:
                        lat = torch.from_numpy(np.array(given[i:i + 1])).to(self._device)
                    else:
                        lat = torch.randn((1, nets.latent_channels, *shape), generator=gen,
                                          device=self._device, dtype=torch.float32)
                    lat = lat * sched.init_noise_sigma
                    row = _Row(job, i, lat, sched, list(sched.timesteps), gen)
                    bucket = self._buckets.get(shape)
                    if bucket is None:
                        bucket = self._buckets[shape] = _Bucket(shape)
                        self._turn.append(shape)
                    bucket.waiting.append(row)
            self._compute_s += time.perf_counter() - t0

    def _advance(self, bucket: _Bucket) -> list[ProgressOutput]:
        """One denoising step of the bucket's active rows (refilled from its waiting ones);
        returns the progress of the rows whose request asked for it."""
        torch, nets = self._torch, self._nets
        assert nets is not None
        while bucket.waiting and len(bucket.active) < self._cfg.max_batch:
            bucket.active.append(bucket.waiting.popleft())
        rows = bucket.active
        t0 = time.perf_counter()
        now = time.monotonic()
        for row in rows:
            if not row.job.started:
                row.job.started = now
        with torch.inference_mode():
            # batch_invariant: each row (with its unconditional half) in a forward of its own,
            # so a seed's pixels do not depend on the rows beside it (a GEMM's row sums do)
            groups = [[r] for r in rows] if self._cfg.batch_invariant else [rows]
            pred = torch.cat([self._predict(group) for group in groups])
            finished = []
            progress: list[ProgressOutput] = []
            for i, row in enumerate(rows):
                row.latents = row.scheduler.step(pred[i:i + 1], row.timesteps[row.pos],
                                                 row.latents, generator=row.generator,
                                                 return_dict=False)[0]
                row.pos += 1
                if row.job.request.progress:
                    progress.append(ProgressOutput(row.job.request.id, row.index, row.pos,
                                                   len(row.timesteps)))
                if row.pos == len(row.timesteps):
                    finished.append(row)
            bucket.active = [r for r in rows if r.pos < len(r.timesteps)]
            for row in finished:
                self._finish_row(row)
        elapsed = time.perf_counter() - t0
        self._compute_s += elapsed
        self._step_s.append(elapsed)
        self._step_hist.observe(elapsed)
        self._rows_per_step[len(rows)] += 1
        self._counts["steps"] += 1
        self._counts["row_steps"] += len(rows)
        self._drop_empty(bucket)
        return progress

    def _predict(self, rows: list[_Row]) -> Any:
        """The guided noise prediction of each of `rows`: one denoiser forward over the rows and
        the unconditional halves of those with guidance."""
        torch, nets = self._torch, self._nets
        assert nets is not None
        guided = [i for i, r in enumerate(rows) if r.job.guidance > 1.0]
        scaled = [r.scheduler.scale_model_input(r.latents, r.timesteps[r.pos])
                  for r in rows]
        x = torch.cat(scaled + [scaled[i] for i in guided]).to(self._dtype)
        t = torch.stack([torch.as_tensor(r.timesteps[r.pos]) for r in rows] +
                        [torch.as_tensor(rows[i].timesteps[rows[i].pos]) for i in guided])
        t = t.to(self._device)
        if nets.cross_attention:
            jobs = [r.job for r in rows]
            extra = [rows[i].job for i in guided]
            emb = torch.cat([j.cond for j in jobs] + [j.uncond for j in extra])
            added = None
            if nets.text_time:   # [B, P] pooled projections, [B, 6] size/crop time ids
                added = {"text_embeds": torch.cat([j.pooled for j in jobs] +
                                                  [j.uncond_pooled for j in extra]),
                         "time_ids": torch.cat([j.time_ids for j in jobs + extra])}
            pred = nets.unet(x, t, encoder_hidden_states=emb,
                             added_cond_kwargs=added).sample
        else:
            pred = nets.unet(x, t).sample
        pred = pred.float()
        for k, i in enumerate(guided):
            g = rows[i].job.guidance
            uncond = pred[len(rows) + k]
            pred[i] = uncond + g * (pred[i] - uncond)
        return pred[:len(rows)]

    def _finish_row(self, row: _Row) -> None:
        """VAE-decode one finished row and hand its pixels to the PNG pool."""
        nets, torch = self._nets, self._torch
        assert nets is not None and self._pool is not None
        job = row.job
        if "latents" in (job.request.outputs or ()):
            job.latents[row.index] = row.latents[0].float().cpu().numpy()
        if nets.vae is not None:
            img = nets.vae.decode(row.latents.to(nets.vae_dtype) / nets.scaling_factor,
                                  return_dict=False)[0]
        else:
            img = row.latents
        img = ((img[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = img.permute(1, 2, 0).cpu().numpy()
        size = (job.width, job.height)
        if size == (job.gen_width, job.gen_height):
            size = None
        self._encoding.append((job, row.index, self._pool.submit(_png, pixels, size)))

    def _collect_encoded(self) -> list[TensorResult]:
        out: list[TensorResult] = []
        still = []
        for job, index, fut in self._encoding:
            if not fut.done():
                still.append((job, index, fut))
                continue
            if job.done:
                continue
            try:
                job.pngs[index] = fut.result()
            except Exception as exc:   # PIL failed: this request fails alone
                out.append(self._fail(job, FerryError(f"PNG encoding failed: {exc}",
                                                      code="inference_failed", status=500)))
                continue
            took = time.monotonic() - job.request.arrival
            self._image_s.append(took)
            self._image_hist.observe(took)
            self._counts["images"] += 1
            job.left -= 1
            if job.left == 0:
                out.append(self._result(job))
        self._encoding = still
        return out

    def _result(self, job: _Job) -> TensorResult:
        job.done = True
        self._jobs.pop(job.request.id, None)
        wanted = job.request.outputs or ["images", "seeds"]
        outputs: dict[str, np.ndarray] = {}
        if "images" in wanted:
            outputs["images"] = np.array(job.pngs, dtype=object)
        if "seeds" in wanted:
            outputs["seeds"] = np.array(job.seeds, dtype=np.int64)
        if "latents" in wanted:
            outputs["latents"] = np.stack(job.latents).astype(np.float32)
        now = time.monotonic()
        started = job.started or now
        self._counts["completed"] += 1
        return TensorResult(job.request.id, outputs, queue_s=started - job.request.arrival,
                            compute_s=now - started, batch_size=len(job.seeds))

    def _expire(self) -> list[TensorResult]:
        now = time.monotonic()
        out = []
        for job in list(self._jobs.values()):
            dl = job.request.deadline
            if dl is not None and now > dl:
                self._counts["expired"] += 1
                out.append(self._fail(job, DeadlineExceeded(
                    f"request {job.request.id} ran past its deadline after "
                    f"{now - job.request.arrival:.2f} s")))
        return out

    def _fail(self, job: _Job, exc: FerryError) -> TensorResult:
        self._drop(job)
        self._counts["failed"] += 1
        return TensorResult(job.request.id, error=exc)

    def _drop(self, job: _Job) -> None:
        """Take every row of `job` out of the loop; its slots are free for the next step."""
        job.done = True
        self._jobs.pop(job.request.id, None)
        if job in self._queue:
            self._queue.remove(job)
        for bucket in list(self._buckets.values()):
            bucket.active = [r for r in bucket.active if r.job is not job]
            bucket.waiting = deque(r for r in bucket.waiting if r.job is not job)
            self._drop_empty(bucket)
        self._encoding = [e for e in self._encoding if e[0] is not job]

    def _drop_empty(self, bucket: _Bucket) -> None:
        if not bucket.active and not bucket.waiting:
            self._buckets.pop(bucket.shape, None)
            if bucket.shape in self._turn:
                self._turn.remove(bucket.shape)

    def cancel(self, request_id: str) -> list[TensorResult]:  # type: ignore[override]
        job = self._jobs.get(request_id)
        if job is None:
            return []
        self._drop(job)
        self._counts["cancelled"] += 1
        return [TensorResult(request_id, error=Cancelled(f"request {request_id} cancelled"))]

    def unload(self) -> None:
        for job in list(self._jobs.values()):
            self._drop(job)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._nets = None

    # -- counters ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        steps = self._counts["steps"]
        rows = sum(k * v for k, v in self._rows_per_step.items())
        return {"requests": self._counts["requests"], "completed": self._counts["completed"],
                "images": self._counts["images"], "steps": steps,
                "cancelled": self._counts["cancelled"], "expired": self._counts["expired"],
                "failed": self._counts["failed"], "queued": len(self._queue),
                "active_rows": sum(len(b.active) for b in self._buckets.values()),
                "waiting_rows": sum(len(b.waiting) for b in self._buckets.values()),
                "buckets": len(self._buckets), "encoding": len(self._encoding),
                "rows_per_step": {str(k): v for k, v in sorted(self._rows_per_step.items())},
                "avg_rows_per_step": rows / steps if steps else 0.0,
                "step_latency_s": _quantiles(self._step_s),
                "image_latency_s": _quantiles(self._image_s),
                "row_steps": self._counts["row_steps"],
                "diffusion_latency": {"step": self._step_hist.to_wire(),
                                      "image": self._image_hist.to_wire()},
                "compute_s": self._compute_s}


def _quantiles(values: deque[float]) -> dict[str, float]:
    if not values:
        return {"count": 0, "p50": 0.0, "p99": 0.0, "mean": 0.0}
    arr = np.fromiter(values, dtype=np.float64)
    return {"count": len(arr), "p50": float(np.quantile(arr, 0.5)),
            "p99": float(np.quantile(arr, 0.99)), "mean": float(arr.mean())}


def _png(pixels: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    from PIL import Image
    # uint8 [h, w] is mode L, [h, w, 3] is RGB
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels[:, :, :3])
    if size is not None:
        image = image.resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
