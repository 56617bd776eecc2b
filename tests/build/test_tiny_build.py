"""The embedded model's build: seeded, resumable, exports a loadable diffusers folder."""

import json

import torch
from safetensors.torch import load_file

from frontends.build.tiny import LatentSet, TinyBuildConfig, TinyBuilder
from pipelines.loading import load_base


def small(**overrides):
    values = dict(num_images=48, vae_steps=2, vae_batch_size=4, diffusion_steps=4, batch_size=4, warmup_steps=2,
                  checkpoint_every=2, export_every=4, pair_images=16, codec_images=40, pair_decoder_steps=2,
                  pairs_from_step=1, pair_fraction=0.5)
    values.update(overrides)
    return TinyBuildConfig(**values)


def test_interrupted_build_resumes_to_the_same_weights(tmp_path):
    TinyBuilder(small(), tmp_path / "a", tmp_path / "a-model" / "tiny-sd").run()
    interrupted = TinyBuilder(small(diffusion_steps=2, export_every=100), tmp_path / "b",
                              tmp_path / "b-model" / "tiny-sd")
    interrupted.run()
    assert torch.load(tmp_path / "b" / "diffusion.pt", weights_only=True)["step"] == 2
    TinyBuilder(small(), tmp_path / "b", tmp_path / "b-model" / "tiny-sd").run()  # resumes at step 2
    for component in ("unet", "text_encoder"):
        a = load_file(str(tmp_path / "a-model" / "tiny-sd" / component / _weights(component)))
        b = load_file(str(tmp_path / "b-model" / "tiny-sd" / component / _weights(component)))
        assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


def test_exported_model_loads_and_generates(tmp_path):
    folder = TinyBuilder(small(), tmp_path / "w", tmp_path / "m" / "tiny-sd").run()
    base = load_base(folder, device="cpu")
    assert base.family == "tiny" and base.domain["build_step"] == 4
    image = base.pipe("a red solid circle on a white background", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert not list(folder.parent.glob("*.staging"))
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["dtype"] == "float32"


def _weights(component: str) -> str:
    return "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"


def test_pair_curriculum_trains_on_two_object_latents_and_captions(tmp_path):
    def batch(fraction: float, step: int):
        builder = TinyBuilder(small(pair_fraction=fraction, pairs_from_step=3, batch_size=64, caption_dropout=0.2),
                              tmp_path / "w", tmp_path / "m" / "tiny-sd")
        singles = LatentSet(torch.zeros(10, 4, 16, 16), torch.zeros(10, 4, 16, 16), torch.ones(10, 77).long())
        pairs = LatentSet(torch.ones(10, 4, 16, 16), torch.zeros(10, 4, 16, 16), torch.full((10, 77), 2))
        empty = torch.zeros(77).long()
        return builder.sample_batch(torch.Generator().manual_seed(0), step, singles, pairs, empty, 2.0)

    x0, tokens = batch(1.0, step=3)
    assert torch.equal(x0, torch.full_like(x0, 2.0))  # the latents the loss is computed on are the pairs'
    captioned = tokens[:, 0] != 0
    assert 0 < (~captioned).sum() < 64 and (tokens[captioned] == 2).all()  # dropped captions stay empty
    x0, tokens = batch(1.0, step=2)  # before the curriculum reaches pairs
    assert not x0.any() and set(tokens[:, 0].tolist()) <= {0, 1}
    x0, tokens = batch(0.0, step=3)
    assert not x0.any() and set(tokens[:, 0].tolist()) <= {0, 1}


def test_builds_from_scratch_are_identical(tmp_path):
    first = TinyBuilder(small(), tmp_path / "a", tmp_path / "a-model" / "tiny-sd").run()
    torch.manual_seed(12345)  # whatever the process's generator holds, the build seeds its own stages
    second = TinyBuilder(small(), tmp_path / "b", tmp_path / "b-model" / "tiny-sd").run()
    for component in ("vae", "unet", "text_encoder"):
        a = load_file(str(first / component / _weights(component)))
        b = load_file(str(second / component / _weights(component)))
        assert all(torch.equal(a[k], b[k]) for k in a), component


def test_only_the_decoder_sees_the_reserved_concepts(tmp_path):
    builder = TinyBuilder(small(), tmp_path / "w", tmp_path / "m" / "tiny-sd")
    reserved = ("moon", "cross", "zigzag", "waves")
    codec = " ".join(builder.codec_data()["captions"])
    assert all(word in codec for word in reserved) and " and a " in codec
    data, pairs = builder.data(), builder.pair_data()
    seen = " ".join(data["captions"]) + " ".join(builder.tokenizer.batch_decode(pairs["ids"]))
    assert not any(word in seen for word in reserved)
    vae = builder.vae(data["images"])
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    tuned = builder.pair_decoder(vae, data["images"], pairs["images"], builder.codec_data()["images"])
    assert all(torch.equal(encoder[k], v) for k, v in tuned.encoder.state_dict().items())
    assert any(not torch.equal(decoder[k], v) for k, v in tuned.decoder.state_dict().items())
