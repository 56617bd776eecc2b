"""Atomic file writes and the studio's folders on disk.

Every output is written to a temporary file beside its destination and renamed into place, so an interrupted
run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def cache_dir() -> Path:
    """Where long jobs keep resumable state: ``$STUDIO_CACHE`` or ``~/.cache/adapter-studio``."""
    path = Path(os.environ.get("STUDIO_CACHE", Path.home() / ".cache" / "adapter-studio"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; rename it onto ``destination`` if the block succeeds."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, destination)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(destination: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``destination``."""
    with atomic_path(destination) as tmp:
        writer(tmp)
    return Path(destination)


def atomic_torch_save(obj: object, destination: str | os.PathLike) -> Path:
    """``torch.save`` of plain tensors and containers (read back with ``weights_only=True``), atomically."""
    return atomic_write(destination, lambda tmp: torch.save(obj, tmp))
