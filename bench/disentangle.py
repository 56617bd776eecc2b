"""Content/style disentanglement on the embedded model: Break-for-Make vs merged LoRAs, and DECOR's leakage.

    .venv/bin/python -m bench.disentangle b4m     [--n 100]   # B4M made adapter vs a merged plain-LoRA pair
    .venv/bin/python -m bench.disentangle leakage [--n 100]   # style-adapter shape leakage, DECOR train/inference

b4m: 5 content images (the reserved shape "moon", trigger sks) and 5 style images (the reserved texture
"zigzag", trigger zwx); "a {color} zwx sks on a {background} background" over n seeds: the rate at which moon AND
zigzag appear, for B4M's made adapter (PLP halves on ``--b4m_targets``) and for the two plain LoRAs (trained on
the same images with ``--recipe``) merged at 1.0/1.0. Wall time of the whole B4M pipeline is printed.

leakage: a style adapter trained on 5 zigzag *circles* captioned "a {color} zwx shape on a {background}
background" is prompted with the other shapes; leakage is the rate at which it still draws a circle. Trained
with and without DECOR (``decor_remove=["circle"]``), then the α sweep of DECOR at inference on the plain
adapter: leakage vs prompt accuracy (shape, color and background as asked).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.measure import read_generations
from frontends.build.demo_adapters import KEYS_VALUES, WIDE, render_demo_images
from pipelines.loading import load_base
from studio.data import procedural
from studio.eval.domain import DomainEvaluator
from trainers import TrainConfig, get_method, train
from trainers.b4m import PRIORS, RESNET_TARGETS, TARGETS, B4MConfig, train_b4m

COLORS, BACKGROUNDS = list(procedural.COLORS), list(procedural.BACKGROUNDS)


#: LoRA recipes: cross-attention keys and values (content at lr 2e-3), every attention projection at lr 1e-3,
#: and every attention projection plus the ResNet convolutions at lr 1e-3 (the demo adapters' targets).
RECIPES = {"kv": {"content": {"learning_rate": 2e-3, "target_modules": KEYS_VALUES},
                  "style": {"learning_rate": 3e-3, "target_modules": KEYS_VALUES}},
           "all_attention": {kind: {"learning_rate": 1e-3, "target_modules": ("to_q", "to_k", "to_v", "to_out.0")}
                             for kind in ("content", "style")},
           "wide": {kind: {"learning_rate": 1e-3, "target_modules": WIDE} for kind in ("content", "style")}}
#: B4M's PLP layers: the paper's attention projections, or those and the ResNet convolutions.
B4M_TARGETS = {"attention": TARGETS, "attention+resnet": TARGETS + RESNET_TARGETS}


def lora(base, images: Path, kind: str, name: str, out: Path, steps: int, prior: bool = True,
         recipe: str = "kv", seed: int = 0, **extra) -> Path:
    """A plain rank-8 LoRA with one of the :data:`RECIPES`."""
    config = TrainConfig(images=images, output=name, output_dir=out, kind=kind, rank=8, max_train_steps=steps,
                         train_batch_size=4, seed=seed, with_prior_preservation=prior, num_class_images=96,
                         lr_scheduler="cosine", lr_warmup_steps=20, **RECIPES[recipe][kind], **extra)
    return train(config, get_method("lora"), base=base).outputs[0]


def b4m(args, base, evaluator, work: Path) -> None:
    content = render_demo_images(work / "content", "content", count=5)
    style = render_demo_images(work / "style", "style", count=5)
    start = time.perf_counter()
    config = TrainConfig(output="b4m", output_dir=work / "out", seed=args.seed, train_batch_size=4)
    content_file, style_file, made = train_b4m(B4MConfig(
        content=content, style=style, rank=args.rank, learning_rate=args.lr, aux_learning_rate=args.lr / 10,
        make_learning_rate=args.make_lr or args.lr, break_steps=args.break_steps, make_steps=args.make_steps,
        style_learning_rate=args.style_lr, target_modules=B4M_TARGETS[args.b4m_targets],
        make_optimizer=args.make_optimizer, prior=args.prior_layers), config, base=base)
    minutes = (time.perf_counter() - start) / 60
    plain_content = lora(base, content, "content", "lora-content", work / "out", args.lora_steps, recipe=args.recipe,
                         seed=args.seed)
    plain_style = lora(base, style, "style", "lora-style", work / "out", args.lora_steps, recipe=args.recipe,
                       seed=args.seed)
    prompts = [f"a {COLORS[i % 6]} zwx sks on a {BACKGROUNDS[(i // 6) % 3]} background" for i in range(args.n)]
    rows = {
        "B4M made adapter": [(str(made), 1.0)],
        "B4M content + style, merged 1.0/1.0": [(str(content_file), 1.0), (str(style_file), 1.0)],
        "plain LoRA content + style, merged 1.0/1.0": [(str(plain_content), 1.0), (str(plain_style), 1.0)],
    }
    print(f"B4M pipeline ({args.b4m_targets}, orthogonal prior on {args.prior_layers} layers, rank {args.rank}, "
          f"break {args.break_steps} + make {args.make_steps} steps ({args.make_optimizer}), lr {args.lr}, "
          f"style lr {args.style_lr or args.lr}, "
          f"make lr {args.make_lr or args.lr}, plain LoRAs {args.recipe} recipe, "
          f"5 + 5 images, training seed {args.seed}): {minutes:.1f} min on one CPU thread; n = {args.n}, "
          f"{args.steps} steps")
    print("| adapters | moon and zigzag | moon | zigzag |")
    print("|---|---|---|---|")
    for label, adapters in rows.items():
        readings = read_generations(base, evaluator, prompts, args.steps, adapters=adapters, method="merge")
        moon = np.array([r.shape == "moon" for r in readings])
        zigzag = np.array([r.texture == "zigzag" for r in readings])
        print(f"| {label} | {np.mean(moon & zigzag):.2f} | {moon.mean():.2f} | {zigzag.mean():.2f} |")


def circle_style_images(folder: Path, count: int = 5, caption: str = "shape") -> Path:
    """Zigzag circles only, captioned without their shape ("a red zwx shape on ...", or with ``caption="bare"``
    "a red zwx on ..."), as style references usually are: a style set whose content (circle) can leak into the
    trigger."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        color, background = COLORS[index % 6], BACKGROUNDS[index % 3]
        scene = procedural.jittered_scene(rng, color, "zigzag", "circle", background)
        Image.fromarray(procedural.render(scene)).save(folder / f"{index}.png")
        text = procedural.caption(color, "zwx", "shape", background)
        (folder / f"{index}.txt").write_text(text.replace(" shape", "") if caption == "bare" else text)
    return folder


