import json

import numpy as np
import pytest
import torch
from PIL import Image

from frontends.build.domain_clip import train_domain_clip
from studio.data import procedural
from studio.errors import DataError, ModelLoadError
from studio.eval.clip import DOMAIN_CLIP_NAME, load_clip, one_attribute_variants
from studio.eval.judge import DomainJudge
from studio.eval.report import evaluate_folder


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """A briefly trained domain-config CLIP in a temporary folder (the shipped one is used elsewhere)."""
    folder = tmp_path_factory.mktemp("clip")
    torch.set_num_threads(1)
    from studio.eval import clip

    original = clip.caption_separation
    clip.caption_separation = lambda scorer, n=500, seed=1: original(scorer, n=8, seed=seed)
    try:
        train_domain_clip(folder, steps=2, batch_size=8)
    finally:
        clip.caption_separation = original
    return folder / "open_clip_model.safetensors"


def test_metrics_on_fixed_images_are_deterministic_and_bounded(small_clip):
    scorer = load_clip(weights=small_clip)
    rng = np.random.default_rng(0)
    scenes = [procedural.jittered_scene(rng, "red", "solid", "circle", "white") for _ in range(2)]
    images = [Image.fromarray(procedural.render(s)) for s in scenes]
    first = scorer.clip_t(images, [s.caption for s in scenes])
    second = scorer.clip_t(images, [s.caption for s in scenes])
    assert np.array_equal(first, second) and np.all(np.abs(first) <= 100)
    assert scorer.clip_i(images[:1], images[:1])[0] == pytest.approx(100.0, abs=1e-3)


def test_missing_and_mismatched_checkpoints_are_clear_errors(tmp_path, small_clip):
    with pytest.raises(ModelLoadError, match="no CLIP weights"):
        load_clip(weights=tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match="needs --clip-weights"):
        load_clip("ViT-B-32")
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_clip("ViT-B-32", weights=small_clip)
    assert DOMAIN_CLIP_NAME == "studio-domain-clip"


def test_variants_differ_in_one_attribute():
    scene = procedural.Scene("star", "red", "striped", "white")
    variants = one_attribute_variants(scene)
    assert len(variants) == 5 + 5 + 7 + 2
    assert all(sum(a != b for a, b in zip(v.split(), scene.caption.split())) == 1 for v in variants)


def test_domain_judge_asks_both_orders(evaluator):
    judge = DomainJudge(evaluator)
    right = Image.fromarray(procedural.render(procedural.Scene("star", "red", "solid", "white")))
    wrong = Image.fromarray(procedural.render(procedural.Scene("circle", "blue", "solid", "white")))
    verdict = judge.compare("a red solid star on a white background", right, wrong)
    assert verdict.winner == "A" and verdict.first_order == "A" and verdict.second_order == "A"
    assert judge.compare("a red solid star on a white background", right, right).winner == "tie"


def test_eval_folder_reports_attributes_and_clip(tmp_path, small_clip):
    rng = np.random.default_rng(1)
    captions = []
    for index in range(3):
        scene = procedural.jittered_scene(rng, "green", "dotted", "heart", "gray")
        Image.fromarray(procedural.render(scene)).save(tmp_path / f"{index}.png")
        captions.append(scene.caption)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({f"{i}.png": c for i, c in enumerate(captions)}))
    report = evaluate_folder(tmp_path, prompts, metrics=("clip_t", "attributes"), clip_weights=small_clip)
    assert report["mean"]["attributes_matched"] == 1.0 and "clip_t" in report["mean"]
    with pytest.raises(DataError, match="unknown metric"):
        evaluate_folder(tmp_path, prompts, metrics=("fid",))
    (tmp_path / "bad.txt").write_text("one line")
    with pytest.raises(DataError, match="1 prompts for 3 images"):
        evaluate_folder(tmp_path, tmp_path / "bad.txt", metrics=("attributes",))


def test_shipped_domain_clip_gives_pinned_scores_and_separates_captions():
    from studio.eval.clip import caption_separation

    scorer = load_clip()
    image = Image.fromarray(procedural.render(procedural.Scene("star", "red", "striped", "white")))
    right, wrong = scorer.clip_t([image, image], ["a red striped star on a white background",
                                                  "a blue dotted circle on a black background"])
    assert right == pytest.approx(96.00, abs=0.5) and wrong == pytest.approx(-29.92, abs=0.5)
    report = caption_separation(scorer, n=60, seed=9)
    assert report["right_caption_first"] >= 0.9 and report["matching_above_mismatched"] >= 0.95
