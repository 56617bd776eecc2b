"""Generation with a base model (text to image, img2img, inpainting, hires fix), returning images together
with their reproducible recipe and A1111 ``parameters``."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipelines import upscalers
from pipelines.adapter_set import AdapterSet, AttachedAdapter
from pipelines.hires import hires_fix
from studio import __version__
from studio.adapters.weights import scalar_weight
from studio.errors import ConfigError
from studio.models import BaseModel, sampler_label, seeded_generator
from studio.png import a1111_parameters, parse_parameters, read_recipe, with_lora_tags
from studio.samplers import SAMPLERS, current_sampler, resolve, set_sampler


@dataclass
class GenerationRequest:
    """Everything that determines an image; the same request on the same device gives the same pixels."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    adapters: list[tuple[str, float]] = field(default_factory=list)  # (file or library name, weight)
    method: str = "merge"
    method_options: dict[str, Any] = field(default_factory=dict)
    perp_neg: list[tuple[str, float]] = field(default_factory=list)  # Perp-Neg negatives (text, weight)
    decor_remove: list[str] = field(default_factory=list)  # DECOR: concepts projected out of the prompt
    decor_alpha: float = 1.0
    adapter_prompts: list[str] = field(default_factory=list)  # CLoRA: each adapter's own prompt
    sampler: str | None = None  # A1111 name (``DPM++ 2M``); None: the model's own scheduler
    schedule: str | None = None  # A1111 schedule type (``Karras``); None: Automatic
    clip_skip: int = 1  # A1111's meaning: 1 = the last layer, 2 = the penultimate
    init_image: str | None = None  # img2img / inpainting: the image file
    mask: str | None = None  # inpainting: white = repaint
    mask_blur: float = 4.0  # A1111's "Mask blur" (Gaussian σ in pixels) and its default
    strength: float = 0.75  # A1111's "Denoising strength" of img2img
    hires_scale: float = 1.0  # > 1: hires fix
    hires_steps: int | None = None  # None: the first pass's steps
    hires_strength: float = 0.7
    hires_upscaler: str = "Latent"  # an A1111 name, an upscaler model file, or its stem in $STUDIO_HOME/upscalers
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self, base: BaseModel) -> GenerationRequest:
        """Fill the model's defaults in (the sampler: what the pipeline runs now) and check the values."""
        if isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, int) or self.clip_skip < 1:
            raise ConfigError(f"clip skip counts layers from the last (1 = none skipped), not {self.clip_skip!r}")
        current = current_sampler(base.pipe)
        if self.sampler and self.sampler != current[0]:
            sampler, schedule = resolve(self.sampler, self.schedule)
        else:  # the pipeline's scheduler (a class outside A1111's table keeps its class name)
            sampler, schedule = current[0], self.schedule or current[1]
            if sampler in SAMPLERS:
                sampler, schedule = resolve(sampler, schedule)
        return dataclasses.replace(
            self,
            steps=self.steps or base.default_steps,
            guidance_scale=base.default_guidance_scale if self.guidance_scale is None else self.guidance_scale,
            width=self.width or _image_side(self.init_image, 0) or base.default_size,
            height=self.height or _image_side(self.init_image, 1) or base.default_size,
            adapters=list(self.adapters), method_options=dict(self.method_options), perp_neg=list(self.perp_neg),
            decor_remove=list(self.decor_remove), adapter_prompts=list(self.adapter_prompts),
            sampler=sampler,
            schedule=schedule,
            extra=dict(self.extra),
        )


def _image_side(path: str | None, axis: int) -> int | None:
    """Width (axis 0) or height (1) of an init image, rounded down to 8 as A1111 sizes img2img."""
    image = _open(path, "RGB", "init image")
    return None if image is None else image.size[axis] // 8 * 8


@dataclass
class GeneratedImage:
    """One image, its A1111 ``parameters`` text, its recipe, and CLoRA's masks when it composed with CLoRA."""

    image: Image.Image
    parameters: str
    recipe: dict[str, Any]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)


