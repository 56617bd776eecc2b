"""The SD composition pipeline keeps StableDiffusionPipeline's contract: without ``adapters=`` it is stock.

In the way diffusers' pipeline tests work: tiny components built in code under a fixed seed, the same inputs and
seed, and diffusers' own pipeline as the reference. Stock and ours share the components, so a LoRA loaded the
diffusers way is on both.
"""

import inspect

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel

from pipelines import CompositionPipeline
from studio.errors import ConfigError
from studio.text import build_clip_tokenizer

TOLERANCE = 1e-4
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def sd_components(time_cond_proj_dim: int | None = None) -> dict:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2, time_cond_proj_dim=time_cond_proj_dim)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=2)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    if time_cond_proj_dim is not None:
        scheduler = LCMScheduler.from_config(scheduler.config)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_clip_tokenizer(),
            "scheduler": scheduler, "safety_checker": None, "feature_extractor": None, "image_encoder": None}


def pipelines(components: dict) -> tuple[StableDiffusionPipeline, CompositionPipeline]:
    stock = StableDiffusionPipeline(**components, requires_safety_checker=False)
    ours = CompositionPipeline(**components, requires_safety_checker=False)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    return stock, ours


@pytest.fixture
def pair():
    return pipelines(sd_components())


def inputs(**overrides) -> dict:
    return {"prompt": "a red square", "num_inference_steps": 3, "guidance_scale": 6.0, "output_type": "np",
            "generator": torch.Generator().manual_seed(0), **overrides}


def difference(stock, ours, **overrides) -> float:
    expected = stock(**inputs(**overrides)).images
    got = ours(**inputs(**overrides)).images
    assert got.shape == expected.shape
    return float(np.abs(np.asarray(got) - np.asarray(expected)).max())


def add_lora(model: torch.nn.Module, name: str, seed: int) -> None:
    """A random (not zero-initialised) LoRA through diffusers' ``add_adapter``, so it changes the image."""
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False), name)


def lora_file(components: dict, folder, seed: int):
    """A diffusers-format LoRA file written by ``save_lora_weights``, as diffusers' training scripts write it."""
    unet = components["unet"]
    add_lora(unet, "scratch", seed)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="scratch"))
    unet.delete_adapters("scratch")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=f"lora{seed}.safetensors")
    return folder / f"lora{seed}.safetensors"


@pytest.mark.parametrize("overrides", [
    {}, {"negative_prompt": "blurry"}, {"prompt": ["a red square", "a blue circle"], "num_images_per_prompt": 2},
    {"eta": 0.7}, {"guidance_scale": 1.0}, {"guidance_rescale": 0.7}, {"output_type": "latent"},
    {"height": 48, "width": 32},
], ids=["plain", "negative", "batch", "eta", "no_cfg", "rescale", "latent", "not_square"])
def test_plain_calls_equal_stock(pair, overrides):
    assert difference(*pair, **overrides) <= TOLERANCE


def test_a_lora_loaded_by_diffusers_is_applied_as_stock(pair, tmp_path):
    stock, ours = pair
    plain = stock(**inputs()).images  # ours runs first with the LoRA loaded: nothing may be remembered from before
    stock.load_lora_weights(lora_file(stock.components, tmp_path, seed=1), adapter_name="style")
    assert difference(stock, ours) <= TOLERANCE
    assert np.abs(ours(**inputs()).images - plain).max() > 1e-3  # the LoRA changes the image


def test_set_adapters_weights_and_lora_scale_as_stock(pair, tmp_path):
    stock, ours = pair
    for seed, name in ((1, "toy"), (2, "style")):
        stock.load_lora_weights(lora_file(stock.components, tmp_path, seed), adapter_name=name)
    stock.set_adapters(["toy", "style"], adapter_weights=[0.8, 0.5])
    both = ours(**inputs()).images
    assert difference(stock, ours) <= TOLERANCE
    assert difference(stock, ours, cross_attention_kwargs={"scale": 0.4}) <= TOLERANCE
    assert np.abs(ours(**inputs(cross_attention_kwargs={"scale": 0.4})).images - both).max() > 1e-3
    stock.set_adapters(["style"])
    assert difference(stock, ours) <= TOLERANCE
    assert np.abs(ours(**inputs()).images - both).max() > 1e-3


