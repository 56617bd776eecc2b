"""A1111's adapter tags in a prompt: ``<lora:NAME:W>``, ``<lyco:NAME:W>``, ``<lora:NAME:TE:UNET>``, ``te=``/``unet=``.

As in A1111's built-in Lora extension (``extra_networks_lora.py``): the first number is the text-encoder weight,
the second the UNet weight (default: the first), ``te=``/``unet=`` name them; NAME is a file stem in the adapter
library (sub-folders included) or the alias its header gives (``ss_output_name``). Tags are taken out of the
prompt before it is encoded, so the text CLIP sees is the prompt without them. Only ``lora``/``lyco`` tags are
read; other ``<…>`` text is left as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from studio.adapters.library import close_names, library_names
from studio.adapters.weights import AdapterWeight, scalar_weight
from studio.errors import ConfigError

_OPEN = re.compile(r"<(lora|lyco):", re.IGNORECASE)


@dataclass(frozen=True)
class AdapterTag:
    """One tag as written: the adapter's name and its text-encoder and UNet weights."""

    tag: str
    name: str
    text_encoder: float
    unet: float

    def weight(self) -> float | AdapterWeight:
        """The weight in the form ``adapters=[(name, weight)]`` takes: one number, or separate text-encoder and
        UNet factors (both already read by :func:`~studio.adapters.weights.scalar_weight`)."""
        if self.text_encoder == self.unet:
            return self.unet
        return AdapterWeight(text_encoder=self.text_encoder, unet=self.unet)


def _parse(tag: str, body: str) -> AdapterTag:
    name, *arguments = body.split(":")
    if not name.strip():
        raise ConfigError(f"prompt tag {tag} names no adapter")
    positional: list[float] = []
    named: dict[str, float] = {}
    for argument in arguments:
        key, equals, value = argument.partition("=")
        if equals:
            key = key.strip().lower()
            if key not in ("te", "unet"):
                raise ConfigError(f"prompt tag {tag}: unknown parameter {key!r} (te= and unet= are read)")
            named[key] = scalar_weight(value, f"prompt tag {tag}: weight")
        else:
            positional.append(scalar_weight(argument, f"prompt tag {tag}: weight"))
    if len(positional) > 2:
        raise ConfigError(f"prompt tag {tag}: at most two weights (text encoder, UNet), got {len(positional)}")
    te = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    return AdapterTag(tag=tag, name=name.strip(), text_encoder=te, unet=unet)


def split_prompt(prompt: str) -> tuple[str, list[AdapterTag]]:
    """The prompt without its adapter tags, and the tags in order. A tag with no closing ``>`` or a weight that is
    not a number is a :class:`ConfigError` quoting the tag."""
    tags: list[AdapterTag] = []
    kept: list[str] = []
    position = 0
    for match in _OPEN.finditer(prompt):
        if match.start() < position:
            continue
        end = prompt.find(">", match.end())
        following = prompt.find("<", match.end())
        if end < 0 or 0 <= following < end:
            shown = prompt[match.start():(following if following >= 0 else len(prompt))].strip()
            raise ConfigError(f"prompt tag {shown!r} has no closing '>'")
        kept.append(prompt[position:match.start()])
        tags.append(_parse(prompt[match.start():end + 1], prompt[match.end():end]))
        position = end + 1
    kept.append(prompt[position:])
    return re.sub(r"\s+", " ", "".join(kept)).strip(), tags


def _aliases(names: dict[str, Path]) -> dict[str, Path]:
    """A1111's aliases: the ``ss_output_name`` a file's header gives (read without loading its tensors)."""
    aliases: dict[str, Path] = {}
    for path in names.values():
        try:
            with safe_open(str(path), framework="pt") as handle:
                alias = (handle.metadata() or {}).get("ss_output_name")
        except Exception:  # an unreadable file is reported when it is used, not while names are looked up
            continue
        if alias:
            aliases.setdefault(alias, path)
    return aliases


def resolve_tag(tag: AdapterTag) -> Path:
    """The library file a tag names, by file stem, else by the alias in its header (``ss_output_name``), as A1111
    looks them up; an unknown name is a :class:`ConfigError` listing close matches."""
    names = library_names()
    if tag.name in names:
        return names[tag.name]
    aliases = _aliases(names)
    if tag.name in aliases:
        return aliases[tag.name]
    raise ConfigError(f"prompt tag {tag.tag}: no adapter named {tag.name!r}{close_names(tag.name, list(names))}")


def adapters_from_prompts(prompts: list[str]) -> tuple[list[str], list[tuple[Path, float | AdapterWeight]]]:
    """The prompts without tags, and the tagged adapters as ``(file, weight)``. Every prompt of one batch must carry
    the same tags (one set of adapters is attached per generation)."""
    split = [split_prompt(p) for p in prompts]
    tags = split[0][1] if split else []
    for _, other in split[1:]:
        if [(t.name, t.weight()) for t in other] != [(t.name, t.weight()) for t in tags]:
            raise ConfigError("the prompts of one batch carry different <lora:…> tags; generate them separately")
    return [text for text, _ in split], [(resolve_tag(tag), tag.weight()) for tag in tags]
