"""The optimizers ``--optimizer`` names, as kohya's ``--optimizer_type`` offers them, and the base's precision.

AdamW comes with torch and Adafactor with transformers; 8-bit AdamW (bitsandbytes), Prodigy (prodigyopt) and Lion
(lion-pytorch) come with the ``train`` extra. A missing one is refused before any model loads, naming the extra.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from transformers.optimization import Adafactor

from studio.errors import ConfigError
from trainers.config import TrainConfig

#: --optimizer name → (module it needs, pip package); None: always installed.
OPTIMIZERS: dict[str, tuple[str, str] | None] = {
    "adamw": None,
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "adafactor": None,
    "lion": ("lion_pytorch", "lion-pytorch"),
}

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def optimizer_name(config: TrainConfig) -> str:
    """``--optimizer``, with diffusers' ``--use_8bit_adam`` meaning adamw8bit."""
    return "adamw8bit" if config.use_8bit_adam and config.optimizer == "adamw" else config.optimizer


def _module(name: str):
    needed = OPTIMIZERS[name]
    if needed is None:
        return None
    module, package = needed
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--optimizer {name} needs {package}: pip install 'adapter-studio[train]' "
                          f"(or pip install {package})") from None


def check_optimizer(config: TrainConfig) -> None:
    """Refuse an unknown optimizer or one whose package is missing."""
    name = optimizer_name(config)
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown --optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    _module(name)


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer over the method's parameter groups (each group may carry its own ``lr``)."""
    name = optimizer_name(config)
    module = _module(name)
    lr, decay = config.learning_rate, config.adam_weight_decay
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=decay)
    if name == "adamw8bit":
        return module.optim.AdamW8bit(groups, lr=lr, weight_decay=decay)
    if name == "prodigy":  # Prodigy estimates the step size; lr scales it (1.0 is the usual value)
        return module.Prodigy(groups, lr=lr, weight_decay=decay)
    if name == "lion":
        return module.Lion(groups, lr=lr, weight_decay=decay)
    # with a fixed learning rate, as kohya runs it when one is given
    return Adafactor(groups, lr=lr, weight_decay=decay, relative_step=False, scale_parameter=False,
                     warmup_init=False)


def base_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: ``--mixed_precision`` (no: float32); fp16 is refused off CUDA, where half
    kernels are missing or slow and no loss scaler runs (use bf16 or no)."""
    if config.mixed_precision not in PRECISIONS:
        raise ConfigError(f"--mixed_precision must be no, fp16 or bf16, not {config.mixed_precision!r}")
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"--mixed_precision fp16 needs a CUDA GPU (this run is on {device.type}); "
                          "use --mixed_precision bf16 or no")
    return PRECISIONS[config.mixed_precision]
