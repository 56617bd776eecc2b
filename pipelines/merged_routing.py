"""Routed batches through per-adapter merged weights, kept across generations while nothing they depend on changes.

peft's mixed-batch forward runs the base projection on the whole batch and then, for every adapter, gathers its
slice, runs the LoRA branch and scatters the result back: about 1 + 5·N small kernels per layer, which dominate
a small UNet on the CPU (Composite with 3 adapters cost 2.1× a single LoRA, against 1.2× for a plain UNet on the
same batch). Here every slice runs on W + ΔW_i, the merged weight of its adapter: equal runs of slices go through
one batched matmul (or one grouped convolution) over the stacked merged weights, uneven runs one kernel each.
Exact up to float rounding; the extra memory is about one weight copy per (LoRA layer, adapter routed through
it), so a generation only merges when that fits a budget.

peft does not cover this: its ``merge`` writes one adapter set into the base weight in place, while a routed
batch needs several adapters' merged weights side by side. Building them costs about as much per generation as
a few denoising steps of a small model, so :class:`MergedWeights` keeps them on the UNet for the next generation
with the same adapters, each checked on first use against everything it was built from: the storage, version
counter, dtype and device of the base weight and of the adapter's LoRA factors (in-place edits, ``load_state_dict``
and ``.to()`` change one of them), the adapter's scale in the layer (``set_adapters``, per-call and per-layer
weights), and a count of the layer's ``merge``/``unmerge`` calls (peft and diffusers' ``fuse_lora`` edit the
weight through ``.data``, which no version counter sees). Detaching an adapter (peft's ``delete_adapter``) frees
its copies at once, a dropped LoRA layer's go when it is collected, stale ones at the next generation; edits
through ``.data`` outside peft's merge are not seen: call :func:`release_merged_weights` after them
(``pipe.merged_routing_budget = 0`` also releases everything and turns merged routing off).
"""

from __future__ import annotations

import contextlib
import functools
import types
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch.multiprocessing.reductions import StorageWeakRef

from studio.adapters.inject import lora_modules

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
DEFAULT_BUDGET_BYTES = 1 << 30
_EDITS = "_studio_weight_edits"

Key = tuple[int, tuple[str, ...]]


def _tensor_state(tensor: torch.Tensor, pins: list[StorageWeakRef]) -> tuple:
    """What identifies a tensor's current values short of reading them; ``pins`` gets a weak reference to its
    storage, which keeps the storage's address from being reused by another while the state is compared."""
    storage = tensor.untyped_storage()
    pins.append(StorageWeakRef(storage))
    return (storage._cdata, tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device, tuple(tensor.shape),
            tensor.stride())


def _counting(method: str):
    unbound = getattr(LoraLayer, method)

    @functools.wraps(unbound)  # keeps the signature diffusers inspects (``adapter_names``)
    def edit(self: LoraLayer, *args, **kwargs):
        self.__dict__[_EDITS] += 1
        return getattr(type(self), method)(self, *args, **kwargs)

    return edit


def _count_edits(layer: LoraLayer) -> int:
    """How often peft's ``merge``/``unmerge`` ran on ``layer`` since it was first asked (they edit the base weight
    through ``.data``, unseen by its version counter): the layer's own methods are wrapped once to count."""
    if _EDITS not in layer.__dict__:
        layer.__dict__[_EDITS] = 0
        for method in ("merge", "unmerge"):
            layer.__dict__[method] = types.MethodType(_counting(method), layer)
    return layer.__dict__[_EDITS]


def _state(layer: LoraLayer, names: tuple[str, ...], pins: list[StorageWeakRef]) -> tuple:
    """Everything the merged weights of ``names`` in ``layer`` are built from."""
    parts: list = [_count_edits(layer), _tensor_state(layer.get_base_layer().weight, pins)]
    for name in names:
        if name == BASE or name not in layer.lora_A:
            parts.append(None)
        else:
            parts.append((_tensor_state(layer.lora_A[name].weight, pins),
                          _tensor_state(layer.lora_B[name].weight, pins), layer.scaling[name]))
    return tuple(parts)


@dataclass
class _Kept:
    layer: weakref.ref
    state: tuple
    pins: list[StorageWeakRef]
    weight: torch.Tensor


