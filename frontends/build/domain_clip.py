"""Training of the embedded domain's CLIP (:mod:`studio.eval.clip`): contrastive training on fresh renders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from studio.data import procedural
from studio.eval.clip import (
    DOMAIN_CLIP,
    DOMAIN_CLIP_CONFIG,
    DOMAIN_CLIP_NAME,
    ClipScorer,
    caption_separation,
    one_attribute_variants,
    random_scene,
    register_domain_config,
)
from studio.files import atomic_write


def train_domain_clip(out_dir: Path = DOMAIN_CLIP, steps: int = 2000, batch_size: int = 128, seed: int = 0,
                      learning_rate: float = 1e-3, hard_negatives: bool = True) -> dict[str, float]:
    """Contrastive training on fresh renders over every attribute (reserved ones included) and their captions.

    With ``hard_negatives`` each image's caption also competes against one caption that differs from it in a
    single attribute (as NegCLIP does): in-batch negatives alone almost always differ in several attributes, so
    they never teach the fine distinctions the caption-ranking check asks for.
    """
    import open_clip  # heavy, and only needed where CLIP is used

    register_domain_config()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(DOMAIN_CLIP_NAME)
    tokenizer = open_clip.get_tokenizer(DOMAIN_CLIP_NAME)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps,
                                                   pct_start=0.05)
    for _ in tqdm(range(steps), desc="domain clip", mininterval=2):
        scenes = [random_scene(rng) for _ in range(batch_size)]
        images = torch.stack([preprocess(Image.fromarray(procedural.render(s))) for s in scenes])
        captions = [s.caption for s in scenes]
        if hard_negatives:
            captions += [str(rng.choice(one_attribute_variants(s))) for s in scenes]
        image_features, text_features, scale = model(images, tokenizer(captions))
        logits = scale * image_features @ text_features.T
        labels = torch.arange(batch_size)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :batch_size].T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    atomic_write(out_dir / "open_clip_model.safetensors", lambda tmp: save_file(state, str(tmp)))
    scorer = ClipScorer(model.eval(), preprocess, tokenizer, DOMAIN_CLIP_NAME)
    report = caption_separation(scorer, n=500, seed=seed + 1)
    record = {"config": DOMAIN_CLIP_CONFIG, "steps": steps, "batch_size": batch_size, "seed": seed,
              "hard_negatives": hard_negatives, **report}
    atomic_write(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return report
