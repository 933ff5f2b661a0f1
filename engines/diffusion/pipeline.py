"""Loading a diffusers directory: the networks (diffusers / transformers classes) and the
scheduler configuration, without diffusers' pipeline objects (the engine runs its own loop).

Layout (what `StableDiffusionPipeline.save_pretrained` writes; SD 1.x / 2.x checkouts have it):

    model_index.json          names each component's class
    scheduler/scheduler_config.json
    unet/config.json + weights        the denoiser (UNet2DConditionModel or UNet2DModel)
    text_encoder/ + tokenizer/        CLIPTextModel + CLIPTokenizer (optional: no text encoder
                                      means an unconditional model; prompts are refused)
    vae/                              AutoencoderKL (optional: without it the denoiser works in
                                      pixel space and its output is the image, in [-1, 1])

SDXL (and SDXL-turbo; what `StableDiffusionXLPipeline.save_pretrained` writes) adds a second
text encoder: text_encoder/ (CLIPTextModel) + tokenizer/, text_encoder_2/
(CLIPTextModelWithProjection) + tokenizer_2/, and a UNet whose `addition_embed_type` is
"text_time" (it takes the pooled projection of encoder 2 and the size/crop time ids beside the
prompt embeddings; engines/diffusion/prompts.py). A text_time UNet without the second encoder,
or encoders whose widths do not add up to the UNet's, is a load error naming the part.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.errors import FerryError

__all__ = ["Networks", "load_networks", "scheduler_class", "SCHEDULER_NAMES", "load_error"]

log = logging.getLogger(__name__)

# Ferry's scheduler names (model.toml [diffusion] scheduler) -> diffusers classes
SCHEDULER_NAMES = {
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
}
_SCHEDULER_CLASSES = frozenset(SCHEDULER_NAMES.values()) | {"DPMSolverSinglestepScheduler",
                                                            "HeunDiscreteScheduler",
                                                            "UniPCMultistepScheduler"}


def load_error(message: str) -> FerryError:
    return FerryError(message, code="model_load_failed", status=422)


@dataclass
class Networks:
    unet: Any
    vae: Any | None
    text_encoder: Any | None
    tokenizer: Any | None
    scheduler_cls: Any
    scheduler_config: dict[str, Any]
    latent_channels: int
    sample_size: int               # the denoiser's native latent size
    vae_scale: int                 # image pixels per latent pixel (1 without a VAE)
    scaling_factor: float
    cross_attention: bool          # UNet2DConditionModel (prompts) vs UNet2DModel
    text_encoder_2: Any | None = None   # SDXL: CLIPTextModelWithProjection
    tokenizer_2: Any | None = None
    text_time: bool = False        # SDXL UNet: added_cond_kwargs text_embeds + time_ids
    force_zeros: bool = True       # SDXL: no negative prompt -> zero unconditional embeddings
    vae_dtype: Any = None          # float32 when the VAE's config asks for force_upcast


def scheduler_class(name: str) -> Any:
    import diffusers
    cls_name = SCHEDULER_NAMES.get(name, name)
    if cls_name not in _SCHEDULER_CLASSES:
        raise load_error(f"scheduler {name!r} is not supported; use one of "
                         f"{', '.join(sorted(SCHEDULER_NAMES))}")
    return getattr(diffusers, cls_name)


def load_networks(root: Path, device: str, dtype: Any, scheduler: str | None) -> Networks:
    """Load the components under `root`; raises `model_load_failed` naming what is wrong."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers
    import torch
    import transformers
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    d_logging.disable_progress_bar()
    t_logging.disable_progress_bar()
    root = Path(root)
    index_path = root / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise load_error(f"{index_path} not found: the weights must be a diffusers "
                         "directory (model_index.json, unet/, scheduler/, ...)") from None
    except (OSError, ValueError) as exc:
        raise load_error(f"cannot read {index_path}: {exc}") from None
    if not isinstance(index, dict):
        raise load_error(f"{index_path} must hold a JSON object")
    for part in ("unet", "scheduler"):
        if not (root / part).is_dir():
            raise load_error(f"the diffusers directory has no {part}/ (only UNet denoisers "
                             "are served)")

    def component(part: str, module: Any, allowed: tuple[str, ...]) -> Any:
        entry = index.get(part)
        cls_name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if cls_name is None:
            cls_name = allowed[0]
        if cls_name not in allowed:
            raise load_error(f"{part} class {cls_name!r} is not supported (one of "
                             f"{', '.join(allowed)})")
        try:
            return getattr(module, cls_name).from_pretrained(str(root / part))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise load_error(f"cannot load {part}/: {exc}") from None

    unet = component("unet", diffusers, ("UNet2DConditionModel", "UNet2DModel"))
    cross = type(unet).__name__ == "UNet2DConditionModel"
    vae = None
    if (root / "vae").is_dir() and index.get("vae", ["", ""])[0] is not None:
        vae = component("vae", diffusers, ("AutoencoderKL", "AutoencoderTiny"))
    text_encoder = tokenizer = text_encoder_2 = tokenizer_2 = None
    add_type = getattr(unet.config, "addition_embed_type", None) if cross else None
    if add_type not in (None, "text_time"):
        raise load_error(f"unet addition_embed_type {add_type!r} is not supported (none, or "
                         "'text_time' as SDXL has)")
    if cross:
        if not (root / "text_encoder").is_dir() or not (root / "tokenizer").is_dir():
            raise load_error("a cross-attention UNet needs text_encoder/ and tokenizer/")
        text_encoder = component("text_encoder", transformers, ("CLIPTextModel",))
        tokenizer = component("tokenizer", transformers, ("CLIPTokenizer", "CLIPTokenizerFast"))
    if add_type == "text_time":
        missing = [p for p in ("text_encoder_2", "tokenizer_2") if not (root / p).is_dir()]
        if missing:
            raise load_error(f"the unet's addition_embed_type is 'text_time' (SDXL): it needs "
                             f"{' and '.join(p + '/' for p in missing)} (CLIPTextModelWith"
                             "Projection + its tokenizer) beside text_encoder/")
        text_encoder_2 = component("text_encoder_2", transformers,
                                   ("CLIPTextModelWithProjection",))
        tokenizer_2 = component("tokenizer_2", transformers,
                                ("CLIPTokenizer", "CLIPTokenizerFast"))
        _check_sdxl_widths(unet, text_encoder, text_encoder_2)
    elif (root / "text_encoder_2").is_dir() and cross:
        raise load_error("text_encoder_2/ is present but the unet has no addition_embed_type "
                         "'text_time': not an SDXL UNet")
    try:
        sched_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise load_error(f"cannot read scheduler/scheduler_config.json: {exc}") from None
    cls = scheduler_class(scheduler or sched_config.get("_class_name", ""))
    for net in (unet, vae, text_encoder, text_encoder_2):
        if net is not None:
            net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae_dtype = dtype
    if vae is not None and getattr(vae.config, "force_upcast", False) and dtype != torch.float32:
        # SDXL's VAE overflows in float16 (its config says force_upcast): decode in float32
        vae_dtype = torch.float32
        vae.to(dtype=vae_dtype)
    if vae is not None:
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        scaling = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    else:
        scale, scaling = 1, 1.0
    sample = unet.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else int(sample)
    return Networks(unet, vae, text_encoder, tokenizer, cls, sched_config,
                    int(unet.config.in_channels), sample, scale, scaling, cross,
                    text_encoder_2, tokenizer_2, add_type == "text_time",
                    bool(index.get("force_zeros_for_empty_prompt", True)), vae_dtype)


def _check_sdxl_widths(unet: Any, enc1: Any, enc2: Any) -> None:
    """The UNet's cross-attention width is both encoders' hidden widths side by side, and its
    added embedding takes the pooled projection plus six time ids."""
    hidden = enc1.config.hidden_size + enc2.config.hidden_size
    if unet.config.cross_attention_dim != hidden:
        raise load_error(f"unet cross_attention_dim {unet.config.cross_attention_dim} is not "
                         f"text_encoder + text_encoder_2 hidden sizes ({hidden})")
    want = unet.config.addition_time_embed_dim * 6 + enc2.config.projection_dim
    got = unet.config.projection_class_embeddings_input_dim
    if got != want:
        raise load_error(f"unet projection_class_embeddings_input_dim {got} is not "
                         f"6 x addition_time_embed_dim + text_encoder_2 projection_dim ({want})")
