"""Can the VAE carry each shape through a round trip, drawn small beside another object?

    .venv/bin/python -m bench.codec [--model DIR] [--n 24]

Two-object scenes with the tested shape on the left (varied colors, textures, backgrounds and partners) are
encoded and decoded; the left object is read by the evaluator (``studio.eval.two_objects``) before and after.
A shape the decoder cannot draw small is one no adapter can produce in a two-object image.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pipelines.loading import load_base
from studio.data import procedural
from studio.eval.domain import DomainEvaluator
from studio.eval.two_objects import read_two_objects


@torch.no_grad()
def round_trip(vae, images: np.ndarray) -> np.ndarray:
    """Encode (posterior mean) and decode uint8 images."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(vae.dtype) / 127.5 - 1
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
    return ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model folder (default: the embedded model)")
    parser.add_argument("--n", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, evaluator = load_base(args.model), DomainEvaluator.load()
    colors, backgrounds, rng = list(procedural.COLORS), list(procedural.BACKGROUNDS), np.random.default_rng(1)
    print(f"n = {args.n} two-object scenes per shape (base: {args.model or 'embedded'}); left object")
    print("| shape | rendered | VAE round trip |")
    print("|---|---|---|")
    for shape in procedural.RESERVED_SHAPES + procedural.BASE_SHAPES:
        images, pair_colors, pair_backgrounds = [], [], []
        for i in range(args.n):
            c1, c2, background = colors[i % 6], colors[(i + 2) % 6], backgrounds[i % 3]
            left = (c1, procedural.BASE_TEXTURES[i % 4], shape)
            right = (c2, "solid", procedural.BASE_SHAPES[(i + 1) % 6])
            images.append(procedural.render_pair(procedural.jittered_pair(rng, left, right, background)))
            pair_colors.append((c1, c2))
            pair_backgrounds.append(background)
        rates = []
        for batch in (np.stack(images), round_trip(base.pipe.vae, np.stack(images))):
            readings, _ = read_two_objects(evaluator, batch, pair_colors, pair_backgrounds)
            rates.append(np.mean([r[0] is not None and r[0].shape == shape for r in readings]))
        print(f"| {shape} | {rates[0]:.2f} | {rates[1]:.2f} |")


if __name__ == "__main__":
    main()
