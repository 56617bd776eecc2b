"""Load a base model: the embedded one, a local diffusers folder, a single-file checkpoint, or (online) a hub id.

Whatever the source, the result is a :class:`studio.models.BaseModel` whose pipeline is one of this package's
composition pipelines (subclasses of diffusers' StableDiffusion(XL)Pipeline) on the best device with the right
dtype and attention backend. Loading lives here rather than in the ``studio`` core because it instantiates those
pipeline classes: the core only describes a base model, so it never imports the layer above it. Nothing is
downloaded unless the user names a hub id and the hub is reachable.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from huggingface_hub import hf_hub_download
from safetensors import safe_open

from pipelines.composition import CompositionPipeline
from pipelines.composition_xl import CompositionXLPipeline
from studio.errors import ModelLoadError
from studio.models import (
    EMBEDDED_MODEL,
    EMBEDDED_NAMES,
    SINGLE_FILE_CONFIGS,
    BaseModel,
    choose_device,
    choose_dtype,
    detect_family,
    fingerprint,
    override_noise_schedule,
    set_scheduler,
)
from studio.text import build_clip_tokenizer

logger = logging.getLogger(__name__)


def _configure(pipe: Any, device: torch.device) -> None:
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        try:
            import xformers  # noqa: F401

            pipe.enable_xformers_memory_efficient_attention()
            logger.info("attention: xformers")
        except ImportError:
            logger.info("attention: torch SDPA")
    pipe.to(device)


def _pipeline_class(family: str):
    """The composition pipelines: subclasses of diffusers' StableDiffusion(XL)Pipeline."""
    return CompositionXLPipeline if family == "sdxl" else CompositionPipeline


def _load_folder(path: Path, dtype: torch.dtype) -> tuple[Any, str, dict[str, Any] | None]:
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise ModelLoadError(f"{path} is not a diffusers model folder (no model_index.json); pass a model folder "
                             "or a .safetensors checkpoint file")
    try:
        index = json.loads(index_file.read_text())
        unet_config = json.loads((path / "unet" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path} has an unreadable model_index.json or unet/config.json: {error}") from error
    domain_file = path / "studio_model.json"
    domain = json.loads(domain_file.read_text()) if domain_file.exists() else None
    family = detect_family(index, unet_config, domain)
    pipeline_class = _pipeline_class(family)
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
    except Exception as error:
        raise ModelLoadError(f"could not load the model folder {path}: {_short(error)}") from error
    return pipe, family, domain


def _single_file_family(path: Path) -> str:
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as error:
        raise ModelLoadError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt?): "
                             f"{_short(error)}") from error
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.transformer.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise ModelLoadError(f"{path} does not look like a Stable Diffusion checkpoint (no SD 1.x, 2.x or SDXL text "
                         "encoder keys found)")


def _load_single_file(path: Path, dtype: torch.dtype, config_folder: str | os.PathLike | None = None
                      ) -> tuple[Any, str]:
    """A single-file SD checkpoint, configured from the configs shipped in ``assets/configs`` (no download), or
    from ``config_folder``: a diffusers model folder of the same architecture (a non-standard size)."""
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path}: only .safetensors checkpoints are loaded; .ckpt files are pickles that can "
                             "run code. Convert it to safetensors with a tool you trust first")
    family = _single_file_family(path)
    config = Path(config_folder) if config_folder is not None else SINGLE_FILE_CONFIGS / family
    tokenizers = {"tokenizer": build_clip_tokenizer()}
    if family in ("sd2", "sdxl"):  # OpenCLIP's tokenizer pads with "!" (id 0)
        key = "tokenizer_2" if family == "sdxl" else "tokenizer"
        tokenizers[key] = build_clip_tokenizer(pad_token="!")
    pipeline_class = _pipeline_class(family)
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = pipeline_class.from_single_file(str(path), config=str(config), local_files_only=True,
                                               torch_dtype=dtype, **tokenizers, **extra)
    except Exception as error:
        raise ModelLoadError(f"could not load the checkpoint {path} as {family}: {_short(error)}") from error
    return pipe, family