def leakage(args, base, evaluator, work: Path) -> None:
    images = circle_style_images(work / "circles", count=args.images, caption=args.caption)
    plain = lora(base, images, "style", "style-plain", work / "out", args.lora_steps, prior=args.prior,
                 recipe=args.recipe, seed=args.seed)
    decor = lora(base, images, "style", "style-decor", work / "out", args.lora_steps, prior=args.prior,
                 recipe=args.recipe, seed=args.seed, decor_remove=["circle"])
    others = [s for s in procedural.BASE_SHAPES if s != "circle"]
    cases = [(COLORS[i % 6], others[i % len(others)], BACKGROUNDS[(i // 6) % 3]) for i in range(args.n)]
    prompts = [f"a {c} zwx {s} on a {b} background" for c, s, b in cases]

    def row(label: str, adapter: Path, **options) -> None:
        readings = read_generations(base, evaluator, prompts, args.steps, adapters=[(str(adapter), 1.0)], **options)
        leak = np.mean([r.shape == "circle" for r in readings])
        zigzag = np.mean([r.texture == "zigzag" for r in readings])
        right = np.mean([(r.shape, r.color, r.background) == (s, c, b) for r, (c, s, b) in zip(readings, cases)])
        print(f"| {label} | {leak:.2f} | {zigzag:.2f} | {right:.2f} |")

    print(f"style adapter trained on {args.images} zigzag circles ({args.caption} captions, {args.recipe} recipe, "
          f"{args.lora_steps} steps, {'with' if args.prior else 'without'} prior preservation), prompted with the "
          f"other shapes; training seed {args.seed}; n = {args.n}")
    print("| adapter | leakage (draws a circle) | zigzag | shape, color and background as asked |")
    print("|---|---|---|---|")
    row("plain LoRA", plain)
    row("LoRA trained with DECOR (remove 'circle')", decor)
    for alpha in (0.25, 0.5, 0.75, 1.0):
        row(f"plain LoRA, DECOR at inference α = {alpha}", plain, decor_remove=["circle"], decor_alpha=alpha)
    for alpha in (0.5, 1.0):
        row(f"LoRA trained with DECOR, DECOR at inference α = {alpha}", decor, decor_remove=["circle"],
            decor_alpha=alpha)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["b4m", "leakage"])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the training runs' seed (noise, timesteps, order)")
    parser.add_argument("--rank", type=int, default=16, help="B4M rank")
    parser.add_argument("--lr", type=float, default=1e-3, help="B4M main and make learning rate")
    parser.add_argument("--style_lr", type=float, default=None, help="B4M style break rate (default: --lr)")
    parser.add_argument("--make_lr", type=float, default=None, help="B4M make-stage rate (default: --lr)")
    parser.add_argument("--break_steps", type=int, default=300)
    parser.add_argument("--make_steps", type=int, default=300)
    parser.add_argument("--lora_steps", type=int, default=400)
    parser.add_argument("--prior", action=argparse.BooleanOptionalAction, default=True,
                        help="prior preservation for the plain LoRAs (--no-prior: the overfitting few-image case)")
    parser.add_argument("--caption", choices=["shape", "bare"], default="shape",
                        help='leakage: the circles\' captions, "a red zwx shape on …" or "a red zwx on …"')
    parser.add_argument("--images", type=int, default=5, help="leakage: how many zigzag circles the style set has")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="kv", help="the plain LoRAs' recipe")
    parser.add_argument("--make_optimizer", choices=["riemannian", "adamw"], default="riemannian")
    parser.add_argument("--prior_layers", choices=PRIORS, default="square",
                        help="B4M's orthogonal prior on square layers (the paper's) or on all layers")
    parser.add_argument("--b4m_targets", choices=sorted(B4M_TARGETS), default="attention",
                        help="the layers B4M's PLP halves adapt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, evaluator = load_base(), DomainEvaluator.load()
    with tempfile.TemporaryDirectory(prefix=f"studio-bench-{args.part}-") as work:
        {"b4m": b4m, "leakage": leakage}[args.part](args, base, evaluator, Path(work))


if __name__ == "__main__":
    main()
