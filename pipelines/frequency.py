"""Frequency profiles of adapters for CMLoRA (METHODS §7.1, §11.4).

An adapter is high-frequency dominant (H: subjects, textures, styles) when images generated with it carry more
high-frequency energy than the base's images for the same prompts and seeds: ΔH = H(with) − H(without) > τ_H,
where H is the mean of the normalised radial log-amplitude spectrum over radii ≥ h·r_max.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def radial_profile(gray: torch.Tensor) -> torch.Tensor:
    """Radial mean of log|fftshift(FFT2(gray))| per integer radius, divided by its maximum."""
    amplitude = torch.log(torch.fft.fftshift(torch.fft.fft2(gray.double())).abs() + 1e-8)
    height, width = gray.shape
    y, x = torch.meshgrid(torch.arange(height) - height // 2, torch.arange(width) - width // 2, indexing="ij")
    radius = torch.sqrt((x * x + y * y).double()).round().long()
    sums = torch.zeros(int(radius.max()) + 1, dtype=torch.float64).index_add_(0, radius.flatten(),
                                                                              amplitude.flatten())
    counts = torch.bincount(radius.flatten()).double()
    profile = sums / counts
    return profile / profile.max()


def hf_score(images: np.ndarray, h: float = 0.2) -> float:
    """Mean high-frequency score of N×H×W×3 images in [0, 1] or uint8: profile mean over r ≥ h·r_max."""
    array = images.astype(np.float64) / (255.0 if images.dtype == np.uint8 else 1.0)
    gray = torch.from_numpy(array @ np.array([0.299, 0.587, 0.114]))
    scores = []
    for image in gray:
        profile = radial_profile(image)
        cut = int(np.ceil(h * (len(profile) - 1)))
        scores.append(float(profile[cut:].mean()))
    return float(np.mean(scores))


def default_profile_prompts(adapter, domain: dict | None) -> list[str]:
    """Four prompts that include the adapter's trigger words (on the embedded domain, in domain captions)."""
    triggers = " ".join(adapter.trigger_words) or adapter.name
    if domain is None:
        return [f"a photo, {triggers}", f"a portrait, {triggers}", f"a landscape, {triggers}",
                f"an illustration, {triggers}"]
    slots = [("red", "solid", "circle", "white"), ("blue", "striped", "square", "gray"),
             ("green", "dotted", "heart", "black"), ("yellow", "checkered", "star", "white")]
    prompts = []
    for color, texture, shape, background in slots:
        if adapter.kind == "style":
            texture = triggers
        else:
            shape = triggers
        prompts.append(f"a {color} {texture} {shape} on a {background} background")
    return prompts


@torch.no_grad()
def profile_adapter(pipe, path: str | Path, prompts: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1),
                    steps: int = 30, h: float = 0.2, tau_h: float = 0.0, show_progress: bool = False) -> dict:
    """ΔH of an adapter over prompts × seeds (same seed with and without it) and its H/L class."""
    from tqdm import tqdm

    from studio.adapters.file import read_adapter

    adapter = read_adapter(path)
    base = pipe.studio_base()
    prompts = list(prompts or default_profile_prompts(adapter, base.domain))
    with_adapter, without = [], []
    pairs = [(prompt, seed) for prompt in prompts for seed in seeds]
    for prompt, seed in tqdm(pairs, desc="profile", disable=not show_progress):
        for adapters, bucket in (([(str(path), 1.0)], with_adapter), ([], without)):
            image = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                         adapters=adapters, method="merge", output_type="np").images
            bucket.append(image[0])
    delta = hf_score(np.stack(with_adapter), h) - hf_score(np.stack(without), h)
    return {"delta_h": delta, "class": "H" if delta > tau_h else "L", "h": h, "base_model": base.fingerprint,
            "n_pairs": len(prompts) * len(seeds), "tau_h": tau_h}


def store_profile(path: str | Path, profile: dict, out: str | Path | None = None) -> Path:
    """Write ``studio.freq_profile`` into the adapter file, or into a copy at ``out`` (atomically; the tensors, their
    dialect and precision unchanged)."""
    from studio.adapters.file import read_adapter, update_metadata

    read_adapter(path)  # only adapters the studio can read are profiled
    return update_metadata(path, {"studio.freq_profile": json.dumps(profile)}, out)
