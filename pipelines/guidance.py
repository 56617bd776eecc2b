"""Guidance combiners: pure tensor functions that turn noise predictions into one estimate (METHODS §11.2).

Composition methods fuse per-adapter predictions first (``weighted_mean``, ``masked_fusion``), then a guidance
rule (``cfg`` or ``perp_neg``) combines the fused unconditional/conditional predictions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance ε_u + s(ε_c − ε_u), with optional rescaling (Lin et al. 2023, eq. 15–16)."""
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if rescale > 0:
        dims = tuple(range(1, guided.dim()))
        ratio = eps_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp(min=1e-8)
        guided = rescale * guided * ratio + (1 - rescale) * guided
    return guided


def weighted_mean(predictions: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i ε_i / Σ w_i (Composite: equal weights; CMLoRA: dominant-weighted)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    return sum(w * p for w, p in zip(weights, predictions)) / total


def masked_fusion(predictions: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                  background: torch.Tensor | None = None) -> torch.Tensor:
    """Σ m_i ε_i where masks cover the image; uncovered pixels take ``background`` (or the plain mean)."""
    stacked = torch.stack(list(predictions))
    mask = torch.stack([m.to(stacked.dtype) for m in masks])
    while mask.dim() < stacked.dim():
        mask = mask.unsqueeze(-3) if mask.dim() == stacked.dim() - 1 else mask.unsqueeze(1)
    coverage = mask.sum(0)
    fused = (stacked * mask).sum(0) / coverage.clamp(min=1e-8)
    fallback = background if background is not None else stacked.mean(0)
    return torch.where(coverage > 0, fused, fallback)


def perpendicular_component(vector: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The part of ``vector`` orthogonal to ``reference``, per sample."""
    dims = tuple(range(1, vector.dim()))
    dot = (vector * reference).sum(dim=dims, keepdim=True)
    norm = (reference * reference).sum(dim=dims, keepdim=True).clamp(min=1e-6)  # METHODS §9.3
    return vector - dot / norm * reference


def perp_neg(eps_empty: torch.Tensor, eps_positive: torch.Tensor, eps_negatives: Sequence[torch.Tensor],
             negative_weights: Sequence[float], scale: float) -> torch.Tensor:
    """Perp-Neg (Armandpour et al. 2023, eq. 7): ε_∅ + s[(ε_+ − ε_∅) − Σ w_i (ε_−i − ε_∅)^⊥],
    where ⊥ removes each negative's component along the positive direction, so shared concepts survive."""
    positive = eps_positive - eps_empty
    correction = torch.zeros_like(positive)
    for eps_negative, weight in zip(eps_negatives, negative_weights):
        correction = correction + weight * perpendicular_component(eps_negative - eps_empty, positive)
    return eps_empty + scale * (positive - correction)
