import json

import pytest
import torch
from safetensors import safe_open

from studio.adapters.file import read_adapter
from studio.errors import AdapterError, ConfigError
from tests.conftest import make_random_base
from trainers import TrainConfig, train
from trainers.sara import SaraConfig, SaraMethod, apply_sparse_delta, read_sparse_delta, sara_learning_rate


def config(images, out, **overrides):
    values = dict(images=images, output="sara", output_dir=out, max_train_steps=4, train_batch_size=2, seed=1)
    values.update(overrides)
    return TrainConfig(**values)


def test_sara_trains_only_selected_weights_and_exports_delta_and_lora(tmp_path, shape_images):
    base = make_random_base()
    original = {k: v.clone() for k, v in base.pipe.unet.state_dict().items()}
    method = SaraMethod(SaraConfig(threshold=5e-3, lambda_rank=1e-3))
    result = train(config(shape_images, tmp_path), method, base=base)
    sparse_path, lora_path = result.outputs
    # the base is restored exactly after training
    for key, value in base.pipe.unet.state_dict().items():
        assert torch.equal(value, original[key]), key
    deltas, metadata = read_sparse_delta(sparse_path)
    assert float(metadata["studio.sara_threshold"]) == pytest.approx(5e-3)
    assert 0 < sum(len(i) for i, _, _ in deltas.values()) <= method.selected_total
    for name, (index, _, _) in deltas.items():
        assert (original[name].flatten()[index].abs() < 5e-3).all()  # only weights below θ moved
    apply_sparse_delta(base.pipe.unet, deltas, 1.0)
    moved = sum(int((base.pipe.unet.state_dict()[k] != original[k]).sum()) for k in original)
    assert moved == sum(len(i) for i, _, _ in deltas.values())
    apply_sparse_delta(base.pipe.unet, deltas, -1.0)
    lora = read_adapter(lora_path)
    assert lora.method == "sara" and 0 <= json.loads(lora.metadata["studio.sara_lora_relative_error"]) < 1


def test_optimizer_state_exists_only_for_selected_values(tmp_path, shape_images):
    class Spy(SaraMethod):
        def after_step(self, ctx, step):
            self.state_sizes = [s["exp_avg"].numel() for s in ctx.optimizer.state.values()]
            super().after_step(ctx, step)

    base = make_random_base()
    method = Spy(SaraConfig(threshold=2e-3, progressive=False))
    train(config(shape_images, tmp_path, max_train_steps=2), method, base=base)
    unet_params = sum(p.numel() for p in base.pipe.unet.parameters())
    assert sum(method.state_sizes) == method.selected_total < 0.1 * unet_params
    assert all(p.grad is None for p in base.pipe.unet.parameters())  # no full-size gradient was kept


def test_rank_penalty_gradient_reaches_the_trained_values(tmp_path, shape_images):
    base = make_random_base()
    method = SaraMethod(SaraConfig(threshold=5e-3, lambda_rank=1.0, rank_penalty_layers="all",
                                   rank_penalty_min_dim=64))
    train(config(shape_images, tmp_path, max_train_steps=1), method, base=base)
    # after training, rebuild the slots on a fresh base and check the penalty's gradient directly
    fresh = make_random_base()
    probe = SaraMethod(SaraConfig(threshold=5e-3, lambda_rank=1.0, rank_penalty_layers="all"))
    from trainers.loop import TrainingContext

    ctx = TrainingContext(fresh, config(shape_images, tmp_path), None, None, None, tmp_path, None, [])
    probe.setup(ctx)
    for _, _, slot in probe.slots.values():
        with torch.no_grad():
            slot.values.add_(torch.randn_like(slot.values) * 1e-3)
    probe.after_backward(ctx, step=0)
    assert ctx.logs["rank_penalty"] > 0
    for name, (module, attribute, slot) in probe.slots.items():  # equals autograd's gradient of λ·‖ΔP‖_*
        if name not in probe.penalised_layers(0):
            assert slot.values.grad is None
            continue
        values = slot.values.detach().clone().requires_grad_(True)
        dense = torch.zeros(module.parametrizations[attribute].original.numel())
        dense = dense.index_put((slot.index,), values - slot.initial).view(-1, *module.parametrizations[attribute]
                                                                          .original.shape[1:])
        torch.linalg.matrix_norm(dense.flatten(1), ord="nuc").backward()
        assert slot.values.grad.abs().sum() > 0
        torch.testing.assert_close(slot.values.grad, values.grad, atol=1e-4, rtol=1e-3)
    probe.cleanup(ctx)


