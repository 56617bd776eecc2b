"""Adapter files: read every LoRA dialect users bring into one in-memory form, write diffusers or kohya.

Read: diffusers/PEFT (``lora_A``/``lora_B`` with ``lora_adapter_metadata``, DoRA's ``lora_magnitude_vector``), old
diffusers (``…processor.to_q_lora.down.weight``, ``lora_linear_layer``), kohya/A1111 (``lora_unet_…``,
``lora_te_``/``lora_te1_``/``lora_te2_``; SDXL's original block names ``input_blocks_4_1_…``) and LyCORIS (LoCon
with Tucker ``lora_mid``, LoHa, LoKr, full-diff, DoRA ``dora_scale``; see :mod:`studio.adapters.lycoris`). The
in-memory form keeps, per component and module, the down (A) and up (B) factors and alpha, so alpha ≠ rank and
per-layer ranks survive any round trip; a LyCORIS module is held as exact LoRA factors of its ΔW. Files carry
diffusers' ``lora_adapter_metadata``, kohya's ``ss_*``, ``modelspec.*`` and the studio's ``studio.*`` keys.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from studio.adapters import keys, lycoris
from studio.adapters.metadata import network_dim_and_alpha
from studio.errors import AdapterError
from studio.files import PICKLE_SUFFIXES, atomic_path, read_weights
from studio.text import split_words

LAYOUTS = ("diffusers", "kohya")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "float": torch.float32}


@dataclass
class LoraModule:
    """ΔW = (alpha / rank) · up @ down for one Linear (2-D) or Conv2d (4-D) module.

    ``magnitude``: DoRA's magnitude, turned into a ΔW against the base weight when attached; ``bias``: a bias
    delta (LyCORIS full-diff's ``diff_b``).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None

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
    """Read an adapter file in any dialect the studio knows (module docstring); never unpickles."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter {path} does not exist")
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise AdapterError(f"adapter folder {path} must hold exactly one .safetensors file")
        path = candidates[0]
    tensors, metadata = read_weights(path, AdapterError, "adapter")
    if not tensors:
        raise AdapterError(f"adapter {path.name} holds no tensors")
    if metadata.get("studio.format") == "sparse_delta":
        lora = path.name.replace(".sara.safetensors", ".safetensors")
        raise AdapterError(f"{path.name} is SaRA's sparse weight delta, not a LoRA: use the LoRA extracted beside it "
                           f"({lora}), or apply the delta with trainers.sara.apply_sparse_delta")
    kohya = [k for k in tensors if keys.parse_kohya_key(k)]
    if kohya and len(kohya) != len(tensors):
        other = next(k for k in tensors if not keys.parse_kohya_key(k))
        raise AdapterError(f"adapter {path.name} mixes dialects: kohya keys such as {kohya[0]!r} and other keys "
                           f"such as {other!r}")
    extra = {k: v for k, v in metadata.items() if k not in ("format", "lora_adapter_metadata")}
    if kohya:
        modules, found = _modules_from_kohya(path, tensors)
        extra["studio.source_format"] = found["format"]
        if found["sdxl"] and "studio.base_family" not in extra:
            extra["studio.base_family"] = "sdxl"
    else:
        modules = _modules_from_peft(path, tensors, metadata)
        extra["studio.source_format"] = "diffusers"
    return AdapterFile(modules=modules, metadata=extra, path=path)


def _modules_from_kohya(path: Path, tensors: dict[str, torch.Tensor]
                        ) -> tuple[dict[str, dict[str, LoraModule]], dict]:
    """kohya/LyCORIS modules; SDXL's SGM UNet names are mapped to diffusers' first. Returns the modules and what
    was found: ``format`` (kohya, or the LyCORIS algorithms, e.g. ``lycoris-loha``) and ``sdxl``."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        component, name, part = keys.parse_kohya_key(key)
        parts.setdefault((component, name), {})[part] = tensor
    unet_names = [name for component, name in parts if component == "unet"]
    sgm = [n for n in unet_names if keys.is_sgm_name(n)]
    diffusers_style = [n for n in unet_names if n.startswith(("down_blocks", "mid_block", "up_blocks"))]
    if sgm and diffusers_style:
        raise AdapterError(f"adapter {path.name} mixes dialects: SDXL's original block names ({sgm[0]}) and "
                           f"diffusers' ({diffusers_style[0]})")
    renamed = keys.sgm_names_to_diffusers(sgm) if sgm else {}
    modules: dict[str, dict[str, LoraModule]] = {}
    algorithms: set[str] = set()
    for (component, name), found in parts.items():
        module_path = keys.to_file_path(component, keys.kohya_name_to_path(renamed.get(name, name)))
        try:
            kind, down, up, alpha, bias = lycoris.module_factors(found)
        except KeyError as error:
            raise AdapterError(f"adapter {path.name}: module {name} lacks its {error.args[0]} weight") from error
        except AdapterError as error:
            raise AdapterError(f"adapter {path.name}: module {name} is {error}") from error
        algorithms.add(kind)
        magnitude = found.get("dora_scale")
        if magnitude is not None:
            algorithms.add("dora")
        modules.setdefault(component, {})[module_path] = LoraModule(down, up, alpha, magnitude, bias)
    plain = algorithms == {"lora"} and not any("lora_mid.weight" in p for p in parts.values())
    label = "kohya" if plain else "lycoris-" + "+".join(sorted(algorithms))
    sdxl = bool(sgm) or any(component == "text_encoder_2" for component, _ in parts)
    return modules, {"format": label, "sdxl": sdxl}


def _modules_from_peft(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
                       ) -> dict[str, dict[str, LoraModule]]:
    try:
        configs = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError as error:
        raise AdapterError(f"adapter {path.name} has unreadable lora_adapter_metadata: {error}") from error
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):  # old diffusers files may carry network alphas
            continue
        parsed = keys.parse_peft_key(key)
        if parsed is None:
            raise AdapterError(f"adapter {path.name}: {key!r} is neither a diffusers/PEFT nor a kohya LoRA key")
        full_path, part = parsed
        full_path = full_path.removeprefix("base_model.model.")
        component, _, module_path = full_path.partition(".")
        if component not in keys.COMPONENTS:
            component, module_path = "unet", full_path  # a bare PEFT save of a UNet
        parts.setdefault((component, module_path), {})[part] = tensor
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    modules: dict[str, dict[str, LoraModule]] = {}
    for (component, file_path), found in parts.items():
        if "A" not in found or "B" not in found:
            raise AdapterError(f"adapter {path.name}: module {file_path} lacks its lora_A or lora_B weight")
        alpha = alphas.get(f"{component}.{file_path}") or _alpha_from_config(configs, component, file_path,
                                                                             rank=int(found["A"].shape[0]))
        modules.setdefault(component, {})[keys.to_file_path(component, file_path)] = LoraModule(
            found["A"], found["B"], alpha, found.get("M"))
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


