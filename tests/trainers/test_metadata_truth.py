"""Every trainer's file states what was trained: rank and alpha from its tensors, the learning rate its optimizer
ran at (not the TrainConfig default), and the steps run."""

import json

import pytest
from safetensors import safe_open

from studio.adapters.file import read_adapter
from tests.conftest import make_random_base
from trainers import TrainConfig, get_method, train
from trainers.colora import CoLoRAConfig, CoLoRAMethod
from trainers.sara import SaraConfig, SaraMethod, sara_learning_rate

CASES = {
    # trainer: (method factory, the rate its optimizer must have used)
    "lora": (lambda: get_method("lora"), 7e-3),
    "sara": (lambda: SaraMethod(SaraConfig(threshold=5e-3, progressive=False)), sara_learning_rate(5e-3)),
    "colora": (lambda: CoLoRAMethod(CoLoRAConfig(probe_rank=4, probe_steps=1, path_points=2, probe_samples=2,
                                                 budget_rank=4, min_rank=2, max_rank=8)), 7e-3),
}


@pytest.mark.parametrize("trainer", list(CASES))
def test_metadata_is_what_was_trained(trainer, tmp_path, shape_images):
    make, rate = CASES[trainer]
    config = TrainConfig(images=shape_images, output=trainer, output_dir=tmp_path, max_train_steps=2,
                         train_batch_size=2, rank=2, learning_rate=7e-3)
    result = train(config, make(), base=make_random_base())
    path = result.outputs[-1]
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    adapter = read_adapter(path)
    modules = [m for mods in adapter.modules.values() for m in mods.values()]
    ranks = [m.rank for m in modules]
    alphas = [m.alpha for m in modules]
    assert json.loads(meta["ss_network_dim"]) == max(set(ranks), key=ranks.count)
    assert json.loads(meta["ss_network_alpha"]) == max(set(alphas), key=alphas.count)
    assert json.loads(meta["ss_learning_rate"]) == pytest.approx(rate)
    assert json.loads(meta["ss_steps"]) == result.steps == 2


def test_b4m_files_state_each_stage_rates(tmp_path, shape_images):
    from trainers.b4m import B4MConfig, train_b4m

    b4m = B4MConfig(content=shape_images, style=shape_images, rank=4, break_steps=1, make_steps=1,
                    aux_images_per_set=2, main_learning_rate=1e-2, aux_learning_rate=1e-3, make_learning_rate=3e-3)
    config = TrainConfig(output="duo", output_dir=tmp_path, train_batch_size=2, seed=0)
    content, _, made = train_b4m(b4m, config, base=make_random_base())
    content_meta, made_meta = read_adapter(content).metadata, read_adapter(made).metadata
    assert sorted(json.loads(content_meta["studio.learning_rates"])) == [1e-3, 1e-2]
    assert json.loads(made_meta["ss_learning_rate"]) == pytest.approx(3e-3)
    assert json.loads(made_meta["ss_steps"]) == 1
    assert json.loads(content_meta["ss_network_dim"]) == 4


def test_a_stopped_run_states_the_steps_it_took(tmp_path, shape_images):
    calls = []
    config = TrainConfig(images=shape_images, output="stopped", output_dir=tmp_path, max_train_steps=3,
                         train_batch_size=2, rank=2)
    result = train(config, get_method("lora"), base=make_random_base(),
                   should_stop=lambda: calls.append(1) or len(calls) > 1)
    meta = read_adapter(result.outputs[0]).metadata
    assert result.steps == 1 and json.loads(meta["ss_steps"]) == 1 and json.loads(meta["ss_max_train_steps"]) == 3
