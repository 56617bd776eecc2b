"""Every trainer in :data:`trainers.TRAINERS` through the same checks (as peft's tests run every tuner through
one table): the files state what was trained, the base is as it was, the files load in plain diffusers, and a
resumed run equals an uninterrupted one. Tiny random base, a few steps each."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from studio.adapters.file import read_adapter
from tests.conftest import make_random_base
from trainers import TRAINERS, B4MConfig, CoLoRAConfig, SaraConfig, TrainConfig, run

STEPS = 4


def options(method: str, images):
    """Each method's options, shrunk to a few steps and small ranks."""
    return {
        "lora": None,
        "sara": SaraConfig(target_params=4000, lora_rank=2),
        "colora": CoLoRAConfig(probe_rank=2, probe_steps=2, budget_rank=2, min_rank=1, max_rank=4, path_points=2,
                                probe_samples=2),
        "b4m": B4MConfig(content=images, style=images, rank=2, break_steps=STEPS, make_steps=STEPS,
                         aux_images_per_set=2),
    }[method]


def config(images, out, **overrides) -> TrainConfig:
    values = dict(images=images, output="case", output_dir=out, max_train_steps=STEPS, train_batch_size=2, seed=3,
                  rank=2, learning_rate=5e-3)
    return TrainConfig(**{**values, **overrides})


def unet_output(base) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    unet = base.pipe.unet
    sample = torch.randn(1, unet.config.in_channels, 16, 16, generator=generator)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), hidden).sample


def lora_files(paths):
    return [p for p in paths if not p.name.endswith(".sara.safetensors")]


def test_the_matrix_covers_every_trainer():
    assert set(TRAINERS) == {"lora", "sara", "colora", "b4m"}


@pytest.mark.parametrize("method", list(TRAINERS))
def test_files_state_what_was_trained_the_base_is_restored_and_diffusers_loads_them(method, tmp_path,
                                                                                      shape_images):
    base = make_random_base()
    before = unet_output(base)
    paths = run(method, config(shape_images, tmp_path), options(method, shape_images), base=base)
    assert torch.equal(unet_output(base), before)  # the base draws as it did before training
    assert paths and all(p.exists() for p in paths)
    for path in lora_files(paths):
        adapter = read_adapter(path)
        meta = adapter.metadata
        assert meta["studio.method"] == method
        assert json.loads(meta["ss_steps"]) == STEPS
        ranks = [m.rank for m in adapter.modules["unet"].values()]
        assert ranks.count(json.loads(meta["ss_network_dim"])) == max(map(ranks.count, ranks))  # a most common rank
        if method in ("lora", "b4m"):
            assert set(ranks) == {2}
        plain = StableDiffusionPipeline(**make_random_base().pipe.components)
        plain.load_lora_weights(str(path), adapter_name="trained")
        assert "trained" in plain.get_list_adapters()["unet"]
        assert sum(1 for n, _ in plain.unet.named_modules() if n.endswith("lora_A.trained")) == len(ranks)


@pytest.mark.parametrize("method", list(TRAINERS))
def test_a_resumed_run_equals_an_uninterrupted_one(method, tmp_path, shape_images):
    full = run(method, config(shape_images, tmp_path / "full", checkpointing_steps=2),
               options(method, shape_images), base=make_random_base())
    calls = {"n": 0}

    def stop_halfway() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    stopped = config(shape_images, tmp_path / "resumed", checkpointing_steps=2)
    run(method, stopped, options(method, shape_images), base=make_random_base(), should_stop=stop_halfway)
    resumed = run(method, config(shape_images, tmp_path / "resumed", checkpointing_steps=2,
                                 resume_from_checkpoint="latest"), options(method, shape_images),
                  base=make_random_base())
    assert [p.name for p in resumed] == [p.name for p in full]
    for a, b in zip(full, resumed):
        first, second = load_file(str(a)), load_file(str(b))
        assert first.keys() == second.keys()
        for key in first:
            assert torch.allclose(first[key].float(), second[key].float(), atol=1e-5), (a.name, key)
