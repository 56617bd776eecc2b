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

from pipelines.engine import CompositionEngine
from pipelines.output import CompositionPipelineOutput
from studio.prompt_weighting import encode_chunks


class CompositionPipeline(CompositionEngine, StableDiffusionPipeline):
    """StableDiffusionPipeline plus ``adapters`` and ``method``; everything else keeps diffusers' meaning."""

    def encode_texts(self, texts: list[str], texts_2: list[str] | None = None, *, lora_scale: float | None = None,
                     clip_skip: int | None = None, zero_empty: bool = True, literal: bool = False
                     ) -> tuple[torch.Tensor, None]:
        """diffusers' ``encode_prompt`` without guidance, for A1111's long and weighted prompts
        (:mod:`studio.prompt_weighting`: the same embeddings for a plain prompt of up to 75 tokens);
        ``literal``: the text as written, cut at 77 tokens (training captions). ``texts_2`` and ``zero_empty``
        are SDXL's."""
        hidden, _ = encode_chunks(self.tokenizer, self.text_encoder, texts, clip_skip, literal=literal,
                                  lora_scale=lora_scale)
        return hidden, None  # in the text encoder's dtype, as diffusers returns it

    def make_output(self, images, nsfw: list[bool] | None = None, return_dict: bool = True, **composition):
        if not return_dict:
            return images, nsfw
        return CompositionPipelineOutput(images=images, nsfw_content_detected=nsfw, **composition)
