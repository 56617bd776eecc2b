"""The loop and the adapter layer on an SDXL-architecture model (two text encoders, added time ids)."""

import torch
from safetensors import safe_open

from studio.adapters.file import read_adapter, save_adapter
from studio.adapters.inject import detach_adapter, load_adapter
from tests.conftest import make_random_sdxl_base
from trainers import TrainConfig, get_method, train


def test_lora_trains_saves_and_reloads_on_sdxl(tmp_path, shape_images):
    base = make_random_sdxl_base()
    config = TrainConfig(images=shape_images, output="xl", output_dir=tmp_path, max_train_steps=2,
                         train_batch_size=2, rank=2, resolution=32, train_text_encoder=True, trigger_words=["sks"])
    [path] = train(config, get_method("lora"), base=base).outputs
    adapter = read_adapter(path)
    assert set(adapter.modules) == {"unet", "text_encoder", "text_encoder_2"} and adapter.base_family == "sdxl"
    trained = adapter.modules["text_encoder_2"].values()
    assert any(m.up.abs().max() > 0 for m in trained)  # the text encoders received gradients
    kohya = save_adapter(adapter, tmp_path / "xl_kohya.safetensors", layout="kohya")
    with safe_open(str(kohya), "pt") as handle:
        names = list(handle.keys())
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}

    generator = torch.Generator().manual_seed(0)
    before = base.pipe(prompt="a sks", num_inference_steps=2, height=32, width=32, generator=generator,
                       output_type="np").images
    load_adapter(base, kohya, "xl")
    after = base.pipe(prompt="a sks", num_inference_steps=2, height=32, width=32,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
    detach_adapter(base, "xl")
    assert abs(after - before).max() > 0


def test_sdxl_composition_methods_and_decor(tmp_path, shape_images):
    import numpy as np

    from studio.adapters.file import read_adapter as read

    base = make_random_sdxl_base()
    config = TrainConfig(images=shape_images, output="xl", output_dir=tmp_path, max_train_steps=1,
                         train_batch_size=2, rank=2, resolution=32, trigger_words=["sks"])
    [path] = train(config, get_method("lora"), base=base).outputs
    second = read(path)
    for module in second.modules["unet"].values():
        module.up.normal_()
    other = save_adapter(second, tmp_path / "xl2.safetensors")
    common = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    images = {}
    for method in ("merge", "composite", "cmlora", "clora"):
        images[method] = base.pipe("a sks", generator=torch.Generator().manual_seed(0), adapters=[(path, 1.0),
                                   (other, 1.0)], method=method, method_options={"capture_resolution": 8}
                                   if method == "clora" else None, **common).images
    assert all(image.shape == (1, 32, 32, 3) for image in images.values())
    assert np.abs(images["merge"] - images["composite"]).mean() > 0
    decor = base.pipe("a sks", generator=torch.Generator().manual_seed(0), decor_remove=["sks"], **common).images
    plain = base.pipe("a sks", generator=torch.Generator().manual_seed(0), **common).images
    assert np.abs(decor - plain).mean() > 0
