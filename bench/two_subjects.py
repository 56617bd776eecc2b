"""Two subjects in one image: CLoRA against Merge, Switch, Composite and CMLoRA, and CLoRA's mask accuracy.

    .venv/bin/python -m bench.two_subjects [--n 60]

Adapters: the demo content adapters ``sks-moon`` and ``xyz-cross`` (the two reserved shapes). Prompt
"a {c1} sks and a {c2} xyz on a {background} background" with two distinct colors. The two-object reading uses
the domain's colors: every pixel is assigned to c1, c2 or the background by its distance to each color's shade
line (textures only darken a color), and each object's region, alone on the background, is read by the domain
evaluator. A subject is present when its color region covers ≥ 20 pixels and reads as its shape; "both" needs
both, "omission" exactly one. CLoRA's masks are compared with the color regions (IoU at 64 px).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from studio.adapters.library import SHIPPED
from studio.data import procedural
from studio.eval.domain import DomainEvaluator
from studio.models import load_base

PAIRS = (("red", "blue"), ("blue", "yellow"), ("green", "purple"), ("yellow", "purple"), ("orange", "blue"),
         ("purple", "green"))
METHODS = ("merge", "switch", "composite", "cmlora", "clora")
MIN_PIXELS = 20


def color_regions(image: np.ndarray, colors: tuple[str, str], background: str) -> list[np.ndarray]:
    """Boolean H×W masks of the pixels nearest each color's shade line (k·rgb, k ∈ [shade, 1])."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    distances = []
    for name in colors:
        rgb = np.asarray(procedural.COLORS[name], dtype=np.float32)
        k = np.clip(pixels @ rgb / (rgb @ rgb), procedural._SHADE, 1.0)
        distances.append(np.linalg.norm(pixels - k[:, None] * rgb, axis=1))
    distances.append(np.linalg.norm(pixels - np.asarray(procedural.BACKGROUNDS[background], np.float32), axis=1))
    label = np.argmin(np.stack(distances), axis=0)
    return [(label == i).reshape(image.shape[:2]) for i in range(len(colors))]


def isolate(image: np.ndarray, region: np.ndarray, background: str) -> np.ndarray:
    out = np.empty_like(image)
    out[:] = procedural.BACKGROUNDS[background]
    out[region] = image[region]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, evaluator = load_base(), DomainEvaluator.load()
    adapters = [(str(SHIPPED / "sks-moon.safetensors"), 1.0), (str(SHIPPED / "xyz-cross.safetensors"), 1.0)]
    backgrounds = list(procedural.BACKGROUNDS)
    cases = [(*PAIRS[i % len(PAIRS)], backgrounds[(i // len(PAIRS)) % 3]) for i in range(args.n)]
    print(f"n = {args.n}, {args.steps} steps; 'a {{c1}} sks and a {{c2}} xyz on a {{background}} background'")
    print("| method | both subjects | omission (one drawn) | moon | cross | CLoRA mask IoU (sks / xyz) |")
    print("|---|---|---|---|---|---|")
    for method in METHODS:
        present, ious = [], []
        for seed, (c1, c2, background) in enumerate(cases):
            image = base.pipe(f"a {c1} sks and a {c2} xyz on a {background} background", adapters=adapters,
                              method=method, num_inference_steps=args.steps,
                              guidance_scale=base.default_guidance_scale,
                              generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            regions = color_regions(image, (c1, c2), background)
            readings = evaluator.read(np.stack([isolate(image, r, background) for r in regions]))
            present.append([r.sum() >= MIN_PIXELS and reading.shape == shape
                            for r, reading, shape in zip(regions, readings, ("moon", "cross"))])
            if method == "clora":
                masks = list(base.pipe.last_masks.values())[:2]
                for mask, region in zip(masks, regions):
                    big = torch.nn.functional.interpolate(mask[:1, None].float(), size=region.shape)[0, 0] > 0.5
                    union = (big.numpy() | region).sum()
                    ious.append((big.numpy() & region).sum() / union if union else 0.0)
        hits = np.array(present)
        iou = (f"{np.mean(ious[0::2]):.2f} / {np.mean(ious[1::2]):.2f}" if ious else "—")
        print(f"| {method} | {np.mean(hits.all(1)):.2f} | {np.mean(hits.sum(1) == 1):.2f} | {hits[:, 0].mean():.2f} | "
              f"{hits[:, 1].mean():.2f} | {iou} |")


if __name__ == "__main__":
    main()
