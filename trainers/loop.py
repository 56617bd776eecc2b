"""The one training loop every method plugs into.

The loop owns data (validated images, cached latents and text embeddings, prior-preservation class images),
noise and timestep sampling with the scheduler's prediction type, min-SNR weighting, the optimizer and LR
schedule, gradient accumulation, mixed precision through accelerate, checkpoints and resume, validation
previews and progress. A :class:`TrainingMethod` supplies only what it trains, extra loss terms, schedule
hooks and its export. Every step draws its randomness from a generator seeded by (seed, step), so a run resumed
from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from pipelines.decor import decor_blocks, kept_words, project_blocks
from pipelines.loading import load_base
from studio.adapters.inject import set_adapter_weights
from studio.data.buckets import Size
from studio.data.captions import augment_caption, check_keep_tokens
from studio.data.folder import TrainingImage, scan_folder
from studio.errors import ConfigError
from studio.eval.prompt_following import grid_cases, pair_cases
from studio.files import atomic_torch_save
from studio.models import choose_device, sampler_label, seeded_generator
from studio.png import a1111_parameters, save_png, with_lora_tags
from studio.text import clean_prompt
from trainers import tracking
from trainers.config import TrainConfig
from trainers.dataset import (
    EncodedSet,
    Example,
    encode_examples,
    encode_pixels,
    encoding_vae,
    pixel_multiple,
    plan_examples,
    resolution_of,
)
from trainers.distributed import (
    Trainee,
    find_checkpoint,
    load_checkpoint,
    local_slice,
    make_accelerator,
    save_checkpoint,
    split_count,
    trainable_ids,
    wrap,
)
from trainers.optimizers import base_dtype, check_optimizer, make_optimizer

logger = logging.getLogger(__name__)

#: progress(event, step, total, logs): events are "start", "step", "validation", "checkpoint", "done".
ProgressCallback = Callable[[str, int, int, dict[str, Any]], None]


@dataclass
class Batch:
    latents: torch.Tensor
    hidden: torch.Tensor
    pooled: torch.Tensor | None
    captions: list[str]
    time_ids: torch.Tensor | None = None  # SDXL: original size, crop top-left, target size of each example


@dataclass
class TrainingContext:
    """What a method sees: the base, the config, the cached data and the loss helpers."""

    base: Any
    config: TrainConfig
    noise_scheduler: Any
    instance: EncodedSet
    prior: EncodedSet | None
    work_dir: Path
    accelerator: Any
    images: list[TrainingImage]
    logs: dict[str, float] = field(default_factory=dict)
    optimizer: Any = None  # set by the loop once the method's parameters exist
    steps_run: int | None = None  # set by the loop before export: the optimizer steps actually taken
    decor: tuple[list, float] | None = None  # DECOR bases (per text encoder) and α applied to caption embeddings

    @property
    def device(self) -> torch.device:
        return self.base.device

    def generator(self, step: int, stream: int = 0) -> torch.Generator:
        """Per-step randomness: depends only on (seed, step, stream), the same in every process; each process
        trains its slice of the global batch drawn from it (:mod:`trainers.distributed`)."""
        return torch.Generator("cpu").manual_seed(self.config.seed * 7_919 + step * 104_729 + stream * 15_485_863)

    def sample(self, data: EncodedSet, batch_size: int, generator: torch.Generator, like: Batch | None = None,
               split: bool = True) -> Batch:
        """A global batch of ``batch_size`` from one bucket (drawn by the buckets' total weight, or the bucket of
        ``like``'s size when ``data`` has one, so that both can share noise), with the step's caption
        augmentations; this process's slice of it unless ``split`` is false."""
        same = [b for b in data.buckets if like is not None and b.latent_mean.shape[-2:] == like.latents.shape[-2:]]
        bucket = same[0] if same else data.buckets[0]
        if len(data.buckets) > 1 and not same:
            bucket = data.buckets[int(torch.multinomial(data.bucket_weights(), 1, generator=generator))]
        index = torch.multinomial(bucket.weights, batch_size, replacement=True, generator=generator)
        noise = torch.randn(bucket.latent_mean[index].shape, generator=generator)
        latents = (bucket.latent_mean[index] + bucket.latent_std[index] * noise) * _scaling(self.base)
        captions = [bucket.captions[i] for i in index]
        config = self.config
        augment = config.shuffle_caption or config.caption_dropout_rate
        if augment:
            captions = [augment_caption(c, generator, config.shuffle_caption, config.keep_tokens,
                                        config.caption_dropout_rate) for c in captions]
        part = (lambda t: local_slice(t, self.accelerator)) if split else (lambda t: t)
        rows = part(torch.arange(batch_size)).tolist()
        index, captions = part(index), [captions[i] for i in rows]
        latents, time_ids = part(latents).to(self.device), bucket.time_ids[index].to(self.device)
        if config.train_text_encoder:  # the cached embeddings would hide the text encoder from the loss
            hidden, pooled = encode_captions(self.base, captions, self.decor)
            return Batch(latents, hidden, pooled, captions, time_ids)
        if augment:  # captions change every step: encode them now
            with torch.no_grad():
                hidden, pooled = encode_captions(self.base, captions, self.decor)
            return Batch(latents, hidden.float(), pooled.float() if pooled is not None else None, captions,
                         time_ids)
        pooled = bucket.pooled[index].to(self.device) if bucket.pooled is not None else None
        return Batch(latents, bucket.hidden[index].to(self.device), pooled, captions, time_ids)

    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning with gradients (for methods that train the text encoder)."""
        return encode_captions(self.base, captions, self.decor)

    def draw_noise(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps for ``latents`` (methods that share them across several losses call this once),
        drawn for the global batch and sliced like it."""
        processes = self.accelerator.num_processes if self.accelerator is not None else 1
        shape = (len(latents) * processes, *latents.shape[1:])
        noise = torch.randn(shape, generator=generator)
        if self.config.noise_offset:  # offset noise (Guttenberg 2023), as diffusers' --noise_offset
            noise = noise + self.config.noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (shape[0],),
                                  generator=generator)
        return (local_slice(noise, self.accelerator).to(latents.device, latents.dtype),
                local_slice(timesteps, self.accelerator).to(latents.device))

    def denoising_loss(self, batch: Batch, generator: torch.Generator, noise: torch.Tensor | None = None,
                       timesteps: torch.Tensor | None = None, unet: Any = None) -> torch.Tensor:
        """The diffusion loss of ``batch`` (noise and timesteps drawn from ``generator`` unless given; noise of
        another bucket's shape is drawn anew for this one, keeping the given timesteps)."""
        unet = unet or self.base.pipe.unet
        latents = batch.latents
        if noise is None or timesteps is None:
            noise, timesteps = self.draw_noise(latents, generator)
        elif noise.shape != latents.shape:
            noise = self.draw_noise(latents, generator)[0]
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ConfigError(f"training with prediction type {prediction_type!r} is not supported")
        dtype = next(unet.parameters()).dtype
        kwargs = {}
        if batch.pooled is not None:
            kwargs["added_cond_kwargs"] = self.base.pipe.added_conditions(batch.pooled, latents, batch.time_ids)
        prediction = unet(noisy.to(dtype), timesteps, batch.hidden.to(dtype), **kwargs).sample.float()
        per_sample = F.mse_loss(prediction, target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.config.snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(self.noise_scheduler, timesteps, self.config.snr_gamma)
        return per_sample.mean()


class TrainingMethod(ABC):
    """Base of every method: plain diffusion loss on the instance set (plus prior preservation)."""

    name = "base"

    @abstractmethod
    def setup(self, ctx: TrainingContext) -> list[dict[str, Any]]:
        """Make the method's parameters trainable; return optimizer parameter groups."""

    def training_loss(self, ctx: TrainingContext, step: int) -> torch.Tensor:
        """Loss of one micro-batch; methods with their own data flow (B4M) override this."""
        generator = ctx.generator(step)
        loss = ctx.denoising_loss(ctx.sample(ctx.instance, ctx.config.train_batch_size, generator), generator)
        ctx.logs["loss"] = float(loss.detach())
        if ctx.prior is not None:
            prior = ctx.denoising_loss(ctx.sample(ctx.prior, ctx.config.train_batch_size, generator), generator)
            ctx.logs["prior_loss"] = float(prior.detach())
            loss = loss + ctx.config.prior_loss_weight * prior
        return loss + self.extra_loss(ctx, step)

    def extra_loss(self, ctx: TrainingContext, step: int) -> torch.Tensor:
        return torch.zeros((), device=ctx.device)

    def before_forward(self, ctx: TrainingContext, micro_step: int) -> None:
        """Work with its own backward and step before a micro-step's loss (B4M's main-half update): it runs
        outside the wrapped forward, where a backward would break DDP's gradient sync."""

    def after_backward(self, ctx: TrainingContext, step: int) -> None:
        """Gradient terms computed outside autograd, added once per optimizer step before clipping."""

    def before_step(self, ctx: TrainingContext, step: int) -> None:
        """Gradient hooks between backward and the optimizer step (e.g. preconditioning)."""

    def after_step(self, ctx: TrainingContext, step: int) -> None:
        """Schedule hooks (re-masking, rank changes) after each optimizer step."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint must hold to resume the method exactly (tensors and plain values)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    @abstractmethod
    def export(self, ctx: TrainingContext) -> list[Path]:
        """Write the finished adapter file(s); return their paths."""

    @contextlib.contextmanager
    def preview_weight(self, ctx: TrainingContext, weight: float) -> Iterator[None]:
        """Apply the adapter being trained at ``weight`` for validation previews (default: only weight 1)."""
        yield

    def cleanup(self, ctx: TrainingContext) -> None:
        """Undo what :meth:`setup` did to the base, so a shared base can be reused after training."""


# --- conditioning helpers shared with methods ------------------------------------------------------------------


def _scaling(base) -> float:
    return float(base.pipe.vae.config.scaling_factor)


def encode_captions(base, captions: Sequence[str], decor: tuple[list, float] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled embedding or None) as the base's pipeline conditions the UNet; with ``decor``
    (basis, α) the hidden states are projected away from the unwanted concepts (DECOR during training)."""
    hidden, pooled = base.pipe.encode_texts([clean_prompt(c) for c in captions], literal=True)
    if decor is not None:
        hidden = project_blocks(hidden, *decor)
    return hidden, pooled


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), for ε- and v-prediction."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas).clamp(min=1e-8)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def default_class_prompts(base, config: TrainConfig, count: int) -> list[str]:
    """Prompts for prior preservation: the user's class prompt, else ordinary prompts of the embedded domain.
    On a base that also learned two-object scenes, half are two-object prompts: an adapter preserved only on
    single objects drifts freely in two-object prompts (measured: a moon adapter turned a heart and a square
    beside it into moons)."""
    if config.class_prompt:
        return [config.class_prompt] * count
    if base.family != "tiny":
        raise ConfigError("prior preservation on this base needs --class_prompt (e.g. 'a photo of a dog')")
    pairs = count // 2 if (base.domain or {}).get("pair_caption_template") else 0
    singles = [case.prompt for case in grid_cases(count - pairs, held_out=False, seed=config.seed)]
    return singles + [scene.caption for scene in pair_cases(pairs, seed=config.seed)]


