"""Content/style disentanglement on the embedded model: Break-for-Make vs merged LoRAs, and DECOR's leakage.

    .venv/bin/python -m bench.disentangle b4m     [--n 100]   # B4M made adapter vs a merged plain-LoRA pair
    .venv/bin/python -m bench.disentangle leakage [--n 100]   # style-adapter shape leakage, DECOR train/inference
    .venv/bin/python -m bench.disentangle basis   [--n 100]   # B4M: the base's damage from the frozen basis alone
    .venv/bin/python -m bench.disentangle decor_basis          # DECOR's bases on the text encoder (no images)

b4m: 5 content images (the reserved shape "moon", trigger sks) and 5 style images (the reserved texture
"zigzag", trigger zwx); "a {color} zwx sks on a {background} background" over n seeds: the rate at which moon AND
zigzag appear, for B4M's made adapter (PLP halves on ``--b4m_targets``) and for the two plain LoRAs (trained on
the same images with ``--recipe``) merged at 1.0/1.0. Wall time of the whole B4M pipeline is printed.

basis: B4M's frozen block B_f·A_f alone (learnable halves zero) as an adapter, on n ordinary prompts (all four
attributes as asked) beside the base, for the paper's prior (square to_q/k/v) and ``--prior_layers all`` on the
bench's targets, with Q drawn from d rows (the earlier scale) or from max(d, 1280) rows (the official code's).

decor_basis: for DECOR's 1-word bases, their overlaps ‖VᵢᵀVⱼ‖²/min(kᵢ, kⱼ), the share of the BOS row they remove,
and the share of a word's in-context difference (its row in "a red {word} on a white background" minus the
reference words' mean row there) each basis removes. Then what DECOR removes from the leakage bench's own text, as
it is applied there (the captions' or the prompt's words protected): the share of the word rows' energy (BOS to EOS)
of the training captions (as the bench writes them, and with the circle named), and of the inference prompts.

leakage: a style adapter trained on 5 zigzag *circles* captioned "a {color} zwx shape on a {background}
background" is prompted with the other shapes; leakage is the rate at which it still draws a circle. Trained
with and without DECOR (``decor_remove=["circle"]``), then DECOR at inference on the plain adapter: leakage vs
prompt accuracy. Controls: the same with unrelated words removed instead (``--controls``: a texture the prompts never
name, and a prompted colour), which must leave the leakage alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.measure import read_generations
from frontends.build.demo_adapters import KEYS_VALUES, WIDE, render_demo_images
from pipelines.decor import decor_blocks, kept_words, project_blocks
from pipelines.loading import load_base
from studio.adapters.file import AdapterFile, LoraModule, save_adapter
from studio.data import procedural
from studio.eval.domain import DomainEvaluator
from studio.eval.prompt_following import grid_cases
from trainers import TrainConfig, get_method, train
from trainers.b4m import PRIORS, RESNET_TARGETS, TARGETS, B4MConfig, make_basis, train_b4m

COLORS, BACKGROUNDS = list(procedural.COLORS), list(procedural.BACKGROUNDS)


#: LoRA recipes: cross-attention keys and values (content at lr 2e-3), every attention projection at lr 1e-3,
#: and every attention projection plus the ResNet convolutions at lr 1e-3 (the demo adapters' targets).
RECIPES = {"kv": {"content": {"learning_rate": 2e-3, "target_modules": KEYS_VALUES},
                  "style": {"learning_rate": 3e-3, "target_modules": KEYS_VALUES}},
           "all_attention": {kind: {"learning_rate": 1e-3, "target_modules": ("to_q", "to_k", "to_v", "to_out.0")}
                             for kind in ("content", "style")},
           "wide": {kind: {"learning_rate": 1e-3, "target_modules": WIDE} for kind in ("content", "style")}}
#: B4M's PLP layers: the paper's attention projections, or those and the ResNet convolutions.
B4M_TARGETS = {"attention": TARGETS, "attention+resnet": TARGETS + RESNET_TARGETS}


def lora(base, images: Path, kind: str, name: str, out: Path, steps: int, prior: bool = True,
         recipe: str = "kv", seed: int = 0, **extra) -> Path:
    """A plain rank-8 LoRA with one of the :data:`RECIPES`."""
    config = TrainConfig(images=images, output=name, output_dir=out, kind=kind, rank=8, max_train_steps=steps,
                         train_batch_size=4, seed=seed, with_prior_preservation=prior, num_class_images=96,
                         lr_scheduler="cosine", lr_warmup_steps=20, **RECIPES[recipe][kind], **extra)
    return train(config, get_method("lora"), base=base).outputs[0]


def b4m(args, base, evaluator, work: Path) -> None:
    content = render_demo_images(work / "content", "content", count=5)
    style = render_demo_images(work / "style", "style", count=5)
    start = time.perf_counter()
    config = TrainConfig(output="b4m", output_dir=work / "out", seed=args.seed, train_batch_size=4)
    content_file, style_file, made = train_b4m(B4MConfig(
        content=content, style=style, rank=args.rank, learning_rate=args.lr,
        aux_learning_rate=args.aux_lr or args.lr / 10, make_learning_rate=args.make_lr or args.lr,
        break_steps=args.break_steps, make_steps=args.make_steps,
        style_learning_rate=args.style_lr, target_modules=B4M_TARGETS[args.b4m_targets],
        make_optimizer=args.make_optimizer, prior=args.prior_layers, prior_rows=args.prior_rows), config, base=base)
    minutes = (time.perf_counter() - start) / 60
    prompts = [f"a {COLORS[i % 6]} zwx sks on a {BACKGROUNDS[(i // 6) % 3]} background" for i in range(args.n)]
    rows = {
        "B4M made adapter": [(str(made), 1.0)],
        "B4M content + style, merged 1.0/1.0": [(str(content_file), 1.0), (str(style_file), 1.0)],
    }
    if args.plain:
        plain_content = lora(base, content, "content", "lora-content", work / "out", args.lora_steps,
                             recipe=args.recipe, seed=args.seed)
        plain_style = lora(base, style, "style", "lora-style", work / "out", args.lora_steps, recipe=args.recipe,
                           seed=args.seed)
        rows["plain LoRA content + style, merged 1.0/1.0"] = [(str(plain_content), 1.0), (str(plain_style), 1.0)]
    print(f"base {args.model or 'the embedded model'}; "
          f"B4M pipeline ({args.b4m_targets}, orthogonal prior on {args.prior_layers} layers from max(d, "
          f"{args.prior_rows}) rows, rank {args.rank}, "
          f"break {args.break_steps} + make {args.make_steps} steps ({args.make_optimizer}), lr {args.lr}, "
          f"style lr {args.style_lr or args.lr}, aux lr {args.aux_lr or args.lr / 10}, "
          f"make lr {args.make_lr or args.lr}, "
          f"{f'plain LoRAs {args.recipe} recipe' if args.plain else 'no plain pair'}, "
          f"5 + 5 images, training seed {args.seed}): {minutes:.1f} min on one CPU thread; n = {args.n}, "
          f"{args.steps} steps")
    print("| adapters | moon and zigzag | moon | zigzag |")
    print("|---|---|---|---|")
    for label, adapters in rows.items():
        readings = read_generations(base, evaluator, prompts, args.steps, adapters=adapters, method="merge")
        moon = np.array([r.shape == "moon" for r in readings])
        zigzag = np.array([r.texture == "zigzag" for r in readings])
        print(f"| {label} | {np.mean(moon & zigzag):.2f} | {moon.mean():.2f} | {zigzag.mean():.2f} |")


def basis(args, base, evaluator, work: Path) -> None:
    cases = grid_cases(args.n, held_out=False, seed=21)

    def accuracy(adapters) -> float:
        readings = read_generations(base, evaluator, [c.prompt for c in cases], args.steps, adapters=adapters)
        return float(np.mean([all(getattr(r, k) == getattr(c, k) for k in ("color", "texture", "shape", "background"))
                              for r, c in zip(readings, cases)]))

    plain = accuracy(None)
    print(f"B4M basis only (A_l = B_l = 0), rank {args.rank}, basis seed {args.seed}; n = {args.n} ordinary prompts, "
          f"{args.steps} steps; base accuracy {plain:.2f}")
    print("| targets | prior | Q rows | largest ‖B_f·A_f‖₂ / ‖W‖₂ | accuracy | change vs base |")
    print("|---|---|---|---|---|---|")
    unet = base.pipe.unet
    for targets, prior in (("attention", "square"), ("attention+resnet", "all")):
        for rows in (0, 1280):
            drawn = make_basis(unet, args.rank, args.seed, B4M_TARGETS[targets], prior, rows)
            modules, ratios = {}, []
            for key in [k for k in drawn if k.endswith(".A_frozen")]:
                path = key.removesuffix(".A_frozen")
                a = torch.cat([drawn[key], torch.zeros_like(drawn[f"{path}.A_learn"])], dim=1)
                b = torch.cat([drawn[f"{path}.B_frozen"], torch.zeros_like(drawn[f"{path}.B_learn"])], dim=0)
                modules[path] = LoraModule(a, b, alpha=float(args.rank))
                weight = unet.get_submodule(path).weight.detach().flatten(1)
                block = b.flatten(1) @ a.flatten(1)
                ratios.append(float(torch.linalg.matrix_norm(block, ord=2) / torch.linalg.matrix_norm(weight, ord=2)))
            file = save_adapter(AdapterFile({"unet": modules}), work / f"basis-{targets}-{prior}-{rows}.safetensors")
            value = accuracy([(str(file), 1.0)])
            label = "d" if rows == 0 else f"max(d, {rows})"
            print(f"| {targets} | {prior} | {label} | {max(ratios):.2f} | {value:.2f} | {value - plain:+.2f} |",
                  flush=True)


@torch.no_grad()
def decor_basis(args, base, evaluator, work: Path) -> None:
    pipe = base.pipe
    words = ["circle", "square", "star", "blue", "red", "background", "zwx"]
    bases = {w: decor_blocks(pipe, [w])[0][2] for w in words}
    references = ("thing", "object", "item", "picture", "photo", "image", "shape", "color", "style", "person",
                  "place", "texture")
    template = "a red {} on a white background"
    bos = pipe.encode_texts([""])[0][0, 0]
    print("DECOR 1-word bases: overlap ‖VᵢᵀVⱼ‖²/min(kᵢ, kⱼ) (rows × columns), share of the BOS row removed, and "
          f"share of each word's in-context difference in {template!r} removed (columns: the word whose row)")
    print(f"| basis of | k | {' | '.join(words)} | BOS row |")
    print("|---|---|" + "---|" * (len(words) + 1))
    for w in words:
        overlaps = [float((bases[w].T @ bases[u]).square().sum()) / min(bases[w].shape[1], bases[u].shape[1])
                    for u in words]
        share = float((bos @ bases[w]).square().sum() / bos.square().sum())
        print(f"| {w} | {bases[w].shape[1]} | {' | '.join(f'{o:.2f}' for o in overlaps)} | {share:.2f} |")
    print(f"| **in-context difference removed** | | {' | '.join(' ' for _ in words)} | |")
    for w in words:
        shares = []
        for u in words:
            place = 1 + len(pipe.tokenizer("a red", add_special_tokens=False).input_ids)
            hidden = pipe.encode_texts([template.format(u)])[0][0, place]
            mean = pipe.encode_texts([template.format(r) for r in references])[0][:, place].mean(0)
            difference = hidden - mean
            shares.append(float((difference @ bases[w]).square().sum() / difference.square().sum()))
        print(f"| {w} | {bases[w].shape[1]} | {' | '.join(f'{x:.2f}' for x in shares)} | |")
    decor_reach(pipe, args.n)


@torch.no_grad()
def decor_reach(pipe, n: int) -> None:
    """The share of the word rows' energy that DECOR removes from the leakage bench's captions and prompts."""
    captions = {"training captions, circle unnamed (the bench's)": [procedural.caption(COLORS[i % 6], "zwx", "shape",
                                                                     BACKGROUNDS[i % 3]) for i in range(5)],
                "training captions, circle named": [procedural.caption(COLORS[i % 6], "zwx", "circle",
                                                                       BACKGROUNDS[i % 3]) for i in range(5)]}
    prompts = leakage_prompts(n)[0]
    cache: dict[tuple, tuple] = {}

    class Memo:  # the pipeline with its text encodings memoised: the bases for each prompt share most texts
        def __getattr__(self, name: str):
            return getattr(pipe, name)

        def encode_texts(self, texts: list[str], **options) -> tuple:
            key = (tuple(texts), tuple(sorted(options.items())))
            if key not in cache:
                cache[key] = pipe.encode_texts(texts, **options)
            return cache[key]

    memo = Memo()

    def removed(texts: list[str], word: str, keep_from: list[str]) -> float:
        blocks = decor_blocks(memo, [word], keep=kept_words(keep_from, [word]))
        hidden = pipe.encode_texts(texts)[0].float()
        end = max(len(ids) for ids in pipe.tokenizer(texts).input_ids)  # through EOS
        rows = hidden[:, 1:end]
        return float((rows - project_blocks(hidden, blocks)[:, 1:end].float()).square().sum() / rows.square().sum())

    words = ["circle", "dotted", "blue"]
    print(f"Share of the word rows' energy (BOS excluded, through EOS) DECOR removes (α = 1) from the leakage "
          f"bench's text; inference: the first {len(prompts)} prompts, each with its own words protected")
    print(f"| text | {' | '.join(f'remove {w!r}' for w in words)} |")
    print("|---|" + "---|" * len(words))
    for label, texts in captions.items():
        print(f"| {label} | {' | '.join(f'{removed(texts, w, texts):.3f}' for w in words)} |")
    shares = [np.mean([removed([p], w, [p]) for p in prompts]) for w in words]
    print(f"| inference prompts | {' | '.join(f'{x:.3f}' for x in shares)} |")


def leakage_prompts(n: int) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The leakage bench's n prompts ("a {color} zwx {shape} on a {background} background", never a circle)."""
    others = [s for s in procedural.BASE_SHAPES if s != "circle"]
    cases = [(COLORS[i % 6], others[i % len(others)], BACKGROUNDS[(i // 6) % 3]) for i in range(n)]
    return [f"a {c} zwx {s} on a {b} background" for c, s, b in cases], cases


def circle_style_images(folder: Path, count: int = 5, caption: str = "shape") -> Path:
    """Zigzag circles only, captioned without their shape ("a red zwx shape on ...", or with ``caption="bare"``
    "a red zwx on ..."), as style references usually are: a style set whose content (circle) can leak into the
    trigger. ``caption="named"`` names it ("a red zwx circle on ..."), so the caption carries the circle's
    direction that DECOR's word basis can reach."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        color, background = COLORS[index % 6], BACKGROUNDS[index % 3]
        scene = procedural.jittered_scene(rng, color, "zigzag", "circle", background)
        Image.fromarray(procedural.render(scene)).save(folder / f"{index}.png")
        text = procedural.caption(color, "zwx", "circle" if caption == "named" else "shape", background)
        (folder / f"{index}.txt").write_text(text.replace(" shape", "") if caption == "bare" else text)
    return folder


def leakage(args, base, evaluator, work: Path) -> None:
    images = circle_style_images(work / "circles", count=args.images, caption=args.caption)
    trained = {}
    for label, words in (("plain", []), ("decor", ["circle"]), ("control", args.controls[:1])):
        options = {"decor_remove": words} if words else {}
        trained[label] = lora(base, images, "style", f"style-{label}", work / "out", args.lora_steps,
                              prior=args.prior, recipe=args.recipe, seed=args.seed, **options)
    prompts, cases = leakage_prompts(args.n)
    blue = np.array([c == "blue" for c, _, _ in cases])

    def row(label: str, adapter: Path, **options) -> None:
        readings = read_generations(base, evaluator, prompts, args.steps, adapters=[(str(adapter), 1.0)], **options)
        leak = np.mean([r.shape == "circle" for r in readings])
        zigzag = np.mean([r.texture == "zigzag" for r in readings])
        shape = np.array([r.shape == s for r, (_, s, _) in zip(readings, cases)])
        color = np.array([r.color == c for r, (c, _, _) in zip(readings, cases)])
        right = np.mean([(r.shape, r.color, r.background) == (s, c, b) for r, (c, s, b) in zip(readings, cases)])
        print(f"| {label} | {leak:.2f} | {zigzag:.2f} | {shape.mean():.2f} | {color[~blue].mean():.2f} | "
              f"{color[blue].mean():.2f} | {right:.2f} |", flush=True)

    print(f"base {args.model or 'the embedded model'}; "
          f"style adapter trained on {args.images} zigzag circles ({args.caption} captions, {args.recipe} recipe, "
          f"{args.lora_steps} steps, {'with' if args.prior else 'without'} prior preservation), prompted with the "
          f"other shapes; control words {', '.join(args.controls)}; training seed {args.seed}; n = {args.n} "
          f"({int(blue.sum())} prompts ask for blue)")
    print("| adapter | leakage (draws a circle) | zigzag | shape as asked | colour as asked (other prompts) | "
          "colour as asked (blue prompts) | shape, colour and background as asked |")
    print("|---|---|---|---|---|---|---|")
    row("plain LoRA", trained["plain"])
    for alpha in (0.5, 1.0):
        row(f"plain LoRA, DECOR at inference, remove 'circle', α = {alpha}", trained["plain"],
            decor_remove=["circle"], decor_alpha=alpha)
    for word in args.controls:
        row(f"plain LoRA, DECOR at inference, remove '{word}' (control), α = 1.0", trained["plain"],
            decor_remove=[word], decor_alpha=1.0)
    row("LoRA trained with DECOR (remove 'circle')", trained["decor"])
    row(f"LoRA trained with DECOR (remove '{args.controls[0]}', control)", trained["control"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["b4m", "leakage", "basis", "decor_basis"])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the training runs' seed (noise, timesteps, order)")
    parser.add_argument("--rank", type=int, default=16, help="B4M rank")
    parser.add_argument("--lr", type=float, default=1e-3, help="B4M main and make learning rate")
    parser.add_argument("--style_lr", type=float, default=None, help="B4M style break rate (default: --lr)")
    parser.add_argument("--aux_lr", type=float, default=None,
                        help="B4M auxiliary sets' rate in both break runs (default: --lr / 10)")
    parser.add_argument("--make_lr", type=float, default=None, help="B4M make-stage rate (default: --lr)")
    parser.add_argument("--break_steps", type=int, default=300)
    parser.add_argument("--make_steps", type=int, default=300)
    parser.add_argument("--lora_steps", type=int, default=400)
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="b4m: also train and read the merged plain-LoRA pair (--no-plain: B4M's rows only, when "
                             "the pair's numbers for this seed and recipe are already known)")
    parser.add_argument("--prior", action=argparse.BooleanOptionalAction, default=True,
                        help="prior preservation for the plain LoRAs (--no-prior: the overfitting few-image case)")
    parser.add_argument("--caption", choices=["shape", "bare", "named"], default="shape",
                        help='leakage: the circles\' captions, "a red zwx shape on …", "a red zwx on …" or '
                             '"a red zwx circle on …"')
    parser.add_argument("--images", type=int, default=5, help="leakage: how many zigzag circles the style set has")
    parser.add_argument("--controls", nargs="+", default=["dotted", "blue"],
                        help="leakage: unrelated words DECOR removes as controls (at inference; the first also in "
                             "training): a texture the prompts never name, and a prompted colour")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="kv", help="the plain LoRAs' recipe")
    parser.add_argument("--make_optimizer", choices=["riemannian", "adamw"], default="riemannian")
    parser.add_argument("--prior_layers", choices=PRIORS, default="square",
                        help="B4M's orthogonal prior on square layers (the paper's) or on all layers")
    parser.add_argument("--prior_rows", type=int, default=1280,
                        help="B4M: Q has max(d, this) rows (the official code's 1280; 0: d rows)")
    parser.add_argument("--b4m_targets", choices=sorted(B4M_TARGETS), default="attention",
                        help="the layers B4M's PLP halves adapt")
    parser.add_argument("--model", default=None, help="base model folder (default: the embedded model)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, evaluator = load_base(args.model), DomainEvaluator.load()
    with tempfile.TemporaryDirectory(prefix=f"studio-bench-{args.part}-") as work:
        {"b4m": b4m, "leakage": leakage, "basis": basis, "decor_basis": decor_basis}[args.part](
            args, base, evaluator, Path(work))


if __name__ == "__main__":
    main()
