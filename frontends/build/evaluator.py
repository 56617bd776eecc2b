"""Training of the embedded domain's evaluator (:mod:`studio.eval.domain`): freshly drawn examples, including the
reject examples (blobs, two-tone objects, blends, noise) and objects cut out as the two-object reader shows them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import save_file
from tqdm.auto import tqdm

from studio.data import procedural
from studio.eval.domain import (
    ATTRIBUTES,
    DEFAULT_EVALUATOR,
    DomainEvaluator,
    DomainEvaluatorNet,
    clean_render_accuracy,
    to_evaluator_tensor,
)
from studio.eval.two_objects import color_regions, object_view
from studio.files import atomic_write


def _blob(rng: np.random.Generator, center: tuple[float, float], radius: float) -> np.ndarray:
    """Coverage of an irregular smooth blob: the failure mode of an undertrained model's shapes."""
    s = 4
    harmonics = [(k, rng.uniform(0.12, 0.3) / k**0.5, rng.uniform(0, 2 * math.pi)) for k in range(2, 5)]
    points = []
    for i in range(72):
        angle = 2 * math.pi * i / 72
        r = radius * (0.85 + sum(a * math.sin(k * angle + phase) for k, a, phase in harmonics))
        points.append((s * (center[0] + r * math.cos(angle)), s * (center[1] + r * math.sin(angle))))
    canvas = Image.new("L", (64 * s, 64 * s), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    return np.asarray(canvas.resize((64, 64), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255.0


def _soften(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A light Gaussian blur 60% of the time: generated images are softer than renders."""
    if rng.random() < 0.6:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.0))))
    return image


def _augment(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Blur, noise and a little color drift, so generated (softer) images are read like renders."""
    out = _soften(rng, image).astype(np.float32)
    out += rng.normal(0, rng.uniform(0, 8), size=3)
    if rng.random() < 0.5:
        out += rng.normal(0, rng.uniform(0, 10), size=out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def training_example(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, int]]:
    """One evaluator training image and its labels (index ``len(values)`` = reject)."""
    reject = {name: len(values) for name, values in ATTRIBUTES.items()}
    combo = {name: str(rng.choice(values)) for name, values in ATTRIBUTES.items()}
    labels = {name: ATTRIBUTES[name].index(combo[name]) for name in ATTRIBUTES}
    scene = procedural.Scene(
        shape=combo["shape"], color=combo["color"], texture=combo["texture"], background=combo["background"],
        center=(32 + rng.uniform(-6, 6), 32 + rng.uniform(-6, 6)), radius=float(rng.uniform(17, 26)),
        phase=(float(rng.uniform(0, 12)), float(rng.uniform(0, 12))),
    )
    kind = rng.random()
    if kind < 0.52:
        image = procedural.render(scene)
    elif kind < 0.72:
        image = _pair_view(rng, scene)
    elif kind < 0.80:  # a blob: color, texture and background readable, shape not
        mask = _blob(rng, scene.center, scene.radius)
        image = _composite(scene, mask)
        labels["shape"] = reject["shape"]
    elif kind < 0.86:  # two-tone object: shape readable, color not
        other = str(rng.choice([c for c in procedural.COLORS if c != scene.color]))
        left = procedural.render(scene)
        right = procedural.render(procedural.with_attributes(scene, color=other))
        split = int(rng.integers(24, 40))
        image = left.copy()
        image[:, split:] = right[:, split:]
        labels["color"] = reject["color"]
    elif kind < 0.91:  # empty background
        image = np.broadcast_to(np.asarray(procedural.BACKGROUNDS[scene.background], np.uint8), (64, 64, 3)).copy()
        labels.update(shape=reject["shape"], color=reject["color"], texture=reject["texture"])
    elif kind < 0.96:  # two different objects blended: nothing but the background is one clear value
        other = procedural.with_attributes(
            scene, shape=str(rng.choice(procedural.SHAPES)), color=str(rng.choice(list(procedural.COLORS))),
            texture=str(rng.choice(procedural.TEXTURES)), center=(32 + rng.uniform(-8, 8), 32 + rng.uniform(-8, 8)))
        image = ((procedural.render(scene).astype(np.float32) + procedural.render(other)) / 2).astype(np.uint8)
        labels.update(shape=reject["shape"], color=reject["color"], texture=reject["texture"])
    else:  # smooth noise
        small = rng.uniform(0, 255, size=(int(rng.integers(2, 9)),) * 2 + (3,)).astype(np.uint8)
        image = np.asarray(Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC))
        labels = dict(reject)
    return _augment(rng, image), labels


def _pair_view(rng: np.random.Generator, scene: procedural.Scene) -> np.ndarray:
    """The scene's object drawn small beside another object, then cut out and rescaled exactly as the two-object
    reader (``studio.eval.two_objects``) shows it to the evaluator: smaller than a single render and resampled.
    Without these the reader missed small crosses even on renders (0.83 of textured pairs)."""
    subject = (scene.color, scene.texture, scene.shape)
    other = (str(rng.choice([c for c in procedural.COLORS if c != scene.color])),
             str(rng.choice(procedural.TEXTURES)), str(rng.choice(procedural.SHAPES)))
    left, right = (subject, other) if rng.random() < 0.5 else (other, subject)
    image = _soften(rng, procedural.render_pair(procedural.jittered_pair(rng, left, right, scene.background)))
    region = color_regions(image, (scene.color, other[0]), scene.background)[0]
    return object_view(image, region, scene.background)


def _composite(scene: procedural.Scene, mask: np.ndarray) -> np.ndarray:
    shade = procedural.texture_pattern(scene.texture, scene.phase)[..., None]
    primary = np.asarray(procedural.COLORS[scene.color], np.float32)
    fill = primary * (1 - shade) + primary * 0.4 * shade
    background = np.asarray(procedural.BACKGROUNDS[scene.background], np.float32)
    return np.clip(background * (1 - mask) + fill * mask, 0, 255).astype(np.uint8)


def train_evaluator(out_dir: Path = DEFAULT_EVALUATOR, steps: int = 3000, batch_size: int = 64, seed: int = 0,
                    width: int = 32) -> dict[str, float]:
    """Train the evaluator on freshly drawn examples and save it; returns accuracy on clean held-out renders."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = DomainEvaluatorNet(width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for _ in tqdm(range(steps), desc="evaluator", mininterval=2):
        examples = [training_example(rng) for _ in range(batch_size)]
        images = to_evaluator_tensor(np.stack([image for image, _ in examples]))
        logits = net(images)
        loss = sum(F.cross_entropy(logits[name], torch.tensor([lab[name] for _, lab in examples]))
                   for name in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    accuracy = clean_render_accuracy(DomainEvaluator(net), n=1000, seed=seed + 1)
    config = {"width": width, "steps": steps, "batch_size": batch_size, "seed": seed,
              "attributes": {k: list(v) for k, v in ATTRIBUTES.items()}, "clean_render_accuracy": accuracy}
    atomic_write(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return accuracy
