"""Adapter files: read diffusers/PEFT and kohya/A1111 LoRA safetensors into one in-memory form, write either.

The in-memory form keeps, per component and module, the down (A) and up (B) matrices and the module's alpha,
so alpha ≠ rank and per-layer ranks survive any round trip. Files carry diffusers' ``lora_adapter_metadata``
(the LoraConfig), kohya's ``ss_*`` keys, ``modelspec.*`` and the studio's own ``studio.*`` keys.

Decision on LyCORIS: LoHa/LoKr/LoCon-mid files are refused with a message that says so (diffusers cannot
load them into SD either); converting them would need a second adapter algebra the studio does not use.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from studio.adapters import keys
from studio.errors import AdapterError
from studio.files import atomic_path
from studio.text import split_words

LAYOUTS = ("diffusers", "kohya")
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
_LYCORIS_MARKERS = ("hada_w1", "hada_w2", "lokr_w1", "lokr_w2", ".lora_mid.", "dora_scale")


@dataclass
class LoraModule:
    """ΔW = (alpha / rank) · up @ down for one Linear (2-D) or Conv2d (4-D) module."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight update this module adds at adapter weight 1."""
        down, up = self.down.float(), self.up.float()
        if down.dim() == 2:
            return self.scale * up @ down
        if down.shape[2:] == (1, 1):
            return self.scale * (up.flatten(1) @ down.flatten(1)).view(up.shape[0], down.shape[1], 1, 1)
        return self.scale * torch.einsum("or,rikl->oikl", up.flatten(1), down)


@dataclass
class AdapterFile:
    """A LoRA adapter: modules per component ("unet", "text_encoder", "text_encoder_2") plus string metadata.

    Module paths are in file form (text encoders' paths start with ``text_model.``).
    """

    modules: dict[str, dict[str, LoraModule]]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.metadata.get("ss_output_name") or (self.path.stem if self.path else "adapter")

    @property
    def kind(self) -> str | None:
        return self.metadata.get("studio.kind")

    @property
    def method(self) -> str:
        return self.metadata.get("studio.method", "lora")

    @property
    def trigger_words(self) -> list[str]:
        raw = self.metadata.get("studio.trigger_words")
        if raw:
            return list(json.loads(raw))
        phrase = self.metadata.get("modelspec.trigger_phrase", "")
        return split_words(phrase)

    @property
    def base_family(self) -> str | None:
        return self.metadata.get("studio.base_family")

    def ranks(self) -> dict[str, int]:
        return {f"{c}.{p}": m.rank for c, mods in self.modules.items() for p, m in mods.items()}

    def num_parameters(self) -> int:
        return sum(m.down.numel() + m.up.numel() for mods in self.modules.values() for m in mods.values())


