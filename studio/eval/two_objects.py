"""Reading two-object images: find each object by its color, then read it alone with the domain evaluator.

The domain's textures only darken a color (k·rgb with k between the shade factor and 1), so every pixel goes to
the nearest of the two named colors' shade lines or to the background. Each object's region is cut out, scaled
to a fixed size and centred on the background, because the evaluator was trained on one centred object per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from studio.data import procedural
from studio.eval.domain import DomainEvaluator, Reading

MIN_PIXELS = 20  # a region smaller than this is not an object
_VIEW_EXTENT = 28.0  # chosen by reading rendered pairs: 99.5% of shapes, 100% of colors, 95% of textures


def color_regions(image: np.ndarray, colors: Sequence[str], background: str) -> list[np.ndarray]:
    """Boolean H×W masks of the pixels nearest each color's shade line rather than another's or the background."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    distances = []
    for name in colors:
        rgb = np.asarray(procedural.COLORS[name], dtype=np.float32)
        k = np.clip(pixels @ rgb / (rgb @ rgb), procedural._SHADE, 1.0)
        distances.append(np.linalg.norm(pixels - k[:, None] * rgb, axis=1))
    distances.append(np.linalg.norm(pixels - np.asarray(procedural.BACKGROUNDS[background], np.float32), axis=1))
    label = np.argmin(np.stack(distances), axis=0)
    return [_drop_thin_parts((label == i).reshape(image.shape[:2])) for i in range(len(colors))]


def _drop_thin_parts(region: np.ndarray) -> np.ndarray:
    """Remove the one-pixel rings that another object's anti-aliased edge leaves on a color's line: keep pixels
    with at least 5 of their 3×3 neighbourhood in the region, then give back the region's pixels next to those."""
    core = region & (_neighbours(region) >= 5)
    return region & (_neighbours(core) >= 1)


def _neighbours(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1).astype(np.int8)
    height, width = mask.shape
    return sum(padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3))


def object_view(image: np.ndarray, region: np.ndarray, background: str) -> np.ndarray:
    """The region alone on the background, scaled so its larger side is ``_VIEW_EXTENT`` pixels, and centred."""
    size = image.shape[0]
    canvas = np.empty_like(image)
    canvas[:] = procedural.BACKGROUNDS[background]
    if not region.any():
        return canvas
    isolated = canvas.copy()
    isolated[region] = image[region]
    rows, cols = np.nonzero(region)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    scale = min(_VIEW_EXTENT / max(bottom - top, right - left), 3.0)
    crop = Image.fromarray(isolated[top:bottom, left:right])
    width, height = max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale))
    resized = np.asarray(crop.resize((min(width, size), min(height, size)), Image.Resampling.BILINEAR))
    y, x = (size - resized.shape[0]) // 2, (size - resized.shape[1]) // 2
    canvas[y : y + resized.shape[0], x : x + resized.shape[1]] = resized
    return canvas


def read_two_objects(evaluator: DomainEvaluator, images: Sequence[np.ndarray], colors: Sequence[tuple[str, str]],
                     backgrounds: Sequence[str]) -> tuple[list[list[Reading | None]], list[list[np.ndarray]]]:
    """Per image, the reading of each named color's object (``None`` when it covers under MIN_PIXELS) and the
    regions found, in the order the colors are given."""
    views, regions = [], []
    for image, pair, background in zip(images, colors, backgrounds):
        found = color_regions(image, pair, background)
        regions.append(found)
        views.extend(object_view(image, region, background) for region in found)
    readings = evaluator.read(np.stack(views)) if views else []
    out: list[list[Reading | None]] = []
    for i, found in enumerate(regions):
        out.append([readings[2 * i + j] if region.sum() >= MIN_PIXELS else None for j, region in enumerate(found)])
    return out, regions
