"""Random-weight SD 1.5-architecture models and LoRAs for the speed and memory benchmarks.

Speed and memory are properties of the architecture, not of the weights, so the benchmarks that need SD 1.5's
shapes build one from the configs shipped in ``assets/configs/sd1`` with random weights (nothing downloads).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from pipelines import CompositionPipeline
from studio.adapters.file import AdapterFile, LoraModule, save_adapter
from studio.text import build_clip_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "configs" / "sd1"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _config(component: str) -> dict:
    config = json.loads((CONFIGS / component / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def sd15_unet():
    """SD 1.5's UNet with random weights."""
    return UNet2DConditionModel(**_config("unet"))


def sd15_folder(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """A complete diffusers folder with SD 1.5's architecture and random weights (UNet, VAE, CLIP text encoder)."""
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    scheduler_config = json.loads((CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    pipe = CompositionPipeline(
        vae=AutoencoderKL(**_config("vae")), text_encoder=CLIPTextModel(CLIPTextConfig(**_config("text_encoder"))),
        tokenizer=build_clip_tokenizer(), unet=sd15_unet(),
        scheduler=DDIMScheduler.from_config({**scheduler_config, "clip_sample": False}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(folder)
    return folder


def random_loras(base, count: int, folder: Path, rank: int = 8, seed: int = 0) -> list[str]:
    """``count`` LoRA files on every UNet attention projection of ``base``, keyed to its fingerprint."""
    generator = torch.Generator().manual_seed(seed)
    linears = {n: m for n, m in base.pipe.unet.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith(ATTENTION) and ".attn" in n}
    paths = []
    for index in range(count):
        modules = {n: LoraModule(down=torch.randn(rank, m.in_features, generator=generator) / m.in_features ** 0.5,
                                 up=torch.randn(m.out_features, rank, generator=generator) * 0.01, alpha=rank)
                   for n, m in linears.items()}
        metadata = {"ss_output_name": f"random{index}", "studio.base_fingerprint": base.fingerprint,
                    "studio.base_family": base.family, "studio.kind": "content"}
        paths.append(str(save_adapter(AdapterFile(modules={"unet": modules}, metadata=metadata),
                                      folder / f"random{index}.safetensors")))
    return paths
