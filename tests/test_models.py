import json
import socket

import pytest
import torch

from pipelines.loading import load_base
from studio.errors import ConfigError, ModelLoadError
from studio.models import detect_family, set_scheduler


def test_embedded_model_loads_offline_without_touching_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    base = load_base(device="cpu")
    assert base.family == "tiny"
    assert base.pipe.unet.config.cross_attention_dim == base.pipe.text_encoder.config.hidden_size
    assert base.dtype == torch.float32 and base.default_size == 64
    assert len(base.fingerprint) == 16


def test_shipped_model_runs_in_plain_diffusers_without_a_dtype():
    """Its weights are stored in fp16; a plain from_pretrained must still give one dtype throughout."""
    from diffusers import StableDiffusionPipeline

    from studio.models import EMBEDDED_MODEL

    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, safety_checker=None)
    assert {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {torch.float32}
    image = pipe("a red solid star on a white background", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0.01


def test_fingerprint_is_stable_and_does_not_depend_on_where_the_model_lies(tiny_base, tmp_path):
    import shutil

    from studio.models import EMBEDDED_MODEL

    assert load_base(device="cpu").fingerprint == tiny_base.fingerprint
    shutil.copytree(EMBEDDED_MODEL, tmp_path / "copy")
    assert load_base(str(tmp_path / "copy"), device="cpu").fingerprint == tiny_base.fingerprint


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no model at"):
        load_base(tmp_path / "nothing-here", device="cpu")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_base(tmp_path, device="cpu")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"cond_stage_model.transformer.x": torch.zeros(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="not a readable safetensors checkpoint"):
        load_base(path, device="cpu")


def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="pickles"):
        load_base(path, device="cpu")


def test_safetensors_that_is_not_stable_diffusion(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(4)}, str(path))
    with pytest.raises(ModelLoadError, match="does not look like a Stable Diffusion checkpoint"):
        load_base(path, device="cpu")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_base("someone/some-model", device="cpu")


def test_unknown_scheduler_is_a_clear_error(tiny_base):
    with pytest.raises(ConfigError, match="unknown sampler .fastest."):
        set_scheduler(tiny_base.pipe, "fastest")


def test_broken_model_index_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_base(tmp_path, device="cpu")


def test_family_detection():
    assert detect_family({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": []}) == "sdxl"
    assert detect_family({}, {"cross_attention_dim": 1024}) == "sd2"
    assert detect_family({}, {"cross_attention_dim": 768}) == "sd1"
    assert detect_family({}, {"cross_attention_dim": 96}, domain={"name": "x"}) == "tiny"


def test_shipped_single_file_configs_describe_each_family():
    from studio.models import SINGLE_FILE_CONFIGS

    widths = {}
    for family in ("sd1", "sd2", "sdxl"):
        index = json.loads((SINGLE_FILE_CONFIGS / family / "model_index.json").read_text())
        unet = json.loads((SINGLE_FILE_CONFIGS / family / "unet" / "config.json").read_text())
        assert detect_family(index, unet) == family
        widths[family] = unet["cross_attention_dim"]
    assert widths == {"sd1": 768, "sd2": 1024, "sdxl": 2048}


def test_single_file_checkpoint_in_ldm_layout_loads_as_the_folder_it_came_from(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    from frontends.generate import GenerationRequest, generate
    from pipelines import CompositionPipeline
    from tests.conftest import make_random_base
    from tests.ldm_layout import sd_to_ldm

    base = make_random_base()
    folder = tmp_path / "model"
    base.pipe.save_pretrained(folder)
    checkpoint = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd_to_ldm(base.pipe).items()}, str(checkpoint))
    from_file = load_base(checkpoint, device="cpu", config=folder)
    from_folder = load_base(folder, device="cpu")
    assert isinstance(from_file.pipe, CompositionPipeline) and from_file.family == "sd1"
    request = GenerationRequest(prompt="a (red:1.2) star", seed=2, steps=3, adapters=[], method="merge")
    pixels = [np.asarray(generate(b, request)[0].image) for b in (from_file, from_folder)]
    assert np.array_equal(*pixels) and pixels[0].std() > 0


def test_vae_override_from_a_single_file_or_a_folder(tmp_path):
    from safetensors.torch import save_file

    from frontends.build.components import make_vae
    from tests.conftest import make_random_base
    from tests.ldm_layout import vae_to_ldm

    base = make_random_base()
    folder = tmp_path / "model"
    base.pipe.save_pretrained(folder)
    torch.manual_seed(9)
    other = make_vae()
    ldm = {k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_to_ldm(other).items()}
    save_file(ldm, str(tmp_path / "vae.safetensors"))  # standalone VAE files carry no prefix
    other.save_pretrained(tmp_path / "vae-folder")
    for spec in (tmp_path / "vae.safetensors", tmp_path / "vae-folder"):
        loaded = load_base(folder, device="cpu", vae=spec).pipe.vae.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in other.state_dict().items())
    with pytest.raises(ModelLoadError, match="no VAE at"):
        load_base(folder, device="cpu", vae=tmp_path / "missing.safetensors")
    (tmp_path / "vae.pt").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="only .safetensors VAEs"):
        load_base(folder, device="cpu", vae=tmp_path / "vae.pt")


def test_prediction_type_and_zero_snr_overrides(tmp_path):
    from tests.conftest import make_random_base

    base = make_random_base()
    folder = tmp_path / "model"
    base.pipe.save_pretrained(folder)
    config = load_base(folder, device="cpu", prediction_type="epsilon", zero_snr=False).pipe.scheduler.config
    assert config.prediction_type == "epsilon" and config.rescale_betas_zero_snr is False
    config = load_base(folder, device="cpu", prediction_type="v_prediction", zero_snr=True,
                       scheduler="Euler").pipe.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr is True
    assert config.timestep_spacing == "trailing"
    with pytest.raises(ConfigError, match="prediction type"):
        load_base(folder, device="cpu", prediction_type="sample")
