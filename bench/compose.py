"""Composition benchmark: speed and quality of Merge, Switch, Composite, CMLoRA and CLoRA for N = 1…4 adapters.

    .venv/bin/python -m bench.compose speed   [--steps 20] [--repeats 3]
    .venv/bin/python -m bench.compose quality [--seeds 100]
    .venv/bin/python -m bench.compose loaded  [--loaded 20 --active 2]

speed: wall time of one image relative to a single-LoRA image (same seed and steps), UNet sample-evaluations per
step and peak memory, measured side by side in one run. quality: the rate at which every concept of the
composed adapters appears (domain evaluator), over seeds × colors/backgrounds, with the demo content and style
adapters (and a third, a second style). loaded: time per step with many adapters attached but few active.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from bench.measure import measured
from studio.adapters.library import SHIPPED
from studio.data import procedural
from studio.eval.domain import DomainEvaluator
from studio.models import load_base

METHODS = ("merge", "switch", "composite", "cmlora", "clora")


def demo_adapters() -> list[str]:
    found = sorted(str(p) for p in SHIPPED.glob("*.safetensors"))
    if len(found) < 2:
        raise SystemExit("needs the demo adapters in assets/adapters (studio build-demo-adapters)")
    return found


def run(pipe, prompt: str, adapters, method: str, steps: int, seed: int, **options):
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                adapters=adapters, method=method, output_type="np", **options).images


def speed(args) -> None:
    """Each method timed alternately with the single-LoRA reference (same seed and steps); ratio of medians."""
    import statistics

    base = load_base(args.model)
    pipe = base.pipe
    files = demo_adapters()
    adapters_by_n = {n: [(files[i % len(files)], 1.0) for i in range(n)] for n in (1, 2, 3, 4)}
    prompt = "a red zwx sks on a white background"
    for n in (1, 2, 3, 4):  # warm-up: load every adapter once
        run(pipe, prompt, adapters_by_n[n], "merge", 2, 0)
    print(f"{args.steps} steps, {args.repeats} alternating repeats, {base.device}")
    print("| N | method | time ÷ single LoRA | UNet evaluations / step | block evaluations / step | RSS growth MiB |")
    print("|---|---|---|---|---|---|")
    for n, method in itertools.product((1, 2, 3, 4), METHODS):
        if method == "clora" and n < 2:
            continue
        reference, timings, peak = [], [], 0
        for r in range(args.repeats):
            start = time.perf_counter()
            run(pipe, prompt, adapters_by_n[1], "merge", args.steps, r)
            reference.append(time.perf_counter() - start)
            with measured(base.device) as m:
                run(pipe, prompt, adapters_by_n[n], method, args.steps, r)
            timings.append(m.seconds)
            peak = max(peak, m.peak_bytes)
        stats = pipe.last_stats
        ratio = statistics.median(timings) / statistics.median(reference)
        print(f"| {n} | {method} | {ratio:.2f} | {stats.samples / args.steps:.1f} | "
              f"{stats.block_evaluations / args.steps:.1f} | {peak / 2**20:.0f} |")


def quality(args) -> None:
    base = load_base(args.model)
    evaluator = DomainEvaluator.load()
    content, style = demo_adapters()[:2]
    sets = {2: [(content, 1.0), (style, 1.0)]}
    colors, backgrounds = list(procedural.COLORS), list(procedural.BACKGROUNDS)
    print("| N | method | all concepts present | shape | texture | n |")
    print("|---|---|---|---|---|---|")
    for n, adapters in sets.items():
        for method in METHODS:
            hits, shapes, textures = [], [], []
            for seed in range(args.seeds):
                color, background = colors[seed % len(colors)], backgrounds[(seed // len(colors)) % 3]
                prompt = f"a {color} zwx sks on a {background} background"
                image = run(base.pipe, prompt, adapters, method, args.steps, seed)
                reading = evaluator.read((np.clip(image, 0, 1) * 255).astype(np.uint8))[0]
                shapes.append(reading.shape == "moon")
                textures.append(reading.texture == "zigzag")
                hits.append(shapes[-1] and textures[-1])
            print(f"| {n} | {method} | {np.mean(hits):.2f} | {np.mean(shapes):.2f} | {np.mean(textures):.2f} | "
                  f"{args.seeds} |")


def loaded(args) -> None:
    """Time per step with ``--loaded`` adapters attached and ``--active`` of them composed (diffusers #11816)."""
    base = load_base(args.model)
    files = demo_adapters()
    active = [(files[i % len(files)], 1.0) for i in range(args.active)]
    prompt = "a red zwx sks on a white background"
    run(base.pipe, prompt, active, "merge", 2, 0)
    timings = {}
    for count in (args.active, args.loaded):
        base.pipe.max_loaded_adapters = max(count, args.active)
        from studio.adapters.file import read_adapter
        from studio.adapters.inject import attach_adapter, attached_adapters

        while len(attached_adapters(base)) < count:
            attach_adapter(base, read_adapter(files[0]), f"extra{len(attached_adapters(base))}")
        start = time.perf_counter()
        for r in range(args.repeats):
            run(base.pipe, prompt, active, "composite", args.steps, r)
        timings[count] = (time.perf_counter() - start) / (args.repeats * args.steps)
    print(f"time per step with {args.active} loaded: {timings[args.active] * 1000:.1f} ms; with {args.loaded} "
          f"loaded, {args.active} active: {timings[args.loaded] * 1000:.1f} ms "
          f"({timings[args.loaded] / timings[args.active]:.3f}×)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["speed", "quality", "loaded"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--loaded", type=int, default=20)
    parser.add_argument("--active", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    {"speed": speed, "quality": quality, "loaded": loaded}[args.part](args)


if __name__ == "__main__":
    main()
