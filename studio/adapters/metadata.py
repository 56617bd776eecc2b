"""The metadata every trained adapter carries: kohya ``ss_*``, ``modelspec.*`` and the studio's ``studio.*`` keys.

A1111, ComfyUI and LoRA managers read ``ss_*`` and ``modelspec.*`` (trigger words, tag frequency, base
version); the studio reads ``studio.*`` (method, content/style kind, base fingerprint) to validate and compose.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from studio import __version__
from studio.errors import ConfigError

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "tiny": "adapter_studio_tiny",
                      "custom": "custom"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base",
                "tiny": "adapter-studio-tiny", "custom": "custom"}


def optimizer_learning_rates(optimizer: Any) -> list[float]:
    """The learning rate each parameter group was trained at (its scheduler's ``initial_lr``, else ``lr``)."""
    groups = getattr(optimizer, "param_groups", None) or []
    return [float(group.get("initial_lr", group["lr"])) for group in groups]


def network_dim_and_alpha(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, str]:
    """kohya's ``ss_network_dim``/``ss_network_alpha`` from the saved tensors: the most common rank and alpha (per
    module ranks and alphas go to ``studio.ranks`` when they differ, e.g. CoLoRA's plan)."""
    values = {"ss_network_dim": json.dumps(Counter(ranks.values()).most_common(1)[0][0]),
              "ss_network_alpha": json.dumps(Counter(alphas.values()).most_common(1)[0][0])}
    if len(set(ranks.values())) > 1:
        values["studio.ranks"] = json.dumps(dict(ranks))
    return values


def adapter_metadata(
    base: Any,
    *,
    name: str,
    method: str,
    kind: str,
    rank: int,
    alpha: float,
    trigger_words: list[str],
    seed: int,
    steps: int,
    max_steps: int | None = None,
    started_at: float,
    tag_frequency: Mapping[str, Mapping[str, int]],
    num_images: int,
    learning_rate: float,
    resolution: int | tuple[int, int],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """String metadata for a safetensors header (values that are not strings are JSON-encoded)."""
    if kind not in ("content", "style", "content+style"):
        raise ConfigError(f"kind must be 'content', 'style' or 'content+style', not {kind!r}")
    values: dict[str, Any] = {
        "ss_output_name": name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
        "ss_base_model_version": BASE_MODEL_VERSION.get(base.family, base.family),
        "ss_sd_model_name": base.name,
        "ss_seed": seed,
        "ss_steps": steps,
        "ss_max_train_steps": steps if max_steps is None else max_steps,
        "ss_learning_rate": learning_rate,
        "ss_num_train_images": num_images,
        "ss_resolution": "({}, {})".format(*((resolution, resolution) if isinstance(resolution, int) else resolution)),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_training_started_at": started_at,
        "ss_training_finished_at": time.time(),
        "ss_v2": base.family == "sd2",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": name,
        "modelspec.architecture": f"{ARCHITECTURE.get(base.family, base.family)}/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.trigger_phrase": ", ".join(trigger_words),
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "studio.method": method,
        "studio.kind": kind,
        "studio.trigger_words": json.dumps(trigger_words),
        "studio.base_family": base.family,
        "studio.base_fingerprint": base.fingerprint,
        "studio.cross_attention_dim": base.cross_attention_dim,
        "studio.version": __version__,
    }
    for key, value in (extra or {}).items():
        values[key if "." in key else f"studio.{key}"] = value
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
