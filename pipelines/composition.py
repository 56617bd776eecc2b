"""Multi-LoRA composition as a diffusers pipeline for SD 1.x/2.x (and the embedded model).

``CompositionPipeline`` subclasses diffusers' ``StableDiffusionPipeline`` and keeps its ``__call__`` arguments,
adding ``adapters=[(name_or_path, weight), …]``, ``method="merge"|"switch"|"composite"|"cmlora"|"clora"`` with
``method_options``, Perp-Neg (``perp_neg``) and DECOR (``decor_remove``, ``decor_alpha``); the loop is the shared
:class:`pipelines.engine.CompositionEngine`. Works as
``DiffusionPipeline.from_pretrained(base, custom_pipeline="pipelines/composition.py", trust_remote_code=True)``.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from pipelines.engine import CompositionEngine, call_clip_skip
from studio.prompt_weighting import encode_chunks


class CompositionPipeline(CompositionEngine, StableDiffusionPipeline):
    """StableDiffusionPipeline plus ``adapters`` and ``method``; everything else keeps diffusers' meaning."""

    def encode_texts(self, texts: list[str], *, clip_skip: int | None = None, literal: bool = False
                     ) -> tuple[torch.Tensor, None]:
        """A1111's long, weighted prompts (:mod:`studio.prompt_weighting`); ``clip_skip`` as diffusers means it
        (default: the current call's). ``literal``: no prompt syntax, one chunk (training captions)."""
        skip = call_clip_skip(self, clip_skip, literal)
        hidden, _ = encode_chunks(self.tokenizer, self.text_encoder, texts, skip, literal=literal)
        return hidden.to(self.unet.dtype), None

    def make_output(self, images) -> StableDiffusionPipelineOutput:
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
