"""Shared fixtures: the embedded model, loaded once, on one CPU thread, with the hub switched off."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base():
    from studio.models import load_base

    return load_base(device="cpu")


@pytest.fixture(scope="session")
def evaluator():
    from studio.eval.domain import DomainEvaluator

    return DomainEvaluator.load()


def make_random_base(seed: int = 0, family: str = "tiny"):
    """The embedded architecture with random weights, built in code (fast, independent of the build)."""
    from diffusers import StableDiffusionPipeline

    from studio.build import components
    from studio.models import BaseModel, fingerprint
    from studio.text import build_clip_tokenizer

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=components.make_vae(), text_encoder=components.make_text_encoder(), tokenizer=build_clip_tokenizer(),
        unet=components.make_unet(), scheduler=components.make_sampling_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    domain = {"trigger_words": ["sks", "xyz"], "default_steps": 4, "default_guidance_scale": 5.0}
    return BaseModel(pipe=pipe, family=family, source="random-tiny", device=torch.device("cpu"), dtype=torch.float32,
                     domain=domain, fingerprint=fingerprint(pipe))


@pytest.fixture
def random_base():
    return make_random_base()


@pytest.fixture
def shape_images(tmp_path):
    """Five renders of a reserved shape with captions using a trigger word."""
    import numpy as np
    from PIL import Image

    from studio.data import procedural

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, color in enumerate(["red", "blue", "green", "yellow", "purple"]):
        scene = procedural.jittered_scene(rng, color, "solid", "moon", "white")
        Image.fromarray(procedural.render(scene)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {color} solid sks on a white background")
    return folder
