"""Aspect-ratio buckets, kohya caption augmentations and SDXL's size/crop conditioning from the real crop."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from studio.data.buckets import bucket_sizes, nearest_bucket, place
from studio.data.captions import augment_caption
from studio.errors import ConfigError
from tests.conftest import make_random_base, make_random_sdxl_base
from trainers import TrainConfig, get_method, train

SIZES = [(96, 64), (64, 96), (80, 80)]


@pytest.fixture
def mixed_images(tmp_path):
    """Renders of three sizes (two of each), captioned with comma-separated tags."""
    from studio.data import procedural

    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (width, height) in enumerate(SIZES * 2):
        scene = procedural.jittered_scene(rng, "red", "solid", "moon", "white")
        Image.fromarray(procedural.render(scene)).resize((width, height)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"sks, red moon, white background, picture {i}")
    return folder


def bucket_config(images, out, **overrides):
    values = dict(images=images, output="mixed", output_dir=out, max_train_steps=6, train_batch_size=2, rank=2,
                  resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
    values.update(overrides)
    return TrainConfig(**values)


def test_buckets_follow_kohya_and_never_over_crop():
    buckets = bucket_sizes((64, 64), 32, 128, 16)
    assert {(64, 64), (80, 48), (48, 80), (96, 32), (32, 128)} <= set(buckets)
    assert all(w * h <= 64 * 64 and w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    for size in [(96, 64), (64, 96), (80, 80), (300, 200), (17, 40)]:
        placement = place(size, nearest_bucket(size, buckets))
        excess = (placement.resized[0] - placement.target[0], placement.resized[1] - placement.target[1])
        assert min(excess) == 0 and max(excess) < 16  # one side fits exactly; the other loses only the rounding
        assert placement.left == excess[0] // 2 and placement.top == excess[1] // 2
    assert nearest_bucket((96, 64), buckets) == (80, 48) and nearest_bucket((80, 80), buckets) == (64, 64)


def test_a_mixed_folder_trains_in_three_buckets(tmp_path, mixed_images):
    events, shapes = [], []
    base = make_random_base()
    hook = base.pipe.unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    result = train(bucket_config(mixed_images, tmp_path / "out"), get_method("lora"), base=base,
                   progress=lambda event, step, total, logs: events.append((event, logs)))
    hook.remove()
    [buckets] = [logs["buckets"] for event, logs in events if event == "buckets"]
    assert buckets == {"48x80": 2, "64x64": 2, "80x48": 2}
    factor = base.pipe.vae_scale_factor
    assert set(shapes) == {(80 // factor, 48 // factor), (48 // factor, 80 // factor), (64 // factor, 64 // factor)}
    with safe_open(str(result.outputs[0]), "pt") as handle:
        assert handle.metadata()["ss_resolution"] == "(64, 64)"


def test_without_buckets_every_image_trains_at_one_size_w_h(tmp_path, mixed_images):
    shapes = []
    base = make_random_base()
    hook = base.pipe.unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    result = train(bucket_config(mixed_images, tmp_path / "out", enable_bucket=False, resolution="96,64",
                                 max_train_steps=2), get_method("lora"), base=base)
    hook.remove()
    assert set(shapes) == {(64 // base.pipe.vae_scale_factor, 96 // base.pipe.vae_scale_factor)}
    with safe_open(str(result.outputs[0]), "pt") as handle:
        assert handle.metadata()["ss_resolution"] == "(96, 64)"


def test_sdxl_receives_the_true_original_size_and_crop(tmp_path, mixed_images):
    base = make_random_sdxl_base()
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].tolist())

    hook = base.pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    train(bucket_config(mixed_images, tmp_path / "out", max_train_steps=8), get_method("lora"), base=base)
    hook.remove()
    rows = {tuple(int(v) for v in row) for batch in seen for row in batch}
    # (original h, w, crop top, left, target h, w): 96×64 → 80×53, 2 rows cropped from the top and bottom halves;
    # 64×96 → 53×80, 2 columns from the left; 80×80 → 64×64 without a crop
    assert rows == {(64, 96, 2, 0, 48, 80), (96, 64, 0, 2, 80, 48), (80, 80, 0, 0, 64, 64)}


def test_a_flipped_example_mirrors_its_crop():
    placement = place((64, 96), (48, 80))
    assert placement.left == 2 and placement.flipped().left == placement.resized[0] - 2 - 48


def test_bad_bucket_range_and_keep_tokens_fail_before_the_model_loads(tmp_path, mixed_images):
    missing = str(tmp_path / "no-model")  # loading it would fail with a different error
    with pytest.raises(ConfigError, match="every image is excluded"):
        train(bucket_config(mixed_images, tmp_path / "out", model=missing, min_bucket_reso=512, max_bucket_reso=1024),
              get_method("lora"))
    with pytest.raises(ConfigError, match="--keep_tokens 5 is more than"):
        train(bucket_config(mixed_images, tmp_path / "out", model=missing, keep_tokens=5, shuffle_caption=True),
              get_method("lora"))
    assert not (tmp_path / "out").exists()


def test_caption_shuffle_keeps_leading_tags_and_dropout_empties():
    caption = "sks, red moon, white background, picture 1, bright"
    generator = torch.Generator().manual_seed(0)
    shuffled = {augment_caption(caption, generator, shuffle=True, keep_tokens=1) for _ in range(30)}
    assert len(shuffled) > 5 and all(s.startswith("sks, ") for s in shuffled)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)
    dropped = [augment_caption(caption, generator, dropout_rate=0.5) for _ in range(200)]
    assert 60 < dropped.count("") < 140 and set(dropped) == {"", caption}


def test_training_encodes_each_steps_augmented_captions(tmp_path, mixed_images):
    base = make_random_base()
    encoded = []
    original = base.pipe.encode_texts

    def spy(texts, *args, **kwargs):
        encoded.append(list(texts))
        return original(texts, *args, **kwargs)

    base.pipe.encode_texts = spy
    result = train(bucket_config(mixed_images, tmp_path / "out", shuffle_caption=True, keep_tokens=1,
                                 caption_dropout_rate=0.3, max_train_steps=6), get_method("lora"), base=base)
    step_captions = [c for batch in encoded[3:] for c in batch]  # after the three buckets' cached encodings
    assert "" in step_captions and any(c and c.split(", ")[1] != "red moon" for c in step_captions)
    assert all(c == "" or c.startswith("sks, ") for c in step_captions)
    with safe_open(str(result.outputs[0]), "pt") as handle:  # metadata counts the captions as written
        assert json.loads(handle.metadata()["ss_tag_frequency"])["images"]["sks"] == 6
