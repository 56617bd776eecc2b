"""Composition benchmark: speed and quality of Merge, Switch, Composite, CMLoRA and CLoRA for N = 1…4 adapters.

    .venv/bin/python -m bench.compose speed   [--steps 20] [--repeats 3]
    .venv/bin/python -m bench.compose quality [--seeds 100] [--style decorrelated] [--n_values 2 3]
    .venv/bin/python -m bench.compose loaded  [--loaded 20 --active 2]
    python -m bench.compose speed --arch sd15   # SD 1.5 architecture, random weights and LoRAs, 512 px (GPU)

speed: wall time of one image relative to a single-LoRA image (same seed and steps), UNet sample-evaluations per
step and peak memory, measured side by side in one run. quality: the rate at which every concept of the
composed adapters appears (domain evaluator), over seeds × colors/backgrounds, with the demo content and style
adapters, and for N = 3 the second content adapter (xyz-cross) as a second subject. loaded: time per step with
many adapters attached but few active.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.measure import measured
from bench.random_sd import random_loras, sd15_folder
from bench.two_subjects import PAIRS
from frontends.build.demo_adapters import RECIPES, render_demo_images
from pipelines.attention_capture import capture_cross_attention
from pipelines.loading import load_base
from pipelines.methods import METHODS
from studio.adapters.file import read_adapter
from studio.adapters.inject import attach_adapter, attached_adapters, detach_adapter
from studio.adapters.library import SHIPPED
from studio.data import procedural
from studio.eval.domain import DomainEvaluator
from studio.eval.two_objects import read_two_objects
from trainers import TrainConfig, get_method, train
from trainers.b4m import RESNET_TARGETS, TARGETS, B4MConfig, train_b4m


def demo_adapters() -> list[str]:
    found = sorted(str(p) for p in SHIPPED.glob("*.safetensors"))
    if len(found) < 2:
        raise SystemExit("needs the demo adapters in assets/adapters (studio build-demo-adapters)")
    return found


def setup(args) -> tuple:
    """(base, adapter files, prompt): the embedded model and its demo adapters, or SD 1.5 with random LoRAs."""
    if args.arch == "tiny":
        return load_base(args.model), demo_adapters(), "a red zwx sks on a white background"
    work = Path(tempfile.mkdtemp(prefix="studio-bench-sd15-"))
    atexit.register(shutil.rmtree, work, True)  # trained files and models are for this run only
    base = load_base(sd15_folder(work / "model"))
    return base, random_loras(base, max(4, args.active), work), "a photo of a red moon in zigzag style"


def run(pipe, prompt: str, adapters, method: str, steps: int, seed: int, **options):
    """One composed image; the pipeline's output (``.images``, ``.stats``, …)."""
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                adapters=adapters, method=method, output_type="np", **SIZE, **options)


SIZE: dict[str, int] = {}  # height/width when --size is given


def speed(args) -> None:
    """Each method timed alternately with the single-LoRA reference (same seed and steps); ratio of medians."""
    base, files, prompt = setup(args)
    pipe = base.pipe
    adapters_by_n = {n: [(files[i % len(files)], 1.0) for i in range(n)] for n in (1, 2, 3, 4)}
    for n in (1, 2, 3, 4):  # warm-up: load every adapter once
        run(pipe, prompt, adapters_by_n[n], "merge", 2, 0)
    print(f"{base.family} model, {args.size or base.default_size} px, {args.steps} steps, {args.repeats} alternating "
          f"repeats, {base.device} ({torch.cuda.get_device_name() if base.device.type == 'cuda' else 'CPU'})")
    print("| N | method | time ÷ single LoRA | UNet evaluations / step | block evaluations / step | peak MiB |")
    print("|---|---|---|---|---|---|")
    for n, method in itertools.product((1, 2, 3, 4), METHODS):
        if method == "clora" and n < 2:
            continue
        reference, timings = [], []
        for r in range(args.repeats):
            for runs, adapters, name in ((reference, adapters_by_n[1], "merge"), (timings, adapters_by_n[n], method)):
                start = time.perf_counter()
                output = run(pipe, prompt, adapters, name, args.steps, r)
                runs.append(time.perf_counter() - start)
        stats = output.stats  # the last timed run's: the method under test
        # memory in a run of its own: on the CPU the RSS sampler thread would slow the timed runs
        with measured(base.device) as m:
            run(pipe, prompt, adapters_by_n[n], method, args.steps, 0)
        peak = m.peak_bytes
        ratio = statistics.median(timings) / statistics.median(reference)
        print(f"| {n} | {method} | {ratio:.2f} | {stats.samples / args.steps:.1f} | "
              f"{stats.block_evaluations / args.steps:.1f} | {peak / 2**20:.0f} |")


#: (row label, method, method options) of the quality table: every method, and CMLoRA without its feature cache.
QUALITY_ROWS = [(m, m, {}) for m in METHODS] + [("cmlora, no cache", "cmlora", {"use_cache": False})]


