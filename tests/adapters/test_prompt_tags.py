"""A1111's <lora:…> tags: parsed out of the prompt into adapters, resolved by file stem, weighted per part."""

import numpy as np
import pytest
import torch

from studio.adapters.inject import attached_adapters, lora_layers
from studio.adapters.prompt_tags import split_prompt
from studio.errors import ConfigError
from tests.adapters import formats
from tests.conftest import make_random_base


@pytest.fixture(scope="module")
def sd_base():
    return make_random_base(family="sd1")


@pytest.fixture
def library(tmp_path, monkeypatch, sd_base):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    (tmp_path / "adapters" / "styles").mkdir(parents=True)
    formats.kohya_lora(sd_base, tmp_path / "adapters", "sks-moon")
    formats.loha(sd_base, tmp_path / "adapters" / "styles", "ink-wash")
    return tmp_path / "adapters"


def generate(base, prompt, **kwargs):
    return base.pipe(prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=2, height=32,
                     width=32, output_type="np", **kwargs).images


def test_split_prompt_reads_a1111_forms():
    text, tags = split_prompt("a moon <lora:sks-moon:0.7>, night <lyco:ink-wash:0.5:1.2> <lora:x:unet=0.3:te=0>")
    assert text == "a moon , night"
    assert [(t.name, t.text_encoder, t.unet) for t in tags] == [("sks-moon", 0.7, 0.7), ("ink-wash", 0.5, 1.2),
                                                                ("x", 0.0, 0.3)]
    assert split_prompt("<lora:plain>")[1][0].unet == 1.0
    assert split_prompt("a <hypernet:x:1> b") == ("a <hypernet:x:1> b", [])


@pytest.mark.parametrize(("prompt", "message"), [
    ("a moon <lora:sks-moon:0.7", "<lora:sks-moon:0.7' has no closing"),
    ("a <lora:sks-moon:0.7 <lora:b:1>", "<lora:sks-moon:0.7' has no closing"),
    ("a <lora:sks-moon:strong>", "<lora:sks-moon:strong>: weight must be a finite number, not 'strong'"),
    ("a <lora:sks-moon:nan>", "must be a finite number, not 'nan'"),
    ("a <lora:sks-moon:dyn=4>", "unknown parameter 'dyn'"),
])
def test_bad_tags_name_the_tag(prompt, message):
    with pytest.raises(ConfigError, match=message):
        split_prompt(prompt)


def test_a_tag_gives_the_same_image_as_the_adapter_argument(sd_base, library):
    tagged = generate(sd_base, "a sks moon <lora:sks-moon:0.7>")
    given = generate(sd_base, "a sks moon", adapters=[("sks-moon", 0.7)])
    plain = generate(sd_base, "a sks moon")
    assert np.array_equal(tagged, given) and np.abs(tagged - plain).mean() > 1e-4
    sub_folder = generate(sd_base, "a sks moon <lyco:ink-wash:1>")  # found by stem in a sub-folder, as A1111 does
    assert np.abs(sub_folder - plain).mean() > 1e-4


def test_a_tag_may_name_the_alias_in_the_header(sd_base, library):
    from safetensors.torch import save_file

    from studio.adapters.prompt_tags import AdapterTag, resolve_tag

    path = library / "styles" / "v3-final.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1), "lora_unet_x.lora_up.weight": torch.zeros(1, 1)},
              str(path), metadata={"ss_output_name": "watercolor"})
    assert resolve_tag(AdapterTag("<lora:watercolor>", "watercolor", 1.0, 1.0)) == path
    assert resolve_tag(AdapterTag("<lora:v3-final>", "v3-final", 1.0, 1.0)) == path


def test_adapter_names_resolve_in_sub_folders_with_close_matches(library):
    from studio.adapters.library import resolve_adapter
    from studio.errors import AdapterError

    assert resolve_adapter("ink-wash") == library / "styles" / "ink-wash.safetensors"
    with pytest.raises(AdapterError, match="close matches: ink-wash"):
        resolve_adapter("ink_wash")


