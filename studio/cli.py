"""The ``studio`` command line: argument parsing only; every command calls into the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


def _build_tiny(args: argparse.Namespace) -> int:
    from studio.build.tiny import DEFAULT_EXPORT, TinyBuildConfig, build_tiny

    config = TinyBuildConfig(seed=args.seed)
    if args.max_train_steps is not None:
        config.diffusion_steps = args.max_train_steps
    out = build_tiny(config, work_dir=args.work_dir, export_dir=args.output or DEFAULT_EXPORT)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Adapter Studio: train and compose SD adapters")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build-tiny", help="build (or resume building) the embedded base model")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--max_train_steps", type=int, default=None, help="text encoder + UNet steps")
    build.add_argument("--work-dir", type=Path, default=None, help="resumable state (default: the studio cache)")
    build.add_argument("--output", type=Path, default=None, help="model folder (default: assets/tiny-sd)")
    build.set_defaults(handler=_build_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