def test_progressive_reselection_shrinks_the_trained_set(tmp_path, shape_images):
    base = make_random_base()
    method = SaraMethod(SaraConfig(threshold=5e-3, learning_rate=5e-2))
    train(config(shape_images, tmp_path, max_train_steps=4), method, base=base)
    assert method.reselected_total is not None and method.reselected_total < method.selected_total


def test_target_params_mode_and_learning_rate_rule(tmp_path, shape_images):
    base = make_random_base()
    method = SaraMethod(SaraConfig(target_params=20000, progressive=False))
    result = train(config(shape_images, tmp_path, max_train_steps=1), method, base=base)
    assert method.selected_total == 20000
    assert [p.suffixes for p in result.outputs] == [[".sara", ".safetensors"], [".safetensors"]]
    assert sara_learning_rate(2e-3) == pytest.approx(4.966e-4, rel=1e-3)
    with pytest.raises(ConfigError, match="target_params"):
        train(config(shape_images, tmp_path, max_train_steps=1), SaraMethod(SaraConfig(target_params=-1)),
              base=make_random_base())


def test_target_count_selects_exactly_the_smallest_magnitudes(monkeypatch):
    from trainers import magnitude_selection
    from trainers.sara import select_weights

    monkeypatch.setattr(magnitude_selection, "SCAN_BLOCK", 1000)  # many blocks per tensor: offsets must add up
    unet = make_random_base().pipe.unet
    threshold, selection = select_weights(unet, SaraConfig(target_params=5000))
    names = [n for n, _ in unet.named_parameters()]
    magnitudes = torch.cat([p.detach().abs().flatten() for p in unet.parameters()])
    offsets = torch.tensor([0] + [p.numel() for p in unet.parameters()]).cumsum(0)
    chosen = torch.cat([selection[n].long() + offsets[i] for i, n in enumerate(names)])
    assert len(chosen) == 5000 and len(chosen.unique()) == 5000
    assert magnitudes[chosen].max() == threshold == magnitudes.kthvalue(5000).values
    assert all(bool((i[1:] > i[:-1]).all()) for i in selection.values() if len(i) > 1)  # ascending


def test_sparse_file_metadata(tmp_path, shape_images):
    result = train(config(shape_images, tmp_path, max_train_steps=1), SaraMethod(SaraConfig(threshold=5e-3)),
                   base=make_random_base())
    with safe_open(str(result.outputs[0]), "pt") as handle:
        meta = handle.metadata()
    assert meta["studio.format"] == "sparse_delta" and "studio.base_fingerprint" in meta
    lora = result.outputs[0].name.replace(".sara.safetensors", ".safetensors")
    with pytest.raises(AdapterError, match=f"SaRA's sparse weight delta, not a LoRA: use the LoRA .* \\({lora}\\)"):
        read_adapter(result.outputs[0])


def test_threshold_that_selects_nothing_is_a_clear_error(tmp_path, shape_images):
    with pytest.raises(ConfigError, match="raise --threshold"):
        train(config(shape_images, tmp_path, max_train_steps=1),
              SaraMethod(SaraConfig(threshold=1e-30, scope="attention_only")), base=make_random_base())


def test_sara_with_prior_preservation_and_another_lora_attached(tmp_path, shape_images):
    """Two forwards before one backward (prior preservation) must not trip over the in-place weight write, and a
    LoRA already attached (peft's ``base_layer`` names) must neither be trained nor leak into the file's names."""
    from studio.adapters.file import AdapterFile, LoraModule
    from studio.adapters.inject import attach_adapter

    base = make_random_base()
    layer = base.pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    extra = AdapterFile({"unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": LoraModule(
        torch.randn(2, layer.in_features), torch.randn(layer.out_features, 2), 2.0)}})
    attach_adapter(base, extra, "other")
    lora_before = {n: p.clone() for n, p in base.pipe.unet.named_parameters() if "lora_" in n}
    result = train(config(shape_images, tmp_path, max_train_steps=2, with_prior_preservation=True,
                          class_prompt="a red circle on a white background", num_class_images=2),
                   SaraMethod(SaraConfig(threshold=5e-3, progressive=False)), base=base)
    deltas, _ = read_sparse_delta(result.outputs[0])
    assert deltas and not any("base_layer" in name or "lora_" in name for name in deltas)
    for name, parameter in base.pipe.unet.named_parameters():
        if "lora_" in name:
            assert torch.equal(parameter, lora_before[name])
    fresh = make_random_base()
    before = {n: p.clone() for n, p in fresh.pipe.unet.named_parameters()}
    apply_sparse_delta(fresh.pipe.unet, deltas, 1.0)
    changed = sum(int((p != before[n]).sum()) for n, p in fresh.pipe.unet.named_parameters())
    assert changed == sum(len(i) for i, _, _ in deltas.values())
