"""The ``studio`` command line: argument parsing only; every command calls into the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

import torch

from frontends.build.demo_adapters import DEMO_DIR, build_demo_adapters, render_demo_images
from frontends.build.domain_clip import DOMAIN_CLIP, train_domain_clip
from frontends.build.embedded import build_stages, embedded_stages
from frontends.build.evaluator import DEFAULT_EVALUATOR, train_evaluator
from frontends.build.guided import GUIDED_EXPORT, build_guided, guided_config
from frontends.build.tiny import DEFAULT_EXPORT
from frontends.config_flags import add_config_flags, config_from_args, non_negative_int, positive_int
from frontends.generate import GenerationRequest, generate, request_from_png
from pipelines.frequency import profile_adapter, store_profile
from pipelines.loading import load_base
from pipelines.methods import METHODS
from studio.adapters.file import read_adapter
from studio.adapters.library import (
    SHIPPED,
    describe,
    export_adapter,
    library_dir,
    list_adapters,
    plot_ranks,
    resolve_adapter,
)
from studio.adapters.weights import scalar_weight
from studio.data import procedural
from studio.data.autocaption import caption_folder
from studio.errors import ConfigError, StudioError
from studio.eval.report import evaluate_folder, format_table
from studio.files import atomic_write
from studio.png import default_outputs, numbered_png, save_png
from studio.text import split_words
from trainers import TRAINERS
from trainers import run as run_trainer
from trainers.b4m import B4MConfig
from trainers.config import TrainConfig
from trainers.sara import SaraConfig


def _build_tiny(args: argparse.Namespace) -> int:
    stages = embedded_stages(args.seed, args.max_train_steps)
    print(build_stages(stages[:1] if args.base_only else stages, work_root=args.work_dir,
                       export_dir=args.output or DEFAULT_EXPORT))
    return 0


def _build_guided(args: argparse.Namespace) -> int:
    config = guided_config(seed=args.seed, drop_attribute=args.caption_drop_attribute,
                           wrong_attribute=args.caption_wrong_attribute, steps=args.max_train_steps,
                           start_from=args.start_from)
    print(build_guided(config, work_dir=args.work_dir, export_dir=args.output or GUIDED_EXPORT))
    return 0


def _build_evaluator(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    accuracy = train_evaluator(args.output or DEFAULT_EVALUATOR, steps=args.max_train_steps, seed=args.seed)
    print(" ".join(f"{name}={value:.3f}" for name, value in accuracy.items()))
    return 0


def _generate(args: argparse.Namespace) -> int:
    _single_thread_on_cpu()
    request, png_model = request_from_png(args.from_png) if args.from_png else (None, None)
    if request is None and args.prompt is None:
        raise ConfigError("generate needs --prompt (or --from-png FILE)")
    base = load_base(args.model or png_model, device=args.device, scheduler=args.scheduler, vae=args.vae,
                     prediction_type=args.prediction_type, zero_snr=args.zero_snr, config=args.model_config)
    given = {name: value for name, value in (
        ("prompt", args.prompt), ("negative_prompt", args.negative_prompt), ("seed", args.seed),
        ("steps", args.steps), ("guidance_scale", args.guidance_scale), ("width", args.width),
        ("height", args.height), ("num_images", args.num_images), ("method", args.method),
        ("decor_alpha", args.decor_alpha), ("sampler", args.sampler or args.scheduler), ("schedule", args.schedule),
        ("clip_skip", args.clip_skip), ("init_image", args.init_image), ("mask", args.mask),
        ("mask_blur", args.mask_blur),
        ("strength", args.strength), ("hires_scale", args.hires_scale), ("hires_steps", args.hires_steps),
        ("hires_strength", args.hires_strength), ("hires_upscaler", args.hires_upscaler),
        ("adapters", [parse_adapter_spec(a) for a in args.adapter]),
        ("method_options", dict(parse_option(o) for o in args.method_option)),
        ("perp_neg", [parse_weighted_text(t) for t in args.perp_neg]),
        ("decor_remove", split_words(args.decor_remove)),
        ("adapter_prompts", args.adapter_prompt)) if value not in (None, [], {})}
    request = replace(request, **given) if request is not None else GenerationRequest(**given)
    out = Path(args.out) if args.out else None
    for index, result in enumerate(generate(base, request)):
        if out is None:
            path = numbered_png(default_outputs(), result.recipe["seed"])
        else:
            path = out if request.num_images == 1 else out.with_name(f"{out.stem}-{index:03d}{out.suffix}")
        save_png(result.image, path, result.parameters, result.recipe)
        print(path)
    return 0


def parse_adapter_spec(text: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` → (file, weight); a weight that is not a number is an error."""
    source, sep, weight = text.rpartition(":")
    if not sep or "/" in weight or weight.endswith(".safetensors"):
        return text, 1.0
    return source, scalar_weight(weight, f"adapter weight in {text!r}")


