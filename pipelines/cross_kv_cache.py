"""Cross-attention keys and values computed once per generation.

In every cross-attention layer, K = to_k(text) and V = to_v(text) depend only on the prompt embeddings and on
the adapters the batch slice is routed through, never on the latent or the timestep. Within one generation
the embeddings are fixed, so the engine tags each UNet call with what determines them (routing, prompts,
adapter weights) and each layer's K and V are computed on the first step and reused on every later one: exact,
and it removes the text-side projections (with their LoRA branches) from all but the first step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator

import torch

from pipelines.attention_capture import cross_attention_modules


class CrossKVCache:
    """K/V outputs per (projection, call key, input shape). ``key`` None means: do not cache this call."""

    def __init__(self) -> None:
        self.entries: dict[tuple, torch.Tensor] = {}
        self.key: Hashable | None = None
        self.hits = 0

    @contextlib.contextmanager
    def keyed(self, key: Hashable) -> Iterator[None]:
        """Calls inside the block whose text-side projections are fully determined by ``key``."""
        previous, self.key = self.key, key
        try:
            yield
        finally:
            self.key = previous

    def lookup(self, projection: torch.nn.Module, forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.key is None:
            return forward(x, *args, **kwargs)
        entry = (id(projection), self.key, tuple(x.shape), x.dtype)
        cached = self.entries.get(entry)
        if cached is None:
            cached = self.entries[entry] = forward(x, *args, **kwargs).detach()
        else:
            self.hits += 1
        return cached


def text_projections(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The to_k and to_v modules of every cross-attention layer (LoRA wrappers included). The attention layers
    are found once per UNet; their projections are read on every call, as attaching an adapter replaces them."""
    return [proj for module in cross_attention_modules(unet) for proj in (module.to_k, module.to_v)]


@contextlib.contextmanager
def cached_cross_kv(unet: torch.nn.Module, cache: CrossKVCache) -> Iterator[CrossKVCache]:
    """Serve the UNet's cross-attention K/V projections from ``cache`` for the duration of the block."""
    patched: list[tuple[torch.nn.Module, object]] = []
    for projection in text_projections(unet):
        own = projection.__dict__.get("forward")  # an instance-level forward (e.g. an offload hook) is kept
        original = projection.forward

        def forward(x, *args, _projection=projection, _original=original, **kwargs):
            return cache.lookup(_projection, _original, x, *args, **kwargs)

        projection.forward = forward
        patched.append((projection, own))
    try:
        yield cache
    finally:
        for projection, own in patched:
            if own is None:
                del projection.forward
            else:
                projection.forward = own