def describe(base: BaseModel, request: GenerationRequest, seed: int, attached: AdapterSet | None = None,
             recipe_extra: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """A1111 ``parameters`` text and the studio recipe for one image of ``request``; ``attached``: the adapters the
    pipeline composed (``request.adapters`` first), whose files the hashes are taken from."""
    fields: dict[str, Any] = {}
    if request.adapters:
        fields["Lora hashes"] = ", ".join(f"{Path(str(a)).stem}: {adapter_hash(entry)}"
                                          for (a, _), entry in zip(request.adapters, attached or ()))
        fields["Composition"] = request.method
    if request.perp_neg:
        fields["Perp-Neg"] = "; ".join(f"{text}: {weight:g}" for text, weight in request.perp_neg)
    if request.decor_remove:
        fields["DECOR"] = f"{', '.join(request.decor_remove)} (alpha {request.decor_alpha:g})"
    parameters = a1111_parameters(
        with_lora_tags(request.prompt, request.adapters), request.negative_prompt, request.steps,
        request.sampler or sampler_label(base.pipe), request.guidance_scale, seed, request.width, request.height,
        base.name, model_hash(base), {**generation_fields(request), **fields,
                                      "Version": f"adapter-studio {__version__}", **request.extra},
    )
    recipe = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": seed,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "width": request.width,
        "height": request.height,
        "scheduler": type(base.pipe.scheduler).__name__,
        "model": base.source,
        "model_fingerprint": base.fingerprint,
        "adapters": [[str(a), w] for a, w in request.adapters],
        "method": request.method,
        "method_options": request.method_options,
        "perp_neg": [[t, w] for t, w in request.perp_neg],
        "decor_remove": request.decor_remove,
        "decor_alpha": request.decor_alpha,
        "adapter_prompts": request.adapter_prompts,
        "sampler": request.sampler,
        "schedule": request.schedule,
        "clip_skip": request.clip_skip,
        "init_image": request.init_image,
        "mask": request.mask,
        "mask_blur": request.mask_blur,
        "strength": request.strength,
        "hires_scale": request.hires_scale,
        "hires_steps": request.hires_steps,
        "hires_strength": request.hires_strength,
        "hires_upscaler": request.hires_upscaler,
        **(recipe_extra or {}),
        **request.extra,
    }
    return parameters, recipe


def generation_fields(request: GenerationRequest) -> dict[str, Any]:
    """The A1111 ``parameters`` fields of the sampler and the modes, as A1111 writes them (only when used)."""
    fields: dict[str, Any] = {}
    if request.schedule and request.schedule != "Automatic":
        fields["Schedule type"] = request.schedule
    if request.clip_skip != 1:
        fields["Clip skip"] = request.clip_skip
    if request.init_image:
        fields["Denoising strength"] = f"{request.strength:g}"
        if request.mask and request.mask_blur:
            fields["Mask blur"] = f"{request.mask_blur:g}"
    if request.hires_scale > 1:
        fields["Denoising strength"] = f"{request.hires_strength:g}"
        fields["Hires upscale"] = f"{request.hires_scale:g}"
        if request.hires_steps:
            fields["Hires steps"] = request.hires_steps
        fields["Hires upscaler"] = upscalers.label(request.hires_upscaler)
    return fields


def model_hash(base: BaseModel) -> str:
    """A1111's ``Model hash``: the first 10 hex digits of the checkpoint file's SHA-256; a model folder, which
    A1111 cannot load, gives the studio's fingerprint."""
    path = Path(base.source)
    if path.is_file():
        return _file_hash(str(path.resolve()), path.stat().st_mtime_ns)[:10]
    return base.fingerprint[:10]


def adapter_hash(adapter: AttachedAdapter) -> str:
    """A1111's short LoRA hash: the first 12 hex digits of the attached file's sha256 (hashed once per file
    version; the file is the one the pipeline looked up, not looked up again)."""
    return _file_hash(str(adapter.loaded.path), adapter.loaded.mtime_ns)[:12]


