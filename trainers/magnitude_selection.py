"""Which entries of a set of tensors have the smallest magnitudes: all below θ, or exactly the N smallest.

Scans run block by block through buffers allocated once. SD 1.5's UNet has 860M weights and a selection
scans them several times; with a fresh temporary per block, the allocator's heap ended up ten times the size
of the selection itself, and that memory stayed resident through training. Only a narrow band of magnitudes
around the N-th smallest is ever gathered, so no copy of all the magnitudes (3.4 GB for SD 1.5) exists.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

SCAN_BLOCK = 1 << 20  # entries per block (4 MB of float32 magnitudes)


class MagnitudeScan:
    """Block-wise scans of |w| over named tensors, on the tensors' device."""

    def __init__(self, tensors: dict[str, torch.Tensor], block: int | None = None) -> None:
        self.tensors = tensors
        block = block or SCAN_BLOCK
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        self._magnitude = torch.empty(block, dtype=torch.float32, device=device)
        self._mask = torch.empty(block, dtype=torch.bool, device=device)
        self._other = torch.empty(block, dtype=torch.bool, device=device)

    @property
    def total(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def blocks(self, tensor: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, |w| of one block) over ``tensor``; the magnitudes are overwritten by the next block."""
        flat = tensor.detach().reshape(-1)
        size = len(self._magnitude)
        for start in range(0, flat.numel(), size):
            part = flat[start : start + size]
            buffer = self._magnitude[: len(part)]
            if part.dtype == buffer.dtype:
                yield start, torch.abs(part, out=buffer)
            else:  # half-precision weights: abs's out= must match their dtype
                yield start, buffer.copy_(part).abs_()

    def _below_mask(self, magnitude: torch.Tensor, value: float) -> torch.Tensor:
        return torch.lt(magnitude, value, out=self._mask[: len(magnitude)])

    def count_below(self, value: float) -> int:
        return sum(int(self._below_mask(m, value).sum()) for t in self.tensors.values() for _, m in self.blocks(t))

    def below(self, tensor: torch.Tensor, value: float) -> torch.Tensor:
        """Flat indices (ascending, int32 where the tensor allows) of the entries with |w| < value."""
        parts = [compact(self._below_mask(m, value).nonzero().squeeze(1) + start, tensor.numel())
                 for start, m in self.blocks(tensor)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32, device=tensor.device)

    def band(self, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tensor number, flat index, magnitude) of every entry with low ≤ |w| < high."""
        owners, positions, magnitudes = [], [], []
        for number, tensor in enumerate(self.tensors.values()):
            for start, m in self.blocks(tensor):
                inside = torch.ge(m, low, out=self._mask[: len(m)])
                inside &= torch.lt(m, high, out=self._other[: len(m)])
                index = inside.nonzero().squeeze(1)
                owners.append(torch.full_like(index, number))
                positions.append(index + start)
                magnitudes.append(m[index])
        return torch.cat(owners), torch.cat(positions), torch.cat(magnitudes)


def compact(index: torch.Tensor, numel: int) -> torch.Tensor:
    """Flat indices as int32 where the tensor allows: half the memory of int64 for millions of selected values."""
    return index.to(torch.int32) if numel < 2**31 else index


def select_below(tensors: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """Flat indices (ascending) of the entries with |w| < threshold, per tensor."""
    scan = MagnitudeScan(tensors)
    return {name: scan.below(tensor, threshold) for name, tensor in tensors.items()}


def select_smallest(tensors: dict[str, torch.Tensor], count: int) -> tuple[float, dict[str, torch.Tensor]]:
    """(the count-th smallest |w|, flat ascending indices per tensor) of exactly the ``count`` smallest |w|."""
    scan = MagnitudeScan(tensors)
    low, high, below = _bracket(scan, count)
    owner, position, magnitude = scan.band(low, high)
    taken = torch.topk(magnitude, count - below, largest=False)
    owner, position = owner[taken.indices], position[taken.indices]
    selection = {}
    for number, (name, tensor) in enumerate(tensors.items()):
        band = compact(position[owner == number], tensor.numel())
        selection[name] = torch.cat([scan.below(tensor, low), band]).sort().values
    ceiling = float(taken.values.max()) if count > below else max(
        float(tensors[n].detach().flatten()[i].abs().max()) for n, i in selection.items() if len(i))
    return ceiling, selection


def _bracket(scan: MagnitudeScan, count: int) -> tuple[float, float, int]:
    """Magnitudes (low, high) with #(|w| < low) ≤ count ≤ #(|w| < high), a few percent apart, and #(|w| < low):
    a strided sample's quantiles, widened until the exact counts agree."""
    total = scan.total
    stride = max(1, total // 2_000_000)
    sample = torch.cat([t.detach().flatten()[::stride].abs().float() for t in scan.tensors.values()])[:16_000_000]
    share = count / total
    low = float(torch.quantile(sample, share * 0.97))
    high = float(torch.quantile(sample, min(1.0, share * 1.03 + 1e-6)))
    below = scan.count_below(low)
    while below > count:
        low /= 1.5
        below = scan.count_below(low)
    while scan.count_below(high) < count:
        high = high * 1.5 + 1e-12
    return low, high, below
