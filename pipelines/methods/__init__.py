"""Composition methods, one module each; :func:`make_method` builds one by name."""

from __future__ import annotations

import inspect
from numbers import Real
from typing import Any

from pipelines.methods.base import CompositionMethod, Prediction, Route
from pipelines.methods.clora import CLoRA
from pipelines.methods.cmlora import CMLoRA
from pipelines.methods.composite import Composite
from pipelines.methods.merge import Merge
from pipelines.methods.switch import Switch
from studio.errors import ConfigError

METHODS: dict[str, type[CompositionMethod]] = {"merge": Merge, "switch": Switch, "composite": Composite,
                                               "cmlora": CMLoRA, "clora": CLoRA}


def make_method(name: str, **options: Any) -> CompositionMethod:
    """The method ``name`` with ``options``; unknown names and options, and options of the wrong kind (a word
    where a number goes), are clear errors that list what the method takes."""
    if name not in METHODS:
        raise ConfigError(f"unknown composition method {name!r}; choose one of: {', '.join(METHODS)}")
    accepted = inspect.signature(METHODS[name]).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"method {name!r} has no option {', '.join(unknown)}; "
                          f"its options: {', '.join(accepted) or 'none'}")
    for key, value in options.items():
        default = accepted[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"option {key} of method {name!r} is true or false, not {value!r}")
        if isinstance(default, Real) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, Real)):
            raise ConfigError(f"option {key} of method {name!r} is a number, not {value!r}")
    try:
        return METHODS[name](**options)
    except TypeError as error:
        raise ConfigError(f"bad options for method {name!r}: {error}") from error


__all__ = ["METHODS", "CompositionMethod", "Prediction", "Route", "make_method"]
