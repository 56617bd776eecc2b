import numpy as np
import pytest

from studio.data import procedural


def test_caption_format_is_fixed():
    assert procedural.caption("red", "striped", "star", "white") == "a red striped star on a white background"


def test_render_is_deterministic_and_uses_the_named_colors():
    scene = procedural.Scene("square", "blue", "solid", "white")
    image = procedural.render(scene)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.array_equal(image, procedural.render(scene))
    assert tuple(image[32, 32]) == procedural.COLORS["blue"]
    assert tuple(image[1, 1]) == procedural.BACKGROUNDS["white"]


@pytest.mark.parametrize("texture", procedural.TEXTURES)
def test_textures_differ_from_each_other(texture):
    scene = procedural.Scene("square", "red", texture, "gray")
    others = [procedural.render(procedural.with_attributes(scene, texture=t)) for t in procedural.TEXTURES
              if t != texture]
    image = procedural.render(scene)
    assert all(np.abs(image.astype(int) - other).sum() > 1000 for other in others)


def test_training_set_excludes_reserved_names_and_held_out_pairs():
    combos = procedural.base_training_combinations()
    assert combos and not set(procedural.held_out_combinations()) & set(combos)
    for color, texture, shape, _ in combos:
        assert shape not in procedural.RESERVED_SHAPES and texture not in procedural.RESERVED_TEXTURES
        assert (color, shape) not in procedural.HELD_OUT_COLOR_SHAPE
        assert (texture, shape) not in procedural.HELD_OUT_TEXTURE_SHAPE
    words = {w for c in combos for w in procedural.caption(*c).split()}
    assert not words & set(procedural.TRIGGER_WORDS)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown shape"):
        procedural.render(procedural.Scene("hexagon", "red", "solid", "white"))
    with pytest.raises(ValueError, match="unknown color"):
        procedural.render(procedural.Scene("circle", "teal", "solid", "white"))


def test_pair_scenes_put_two_separate_objects_in_caption_order():
    rng = np.random.default_rng(3)
    for _ in range(20):
        pair = procedural.base_training_pair(rng)
        image = procedural.render_pair(pair)
        masks = [procedural.shape_mask(s.shape, s.center, s.radius) > 0 for s in (pair.left, pair.right)]
        assert not (masks[0] & masks[1]).any()
        assert masks[0][:, 33:].sum() == 0 and masks[1][:, :32].sum() == 0  # first-named object on the left
        for scene in (pair.left, pair.right):
            solid = procedural.shape_mask(scene.shape, scene.center, scene.radius) == 1.0
            rgb = np.asarray(procedural.COLORS[scene.color], np.float32)
            pixels = image[solid].astype(np.float32)
            k = pixels @ rgb / (rgb @ rgb)  # every pixel lies on the object's color line (textures only darken)
            assert np.abs(pixels - k[:, None] * rgb).max() <= 2.0
        for scene in (pair.left, pair.right):
            assert not procedural.is_held_out(scene.color, scene.texture, scene.shape)
            assert scene.shape in procedural.BASE_SHAPES and scene.texture in procedural.BASE_TEXTURES
        left, right = pair.left, pair.right
        assert pair.caption == (f"a {left.color} {left.texture} {left.shape} and a {right.color} {right.texture} "
                                f"{right.shape} on a {left.background} background")


def test_pair_scenes_refuse_one_color_or_two_backgrounds():
    red = procedural.Scene("circle", "red", "solid", "white", center=(17, 32), radius=12)
    with pytest.raises(ValueError, match="different colors"):
        procedural.PairScene(red, procedural.with_attributes(red, center=(47, 32)))
    with pytest.raises(ValueError, match="one background"):
        procedural.PairScene(red, procedural.with_attributes(red, color="blue", background="black"))

