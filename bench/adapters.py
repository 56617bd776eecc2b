"""Demo adapters on the embedded model: does each show its concept, and does it spill into ordinary prompts?

    .venv/bin/python -m bench.adapters --n 50

Content adapters (sks-moon, xyz-cross): the rate at which "a {color} {texture} sks on a {background} background"
shows a moon (xyz: a cross). Style adapter (zwx-zigzag): the rate at which "a {color} zwx {shape} on a
{background} background" shows zigzag. Content adapters in two-object prompts ("a {c1} solid sks and a {c2}
solid {shape} on a {background} background", and the subject named second): the rate at which the subject's
color region reads as its shape (``studio.eval.two_objects``). Spill: the base's all-attribute accuracy on
ordinary prompts with each adapter loaded vs without.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.measure import generate_images, read_generations
from pipelines.loading import load_base
from studio.adapters.library import SHIPPED
from studio.data import procedural
from studio.eval.domain import DomainEvaluator
from studio.eval.prompt_following import grid_cases
from studio.eval.two_objects import read_two_objects

COLORS, BACKGROUNDS = list(procedural.COLORS), list(procedural.BACKGROUNDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--folder", default=str(SHIPPED), help="where the demo adapters are")
    parser.add_argument("--model", default=None, help="base model folder (default: the embedded model)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, evaluator = load_base(args.model), DomainEvaluator.load()
    n = args.n
    folder = Path(args.folder)
    def rate(name: str, prompts: list[str], attribute: str, value: str) -> str:
        readings = read_generations(base, evaluator, prompts, args.steps,
                                    adapters=[(str(folder / f"{name}.safetensors"), 1.0)])
        return f"{np.mean([getattr(r, attribute) == value for r in readings]):.2f} {value}"

    def content_prompts(trigger: str) -> list[str]:
        return [procedural.caption(COLORS[i % 6], procedural.BASE_TEXTURES[i % 4], trigger, BACKGROUNDS[i % 3])
                for i in range(n)]

    style_prompts = [procedural.caption(COLORS[i % 6], "zwx", procedural.BASE_SHAPES[i % 6], BACKGROUNDS[i % 3])
                     for i in range(n)]
    def in_pairs(name: str, trigger: str, shape: str) -> str:
        """Subject drawn in two-object prompts: named first / named second."""
        adapters = [(str(folder / f"{name}.safetensors"), 1.0)]
        rates = []
        for index in (0, 1):  # where the subject is named
            named, backgrounds = [], []
            for i in range(n):
                other = procedural.BASE_SHAPES[i % 6]
                pair = [(COLORS[i % 6], "solid", trigger), (COLORS[(i + 2) % 6], "solid", other)]
                named.append(pair if index == 0 else pair[::-1])
                backgrounds.append(BACKGROUNDS[i % 3])
            prompts = [procedural.pair_caption(*pair, background) for pair, background in zip(named, backgrounds)]
            images = generate_images(base, prompts, args.steps, adapters=adapters)
            colors = [(first[0], second[0]) for first, second in named]
            readings, _ = read_two_objects(evaluator, images, colors, backgrounds)
            rates.append(np.mean([r[index] is not None and r[index].shape == shape for r in readings]))
        return " / ".join(f"{rate:.2f}" for rate in rates)

    two_objects = {"sks-moon": in_pairs("sks-moon", "sks", "moon"), "xyz-cross": in_pairs("xyz-cross", "xyz", "cross"),
                   "zwx-zigzag": "—"}
    shown = {"sks-moon": rate("sks-moon", content_prompts("sks"), "shape", "moon"),
             "xyz-cross": rate("xyz-cross", content_prompts("xyz"), "shape", "cross"),
             "zwx-zigzag": rate("zwx-zigzag", style_prompts, "texture", "zigzag")}
    cases = grid_cases(n, held_out=False, seed=21)
    prompts = [c.prompt for c in cases]

    def accuracy(adapters):
        readings = read_generations(base, evaluator, prompts, args.steps, adapters=adapters)
        return np.mean([all(getattr(r, k) == getattr(c, k) for k in ("color", "texture", "shape", "background"))
                        for r, c in zip(readings, cases)])

    plain = accuracy(None)
    print(f"model build step {(base.domain or {}).get('build_step')}, {n} generations each, {args.steps} steps")
    print("| adapter | concept shown (trigger prompts) | in two-object prompts (named first / second) "
          "| ordinary prompts: base accuracy | with the adapter loaded |")
    print("|---|---|---|---|---|")
    for name, text in shown.items():
        print(f"| {name} | {text} | {two_objects[name]} | {plain:.2f} "
              f"| {accuracy([(str(folder / f'{name}.safetensors'), 1.0)]):.2f} |")


if __name__ == "__main__":
    main()
