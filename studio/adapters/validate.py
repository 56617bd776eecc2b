"""Check an adapter against a base model before anything is loaded, with errors that name the adapter and reason."""

from __future__ import annotations

import logging

import torch
from torch import nn

from studio.adapters.file import AdapterFile
from studio.adapters.keys import module_path_in
from studio.errors import AdapterError

logger = logging.getLogger(__name__)

_FAMILY_OF_ARCHITECTURE = {"stable-diffusion-v1": "sd1", "stable-diffusion-v2": "sd2",
                           "stable-diffusion-xl-v1-base": "sdxl", "adapter-studio-tiny": "tiny"}


def adapter_family(adapter: AdapterFile) -> str | None:
    """The base family an adapter declares (studio.base_family, else modelspec.architecture)."""
    if adapter.base_family:
        return adapter.base_family
    architecture = adapter.metadata.get("modelspec.architecture", "").split("/")[0]
    if architecture in _FAMILY_OF_ARCHITECTURE:
        return _FAMILY_OF_ARCHITECTURE[architecture]
    version = adapter.metadata.get("ss_base_model_version", "")  # kohya: sd_v1, sd_v2_768_v, sdxl_base_v1-0…
    return next((family for prefix, family in (("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd_v2", "sd2"))
                 if version.startswith(prefix)), None)


def validate_adapter(adapter: AdapterFile, base) -> None:
    """Raise :class:`AdapterError` unless every module of ``adapter`` fits ``base`` (a ``BaseModel``)."""
    name = adapter.path.name if adapter.path else adapter.name  # the file the user passed, not ss_output_name
    declared = adapter_family(adapter)
    if declared and declared != base.family and base.family != "custom":
        raise AdapterError(f"adapter '{name}' was trained for a {declared} base; this base is {base.family}")
    fingerprint = adapter.metadata.get("studio.base_fingerprint")
    if fingerprint and fingerprint != base.fingerprint:
        logger.warning("adapter '%s' was trained on base %s, this is %s (same architecture; results may differ)",
                       name, fingerprint, base.fingerprint)
    for component, modules in adapter.modules.items():
        model = getattr(base.pipe, component, None)
        if model is None:
            raise AdapterError(f"adapter '{name}' has weights for {component}, which this base does not have")
        for path, module in modules.items():
            _check_module(name, component, path, module, model, base.cross_attention_dim)


def _check_module(name: str, component: str, path: str, module, model: nn.Module, cross_width: int) -> None:
    found = module_path_in(model, path)
    if found is None:
        raise AdapterError(f"adapter '{name}': {component} has no module {path} (an adapter for another "
                           "architecture?)")
    target = model.get_submodule(found)
    target = getattr(target, "base_layer", target)
    for label, tensor in (("down", module.down), ("up", module.up)):
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter '{name}': {component}.{path} {label} weights contain NaN or Inf")
    if module.down.shape[0] != module.up.shape[1]:
        raise AdapterError(f"adapter '{name}': {component}.{path} has down rank {module.down.shape[0]} but up rank "
                           f"{module.up.shape[1]}")
    if isinstance(target, nn.Linear):
        expected_in, expected_out = target.in_features, target.out_features
        ok = module.down.dim() == 2 and module.up.dim() == 2
    elif isinstance(target, nn.Conv2d):
        expected_in, expected_out = target.in_channels, target.out_channels
        ok = module.down.dim() == 4 and module.up.dim() == 4
    else:
        raise AdapterError(f"adapter '{name}': {component}.{path} is a {type(target).__name__}, not Linear/Conv2d")
    got_in, got_out = int(module.down.shape[1]), int(module.up.shape[0])
    if component == "unet" and path.endswith(("attn2.to_k", "attn2.to_v")) and got_in != expected_in:
        raise AdapterError(f"adapter '{name}' was trained for a base with cross_attention_dim {got_in}, this base "
                           f"has {cross_width}")
    if not ok or got_in != expected_in or got_out != expected_out:
        raise AdapterError(f"adapter '{name}': {component}.{path} expects a {got_in}→{got_out} layer, the base has "
                           f"{expected_in}→{expected_out}")
