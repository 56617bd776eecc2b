"""One UNet evaluation of several adapters at one latent (METHODS §11.1).

:func:`predict_noise` runs a batch in which each slice may see a different adapter (peft's mixed-batch
``adapter_names``, injected into every LoRA layer by forward pre-hooks), and can read or write a DeepCache-style
deep-feature cache: a *full* pass stores the feature entering the last up-block; a *shallow* pass runs only
``conv_in``, the first down-block(s) whose residuals the last up-block consumes, the last up-block and the head,
taking the deep path from the cache. :class:`UNetStats` counts passes and block evaluations, so a benchmark
can prove the cache skips compute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.utils import scale_lora_layers, unscale_lora_layers

from pipelines.merged_routing import BASE as BASE  # re-exported: the routes name it
from pipelines.merged_routing import active_merged_routing
from studio.adapters.inject import lora_modules


@dataclass
class UNetStats:
    """Counts of UNet work: one block evaluation = one down/mid/up block applied to one sample."""

    full_passes: int = 0
    shallow_passes: int = 0
    block_evaluations: int = 0
    samples: int = 0
    cached_text_projections: int = 0  # cross-attention K/V served from the generation's cache
    merged_weights: int = 0  # per-adapter merged layer weights the generation's routed calls ran on
    merged_weights_built: int = 0  # of those, built by this generation (the rest were kept from an earlier one)


@dataclass
class FeatureCache:
    """Deep features per key (adapter name), each a batch of [uncond, cond] features entering the last up-block."""

    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.features.clear()


@contextlib.contextmanager
def routed(unet: torch.nn.Module, adapter_names: Sequence[str] | None) -> Iterator[None]:
    """Route batch slice i through adapter ``adapter_names[i]`` only (``BASE`` = none) in every LoRA layer:
    through the merged weights of an installed :func:`~pipelines.merged_routing.merged_routing` (peft then adds
    nothing), or else through peft's mixed batch."""
    if adapter_names is None:
        yield
        return
    merged = active_merged_routing(unet)
    if merged is not None:
        with merged.route(adapter_names):
            yield
        return
    names = list(adapter_names)

    def inject(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [module.register_forward_pre_hook(inject, with_kwargs=True) for _, module in lora_modules(unet)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _embeddings(unet, sample: torch.Tensor, timestep, hidden: torch.Tensor, added_cond: dict | None,
                timestep_cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    added_cond = added_cond or {}
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=hidden, added_cond_kwargs=added_cond)
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    hidden = unet.process_encoder_hidden_states(encoder_hidden_states=hidden, added_cond_kwargs=added_cond)
    return emb, hidden


def _down(block, x, emb, hidden, attention_kwargs):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=x, temb=emb, encoder_hidden_states=hidden, cross_attention_kwargs=attention_kwargs)
    return block(hidden_states=x, temb=emb)


def _up(block, x, emb, hidden, residuals, upsample_size, attention_kwargs):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=x, temb=emb, res_hidden_states_tuple=residuals, encoder_hidden_states=hidden,
                     upsample_size=upsample_size, cross_attention_kwargs=attention_kwargs)
    return block(hidden_states=x, temb=emb, res_hidden_states_tuple=residuals, upsample_size=upsample_size)


def _head(unet, x: torch.Tensor) -> torch.Tensor:
    if unet.conv_norm_out is not None:
        x = unet.conv_act(unet.conv_norm_out(x))
    return unet.conv_out(x)


def unet_forward(unet, sample: torch.Tensor, timestep, hidden: torch.Tensor, added_cond: dict | None = None,
                 deep_feature: torch.Tensor | None = None, stats: UNetStats | None = None,
                 timestep_cond: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet2DConditionModel's forward, returning (noise prediction, feature entering the last up-block).

    With ``deep_feature`` given, the pass is shallow: the deep blocks are skipped and that feature is used.
    ``cross_attention_kwargs`` reach the attention processors, its ``scale`` the active LoRA layers, as in the
    UNet's own forward (which has no way to stop before the last up-block or start from a stored feature).
    """
    attention_kwargs = dict(cross_attention_kwargs or {})
    lora_scale = attention_kwargs.pop("scale", 1.0)
    scale_lora_layers(unet, lora_scale)
    try:
        emb, hidden = _embeddings(unet, sample, timestep, hidden, added_cond, timestep_cond)
        x = unet.conv_in(sample)
        residuals: tuple[torch.Tensor, ...] = (x,)
        last_up = unet.up_blocks[-1]
        needed = len(last_up.resnets)
        blocks = 0
        for block in unet.down_blocks:
            if deep_feature is not None and len(residuals) >= needed:
                break
            x, res = _down(block, x, emb, hidden, attention_kwargs)
            residuals += res
            blocks += 1
        if deep_feature is None:
            if unet.mid_block is not None:
                if getattr(unet.mid_block, "has_cross_attention", False):
                    x = unet.mid_block(x, emb, encoder_hidden_states=hidden, cross_attention_kwargs=attention_kwargs)
                else:
                    x = unet.mid_block(x, emb)
                blocks += 1
            for block in unet.up_blocks[:-1]:
                take = residuals[-len(block.resnets):]
                residuals = residuals[: -len(block.resnets)]
                x = _up(block, x, emb, hidden, take, residuals[-1].shape[2:], attention_kwargs)
                blocks += 1
            deep_feature = x
        else:
            residuals = residuals[:needed]
        out = _up(last_up, deep_feature, emb, hidden, residuals[-needed:], None, attention_kwargs)
        blocks += 1
    finally:
        unscale_lora_layers(unet, lora_scale)
    if stats is not None:
        stats.block_evaluations += blocks * len(sample)
        stats.samples += len(sample)
    return _head(unet, out), deep_feature


def full_blocks(unet) -> int:
    """Blocks one full pass evaluates per sample."""
    return len(unet.down_blocks) + (unet.mid_block is not None) + len(unet.up_blocks)


def predict_noise(unet, latents: torch.Tensor, timestep, hidden: torch.Tensor, adapter_names: Sequence[str] | None,
                  added_cond: dict | None = None, deep_feature: torch.Tensor | None = None,
                  stats: UNetStats | None = None, *, timestep_cond: torch.Tensor | None = None,
                  cross_attention_kwargs: dict | None = None, want_feature: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batched evaluation; slice i sees adapter ``adapter_names[i]`` (None: the currently active set).

    A full pass whose deep feature nobody reads (``want_feature`` false) is the UNet's own forward, so every
    input diffusers' loop gives it means what it means there; the feature is then None."""
    with routed(unet, adapter_names):
        if deep_feature is None and not want_feature:
            prediction = unet(latents, timestep, encoder_hidden_states=hidden, timestep_cond=timestep_cond,
                              cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond,
                              return_dict=False)[0]
            feature = None
            if stats is not None:
                stats.block_evaluations += full_blocks(unet) * len(latents)
                stats.samples += len(latents)
        else:
            prediction, feature = unet_forward(unet, latents, timestep, hidden, added_cond, deep_feature, stats,
                                               timestep_cond, cross_attention_kwargs)
    if stats is not None:
        if deep_feature is None:
            stats.full_passes += 1
        else:
            stats.shallow_passes += 1
    return prediction, feature
