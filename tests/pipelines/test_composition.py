import contextlib

import numpy as np
import pytest
import torch

from pipelines import CMLoRAPipeline, CompositionPipeline
from pipelines.adapter_set import AdapterSet, AttachedAdapter, LoadedAdapter
from pipelines.merged_routing import merged_routing
from pipelines.methods.base import Prediction
from pipelines.methods.cmlora import CMLoRA, dominant_shares, refresh_steps
from pipelines.methods.switch import scaled_interval
from pipelines.unet_runner import BASE, UNetStats, predict_noise, unet_forward
from studio.adapters.file import save_adapter
from studio.errors import AdapterError, ConfigError
from tests.conftest import make_adapter, make_random_base
from tests.pipelines.conftest import PROMPT, call, run


def test_unet_forward_matches_diffusers_and_shallow_pass_reuses_the_deep_feature(setup):
    unet = setup[0].unet
    x, hidden, t = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 96), torch.tensor([300, 300])
    with torch.no_grad():
        reference = unet(x, t, hidden).sample
        full, feature = unet_forward(unet, x, t, hidden)
        stats = UNetStats()
        shallow, _ = unet_forward(unet, x, t, hidden, deep_feature=feature, stats=stats)
    assert torch.allclose(reference, full, atol=1e-5) and torch.allclose(full, shallow, atol=1e-5)
    assert stats.block_evaluations == 2 * 2  # first down-block + last up-block, for 2 samples


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("layout", [(0, 1, 2, 3), (0, 0, 1, 2, 3, 3)])
def test_batched_routing_equals_sequential_evaluation(setup, merged, layout):
    """Both routings (peft's mixed batch; merged weights, grouped when the runs are even) match one adapter
    at a time; index 3 is the base."""
    pipe, paths = setup
    names = pipe.attach_adapters([(p, 0.8) for p in paths]).names
    from studio.adapters.inject import set_adapter_weights

    set_adapter_weights(pipe.studio_base(), {n: 0.8 for n in names})
    routes = [(names + [BASE])[i] for i in layout]
    x, hidden, t = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 96), torch.tensor(400)
    with torch.no_grad(), merged_routing(pipe.unet, names) if merged else contextlib.nullcontext() as routing:
        batched, _ = predict_noise(pipe.unet, x.repeat(len(routes), 1, 1, 1), t, hidden.repeat(len(routes), 1, 1),
                                   routes)
        assert (routing is not None and len(routing.used) > 0) == merged
    with torch.no_grad():
        for index, i in enumerate(layout):
            set_adapter_weights(pipe.studio_base(), {names[i]: 0.8} if i < 3 else {})
            single = pipe.unet(x, t, hidden).sample
            assert (batched[index] - single[0]).abs().max() <= 1e-4
    set_adapter_weights(pipe.studio_base(), {})


def test_generation_routes_through_merged_weights_within_budget(setup):
    pipe, paths = setup
    adapters = [(p, w) for p, w in zip(paths, (1.0, 0.7, 0.5))]
    images, merged = {}, {}
    for budget in (0, 1 << 30):
        pipe.merged_routing_budget = budget
        output = call(pipe, adapters=adapters, method="composite")
        images[budget], merged[budget] = output.images, output.stats.merged_weights
    pipe.merged_routing_budget = 1 << 30
    assert merged[0] == 0 and merged[1 << 30] > 0
    assert np.abs(images[0] - images[1 << 30]).max() <= 1e-3


@pytest.mark.parametrize("method,options", [("merge", {}), ("switch", {"interval": 2}), ("composite", {}),
                                            ("cmlora", {})])
def test_cross_attention_kv_cache_is_exact_and_used(setup, method, options):
    pipe, paths = setup
    adapters = [(p, w) for p, w in zip(paths, (1.0, 0.7, 0.5))]
    images = {}
    for flag in (False, True):
        pipe.cache_cross_kv = flag
        output = call(pipe, adapters=adapters, method=method, method_options=options)
        images[flag], hits = output.images, output.stats.cached_text_projections
        assert (hits > 0) == flag
    pipe.cache_cross_kv = True
    assert np.array_equal(images[False], images[True])


def test_methods_differ_from_each_other_and_from_the_base(setup):
    pipe, paths = setup
    adapters = [(p, 1.0) for p in paths]
    images = {m: run(pipe, adapters=adapters, method=m) for m in ("merge", "switch", "composite", "cmlora")}
    base = run(pipe)
    for name, image in images.items():
        assert np.abs(image - base).mean() > 1e-3, name
    keys = list(images)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert np.abs(images[a] - images[b]).mean() > 1e-4, (a, b)