class MergedWeights:
    """The merged weights kept on one UNet between generations, least recently used first; each entry is one
    layer's merged weight of one adapter, or its stack for one routing pattern."""

    def __init__(self) -> None:
        self.entries: OrderedDict[Key, _Kept] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(e.weight.numel() * e.weight.element_size() for e in self.entries.values())

    def _valid(self, key: Key, kept: _Kept) -> bool:
        layer = kept.layer()
        return layer is not None and _state(layer, key[1], []) == kept.state

    def get(self, layer: LoraLayer, names: tuple[str, ...]) -> torch.Tensor | None:
        """The kept weight of ``names`` in ``layer`` if it is still what a merge would build now."""
        key = (id(layer), names)
        kept = self.entries.get(key)
        if kept is None:
            return None
        if kept.layer() is not layer or not self._valid(key, kept):
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return kept.weight

    def put(self, layer: LoraLayer, names: tuple[str, ...], weight: torch.Tensor) -> None:
        pins: list[StorageWeakRef] = []
        state = _state(layer, names, pins)
        key = (id(layer), names)
        self.entries[key] = _Kept(weakref.ref(layer, functools.partial(self._forget_layer, id(layer))), state,
                                  pins, weight)
        self._watch_deletes(layer)

    def _forget_layer(self, layer_id: int, _ref=None) -> None:
        for key in [k for k in self.entries if k[0] == layer_id]:
            del self.entries[key]

    def _watch_deletes(self, layer: LoraLayer) -> None:
        """Detaching an adapter from ``layer`` (peft's ``delete_adapter``) frees the weights merged with it."""
        layer.__dict__["_studio_merged_weights"] = weakref.ref(self)
        if "delete_adapter" not in layer.__dict__:
            layer.__dict__["delete_adapter"] = types.MethodType(_delete_adapter, layer)

    def prune(self) -> None:
        """Drop every entry that no longer matches what it was built from."""
        for key in [k for k, kept in self.entries.items() if not self._valid(k, kept)]:
            del self.entries[key]

    def trim(self, budget_bytes: int, keep: Iterable[str] | None = None) -> None:
        """Drop least recently used entries until at most ``budget_bytes`` are kept; with ``keep``, only entries
        of other adapters."""
        allowed = None if keep is None else set(keep) | {BASE}
        total = self.nbytes
        for key in list(self.entries):
            if total <= budget_bytes:
                return
            if allowed is None or not set(key[1]) <= allowed:
                weight = self.entries.pop(key).weight
                total -= weight.numel() * weight.element_size()

    def release(self) -> None:
        self.entries.clear()


@functools.wraps(LoraLayer.delete_adapter)
def _delete_adapter(self: LoraLayer, adapter_name: str, *args, **kwargs):
    kept = self.__dict__["_studio_merged_weights"]()
    if kept is not None:
        for key in [k for k in kept.entries if k[0] == id(self) and adapter_name in k[1]]:
            del kept.entries[key]
    return type(self).delete_adapter(self, adapter_name, *args, **kwargs)


def kept_merged_weights(unet: torch.nn.Module) -> MergedWeights:
    """The merged weights kept on ``unet`` (created empty on first use)."""
    return unet.__dict__.setdefault("_studio_merged_weights", MergedWeights())


def release_merged_weights(unet: torch.nn.Module) -> None:
    """Free the merged weights kept on ``unet`` for its next generation."""
    kept_merged_weights(unet).release()


class MergedRouting:
    """While installed on a UNet, routed calls run each slice on its adapter's merged weights.

    Equal runs go through one stack of merged weights per layer and routing pattern, uneven runs through one
    merged weight per layer and adapter; both are taken from ``kept`` when still valid, else built and kept.
    ``used`` holds the weights this generation ran on, ``built`` counts those it had to build."""

    def __init__(self, kept: MergedWeights | None = None) -> None:
        self.kept = kept if kept is not None else MergedWeights()
        self.used: dict[Key, torch.Tensor] = {}
        self.built = 0
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

    def _weights(self, layer: LoraLayer, names: tuple[str, ...]) -> torch.Tensor:
        key = (id(layer), names)
        weight = self.used.get(key)
        if weight is None:
            weight = self.kept.get(layer, names)
            if weight is None:
                if len(names) == 1:
                    weight = self.merge(layer, names[0])
                else:
                    weight = torch.stack([self.merge(layer, name) for name in names])
                self.built += 1
                self.kept.put(layer, names, weight)
            self.used[key] = weight
        return weight

    def weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        if name == BASE or name not in layer.lora_A:
            return layer.get_base_layer().weight
        return self._weights(layer, (name,))

    def stacked(self, layer: LoraLayer) -> torch.Tensor:
        return self._weights(layer, tuple(name for _, _, name in self.runs))

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

    The merged weights are taken from and kept in :func:`kept_merged_weights`, which holds at most
    ``budget_bytes`` between generations (least recently used first; entries of other adapters make room for
    this generation's beforehand). Yields None (and changes nothing: routed calls keep peft's mixed batch) when a
    layer is not a plain Linear/Conv2d LoRA or the merged copies would take more than ``budget_bytes``.
    """
    layers = [layer for _, layer in lora_modules(unet)]
    adapters = list(adapters)
    kept = kept_merged_weights(unet)
    kept.prune()
    need = MergedRouting.extra_bytes(layers, adapters)
    if (unet.__dict__.get("_studio_merged_routing") is not None or not all(map(_supported, layers))
            or need > budget_bytes):
        kept.trim(budget_bytes if need <= budget_bytes else 0)
        yield None
        return
    kept.trim(budget_bytes - need, keep=adapters)
    routing = MergedRouting(kept)

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
        routing.used.clear()
        kept.trim(budget_bytes)


def active_merged_routing(unet: torch.nn.Module) -> MergedRouting | None:
    return unet.__dict__.get("_studio_merged_routing")
