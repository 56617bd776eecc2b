"""PNG files that carry their own recipe: A1111's ``parameters`` text plus the studio's full recipe as JSON.

A1111, Forge, ComfyUI's importers and most galleries parse ``parameters``; the ``studio`` chunk holds what
A1111's format cannot express (adapter stacks, composition methods), so the app can reproduce an image exactly.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from studio.files import atomic_path


def a1111_parameters(
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    sampler: str,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    model_name: str,
    model_hash: str,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The three-line ``parameters`` text A1111 writes: prompt, negative prompt, then ``Key: value`` pairs."""
    fields = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": f"{guidance_scale:g}",
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash[:10],
        "Model": model_name,
        **(extra or {}),
    }
    pairs = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items())
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(pairs)
    return "\n".join(lines)


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text) else text


_FIELD = re.compile(r'\s*([\w][\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) of an A1111 ``parameters`` text: the last line holds the
    ``Key: value`` pairs (quoted values unquoted), a ``Negative prompt:`` line starts the negative prompt, and
    every line before it belongs to the prompt."""
    lines = text.strip().split("\n")
    fields: dict[str, str] = {}
    if "Steps:" in lines[-1]:
        for key, value in _FIELD.findall(lines[-1]):
            fields[key.strip()] = json.loads(value) if value.startswith('"') and value.endswith('"') else value.strip()
        if fields:
            lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), fields


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str, recipe: Mapping[str, Any]) -> Path:
    """Write ``image`` with its ``parameters`` text and ``studio`` recipe, atomically."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("studio", json.dumps(recipe, sort_keys=True))
    destination = Path(path)
    with atomic_path(destination) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return destination


def read_recipe(path: str | os.PathLike) -> tuple[str | None, dict[str, Any] | None]:
    """The ``parameters`` text and ``studio`` recipe of a PNG (``None`` where absent)."""
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or image.info)
    recipe = text.get("studio")
    return text.get("parameters"), json.loads(recipe) if recipe else None


def default_outputs() -> Path:
    """Where generated images go unless told: ``$STUDIO_OUTPUTS``, else ``outputs`` in the working folder."""
    return Path(os.environ.get("STUDIO_OUTPUTS", "outputs"))


def numbered_png(folder: str | os.PathLike, seed: int) -> Path:
    """A1111's file naming: the next 5-digit number in ``folder``, then the seed (``00012-1234.png``).
    Numbers continue after the highest one present, so a deleted image never lets a new one overwrite another."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    return folder / f"{max(numbers, default=-1) + 1:05d}-{seed}.png"


def with_lora_tags(prompt: str, adapters: Sequence[tuple[str | os.PathLike, float]]) -> str:
    """A1111 writes active LoRAs into the prompt as ``<lora:name:weight>``."""
    tags = " ".join(f"<lora:{Path(str(a)).stem}:{w:g}>" for a, w in adapters)
    return f"{prompt} {tags}".strip() if tags else prompt