def parse_weighted_text(text: str, default: float = 1.5) -> tuple[str, float]:
    """``TEXT[:WEIGHT]`` → (text, weight)."""
    body, sep, weight = text.rpartition(":")
    if sep:
        try:
            return body, float(weight)
        except ValueError:
            pass
    return text, default


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as int, float, true/false, a JSON list (``groups=[["red"],["blue"]]``), or
    kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"method option {text!r} must look like KEY=VALUE")
    if value.startswith("["):
        try:
            return key, json.loads(value)
        except json.JSONDecodeError as error:
            raise ConfigError(f"method option {key}: {value!r} is not a JSON list ({error.msg})") from None
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def _single_thread_on_cpu() -> None:
    """One thread: on 2-core machines two threads spin-wait and one generation varied from 0.7 s to 50 s."""
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("STUDIO_THREADS", "1")))


def _app(args: argparse.Namespace) -> int:
    import importlib.util

    app_file = Path(__file__).resolve().parents[1] / "app.py"
    spec = importlib.util.spec_from_file_location("studio_app", app_file)
    if spec is None or spec.loader is None or not app_file.exists():
        print(f"studio: error: the app is not installed beside the package ({app_file})", file=sys.stderr)
        return 2
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.serve(args)
    return 0


def add_app_flags(parser: argparse.ArgumentParser) -> None:
    """The web app's flags, shared by ``studio app`` and ``python app.py``."""
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="a public gradio.live link (needs internet)")
    parser.add_argument("--auth", default=None, help="user:password")
    parser.add_argument("--model", default=None, help="base model (default: the embedded one)")


def _adapters_list(args: argparse.Namespace) -> int:
    skipped: list[tuple[Path, str]] = []
    rows = list_adapters(skipped=skipped)
    if not rows:
        print("no adapters found")
    else:
        table = [("NAME", "KIND", "METHOD", "RANK", "BASE", "TRIGGERS", "FILE")]
        for row in rows:
            ranks = str(row.ranks[0]) if len(row.ranks) == 1 else f"{min(row.ranks)}-{max(row.ranks)}"
            table.append((row.name, row.kind or "-", row.method, ranks, row.base_family or "-",
                          ", ".join(row.trigger_words) or "-", str(row.path)))
        widths = [max(len(line[column]) for line in table) for column in range(len(table[0]) - 1)]
        for line in table:
            print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1])
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


def _adapters_inspect(args: argparse.Namespace) -> int:
    adapter = read_adapter(resolve_adapter(args.file))
    print(json.dumps(describe(adapter), indent=2))
    if args.plot:
        print(plot_ranks(adapter, args.plot), file=sys.stderr)
    return 0


def _adapters_convert(args: argparse.Namespace) -> int:
    print(export_adapter(args.file, args.to, args.out, args.save_precision))
    return 0


