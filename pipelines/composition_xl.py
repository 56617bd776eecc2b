"""Multi-LoRA composition for SDXL: the shared composition engine on diffusers' ``StableDiffusionXLPipeline``.

SDXL conditions the UNet on both text encoders' hidden states (concatenated) plus the pooled embedding of the
second and the (original size, crop, target size) time ids; each evaluation of the engine carries them along.
DECOR projects each encoder's half of the hidden states with its own basis (METHODS §5.1, step 6).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from pipelines.engine import CompositionEngine
from pipelines.output import CompositionXLPipelineOutput
from studio.prompt_weighting import chunk_count, encode_chunks


class CompositionXLPipeline(CompositionEngine, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline plus ``adapters`` and ``method``."""

    default_guidance_scale = 5.0
    begin_index_zero = True

    @property
    def zero_unconditional(self) -> bool:
        return bool(self.config.get("force_zeros_for_empty_prompt", False))

    def encode_texts(self, texts: list[str], texts_2: list[str] | None = None, *, lora_scale: float | None = None,
                     clip_skip: int | None = None, zero_empty: bool = True, literal: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' ``encode_prompt`` without guidance, for A1111's long and weighted prompts
        (:mod:`studio.prompt_weighting`; both encoders in as many 77-token chunks, pooled from the first chunk);
        with ``zero_empty`` (how training conditions caption dropout) empty texts give zeros where the pipeline's
        ``force_zeros_for_empty_prompt`` says so; ``literal``: the text as written, cut at 77 tokens."""
        second_texts = texts if texts_2 is None else texts_2
        count = 1 if literal else max(chunk_count(self.tokenizer, texts), chunk_count(self.tokenizer_2, second_texts))
        first, _ = encode_chunks(self.tokenizer, self.text_encoder, texts, clip_skip, True, count, literal, lora_scale)
        second, pooled = encode_chunks(self.tokenizer_2, self.text_encoder_2, second_texts, clip_skip, True, count,
                                       literal, lora_scale)
        hidden = torch.cat([first.to(second.dtype), second], dim=-1)
        if zero_empty and self.zero_unconditional:
            empty = torch.tensor([not t for t in texts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return hidden, pooled

    def added_conditions(self, pooled: torch.Tensor | None, latents: torch.Tensor,
                         time_ids: torch.Tensor | None = None) -> dict:
        """Training's added conditions: pooled text and ``time_ids`` (N×6: original h, w, crop top, left, target
        h, w; by default an uncropped image of the latents' size, height and width each from its own axis)."""
        if time_ids is None:
            height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
            time_ids = torch.tensor([height, width, 0, 0, height, width]).repeat(len(pooled), 1)
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}

    def size_conditions(self, height: int, width: int, sizes: Mapping[str, Any], dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' ``_get_add_time_ids`` for the prompt and (when both negative sizes are given, as diffusers
        asks) the negative prompt."""
        projection = (self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None
                      else self.unet.add_embedding.linear_1.in_features - 6 * self.unet.config.addition_time_embed_dim)
        positive = self._get_add_time_ids(sizes["original_size"] or (height, width), sizes["crops_coords_top_left"],
                                          sizes["target_size"] or (height, width), dtype=dtype,
                                          text_encoder_projection_dim=projection)
        negative = positive
        if sizes["negative_original_size"] is not None and sizes["negative_target_size"] is not None:
            negative = self._get_add_time_ids(sizes["negative_original_size"],
                                              sizes["negative_crops_coords_top_left"], sizes["negative_target_size"],
                                              dtype=dtype, text_encoder_projection_dim=projection)
        return positive, negative

    def decode_latents_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """diffusers' SDXL decode: fp16 VAEs upcast, latents de-normalised by the VAE's mean and std if it has
        them."""
        upcast = self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False)
        if upcast:
            self.upcast_vae()
        latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        mean, std = self.vae.config.get("latents_mean"), self.vae.config.get("latents_std")
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        pixels = self.vae.decode(latents, return_dict=False)[0]
        if upcast:
            self.vae.to(dtype=torch.float16)
        return pixels

    def postprocess_pixels(self, pixels: torch.Tensor, output_type: str, device, dtype) -> tuple[Any, None]:
        """diffusers' SDXL watermark (when installed) and post-processing; SDXL has no safety checker."""
        if self.watermark is not None:
            pixels = self.watermark.apply_watermark(pixels)
        return self.image_processor.postprocess(pixels, output_type=output_type), None

    def make_output(self, images, nsfw: None = None, return_dict: bool = True, **composition):
        if not return_dict:
            return (images,)
        return CompositionXLPipelineOutput(images=images, **composition)
