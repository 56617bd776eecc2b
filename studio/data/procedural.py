"""The procedural domain of the embedded model: textured shapes on a plain background, with known captions.

Every image is drawn from a :class:`Scene` (shape, color, texture, background plus a little geometric jitter)
or a :class:`PairScene` (two smaller objects side by side, the first-named on the left), so its ground truth is
known exactly; the evaluator, the benchmarks and the adapter demos all rely on that.
Reserved shapes and textures are never shown to the base model: adapters learn them. Some color-shape and
texture-shape combinations are held out of the base training to measure generalisation.

Captions can be made noisy and partial (:class:`CaptionNoise`), as web captions are: an attribute left out ("a red
star") or named wrong. A model trained on exact captions follows them unguided; on noisy ones its conditional
distribution is broad and classifier-free guidance must sharpen it, which is Stable Diffusion's situation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPERSAMPLE = 4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (140, 40, 190),
    "orange": (245, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
BASE_SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")
RESERVED_SHAPES = ("moon", "cross")
BASE_TEXTURES = ("solid", "striped", "dotted", "checkered")
RESERVED_TEXTURES = ("zigzag", "waves")
SHAPES = BASE_SHAPES + RESERVED_SHAPES
TEXTURES = BASE_TEXTURES + RESERVED_TEXTURES

HELD_OUT_COLOR_SHAPE = frozenset(
    {("red", "star"), ("blue", "heart"), ("green", "diamond"), ("yellow", "circle"), ("purple", "triangle"),
     ("orange", "square")}
)
HELD_OUT_TEXTURE_SHAPE = frozenset({("striped", "circle"), ("dotted", "square"), ("checkered", "heart"),
                                    ("solid", "diamond")})

#: Words the base model never sees in training; adapters use them as trigger tokens.
TRIGGER_WORDS = ("sks", "xyz", "zwx", "qwe", "vfx", "pqr")

_SHADE = 0.4  # secondary texture color = primary color times this


@dataclass(frozen=True)
class Scene:
    """One image's ground truth plus the jitter that places the object."""

    shape: str
    color: str
    texture: str
    background: str
    center: tuple[float, float] = (32.0, 32.0)
    radius: float = 22.0
    phase: tuple[float, float] = (0.0, 0.0)

    @property
    def caption(self) -> str:
        return caption(self.color, self.texture, self.shape, self.background)

    @property
    def held_out(self) -> bool:
        return is_held_out(self.color, self.texture, self.shape)


def caption(color: str, texture: str, shape: str, background: str) -> str:
    """The one caption format of the domain."""
    return f"a {color} {texture} {shape} on a {background} background"


def partial_caption(color: str | None, texture: str | None, shape: str | None, background: str | None) -> str:
    """A caption naming only the given attributes: "a red star", "a striped shape on a gray background", "a heart".

    With all four named it is :func:`caption`."""
    return f"{_object_phrase(color, texture, shape)}{_background_phrase(background)}"


def _object_phrase(color: str | None, texture: str | None, shape: str | None) -> str:
    return "a " + " ".join([word for word in (color, texture) if word] + [shape or "shape"])


def _background_phrase(background: str | None) -> str:
    return f" on a {background} background" if background else ""


def is_held_out(color: str, texture: str, shape: str) -> bool:
    return (color, shape) in HELD_OUT_COLOR_SHAPE or (texture, shape) in HELD_OUT_TEXTURE_SHAPE


@functools.cache
def _combinations(held_out: bool) -> tuple[tuple[str, str, str, str], ...]:
    return tuple(
        (c, t, s, b)
        for c in COLORS
        for t in BASE_TEXTURES
        for s in BASE_SHAPES
        for b in BACKGROUNDS
        if is_held_out(c, t, s) == held_out
    )


def base_training_combinations() -> list[tuple[str, str, str, str]]:
    """(color, texture, shape, background) tuples the base model trains on: no reserved names, no held-out pairs."""
    return list(_combinations(held_out=False))


