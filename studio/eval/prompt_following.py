"""How well a base model (plus whatever adapters are active in its pipeline) follows domain prompts.

Generates images for prompts over the attribute grid, reads them with the domain evaluator, and reports the
fraction of images whose color, texture, shape and background match the prompt, separately for combinations
the base trained on ("seen") and combinations held out of its training ("held_out"). Two-object prompts ("a red
solid star and a blue dotted circle on …") are read per object (``studio.eval.two_objects``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from studio.data import procedural
from studio.eval.domain import DomainEvaluator, Reading
from studio.eval.two_objects import read_two_objects
from studio.models import BaseModel
from studio.text import clean_prompt

ATTRIBUTE_NAMES = ("color", "texture", "shape", "background")


@dataclass(frozen=True)
class PromptCase:
    color: str
    texture: str
    shape: str
    background: str

    @property
    def prompt(self) -> str:
        return procedural.caption(self.color, self.texture, self.shape, self.background)

    def expected(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTE_NAMES}


def grid_cases(n: int, held_out: bool, seed: int = 0) -> list[PromptCase]:
    """n prompts cycling through a seeded shuffle of the seen (or held-out) combinations."""
    combos = procedural.held_out_combinations() if held_out else procedural.base_training_combinations()
    order = np.random.default_rng(seed).permutation(len(combos))
    return [PromptCase(*combos[order[i % len(combos)]]) for i in range(n)]


@torch.no_grad()
def generate_batch(base: BaseModel, prompts: Sequence[str] | None, seeds: Sequence[int], steps: int | None = None,
                   guidance_scale: float | None = None, **options: Any) -> np.ndarray:
    """N×H×W×3 uint8 images, one per (prompt, seed), generated in one pipeline call; ``options`` go to the
    pipeline (``negative_prompt``, ``adapters``, ``method``, ``decor_remove``, ``perp_neg``, ``prompt_embeds``
    in place of the prompts, …)."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    output = base.pipe(
        prompt=None if prompts is None else [clean_prompt(p) for p in prompts],
        num_inference_steps=steps or base.default_steps,
        guidance_scale=base.default_guidance_scale if guidance_scale is None else guidance_scale,
        generator=generators,
        output_type="np",
        **options,
    )
    return (np.clip(output.images, 0, 1) * 255).round().astype(np.uint8)


def _generate_in_batches(base: BaseModel, prompts: Sequence[str], seed: int, steps: int | None,
                         guidance_scale: float | None, batch_size: int) -> np.ndarray:
    """One image per prompt, image i seeded ``seed * 100_000 + i``, generated ``batch_size`` at a time."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        seeds = [seed * 100_000 + start + i for i in range(len(chunk))]
        images.append(generate_batch(base, chunk, seeds, steps, guidance_scale))
    return np.concatenate(images)


def score(readings: Sequence[Reading], cases: Sequence[PromptCase]) -> dict[str, float]:
    """Per-attribute accuracy and the all-four rate."""
    hits = {name: [getattr(r, name) == getattr(c, name) for r, c in zip(readings, cases)] for name in ATTRIBUTE_NAMES}
    result = {name: float(np.mean(values)) for name, values in hits.items()}
    result["all"] = float(np.mean([all(h[i] for h in hits.values()) for i in range(len(cases))]))
    return result


def measure_prompt_following(base: BaseModel, evaluator: DomainEvaluator, n: int = 300, seed: int = 0,
                             steps: int | None = None, guidance_scale: float | None = None,
                             batch_size: int = 25) -> dict[str, dict[str, float]]:
    """Accuracy tables for ``n`` seen and ``n // 3`` held-out prompts (at least one of each)."""
    tables = {}
    for split, count in (("seen", n), ("held_out", max(1, n // 3))):
        cases = grid_cases(count, held_out=split == "held_out", seed=seed)
        images = _generate_in_batches(base, [c.prompt for c in cases], seed, steps, guidance_scale, batch_size)
        tables[split] = score(evaluator.read(images), cases)
        tables[split]["n"] = count
    return tables


def pair_cases(n: int, seed: int = 0) -> list[procedural.PairScene]:
    """n two-object scenes from the base vocabulary (their captions are the prompts)."""
    rng = np.random.default_rng(seed)
    return [procedural.base_training_pair(rng) for _ in range(n)]


def measure_pair_following(base: BaseModel, evaluator: DomainEvaluator, n: int = 100, seed: int = 0,
                           steps: int | None = None, guidance_scale: float | None = None,
                           batch_size: int = 25) -> dict[str, float]:
    """Two-object prompts: per-object shape and color accuracy (each object found by its color), the rate at
    which both objects have their shape and color, and the rate at which exactly one does (omission)."""
    cases = pair_cases(n, seed)
    images = _generate_in_batches(base, [c.caption for c in cases], seed, steps, guidance_scale, batch_size)
    readings, _ = read_two_objects(evaluator, list(images),
                                   [(c.left.color, c.right.color) for c in cases],
                                   [c.left.background for c in cases])
    shape_hits = [[r is not None and r.shape == s.shape for r, s in zip(read, (c.left, c.right))]
                  for read, c in zip(readings, cases)]
    color_hits = [[r is not None and r.color == s.color for r, s in zip(read, (c.left, c.right))]
                  for read, c in zip(readings, cases)]
    right = np.array(shape_hits) & np.array(color_hits)
    return {"n": n, "shape": float(np.mean(shape_hits)), "color": float(np.mean(color_hits)),
            "both": float(right.all(1).mean()), "one": float((right.sum(1) == 1).mean())}
