"""kohya's caption augmentations: tag shuffling with kept leading tokens, and caption dropout.

A caption is a comma-separated list of tags. ``--shuffle_caption`` shuffles the tags at every step except the
first ``--keep_tokens`` (the trigger, usually); ``--caption_dropout_rate`` replaces the whole caption with the
empty one at that rate, so the adapter also learns the unconditional branch classifier-free guidance uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from studio.errors import ConfigError


def tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def augment_caption(caption: str, generator: torch.Generator, shuffle: bool = False, keep_tokens: int = 0,
                    dropout_rate: float = 0.0) -> str:
    """One step's version of ``caption`` (randomness from ``generator``, so a resumed run draws the same)."""
    if dropout_rate > 0 and float(torch.rand((), generator=generator)) < dropout_rate:
        return ""
    if not shuffle:
        return caption
    parts = tags(caption)
    kept, rest = parts[:keep_tokens], parts[keep_tokens:]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join(kept + [rest[i] for i in order])


def check_keep_tokens(captions: Iterable[tuple[Path, str]], keep_tokens: int) -> None:
    """Refuse ``keep_tokens`` larger than a caption's tag count, naming the images concerned."""
    if keep_tokens <= 0:
        return
    short = [f"{path.name} ({len(tags(caption))})" for path, caption in captions if len(tags(caption)) < keep_tokens]
    if short:
        raise ConfigError(f"--keep_tokens {keep_tokens} is more than the comma-separated tags of "
                          f"{', '.join(short[:5])}{' …' if len(short) > 5 else ''}; lower it or add tags")

