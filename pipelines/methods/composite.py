"""Composite (Zhong et al. 2024, §6.1): every adapter evaluated alone at each step, predictions averaged.

ε̄_u = (1/N) Σ ε_u^i and ε̄_c likewise, then CFG — the mean of the per-adapter CFG outputs. 2N evaluations per
step, run as one batch with per-sample adapter routing.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipelines.methods.base import CompositionMethod, Prediction, Route, fuse_weighted


class Composite(CompositionMethod):
    name = "composite"

    def plan(self, step: int) -> list[Route]:
        return [Route(name, adapter=name) for name in self.adapters.names]

    def fuse(self, step: int, predictions: Mapping[str, Prediction]) -> Prediction:
        return fuse_weighted([predictions[name] for name in self.adapters.names], [1.0] * len(self.adapters))
