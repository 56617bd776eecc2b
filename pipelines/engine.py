"""The composition engine shared by the SD and SDXL composition pipelines: one denoising loop.

Each step the method plans its evaluations; the shared step runs every single-adapter evaluation of one pass
type as one batched UNet call with per-sample adapter routing; the method fuses; a guidance combiner (CFG or
Perp-Neg) makes the final noise estimate. A pipeline class supplies only how text is encoded
(:meth:`CompositionEngine.encode_texts`), SDXL's size conditioning, decoding and its output type. Around the loop
the engine keeps diffusers' ``__call__`` contract (:mod:`pipelines.call_contract`); without ``adapters=`` it
evaluates exactly what diffusers' loop evaluates, so the images are stock's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from pipelines import init_image
from pipelines.adapter_set import AdapterSet, AttachedAdapter, LoadedAdapter
from pipelines.attention_capture import capture_cross_attention
from pipelines.call_contract import (
    StepCallback,
    denoising_schedule,
    guidance_embedding,
    refuse_combinations,
    refuse_sdxl_arguments,
)
from pipelines.cross_kv_cache import CrossKVCache, cached_cross_kv
from pipelines.decor import check_alpha, project_prompts
from pipelines.guidance import cfg
from pipelines.guidance import perp_neg as perp_neg_guidance
from pipelines.merged_routing import DEFAULT_BUDGET_BYTES, merged_routing, release_merged_weights
from pipelines.methods import make_method
from pipelines.methods.base import Conditioning, Generation, Prediction, Route
from pipelines.native_lora import shared_base
from pipelines.unet_runner import BASE, FeatureCache, UNetStats, predict_noise
from studio.adapters.file import read_adapter
from studio.adapters.inject import (
    attach_adapter,
    attached_adapters,
    detach_adapter,
    pinned_lora_modules,
    set_adapter_weights,
)
from studio.adapters.library import resolve_adapter
from studio.adapters.prompt_tags import adapters_from_prompts
from studio.adapters.weights import AdapterWeight, adapter_weight
from studio.errors import ConfigError
from studio.models import BaseModel, detect_family, fingerprint
from studio.text import clean_prompt, split_words

logger = logging.getLogger(__name__)

AdapterSpec = tuple[str | Path, float] | str | Path


class CompositionEngine:
    """Mixin for a diffusers pipeline: ``adapters`` and ``method`` on top of its own ``__call__`` arguments."""

    default_method = "merge"
    max_loaded_adapters = 8  # least recently used adapters beyond this are detached (diffusers #11816, #8532)
    cache_cross_kv = True  # compute cross-attention K/V once per generation (exact; see cross_kv_cache)
    merged_routing_budget = DEFAULT_BUDGET_BYTES  # routed slices on merged weights up to this much extra memory,
    # kept for the next generation while valid (see pipelines.merged_routing); 0 turns it off and frees them

    def release_merged_weights(self) -> None:
        """Free the merged adapter weights kept for the next generation (they are rebuilt when needed)."""
        release_merged_weights(self.unet)

    def studio_base(self):
        """This pipeline seen as a studio ``BaseModel`` (what the adapter layer validates against)."""
        if getattr(self, "_studio_base", None) is None:
            domain_file = Path(str(self.config.get("_name_or_path") or "")) / "studio_model.json"
            domain = json.loads(domain_file.read_text()) if domain_file.is_file() else None
            family = detect_family(dict(self.config), dict(self.unet.config), domain)
            self._studio_base = BaseModel(pipe=self, family=family, source=str(self.config.get("_name_or_path", "")),
                                          device=self.device, dtype=self.unet.dtype, domain=domain,
                                          fingerprint=fingerprint(self))
        return self._studio_base

    @property
    def _execution_device(self) -> torch.device:
        """diffusers' answer walks every module of every component, twice, looking for offload hooks: tens of
        milliseconds per image once many adapters are attached (each LoRA layer holds modules per adapter). The
        hooks it looks for sit on the components themselves (accelerate's ``_hf_hook``; diffusers' group
        offloading registers on the top module too), so without them the components' own device is the answer."""
        modules = [m for m in self.components.values() if isinstance(m, torch.nn.Module)]
        if any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook") for m in modules):
            return super()._execution_device
        devices = [parameter.device for m in modules for parameter in itertools.islice(m.parameters(), 1)]
        return next((d for d in devices if d.type not in ("cpu", "meta")), torch.device("cpu"))

    @classmethod
    def from_base(cls, base) -> CompositionEngine:
        """A composition pipeline sharing the modules of a loaded studio ``BaseModel``."""
        pipe = cls(**base.pipe.components, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe._studio_base = replace(base, pipe=pipe)
        return pipe

    # -- adapters ---------------------------------------------------------------------------------------------
    def _loaded(self) -> OrderedDict[str, LoadedAdapter]:
        """The adapter files attached by the studio, least recently used first: file version → its record."""
        if getattr(self, "_studio_loaded", None) is None:
            self._studio_loaded = OrderedDict()
        return self._studio_loaded

    def _managed(self) -> set[str]:
        """The names the studio's adapters are attached under."""
        return {record.name for record in self._loaded().values()}

    def _current(self) -> OrderedDict[str, LoadedAdapter]:
        """:meth:`_loaded` without the adapters diffusers removed since (``unload_lora_weights``,
        ``delete_adapters`` remove the studio's adapters too)."""
        loaded = self._loaded()
        if loaded:
            present = set(attached_adapters(self.studio_base()))
            for key in [key for key, record in loaded.items() if record.name not in present]:
                del loaded[key]
        return loaded

    def attach_adapters(self, adapters: Sequence[AdapterSpec] | AdapterSet | None) -> AdapterSet:
        """Load (or reuse) each adapter; returns them as an :class:`AdapterSet` in the user's order. Each file is
        looked up, its version read from the file system and (if new) read and checked here, once; a set this
        returned may be passed again (``adapters=``) to run more passes on it without any of that. A weight in
        diffusers' dict form ({"text_encoder": …, "unet": {"down": …}}) becomes per-layer factors and weight 1.
        All or nothing: every file is read and checked before any is attached, and a failed attach detaches this
        call's."""
        if isinstance(adapters, AdapterSet):
            return self._still_attached(adapters)
        if isinstance(adapters, str | Path):  # one adapter, as diffusers takes one prompt
            adapters = [adapters]
        loaded = self._current()
        specs = []
        for spec in adapters or []:
            source, weight = adapter_spec(spec)
            path = resolve_adapter(source).resolve()
            version = path.stat().st_mtime_ns
            key = f"{path}:{version}"
            specs.append((key, weight, path, version, None if key in loaded else read_adapter(path)))
        added: list[str] = []
        try:
            for key, _, path, version, adapter in specs:
                if adapter is not None and key not in loaded:
                    name = _unique_name(adapter.name, set(attached_adapters(self.studio_base())))
                    attach_adapter(self.studio_base(), adapter, name)
                    loaded[key] = LoadedAdapter.of(adapter, name, path, version)
                    added.append(key)
        except Exception:
            for key in added:
                detach_adapter(self.studio_base(), loaded.pop(key).name)
            raise
        entries = []
        for key, weight, *_ in specs:
            loaded.move_to_end(key)
            layers = weight if isinstance(weight, AdapterWeight) else None
            entries.append(AttachedAdapter(loaded[key], 1.0 if layers is not None else weight, layers))
        in_use = {entry.name for entry in entries}
        while len(loaded) > self.max_loaded_adapters:
            key, record = next(iter(loaded.items()))
            if record.name in in_use:
                break
            detach_adapter(self.studio_base(), record.name)
            del loaded[key]
        return AdapterSet(tuple(entries))

    def _still_attached(self, adapters: AdapterSet) -> AdapterSet:
        """A set :meth:`attach_adapters` returned, checked to be attached still (none evicted nor unloaded)."""
        loaded = self._current()
        current = {record.name: key for key, record in loaded.items()}
        for entry in adapters:
            if current.get(entry.name) is None or loaded[current[entry.name]] != entry.loaded:
                raise ConfigError(f"adapter {entry.name!r} is no longer attached to this pipeline (unloaded, or "
                                  "evicted by newer ones); pass its file again")
            loaded.move_to_end(current[entry.name])
        return adapters

    def compose_adapters(self, prompt, adapters: Sequence[AdapterSpec] | AdapterSet | None
                         ) -> tuple[Any, AdapterSet]:
        """A call's adapters: ``adapters`` (specs, or a set attached before) followed by the prompt's A1111
        ``<lora:NAME:W>`` tags, attached; and the prompt(s) without the tags."""
        prompt, tagged = prompt_tags(prompt)
        if not tagged:
            return prompt, self.attach_adapters(adapters)
        if isinstance(adapters, AdapterSet):
            return prompt, self._still_attached(adapters + self.attach_adapters(tagged))
        given = [adapters] if isinstance(adapters, str | Path) else list(adapters or [])
        return prompt, self.attach_adapters(given + tagged)

    # -- one denoising step -----------------------------------------------------------------------------------
    def evaluate(self, generation: Generation, routes: Sequence[Route], latents: torch.Tensor, timestep,
                 conditions: Sequence[Conditioning], cache: FeatureCache, stats: UNetStats,
                 capture_resolution: int | None = None, kv: CrossKVCache | None = None
                 ) -> tuple[dict[str, Prediction], dict[str, torch.Tensor]]:
        """Run every planned evaluation on each conditioning of its prompt ([uncond, cond, negatives…]);
        single-adapter routes of one pass type share one batched UNet call. Returns the predictions and, with
        ``capture_resolution``, each route's conditional cross-attention maps. ``kv`` caches the text-side
        projections across steps: each call is keyed by its routing, its prompts and the active weights."""
        batch, count = len(latents), len(conditions[0])
        width = batch * count
        cond_at = conditions[0].cond_index
        results: dict[str, Prediction] = {}
        maps: dict[str, torch.Tensor] = {}

        kv = kv or CrossKVCache()

        def run(group: Sequence[Route], names, deep=None, want_feature=False):
            stacked = latents.repeat(count * len(group), 1, 1, 1)
            hidden, added = self.stack_conditions([conditions[r.prompt] for r in group])
            key = (None if names is None else tuple(names), tuple(r.prompt for r in group),
                   getattr(self, "_active_weights", None))
            inputs = generation.unet_inputs(count * len(group))
            if capture_resolution is None:
                with kv.keyed(key):
                    return predict_noise(self.unet, stacked, timestep, hidden, names, added, deep, stats,
                                         want_feature=want_feature, **inputs)
            with capture_cross_attention(self.unet, capture_resolution) as store, kv.keyed(key):
                output = predict_noise(self.unet, stacked, timestep, hidden, names, added, deep, stats,
                                       want_feature=want_feature, **inputs)
            captured = store.mean()
            for index, route in enumerate(group):
                start = width * index + batch * cond_at
                maps[route.key] = captured[start : start + batch]
            return output

        def split(output: torch.Tensor, index: int) -> Prediction:
            chunk = output[width * index : width * (index + 1)]
            return Prediction(tuple(chunk[batch * c : batch * (c + 1)] for c in range(count)))

        for route in [r for r in routes if r.adapter is None]:
            if route.merged is not None:  # the active set: the studio's merged adapters and diffusers' own
                weights = tuple(sorted(route.merged.items()))
                if weights != getattr(self, "_active_weights", None):
                    set_adapter_weights(self.studio_base(), route.merged, self._managed(),
                                        generation.adapters.layer_weights())
                    self._active_weights = weights
            output, _ = run([route], None if route.merged is not None else [BASE] * width)
            results[route.key] = split(output, 0)
        for mode in ("full", "read"):
            group = [r for r in routes if r.adapter is not None and (r.cache == "read") == (mode == "read")]
            if not group:
                continue
            names = [r.adapter for r in group for _ in range(width)]
            deep = torch.cat([cache.features[r.adapter] for r in group]) if mode == "read" else None
            output, feature = run(group, names, deep, any(r.cache == "write" for r in group))
            for index, route in enumerate(group):
                results[route.key] = split(output, index)
                if route.cache == "write":
                    cache.features[route.adapter] = feature[width * index : width * (index + 1)]
        return results, maps

    def combine_guidance(self, prediction: Prediction, guidance_scale: float, guidance_rescale: float,
                         negative_weights: Sequence[float] = (), guided: bool = True) -> torch.Tensor:
        """CFG on (uncond, cond); with Perp-Neg negatives, Perp-Neg on (∅, positive, negatives…); without
        guidance (scale ≤ 1, or a UNet distilled with guidance) the conditional prediction, as diffusers."""
        if not guided:
            return prediction.conditions[0]
        if negative_weights:
            return perp_neg_guidance(prediction.conditions[0], prediction.conditions[1], prediction.conditions[2:],
                            negative_weights, guidance_scale)
        return cfg(prediction.uncond, prediction.cond, guidance_scale, guidance_rescale)

    # A pipeline class defines ``encode_texts(texts, texts_2=None, *, lora_scale=None, clip_skip=None,
    # zero_empty=True) -> (hidden states, pooled or None)``: how it conditions its UNet on cleaned texts,
    # ``size_conditions(...)``: SDXL's time ids (None for SD), and ``make_output(images, nsfw, return_dict,
    # recipe=…, stats=…, masks=…)``: its output type with the composition's results (:mod:`pipelines.output`).
    zero_unconditional = False  # SDXL's force_zeros_for_empty_prompt: no negative prompt → zero embeddings

    def size_conditions(self, height: int, width: int, sizes: Mapping[str, Any], dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(positive, negative) time ids of one sample (SDXL); none for SD."""
        return None

    def stack_conditions(self, conditionings: Sequence[Conditioning]) -> tuple[torch.Tensor, dict | None]:
        """The hidden states (and added conditions) of several conditionings, in batch order."""
        hidden = torch.cat([h for c in conditionings for h in c.hidden])
        added: dict[str, Any] = {}
        if conditionings[0].pooled is not None:
            added["text_embeds"] = torch.cat([p for c in conditionings for p in c.pooled])
            added["time_ids"] = torch.cat([t for c in conditionings for t in c.time_ids])
        if conditionings[0].images is not None:
            added["image_embeds"] = [torch.cat([branch[i] for c in conditionings for branch in c.images])
                                     for i in range(len(conditionings[0].images[0]))]
        return hidden, added or None

    def encode_conditions(self, prompts: list[str], text: PromptInputs) -> Conditioning:
        """Prompt embeddings [uncond, cond, negatives…] (or [cond] without guidance); DECOR projects the
        conditional one only (METHODS §5.1). ``text.given`` holds the caller's embeddings, used instead of
        encoding. As diffusers, ``clip_skip`` applies to the prompt, not to the negative prompt."""
        per_prompt = text.per_prompt
        batch = len(prompts) * per_prompt
        device, dtype = self._execution_device, self.unet.dtype

        def encode(texts: list[str], texts_2: list[str] | None, repeat: str, embeds: torch.Tensor | None = None,
                   pooled_embeds: torch.Tensor | None = None, clip_skip: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
            if embeds is not None:
                pooled = None if pooled_embeds is None else pooled_embeds.to(device, dtype)
                return (embeds.to(device, dtype).repeat_interleave(per_prompt, dim=0),
                        None if pooled is None else pooled.repeat_interleave(per_prompt, dim=0))
            hidden, pooled = self.encode_texts([clean_prompt(t) for t in texts],
                                               None if texts_2 is None else [clean_prompt(t) for t in texts_2],
                                               lora_scale=text.lora_scale, clip_skip=clip_skip, zero_empty=False)
            if repeat == "each":
                return (hidden.repeat_interleave(per_prompt, dim=0),
                        None if pooled is None else pooled.repeat_interleave(per_prompt, dim=0))
            return hidden.repeat(batch, 1, 1), None if pooled is None else pooled.repeat(batch, 1)

        def zeros(like: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
            return torch.zeros_like(like[0]), None if like[1] is None else torch.zeros_like(like[1])

        given = text.given
        second = _per_prompt(text.prompt_2, len(prompts))
        cond = encode(prompts, second, "each", given.prompt, given.pooled, text.clip_skip)
        if text.decor_remove:
            cond = (project_prompts(self, cond[0], prompts, text.decor_remove, text.decor_alpha, text.decor_rank),
                    cond[1])
        if not text.guided:
            branches = [cond]
        elif text.perp_negatives:  # the unconditional input becomes the empty prompt
            skip = text.negative_clip_skip
            empty = zeros(cond) if self.zero_unconditional else encode([""], None, "all", clip_skip=skip)
            branches = [empty, cond] + [encode([t], None, "all", clip_skip=skip) for t, _ in text.perp_negatives]
        elif given.negative is not None:
            branches = [encode([], None, "each", given.negative, given.negative_pooled), cond]
        elif text.negative is None and self.zero_unconditional:
            branches = [zeros(cond), cond]
        else:
            negatives = _per_prompt(text.negative, len(prompts)) or [""] * len(prompts)
            negatives_2 = _per_prompt(text.negative_2, len(prompts)) or negatives
            branches = [encode(negatives, negatives_2, "each", clip_skip=text.negative_clip_skip), cond]
        pooled = [p for _, p in branches] if branches[0][1] is not None else None
        return Conditioning([h for h, _ in branches], pooled, guided=text.guided)

    # -- __call__ -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        adapters: Sequence[AdapterSpec] | AdapterSet | None = None,
        method: str | None = None,
        method_options: Mapping[str, Any] | None = None,
        perp_neg: bool | Sequence[tuple[str, float]] | None = None,
        perp_neg_weight: float = 1.5,
        decor_remove: Sequence[str] | None = None,
        decor_alpha: float = 1.0,
        decor_rank: int | None = None,
        adapter_prompts: Sequence[str] | None = None,
        negative_clip_skip: int | None = None,
        image: Any | None = None,
        strength: float = 0.8,
        mask_image: Any | None = None,
        mask_blur: float = 0.0,
        **kwargs: Any,
    ):
        """diffusers' ``StableDiffusionPipeline.__call__`` (SD) or ``StableDiffusionXLPipeline.__call__`` (SDXL):
        every argument means what it means there, plus the studio's composition arguments.

        Differences from stock, each with its reason: ``guidance_scale=None`` is the pipeline's stock default
        (7.5 for SD, 5.0 for SDXL: one signature serves both); the SDXL-only arguments (``prompt_2``,
        ``negative_prompt_2``, pooled embeddings, size conditions) are refused by an SD pipeline, which has no
        second text encoder nor size conditioning (stock SD silently drops unknown arguments), while
        ``denoising_end`` works on both; the deprecated ``callback``/``callback_steps`` keywords are kept.

        Composition: ``adapters=[(file or name, weight), …]`` (or the :class:`~pipelines.adapter_set.AdapterSet`
        that :meth:`attach_adapters` or an earlier output returned) with ``method`` (``method_options``), Perp-Neg
        (``perp_neg``, ``perp_neg_weight``), DECOR (``decor_remove``, ``decor_alpha``, ``decor_rank``) and
        per-adapter prompts (``adapter_prompts``). Without ``adapters=`` the UNet runs with whatever adapters
        diffusers has active (``load_lora_weights``, ``set_adapters``, ``fuse_lora``, the
        ``cross_attention_kwargs`` scale), exactly as stock. With ``adapters=``, diffusers' own active or fused
        adapters are a shared base of every route (see :mod:`pipelines.native_lora`), scaled by that scale.
        Refused with a reason: Perp-Neg without guidance (it is a guidance rule); ``prompt_embeds`` with methods
        that give each adapter its own prompt text; methods that read cross-attention maps (CLoRA) with
        IP-Adapter inputs, whose attention processors those maps would replace.

        Modes (:mod:`pipelines.init_image`): ``image`` and ``strength`` as diffusers' img2img pipeline names them,
        ``mask_image`` as its inpaint pipeline does (white = repaint; a 9-channel UNet takes its own path), with
        A1111's ``mask_blur`` (Gaussian σ in pixels; 0, the default, uses the mask as given); prompts
        take A1111's syntax and any length (:mod:`studio.prompt_weighting`); ``negative_clip_skip`` applies a
        clip skip to the negative prompts too, as A1111 does (diffusers skips on the prompt only).
        """
        legacy = _legacy_callback(kwargs)
        if kwargs:
            raise ConfigError(f"unsupported arguments: {', '.join(sorted(kwargs))}")
        sizes = {"original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
                 "target_size": target_size, "negative_original_size": negative_original_size,
                 "negative_crops_coords_top_left": negative_crops_coords_top_left,
                 "negative_target_size": negative_target_size}  # SDXL's size conditioning
        refuse_sdxl_arguments(self, {"prompt_2": prompt_2, "negative_prompt_2": negative_prompt_2,
                                     "pooled_prompt_embeds": pooled_prompt_embeds,
                                     "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds, **sizes})
        step_callback = StepCallback(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        check_call_arguments(prompt, prompt_embeds, negative_prompt, num_inference_steps, decor_alpha, decor_rank,
                             timesteps is not None or sigmas is not None)
        init_image.check_inputs(self, image, mask_image)
        height, width = init_image.default_size(image, height, width, self.vae_scale_factor)
        if isinstance(decor_remove, str):  # "circle, square", as the CLI and the app take it
            decor_remove = split_words(decor_remove)
        self._guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._interrupt = False
        guided = self.do_classifier_free_guidance
        method_name = method or self.default_method
        composer = make_method(method_name, **dict(method_options or {}))
        given = check_given_embeddings(self, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                                       pooled_prompt_embeds, negative_pooled_prompt_embeds, perp_neg,
                                       composer.uses_adapter_prompts)
        ip_adapter = ip_adapter_image is not None or ip_adapter_image_embeds is not None
        refuse_combinations(method_name, composer, bool(perp_neg), guided, ip_adapter)
        prompt, attached = self.compose_adapters(prompt, adapters)
        if not attached and method_name != "merge":
            raise ConfigError(f"method {method_name!r} composes adapters: pass adapters=[(file, weight), …]")
        height, width = self.default_size(height, width)
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ConfigError(f"height and width must be multiples of {self.vae_scale_factor}, not {height}×{width}")
        device = self._execution_device
        with contextlib.ExitStack() as scope:
            scope.enter_context(pinned_lora_modules(self.unet, getattr(self, "text_encoder", None),
                                                    getattr(self, "text_encoder_2", None)))
            lora_scale, attention_kwargs = self.activate_adapters(attached, cross_attention_kwargs, scope)
            schedule = denoising_schedule(self, num_inference_steps, device, timesteps, sigmas, denoising_end)
            if given.prompt is not None:
                prompts = [""] * len(given.prompt)  # placeholders: the embeddings stand for the text
            else:
                prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            batch = len(prompts) * num_images_per_prompt
            negatives = perp_neg_terms(perp_neg, negative_prompt, perp_neg_weight)
            text = PromptInputs(negative_prompt, prompt_2, negative_prompt_2, num_images_per_prompt, negatives,
                                list(decor_remove or []), decor_alpha, decor_rank, given, guided, lora_scale,
                                clip_skip, negative_clip_skip)
            prompt_sets = [prompts]
            if composer.uses_adapter_prompts:
                own = list(adapter_prompts or [])
                if own and len(own) != len(attached):
                    raise ConfigError(f"{len(own)} adapter prompts for {len(attached)} adapters")
                prompt_sets += [[t] * len(prompts) for t in (own or [prompts[0]] * len(attached))]
            conditions = [self.encode_conditions(texts, text if index == 0 else replace(text, prompt_2=None))
                          for index, texts in enumerate(prompt_sets)]
            conditions = pad_chunks(self, conditions)
            dtype = conditions[0].hidden[-1].dtype
            time_ids = self.size_conditions(height, width, sizes, dtype)
            images = None
            if ip_adapter:
                images = self.prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, device,
                                                              batch, guided)
            conditions = [with_extras(c, time_ids, images, batch, device) for c in conditions]
            schedule_steps = len(schedule)
            latents, schedule, init = init_image.prepare(
                self, image, mask_image, strength, schedule, batch, height, width, dtype, device, generator, latents,
                mask_blur)
            composer.prepare(attached, len(schedule), schedule_steps)
            composer.bind(self, [texts[0] for texts in prompt_sets])
            extra = self.prepare_extra_step_kwargs(generator, eta)
            generation = Generation(self, attached, init, guidance_embedding(self, batch, device, latents.dtype),
                                    attention_kwargs)
            self._num_timesteps = len(schedule)
            if self.begin_index_zero and image is None and hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(0)
            cache, stats, kv = FeatureCache(), UNetStats(), CrossKVCache()
            if self.cache_cross_kv:
                scope.enter_context(cached_cross_kv(self.unet, kv))
            routing = scope.enter_context(merged_routing(self.unet, attached.names,
                                                         self.merged_routing_budget)) if attached else None
            with self.progress_bar(total=len(schedule)) as progress:
                for step, t in enumerate(schedule):
                    if self.interrupt:
                        continue
                    latents = composer.refine(generation, step, t, latents, conditions)
                    predictions, maps = self.evaluate(generation, composer.plan(step),
                                                      generation.model_input(latents, t), t, conditions, cache,
                                                      stats, composer.capture_resolution, kv)
                    composer.observe(step, maps)
                    noise = self.combine_guidance(composer.fuse(step, predictions), self.guidance_scale,
                                                  guidance_rescale, [w for _, w in negatives], conditions[0].guided)
                    latents = self.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
                    latents = init_image.blend(self, latents, init, schedule, step)
                    if step_callback:
                        latents = self.call_back(step_callback, step, t, latents, conditions, kv)
                    progress.update()
                    if legacy is not None and step % legacy[1] == 0:
                        legacy[0](step // getattr(self.scheduler, "order", 1), t, latents)
            if routing is not None:
                stats.merged_weights, stats.merged_weights_built = len(routing.used), routing.built
        stats.cached_text_projections = kv.hits
        masks = {name: mask.detach().cpu() for name, mask in getattr(composer, "masks", {}).items()
                 if mask is not None}
        recipe = {"method": method_name, **attached.recipe(), **composer.describe()}
        if negatives:
            recipe["perp_neg"] = [[text, weight] for text, weight in negatives]
        if decor_remove:
            recipe.update(decor_remove=list(decor_remove), decor_alpha=decor_alpha)
        if output_type == "latent":
            images, nsfw = latents, None
        else:
            pixels = init_image.overlay(self.decode_latents_to_pixels(latents), init)
            images, nsfw = self.postprocess_pixels(pixels, output_type, device, dtype)
        self.maybe_free_model_hooks()
        return self.make_output(images, nsfw, return_dict, recipe=recipe, stats=stats, masks=masks,
                                adapters=attached)

    default_guidance_scale = 7.5  # StableDiffusionPipeline's; the SDXL pipeline's is 5.0
    begin_index_zero = False  # the SDXL pipeline starts its scheduler at index 0, the SD one lets it find t

    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """diffusers' default: the UNet's sample size (an int or a (height, width) pair) in pixels."""
        size = self.unet.config.sample_size
        rows, columns = (size, size) if isinstance(size, int) else size
        return height or rows * self.vae_scale_factor, width or columns * self.vae_scale_factor

    def activate_adapters(self, adapters: AdapterSet, cross_attention_kwargs: dict | None,
                          scope: contextlib.ExitStack) -> tuple[float | None, dict | None]:
        """Where a call's adapter weights reach the layers: each adapter's weight times its per-layer factors, the
        rest of the studio's adapters off, for the block (routes that change the active set within the call pass
        the same set's weights and factors). Without any, diffusers' own adapters stay as diffusers left them and
        the ``scale`` of ``cross_attention_kwargs`` works as in stock; with some, diffusers' own become the shared
        base for the block (scaled by it). Returns the LoRA scale for the text encoders and the
        ``cross_attention_kwargs`` for the UNet."""
        managed = self._managed()
        if managed:
            set_adapter_weights(self.studio_base(), adapters.weights(), managed, adapters.layer_weights())
        self._active_weights = tuple(sorted(adapters.weights().items()))
        scale = (cross_attention_kwargs or {}).get("scale")
        if not adapters:
            return scale, cross_attention_kwargs
        # afterwards the pipeline is as diffusers left it: fuse_lora, get_active_adapters or a stock pipeline
        # sharing the modules see none of the studio's adapters
        scope.callback(set_adapter_weights, self.studio_base(), {}, managed)
        scope.enter_context(shared_base(self.studio_base(), managed, 1.0 if scale is None else float(scale)))
        rest = {k: v for k, v in (cross_attention_kwargs or {}).items() if k != "scale"}
        return None, rest or None

    def call_back(self, callback: StepCallback, step: int, timestep, latents: torch.Tensor,
                  conditions: list[Conditioning], kv: CrossKVCache) -> torch.Tensor:
        """``callback_on_step_end`` with the loop's tensors as diffusers names them (``prompt_embeds``: the main
        prompt's branches, concatenated as diffusers' UNet batch); returned ``latents`` and embeddings are used
        from the next step on, and a callback that switches guidance off (diffusers' CFG cut-off) leaves every
        prompt its conditional branch. Returns the latents."""
        main = conditions[0]
        tensors = {"latents": latents, "prompt_embeds": torch.cat(main.hidden),
                   "negative_prompt_embeds": main.hidden[0] if main.guided else None}
        if main.pooled is not None:
            tensors.update(add_text_embeds=torch.cat(main.pooled), add_time_ids=torch.cat(main.time_ids))
        outputs = callback(self, step, timestep, tensors)
        if main.guided and not self.do_classifier_free_guidance:  # guidance switched off (CFG cut-off callbacks)
            conditions[:] = [c.branch(c.cond_index) for c in conditions]
            main = conditions[0]
            kv.entries.clear()
        parts = {"prompt_embeds": "hidden", "add_text_embeds": "pooled", "add_time_ids": "time_ids"}
        changed = {field: outputs[name].chunk(len(main)) for name, field in parts.items()
                   if outputs.get(name) is not None and outputs[name] is not tensors.get(name)}
        if changed:
            conditions[0] = replace(main, **{field: list(chunks) for field, chunks in changed.items()})
            kv.entries.clear()  # the cached text projections came from the old embeddings
        return outputs.get("latents", latents)

    def postprocess_pixels(self, pixels: torch.Tensor, output_type: str, device, dtype
                           ) -> tuple[Any, list[bool] | None]:
        """diffusers' safety check (when the pipeline has a checker) and post-processing."""
        pixels, nsfw = self.run_safety_checker(pixels, device, dtype)
        denormalize = [True] * pixels.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        return self.image_processor.postprocess(pixels, output_type=output_type, do_denormalize=denormalize), nsfw

    def decode_latents_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode in the VAE's dtype (SDXL's fp16 VAE is upcast by the SDXL pipeline's override)."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0]


@dataclass(frozen=True)
class GivenEmbeddings:
    """The caller's ``prompt_embeds`` family: each replaces its text, never joins it."""

    prompt: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class PromptInputs:
    """What the text side of one generation reads (for :meth:`CompositionEngine.encode_conditions`)."""

    negative: str | list[str] | None
    prompt_2: str | list[str] | None
    negative_2: str | list[str] | None
    per_prompt: int
    perp_negatives: Sequence[tuple[str, float]]
    decor_remove: Sequence[str]
    decor_alpha: float
    decor_rank: int | None
    given: GivenEmbeddings
    guided: bool
    lora_scale: float | None
    clip_skip: int | None
    negative_clip_skip: int | None = None  # diffusers leaves the negative prompt unskipped; A1111 skips both


def with_extras(conditioning: Conditioning, sizes: tuple[torch.Tensor, torch.Tensor] | None,
                images: list[torch.Tensor] | None, batch: int, device) -> Conditioning:
    """Add SDXL's time ids and IP-Adapter's image embeddings per branch: the unconditional branch takes the
    negative ones, the conditional branch (and Perp-Neg's negatives, which are conditional predictions) the
    positive ones."""
    count = len(conditioning)

    def per_branch(negative, positive):
        return [negative] + [positive] * (count - 1) if conditioning.guided else [positive]

    time_ids = None
    if sizes is not None:
        positive, negative = (ids.to(device).repeat(batch, 1) for ids in sizes)
        time_ids = per_branch(negative, positive)
    branches = None
    if images is not None:
        split = [embeds.chunk(2) if conditioning.guided else (None, embeds) for embeds in images]
        branches = per_branch([n for n, _ in split], [p for _, p in split])
    return replace(conditioning, time_ids=time_ids, images=branches)


def _per_prompt(texts: str | list[str] | None, count: int) -> list[str] | None:
    if texts is None:
        return None
    return [texts] * count if isinstance(texts, str) else list(texts)


def _legacy_callback(kwargs: dict) -> tuple[Callable, int] | None:
    """diffusers' deprecated ``callback(step, timestep, latents)`` every ``callback_steps`` steps."""
    callback, steps = kwargs.pop("callback", None), kwargs.pop("callback_steps", None)
    if callback is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"callback_steps has to be a positive integer, not {steps!r}")
    return callback, steps


def check_given_embeddings(pipe, prompt, prompt_embeds: torch.Tensor | None, negative_prompt,
                           negative_prompt_embeds: torch.Tensor | None, pooled: torch.Tensor | None,
                           negative_pooled: torch.Tensor | None, perp_neg, per_adapter_prompts: bool
                           ) -> GivenEmbeddings:
    """diffusers' ``prompt_embeds`` family: each replaces its text, never joins it; SDXL needs the pooled
    embeddings with them (as diffusers checks). They work where the text encoder's output is all a method
    needs (not methods that give each adapter its own prompt text, nor Perp-Neg, which encodes its negatives)."""
    if prompt_embeds is None and negative_prompt_embeds is None:
        return GivenEmbeddings()
    if prompt_embeds is not None and prompt is not None or negative_prompt_embeds is not None and negative_prompt:
        raise ConfigError("pass either a prompt or its embeddings, not both")
    if prompt_embeds is None:
        raise ConfigError("negative_prompt_embeds need prompt_embeds too")
    if per_adapter_prompts or perp_neg:
        raise ConfigError("this method (or Perp-Neg) reads prompt text; pass prompt instead of prompt_embeds")
    if isinstance(pipe, StableDiffusionXLPipeline):
        if pooled is None:
            raise ConfigError("SDXL's prompt_embeds need pooled_prompt_embeds too (the second encoder's pooled "
                              "output)")
        if negative_prompt_embeds is not None and negative_pooled is None:
            raise ConfigError("SDXL's negative_prompt_embeds need negative_pooled_prompt_embeds too")
    width = pipe.unet.config.cross_attention_dim
    for name, value in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if value is not None and (value.ndim != 3 or isinstance(width, int) and value.shape[-1] != width
                                  and pipe.unet.config.encoder_hid_dim is None):
            raise ConfigError(f"{name} must be [batch, tokens, {width}], got {list(value.shape)}")
    if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
        raise ConfigError("negative_prompt_embeds and prompt_embeds need the same batch size")
    return GivenEmbeddings(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)


def pad_chunks(pipe, conditions: list[Conditioning]) -> list[Conditioning]:
    """Every branch of every conditioning at the same token length: a prompt that took fewer 77-token chunks (a
    short negative beside a long prompt) is padded with the encoded empty prompt, as A1111 pads it."""
    longest = max(h.shape[1] for c in conditions for h in c.hidden)
    if all(h.shape[1] == longest for c in conditions for h in c.hidden):
        return conditions
    empty = pipe.encode_texts([""], zero_empty=False)[0]

    def pad(h: torch.Tensor) -> torch.Tensor:
        missing = (longest - h.shape[1]) // empty.shape[1]
        return torch.cat([h, empty.to(h.dtype).expand(len(h), -1, -1).repeat(1, missing, 1)], dim=1)

    return [replace(c, hidden=[pad(h) for h in c.hidden]) for c in conditions]


def perp_neg_terms(perp_neg: bool | Sequence[tuple[str, float]] | None, negative_prompt,
                   default_weight: float) -> list[tuple[str, float]]:
    """Perp-Neg's negatives: an explicit [(text, weight)] list, or (``perp_neg=True``) the negative prompt(s)."""
    if not perp_neg:
        return []
    if perp_neg is True:
        texts = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt or [])
        terms = [(t, default_weight) for t in texts if t]
    else:
        terms = []
        for entry in perp_neg:
            if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 2:
                raise ConfigError(f"Perp-Neg: each negative is (text, weight), not {entry!r}")
            terms.append((str(entry[0]), _finite_number(entry[1], f"Perp-Neg weight of {entry[0]!r}")))
    if not terms:
        raise ConfigError("Perp-Neg is on but there is no negative prompt to apply")
    return terms


