"""Fit a read adapter to the base it is attached to: the parts of a file that only the base's weights decide.

A LoHa convolution stores its kernel flattened (its shape comes from the target layer), and DoRA's ΔW is a
function of the base weight (:func:`studio.adapters.lycoris.resolve_dora`); both are settled here, before peft's
layers are made, so what is attached is plain LoRA factors that every composition method can route.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from studio.adapters.file import AdapterFile, LoraModule
from studio.adapters.keys import module_path_in
from studio.adapters.lycoris import full_rank_factors, resolve_dora
from studio.errors import AdapterError


def _target(base, component: str, path: str) -> nn.Module | None:
    model = getattr(base.pipe, component, None)
    found = None if model is None else module_path_in(model, path)
    if found is None:
        return None
    target = model.get_submodule(found)
    return getattr(target, "base_layer", target)


def shape_to_base(adapter: AdapterFile, base) -> AdapterFile:
    """The adapter with every flattened convolution factor given its target's kernel shape (a factor that does not
    fit is left for :func:`~studio.adapters.validate.validate_adapter` to report)."""
    modules = {}
    for component, entries in adapter.modules.items():
        modules[component] = {}
        for path, module in entries.items():
            target = _target(base, component, path)
            kernel = target.weight.shape[1:] if isinstance(target, nn.Conv2d) else None
            if kernel is not None and module.down.dim() == 2 and module.down.shape[1] == kernel.numel():
                module = replace(module, down=module.down.reshape(module.down.shape[0], *kernel),
                                 up=module.up.reshape(module.up.shape[0], -1, 1, 1))
            modules[component][path] = module
    return replace(adapter, modules=modules)


def resolve_against_base(adapter: AdapterFile, base) -> AdapterFile:
    """DoRA modules turned into the exact ΔW they make on this base's weights (as full-rank LoRA factors); bias
    deltas checked against the layer. Call after :func:`~studio.adapters.validate.validate_adapter`."""
    modules = {}
    for component, entries in adapter.modules.items():
        modules[component] = {}
        for path, module in entries.items():
            target = _target(base, component, path)
            if module.bias is not None and (target.bias is None or module.bias.numel() != target.bias.numel()):
                raise AdapterError(f"adapter '{_name(adapter)}': {component}.{path} has a bias delta of "
                                   f"{module.bias.numel()} values for a layer with "
                                   f"{0 if target.bias is None else target.bias.numel()} biases")
            if module.magnitude is not None:
                try:
                    delta = resolve_dora(module.magnitude, target.weight.detach().float().cpu(), module.delta())
                except AdapterError as error:
                    raise AdapterError(f"adapter '{_name(adapter)}': {component}.{path}: {error}") from error
                down, up = full_rank_factors(delta)
                module = LoraModule(down, up, float(down.shape[0]), bias=module.bias)
            modules[component][path] = module
    return replace(adapter, modules=modules)


def _name(adapter: AdapterFile) -> str:
    return adapter.path.name if adapter.path else adapter.name


def has_bias(modules: dict[str, LoraModule]) -> bool:
    return any(m.bias is not None for m in modules.values())


def bias_or_zero(module: LoraModule, out_features: int) -> torch.Tensor:
    return module.bias if module.bias is not None else torch.zeros(out_features)
