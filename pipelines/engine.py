"""The composition engine shared by the SD and SDXL composition pipelines: one denoising loop.

Each step the method plans its evaluations; the shared step runs every single-adapter evaluation of one pass
type as one batched UNet call with per-sample adapter routing; the method fuses; a guidance combiner (CFG or
Perp-Neg) makes the final noise estimate. A pipeline class supplies only how text is encoded
(:meth:`CompositionEngine.encode_texts`) and the UNet's added conditions (SDXL's pooled text and time ids).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import torch

from pipelines import init_image
from pipelines.attention_capture import capture_cross_attention
from pipelines.cross_kv_cache import CrossKVCache, cached_cross_kv
from pipelines.decor import check_alpha
from pipelines.guidance import cfg
from pipelines.guidance import perp_neg as perp_neg_guidance
from pipelines.merged_routing import DEFAULT_BUDGET_BYTES, merged_routing
from pipelines.methods import make_method
from pipelines.methods.base import Prediction, Route
from pipelines.unet_runner import BASE, FeatureCache, UNetStats, predict_noise
from studio.errors import ConfigError

logger = logging.getLogger(__name__)

AdapterSpec = tuple[str | Path, float] | str | Path


@dataclass
class Conditioning:
    """One prompt's embeddings for every guidance branch ([uncond, cond, negatives…]); SDXL adds pooled ones."""

    hidden: list[torch.Tensor]
    pooled: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.hidden)


