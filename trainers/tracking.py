"""``--report_to tensorboard|wandb|none``: loss, learning rate and validation images through accelerate's trackers.

accelerate writes the scalars; images go through each tracker's own call (TensorBoard's ``add_images``, a
``wandb.Image`` list), which accelerate's ``log_images`` covers only for some trackers.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from studio.errors import ConfigError
from trainers.config import TrainConfig

#: --report_to value → (module it needs, pip package).
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_tracker(config: TrainConfig) -> None:
    """Refuse an unknown tracker or one whose package is missing, before any model loads."""
    if config.report_to == "none":
        return
    if config.report_to not in TRACKERS:
        raise ConfigError(f"--report_to must be none, tensorboard or wandb, not {config.report_to!r}")
    module, package = TRACKERS[config.report_to]
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--report_to {config.report_to} needs {package}: pip install 'adapter-studio[train]' "
                          f"(or pip install {package})") from None


def logging_folder(config: TrainConfig, work_dir: Path) -> Path:
    """``--logging_dir``, else ``logs`` in the run's work folder."""
    return Path(config.logging_dir) if config.logging_dir else work_dir / "logs"


def accelerator_options(config: TrainConfig, work_dir: Path) -> dict[str, Any]:
    if config.report_to == "none":
        return {}
    return {"log_with": config.report_to, "project_dir": str(logging_folder(config, work_dir))}


def start(accelerator, config: TrainConfig, method: str) -> None:
    """Open the run's trackers with its plain-valued options as hyper-parameters."""
    if config.report_to == "none":
        return
    values = {k: v for k, v in asdict(config).items() if isinstance(v, (bool, int, float, str))}
    accelerator.init_trackers(config.output, config={**values, "method": method})


def finish(accelerator) -> None:
    """Close the trackers (not ``end_training``, which also ends the process group a later stage still needs)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def log_images(accelerator, config: TrainConfig, paths: list[Path], step: int) -> None:
    """Validation previews as one image grid per step."""
    if config.report_to == "none" or not paths or not accelerator.is_main_process:
        return
    images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    tracker = accelerator.get_tracker(config.report_to, unwrap=True)
    if config.report_to == "tensorboard":
        tracker.add_images("validation", np.stack(images), step, dataformats="NHWC")
    else:
        import wandb

        tracker.log({"validation": [wandb.Image(image, caption=path.name) for image, path in zip(images, paths)]},
                    step=step)
