"""Merge (Zhong et al. 2024, §6.1): all adapters active at once, W′ = W + Σ λ_i ΔW_i; 2 evaluations per step."""

from __future__ import annotations

from collections.abc import Mapping

from pipelines.methods.base import CompositionMethod, Prediction, Route


class Merge(CompositionMethod):
    name = "merge"

    def plan(self, step: int) -> list[Route]:
        return [Route("merged", merged=self.adapters.weights())]

    def fuse(self, step: int, predictions: Mapping[str, Prediction]) -> Prediction:
        return predictions["merged"]
