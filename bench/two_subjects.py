"""Two subjects in one image: CLoRA against Merge, Switch, Composite and CMLoRA, and CLoRA's mask accuracy.

    .venv/bin/python -m bench.two_subjects [--n 60]

Adapters: the demo content adapters ``sks-moon`` and ``xyz-cross`` (the two reserved shapes). Prompt
"a {c1} {texture} sks and a {c2} {texture} xyz on a {background} background" with two distinct colors (the
domain's captions always name a texture; ``--texture ''`` leaves it out, as the first sessions' table did). The
two-object reading uses the domain's colors (``studio.eval.two_objects``): each object is found by its color
and read alone by the domain evaluator. A subject is present when its color region covers ≥ 20 pixels and reads
as its shape; "both" needs both, "omission" exactly one. CLoRA's masks are compared with the color regions (IoU
at 64 px; a mask is the adapter's own concept mask, before any filling).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pipelines.loading import load_base
from studio.adapters.library import SHIPPED
from studio.data import procedural
from studio.eval.domain import DomainEvaluator
from studio.eval.two_objects import read_two_objects

PAIRS = (("red", "blue"), ("blue", "yellow"), ("green", "purple"), ("yellow", "purple"), ("orange", "blue"),
         ("purple", "green"))
#: row label → (method, method options given the two colors). CLoRA as the paper sets it (concept groups = the
#: triggers), with the objects' colors as concept groups (the words the base knows, as the paper's class nouns),
#: and with the adapters' mean instead of the base prompt filling what no mask covers.
METHODS = {
    "merge": ("merge", lambda c1, c2: {}),
    "switch": ("switch", lambda c1, c2: {}),
    "composite": ("composite", lambda c1, c2: {}),
    "cmlora": ("cmlora", lambda c1, c2: {}),
    "clora": ("clora", lambda c1, c2: {}),
    "clora-colors": ("clora", lambda c1, c2: {"groups": [[c1], [c2]]}),
    "clora-colors-adapters": ("clora", lambda c1, c2: {"groups": [[c1], [c2]], "uncovered": "adapters"}),
}


def mask_iou(mask: torch.Tensor, region: np.ndarray) -> float:
    """IoU of a CLoRA mask (latent resolution, first sample) upsampled to the image, against a color region."""
    big = torch.nn.functional.interpolate(mask[:1, None].float(), size=region.shape)[0, 0].numpy() > 0.5
    union = (big | region).sum()
    return float((big & region).sum() / union) if union else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default=None, help="base model folder (default: the embedded model)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--texture", default="solid", help="texture word of both objects ('' for none)")
    parser.add_argument("--adapters", default=str(SHIPPED), help="folder with sks-moon and xyz-cross")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, evaluator = load_base(args.model), DomainEvaluator.load()
    folder = Path(args.adapters)
    adapters = [(str(folder / "sks-moon.safetensors"), 1.0), (str(folder / "xyz-cross.safetensors"), 1.0)]
    backgrounds = list(procedural.BACKGROUNDS)
    cases = [(*PAIRS[i % len(PAIRS)], backgrounds[(i // len(PAIRS)) % 3]) for i in range(args.n)]
    texture = f"{args.texture} " if args.texture else ""
    template = f"a {{c1}} {texture}sks and a {{c2}} {texture}xyz on a {{background}} background"
    print(f"n = {args.n}, {args.steps} steps; '{template}'")
    print("| method | both subjects | omission (one drawn) | moon | cross | CLoRA mask IoU (sks / xyz) |")
    print("|---|---|---|---|---|---|")
    for row in args.methods.split(","):
        method, options = METHODS[row]
        present, ious = [], []
        for seed, (c1, c2, background) in enumerate(cases):
            image = base.pipe(template.format(c1=c1, c2=c2, background=background), adapters=adapters,
                              method=method, method_options=options(c1, c2), num_inference_steps=args.steps,
                              guidance_scale=base.default_guidance_scale,
                              generator=torch.Generator().manual_seed(seed), output_type="np").images
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            readings, regions = read_two_objects(evaluator, image, [(c1, c2)], [background])
            present.append([r is not None and r.shape == shape for r, shape in zip(readings[0], ("moon", "cross"))])
            if method == "clora":
                masks = list(base.pipe.last_masks.values())[:2]
                ious.extend(mask_iou(mask, region) for mask, region in zip(masks, regions[0]))
        hits = np.array(present)
        iou = (f"{np.mean(ious[0::2]):.2f} / {np.mean(ious[1::2]):.2f}" if ious else "—")
        print(f"| {row} | {np.mean(hits.all(1)):.2f} | {np.mean(hits.sum(1) == 1):.2f} | {hits[:, 0].mean():.2f} | "
              f"{hits[:, 1].mean():.2f} | {iou} |")


if __name__ == "__main__":
    main()
