"""``studio build-tiny``: the shipped embedded model's whole recipe, stage after stage, each resumable.

The shipped model is the base build (:class:`~frontends.build.tiny.TinyBuildConfig`: 24,000 diffusion steps on
captions that name every attribute) fine-tuned by two guided stages (:func:`~frontends.build.guided.guided_config`:
attributes left out of 30% of captions and named wrong in 10%, 6,000 steps; then named wrong in 15%, 3,000 steps),
so that, like Stable Diffusion, it follows prompts poorly without classifier-free guidance. The stages' settings
are defined here once; a test checks them against the lineage recorded in ``assets/tiny-sd/studio_model.json``.

Each stage keeps its resumable state in its own folder under the work root (by default the studio cache, in the
folders ``studio build-tiny`` and ``studio build-guided`` have always used) and exports there; only the last stage
writes the output folder. A stage whose export is already finished with the same settings is skipped, so an
interrupted recipe continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from frontends.build.guided import guided_config
from frontends.build.tiny import DEFAULT_EXPORT, TinyBuildConfig, export_finished, run_stage
from studio.files import cache_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One build stage: its work folder's name under the work root and its settings. A stage after the first
    fine-tunes the previous stage's export (its ``start_from`` is filled in when the recipe runs)."""

    folder: str
    config: TinyBuildConfig


def embedded_stages(seed: int = 0, base_steps: int = 24_000) -> list[Stage]:
    """The shipped model's recipe: the unguided base, then the two guided fine-tunes."""
    return [Stage("build-tiny", TinyBuildConfig(seed=seed, diffusion_steps=base_steps)),
            Stage("build-guided", guided_config(seed, drop_attribute=0.3, wrong_attribute=0.1, steps=6_000)),
            Stage("build-guided-w15", guided_config(seed, drop_attribute=0.3, wrong_attribute=0.15, steps=3_000))]


def build_stages(stages: list[Stage], work_root: Path | None = None, export_dir: Path = DEFAULT_EXPORT) -> Path:
    """Run (or resume) ``stages`` in order; the last writes ``export_dir``, the others export into their work
    folders. Returns ``export_dir``."""
    work_root = Path(work_root) if work_root else cache_dir()
    previous: Path | None = None
    for index, stage in enumerate(stages):
        config = stage.config if previous is None else replace(stage.config, start_from=str(previous.resolve()))
        work = work_root / stage.folder
        out = Path(export_dir) if index == len(stages) - 1 else work / "export" / "tiny-sd"
        if export_finished(out, config):
            logger.info("stage %s: finished in %s, skipped", stage.folder, out)
        else:
            start = time.time()
            run_stage(config, work, out)
            logger.info("stage %s: finished in %.0f s", stage.folder, time.time() - start)
        previous = out
    return Path(export_dir)
