"""Caption a training folder with an image-captioning model the user has on disk (``studio caption DIR``).

transformers loads the model (BLIP, BLIP-2, GIT, Florence-2: any ``AutoModelForImageTextToText`` with its
processor) from a local folder only; nothing is downloaded. Each caption goes to the image's sidecar (kohya's
``.txt``), optionally behind a prefix such as the trigger word; existing captions are kept unless asked.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from studio.data.folder import IMAGE_SUFFIXES, load_rgb
from studio.errors import ConfigError, ModelLoadError
from studio.files import atomic_write

#: A task prompt for the model types that need one to caption (Florence-2 does).
TASK_PROMPTS = {"florence2": "<DETAILED_CAPTION>"}

NO_MODEL = ("captioning needs --model DIR: a captioning model you have on disk (a BLIP, BLIP-2, GIT or Florence-2 "
            "folder saved with save_pretrained, e.g. a local copy of Salesforce/blip-image-captioning-base); "
            "nothing is downloaded")


class Captioner:
    """A local captioning model and its processor."""

    def __init__(self, model_dir: str | Path | None, device: str | None = None) -> None:
        if not model_dir:
            raise ConfigError(NO_MODEL)
        folder = Path(model_dir).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"no captioning model in {folder} (no config.json); {NO_MODEL}")
        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot load a captioning model from {folder}: {error}") from error
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.prompt = TASK_PROMPTS.get(self.model.config.model_type)

    @torch.no_grad()
    def caption(self, path: Path, max_new_tokens: int = 40) -> str:
        image = load_rgb(path)
        extra = {"text": self.prompt} if self.prompt else {}
        inputs = self.processor(images=image, return_tensors="pt", **extra)
        inputs = inputs.to(self.device)
        ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        text = self.processor.batch_decode(ids, skip_special_tokens=True)[0]
        return " ".join(text.replace(self.prompt or "", "").split())


def caption_folder(folder: str | Path, model_dir: str | Path | None, prefix: str = "", extension: str = ".txt",
                   overwrite: bool = False, device: str | None = None) -> list[Path]:
    """Write a caption beside every image of ``folder`` that has none (all with ``overwrite``); returns the
    caption files written. The model is checked before any image is read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder of images")
    captioner = Captioner(model_dir, device)
    extension = extension if extension.startswith(".") else f".{extension}"
    written = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        target = path.with_suffix(extension)
        if target.exists() and target.read_text(encoding="utf-8", errors="replace").strip() and not overwrite:
            continue
        text = captioner.caption(path)
        caption = f"{prefix.strip()}, {text}" if prefix.strip() else text
        atomic_write(target, lambda tmp, caption=caption: tmp.write_text(caption, encoding="utf-8"))
        written.append(target)
    return written
