"""Negative prompts that overlap the positive: ordinary negative prompting vs Perp-Neg, on the embedded model.

    .venv/bin/python -m bench.perp_neg [--case texture|color|full] [--n 96]

``texture``: positive "a {color} {texture} {shape} on a {background} background", negative "a {texture} {shape}",
which shares the shape the user wants. Removal: the texture is gone; retention: shape and color still as asked.

``color``: positive "a {texture} {shape} on a {background} background" (no color named, so the model picks one,
most often orange), negative "a orange {shape}", which again shares the shape. Removal: the object is not orange;
retention: shape and texture still as asked.

``full``: as ``color``, but the negative is the whole positive with the unwanted color added ("a orange {texture}
{shape} on a {background} background"): the largest overlap, the paper's "boy wearing sunglasses" vs "sunglasses
with black frame" kind.

Rows: no negative, the ordinary ``negative_prompt`` (it replaces the unconditional prediction), and Perp-Neg at
several weights (only the part of the negative perpendicular to the positive is subtracted).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.measure import read_generations
from pipelines.loading import load_base
from studio.data import procedural
from studio.eval.domain import DomainEvaluator

UNNAMED_COLOR = "orange"  # the color the embedded model draws most often when a prompt names none


def cases_for(case: str, n: int) -> dict[str, list[tuple[str, str, str, str]]]:
    """Prompts grouped by their negative prompt: (color, texture, shape, background), color "" when unnamed."""
    rng = np.random.default_rng(3)
    pairs = [(t, s) for t in procedural.BASE_TEXTURES for s in procedural.BASE_SHAPES]
    per_pair = max(1, n // len(pairs))
    groups: dict[str, list[tuple[str, str, str, str]]] = {}
    for texture, shape in pairs:
        for _ in range(per_pair):
            color = str(rng.choice(list(procedural.COLORS))) if case == "texture" else ""
            background = str(rng.choice(list(procedural.BACKGROUNDS)))
            negative = {"texture": f"a {texture} {shape}", "color": f"a {UNNAMED_COLOR} {shape}",
                        "full": prompt(UNNAMED_COLOR, texture, shape, background)}[case]
            groups.setdefault(negative, []).append((color, texture, shape, background))
    return groups


def prompt(color: str, texture: str, shape: str, background: str) -> str:
    return procedural.caption(color, texture, shape, background).replace("a  ", "a ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["texture", "color", "full"], default="texture")
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default=None, help="base model folder (default: the embedded model)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, evaluator = load_base(args.model), DomainEvaluator.load()
    groups = cases_for(args.case, args.n)
    cases = [case for group in groups.values() for case in group]

    def row(label: str, negative: bool = False, **options) -> None:
        readings = []
        for negative_prompt, group in groups.items():  # Perp-Neg's negatives apply to the whole batch
            extra = {"negative_prompt": negative_prompt} if negative else {}
            readings += read_generations(base, evaluator, [prompt(*c) for c in group], args.steps, **extra,
                                         **options)
        if args.case == "texture":
            removed = np.mean([r.texture != t for r, (_, t, _, _) in zip(readings, cases)])
            kept = np.mean([(r.shape, r.color) == (s, c) for r, (c, _, s, _) in zip(readings, cases)])
        else:
            removed = np.mean([r.color != UNNAMED_COLOR for r in readings])
            kept = np.mean([(r.shape, r.texture) == (s, t) for r, (_, t, s, _) in zip(readings, cases)])
        print(f"| {label} | {removed:.2f} | {kept:.2f} |")

    removed, kept = ("texture removed", "shape and color kept") if args.case == "texture" else (
        f"not {UNNAMED_COLOR}", "shape and texture kept")
    print(f"n = {len(cases)}, {args.steps} steps, guidance {base.default_guidance_scale}; case {args.case}: "
          f"e.g. positive '{prompt(*cases[0])}', negative '{next(iter(groups))}'")
    print(f"| guidance | {removed} | {kept} |")
    print("|---|---|---|")
    row("no negative")
    row("ordinary negative prompt", negative=True)
    for weight in (0.5, 1.0, 1.5, 3.0):
        row(f"Perp-Neg, weight {weight}", negative=True, perp_neg=True, perp_neg_weight=weight)


if __name__ == "__main__":
    main()
