"""Per-part adapter weights: separate text-encoder and UNet strengths, and per-block UNet strengths.

A1111's ``<lora:name:te:unet>`` and ComfyUI's strength_clip/strength_model give the text encoders and the UNet
their own weights; diffusers' ``set_adapters`` dict form adds per-block UNet weights
(``{"text_encoder": 0.5, "unet": {"down": 0.9, "mid": 1.0, "up": {"block_0": 0.6}}}``). diffusers applies that
form to its own LoRA layers only; here the same form becomes a factor per peft layer of the studio's adapters,
multiplied into the weight every composition method sets, so it holds for every method.

:func:`adapter_weight` is the one rule that reads a weight, whichever way it came in (Python, the CLI's
``FILE:W``, A1111's prompt tags and PNG parameters, the app's form): a bad one is the same error everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real

from studio.errors import ConfigError

_PARTS = ("down", "mid", "up")


@dataclass(frozen=True)
class AdapterWeight:
    """Factors for one adapter: ``text_encoder`` (both encoders unless ``text_encoder_2`` is given), ``unet``, and
    ``blocks``: "down"/"mid"/"up" or one block, "down.1", "up.0" (diffusers' ``block_N``), times ``unet``."""

    text_encoder: float = 1.0
    unet: float = 1.0
    text_encoder_2: float | None = None
    blocks: Mapping[str, float] = field(default_factory=dict)

    def is_uniform(self) -> bool:
        return (self.text_encoder == self.unet == 1.0 and self.text_encoder_2 in (None, 1.0)
                and all(v == 1.0 for v in self.blocks.values()))

    def describe(self) -> dict:
        """A JSON-able form (what recipes and PNG parameters record)."""
        described: dict = {"text_encoder": self.text_encoder, "unet": self.unet}
        if self.text_encoder_2 is not None:
            described["text_encoder_2"] = self.text_encoder_2
        if self.blocks:
            described["blocks"] = dict(self.blocks)
        return described


def layer_factor(weight: AdapterWeight, component: str, path: str) -> float:
    """The factor ``weight`` gives the layer at ``path`` in ``component``."""
    if component == "text_encoder_2" and weight.text_encoder_2 is not None:
        return weight.text_encoder_2
    if component.startswith("text_encoder"):
        return weight.text_encoder
    parts = path.split(".")
    block = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(parts[0])
    factor = weight.unet
    if block is not None:
        specific = f"{block}.{parts[1]}" if block != "mid" else None
        factor *= weight.blocks.get(specific, weight.blocks.get(block, 1.0))
    return factor


def adapter_weight(value: object, what: str = "adapter weight") -> float | AdapterWeight:
    """The one reading of an adapter weight, whichever way it came in: a number, a number written as text (the
    CLI's ``FILE:W``, A1111's ``<lora:NAME:W>``, a form field), diffusers' ``set_adapters`` dict form, or an
    :class:`AdapterWeight` already read (returned as it is). Anything else is a :class:`ConfigError` naming
    ``what``; a number must be finite."""
    if isinstance(value, AdapterWeight):
        return value
    if isinstance(value, Mapping):
        return weight_from_mapping(value, what)
    return scalar_weight(value, what)


def scalar_weight(value: object, what: str = "adapter weight") -> float:
    """A one-number weight (or a number written as text), finite; the rule :func:`adapter_weight` applies."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, Real) or not math.isfinite(number):
        raise ConfigError(f"{what} must be a finite number, not {value!r}")
    return float(number)


def weight_from_mapping(spec: Mapping, what: str = "adapter weight") -> AdapterWeight:
    """diffusers' ``set_adapters`` dict form → :class:`AdapterWeight` (unknown keys are an error)."""
    unknown = set(spec) - {"text_encoder", "text_encoder_2", "unet"}
    if unknown:
        raise ConfigError(f"{what}: unknown part(s) {', '.join(sorted(map(str, unknown)))}; use text_encoder, "
                          "text_encoder_2 and unet")
    te = scalar_weight(spec.get("text_encoder", 1.0), f"{what} text_encoder")
    te2 = scalar_weight(spec["text_encoder_2"], f"{what} text_encoder_2") if "text_encoder_2" in spec else None
    unet = spec.get("unet", 1.0)
    blocks: dict[str, float] = {}
    if isinstance(unet, Mapping):
        extra = set(unet) - set(_PARTS)
        if extra:
            raise ConfigError(f"{what}: unet blocks are down, mid and up, not {', '.join(sorted(map(str, extra)))}")
        for part, value in unet.items():
            if isinstance(value, Mapping) and part != "mid":
                for block, number in value.items():
                    if not str(block).startswith("block_") or not str(block)[6:].isdigit():
                        raise ConfigError(f"{what}: {part} blocks are named block_0, block_1…, not {block!r}")
                    blocks[f"{part}.{str(block)[6:]}"] = scalar_weight(number, f"{what} unet.{part}.{block}")
            else:
                blocks[part] = scalar_weight(value, f"{what} unet.{part}")
        unet = 1.0
    return AdapterWeight(text_encoder=te, unet=scalar_weight(unet, f"{what} unet"), text_encoder_2=te2, blocks=blocks)
