"""Text-to-image generation with a base model, returning images together with their reproducible recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from studio import __version__
from studio.errors import ConfigError
from studio.models import SAMPLER_LABELS, BaseModel
from studio.png import a1111_parameters


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
    adapters: list[tuple[str, float]] = field(default_factory=list)  # (file or library name, weight)
    method: str = "merge"
    method_options: dict[str, Any] = field(default_factory=dict)
    perp_neg: list[tuple[str, float]] = field(default_factory=list)  # Perp-Neg negatives (text, weight)
    decor_remove: list[str] = field(default_factory=list)  # DECOR: concepts projected out of the prompt
    decor_alpha: float = 1.0
    adapter_prompts: list[str] = field(default_factory=list)  # CLoRA: each adapter's own prompt
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
            adapters=list(self.adapters),
            method=self.method,
            method_options=dict(self.method_options),
            perp_neg=list(self.perp_neg),
            decor_remove=list(self.decor_remove),
            decor_alpha=self.decor_alpha,
            adapter_prompts=list(self.adapter_prompts),
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


def describe(base: BaseModel, request: GenerationRequest, seed: int, recipe_extra: dict[str, Any] | None = None
             ) -> tuple[str, dict[str, Any]]:
    """A1111 ``parameters`` text and the studio recipe for one image of ``request``."""
    fields: dict[str, Any] = {}
    if request.adapters:
        fields["Lora hashes"] = ", ".join(f"{Path(str(a)).stem}: {adapter_hash(a)}" for a, _ in request.adapters)
        fields["Composition"] = request.method
    if request.perp_neg:
        fields["Perp-Neg"] = "; ".join(f"{text}: {weight:g}" for text, weight in request.perp_neg)
    if request.decor_remove:
        fields["DECOR"] = f"{', '.join(request.decor_remove)} (alpha {request.decor_alpha:g})"
    parameters = a1111_parameters(
        with_lora_tags(request.prompt, request.adapters), request.negative_prompt, request.steps, sampler_label(base),
        request.guidance_scale, seed, request.width, request.height, base.name, base.fingerprint,
        {**fields, "Version": f"adapter-studio {__version__}", **request.extra},
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
        "adapters": [[str(a), w] for a, w in request.adapters],
        "method": request.method,
        "method_options": request.method_options,
        "perp_neg": [[t, w] for t, w in request.perp_neg],
        "decor_remove": request.decor_remove,
        "decor_alpha": request.decor_alpha,
        "adapter_prompts": request.adapter_prompts,
        **(recipe_extra or {}),
        **request.extra,
    }
    return parameters, recipe


def sampler_label(base: BaseModel) -> str:
    """The scheduler under A1111's sampler name (``DDIM``, ``Euler a``, …)."""
    name = type(base.pipe.scheduler).__name__
    return SAMPLER_LABELS.get(name, name)


def with_lora_tags(prompt: str, adapters: list[tuple[str, float]]) -> str:
    """A1111 writes active LoRAs into the prompt as ``<lora:name:weight>``."""
    tags = " ".join(f"<lora:{Path(str(a)).stem}:{w:g}>" for a, w in adapters)
    return f"{prompt} {tags}".strip() if tags else prompt


def adapter_hash(spec: str) -> str:
    """A1111's short LoRA hash: the first 12 hex digits of the file's sha256 (hashed once per file version)."""
    from studio.adapters.library import resolve_adapter

    path = resolve_adapter(spec).resolve()
    return _file_hash(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=64)
def _file_hash(path: str, mtime_ns: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:  # hashlib.file_digest would need Python 3.11
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def generate(base: BaseModel, request: GenerationRequest) -> list[GeneratedImage]:
    """Generate ``request.num_images`` images; image i uses seed ``request.seed + i`` (A1111's batch convention)."""
    request = request.resolved(base)
    pipe = base.pipe
    composing: dict[str, Any] = {}
    tagged = any(tag in str(request.prompt).lower() for tag in ("<lora:", "<lyco:"))  # A1111's adapter tags
    if request.adapters or request.method != "merge" or request.perp_neg or request.decor_remove or tagged:
        if not hasattr(pipe, "attach_adapters"):
            raise ConfigError(f"this {base.family} pipeline ({type(pipe).__name__}) cannot compose adapters")
        composing = {"adapters": request.adapters, "method": request.method,
                     "method_options": request.method_options, "perp_neg": request.perp_neg or None,
                     "decor_remove": request.decor_remove or None, "decor_alpha": request.decor_alpha,
                     "adapter_prompts": request.adapter_prompts or None}
    results = []
    for index in range(request.num_images):
        seed = request.seed + index
        output = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=request.width,
            height=request.height,
            generator=seeded_generator(seed),
            **composing,
        )
        parameters, recipe = describe(base, request, seed, {"composition": getattr(pipe, "last_recipe", None)})
        results.append(GeneratedImage(output.images[0], parameters, recipe))
    return results
