import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from studio.adapters.file import read_adapter
from studio.data.folder import load_rgb, scan_folder
from studio.errors import ConfigError, DataError
from trainers import TrainConfig, get_method, train

CAPTION = "a red solid sks on a white background"


def config(images, out, **overrides):
    values = dict(images=images, output="demo", output_dir=out, max_train_steps=4, train_batch_size=2, seed=3,
                  rank=2, learning_rate=5e-3)
    values.update(overrides)
    return TrainConfig(**values)


def adapter_weights(path):
    adapter = read_adapter(path)
    return {p: (m.down, m.up) for p, m in adapter.modules["unet"].items()}


def test_training_writes_an_adapter_with_full_metadata(tmp_path, random_base, shape_images):
    result = train(config(shape_images, tmp_path / "out", network_alpha=1.0, kind="content"), get_method("lora"),
                   base=random_base)
    [path] = result.outputs
    assert path == tmp_path / "out" / "demo.safetensors" and result.steps == 4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["demo.safetensors"]  # no empty work folder
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    for key in ("ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                "ss_seed", "ss_steps", "ss_tag_frequency", "ss_training_started_at", "modelspec.title",
                "modelspec.architecture", "modelspec.trigger_phrase", "studio.method", "studio.kind",
                "studio.trigger_words", "studio.base_fingerprint"):
        assert key in meta, key
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1.0" and meta["ss_seed"] == "3"
    assert json.loads(meta["ss_tag_frequency"])["images"]["a red solid sks on a white background"] == 1
    assert json.loads(meta["studio.trigger_words"]) == ["sks"]
    assert meta["studio.base_fingerprint"] == random_base.fingerprint
    adapter = read_adapter(path)
    assert all(m.alpha == 1.0 and m.rank == 2 for m in adapter.modules["unet"].values())
    assert any(m.up.abs().max() > 0 for m in adapter.modules["unet"].values())


def test_training_changes_the_weights_it_should_and_only_those(tmp_path, random_base, shape_images):
    before = {k: v.clone() for k, v in random_base.pipe.unet.state_dict().items()}
    train(config(shape_images, tmp_path / "out"), get_method("lora"), base=random_base)
    after = random_base.pipe.unet.state_dict()
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert changed == []  # the base is untouched; only LoRA factors (now detached) were trained


def test_resume_equals_an_uninterrupted_run(tmp_path, shape_images):
    from tests.conftest import make_random_base

    full = train(config(shape_images, tmp_path / "full", max_train_steps=6, checkpointing_steps=3),
                 get_method("lora"), base=make_random_base())
    interrupted = config(shape_images, tmp_path / "resumed", max_train_steps=3, checkpointing_steps=3)
    train(interrupted, get_method("lora"), base=make_random_base())
    # the 3-step run saves no checkpoint at its end; save one by training 3 of 6 and stopping
    stopped = config(shape_images, tmp_path / "resumed", max_train_steps=6, checkpointing_steps=3)
    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] > 3

    train(stopped, get_method("lora"), base=make_random_base(), should_stop=stop_after_three)
    resumed = train(config(shape_images, tmp_path / "resumed", max_train_steps=6, checkpointing_steps=3,
                           resume_from_checkpoint="latest"), get_method("lora"), base=make_random_base())
    a, b = adapter_weights(full.outputs[0]), adapter_weights(resumed.outputs[0])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key][0], b[key][0], atol=1e-5) and torch.allclose(a[key][1], b[key][1], atol=1e-5)
    with pytest.raises(ConfigError, match="latest: no checkpoint in"):
        train(config(shape_images, tmp_path / "fresh", resume_from_checkpoint="latest"), get_method("lora"),
              base=make_random_base())
    assert not (tmp_path / "fresh" / "demo-work").exists()  # a failed run leaves no empty folder
    with pytest.raises(ConfigError, match="checkpoint-3 does not fit this run"):
        train(config(shape_images, tmp_path / "resumed", max_train_steps=6, rank=8, resume_from_checkpoint="latest"),
              get_method("lora"), base=make_random_base())


def test_empty_folder_and_non_images(tmp_path, random_base):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not an image")
    with pytest.raises(DataError, match="no images in"):
        train(config(empty, tmp_path / "out", instance_prompt=CAPTION), get_method("lora"), base=random_base)
    assert not (tmp_path / "out" / "demo.safetensors").exists()


