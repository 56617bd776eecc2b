"""Attach adapters to a loaded base through peft's LoRA layers, and set which are active and how strongly.

peft's ``inject_adapter_in_model`` is used directly on the UNet and the text encoders (transformers 5's own
``add_adapter`` refuses peft 0.21), with per-module ranks and alphas from the file, so every adapter keeps the
exact scale it was trained with. Several adapters can be attached at once; :func:`set_adapter_weights` chooses
the active set and a weight per adapter (ΔW_i scaled by weight_i · alpha_i / rank_i).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from studio.adapters.file import AdapterFile, LoraModule, read_adapter
from studio.adapters.fit import bias_or_zero, has_bias, resolve_against_base, shape_to_base
from studio.adapters.keys import module_path_in, to_file_path
from studio.adapters.validate import validate_adapter
from studio.adapters.weights import AdapterWeight, layer_factor
from studio.errors import AdapterError


def cached_modules(model: torch.nn.Module, key: str,
                   predicate: Callable[[torch.nn.Module], bool]) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) for the modules of ``model`` matching ``predicate``, found once and kept on the model under
    ``key``: walking the module tree on every call grew with the number of attached adapters (their ModuleDict
    entries are modules too)."""
    cached = model.__dict__.get(key)
    if cached is None:
        cached = model.__dict__[key] = [(path, m) for path, m in model.named_modules() if predicate(m)]
    return cached


