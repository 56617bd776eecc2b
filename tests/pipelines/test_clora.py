import pytest
import torch

from pipelines.adapter_set import AdapterSet
from pipelines.methods.base import Prediction
from pipelines.methods.clora import CLoRA, contrastive_loss, token_positions
from studio.adapters.file import save_adapter
from studio.errors import ConfigError
from studio.text import build_clip_tokenizer
from tests.pipelines.conftest import unet_only_adapter

PROMPT = "a red solid sks and a blue solid xyz on a white background"


def test_token_positions_follow_the_tokenizer():
    tokenizer = build_clip_tokenizer()
    assert token_positions(tokenizer, PROMPT, "sks") == [4]
    assert token_positions(tokenizer, PROMPT, "xyz") == [9, 10]  # "xyz" is two CLIP tokens
    assert token_positions(tokenizer, PROMPT, "missing") == []


def test_contrastive_loss_prefers_grouped_maps():
    a = torch.zeros(16)
    a[:8] = 1
    b = torch.zeros(16)
    b[8:] = 1
    separated = contrastive_loss([a, a + 0.01, b, b + 0.01], [0, 0, 1, 1], 0.5)
    mixed = contrastive_loss([a, b + 0.01, b, a + 0.01], [0, 0, 1, 1], 0.5)
    assert separated < mixed


def test_clora_updates_latents_returns_masks_and_differs_from_composite(setup, tmp_path):
    pipe, _ = setup
    base = pipe.studio_base()
    first, second = unet_only_adapter(base, 11), unet_only_adapter(base, 12)
    first.metadata["studio.trigger_words"], second.metadata["studio.trigger_words"] = '["sks"]', '["xyz"]'
    paths = [save_adapter(first, tmp_path / "sks.safetensors"), save_adapter(second, tmp_path / "xyz.safetensors")]
    common = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    output = pipe(PROMPT, generator=torch.Generator().manual_seed(0), adapters=[(p, 1.0) for p in paths],
                  method="clora", method_options={"extra_rounds": 50}, **common)
    clora, masks = output.images, output.masks
    names = [name for name, _ in output.recipe["adapters"]]
    assert set(masks) == {*names, "__clora_base__"} and len(names) == 2
    assert masks[names[0]].shape == (1, 16, 16) and set(masks[names[0]].unique().tolist()) <= {0.0, 1.0}
    coverage = masks[names[0]] + masks[names[1]] + masks["__clora_base__"]
    assert (coverage >= 1).all()  # every pixel belongs to some prediction
    composite = pipe(PROMPT, generator=torch.Generator().manual_seed(0), adapters=[(p, 1.0) for p in paths],
                     method="composite", **common).images
    assert abs(clora - composite).mean() > 1e-4


def test_clora_groups_are_configurable(setup, tmp_path):
    pipe, paths = setup
    method = CLoRA(groups=[["red"], ["blue"]], extra_rounds=0)
    method.prepare(AdapterSet.of([("a", 1.0), ("b", 1.0)]), 4)
    method.bind(pipe, [PROMPT, PROMPT, PROMPT])
    assert method.indices[0] == [(2, 0), (7, 1)]


@pytest.mark.parametrize("groups, message", [
    ([["red"]], "1 concept groups for 2 content adapters"),
    ([["red"], ["blue"], ["white"]], "3 concept groups for 2 content adapters"),
    ([["red"], []], "one non-empty group"),
    ([["red"], ["purple", "blue"]], "concept words not in the prompt: 'purple'"),
])
def test_given_groups_that_would_leave_an_adapter_unused_are_refused(setup, groups, message):
    pipe, _ = setup
    method = CLoRA(groups=groups)
    method.prepare(AdapterSet.of([("a", 1.0), ("b", 1.0)]), 4)
    with pytest.raises(ConfigError, match=message):
        method.bind(pipe, [PROMPT] * 3)