@torch.no_grad()
def class_images(base, config: TrainConfig, work_dir: Path, resolution: Size) -> tuple[torch.Tensor, list[str]]:
    """Generate (once, cached in the work folder) the class images prior preservation trains on."""
    folder = work_dir / "class_images"
    prompts = default_class_prompts(base, config, config.num_class_images)
    cached = folder / "class_images.pt"
    if cached.exists():
        stored = torch.load(cached, weights_only=True)
        if stored["prompts"] == "\n".join(prompts) and tuple(stored["pixels"].shape[-2:]) == resolution[::-1]:
            return stored["pixels"], prompts
    pixels = []
    for start in range(0, len(prompts), 8):
        chunk = prompts[start : start + 8]
        images = base.pipe(prompt=[clean_prompt(p) for p in chunk], num_inference_steps=base.default_steps,
                           guidance_scale=base.default_guidance_scale, height=resolution[1], width=resolution[0],
                           generator=[seeded_generator(config.seed * 1000 + start + i) for i in range(len(chunk))],
                           output_type="pt").images
        pixels.append(images.float().cpu() * 2 - 1)
    result = torch.cat(pixels)
    atomic_torch_save({"pixels": result, "prompts": "\n".join(prompts)}, cached)
    return result, prompts


# --- the loop -------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    outputs: list[Path]
    steps: int
    seconds: float
    final_loss: float
    samples: list[Path]


