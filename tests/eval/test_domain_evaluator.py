import numpy as np
import pytest

from studio.data import procedural
from studio.errors import ModelLoadError
from studio.eval.domain import DomainEvaluator, clean_render_accuracy
from studio.eval.two_objects import read_two_objects


def test_reads_clean_renders(evaluator):
    accuracy = clean_render_accuracy(evaluator, n=300, seed=123)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_reads_reserved_shapes_and_textures(evaluator):
    rng = np.random.default_rng(5)
    scenes = [procedural.jittered_scene(rng, "green", texture, shape, "white")
              for shape in procedural.RESERVED_SHAPES for texture in procedural.RESERVED_TEXTURES for _ in range(5)]
    readings = evaluator.read(procedural.render_batch(scenes))
    assert np.mean([r.shape == s.shape and r.texture == s.texture for r, s in zip(readings, scenes)]) >= 0.95


def test_rejects_noise_and_empty_backgrounds(evaluator):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(20, 64, 64, 3), dtype=np.uint8)
    empty = np.full((5, 64, 64, 3), 128, dtype=np.uint8)
    readings = evaluator.read(np.concatenate([noise, empty]))
    assert sum(r.shape is None for r in readings) >= 23
    assert all(r.background == "gray" for r in readings[20:])


def test_missing_evaluator_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no domain evaluator"):
        DomainEvaluator.load(tmp_path)


def test_reads_both_objects_of_rendered_pairs(evaluator):
    rng = np.random.default_rng(11)
    pairs = [procedural.base_training_pair(rng) for _ in range(60)]
    pairs += [procedural.jittered_pair(rng, ("red", "solid", "moon"), ("blue", "striped", "cross"), "white")
              for _ in range(10)]
    readings, regions = read_two_objects(evaluator, procedural.render_batch(pairs),
                                         [(p.left.color, p.right.color) for p in pairs],
                                         [p.left.background for p in pairs])
    correct = [r is not None and (r.shape, r.color) == (s.shape, s.color)
               for pair, read in zip(pairs, readings) for s, r in zip((pair.left, pair.right), read)]
    assert np.mean(correct) >= 0.95
    left_region = regions[0][0]
    assert left_region[:, :32].sum() > 20 * left_region[:, 32:].sum()  # the first color is found on the left


def test_two_object_reading_reports_a_missing_object(evaluator):
    scene = procedural.Scene("star", "green", "solid", "white")
    readings, _ = read_two_objects(evaluator, procedural.render_batch([scene]), [("green", "purple")], ["white"])
    assert readings[0][0].shape == "star" and readings[0][1] is None


def test_reads_every_shape_drawn_small_textured_and_softened(evaluator):
    """Generated objects are soft: the reader must still read each shape, reserved ones included, in a pair."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(3)
    rates = {}
    for shape in procedural.SHAPES:
        pairs = [procedural.jittered_pair(rng, ("red", procedural.BASE_TEXTURES[i % 4], shape),
                                          ("blue", "solid", "circle"), "white") for i in range(8)]
        images = [np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.8)))
                  for image in procedural.render_batch(pairs)]
        readings, _ = read_two_objects(evaluator, images, [("red", "blue")] * 8, ["white"] * 8)
        rates[shape] = np.mean([r[0] is not None and r[0].shape == shape for r in readings])
    assert min(rates.values()) >= 0.75 and np.mean(list(rates.values())) >= 0.9, rates
