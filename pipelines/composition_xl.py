"""Multi-LoRA composition for SDXL: the shared composition engine on diffusers' ``StableDiffusionXLPipeline``.

SDXL conditions the UNet on both text encoders' hidden states (concatenated) plus the pooled embedding of the
second and the (original size, crop, target size) time ids; each evaluation of the engine carries them along.
DECOR projects each encoder's half of the hidden states with its own basis (METHODS §5.1, step 6).
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

from pipelines.engine import CompositionEngine


class CompositionXLPipeline(CompositionEngine, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline plus ``adapters`` and ``method``."""

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, _, pooled, _ = self.encode_prompt(texts, device=self.text_encoder_2.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        if self.config.get("force_zeros_for_empty_prompt", False):
            empty = torch.tensor([not t for t in texts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return hidden, pooled

    def added_conditions(self, pooled: torch.Tensor | None, latents: torch.Tensor,
                         time_ids: torch.Tensor | None = None) -> dict:
        """SDXL's added conditions; ``time_ids`` (N×6: original h, w, crop top, left, target h, w) default to an
        uncropped image of the latents' size (height and width each from their own axis)."""
        if time_ids is None:
            height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
            time_ids = torch.tensor([height, width, 0, 0, height, width]).repeat(len(pooled), 1)
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}

    def decode_latents_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.upcast_vae()
        return super().decode_latents_to_pixels(latents)

    def make_output(self, images) -> StableDiffusionXLPipelineOutput:
        return StableDiffusionXLPipelineOutput(images=images)