def decorrelated_style(base, work) -> str:
    """A zwx-zigzag style LoRA (the demo recipe) trained on 24 renders whose shapes and colours are decorrelated
    (each colour on four shapes, each shape in four colours), every shape named in its caption."""
    folder = Path(work) / "decorrelated"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colors, shapes, backgrounds = list(procedural.COLORS), procedural.BASE_SHAPES, list(procedural.BACKGROUNDS)
    for index in range(24):
        color, shape = colors[index % 6], shapes[(index + index // 6) % 6]
        background = backgrounds[(index // 2) % 3]
        Image.fromarray(procedural.render(procedural.jittered_scene(rng, color, "zigzag", shape, background))).save(
            folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(procedural.caption(color, "zwx", shape, background))
    recipe = RECIPES["style"]
    config = TrainConfig(images=folder, output="zwx-zigzag-decorrelated", output_dir=Path(work) / "out", kind="style",
                         trigger_words=["zwx"], rank=8, max_train_steps=recipe.steps, train_batch_size=4, seed=0,
                         learning_rate=recipe.learning_rate, target_modules=recipe.target_modules,
                         with_prior_preservation=True, prior_loss_weight=1.0, num_class_images=96,
                         lr_scheduler="cosine", lr_warmup_steps=20)
    return str(train(config, get_method("lora"), base=base).outputs[0])


def b4m_style(base, work) -> str:
    """Break-for-Make's style half (its style break run: learnable B half on the zigzag renders, auxiliary content
    sets on the A half), trained with the B4M bench's settings (``bench.disentangle b4m``: attention and ResNet
    layers, rank 16, orthogonal prior on all layers, 300 break steps, style at 3e-3, auxiliary sets at 1e-4)."""
    folder = Path(work)
    content = render_demo_images(folder / "content", "content", count=5)
    style = render_demo_images(folder / "style", "style", count=5)
    b4m = B4MConfig(content=content, style=style, rank=16, learning_rate=1e-3, style_learning_rate=3e-3,
                    aux_learning_rate=1e-4, break_steps=300, make_steps=0, target_modules=TARGETS + RESNET_TARGETS,
                    prior="all")
    _, style_file, _ = train_b4m(b4m, TrainConfig(output="b4m", output_dir=folder / "out", seed=0,
                                                  train_batch_size=4), base=base)
    return str(style_file)


STYLES = {"decorrelated": decorrelated_style, "b4m": b4m_style}  # --style: non-leaking style adapters


def quality(args) -> None:
    """N = 2: sks-moon + zwx-zigzag on "a {color} zwx sks on a {background} background" (moon and zigzag).
    N = 3: + xyz-cross on "a {c1} zwx sks and a {c2} xyz on …", read per color region (studio.eval.two_objects):
    the c1 region a zigzag moon and the c2 region a cross. ``--style decorrelated`` replaces the shipped style
    adapter (6 renders whose colour fixes the shape) with one trained on decorrelated renders, ``--style b4m``
    with B4M's style half. The base and each adapter alone on the N = 2 prompts come first: what each draws for the
    words it does not know (the base, the control, for both triggers)."""
    base = load_base(args.model)
    evaluator = DomainEvaluator.load()
    content, cross, style = (str(SHIPPED / f"{name}.safetensors") for name in ("sks-moon", "xyz-cross", "zwx-zigzag"))
    work = tempfile.mkdtemp(prefix="studio-bench-compose-")
    atexit.register(shutil.rmtree, work, True)
    if args.style in STYLES:
        style = STYLES[args.style](base, work)
    colors, backgrounds = list(procedural.COLORS), list(procedural.BACKGROUNDS)
    print(f"{args.seeds} seeds × colors × backgrounds, {args.steps} steps; style adapter: {args.style}")
    print("| N | method | all concepts present | moon | zigzag | cross (N = 3) | a base shape (circle…diamond) |")
    print("|---|---|---|---|---|---|---|")
    alone = [("base alone", []), ("sks-moon alone", [(content, 1.0)]), ("zwx-zigzag alone", [(style, 1.0)])]
    for n in args.n_values:
        adapters = [(content, 1.0), (style, 1.0)] + ([(cross, 1.0)] if n == 3 else [])
        rows_here = [(label, "merge", {}, single) for label, single in alone] if n == 2 else []
        rows_here += [(label, method, options, adapters) for label, method, options in QUALITY_ROWS
                      if label in args.methods]
        for label, method, options, used in rows_here:
            rows = []
            for seed in range(args.seeds):
                background = backgrounds[(seed // len(colors)) % 3]
                if n == 2:
                    color = colors[seed % len(colors)]
                    image = run(base.pipe, f"a {color} zwx sks on a {background} background", used, method,
                                args.steps, seed, method_options=options).images
                    reading = evaluator.read((np.clip(image, 0, 1) * 255).round().astype(np.uint8))[0]
                    rows.append((reading.shape == "moon", reading.texture == "zigzag", True,
                                 reading.shape in procedural.BASE_SHAPES))
                    continue
                c1, c2 = PAIRS[seed % len(PAIRS)]
                image = run(base.pipe, f"a {c1} zwx sks and a {c2} xyz on a {background} background", used,
                            method, args.steps, seed, method_options=options).images
                pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
                readings, _ = read_two_objects(evaluator, pixels, [(c1, c2)], [background])
                first, second = readings[0]
                rows.append((first is not None and first.shape == "moon",
                             first is not None and first.texture == "zigzag",
                             second is not None and second.shape == "cross",
                             first is not None and first.shape in procedural.BASE_SHAPES))
            hits = np.array(rows)
            cross_rate = f"{hits[:, 2].mean():.2f}" if n == 3 else "—"
            print(f"| {n} | {label} | {hits[:, :3].all(1).mean():.2f} | {hits[:, 0].mean():.2f} | "
                  f"{hits[:, 1].mean():.2f} | {cross_rate} | {hits[:, 3].mean():.2f} |", flush=True)


def loaded(args) -> None:
    """Time per step with ``--loaded`` adapters attached and ``--active`` of them composed (diffusers #11816);
    the two conditions alternate, extras attached and detached between runs, so drift hits both alike."""
    base, files, prompt = setup(args)
    active = [(files[i % len(files)], 1.0) for i in range(args.active)]
    run(base.pipe, prompt, active, "composite", 2, 0)
    base.pipe.max_loaded_adapters = max(args.loaded, args.active)
    extra = read_adapter(files[0])
    timings: dict[int, list[float]] = {args.active: [], args.loaded: []}
    for r in range(args.repeats):
        for count in (args.active, args.loaded):
            extras = [name for name in attached_adapters(base) if name.startswith("extra")]
            for name in extras[count - args.active:]:
                detach_adapter(base, name)
            while len(attached_adapters(base)) < count:
                attach_adapter(base, extra, f"extra{len(attached_adapters(base))}")
            start = time.perf_counter()
            run(base.pipe, prompt, active, "composite", args.steps, r)
            timings[count].append((time.perf_counter() - start) / args.steps)
    few, many = statistics.median(timings[args.active]), statistics.median(timings[args.loaded])
    print(f"{base.device}: time per step with {args.active} loaded: {few * 1000:.1f} ms; with {args.loaded} loaded, "
          f"{args.active} active: {many * 1000:.1f} ms ({many / few:.3f}×; medians of {args.repeats} alternations)")


def capture(args) -> None:
    """Cost of CLoRA's cross-attention capture: one UNet call (batch 2, the model's size) with and without the
    maps stored at the capture resolution, alternated; ratio of medians."""
    base = load_base(args.model)
    unet = base.pipe.unet
    size = (args.size or base.default_size) // base.pipe.vae_scale_factor
    latents = torch.randn(2, unet.config.in_channels, size, size, dtype=unet.dtype)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=unet.dtype)
    timestep = torch.tensor(500)
    timings: dict[bool, list[float]] = {False: [], True: []}
    with torch.no_grad():
        for _ in range(args.repeats * 20):
            for captured in (False, True):
                start = time.perf_counter()
                if captured:
                    with capture_cross_attention(unet, size) as store:
                        unet(latents, timestep, hidden)
                    store.mean()
                else:
                    unet(latents, timestep, hidden)
                timings[captured].append(time.perf_counter() - start)
    plain, captured = statistics.median(timings[False]), statistics.median(timings[True])
    print(f"UNet call at {size}×{size} latents, batch 2: {plain * 1000:.2f} ms plain, {captured * 1000:.2f} ms with "
          f"capture ({captured / plain:.3f}×; medians of {len(timings[False])} alternations)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["speed", "quality", "loaded", "capture"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--arch", choices=["tiny", "sd15"], default="tiny",
                        help="sd15: SD 1.5 architecture with random weights and random LoRAs (speed, loaded)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--loaded", type=int, default=20)
    parser.add_argument("--active", type=int, default=2)
    parser.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--style", choices=["shipped", *STYLES], default="shipped",
                        help="quality: the shipped zwx-zigzag, one trained on shape/colour-decorrelated renders, "
                             "or B4M's style half")
    parser.add_argument("--n_values", type=int, nargs="+", default=[2, 3], choices=[2, 3], help="quality: N")
    parser.add_argument("--methods", nargs="+", default=[label for label, _, _ in QUALITY_ROWS],
                        help="quality: which rows (methods, and 'cmlora, no cache')")
    args = parser.parse_args()
    if args.size:
        SIZE.update(height=args.size, width=args.size)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    {"speed": speed, "quality": quality, "loaded": loaded, "capture": capture}[args.part](args)


if __name__ == "__main__":
    main()
