"""--report_to: accelerate's trackers receive loss, learning rate and validation images."""

import sys

import pytest

from studio.errors import ConfigError
from tests.conftest import make_random_base
from trainers import TrainConfig, get_method, train


def test_tensorboard_event_files_hold_loss_lr_and_previews(tmp_path, shape_images):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(images=shape_images, output="tb", output_dir=tmp_path, max_train_steps=4, train_batch_size=2,
                         rank=2, report_to="tensorboard", validation_prompt="a sks", validation_steps=2,
                         num_validation_images=1, lr_warmup_steps=2, lr_scheduler="linear")
    result = train(config, get_method("lora"), base=make_random_base())
    run = tmp_path / "tb-work" / "logs" / "tb"  # accelerate: <logging dir>/<project name>
    assert list(run.glob("events.out.tfevents.*"))
    reader = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
    loss = reader.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert loss[-1].value == pytest.approx(result.final_loss, rel=1e-5)
    lrs = [e.value for e in reader.Scalars("lr")]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[1]  # warm-up, then the linear decay
    assert [e.step for e in reader.Images("validation")] == [2, 4]


def test_a_missing_tracker_package_is_named_before_the_model_loads(tmp_path, shape_images, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    config = TrainConfig(images=shape_images, output="w", output_dir=tmp_path, report_to="wandb",
                         model=str(tmp_path / "no-model"))
    with pytest.raises(ConfigError, match=r"--report_to wandb needs wandb: pip install 'adapter-studio\[train\]'"):
        train(config, get_method("lora"))
