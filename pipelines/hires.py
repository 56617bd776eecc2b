"""A1111's hires fix on a composition pipeline: generate, upscale, then an img2img pass at the larger size.

The first pass stops at latents; the upscale is either in latent space (A1111's "Latent" family: the latents
interpolated) or in pixels (decode; PIL's Lanczos or nearest, or an upscaler model such as Real-ESRGAN: see
:mod:`pipelines.upscalers`; the img2img pass encodes again); the second pass is the same call (method,
Perp-Neg, DECOR; the adapters as the first pass attached them) with ``image=`` the upscaled result, its own
``num_inference_steps`` and ``strength``, and a generator restarted from the first pass's seed, as A1111
reseeds its second pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipelines import upscalers
from pipelines.init_image import check_strength
from studio.adapters.prompt_tags import split_prompt
from studio.errors import ConfigError


def hires_size(height: int, width: int, scale: float, multiple: int) -> tuple[int, int]:
    """The second pass's size: ``scale`` times the first, rounded down to the VAE's stride."""
    if not scale > 1.0:
        raise ConfigError(f"hires scale must be above 1, not {scale!r}")
    return tuple(int(side * scale) // multiple * multiple for side in (height, width))


@torch.no_grad()
def upscale(pipe, latents: torch.Tensor, size: tuple[int, int], upscaler: str | Path
            ) -> torch.Tensor | list[Image.Image]:
    """Upscaled latents (a "Latent" upscaler) or upscaled images (any other) for the img2img pass; ``upscaler``
    as :func:`pipelines.upscalers.resolve` returns it."""
    if upscaler in upscalers.LATENT_MODES:
        return upscalers.upscale_latents(latents, tuple(side // pipe.vae_scale_factor for side in size), upscaler)
    pixels = pipe.image_processor.postprocess(pipe.decode_latents_to_pixels(latents), output_type="pt")
    return upscalers.upscale_images(pixels, size, upscaler)


def hires_fix(pipe, call: Mapping[str, Any], scale: float, steps: int | None = None, strength: float = 0.7,
              upscaler: str = "Latent"):
    """Run ``pipe(**call)`` then its hires pass; returns the pipeline output of the second pass. ``steps``:
    the second pass's ``num_inference_steps`` (default: the first pass's); ``upscaler``: an A1111 name, an
    upscaler model file or its stem in the upscalers folder (checked, and a model loaded, before the first pass)."""
    check_strength(strength)
    upscaler = upscalers.resolve(upscaler)
    if isinstance(upscaler, Path):
        upscalers.load_model(upscaler)
    first = dict(call)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = first.get("height") or native, first.get("width") or native
    size = hires_size(height, width, scale, pipe.vae_scale_factor)
    generator = first.get("generator")
    state = generator.get_state() if isinstance(generator, torch.Generator) else None
    output = pipe(**{**first, "height": height, "width": width, "output_type": "latent"})
    second = {**first, "height": size[0], "width": size[1], "image": upscale(pipe, output.images, size, upscaler),
              "strength": strength, "num_inference_steps": steps or first.get("num_inference_steps", 50),
              "mask_image": None, "latents": None}
    attached = getattr(output, "adapters", None)
    if attached is not None:  # the first pass's adapters (its prompt tags' too) as attached: no file looked up again
        second.update(adapters=attached, prompt=untagged(first.get("prompt")))
    if state is not None:
        second["generator"] = torch.Generator(generator.device).set_state(state)
    return pipe(**second)


def untagged(prompt: str | list[str] | None) -> str | list[str] | None:
    """The prompt(s) without A1111's ``<lora:…>`` tags (their adapters are in the first pass's set)."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return split_prompt(prompt)[0]
    return [split_prompt(text)[0] for text in prompt]
