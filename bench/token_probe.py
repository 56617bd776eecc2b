"""Where the base reads an object's shape: from its own shape token, or from the tokens after it.

    .venv/bin/python -m bench.token_probe --model DIR [--n 24]

Two two-object prompts A and B differ only in the first object's shape ("a red solid star and a blue solid circle"
against "a red solid heart and …"). The text encoder is causal, so the encodings agree up to the shape token and
differ from there on. Generating from A's encoding with B's shape-token vector swapped in, or with B's later
vectors swapped in, shows which part the UNet reads the first shape from. An adapter that acts on its trigger
token's keys and values can only steer the first kind of reading.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pipelines.loading import load_base
from studio.data import procedural
from studio.eval.domain import DomainEvaluator
from studio.eval.prompt_following import generate_batch
from studio.eval.two_objects import read_two_objects


def probe_cases(n: int) -> list[tuple[str, str, str, str, str, str]]:
    """(color 1, color 2, shape A, shape B, partner shape, background), with A, B and the partner all distinct."""
    shapes, colors, backgrounds = procedural.BASE_SHAPES, list(procedural.COLORS), list(procedural.BACKGROUNDS)
    cases = []
    for i in range(n):
        a, b = shapes[i % 6], shapes[(i + 1 + (i // 6) % 4) % 6]
        partner = next(s for k in range(6) for s in [shapes[(i + 2 + k) % 6]] if s not in (a, b))
        cases.append((colors[i % 6], colors[(i + 2) % 6], a, b, partner, backgrounds[i % 3]))
    return cases


def spliced(target: torch.Tensor, source: torch.Tensor, index: int | slice) -> torch.Tensor:
    """``target``'s encodings with the token vectors at ``index`` taken from ``source``."""
    out = target.clone()
    out[:, index] = source[:, index]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model folder (default: the embedded model)")
    parser.add_argument("--n", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, evaluator = load_base(args.model), DomainEvaluator.load()
    pipe = base.pipe
    cases = probe_cases(args.n)
    texts = {key: [procedural.pair_caption((c1, "solid", a if key == "A" else b), (c2, "solid", partner), background)
                   for c1, c2, a, b, partner, background in cases] for key in ("A", "B")}
    with torch.no_grad():
        embeds = {key: pipe.encode_texts(prompts)[0] for key, prompts in texts.items()}
    position = 4  # <start> a {color} solid {shape}
    a, b = embeds["A"], embeds["B"]
    variants = {"A": a, "B": b, "A, B's shape token": spliced(a, b, position),
                "A, B's later tokens": spliced(a, b, slice(position + 1, None))}
    print(f"n = {len(cases)} prompt pairs; first object's shape as read (base: {args.model or 'embedded'})")
    print("| text encoding | reads A's shape | reads B's shape |")
    print("|---|---|---|")
    for name, hidden in variants.items():
        images = np.concatenate([generate_batch(base, None, range(start, start + len(chunk)), prompt_embeds=chunk)
                                 for start, chunk in zip(range(0, len(hidden), 12), hidden.split(12))])
        readings, _ = read_two_objects(evaluator, images, [c[:2] for c in cases], [c[5] for c in cases])
        first = [r[0].shape if r[0] is not None else None for r in readings]
        print(f"| {name} | {np.mean([s == c[2] for s, c in zip(first, cases)]):.2f} | "
              f"{np.mean([s == c[3] for s, c in zip(first, cases)]):.2f} |")


if __name__ == "__main__":
    main()