def test_composite_with_one_adapter_equals_the_single_adapter_image(setup):
    pipe, paths = setup
    single = run(pipe, adapters=[(paths[0], 0.7)], method="merge")
    composite = run(pipe, adapters=[(paths[0], 0.7)], method="composite")
    assert np.abs(single - composite).max() <= 1e-5


def test_composite_is_the_mean_of_the_single_adapter_predictions(setup):
    """One DDIM step is linear in the guided prediction, so Composite's latent is the mean of the single-adapter
    latents exactly when it averages (not sums) each adapter's [uncond, cond] pair, the adapter active in the
    unconditional branch too, as the official code does."""
    pipe, paths = setup
    singles = [call(pipe, adapters=[(p, 1.0)], method="merge", steps=1, output_type="latent").images
               for p in paths[:2]]
    composite = call(pipe, adapters=[(p, 1.0) for p in paths[:2]], method="composite", steps=1,
                     output_type="latent").images
    assert (singles[0] - singles[1]).abs().max() > 1e-2
    assert (composite - (singles[0] + singles[1]) / 2).abs().max() <= 1e-4


def test_switch_with_a_long_interval_equals_its_first_adapter(setup):
    pipe, paths = setup
    first = run(pipe, adapters=[(paths[1], 1.0)], method="merge")
    switch = run(pipe, adapters=[(paths[1], 1.0), (paths[2], 1.0)], method="switch",
                 method_options={"interval": 100})
    assert np.abs(first - switch).max() <= 1e-5


def test_switch_keeps_the_papers_frequency_by_default(setup):
    """The official code switches every 5 of 200 steps; by default τ scales with the schedule (1 at 6–59 steps),
    and the recipe records the τ used."""
    assert [scaled_interval(t) for t in (6, 20, 59, 60, 200)] == [1, 1, 1, 2, 5]
    pipe, paths = setup
    adapters = [(paths[1], 1.0), (paths[2], 1.0)]
    default = call(pipe, adapters=adapters, method="switch")
    every_step = run(pipe, adapters=adapters, method="switch", method_options={"interval": 1})
    every_fifth = run(pipe, adapters=adapters, method="switch", method_options={"interval": 5})
    assert np.abs(default.images - every_step).max() <= 1e-6
    assert np.abs(default.images - every_fifth).max() > 1e-3
    assert default.recipe["switch_interval"] == 1


def test_cmlora_cache_cuts_block_evaluations_and_changes_the_image_boundedly(setup):
    pipe, paths = setup
    adapters = [(p, 1.0) for p in paths]
    uncached = call(pipe, adapters=adapters, method="cmlora", method_options={"use_cache": False}, steps=12)
    cached = call(pipe, adapters=adapters, method="cmlora", steps=12)
    assert cached.stats.shallow_passes > 0
    assert cached.stats.block_evaluations < 0.7 * uncached.stats.block_evaluations
    difference = np.abs(cached.images - uncached.images).mean()
    assert 0 < difference < 0.1


def test_cmlora_schedule_and_weights_follow_the_paper():
    assert len(refresh_steps(220)) == 92
    assert refresh_steps(10, interval=1) == set(range(10))
    assert dominant_shares(3) == pytest.approx((0.5556, 0.2222), abs=1e-4)
    dom, other = dominant_shares(4)
    assert dom + 3 * other == pytest.approx(1.0)


def test_cmlora_evaluates_every_adapter_and_rotates_only_the_dominant_one():
    method = CMLoRA()
    background = AttachedAdapter(LoadedAdapter("background", profile={"class": "L"}))
    method.prepare(AdapterSet.of([("subject", 1.0)]) + AdapterSet((background,)), 20)
    predictions = {"subject": Prediction((torch.zeros(1), torch.zeros(1))),
                   "background": Prediction((torch.ones(1), torch.ones(1)))}
    dominant = []
    for step in range(20):
        assert [route.adapter for route in method.plan(step)] == ["subject", "background"]
        dominant.append(method.dominant)
        share = float(method.fuse(step, predictions).cond)  # the background's share of the fused prediction
        assert share == pytest.approx(dominant_shares(2)[0] if method.dominant == "background" else
                                      dominant_shares(2)[1])
    boundary = int(0.55 * 20)
    assert set(dominant[:boundary + 1]) == {"subject"} and set(dominant[boundary + 2 :]) == {"background"}


