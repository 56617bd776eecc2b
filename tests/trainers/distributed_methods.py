"""SaRA and Break-for-Make on the embedded model, for ``accelerate launch`` (and in one process, for comparison).

Usage: python distributed_methods.py IMAGES STYLE OUT
"""

import sys
from pathlib import Path

import torch

from pipelines.loading import load_base
from trainers import TrainConfig, train
from trainers.b4m import B4MConfig, train_b4m
from trainers.sara import SaraConfig, SaraMethod


def run(images: Path, style: Path, out: Path) -> None:
    torch.set_num_threads(1)
    base = load_base(None, device="cpu")
    common = dict(output_dir=out, train_batch_size=2, seed=1, device="cpu")
    train(TrainConfig(images=images, output="sara", max_train_steps=4, **common),
          SaraMethod(SaraConfig(threshold=2e-3)), base=base)
    train_b4m(B4MConfig(content=images, style=style, rank=4, break_steps=2, make_steps=2, aux_images_per_set=2,
                        sequential_break=False),
              TrainConfig(output="b4m", **common), base=base)


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
