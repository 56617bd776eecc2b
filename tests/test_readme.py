"""The README's commands run as written: every ``studio …`` line parses, and the cheap ones run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from frontends.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
CHEAP = {("adapters", "list"), ("adapters", "inspect")}


def readme_commands() -> list[list[str]]:
    """The arguments of every ``studio`` command line in the README's bash blocks (comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "studio":
                commands.append(words[1:])
    return commands


def test_the_readme_is_short_and_names_its_commands():
    assert len(README.read_text().splitlines()) <= 250
    subcommands = {argv[0] for argv in readme_commands()}
    assert {"generate", "train", "adapters", "eval", "demo-images"} <= subcommands


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda argv: " ".join(argv[:2]))
def test_every_readme_command_parses_as_written(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.handler)


@pytest.mark.parametrize("argv", [a for a in readme_commands() if tuple(a[:2]) in CHEAP],
                         ids=lambda argv: " ".join(argv))
def test_the_cheap_readme_commands_run(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    assert main(argv) == 0
    assert capsys.readouterr().out.strip()
