"""Atomic file writes, safe reading of weights files, and the studio's folders on disk.

Every output is written to a temporary file beside its destination and renamed into place, so an interrupted
run never leaves a half-written file under the final name. Weights files from users are read without ever
unpickling an object (``read_weights``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from studio.errors import StudioError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


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


def read_weights(path: str | os.PathLike, error: type[StudioError], what: str
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a weights file a user gave, never running code from it: a pickle (``.ckpt``,
    ``.pt``, ``.pth``, ``.bin``) through ``torch.load(weights_only=True)``, which refuses anything but tensors and
    plain containers (a ``state_dict``/``params_ema``/``params`` wrapper is unwrapped; pickles carry no
    metadata), anything else as safetensors. Failures raise ``error``, worded for ``what`` the file is
    ("adapter", "upscaler model")."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
        except Exception as cause:
            raise error(f"{what} {path.name} is not a readable safetensors file (truncated or corrupt?): "
                        f"{str(cause).splitlines()[0][:200]}") from cause
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as cause:
        raise error(f"{what} {path.name} is a pickle that safe loading refuses: it pickles objects other than "
                    f"tensors, which could run code when loaded, and the studio never unpickles untrusted files; "
                    f"only plain weights are loaded (safetensors, or a pickle of tensors)") from cause
    for wrapper in ("state_dict", "params_ema", "params"):  # trainers' and BasicSR's (ESRGAN family) wrappers
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise error(f"{what} {path.name} is not a dict of tensors")
    return data, {}
