"""SaRA (Hu et al., ICLR 2025; METHODS §3): fine-tune only the pretrained UNet weights with |w| < θ.

* Selection: one global threshold θ over every UNet tensor (or θ = the N-th smallest |w| for a target count).
* Unstructured backprop (:mod:`trainers.sparse_weights`): the trainable leaf is the vector v of selected values,
  written into the frozen weight storage in place (no copy); v receives only the selected entries of each weight
  gradient, computed block by block for Linear/Conv2d layers, so no full-size gradient and no optimizer state
  exist outside the selection.
* Loss: diffusion loss + λ_rank · ‖ΔP‖_* of one random eligible 2-D layer per step (or all). The penalty's
  gradient λ·U·Vᵀ (from the SVD of ΔP, over its nonzero singular values) is added to v's gradient after the
  backward pass, so it reaches the trained values — the official ``adamw.py`` sends it to the original
  parameter instead, where it never reaches the update (a deviation this module does not copy) — and no SVD is
  held in the autograd graph beside the activations, which kept SaRA's peak memory above LoRA's.
* Progressive re-selection at T/2: only entries still below θ keep training; the Adam state is reset.
* Output: the sparse delta (indices and ΔP values per tensor, with θ and the base fingerprint) and a LoRA
  extracted from it by truncated SVD, so SaRA results compose like any LoRA.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from studio.adapters.file import AdapterFile, LoraModule, save_adapter
from studio.errors import ConfigError
from studio.files import atomic_path
from trainers.loop import TrainingContext, TrainingMethod
from trainers.lora import output_path, training_metadata
from trainers.magnitude_selection import select_below, select_smallest
from trainers.sparse_weights import SparseValues, attach, detach, storage

logger = logging.getLogger(__name__)


@dataclass
class SaraConfig:
    """SaRA's own options (the shared loop's options live in TrainConfig)."""

    threshold: float | None = 2e-3  # θ; ignored when target_params is set
    target_params: int | None = None  # train the N smallest-|w| weights instead
    lambda_rank: float = 5e-4  # nuclear-norm weight; the paper's best grid point is 5e-3
    rank_penalty_layers: str = "random_one"  # random_one | all
    rank_penalty_min_dim: int = 64  # only 2-D updates with min(shape) ≥ this are penalised
    progressive: bool = True  # re-select at T/2
    scope: str = "all"  # all | weights_only | attention_only
    learning_rate: float | None = None  # None: 1e-3·exp(−350θ) (paper eq. 12)
    lora_rank: int | None = None  # fixed rank of the extracted LoRA; None: by energy
    lora_energy: float = 0.9  # share of each ΔW's squared singular values the LoRA keeps


def _in_scope(name: str, parameter: torch.Tensor, scope: str) -> bool:
    if scope == "all":
        return True
    if scope == "weights_only":
        return parameter.dim() >= 2
    if scope == "attention_only":
        return ".attn" in name and parameter.dim() >= 2
    raise ConfigError(f"unknown SaRA scope {scope!r}; choose all, weights_only or attention_only")


def select_weights(unet: nn.Module, config: SaraConfig) -> tuple[float, dict[str, torch.Tensor]]:
    """(θ, flat ascending indices per tensor) of the weights SaRA trains: |w| < θ, or exactly the N smallest |w|."""
    tensors = {n: p for n, p in unet.named_parameters() if "lora_" not in n and _in_scope(n, p, config.scope)}
    if config.target_params is None:
        if not config.threshold or config.threshold <= 0:
            raise ConfigError("SaRA needs a positive --threshold or --target_params")
        return float(config.threshold), select_below(tensors, config.threshold)
    total = sum(p.numel() for p in tensors.values())
    if not 0 < config.target_params < total:
        raise ConfigError(f"--target_params must be between 1 and {total - 1}")
    return select_smallest(tensors, config.target_params)


def sara_learning_rate(threshold: float) -> float:
    """Paper eq. 12: lr = 1e-3 · exp(−350 θ)."""
    return 1e-3 * math.exp(-350.0 * threshold)


class SaraMethod(TrainingMethod):
    name = "sara"

    def __init__(self, config: SaraConfig | None = None) -> None:
        self.config = config or SaraConfig()
        self.threshold = 0.0
        self.slots: dict[str, tuple[nn.Module, str, SparseValues]] = {}
        self.selection: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # M0 indices and base values
        self.selected_total = 0
        self.reselected_total: int | None = None
        self.started_at = 0.0
        self.seed = 0

    # -- setup -----------------------------------------------------------------------------------------------
    def setup(self, ctx: TrainingContext) -> list[dict[str, Any]]:
        import time

        self.started_at = time.time()
        self.seed = ctx.config.seed
        unet = ctx.base.pipe.unet
        unet.requires_grad_(False)
        self.threshold, selection = select_weights(unet, self.config)
        for name, index in selection.items():
            if len(index) == 0:
                continue
            module_name, _, attribute = name.rpartition(".")
            module = unet.get_submodule(module_name)
            slot = attach(module, attribute, index)
            self.selection[name] = (index, slot.initial)  # never changed in place: shared, not copied
            self.slots[name] = (module, attribute, slot)
        self.selected_total = sum(len(slot.index) for _, _, slot in self.slots.values())
        if self.selected_total == 0:
            raise ConfigError(f"no UNet weight has |w| < θ = {self.threshold:g}; raise --threshold")
        lr = self.config.learning_rate or sara_learning_rate(self.threshold)
        ctx.logs["selected_params"] = float(self.selected_total)
        return [{"params": [slot.values for _, _, slot in self.slots.values()], "lr": lr}]

    # -- loss and schedule -------------------------------------------------------------------------------------
    def penalised_layers(self, step: int) -> list[str]:
        eligible = [name for name, (module, attribute, slot) in self.slots.items()
                    if storage(module, attribute).dim() >= 2
                    and min(storage(module, attribute).shape[:2]) >= self.config.rank_penalty_min_dim]
        if not eligible or self.config.lambda_rank <= 0:
            return []
        if self.config.rank_penalty_layers == "all":
            return eligible
        return [random.Random(self.seed * 1_000_003 + step).choice(eligible)]  # per-step: resumable

    @torch.no_grad()
    def after_backward(self, ctx: TrainingContext, step: int) -> None:
        """Add λ_rank · ∂‖ΔP‖_*/∂v = λ_rank · (U·Vᵀ)[selected] for each penalised layer to v's gradient."""
        total = 0.0
        for name in self.penalised_layers(step):
            module, attribute, slot = self.slots[name]
            delta = slot.delta(storage(module, attribute).shape).flatten(1)
            u, singular, vh = torch.linalg.svd(delta, full_matrices=False)
            keep = singular > (float(singular.max()) * 1e-6 if singular.numel() else 0.0)
            total += float(singular.sum())
            gradient = (u[:, keep] @ vh[keep]).reshape(-1)[slot.index] * self.config.lambda_rank
            slot.values.grad = gradient if slot.values.grad is None else slot.values.grad + gradient
        if self.config.lambda_rank > 0:
            ctx.logs["rank_penalty"] = total

    def after_step(self, ctx: TrainingContext, step: int) -> None:
        if not self.config.progressive or step != ctx.config.max_train_steps // 2 or self.reselected_total is not None:
            return
        optimizer = ctx.optimizer
        for _, _, slot in self.slots.values():
            keep = slot.values.detach().abs() <= self.threshold
            old = slot.values
            slot.index, slot.initial = slot.index[keep], slot.initial[keep]
            slot.values = nn.Parameter(old.detach()[keep].clone())  # a new leaf: autograd caches leaf shapes
            optimizer.state.pop(old, None)  # Adam state is reset at T_p, as the paper's code does
            for group in optimizer.param_groups:
                group["params"] = [slot.values if p is old else p for p in group["params"]]
        self.reselected_total = sum(len(slot.index) for _, _, slot in self.slots.values())
        ctx.logs["reselected_params"] = float(self.reselected_total)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"reselected": -1 if self.reselected_total is None else self.reselected_total}
        for name, (_, _, slot) in self.slots.items():
            state[f"{name}.index"] = slot.index.clone()
            state[f"{name}.values"] = slot.values.detach().clone()
            state[f"{name}.initial"] = slot.initial.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore values (before the optimizer is restored, so sizes match its saved state)."""
        for name, (_, _, slot) in self.slots.items():
            slot.index = state[f"{name}.index"]
            slot.initial = state[f"{name}.initial"]
            slot.values.data = state[f"{name}.values"].clone()  # not yet used by autograd: resizing is safe
            slot._written = None  # a .data swap leaves the version unchanged: force the next write
        reselected = int(state["reselected"])
        self.reselected_total = None if reselected < 0 else reselected

    # -- export ----------------------------------------------------------------------------------------------
    def deltas(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Size]]:
        """Per tensor: (flat indices, ΔP values, shape) of the M0 entries that moved, frozen ones included."""
        result = {}
        with torch.no_grad():
            for name, (module, attribute, slot) in self.slots.items():
                flat = storage(module, attribute).view(-1)
                flat[slot.index] = slot.values.to(flat.dtype)  # the last step's values
                index, initial = self.selection[name]
                change = flat[index].float() - initial.float()
                moved = change != 0
                shape = storage(module, attribute).shape
                result[plain_name(name)] = (index[moved].long().cpu(), change[moved].cpu(), shape)
        return result

    def export(self, ctx: TrainingContext) -> list[Path]:
        deltas = self.deltas()
        metadata = training_metadata(ctx, self.name, self.started_at, {
            "sara_threshold": self.threshold,
            "sara_selected_params": self.selected_total,
            "sara_reselected_params": self.reselected_total,
            "sara_lambda_rank": self.config.lambda_rank,
        })
        sparse_path = output_path(ctx, ".sara")
        tensors = {}
        for name, (index, values, shape) in deltas.items():
            tensors[f"{name}.indices"] = index.contiguous()
            tensors[f"{name}.values"] = values.contiguous()
            tensors[f"{name}.shape"] = torch.tensor(list(shape), dtype=torch.int64)
        with atomic_path(sparse_path) as tmp:
            save_file(tensors, str(tmp), metadata={**metadata, "studio.format": "sparse_delta"})
        lora, error = lora_from_deltas(deltas, self.config.lora_rank, self.config.lora_energy)
        if not lora.modules["unet"]:
            logger.warning("SaRA changed only norms and biases, which a LoRA cannot hold: wrote %s alone",
                           sparse_path.name)
            return [sparse_path]
        lora.metadata = {**metadata, "studio.sara_lora_relative_error": json.dumps(error),
                         "studio.sara_sparse_file": sparse_path.name,
                         "ss_network_dim": json.dumps(max(m.rank for m in lora.modules["unet"].values()))}
        return [sparse_path, save_adapter(lora, output_path(ctx), layout=ctx.config.export_layout,
                         precision=ctx.config.save_precision)]

    def cleanup(self, ctx: TrainingContext) -> None:
        """Put the base weights back and remove the parametrizations."""
        with torch.no_grad():
            for name, (module, attribute, _) in self.slots.items():
                index, initial = self.selection[name]
                storage(module, attribute).view(-1)[index] = initial.to(storage(module, attribute).dtype)
                detach(module, attribute)
        self.slots.clear()
        self.selection.clear()


def plain_name(name: str) -> str:
    """A UNet parameter's name without peft's ``base_layer`` (present once any LoRA was attached)."""
    return name.replace(".base_layer.", ".")


def lora_from_deltas(deltas: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Size]], rank: int | None,
                     energy: float) -> tuple[AdapterFile, float]:
    """Truncated-SVD LoRA of every 2-D/4-D ΔP; returns it with the relative Frobenius error over all of ΔP."""
    modules: dict[str, LoraModule] = {}
    total, lost = 0.0, 0.0
    for name, (index, values, shape) in deltas.items():
        dense = torch.zeros(shape.numel()).index_put((index,), values).view(shape)
        total += float(dense.pow(2).sum())
        module_path, _, attribute = name.rpartition(".")
        if attribute != "weight" or dense.dim() not in (2, 4) or len(values) == 0:
            lost += float(dense.pow(2).sum())  # norms and biases cannot be a LoRA
            continue
        matrix = dense.flatten(1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        if rank is not None:
            r = min(rank, len(s))
        else:
            cumulative = torch.cumsum(s.pow(2), 0) / s.pow(2).sum().clamp(min=1e-20)
            r = int((cumulative < energy).sum()) + 1
        root = s[:r].sqrt()
        up, down = u[:, :r] * root, root[:, None] * vh[:r]
        lost += float(s[r:].pow(2).sum())
        if dense.dim() == 4:
            down, up = down.view(r, *shape[1:]), up.view(shape[0], r, 1, 1)
        modules[module_path] = LoraModule(down.contiguous(), up.contiguous(), alpha=float(r))
    return AdapterFile({"unet": modules}), math.sqrt(lost / total) if total > 0 else 0.0


def read_sparse_delta(path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Size]], dict]:
    """Read a SaRA sparse-delta file: per tensor (indices, values, shape), and its metadata."""
    from safetensors import safe_open

    from studio.errors import AdapterError

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            names = {key.rsplit(".", 1)[0] for key in handle.keys()}
            deltas = {name: (handle.get_tensor(f"{name}.indices"), handle.get_tensor(f"{name}.values"),
                             torch.Size(handle.get_tensor(f"{name}.shape").tolist())) for name in names}
    except Exception as error:
        raise AdapterError(f"{Path(path).name} is not a readable SaRA sparse-delta file: {error}") from error
    if metadata.get("studio.format") != "sparse_delta":
        raise AdapterError(f"{Path(path).name} is not a SaRA sparse-delta file")
    return deltas, metadata


@torch.no_grad()
def apply_sparse_delta(unet: nn.Module, deltas: dict, alpha: float = 1.0) -> None:
    """P ← P + α·ΔP in place (call again with −α to undo); LoRA layers attached to ``unet`` are looked through."""
    parameters = {plain_name(n): p for n, p in unet.named_parameters() if "lora_" not in n}
    for name, (index, values, shape) in deltas.items():
        if name not in parameters or parameters[name].shape != shape:
            from studio.errors import AdapterError

            raise AdapterError(f"sparse delta for {name} does not fit this UNet")
        parameters[name].view(-1).index_add_(0, index.to(parameters[name].device),
                                            alpha * values.to(parameters[name].dtype))