def lora_modules(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    """The peft LoRA layers of ``model``, whoever attached them (the studio, ``load_lora_weights``,
    ``add_adapter``). Found afresh unless :func:`pinned_lora_modules` holds them for a generation: diffusers adds
    and removes layers behind the studio's back, so a list kept between calls goes stale. The walk does not
    enter a LoRA layer (its per-adapter modules are what made a full walk grow with the adapters attached)."""
    pinned = model.__dict__.get("_studio_lora_layers")
    if pinned is not None:
        return pinned
    found: list[tuple[str, LoraLayer]] = []
    stack: list[tuple[str, torch.nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if isinstance(module, LoraLayer):
            found.append((path, module))
            continue
        children = [(f"{path}.{name}" if path else name, child) for name, child in module._modules.items()
                    if child is not None]
        stack.extend(reversed(children))
    return found


@contextlib.contextmanager
def pinned_lora_modules(*models: torch.nn.Module | None) -> Iterator[None]:
    """Find each model's LoRA layers once and keep the list for the block (one generation, in which no layer is
    attached or removed); afterwards every lookup walks the model again."""
    held = [m for m in models if m is not None and "_studio_lora_layers" not in m.__dict__]
    for model in held:
        model.__dict__["_studio_lora_layers"] = lora_modules(model)
    try:
        yield
    finally:
        for model in held:
            model.__dict__.pop("_studio_lora_layers", None)


def lora_layers(base) -> Iterator[tuple[str, str, LoraLayer]]:
    """(component, module path, layer) for every peft LoRA layer in the base's UNet and text encoders."""
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(base.pipe, component, None)
        if model is None:
            continue
        for path, module in lora_modules(model):
            yield component, path, module


def attached_adapters(base) -> list[str]:
    names: set[str] = set()
    for _, _, layer in lora_layers(base):
        names.update(layer.lora_A.keys())
    return sorted(names)


def inject_lora(lora_config: LoraConfig, model: torch.nn.Module, name: str) -> None:
    """peft's ``inject_adapter_in_model``, without its warning that the model already holds a ``peft_config``:
    several adapters on one model is what the studio does on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        # a bias delta for some layers of a component gives every layer of it a (zero) lora_B bias
        warnings.filterwarnings("ignore", message="`lora_bias=True` was passed")
        inject_adapter_in_model(lora_config, model, adapter_name=name)


def attach_adapter(base, adapter: AdapterFile, name: str | None = None) -> str:
    """Validate ``adapter`` against ``base`` and attach it (inactive until :func:`set_adapter_weights`).

    All or nothing: an adapter refused on any module, or failing while its layers are made, leaves the base as it
    was (no layer keeps a part of it)."""
    name = name or adapter.name
    if name in attached_adapters(base):
        raise AdapterError(f"an adapter named '{name}' is already attached; detach it first or pick another name")
    adapter = shape_to_base(adapter, base)
    validate_adapter(adapter, base)
    adapter = resolve_against_base(adapter, base)
    previous = {id(layer): list(layer.active_adapters) for _, _, layer in lora_layers(base)}
    try:
        for component, modules in adapter.modules.items():
            _inject_component(getattr(base.pipe, component), component, modules, name)
    except Exception:
        _remove(base, name)
        raise
    # peft activates the newcomer in every layer; each layer gets its own active set back, so the next
    # generation need not re-activate (peft's set_adapter walks every adapter's modules in the layer)
    for _, _, layer in lora_layers(base):
        _activate(layer, [n for n in previous.get(id(layer), []) if n in layer.lora_A])
    for component in adapter.modules:
        getattr(base.pipe, component).requires_grad_(False)
    return name


def _inject_component(model: torch.nn.Module, component: str, modules: Mapping[str, LoraModule], name: str) -> None:
    located = {module_path_in(model, p): m for p, m in modules.items()}
    patterns = {p: f"^{_escape(p)}$" for p in located}
    first = next(iter(located.values()))
    lora_config = LoraConfig(
        r=first.rank,
        lora_alpha=first.alpha,
        target_modules=list(located),
        rank_pattern={patterns[p]: m.rank for p, m in located.items()},
        alpha_pattern={patterns[p]: m.alpha for p, m in located.items()},
        lora_bias=has_bias(modules),  # LyCORIS full-diff's bias delta rides on lora_B's bias
    )
    inject_lora(lora_config, model, name)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for path, module in located.items():
            layer = model.get_submodule(path)
            if not isinstance(layer, LoraLayer) or layer.r.get(name) != module.rank:
                raise AdapterError(f"adapter '{name}': could not attach {component}.{path}")
            layer.lora_A[name].weight.copy_(module.down.to(dtype))
            layer.lora_B[name].weight.copy_(module.up.to(dtype))
            if layer.lora_B[name].bias is not None:
                layer.lora_B[name].bias.copy_(bias_or_zero(module, layer.lora_B[name].bias.numel()).to(dtype))


def _remove(base, name: str) -> None:
    """Take every trace of adapter ``name`` out of the base's LoRA layers (after a failed attach)."""
    for _, _, layer in lora_layers(base):
        if name in layer.lora_A or name in getattr(layer, "lora_B", {}):
            layer.delete_adapter(name)


def _activate(layer: LoraLayer, names: list[str]) -> None:
    """Make ``names`` the layer's active adapters, only if they are not already: peft's ``set_adapter`` walks
    every adapter's modules in the layer (and unfreezes the active ones)."""
    if list(layer.active_adapters) != names:
        layer.set_adapter(names)


def _escape(path: str) -> str:
    return path.replace(".", r"\.")


def set_adapter_weights(base, weights: Mapping[str, float], managed: Iterable[str] | None = None,
                        factors: Mapping[str, AdapterWeight | None] | None = None) -> None:
    """Activate exactly the adapters in ``weights`` with their weights among the ``managed`` ones (default: every
    attached adapter); adapters outside ``managed`` (e.g. one being trained) keep their state. ``factors``: an
    adapter's separate text-encoder/UNet and per-block factors (:class:`~studio.adapters.weights.AdapterWeight`),
    multiplied into its weight in each layer."""
    unknown = set(weights) - set(attached_adapters(base))
    if unknown:
        raise AdapterError(f"no attached adapter named {', '.join(sorted(unknown))}")
    controlled = set(weights) | (set(managed) if managed is not None else set(attached_adapters(base)))
    layered = {name: factor for name, factor in (factors or {}).items() if factor is not None}
    for component, path, layer in lora_layers(base):
        kept = [n for n in layer.active_adapters if n not in controlled and n in layer.lora_A]
        wanted = kept + [n for n in weights if n in layer.lora_A]
        _activate(layer, wanted)
        for name in weights:
            if name in layer.lora_A:
                factor = layer_factor(layered[name], component, path) if name in layered else 1.0
                layer.set_scale(name, float(weights[name]) * factor)
        for name in controlled & set(wanted):  # inference adapters stay frozen (set_adapter unfreezes)
            if layer.lora_A[name].weight.requires_grad or layer.lora_B[name].weight.requires_grad:
                layer.lora_A[name].requires_grad_(False)
                layer.lora_B[name].requires_grad_(False)


def detach_adapter(base, name: str) -> None:
    """Remove one adapter's weights from every layer (other adapters stay attached)."""
    if name not in attached_adapters(base):
        raise AdapterError(f"no attached adapter named {name}")
    for _, _, layer in lora_layers(base):
        if name in layer.lora_A:
            layer.delete_adapter(name)


def load_adapter(base, path, name: str | None = None, weight: float = 1.0) -> str:
    """Read, validate, attach and activate one adapter file; returns the name it is attached under."""
    attached = attach_adapter(base, read_adapter(path), name)
    set_adapter_weights(base, {attached: weight})
    return attached


def adapter_from_layers(base, name: str) -> AdapterFile:
    """The weights of attached adapter ``name`` as an :class:`AdapterFile` (how trainers export)."""
    modules: dict[str, dict[str, LoraModule]] = {}
    for component, path, layer in lora_layers(base):
        if name in layer.lora_A:
            modules.setdefault(component, {})[to_file_path(component, path)] = LoraModule(
                down=layer.lora_A[name].weight.detach().float().cpu().clone(),
                up=layer.lora_B[name].weight.detach().float().cpu().clone(),
                alpha=float(layer.lora_alpha[name]),
            )
    if not modules:
        raise AdapterError(f"no attached adapter named {name}")
    return AdapterFile(modules=modules)
