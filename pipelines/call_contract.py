"""What diffusers' ``StableDiffusion(XL)Pipeline.__call__`` promises, for the composition engine's own loop.

diffusers has no loop to reuse (its ``__call__`` is one function), so the engine keeps the same contract piece by
piece: the denoising schedule (``timesteps``/``sigmas`` through diffusers' ``retrieve_timesteps``, SDXL's
``denoising_end`` cut), the LCM guidance embedding, and ``callback_on_step_end`` — fed from an explicit table of
the loop's tensors rather than ``locals()`` (which, inside a comprehension before Python 3.12, is the
comprehension's own scope), with what it returns applied as diffusers applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from studio.errors import ConfigError

# SDXL's arguments for its second text encoder and size conditioning: an SD pipeline has neither.
SDXL_ONLY = {"prompt_2": None, "negative_prompt_2": None, "pooled_prompt_embeds": None,
             "negative_pooled_prompt_embeds": None, "original_size": None, "crops_coords_top_left": (0, 0),
             "target_size": None, "negative_original_size": None, "negative_crops_coords_top_left": (0, 0),
             "negative_target_size": None}


def refuse_sdxl_arguments(pipe, given: Mapping[str, Any]) -> None:
    """An SD pipeline refuses SDXL's arguments when they are set (stock SD would silently drop them)."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        return
    used = sorted(name for name, default in SDXL_ONLY.items()
                  if given.get(name) is not None and tuple(given[name] or ()) != tuple(default or ()))
    if used:
        raise ConfigError(f"{', '.join(used)}: SDXL arguments (second text encoder, size conditioning); "
                          "this Stable Diffusion pipeline has neither")


def refuse_combinations(method_name: str, composer, perp_neg: bool, guided: bool, ip_adapter: bool) -> None:
    """What cannot work together: Perp-Neg is a guidance rule (nothing to apply without guidance); methods that
    read cross-attention maps (CLoRA) would replace IP-Adapter's attention processors."""
    if perp_neg and not guided:
        raise ConfigError("Perp-Neg is a guidance rule: it needs guidance_scale > 1 (and a UNet without a "
                          "guidance embedding)")
    if ip_adapter and composer.capture_resolution is not None:
        raise ConfigError(f"method {method_name!r} reads cross-attention maps, which IP-Adapter's attention "
                          "processors would give up; generate without ip_adapter_image")


def denoising_schedule(pipe, num_inference_steps: int, device, timesteps: Sequence[int] | None,
                       sigmas: Sequence[float] | None, denoising_end: float | None) -> torch.Tensor:
    """The timesteps to run: diffusers' ``retrieve_timesteps`` (custom ``timesteps`` or ``sigmas`` where the
    scheduler takes them), cut where ``denoising_end`` (a fraction in (0, 1), SDXL's refiner hand-off) says."""
    try:
        schedule, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, device, timesteps, sigmas)
    except ValueError as error:  # "The current scheduler class … does not support custom timestep schedules"
        raise ConfigError(str(error)) from error
    if denoising_end is not None and isinstance(denoising_end, float) and 0 < denoising_end < 1:
        train_steps = pipe.scheduler.config.num_train_timesteps
        cutoff = int(round(train_steps - denoising_end * train_steps))
        schedule = schedule[: len([t for t in schedule if t >= cutoff])]
    return schedule


def guidance_embedding(pipe, batch: int, device, dtype: torch.dtype) -> torch.Tensor | None:
    """``timestep_cond`` for a UNet distilled with guidance as an input (LCM: ``time_cond_proj_dim``)."""
    dim = pipe.unet.config.get("time_cond_proj_dim")
    if dim is None:
        return None
    scale = torch.tensor(pipe.guidance_scale - 1).repeat(batch)
    return pipe.get_guidance_scale_embedding(scale, embedding_dim=dim).to(device=device, dtype=dtype)


class StepCallback:
    """``callback_on_step_end`` (a function, ``PipelineCallback`` or ``MultiPipelineCallbacks``) with the tensor
    names it asked for, checked against the pipeline's ``_callback_tensor_inputs`` as diffusers checks them."""

    def __init__(self, pipe, callback: Callable[..., Mapping] | None, tensor_inputs: Sequence[str]) -> None:
        if isinstance(callback, PipelineCallback | MultiPipelineCallbacks):
            tensor_inputs = callback.tensor_inputs
        unknown = [name for name in tensor_inputs if name not in pipe._callback_tensor_inputs]
        if unknown:
            raise ConfigError(f"callback_on_step_end_tensor_inputs has to be in {pipe._callback_tensor_inputs}, "
                              f"but found {unknown}")
        self.callback = callback
        self.tensor_inputs = list(tensor_inputs)

    def __bool__(self) -> bool:
        return self.callback is not None

    def __call__(self, pipe, step: int, timestep, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """Call back with the requested tensors; returns what the callback gave back (a dict)."""
        outputs = self.callback(pipe, step, timestep, {name: tensors.get(name) for name in self.tensor_inputs})
        return dict(outputs or {})
