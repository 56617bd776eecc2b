"""img2img cost: wall time of img2img at a strength against text-to-image with the same steps, per method.

    .venv/bin/python -m bench.img2img [--steps 20] [--strength 0.5] [--repeats 3] [--clock cpu]
    python -m bench.img2img --arch sd15   # SD 1.5 architecture, random weights and LoRAs, 512 px (GPU)

diffusers' img2img rule runs int(steps · strength) of the steps, so strength 0.5 should cost about half a
text-to-image call plus one VAE encode; the goal is ≤ 0.55× for every composition method. The two modes are
timed alternately on one warm pipeline (median of the repeats), with the same adapters, prompt and seed.
``--clock cpu`` times the process's CPU seconds instead of wall seconds: for one-thread CPU runs on a machine
other jobs share, where waiting for the core would otherwise count as cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from bench.compose import setup
from pipelines import CompositionPipeline
from pipelines.methods import METHODS


def timed(pipe, prompt: str, adapters, method: str, steps: int, size: int, clock=time.perf_counter, **mode) -> float:
    start = clock()
    pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), adapters=adapters,
         method=method, height=size, width=size, output_type="np", **mode)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clock() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--active", type=int, default=2, help="adapters composed")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU seconds (one-thread CPU runs on a shared machine)")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and torch.cuda.is_available():
        parser.error("--clock cpu cannot see GPU work: time GPU runs by the wall clock")
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # as every CPU benchmark here: two threads spin-wait on the 2-core machines
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    base, adapters, prompt = setup(args)
    pipe = CompositionPipeline.from_base(base) if not hasattr(base.pipe, "attach_adapters") else base.pipe
    size = base.default_size
    chosen = [(a, 1.0) for a in adapters[: args.active]]
    init = Image.new("RGB", (size, size), (20, 30, 120))
    print(f"{base.name}, {size} px, {args.steps} steps, strength {args.strength}, {len(chosen)} adapters, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {args.clock} clock")
    print(f"{'method':10} {'txt2img s':>10} {'img2img s':>10} {'ratio':>6}")
    for method in METHODS:
        text = prompt
        timed(pipe, text, chosen, method, 2, size)  # warm-up: adapters attached, kernels chosen
        full, partial = [], []
        for _ in range(args.repeats):
            full.append(timed(pipe, text, chosen, method, args.steps, size, clock))
            partial.append(timed(pipe, text, chosen, method, args.steps, size, clock, image=init,
                                 strength=args.strength))
        t_full, t_partial = statistics.median(full), statistics.median(partial)
        print(f"{method:10} {t_full:10.3f} {t_partial:10.3f} {t_partial / t_full:6.2f}")


if __name__ == "__main__":
    main()
