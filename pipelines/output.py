"""What a composition pipeline returns: diffusers' output (``.images`` and the rest, unchanged) plus what the
composition did — the recipe to redo it, the UNet statistics, CLoRA's masks, the adapters it composed —
returned, not parked on the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

from pipelines.adapter_set import AdapterSet
from pipelines.unet_runner import UNetStats


@dataclass
class CompositionPipelineOutput(StableDiffusionPipelineOutput):
    """``images`` and ``nsfw_content_detected`` as diffusers; ``recipe``: method, adapters and weights, Perp-Neg
    and DECOR settings; ``stats``: UNet passes and block evaluations; ``masks``: CLoRA's mask per adapter;
    ``adapters``: the attached set (files, weights, prompt tags' adapters included), which ``adapters=`` takes to
    run another pass on the same adapters without looking their files up again."""

    recipe: dict[str, Any] = field(default_factory=dict)
    stats: UNetStats | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    adapters: AdapterSet = field(default_factory=AdapterSet)


@dataclass
class CompositionXLPipelineOutput(StableDiffusionXLPipelineOutput):
    """SDXL's output (``images``) with the same ``recipe``, ``stats``, ``masks`` and ``adapters``."""

    recipe: dict[str, Any] = field(default_factory=dict)
    stats: UNetStats | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    adapters: AdapterSet = field(default_factory=AdapterSet)
