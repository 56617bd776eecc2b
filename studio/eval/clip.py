"""CLIP metrics with open_clip: CLIP-T (prompt ↔ image) and CLIP-I (image ↔ reference images).

Any open_clip model loads from a local checkpoint file (``--clip-model ViT-L-14 --clip-weights FILE``); nothing
downloads. The embedded domain ships its own small CLIP (``assets/clip``: an open_clip custom config trained by
``studio build-clip`` contrastively on procedural renders and their captions), so the metrics work out of the
box on the embedded model and read in the same form as the papers' numbers (100 × cosine similarity).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from studio.data import procedural
from studio.errors import ModelLoadError

DOMAIN_CLIP = Path(__file__).resolve().parents[2] / "assets" / "clip"
DOMAIN_CLIP_NAME = "studio-domain-clip"
DOMAIN_CLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}


@dataclass
class ClipScorer:
    """An open_clip model with its preprocessing and tokenizer, producing normalised embeddings."""

    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    name: str

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.preprocess(image.convert("RGB")) for image in images])
        return F.normalize(self.model.encode_image(batch).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(list(texts))).float(), dim=-1)

    def clip_t(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """Per image: 100 × cos(image, its prompt)."""
        return (100 * (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)).numpy()

    def clip_i(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> np.ndarray:
        """Per image: mean over references of 100 × cos(image, reference)."""
        return (100 * self.image_embeddings(images) @ self.image_embeddings(references).T).mean(1).numpy()


def register_domain_config() -> None:
    import open_clip

    if DOMAIN_CLIP_NAME not in open_clip.list_models():
        # open_clip registers configs from files; it reads them at once, so the file need not outlive the call
        with tempfile.TemporaryDirectory(prefix="studio-clip-config-") as folder:
            config = Path(folder) / f"{DOMAIN_CLIP_NAME}.json"
            config.write_text(json.dumps(DOMAIN_CLIP_CONFIG))
            open_clip.add_model_config(config)


def load_clip(model_name: str | None = None, weights: str | Path | None = None) -> ClipScorer:
    """An open_clip model from a local weights file; by default the embedded domain's CLIP."""
    import open_clip

    if model_name is None or model_name == DOMAIN_CLIP_NAME:
        register_domain_config()
        model_name = DOMAIN_CLIP_NAME
        weights = weights or DOMAIN_CLIP / "open_clip_model.safetensors"
    if weights is None:
        raise ModelLoadError(f"CLIP model {model_name!r} needs --clip-weights FILE (nothing is downloaded)")
    weights = Path(weights)
    if not weights.is_file():
        raise ModelLoadError(f"no CLIP weights at {weights}")
    if model_name not in open_clip.list_models():
        raise ModelLoadError(f"unknown open_clip model {model_name!r}")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights),
                                                                     weights_only=True)
    except Exception as error:  # shape mismatches and unreadable files
        raise ModelLoadError(f"CLIP weights {weights.name} do not fit {model_name}: "
                             f"{str(error).splitlines()[0][:300]}") from error
    return ClipScorer(model.eval(), preprocess, open_clip.get_tokenizer(model_name), model_name)


def random_scene(rng: np.random.Generator):
    return procedural.jittered_scene(rng, str(rng.choice(list(procedural.COLORS))),
                                     str(rng.choice(procedural.TEXTURES)), str(rng.choice(procedural.SHAPES)),
                                     str(rng.choice(list(procedural.BACKGROUNDS))))


def one_attribute_variants(scene) -> list[str]:
    """Captions that differ from the scene's in exactly one attribute."""
    variants = []
    for field, values in (("color", procedural.COLORS), ("texture", procedural.TEXTURES),
                          ("shape", procedural.SHAPES), ("background", procedural.BACKGROUNDS)):
        for value in values:
            if value != getattr(scene, field):
                variants.append(procedural.with_attributes(scene, **{field: value}).caption)
    return variants


def caption_separation(scorer: ClipScorer, n: int = 500, seed: int = 1) -> dict[str, float]:
    """On n held-out renders: how often the right caption ranks first among one-attribute variants, and how
    often CLIP-T of the matching pair exceeds that of a mismatched pair."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = [Image.fromarray(procedural.render(s)) for s in scenes]
    image_features = scorer.image_embeddings(images)
    first, above = [], []
    for index, scene in enumerate(scenes):
        captions = [scene.caption, *one_attribute_variants(scene)]
        scores = image_features[index] @ scorer.text_embeddings(captions).T
        first.append(bool(scores.argmax() == 0))
        wrong = scenes[(index + 1) % n].caption
        above.append(bool(scores[0] > image_features[index] @ scorer.text_embeddings([wrong])[0])
                     if wrong != scene.caption else True)
    return {"right_caption_first": float(np.mean(first)), "matching_above_mismatched": float(np.mean(above))}
