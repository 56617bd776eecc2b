"""Training images from a folder, with kohya-style ``.txt`` caption sidecars or one instance prompt.

Every image is validated up front, so a bad folder fails before any training starts: a corrupt file or an
image too small to train on is an error naming the file; grayscale, palette, CMYK and alpha images are
converted to RGB (alpha composited on white); files that are not images (captions, notes) are ignored.
kohya's ``N_name`` folder convention sets the repeats of a sub-folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from studio.data.buckets import Placement
from studio.errors import DataError
from studio.files import atomic_write

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MIN_SIDE = 16
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class TrainingImage:
    path: Path
    caption: str
    repeats: int = 1


def _caption_for(path: Path, instance_prompt: str | None, caption_extension: str) -> str:
    sidecar = path.with_suffix(caption_extension)
    if sidecar.exists():
        text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            return " ".join(text.split())
    if instance_prompt:
        return instance_prompt
    raise DataError(f"{path.name} has no caption: add {sidecar.name} or pass --instance_prompt")


def scan_folder(folder: str | Path, instance_prompt: str | None = None, repeats: int = 1,
                caption_extension: str = ".txt") -> list[TrainingImage]:
    """All images under ``folder`` (one level of ``N_name`` sub-folders), with captions and repeats."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a folder")
    images: list[TrainingImage] = []
    sources = [(folder, repeats)] + [
        (sub, int(m.group(1))) for sub in sorted(folder.iterdir())
        if sub.is_dir() and (m := _REPEATS_FOLDER.match(sub.name))
    ]
    for source, source_repeats in sources:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(TrainingImage(path, _caption_for(path, instance_prompt, caption_extension),
                                            source_repeats))
    if not images:
        raise DataError(f"no images in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def load_rgb(path: Path) -> Image.Image:
    """Open and fully decode an image as RGB, or raise :class:`DataError` naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "P", "PA") and ("transparency" in image.info or "A" in image.mode):
                rgba = image.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(canvas, rgba)
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path.name} is not a readable image: {error}") from error
    if min(image.size) < MIN_SIDE:
        raise DataError(f"{path.name} is {image.size[0]}×{image.size[1]} pixels; images need at least {MIN_SIDE} "
                        "pixels on each side")
    return image


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as :func:`load_rgb` will see it (EXIF rotation applied), read from the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path.name} is not a readable image: {error}") from error
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def prepare_pixels(image: Image.Image, placement: Placement, flip: bool = False) -> torch.Tensor:
    """Resize and crop ``image`` as ``placement`` says (mirrored when ``flip``); 3×H×W in [-1, 1]."""
    resized = image.resize(placement.resized, Image.Resampling.BICUBIC)
    width, height = placement.target
    cropped = resized.crop((placement.left, placement.top, placement.left + width, placement.top + height))
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return tensor.flip(-1) if flip else tensor


def tag_frequency(images: list[TrainingImage], dataset_name: str = "images") -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: comma-separated caption tags and how often each occurs."""
    counts: dict[str, int] = {}
    for item in images:
        for tag in (t.strip() for t in item.caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + item.repeats
    return {dataset_name: counts}


def caption_rows(folder: str | Path, caption_extension: str = ".txt") -> list[list[str]]:
    """[file name, caption] for every image of ``folder`` (empty caption where there is no sidecar)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a folder")
    rows = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        sidecar = path.with_suffix(caption_extension)
        text = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.exists() else ""
        rows.append([path.name, " ".join(text.split())])
    return rows


def write_captions(folder: str | Path, rows: list[list[str]], caption_extension: str = ".txt") -> list[Path]:
    """Write each row's caption to its image's sidecar (atomically); an emptied caption removes the sidecar.
    Rows naming no image of ``folder`` are refused before anything is written."""
    folder = Path(folder)
    images = {row[0]: folder / row[0] for row in rows if row and row[0]}
    unknown = [name for name, path in images.items()
               if Path(name).name != name or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES]
    if unknown:
        raise DataError(f"no such image in {folder}: {', '.join(unknown)}")
    written = []
    for row in rows:
        if not row or not row[0]:
            continue
        sidecar = images[row[0]].with_suffix(caption_extension)
        text = " ".join(str(row[1] if len(row) > 1 and row[1] is not None else "").split())
        if text:
            atomic_write(sidecar, lambda tmp, text=text: tmp.write_text(text + "\n", encoding="utf-8"))
            written.append(sidecar)
        elif sidecar.exists():
            sidecar.unlink()
    return written
