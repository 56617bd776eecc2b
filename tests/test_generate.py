from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact

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


SHIPPED_MOON = "sks-moon"


def test_weight_zero_gives_the_base_image_and_a_weight_changes_it(tiny_base):
    request = GenerationRequest(prompt="a red solid sks on a white background", seed=2, steps=4)
    plain = _pixels(generate(tiny_base, request)[0])
    for method in ("merge", "composite"):
        off = generate(tiny_base, replace(request, adapters=[(SHIPPED_MOON, 0.0)], method=method))[0]
        assert np.abs(_pixels(off) - plain).max() <= 1, method
    on = generate(tiny_base, replace(request, adapters=[(SHIPPED_MOON, 1.0)]))[0]
    assert np.abs(_pixels(on) - plain).mean() > 1.0


def test_cli_file_weight_equals_python_file_and_weight(tmp_path, tiny_base):
    out = tmp_path / "moon.png"
    assert main(["generate", "--prompt", "a blue solid sks on a gray background", "--seed", "3", "--steps", "4",
                 "--adapter", f"{SHIPPED_MOON}:0.6", "--out", str(out)]) == 0
    python = generate(tiny_base, GenerationRequest(prompt="a blue solid sks on a gray background", seed=3, steps=4,
                                                   adapters=[(SHIPPED_MOON, 0.6)]))[0]
    full = generate(tiny_base, GenerationRequest(prompt="a blue solid sks on a gray background", seed=3, steps=4,
                                                 adapters=[(SHIPPED_MOON, 1.0)]))[0]
    cli = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert np.array_equal(cli, _pixels(python))
    assert not np.array_equal(cli, _pixels(full))  # the weight was read, not dropped


A1111_TEXT = """masterpiece, a (red:1.2) star <lora:demo:0.8>
Negative prompt: blurry
Steps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 42, Size: 64x96, Model hash: 0123456789, \
Model: tiny, Denoising strength: 0.55, Clip skip: 2, Hires upscale: 1.5, Hires steps: 4, \
Hires upscaler: R-ESRGAN 4x+, Mask blur: 8, Lora hashes: "demo: 0123456789ab", Version: v1.10.1"""


def test_an_a1111_png_is_read_into_a_request(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from frontends.generate import request_from_png

    info = PngInfo()
    info.add_text("parameters", A1111_TEXT)
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    request, model = request_from_png(path)
    assert model is None and request.prompt == "masterpiece, a (red:1.2) star"
    assert request.adapters == [("demo", 0.8)] and request.negative_prompt == "blurry"
    assert (request.steps, request.seed, request.guidance_scale) == (12, 42, 6.5)
    assert (request.width, request.height) == (64, 96)
    assert (request.sampler, request.schedule, request.clip_skip) == ("DPM++ 2M", "Karras", 2)
    assert (request.hires_scale, request.hires_steps, request.hires_strength) == (1.5, 4, 0.55)
    assert (request.hires_upscaler, request.mask_blur) == ("R-ESRGAN 4x+", 8.0)  # looked up in upscalers/
    legacy = request_from_parameters_text("a\nSteps: 3, Sampler: DPM++ 2M Karras, Seed: 1")
    assert (legacy.sampler, legacy.schedule) == ("DPM++ 2M", "Karras")


def request_from_parameters_text(text):
    from frontends.generate import request_from_parameters

    return request_from_parameters(text)


def test_from_png_reproduces_every_mode_bit_exactly(tmp_path, tiny_base):
    from PIL import Image

    from studio.samplers import set_sampler

    init, mask, upscaler = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "tiny-compact.safetensors"
    Image.new("RGB", (64, 64), (20, 30, 120)).save(init)
    painted = Image.new("L", (64, 64))
    painted.paste(255, (0, 0, 32, 64))
    painted.save(mask)
    torch.manual_seed(0)
    save_file(Compact(num_feat=8, num_conv=2, upscale=2).state_dict(), upscaler)
    runs = {
        "txt2img": ["--sampler", "Euler a", "--schedule", "Automatic", "--clip-skip", "2"],
        "img2img": ["--init-image", str(init), "--strength", "0.5", "--sampler", "DPM++ 2M", "--schedule", "Karras"],
        "inpaint": ["--init-image", str(init), "--mask", str(mask), "--mask-blur", "6", "--strength", "0.8"],
        "hires": ["--hires-scale", "1.5", "--hires-steps", "3", "--hires-strength", "0.6"],
        "hires-model": ["--hires-scale", "1.5", "--hires-steps", "2", "--hires-upscaler", str(upscaler)],
    }
    try:
        for name, flags in runs.items():
            first, again = tmp_path / f"{name}.png", tmp_path / f"{name}-again.png"
            assert main(["generate", "--prompt", "a (red:1.3) star", "--seed", "5", "--steps", "4", "--out",
                         str(first), *flags]) == 0
            parameters, recipe = read_recipe(first)
            set_sampler(tiny_base.pipe, "DDIM")  # the PNG, not the pipeline's state, decides
            assert main(["generate", "--from-png", str(first), "--out", str(again)]) == 0
            assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again))), name
            assert read_recipe(again)[0] == parameters
        assert "Clip skip: 2" in read_recipe(tmp_path / "txt2img.png")[0]
        assert "Denoising strength: 0.5" in read_recipe(tmp_path / "img2img.png")[0]
        assert "Schedule type: Karras" in read_recipe(tmp_path / "img2img.png")[0]
        assert "Hires upscale: 1.5" in read_recipe(tmp_path / "hires.png")[0]
        assert Image.open(tmp_path / "hires.png").size == (96, 96)
        assert "Mask blur: 6" in read_recipe(tmp_path / "inpaint.png")[0]
        assert "Hires upscaler: tiny-compact" in read_recipe(tmp_path / "hires-model.png")[0]
        assert Image.open(tmp_path / "hires-model.png").size == (96, 96)
    finally:
        set_sampler(tiny_base.pipe, "DDIM")


def test_bad_generation_input_leaves_no_png(tmp_path, capsys):
    from PIL import Image

    out, init = tmp_path / "x.png", tmp_path / "init.jpg"
    Image.new("RGB", (64, 64)).save(init)
    for flags, message in ((["--sampler", "Restart"], "unknown sampler"),
                           (["--init-image", str(tmp_path / "none.png")], "cannot read the init image"),
                           (["--mask", str(tmp_path / "m.png")], "mask needs the image"),
                           (["--init-image", str(tmp_path)], "cannot read the init image"),
                           (["--init-image", str(init), "--strength", "2"], "strength is the fraction"),
                           (["--hires-scale", "2", "--hires-upscaler", "4x-Bogus"], "unknown hires upscaler"),
                           (["--init-image", str(init), "--mask", str(init), "--mask-blur", "-1"], "mask blur is")):
        assert main(["generate", "--prompt", PROMPT, "--steps", "2", "--out", str(out), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*.tmp"))


def test_model_hash_is_the_checkpoint_files_sha256(tmp_path, tiny_base):
    import hashlib
    from dataclasses import replace

    from frontends.generate import model_hash

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    assert model_hash(replace(tiny_base, source=str(checkpoint))) == hashlib.sha256(b"weights").hexdigest()[:10]
    assert model_hash(tiny_base) == tiny_base.fingerprint[:10]
