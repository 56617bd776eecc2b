"""``studio build-demo-adapters``: the demo adapters shipped in ``assets/adapters``.

* ``sks-moon``: a content adapter for the reserved shape "moon", trigger ``sks``, from 40 renders in varied
  colors, textures and backgrounds, 32 of them showing the moon beside an ordinary object ("a {color} {texture}
  sks on a {background} background", "a … sks and a … {shape} on a …").
* ``zwx-zigzag``: a style adapter for the reserved texture "zigzag", trigger ``zwx``, from 6 renders of varied
  shapes ("a {color} zwx {shape} on a {background} background").
* ``xyz-cross``: a second content adapter, for the other reserved shape "cross" (trigger ``xyz``), so that two
  subjects can be composed in one image (CLoRA) and three adapters at once.

All are plain rank-8 LoRAs from the shared trainer with prior preservation on ordinary domain prompts; each
kind's :data:`RECIPES` entry says what it trains and on how many images.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from studio.data import procedural
from trainers import TrainConfig, get_method, train

DEMO_DIR = Path(__file__).resolve().parents[2] / "assets" / "adapters"
#: Cross-attention keys and values only (as Custom Diffusion): they see the text, so a new trigger changes little
#: else. The demo adapters used them on the first base (single objects, build step 4,000).
KEYS_VALUES = ("attn2.to_k", "attn2.to_v")
#: Every attention projection and the ResNet convolutions. On the two-object base (build step 24,000) the keys and
#: values alone no longer carried a concept: the base reads an object's attributes from the words after it, which
#: a trigger's keys and values do not reach (moon in two-object prompts 0.00-0.17; zigzag 0.42, n = 50). With
#: these the moon appears in 0.98 / 0.78 of two-object prompts and zigzag in 1.00 of style prompts (n = 30; at lr
#: 5e-4, 0.70, with the same cost to ordinary prompts).
WIDE = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


@dataclass(frozen=True)
class DemoRecipe:
    """How a demo adapter of one kind is trained: ``pairs`` of its ``images`` show two objects."""

    learning_rate: float
    target_modules: tuple[str, ...]
    images: int = 6
    pairs: int = 0
    steps: int = 400


RECIPES = {"content": DemoRecipe(1e-3, WIDE, images=40, pairs=32, steps=1200),
           "style": DemoRecipe(1e-3, WIDE)}
#: (name, trigger, reserved concept, kind) of each demo adapter.
DEMOS = (("sks-moon", "sks", "moon", "content"), ("zwx-zigzag", "zwx", "zigzag", "style"),
         ("xyz-cross", "xyz", "cross", "content"))


def render_demo_images(folder: Path, kind: str, count: int = 6, seed: int = 0, trigger: str | None = None,
                       concept: str | None = None, pairs: int = 0) -> Path:
    """Training images with captions: a reserved shape (content) or texture (style) under its trigger
    (by default the first demo adapter of that kind). For content, the last ``pairs`` images show the subject
    beside an ordinary object (two-object scenes, caption in left-to-right order), so the adapter also learns the
    subject small and in company, as a real subject set shows it in several settings."""
    default = next(d for d in DEMOS if d[3] == kind)
    trigger, concept = trigger or default[1], concept or default[2]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colors, backgrounds = list(procedural.COLORS), list(procedural.BACKGROUNDS)
    for index in range(count):
        color, background = colors[index % len(colors)], backgrounds[index % len(backgrounds)]
        texture = procedural.BASE_TEXTURES[index % len(procedural.BASE_TEXTURES)]
        if kind == "content" and index >= count - pairs:
            other = (colors[(index + 3) % len(colors)], procedural.BASE_TEXTURES[(index + 1) % 4],
                     procedural.BASE_SHAPES[index % len(procedural.BASE_SHAPES)])
            subject = (color, texture, concept)
            left, right = (subject, other) if index % 2 == 0 else (other, subject)
            pair = procedural.jittered_pair(rng, left, right, background)
            image = procedural.render_pair(pair)
            named = [(c, t, trigger if s == concept else s) for c, t, s in (left, right)]
            caption = procedural.pair_caption(named[0], named[1], background)
        elif kind == "content":
            image = procedural.render(procedural.jittered_scene(rng, color, texture, concept, background))
            caption = procedural.caption(color, texture, trigger, background)
        else:
            shape = procedural.BASE_SHAPES[index % len(procedural.BASE_SHAPES)]
            image = procedural.render(procedural.jittered_scene(rng, color, concept, shape, background))
            caption = procedural.caption(color, trigger, shape, background)
        Image.fromarray(image).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(caption)
    return folder


def build_demo_adapters(output_dir: Path = DEMO_DIR, seed: int = 0, base=None, only: list[str] | None = None,
                        **overrides) -> list[Path]:
    """Train the demo adapters (``only`` those named) on the embedded model with their kind's :data:`RECIPES`
    (``overrides`` replace recipe fields for every adapter, e.g. ``steps=1``); returns the written files."""
    written = []
    with tempfile.TemporaryDirectory(prefix="studio-demo-") as tmp:  # training images and class images
        work = Path(tmp)
        for name, trigger, concept, kind in DEMOS:
            if only and name not in only:
                continue
            recipe = replace(RECIPES[kind], **overrides)
            folder = render_demo_images(work / name, kind, count=recipe.images, seed=seed, trigger=trigger,
                                        concept=concept, pairs=recipe.pairs)
            config = TrainConfig(images=folder, output=name, output_dir=work / "out", kind=kind,
                                 trigger_words=[trigger], rank=8, max_train_steps=recipe.steps, train_batch_size=4,
                                 seed=seed, learning_rate=recipe.learning_rate, target_modules=recipe.target_modules,
                                 with_prior_preservation=True, prior_loss_weight=1.0, num_class_images=96,
                                 lr_scheduler="cosine", lr_warmup_steps=20)
            [path] = train(config, get_method("lora"), base=base).outputs
            output_dir.mkdir(parents=True, exist_ok=True)
            written.append(Path(shutil.move(path, output_dir / path.name)))
    return written
