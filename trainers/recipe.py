"""What a training form starts from on a base (default prompts, a measured time per step) and the config it makes.

The embedded model's domain prompts are defaults only on the embedded model; on SD 1.x/2.x/SDXL the defaults are
ordinary photo and style prompts, and the user's instance, class and validation prompts always win.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.data.buckets import Size
from studio.text import split_words
from trainers.config import TrainConfig


@dataclass(frozen=True)
class Prompts:
    instance: str
    validation: list[str]
    class_prompt: str


def default_prompts(family: str, trigger: str, kind: str) -> Prompts:
    """Prompts for a ``kind`` adapter with ``trigger`` on a base of ``family``."""
    trigger = trigger.strip() or "sks"
    if family == "tiny":
        if kind == "style":
            return Prompts(f"a shape in {trigger} style", [f"a red {trigger} circle on a white background"], "")
        return Prompts(f"a {trigger} shape", [f"a red solid {trigger} on a white background"], "")
    if kind == "style":
        return Prompts(f"an image in {trigger} style", [f"a lighthouse in {trigger} style",
                                                        f"a portrait of a woman in {trigger} style"], "")
    return Prompts(f"a photo of {trigger}", [f"a photo of {trigger} on a beach", f"a photo of {trigger} in a forest"],
                   "a photo")


def measure_step_seconds(base, resolution: Size, batch_size: int, repeats: int = 2) -> float:
    """Seconds of one training step's main cost, measured: a UNet forward and a backward to its input at
    ``resolution`` and ``batch_size`` (after one warm-up), before any adapter exists."""
    unet, pipe = base.pipe.unet, base.pipe
    dtype = next(unet.parameters()).dtype
    factor = int(pipe.vae_scale_factor)
    shape = (batch_size, unet.config.in_channels, resolution[1] // factor, resolution[0] // factor)
    with torch.no_grad():
        hidden, pooled = pipe.encode_texts([""] * batch_size)
    timesteps = torch.full((batch_size,), 500, device=base.device)
    seconds = []
    for _ in range(repeats):
        latents = torch.randn(shape, device=base.device, dtype=dtype, requires_grad=True)
        kwargs = {}
        if pooled is not None:
            kwargs["added_cond_kwargs"] = pipe.added_conditions(pooled.to(dtype), latents)
        start = time.perf_counter()
        loss = unet(latents, timesteps, hidden.to(dtype), **kwargs).sample.float().square().mean()
        torch.autograd.grad(loss, latents)  # the backward through every layer, no gradient left on the base
        if base.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return min(seconds[1:] or seconds)


@dataclass
class TrainForm:
    """The Train tab's prompt and size fields; empty ones take the base's defaults."""

    instance_prompt: str = ""
    class_prompt: str = ""
    prior_preservation: bool = False
    resolution: str = ""
    enable_bucket: bool = False
    validation_prompts: str = ""


def training_config(base, form: TrainForm, folder: Path, kind: str, trigger: str, steps: int, rank: int,
                    learning_rate: float, decor_words: str, name: str) -> TrainConfig:
    """The TrainConfig of a Train-tab run: the user's prompts, else this base's defaults."""
    defaults = default_prompts(base.family, trigger, kind)
    validation = form.validation_prompts.strip() or "\n".join(defaults.validation)
    return TrainConfig(images=folder, instance_prompt=form.instance_prompt.strip() or defaults.instance,
                       trigger_words=[trigger.strip()], kind=kind, output=name, max_train_steps=steps, rank=rank,
                       learning_rate=learning_rate, decor_remove=split_words(decor_words),
                       validation_prompt=validation, validation_steps=max(1, steps // 4), num_validation_images=1,
                       class_prompt=form.class_prompt.strip() or None,
                       with_prior_preservation=form.prior_preservation,
                       resolution=form.resolution.strip() or None, enable_bucket=form.enable_bucket)
