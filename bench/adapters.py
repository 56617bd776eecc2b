"""Demo adapters on the embedded model: does each show its concept, and does it spill into ordinary prompts?

    .venv/bin/python -m bench.adapters --n 50

Content adapter (sks-moon): the rate at which "a {color} {texture} sks on a {background} background" shows a
moon. Style adapter (zwx-zigzag): the rate at which "a {color} zwx {shape} on a {background} background" shows
zigzag. Spill: the base's all-attribute accuracy on ordinary prompts with each adapter loaded vs without.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from studio.adapters.library import SHIPPED
from studio.data import procedural
from studio.eval.domain import DomainEvaluator
from studio.eval.prompt_following import grid_cases
from studio.models import load_base

COLORS, BACKGROUNDS = list(procedural.COLORS), list(procedural.BACKGROUNDS)


def read(base, evaluator, prompts, adapter, steps):
    images = []
    for start in range(0, len(prompts), 25):
        chunk = prompts[start : start + 25]
        images.append(base.pipe(chunk, num_inference_steps=steps, guidance_scale=base.default_guidance_scale,
                                generator=[torch.Generator().manual_seed(start + i) for i in range(len(chunk))],
                                adapters=[(adapter, 1.0)] if adapter else None, output_type="np").images)
    return evaluator.read((np.clip(np.concatenate(images), 0, 1) * 255).round().astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--folder", default=str(SHIPPED), help="where sks-moon and zwx-zigzag are")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, evaluator = load_base(), DomainEvaluator.load()
    n = args.n
    folder = Path(args.folder)
    content, style = str(folder / "sks-moon.safetensors"), str(folder / "zwx-zigzag.safetensors")
    content_prompts = [procedural.caption(COLORS[i % 6], procedural.BASE_TEXTURES[i % 4], "sks", BACKGROUNDS[i % 3])
                       for i in range(n)]
    style_prompts = [procedural.caption(COLORS[i % 6], "zwx", procedural.BASE_SHAPES[i % 6], BACKGROUNDS[i % 3])
                     for i in range(n)]
    moon = np.mean([r.shape == "moon" for r in read(base, evaluator, content_prompts, content, args.steps)])
    zigzag = np.mean([r.texture == "zigzag" for r in read(base, evaluator, style_prompts, style, args.steps)])
    cases = grid_cases(n, held_out=False, seed=21)
    prompts = [c.prompt for c in cases]

    def accuracy(adapter):
        readings = read(base, evaluator, prompts, adapter, args.steps)
        return np.mean([all(getattr(r, k) == getattr(c, k) for k in ("color", "texture", "shape", "background"))
                        for r, c in zip(readings, cases)])

    plain, with_content, with_style = accuracy(None), accuracy(content), accuracy(style)
    print(f"model build step {(base.domain or {}).get('build_step')}, {n} generations each, {args.steps} steps")
    print("| adapter | concept shown | base accuracy without trigger: without adapter | with adapter |")
    print("|---|---|---|---|")
    print(f"| sks-moon (content) | {moon:.2f} moon | {plain:.2f} | {with_content:.2f} |")
    print(f"| zwx-zigzag (style) | {zigzag:.2f} zigzag | {plain:.2f} | {with_style:.2f} |")


if __name__ == "__main__":
    main()