def test_fused_lora_as_stock(pair):
    stock, ours = pair
    add_lora(stock.unet, "style", seed=3)
    unfused = ours(**inputs()).images
    stock.fuse_lora()
    assert difference(stock, ours) <= TOLERANCE
    assert np.abs(ours(**inputs()).images - unfused).max() <= TOLERANCE  # fusing keeps the image


def test_lora_layers_are_found_afresh_after_unload_and_reload(pair, tmp_path):
    stock, ours = pair
    plain = stock(**inputs()).images
    first, second = lora_file(stock.components, tmp_path, 1), lora_file(stock.components, tmp_path, 2)
    stock.load_lora_weights(first, adapter_name="one")
    assert difference(stock, ours) <= TOLERANCE
    stock.unload_lora_weights()
    assert np.abs(ours(**inputs()).images - plain).max() <= TOLERANCE
    stock.load_lora_weights(second, adapter_name="two")
    assert difference(stock, ours) <= TOLERANCE
    assert np.abs(ours(**inputs()).images - plain).max() > 1e-3


def test_callback_sees_and_edits_what_stock_does(pair):
    seen = {"stock": [], "ours": []}

    def callback(key):
        def edit(pipe, step, timestep, tensors):
            seen[key].append((step, int(timestep), {k: tuple(v.shape) for k, v in tensors.items()}))
            return {"latents": tensors["latents"] * 0.9} if step == 1 else {}
        return edit

    stock, ours = pair
    names = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    expected = stock(**inputs(callback_on_step_end=callback("stock"), callback_on_step_end_tensor_inputs=names))
    got = ours(**inputs(callback_on_step_end=callback("ours"), callback_on_step_end_tensor_inputs=names))
    assert seen["ours"] == seen["stock"] and len(seen["ours"]) == 3
    assert np.abs(got.images - expected.images).max() <= TOLERANCE
    assert np.abs(got.images - ours(**inputs()).images).max() > 1e-3  # the edit took effect
    with pytest.raises(ConfigError, match="callback_on_step_end_tensor_inputs"):
        ours(**inputs(callback_on_step_end=callback("ours"), callback_on_step_end_tensor_inputs=["noise"]))


def test_callback_may_change_guidance_and_embeddings_as_stock(pair):
    def change(pipe, step, timestep, tensors):
        pipe._guidance_scale = 2.0
        return {"prompt_embeds": tensors["prompt_embeds"] * 0.5}

    assert difference(*pair, callback_on_step_end=change, callback_on_step_end_tensor_inputs=["prompt_embeds"]) \
        <= TOLERANCE


def test_diffusers_cfg_cutoff_callback_as_stock(pair):
    from diffusers.callbacks import SDCFGCutoffCallback

    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
    assert difference(*pair, callback_on_step_end=cutoff) <= TOLERANCE
    assert not pair[1].do_classifier_free_guidance
    assert np.abs(pair[1](**inputs(callback_on_step_end=cutoff)).images - pair[1](**inputs()).images).max() > 1e-5


def test_interrupt_and_properties_as_stock(pair):
    def stop(pipe, step, timestep, tensors):
        if step == 1:
            pipe._interrupt = True
        return {}

    stock, ours = pair
    assert difference(stock, ours, callback_on_step_end=stop, output_type="latent") <= TOLERANCE
    for pipe in pair:
        assert pipe.interrupt and pipe.num_timesteps == 3 and pipe.guidance_scale == 6.0
        assert pipe.do_classifier_free_guidance


