"""Compare composition methods on one request: same seed and settings, each method's image and its scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from frontends.generate import GeneratedImage, GenerationRequest, generate
from pipelines.methods import METHODS
from studio.eval.domain import DomainEvaluator
from studio.models import BaseModel


@dataclass
class MethodResult:
    method: str
    result: GeneratedImage
    scores: dict[str, str | None]


def compare_methods(base: BaseModel, request: GenerationRequest, methods: Sequence[str] = tuple(METHODS),
                    evaluator: DomainEvaluator | None = None) -> list[MethodResult]:
    """Run ``request`` once per method (one image each); on the embedded model, read each image's attributes."""
    results = []
    for method in methods:
        image = generate(base, replace(request, method=method, num_images=1))[0]
        scores: dict[str, str | None] = {}
        if evaluator is not None:
            reading = evaluator.read([image.image])[0]
            scores = {"shape": reading.shape, "color": reading.color, "texture": reading.texture,
                      "background": reading.background}
        results.append(MethodResult(method, image, scores))
    return results
