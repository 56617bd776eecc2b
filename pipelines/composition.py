"""Multi-LoRA composition as a diffusers pipeline for SD 1.x/2.x (and the embedded model).

``CompositionPipeline`` subclasses diffusers' ``StableDiffusionPipeline`` and keeps its ``__call__`` contract
(every argument, callbacks, LoRA loaders; without ``adapters=`` its images are stock's), adding
``adapters=[(name_or_path, weight), …]``, ``method="merge"|"switch"|"composite"|"cmlora"|"clora"`` with
``method_options``, Perp-Neg (``perp_neg``) and DECOR (``decor_remove``, ``decor_alpha``); the loop is the shared
:class:`pipelines.engine.CompositionEngine`. Works as
``DiffusionPipeline.from_pretrained(base, custom_pipeline="pipelines/composition.py", trust_remote_code=True)``.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from pipelines.engine import CompositionEngine


class CompositionPipeline(CompositionEngine, StableDiffusionPipeline):
    """StableDiffusionPipeline plus ``adapters`` and ``method``; everything else keeps diffusers' meaning."""

    def encode_texts(self, texts: list[str], texts_2: list[str] | None = None, *, lora_scale: float | None = None,
                     clip_skip: int | None = None, zero_empty: bool = True) -> tuple[torch.Tensor, None]:
        """diffusers' ``encode_prompt`` without guidance (``texts_2`` and ``zero_empty`` are SDXL's)."""
        hidden, _ = self.encode_prompt(texts, self._execution_device, 1, False, lora_scale=lora_scale,
                                       clip_skip=clip_skip)
        return hidden, None

    def make_output(self, images, nsfw: list[bool] | None = None, return_dict: bool = True):
        if not return_dict:
            return images, nsfw
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)