def test_legacy_step_callback_as_stock(pair):
    calls = {"stock": [], "ours": []}
    for key, pipe in zip(calls, pair):
        pipe(**inputs(callback=lambda step, t, latents, key=key: calls[key].append((step, int(t))),
                      callback_steps=2))
    assert calls["ours"] == calls["stock"] and calls["ours"]


@pytest.mark.parametrize("schedule", [{"timesteps": [999, 700, 300, 50]}, {"sigmas": [14.0, 6.0, 2.0, 0.5]}])
def test_custom_timesteps_and_sigmas_as_stock(schedule):
    components = sd_components()
    components["scheduler"] = EulerDiscreteScheduler.from_config(components["scheduler"].config)
    stock, ours = pipelines(components)
    assert difference(stock, ours, num_inference_steps=None, **schedule) <= TOLERANCE
    assert ours.num_timesteps == stock.num_timesteps >= 3


def test_custom_timesteps_on_a_scheduler_without_them_are_refused(pair):
    with pytest.raises(ConfigError, match="custom timestep"):
        pair[1](**inputs(timesteps=[999, 500]))


def test_lcm_unet_gets_its_guidance_embedding_and_no_cfg_as_stock():
    stock, ours = pipelines(sd_components(time_cond_proj_dim=8))
    assert difference(stock, ours) <= TOLERANCE
    assert not ours.do_classifier_free_guidance
    assert np.abs(ours(**inputs()).images - ours(**inputs(guidance_scale=2.0)).images).max() > 1e-4


def test_prompt_embeds_without_a_text_encoder_as_stock(pair):
    stock, _ = pair
    positive, negative = stock.encode_prompt("a red square", "cpu", 1, True, "blurry")
    components = {**stock.components, "text_encoder": None, "tokenizer": None}
    stock_bare, ours_bare = pipelines(components)
    embeds = {"prompt": None, "prompt_embeds": positive, "negative_prompt_embeds": negative}
    assert difference(stock_bare, ours_bare, **embeds) <= TOLERANCE
    assert np.abs(ours_bare(**inputs(**embeds)).images - stock(**inputs(negative_prompt="blurry")).images
                  ).max() <= TOLERANCE


def test_sdxl_arguments_are_refused_with_a_reason(pair):
    with pytest.raises(ConfigError, match="SDXL arguments"):
        pair[1](**inputs(prompt_2="a blue circle"))


def stock_parameters(cls) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(cls.__call__).parameters.items()
            if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}


@pytest.mark.parametrize("stock_class", ["StableDiffusionPipeline", "StableDiffusionXLPipeline"])
def test_every_stock_argument_is_accepted_with_its_default(stock_class):
    import diffusers

    from pipelines import CompositionXLPipeline

    ours_class = CompositionXLPipeline if "XL" in stock_class else CompositionPipeline
    ours = stock_parameters(ours_class)
    documented = inspect.getdoc(ours_class.__call__)
    for name, parameter in stock_parameters(getattr(diffusers, stock_class)).items():
        assert name in ours, f"{name} is not accepted"
        stock_default, our_default = parameter.default, ours[name].default
        if isinstance(stock_default, list):
            stock_default, our_default = tuple(stock_default), tuple(our_default)
        if our_default != stock_default:  # allowed only where the docstring says why
            assert f"``{name}=None`` is the pipeline's stock default" in documented
            assert getattr(ours_class, f"default_{name}") == stock_default


