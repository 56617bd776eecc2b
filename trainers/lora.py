"""Plain LoRA (Hu et al. 2021) on the UNet's attention projections (and optionally the text encoder).

The baseline every other method is compared with, and the pattern they follow: inject trainable layers in
``setup``, checkpoint them through ``state_dict``, export an adapter file with full metadata.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from studio.adapters.file import AdapterFile, save_adapter
from studio.adapters.inject import (
    adapter_from_layers,
    detach_adapter,
    inject_lora,
    lora_layers,
    set_adapter_weights,
)
from studio.adapters.metadata import adapter_metadata, optimizer_learning_rates
from studio.data.folder import tag_frequency
from studio.errors import ConfigError
from trainers.loop import TrainingContext, TrainingMethod

TRAINING_ADAPTER = "studio_training"  # not "training": that is an nn.Module attribute
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class LoraMethod(TrainingMethod):
    """Trains a LoRA adapter; ``rank_pattern`` (module path → rank) gives per-layer ranks (used by CoLoRA)."""

    name = "lora"

    def __init__(self, rank_pattern: dict[str, int] | None = None, metadata_extra: dict[str, Any] | None = None,
                 rank: int | None = None, adapter_name: str | None = None, scale_one: bool = False) -> None:
        self.rank_pattern = dict(rank_pattern or {})
        self.metadata_extra = dict(metadata_extra or {})
        self.rank = rank
        self.adapter_name = adapter_name or TRAINING_ADAPTER
        self.scale_one = scale_one  # alpha = rank in every module (CoLoRA's per-layer ranks)
        self.started_at = 0.0
        self.parameters: dict[str, torch.nn.Parameter] = {}

    def setup(self, ctx: TrainingContext) -> list[dict[str, Any]]:
        import time

        self.started_at = time.time()
        config = ctx.config
        rank = self.rank or config.rank
        alpha = rank if self.scale_one else (config.network_alpha or rank)
        torch.manual_seed(config.seed)
        components = [("unet", list(config.target_modules), config.learning_rate)]
        if config.train_text_encoder:
            text_lr = config.text_encoder_lr or config.learning_rate
            for name in ("text_encoder", "text_encoder_2"):
                if getattr(ctx.base.pipe, name, None) is not None:
                    components.append((name, list(TEXT_ENCODER_TARGETS), text_lr))
        groups = []
        for component, targets, lr in components:
            model = getattr(ctx.base.pipe, component)
            model.requires_grad_(False)
            patterns = {f"^{p.replace('.', chr(92) + '.')}$": r for p, r in self.rank_pattern.items()
                        if component == "unet"}
            if patterns:
                targets = [p for p in self.rank_pattern if self.rank_pattern[p] > 0]
            lora_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian",
                                     rank_pattern=patterns, alpha_pattern=patterns if self.scale_one else {})
            try:
                inject_lora(lora_config, model, self.adapter_name)
            except ValueError as error:  # peft: "Target modules … not found in the base model"
                raise ConfigError(f"cannot train a LoRA on this base's {component}: {error}") from error
            params = []
            for path, module in model.named_modules():
                if hasattr(module, "lora_A") and self.adapter_name in module.lora_A:
                    for part in ("lora_A", "lora_B"):
                        weight = getattr(module, part)[self.adapter_name].weight
                        weight.data = weight.data.float()
                        self.parameters[f"{component}.{path}.{part}"] = weight
                        params.append(weight)
            groups.append({"params": params, "lr": lr})
        set_adapter_weights(ctx.base, {self.adapter_name: 1.0})
        for param in self.parameters.values():
            param.requires_grad_(True)
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {name: param.detach().clone() for name, param in self.parameters.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, param in self.parameters.items():
                param.copy_(state[name])

    @contextlib.contextmanager
    def preview_weight(self, ctx: TrainingContext, weight: float) -> Iterator[None]:
        for _, _, layer in lora_layers(ctx.base):
            if self.adapter_name in layer.lora_A:
                layer.set_scale(self.adapter_name, weight)
        try:
            yield
        finally:
            for _, _, layer in lora_layers(ctx.base):
                if self.adapter_name in layer.lora_A:
                    layer.set_scale(self.adapter_name, 1.0)

    def adapter(self, ctx: TrainingContext) -> AdapterFile:
        """The trained weights with the studio's full metadata."""
        adapter = adapter_from_layers(ctx.base, self.adapter_name)
        adapter.metadata = training_metadata(ctx, self.name, self.started_at, self.metadata_extra)
        return adapter

    def export(self, ctx: TrainingContext) -> list[Path]:
        return [save_adapter(self.adapter(ctx), output_path(ctx), layout=ctx.config.export_layout,
                         precision=ctx.config.save_precision)]

    def cleanup(self, ctx: TrainingContext) -> None:
        detach_adapter(ctx.base, self.adapter_name)
        self.parameters.clear()


def output_path(ctx: TrainingContext, suffix: str = "") -> Path:
    return ctx.config.output_folder() / f"{ctx.config.output}{suffix}.safetensors"


def trigger_words(ctx: TrainingContext) -> list[str]:
    """The configured trigger words, else caption words the base reserves for adapters (domain metadata)."""
    if ctx.config.trigger_words:
        return list(ctx.config.trigger_words)
    reserved = set((ctx.base.domain or {}).get("trigger_words", []))
    captions = [ctx.config.instance_prompt or ""] + [image.caption for image in ctx.images]
    found = dict.fromkeys(w for c in captions for w in c.replace(",", " ").split() if w in reserved)
    return list(found) or ([ctx.config.instance_prompt] if ctx.config.instance_prompt else [])


def trained_learning_rate(ctx: TrainingContext) -> float:
    """The rate the optimizer's parameter groups trained at (the largest), not the configured default."""
    rates = optimizer_learning_rates(ctx.optimizer)
    return max(rates) if rates else ctx.config.learning_rate


def steps_run(ctx: TrainingContext) -> int:
    """The optimizer steps the loop took (fewer than planned after a stop), else the configured count."""
    return ctx.steps_run if ctx.steps_run is not None else ctx.config.max_train_steps


def training_metadata(ctx: TrainingContext, method: str, started_at: float,
                      extra: dict[str, Any] | None = None) -> dict[str, str]:
    config = ctx.config
    extra = {"learning_rates": optimizer_learning_rates(ctx.optimizer), **(extra or {})}
    if config.decor_remove:  # the words the adapter was trained without; recommended at inference too
        extra = {"decor_remove": config.decor_remove, "decor_alpha": config.decor_alpha, **(extra or {})}
    return adapter_metadata(
        ctx.base, name=config.output, method=method, kind=config.kind, rank=config.rank,
        alpha=config.network_alpha or config.rank, trigger_words=trigger_words(ctx), seed=config.seed,
        steps=steps_run(ctx), max_steps=config.max_train_steps, started_at=started_at,
        tag_frequency=tag_frequency(ctx.images), num_images=len(ctx.images), learning_rate=trained_learning_rate(ctx),
        resolution=config.resolution or ctx.base.default_size, extra=extra,
    )