def adapter_spec(spec: Any) -> tuple[str | Path, float | AdapterWeight]:
    """One ``adapters`` entry: a file or library name (weight 1) or a (file or name, weight) pair; the weight is read
    by :func:`~studio.adapters.weights.adapter_weight` (a number or diffusers' ``set_adapters`` dict form)."""
    if isinstance(spec, str | Path):
        return spec, 1.0
    if not isinstance(spec, Sequence) or len(spec) != 2 or not isinstance(spec[0], str | Path):
        raise ConfigError(f"each adapter is a file or name, or a (file or name, weight) pair, not {spec!r}")
    return spec[0], adapter_weight(spec[1], f"adapter weight for {spec[0]}")


def prompt_tags(prompt) -> tuple[Any, list]:
    """A1111's ``<lora:NAME:W>`` tags taken out of the prompt(s): the prompt(s) without them and the tagged
    adapters as (file, weight)."""
    if prompt is None:
        return prompt, []
    texts, tagged = adapters_from_prompts([prompt] if isinstance(prompt, str) else list(prompt))
    if not tagged:
        return prompt, []
    return (texts[0] if isinstance(prompt, str) else texts), tagged


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, not {value!r}")
    return float(value)


def check_call_arguments(prompt, prompt_embeds: torch.Tensor | None, negative_prompt, num_inference_steps: int | None,
                         decor_alpha: float, decor_rank: int | None, custom_schedule: bool = False) -> None:
    """diffusers' ``check_inputs`` for what the engine reads itself: clear errors instead of failures deep in the
    loop (a batch mismatch inside attention, a division by zero inside the scheduler)."""
    if prompt is None and prompt_embeds is None:
        raise ConfigError("Provide either `prompt` or `prompt_embeds`")
    counted = not (custom_schedule and num_inference_steps is None)  # custom timesteps or sigmas set the number
    if counted and (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int)
                    or num_inference_steps < 1):
        raise ConfigError(f"num_inference_steps must be a whole number ≥ 1, not {num_inference_steps!r}")
    check_alpha(decor_alpha)  # also without words to remove: a wrong α is a mistake either way
    if decor_rank is not None and decor_rank < 1:
        raise ConfigError(f"decor_rank must be at least 1 (or None for every direction), not {decor_rank!r}")
    if prompt is not None and isinstance(negative_prompt, list):
        prompts = 1 if isinstance(prompt, str) else len(prompt)
        if len(negative_prompt) != prompts:
            raise ConfigError(f"negative_prompt has {len(negative_prompt)} entries but prompt has {prompts}")


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, index = name.replace(".", "_") or "adapter", 2
    while candidate in taken or candidate in ("training", "base"):
        candidate, index = f"{name}_{index}", index + 1
    return candidate
