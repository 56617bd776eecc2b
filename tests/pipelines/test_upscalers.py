"""Hires fix upscalers: A1111's built-in names, and upscaler model files read safely and run through spandrel."""

import builtins
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN

from pipelines import CompositionPipeline, upscalers
from pipelines.hires import hires_fix
from studio.errors import ConfigError

PROMPT = "a red solid sks on a white background"


@pytest.fixture(scope="module")
def pipe():
    from pipelines.loading import load_base

    return CompositionPipeline.from_base(load_base(device="cpu"))


def hires(pipe, upscaler, scale=1.5):
    call = dict(prompt=PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    return hires_fix(pipe, call, scale=scale, steps=2, strength=0.5, upscaler=upscaler).images[0]


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A tiny random Real-ESRGAN Compact (safetensors, in the upscalers folder) and ESRGAN (.pth, elsewhere)."""
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    (tmp_path / "upscalers").mkdir()
    torch.manual_seed(0)
    compact = Compact(num_feat=8, num_conv=2, upscale=2)
    save_file(compact.state_dict(), tmp_path / "upscalers" / "tiny-compact.safetensors")
    esrgan = tmp_path / "tiny-esrgan.pth"
    torch.save({"params_ema": ESRGAN(num_filters=8, num_blocks=1, scale=2).state_dict()}, esrgan)
    return tmp_path, esrgan


def test_every_builtin_upscaler_gives_the_size_and_latent_modes_differ(pipe):
    images = {name: hires(pipe, name) for name in upscalers.UPSCALERS}
    assert all(image.shape == (96, 96, 3) for image in images.values())
    assert np.abs(images["Latent (nearest)"] - images["Latent"]).mean() > 1e-3
    assert np.abs(images["Latent (bicubic antialiased)"] - images["Latent"]).mean() > 1e-4
    assert np.abs(images["Nearest"] - images["Lanczos"]).mean() > 1e-3
    assert np.array_equal(images["None"], images["Lanczos"])  # A1111's "None": no model, a Lanczos resize


def test_a_model_file_upscales_by_name_and_by_path(pipe, models):
    home, esrgan = models
    assert upscalers.resolve("tiny-compact") == home / "upscalers" / "tiny-compact.safetensors"
    assert "tiny-compact" in upscalers.choices()
    lanczos = hires(pipe, "Lanczos")
    compact, by_path = hires(pipe, "tiny-compact"), hires(pipe, str(esrgan), scale=2.5)
    assert compact.shape == (96, 96, 3) and by_path.shape == (160, 160, 3)  # 2× applied twice, then Lanczos
    assert np.abs(compact - lanczos).mean() > 1e-3
    assert upscalers.label(str(esrgan)) == "tiny-esrgan" and upscalers.label("Latent (bicubic)") == "Latent (bicubic)"


def test_a1111_real_esrgan_names_find_their_files(models):
    home, _ = models
    path = home / "upscalers" / "RealESRGAN_x4plus.safetensors"
    save_file(Compact(num_feat=8, num_conv=2, upscale=4).state_dict(), path)
    assert upscalers.resolve("R-ESRGAN 4x+") == path


class Payload:
    def __reduce__(self):
        return builtins.exec, ("import pathlib; pathlib.Path(TARGET).write_text('ran')", {"TARGET": self.target})

    def __init__(self, target):
        self.target = str(target)


def test_a_pickle_with_code_is_refused_and_never_run(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    evil, marker = tmp_path / "evil.pth", tmp_path / "ran.txt"
    with open(evil, "wb") as handle:
        pickle.dump({"weight": Payload(marker)}, handle)
    with pytest.raises(ConfigError, match="objects other than tensors.*only plain weights are loaded"):
        hires(pipe, str(evil))
    assert not marker.exists()


def test_unknown_upscaler_and_non_upscaler_files_are_clear_errors(pipe, models):
    home, _ = models
    with pytest.raises(ConfigError, match=r"unknown hires upscaler 'R-ESRGAN 8x'.*Latent \(bicubic\).*tiny-compact"):
        hires(pipe, "R-ESRGAN 8x")
    save_file({"weight": torch.zeros(3, 3)}, home / "upscalers" / "not-a-model.safetensors")
    with pytest.raises(ConfigError, match="no upscaler architecture"):
        hires(pipe, "not-a-model")
