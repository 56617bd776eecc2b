"""Trainers: one shared loop (:mod:`trainers.loop`) and one module per method."""

from __future__ import annotations

from collections.abc import Callable

from studio.errors import ConfigError
from trainers.config import TrainConfig
from trainers.loop import TrainingMethod, TrainResult, train


def _lora() -> TrainingMethod:
    from trainers.lora import LoraMethod

    return LoraMethod()


def _sara() -> TrainingMethod:
    from trainers.sara import SaraMethod

    return SaraMethod()


def _colora() -> TrainingMethod:
    from trainers.colora import CoLoRAMethod

    return CoLoRAMethod()


#: Method name → factory of its default TrainingMethod.
METHODS: dict[str, Callable[[], TrainingMethod]] = {"lora": _lora, "sara": _sara, "colora": _colora}


def get_method(name: str) -> TrainingMethod:
    if name not in METHODS:
        raise ConfigError(f"unknown training method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]()


__all__ = ["METHODS", "TrainConfig", "TrainResult", "TrainingMethod", "get_method", "train"]
