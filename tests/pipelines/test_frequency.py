import numpy as np
import torch

from pipelines.frequency import hf_score, profile_adapter, radial_profile, store_profile
from studio.adapters.file import read_adapter, save_adapter
from tests.pipelines.test_composition import setup, unet_only_adapter  # noqa: F401 (fixture)


def test_radial_profile_is_normalised():
    profile = radial_profile(torch.rand(64, 64))
    assert profile.max() == 1.0 and len(profile) == 46


def test_high_frequency_score_orders_smooth_and_busy_images():
    y, x = np.mgrid[0:64, 0:64]
    smooth = np.repeat(((np.sin(x / 20.0) + 1) / 2)[None, ..., None], 3, axis=-1)
    busy = smooth + np.random.default_rng(0).normal(0, 0.2, size=smooth.shape)
    assert hf_score(busy) > hf_score(smooth)


def test_profile_is_measured_and_stored_in_the_file(setup, tmp_path):  # noqa: F811
    pipe, _ = setup
    path = save_adapter(unet_only_adapter(pipe.studio_base(), 7), tmp_path / "p.safetensors")
    profile = profile_adapter(pipe, path, prompts=["a sks"], seeds=(0,), steps=3)
    assert profile["class"] == ("H" if profile["delta_h"] > profile["tau_h"] else "L")
    assert profile["n_pairs"] == 1 and profile["delta_h"] != 0
    assert [profile_adapter(pipe, path, prompts=["a sks"], seeds=(0,), steps=3, tau_h=profile["delta_h"] + shift
                            )["class"] for shift in (-1, 1)] == ["H", "L"]  # the threshold decides the class
    store_profile(path, profile)
    stored = read_adapter(path).metadata["studio.freq_profile"]
    assert str(round(profile["delta_h"], 6))[:6] in stored