# --- reading --------------------------------------------------------------------------------------------------


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read a LoRA file in diffusers/PEFT or kohya layout; never unpickles."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter {path} does not exist")
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise AdapterError(f"adapter folder {path} must hold exactly one .safetensors file")
        path = candidates[0]
    if path.suffix.lower() in PICKLE_SUFFIXES:
        tensors, metadata = _read_pickle_safely(path), {}
    else:
        tensors, metadata = _read_safetensors(path)
    if not tensors:
        raise AdapterError(f"adapter {path.name} holds no tensors")
    if metadata.get("studio.format") == "sparse_delta":
        lora = path.name.replace(".sara.safetensors", ".safetensors")
        raise AdapterError(f"{path.name} is SaRA's sparse weight delta, not a LoRA: use the LoRA extracted beside it "
                           f"({lora}), or apply the delta with trainers.sara.apply_sparse_delta")
    lycoris = [k for k in tensors if any(marker in k for marker in _LYCORIS_MARKERS)]
    if lycoris:
        raise AdapterError(
            f"adapter {path.name} is a LyCORIS file (LoHa/LoKr/LoCon-mid/DoRA keys such as {lycoris[0]!r}); the "
            "studio reads plain LoRA only. Convert it to LoRA in kohya's tools (svd extraction) first"
        )
    if any(keys.parse_kohya_key(k) for k in tensors):
        modules = _modules_from_kohya(path, tensors)
    else:
        modules = _modules_from_peft(path, tensors, metadata)
    extra = {k: v for k, v in metadata.items() if k not in ("format", "lora_adapter_metadata")}
    return AdapterFile(modules=modules, metadata=extra, path=path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise AdapterError(f"adapter {path.name} is not a readable safetensors file (truncated or corrupt?): "
                           f"{str(error).splitlines()[0][:200]}") from error
    return tensors, metadata


def _read_pickle_safely(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise AdapterError(
            f"adapter {path.name} is a pickle that safe loading refuses (it may run code when unpickled); the "
            "studio never unpickles untrusted files. Use a .safetensors adapter"
        ) from error
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise AdapterError(f"adapter {path.name} is not a dict of tensors")
    return data


def _modules_from_kohya(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, LoraModule]]:
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = keys.parse_kohya_key(key)
        if parsed is None:
            raise AdapterError(f"adapter {path.name} mixes kohya keys with an unknown key {key!r}")
        component, module_path, part = parsed
        parts.setdefault((component, keys.to_file_path(component, module_path)), {})[part] = tensor
    modules: dict[str, dict[str, LoraModule]] = {}
    for (component, module_path), found in parts.items():
        if "A" not in found or "B" not in found:
            raise AdapterError(f"adapter {path.name}: module {module_path} lacks its lora_down or lora_up weight")
        alpha = float(found["alpha"]) if "alpha" in found else float(found["A"].shape[0])
        modules.setdefault(component, {})[module_path] = LoraModule(found["A"], found["B"], alpha)
    return modules


def _modules_from_peft(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
                       ) -> dict[str, dict[str, LoraModule]]:
    try:
        configs = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError as error:
        raise AdapterError(f"adapter {path.name} has unreadable lora_adapter_metadata: {error}") from error
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = keys.parse_peft_key(key)
        if parsed is None:
            raise AdapterError(f"adapter {path.name}: {key!r} is neither a diffusers/PEFT nor a kohya LoRA key")
        full_path, part = parsed
        full_path = full_path.removeprefix("base_model.model.")
        component, _, module_path = full_path.partition(".")
        if component not in keys.COMPONENTS:
            component, module_path = "unet", full_path  # a bare PEFT save of a UNet
        parts.setdefault((component, module_path), {})[part] = tensor
    modules: dict[str, dict[str, LoraModule]] = {}
    for (component, file_path), found in parts.items():
        if "A" not in found or "B" not in found:
            raise AdapterError(f"adapter {path.name}: module {file_path} lacks its lora_A or lora_B weight")
        alpha = _alpha_from_config(configs, component, file_path, rank=int(found["A"].shape[0]))
        modules.setdefault(component, {})[keys.to_file_path(component, file_path)] = LoraModule(
            found["A"], found["B"], alpha)
    return modules


def _alpha_from_config(configs: dict, component: str, file_path: str, rank: int) -> float:
    """alpha from diffusers' packed LoraConfig (``unet.lora_alpha``, ``unet.alpha_pattern``); alpha = rank if none."""
    pattern = configs.get(f"{component}.alpha_pattern") or {}
    for key, value in pattern.items():
        if key.lstrip("^") == file_path or file_path.endswith("." + key.lstrip("^")):
            return float(value)
    if f"{component}.lora_alpha" in configs:
        return float(configs[f"{component}.lora_alpha"])
    return float(rank)


# --- writing --------------------------------------------------------------------------------------------------


def lora_configs(adapter: AdapterFile) -> dict[str, dict]:
    """One peft LoraConfig dict per component: the most common rank/alpha plus patterns for the rest."""
    configs = {}
    for component, modules in adapter.modules.items():
        ranks = Counter(m.rank for m in modules.values())
        alphas = Counter(m.alpha for m in modules.values())
        r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
        configs[component] = {
            "r": r,
            "lora_alpha": alpha,
            "target_modules": sorted(modules),
            "rank_pattern": {p: m.rank for p, m in modules.items() if m.rank != r},
            "alpha_pattern": {p: m.alpha for p, m in modules.items() if m.alpha != alpha},
            "init_lora_weights": True,
            "lora_dropout": 0.0,
            "bias": "none",
            "use_dora": False,
            "use_rslora": False,
        }
    return configs


def _kohya_prefixes(adapter: AdapterFile) -> dict[str, str]:
    return keys.KOHYA_SDXL_PREFIX if adapter.base_family == "sdxl" else keys.KOHYA_PREFIX


def adapter_tensors(adapter: AdapterFile, layout: str) -> dict[str, torch.Tensor]:
    """The flat tensor dict of ``adapter`` in the given layout."""
    if layout not in LAYOUTS:
        raise AdapterError(f"unknown adapter layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    tensors: dict[str, torch.Tensor] = {}
    prefixes = _kohya_prefixes(adapter)
    for component, modules in adapter.modules.items():
        for file_path, module in modules.items():
            if layout == "diffusers":
                tensors[f"{component}.{file_path}.lora_A.weight"] = module.down
                tensors[f"{component}.{file_path}.lora_B.weight"] = module.up
            else:
                stem = prefixes[component] + keys.path_to_kohya_name(file_path)
                tensors[f"{stem}.lora_down.weight"] = module.down
                tensors[f"{stem}.lora_up.weight"] = module.up
                tensors[f"{stem}.alpha"] = torch.tensor(float(module.alpha))
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_adapter(adapter: AdapterFile, path: str | os.PathLike, layout: str = "diffusers") -> Path:
    """Write ``adapter`` as safetensors in ``layout`` (diffusers or kohya), atomically, with all metadata."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        path = path.with_suffix(".safetensors")
    tensors = adapter_tensors(adapter, layout)
    metadata = {"format": "pt", **{k: str(v) for k, v in adapter.metadata.items()}}
    if layout == "diffusers":
        packed = {f"{component}.{key}": value for component, config in lora_configs(adapter).items()
                  for key, value in config.items()}
        metadata["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True)
    metadata["studio.layout"] = layout
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    adapter.path = path
    return path