def held_out_combinations() -> list[tuple[str, str, str, str]]:
    """Base-vocabulary combinations kept out of the base's training, to measure generalisation."""
    return list(_combinations(held_out=True))


def jittered_scene(rng: np.random.Generator, color: str, texture: str, shape: str, background: str) -> Scene:
    """A scene with the object near the centre, large, and a random texture phase."""
    return Scene(
        shape=shape,
        color=color,
        texture=texture,
        background=background,
        center=(32.0 + rng.uniform(-3.5, 3.5), 32.0 + rng.uniform(-3.5, 3.5)),
        radius=float(rng.uniform(20.0, 24.5)),
        phase=(float(rng.uniform(0, 12)), float(rng.uniform(0, 12))),
    )


@dataclass(frozen=True)
class PairScene:
    """Two objects side by side on one background; captions name the left one first, as read."""

    left: Scene
    right: Scene

    def __post_init__(self) -> None:
        if self.left.background != self.right.background:
            raise ValueError("both objects of a pair scene share one background")
        if self.left.color == self.right.color:
            raise ValueError("the two objects of a pair scene have different colors, so each can be found by color")

    @property
    def caption(self) -> str:
        return pair_caption((self.left.color, self.left.texture, self.left.shape),
                            (self.right.color, self.right.texture, self.right.shape), self.left.background)


def pair_caption(first: tuple[str, str, str], second: tuple[str, str, str], background: str) -> str:
    """The two-object caption: ``a {color} {texture} {shape} and a … on a {background} background``."""
    return f"a {' '.join(first)} and a {' '.join(second)} on a {background} background"


def partial_pair_caption(first: tuple[str | None, str | None, str | None],
                         second: tuple[str | None, str | None, str | None], background: str | None) -> str:
    """The two-object caption naming only the given attributes; with all named it is :func:`pair_caption`."""
    return f"{_object_phrase(*first)} and {_object_phrase(*second)}{_background_phrase(background)}"


@dataclass(frozen=True)
class CaptionNoise:
    """How often each attribute of a training caption is left out or named wrong.

    Each attribute (color, texture, shape, background; in a two-object caption each object's three and the shared
    background) is decided independently: left out with probability ``drop_attribute``, replaced by another value
    of the base vocabulary with probability ``wrong_attribute``, else named as drawn. A wrong value never forms a
    held-out color-shape or texture-shape pair with the other named attributes (those stay unseen), and a wrong
    color in a two-object caption is never the other object's color. The empty caption of classifier-free
    guidance is separate (the build's ``caption_dropout``)."""

    drop_attribute: float = 0.0
    wrong_attribute: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.drop_attribute <= 1.0 and 0.0 <= self.wrong_attribute <= 1.0
                and self.drop_attribute + self.wrong_attribute <= 1.0):
            raise ValueError(f"caption noise needs probabilities in [0, 1] that sum to at most 1, got drop "
                             f"{self.drop_attribute} and wrong {self.wrong_attribute}")

    @property
    def active(self) -> bool:
        return self.drop_attribute > 0.0 or self.wrong_attribute > 0.0


_VOCABULARY: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "texture": BASE_TEXTURES, "shape": BASE_SHAPES,
                                           "background": tuple(BACKGROUNDS)}


def _decide(rng: np.random.Generator, noise: CaptionNoise) -> str:
    """"keep", "drop" or "wrong" for one attribute (one uniform draw, so the stream has a fixed length)."""
    u = rng.random()
    return "drop" if u < noise.drop_attribute else "wrong" if u < noise.drop_attribute + noise.wrong_attribute \
        else "keep"