def load_base(spec: str | os.PathLike | None = None, device: str | None = None, dtype: torch.dtype | None = None,
              scheduler: str | None = None, vae: str | os.PathLike | None = None,
              prediction_type: str | None = None, zero_snr: bool | None = None,
              config: str | os.PathLike | None = None) -> BaseModel:
    """Load the base model named by ``spec``: None/"tiny" (embedded), a folder, a ``.safetensors`` file, a hub id.
    ``vae`` replaces its VAE; ``prediction_type`` and ``zero_snr`` override its noise schedule; ``config``: the
    diffusers folder whose configs a single-file checkpoint of a non-standard architecture takes."""
    target = choose_device(device)
    dtype = dtype or choose_dtype(target)
    text = "" if spec is None else str(spec)
    domain = None
    if text.lower() in EMBEDDED_NAMES:
        if not (EMBEDDED_MODEL / "model_index.json").exists():
            raise ModelLoadError(f"the embedded model is missing from {EMBEDDED_MODEL}; run `studio build-tiny`")
        pipe, family, domain = _load_folder(EMBEDDED_MODEL, dtype)
        source = str(EMBEDDED_MODEL)
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            pipe, family, domain = _load_folder(path, dtype)
        elif path.is_file():
            pipe, family = _load_single_file(path, dtype, config)
        elif _looks_like_hub_id(text) and not path.exists():
            pipe, family = _load_hub(text, dtype)
        else:
            raise ModelLoadError(f"no model at {text!r}: not a folder, not a file, and not a hub id")
        source = text
    override_noise_schedule(pipe, prediction_type, zero_snr)
    if scheduler:
        set_scheduler(pipe, scheduler)
    if vae is not None:
        pipe.vae = load_vae(vae, pipe)
    _configure(pipe, target)
    base = BaseModel(pipe=pipe, family=family, source=source, device=target, dtype=dtype, domain=domain,
                     fingerprint=fingerprint(pipe))
    pipe._studio_base = base  # the composition pipeline validates adapters against this
    return base


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _load_hub(repo_id: str, dtype: torch.dtype) -> tuple[Any, str]:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelLoadError(f"{repo_id!r} is a hub id, but HF_HUB_OFFLINE is set; download the model yourself and "
                             "pass its local folder")
    try:  # the index and UNet config first, to pick the composition class before the weights come
        index = DiffusionPipeline.load_config(repo_id)
        unet_config = json.loads(Path(hf_hub_download(repo_id, "unet/config.json")).read_text())
        family = detect_family(dict(index), unet_config)
        extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        pipe = _pipeline_class(family).from_pretrained(repo_id, dtype=dtype, **extra)
    except Exception as error:
        raise ModelLoadError(f"could not fetch {repo_id!r} from the hub (offline?): {_short(error)}; pass a local "
                             "model folder or .safetensors file instead") from error
    return pipe, family


def load_vae(spec: str | os.PathLike, pipe: Any) -> Any:
    """A VAE to replace ``pipe``'s: a diffusers folder (with or without ``vae/``) or a single ``.safetensors``
    file in the original (LDM) layout, configured like the pipeline's own VAE."""
    path = Path(spec).expanduser()
    dtype = pipe.vae.dtype
    try:
        if path.is_dir():
            folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
            return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        if path.is_file():
            if path.suffix.lower() != ".safetensors":
                raise ModelLoadError(f"{path}: only .safetensors VAEs are loaded (.pt/.ckpt files are pickles)")
            with tempfile.TemporaryDirectory() as config:
                pipe.vae.save_config(config)
                return AutoencoderKL.from_single_file(str(path), config=config, torch_dtype=dtype,
                                                      local_files_only=True)
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"could not load the VAE {path}: {_short(error)}") from error
    raise ModelLoadError(f"no VAE at {str(spec)!r}: not a folder and not a file")


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
