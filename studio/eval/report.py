"""``studio eval``: score a folder of images against their prompts (and reference images) and report.

Prompts come from a file with one line per image in sorted file-name order, or a JSON object {file: prompt};
without a file, each image's PNG ``parameters`` (first line) is used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from studio.data.folder import IMAGE_SUFFIXES
from studio.errors import DataError
from studio.eval.clip import load_clip
from studio.eval.domain import DomainEvaluator
from studio.eval.judge import DomainJudge
from studio.png import read_recipe

METRICS = ("clip_t", "clip_i", "attributes")


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise DataError(f"no images in {folder}")
    return found


def read_prompts(paths: list[Path], prompts_file: Path | None) -> list[str]:
    if prompts_file is None:
        prompts = []
        for path in paths:
            parameters, _ = read_recipe(path)
            if not parameters:
                raise DataError(f"{path.name} carries no parameters; pass --prompts FILE")
            prompts.append(parameters.splitlines()[0].split(" <lora:")[0])
        return prompts
    text = prompts_file.read_text()
    if prompts_file.suffix == ".json":
        table = json.loads(text)
        missing = [p.name for p in paths if p.name not in table]
        if missing:
            raise DataError(f"{prompts_file.name} has no prompt for {', '.join(missing[:3])}")
        return [table[p.name] for p in paths]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != len(paths):
        raise DataError(f"{prompts_file.name} has {len(lines)} prompts for {len(paths)} images")
    return lines


def evaluate_folder(images: Path, prompts_file: Path | None = None, reference: Path | None = None,
                    metrics: tuple[str, ...] = METRICS, clip_model: str | None = None,
                    clip_weights: Path | None = None) -> dict:
    """Per-image scores and their means."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise DataError(f"unknown metric {', '.join(sorted(unknown))}; choose from {', '.join(METRICS)}")
    paths = _images(Path(images))
    prompts = read_prompts(paths, prompts_file)
    loaded = [Image.open(p).convert("RGB") for p in paths]
    rows = [{"image": p.name, "prompt": t} for p, t in zip(paths, prompts)]
    if "clip_t" in metrics or ("clip_i" in metrics and reference):
        scorer = load_clip(clip_model, clip_weights)
        if "clip_t" in metrics:
            for row, value in zip(rows, scorer.clip_t(loaded, prompts)):
                row["clip_t"] = float(value)
        if "clip_i" in metrics and reference:
            references = [Image.open(p).convert("RGB") for p in _images(Path(reference))]
            for row, value in zip(rows, scorer.clip_i(loaded, references)):
                row["clip_i"] = float(value)
    if "attributes" in metrics:
        readings = DomainEvaluator.load().read(loaded)
        for row, reading, prompt in zip(rows, readings, prompts):
            expected = DomainJudge.expected(prompt)
            row.update({name: getattr(reading, name) for name in ("shape", "color", "texture", "background")})
            row["attributes_matched"] = float(np.mean([getattr(reading, k) == v for k, v in expected.items()])
                                              if expected else np.nan)
    numeric = {key for row in rows for key, value in row.items() if isinstance(value, float)}
    means = {key: float(np.nanmean([row[key] for row in rows])) for key in sorted(numeric)}
    return {"images": rows, "mean": means}


def format_table(report: dict) -> str:
    columns = list(report["mean"])
    lines = ["| image | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in report["images"]:
        lines.append(f"| {row['image']} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in columns) + " |")
    lines.append("| **mean** | " + " | ".join(f"{report['mean'][c]:.3f}" for c in columns) + " |")
    return "\n".join(lines)