def test_cmlora_rotation_follows_the_official_index_in_both_phases():
    """At the k-th refresh (k from 0) the official code makes adapter k mod H dominant early and, in the late
    phase, adapter (k mod H) + 1 of the H-then-L list."""
    method = CMLoRA()
    low = AttachedAdapter(LoadedAdapter("sky", profile={"class": "L"}))
    method.prepare(AdapterSet.of([("cat", 1.0), ("ink", 1.0)]) + AdapterSet((low,)), 20)
    order = ["cat", "ink", "sky"]
    for k, step in enumerate(sorted(method.refresh)):
        method.plan(step)
        expected = order[(k % 2) + 1] if step > 0.55 * 20 else order[k % 2]
        assert method.dominant == expected, (k, step)


@pytest.mark.parametrize(("steps", "bound"), [(20, 2), (220, 22)])
def test_cmlora_cache_age_is_bounded_by_a_fraction_of_the_steps(steps, bound):
    method = CMLoRA()
    names = ["a", "b", "c"]
    method.prepare(AdapterSet.of([(n, 1.0) for n in names]), steps)
    written, oldest, full = {}, 0, 0
    for step in range(steps):
        for route in method.plan(step):
            if route.cache == "write":
                written[route.adapter] = step
                full += 1
            else:
                oldest = max(oldest, step - written[route.adapter])
    assert 0 < oldest <= bound
    if steps == 220:  # the paper's regime: the bound never binds (3 full passes at step 0, then one per refresh)
        assert full == 3 + len(refresh_steps(220)) - 1


@pytest.mark.parametrize("adapters", [2, 3])
def test_cmlora_cache_age_is_measured_on_the_whole_schedule(adapters):
    """An img2img run of the last 10 of 20 steps refreshes deep features about half as often as the 20-step run
    (bounded on the 10 steps run, every feature would be rewritten every step: 11 of 17 full evaluations)."""
    def full_evaluations(steps, schedule_steps=None):
        method = CMLoRA()
        method.prepare(AdapterSet.of([(str(i), 1.0) for i in range(adapters)]), steps, schedule_steps)
        return sum(route.cache == "write" for step in range(steps) for route in method.plan(step)), method.max_age

    (txt2img, age), (img2img, img2img_age) = full_evaluations(20), full_evaluations(10, schedule_steps=20)
    assert age == img2img_age == 2
    assert img2img <= (txt2img + 1) // 2
    assert full_evaluations(10)[0] > (txt2img + 1) // 2  # the run's own length as T: the bound binds every step


def test_named_pipeline_uses_its_method(setup):
    pipe, paths = setup
    named = CMLoRAPipeline.from_base(pipe.studio_base())
    output = named(PROMPT, num_inference_steps=3, adapters=[(paths[0], 1.0), (paths[1], 1.0)], output_type="np")
    assert output.recipe["method"] == "cmlora"


def test_many_loaded_adapters_stay_bounded(tmp_path):
    base = make_random_base()
    pipe = CompositionPipeline.from_base(base)
    pipe.max_loaded_adapters = 3
    paths = [save_adapter(make_adapter(base, seed=i), tmp_path / f"b{i}.safetensors") for i in range(5)]
    for path in paths:
        pipe.attach_adapters([(path, 1.0)])
    from studio.adapters.inject import attached_adapters

    assert len(attached_adapters(pipe.studio_base())) == 3


