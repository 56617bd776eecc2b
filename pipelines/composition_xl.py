"""Multi-LoRA composition for SDXL: the shared composition engine on diffusers' ``StableDiffusionXLPipeline``.

SDXL conditions the UNet on both text encoders' hidden states (concatenated) plus the pooled embedding of the
second and the (original size, crop, target size) time ids; each evaluation of the engine carries them along.
DECOR projects each encoder's half of the hidden states with its own basis (METHODS §5.1, step 6).
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

from pipelines.engine import CompositionEngine, call_clip_skip
from studio.prompt_weighting import chunk_count, encode_chunks


class CompositionXLPipeline(CompositionEngine, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline plus ``adapters`` and ``method``."""

    def encode_texts(self, texts: list[str], *, clip_skip: int | None = None, literal: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both encoders' hidden states side by side and the second's pooled output, with A1111's long, weighted
        prompts (:mod:`studio.prompt_weighting`; pooled from the first chunk) and diffusers' ``clip_skip``.
        ``literal``: no prompt syntax, one chunk (training captions)."""
        skip = call_clip_skip(self, clip_skip, literal)
        count = 1 if literal else max(chunk_count(self.tokenizer, texts), chunk_count(self.tokenizer_2, texts))
        first, _ = encode_chunks(self.tokenizer, self.text_encoder, texts, skip, True, count, literal)
        second, pooled = encode_chunks(self.tokenizer_2, self.text_encoder_2, texts, skip, True, count, literal)
        hidden = torch.cat([first, second], dim=-1).to(self.unet.dtype)
        pooled = pooled.to(self.unet.dtype)
        if self.config.get("force_zeros_for_empty_prompt", False):
            empty = torch.tensor([not t for t in texts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return hidden, pooled

    def added_conditions(self, pooled: torch.Tensor | None, latents: torch.Tensor) -> dict:
        size = latents.shape[-1] * self.vae_scale_factor
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids.repeat(len(pooled), 1)}

    def decode_latents_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.upcast_vae()
        return super().decode_latents_to_pixels(latents)

    def make_output(self, images) -> StableDiffusionXLPipelineOutput:
        return StableDiffusionXLPipelineOutput(images=images)