def add_training_flags(parser: argparse.ArgumentParser, options: type | None = None) -> None:
    """Flags of the shared training loop, named as in diffusers' and kohya's training scripts. ``--rank``,
    ``--learning_rate`` and ``--target_modules`` also set the method's options of those names (B4M's)."""
    defaults = TrainConfig()
    own = {f.name: f for f in fields(options)} if options is not None else {}

    def default_of(name: str) -> str:
        value = getattr(options(), name) if name in own else getattr(defaults, name)
        if isinstance(value, tuple):
            return " ".join(value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    parser.add_argument("--images", "--train_data_dir", dest="images", type=Path, required=options is not B4MConfig)
    parser.add_argument("--instance_prompt", default=None, help="caption for images without a .txt sidecar")
    parser.add_argument("--trigger", dest="trigger_words", action="append", default=[], help="trigger word")
    parser.add_argument("--kind", choices=["content", "style"], default=defaults.kind)
    parser.add_argument("--output", "--output_name", dest="output", required=True, help="adapter name")
    parser.add_argument("--output_dir", type=Path, default=None, help="default: the adapter library")
    parser.add_argument("--model", "--pretrained_model_name_or_path", dest="model", default=None)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no_center_crop", dest="center_crop", action="store_false")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--repeats", type=positive_int, default=defaults.repeats)
    parser.add_argument("--rank", "--network_dim", dest="rank", type=positive_int, default=None,
                        help=f"adapter rank (default: {default_of('rank')})")
    parser.add_argument("--network_alpha", "--lora_alpha", dest="network_alpha", type=float, default=None)
    parser.add_argument("--train_text_encoder", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="default: 1e-3·exp(−350θ) (SaRA, paper eq. 12)" if options is SaraConfig
                        else f"default: {default_of('learning_rate')}")
    parser.add_argument("--text_encoder_lr", type=float, default=None)
    parser.add_argument("--lr_scheduler", default=defaults.lr_scheduler)
    parser.add_argument("--lr_warmup_steps", type=non_negative_int, default=defaults.lr_warmup_steps)
    parser.add_argument("--max_train_steps", type=positive_int, default=defaults.max_train_steps)
    parser.add_argument("--train_batch_size", type=positive_int, default=defaults.train_batch_size)
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    parser.add_argument("--max_grad_norm", type=float, default=defaults.max_grad_norm)
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--snr_gamma", type=float, default=None)
    parser.add_argument("--with_prior_preservation", action="store_true")
    parser.add_argument("--prior_loss_weight", type=float, default=defaults.prior_loss_weight)
    parser.add_argument("--class_prompt", default=None)
    parser.add_argument("--num_class_images", type=non_negative_int, default=defaults.num_class_images)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--checkpointing_steps", type=non_negative_int, default=0)
    parser.add_argument("--checkpoints_total_limit", type=non_negative_int, default=defaults.checkpoints_total_limit)
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    parser.add_argument("--validation_prompt", default=None)
    parser.add_argument("--validation_steps", type=non_negative_int, default=0)
    parser.add_argument("--num_validation_images", type=positive_int, default=defaults.num_validation_images)
    parser.add_argument("--decor-remove", "--decor_remove", dest="decor_remove", action="append", default=[],
                        metavar="WORDS", help="DECOR: comma-separated words projected out of the captions")
    parser.add_argument("--decor-alpha", "--decor_alpha", dest="decor_alpha", type=float, default=None)
    parser.add_argument("--save_as", dest="export_layout", choices=["diffusers", "kohya"], default="diffusers")
    parser.add_argument("--save_precision", choices=["fp16", "bf16", "fp32"], default=None,
                        help="precision of the saved factors (default: fp16 for --save_as kohya, as sd-scripts; fp32)")
    parser.add_argument("--target_modules", nargs="+", default=None,
                        help=f"layers the adapter trains (default: {default_of('target_modules')}; add conv1 "
                        "conv2 for the ResNet convolutions, as the demo adapters do)")
    parser.add_argument("--device", default=None)
    add_config_flags(parser, TrainConfig)  # the fields that carry their own help: buckets, captions, precision, …


def train_config_from_args(args: argparse.Namespace):
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    values["decor_remove"] = split_words(values.get("decor_remove", []))
    return TrainConfig(**values)


