"""What a composition method is: per step, which evaluations it needs (a plan) and how it fuses them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipelines import init_image
from pipelines.adapter_set import AdapterSet
from pipelines.guidance import weighted_mean


@dataclass(frozen=True)
class Route:
    """One evaluation of every conditioning ([uncond, cond, …]) with one routed adapter or a merged set.

    ``adapter``: evaluate with only this adapter (at its weight); ``merged``: evaluate with these adapters
    active together (weights); neither: the base model. ``cache``: "off", "write" (full pass that stores deep
    features under ``adapter``) or "read" (shallow pass from the stored features).
    """

    key: str
    adapter: str | None = None
    merged: Mapping[str, float] | None = None
    cache: str = "off"
    prompt: int = 0  # which prompt's embeddings: 0 = the main prompt, i = the i-th adapter's own prompt


@dataclass
class Conditioning:
    """One prompt's UNet conditioning for every guidance branch ([uncond, cond, negatives…], or [cond] alone when
    guidance is off); SDXL adds pooled embeddings and time ids, IP-Adapter image embeddings (one per adapter)."""

    hidden: list[torch.Tensor]
    pooled: list[torch.Tensor] | None = None
    time_ids: list[torch.Tensor] | None = None
    images: list[list[torch.Tensor]] | None = None
    guided: bool = True

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def cond_index(self) -> int:
        """Where the conditional branch is."""
        return 1 if self.guided else 0

    def branch(self, index: int) -> Conditioning:
        """Branch ``index`` alone (CLoRA's conditional-only attention pass)."""
        return Conditioning([self.hidden[index]], *(None if part is None else [part[index]]
                                                    for part in (self.pooled, self.time_ids, self.images)),
                            guided=False)


@dataclass(frozen=True)
class Generation:
    """One call's state, passed to whatever evaluates the UNet (the engine's step, CLoRA's attention passes):
    the adapters it composes, the img2img/inpainting state, LCM's guidance embedding and the caller's
    ``cross_attention_kwargs``. Kept here, not on the pipeline, so nothing of one call outlives it."""

    pipe: Any
    adapters: AdapterSet
    init: init_image.InitImage | None = None
    timestep_cond: torch.Tensor | None = None
    attention_kwargs: dict[str, Any] | None = None

    def model_input(self, latents: torch.Tensor, timestep) -> torch.Tensor:
        """The UNet's input at ``timestep``: scheduler-scaled latents (an inpainting UNet: with its mask inputs)."""
        return init_image.model_input(self.pipe, latents, timestep, self.init)

    def unet_inputs(self, repeat: int) -> dict[str, Any]:
        """The UNet inputs besides latents and conditioning, for a batch of ``repeat`` stacked copies of the
        latents: LCM's ``timestep_cond`` and the ``cross_attention_kwargs``."""
        cond = self.timestep_cond
        return {"timestep_cond": None if cond is None else cond.repeat(repeat, 1),
                "cross_attention_kwargs": self.attention_kwargs}


@dataclass(frozen=True)
class Prediction:
    """Noise predictions of one evaluation, one per conditioning: [uncond, cond, extra negatives…]."""

    conditions: tuple[torch.Tensor, ...]

    @property
    def uncond(self) -> torch.Tensor:
        return self.conditions[0]

    @property
    def cond(self) -> torch.Tensor:
        return self.conditions[1]


def fuse_weighted(predictions: Sequence[Prediction], weights: Sequence[float]) -> Prediction:
    """Weighted mean of several evaluations, per conditioning (fuse first, guide after)."""
    return Prediction(tuple(weighted_mean([p.conditions[i] for p in predictions], weights)
                            for i in range(len(predictions[0].conditions))))


class CompositionMethod(ABC):
    """A method sees the call's :class:`~pipelines.adapter_set.AdapterSet` (names, weights, profiles, kinds,
    triggers, in the user's order) and the number of steps.

    Optional capabilities: ``uses_adapter_prompts`` (each adapter evaluated with its own prompt),
    ``capture_resolution`` (cross-attention maps of each evaluation passed to :meth:`observe`), and
    :meth:`refine` (change the latents before a step's evaluations, e.g. CLoRA's contrastive update).
    """

    name = "method"
    uses_adapter_prompts = False
    capture_resolution: int | None = None

    def __init__(self) -> None:
        self.adapters = AdapterSet()
        self.num_steps = 0
        self.schedule_steps = 0

    def prepare(self, adapters: AdapterSet, num_steps: int, schedule_steps: int | None = None) -> None:
        """Called once per generation before the first step. ``num_steps``: the steps this run takes (its step 0
        is the first one run); ``schedule_steps``: the length of the whole schedule they belong to (an img2img
        run at strength s takes its last ``num_steps`` ≈ s·``schedule_steps``; default: ``num_steps``)."""
        self.adapters = adapters
        self.num_steps = num_steps
        self.schedule_steps = schedule_steps or num_steps

    def bind(self, pipe, prompts: Sequence[str]) -> None:
        """The pipeline and the prompts (main first, then one per adapter), after :meth:`prepare`."""

    def refine(self, generation: Generation, step: int, timestep, latents: torch.Tensor, conditions: Sequence
               ) -> torch.Tensor:
        """Return the latents this step denoises (default: unchanged)."""
        return latents

    def observe(self, step: int, maps: Mapping[str, torch.Tensor]) -> None:
        """Cross-attention maps [batch, queries, tokens] of each route's conditional evaluation."""

    @abstractmethod
    def plan(self, step: int) -> list[Route]:
        """The evaluations step ``step`` needs."""

    @abstractmethod
    def fuse(self, step: int, predictions: Mapping[str, Prediction]) -> Prediction:
        """Combine the planned evaluations into one [uncond, cond] pair (guidance comes after)."""

    def describe(self) -> dict:
        """Method options for the image's recipe."""
        return {}