def test_corrupt_and_tiny_images_are_named(tmp_path, random_base, shape_images):
    (shape_images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (shape_images / "broken.txt").write_text(CAPTION)
    with pytest.raises(DataError, match="broken.png is not a readable image"):
        train(config(shape_images, tmp_path / "out"), get_method("lora"), base=random_base)
    (shape_images / "broken.png").unlink()
    Image.new("RGB", (1, 1), "red").save(shape_images / "dot.png")
    with pytest.raises(DataError, match="dot.png is 1×1 pixels"):
        train(config(shape_images, tmp_path / "out", instance_prompt=CAPTION), get_method("lora"), base=random_base)
    assert not (tmp_path / "out" / "demo.safetensors").exists()


def test_cmyk_grayscale_and_alpha_images_become_rgb(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent → white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    for name in ("cmyk.jpg", "gray.png", "alpha.png"):
        image = load_rgb(tmp_path / name)
        assert image.mode == "RGB" and image.size == (32, 32)
    assert np.asarray(load_rgb(tmp_path / "alpha.png"))[0, 0].tolist() == [255, 255, 255]
    assert abs(int(np.asarray(load_rgb(tmp_path / "cmyk.jpg"))[5, 5, 0]) - 200) < 12


def test_captions_and_kohya_repeat_folders(tmp_path):
    (tmp_path / "3_extra").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "3_extra" / "b.png")
    (tmp_path / "a.txt").write_text("  a   caption\n")
    found = scan_folder(tmp_path, instance_prompt="fallback")
    assert [(i.path.name, i.caption, i.repeats) for i in found] == [("a.png", "a caption", 1),
                                                                  ("b.png", "fallback", 3)]
    with pytest.raises(DataError, match="has no caption"):
        scan_folder(tmp_path)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown training method 'dreambooth-xl'"):
        get_method("dreambooth-xl")


def test_validation_previews_are_written_with_parameters(tmp_path, random_base, shape_images):
    result = train(config(shape_images, tmp_path / "out", max_train_steps=2, validation_prompt=CAPTION,
                          validation_steps=2, num_validation_images=1, validation_weights=(0.5, 1.0)),
                   get_method("lora"), base=random_base)
    assert len(result.samples) == 2
    with Image.open(result.samples[0]) as image:
        prompt, settings = image.info["parameters"].splitlines()
    assert prompt == f"{CAPTION} <lora:demo:0.5>"
    for field in ("Steps: ", "Sampler: ", "CFG scale: ", "Seed: 3", "Size: 64x64", "Model hash: ", "Training step: 2"):
        assert field in settings, field


def test_decor_during_training_projects_captions_and_records_the_words(tmp_path, random_base, shape_images):
    from pipelines.decor import decor_blocks

    result = train(config(shape_images, tmp_path / "out", decor_remove=["red", "white"], decor_alpha=1.0,
                          max_train_steps=1), get_method("lora"), base=random_base)
    meta = read_adapter(result.outputs[0]).metadata
    assert json.loads(meta["studio.decor_remove"]) == ["red", "white"]
    from trainers.loop import encode_captions

    [(_, _, basis)] = decor_blocks(random_base.pipe, ["red", "white"])
    hidden, _ = encode_captions(random_base, [CAPTION], ([(0, basis.shape[0], basis)], 1.0))
    assert (hidden[0] @ basis).abs().max() < 1e-4


def test_prior_prompts_cover_two_object_scenes_on_a_base_that_learnt_them():
    from types import SimpleNamespace

    from trainers.loop import default_class_prompts

    plain = TrainConfig(seed=1)
    single_only = default_class_prompts(SimpleNamespace(family="tiny", domain={}), plain, 10)
    assert len(single_only) == 10 and not any(" and a " in p for p in single_only)
    domain = {"pair_caption_template": "a {color} {texture} {shape} and a {color} {texture} {shape} on a …"}
    mixed = default_class_prompts(SimpleNamespace(family="tiny", domain=domain), plain, 10)
    assert len(mixed) == 10 and sum(" and a " in p for p in mixed) == 5 and len(set(mixed)) > 6
    assert default_class_prompts(SimpleNamespace(family="tiny", domain=domain),
                                 TrainConfig(class_prompt="a shape"), 3) == ["a shape"] * 3


def test_a_work_folder_removed_by_another_process_mid_cleanup_is_no_error(tmp_path, monkeypatch):
    """Under accelerate launch every process tidies the empty work folder; one may remove it between another's
    check and its listing, which must not fail that process's finished run."""
    import trainers.loop as loop

    config = TrainConfig(images=tmp_path, output="race", output_dir=tmp_path)
    config.work_folder().mkdir()
    real_iterdir = Path.iterdir

    def removed_meanwhile(self):
        if self == config.work_folder():
            self.rmdir()  # the other process's rmdir lands here
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", removed_meanwhile)
    monkeypatch.setattr(loop, "_train", lambda *args: "finished")
    assert loop.train(config, method=None) == "finished"
    assert not config.work_folder().exists()