def kohya_name(adapter: AdapterFile, component: str, file_path: str) -> str:
    """The module name sd-scripts writes: SDXL's UNet in its original (SGM) block names, the rest flattened."""
    if component == "unet" and adapter.base_family == "sdxl":
        return _kohya_prefixes(adapter)[component] + keys.diffusers_path_to_sgm(file_path)
    return _kohya_prefixes(adapter)[component] + keys.path_to_kohya_name(file_path)


def adapter_tensors(adapter: AdapterFile, layout: str, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """The flat tensor dict of ``adapter`` in the given layout, factors in ``precision`` (alphas stay fp32)."""
    if layout not in LAYOUTS:
        raise AdapterError(f"unknown adapter layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if precision not in PRECISIONS:
        raise AdapterError(f"unknown save precision {precision!r}; choose one of fp16, bf16, fp32")
    if "loha" in adapter.metadata.get("studio.source_format", ""):
        raise AdapterError(f"{adapter.name} is a LyCORIS LoHa file: its convolution factors take their kernel shape "
                           "from the base, so it has no LoRA file form; A1111 and ComfyUI read the original")
    dtype = PRECISIONS[precision]
    tensors: dict[str, torch.Tensor] = {}
    for component, modules in adapter.modules.items():
        for file_path, module in modules.items():
            if module.bias is not None:
                raise AdapterError(f"{component}.{file_path}: a LyCORIS full-diff bias delta has no LoRA file "
                                   "form; keep the original file")
            if layout == "diffusers":
                stem = f"{component}.{file_path}"
                tensors[f"{stem}.lora_A.weight"] = module.down.to(dtype)
                tensors[f"{stem}.lora_B.weight"] = module.up.to(dtype)
                if module.magnitude is not None:
                    if module.magnitude.numel() != module.up.shape[0]:
                        raise AdapterError(f"{stem}: a DoRA magnitude over input channels (kohya's) has no "
                                           "diffusers form; export it in kohya's layout")
                    tensors[f"{stem}.lora_magnitude_vector"] = module.magnitude.reshape(-1).to(dtype)
            else:
                stem = kohya_name(adapter, component, file_path)
                tensors[f"{stem}.lora_down.weight"] = module.down.to(dtype)
                tensors[f"{stem}.lora_up.weight"] = module.up.to(dtype)
                tensors[f"{stem}.alpha"] = torch.tensor(float(module.alpha))
                if module.magnitude is not None:
                    tensors[f"{stem}.dora_scale"] = module.magnitude.to(dtype)
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def update_metadata(path: str | os.PathLike, updates: dict[str, str], out: str | os.PathLike | None = None) -> Path:
    """Write ``updates`` into a safetensors adapter's header, its tensors byte for byte as they were (a user's
    kohya, LyCORIS or fp16 file keeps its dialect and precision), atomically, to ``out`` or in place."""
    source = Path(path)
    if source.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterError(f"{source.name} is a pickle, which has no header to write metadata into: convert it to "
                           f".safetensors first (`studio adapter convert`)")
    tensors, metadata = read_weights(source, AdapterError, "adapter")
    destination = Path(out) if out else source
    with atomic_path(destination) as tmp:
        save_file(tensors, str(tmp), metadata={**metadata, **updates})
    return destination


def save_adapter(adapter: AdapterFile, path: str | os.PathLike, layout: str = "diffusers",
                 precision: str | None = None) -> Path:
    """Write ``adapter`` as safetensors in ``layout`` (diffusers or kohya), factors in ``precision`` (kohya's
    ``--save_precision``: fp16, bf16 or fp32; default fp16 for kohya's layout as sd-scripts, fp32 for diffusers'),
    atomically, with all metadata."""
    precision = precision or ("fp16" if layout == "kohya" else "fp32")
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        path = path.with_suffix(".safetensors")
    tensors = adapter_tensors(adapter, layout, precision)
    metadata = {"format": "pt", **{k: str(v) for k, v in adapter.metadata.items()}}
    if "ss_network_dim" in metadata and adapter.modules:  # the truth of the tensors, not a configured value
        metadata.update(network_dim_and_alpha(
            adapter.ranks(), {f"{c}.{p}": m.alpha for c, mods in adapter.modules.items() for p, m in mods.items()}))
    if layout == "diffusers":
        packed = {f"{component}.{key}": value for component, config in lora_configs(adapter).items()
                  for key, value in config.items()}
        metadata["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True)
    metadata["studio.layout"] = layout
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    adapter.path = path
    return path
