"""Unstructured backpropagation: train a sparse set of entries of frozen tensors (SaRA, METHODS §3).

A :class:`SparseValues` parametrization holds the trainable vector of one tensor's selected entries and writes
it into the frozen storage in place, so no copy of the weight exists. Gradients reach the vector in one of two
ways:

* Linear and Conv2d weights: the layer's forward is replaced by :class:`_SparseLayerOp`, whose backward computes
  the weight gradient in blocks of output channels and keeps only the selected entries of each block. A
  full-size weight gradient never exists: for SD 1.5's largest convolution (2560→1280, 3×3) it would be 118 MB
  held at once in the middle of the backward pass.
* Every other tensor (norms, biases of other layers): the parametrization's own backward gathers the selected
  entries of autograd's gradient; these tensors are small.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import nn

WEIGHT_GRADIENT_BLOCK_BYTES = 8 * 2**20  # the largest dense block of a weight gradient held at once


class _SparseWrite(torch.autograd.Function):
    """Return ``base`` (a view, no copy); the backward hands ``values`` only the entries at ``index``."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        return base.view_as(base)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return None, None, grad.reshape(-1)[index]


class SparseValues(nn.Module):
    """Parametrization holding the trainable vector of one tensor's selected entries (flat ``index``, ascending).

    The values are written into the weight storage only when they changed since the last write (the optimizer
    bumps their version): a second forward before the backward (prior preservation) must not modify in place
    the weight the first forward saved for its backward.
    """

    def __init__(self, index: torch.Tensor, initial: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("initial", initial, persistent=False)
        self.values = nn.Parameter(initial.detach().float().clone())
        self._written: tuple[int, int] | None = None  # (id, version) of the values last written

    @torch.no_grad()
    def sync(self, base: torch.Tensor) -> None:
        """Write the values into ``base`` if they changed since the last write."""
        stamp = (id(self.values), self.values._version)
        if stamp != self._written:
            base.view(-1)[self.index] = self.values.to(base.dtype)
            self._written = stamp

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        self.sync(base)
        return _SparseWrite.apply(base, self.index, self.values)

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """ΔP as a dense tensor (differentiable in ``values``), for the rank penalty and export."""
        dense = torch.zeros(shape.numel(), dtype=self.values.dtype, device=self.values.device)
        return dense.index_put((self.index,), self.values - self.initial.float()).view(shape)


def storage(module: nn.Module, attribute: str) -> torch.Tensor:
    """The frozen tensor under a parametrization (the values are written into it in place)."""
    return getattr(module.parametrizations, attribute).original


def attach(module: nn.Module, attribute: str, index: torch.Tensor) -> SparseValues:
    """Make the entries ``index`` (flat, ascending) of ``module.<attribute>`` trainable; returns their slot."""
    blockwise = attribute == "weight" and _blockwise(module)
    slot = SparseValues(index, getattr(module, attribute).detach().flatten()[index])
    parametrize.register_parametrization(module, attribute, slot, unsafe=True)
    if blockwise:
        module.forward = functools.partial(_sparse_layer_forward, module, slot)
    return slot


def detach(module: nn.Module, attribute: str) -> None:
    """Undo :func:`attach` (the storage keeps whatever values it holds)."""
    if attribute == "weight" and "forward" in module.__dict__:
        del module.forward
    parametrize.remove_parametrizations(module, attribute, leave_parametrized=False)


def _blockwise(module: nn.Module) -> bool:
    """Stock Linear, or stock Conv2d with the options the block-wise backward supports (subclasses that
    change ``forward`` keep autograd's dense path)."""
    if type(module).forward is nn.Linear.forward:
        return True
    return (type(module).forward is nn.Conv2d.forward and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _sparse_layer_forward(layer: nn.Module, slot: SparseValues, x: torch.Tensor) -> torch.Tensor:
    slot.sync(storage(layer, "weight"))
    return _SparseLayerOp.apply(x, slot.values, layer.bias, layer, slot.index)


class _SparseLayerOp(torch.autograd.Function):
    """``layer(x)`` whose backward gives the selected weight entries their gradient block by block."""

    @staticmethod
    def forward(ctx, x, values, bias, layer, index):
        weight = storage(layer, "weight")
        ctx.layer, ctx.index = layer, index
        ctx.save_for_backward(x)
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        layer, index = ctx.layer, ctx.index
        weight = storage(layer, "weight")
        linear = isinstance(layer, nn.Linear)
        dtype = x.dtype
        grad, x = grad.to(weight.dtype), x.to(weight.dtype)  # autocast may have run the forward in lower precision
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight if linear else _conv_backward(layer, grad, x, weight, (True, False))[0]
            grad_x = grad_x.to(dtype)
        if ctx.needs_input_grad[1]:
            grad_values = _selected_weight_gradient(layer, grad, x, weight, index, linear)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if linear else grad.sum((0, 2, 3))
        return grad_x, grad_values, grad_bias, None, None


def _conv_backward(layer: nn.Conv2d, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   mask: tuple[bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, layer.stride, layer.padding, layer.dilation, False, [0, 0], 1, [*mask, False])
    return grad_x, grad_weight


def _selected_weight_gradient(layer: nn.Module, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              index: torch.Tensor, linear: bool) -> torch.Tensor:
    """∂L/∂W at ``index``, computed over blocks of output channels (each block's dense gradient is small)."""
    row = weight[0].numel()
    rows = max(1, WEIGHT_GRADIENT_BLOCK_BYTES // (row * weight.element_size()))
    starts = [*range(0, weight.shape[0], rows), weight.shape[0]]
    bounds = torch.searchsorted(index, torch.tensor(starts, dtype=index.dtype, device=index.device) * row).tolist()
    if linear:
        grad, x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    result = torch.empty(len(index), dtype=torch.float32, device=grad.device)
    for low, high, first, last in zip(starts, starts[1:], bounds, bounds[1:]):
        if first == last:
            continue
        if linear:
            dense = grad[:, low:high].t() @ x
        else:
            dense = _conv_backward(layer, grad[:, low:high].contiguous(), x, weight[low:high], (False, True))[1]
        result[first:last] = dense.reshape(-1)[(index[first:last] - low * row).long()].float()
    return result
