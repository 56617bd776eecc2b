"""Merged adapter weights are kept between generations and rebuilt exactly when what they depend on changes.

The control for every change is a fresh build: the same generation after ``release_merged_weights()`` must give
the bit-identical image, and the change itself must move the image (so a stale weight would show)."""

import numpy as np
import pytest
import torch

from pipelines import CompositionPipeline
from pipelines.merged_routing import MergedRouting, kept_merged_weights
from studio.adapters.file import save_adapter
from studio.adapters.inject import detach_adapter, lora_modules
from tests.conftest import make_random_base
from tests.pipelines.conftest import PROMPT, unet_only_adapter


@pytest.fixture
def pipe_and_files(tmp_path):
    base = make_random_base()
    files = [save_adapter(unet_only_adapter(base, i), tmp_path / f"a{i}.safetensors") for i in range(3)]
    return CompositionPipeline.from_base(base), files


def call(pipe, prompt=PROMPT, **kwargs):
    return pipe(prompt, num_inference_steps=6, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs)


def fresh(pipe, **kwargs):
    """The generation with nothing kept from before: every merged weight is built from the current state."""
    pipe.release_merged_weights()
    output = call(pipe, **kwargs)
    assert output.stats.merged_weights_built == output.stats.merged_weights > 0
    return output.images


@pytest.mark.parametrize("method", ["composite", "cmlora"])
def test_second_generation_builds_no_merged_weight_and_gives_the_same_image(pipe_and_files, method):
    pipe, files = pipe_and_files
    adapters = [(f, w) for f, w in zip(files, (1.0, 0.7, 0.5))]
    first = call(pipe, adapters=adapters, method=method)
    second = call(pipe, adapters=adapters, method=method)
    assert first.stats.merged_weights_built == first.stats.merged_weights > 0
    assert second.stats.merged_weights == first.stats.merged_weights and second.stats.merged_weights_built == 0
    assert np.array_equal(first.images, second.images)
    pipe.merged_routing_budget = 0  # the slow path (peft's mixed batch) agrees up to float rounding
    slow = call(pipe, adapters=adapters, method=method)
    assert slow.stats.merged_weights == 0 and not kept_merged_weights(pipe.unet).entries
    assert np.abs(slow.images - second.images).max() <= 1e-3


def _reweight(pipe, files):
    return {"adapters": [(files[0], 1.0), (files[1], 0.2), (files[2], 0.5)]}


def _per_layer(pipe, files):
    return {"adapters": [(files[0], {"unet": {"down": 0.0, "mid": 1.0, "up": 1.0}}), (files[1], 0.7),
                         (files[2], 0.5)]}


def _edit_base(pipe, files):
    layer = lora_modules(pipe.unet)[0][1]
    with torch.no_grad():
        layer.get_base_layer().weight.mul_(1.5)
    return {}


@pytest.mark.parametrize("change", [_reweight, _per_layer, _edit_base])
def test_a_change_rebuilds_what_depends_on_it(pipe_and_files, change):
    pipe, files = pipe_and_files
    adapters = [(f, w) for f, w in zip(files, (1.0, 0.7, 0.5))]
    before = call(pipe, adapters=adapters, method="composite").images
    kwargs = {"adapters": adapters, "method": "composite", **change(pipe, files)}
    after = call(pipe, **kwargs)
    assert after.stats.merged_weights_built > 0
    assert np.abs(after.images - before).max() > 1e-3  # the change shows in the image
    assert np.array_equal(after.images, fresh(pipe, **kwargs))


def test_fusing_a_diffusers_lora_rebuilds_and_so_does_unfusing_it(pipe_and_files):
    pipe, files = pipe_and_files
    adapters = [(files[0], 1.0), (files[1], 0.7)]
    before = call(pipe, adapters=adapters, method="composite").images
    weights = [layer.get_base_layer().weight for _, layer in lora_modules(pipe.unet)]
    originals = [w.clone() for w in weights]
    pipe.load_lora_weights(str(files[2]), adapter_name="native")
    pipe.fuse_lora(lora_scale=0.37, adapter_names=["native"])
    pipe.unfuse_lora()  # W + ΔW − ΔW, written in place through .data (no version bump): not all of W comes back
    pipe.delete_adapters("native")
    assert not all(torch.equal(w, o) for w, o in zip(weights, originals))
    unfused = call(pipe, adapters=adapters, method="composite")
    assert unfused.stats.merged_weights_built > 0
    assert np.array_equal(unfused.images, fresh(pipe, adapters=adapters, method="composite"))
    pipe.load_lora_weights(str(files[2]), adapter_name="native")
    pipe.fuse_lora(lora_scale=0.37, adapter_names=["native"])
    fused = call(pipe, adapters=adapters, method="composite").images
    assert np.abs(fused - before).max() > 1e-3
    assert np.array_equal(fused, fresh(pipe, adapters=adapters, method="composite"))


def test_detaching_an_adapter_frees_its_merged_weights(pipe_and_files):
    pipe, files = pipe_and_files
    names = pipe.attach_adapters(files).names
    call(pipe, adapters=files[1:], method="composite")  # kept: stacks of the other two
    call(pipe, adapters=files, method="composite")  # and stacks with the first
    kept = kept_merged_weights(pipe.unet)
    held = kept.nbytes
    assert any(names[0] in key[1] for key in kept.entries)
    detach_adapter(pipe.studio_base(), names[0])
    assert not any(names[0] in key[1] for key in kept.entries) and 0 < kept.nbytes < held
    pipe.release_merged_weights()
    assert kept.nbytes == 0


def test_kept_weights_stay_within_the_budget(pipe_and_files):
    pipe, files = pipe_and_files
    call(pipe, adapters=files, method="composite")
    kept = kept_merged_weights(pipe.unet)
    held = kept.nbytes
    layers = [layer for _, layer in lora_modules(pipe.unet)]
    need = MergedRouting.extra_bytes(layers, pipe.attach_adapters(files[1:]).names)
    pipe.merged_routing_budget = need + (held - 1 - need) // 2  # room for this generation, not for both
    assert need < pipe.merged_routing_budget < held
    output = call(pipe, adapters=files[1:], method="composite")
    assert output.stats.merged_weights > 0 and kept.nbytes <= pipe.merged_routing_budget