@pytest.mark.parametrize("uncovered", ["base", "adapters"])
def test_each_mask_comes_from_its_own_concept_and_fusion_fills_the_rest(setup, uncovered):
    """Adapter k's mask reads only group k's tokens in its own prompt; what no mask covers goes to the base
    prediction, or with ``uncovered="adapters"`` to the adapters' mean."""
    pipe, _ = setup
    method = CLoRA(groups=[["red"], ["blue"]], mask_threshold=0.5, uncovered=uncovered)
    method.prepare(AdapterSet.of([("a", 1.0), ("b", 1.0)]), 4)
    method.bind(pipe, [PROMPT] * 3)
    maps = torch.full((1, 256, 77), 0.01)
    grid = maps[0].view(16, 16, 77)
    grid[:, :6, 2] = 1.0  # "red": the left columns
    grid[:, 10:, 7] = 1.0  # "blue": the right columns
    method.observe(0, {key: maps for key in ("__clora_base__", "a", "b")})
    left, right = torch.zeros(16, 16), torch.zeros(16, 16)
    left[:, :6], right[:, 10:] = 1, 1
    assert torch.equal(method.masks["a"][0], left) and torch.equal(method.masks["b"][0], right)
    assert torch.equal(method.masks["__clora_base__"][0], (1 - left - right) * (uncovered == "base"))
    predictions = {key: Prediction((torch.full((1, 4, 16, 16), value),) * 2)
                   for key, value in (("__clora_base__", 0.0), ("a", 1.0), ("b", 2.0))}
    fused = method.fuse(0, predictions).cond[0, 0]
    assert (fused[:, :6] == 1).all() and (fused[:, 10:] == 2).all()
    assert (fused[:, 6:10] == (0.0 if uncovered == "base" else 1.5)).all()


def test_unknown_uncovered_choice_is_refused():
    with pytest.raises(ConfigError, match="uncovered"):
        CLoRA(uncovered="nowhere")


def test_clora_on_an_image_smaller_than_its_maps_captures_at_the_latent_size(setup):
    pipe, paths = setup
    output = pipe(PROMPT, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
                  adapters=[(paths[0], 1.0), (paths[1], 1.0)], method="clora",
                  method_options={"groups": [["red"], ["blue"]]}, output_type="np")
    assert output.images.shape == (1, 32, 32, 3) and output.masks
    assert all(mask.shape[-1] == 32 // pipe.vae_scale_factor for mask in output.masks.values())



def test_a_style_adapter_is_active_in_every_pass_and_never_contrasted(setup):
    from pipelines.methods.base import Route
    from pipelines.methods.clora import BASE_KEY

    pipe, _ = setup
    method = CLoRA(groups=[["sks"]], roles=["content", "style"])
    method.prepare(AdapterSet.of([("c", 1.0), ("s", 0.8)]), 4)
    method.bind(pipe, ["a red solid sks on a white background"] * 3)
    assert method.plan(0) == [Route(BASE_KEY, merged={"s": 0.8}, prompt=0),
                              Route("c", merged={"c": 1.0, "s": 0.8}, prompt=1)]
    assert [label for prompt in method.indices for _, label in prompt] == [0, 0, 0]  # only the content concept
    with pytest.raises(ConfigError, match="adapter roles"):
        CLoRA(roles=["content", "texture"])


def test_the_role_comes_from_the_adapters_kind(setup, tmp_path):
    pipe, _ = setup
    base = pipe.studio_base()
    content, style = unet_only_adapter(base, 21), unet_only_adapter(base, 22)
    content.metadata["studio.trigger_words"], style.metadata["studio.trigger_words"] = '["sks"]', '["xyz"]'
    style.metadata["studio.kind"] = "style"
    paths = [save_adapter(content, tmp_path / "c.safetensors"), save_adapter(style, tmp_path / "s.safetensors")]
    output = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  adapters=[(p, 1.0) for p in paths], method="clora", output_type="np")
    names = [name for name, _ in output.recipe["adapters"]]
    assert output.recipe["styles"] == [names[1]]
    assert set(output.masks) == {names[0], "__clora_base__"}


def test_the_latent_step_scales_with_the_latent_area():
    assert CLoRA().latent_step(torch.zeros(1, 4, 64, 64)) == 20.0  # the paper's η on SD's 64×64 latents
    assert CLoRA().latent_step(torch.zeros(1, 4, 16, 16)) == 1.25
    assert CLoRA(step_size=5.0).latent_step(torch.zeros(1, 4, 16, 16)) == 5.0