def _wrong_value(rng: np.random.Generator, name: str, named: dict[str, str | None], avoid: frozenset[str]) -> str:
    """Another value of attribute ``name`` that makes no new held-out pair with the other ``named`` attributes."""
    trial = dict(named)
    candidates = []
    for value in _VOCABULARY[name]:
        trial[name] = value
        if value == named[name] or value in avoid:
            continue
        if (name != "texture" and (trial["color"], trial["shape"]) in HELD_OUT_COLOR_SHAPE) or \
                (name != "color" and (trial["texture"], trial["shape"]) in HELD_OUT_TEXTURE_SHAPE):
            continue
        candidates.append(value)
    return candidates[int(rng.integers(len(candidates)))]


def _noisy_object(rng: np.random.Generator, color: str, texture: str, shape: str, background: str | None,
                  noise: CaptionNoise, avoid_colors: frozenset[str] = frozenset()) -> dict[str, str | None]:
    """The attributes a noisy caption names for one object (``None``: left out); ``background`` None: not decided
    here."""
    named: dict[str, str | None] = {"color": color, "texture": texture, "shape": shape, "background": background}
    decisions = {name: _decide(rng, noise) for name in named if named[name] is not None}
    for name, decision in decisions.items():
        if decision == "drop":
            named[name] = None
    for name, decision in decisions.items():
        if decision == "wrong":
            named[name] = _wrong_value(rng, name, named, avoid_colors if name == "color" else frozenset())
    return named


def noisy_caption(rng: np.random.Generator, color: str, texture: str, shape: str, background: str,
                  noise: CaptionNoise) -> str:
    """The caption of a single-object scene with ``noise`` applied; without noise it is :func:`caption`."""
    named = _noisy_object(rng, color, texture, shape, background, noise)
    return partial_caption(named["color"], named["texture"], named["shape"], named["background"])


def noisy_pair_caption(rng: np.random.Generator, first: tuple[str, str, str], second: tuple[str, str, str],
                       background: str, noise: CaptionNoise) -> str:
    """The caption of a two-object scene with ``noise`` applied; without noise it is :func:`pair_caption`."""
    left = _noisy_object(rng, *first, background, noise, avoid_colors=frozenset({second[0]}))
    right = _noisy_object(rng, *second, None, noise, avoid_colors=frozenset({first[0], left["color"]} - {None}))
    return partial_pair_caption((left["color"], left["texture"], left["shape"]),
                                (right["color"], right["texture"], right["shape"]), left["background"])


def base_training_pair(rng: np.random.Generator) -> PairScene:
    """A random two-object scene from the base vocabulary (two colors, no held-out pair in either object)."""
    combos = _combinations(held_out=False)
    background = str(rng.choice(list(BACKGROUNDS)))
    while True:
        (c1, t1, s1, _), (c2, t2, s2, _) = (combos[i] for i in rng.integers(0, len(combos), size=2))
        if c1 != c2:
            return jittered_pair(rng, (c1, t1, s1), (c2, t2, s2), background)


def jittered_pair(rng: np.random.Generator, left: tuple[str, str, str], right: tuple[str, str, str],
                  background: str) -> PairScene:
    """Two objects of radius 10.5–13 centred near x = 17.5 and 46.5: they never overlap."""
    objects = []
    for (color, texture, shape), x in ((left, 17.5), (right, 46.5)):
        objects.append(Scene(
            shape=shape, color=color, texture=texture, background=background,
            center=(x + rng.uniform(-1.5, 1.5), 32.0 + rng.uniform(-6.0, 6.0)), radius=float(rng.uniform(10.5, 13.0)),
            phase=(float(rng.uniform(0, 12)), float(rng.uniform(0, 12))),
        ))
    return PairScene(*objects)


# --- geometry -------------------------------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.82
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        r = r * 1.12
        corners = (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
        return [(cx + r * math.cos(a), cy + 0.12 * r - r * math.sin(a)) for a in corners]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + 0.08 * r - radius * math.sin(angle)))
        return points
    if shape == "heart":
        points = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + r * x / 17, cy - r * (y + 2.5) / 17))
        return points
    if shape == "cross":
        a, b = r * 0.3, r * 0.9
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                (cx - b, cy - a), (cx - a, cy - a)]
    raise ValueError(f"no polygon for shape {shape!r}")


