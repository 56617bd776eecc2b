"""The adapter library: a folder of adapter files (``$STUDIO_HOME/adapters``, default ``./adapters``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from studio.adapters.file import AdapterFile, read_adapter
from studio.errors import AdapterError

SHIPPED = Path(__file__).resolve().parents[2] / "assets" / "adapters"


def studio_home() -> Path:
    """The studio's own folder: ``$STUDIO_HOME``, else the working folder."""
    return Path(os.environ.get("STUDIO_HOME", "."))


def library_dir() -> Path:
    return studio_home() / "adapters"


@dataclass(frozen=True)
class AdapterSummary:
    """What the library shows for one adapter file."""

    name: str
    path: Path
    kind: str | None
    method: str
    trigger_words: tuple[str, ...]
    ranks: tuple[int, ...]
    base_family: str | None
    base_fingerprint: str | None
    frequency_class: str | None

    @classmethod
    def of(cls, adapter: AdapterFile) -> AdapterSummary:
        assert adapter.path is not None
        return cls(
            name=adapter.path.stem,  # what resolve_adapter and A1111's <lora:NAME:w> know it by, not ss_output_name
            path=adapter.path,
            kind=adapter.kind,
            method=adapter.method,
            trigger_words=tuple(adapter.trigger_words),
            ranks=tuple(sorted(set(adapter.ranks().values()))),
            base_family=adapter.base_family,
            base_fingerprint=adapter.metadata.get("studio.base_fingerprint"),
            frequency_class=_frequency_class(adapter),
        )


def _frequency_class(adapter: AdapterFile) -> str | None:
    """CMLoRA's H/L class from the profile ``studio adapters profile`` stores (none until profiled)."""
    raw = adapter.metadata.get("studio.freq_profile")
    try:
        return json.loads(raw).get("class") if raw else None
    except (json.JSONDecodeError, AttributeError):
        return None


def list_adapters(folders: list[Path] | None = None,
                  skipped: list[tuple[Path, str]] | None = None) -> list[AdapterSummary]:
    """Every readable adapter in the library and the shipped demo folder; an unreadable file is left out, and
    (path, reason) goes to ``skipped`` when given."""
    found = []
    for folder in folders if folders is not None else [library_dir(), SHIPPED]:
        for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
            if path.name.endswith(".sara.safetensors"):  # SaRA's sparse delta: its LoRA is listed beside it
                continue
            try:
                found.append(AdapterSummary.of(read_adapter(path)))
            except AdapterError as error:
                if skipped is not None:
                    skipped.append((path, str(error)))
    return found


def library_names(folders: list[Path] | None = None) -> dict[str, Path]:
    """Every adapter file under the library and the shipped folder by stem, as A1111 lists its Lora folder
    (sub-folders included; a shallower file wins over a deeper one of the same stem)."""
    names: dict[str, Path] = {}
    for folder in folders if folders is not None else [library_dir(), SHIPPED]:
        if Path(folder).is_dir():
            for path in sorted(Path(folder).rglob("*.safetensors"), key=lambda p: (len(p.parts), str(p))):
                if not path.name.endswith(".sara.safetensors"):
                    names.setdefault(path.stem, path)
    return names


def close_names(name: str, names: list[str]) -> str:
    """"; close matches: a, b" (difflib), or what the library holds, for an error message."""
    import difflib

    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if close:
        return f"; close matches: {', '.join(close)}"
    return f"; the library ({library_dir()}) has " + (", ".join(sorted(names)[:10]) if names else "no adapters")


