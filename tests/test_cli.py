"""The studio command line end to end on the embedded model."""

import json

import pytest
from safetensors import safe_open

from frontends.cli import main, parse_adapter_spec, parse_option, parse_weighted_text
from studio.errors import ConfigError
from studio.png import read_recipe
from trainers.b4m import B4MConfig


def test_train_then_generate_with_the_adapter(tmp_path, shape_images, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    assert main(["train", "lora", "--images", str(shape_images), "--output", "cli-moon", "--max_train_steps", "2",
                 "--rank", "2", "--seed", "1", "--save_as", "kohya"]) == 0
    path = tmp_path / "home" / "adapters" / "cli-moon.safetensors"
    with safe_open(str(path), "pt") as handle:
        assert all(k.startswith("lora_unet_") for k in handle.keys())
        assert handle.metadata()["ss_steps"] == "2"
    out = tmp_path / "image.png"
    assert main(["generate", "--prompt", "a red solid sks on a white background", "--adapter", "cli-moon:0.7",
                 "--adapter", str(path), "--method", "composite", "--steps", "3", "--out", str(out)]) == 0
    parameters, recipe = read_recipe(out)
    assert "<lora:cli-moon:0.7>" in parameters and "Lora hashes: " in parameters
    assert recipe["method"] == "composite" and recipe["adapters"][0] == ["cli-moon", 0.7]
    capsys.readouterr()
    assert main(["adapters", "list"]) == 0
    assert "cli-moon" in capsys.readouterr().out


def test_cli_errors_are_messages(tmp_path, capsys):
    assert main(["generate", "--prompt", "x", "--adapter", "missing-adapter", "--out", str(tmp_path / "x.png")]) == 2
    assert "no adapter 'missing-adapter'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused by the parser, before the model loads
        main(["generate", "--prompt", "x", "--method", "blend", "--adapter", "sks-moon"])
    assert "argument --method: invalid choice: 'blend'" in capsys.readouterr().err
    assert main(["train", "lora", "--images", str(tmp_path / "none"), "--output", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_argument_parsers():
    assert parse_adapter_spec("a/b/sks-moon.safetensors:0.5") == ("a/b/sks-moon.safetensors", 0.5)
    assert parse_adapter_spec("sks-moon") == ("sks-moon", 1.0)
    with pytest.raises(ConfigError, match="must be a finite number, not 'strong'"):
        parse_adapter_spec("sks-moon:strong")
    assert parse_option("interval=3") == ("interval", 3) and parse_option("use_cache=false") == ("use_cache", False)
    assert parse_weighted_text("a striped shape:2") == ("a striped shape", 2.0)
    assert parse_weighted_text("a striped shape") == ("a striped shape", 1.5)
    assert json.dumps(parse_option("mode=paper")) == '["mode", "paper"]'
    assert parse_option('groups=[["red"], ["blue"]]') == ("groups", [["red"], ["blue"]])
    with pytest.raises(ConfigError, match="not a JSON list"):
        parse_option("groups=[red]")


def test_train_b4m_flags_reach_the_b4m_config(tmp_path, shape_images, monkeypatch):
    """Each stage's rate and the PLP layers come from their own flags, --rank is B4M's rank as every trainer's;
    what is not given keeps B4MConfig's defaults (the make rate: --learning_rate)."""
    import trainers

    seen = []
    monkeypatch.setattr(trainers, "train_b4m", lambda b4m, config, **_: seen.append((b4m, config)) or [])
    common = ["train", "b4m", "--content", str(shape_images), "--style", str(shape_images), "--output", "duo",
              "--output_dir", str(tmp_path), "--learning_rate", "1e-3", "--style_learning_rate", "3e-3"]
    assert main([*common, "--make_learning_rate", "3e-4", "--target_modules", "to_q", "conv1",
                 "--b4m_prior", "all", "--rank", "8"]) == 0
    assert main(common) == 0
    assert main([*common, "--b4m_rank", "12"]) == 0
    (first, config), (second, _), (third, _) = seen
    assert (first.learning_rate, first.style_learning_rate, first.make_learning_rate) == (1e-3, 3e-3, 3e-4)
    assert first.target_modules == ("to_q", "conv1") and config.output == "duo"
    assert second.make_learning_rate is None and second.learning_rate == 1e-3
    assert (first.prior, second.prior) == ("all", "square")
    assert (first.rank, second.rank, third.rank) == (8, B4MConfig().rank, 12)
    assert second.break_steps == B4MConfig().break_steps and second.content_trigger == B4MConfig().content_trigger


def test_app_command_takes_the_documented_flags(tmp_path, monkeypatch):
    import gradio as gr

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.update(kwargs))
    assert main(["app", "--host", "0.0.0.0", "--port", "8080", "--auth", "user:pass"]) == 0
    assert (seen["server_name"], seen["server_port"], seen["auth"]) == ("0.0.0.0", 8080, ("user", "pass"))


@pytest.mark.parametrize("argv, message", [
    (["train", "lora", "--images", ".", "--max_train_steps", "-5"], "--max_train_steps: must be at least 1, not -5"),
    (["train", "lora", "--images", ".", "--rank", "0"], "--rank/--network_dim: must be at least 1, not 0"),
    (["generate", "--prompt", "a star", "--steps", "0"], "--steps/--num_inference_steps: must be at least 1, not 0"),
    (["train", "b4m", "--content", ".", "--style", ".", "--make_steps", "x"], "'x' is not a whole number"),
])
def test_counts_out_of_range_are_refused_before_anything_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_profiling_a_shipped_adapter_leaves_it_as_installed_and_stores_a_library_copy(tmp_path, monkeypatch):
    from studio.adapters.file import read_adapter
    from studio.adapters.library import SHIPPED

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    shipped = SHIPPED / "zwx-zigzag.safetensors"
    before = shipped.read_bytes()
    assert main(["adapters", "profile", "zwx-zigzag", "--steps", "2"]) == 0
    assert shipped.read_bytes() == before
    copy = read_adapter(tmp_path / "home" / "adapters" / "zwx-zigzag.safetensors")
    profile = json.loads(copy.metadata["studio.freq_profile"])
    assert profile["n_pairs"] == 8
    from studio.adapters.library import list_adapters

    [row] = [r for r in list_adapters() if r.path == copy.path]
    assert row.frequency_class == profile["class"]  # the library shows CMLoRA's class once profiled


def test_generate_without_out_numbers_images_as_a1111_and_never_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_OUTPUTS", str(tmp_path / "outputs"))
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "00007-3.png").write_bytes(b"kept")
    for seed in (1, 1):
        assert main(["generate", "--prompt", "a red solid star on a white background", "--steps", "2",
                     "--seed", str(seed)]) == 0
    names = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert names == ["00007-3.png", "00008-1.png", "00009-1.png"]
    assert (tmp_path / "outputs" / "00007-3.png").read_bytes() == b"kept"
    assert read_recipe(tmp_path / "outputs" / "00009-1.png")[1]["seed"] == 1


def test_demo_images_render_a_captioned_folder_for_every_reserved_concept(tmp_path):
    from studio.data import procedural

    for concept in procedural.RESERVED_SHAPES + procedural.RESERVED_TEXTURES:
        folder = tmp_path / concept
        assert main(["demo-images", str(folder), "--concept", concept, "--trigger", "qqq", "--count", "3"]) == 0
        captions = [p.read_text() for p in sorted(folder.glob("*.txt"))]
        assert len(captions) == 3 == len(list(folder.glob("*.png"))) and all("qqq" in c for c in captions)
        assert not any(concept in c for c in captions)  # the trigger stands for the concept


def test_adapters_list_names_files_as_they_are_used_and_reports_unreadable_ones(tmp_path, monkeypatch, capsys):
    from studio.adapters.file import save_adapter
    from tests.conftest import make_adapter, make_random_base

    library = tmp_path / "home" / "adapters"
    library.mkdir(parents=True)
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    adapter = make_adapter(make_random_base())
    adapter.metadata["ss_output_name"] = "last"  # kohya's name for the final epoch, not the file's
    save_adapter(adapter, library / "my-style_v2.safetensors")
    (library / "junk.safetensors").write_bytes(b"\x00" * 40)
    assert main(["adapters", "list"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "KIND", "METHOD", "RANK"]
    assert lines[1].startswith("my-style_v2 ") and not any(line.startswith("last ") for line in lines)
    assert "skipped" in err and "junk.safetensors" in err


def test_train_lora_takes_target_modules(tmp_path, shape_images, monkeypatch):
    from studio.adapters.file import read_adapter

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    assert main(["train", "lora", "--images", str(shape_images), "--output", "wide", "--max_train_steps", "1",
                 "--rank", "2", "--target_modules", "to_k", "conv1"]) == 0
    paths = read_adapter(tmp_path / "home" / "adapters" / "wide.safetensors").modules["unet"]
    assert {path.rsplit(".", 1)[-1] for path in paths} == {"to_k", "conv1"}
