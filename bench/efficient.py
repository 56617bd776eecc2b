"""Quality of the efficient trainers on the embedded model: SaRA and CoLoRA against plain LoRA.

    .venv/bin/python -m bench.efficient [--n 50] [--max_train_steps 400] [--methods lora,sara,colora]

One style set (5 renders of a reserved texture: "zigzag" with trigger zwx, or ``--texture waves --trigger qwe``)
trains: a uniform rank-16 LoRA, SaRA (its sparse delta, and the LoRA extracted from it by SVD) and CoLoRA at the
parameter budget of the rank-16 LoRA, all with the same steps, images and prior preservation. Each is read over
n generations of "a {color} {trigger} {shape} on a {background} background" (texture rate) and n ordinary prompts
without the trigger (all-attribute accuracy, against the base's on the same prompts and seeds: the spill).
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.measure import read_generations
from frontends.build.demo_adapters import render_demo_images
from pipelines.loading import load_base
from studio.data import procedural
from studio.eval.domain import DomainEvaluator
from studio.eval.prompt_following import grid_cases
from trainers import TrainConfig, get_method, train
from trainers.colora import CoLoRAConfig, CoLoRAMethod
from trainers.sara import SaraConfig, SaraMethod, apply_sparse_delta, read_sparse_delta

COLORS, BACKGROUNDS = list(procedural.COLORS), list(procedural.BACKGROUNDS)


def train_all(base, images: Path, out: Path, steps: int, methods: list[str], sara: dict, colora: dict,
              seed: int = 0) -> dict[str, tuple[list[Path], float]]:
    def config(name: str) -> TrainConfig:
        return TrainConfig(images=images, output=name, output_dir=out, kind="style", max_train_steps=steps,
                           train_batch_size=4, seed=seed, with_prior_preservation=True, num_class_images=96,
                           lr_scheduler="cosine", lr_warmup_steps=20, rank=16, learning_rate=1e-3)

    runs = {  # built only when chosen; CoLoRA's probe runs at the same rate (1e-3) by default
        "lora": lambda: (config("lora16"), get_method("lora")),
        "sara": lambda: (config("sara"), SaraMethod(SaraConfig(**sara))),
        "colora": lambda: (config("colora"), CoLoRAMethod(CoLoRAConfig(probe_steps=100, **colora))),
    }
    results = {}
    for label in methods:
        train_config, method = runs[label]()
        start = time.perf_counter()
        outputs = train(train_config, method, base=base).outputs
        results[label] = (outputs, (time.perf_counter() - start) / 60)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max_train_steps", type=int, default=400)
    parser.add_argument("--sara_lr", type=float, default=1e-2,
                        help="SaRA's rate (None: paper eq. 12, 5e-4 at θ = 2e-3, which barely moves this small model)")
    parser.add_argument("--sara_threshold", type=float, default=2e-3, help="SaRA's θ")
    parser.add_argument("--sara_target_params", type=int, default=None, help="SaRA: train the N smallest weights")
    parser.add_argument("--sara_lambda_rank", type=float, default=5e-4, help="SaRA's nuclear-norm weight λ")
    parser.add_argument("--sara_rank_layers", default="random_one", choices=["random_one", "all"],
                        help="SaRA: the nuclear-norm term on one random eligible tensor per step, or on all")
    parser.add_argument("--sara_scope", default="all", help="SaRA's candidate weights: all | attention_only | …")
    parser.add_argument("--colora_beta", type=float, default=1.0, help="CoLoRA's allocation exponent β")
    parser.add_argument("--colora_score", default="faig", help="CoLoRA's contribution score")
    parser.add_argument("--colora_min_rank", type=int, default=4, help="CoLoRA's smallest per-module rank")
    parser.add_argument("--colora_normalisation", default="none", help="CoLoRA: none | sqrt_params | delta_norm")
    parser.add_argument("--texture", default="zigzag", choices=["zigzag", "waves"], help="the reserved texture")
    parser.add_argument("--trigger", default="zwx", help="its trigger word")
    parser.add_argument("--methods", default="lora,sara,colora", help="which trainers to run (comma-separated)")
    parser.add_argument("--seed", type=int, default=0, help="the training seed (the prompts and sampling seeds stay)")
    parser.add_argument("--model", default=None, help="base model folder (default: the embedded model)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - {"lora", "sara", "colora"}
    if unknown:
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    torch.set_num_threads(1)
    base, evaluator = load_base(args.model), DomainEvaluator.load()
    work = Path(tempfile.mkdtemp(prefix="studio-bench-efficient-"))
    atexit.register(shutil.rmtree, work, True)  # trained files and models are for this run only
    images = render_demo_images(work / "style", "style", count=5, trigger=args.trigger, concept=args.texture)
    trained = train_all(base, images, work / "out", args.max_train_steps, methods,
                        {"learning_rate": args.sara_lr, "threshold": args.sara_threshold,
                         "target_params": args.sara_target_params, "scope": args.sara_scope,
                         "lambda_rank": args.sara_lambda_rank, "rank_penalty_layers": args.sara_rank_layers},
                        {"beta": args.colora_beta, "score": args.colora_score, "min_rank": args.colora_min_rank,
                         "normalisation": args.colora_normalisation}, seed=args.seed)
    style_prompts = [procedural.caption(COLORS[i % 6], args.trigger, procedural.BASE_SHAPES[i % 6], BACKGROUNDS[i % 3])
                     for i in range(args.n)]
    cases = grid_cases(args.n, held_out=False, seed=21)

    def measure(adapters) -> tuple[float, float]:
        styled = read_generations(base, evaluator, style_prompts, args.steps, adapters=adapters)
        zigzag = np.mean([r.texture == args.texture for r in styled])
        readings = read_generations(base, evaluator, [c.prompt for c in cases], args.steps, adapters=adapters)
        accuracy = np.mean([all(getattr(r, k) == getattr(c, k) for k in ("color", "texture", "shape", "background"))
                            for r, c in zip(readings, cases)])
        return float(zigzag), float(accuracy)

    _, plain = measure(None)
    rows: list[tuple[str, Path | None, Path | None, float | None]] = []
    if "lora" in trained:
        rows.append(("LoRA rank 16", trained["lora"][0][0], None, trained["lora"][1]))
    if "sara" in trained:
        sara_sparse, sara_lora = trained["sara"][0]
        rows += [("SaRA (sparse delta)", None, sara_sparse, trained["sara"][1]),
                 ("SaRA → SVD LoRA", sara_lora, None, None)]
    if "colora" in trained:
        rows.append(("CoLoRA (budget = rank 16)", trained["colora"][0][0], None, trained["colora"][1]))
    print(f"base {args.model or 'the embedded model'}; style adapters from 5 {args.texture} renders "
          f"(trigger {args.trigger}), {args.max_train_steps} steps, "
          f"prior preservation, SaRA lr {args.sara_lr} θ {args.sara_threshold} N {args.sara_target_params} "
          f"scope {args.sara_scope} λ {args.sara_lambda_rank} on {args.sara_rank_layers}, "
          f"CoLoRA β {args.colora_beta} score {args.colora_score} r_min {args.colora_min_rank} "
          f"normalisation {args.colora_normalisation}; training seed {args.seed}; "
          f"n = {args.n}; base accuracy on the ordinary prompts: {plain:.2f}")
    print(f"| adapter | {args.texture} (trigger prompts) | ordinary-prompt accuracy | change vs base | train min |")
    print("|---|---|---|---|---|")
    for label, adapter, sparse, minutes in rows:
        deltas = read_sparse_delta(sparse)[0] if sparse else {}
        apply_sparse_delta(base.pipe.unet, deltas, 1.0)
        zigzag, accuracy = measure([(str(adapter), 1.0)] if adapter else None)
        apply_sparse_delta(base.pipe.unet, deltas, -1.0)
        spent = f"{minutes:.1f}" if minutes is not None else "—"
        print(f"| {label} | {zigzag:.2f} | {accuracy:.2f} | {accuracy - plain:+.2f} | {spent} |")


if __name__ == "__main__":
    main()
