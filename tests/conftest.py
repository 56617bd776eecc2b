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
    from pipelines.loading import load_base

    return load_base(device="cpu")


@pytest.fixture(scope="session")
def evaluator():
    from studio.eval.domain import DomainEvaluator

    return DomainEvaluator.load()


def make_random_base(seed: int = 0, family: str = "tiny"):
    """The embedded architecture with random weights, built in code (fast, independent of the build)."""
    from frontends.build import components
    from pipelines import CompositionPipeline
    from studio.models import BaseModel, fingerprint
    from studio.text import build_clip_tokenizer

    torch.manual_seed(seed)
    pipe = CompositionPipeline(
        vae=components.make_vae(), text_encoder=components.make_text_encoder(), tokenizer=build_clip_tokenizer(),
        unet=components.make_unet(), scheduler=components.make_sampling_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    domain = {"trigger_words": ["sks", "xyz"], "default_steps": 4, "default_guidance_scale": 5.0}
    base = BaseModel(pipe=pipe, family=family, source="random-tiny", device=torch.device("cpu"), dtype=torch.float32,
                     domain=domain, fingerprint=fingerprint(pipe))
    pipe._studio_base = base
    return base


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


def make_random_sdxl_base(seed: int = 0):
    """A tiny SDXL-architecture pipeline (two text encoders, added time ids), random weights, built in code."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipelines import CompositionXLPipeline
    from studio.models import BaseModel, fingerprint
    from studio.text import build_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=16,
    )
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=32)
    text_config = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    pipe = CompositionXLPipeline(
        vae=vae, unet=unet, scheduler=EulerDiscreteScheduler(), tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"), text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_config)),
    )
    pipe.set_progress_bar_config(disable=True)
    base = BaseModel(pipe=pipe, family="sdxl", source="random-sdxl", device=torch.device("cpu"),
                     dtype=torch.float32, domain=None, fingerprint=fingerprint(pipe))
    pipe._studio_base = base
    return base