class CompositionEngine:
    """Mixin for a diffusers pipeline: ``adapters`` and ``method`` on top of its own ``__call__`` arguments."""

    default_method = "merge"
    max_loaded_adapters = 8  # least recently used adapters beyond this are detached (diffusers #11816, #8532)
    cache_cross_kv = True  # compute cross-attention K/V once per generation (exact; see cross_kv_cache)
    merged_routing_budget = DEFAULT_BUDGET_BYTES  # routed slices on merged weights up to this much extra memory

    def studio_base(self):
        """This pipeline seen as a studio ``BaseModel`` (what the adapter layer validates against)."""
        import json

        from studio.models import BaseModel, detect_family, fingerprint

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
        from dataclasses import replace

        pipe = cls(**base.pipe.components, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe._studio_base = replace(base, pipe=pipe)
        return pipe

    # -- adapters ---------------------------------------------------------------------------------------------
    def _loaded(self) -> OrderedDict[str, str]:
        if getattr(self, "_studio_loaded", None) is None:
            self._studio_loaded = OrderedDict()
        return self._studio_loaded

    def attach_adapters(self, adapters: Sequence[AdapterSpec] | None) -> list[tuple[str, float]]:
        """Load (or reuse) each adapter; returns (attached name, weight) in the user's order."""
        from studio.adapters.file import read_adapter
        from studio.adapters.inject import attach_adapter, attached_adapters, detach_adapter
        from studio.adapters.library import resolve_adapter

        if isinstance(adapters, str | Path):  # one adapter, as diffusers takes one prompt
            adapters = [adapters]
        resolved = []
        for spec in adapters or []:
            source, weight = adapter_spec(spec)
            path = resolve_adapter(source)
            key = f"{path.resolve()}:{path.stat().st_mtime_ns}"
            loaded = self._loaded()
            if key not in loaded:
                adapter = read_adapter(path)
                name = _unique_name(adapter.name, set(attached_adapters(self.studio_base())))
                attach_adapter(self.studio_base(), adapter, name)
                loaded[key] = name
                self._studio_profiles = getattr(self, "_studio_profiles", {})
                self._studio_profiles[name] = _frequency_profile(adapter)
                self._studio_triggers = getattr(self, "_studio_triggers", {})
                self._studio_triggers[name] = adapter.trigger_words
            loaded.move_to_end(key)
            resolved.append((loaded[key], float(weight)))
        in_use = {name for name, _ in resolved}
        while len(self._loaded()) > self.max_loaded_adapters:
            key, name = next(iter(self._loaded().items()))
            if name in in_use:
                break
            detach_adapter(self.studio_base(), name)
            del self._loaded()[key]
        return resolved

    # -- one denoising step -----------------------------------------------------------------------------------
    def evaluate(self, routes: Sequence[Route], latents: torch.Tensor, timestep,
                 conditions: Sequence[Conditioning], cache: FeatureCache, stats: UNetStats,
                 capture_resolution: int | None = None, kv: CrossKVCache | None = None
                 ) -> tuple[dict[str, Prediction], dict[str, torch.Tensor]]:
        """Run every planned evaluation on each conditioning of its prompt ([uncond, cond, negatives…]);
        single-adapter routes of one pass type share one batched UNet call. Returns the predictions and, with
        ``capture_resolution``, each route's conditional cross-attention maps. ``kv`` caches the text-side
        projections across steps: each call is keyed by its routing, its prompts and the active weights."""
        from studio.adapters.inject import set_adapter_weights

        batch, count = len(latents), len(conditions[0])
        width = batch * count
        results: dict[str, Prediction] = {}
        maps: dict[str, torch.Tensor] = {}

        kv = kv or CrossKVCache()

        def run(group: Sequence[Route], names, deep=None):
            stacked = latents.repeat(count * len(group), 1, 1, 1)
            hidden, added = self.stack_conditions([conditions[r.prompt] for r in group], stacked)
            key = (None if names is None else tuple(names), tuple(r.prompt for r in group),
                   getattr(self, "_active_weights", None))
            if capture_resolution is None:
                with kv.keyed(key):
                    return predict_noise(self.unet, stacked, timestep, hidden, names, added, deep, stats)
            with capture_cross_attention(self.unet, capture_resolution) as store, kv.keyed(key):
                output = predict_noise(self.unet, stacked, timestep, hidden, names, added, deep, stats)
            captured = store.mean()
            for index, route in enumerate(group):
                maps[route.key] = captured[width * index + batch : width * index + 2 * batch]
            return output

        def split(output: torch.Tensor, index: int) -> Prediction:
            chunk = output[width * index : width * (index + 1)]
            return Prediction(tuple(chunk[batch * c : batch * (c + 1)] for c in range(count)))

        for route in [r for r in routes if r.adapter is None]:
            if route.merged:
                set_adapter_weights(self.studio_base(), route.merged, set(self._loaded().values()))
                self._active_weights = tuple(sorted(route.merged.items()))
            output, _ = run([route], None if route.merged else [BASE] * width)
            results[route.key] = split(output, 0)
        for mode in ("full", "read"):
            group = [r for r in routes if r.adapter is not None and (r.cache == "read") == (mode == "read")]
            if not group:
                continue
            names = [r.adapter for r in group for _ in range(width)]
            deep = torch.cat([cache.features[r.adapter] for r in group]) if mode == "read" else None
            output, feature = run(group, names, deep)
            for index, route in enumerate(group):
                results[route.key] = split(output, index)
                if route.cache == "write":
                    cache.features[route.adapter] = feature[width * index : width * (index + 1)]
        return results, maps

    def combine_guidance(self, prediction: Prediction, guidance_scale: float, guidance_rescale: float,
                         negative_weights: Sequence[float] = ()) -> torch.Tensor:
        """CFG on (uncond, cond); with Perp-Neg negatives, Perp-Neg on (∅, positive, negatives…)."""
        if negative_weights:
            return perp_neg_guidance(prediction.conditions[0], prediction.conditions[1], prediction.conditions[2:],
                            negative_weights, guidance_scale)
        return cfg(prediction.uncond, prediction.cond, guidance_scale, guidance_rescale)

    # A pipeline class defines ``encode_texts(texts) -> (hidden states, pooled or None)``: how it conditions its
    # UNet on cleaned texts, and ``make_output(images)``: its diffusers output type.

    def added_conditions(self, pooled: torch.Tensor | None, latents: torch.Tensor) -> dict | None:
        """Extra UNet inputs for a batch (SDXL: pooled text embeddings and time ids); none for SD."""
        return None

    def stack_conditions(self, conditionings: Sequence[Conditioning], latents: torch.Tensor
                         ) -> tuple[torch.Tensor, dict | None]:
        """The hidden states (and added conditions) of several conditionings, in batch order."""
        hidden = torch.cat([h for c in conditionings for h in c.hidden])
        pooled = None
        if conditionings[0].pooled is not None:
            pooled = torch.cat([p for c in conditionings for p in c.pooled])
        return hidden, self.added_conditions(pooled, latents)

    def encode_conditions(self, prompts: list[str], negative: str | list[str] | None, per_prompt: int,
                          perp_negatives: Sequence[tuple[str, float]], decor_remove: Sequence[str],
                          decor_alpha: float, decor_rank: int | None,
                          given: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> Conditioning:
        """Prompt embeddings [uncond, cond, negatives…]; DECOR projects the conditional one only (METHODS §5.1).
        ``given`` holds the caller's ``prompt_embeds`` and ``negative_prompt_embeds``, used instead of encoding."""
        from studio.text import clean_prompt

        batch = len(prompts) * per_prompt

        def encode(texts: list[str], repeat: str, embeds: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
            if embeds is not None:
                return embeds.to(self._execution_device, self.unet.dtype).repeat_interleave(per_prompt, dim=0), None
            hidden, pooled = self.encode_texts([clean_prompt(t) for t in texts])
            if repeat == "each":
                return (hidden.repeat_interleave(per_prompt, dim=0),
                        None if pooled is None else pooled.repeat_interleave(per_prompt, dim=0))
            return hidden.repeat(batch, 1, 1), None if pooled is None else pooled.repeat(batch, 1)

        cond = encode(prompts, "each", given[0])
        if decor_remove:
            from pipelines.decor import decor_blocks, project_blocks

            cond = (project_blocks(cond[0], decor_blocks(self, decor_remove, decor_rank), decor_alpha), cond[1])
        if perp_negatives:  # the unconditional input becomes the empty prompt
            branches = [encode([""], "all"), cond] + [encode([text], "all") for text, _ in perp_negatives]
        else:
            texts = [negative] * len(prompts) if isinstance(negative, str) else list(negative or [""] * len(prompts))
            branches = [encode(texts, "each", given[1]), cond]
        pooled = [p for _, p in branches] if branches[0][1] is not None else None
        return Conditioning([h for h, _ in branches], pooled)

    # -- __call__ -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        guidance_rescale: float = 0.0,
        adapters: Sequence[AdapterSpec] | None = None,
        method: str | None = None,
        method_options: Mapping[str, Any] | None = None,
        perp_neg: bool | Sequence[tuple[str, float]] | None = None,
        perp_neg_weight: float = 1.5,
        decor_remove: Sequence[str] | None = None,
        decor_alpha: float = 1.0,
        decor_rank: int | None = None,
        adapter_prompts: Sequence[str] | None = None,
        clip_skip: int | None = None,
        image: Any | None = None,
        strength: float = 0.8,
        mask_image: Any | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        if kwargs:
            raise ConfigError(f"unsupported arguments: {', '.join(sorted(kwargs))}")
        check_call_arguments(prompt, prompt_embeds, negative_prompt, num_inference_steps, decor_alpha, decor_rank)
        self._clip_skip = check_clip_skip(clip_skip)
        init_image.check_inputs(self, image, mask_image)
        height, width = init_image.default_size(image, height, width, self.vae_scale_factor)
        if isinstance(decor_remove, str):  # "circle, square", as the CLI and the app take it
            decor_remove = [word.strip() for word in decor_remove.split(",") if word.strip()]
        method_name = method or self.default_method
        composer = make_method(method_name, **dict(method_options or {}))
        given = check_given_embeddings(self, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                                       perp_neg, composer.uses_adapter_prompts)
        resolved = self.attach_adapters(adapters)
        if not resolved and method_name != "merge":
            raise ConfigError(f"method {method_name!r} composes adapters: pass adapters=[(file, weight), …]")
        from studio.adapters.inject import set_adapter_weights

        managed = set(self._loaded().values())
        set_adapter_weights(self.studio_base(), dict(resolved), managed)  # text encoded with every adapter active
        self._active_weights = tuple(sorted(resolved))
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ConfigError(f"height and width must be multiples of {self.vae_scale_factor}, not {height}×{width}")
        if given[0] is not None:
            prompts = [""] * len(given[0])  # placeholders: the embeddings stand for the text
        else:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [""])
        negatives = perp_neg_terms(perp_neg, negative_prompt, perp_neg_weight)
        prompt_sets = [prompts]
        if composer.uses_adapter_prompts:
            own = list(adapter_prompts or [])
            if own and len(own) != len(resolved):
                raise ConfigError(f"{len(own)} adapter prompts for {len(resolved)} adapters")
            prompt_sets += [[text] * len(prompts) for text in (own or [prompts[0]] * len(resolved))]
        conditions = [self.encode_conditions(texts, negative_prompt, num_images_per_prompt, negatives,
                                             list(decor_remove or []), decor_alpha, decor_rank, given)
                      for texts in prompt_sets]
        conditions = pad_chunks(self, conditions)
        device = self._execution_device
        batch = len(prompts) * num_images_per_prompt
        latents, timesteps, self._studio_init = init_image.prepare(
            self, image, mask_image, strength, batch, height, width, conditions[0].hidden[1].dtype, device,
            generator, latents, num_inference_steps)
        composer.prepare(resolved, len(timesteps), getattr(self, "_studio_profiles", {}))
        composer.bind(self, [texts[0] for texts in prompt_sets])
        extra = self.prepare_extra_step_kwargs(generator, 0.0)
        cache, stats, kv = FeatureCache(), UNetStats(), CrossKVCache()
        with (cached_cross_kv(self.unet, kv) if self.cache_cross_kv else contextlib.nullcontext(),
              merged_routing(self.unet, [name for name, _ in resolved], self.merged_routing_budget) as routing):
            for step, t in enumerate(timesteps):
                latents = composer.refine(self, step, t, latents, conditions)
                model_input = self.unet_input(latents, t)
                predictions, maps = self.evaluate(composer.plan(step), model_input, t, conditions, cache, stats,
                                                  composer.capture_resolution, kv)
                composer.observe(step, maps)
                noise = self.combine_guidance(composer.fuse(step, predictions), guidance_scale, guidance_rescale,
                                              [w for _, w in negatives])
                latents = self.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
                latents = init_image.blend(self, latents, self._studio_init, timesteps, step)
                if callback_on_step_end is not None:
                    values = {name: locals()[name] for name in callback_on_step_end_tensor_inputs}
                    latents = callback_on_step_end(self, step, t, values).get("latents", latents)
            stats.merged_weights = 0 if routing is None else len(routing.weights)
        stats.cached_text_projections = kv.hits
        self.last_stats = stats
        self.last_masks = {name: mask.detach().cpu() for name, mask in getattr(composer, "masks", {}).items()
                           if mask is not None}
        self.last_recipe = {"method": method_name, "adapters": [[n, w] for n, w in resolved], **composer.describe()}
        if negatives:
            self.last_recipe["perp_neg"] = [[text, weight] for text, weight in negatives]
        if decor_remove:
            self.last_recipe.update(decor_remove=list(decor_remove), decor_alpha=decor_alpha)
        images = latents if output_type == "latent" else self.image_processor.postprocess(
            init_image.overlay(self.decode_latents_to_pixels(latents), self._studio_init), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, None)
        return self.make_output(images)

    def unet_input(self, latents: torch.Tensor, timestep) -> torch.Tensor:
        """The UNet's input at ``timestep``: scheduler-scaled latents (an inpainting UNet: with its mask inputs)."""
        return init_image.unet_input(self, latents, timestep, getattr(self, "_studio_init", None))

    def decode_latents_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode in the VAE's dtype (SDXL's fp16 VAE is upcast by the SDXL pipeline's override)."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0]


def check_given_embeddings(pipe, prompt, prompt_embeds: torch.Tensor | None, negative_prompt,
                           negative_prompt_embeds: torch.Tensor | None, perp_neg, per_adapter_prompts: bool
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """diffusers' ``prompt_embeds`` / ``negative_prompt_embeds``: each replaces its text, never joins it; they
    work where the text encoder's output is all a method needs (not SDXL, which also needs pooled embeddings,
    and not methods that give each adapter its own prompt text)."""
    if prompt_embeds is None and negative_prompt_embeds is None:
        return None, None
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ConfigError("prompt_embeds on SDXL also need pooled embeddings; pass the prompt text instead")
    if prompt_embeds is not None and prompt is not None or negative_prompt_embeds is not None and negative_prompt:
        raise ConfigError("pass either a prompt or its embeddings, not both")
    if prompt_embeds is None:
        raise ConfigError("negative_prompt_embeds need prompt_embeds too")
    if per_adapter_prompts or perp_neg:
        raise ConfigError("this method (or Perp-Neg) reads prompt text; pass prompt instead of prompt_embeds")
    width = pipe.text_encoder.config.hidden_size
    for name, value in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if value is not None and (value.ndim != 3 or value.shape[-1] != width):
            raise ConfigError(f"{name} must be [batch, tokens, {width}], got {list(value.shape)}")
    if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
        raise ConfigError("negative_prompt_embeds and prompt_embeds need the same batch size")
    return prompt_embeds, negative_prompt_embeds


def check_clip_skip(clip_skip: int | None) -> int | None:
    """diffusers' ``clip_skip``: how many last text-encoder layers to skip (A1111's "Clip skip: n" is n − 1)."""
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0):
        raise ConfigError(f"clip_skip is a whole number ≥ 0 (layers skipped), not {clip_skip!r}")
    return clip_skip


def call_clip_skip(pipe, clip_skip: int | None, literal: bool = False) -> int | None:
    """The clip skip text is encoded with: the one asked for, else (for prompts) the current call's."""
    if clip_skip is not None or literal:
        return clip_skip
    return getattr(pipe, "_clip_skip", None)


def pad_chunks(pipe, conditions: list[Conditioning]) -> list[Conditioning]:
    """Every branch of every conditioning at the same token length: a prompt that took fewer 77-token chunks (a
    short negative beside a long prompt) is padded with the encoded empty prompt, as A1111 pads it."""
    longest = max(h.shape[1] for c in conditions for h in c.hidden)
    if all(h.shape[1] == longest for c in conditions for h in c.hidden):
        return conditions
    empty = pipe.encode_texts([""])[0]

    def pad(h: torch.Tensor) -> torch.Tensor:
        missing = (longest - h.shape[1]) // empty.shape[1]
        return torch.cat([h, empty.to(h.dtype).expand(len(h), -1, -1).repeat(1, missing, 1)], dim=1)

    return [Conditioning([pad(h) for h in c.hidden], c.pooled) for c in conditions]


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


def adapter_spec(spec: Any) -> tuple[str | Path, float]:
    """One ``adapters`` entry: a file or library name (weight 1) or a (file or name, weight) pair."""
    if isinstance(spec, str | Path):
        return spec, 1.0
    if not isinstance(spec, Sequence) or len(spec) != 2 or not isinstance(spec[0], str | Path):
        raise ConfigError(f"each adapter is a file or name, or a (file or name, weight) pair, not {spec!r}")
    return spec[0], _finite_number(spec[1], f"adapter weight for {spec[0]}")


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, not {value!r}")
    return float(value)


def check_call_arguments(prompt, prompt_embeds: torch.Tensor | None, negative_prompt, num_inference_steps: int,
                         decor_alpha: float, decor_rank: int | None) -> None:
    """diffusers' ``check_inputs`` for what the engine reads itself: clear errors instead of failures deep in the
    loop (a batch mismatch inside attention, a division by zero inside the scheduler)."""
    if prompt is None and prompt_embeds is None:
        raise ConfigError("Provide either `prompt` or `prompt_embeds`")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
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


def _frequency_profile(adapter) -> dict:
    import json

    raw = adapter.metadata.get("studio.freq_profile")
    return json.loads(raw) if raw else {}
