"""An adapter weight is read by one rule whichever way it comes in, and each adapter file is looked up, versioned
and read once per image (hires fix's second pass and the PNG's hashes included)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import gradio as gr
import pytest
import torch
from PIL import Image

import app
import pipelines.engine as engine
from frontends.cli import parse_adapter_spec
from frontends.generate import GenerationRequest, generate, request_from_parameters
from pipelines import CompositionPipeline
from pipelines.engine import adapter_spec
from studio.adapters.file import save_adapter
from studio.adapters.prompt_tags import split_prompt
from studio.adapters.weights import adapter_weight
from studio.errors import ConfigError
from tests.app.conftest import form
from tests.conftest import make_adapter, make_random_base

WEIGHTS = Path(adapter_weight.__code__.co_filename)


def _origin(error: BaseException) -> tuple[Path, str]:
    """File and function the exception was raised in."""
    trace = error.__traceback__
    while trace.tb_next is not None:
        trace = trace.tb_next
    return Path(trace.tb_frame.f_code.co_filename), trace.tb_frame.f_code.co_name


def _app_request(weight: str) -> None:
    values = form(rows=["one"], weight=weight)
    try:
        app.Studio().request(values[: 4 * app.ROWS], *values[4 * app.ROWS :])
    except gr.Error as error:  # the app shows the rule's own words
        raise error.__cause__ from None


@pytest.fixture
def pipe_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    base = make_random_base()
    pipe = CompositionPipeline.from_base(base)
    given = save_adapter(make_adapter(base, seed=1), tmp_path / "given.safetensors")
    save_adapter(make_adapter(base, seed=2), tmp_path / "home" / "adapters" / "tagged.safetensors")
    return pipe, given


@pytest.mark.parametrize("entry", [
    pytest.param(lambda file: parse_adapter_spec(f"{file}:strong"), id="cli FILE:W"),
    pytest.param(lambda file: parse_adapter_spec(f"{file}:inf"), id="cli FILE:inf"),
    pytest.param(lambda file: split_prompt("a moon <lora:tagged:1e999>"), id="prompt tag"),
    pytest.param(lambda file: split_prompt("a moon <lora:tagged:te=0.5:unet=x>"), id="prompt tag unet="),
    pytest.param(lambda file: _app_request("strong"), id="app row"),
    pytest.param(lambda file: request_from_parameters("a moon <lora:x:1.2.3>\nSteps: 2, Seed: 1"),
                 id="A1111 parameters"),
    pytest.param(lambda file: adapter_spec((file, float("nan"))), id="python (file, w)"),
    pytest.param(lambda file: adapter_spec((file, {"unet": {"down": "deep"}})), id="python dict form"),
])
def test_a_bad_weight_is_refused_by_the_one_rule_from_every_entry_point(entry, pipe_and_file):
    _, given = pipe_and_file
    with pytest.raises(ConfigError, match="must be a finite number, not") as raised:
        entry(given)
    assert _origin(raised.value) == (WEIGHTS, "scalar_weight")


def test_a_bad_weight_through_generate_leaves_the_pipeline_as_it_was(pipe_and_file):
    pipe, given = pipe_and_file
    with pytest.raises(ConfigError, match="must be a finite number, not inf") as raised:
        generate(pipe.studio_base(), GenerationRequest(prompt="a sks", adapters=[(str(given), float("inf"))]))
    assert _origin(raised.value) == (WEIGHTS, "scalar_weight")
    assert not pipe._loaded()


def test_each_adapter_file_is_resolved_once_per_image(pipe_and_file, monkeypatch):
    """One image with hires fix (two pipeline passes), a given adapter and a prompt tag, written with A1111's
    Lora hashes: each file is looked up once, its version read from the file system as often as one attach
    does, and (new to the pipeline) read once."""
    pipe, given = pipe_and_file
    files = {os.path.realpath(path) for path in (given, given.parent / "home" / "adapters" / "tagged.safetensors")}
    counts = {"stat": 0, "lookup": 0, "read": 0}
    real_stat, real_lookup, real_read = os.stat, engine.resolve_adapter, engine.read_adapter

    def stat(path, *args, **kwargs):
        if isinstance(path, str | os.PathLike) and os.path.realpath(path) in files:  # realpath: lstat only
            counts["stat"] += 1
        return real_stat(path, *args, **kwargs)

    def counted(kind, function):
        def wrapper(*args, **kwargs):
            counts[kind] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(engine, "resolve_adapter", counted("lookup", real_lookup))
    monkeypatch.setattr(engine, "read_adapter", counted("read", real_read))
    digest = hashlib.sha256(given.read_bytes()).hexdigest()[:12]
    request = GenerationRequest(prompt="a red solid sks <lora:tagged:0.5>", adapters=[(str(given), 0.8)], steps=2,
                                method="composite", hires_scale=1.5, hires_steps=2)

    def image() -> dict[str, int]:
        counts.update(stat=0, lookup=0, read=0)
        result = generate(pipe.studio_base(), request)[0]
        assert f'Lora hashes: "given: {digest}"' in result.parameters and "Hires upscale: 1.5" in result.parameters
        assert len(result.recipe["composition"]["adapters"]) == 2
        return dict(counts)

    first = image()
    assert first["lookup"] == 2 and first["read"] == 2  # new files: each looked up and read once
    again = image()
    counts.update(stat=0, lookup=0, read=0)
    pipe.compose_adapters(request.prompt, request.adapters)  # what attaching the image's adapters once costs
    assert again == {"stat": counts["stat"], "lookup": 2, "read": 0}
    assert counts["stat"] > 0  # the count sees the file system


def test_a_call_leaves_no_per_call_state_on_the_pipeline(pipe_and_file):
    """What one call composes (adapters, their weights and factors, the init image, the UNet's extra inputs) is
    passed along and returned, not left on the pipeline: only its per-pipeline caches remain."""
    pipe, given = pipe_and_file
    pipe("a red solid sks", num_inference_steps=1, output_type="latent")  # what a plain call sets, as diffusers'
    before = set(vars(pipe))
    output = pipe("a red solid sks", image=Image.new("RGB", (64, 64), "red"), strength=0.5, num_inference_steps=2,
                  adapters=[(given, {"unet": {"down": 0.5}}), "tagged"], method="clora", output_type="np",
                  generator=torch.Generator().manual_seed(0))
    assert output.adapters.names == [name for name, _ in output.recipe["adapters"]]
    assert output.adapters[0].layers is not None and output.adapters[1].triggers == ("sks",)
    assert set(vars(pipe)) == before
    assert {key for key in before if key.startswith("_studio")} == {"_studio_base", "_studio_loaded"}


def test_an_attached_set_runs_again_and_an_evicted_one_is_refused(pipe_and_file, tmp_path):
    pipe, given = pipe_and_file
    attached = pipe.attach_adapters([(given, 0.7)])

    def image(adapters):
        return pipe("a sks", num_inference_steps=2, adapters=adapters, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    assert (image(attached) == image([(given, 0.7)])).all()
    pipe.max_loaded_adapters = 1
    pipe.attach_adapters(["tagged"])
    with pytest.raises(ConfigError, match="no longer attached"):
        image(attached)
