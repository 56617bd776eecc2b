"""Measuring helpers shared by the benchmarks: wall time and peak memory of a block, and evaluator readings of
generated images."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from studio.eval.prompt_following import generate_batch


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_bytes: int = 0


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measured(device: torch.device) -> Iterator[Measurement]:
    """Wall time and peak memory above the starting point: CUDA's allocator peak, or sampled RSS on the CPU."""
    result = Measurement()
    stop = threading.Event()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    else:
        start_bytes = _rss()
        peak = [start_bytes]

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    start = time.perf_counter()
    try:
        yield result
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize()
            result.peak_bytes = torch.cuda.max_memory_allocated() - start_bytes
        else:
            stop.set()
            sampler.join()
            result.peak_bytes = max(peak[0], _rss()) - start_bytes
        result.seconds = time.perf_counter() - start


def generate_images(base, prompts: list[str], steps: int, **options: Any) -> np.ndarray:
    """One uint8 image per prompt (seed = its index), 25 per pipeline call; ``options`` go to the pipeline
    (adapters, method, negative prompt, DECOR, Perp-Neg)."""
    return np.concatenate([generate_batch(base, prompts[start : start + 25],
                                          range(start, min(start + 25, len(prompts))), steps, **options)
                           for start in range(0, len(prompts), 25)])


def read_generations(base, evaluator, prompts: list[str], steps: int, **options: Any) -> list:
    """The domain evaluator's readings of :func:`generate_images`."""
    return evaluator.read(generate_images(base, prompts, steps, **options))
