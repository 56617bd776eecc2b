"""How well a base model (plus whatever adapters are active in its pipeline) follows domain prompts.

Generates images for prompts over the attribute grid, reads them with the domain evaluator, and reports the
fraction of images whose color, texture, shape and background match the prompt, separately for combinations
the base trained on ("seen") and combinations held out of its training ("held_out"). Two-object prompts ("a red
solid star and a blue dotted circle on …") are read per object (``studio.eval.two_objects``). Prompts may leave
attributes out ("a red star"): the evaluator still reads all four, and only the named ones are scored.
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
    """A single-object prompt; an attribute set to ``None`` is left out of the prompt and not scored."""

    color: str | None
    texture: str | None
    shape: str | None
    background: str | None

    @property
    def prompt(self) -> str:
        return procedural.partial_caption(self.color, self.texture, self.shape, self.background)

    def expected(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTE_NAMES if getattr(self, name) is not None}


def grid_cases(n: int, held_out: bool, seed: int = 0) -> list[PromptCase]:
    """n prompts cycling through a seeded shuffle of the seen (or held-out) combinations."""
    combos = procedural.held_out_combinations() if held_out else procedural.base_training_combinations()
    order = np.random.default_rng(seed).permutation(len(combos))
    return [PromptCase(*combos[order[i % len(combos)]]) for i in range(n)]


def partial_cases(cases: Sequence[PromptCase], drop_attribute: float, seed: int = 0) -> list[PromptCase]:
    """``cases`` with each attribute left out with probability ``drop_attribute`` (seeded); a case keeps at least
    one attribute, so every prompt is scored on something."""
    rng = np.random.default_rng(seed)
    out = []
    for case in cases:
        keep = rng.random(len(ATTRIBUTE_NAMES)) >= drop_attribute
        if not keep.any():
            keep[rng.integers(len(ATTRIBUTE_NAMES))] = True
        out.append(PromptCase(*(getattr(case, n) if k else None for n, k in zip(ATTRIBUTE_NAMES, keep))))
    return out


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
    """Per-attribute accuracy over the prompts that name the attribute (NaN where none does), and the rate at
    which every named attribute is right ("all"; all four for full prompts)."""
    hits = [{name: getattr(r, name) == value for name, value in c.expected().items()} for r, c in zip(readings, cases)]
    result = {}
    for name in ATTRIBUTE_NAMES:
        named = [h[name] for h in hits if name in h]
        result[name] = float(np.mean(named)) if named else float("nan")
    result["all"] = float(np.mean([all(h.values()) for h in hits]))
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


def measure_guidance_sweep(base: BaseModel, evaluator: DomainEvaluator, guidance_scales: Sequence[float],
                           n: int = 300, seed: int = 0, steps: int | None = None, drop_attribute: float = 0.0,
                           batch_size: int = 25) -> list[dict[str, float]]:
    """Accuracy on the same ``n`` seen prompts (and seeds) at each guidance scale: one row per scale.

    With ``drop_attribute`` the prompts are partial (:func:`partial_cases`) and scored on what they name."""
    cases = grid_cases(n, held_out=False, seed=seed)
    if drop_attribute:
        cases = partial_cases(cases, drop_attribute, seed)
    rows = []
    for scale in guidance_scales:
        images = _generate_in_batches(base, [c.prompt for c in cases], seed, steps, scale, batch_size)
        rows.append({"guidance": float(scale), "n": n, **score(evaluator.read(images), cases)})
    return rows


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
