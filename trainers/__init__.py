"""Trainers: one shared loop (:mod:`trainers.loop`) and one module per method."""

from __future__ import annotations

from collections.abc import Callable

from studio.errors import ConfigError
from trainers.colora import CoLoRAMethod
from trainers.config import TrainConfig
from trainers.loop import TrainingMethod, TrainResult, train
from trainers.lora import LoraMethod
from trainers.sara import SaraMethod


def _lora() -> TrainingMethod:
    return LoraMethod()


def _sara() -> TrainingMethod:
    return SaraMethod()


def _colora() -> TrainingMethod:
    return CoLoRAMethod()


#: Method name → factory of its default TrainingMethod.
METHODS: dict[str, Callable[[], TrainingMethod]] = {"lora": _lora, "sara": _sara, "colora": _colora}


def get_method(name: str) -> TrainingMethod:
    if name not in METHODS:
        raise ConfigError(f"unknown training method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]()


__all__ = ["METHODS", "TrainConfig", "TrainResult", "TrainingMethod", "get_method", "train"]