def _validation(ctx: TrainingContext, method: TrainingMethod, step: int) -> list[Path]:
    """Previews of every line of ``validation_prompt`` (kohya's prompt file has one prompt a line)."""
    config = ctx.config
    paths = []
    prompts = [line.strip() for line in config.validation_prompt.splitlines() if line.strip()]
    for number, prompt in enumerate(prompts):
        for weight in config.validation_weights:
            with method.preview_weight(ctx, weight):
                images = ctx.base.pipe(
                    prompt=[clean_prompt(prompt)] * config.num_validation_images,
                    num_inference_steps=ctx.base.default_steps, guidance_scale=ctx.base.default_guidance_scale,
                    generator=[seeded_generator(config.seed + i) for i in range(config.num_validation_images)],
                ).images
            for index, image in enumerate(images):
                label = f"-p{number}" if len(prompts) > 1 else ""
                path = ctx.work_dir / "samples" / f"step-{step:06d}{label}-w{weight:g}-{index}.png"
                text = a1111_parameters(
                    with_lora_tags(prompt, [(config.output, weight)]), None, ctx.base.default_steps,
                    sampler_label(ctx.base.pipe), ctx.base.default_guidance_scale, config.seed + index, image.width,
                    image.height, ctx.base.name, ctx.base.fingerprint, {"Training step": step})
                save_png(image, path, text, {"training_step": step, "adapter_weight": weight})
                paths.append(path)
    return paths


