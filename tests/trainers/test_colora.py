import json

import pytest
from safetensors import safe_open

from studio.adapters.file import read_adapter
from studio.adapters.inject import attach_adapter, set_adapter_weights
from studio.errors import ConfigError
from tests.conftest import make_random_base
from trainers import TrainConfig, train
from trainers.colora import CoLoRAConfig, CoLoRAMethod, allocate_ranks


def test_allocation_follows_scores_and_respects_the_budget():
    dims = {"a": (64, 64), "b": (64, 64), "c": (64, 64), "d": (64, 64)}
    budget = 16 * sum(i + o for i, o in dims.values())
    ranks = allocate_ranks({"a": 8.0, "b": 4.0, "c": 2.0, "d": 2.0}, dims, budget, min_rank=4, max_rank=128)
    assert ranks["a"] > ranks["b"] > ranks["c"] and ranks["c"] == ranks["d"]
    assert all(r % 4 == 0 and 4 <= r <= 128 for r in ranks.values())
    used = sum(r * 128 for r in ranks.values())
    assert abs(used - budget) <= 4 * 128 * len(ranks)
    clipped = allocate_ranks({"a": 1000.0, "b": 1.0, "c": 1.0, "d": 1.0}, dims, budget, max_rank=32)
    assert clipped["a"] == 32 and clipped["b"] > 4  # slack from clipping goes to the others


def test_no_module_gets_a_rank_above_its_smaller_dimension():
    dims = {"narrow": (96, 24), "wide": (96, 96), "other": (96, 96)}
    budget = 32 * sum(i + o for i, o in dims.values())
    ranks = allocate_ranks({"narrow": 100.0, "wide": 1.0, "other": 1.0}, dims, budget, max_rank=128)
    assert ranks["narrow"] == 24  # full rank already: more would add parameters, not expressiveness
    assert ranks["wide"] == ranks["other"] > 32  # the rest of the budget goes to the others


@pytest.mark.parametrize("score", ["faig", "taylor", "weight_change", "fisher"])
def test_colora_plans_ranks_and_writes_a_file_diffusers_can_load(tmp_path, shape_images, score):
    base = make_random_base()
    method = CoLoRAMethod(CoLoRAConfig(score=score, probe_rank=8, probe_steps=3, path_points=2, probe_samples=2,
                                       budget_rank=8, min_rank=4, max_rank=32, probe_learning_rate=1e-2))
    config = TrainConfig(images=shape_images, output=f"colora-{score}", output_dir=tmp_path, max_train_steps=2,
                         train_batch_size=2)
    [path] = train(config, method, base=base).outputs
    adapter = read_adapter(path)
    ranks = {m.rank for m in adapter.modules["unet"].values()}
    assert all(m.alpha == m.rank for m in adapter.modules["unet"].values())  # scale 1 everywhere
    plan = json.loads(adapter.metadata["studio.rank_plan"])
    assert plan["score"] == score and len(plan["scores"]) == len(plan["ranks"])
    assert set(plan["ranks"].values()) == ranks
    with safe_open(str(path), "pt") as handle:
        lora_config = json.loads(handle.metadata()["lora_adapter_metadata"])
    if len(ranks) > 1:
        assert lora_config["unet.rank_pattern"]
    fresh = make_random_base()
    attach_adapter(fresh, adapter, "c")
    set_adapter_weights(fresh, {"c": 1.0})


def test_unknown_score_is_refused():
    with pytest.raises(ConfigError, match="unknown CoLoRA score"):
        CoLoRAMethod(CoLoRAConfig(score="vibes"))


def test_budget_below_minimum_rank_and_missing_targets(tmp_path, shape_images):
    with pytest.raises(ConfigError, match="below the minimum rank"):
        CoLoRAMethod(CoLoRAConfig(budget_rank=2, min_rank=4))
    from trainers import get_method

    config = TrainConfig(images=shape_images, output="x", output_dir=tmp_path, max_train_steps=1,
                         target_modules=("no_such_projection",))
    with pytest.raises(ConfigError, match="cannot train a LoRA"):
        train(config, get_method("lora"), base=make_random_base())


def test_faig_takes_the_absolute_value_per_weight_as_the_official_code():
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    from trainers.colora import PROBE_ADAPTER, faig_scores

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"]), net, adapter_name=PROBE_ADAPTER)
    layers = {name: net[int(name)] for name in ("0", "2")}
    for layer in layers.values():
        for part in (layer.lora_A[PROBE_ADAPTER], layer.lora_B[PROBE_ADAPTER]):
            part.weight.data.normal_()
            part.weight.requires_grad_(False)
    inputs = [torch.randn(4, 6) for _ in range(2)]
    target = torch.randn(4, 3)

    class Context:  # what faig_scores asks of a training context: the loss of one probe sample
        @staticmethod
        def denoising_loss(batch, generator, noise, timesteps):
            return (net(batch) - target).square().sum()

    samples = [(x, None, None) for x in inputs]
    points = 4
    scores = faig_scores(Context, layers, samples, points)
    # by hand: the gradient of a plain copy with W + a·ΔW, per sample, summed over a, times ΔW, |·| per weight
    deltas = {n: layer.get_delta_weight(PROBE_ADAPTER) for n, layer in layers.items()}
    expected, signed = {n: 0.0 for n in layers}, {n: 0.0 for n in layers}
    for x in inputs:
        total = {n: torch.zeros_like(d) for n, d in deltas.items()}
        for k in range(points):
            weights = {n: (layers[n].base_layer.weight + k / points * deltas[n]).detach().requires_grad_(True)
                       for n in layers}
            hidden = torch.tanh(torch.nn.functional.linear(x, weights["0"], layers["0"].base_layer.bias))
            out = torch.nn.functional.linear(hidden, weights["2"], layers["2"].base_layer.bias)
            (out - target).square().sum().backward()
            for n in layers:
                total[n] += weights[n].grad
        for n in layers:
            expected[n] += float((total[n] * deltas[n]).abs().sum()) / points / len(inputs)
            signed[n] += abs(float((total[n] * deltas[n]).sum())) / points / len(inputs)
    for n in layers:
        assert scores[n] == pytest.approx(expected[n], rel=1e-4)
        assert scores[n] > 1.2 * signed[n]  # a signed sum per layer would cancel


def test_discriminative_faig_subtracts_the_score_on_the_class_images(tmp_path, shape_images):
    scores = {}
    for discriminative in (False, True):
        method = CoLoRAMethod(CoLoRAConfig(score="taylor", probe_rank=4, probe_steps=2, probe_samples=2,
                                           budget_rank=8, discriminative=discriminative, probe_learning_rate=1e-2))
        config = TrainConfig(images=shape_images, output=f"d{discriminative}", output_dir=tmp_path,
                             max_train_steps=1, train_batch_size=2, with_prior_preservation=True, num_class_images=2)
        [path] = train(config, method, base=make_random_base()).outputs
        scores[discriminative] = json.loads(read_adapter(path).metadata["studio.rank_plan"])["scores"]
    assert all(scores[True][m] < scores[False][m] for m in scores[False])
