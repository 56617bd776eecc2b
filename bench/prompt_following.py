"""Prompt following of a base model on the embedded domain, read by the domain evaluator.

    .venv/bin/python -m bench.prompt_following --n 300 [--pairs 100] [--model SPEC] [--steps 20] [--guidance 5]
    .venv/bin/python -m bench.prompt_following --guidance 1,2,3,5,7.5 --n 300 [--partial 0.3] [--plot FILE.png]

With one guidance scale: a table of seen and held-out combinations and the two-object prompts. With several: a
guidance sweep, per-attribute accuracy on the same seen prompts and seeds at each scale (``--partial P`` leaves
each attribute out of the prompts with probability P, scoring only what they name; ``--plot`` draws the curves).
``--json`` writes the tables.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import Image, ImageDraw

from pipelines.loading import load_base
from studio.eval.domain import DomainEvaluator
from studio.eval.prompt_following import measure_guidance_sweep, measure_pair_following, measure_prompt_following


def _scales(text: str) -> list[float]:
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"guidance scales are numbers separated by commas, got {text!r}") from None
    if not scales:
        raise argparse.ArgumentTypeError("give at least one guidance scale")
    return scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="seen prompts (held-out: n/3)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=_scales, default=None, help="one scale, or several for a sweep: 1,2,3,5")
    parser.add_argument("--partial", type=float, default=0.0,
                        help="sweep only: probability of leaving each attribute out of a prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=100, help="two-object prompts (not in a sweep)")
    parser.add_argument("--json", default=None, help="write the table here")
    parser.add_argument("--plot", default=None, help="sweep only: draw accuracy against guidance into this PNG")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_base(args.model, device="cpu")
    evaluator = DomainEvaluator.load()
    start = time.time()
    if args.guidance is not None and len(args.guidance) > 1:
        tables = {"sweep": measure_guidance_sweep(base, evaluator, args.guidance, n=args.n, seed=args.seed,
                                                  steps=args.steps, drop_attribute=args.partial)}
        _print_header(base, start)
        print(f"seen combinations, n = {args.n} per scale, attributes left out with p = {args.partial}")
        print("| guidance | color | texture | shape | background | all named |")
        print("|---|---|---|---|---|---|")
        for row in tables["sweep"]:
            print(f"| {row['guidance']:g} | {row['color']:.2f} | {row['texture']:.2f} | {row['shape']:.2f} | "
                  f"{row['background']:.2f} | {row['all']:.2f} |")
        if args.plot:
            _plot(tables["sweep"], args.plot)
    else:
        guidance = None if args.guidance is None else args.guidance[0]
        tables = measure_prompt_following(base, evaluator, n=args.n, seed=args.seed, steps=args.steps,
                                          guidance_scale=guidance)
        _print_header(base, start)
        print("| split | n | color | texture | shape | background | all four |")
        print("|---|---|---|---|---|---|---|")
        for split, row in tables.items():
            print(f"| {split} | {row['n']} | {row['color']:.2f} | {row['texture']:.2f} | {row['shape']:.2f} | "
                  f"{row['background']:.2f} | {row['all']:.2f} |")
        pairs = measure_pair_following(base, evaluator, n=args.pairs, seed=args.seed, steps=args.steps,
                                       guidance_scale=guidance)
        tables["pairs"] = pairs
        print(f"\ntwo objects (n = {pairs['n']}): shape {pairs['shape']:.2f}, color {pairs['color']:.2f} per object; "
              f"both objects right {pairs['both']:.2f}, only one {pairs['one']:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(tables, handle, indent=2)


_SERIES = {"color": (220, 30, 30), "texture": (30, 150, 50), "shape": (35, 75, 225), "background": (150, 150, 150),
           "all": (0, 0, 0)}


def _plot(rows: list[dict], path: str, width: int = 520, height: int = 300) -> None:
    """Accuracy (0–1) against guidance scale, one line per attribute and a thick one for all named."""
    left, right, top, bottom = 50, width - 120, 15, height - 40
    scales = [row["guidance"] for row in rows]
    low, high = min(scales), max(scales)

    def point(scale: float, value: float) -> tuple[float, float]:
        return (left + (scale - low) / (high - low or 1) * (right - left), bottom - value * (bottom - top))

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = point(low, tick)[1]
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((left - 35, y - 6), f"{tick:.2f}", fill="black")
    for scale in scales:
        x = point(scale, 0)[0]
        draw.text((x - 8, bottom + 6), f"{scale:g}", fill="black")
    draw.text(((left + right) / 2 - 25, bottom + 22), "guidance", fill="black")
    for i, (name, color) in enumerate(_SERIES.items()):
        points = [point(row["guidance"], row[name]) for row in rows if row[name] == row[name]]  # skip NaN
        if len(points) > 1:
            draw.line(points, fill=color, width=3 if name == "all" else 2)
        draw.line([(right + 15, top + 12 + 18 * i), (right + 35, top + 12 + 18 * i)], fill=color, width=3)
        draw.text((right + 40, top + 6 + 18 * i), "all named" if name == "all" else name, fill="black")
    image.save(path)


def _print_header(base, start: float) -> None:
    print(f"model {base.source} (build step {(base.domain or {}).get('build_step')}), {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
