"""What the studio knows about a base model: its family (sd1, sd2, sdxl or tiny), cross-attention width, default
size and steps, and a fingerprint that adapters record so a mismatched base is caught before loading; plus the
device, dtype and scheduler choices. Loading itself lives in :mod:`pipelines.loading`, since what it builds is a
composition pipeline.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from studio.errors import ConfigError
from studio.samplers import current_sampler, set_sampler

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED_MODEL = ASSETS / "tiny-sd"
SINGLE_FILE_CONFIGS = ASSETS / "configs"
EMBEDDED_NAMES = {"", "tiny", "tiny-sd", "embedded", "default"}  # what names the embedded model

@dataclass
class BaseModel:
    """A loaded base model and the facts about it that adapters and pipelines check against."""

    pipe: Any
    family: str
    source: str
    device: torch.device
    dtype: torch.dtype
    domain: dict[str, Any] | None = None  # studio_model.json of the embedded model
    fingerprint: str = field(default="")

    @property
    def cross_attention_dim(self) -> int:
        return int(self.pipe.unet.config.cross_attention_dim)

    @property
    def name(self) -> str:
        return Path(self.source).name if self.source else "tiny-sd"

    @property
    def default_size(self) -> int:
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    @property
    def default_guidance_scale(self) -> float:
        return float((self.domain or {}).get("default_guidance_scale", 7.5))

    @property
    def default_steps(self) -> int:
        return int((self.domain or {}).get("default_steps", 30))


def choose_device(preferred: str | None = None) -> torch.device:
    """cuda > mps > cpu unless the user names one."""
    if preferred:
        return torch.device(preferred)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (SD's usual inference precision), fp32 elsewhere (CPU half kernels are slow or missing)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def detect_family(config: dict[str, Any], unet_config: dict[str, Any] | None = None,
                  domain: dict[str, Any] | None = None) -> str:
    """Tell SD 1.x, 2.x, SDXL and the embedded model apart from a pipeline's model_index.json and UNet config."""
    if domain is not None:
        return "tiny"
    if "text_encoder_2" in config or "XL" in str(config.get("_class_name", "")):
        return "sdxl"
    width = (unet_config or {}).get("cross_attention_dim")
    if width == 1024:
        return "sd2"
    if width == 768:
        return "sd1"
    return "custom"


def fingerprint(pipe: Any) -> str:
    """A short stable id of the base: architecture configs plus a checksum of two weight tensors. Private config
    keys (``_name_or_path``: where the model was loaded from) are left out, so a copy of a model keeps its id."""
    digest = hashlib.sha256()
    config = {key: value for key, value in dict(pipe.unet.config).items() if not key.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(pipe.text_encoder.config.to_dict().get("hidden_size")).encode())
    for tensor in (pipe.unet.conv_in.weight, pipe.text_encoder.get_input_embeddings().weight[:64]):
        digest.update(tensor.detach().to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()[:16]


def set_scheduler(pipe: Any, name: str, schedule: str | None = None) -> None:
    """Swap the pipeline's scheduler: an A1111 sampler name (``DPM++ 2M``) with a schedule type (``Karras``), or
    an old short name (``ddim``, ``euler_a``, ``dpm++_karras``…), keeping the model's noise schedule."""
    set_sampler(pipe, name, schedule)


def override_noise_schedule(pipe: Any, prediction_type: str | None = None, zero_snr: bool | None = None) -> None:
    """What a single-file checkpoint cannot say about itself: ε or v prediction (SD 2.x 768-v, v-pred SDXL
    fine-tunes) and zero terminal SNR (Lin et al. 2024: rescaled betas with trailing timesteps)."""
    overrides: dict[str, Any] = {}
    if prediction_type is not None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction type is 'epsilon' or 'v_prediction', not {prediction_type!r}")
        overrides["prediction_type"] = prediction_type
    if zero_snr is not None:
        overrides.update(rescale_betas_zero_snr=zero_snr, timestep_spacing="trailing" if zero_snr else "leading")
    if overrides:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)
        pipe._studio_scheduler_config = pipe.scheduler.config


def sampler_label(pipe: Any) -> str:
    """The pipeline's scheduler under A1111's sampler name (``DDIM``, ``Euler a``, …)."""
    return current_sampler(pipe)[0]


def seeded_generator(seed: int) -> torch.Generator:
    """Initial noise is drawn on the CPU so a seed means the same image on every device."""
    return torch.Generator("cpu").manual_seed(int(seed))
