"""CoLoRA (Ai et al., ECCV 2024; METHODS §4), ported to the diffusion UNet as a per-layer rank planner.

1. Probe: a short uniform LoRA run gives ΔW_ℓ for every target module ℓ.
2. Contribution: FAIG (Xie et al. 2021, eq. 6–7, as TencentARC/FAIG computes it) along the straight path
   θ̄ + a·ΔW: per probe sample, the gradients at a = k/m are summed, multiplied by ΔW weight by weight, and the
   absolute values summed over the layer's weights, c_ℓ = Σ_w |Σ_k ∂L/∂W_w(k/m)·ΔW_w| / m (a signed sum per
   layer would let contributions cancel), averaged over K fixed (image, t, ε) probe triples. Discriminative
   form: minus the same score on the class images (same t and ε) when the run has them. Cheaper scores:
   ``taylor`` (m = 1), ``weight_change`` (‖ΔW_ℓ‖/‖W_ℓ‖) and ``fisher`` (variance of the LoRA-B gradients).
3. Allocation: share π_ℓ = c_ℓ^β / Σ c^β of a budget equal to a uniform rank-``budget_rank`` LoRA, ranks rounded
   to multiples of 4 within [r_min, r_max], slack from clipping redistributed.
4. Training: an ordinary LoRA with ``rank_pattern`` (scale 1 everywhere), saved in a file plain diffusers loads;
   the plan and the scores go to ``studio.rank_plan``.

The paper's own mapping from contribution to rank is not published; this allocation is the project's.

Default score: ``faig``, the paper's. Per weight and discriminative it does as well as the cheaper
``weight_change`` on the embedded model (zigzag 0.56 vs 0.56 and ordinary prompts 0.83 vs 0.80, two training
seeds, n = 100; docs/results.md, "Method fidelity").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from studio.adapters.inject import lora_layers
from studio.errors import ConfigError
from studio.files import atomic_write
from trainers.loop import Batch, TrainingContext
from trainers.lora import LoraMethod

SCORES = ("faig", "taylor", "weight_change", "fisher")
PROBE_ADAPTER = "studio_probe"


@dataclass
class CoLoRAConfig:
    """CoLoRA's options; a field with ``help`` is a ``studio train colora`` flag."""

    score: str = field(default="faig", metadata={
        "help": "contribution score (faig: the paper's path integral; weight_change: ‖ΔW‖/‖W‖ of the probe)",
        "choices": ("faig", "taylor", "weight_change", "fisher")})
    probe_rank: int = field(default=64, metadata={"help": "rank of the probe LoRA"})
    probe_steps: int = field(default=200, metadata={"help": "steps of the probe run"})
    probe_learning_rate: float | None = field(default=None, metadata={
        "help": "the probe run's rate (default: --learning_rate)"})
    path_points: int = 8  # m
    probe_samples: int = 8  # K: 4 stratified timesteps × 2 images
    budget_rank: int = field(default=16, metadata={"help": "budget = a uniform LoRA of this rank"})
    beta: float = 1.0
    min_rank: int = field(default=4, metadata={"help": "smallest rank of a module (0 lets a module drop out)",
                                               "min": 0})
    max_rank: int = field(default=128, metadata={"help": "largest rank of a module"})
    normalisation: str = "none"  # none | sqrt_params | delta_norm
    discriminative: bool = True  # FAIG/taylor: minus the score on the class images (when the run has them)