@lru_cache(maxsize=64)
def _file_hash(path: str, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:  # hashlib.file_digest would need Python 3.11
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open(path: str | None, mode: str, what: str) -> Image.Image | None:
    if not path:
        return None
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the {what} {path}: {error}") from error


def generate(base: BaseModel, request: GenerationRequest) -> list[GeneratedImage]:
    """Generate ``request.num_images`` images; image i uses seed ``request.seed + i`` (A1111's batch convention).
    With ``init_image``: img2img (``mask``: inpainting); with ``hires_scale`` > 1: hires fix."""
    request = request.resolved(base)
    pipe = base.pipe
    if request.sampler in SAMPLERS:
        set_sampler(pipe, request.sampler, request.schedule)
    if request.mask and not request.init_image:
        raise ConfigError("a mask needs the image it masks: give an init image too")
    call: dict[str, Any] = {"prompt": request.prompt, "negative_prompt": request.negative_prompt or None,
                            "num_inference_steps": request.steps, "guidance_scale": request.guidance_scale,
                            "width": request.width, "height": request.height}
    if hasattr(pipe, "attach_adapters"):
        call.update(adapters=request.adapters, method=request.method, method_options=request.method_options,
                    perp_neg=request.perp_neg or None, decor_remove=request.decor_remove or None,
                    decor_alpha=request.decor_alpha, adapter_prompts=request.adapter_prompts or None,
                    clip_skip=request.clip_skip - 1 or None, negative_clip_skip=request.clip_skip - 1 or None)
    elif (request.adapters or request.method != "merge" or request.perp_neg or request.decor_remove
          or any(tag in request.prompt.lower() for tag in ("<lora:", "<lyco:"))):  # A1111's adapter tags
        raise ConfigError(f"this {base.family} pipeline ({type(pipe).__name__}) cannot compose adapters")
    init = _open(request.init_image, "RGB", "init image")
    if init is not None:
        call.update(image=init, strength=request.strength, mask_image=_open(request.mask, "L", "mask"),
                    mask_blur=request.mask_blur)
    results = []
    for index in range(request.num_images):
        seed = request.seed + index
        generator = seeded_generator(seed)
        if request.hires_scale > 1:
            output = hires_fix(pipe, {**call, "generator": generator}, request.hires_scale, request.hires_steps,
                               request.hires_strength, request.hires_upscaler)
        else:
            output = pipe(**call, generator=generator)
        parameters, recipe = describe(base, request, seed, getattr(output, "adapters", AdapterSet()),
                                      {"composition": output.recipe})
        results.append(GeneratedImage(output.images[0], parameters, recipe, output.masks))
    return results


_LORA_TAG = re.compile(r"\s*<lora:([^:>]+):([-+]?[\d.]+)>")  # the plain form; others stay for the pipeline
_RECIPE_FIELDS = {f.name for f in dataclasses.fields(GenerationRequest)} - {"num_images", "extra"}


def request_from_png(path: str | Path) -> tuple[GenerationRequest, str | None]:
    """The request that made a PNG, and its model where the PNG names one it can be loaded from: the studio's
    own recipe when present (bit-exact), else A1111's ``parameters`` text."""
    try:
        parameters, recipe = read_recipe(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the PNG {path}: {error}") from error
    if recipe:
        values = {k: v for k, v in recipe.items() if k in _RECIPE_FIELDS}
        values["adapters"] = [(str(a), scalar_weight(w, f"adapter weight for {a}"))
                              for a, w in values.get("adapters", [])]
        values["perp_neg"] = [(str(t), float(w)) for t, w in values.get("perp_neg", [])]
        values.setdefault("mask_blur", 0.0)  # recipes from before the mask blur used the mask as drawn
        return GenerationRequest(**values), recipe.get("model")
    if parameters:
        return request_from_parameters(parameters), None
    raise ConfigError(f"{path} carries no generation parameters (neither A1111's nor the studio's)")


def request_from_parameters(text: str) -> GenerationRequest:
    """An A1111 ``parameters`` text as a request: prompt (``<lora:name:weight>`` tags become adapters), size,
    sampler and schedule (also the old combined names such as ``DPM++ 2M Karras``), clip skip, denoising
    strength, mask blur and hires fields; the studio's own Composition, Perp-Neg and DECOR fields too."""
    prompt, negative, fields = parse_parameters(text)
    adapters = [(name, scalar_weight(weight, f"prompt tag <lora:{name}:{weight}>: weight"))
                for name, weight in _LORA_TAG.findall(prompt)]
    request = GenerationRequest(prompt=_LORA_TAG.sub("", prompt).strip(), negative_prompt=negative,
                                adapters=adapters, method=fields.get("Composition", "merge"))
    number = {"Steps": ("steps", int), "Seed": ("seed", int), "CFG scale": ("guidance_scale", float),
              "Clip skip": ("clip_skip", int), "Hires upscale": ("hires_scale", float),
              "Hires steps": ("hires_steps", int), "Mask blur": ("mask_blur", float)}
    try:
        for key, (name, kind) in number.items():
            if key in fields:
                setattr(request, name, kind(float(fields[key])) if kind is int else kind(fields[key]))
        if "Size" in fields:
            request.width, request.height = (int(v) for v in fields["Size"].lower().split("x"))
        if "Denoising strength" in fields:
            strength = float(fields["Denoising strength"])
            if request.hires_scale > 1:
                request.hires_strength = strength
            else:
                request.strength = strength
    except ValueError as error:
        raise ConfigError(f"unreadable A1111 parameters: {error}") from error
    if "Hires upscaler" in fields:  # a model's name is looked up in the upscalers folder when generating
        request.hires_upscaler = fields["Hires upscaler"]
    request.sampler, request.schedule = _a1111_sampler(fields.get("Sampler"), fields.get("Schedule type"))
    if "Perp-Neg" in fields:
        request.perp_neg = [(t.rsplit(":", 1)[0].strip(), float(t.rsplit(":", 1)[1]))
                            for t in fields["Perp-Neg"].split("; ")]
    decor = re.fullmatch(r"(.*) \(alpha ([\d.]+)\)", fields.get("DECOR", ""))
    if decor:
        request.decor_remove = [w.strip() for w in decor.group(1).split(",") if w.strip()]
        request.decor_alpha = float(decor.group(2))
    return request


def _a1111_sampler(sampler: str | None, schedule: str | None) -> tuple[str | None, str | None]:
    """A1111's sampler and schedule type; before v1.9 the schedule was part of the name (``Euler Karras``)."""
    if not sampler:
        return None, schedule
    for suffix in ("Karras", "Exponential"):
        if schedule is None and sampler.endswith(f" {suffix}"):
            return sampler[: -len(suffix) - 1], suffix
    return sampler, schedule