def resolve_adapter(name_or_path: str | os.PathLike) -> Path:
    """A file path as given, else ``<library>/<name>.safetensors``, else the shipped demo of that name, else a file
    of that stem in a library sub-folder (as A1111 finds ``<lora:NAME>``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    stem = path.name.removesuffix(".safetensors")
    for folder in (library_dir(), SHIPPED):
        candidate = folder / f"{stem}.safetensors"
        if candidate.exists():
            return candidate
    names = library_names()
    if stem in names:
        return names[stem]
    raise AdapterError(f"no adapter {str(name_or_path)!r}: not a file, not in {library_dir()} or {SHIPPED}"
                       + close_names(stem, list(names)))


def describe(adapter: AdapterFile) -> dict:
    """Everything ``studio adapters inspect`` prints: structure, ranks and metadata (JSON values decoded)."""
    metadata = {}
    for key, value in sorted(adapter.metadata.items()):
        try:
            metadata[key] = json.loads(value) if value[:1] in "[{" else value
        except json.JSONDecodeError:
            metadata[key] = value
    ranks = adapter.ranks()
    return {
        "name": adapter.name,
        "path": str(adapter.path),
        "method": adapter.method,
        "kind": adapter.kind,
        "trigger_words": adapter.trigger_words,
        "components": {c: len(m) for c, m in adapter.modules.items()},
        "parameters": adapter.num_parameters(),
        "rank_min_max": [min(ranks.values()), max(ranks.values())],
        "ranks": ranks if len(set(ranks.values())) > 1 else None,
        "metadata": metadata,
    }


def import_adapter(source: str | os.PathLike, base=None) -> Path:
    """Copy a user's adapter file into the library after reading it (and validating it against ``base``)."""
    import shutil

    from studio.files import atomic_path

    source = Path(source)
    if source.suffix.lower() != ".safetensors":
        raise AdapterError(f"{source.name}: only .safetensors adapters can be imported (pickle formats can run "
                           "code when loaded)")
    adapter = read_adapter(source)
    if base is not None:
        from studio.adapters.validate import validate_adapter

        validate_adapter(adapter, base)
    destination = library_dir() / source.name
    with atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)
    return destination


def delete_adapter(name_or_path: str | os.PathLike) -> Path:
    """Remove an adapter from the library folder (shipped demo adapters are not deleted)."""
    path = resolve_adapter(name_or_path)
    if path.resolve().parent != library_dir().resolve():
        raise AdapterError(f"{path.name} is not in the library folder {library_dir()}; it was not deleted")
    path.unlink()
    return path


def export_adapter(name_or_path: str | os.PathLike, layout: str = "kohya",
                   out: str | os.PathLike | None = None, precision: str | None = None) -> Path:
    """Write the adapter in ``layout`` to ``out``, by default ``$STUDIO_HOME/exports/<name>.safetensors`` (kohya's
    layout: ready for A1111/ComfyUI's Lora folder). Exports stay outside the library, so a copy is not listed as a
    second adapter, and never land beside a shipped file."""
    from studio.adapters.file import save_adapter

    source = resolve_adapter(name_or_path)
    destination = Path(out) if out else studio_home() / "exports" / f"{source.stem}.safetensors"
    if destination.resolve() == source.resolve():
        raise AdapterError(f"the export of {source.name} must go to another file")
    return save_adapter(read_adapter(source), destination, layout=layout, precision=precision)


def plot_ranks(adapter: AdapterFile, destination: str | os.PathLike) -> Path:
    """A bar chart PNG of the per-module ranks (CoLoRA's plan), drawn with PIL."""
    from PIL import Image, ImageDraw

    from studio.files import atomic_path

    ranks = adapter.ranks()
    if not ranks:
        raise AdapterError(f"adapter {adapter.name} has no modules to plot")
    names, values = list(ranks), list(ranks.values())
    bar, gap, left, height = 12, 4, 360, 220
    width = left + len(values) * (bar + gap) + 20
    image = Image.new("RGB", (max(width, 480), height + 40 + 12 * len(names)), "white")
    draw = ImageDraw.Draw(image)
    top = max(values)
    for index, value in enumerate(values):
        x = left + index * (bar + gap)
        y = 20 + height - int(height * value / top)
        draw.rectangle([x, y, x + bar, 20 + height], fill=(60, 110, 200))
        draw.text((x, y - 12), str(value), fill="black")
    for index, name in enumerate(names):
        draw.text((10, 30 + height + 12 * index), f"{index}: {name} (r={values[index]})", fill="black")
    draw.text((10, 4), f"{adapter.name}: rank per module", fill="black")
    destination = Path(destination)
    with atomic_path(destination) as tmp:
        image.save(tmp, format="PNG")
    return destination
