"""Negative prompts that overlap the positive: ordinary negative prompting vs Perp-Neg, on the embedded model.

    .venv/bin/python -m bench.perp_neg [--n 96]

Positive "a {color} {texture} {shape} on a {background} background"; negative "a {texture} {shape}", which
shares the shape the user wants. Removal: the texture is gone; retention: shape and color still as asked.
Rows: no negative, the ordinary ``negative_prompt`` (it replaces the unconditional prediction), and Perp-Neg at
several weights (only the part of the negative perpendicular to the positive is subtracted).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.measure import read_generations
from studio.data import procedural
from studio.eval.domain import DomainEvaluator
from studio.models import load_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, evaluator = load_base(), DomainEvaluator.load()
    rng = np.random.default_rng(3)
    pairs = [(t, s) for t in procedural.BASE_TEXTURES for s in procedural.BASE_SHAPES]
    per_pair = max(1, args.n // len(pairs))
    groups = {pair: [(str(rng.choice(list(procedural.COLORS))), pair[0], pair[1],
                      str(rng.choice(list(procedural.BACKGROUNDS)))) for _ in range(per_pair)] for pair in pairs}
    cases = [case for group in groups.values() for case in group]

    def row(label: str, negative: bool = False, **options) -> None:
        readings = []
        for (texture, shape), group in groups.items():  # Perp-Neg's negatives apply to the whole batch
            extra = {"negative_prompt": f"a {texture} {shape}"} if negative else {}
            readings += read_generations(base, evaluator, [procedural.caption(*c) for c in group], args.steps,
                                         **extra, **options)
        removed = np.mean([r.texture != t for r, (_, t, _, _) in zip(readings, cases)])
        kept = np.mean([(r.shape, r.color) == (s, c) for r, (c, _, s, _) in zip(readings, cases)])
        print(f"| {label} | {removed:.2f} | {kept:.2f} |")

    print(f"n = {len(cases)}, {args.steps} steps, guidance {base.default_guidance_scale}; negative 'a {{texture}} "
          "{shape}' against the positive 'a {color} {texture} {shape} on a {background} background'")
    print("| guidance | texture removed | shape and color kept |")
    print("|---|---|---|")
    row("no negative")
    row("ordinary negative prompt", negative=True)
    for weight in (0.5, 1.0, 1.5, 3.0):
        row(f"Perp-Neg, weight {weight}", negative=True, perp_neg=True, perp_neg_weight=weight)


if __name__ == "__main__":
    main()
