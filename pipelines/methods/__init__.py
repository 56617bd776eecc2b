"""Composition methods, one module each; :func:`make_method` builds one by name."""

from __future__ import annotations

from typing import Any

from pipelines.methods.base import CompositionMethod, Prediction, Route
from pipelines.methods.clora import CLoRA
from pipelines.methods.cmlora import CMLoRA
from pipelines.methods.composite import Composite
from pipelines.methods.merge import Merge
from pipelines.methods.switch import Switch

METHODS: dict[str, type[CompositionMethod]] = {"merge": Merge, "switch": Switch, "composite": Composite,
                                               "cmlora": CMLoRA, "clora": CLoRA}


def make_method(name: str, **options: Any) -> CompositionMethod:
    from studio.errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"unknown composition method {name!r}; choose one of: {', '.join(METHODS)}")
    try:
        return METHODS[name](**options)
    except TypeError as error:
        raise ConfigError(f"bad options for method {name!r}: {error}") from error


__all__ = ["METHODS", "CompositionMethod", "Prediction", "Route", "make_method"]
