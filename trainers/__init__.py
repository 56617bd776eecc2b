"""Trainers: one shared loop (:mod:`trainers.loop`) and one module per method.

:data:`TRAINERS` is the one list of training methods the CLI and the app offer; :func:`run` runs one of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.errors import ConfigError
from trainers.b4m import B4MConfig, train_b4m
from trainers.colora import CoLoRAConfig, CoLoRAMethod
from trainers.config import TrainConfig
from trainers.loop import ProgressCallback, TrainingMethod, TrainResult, train
from trainers.lora import LoraMethod
from trainers.sara import SaraConfig, SaraMethod

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trainer:
    """One training method as the front doors see it.

    ``options``: its own options dataclass (fields with ``help`` metadata are CLI flags), or None;
    ``method``: builds its :class:`TrainingMethod` for the shared loop from the options (None: the method runs
    its own stages, as B4M's three runs do, through ``stages``); ``help``: one line for menus and ``--help``.
    """

    help: str
    options: type | None = None
    method: Callable[[Any], TrainingMethod] | None = None
    stages: Callable[..., list[Path]] | None = None


TRAINERS: dict[str, Trainer] = {
    "lora": Trainer("plain LoRA (the baseline)", method=lambda _: LoraMethod()),
    "b4m": Trainer("Break-for-Make: content, style and the made content+style adapter", B4MConfig,
                   stages=lambda config, options, **kw: train_b4m(options, config, **kw)),
    "sara": Trainer("SaRA: train the smallest pretrained weights (sparse)", SaraConfig, SaraMethod),
    "colora": Trainer("CoLoRA: per-layer ranks from measured contributions", CoLoRAConfig, CoLoRAMethod),
}


def _trainer(name: str) -> Trainer:
    if name not in TRAINERS:
        raise ConfigError(f"unknown training method {name!r}; choose one of: {', '.join(TRAINERS)}")
    return TRAINERS[name]


def get_method(name: str, options: Any = None) -> TrainingMethod:
    """The shared loop's :class:`TrainingMethod` for ``name`` (with its options; None: the defaults)."""
    trainer = _trainer(name)
    if trainer.method is None:
        raise ConfigError(f"{name} runs several training stages; use trainers.run({name!r}, …)")
    return trainer.method(options if options is not None or trainer.options is None else trainer.options())


def run(method: str, config: TrainConfig, options: Any = None, *, base=None,
        progress: ProgressCallback | None = None, should_stop: Callable[[], bool] | None = None) -> list[Path]:
    """Train ``method`` with the shared ``config`` and its own ``options`` (None: its defaults); returns the
    adapter files written. ``should_stop`` (the app's Stop button) ends the run early and keeps what it made."""
    trainer = _trainer(method)
    if trainer.options is not None:
        options = trainer.options() if options is None else options
        if not isinstance(options, trainer.options):
            raise ConfigError(f"{method} takes {trainer.options.__name__} options, not {type(options).__name__}")
    if trainer.stages is not None:
        return trainer.stages(config, options, base=base, progress=progress, should_stop=should_stop)
    result = train(config, trainer.method(options), progress=progress, base=base, should_stop=should_stop)
    logger.info("%d steps in %.0f s, final loss %.4f", result.steps, result.seconds, result.final_loss)
    return result.outputs


__all__ = ["TRAINERS", "B4MConfig", "CoLoRAConfig", "SaraConfig", "TrainConfig", "TrainResult", "Trainer",
           "TrainingMethod", "get_method", "run", "train"]
