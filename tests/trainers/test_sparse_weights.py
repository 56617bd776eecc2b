import copy

import pytest
import torch
from torch import nn

from trainers import sparse_weights
from trainers.sparse_weights import attach, detach


def _dense_reference(layer: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """Autograd's full gradients of the same loss on an untouched copy of the layer."""
    clone = copy.deepcopy(layer).requires_grad_(True)
    inputs = x.clone().requires_grad_(True)
    (clone(inputs) - target).pow(2).sum().backward()
    return clone.weight.grad, clone.bias.grad, inputs.grad


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_blockwise_weight_gradient_equals_autograd_at_the_selected_entries(kind, monkeypatch):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40) if kind == "linear" else nn.Conv2d(6, 40, 3, padding=1, stride=2)
    x = torch.randn(2, 5, 24) if kind == "linear" else torch.randn(2, 6, 9, 9)
    target = torch.randn_like(layer(x))
    weight_grad, bias_grad, input_grad = _dense_reference(layer, x, target)
    # blocks of a few output channels: the gather across block boundaries is what is under test
    monkeypatch.setattr(sparse_weights, "WEIGHT_GRADIENT_BLOCK_BYTES", layer.weight[0].numel() * 4 * 3)
    layer.requires_grad_(False)
    weight_index = torch.randperm(layer.weight.numel())[:150].sort().values.to(torch.int32)
    bias_index = torch.tensor([1, 7, 30], dtype=torch.int32)
    weight_slot, bias_slot = attach(layer, "weight", weight_index), attach(layer, "bias", bias_index)
    assert "forward" in layer.__dict__  # the block-wise path is the one in use
    inputs = x.clone().requires_grad_(True)
    (layer(inputs) - target).pow(2).sum().backward()
    torch.testing.assert_close(weight_slot.values.grad, weight_grad.flatten()[weight_index.long()])
    torch.testing.assert_close(bias_slot.values.grad, bias_grad[bias_index.long()])
    torch.testing.assert_close(inputs.grad, input_grad)
    detach(layer, "weight")
    detach(layer, "bias")
    assert "forward" not in layer.__dict__ and isinstance(layer.weight, nn.Parameter)


def test_values_written_after_an_optimizer_step_reach_the_output():
    layer = nn.Linear(4, 3).requires_grad_(False)
    slot = attach(layer, "weight", torch.tensor([0, 5], dtype=torch.int32))
    x = torch.randn(2, 4)
    before = layer(x)
    with torch.no_grad():
        slot.values.add_(1.0)
    after = layer(x)
    expected = before.clone()
    expected[:, 0] += x[:, 0]  # entry 0 = W[0, 0]
    expected[:, 1] += x[:, 1]  # entry 5 = W[1, 1]
    torch.testing.assert_close(after, expected)


def test_backward_after_an_autocast_forward():
    """Under autocast the forward runs in bfloat16 while the weights stay float32: the backward must cope."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8).requires_grad_(False)
    index = torch.tensor([2, 17, 90], dtype=torch.int32)
    weight_grad, _, _ = _dense_reference(layer, torch.ones(4, 16), torch.zeros(4, 8))
    slot = attach(layer, "weight", index)
    inputs = torch.ones(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(inputs)
    assert output.dtype == torch.bfloat16
    output.float().pow(2).sum().backward()
    assert inputs.grad.dtype == torch.float32
    torch.testing.assert_close(slot.values.grad, weight_grad.flatten()[index.long()], rtol=2e-2, atol=2e-2)
