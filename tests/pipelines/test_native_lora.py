"""diffusers-native LoRA under ``adapters=``: a shared base of every route, never silently dropped; and every
composition method takes diffusers' loop arguments (callbacks, interrupt, custom timesteps, no guidance).

The control is stock diffusers with every adapter loaded its own way: Merge with the studio's adapter at weight
w on top of a diffusers-loaded one must equal ``set_adapters([native, studio], [1, w])``.
"""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from studio.adapters.file import save_adapter
from tests.adapters.test_files import make_adapter
from tests.conftest import make_random_base

TOLERANCE = 1e-4


@pytest.fixture
def setup(tmp_path):
    base = make_random_base()
    files = []
    for seed in (1, 2):
        adapter = make_adapter(base, seed=seed, scale=0.3)
        del adapter.modules["text_encoder"]  # diffusers' text-encoder loading needs transformers' own peft hook
        files.append(save_adapter(adapter, tmp_path / f"lora{seed}.safetensors"))
    ours = base.pipe
    stock = StableDiffusionPipeline(**ours.components, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    return stock, ours, files


def run(pipe, **kwargs):
    return pipe("a red solid sks", num_inference_steps=3, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def test_merge_over_a_diffusers_lora_equals_stock_with_both(setup):
    stock, ours, (native, studio) = setup
    stock.load_lora_weights(native, adapter_name="native")
    stock.load_lora_weights(studio, adapter_name="studio")
    stock.set_adapters(["native", "studio"], [1.0, 0.7])
    both = run(stock)
    stock.set_adapters(["native"])
    alone = run(stock)
    assert np.abs(run(ours, adapters=[(studio, 0.7)]) - both).max() <= TOLERANCE
    assert np.abs(alone - both).max() > 1e-3
    scaled = run(stock, cross_attention_kwargs={"scale": 0.5})
    assert np.abs(run(ours) - alone).max() <= TOLERANCE  # the diffusers state is back after composing
    assert np.abs(run(ours, cross_attention_kwargs={"scale": 0.5}) - scaled).max() <= TOLERANCE


def test_routed_methods_keep_the_diffusers_lora_in_every_route(setup):
    stock, ours, (native, studio) = setup
    without = run(ours, adapters=[(studio, 0.7)], method="composite")
    stock.load_lora_weights(native, adapter_name="native")
    with_native = run(ours, adapters=[(studio, 0.7)], method="composite")
    assert np.abs(with_native - without).max() > 1e-3  # not dropped
    stock.fuse_lora()  # fused: already in the weights, and peft's refusal of routing on merged layers is avoided
    assert np.abs(run(ours, adapters=[(studio, 0.7)], method="composite") - with_native).max() <= TOLERANCE
    stock.unfuse_lora()
    stock.disable_lora()  # switched off the diffusers way: the studio's adapter still applies
    assert np.abs(run(ours, adapters=[(studio, 0.7)], method="composite") - without).max() <= TOLERANCE
    stock.enable_lora()
    assert np.abs(run(ours) - run(stock)).max() <= TOLERANCE


def test_a_native_adapter_keeps_its_state_after_composition(setup):
    stock, ours, (native, studio) = setup
    stock.load_lora_weights(native, adapter_name="native")
    stock.set_adapters(["native"], [0.6])
    layers = [m for m in stock.unet.modules() if hasattr(m, "lora_A") and "native" in m.lora_A]
    before = [(list(m.active_adapters), m.scaling["native"], m.get_base_layer().weight.clone(),
               m.lora_A["native"].weight.requires_grad) for m in layers]
    run(ours, adapters=[(studio, 0.7)], method="switch")
    after = [(list(m.active_adapters), m.scaling["native"], m.get_base_layer().weight,
              m.lora_A["native"].weight.requires_grad) for m in layers]
    for (active, scaling, weight, grad), (active2, scaling2, weight2, grad2) in zip(before, after):
        assert active == active2 and scaling == scaling2 and grad == grad2 and torch.equal(weight, weight2)


def test_adapters_removed_the_diffusers_way_are_attached_again(setup):
    stock, ours, (native, studio) = setup
    first = run(ours, adapters=[(studio, 0.7)], method="composite")
    stock.unload_lora_weights()  # removes every LoRA layer, the studio's included
    assert np.abs(run(ours) - run(stock)).max() <= TOLERANCE
    assert np.abs(run(ours, adapters=[(studio, 0.7)], method="composite") - first).max() <= TOLERANCE


@pytest.mark.parametrize("method", ["merge", "switch", "composite", "cmlora", "clora"])
def test_every_method_takes_diffusers_loop_arguments(setup, method):
    from diffusers import EulerDiscreteScheduler

    _, ours, files = setup
    ours.scheduler = EulerDiscreteScheduler.from_config(ours.scheduler.config)
    steps = []

    def callback(pipe, step, timestep, tensors):
        steps.append(tuple(tensors["prompt_embeds"].shape))
        if step == 2:
            pipe._interrupt = True
        return {"latents": tensors["latents"] * 0.95}

    options = {"groups": [["red"], ["sks"]]} if method == "clora" else {}
    for guidance in (5.0, 1.0):  # with and without classifier-free guidance
        steps.clear()
        image = ours("a red solid sks", adapters=[(files[0], 0.8), (files[1], 0.6)], method=method,
                     method_options=options, timesteps=[999, 750, 500, 250], num_inference_steps=None,
                     guidance_scale=guidance, eta=0.0, output_type="np", callback_on_step_end=callback,
                     callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
                     generator=torch.Generator().manual_seed(0)).images
        assert np.isfinite(image).all() and ours.num_timesteps == 4
        assert len(steps) == 3 and steps[0][0] == (2 if guidance > 1 else 1)  # interrupted after the third step
