"""Training examples for the loop: images placed at one resolution or in aspect-ratio buckets, encoded once.

Each image is resized and cropped once (:mod:`studio.data.buckets`), its VAE posterior (mean, std) and caption
embedding cached per bucket, and every batch is drawn from a single bucket, so that latents of one batch share a
shape. Each example keeps SDXL's (original size, crop top-left, target size) from its real crop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from studio.data.buckets import Placement, Size, bucket_sizes, nearest_bucket, place
from studio.data.folder import TrainingImage, image_size, load_rgb, prepare_pixels
from studio.errors import ConfigError, ModelLoadError
from trainers.config import TrainConfig


@dataclass
class EncodedBucket:
    """Cached examples of one size: latent distributions, text conditioning and SDXL time ids."""

    size: Size
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    hidden: torch.Tensor
    pooled: torch.Tensor | None
    captions: list[str]
    weights: torch.Tensor  # sampling weight of each example (repeats)
    time_ids: torch.Tensor  # N×6: original (h, w), crop (top, left), target (h, w)

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class EncodedSet:
    """A cached training set: one :class:`EncodedBucket` per size."""

    buckets: list[EncodedBucket]

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)

    @property
    def captions(self) -> list[str]:
        return [c for b in self.buckets for c in b.captions]

    def bucket_weights(self) -> torch.Tensor:
        return torch.stack([b.weights.sum() for b in self.buckets])


@dataclass(frozen=True)
class Example:
    image: TrainingImage
    placement: Placement
    flip: bool
    weight: float


def pixel_multiple(base) -> int:
    """Image sides must be multiples of this: the VAE's factor times the UNet's downsampling."""
    unet_factor = 2 ** (len(base.pipe.unet.config.block_out_channels) - 1)
    return int(base.pipe.vae_scale_factor) * unet_factor


def resolution_of(config: TrainConfig, default: int) -> Size:
    """(width, height) of ``--resolution`` (one number: a square), else the base's native square."""
    value = config.resolution or default
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def bucket_settings(config: TrainConfig, resolution: Size, multiple: int) -> tuple[int, int, int]:
    """(min, max, steps) of the buckets; the defaults scale kohya's 256/1024/64 at 512 px to ``resolution``."""
    side = max(resolution)
    steps = config.bucket_reso_steps or max(multiple, side // 16)
    low = config.min_bucket_reso or max(steps, side // 2 // steps * steps)
    high = config.max_bucket_reso or side * 2
    return low, high, steps


def plan_examples(images: list[TrainingImage], config: TrainConfig, resolution: Size, multiple: int | None = None
                  ) -> list[Example]:
    """Where each image goes (bucket, resize, crop), read from image headers only: checked before a model loads.

    ``multiple`` (the base's pixel multiple) is checked against the sizes when known."""
    if config.enable_bucket:
        low, high, steps = bucket_settings(config, resolution, multiple or 1)
        if multiple and steps % multiple:
            raise ConfigError(f"--bucket_reso_steps {steps} must be a multiple of {multiple} on this base")
        buckets = bucket_sizes(resolution, low, high, steps)
    else:
        if multiple and (resolution[0] % multiple or resolution[1] % multiple):
            raise ConfigError(f"--resolution {resolution[0]},{resolution[1]}: each side must be a multiple of "
                              f"{multiple} on this base")
        buckets = [resolution]
    examples = []
    for item in images:
        size = image_size(item.path)
        target = nearest_bucket(size, buckets) if config.enable_bucket else resolution
        placement = place(size, target, config.center_crop)
        versions = [(placement, False), (placement.flipped(), True)] if config.random_flip else [(placement, False)]
        examples += [Example(item, p, flip, item.repeats / len(versions)) for p, flip in versions]
    return examples


@contextlib.contextmanager
def fp32_vae(vae) -> Iterator[None]:
    """Encode in float32 (a half-precision VAE gives NaN latents on real photos, as diffusers' scripts note);
    a VAE that says it need not upcast (an fp16-fix VAE, ``force_upcast`` false) stays as it is."""
    original = vae.dtype
    upcast = original != torch.float32 and vae.config.get("force_upcast", True)
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(original)


def load_vae(spec: str | Path, base):
    """A user's VAE to encode the training images with (kohya's ``--vae``), from a diffusers folder or a single
    ``.safetensors`` file on disk, in the base's dtype and on its device."""
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
        elif path.is_file():
            vae = AutoencoderKL.from_single_file(str(path), local_files_only=True)
        else:
            raise ModelLoadError(f"--vae {spec}: no such folder or file")
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"--vae {spec}: not a VAE diffusers can read ({error})") from error
    return vae.to(base.device, base.pipe.vae.dtype).eval()


@contextlib.contextmanager
def encoding_vae(base, spec: str | Path | None) -> Iterator[None]:
    """Encode with the user's VAE (an fp16-fix VAE, say) while inside; the base's own comes back after."""
    if not spec:
        yield
        return
    original = base.pipe.vae
    base.pipe.vae = load_vae(spec, base)
    try:
        yield
    finally:
        base.pipe.vae = original


@torch.no_grad()
def encode_bucket(base, size: Size, pixels: torch.Tensor, captions: list[str], weights: Sequence[float],
                  time_ids: torch.Tensor, encode_text) -> EncodedBucket:
    """Encode images of one size once (VAE posterior mean and std) and captions once (``encode_text``)."""
    vae = base.pipe.vae
    means, stds = [], []
    with fp32_vae(vae):
        for start in range(0, len(pixels), 16):
            dist = vae.encode(pixels[start : start + 16].to(base.device, vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
    unique = sorted(set(captions))
    hidden_unique, pooled_unique = encode_text(unique)
    lookup = {caption: i for i, caption in enumerate(unique)}
    rows = torch.tensor([lookup[c] for c in captions])
    return EncodedBucket(size, torch.cat(means), torch.cat(stds), hidden_unique.float().cpu()[rows],
                         pooled_unique.float().cpu()[rows] if pooled_unique is not None else None, list(captions),
                         torch.tensor(list(weights), dtype=torch.float), time_ids)


def encode_examples(base, examples: list[Example], encode_text) -> EncodedSet:
    """Load, place and encode every example, one bucket at a time (sizes in a fixed order)."""
    groups: dict[Size, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.placement.target, []).append(example)
    buckets = []
    for size in sorted(groups):
        members = groups[size]
        pixels = torch.stack([prepare_pixels(load_rgb(e.image.path), e.placement, e.flip) for e in members])
        time_ids = torch.tensor([e.placement.time_ids() for e in members], dtype=torch.float)
        buckets.append(encode_bucket(base, size, pixels, [e.image.caption for e in members],
                                     [e.weight for e in members], time_ids, encode_text))
    return EncodedSet(buckets)


def encode_pixels(base, pixels: torch.Tensor, captions: list[str], encode_text) -> EncodedSet:
    """One bucket of generated images (prior preservation's class images), uncropped."""
    height, width = pixels.shape[-2:]
    time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(pixels), dtype=torch.float)
    return EncodedSet([encode_bucket(base, (width, height), pixels, captions, [1.0] * len(pixels), time_ids,
                                     encode_text)])
