"""Routed batches through per-adapter merged weights, built once per generation.

peft's mixed-batch forward runs the base projection on the whole batch and then, for every adapter, gathers its
slice, runs the LoRA branch and scatters the result back: about 1 + 5·N small kernels per layer, which dominate
a small UNet on the CPU (Composite with 3 adapters cost 2.1× a single LoRA, against 1.2× for a plain UNet on the
same batch). Here every slice runs on W + ΔW_i, the merged weight of its adapter, built on first use and kept
until the generation ends: equal runs of slices go through one batched matmul (or one grouped convolution) over
the stacked merged weights, uneven runs one kernel each. Exact up to float rounding; the extra memory is about
one weight copy per (LoRA layer, adapter routed through it), so a generation only merges when that fits a budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from peft.tuners.lora import LoraLayer

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
DEFAULT_BUDGET_BYTES = 1 << 30


class MergedRouting:
    """While installed on a UNet, routed calls run each slice on its adapter's merged weights.

    Equal runs go through one stack of merged weights per layer and routing pattern (built from uncached merges);
    uneven runs through one cached merged weight per layer and adapter."""

    def __init__(self) -> None:
        self.weights: dict[tuple, torch.Tensor] = {}
        self.runs: list[tuple[int, int, str]] | None = None

    @staticmethod
    def extra_bytes(layers: Iterable[LoraLayer], adapters: Iterable[str]) -> int:
        """Memory one merged copy of each of ``adapters`` takes in the layers they adapt."""
        names = set(adapters)
        return sum(layer.get_base_layer().weight.numel() * layer.get_base_layer().weight.element_size()
                   * len(names & set(layer.lora_A)) for layer in layers)

    @staticmethod
    def merge(layer: LoraLayer, name: str) -> torch.Tensor:
        """W + ΔW of adapter ``name`` at its current scale (W itself for ``BASE`` or an adapter not in the layer)."""
        base = layer.get_base_layer().weight
        if name == BASE or name not in layer.lora_A:
            return base
        with torch.no_grad():
            return (base + layer.get_delta_weight(name).to(base.dtype)).detach()

    def weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        key = (id(layer), name)
        if key not in self.weights:
            self.weights[key] = self.merge(layer, name)
        return self.weights[key]

    def stacked(self, layer: LoraLayer) -> torch.Tensor:
        key = (id(layer), tuple(name for _, _, name in self.runs))
        if key not in self.weights:
            self.weights[key] = torch.stack([self.merge(layer, name) for _, _, name in self.runs])
        return self.weights[key]

    def forward(self, layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        base = layer.get_base_layer()
        if x.shape[0] != self.runs[-1][1]:
            raise ValueError(f"routed batch of {self.runs[-1][1]} samples, but a layer got {x.shape[0]}")
        groups, size = len(self.runs), x.shape[0] // len(self.runs)
        if groups > 1 and all(end - start == size for start, end, _ in self.runs):
            weight = self.stacked(layer)
            if isinstance(base, torch.nn.Conv2d) and base.groups == 1 and base.padding_mode == "zeros":
                folded = x.unflatten(0, (groups, size)).transpose(0, 1).flatten(1, 2)
                bias = None if base.bias is None else base.bias.repeat(groups)
                out = torch.nn.functional.conv2d(folded, weight.flatten(0, 1), bias, base.stride, base.padding,
                                                 base.dilation, groups)
                return out.unflatten(1, (groups, -1)).transpose(0, 1).flatten(0, 1)
            if isinstance(base, torch.nn.Linear):
                flat = x.reshape(groups, -1, x.shape[-1])
                out = torch.bmm(flat, weight.transpose(1, 2))
                if base.bias is not None:
                    out = out + base.bias
                return out.reshape(*x.shape[:-1], -1)
        parts = []
        for start, end, name in self.runs:
            weight = self.weight(layer, name)
            if isinstance(base, torch.nn.Conv2d):
                parts.append(base._conv_forward(x[start:end], weight, base.bias))
            else:
                parts.append(torch.nn.functional.linear(x[start:end], weight, base.bias))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @contextlib.contextmanager
    def route(self, adapter_names: Sequence[str]) -> Iterator[None]:
        """Route batch slice i through ``adapter_names[i]`` for the calls inside the block."""
        names = list(adapter_names)
        runs: list[tuple[int, int, str]] = []
        for index, name in enumerate(names):
            if runs and runs[-1][2] == name:
                runs[-1] = (runs[-1][0], index + 1, name)
            else:
                runs.append((index, index + 1, name))
        previous, self.runs = self.runs, runs
        try:
            yield
        finally:
            self.runs = previous


def _supported(layer: LoraLayer) -> bool:
    """A plain Linear/Conv2d LoRA: not DoRA, and no bias in lora_B (LyCORIS full-diff's bias delta), which a
    merged weight does not carry."""
    return isinstance(layer.get_base_layer(), torch.nn.Linear | torch.nn.Conv2d) and not any(
        getattr(layer, "use_dora", {}).values()) and not any(getattr(layer, "lora_bias", {}).values())


@contextlib.contextmanager
def merged_routing(unet: torch.nn.Module, adapters: Iterable[str],
                   budget_bytes: int = DEFAULT_BUDGET_BYTES) -> Iterator[MergedRouting | None]:
    """Install merged routing on ``unet`` for one generation that routes through ``adapters``: inside a routed
call each base layer runs its slices on merged weights, and peft's own LoRA branches are told to add nothing.

    Yields None (and changes nothing: routed calls keep peft's mixed batch) when a layer is not a plain
    Linear/Conv2d LoRA or the merged copies would take more than ``budget_bytes``.
    """
    from studio.adapters.inject import lora_modules

    layers = [layer for _, layer in lora_modules(unet)]
    adapters = list(adapters)
    if (unet.__dict__.get("_studio_merged_routing") is not None or not all(map(_supported, layers))
            or MergedRouting.extra_bytes(layers, adapters) > budget_bytes):
        yield None
        return
    routing = MergedRouting()

    def base_only(module, args, kwargs):  # peft adds no LoRA branch of its own to a routed call
        if routing.runs is not None:
            kwargs["adapter_names"] = [BASE] * routing.runs[-1][1]
        return args, kwargs

    handles = [layer.register_forward_pre_hook(base_only, with_kwargs=True) for layer in layers]
    patched = []
    for layer in layers:
        base = layer.get_base_layer()
        own = base.__dict__.get("forward")  # an instance-level forward (e.g. an offload hook) is kept
        original = base.forward

        def forward(x, *args, _layer=layer, _original=original, **kwargs):
            if routing.runs is None:
                return _original(x, *args, **kwargs)
            return routing.forward(_layer, x)

        base.forward = forward
        patched.append((base, own))
    unet.__dict__["_studio_merged_routing"] = routing
    try:
        yield routing
    finally:
        del unet.__dict__["_studio_merged_routing"]
        for handle in handles:
            handle.remove()
        for base, own in patched:
            if own is None:
                del base.forward
            else:
                base.forward = own
        routing.weights.clear()


def active_merged_routing(unet: torch.nn.Module) -> MergedRouting | None:
    return unet.__dict__.get("_studio_merged_routing")
