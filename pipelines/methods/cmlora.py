"""CMLoRA (Zou et al., ICLR 2025, §7): frequency-ordered, dominant-weighted, cached multi-LoRA composition.

Adapters profiled as high-frequency (H: subject, style, object) lead; low-frequency ones (L: background) enter
in the late phase. At each refresh step the dominant adapter rotates and gets a fresh full UNet pass that
rewrites its deep-feature cache; the others take shallow passes from their cached deep features
(DeepCache-style), which really skips the deep blocks. Weights: the dominant adapter's share is
(N − 0.5)/(2N − 1.5), each other one's 1/(2N − 1.5).

Implements the paper's intent where the official code deviates (METHODS §7.5): the cache is used on the
non-uniform schedule (the official default mode never reuses features), the late-phase cache reset really
resets, the phase boundary is a fraction of T (0.55), and the weights are constant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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

    def __init__(self, cache_interval: int = 0, phase_boundary: float = 0.55, use_cache: bool = True) -> None:
        super().__init__()
        if not 0 <= phase_boundary <= 1 or cache_interval < 0:
            raise ConfigError("CMLoRA: phase_boundary is a fraction of the steps between 0 and 1 and cache_interval "
                              f"is ≥ 0, not {phase_boundary!r} and {cache_interval!r}")
        self.cache_interval = cache_interval
        self.phase_boundary = phase_boundary
        self.use_cache = use_cache
        self.order: list[str] = []
        self.high: list[str] = []
        self.low: list[str] = []
        self.refresh: set[int] = set()
        self.dominant = ""
        self.counter = 0
        self.late_reset_done = False

    def prepare(self, adapters: Sequence[tuple[str, float]], num_steps: int, profiles: Mapping[str, dict]) -> None:
        super().prepare(adapters, num_steps, profiles)
        names = [name for name, _ in adapters]
        self.high = [n for n in names if profiles.get(n, {}).get("class", "H") == "H"]
        self.low = [n for n in names if n not in self.high]
        if not self.high:  # no H-LoRA: treat all as H
            self.high, self.low = names, []
        self.order = self.high + self.low
        self.refresh = refresh_steps(num_steps, self.cache_interval)
        self.counter = 0
        self.dominant = self.high[0]
        self.late_reset_done = False

    def _late(self, step: int) -> bool:
        return bool(self.low) and step > self.phase_boundary * self.num_steps

    def _rotate(self, step: int) -> None:
        if self._late(step):
            self.dominant = self.order[((self.counter - 1) % len(self.high)) + 1]
        else:
            self.dominant = self.high[self.counter % len(self.high)]
        self.counter += 1

    def active(self, step: int) -> list[str]:
        """The adapters composed at ``step``: early phase the H list, late phase the first H leaves, L enters."""
        if self._late(step):
            return self.order[1 : len(self.high) + 1] if len(self.order) > len(self.high) else self.order
        return self.high if self.low else self.order

    def plan(self, step: int) -> list[Route]:
        if step in self.refresh:
            self._rotate(step)
        names = self.active(step)
        if not self.use_cache:
            return [Route(n, adapter=n) for n in names]
        if step == 0:
            return [Route(n, adapter=n, cache="write") for n in names]
        if self._late(step) and step in self.refresh and not self.late_reset_done:
            self.late_reset_done = True  # the phase changed: rebuild every cache (a real reset)
            return [Route(n, adapter=n, cache="write") for n in names]
        return [Route(n, adapter=n, cache="write" if (step in self.refresh and n == self.dominant) else "read")
                for n in names]

    def fuse(self, step: int, predictions: Mapping[str, Prediction]) -> Prediction:
        names = [n for n in self.active(step) if n in predictions]
        dominant_share, other_share = dominant_shares(len(names))
        weights = [dominant_share if n == self.dominant else other_share for n in names]
        if self.dominant not in names:
            weights = [1.0] * len(names)
        return fuse_weighted([predictions[n] for n in names], weights)

    def describe(self) -> dict:
        return {"cache_interval": self.cache_interval, "phase_boundary": self.phase_boundary,
                "use_cache": self.use_cache, "order": self.order}
