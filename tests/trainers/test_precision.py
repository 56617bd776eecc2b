"""Precision (the base's dtype, fp32 VAE encoding), optimizers and their extra, noise offset, checkpointing."""

import sys

import pytest
import torch

import trainers.loop
from studio.errors import ConfigError
from tests.conftest import make_random_base
from trainers import TrainConfig, get_method, train
from trainers.loop import TrainingContext
from trainers.optimizers import make_optimizer


def config(images, out, **overrides):
    values = dict(images=images, output="p", output_dir=out, max_train_steps=2, train_batch_size=2, rank=2)
    values.update(overrides)
    return TrainConfig(**values)


def test_a_missing_optimizer_extra_is_named_before_the_model_loads(tmp_path, shape_images, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"prodigy needs prodigyopt: pip install 'adapter-studio\[train\]'"):
        train(config(shape_images, tmp_path / "out", optimizer="prodigy", model=str(tmp_path / "no-model")),
              get_method("lora"))
    with pytest.raises(ConfigError, match="unknown --optimizer 'sgd'"):
        train(config(shape_images, tmp_path / "out", optimizer="sgd", model=str(tmp_path / "no-model")),
              get_method("lora"))


@pytest.mark.parametrize("name", ["adamw", "adafactor", "prodigy", "lion"])
def test_each_optimizer_updates_the_parameters(name):
    module = {"prodigy": "prodigyopt", "lion": "lion_pytorch"}.get(name)
    if module:
        pytest.importorskip(module)
    weight = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = make_optimizer([{"params": [weight], "lr": 1e-2}], TrainConfig(optimizer=name, learning_rate=1e-2))
    assert type(optimizer).__name__.lower().startswith(name.removesuffix("w"))
    (weight**2).sum().backward()
    optimizer.step()
    assert (weight < 1).all()


def test_adafactor_trains_through_the_loop(tmp_path, shape_images):
    result = train(config(shape_images, tmp_path / "out", optimizer="adafactor"), get_method("lora"),
                   base=make_random_base())
    assert result.steps == 2 and result.final_loss == result.final_loss


def test_fp16_on_the_cpu_is_refused_and_mixed_precision_sets_the_bases_dtype(tmp_path, shape_images, monkeypatch):
    missing = str(tmp_path / "no-model")
    monkeypatch.setattr(trainers.loop, "choose_device", lambda preferred=None: torch.device("cpu"))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train(config(shape_images, tmp_path / "out", mixed_precision="fp16", model=missing), get_method("lora"))
    asked = []

    class Loaded(Exception):
        pass

    def fake_load(spec, device=None, dtype=None, scheduler=None):
        asked.append((device, dtype))
        raise Loaded

    monkeypatch.setattr(trainers.loop, "load_base", fake_load)
    for precision, device in (("bf16", "cpu"), ("no", "cpu"), ("fp16", "cuda")):
        monkeypatch.setattr(trainers.loop, "choose_device", lambda preferred=None, d=device: torch.device(d))
        with pytest.raises(Loaded):
            train(config(shape_images, tmp_path / "out", mixed_precision=precision), get_method("lora"))
    assert asked == [("cpu", torch.bfloat16), ("cpu", torch.float32), ("cuda", torch.float16)]


def test_a_half_precision_vae_encodes_in_fp32_and_is_given_back_in_half(tmp_path, shape_images):
    base = make_random_base()
    vae = base.pipe.vae.half()  # what a CUDA base in fp16 holds
    seen = []
    original = vae.encode

    def spy(pixels, *args, **kwargs):
        seen.append((pixels.dtype, next(vae.parameters()).dtype))
        return original(pixels, *args, **kwargs)

    vae.encode = spy
    train(config(shape_images, tmp_path / "out"), get_method("lora"), base=base)
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    assert next(vae.parameters()).dtype == torch.float16


def test_noise_offset_adds_one_constant_per_channel(random_base):
    latents = torch.zeros(2, 4, 8, 8)
    plain = TrainingContext(random_base, TrainConfig(), None, None, None, None, None, [])
    offset = TrainingContext(random_base, TrainConfig(noise_offset=0.1), None, None, None, None, None, [])
    from diffusers import DDPMScheduler

    plain.noise_scheduler = offset.noise_scheduler = DDPMScheduler()
    a, _ = plain.draw_noise(latents, torch.Generator().manual_seed(0))
    b, _ = offset.draw_noise(latents, torch.Generator().manual_seed(0))
    difference = b - a
    assert difference.abs().max() > 0
    assert torch.allclose(difference, difference[..., :1, :1].expand_as(difference), atol=1e-6)


def test_gradient_checkpointing_reaches_the_text_encoder(tmp_path, shape_images):
    counts = {}
    for checkpointing in (False, True):
        base = make_random_base()
        base.pipe.text_encoder.eval()  # as a loaded pipeline holds it
        layer = base.pipe.text_encoder.get_submodule("encoder.layers.0.self_attn")
        calls = []
        layer.register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))
        train(config(shape_images, tmp_path / f"out{checkpointing}", train_text_encoder=True,
                     gradient_checkpointing=checkpointing), get_method("lora"), base=base)
        counts[checkpointing] = len(calls)
        assert not base.pipe.text_encoder.training  # given back in the mode it had
    assert counts[True] > counts[False]  # the backward pass recomputed the encoder layer


def test_a_users_vae_encodes_the_images_and_the_base_keeps_its_own(tmp_path, shape_images):
    from diffusers import AutoencoderKL

    from tests.conftest import make_random_base as fresh

    other = make_random_base(seed=5).pipe.vae
    other.register_to_config(force_upcast=False)  # as an fp16-fix VAE says
    other.save_pretrained(tmp_path / "vae")
    losses = {}
    for name, vae in (("own", None), ("given", str(tmp_path / "vae"))):
        base = fresh()
        original = base.pipe.vae
        losses[name] = train(config(shape_images, tmp_path / name, vae=vae), get_method("lora"), base=base).final_loss
        assert base.pipe.vae is original
    assert losses["own"] != losses["given"]
    assert AutoencoderKL.from_pretrained(tmp_path / "vae").config.force_upcast is False
    with pytest.raises(ConfigError, match="--vae .*no such folder or file"):  # before the model loads
        train(config(shape_images, tmp_path / "x", vae=str(tmp_path / "none"), model=str(tmp_path / "no-model")),
              get_method("lora"))