def check_training_input(config: TrainConfig, base=None) -> tuple[list[TrainingImage], list[Example] | None]:
    """Everything about the images and options that can be refused before a model loads: readable images,
    captions, ``--keep_tokens``, and the bucket plan when the size is known (``--resolution`` or a loaded base)."""
    if config.images is None:
        raise ConfigError("no training images: pass --images DIR")
    images = scan_folder(config.images, config.instance_prompt, config.repeats, config.caption_extension)
    check_keep_tokens(((item.path, item.caption) for item in images), config.keep_tokens)
    check_optimizer(config)
    tracking.check_tracker(config)
    if config.vae and not Path(config.vae).expanduser().exists():
        raise ConfigError(f"--vae {config.vae}: no such folder or file")
    split_count(config, _process_count())
    if base is None:
        base_dtype(config, choose_device(config.device))
    else:
        base_dtype(config, base.device)
    if base is None and config.resolution is None:
        return images, None
    default = base.default_size if base is not None else 0
    examples = plan_examples(images, config, resolution_of(config, default),
                             pixel_multiple(base) if base is not None else None)
    return images, examples


def _process_count() -> int:
    """How many processes ``accelerate launch`` (or torchrun) started, read before any model loads."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def train(config: TrainConfig, method: TrainingMethod, progress: ProgressCallback | None = None,
          base=None, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train ``method`` on ``config``; returns the written adapter files. ``should_stop`` lets the app stop it.

    Checkpoints, previews and class images go to ``<output>-work`` beside the adapter; a run that leaves nothing
    there (finished or failed) removes the folder."""
    work_dir = config.work_folder()
    try:
        return _train(config, method, progress, base, should_stop, work_dir)
    finally:
        with contextlib.suppress(OSError):  # under accelerate launch another process may remove it at any moment
            if work_dir.is_dir() and not any(work_dir.iterdir()):
                work_dir.rmdir()


