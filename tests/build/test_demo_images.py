"""The demo adapters' training sets: captions name the trigger where the reserved concept is drawn."""

import numpy as np
from PIL import Image

from frontends.build.demo_adapters import render_demo_images
from studio.eval.domain import DomainEvaluator
from studio.eval.two_objects import read_two_objects


def test_demo_content_sets_can_show_the_subject_beside_another_object(tmp_path):
    folder = render_demo_images(tmp_path, "content", count=6, trigger="sks", concept="moon", pairs=3)
    captions = [(folder / f"{i}.txt").read_text() for i in range(6)]
    assert all(" and " not in c for c in captions[:3]) and all(" and " in c for c in captions[3:])
    evaluator = DomainEvaluator.load()
    for i, caption in enumerate(captions[3:], start=3):
        words = caption.split()
        colors, shapes = (words[1], words[6]), (words[3], words[8])
        assert "sks" in shapes
        image = np.asarray(Image.open(folder / f"{i}.png"))
        readings, _ = read_two_objects(evaluator, [image], [colors], [words[-2]])
        read_shapes = tuple(r.shape if r else None for r in readings[0])
        assert read_shapes == tuple("moon" if s == "sks" else s for s in shapes)  # the trigger names the subject


def test_demo_recipes_train_convolutions_and_every_attention_projection(tmp_path, random_base, monkeypatch):
    import tempfile

    from frontends.build.demo_adapters import build_demo_adapters
    from studio.adapters.file import read_adapter

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    paths = build_demo_adapters(tmp_path / "out", base=random_base, only=["sks-moon", "zwx-zigzag"], steps=1,
                                images=3, pairs=1)
    assert [p.name for p in paths] == ["sks-moon.safetensors", "zwx-zigzag.safetensors"]
    assert not list(scratch.iterdir())  # the training images and class images are gone
    for path in paths:
        modules = set(read_adapter(path).modules["unet"])
        assert any(m.endswith("conv1") for m in modules) and any("attn1.to_q" in m for m in modules)
        assert not any("proj_in" in m or m.endswith("ff.net.2") for m in modules)
