"""The app's handlers called as plain functions."""

import json
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import app
from studio.adapters.file import read_adapter
from studio.adapters.library import library_dir
from studio.png import read_recipe
from tests.app.conftest import NoProgress, form, recipe_form


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
    assert all(Path(path).parent.name == "masks" for path, _ in masks)  # not among the images `eval` reads
    gallery, _, _ = studio.generate("", *form(prompt="a oneword and a twoword", rows=["one", "two"], method="clora",
                                              clora_words="oneword | twoword", clora_fill=True),
                                    progress=NoProgress())
    recipe = read_recipe(gallery[0][0])[1]
    options = recipe["method_options"]
    assert options == {"groups": [["oneword"], ["twoword"]], "uncovered": "adapters"}
    with pytest.raises(gr.Error, match="1 concept groups for 2 content adapters"):
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

    values = recipe_form(app.recipe_to_form(Event(), gallery))
    assert values["rows"][0] == {"on": True, "adapter": "two", "weight": 1.0, "own_prompt": ""}
    assert (values["prompt"], values["seed"]) == ("a red solid sks on a white background", 11)
    # Perp-Neg, DECOR and the method's options come back too, and the same form draws the same image
    settings = form(rows=["one", "two"], method="switch", seed=5, perp_neg=True, negative="a striped shape",
                    decor_words="red", decor_alpha=0.5, switch_interval=2)
    first, _, _ = studio.generate("", *settings, progress=NoProgress())
    values = recipe_form(app.recipe_to_form(Event(), first))
    assert (values["prompt"], values["negative"], values["method"]) == (
        "a red solid sks on a white background", "a striped shape", "switch")
    assert [values[name] for name in ("perp_neg", "perp_neg_weight", "decor_words", "decor_alpha", "switch_interval",
                                      "cache_interval")] == [True, 1.5, "red", 0.5, 2, 0]
    again = form(rows=[row["adapter"] for row in values["rows"] if row["on"]],
                 **{name: values[name] for name in app.RECIPE_FIELDS})
    second, _, _ = studio.generate("", *again, progress=NoProgress())
    assert np.array_equal(np.asarray(Image.open(first[0][0])), np.asarray(Image.open(second[0][0])))


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
    message, table, *lists = studio.import_file("", str(outside))
    assert message == "imported three.safetensors" and any(row[0] == "three" for row in table)
    assert len(lists) == app.ROWS + 1 and all("three" in update["choices"] for update in lists)
    message, download = studio.export_file("three")
    assert download == str(home / "exports" / "three.safetensors") and download in message
    assert not (home / "adapters" / "three.kohya.safetensors").exists()  # not a second library entry
    message, table, *lists = studio.delete_file("three")
    assert not (home / "adapters" / "three.safetensors").exists()
    assert all("three" not in update["choices"] for update in lists)
    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(b"not safe")
    with pytest.raises(gr.Error, match="only .safetensors"):
        studio.import_file("", str(bad))


def test_training_from_uploads_reports_progress_and_lands_in_the_library(studio_env, shape_images):
    studio, home = studio_env
    files = sorted(str(p) for p in shape_images.glob("*.png"))
    updates = list(studio.train("", files, None, None, "lora", "content", "sks", 4, 2, 1e-3, 2e-3, ""))
    assert updates[-1][0].startswith("done") and "sks-lora-content.safetensors" in updates[-1][0]
    assert any(u[0].startswith("lora: step ") for u in updates)
    assert (home / "adapters" / "sks-lora-content.safetensors").exists()
    assert all("sks-lora-content" in update["choices"] for update in updates[-1][3:])  # every adapter list
    again = list(studio.train("", files, None, None, "lora", "content", "sks", 1, 2, 1e-3, 2e-3, ""))[-1]
    assert again[0] == "done: sks-lora-content-2.safetensors"  # the first one is not overwritten


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
    written = read_adapter(library_dir() / last[0].split(": ", 1)[1])  # a stopped run keeps what it trained
    assert 1 <= json.loads(written.metadata["ss_steps"]) < 50


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


def test_stop_ends_a_batch_after_the_current_image(studio_env):
    studio, _ = studio_env

    class StopAfterFirst(NoProgress):
        def tqdm(self, iterable, *args, **kwargs):
            for index, item in enumerate(iterable):
                if index == 1:
                    studio.stop_generation.set()  # the Stop button, pressed while the first image is drawn
                yield item

    gallery, _, info = studio.generate("", *form(batch=3), progress=StopAfterFirst())
    assert len(gallery) == 1 and info.endswith("· stopped")
    gallery, _, info = studio.generate("", *form(batch=2), progress=NoProgress())  # the next run starts afresh
    assert len(gallery) == 2 and "stopped" not in info


def test_sampler_clip_skip_img2img_inpaint_and_hires_from_the_form(studio_env):
    studio, _ = studio_env
    picture = Image.new("RGB", (64, 64), (20, 30, 120))
    stroke = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    stroke.paste((255, 255, 255, 255), (0, 0, 32, 64))  # white strokes over the left half
    editor = {"background": picture, "layers": [stroke], "composite": picture}
    gallery, _, _ = studio.generate("", *form(sampler="DPM++ 2M", schedule="Karras", clip_skip=2, init=editor,
                                              strength=0.6), progress=NoProgress())
    parameters, recipe = read_recipe(gallery[0][0])
    assert "Sampler: DPM++ 2M" in parameters and "Schedule type: Karras" in parameters
    assert "Clip skip: 2" in parameters and "Denoising strength: 0.6" in parameters
    mask = np.asarray(Image.open(recipe["mask"]))
    assert mask[:, :32].min() == 255 and mask[:, 32:].max() == 0
    out = np.asarray(Image.open(gallery[0][0]), np.int16)
    assert np.abs(out[:, 32:] - np.asarray(picture, np.int16)[:, 32:]).max() <= 1  # kept outside the mask

    class Event:
        index = 0

    values = app.png_to_form(gallery[0][0])
    assert values[-9:-6] == ["DPM++ 2M", "Karras", 2] and values[-5] == 0.6
    assert values[-6]["background"] == recipe["init_image"]
    sent, strength = app.send_to_img2img(Event(), gallery)
    assert sent["background"] == gallery[0][0] and strength == 0.75
    hires, _, _ = studio.generate("", *form(hires_scale=1.5, hires_steps=2), progress=NoProgress())
    assert Image.open(hires[0][0]).size == (96, 96)


def test_an_a1111_png_fills_the_form(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a red star <lora:one:0.7>\nNegative prompt: blurry\nSteps: 9, Sampler: Euler a, "
                                "CFG scale: 6, Seed: 77, Size: 64x64, Clip skip: 2, Model hash: 0123456789")
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    values = app.png_to_form(str(path))
    assert values[:3] == [True, "one", 0.7] and values[16:18] == ["a red star", "blurry"]
    assert values[19] == 77 and values[21:23] == [9, 6.0] and values[-9:-6] == ["Euler a", "Automatic", 2]
    with pytest.raises(gr.Error, match="no generation parameters"):
        plain = tmp_path / "plain.png"
        Image.new("RGB", (8, 8)).save(plain)
        app.png_to_form(str(plain))
