"""The adapters one generation composes, as one object: what the engine activates and every method reads.

A composition pipeline keeps what it learnt about each attached file version in one :class:`LoadedAdapter`
record (the name it is attached under, CMLoRA's frequency profile, the kind that gives CLoRA its roles, the
trigger words that are CLoRA's default concept groups). A call's :class:`AdapterSet` is those records in the
user's order, each with this call's weight: one number, or per-layer factors from diffusers' ``set_adapters``
dict form (:class:`~studio.adapters.weights.AdapterWeight`, with weight 1).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.adapters.file import AdapterFile
from studio.adapters.weights import AdapterWeight


@dataclass(frozen=True)
class LoadedAdapter:
    """One adapter file version attached to a pipeline. ``path`` is the resolved file and ``mtime_ns`` its version
    (a rewritten file is a new record); ``profile`` is CMLoRA's ``studio.freq_profile`` ({} until profiled)."""

    name: str
    path: Path | None = None
    mtime_ns: int = 0
    profile: Mapping[str, Any] = field(default_factory=dict)
    kind: str | None = None
    triggers: tuple[str, ...] = ()

    @classmethod
    def of(cls, adapter: AdapterFile, name: str, path: Path, mtime_ns: int) -> LoadedAdapter:
        raw = adapter.metadata.get("studio.freq_profile")
        return cls(name=name, path=path, mtime_ns=mtime_ns, profile=json.loads(raw) if raw else {},
                   kind=adapter.kind, triggers=tuple(adapter.trigger_words))


@dataclass(frozen=True)
class AttachedAdapter:
    """One adapter of a call: its loaded record and this call's weight (1 when ``layers`` gives the factors)."""

    loaded: LoadedAdapter
    weight: float = 1.0
    layers: AdapterWeight | None = None

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def profile(self) -> Mapping[str, Any]:
        return self.loaded.profile

    @property
    def kind(self) -> str | None:
        return self.loaded.kind

    @property
    def triggers(self) -> tuple[str, ...]:
        return self.loaded.triggers


@dataclass(frozen=True)
class AdapterSet:
    """The attached adapters of one call, in the user's order."""

    entries: tuple[AttachedAdapter, ...] = ()

    @classmethod
    def of(cls, weights: Iterable[tuple[str, float]]) -> AdapterSet:
        """Adapters known by name and weight only (no file knowledge: every adapter a content, H-class one)."""
        return cls(tuple(AttachedAdapter(LoadedAdapter(name), float(weight)) for name, weight in weights))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[AttachedAdapter]:
        return iter(self.entries)

    def __getitem__(self, index: int) -> AttachedAdapter:
        return self.entries[index]

    def __add__(self, other: AdapterSet) -> AdapterSet:
        return AdapterSet(self.entries + other.entries)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.entries]

    def weights(self) -> dict[str, float]:
        """Name → weight, what :func:`~studio.adapters.inject.set_adapter_weights` takes."""
        return {a.name: a.weight for a in self.entries}

    def layer_weights(self) -> dict[str, AdapterWeight | None]:
        """Name → per-layer factors (None: the same weight in every layer)."""
        return {a.name: a.layers for a in self.entries}

    def recipe(self) -> dict[str, Any]:
        """The image recipe's part: ``adapters`` [[name, weight]] and, where given, ``adapter_weights``."""
        recipe: dict[str, Any] = {"adapters": [[a.name, a.weight] for a in self.entries]}
        layered = {a.name: a.layers.describe() for a in self.entries if a.layers is not None}
        if layered:
            recipe["adapter_weights"] = layered
        return recipe
