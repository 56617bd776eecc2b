"""img2img and inpainting for the composition engine, as diffusers' img2img and inpaint pipelines do them.

``image=`` is encoded by the VAE (diffusers' ``VaeImageProcessor``; a 4-channel latent tensor is taken as it is,
which is how hires fix hands over its upscaled latents); ``strength`` picks the first step with diffusers'
``get_timesteps`` rule (``int(steps · strength)`` steps are run) and the image latents are noised to that step
with the scheduler's ``add_noise``. Strength 1 starts from pure noise exactly as text-to-image does (same
generator draw), strength 0 runs no step and returns the image through the VAE.

``mask_image=`` (white = repaint): with a plain 4-channel UNet every step ends by putting the image latents,
noised to the next step, back outside the mask (diffusers' ``StableDiffusionInpaintPipeline`` for such UNets);
a 9-channel inpainting UNet instead sees [latents, mask, masked-image latents] and is not blended. The decoded
image then takes the original pixels outside the mask, as A1111 overlays them: the VAE decoder's mid-block
attention would otherwise let the repainted region shift every pixel. ``mask_blur`` is A1111's "Mask blur": the
binarised mask is Gaussian-blurred with σ = ``mask_blur`` pixels (torchvision's ``gaussian_blur`` with
OpenCV's kernel size, 2·⌊2.5σ + 0.5⌋ + 1, as A1111 calls it); the latent mask is that blurred mask rounded,
and the overlay takes min(1, 2 × blurred) of the new image, so the seam fades out over the blur's width.

Composition methods see the steps that are run as their whole schedule (step 0 = the first step run), so
CMLoRA writes its caches and CLoRA updates its latents and masks from the first step run; they are also told the
whole schedule's length, on which CMLoRA bounds the age of a cached feature (the same noise-level distance as in
text to image).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torchvision.transforms.functional import gaussian_blur

from studio.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class InitImage:
    """What the loop needs of an init image: its clean latents, the noise, and (inpainting) the latent mask."""

    latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor | None = None  # [batch, 1, h, w], 1 = repaint
    masked_latents: torch.Tensor | None = None  # 9-channel UNets only
    pixels: torch.Tensor | None = None  # inpainting: the image in [-1, 1] and its pixel mask, for the overlay
    pixel_mask: torch.Tensor | None = None


def check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, Real) or not 0.0 <= float(strength) <= 1.0:
        raise ConfigError(f"strength is the fraction of the steps that repaint the image, between 0 and 1, "
                          f"not {strength!r}")
    return float(strength)


def is_inpainting_unet(pipe) -> bool:
    return pipe.unet.config.in_channels == 4 + 1 + pipe.vae.config.latent_channels


def image_size(image: Any) -> tuple[int, int] | None:
    """(height, width) of a PIL image or pixel tensor (None for latents)."""
    if isinstance(image, list):
        image = image[0]
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor) and image.shape[-3] == 3:
        return int(image.shape[-2]), int(image.shape[-1])
    return None


def check_inputs(pipe, image: Any, mask_image: Any) -> None:
    if mask_image is not None and image is None:
        raise ConfigError("mask_image needs the image it masks: pass image= too")
    if is_inpainting_unet(pipe) and (image is None or mask_image is None):
        raise ConfigError("this model has a 9-channel inpainting UNet: it only inpaints; pass image= and "
                          "mask_image= (or load a regular model for text-to-image and img2img)")


def default_size(image: Any, height: int | None, width: int | None, multiple: int) -> tuple[int | None, int | None]:
    """The init image's size (rounded down to ``multiple``) where the caller gives none; a different size given
    means the image is resized to it."""
    size = image_size(image)
    if size is None:
        return height, width
    rows, columns = (s - s % multiple for s in size)
    if (height or rows, width or columns) != size:
        logger.warning("init image is %dx%d; resized to %dx%d", size[1], size[0], width or columns, height or rows)
    return height or rows, width or columns


def _encode(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents as the pipelines decode them: fp16 VAEs that ask for it run in fp32 (SDXL), and latents are
    normalised by the VAE's mean and std where its config has them."""
    vae, config = pipe.vae, pipe.vae.config
    upcast = vae.dtype == torch.float16 and config.get("force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        latents = vae.encode(pixels.to(vae.device, dtype)).latent_dist.mode()
    finally:
        if upcast:
            vae.to(torch.float16)
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        return (latents - mean) * config.scaling_factor / std
    return latents * config.scaling_factor


def blurred(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """A1111's mask blur of a [batch, 1, h, w] mask in [0, 1]: Gaussian, σ = ``sigma`` pixels (0: unchanged)."""
    if isinstance(sigma, bool) or not isinstance(sigma, Real) or sigma < 0:
        raise ConfigError(f"mask blur is a Gaussian's σ in pixels, 0 or more, not {sigma!r}")
    if sigma == 0:
        return mask
    size = min(2 * int(2.5 * sigma + 0.5) + 1, 2 * (min(mask.shape[-2:]) // 2) - 1)  # reflect padding's limit
    return gaussian_blur(mask, [size, size], [float(sigma), float(sigma)])


def _batched(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if len(tensor) == batch:
        return tensor
    if len(tensor) == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ConfigError(f"{len(tensor)} {what}s for a batch of {batch} images: pass one, or one per image")


def image_latents(pipe, image: Any, height: int, width: int) -> torch.Tensor:
    """Clean latents of ``image`` (PIL, pixel tensor in [-1, 1] or 4-channel latents) at ``height``×``width``.
    Encoded with the latent distribution's mode, so nothing draws from the generator before the noise."""
    channels = pipe.vae.config.latent_channels
    if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == channels:
        size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        return image if tuple(image.shape[-2:]) == size else F.interpolate(image, size=size, mode="bilinear")
    pixels = pipe.image_processor.preprocess(image, height=height, width=width)
    return _encode(pipe, pixels)


def prepare(pipe, image: Any, mask_image: Any, strength: float, schedule: torch.Tensor, batch: int, height: int,
            width: int, dtype: torch.dtype, device: torch.device, generator, latents: torch.Tensor | None,
            mask_blur: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, InitImage | None]:
    """Starting latents, the part of ``schedule`` (the scheduler's timesteps, set) to run, and the init image."""
    if image is None:
        latents = pipe.prepare_latents(batch, pipe.unet.config.in_channels, height, width, dtype, device, generator,
                                       latents)
        return latents, schedule, None
    channels = pipe.vae.config.latent_channels
    shape = (batch, channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    strength = check_strength(strength)
    num_steps = getattr(pipe.scheduler, "num_inference_steps", None) or len(schedule)
    run = min(int(num_steps * strength), num_steps)
    start = (num_steps - run) * pipe.scheduler.order
    timesteps = schedule[start:]
    if hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(start)
    clean = _batched(image_latents(pipe, image, height, width).to(device, dtype), batch, "init image")
    noise = latents.to(device, dtype) if latents is not None else randn_tensor(shape, generator=generator,
                                                                               device=device, dtype=dtype)
    init = InitImage(clean, noise)
    if mask_image is not None:
        processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_normalize=False,
                                      do_binarize=True, do_convert_grayscale=True)
        soft = blurred(processor.preprocess(mask_image, height=height, width=width).to(device, torch.float32),
                       mask_blur)
        mask = (soft >= 0.5).to(dtype)
        if image_size(image) is not None:
            init.pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(device, dtype)
            init.pixel_mask = (2 * soft).clamp(max=1).to(dtype)
        if is_inpainting_unet(pipe):
            if init.pixels is None:
                raise ConfigError("an inpainting UNet needs the image as pixels (PIL or tensor), not latents")
            init.masked_latents = _batched(_encode(pipe, init.pixels * (mask < 0.5)).to(device, dtype), batch,
                                           "image")
        init.mask = _batched(F.interpolate(mask, size=shape[-2:]), batch, "mask")
    if run == num_steps:
        start_latents = noise * pipe.scheduler.init_noise_sigma
    elif len(timesteps):
        start_latents = pipe.scheduler.add_noise(clean, noise, timesteps[:1].repeat(batch))
    else:
        start_latents = clean
    return start_latents, timesteps, init


def model_input(pipe, latents: torch.Tensor, timestep, init: InitImage | None) -> torch.Tensor:
    """The scheduler-scaled latents; a 9-channel inpainting UNet also gets the mask and masked-image latents."""
    scaled = pipe.scheduler.scale_model_input(latents, timestep)
    if init is None or init.masked_latents is None:
        return scaled
    return torch.cat([scaled, init.mask[: len(scaled)], init.masked_latents[: len(scaled)]], dim=1)


def blend(pipe, latents: torch.Tensor, init: InitImage | None, timesteps: torch.Tensor, step: int) -> torch.Tensor:
    """After step ``step``: outside the mask, the image latents noised to the next step (clean after the last)."""
    if init is None or init.mask is None or init.masked_latents is not None:
        return latents
    known = init.latents
    if step + 1 < len(timesteps):
        known = pipe.scheduler.add_noise(known, init.noise, timesteps[step + 1 : step + 2].repeat(len(known)))
    return (1 - init.mask) * known + init.mask * latents


def overlay(pixels: torch.Tensor, init: InitImage | None) -> torch.Tensor:
    """Decoded pixels with the original image outside the mask (A1111's inpainting overlay)."""
    if init is None or init.pixel_mask is None or init.pixels is None:
        return pixels
    mask = init.pixel_mask.to(pixels.device, pixels.dtype)
    return mask * pixels + (1 - mask) * init.pixels.to(pixels.device, pixels.dtype)
