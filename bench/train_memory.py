"""Training memory and speed: full fine-tuning, LoRA, SaRA and CoLoRA at equal trainable-parameter budget.

    .venv/bin/python -m bench.train_memory --arch tiny           # the embedded UNet, CPU
    .venv/bin/python -m bench.train_memory --arch sd15 --size 256  # SD 1.5 UNet, random weights

Each method runs in its own process (so peak memory is not polluted by the previous one): a few optimizer steps
of the denoising loss on random latents, reporting peak memory above the process's start and time per step;
the ratios to full fine-tuning and to LoRA are printed from the one run. Memory is a property of the
architecture, not of the weights, so random weights are used for SD 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from peft import LoraConfig, inject_adapter_in_model

from bench.measure import measured
from bench.random_sd import sd15_unet
from frontends.build.components import make_unet as tiny
from trainers.colora import allocate_ranks
from trainers.sara import SaraConfig, SaraMethod

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "sara", "sara_attention", "colora")  # sara_attention: SaRA on LoRA's modules only


def make_unet(arch: str):
    if arch == "tiny":
        return tiny()
    return sd15_unet()


def trainable(unet, method: str, budget: int) -> list[torch.nn.Parameter]:
    """Make ``method``'s parameters trainable with about ``budget`` values (full: everything)."""
    unet.requires_grad_(method == "full")
    if method == "full":
        return list(unet.parameters())
    if method.startswith("sara"):
        scope = "attention_only" if method == "sara_attention" else "all"
        sara = SaraMethod(SaraConfig(target_params=budget, progressive=False, lambda_rank=5e-4, scope=scope))
        context = SimpleNamespace(base=SimpleNamespace(pipe=SimpleNamespace(unet=unet)),
                                  config=SimpleNamespace(seed=0), logs={}, device=next(unet.parameters()).device)
        groups = sara.setup(context)
        unet._bench_sara = (sara, context)
        return groups[0]["params"]
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    linears = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(tuple(targets))
               and ".attn" in n}
    per_rank = sum(m.in_features + m.out_features for m in linears.values())
    rank = max(1, round(budget / per_rank))
    pattern = {}
    if method == "colora":  # per-layer ranks under the same budget (scores: the layer width, for the bench)
        dims = {n: (m.in_features, m.out_features) for n, m in linears.items()}
        scores = {n: float(m.in_features) for n, m in linears.items()}
        ranks = allocate_ranks(scores, dims, rank * per_rank, min_rank=1, max_rank=4 * rank, multiple=1)
        pattern = {f"^{n.replace('.', chr(92) + '.')}$": r for n, r in ranks.items()}
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(linears),
                                       rank_pattern=pattern), unet)
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def run_one(arch: str, method: str, size: int, batch: int, steps: int, budget: int) -> dict:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = make_unet(arch).to(device)
    latent = size // (4 if arch == "tiny" else 8)
    width = unet.config.cross_attention_dim
    x = torch.randn(batch, 4, latent, latent, device=device)
    hidden = torch.randn(batch, 77, width, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    with measured(device) as memory:
        params = trainable(unet, method, budget)
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        timings = []
        for step in range(steps):
            start = time.perf_counter()
            loss = unet(x, t, hidden).sample.pow(2).mean()
            loss.backward()
            if method.startswith("sara"):
                sara, context = unet._bench_sara
                sara.after_backward(context, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - start)
    count = sum(p.numel() for p in params)
    state = sum(v.numel() for values in optimizer.state.values() for v in values.values()
                if torch.is_tensor(v) and v.dim())
    return {"method": method, "trainable": count, "optimizer_state_values": state,
            "peak_mib": memory.peak_bytes / 2**20, "device": device.type,
            "seconds_per_step": sum(timings[1:]) / max(1, len(timings) - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--size", type=int, default=None, help="image size (tiny: 64, sd15: 256 on CPU)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget", type=int, default=None, help="trainable values (default: 1%% of the UNet)")
    parser.add_argument("--one", choices=METHODS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    size = args.size or (64 if args.arch == "tiny" else 256)
    batch = args.batch or (4 if args.arch == "tiny" else 1)
    budget = args.budget or sum(p.numel() for p in make_unet(args.arch).parameters()) // 100
    if args.one:
        print(json.dumps(run_one(args.arch, args.one, size, batch, args.steps, budget)))
        return
    rows = {}
    for method in METHODS:
        output = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--size", str(size), "--batch",
                                 str(batch), "--steps", str(args.steps), "--budget", str(budget), "--one", method],
                                capture_output=True, text=True, check=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
        rows[method] = json.loads(output.stdout.strip().splitlines()[-1])
    device = rows["full"]["device"]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{args.arch} UNet, {size} px, batch {batch}, fp32, {device} ({name}), budget {budget:,} trainable values")
    print("| method | trainable | optimizer state values | peak MiB | ÷ full | ÷ LoRA | s/step | ÷ full |")
    print("|---|---|---|---|---|---|---|---|")
    for method, row in rows.items():
        print(f"| {method} | {row['trainable']:,} | {row['optimizer_state_values']:,} | {row['peak_mib']:.0f} | "
              f"{row['peak_mib'] / rows['full']['peak_mib']:.2f} | {row['peak_mib'] / rows['lora']['peak_mib']:.2f} | "
              f"{row['seconds_per_step']:.3f} | {row['seconds_per_step'] / rows['full']['seconds_per_step']:.2f} |")


if __name__ == "__main__":
    main()
