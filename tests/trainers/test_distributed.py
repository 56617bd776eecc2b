"""Two processes under accelerate (DDP over gloo on the CPU) train what one process trains, and resume from it."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from frontends.cli import main
from studio.errors import ConfigError
from trainers import TrainConfig, get_method, train

ROOT = Path(__file__).resolve().parents[2]


def arguments(images, out, name):
    return ["train", "lora", "--images", str(images), "--output_dir", str(out), "--output", name,
            "--max_train_steps", "4", "--train_batch_size", "2", "--rank", "2", "--checkpointing_steps", "2",
            "--seed", "1", "--device", "cpu", "--learning_rate", "5e-3"]


def assert_same(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol), (key, (a[key] - b[key]).abs().max())


@pytest.fixture
def style_images(tmp_path):
    import numpy as np
    from PIL import Image

    from studio.data import procedural

    folder = tmp_path / "style"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, shape in enumerate(["circle", "square", "heart"]):
        Image.fromarray(procedural.render(procedural.jittered_scene(rng, "orange", "zigzag", shape, "gray"))).save(
            folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a orange zwx {shape} on a gray background")
    return folder


def free_port() -> str:
    """A port no one listens on, so a launch never meets the previous one's rendezvous still closing."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def test_two_processes_equal_one_and_a_resume_continues_their_run(tmp_path, shape_images):
    out = tmp_path / "out"
    # torchrun through accelerate: accelerate's --cpu launcher starts one process unless mpirun is given a hostfile
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", free_port(), "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "frontends.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(launch + arguments(shape_images, out, "two"), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = out / "two-work" / "checkpoints" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == ["random_states_0.pkl",
                                                                            "random_states_1.pkl"]
    two = load_file(str(out / "two.safetensors"))

    assert main(arguments(shape_images, out, "one")) == 0  # one process, the same global batch
    one = load_file(str(out / "one.safetensors"))
    assert_same(one, two)
    assert max(v.abs().max() for k, v in one.items() if "lora_B" in k or "lora_up" in k) > 0

    (out / "two.safetensors").unlink()  # resume the two-process run from its step-2 checkpoint, in one process
    assert main(arguments(shape_images, out, "two") + ["--resume_from_checkpoint", "latest"]) == 0
    assert_same(load_file(str(out / "two.safetensors")), two)


def test_sara_and_b4m_on_two_processes_equal_one(tmp_path, shape_images, style_images):
    """SaRA's sparse values (re-selected at T/2, so wrapped anew) and B4M's halves, synced by DDP."""
    from tests.trainers.distributed_methods import run

    script = Path(__file__).with_name("distributed_methods.py")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", free_port(), "--mixed_precision", "no",
              "--dynamo_backend", "no", str(script)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(launch + [str(shape_images), str(style_images), str(tmp_path / "two")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run(shape_images, style_images, tmp_path / "one")
    names = ["sara.sara.safetensors", "b4m-content.safetensors", "b4m-style.safetensors", "b4m.safetensors"]
    for name in names:
        one, two = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert_same(one, two, atol=1e-4 if name.startswith("sara") else 1e-5)  # Adam on near-zero gradients


def test_a_global_batch_that_cannot_be_split_is_refused_before_the_model_loads(tmp_path, shape_images,
                                                                                 monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    config = TrainConfig(images=shape_images, output="x", output_dir=tmp_path, train_batch_size=2,
                         model=str(tmp_path / "no-model"))
    with pytest.raises(ConfigError, match="--train_batch_size 2 is the global batch and cannot be split evenly"):
        train(config, get_method("lora"))
