import numpy as np

from frontends.cli import main
from frontends.generate import GenerationRequest, generate
from studio.png import read_recipe

PROMPT = "a red striped star on a white background"


def _pixels(result):
    return np.asarray(result.image, dtype=np.int16)


def test_same_seed_same_image_and_different_seed_differs(tiny_base):
    request = GenerationRequest(prompt=PROMPT, seed=3, steps=8)
    first, second = generate(tiny_base, request)[0], generate(tiny_base, request)[0]
    other = generate(tiny_base, GenerationRequest(prompt=PROMPT, seed=4, steps=8))[0]
    assert np.array_equal(_pixels(first), _pixels(second))
    assert np.abs(_pixels(first) - _pixels(other)).mean() > 1.0


def test_parameters_follow_a1111(tiny_base):
    result = generate(tiny_base, GenerationRequest(prompt=PROMPT, negative_prompt="blurry", seed=7, steps=5))[0]
    lines = result.parameters.splitlines()
    assert lines[0] == PROMPT
    assert lines[1] == "Negative prompt: blurry"
    assert "Steps: 5" in lines[2] and "Seed: 7" in lines[2] and "Size: 64x64" in lines[2]
    assert "Sampler: DDIM" in lines[2]
    guided = generate(tiny_base, GenerationRequest(prompt=PROMPT, negative_prompt="a striped shape", seed=7, steps=2,
                                                   perp_neg=[("a striped shape", 1.5)], decor_remove=["star"],
                                                   decor_alpha=0.5))[0]
    assert 'Perp-Neg: "a striped shape: 1.5"' in guided.parameters
    assert 'DECOR: star (alpha 0.5)' in guided.parameters


def test_cli_generate_writes_a_reproducible_png(tmp_path, tiny_base):
    out = tmp_path / "image.png"
    assert main(["generate", "--prompt", PROMPT, "--seed", "5", "--steps", "6", "--out", str(out)]) == 0
    parameters, recipe = read_recipe(out)
    assert parameters.startswith(PROMPT) and "Seed: 5" in parameters
    assert recipe["seed"] == 5 and recipe["steps"] == 6 and recipe["model_fingerprint"] == tiny_base.fingerprint
    again = generate(tiny_base, GenerationRequest(prompt=recipe["prompt"], seed=recipe["seed"], steps=recipe["steps"],
                                                  guidance_scale=recipe["guidance_scale"]))[0]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(again.image))
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_reports_bad_model_without_traceback(tmp_path, capsys):
    code = main(["generate", "--prompt", PROMPT, "--model", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "x.png")])
    assert code == 2
    assert "no model at" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
