"""Aspect-ratio buckets as kohya-ss/sd-scripts makes them, and where each training image goes.

Buckets: every (width, height) on a ``steps`` grid inside [min_reso, max_reso] whose area is at most the
resolution's area (kohya's ``make_bucket_resolutions``), plus the square of that area. An image goes to the bucket
of nearest aspect ratio, is resized so that it just covers the bucket (one side equal to the bucket's, never
larger than needed) and the other side is cropped by what the grid's rounding leaves over. The placement keeps
the original size and the crop's top-left corner, which SDXL takes as conditioning (Podell et al. 2023, §2.2).

Libraries: kohya's code is a training script, not an importable library, and diffusers' training scripts crop
to one square size; this module is the part of kohya's ``BucketManager`` the studio needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from studio.errors import ConfigError

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class Placement:
    """How one image becomes a training example: resize to ``resized``, crop ``target`` at (left, top)."""

    original: Size
    resized: Size
    target: Size
    left: int
    top: int

    def flipped(self) -> Placement:
        """The placement of the horizontally mirrored crop (its left edge measured from the other side)."""
        return Placement(self.original, self.resized, self.target, self.resized[0] - self.left - self.target[0],
                         self.top)

    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's added time ids: original (h, w), crop top-left (top, left), target (h, w)."""
        return (self.original[1], self.original[0], self.top, self.left, self.target[1], self.target[0])


def place(size: Size, target: Size, center_crop: bool = True) -> Placement:
    """Resize ``size`` to just cover ``target`` (aspect ratio kept) and crop the excess (centred or top-left)."""
    width, height = size
    scale = max(target[0] / width, target[1] / height)
    resized = (max(target[0], round(width * scale)), max(target[1], round(height * scale)))
    if center_crop:
        left, top = (resized[0] - target[0]) // 2, (resized[1] - target[1]) // 2
    else:
        left, top = 0, 0
    return Placement(size, resized, target, left, top)


def bucket_sizes(resolution: Size, min_reso: int, max_reso: int, steps: int) -> list[Size]:
    """kohya's bucket resolutions for ``resolution``'s area, limited to [min_reso, max_reso] on both sides."""
    if steps < 1 or min_reso < 1 or min_reso > max_reso:
        raise ConfigError(f"bucket range: need 1 ≤ --min_bucket_reso ≤ --max_bucket_reso and --bucket_reso_steps ≥ 1"
                          f", not {min_reso}, {max_reso} and {steps}")
    area = resolution[0] * resolution[1]
    sizes: set[Size] = set()
    side = int(math.sqrt(area) // steps) * steps
    if min_reso <= side <= max_reso:
        sizes.add((side, side))
    width = math.ceil(min_reso / steps) * steps
    while width <= max_reso:
        height = min(max_reso, int(area // width // steps) * steps)
        if height >= min_reso:
            sizes.update({(width, height), (height, width)})
        width += steps
    if not sizes:
        raise ConfigError(f"no bucket of about {resolution[0]}×{resolution[1]} pixels in area fits between "
                          f"--min_bucket_reso {min_reso} and --max_bucket_reso {max_reso} on a {steps}-pixel grid, "
                          "so every image is excluded; widen the range or lower --bucket_reso_steps")
    return sorted(sizes)


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest ``size``'s (an exact size match first), as kohya chooses."""
    if size in buckets:
        return size
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))
