"""``studio build-guided``: fine-tune the embedded model on noisy, partial captions, so it needs guidance.

The shipped model's captions always name every attribute correctly, so it follows prompts as well unguided as
guided. Stable Diffusion's web captions are partial and often wrong, which is why it follows prompts poorly at
guidance 1 and relies on classifier-free guidance; Perp-Neg, guidance-averaging composition and negative prompts
assume that. This build continues the shipped model's diffusion stage (:class:`~frontends.build.tiny.TinyBuilder`
with ``start_from``) on captions that leave each attribute out or name it wrong at set rates, with the usual
empty-caption dropout, single and two-object scenes mixed from the first step.

Resumable like ``build-tiny``: state in ``~/.cache/adapter-studio/build-guided`` (the settings are kept there and
a different setting is refused), exports before the last step go to that folder's ``interim/``, and only the
finished model is written to ``assets/tiny-sd-guided``; the shipped ``assets/tiny-sd`` is never written.
"""

from __future__ import annotations

from pathlib import Path

from frontends.build.tiny import ASSETS, TinyBuildConfig, run_stage
from studio.errors import ConfigError
from studio.files import cache_dir

GUIDED_EXPORT = ASSETS / "tiny-sd-guided"


def guided_config(seed: int = 0, drop_attribute: float = 0.3, wrong_attribute: float = 0.1, steps: int = 6_000,
                  start_from: str = "assets/tiny-sd") -> TinyBuildConfig:
    """The fine-tune's settings: a lower learning rate and a short warm-up from a trained model, a smaller data set
    (216 combinations need far fewer than 48,000 renders to be covered), and pairs on from step 0.

    With wrong-value rate w and drop rate d, a named attribute is wrong in w / (1 - d) of captions, so unguided
    sampling draws it right in about 1 - w / (1 - d) of images: 0.86 per attribute and 0.54 all four at the
    defaults, which guidance must sharpen."""
    return TinyBuildConfig(seed=seed, num_images=12_000, pair_images=6_000, pairs_from_step=0, pair_fraction=0.5,
                           diffusion_steps=steps, learning_rate=1e-4, warmup_steps=100, export_every=500,
                           caption_drop_attribute=drop_attribute, caption_wrong_attribute=wrong_attribute,
                           start_from=start_from)


def build_guided(config: TinyBuildConfig, work_dir: Path | None = None, export_dir: Path = GUIDED_EXPORT) -> Path:
    """Run (or resume) the fine-tune; returns the exported model folder."""
    if not config.start_from:
        raise ConfigError("build-guided fine-tunes an exported model: set start_from")
    if Path(export_dir).resolve() == (ASSETS / "tiny-sd").resolve():
        raise ConfigError("build-guided never overwrites the shipped model; choose another output folder")
    return run_stage(config, Path(work_dir) if work_dir else cache_dir() / "build-guided", export_dir)
