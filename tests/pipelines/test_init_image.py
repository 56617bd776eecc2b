"""img2img, inpainting and hires fix in the composition engine, for every composition method."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import CompositionPipeline
from pipelines.hires import hires_fix
from studio.adapters.file import save_adapter
from studio.errors import ConfigError
from tests.adapters.test_files import make_adapter

PROMPT = "a red solid sks on a white background"
METHODS = {"merge": {}, "switch": {}, "composite": {}, "cmlora": {}, "clora": {"groups": [["red"], ["sks"]]}}
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipelines.loading import load_base

    folder = tmp_path_factory.mktemp("adapters")
    base = load_base(device="cpu")
    paths = [save_adapter(make_adapter(base, seed=i, scale=0.1), folder / f"a{i}.safetensors") for i in range(2)]
    pipe = CompositionPipeline.from_base(base)
    init = Image.new("RGB", (64, 64), (20, 30, 120))  # unlike anything the prompt asks for
    init.paste((230, 210, 40), (36, 12, 58, 40))
    return pipe, [(p, 0.8) for p in paths], init


def compose(pipe, adapters, method, **kwargs):
    """The pipeline's whole output (images, stats, masks)."""
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                output_type="np", adapters=adapters, method=method, method_options=METHODS[method], **kwargs)


def run(pipe, adapters, method, **kwargs):
    return compose(pipe, adapters, method, **kwargs).images


def roundtrip(pipe, image):
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image)
        latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
        return pipe.image_processor.postprocess(pipe.decode_latents_to_pixels(latents), output_type="np")


@pytest.mark.parametrize("method", list(METHODS))
def test_strength_zero_is_the_vae_roundtrip_and_one_is_txt2img(setup, method):
    pipe, adapters, init = setup
    assert np.abs(run(pipe, adapters, method, image=init, strength=0.0) - roundtrip(pipe, init)).max() < 1e-5
    full = compose(pipe, adapters, method)
    assert np.array_equal(run(pipe, adapters, method, image=init, strength=1.0), full.images)
    half = compose(pipe, adapters, method, image=init, strength=0.5)
    assert half.stats.samples < full.stats.samples  # only the last half of the steps ran
    half, full = half.images, full.images
    assert np.abs(half - full).mean() > 1e-3 and np.abs(half - roundtrip(pipe, init)).mean() > 1e-3


@pytest.mark.parametrize("method", list(METHODS))
def test_inpainting_keeps_the_image_outside_the_mask(setup, method):
    pipe, adapters, init = setup
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255  # repaint the left half
    out = run(pipe, adapters, method, image=init, mask_image=Image.fromarray(mask), strength=1.0)
    reference, free = np.asarray(init, np.float32)[None] / 255, run(pipe, adapters, method)
    assert np.abs(out - reference)[:, :, 32:].max() < 1e-5  # A1111's overlay: the original pixels
    assert np.abs(free - reference)[:, :, 32:].mean() > 0.05
    assert np.abs(out - reference)[:, :, :32].mean() > 0.05  # and the masked side is repainted


@pytest.mark.parametrize("method", list(METHODS))
def test_hires_fix_has_the_requested_size(setup, method):
    pipe, adapters, _ = setup
    call = dict(prompt=PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                adapters=adapters, method=method, method_options=METHODS[method])
    for upscaler in ("Latent", "Lanczos"):
        image = hires_fix(pipe, call, scale=1.5, steps=STEPS, strength=0.5, upscaler=upscaler).images[0]
        assert image.size == (96, 96)


def test_perp_neg_and_decor_in_img2img_and_inpainting(setup):
    pipe, adapters, init = setup
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    for extra in ({}, {"mask_image": mask}):
        plain = run(pipe, adapters, "composite", image=init, strength=0.75, **extra)
        guided = run(pipe, adapters, "composite", image=init, strength=0.75, perp_neg=[("a blue square", 1.0)],
                     decor_remove=["red"], **extra)
        assert np.abs(plain - guided).mean() > 1e-3


def test_cmlora_starts_its_caches_at_the_first_step_run(setup):
    pipe, adapters, init = setup
    stats = compose(pipe, adapters, "cmlora", image=init, strength=0.5).stats
    assert stats.full_passes >= 1 and stats.shallow_passes >= 1


