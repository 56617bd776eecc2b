"""Architecture of the embedded model: Stable Diffusion's components, sized for a 2-core CPU.

Sizes were chosen by measurement on the 2-core build machine (one thread, batch 32, 16×16 latents): attention
with a head width of 32 (diffusers' ``attention_head_dim`` is the number of heads) and cross-attention at all
three resolutions; the text encoder is CLIP's with the full 49,408-id BPE vocabulary, so its token table is
most of its weight and the width is kept at 96 to stay under the 30 MB budget in fp16.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from studio.text import CLIP_VOCAB_SIZE

LATENT_SIZE = 16
TEXT_WIDTH = 96
MAX_TOKENS = 77

#: The noise schedule shared by training and sampling: SD's scaled-linear betas, rescaled to zero terminal SNR
#: (Lin et al. 2023), with v-prediction, so that the model can make a plain white or black background.
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "clip_sample": False,
}


def make_vae() -> AutoencoderKL:
    """A 4×-downsampling AutoencoderKL with 4 latent channels (SD's latent format at a quarter of its stride)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )


def make_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=3,
            num_attention_heads=3,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=TEXT_WIDTH,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def make_unet() -> UNet2DConditionModel:
    """SD's UNet2DConditionModel with three levels (16, 8, 4) and cross-attention at every level."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 96, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=(2, 3, 4),
        norm_num_groups=16,
    )


def make_training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


def make_sampling_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE, set_alpha_to_one=False, steps_offset=1)
