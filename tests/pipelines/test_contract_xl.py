"""The SDXL composition pipeline keeps StableDiffusionXLPipeline's contract: without ``adapters=`` it is stock.

Tiny SDXL components (two text encoders, added time ids) built in code under a fixed seed; stock and ours
share them, so a LoRA put on the UNet the diffusers way is on both.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pipelines import CompositionXLPipeline
from studio.errors import ConfigError
from studio.text import build_clip_tokenizer
from tests.pipelines.test_contract import TOLERANCE, add_lora, ip_adapter_weights, tiny_image_encoder


def sdxl_components(time_cond_proj_dim: int | None = None) -> dict:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=2, time_cond_proj_dim=time_cond_proj_dim)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=2, sample_size=32)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    if time_cond_proj_dim is not None:
        scheduler = LCMScheduler.from_config(scheduler.config)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": build_clip_tokenizer(), "tokenizer_2": build_clip_tokenizer(pad_token="!"),
            "scheduler": scheduler, "image_encoder": None, "feature_extractor": None}


def pipelines(components: dict) -> tuple[StableDiffusionXLPipeline, CompositionXLPipeline]:
    stock, ours = StableDiffusionXLPipeline(**components), CompositionXLPipeline(**components)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    return stock, ours


@pytest.fixture
def pair():
    return pipelines(sdxl_components())


def inputs(**overrides) -> dict:
    return {"prompt": "a red square", "num_inference_steps": 3, "guidance_scale": 5.0, "output_type": "np",
            "generator": torch.Generator().manual_seed(0), **overrides}


def difference(stock, ours, **overrides) -> float:
    expected, got = stock(**inputs(**overrides)).images, ours(**inputs(**overrides)).images
    assert got.shape == expected.shape
    return float(np.abs(np.asarray(got) - np.asarray(expected)).max())


@pytest.mark.parametrize("overrides", [
    {}, {"prompt_2": "a blue circle", "negative_prompt": "blurry", "negative_prompt_2": "dark"},
    {"negative_prompt": ""},
    {"original_size": (64, 48), "crops_coords_top_left": (4, 2), "target_size": (32, 32),
     "negative_original_size": (16, 16), "negative_crops_coords_top_left": (1, 1), "negative_target_size": (24, 24)},
    {"denoising_end": 0.6}, {"guidance_scale": 1.0}, {"prompt": ["a red square", "a blue circle"]},
    {"height": 48, "width": 32}, {"guidance_rescale": 0.7},
], ids=["plain", "second_prompts", "empty_negative", "size_conditions", "denoising_end", "no_cfg", "batch",
        "not_square", "rescale"])
def test_plain_calls_equal_stock(pair, overrides):
    assert difference(*pair, **overrides) <= TOLERANCE


def test_diffusers_lora_scale_and_fused_lora_as_stock(pair):
    stock, ours = pair
    plain = stock(**inputs()).images
    add_lora(stock.unet, "style", seed=1)
    assert difference(stock, ours) <= TOLERANCE
    assert difference(stock, ours, cross_attention_kwargs={"scale": 0.3}) <= TOLERANCE
    assert np.abs(ours(**inputs()).images - plain).max() > 1e-3
    stock.fuse_lora()
    assert difference(stock, ours) <= TOLERANCE


def test_callback_with_added_conditions_and_interrupt_as_stock(pair):
    seen = {"stock": [], "ours": []}

    def callback(key):
        def edit(pipe, step, timestep, tensors):
            seen[key].append({k: tuple(v.shape) for k, v in tensors.items()})
            if step == 2:
                pipe._interrupt = True
            return {"latents": tensors["latents"] + 0.1, "add_time_ids": tensors["add_time_ids"] * 1.5}
        return edit

    stock, ours = pair
    names = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    expected = stock(**inputs(num_inference_steps=4, callback_on_step_end=callback("stock"),
                              callback_on_step_end_tensor_inputs=names)).images
    got = ours(**inputs(num_inference_steps=4, callback_on_step_end=callback("ours"),
                        callback_on_step_end_tensor_inputs=names)).images
    assert seen["ours"] == seen["stock"] and len(seen["ours"]) == 3
    assert np.abs(got - expected).max() <= TOLERANCE
    assert ours.interrupt and ours.num_timesteps == stock.num_timesteps == 4


def test_diffusers_cfg_cutoff_callback_as_stock(pair):
    from diffusers.callbacks import SDXLCFGCutoffCallback

    assert difference(*pair, callback_on_step_end=SDXLCFGCutoffCallback(
        cutoff_step_ratio=None, cutoff_step_index=1)) <= TOLERANCE


def test_custom_timesteps_as_stock(pair):
    assert difference(*pair, num_inference_steps=None, timesteps=[999, 600, 200]) <= TOLERANCE


def test_lcm_unet_as_stock():
    stock, ours = pipelines(sdxl_components(time_cond_proj_dim=8))
    assert difference(stock, ours) <= TOLERANCE
    assert not ours.do_classifier_free_guidance


def test_prompt_embeds_with_pooled_embeddings_as_stock(pair):
    stock, ours = pair
    embeds = stock.encode_prompt("a red square", device="cpu", negative_prompt="blurry")
    given = dict(zip(["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                      "negative_pooled_prompt_embeds"], embeds))
    assert difference(stock, ours, prompt=None, **given) <= TOLERANCE
    with pytest.raises(ConfigError, match="pooled_prompt_embeds"):
        ours(**inputs(prompt=None, prompt_embeds=given["prompt_embeds"]))


def test_ip_adapter_as_stock():
    from PIL import Image

    components = sdxl_components()
    encoder, processor = tiny_image_encoder()
    components["unet"]._load_ip_adapter_weights([ip_adapter_weights(components["unet"], 16)])
    stock, ours = pipelines({**components, "image_encoder": encoder, "feature_extractor": processor})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert difference(stock, ours, ip_adapter_image=image) <= TOLERANCE


def test_merge_over_a_diffusers_lora_equals_stock_with_both(tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from tests.conftest import make_random_sdxl_base

    ours = make_random_sdxl_base().pipe
    stock = StableDiffusionXLPipeline(**ours.components)
    stock.set_progress_bar_config(disable=True)
    files = []
    for seed in (1, 2):  # diffusers-format files, as save_lora_weights writes them; the studio reads them too
        add_lora(ours.unet, "scratch", seed)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(ours.unet, adapter_name="scratch"))
        ours.unet.delete_adapters("scratch")
        StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers,
                                                    weight_name=f"{seed}.safetensors")
        files.append(tmp_path / f"{seed}.safetensors")
    stock.load_lora_weights(files[0], adapter_name="native")
    stock.load_lora_weights(files[1], adapter_name="other")
    stock.set_adapters(["native", "other"], [1.0, 0.7])
    both = stock(**inputs()).images
    stock.set_adapters(["native"])
    alone = stock(**inputs()).images
    assert np.abs(ours(**inputs(adapters=[(files[1], 0.7)])).images - both).max() <= TOLERANCE
    assert np.abs(alone - both).max() > 1e-3
    assert np.abs(ours(**inputs()).images - alone).max() <= TOLERANCE