def test_a_bad_tag_leaves_the_pipeline_as_it_was(sd_base, library):
    before_names, before = attached_adapters(sd_base), generate(sd_base, "a sks moon")
    for prompt in ("a sks moon <lora:sks-moon:0.7", "a sks moon <lora:sks-moon:lots>"):
        with pytest.raises(ConfigError, match="<lora:sks-moon"):
            generate(sd_base, prompt)
        assert attached_adapters(sd_base) == before_names
        assert np.array_equal(generate(sd_base, "a sks moon"), before)


def test_unknown_names_list_close_matches_and_attach_nothing(sd_base, library):
    before = attached_adapters(sd_base)
    with pytest.raises(ConfigError, match="no adapter named 'sks-mon'; close matches: sks-moon"):
        generate(sd_base, "a <lora:sks-moon:1> <lora:sks-mon:1>")
    assert attached_adapters(sd_base) == before


def factors_during(base, prompt, **kwargs) -> list[tuple[str, str, float]]:
    """(component, layer path, weight factor) of every active adapter layer, seen while the pipeline runs."""
    seen = []

    def look(pipe, step, timestep, tensors):
        if step == 0:
            seen.extend((c, path, round(layer.scaling[n] / (layer.lora_alpha[n] / layer.r[n]), 6))
                        for c, path, layer in lora_layers(base) for n in layer.active_adapters)
        return tensors

    generate(base, prompt, callback_on_step_end=look, **kwargs)
    return seen


def test_text_encoder_and_unet_weights_are_separate(sd_base, library):
    seen = factors_during(sd_base, "a sks moon <lora:sks-moon:0.25:0.75>")
    scales = {component: {f for c, _, f in seen if c == component} for component in ("unet", "text_encoder")}
    assert scales == {"unet": {0.75}, "text_encoder": {0.25}}
    only_unet = generate(sd_base, "a sks moon <lora:sks-moon:0:1>")
    both = generate(sd_base, "a sks moon <lora:sks-moon:1:1>")
    assert np.abs(only_unet - both).mean() > 0


def test_per_block_weights_in_diffusers_dict_form(sd_base, library):
    seen = {}
    weight = {"unet": {"down": 0.5, "mid": 0.0, "up": {"block_0": 2.0}}}
    for component, path, factor in factors_during(sd_base, "a sks moon", adapters=[("sks-moon", weight)]):
        if component == "unet":
            seen.setdefault(path.split(".")[0] + ("." + path.split(".")[1] if path.startswith("up") else ""),
                            set()).add(factor)
    assert seen["down_blocks"] == {0.5} and seen["mid_block"] == {0.0} and seen["up_blocks.0"] == {2.0}
    assert seen["up_blocks.1"] == {1.0}
    recipe = sd_base.pipe("a sks moon", generator=torch.Generator().manual_seed(0), num_inference_steps=2, height=32,
                          width=32, output_type="np", adapters=[("sks-moon", weight)]).recipe
    [[name, weight]] = recipe["adapters"]
    assert weight == 1.0 and recipe["adapter_weights"][name]["blocks"] == {"down": 0.5, "mid": 0.0, "up.0": 2.0}
    with pytest.raises(ConfigError, match="unet blocks are down, mid and up"):
        generate(sd_base, "a", adapters=[("sks-moon", {"unet": {"middle": 1.0}})])


def test_cli_generate_takes_lycoris_files_and_tags(tmp_path, monkeypatch, tiny_base):
    from PIL import Image

    from frontends.cli import main

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    (tmp_path / "adapters").mkdir()
    formats.lokr(tiny_base, tmp_path / "adapters", "knit")
    common = ["--steps", "2", "--seed", "1"]
    assert main(["generate", "--prompt", "a red solid sks <lyco:knit:0.6>", *common,
                 "--out", str(tmp_path / "a.png")]) == 0
    assert main(["generate", "--prompt", "a red solid sks", "--adapter", "knit:0.6", *common,
                 "--out", str(tmp_path / "b.png")]) == 0
    assert main(["generate", "--prompt", "a red solid sks", *common, "--out", str(tmp_path / "c.png")]) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=float) for n in "abc")
    assert np.array_equal(a, b) and np.abs(a - c).mean() > 0
