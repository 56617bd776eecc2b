"""Shared by the pipeline tests: three UNet-only adapters on a random tiny base, and one call of a pipeline."""

import pytest
import torch

from pipelines import CompositionPipeline
from studio.adapters.file import save_adapter
from tests.conftest import make_adapter, make_random_base

PROMPT = "a red solid sks on a white background"


def unet_only_adapter(base, seed):
    """Text is encoded once with every adapter active (as in the paper's code), so these carry no text-encoder
    part: then Switch's first adapter alone reproduces a single-adapter image."""
    adapter = make_adapter(base, seed=seed, scale=0.3)
    del adapter.modules["text_encoder"]
    return adapter


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    base = make_random_base()
    paths = [save_adapter(unet_only_adapter(base, i), folder / f"a{i}.safetensors") for i in range(3)]
    return CompositionPipeline.from_base(base), paths


def call(pipe, **kwargs):
    """The pipeline's whole output for PROMPT (images, recipe, stats, masks)."""
    kwargs.setdefault("output_type", "np")
    return pipe(PROMPT, num_inference_steps=kwargs.pop("steps", 6), guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), **kwargs)


def run(pipe, **kwargs):
    """The images of :func:`call`."""
    return call(pipe, **kwargs).images