def _train(config: TrainConfig, method: TrainingMethod, progress: ProgressCallback | None, base,
           should_stop: Callable[[], bool] | None, work_dir: Path) -> TrainResult:
    start_time = time.time()
    images, _ = check_training_input(config, base)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    if base is None:
        device = choose_device(config.device)
        base = load_base(config.model, device=str(device), dtype=base_dtype(config, device))
    set_adapter_weights(base, {})  # adapters the app composed with stay attached, but out of training and captions
    accelerator = make_accelerator(config, base.device.type == "cpu", tracking.accelerator_options(config, work_dir))
    if accelerator.num_processes > 1 and base.device != accelerator.device:  # accelerate launch: one GPU each
        base.pipe.to(accelerator.device)
        base.device = accelerator.device
    resolution = resolution_of(config, base.default_size)
    examples = plan_examples(images, config, resolution, pixel_multiple(base))  # now against the base's sizes
    work_dir.mkdir(parents=True, exist_ok=True)
    decor = None
    if config.decor_remove:
        keep = kept_words([example.image.caption for example in examples], config.decor_remove)
        decor = (decor_blocks(base.pipe, config.decor_remove, keep=keep), config.decor_alpha)

    def encode_text(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return encode_captions(base, captions, decor)

    with encoding_vae(base, config.vae):
        instance = encode_examples(base, examples, encode_text)
    _emit(progress, "buckets", 0, config.max_train_steps,
          {"buckets": {f"{b.size[0]}x{b.size[1]}": len(b) for b in instance.buckets}})
    prior = None
    if config.with_prior_preservation:
        with accelerator.main_process_first():  # one process renders them, the others read its cache
            class_pixels, class_prompts = class_images(base, config, work_dir, resolution)
        with encoding_vae(base, config.vae):
            prior = encode_pixels(base, class_pixels, class_prompts, encode_text)
    noise_scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
    ctx = TrainingContext(base, config, noise_scheduler, instance, prior, work_dir, accelerator, images,
                          decor=decor)

    groups = method.setup(ctx)
    checkpointed = _enable_gradient_checkpointing(base, config)
    optimizer = make_optimizer(groups, config)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_train_steps)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    ctx.optimizer = optimizer
    trainee = Trainee(base, method, ctx)
    step = 0
    if config.resume_from_checkpoint:
        checkpoint = find_checkpoint(work_dir, config.resume_from_checkpoint)
        step = load_checkpoint(accelerator, checkpoint, method)
        logger.info("resumed from %s at step %d", checkpoint, step)
    model, wrapped_for = wrap(accelerator, trainee), trainable_ids(optimizer)
    tracking.start(accelerator, config, method.name)
    total = config.max_train_steps
    _emit(progress, "start", step, total, {"images": len(images)})
    samples: list[Path] = []
    bar = tqdm(total=total, initial=step, desc=f"train {method.name}",
               disable=progress is not None or not accelerator.is_main_process)
    loss_value = math.nan
    accumulation = config.gradient_accumulation_steps
    while step < total:
        if should_stop is not None and should_stop():
            logger.info("stopped at step %d", step)
            break
        if trainable_ids(optimizer) != wrapped_for:  # the method swapped parameters: DDP must hook the new ones
            model, wrapped_for = wrap(accelerator, trainee, model), trainable_ids(optimizer)
        accumulated = 0.0
        for micro in range(accumulation):
            sync = contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(model)
            method.before_forward(ctx, step * accumulation + micro)
            with sync:
                loss = model(step * accumulation + micro)
                accelerator.backward(loss / accumulation)
            accumulated += float(accelerator.reduce(loss.detach(), reduction="mean")) / accumulation
        method.after_backward(ctx, step)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        method.before_step(ctx, step)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        method.after_step(ctx, step)
        loss_value = accumulated
        logs = {"method": method.name, **ctx.logs, "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        _emit(progress, "step", step, total, logs)
        accelerator.log({k: v for k, v in logs.items() if isinstance(v, (int, float))}, step=step)
        if config.checkpointing_steps and step % config.checkpointing_steps == 0 and step < total:
            path = save_checkpoint(accelerator, work_dir, step, method, config.checkpoints_total_limit)
            _emit(progress, "checkpoint", step, total, {"path": str(path)})
        if (config.validation_prompt and config.validation_steps and step % config.validation_steps == 0
                and accelerator.is_main_process):
            new = _validation(ctx, method, step)
            tracking.log_images(accelerator, config, new, step)
            samples += new
            _emit(progress, "validation", step, total, {"images": [str(p) for p in new]})
    bar.close()
    accelerator.wait_for_everyone()
    tracking.finish(accelerator)
    ctx.steps_run = step
    try:
        outputs = method.export(ctx) if accelerator.is_main_process else []
    finally:
        method.cleanup(ctx)
        _disable_gradient_checkpointing(checkpointed)
    accelerator.wait_for_everyone()  # a later stage (B4M's make) reads what the main process wrote
    result = TrainResult(outputs, step, time.time() - start_time, loss_value, samples)
    _emit(progress, "done", step, total, {"outputs": [str(p) for p in outputs], "seconds": result.seconds})
    return result


def _enable_gradient_checkpointing(base, config: TrainConfig) -> list[tuple[Any, bool]]:
    """Recompute activations in the backward pass: the UNet's, and the text encoders' when they train (which
    transformers does only in train mode). Returns the models and their modes, to switch back after the run."""
    if not config.gradient_checkpointing:
        return []
    base.pipe.unet.enable_gradient_checkpointing()
    models = [(base.pipe.unet, base.pipe.unet.training)]
    if config.train_text_encoder:
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(base.pipe, name, None)
            if encoder is not None:
                models.append((encoder, encoder.training))
                (getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable)()
                encoder.train()
    return models


def _disable_gradient_checkpointing(models: list[tuple[Any, bool]]) -> None:
    for model, training in models:
        if hasattr(model, "gradient_checkpointing_disable"):  # transformers (activation_… from version 5)
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        else:
            model.disable_gradient_checkpointing()
        model.train(training)


def _emit(progress: ProgressCallback | None, event: str, step: int, total: int, logs: dict[str, Any]) -> None:
    if progress is not None:
        progress(event, step, total, logs)
