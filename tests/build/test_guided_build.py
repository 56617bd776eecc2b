"""The guided fine-tune: continues an exported model on noisy captions, seeded and resumable."""

import json

import pytest
import torch
from safetensors.torch import load_file

import frontends.cli
from frontends.build.guided import build_guided
from frontends.build.tiny import LatentSet, TinyBuilder
from frontends.cli import main
from studio.errors import ConfigError
from tests.build.test_tiny_build import small


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    return TinyBuilder(small(), root / "work", root / "model" / "tiny-sd").run()


def guided(start, **overrides):
    values = dict(start_from=str(start), caption_drop_attribute=0.3, caption_wrong_attribute=0.2,
                  pairs_from_step=0, export_every=2, learning_rate=1e-4)
    values.update(overrides)
    return small(**values)


def _unet(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_interrupted_fine_tune_resumes_to_the_same_weights(start_model, tmp_path):
    whole = build_guided(guided(start_model), tmp_path / "a", tmp_path / "a-model" / "guided")

    def stop_at_step_3(stage, step, total, logs):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        TinyBuilder(guided(start_model), tmp_path / "b", tmp_path / "b-model" / "guided", progress=stop_at_step_3,
                    interim_export_dir=tmp_path / "b" / "interim" / "guided").run()
    assert torch.load(tmp_path / "b" / "diffusion.pt", weights_only=True)["step"] == 2
    assert (tmp_path / "b" / "interim" / "guided" / "studio_model.json").exists()  # the step-2 export
    assert not (tmp_path / "b-model").exists()  # the output folder only gets the finished model
    resumed = build_guided(guided(start_model), tmp_path / "b", tmp_path / "b-model" / "guided")
    a, b = _unet(whole), _unet(resumed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)
    states = [torch.load(tmp_path / run / "diffusion.pt", weights_only=True) for run in ("a", "b")]
    for name in ("unet", "text_encoder"):  # fp32 training weights: every step's captions were the same
        assert all(torch.allclose(v, states[1][name][k], rtol=0, atol=1e-6) for k, v in states[0][name].items())
    domain = json.loads((whole / "studio_model.json").read_text())
    assert domain["build_step"] == 4
    assert domain["build_config"]["caption_drop_attribute"] == 0.3
    assert domain["build_config"]["caption_wrong_attribute"] == 0.2
    started = json.loads((start_model / "studio_model.json").read_text())
    assert domain["fine_tuned_from"] == {"model": str(start_model), "build_step": 4,
                                         "build_config": started["build_config"]}
    # the start model's VAE is kept as it is; its UNet moved only a little
    start_vae = load_file(str(start_model / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, start_vae[k])
               for k, v in load_file(str(whole / "vae" / "diffusion_pytorch_model.safetensors")).items())
    start = _unet(start_model)
    assert any(not torch.equal(start[k], a[k]) for k in a)
    assert all(torch.allclose(start[k].float(), a[k].float(), atol=0.05) for k in a)


def test_noisy_captions_change_the_words_not_the_images(tmp_path):
    singles = LatentSet(torch.randn(10, 4, 16, 16), torch.zeros(10, 4, 16, 16), torch.ones(10, 77).long(),
                        scenes=[("red", "solid", "circle", "white")] * 10)
    pairs = LatentSet(torch.randn(10, 4, 16, 16), torch.zeros(10, 4, 16, 16), torch.full((10, 77), 2),
                      scenes=[(("blue", "dotted", "star"), ("green", "striped", "square"), "black")] * 10)

    def batch(**overrides):
        builder = TinyBuilder(guided("unused", batch_size=64, caption_dropout=0.0, **overrides), tmp_path / "w")
        x0, tokens = builder.sample_batch(torch.Generator().manual_seed(0), 5, singles, pairs, torch.zeros(77).long(),
                                          1.0)
        return x0, tokens, builder.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    clean_x0, clean_tokens, _ = batch(caption_drop_attribute=0.0, caption_wrong_attribute=0.0)
    assert set(clean_tokens.unique().tolist()) == {1, 2}  # without noise the stored tokens are used as they are
    noisy_x0, _, noisy = batch()
    assert torch.equal(clean_x0, noisy_x0)  # the images and torch's random stream are the same
    single_captions = [c for c in noisy if " and " not in c]
    pair_captions = [c for c in noisy if " and " in c]
    assert single_captions and pair_captions
    assert "a red solid circle on a white background" in single_captions and len(set(single_captions)) > 3
    assert any("blue" not in c for c in pair_captions)
    assert any(c.endswith("and a green striped square") for c in pair_captions)  # background left out
    assert noisy == batch()[2]  # seeded by (seed, step)


def test_build_guided_refuses_other_settings_in_the_same_work_dir(start_model, tmp_path):
    first = build_guided(guided(start_model, diffusion_steps=1), tmp_path / "w", tmp_path / "m" / "guided")
    second = build_guided(guided(first, diffusion_steps=1, caption_wrong_attribute=0.1), tmp_path / "w2",
                          tmp_path / "m" / "guided-2")  # a continuation records the whole lineage
    lineage = json.loads((second / "studio_model.json").read_text())["fine_tuned_from"]
    assert lineage["model"] == str(first) and lineage["build_config"]["caption_wrong_attribute"] == 0.2
    assert lineage["fine_tuned_from"]["model"] == str(start_model)
    with pytest.raises(ConfigError, match="other settings"):
        build_guided(guided(start_model, diffusion_steps=1, caption_wrong_attribute=0.0), tmp_path / "w",
                     tmp_path / "m" / "guided")
    with pytest.raises(ConfigError, match="caption noise"):
        TinyBuilder(guided(start_model, caption_drop_attribute=0.9), tmp_path / "x")


def test_build_guided_command_passes_its_flags(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(frontends.cli, "build_guided",
                        lambda config, work_dir, export_dir: seen.append((config, work_dir, export_dir)) or export_dir)
    assert main(["build-guided", "--caption-drop-attribute", "0.25", "--caption-wrong-attribute", "0.05",
                 "--max_train_steps", "12", "--work-dir", str(tmp_path / "w"), "--output", str(tmp_path / "m")]) == 0
    config, work_dir, export_dir = seen[0]
    assert (config.caption_drop_attribute, config.caption_wrong_attribute, config.diffusion_steps) == (0.25, 0.05, 12)
    assert config.start_from == "assets/tiny-sd" and work_dir == tmp_path / "w" and export_dir == tmp_path / "m"
    monkeypatch.undo()
    assert main(["build-guided", "--caption-drop-attribute", "0.9", "--caption-wrong-attribute", "0.5",
                 "--work-dir", str(tmp_path / "x"), "--output", str(tmp_path / "m")]) == 2
    assert "caption noise" in capsys.readouterr().err and not (tmp_path / "x" / "build_config.json").exists()
