"""CMLoRA (Zou et al., ICLR 2025, §7): frequency-ordered, dominant-weighted, cached multi-LoRA composition.

Every adapter is evaluated at every step, as in the official code; only which one is *dominant* changes.
Adapters profiled as high-frequency (H: subject, style, object) take the dominant role in the early phase;
in the late phase the rotation moves one place along the H-then-L list, so the first H adapter is never
dominant again and the low-frequency ones (L: background) become dominant in turn. At each refresh step the
new dominant adapter gets a full UNet pass that rewrites its deep-feature cache; the others take shallow passes
from their cached deep features (DeepCache-style), which really skips the deep blocks. Weights: the dominant
adapter's share is (N − 0.5)/(2N − 1.5), each other one's 1/(2N − 1.5).

Implements the paper's intent where the official code deviates (METHODS §7.5): the cache is used on the
non-uniform schedule (the official default mode never reuses features), the late-phase cache reset really
resets, the phase boundary is a fraction of T (0.55), and the weights are constant. A cached feature is never
older than ``max_staleness``·T steps (at least one): the schedule was made for T = 220, where an adapter's
cache waits at most N refresh intervals (≤ 7% of T for N ≤ 5); at T = 20 the same rotation would reuse
features 40% of T old. T in that bound is the whole schedule the run is part of, so the bound is a distance in
noise level: an img2img run that takes the last 10 of 20 steps may reuse a feature for 2 steps, as the
text-to-image steps it replaces do (bounded on the 10 steps run, it would refresh every adapter at every step
and cost about 0.6 of the text-to-image call instead of about half). At full strength nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pipelines.adapter_set import AdapterSet
from pipelines.methods.base import CompositionMethod, Prediction, Route, fuse_weighted
from studio.errors import ConfigError


def refresh_steps(num_steps: int, interval: int = 0, c1: int = 2, c2: int = 3) -> set[int]:
    """Steps with a full pass: non-uniform (interval 0: every c1 in [0, .375T), c2 in [.375T, .875T), c1 after)
    or every ``interval`` steps; interval 1 refreshes every step (no caching)."""
    if interval > 0:
        return set(range(0, num_steps, interval))
    first, second = int(0.375 * num_steps), int(0.875 * num_steps)
    return set(range(0, first, c1)) | set(range(first, second, c2)) | set(range(second, num_steps, c1))


def dominant_shares(n: int) -> tuple[float, float]:
    """(dominant, each other) shares of the fused prediction: (N − 0.5)/(2N − 1.5) and 1/(2N − 1.5)."""
    if n == 1:
        return 1.0, 0.0
    return (n - 0.5) / (2 * n - 1.5), 1.0 / (2 * n - 1.5)


class CMLoRA(CompositionMethod):
    name = "cmlora"

    def __init__(self, cache_interval: int = 0, phase_boundary: float = 0.55, use_cache: bool = True,
                 max_staleness: float = 0.1) -> None:
        super().__init__()
        if not 0 <= phase_boundary <= 1 or cache_interval < 0 or not 0 < max_staleness <= 1:
            raise ConfigError("CMLoRA: phase_boundary and max_staleness are fractions of the steps (0–1, "
                              f"max_staleness above 0) and cache_interval is ≥ 0, not {phase_boundary!r}, "
                              f"{max_staleness!r} and {cache_interval!r}")
        self.cache_interval = cache_interval
        self.phase_boundary = phase_boundary
        self.use_cache = use_cache
        self.max_staleness = max_staleness
        self.max_age = 1
        self.written: dict[str, int] = {}
        self.order: list[str] = []
        self.high: list[str] = []
        self.low: list[str] = []
        self.refresh: set[int] = set()
        self.dominant = ""
        self.counter = 0
        self.late_reset_done = False

    def prepare(self, adapters: AdapterSet, num_steps: int, schedule_steps: int | None = None) -> None:
        super().prepare(adapters, num_steps, schedule_steps)
        names = adapters.names
        self.high = [a.name for a in adapters if a.profile.get("class", "H") == "H"]
        self.low = [n for n in names if n not in self.high]
        if not self.high:  # no H-LoRA: treat all as H
            self.high, self.low = names, []
        self.order = self.high + self.low
        self.refresh = refresh_steps(num_steps, self.cache_interval)
        self.counter = 0
        self.dominant = self.high[0]
        self.late_reset_done = False
        self.max_age = max(1, math.ceil(self.max_staleness * self.schedule_steps))
        self.written = {}

    def _late(self, step: int) -> bool:
        return bool(self.low) and step > self.phase_boundary * self.num_steps

    def _rotate(self, step: int) -> None:
        if self._late(step):
            self.dominant = self.order[(self.counter % len(self.high)) + 1]  # the official (k mod H) + 1
        else:
            self.dominant = self.high[self.counter % len(self.high)]
        self.counter += 1

    def plan(self, step: int) -> list[Route]:
        if step in self.refresh:
            self._rotate(step)
        if not self.use_cache:
            return [Route(n, adapter=n) for n in self.order]
        reset = step == 0
        if self._late(step) and step in self.refresh and not self.late_reset_done:
            self.late_reset_done = reset = True  # the phase changed: rebuild every cache (a real reset)
        routes = []
        for name in self.order:
            fresh = step in self.refresh and name == self.dominant
            write = reset or fresh or step - self.written.get(name, -self.max_age - 1) > self.max_age
            if write:
                self.written[name] = step
            routes.append(Route(name, adapter=name, cache="write" if write else "read"))
        return routes

    def fuse(self, step: int, predictions: Mapping[str, Prediction]) -> Prediction:
        dominant_share, other_share = dominant_shares(len(self.order))
        weights = [dominant_share if n == self.dominant else other_share for n in self.order]
        return fuse_weighted([predictions[n] for n in self.order], weights)

    def describe(self) -> dict:
        return {"cache_interval": self.cache_interval, "phase_boundary": self.phase_boundary,
                "use_cache": self.use_cache, "max_staleness": self.max_staleness, "order": self.order}