def _train(args: argparse.Namespace) -> int:
    _single_thread_on_cpu()
    options_class = TRAINERS[args.method].options
    options = config_from_args(options_class, args) if options_class is not None else None
    start = time.perf_counter()
    written = run_trainer(args.method, train_config_from_args(args), options)
    for path in written:
        print(path)
    if written:  # under accelerate launch: the main process only
        print(f"trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


def _adapters_profile(args: argparse.Namespace) -> int:
    _single_thread_on_cpu()
    base = load_base(args.model, device=args.device)
    path = resolve_adapter(args.file)
    profile = profile_adapter(base.pipe, path, steps=args.steps, tau_h=args.tau_h, show_progress=True)
    if args.frequency_class:
        profile["class"] = args.frequency_class
    shipped = path.resolve().is_relative_to(SHIPPED.resolve())  # the install's files stay as installed
    out = store_profile(path, profile, library_dir() / path.name if shipped else path)
    print(json.dumps(profile))
    print(f"stored in {out}", file=sys.stderr)
    return 0


def _build_demo_adapters(args: argparse.Namespace) -> int:
    _single_thread_on_cpu()
    base = load_base(args.model) if args.model else None
    overrides = {field: value for field, value in (("steps", args.max_train_steps), ("images", args.images),
                                                   ("pairs", args.pairs)) if value is not None}
    for path in build_demo_adapters(args.output or DEMO_DIR, seed=args.seed, base=base, only=args.only,
                                    **overrides):
        print(path)
    return 0


def _caption(args: argparse.Namespace) -> int:
    _single_thread_on_cpu()
    written = caption_folder(args.folder, args.model, args.prefix, args.caption_extension, args.overwrite,
                             args.device)
    print(f"{len(written)} captions written in {args.folder}", file=sys.stderr)
    return 0


def _demo_images(args: argparse.Namespace) -> int:
    kind = "content" if args.concept in procedural.RESERVED_SHAPES else "style"
    render_demo_images(args.folder, kind, count=args.count, seed=args.seed, trigger=args.trigger,
                       concept=args.concept, pairs=args.pairs if kind == "content" else 0)
    print(args.folder)
    return 0


def _build_clip(args: argparse.Namespace) -> int:
    _single_thread_on_cpu()
    report = train_domain_clip(args.output or DOMAIN_CLIP, steps=args.max_train_steps, seed=args.seed)
    print(" ".join(f"{k}={v:.3f}" for k, v in report.items()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    _single_thread_on_cpu()
    report = evaluate_folder(args.images, args.prompts, args.reference, tuple(args.metrics.split(",")),
                             args.clip_model, args.clip_weights)
    print(format_table(report))
    out = args.out or Path(args.images) / "eval.json"
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    print(out, file=sys.stderr)
    return 0


def _build_command(commands, name: str, description: str, handler, steps: int | None, output: str,
                   steps_help: str = "training steps") -> argparse.ArgumentParser:
    """A ``build-*`` command: seeded, with a step count and an output folder under assets/."""
    parser = commands.add_parser(name, help=description)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_train_steps", type=positive_int, default=steps, help=steps_help)
    parser.add_argument("--output", type=Path, default=None, help=f"folder (default: {output})")
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Adapter Studio: train and compose SD adapters")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    build = _build_command(commands, "build-tiny", "build (or resume building) the embedded model: the base, then "
                           "its two guided fine-tunes", _build_tiny, 24_000, "assets/tiny-sd",
                           "the base's diffusion steps (the VAE and decoder stages and the fine-tunes keep their own)")
    build.add_argument("--work-dir", type=Path, default=None,
                       help="where each stage keeps its resumable state (default: the studio cache)")
    build.add_argument("--base-only", action="store_true",
                       help="stop after the base, which then goes to --output (it follows prompts unguided)")
    guided = _build_command(commands, "build-guided", "fine-tune the embedded model on noisy, partial captions so "
                            "that it needs guidance (resumable)", _build_guided, 6000, "assets/tiny-sd-guided")
    guided.add_argument("--start-from", default="assets/tiny-sd", help="the model to fine-tune")
    guided.add_argument("--caption-drop-attribute", type=float, default=0.3,
                        help="probability that a caption leaves an attribute out")
    guided.add_argument("--caption-wrong-attribute", type=float, default=0.1,
                        help="probability that a caption names an attribute wrong")
    guided.add_argument("--work-dir", type=Path, default=None, help="resumable state (default: the studio cache)")
    _build_command(commands, "build-clip", "train the embedded domain's small CLIP", _build_clip, 2000, "assets/clip")
    demos = _build_command(commands, "build-demo-adapters", "train the demo content and style adapters",
                           _build_demo_adapters, None, "assets/adapters")
    demos.add_argument("--only", nargs="+", default=None, metavar="NAME", help="train only these (e.g. xyz-cross)")
    demos.add_argument("--model", default=None, help="base model folder (default: the embedded model)")
    demos.add_argument("--pairs", type=non_negative_int, default=None,
                       help="how many of a content adapter's images show the subject beside another object")
    demos.add_argument("--images", type=positive_int, default=None, help="training images per adapter")
    _build_command(commands, "build-evaluator", "train the embedded domain's evaluator", _build_evaluator, 3000,
                   "assets/evaluator")

    images = commands.add_parser("demo-images", help="render captioned training images of one of the embedded "
                                 "domain's reserved concepts (shapes: content; textures: style)")
    images.add_argument("folder", type=Path)
    images.add_argument("--concept", required=True, choices=["moon", "cross", "zigzag", "waves"])
    images.add_argument("--trigger", required=True, help="the word the captions use for the concept, e.g. sks")
    images.add_argument("--count", type=positive_int, default=5)
    images.add_argument("--pairs", type=non_negative_int, default=0,
                        help="content: how many images show the subject beside another object")
    images.add_argument("--seed", type=int, default=0)
    images.set_defaults(handler=_demo_images)

    caption = commands.add_parser("caption", help="caption a training folder with a captioning model on disk")
    caption.add_argument("folder", type=Path)
    caption.add_argument("--model", default=None,
                         help="a local BLIP, BLIP-2, GIT or Florence-2 folder (nothing is downloaded)")
    caption.add_argument("--prefix", default="", help="put before every caption, e.g. the trigger word")
    caption.add_argument("--caption_extension", default=".txt")
    caption.add_argument("--overwrite", action="store_true", help="replace existing captions too")
    caption.add_argument("--device", default=None)
    caption.set_defaults(handler=_caption)

    gen = commands.add_parser("generate", help="text to image with a base model (default: the embedded one)")
    gen.add_argument("--prompt", default=None, help="A1111 syntax: (word:1.2), (word), [word], BREAK; any length")
    gen.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--steps", "--num_inference_steps", dest="steps", type=positive_int, default=None)
    gen.add_argument("--guidance-scale", "--guidance_scale", "--cfg-scale", dest="guidance_scale", type=float,
                     default=None)
    gen.add_argument("--width", type=positive_int, default=None)
    gen.add_argument("--height", type=positive_int, default=None)
    gen.add_argument("--num-images", "--num_images", dest="num_images", type=positive_int, default=None)
    gen.add_argument("--adapter", action="append", default=[], metavar="FILE[:WEIGHT]",
                     help="an adapter file or library name, optionally with a weight (repeatable)")
    gen.add_argument("--method", default=None, choices=list(METHODS))
    gen.add_argument("--method-option", dest="method_option", action="append", default=[], metavar="KEY=VALUE",
                     help="a composition method option, e.g. interval=3 (repeatable)")
    gen.add_argument("--adapter-prompt", dest="adapter_prompt", action="append", default=[],
                     help="CLoRA: one prompt per adapter, in adapter order (repeatable)")
    gen.add_argument("--perp-neg", dest="perp_neg", action="append", default=[], metavar="TEXT[:WEIGHT]",
                     help="Perp-Neg negative prompt with its weight (repeatable)")
    gen.add_argument("--decor-remove", dest="decor_remove", action="append", default=[], metavar="WORDS",
                     help="DECOR: comma-separated concepts projected out of the prompt embedding")
    gen.add_argument("--decor-alpha", dest="decor_alpha", type=float, default=None)
    gen.add_argument("--model", default=None, help="model folder, .safetensors file or hub id (default: embedded)")
    gen.add_argument("--model-config", dest="model_config", default=None, metavar="DIR",
                     help="diffusers folder with the configs of a single-file checkpoint of an unusual size")
    gen.add_argument("--vae", default=None, metavar="FILE|DIR", help="replace the model's VAE (.safetensors or "
                     "diffusers folder)")
    gen.add_argument("--prediction-type", dest="prediction_type", choices=["epsilon", "v_prediction"],
                     default=None, help="override for checkpoints that cannot say (SD 2.x 768-v, v-pred SDXL)")
    gen.add_argument("--zero-snr", dest="zero_snr", action="store_true", default=None,
                     help="zero-terminal-SNR schedule (rescaled betas, trailing timesteps)")
    gen.add_argument("--sampler", default=None, help="A1111 name: Euler, 'Euler a', 'DPM++ 2M', 'DPM++ 2M SDE', "
                     "'DPM++ SDE', DDIM, UniPC, LMS, Heun, DPM2, 'DPM2 a', PLMS, LCM")
    gen.add_argument("--schedule", "--schedule-type", dest="schedule", default=None,
                     help="Automatic, Karras, Exponential or Beta")
    gen.add_argument("--scheduler", default=None, help="old short names (ddim, euler_a, dpm++_karras…): a sampler")
    gen.add_argument("--clip-skip", "--clip_skip", dest="clip_skip", type=positive_int, default=None,
                     help="A1111's clip skip: 1 = last layer, 2 = penultimate (anime checkpoints)")
    gen.add_argument("--init-image", dest="init_image", default=None, help="img2img: the starting image")
    gen.add_argument("--mask", default=None, help="inpainting: white = repaint (resized to the image)")
    gen.add_argument("--mask-blur", dest="mask_blur", type=float, default=None,
                     help="inpainting: Gaussian blur of the mask in pixels, as A1111's (default 4; 0 = as drawn)")
    gen.add_argument("--strength", "--denoising-strength", dest="strength", type=float, default=None,
                     help="img2img: fraction of the steps that repaint (0–1, default 0.75)")
    gen.add_argument("--hires-scale", dest="hires_scale", type=float, default=None, help="hires fix: upscale by")
    gen.add_argument("--hires-steps", dest="hires_steps", type=positive_int, default=None)
    gen.add_argument("--hires-strength", dest="hires_strength", type=float, default=None,
                     help="hires fix: denoising strength of the second pass (default 0.7)")
    gen.add_argument("--hires-upscaler", dest="hires_upscaler", default=None, metavar="NAME|FILE",
                     help="hires fix: Latent (default), 'Latent (bicubic)' and A1111's other names, Lanczos, "
                     "Nearest, None, or an ESRGAN/Real-ESRGAN/SwinIR… model (.safetensors/.pth file, or its name "
                     "in $STUDIO_HOME/upscalers)")
    gen.add_argument("--from-png", dest="from_png", default=None, metavar="FILE",
                     help="take every setting from a PNG's parameters (studio or A1111); flags given override")
    gen.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    gen.add_argument("--out", default=None, help="PNG path (default: outputs/NNNNN-SEED.png, numbered as A1111)")
    gen.set_defaults(handler=_generate)

    train = commands.add_parser("train", help="train an adapter from a folder of images")
    methods = train.add_subparsers(dest="method", required=True)
    for name, trainer in TRAINERS.items():
        method = methods.add_parser(name, help=trainer.help)
        add_training_flags(method, trainer.options)
        if trainer.options is not None:
            add_config_flags(method, trainer.options)
        if name == "b4m":  # the name B4M's rank flag had before --rank meant rank for every trainer
            method.add_argument("--b4m_rank", dest="rank", type=positive_int, help=argparse.SUPPRESS)
        method.set_defaults(handler=_train)

    adapters = commands.add_parser("adapters", help="list, inspect and convert adapter files")
    adapter_commands = adapters.add_subparsers(dest="adapter_command", required=True)
    adapter_commands.add_parser("list", help="adapters in the library").set_defaults(handler=_adapters_list)
    inspect = adapter_commands.add_parser("inspect", help="structure, ranks and metadata of one adapter")
    inspect.add_argument("file")
    inspect.add_argument("--plot", nargs="?", const="ranks.png", default=None,
                         help="draw the per-module ranks as a bar chart PNG (default ranks.png)")
    inspect.set_defaults(handler=_adapters_inspect)
    convert = adapter_commands.add_parser("convert", help="rewrite an adapter in another layout")
    convert.add_argument("file")
    convert.add_argument("--to", choices=["kohya", "diffusers"], required=True)
    convert.add_argument("--out", default=None, help="default: exports/NAME.safetensors under $STUDIO_HOME")
    convert.add_argument("--save_precision", choices=["fp16", "bf16", "fp32"], default=None,
                         help="default: fp16 for kohya (as sd-scripts), fp32 for diffusers")
    convert.set_defaults(handler=_adapters_convert)

    profile = adapter_commands.add_parser("profile", help="measure and store the CMLoRA frequency profile")
    profile.add_argument("file")
    profile.add_argument("--model", default=None)
    profile.add_argument("--device", default=None)
    profile.add_argument("--steps", type=positive_int, default=30)
    profile.add_argument("--tau-h", dest="tau_h", type=float, default=0.0, help="ΔH threshold between L and H")
    profile.add_argument("--class", dest="frequency_class", choices=["H", "L"], default=None,
                         help="override the measured class")
    profile.set_defaults(handler=_adapters_profile)

    evaluate = commands.add_parser("eval", help="CLIP-T, CLIP-I and domain attributes of a folder of images")
    evaluate.add_argument("--images", type=Path, required=True)
    evaluate.add_argument("--prompts", type=Path, default=None, help="one line per image, or JSON {file: prompt}")
    evaluate.add_argument("--reference", type=Path, default=None, help="reference images for CLIP-I")
    evaluate.add_argument("--metrics", default="clip_t,clip_i,attributes")
    evaluate.add_argument("--clip-model", "--clip_model", dest="clip_model", default=None)
    evaluate.add_argument("--clip-weights", "--clip_weights", dest="clip_weights", type=Path, default=None)
    evaluate.add_argument("--out", type=Path, default=None, help="JSON report (default: IMAGES/eval.json)")
    evaluate.set_defaults(handler=_eval)

    app = commands.add_parser("app", help="launch the Gradio app")
    add_app_flags(app)
    app.set_defaults(handler=_app)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.handler(args)
    except StudioError as error:
        print(f"studio: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