def shape_mask(shape: str, center: tuple[float, float], radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` on a size×size canvas."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    s = _SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = center[0] * s, center[1] * s, radius * s
    if shape == "circle":
        draw.ellipse([cx - r * 0.92, cy - r * 0.92, cx + r * 0.92, cy + r * 0.92], fill=255)
    elif shape == "moon":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        off = 0.5 * r
        draw.ellipse([cx - r + off, cy - r - 0.1 * r, cx + r + off, cy + r - 0.1 * r], fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def texture_pattern(texture: str, phase: tuple[float, float], size: int = IMAGE_SIZE) -> np.ndarray:
    """Fraction in [0, 1] of each pixel covered by the texture's secondary (shaded) color."""
    if texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")
    s = _SUPERSAMPLE
    coords = (np.arange(size * s, dtype=np.float32) + 0.5) / s
    y, x = np.meshgrid(coords + phase[1], coords + phase[0], indexing="ij")
    if texture == "solid":
        fine = np.zeros_like(x)
    elif texture == "striped":
        fine = (np.mod(x + y, 12.0) < 6.0).astype(np.float32)
    elif texture == "dotted":
        dx, dy = np.mod(x, 10.0) - 5.0, np.mod(y, 10.0) - 5.0
        fine = (dx * dx + dy * dy < 2.8**2).astype(np.float32)
    elif texture == "checkered":
        fine = ((np.floor(x / 7.0) + np.floor(y / 7.0)) % 2 == 0).astype(np.float32)
    elif texture == "zigzag":
        tri = np.abs(np.mod(x, 10.0) - 5.0)
        fine = (np.mod(y + tri, 10.0) < 4.5).astype(np.float32)
    else:  # waves
        fine = (np.mod(x + 3.0 * np.sin(y * 2 * math.pi / 20.0), 11.0) < 5.0).astype(np.float32)
    return fine.reshape(size, s, size, s).mean(axis=(1, 3))


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a scene as an H×W×3 uint8 array."""
    return _to_uint8(_paint(_background(scene.background, size), scene, size))


def render_pair(pair: PairScene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a two-object scene as an H×W×3 uint8 array."""
    canvas = _background(pair.left.background, size)
    for scene in (pair.left, pair.right):
        canvas = _paint(canvas, scene, size)
    return _to_uint8(canvas)


def _background(name: str, size: int) -> np.ndarray:
    if name not in BACKGROUNDS:
        raise ValueError(f"unknown background {name!r}; known: {', '.join(BACKGROUNDS)}")
    return np.broadcast_to(np.asarray(BACKGROUNDS[name], dtype=np.float32), (size, size, 3))


def _paint(canvas: np.ndarray, scene: Scene, size: int) -> np.ndarray:
    if scene.color not in COLORS:
        raise ValueError(f"unknown color {scene.color!r}; known: {', '.join(COLORS)}")
    mask = shape_mask(scene.shape, scene.center, scene.radius, size)[..., None]
    shade = texture_pattern(scene.texture, scene.phase, size)[..., None]
    primary = np.asarray(COLORS[scene.color], dtype=np.float32)
    fill = primary * (1.0 - shade) + primary * _SHADE * shade
    return canvas * (1.0 - mask) + fill * mask


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_batch(scenes: Sequence[Scene | PairScene]) -> np.ndarray:
    """N×H×W×3 uint8."""
    return np.stack([render(scene) if isinstance(scene, Scene) else render_pair(scene) for scene in scenes])


def with_attributes(scene: Scene, **changes: str) -> Scene:
    """The same placement with some attributes swapped (used by evaluator data and tests)."""
    return replace(scene, **changes)
