"""Cross-attention capture at one resolution (METHODS §11.3).

A processor on every cross-attention layer stores softmax(QKᵀ/√d) — averaged over heads — when the layer's
query count equals the target resolution's, with gradients when the caller needs them (CLoRA's latent
update); every other call, and every self-attention, keeps torch SDPA. Maps of one forward are averaged over
the captured layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from studio.adapters.inject import cached_modules


class MapStore:
    """Sum and count of attention maps [batch, queries, tokens] over the layers of one forward."""

    def __init__(self, target_tokens: int) -> None:
        self.target_tokens = target_tokens
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, maps: torch.Tensor) -> None:
        self.total = maps if self.total is None else self.total + maps
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError(f"no cross-attention layer has {self.target_tokens} queries to capture")
        return self.total / self.count


class CaptureProcessor:
    """diffusers attention processor: plain SDPA, plus map capture on cross-attention at the target size."""

    def __init__(self, store: MapStore) -> None:
        self.store = store
        self.fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if (encoder_hidden_states is None or hidden_states.dim() != 3
                or hidden_states.shape[1] != self.store.target_tokens or attention_mask is not None):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)
        self.store.add(probs.view(batch, attn.heads, *probs.shape[1:]).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def cross_attention_modules(unet) -> list:
    """The UNet's cross-attention modules, found once per UNet: walking every module on each call cost about
    5 ms, as much as the capture itself."""
    return [module for _, module in cached_modules(
        unet, "_studio_cross_attention", lambda m: isinstance(m, Attention) and m.is_cross_attention)]


@contextlib.contextmanager
def capture_cross_attention(unet, resolution: int) -> Iterator[MapStore]:
    """Capture cross-attention maps at ``resolution``×``resolution`` queries for the duration of the block."""
    store = MapStore(resolution * resolution)
    processor = CaptureProcessor(store)
    modules = cross_attention_modules(unet)
    original = [module.processor for module in modules]
    for module in modules:
        module.set_processor(processor)
    try:
        yield store
    finally:
        for module, previous in zip(modules, original):
            module.set_processor(previous)
