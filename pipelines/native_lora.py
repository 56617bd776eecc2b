"""diffusers-native LoRA (``load_lora_weights``, ``add_adapter``, ``set_adapters``, ``fuse_lora``) under composition.

Without ``adapters=`` the engine runs peft's own forward, so diffusers' adapters act exactly as in stock
diffusers. With ``adapters=`` the composition routes batch slices through the studio's adapters one at a time,
which peft's mixed batch cannot combine with other active adapters (one adapter per sample) nor with fused ones
(it refuses ``adapter_names`` on merged layers). :func:`shared_base` therefore makes the diffusers-native
adapters part of the base for the generation: each layer's active non-studio adapters are merged into a copy of
its weight with peft's own ``merge`` (at their ``set_adapters`` weight times the ``cross_attention_kwargs``
scale), fused adapters already are in the weight, and the layer forgets both for the block, so every route —
base, merged, single adapter — sees them. Afterwards the original weight tensors, active sets, scales, merge
records and ``requires_grad`` flags are put back exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

from studio.adapters.inject import lora_layers


@dataclass
class _LayerState:
    layer: LoraLayer
    weight: torch.Tensor
    bias: torch.Tensor | None
    active: list[str]
    merged: list[str]
    disabled: bool
    scaling: dict
    grads: dict[str, bool]


def native_adapters(base, managed: Iterable[str]) -> list[str]:
    """Active (or fused) adapters in the base's LoRA layers that are not among the studio's ``managed`` ones."""
    managed = set(managed)
    names: set[str] = set()
    for _, _, layer in lora_layers(base):
        if not layer.disable_adapters:
            names.update(n for n in layer.active_adapters if n not in managed and n in layer.lora_A)
        names.update(layer.merged_adapters)
    return sorted(names)


def _snapshot(layer: LoraLayer) -> _LayerState:
    base = layer.get_base_layer()
    return _LayerState(layer, base.weight.data, None if getattr(base, "bias", None) is None else base.bias.data,
                       list(layer.active_adapters), list(layer.merged_adapters), bool(layer.disable_adapters),
                       dict(layer.scaling), {n: p.requires_grad for n, p in layer.named_parameters()})


def _restore(state: _LayerState) -> None:
    layer, base = state.layer, state.layer.get_base_layer()
    base.weight.data = state.weight
    if state.bias is not None:
        base.bias.data = state.bias
    layer.merged_adapters[:] = state.merged
    layer.enable_adapters(not state.disabled)
    layer.set_adapter(state.active)
    layer.scaling.update(state.scaling)
    _set_grads(layer, state.grads)


def _set_grads(layer: LoraLayer, grads: dict[str, bool]) -> None:
    """peft's ``set_adapter`` and ``enable_adapters`` unfreeze the adapters they activate: undo that."""
    for name, parameter in layer.named_parameters():
        if name in grads and parameter.requires_grad != grads[name]:
            parameter.requires_grad_(grads[name])


@contextlib.contextmanager
def shared_base(base, managed: Iterable[str], scale: float = 1.0) -> Iterator[list[str]]:
    """For the block, every LoRA layer's diffusers-native adapters (active, not in ``managed``, at their weight
    times ``scale``; or fused) are part of its base weight and no longer adapters of the layer; yields their
    names. Layers without any are left alone."""
    managed = set(managed)
    states: list[_LayerState] = []
    names: set[str] = set()
    try:
        for _, _, layer in lora_layers(base):
            native = [] if layer.disable_adapters else [
                n for n in layer.active_adapters if n not in managed and n in layer.lora_A and
                n not in layer.merged_adapters]
            if not native and not layer.merged_adapters and not layer.disable_adapters:
                continue
            state = _snapshot(layer)
            states.append(state)
            names.update(native, layer.merged_adapters)
            module = layer.get_base_layer()
            module.weight.data = state.weight.clone()
            if state.bias is not None:
                module.bias.data = state.bias.clone()
            for name in native:
                layer.scaling[name] = layer.scaling[name] * scale
            if native:
                layer.merge(adapter_names=native)
            layer.merged_adapters.clear()
            layer.enable_adapters(True)
            layer.set_adapter([n for n in state.active if n in managed])
            _set_grads(layer, state.grads)
        yield sorted(names)
    finally:
        for state in reversed(states):
            _restore(state)