def ip_adapter_weights(unet: UNet2DConditionModel, image_dim: int) -> dict:
    """A random IP-Adapter in the original file layout (image projection to 4 tokens, and to_k_ip/to_v_ip for
    every cross-attention, numbered as diffusers' loader numbers them)."""
    generator = torch.Generator().manual_seed(5)
    width = unet.config.cross_attention_dim
    channels = unet.config.block_out_channels
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        level = int(name[len("up_blocks.")]) if name.startswith("up_blocks") else (
            int(name[len("down_blocks.")]) if name.startswith("down_blocks") else -1)
        hidden = channels[-1] if level < 0 else (
            list(reversed(channels))[level] if name.startswith("up_blocks") else channels[level])
        for part in ("to_k_ip", "to_v_ip"):
            layers[f"{key}.{part}.weight"] = torch.randn(hidden, width, generator=generator) * 0.3
        key += 2
    projection = {"proj.weight": torch.randn(4 * width, image_dim, generator=generator) * 0.3,
                  "proj.bias": torch.zeros(4 * width), "norm.weight": torch.ones(width),
                  "norm.bias": torch.zeros(width)}
    return {"image_proj": projection, "ip_adapter": layers}


def tiny_image_encoder() -> tuple:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=16, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        intermediate_size=37, patch_size=8))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return encoder, processor


def with_ip_adapter(components: dict) -> dict:
    encoder, processor = tiny_image_encoder()
    components["unet"]._load_ip_adapter_weights([ip_adapter_weights(components["unet"], 16)])
    return {**components, "image_encoder": encoder, "feature_extractor": processor}


@pytest.mark.parametrize("source", ["image", "embeds"])
def test_ip_adapter_with_a_tiny_image_encoder_as_stock(source):
    from PIL import Image

    stock, ours = pipelines(with_ip_adapter(sd_components()))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    if source == "image":
        given = {"ip_adapter_image": image}
    else:
        given = {"ip_adapter_image_embeds": stock.prepare_ip_adapter_image_embeds(image, None, "cpu", 1, True)}
    assert difference(stock, ours, **given) <= TOLERANCE
    other = Image.fromarray(255 - np.asarray(image))
    assert np.abs(ours(**inputs(**given)).images - ours(**inputs(ip_adapter_image=other)).images).max() > 1e-4


def test_ip_adapter_reaches_every_route_of_a_composition(tmp_path):
    from PIL import Image

    from studio.adapters.file import save_adapter
    from tests.adapters.test_files import make_adapter
    from tests.conftest import make_random_base

    base = make_random_base()
    pipe = base.pipe
    encoder, processor = tiny_image_encoder()
    pipe.unet._load_ip_adapter_weights([ip_adapter_weights(pipe.unet, 16)])
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    adapter = save_adapter(make_adapter(base, seed=1, scale=0.3), tmp_path / "a.safetensors")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    run = {"prompt": "a red solid sks", "num_inference_steps": 2, "output_type": "np", "adapters": [(adapter, 0.8)]}
    merged = pipe(**run, ip_adapter_image=image, generator=torch.Generator().manual_seed(0)).images
    routed = pipe(**run, ip_adapter_image=image, method="composite", generator=torch.Generator().manual_seed(0)).images
    other = pipe(**run, ip_adapter_image=Image.fromarray(255 - np.asarray(image)), method="composite",
                 generator=torch.Generator().manual_seed(0)).images
    assert np.abs(routed - merged).max() <= 1e-3  # one adapter routed = the same adapter merged
    assert np.abs(routed - other).max() > 1e-3  # the image prompt is used
    with pytest.raises(ConfigError, match="cross-attention maps"):
        pipe(**run, ip_adapter_image=image, method="clora")
    with pytest.raises(ConfigError, match="Perp-Neg is a guidance rule"):
        pipe(**run, guidance_scale=1.0, negative_prompt="blue", perp_neg=True)


def test_safety_checker_runs_as_stock():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    _, processor = tiny_image_encoder()
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8}, projection_dim=16))
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # below any cosine: every image is flagged and blacked out
    components = {**sd_components(), "safety_checker": checker, "feature_extractor": processor}
    stock = StableDiffusionPipeline(**components)
    ours = CompositionPipeline(**components)
    expected, got = stock(**inputs()), ours(**inputs())
    assert got.nsfw_content_detected == expected.nsfw_content_detected == [True]
    assert np.abs(got.images - expected.images).max() <= TOLERANCE and not got.images.any()
