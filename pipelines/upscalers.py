"""Hires fix upscalers under A1111's names, and upscaler model files (ESRGAN, Real-ESRGAN, SwinIR, …).

Latent upscalers interpolate the latents as A1111's ``latent_upscale_modes`` do; "None", "Lanczos" and
"Nearest" resize the decoded image with PIL ("None" = no model: A1111 then resizes with Lanczos). Any other name
is an upscaler model: a file path, or a file in ``$STUDIO_HOME/upscalers`` (A1111's ``models/ESRGAN``) named by
its stem, or by A1111's built-in name (``R-ESRGAN 4x+`` = ``RealESRGAN_x4plus.pth``). spandrel detects the
architecture from the weights and builds it; the weights are read here, by safetensors or
``torch.load(weights_only=True)`` — spandrel's own loader unpickles .pth files with an allow-list and runs
TorchScript for .pt, neither of which this project accepts for a user's file. As A1111, a model is applied
until the image reaches the target size (at most 3 times) and Lanczos resizes to the exact size.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from studio.adapters.library import studio_home
from studio.errors import ConfigError
from studio.files import read_weights

LATENT_MODES = {  # A1111's name: (torch interpolation mode, antialias)
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_MODES = {"None": Image.LANCZOS, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
UPSCALERS = (*LATENT_MODES, *PIXEL_MODES)
MODEL_SUFFIXES = (".safetensors", ".pth", ".pt")
A1111_FILES = {  # A1111's built-in Real-ESRGAN names and the files it downloads for them
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
    "R-ESRGAN General 4xV3": "realesr-general-x4v3",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3",
}


def upscaler_folder() -> Path:
    return studio_home() / "upscalers"


def choices(folder: Path | None = None) -> list[str]:
    """The built-in names, then the stems of the model files in the upscalers folder."""
    folder = folder or upscaler_folder()
    files = sorted(p.stem for p in folder.glob("*") if p.suffix.lower() in MODEL_SUFFIXES) if folder.is_dir() else []
    return [*UPSCALERS, *files]


def resolve(name: str, folder: Path | None = None) -> str | Path:
    """A built-in name as it is, or the model file ``name`` stands for."""
    if name in UPSCALERS:
        return name
    path = Path(name)
    if path.suffix.lower() in MODEL_SUFFIXES and path.is_file():
        return path
    folder = folder or upscaler_folder()
    for stem in (name, A1111_FILES.get(name)):
        for suffix in MODEL_SUFFIXES:
            if stem and (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    raise ConfigError(f"unknown hires upscaler {name!r}; choose one of: {', '.join(choices(folder))}, or give an "
                      f"upscaler model file ({', '.join(MODEL_SUFFIXES)}) or put one in {folder}")


def label(name: str) -> str:
    """The name A1111 writes as ``Hires upscaler``: a built-in name, or a model file's stem."""
    path = Path(name)
    return path.stem if path.suffix.lower() in MODEL_SUFFIXES else name


def load_model(path: str | Path):
    """The spandrel image model in ``path`` (cached per file version), on the CPU, in eval mode."""
    path = Path(path)
    return _load_model(str(path.resolve()), path.stat().st_mtime_ns)


@lru_cache(maxsize=4)
def _load_model(path: str, mtime_ns: int):
    import spandrel  # optional-weight import: dozens of architectures, needed only for model upscalers

    suffix = Path(path).suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise ConfigError(f"{path}: an upscaler model is a {', '.join(MODEL_SUFFIXES)} file")
    state, _ = read_weights(path, ConfigError, "upscaler model")
    try:
        model = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError as error:
        raise ConfigError(f"{path} holds no upscaler architecture spandrel knows (ESRGAN, Real-ESRGAN, SwinIR, "
                          f"HAT, DAT, …)") from error
    if not isinstance(model, spandrel.ImageModelDescriptor) or model.input_channels != 3 or model.scale < 2:
        raise ConfigError(f"{path} is a {model.architecture.name} model for {model.purpose}, not an RGB upscaler")
    return model.eval()


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], name: str) -> torch.Tensor:
    """Latents interpolated to ``size`` (latent rows, columns) as A1111's latent upscaler ``name`` does."""
    mode, antialias = LATENT_MODES[name]
    return F.interpolate(latents, size=size, mode=mode, antialias=antialias)


@torch.no_grad()
def upscale_images(pixels: torch.Tensor, size: tuple[int, int], upscaler: str | Path) -> list[Image.Image]:
    """Images ([batch, 3, h, w] in [0, 1]) upscaled to ``size`` (rows, columns): PIL for a built-in name, else
    the model file, applied while the image is smaller than ``size`` (at most 3 times), then Lanczos."""
    if isinstance(upscaler, str):
        resample = PIXEL_MODES[upscaler]
    else:
        model, resample = load_model(upscaler), Image.LANCZOS
        half = pixels.device.type == "cuda" and model.supports_half
        model.to(pixels.device, torch.float16 if half else torch.float32)
        grown = []
        for image in pixels:
            image = image[None].to(model.dtype)
            for _ in range(3):
                if image.shape[-2] >= size[0] and image.shape[-1] >= size[1]:
                    break
                image = model(image)
            grown.append(image[0].float())
        pixels = grown
    images = [Image.fromarray((p.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()) for p in pixels]
    return [image if image.size == (size[1], size[0]) else image.resize((size[1], size[0]), resample)
            for image in images]
