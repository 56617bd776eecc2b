"""One or several processes (``accelerate launch``): accelerate wraps, syncs and checkpoints every method alike.

* :class:`Trainee` is what ``accelerator.prepare`` wraps (DDP under ``accelerate launch``; autocast under mixed
  precision): the models that hold the trainable parameters (UNet, text encoders), with the method's whole
  micro-step loss as its forward. One forward and one backward per micro-step, whatever the method does inside
  (prior preservation, B4M's main and auxiliary losses), so DDP averages the gradients of LoRA factors, SaRA's
  sparse values and B4M's learnable halves alike while the backward runs. A method that swaps parameters (SaRA's
  re-selection) is wrapped anew.
* ``--train_batch_size`` is the global batch: every process draws the same global batch from the same per-step
  generator and trains its own slice, so a run on N processes equals the one-process run with the same config.
* Checkpoints: ``accelerator.save_state``/``load_state`` hold the optimizer, LR schedule, fp16 loss scaler and
  random states; the method's own state (only the trained tensors, never the frozen base) goes beside them in
  ``state.pt``, written last, so a folder with ``state.pt`` is complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from torch import nn

from studio.errors import ConfigError
from studio.files import atomic_torch_save
from trainers.config import TrainConfig


class Trainee(nn.Module):
    """The UNet and text encoders as one module whose forward is ``method.training_loss(ctx, micro_step)``."""

    def __init__(self, base, method, ctx) -> None:
        super().__init__()
        self.unet = base.pipe.unet
        self.text_encoders = nn.ModuleList([encoder for name in ("text_encoder", "text_encoder_2")
                                            if (encoder := getattr(base.pipe, name, None)) is not None])
        self._method_and_context = (method, ctx)  # a tuple: not registered as submodules

    def forward(self, micro_step: int) -> torch.Tensor:
        method, ctx = self._method_and_context
        return method.training_loss(ctx, micro_step)


def trainable_ids(optimizer) -> tuple[int, ...]:
    return tuple(id(p) for group in optimizer.param_groups for p in group["params"])


def wrap(accelerator, trainee: Trainee, previous: nn.Module | None = None) -> nn.Module:
    """``accelerator.prepare(trainee)``; ``previous`` (a wrapper over parameters since swapped) is let go first."""
    if previous is not None and previous in accelerator._models:
        accelerator._models.remove(previous)
    return accelerator.prepare(trainee)


def split_count(config: TrainConfig, processes: int) -> None:
    """The global batch must split evenly over the processes (checked before a model loads)."""
    if config.train_batch_size % processes:
        raise ConfigError(f"--train_batch_size {config.train_batch_size} is the global batch and cannot be split "
                          f"evenly over {processes} processes; use a multiple of {processes}")


def local_slice(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    """This process's share of a global batch along dim 0."""
    processes = accelerator.num_processes if accelerator is not None else 1
    if processes == 1:
        return tensor
    size = len(tensor) // processes
    return tensor[accelerator.process_index * size : (accelerator.process_index + 1) * size]


def make_accelerator(config: TrainConfig, cpu: bool, tracker_options: dict[str, Any]):
    """An Accelerator for a global, split batch (the LR schedule steps once per step), DDP told that a method may
    leave some of its parameters out of a loss (B4M's isolated halves), and checkpoints without the frozen base."""
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, cpu=cpu, dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)],
        **tracker_options)
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
    return accelerator


def checkpoint_dirs(work_dir: Path) -> list[Path]:
    """A run's checkpoints (folders with a saved state), oldest first."""
    found = [p for p in (work_dir / "checkpoints").glob("checkpoint-*") if (p / "state.pt").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def save_checkpoint(accelerator, work_dir: Path, step: int, method, limit: int | None) -> Path:
    """Every process takes part (accelerate saves each one's random state); the main one writes ``state.pt``."""
    target = work_dir / "checkpoints" / f"checkpoint-{step}"
    accelerator.save_state(str(target))
    if accelerator.is_main_process:
        atomic_torch_save({"step": step, "method": method.state_dict()}, target / "state.pt")
        if limit:
            for old in checkpoint_dirs(work_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def find_checkpoint(work_dir: Path, spec: str) -> Path:
    if spec == "latest":
        found = checkpoint_dirs(work_dir)
        if not found:
            raise ConfigError(f"--resume_from_checkpoint latest: no checkpoint in {work_dir / 'checkpoints'}")
        return found[-1]
    path = Path(spec)
    if not (path / "state.pt").exists():
        path = work_dir / "checkpoints" / spec
    if not (path / "state.pt").exists():
        raise ConfigError(f"no checkpoint at {spec}")
    return path


def load_checkpoint(accelerator, checkpoint: Path, method) -> int:
    """Restore the method (first: its parameters may change size), then accelerate's state; returns the step."""
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    try:
        method.load_state_dict(state["method"])
        accelerator.load_state(str(checkpoint))
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{checkpoint} does not fit this run (was it trained with another rank, method or "
                          f"target modules, or by an older version?): {reason}") from None
    return int(state["step"])
