"""Prompt conditioning: text -> what the UNet takes beside the latents.

SD 1.x / 2.x: the text encoder's last hidden state, `encoder_hidden_states` [1, S, D].

SDXL (a UNet with addition_embed_type "text_time"): both encoders' penultimate hidden states
side by side, [1, S, D1 + D2], plus `added_cond_kwargs`: `text_embeds`, the pooled projection of
encoder 2 [1, P], and `time_ids` [1, 6] = original size (h, w), crop top-left (0, 0), target
size (h, w), the size the image is rendered at. The unconditional half is the negative prompt
(or "") encoded the same way, or zeros when no negative prompt was given and the pipeline's
`force_zeros_for_empty_prompt` says so (StableDiffusionXLPipeline's default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engines.diffusion.pipeline import Networks

__all__ = ["Conditioning", "encode", "time_ids"]


@dataclass(slots=True)
class Conditioning:
    cond: Any                  # [1, S, D]
    uncond: Any                # [1, S, D]
    pooled: Any = None         # [1, P] SDXL text_embeds
    uncond_pooled: Any = None


def encode(nets: Networks, prompt: str, negative: str | None, device: str,
           dtype: Any) -> Conditioning:
    """The conditional and unconditional embeddings of one request."""
    if not nets.text_time:
        ids = _ids(nets.tokenizer, [prompt, negative or ""], device)
        hidden = nets.text_encoder(ids)[0].to(dtype)          # [2, S, D]
        return Conditioning(hidden[0:1], hidden[1:2])
    cond, pooled = _sdxl(nets, prompt, device)
    if negative is None and nets.force_zeros:
        uncond, uncond_pooled = cond.new_zeros(cond.shape), pooled.new_zeros(pooled.shape)
    else:
        uncond, uncond_pooled = _sdxl(nets, negative or "", device)
    return Conditioning(cond.to(dtype), uncond.to(dtype), pooled.to(dtype),
                        uncond_pooled.to(dtype))


def _ids(tokenizer: Any, texts: list[str], device: str) -> Any:
    return tokenizer(texts, padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids.to(device)


def _sdxl(nets: Networks, text: str, device: str) -> tuple[Any, Any]:
    import torch
    hidden = []
    pooled = None
    for tokenizer, encoder in ((nets.tokenizer, nets.text_encoder),
                               (nets.tokenizer_2, nets.text_encoder_2)):
        out = encoder(_ids(tokenizer, [text], device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])                  # [1, S, Di] penultimate layer
        pooled = out[0]           # encoder 2's text_embeds [1, P] (the last one read wins)
    return torch.cat(hidden, dim=-1), pooled


def time_ids(height: int, width: int) -> list[int]:
    """SDXL's micro-conditioning: original size, crop top-left, target size (rows, columns)."""
    return [height, width, 0, 0, height, width]
