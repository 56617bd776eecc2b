"""Switch (Zhong et al. 2024, §6.1): one adapter active at a time, advancing every ``interval`` steps.

After step i (i > 0, i mod τ = 0) the next adapter in the user's order takes over, cyclically, so the first
adapter covers τ + 1 steps and every later one τ. 2 evaluations per step.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipelines.methods.base import CompositionMethod, Prediction, Route
from studio.errors import ConfigError


class Switch(CompositionMethod):
    name = "switch"

    def __init__(self, interval: int = 5) -> None:
        super().__init__()
        if interval < 1:
            raise ConfigError(f"switch interval must be at least 1, not {interval!r}")
        self.interval = interval

    def active_index(self, step: int) -> int:
        """Index of the adapter used at ``step`` (the switch happens after steps τ, 2τ, …)."""
        return ((step - 1) // self.interval) % len(self.adapters) if step > 0 else 0

    def plan(self, step: int) -> list[Route]:
        return [Route("active", adapter=self.adapters[self.active_index(step)].name)]

    def fuse(self, step: int, predictions: Mapping[str, Prediction]) -> Prediction:
        return predictions["active"]

    def describe(self) -> dict:
        return {"switch_interval": self.interval}
