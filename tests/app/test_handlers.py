"""The app's handlers called as plain functions."""

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import app
from studio.png import read_recipe
from tests.app.conftest import NoProgress, form


def test_generate_writes_pngs_with_parameters(studio_env):
    studio, _ = studio_env
    gallery, masks, info = studio.generate("", *form(rows=["one", "two"], method="composite", batch=2),
                                           progress=NoProgress())
    assert len(gallery) == 2 and masks == [] and info == "2 image(s) · seed 3 · composite"
    parameters, recipe = read_recipe(gallery[0][0])
    assert "<lora:one:1> <lora:two:1>" in parameters and "Composition: composite" in parameters
    assert recipe["seed"] == 3 and recipe["method"] == "composite"
    assert read_recipe(gallery[1][0])[1]["seed"] == 4


def test_clora_shows_masks(studio_env):
    studio, _ = studio_env
    _, masks, _ = studio.generate("", *form(prompt="a oneword and a twoword", rows=["one", "two"], method="clora"),
                                  progress=NoProgress())
    assert len(masks) == 3 and all(Image.open(path).size == (128, 128) for path, _ in masks)
    gallery, _, _ = studio.generate("", *form(prompt="a oneword and a twoword", rows=["one", "two"], method="clora",
                                              clora_words="oneword | twoword", clora_fill=True),
                                    progress=NoProgress())
    recipe = read_recipe(gallery[0][0])[1]
    options = recipe["method_options"]
    assert options == {"groups": [["oneword"], ["twoword"]], "uncovered": "adapters"}
    with pytest.raises(gr.Error, match="1 concept groups for 2 adapters"):
        studio.generate("", *form(rows=["one", "two"], method="clora", clora_words="oneword"), progress=NoProgress())


def test_bad_weight_and_missing_prompt_are_readable_errors(studio_env):
    studio, _ = studio_env
    with pytest.raises(gr.Error, match="not a number"):
        studio.generate("", *form(rows=["one"], weight="strong"), progress=NoProgress())
    with pytest.raises(gr.Error, match="Write a prompt"):
        studio.generate("", *form(prompt="  "), progress=NoProgress())
    with pytest.raises(gr.Error, match="no model at"):
        studio.generate("/nonexistent/model", *form(), progress=NoProgress())


def test_compare_methods_runs_every_method_with_scores(studio_env, monkeypatch):
    studio, _ = studio_env
    gallery = studio.compare("", *form(rows=["one", "two"]), progress=NoProgress())
    assert [caption.split(" ")[0] for _, caption in gallery] == ["merge", "switch", "composite", "cmlora", "clora"]


def test_recipe_goes_back_to_the_form(studio_env):
    studio, _ = studio_env
    gallery, _, _ = studio.generate("", *form(rows=["two"], seed=11), progress=NoProgress())

    class Event:
        index = 0

    values = app.recipe_to_form(Event(), gallery)
    assert values[:3] == [True, "two", 1.0] and values[16] == "a red solid sks on a white background"
    assert values[19] == 11


def test_move_rows_and_trigger_words(studio_env):
    rows = [True, "one", "1.0", "", False, "two", "0.5", "", False, None, "1.0", "", False, None, "1.0", ""]
    moved = app.move_row(1, -1, *rows)
    assert moved[:4] == [False, "two", "0.5", ""] and moved[4:8] == [True, "one", "1.0", ""]
    assert app.triggers_for("a shape", True, "one", True, "two", False, None, False, None) == \
        "a shape oneword twoword"


def test_library_import_export_delete(studio_env, tmp_path):
    studio, home = studio_env
    outside = tmp_path / "three.safetensors"
    (home / "adapters" / "one.safetensors").rename(outside)
    table, message = studio.import_file("", str(outside))
    assert message == "imported three.safetensors" and any(row[0] == "three" for row in table)
    table, message = studio.export_file("three")
    assert (home / "adapters" / "three.kohya.safetensors").exists()
    table, message = studio.delete_file("three")
    assert not (home / "adapters" / "three.safetensors").exists()
    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(b"not safe")
    with pytest.raises(gr.Error, match="only .safetensors"):
        studio.import_file("", str(bad))


def test_training_from_uploads_reports_progress_and_lands_in_the_library(studio_env, shape_images):
    studio, home = studio_env
    files = sorted(str(p) for p in shape_images.glob("*.png"))
    updates = list(studio.train("", files, None, None, "lora", "content", "sks", 4, 2, 1e-3, 2e-3, ""))
    assert updates[-1][0].startswith("done") and "sks-lora-content.safetensors" in updates[-1][0]
    assert any(u[0].startswith("step") for u in updates)
    assert (home / "adapters" / "sks-lora-content.safetensors").exists()
    assert "sks-lora-content" in app.adapter_choices()


def test_training_stop_and_bad_input(studio_env, shape_images):
    studio, home = studio_env
    with pytest.raises(gr.Error, match="Upload a handful"):
        list(studio.train("", [], None, None, "lora", "content", "sks", 4, 2, 1e-3, 2e-3, ""))
    files = sorted(str(p) for p in shape_images.glob("*.png"))
    run = studio.train("", files, None, None, "lora", "content", "sks", 50, 2, 1e-3, 2e-3, "")
    next(run)
    studio.stop_training.set()
    last = list(run)[-1]
    assert "stopped early" in last[0]
    assert np.isfinite(len(last[1]))


def test_b4m_from_the_app_takes_the_prior_and_its_stop_ends_the_pipeline(studio_env, shape_images):
    from safetensors import safe_open

    studio, home = studio_env
    files = sorted(str(p) for p in shape_images.glob("*.png"))
    run = studio.train("", files, None, files, "b4m", "content", "sks", 50, 2, 1e-3, 2e-3, "", "all")
    next(run)
    studio.stop_training.set()
    last = list(run)[-1]
    assert last[0] == "done (stopped early): sks-b4m-content-content.safetensors"
    written = sorted(p.name for p in (home / "adapters").glob("*.safetensors"))
    assert written == ["one.safetensors", "sks-b4m-content-content.safetensors", "two.safetensors"]
    basis = home / "adapters" / "sks-b4m-content-work" / "sks-b4m-content.b4m-basis.safetensors"
    with safe_open(str(basis), "pt") as handle:
        assert handle.metadata()["studio.b4m_prior"] == "all"
