"""Prompt following of a base model on the embedded domain, read by the domain evaluator.

    .venv/bin/python -m bench.prompt_following --n 300 [--pairs 100] [--model SPEC] [--steps 20] [--guidance 5]

Prints a table (seen vs held-out combinations) and writes it as JSON beside the model when --json is given.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipelines.loading import load_base
from studio.eval.domain import DomainEvaluator
from studio.eval.prompt_following import measure_pair_following, measure_prompt_following


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="seen prompts (held-out: n/3)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=100, help="two-object prompts")
    parser.add_argument("--json", default=None, help="write the table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_base(args.model, device="cpu")
    start = time.time()
    tables = measure_prompt_following(base, DomainEvaluator.load(), n=args.n, seed=args.seed, steps=args.steps,
                                      guidance_scale=args.guidance)
    print(f"model {base.source} (build step {(base.domain or {}).get('build_step')}), "
          f"{time.time() - start:.0f} s")
    print("| split | n | color | texture | shape | background | all four |")
    print("|---|---|---|---|---|---|---|")
    for split, row in tables.items():
        print(f"| {split} | {row['n']} | {row['color']:.2f} | {row['texture']:.2f} | {row['shape']:.2f} | "
              f"{row['background']:.2f} | {row['all']:.2f} |")
    pairs = measure_pair_following(base, DomainEvaluator.load(), n=args.pairs, seed=args.seed, steps=args.steps,
                                   guidance_scale=args.guidance)
    tables["pairs"] = pairs
    print(f"\ntwo objects (n = {pairs['n']}): shape {pairs['shape']:.2f}, color {pairs['color']:.2f} per object; "
          f"both objects right {pairs['both']:.2f}, only one {pairs['one']:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(tables, handle, indent=2)


if __name__ == "__main__":
    main()