def allocate_ranks(scores: dict[str, float], dims: dict[str, tuple[int, int]], budget: int, beta: float = 1.0,
                   min_rank: int = 4, max_rank: int = 128, multiple: int = 4) -> dict[str, int]:
    """Ranks proportional to score^β under a parameter budget Σ r_ℓ(d_in + d_out) ≈ ``budget``.

    A module's rank is also capped at min(d_in, d_out): a larger rank adds parameters but no expressiveness, so
    the budget it would waste goes to the other modules.
    """
    caps = {m: min(max_rank, (min(dims[m]) // multiple) * multiple or min(dims[m])) for m in scores}
    weights = {m: max(float(s), 0.0) ** beta for m, s in scores.items()}
    if sum(weights.values()) <= 0:
        weights = {m: 1.0 for m in scores}
    ranks: dict[str, float] = {}
    free = dict(weights)
    remaining = float(budget)
    for _ in range(len(scores) + 1):  # clip, then give the slack to the modules that were not clipped
        total = sum(free.values())
        if not free or total <= 0:
            break
        raw = {m: w / total * remaining / sum(dims[m]) for m, w in free.items()}
        clipped = {m: caps[m] for m, r in raw.items() if r > caps[m]}  # the top first: it frees budget
        if not clipped:
            clipped = {m: min_rank for m, r in raw.items() if r < min_rank}
        if not clipped:
            ranks.update(raw)
            break
        for module, rank in clipped.items():
            ranks[module] = rank
            remaining -= rank * sum(dims[module])
            del free[module]
        remaining = max(remaining, 0.0)
    for module in scores:
        ranks.setdefault(module, min_rank)
    rounded = {}
    for module, rank in ranks.items():
        value = int(round(rank / multiple)) * multiple
        rounded[module] = int(min(max(value, min_rank), caps[module]))
    return rounded


class CoLoRAMethod(LoraMethod):
    """Plans per-layer ranks from a probe's contributions, then trains a LoRA with them."""

    name = "colora"

    def __init__(self, config: CoLoRAConfig | None = None) -> None:
        super().__init__(scale_one=True)
        self.colora = config or CoLoRAConfig()
        if self.colora.score not in SCORES:
            raise ConfigError(f"unknown CoLoRA score {self.colora.score!r}; choose one of {', '.join(SCORES)}")
        if self.colora.budget_rank < self.colora.min_rank:
            raise ConfigError(f"CoLoRA budget rank {self.colora.budget_rank} is below the minimum rank "
                              f"{self.colora.min_rank}: no module could get a rank")
        self.plan: dict[str, int] = {}
        self.scores: dict[str, float] = {}

    def setup(self, ctx: TrainingContext) -> list[dict[str, Any]]:
        plan_file = ctx.work_dir / "colora_plan.json"
        if plan_file.exists():  # a resumed run keeps the plan it started with
            stored = json.loads(plan_file.read_text())
            self.plan, self.scores = stored["ranks"], stored["scores"]
        else:
            self.scores, dims = self.contributions(ctx)
            budget = self.colora.budget_rank * sum(d_in + d_out for d_in, d_out in dims.values())
            self.plan = allocate_ranks(self.scores, dims, budget, self.colora.beta, self.colora.min_rank,
                                       self.colora.max_rank)
            record = {"ranks": self.plan, "scores": self.scores, "score": self.colora.score, "budget": budget}
            atomic_write(plan_file, lambda tmp: tmp.write_text(json.dumps(record)))
        self.rank_pattern = dict(self.plan)
        self.metadata_extra = {
            "rank_plan": {"ranks": self.plan, "scores": self.scores, "score": self.colora.score,
                          "budget_rank": self.colora.budget_rank},
            "ss_network_dim": max(self.plan.values()),
        }
        return super().setup(ctx)

    # -- probe and scores ------------------------------------------------------------------------------------
    def contributions(self, ctx: TrainingContext) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
        """Per-module contribution scores and (d_in, d_out) from a probe LoRA."""
        probe = LoraMethod(rank=self.colora.probe_rank, adapter_name=PROBE_ADAPTER)
        groups = probe.setup(ctx)
        optimizer = torch.optim.AdamW(groups, lr=self.colora.probe_learning_rate or ctx.config.learning_rate)
        for step in tqdm(range(self.colora.probe_steps), desc="colora probe", leave=False, disable=None):
            loss = probe.training_loss(ctx, 10_000_000 + step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        layers = {path: layer for component, path, layer in lora_layers(ctx.base)
                  if component == "unet" and PROBE_ADAPTER in layer.lora_A}
        for layer in layers.values():
            for part in (layer.lora_A[PROBE_ADAPTER], layer.lora_B[PROBE_ADAPTER]):
                part.weight.requires_grad_(False)
        dims = {p: (layer.in_features, layer.out_features) for p, layer in layers.items()}
        samples = self.probe_batches(ctx, ctx.instance)
        if self.colora.score in ("faig", "taylor"):
            points = self.colora.path_points if self.colora.score == "faig" else 1
            scores = faig_scores(ctx, layers, samples, points)
            if self.colora.discriminative and ctx.prior is not None:
                other = faig_scores(ctx, layers, self.probe_batches(ctx, ctx.prior), points)
                scores = {p: s - other[p] for p, s in scores.items()}
        elif self.colora.score == "weight_change":
            scores = {p: float(_delta(layer).norm() / layer.base_layer.weight.norm()) for p, layer in layers.items()}
        else:
            scores = fisher_scores(ctx, layers, samples)
        if self.colora.normalisation == "sqrt_params":
            scores = {p: s / (dims[p][0] * dims[p][1]) ** 0.5 for p, s in scores.items()}
        elif self.colora.normalisation == "delta_norm":
            scores = {p: s / max(float(_delta(layers[p]).norm()), 1e-12) for p, s in scores.items()}
        probe.cleanup(ctx)
        return scores, dims

    def probe_batches(self, ctx: TrainingContext, data) -> list[tuple[Batch, torch.Tensor, torch.Tensor]]:
        """K fixed (latent, timestep, noise) triples: stratified timesteps × images of ``data``. The timesteps and
        noises depend only on the index, so the instance and class probes are paired."""
        images, draws = ctx.generator(0, stream=8), ctx.generator(0, stream=7)
        total = ctx.noise_scheduler.config.num_train_timesteps
        strata = max(1, self.colora.probe_samples // 2)
        triples = []
        for index in range(self.colora.probe_samples):
            batch = ctx.sample(data, 1, images, split=False)
            low = (index % strata) * total // strata
            t = torch.randint(low, low + total // strata, (1,), generator=draws).to(ctx.device)
            noise = torch.randn(batch.latents.shape, generator=draws).to(ctx.device)
            triples.append((batch, t, noise))
        return triples


def _delta(layer) -> torch.Tensor:
    return layer.get_delta_weight(PROBE_ADAPTER)


def _weight_probe(module, x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """base_layer(x) with ``probe`` in place of its weight and no bias: ∂L/∂probe is ∂L/∂W."""
    base = module.base_layer
    if isinstance(base, torch.nn.Conv2d):
        return F.conv2d(x, probe, None, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, probe)


def faig_scores(ctx: TrainingContext, layers: dict, samples: list, points: int) -> dict[str, float]:
    """FAIG per layer, Σ_w |Σ_k ∂L/∂W_w(a = k/m)·ΔW_w| / m, averaged over the probe samples. Along the path the
    LoRA branch is scaled by a = k/m; a zero full-size probe added to each layer receives ∂L/∂W."""
    probes = {p: torch.zeros_like(layer.base_layer.weight, requires_grad=True) for p, layer in layers.items()}
    deltas = {p: _delta(layer).detach() for p, layer in layers.items()}
    scale = torch.ones(())
    totals = {p: 0.0 for p in layers}
    handles = []
    for path, layer in layers.items():
        def on_path(module, inputs, output, probe=probes[path]):
            branch = module.lora_B[PROBE_ADAPTER](module.lora_A[PROBE_ADAPTER](inputs[0]))
            return output + (scale - 1.0) * branch * module.scaling[PROBE_ADAPTER] + _weight_probe(module, inputs[0],
                                                                                                    probe)
        handles.append(layer.register_forward_hook(on_path))
    try:
        for batch, t, noise in samples:
            gradients = {p: torch.zeros_like(d) for p, d in deltas.items()}
            for k in range(points):
                scale.fill_(k / points)
                for probe in probes.values():
                    probe.grad = None
                ctx.denoising_loss(batch, None, noise=noise, timesteps=t).backward()
                for path, probe in probes.items():
                    gradients[path] += probe.grad
            for path, gradient in gradients.items():
                totals[path] += float((gradient * deltas[path]).abs().sum()) / points
    finally:
        for handle in handles:
            handle.remove()
    return {p: total / len(samples) for p, total in totals.items()}


def fisher_scores(ctx: TrainingContext, layers: dict, samples: list) -> dict[str, float]:
    """Variance of each module's LoRA-B gradient over single-sample backward passes, summed."""
    grads: dict[str, list[torch.Tensor]] = {p: [] for p in layers}
    for layer in layers.values():
        layer.lora_B[PROBE_ADAPTER].weight.requires_grad_(True)
    for batch, t, noise in samples:
        for layer in layers.values():
            layer.lora_B[PROBE_ADAPTER].weight.grad = None
        ctx.denoising_loss(batch, None, noise=noise, timesteps=t).backward()
        for path, layer in layers.items():
            grads[path].append(layer.lora_B[PROBE_ADAPTER].weight.grad.detach().clone())
    return {p: float(torch.stack(g).var(dim=0).sum()) for p, g in grads.items()}
