"""The embedded domain's evaluator: reads shape, color, texture and background from a 64×64 image.

Each attribute head has one extra *reject* class, trained on images that do not show a valid value for that
attribute (blobs for shape, two-tone objects for color, noise and blends for everything), so a garbled
generation is not counted as a success. A prediction whose confidence is below ``min_confidence`` is also a
reject. Covers the reserved shapes and textures, which adapters learn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from studio.data import procedural
from studio.errors import ModelLoadError

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": procedural.SHAPES,
    "color": tuple(procedural.COLORS),
    "texture": procedural.TEXTURES,
    "background": tuple(procedural.BACKGROUNDS),
}
DEFAULT_EVALUATOR = Path(__file__).resolve().parents[2] / "assets" / "evaluator"


class DomainEvaluatorNet(nn.Module):
    """A small CNN with one classification head (values + reject) per attribute."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        channels = [3, width, 2 * width, 3 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * 16, 256), nn.SiLU(), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(values) + 1) for name, values in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images``: N×3×64×64 in [-1, 1]; returns logits per attribute (last class = reject)."""
        hidden = self.trunk(self.features(images))
        return {name: head(hidden) for name, head in self.heads.items()}


@dataclass(frozen=True)
class Reading:
    """What the evaluator saw in one image; ``None`` means rejected."""

    shape: str | None
    color: str | None
    texture: str | None
    background: str | None
    confidence: dict[str, float]


class DomainEvaluator:
    """Loads the shipped evaluator and turns images into :class:`Reading` objects."""

    def __init__(self, net: DomainEvaluatorNet, min_confidence: float = 0.5) -> None:
        self.net = net.eval()
        self.min_confidence = min_confidence

    @classmethod
    def load(cls, path: str | Path = DEFAULT_EVALUATOR, min_confidence: float = 0.5) -> DomainEvaluator:
        path = Path(path)
        weights, config = path / "model.safetensors", path / "config.json"
        if not weights.exists() or not config.exists():
            raise ModelLoadError(f"no domain evaluator at {path} (expected model.safetensors and config.json); "
                                 "build it with `studio build-evaluator`")
        settings = json.loads(config.read_text())
        net = DomainEvaluatorNet(width=settings["width"])
        try:
            net.load_state_dict(load_file(weights))
        except Exception as error:  # safetensors header errors and shape mismatches both land here
            raise ModelLoadError(f"domain evaluator at {path} cannot be read: {error}") from error
        return cls(net.float(), min_confidence)

    @torch.no_grad()
    def read(self, images: Sequence[Image.Image] | np.ndarray | torch.Tensor, batch_size: int = 256) -> list[Reading]:
        """Read a list of PIL images, an N×H×W×3 uint8 array, or an N×3×H×W tensor in [-1, 1]."""
        tensor = to_evaluator_tensor(images)
        readings: list[Reading] = []
        for start in range(0, len(tensor), batch_size):
            logits = self.net(tensor[start : start + batch_size])
            probs = {name: value.softmax(-1) for name, value in logits.items()}
            for row in range(len(next(iter(probs.values())))):
                values, confidence = {}, {}
                for name, names in ATTRIBUTES.items():
                    p, index = probs[name][row].max(-1)
                    accepted = index.item() < len(names) and p.item() >= self.min_confidence
                    values[name] = names[index.item()] if accepted else None
                    confidence[name] = float(p)
                readings.append(Reading(confidence=confidence, **values))
        return readings


def to_evaluator_tensor(images: Sequence[Image.Image] | np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        tensor = images.float()
    else:
        if not isinstance(images, np.ndarray):
            images = np.stack([np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
                               for im in images])
        tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if tensor.shape[-1] != procedural.IMAGE_SIZE:
        tensor = F.interpolate(tensor, size=(procedural.IMAGE_SIZE,) * 2, mode="bilinear", antialias=True)
    return tensor


# --- training data -------------------------------------------------------------------------------------------


def clean_render_accuracy(evaluator: DomainEvaluator, n: int = 500, seed: int = 1) -> dict[str, float]:
    """Per-attribute accuracy on fresh, unaugmented renders over every shape, color, texture and background."""
    rng = np.random.default_rng(seed)
    scenes = [
        procedural.jittered_scene(rng, str(rng.choice(ATTRIBUTES["color"])), str(rng.choice(ATTRIBUTES["texture"])),
                                  str(rng.choice(ATTRIBUTES["shape"])), str(rng.choice(ATTRIBUTES["background"])))
        for _ in range(n)
    ]
    readings = evaluator.read(procedural.render_batch(scenes))
    return {name: float(np.mean([getattr(r, name) == getattr(s, name) for r, s in zip(readings, scenes)]))
            for name in ATTRIBUTES}
