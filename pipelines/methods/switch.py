"""Switch (Zhong et al. 2024, §6.1): one adapter active at a time, advancing every ``interval`` steps.

After step i (i > 0, i mod τ = 0) the next adapter in the user's order takes over, cyclically, so the first
adapter covers τ + 1 steps and every later one τ. 2 evaluations per step.

The official code switches every 5 of its 200 denoising steps (``--switch_step 5 --denoise_steps 200``): 40
switches per image. Its τ is a step count tuned for that schedule, so ``interval=0`` (the default) keeps the
paper's frequency instead: τ = round(T/40), at least 1, over the whole schedule T (1 at 20–59 steps, 5 at 200).
A positive ``interval`` is used as given.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipelines.adapter_set import AdapterSet
from pipelines.methods.base import CompositionMethod, Prediction, Route
from studio.errors import ConfigError

PAPER_SWITCHES = 40  # the official schedule: τ = 5 over 200 steps


def scaled_interval(schedule_steps: int) -> int:
    """The paper's switching frequency on a schedule of ``schedule_steps`` steps."""
    return max(1, round(schedule_steps / PAPER_SWITCHES))


class Switch(CompositionMethod):
    name = "switch"

    def __init__(self, interval: int = 0) -> None:
        super().__init__()
        if interval < 0:
            raise ConfigError(f"switch interval must be at least 1, or 0 for the paper's frequency, not {interval!r}")
        self.interval = interval
        self.tau = interval or 1

    def prepare(self, adapters: AdapterSet, num_steps: int, schedule_steps: int | None = None) -> None:
        super().prepare(adapters, num_steps, schedule_steps)
        self.tau = self.interval or scaled_interval(self.schedule_steps)

    def active_index(self, step: int) -> int:
        """Index of the adapter used at ``step`` (the switch happens after steps τ, 2τ, …)."""
        return ((step - 1) // self.tau) % len(self.adapters) if step > 0 else 0

    def plan(self, step: int) -> list[Route]:
        return [Route("active", adapter=self.adapters[self.active_index(step)].name)]

    def fuse(self, step: int, predictions: Mapping[str, Prediction]) -> Prediction:
        return predictions["active"]

    def describe(self) -> dict:
        return {"switch_interval": self.tau}
