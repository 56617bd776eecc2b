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
