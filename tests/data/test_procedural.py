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



def test_partial_captions_name_only_what_is_given():
    assert procedural.partial_caption("red", None, "star", None) == "a red star"
    assert procedural.partial_caption(None, "striped", None, "gray") == "a striped shape on a gray background"
    assert procedural.partial_caption(None, None, "heart", None) == "a heart"
    assert procedural.partial_caption("red", "solid", "star", "white") == procedural.caption("red", "solid", "star",
                                                                                               "white")
    assert (procedural.partial_pair_caption(("red", None, "star"), (None, "dotted", None), None)
            == "a red star and a dotted shape")


def test_without_noise_the_captions_are_the_exact_ones():
    rng, noise = np.random.default_rng(0), procedural.CaptionNoise()
    for combo in procedural.base_training_combinations()[:50]:
        assert procedural.noisy_caption(rng, *combo, noise) == procedural.caption(*combo)
    pair = procedural.base_training_pair(rng)
    first, second = (pair.left.color, pair.left.texture, pair.left.shape), (pair.right.color, pair.right.texture,
                                                                            pair.right.shape)
    assert procedural.noisy_pair_caption(rng, first, second, pair.left.background, noise) == pair.caption


def _named(caption: str) -> dict[str, str | None]:
    """Parse a single-object caption back into its named attributes."""
    text, _, background = caption.partition(" on a ")
    words = text.split()[1:]
    shape = None if words[-1] == "shape" else words[-1]
    named = {"color": None, "texture": None, "shape": shape,
             "background": background.split()[0] if background else None}
    for word in words[:-1]:
        named["color" if word in procedural.COLORS else "texture"] = word
    return named


def test_noise_rates_match_the_probabilities_and_stay_off_held_out_pairs():
    rng, noise = np.random.default_rng(1), procedural.CaptionNoise(drop_attribute=0.3, wrong_attribute=0.2)
    combos = procedural.base_training_combinations()
    counts = {"drop": 0, "wrong": 0}
    trials = 3000
    for i in range(trials):
        combo = combos[i % len(combos)]
        named = _named(procedural.noisy_caption(rng, *combo, noise))
        for name, true in zip(("color", "texture", "shape", "background"), combo):
            outcome = "drop" if named[name] is None else "wrong" if named[name] != true else "keep"
            counts[outcome] = counts.get(outcome, 0) + 1
        assert (named["color"], named["shape"]) not in procedural.HELD_OUT_COLOR_SHAPE
        assert (named["texture"], named["shape"]) not in procedural.HELD_OUT_TEXTURE_SHAPE
    assert abs(counts["drop"] / (4 * trials) - 0.3) < 0.02
    assert abs(counts["wrong"] / (4 * trials) - 0.2) < 0.02


def test_noisy_captions_are_seeded_and_cover_two_object_scenes():
    noise = procedural.CaptionNoise(drop_attribute=0.4, wrong_attribute=0.3)

    def captions(seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        return [procedural.noisy_pair_caption(rng, ("red", "solid", "circle"), ("blue", "dotted", "star"), "white",
                                              noise) for _ in range(400)]

    first = captions(0)
    assert first == captions(0) and first != captions(1)
    assert all(" and a " in c for c in first)
    assert any(c.startswith("a circle and") for c in first) and any(not c.endswith("background") for c in first)
    for caption in first:
        left, right = caption.split(" on a ")[0].split(" and ")
        colors = [w for w in (left + " " + right).split() if w in procedural.COLORS]
        assert len(colors) == len(set(colors))  # a wrong color never repeats the other object's


def test_caption_noise_rejects_impossible_probabilities():
    with pytest.raises(ValueError, match="caption noise"):
        procedural.CaptionNoise(drop_attribute=0.7, wrong_attribute=0.5)
