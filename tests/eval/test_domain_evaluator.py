import numpy as np
import pytest

from studio.data import procedural
from studio.errors import ModelLoadError
from studio.eval.domain import DomainEvaluator, clean_render_accuracy


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
