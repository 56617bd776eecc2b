"""Text-to-image generation with a base model, returning images together with their reproducible recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from studio import __version__
from studio.models import SAMPLER_LABELS, BaseModel
from studio.png import a1111_parameters
from studio.text import clean_prompt


@dataclass
class GenerationRequest:
    """Everything that determines an image; the same request on the same device gives the same pixels."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self, base: BaseModel) -> GenerationRequest:
        """Fill the model's defaults in."""
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            steps=self.steps or base.default_steps,
            guidance_scale=base.default_guidance_scale if self.guidance_scale is None else self.guidance_scale,
            width=self.width or base.default_size,
            height=self.height or base.default_size,
            num_images=self.num_images,
            extra=dict(self.extra),
        )


@dataclass
class GeneratedImage:
    image: Image.Image
    parameters: str
    recipe: dict[str, Any]


def seeded_generator(seed: int) -> torch.Generator:
    """Initial noise is drawn on the CPU so a seed means the same image on every device."""
    return torch.Generator("cpu").manual_seed(int(seed))


def describe(base: BaseModel, request: GenerationRequest, seed: int) -> tuple[str, dict[str, Any]]:
    """A1111 ``parameters`` text and the studio recipe for one image of ``request``."""
    sampler = SAMPLER_LABELS.get(type(base.pipe.scheduler).__name__, type(base.pipe.scheduler).__name__)
    parameters = a1111_parameters(
        request.prompt, request.negative_prompt, request.steps, sampler, request.guidance_scale, seed,
        request.width, request.height, base.name, base.fingerprint, {"Version": f"adapter-studio {__version__}",
                                                                     **request.extra},
    )
    recipe = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": seed,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "width": request.width,
        "height": request.height,
        "scheduler": type(base.pipe.scheduler).__name__,
        "model": base.source,
        "model_fingerprint": base.fingerprint,
        **request.extra,
    }
    return parameters, recipe


def generate(base: BaseModel, request: GenerationRequest) -> list[GeneratedImage]:
    """Generate ``request.num_images`` images; image i uses seed ``request.seed + i`` (A1111's batch convention)."""
    request = request.resolved(base)
    results = []
    for index in range(request.num_images):
        seed = request.seed + index
        output = base.pipe(
            prompt=clean_prompt(request.prompt),
            negative_prompt=clean_prompt(request.negative_prompt) if request.negative_prompt else None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=request.width,
            height=request.height,
            generator=seeded_generator(seed),
        )
        parameters, recipe = describe(base, request, seed)
        results.append(GeneratedImage(output.images[0], parameters, recipe))
    return results