def test_bad_init_inputs_are_clear_errors(setup, caplog):
    pipe, adapters, init = setup
    for strength in (-0.1, 1.5, "half"):
        with pytest.raises(ConfigError, match="strength"):
            run(pipe, adapters, "merge", image=init, strength=strength)
    with pytest.raises(ConfigError, match="mask_image needs"):
        run(pipe, adapters, "merge", mask_image=init)
    big = init.resize((96, 80))
    assert run(pipe, adapters, "merge", image=big, strength=0.5, height=64, width=64).shape == (1, 64, 64, 3)
    assert "resized to 64x64" in caplog.text
    odd_mask = Image.new("L", (40, 40), 255)
    assert run(pipe, adapters, "merge", image=init, mask_image=odd_mask, strength=0.5).shape == (1, 64, 64, 3)
    with pytest.raises(ConfigError, match="hires scale"):
        hires_fix(pipe, {"prompt": PROMPT, "num_inference_steps": 2}, scale=1.0)


def test_inpainting_unet_takes_its_own_path_and_refuses_img2img():
    from diffusers import UNet2DConditionModel

    from tests.conftest import make_random_base

    base = make_random_base()
    config = dict(base.pipe.unet.config)
    config["in_channels"] = 9
    unet = UNet2DConditionModel.from_config(config)
    pipe = CompositionPipeline(**{**base.pipe.components, "unet": unet}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    with pytest.raises(ConfigError, match="9-channel inpainting UNet"):
        pipe(PROMPT, image=image, num_inference_steps=2)
    with pytest.raises(ConfigError, match="9-channel inpainting UNet"):
        pipe(PROMPT, num_inference_steps=2)
    mask = Image.new("L", (64, 64), 255)
    out = pipe(PROMPT, image=image, mask_image=mask, strength=1.0, num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 64, 64, 3)


def test_sdxl_img2img_inpainting_and_long_prompts():
    from tests.conftest import make_random_sdxl_base

    pipe = make_random_sdxl_base().pipe
    image = Image.new("RGB", (32, 32), (20, 30, 120))
    prompt = ", ".join(["a white background"] * 30) + ", a red star"  # two 77-token chunks

    def call(**kwargs):
        return pipe(prompt, negative_prompt="blurry", num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kwargs).images

    assert np.array_equal(call(image=image, strength=1.0), call())
    assert np.abs(call(image=image, strength=0.0) - roundtrip(pipe, image)).max() < 1e-4
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    out = call(image=image, mask_image=mask, strength=0.8)
    assert np.abs(out - np.asarray(image, np.float32)[None] / 255)[:, :, 16:].max() < 1e-5


def test_clora_finds_its_concept_in_a_later_chunk(setup):
    pipe, adapters, _ = setup
    prompt = ", ".join(["a white background"] * 19) + ", a red solid sks and a blue xyz"
    output = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), adapters=adapters,
                  method="clora", method_options={"groups": [["red"], ["blue"]]}, output_type="np")
    masks = [mask for name, mask in output.masks.items() if name != "__clora_base__"]
    assert len(masks) == 2 and all(mask.sum() > 0 for mask in masks)



def test_cmlora_img2img_at_half_strength_takes_about_half_the_unet_work(setup):
    """The engine tells CMLoRA the whole schedule's length: a strength-0.5 run reuses deep features as long as the
    text-to-image steps it replaces do (with the bound taken on the 10 steps run, it took 0.58 of the work)."""
    pipe, adapters, init = setup
    call = dict(num_inference_steps=20, output_type="latent", adapters=adapters, method="cmlora")
    full = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).stats
    half = pipe(PROMPT, generator=torch.Generator().manual_seed(0), image=init, strength=0.5, **call).stats
    assert half.samples * 2 == full.samples  # every adapter at each of the 10 steps run
    assert half.shallow_passes > 0 and half.block_evaluations <= 0.53 * full.block_evaluations


def test_mask_blur_fades_the_seam_and_zero_is_the_plain_mask(setup):
    pipe, adapters, init = setup
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255  # repaint the left half
    mask = Image.fromarray(mask)
    reference = np.asarray(init, np.float32)[None] / 255
    plain = run(pipe, adapters, "merge", image=init, mask_image=mask, strength=1.0)
    assert np.array_equal(run(pipe, adapters, "merge", image=init, mask_image=mask, strength=1.0, mask_blur=0), plain)
    soft = run(pipe, adapters, "merge", image=init, mask_image=mask, strength=1.0, mask_blur=4)
    border = np.abs(soft - reference)[:, :, 32:40].mean(axis=(0, 1, 3))  # columns just outside the mask
    assert np.abs(plain - reference)[:, :, 32:40].max() < 1e-5
    assert border[0] > 0.02 and np.all(np.diff(border) <= 1e-6)  # the new image fades out away from the seam
    assert np.abs(soft - reference)[:, :, 48:].max() < 1e-5  # far from the seam: the original pixels
    with pytest.raises(ConfigError, match="mask blur"):
        run(pipe, adapters, "merge", image=init, mask_image=mask, mask_blur=-1)
