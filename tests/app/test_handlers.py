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
from tests.data.test_autocaption import tiny_blip as tiny_blip  # a fixture: a random BLIP saved on disk


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
    with pytest.raises(gr.Error, match="Adapter row 1: weight must be a finite number, not 'strong'"):
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
    assert all("sks-lora-content" in update["choices"] for update in updates[-1][3:-1])  # every adapter list
    again = list(studio.train("", files, None, None, "lora", "content", "sks", 1, 2, 1e-3, 2e-3, ""))[-1]
    assert again[0] == "done: sks-lora-content-2.safetensors"  # the first one is not overwritten


def test_a_custom_instance_prompt_reaches_the_adapter_with_an_estimate_and_a_loss_plot(studio_env, shape_images):
    import json

    from safetensors import safe_open

    from trainers.recipe import TrainForm

    studio, home = studio_env
    files = sorted(str(p) for p in shape_images.glob("*.png"))
    form = TrainForm(instance_prompt="a photo of sks toy", validation_prompts="a sks toy\na sks toy on grass",
                     resolution="32,48", enable_bucket=False)
    updates = list(studio.train("", files, None, None, "lora", "content", "sks", 4, 2, 1e-3, 2e-3, "", form=form))
    estimates = [u[0] for u in updates if "s per step (measured)" in u[0]]
    assert estimates and updates.index(next(u for u in updates if u[0] == estimates[0])) < next(
        i for i, u in enumerate(updates) if u[0].startswith("lora: step"))  # shown before the first step
    plot = updates[-1][-1]
    assert list(plot["step"]) == [1, 2, 3, 4] and plot["loss"].notna().all()
    assert len(updates[-1][1]) == 2 * 4  # two validation prompts at each of the 4 validation steps
    with safe_open(str(home / "adapters" / "sks-lora-content.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["ss_tag_frequency"])["images"] == {"a photo of sks toy": 5}
    assert meta["ss_resolution"] == "(32, 48)"


def test_captions_of_a_folder_round_trip_and_defaults_follow_the_base(studio_env, shape_images, monkeypatch):
    import pandas as pd

    from app import form_defaults, load_caption_table, save_caption_table

    studio, home = studio_env
    rows = load_caption_table(str(shape_images))
    assert rows[0] == ["0.png", "a red solid sks on a white background"] and len(rows) == 5
    rows[0][1], rows[1][1] = "sks, edited caption", ""
    assert "saved 4 captions" in save_caption_table(str(shape_images), pd.DataFrame(rows))
    assert (shape_images / "0.txt").read_text() == "sks, edited caption\n" and not (shape_images / "1.txt").exists()
    assert load_caption_table(str(shape_images))[:2] == [["0.png", "sks, edited caption"], ["1.png", ""]]
    with pytest.raises(gr.Error, match="no such image"):
        save_caption_table(str(shape_images), [["../escape.png", "x"]])
    assert form_defaults(studio, "", "qwe", "content")[0] == "a qwe shape"  # the embedded model's domain
    studio._base.family = "sd15"
    monkeypatch.setattr(studio, "base", lambda spec=None: studio._base)
    instance, validation, class_prompt = form_defaults(studio, "/models/sd15", "qwe", "content")
    assert instance == "a photo of qwe" and "shape" not in validation and class_prompt == "a photo"


def test_training_from_a_folder_on_this_machine(studio_env, shape_images):
    studio, home = studio_env
    last = list(studio.train("", None, None, None, "lora", "content", "sks", 2, 2, 1e-3, 2e-3, "",
                             folder_text=str(shape_images)))[-1]
    assert last[0] == "done: sks-lora-content.safetensors" and shape_images.exists()


def test_training_stop_and_bad_input(studio_env, shape_images):
    studio, home = studio_env
    with pytest.raises(gr.Error, match="Upload a handful"):
        list(studio.train("", [], None, None, "lora", "content", "sks", 4, 2, 1e-3, 2e-3, ""))
    files = sorted(str(p) for p in shape_images.glob("*.png"))
    run = studio.train("", files, None, None, "lora", "content", "sks", 50, 2, 1e-3, 2e-3, "")
    while ": step " not in next(run)[0]:  # past the time estimate, into training
        pass
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
    assert "Mask blur: 4" in parameters  # A1111's default blur, written as A1111 writes it
    mask = np.asarray(Image.open(recipe["mask"]))
    assert mask[:, :32].min() == 255 and mask[:, 32:].max() == 0
    out = np.asarray(Image.open(gallery[0][0]), np.int16)
    kept = np.abs(out - np.asarray(picture, np.int16)).max(axis=(0, 2))
    assert kept[44:].max() <= 1 and kept[32:36].max() > 1  # kept outside the mask, past the blurred seam

    class Event:
        index = 0

    values = recipe_form(app.png_to_form(gallery[0][0]))
    assert [values[k] for k in ("sampler", "schedule", "clip_skip", "strength")] == ["DPM++ 2M", "Karras", 2, 0.6]
    assert values["init"]["background"] == recipe["init_image"] and values["mask_blur"] == 4
    sent, strength = app.send_to_img2img(Event(), gallery)
    assert sent["background"] == gallery[0][0] and strength == 0.75
    hires, _, _ = studio.generate("", *form(hires_scale=1.5, hires_steps=2, hires_upscaler="Latent (bicubic)"),
                                  progress=NoProgress())
    assert Image.open(hires[0][0]).size == (96, 96)
    assert "Hires upscaler: Latent (bicubic)" in read_recipe(hires[0][0])[0]
    assert recipe_form(app.png_to_form(hires[0][0]))["hires_upscaler"] == "Latent (bicubic)"


def test_an_a1111_png_fills_the_form(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a red star <lora:one:0.7>\nNegative prompt: blurry\nSteps: 9, Sampler: Euler a, "
                                "CFG scale: 6, Seed: 77, Size: 64x64, Clip skip: 2, Model hash: 0123456789")
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    values = recipe_form(app.png_to_form(str(path)))
    assert values["rows"][0] == {"on": True, "adapter": "one", "weight": 0.7, "own_prompt": ""}
    assert [values[name] for name in ("prompt", "negative", "seed", "steps", "guidance", "sampler", "schedule",
                                      "clip_skip")] == ["a red star", "blurry", 77, 9, 6.0, "Euler a", "Automatic", 2]
    with pytest.raises(gr.Error, match="no generation parameters"):
        plain = tmp_path / "plain.png"
        Image.new("RGB", (8, 8)).save(plain)
        app.png_to_form(str(plain))


def test_the_caption_button_uses_a_local_model_and_says_when_there_is_none(studio_env, shape_images, tmp_path):
    from app import auto_captions

    with pytest.raises(gr.Error, match="captioning needs --model DIR"):
        auto_captions("", "", sorted(str(p) for p in shape_images.glob("*.png")), "sks")


def test_the_caption_button_fills_the_table_from_uploads(studio_env, shape_images, tiny_blip):
    from app import auto_captions
    from tests.data.test_autocaption import WORDS

    rows = auto_captions(str(tiny_blip), "", sorted(str(p) for p in shape_images.glob("*.png")), "sks")
    assert [row[0] for row in rows] == [f"{i}.png" for i in range(5)]
    assert all(row[1].startswith("sks, ") and set(row[1][5:].split()) <= set(WORDS) for row in rows)