def test_bad_input_gives_clear_errors(setup, tmp_path):
    pipe, paths = setup
    with pytest.raises(ConfigError, match="unknown composition method 'blend'"):
        run(pipe, adapters=[(paths[0], 1.0)], method="blend")
    with pytest.raises(ConfigError, match="composes adapters"):
        run(pipe, adapters=[], method="composite")
    with pytest.raises(ConfigError, match="must be a finite number"):
        run(pipe, adapters=[(paths[0], "strong")], method="merge")
    with pytest.raises(ConfigError, match="must be a finite number, not nan"):
        run(pipe, adapters=[(paths[0], float("nan"))], method="merge")
    with pytest.raises(ConfigError, match=r"a \(file or name, weight\) pair, not"):
        run(pipe, adapters=[(paths[0], 1.0, 0.5)], method="merge")
    with pytest.raises(ConfigError, match="each negative is \\(text, weight\\)"):
        run(pipe, adapters=[(paths[0], 1.0)], method="composite", perp_neg=["a striped shape"])
    with pytest.raises(ConfigError, match="negative_prompt has 3 entries but prompt has 2"):
        pipe([PROMPT, PROMPT], negative_prompt=["a", "b", "c"], num_inference_steps=2)
    with pytest.raises(ConfigError, match="num_inference_steps must be a whole number"):
        run(pipe, steps=0)
    with pytest.raises(ConfigError, match="Provide either `prompt` or `prompt_embeds`"):
        pipe(num_inference_steps=2)
    with pytest.raises(ConfigError, match=f"multiples of {pipe.vae_scale_factor}, not 50×64"):
        run(pipe, height=50, width=64)
    with pytest.raises(ConfigError, match="DECOR α must be between 0 and 1, not 2.0"):
        run(pipe, decor_alpha=2.0)
    with pytest.raises(ConfigError, match="decor_rank must be at least 1"):
        run(pipe, decor_remove=["red"], decor_rank=0)
    with pytest.raises(ConfigError, match="method 'switch' has no option intervall; its options: interval"):
        run(pipe, adapters=[(paths[0], 1.0)], method="switch", method_options={"intervall": 3})
    with pytest.raises(ConfigError, match="option interval of method 'switch' is a number, not 'abc'"):
        run(pipe, adapters=[(paths[0], 1.0)], method="switch", method_options={"interval": "abc"})
    with pytest.raises(ConfigError, match="at least 1, or 0 for the paper's frequency, not -1"):
        run(pipe, adapters=[(paths[0], 1.0)], method="switch", method_options={"interval": -1})
    with pytest.raises(ConfigError, match="phase_boundary and max_staleness are fractions"):
        run(pipe, adapters=[(paths[0], 1.0)], method="cmlora", method_options={"phase_boundary": 2.0})
    other = make_random_base()
    foreign = make_adapter(other)
    foreign.metadata["studio.base_family"] = "sdxl"
    with pytest.raises(AdapterError, match="sdxl"):
        run(pipe, adapters=[(save_adapter(foreign, tmp_path / "xl.safetensors"), 1.0)], method="merge")


def test_one_adapter_and_a_decor_word_list_may_be_given_as_strings(setup):
    pipe, paths = setup
    output = call(pipe, adapters=str(paths[0]), decor_remove="red, star")
    assert np.array_equal(output.images, run(pipe, adapters=[(paths[0], 1.0)], decor_remove=["red", "star"]))
    assert output.recipe["decor_remove"] == ["red", "star"]


def test_custom_pipeline_file_loads_through_diffusers(tmp_path, setup):
    from pathlib import Path

    from diffusers import DiffusionPipeline

    pipe, paths = setup
    folder = tmp_path / "model"
    make_random_base().pipe.save_pretrained(folder)
    source = Path(__file__).resolve().parents[2] / "pipelines" / "composition.py"
    loaded = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(source), local_files_only=True,
                                               trust_remote_code=True)
    assert type(loaded).__name__ == "CompositionPipeline"
    loaded.set_progress_bar_config(disable=True)
    output = loaded(PROMPT, num_inference_steps=2, adapters=[(paths[0], 1.0), (paths[1], 0.5)], method="composite",
                    output_type="np")
    assert output.images.shape == (1, 64, 64, 3) and output.stats.full_passes == 2


def test_prompt_embeds_stand_for_their_text(setup):
    pipe, paths = setup
    adapters = [(paths[0], 0.7), (paths[1], 0.5)]
    with torch.no_grad():
        cond, negative = pipe.encode_texts([PROMPT])[0], pipe.encode_texts(["a blue square"])[0]
    from_text = run(pipe, adapters=adapters, method="composite", negative_prompt="a blue square")
    from_embeds = pipe(prompt_embeds=cond, negative_prompt_embeds=negative, num_inference_steps=6,
                       guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np",
                       adapters=adapters, method="composite").images
    assert np.abs(from_text - from_embeds).max() <= 1e-5
    other = pipe(prompt_embeds=cond, num_inference_steps=6, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(0), adapters=adapters, method="composite").images
    assert np.abs(other - from_embeds).max() > 1e-3  # the negative embeddings were used
    with pytest.raises(ConfigError, match="either a prompt or its embeddings"):
        run(pipe, prompt_embeds=cond)
    with pytest.raises(ConfigError, match=r"\[batch, tokens"):
        pipe(prompt_embeds=cond[0], num_inference_steps=2)
    with pytest.raises(ConfigError, match="reads prompt text"):
        pipe(prompt_embeds=cond, num_inference_steps=2, adapters=adapters, method="clora")


def test_execution_device_agrees_with_diffusers(setup):
    from diffusers import StableDiffusionPipeline

    pipe = setup[0]
    assert pipe._execution_device == StableDiffusionPipeline._execution_device.fget(pipe) == torch.device("cpu")
