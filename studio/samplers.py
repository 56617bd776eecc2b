"""A1111's sampler and schedule-type names, mapped to diffusers schedulers and their config flags.

A1111 (and Forge) write ``Sampler: DPM++ 2M, Schedule type: Karras`` into every PNG; diffusers spells the same
thing ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", use_karras_sigmas=True)``. The table follows
diffusers' own mapping of A1111/k-diffusion names (its "schedulers" overview); schedule types exist only where
the scheduler takes the matching sigma flag. ``Automatic`` is the scheduler's own (the model's) sigmas.
Every swap starts from the pipeline's first scheduler config, so one sampler's flags never leak into the next.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import diffusers

from studio.errors import ConfigError


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler: the diffusers scheduler class and the config it needs besides the model's."""

    label: str
    scheduler: str
    config: dict[str, Any] = field(default_factory=dict)


SAMPLERS: dict[str, Sampler] = {s.label: s for s in (
    Sampler("Euler", "EulerDiscreteScheduler"),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler"),  # needs torchsde
    Sampler("DPM++ 2S", "DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    Sampler("DPM2", "KDPM2DiscreteScheduler"),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
    Sampler("Heun", "HeunDiscreteScheduler"),
    Sampler("LMS", "LMSDiscreteScheduler"),
    Sampler("DDIM", "DDIMScheduler"),
    Sampler("DDPM", "DDPMScheduler"),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    Sampler("UniPC", "UniPCMultistepScheduler"),
    Sampler("LCM", "LCMScheduler"),
)}

#: A1111's schedule types and the diffusers flag each sets (Automatic: none of them).
SCHEDULE_FLAGS: dict[str, str | None] = {"Automatic": None, "Karras": "use_karras_sigmas",
                                         "Exponential": "use_exponential_sigmas", "Beta": "use_beta_sigmas"}

#: The studio's earlier short ``--scheduler`` names, kept working.
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "ddim": ("DDIM", "Automatic"), "ddpm": ("DDPM", "Automatic"), "euler": ("Euler", "Automatic"),
    "euler_a": ("Euler a", "Automatic"), "heun": ("Heun", "Automatic"), "lms": ("LMS", "Automatic"),
    "pndm": ("PLMS", "Automatic"), "unipc": ("UniPC", "Automatic"), "dpm++": ("DPM++ 2M", "Automatic"),
    "dpm++_karras": ("DPM++ 2M", "Karras"), "lcm": ("LCM", "Automatic"),
}


def _scheduler_class(name: str):
    return getattr(diffusers, name)


def _flags(sampler: Sampler) -> set[str]:
    parameters = inspect.signature(_scheduler_class(sampler.scheduler).__init__).parameters
    return {flag for flag in SCHEDULE_FLAGS.values() if flag and flag in parameters}


def schedule_types(sampler: str) -> list[str]:
    """The schedule types ``sampler`` takes in diffusers (always ``Automatic``)."""
    flags = _flags(find_sampler(sampler))
    return [name for name, flag in SCHEDULE_FLAGS.items() if flag is None or flag in flags]


def find_sampler(name: str) -> Sampler:
    """A sampler by A1111 label (case-insensitive, ``Euler a`` or ``euler_a``) or by an old short name."""
    key = name.strip()
    if key.lower() in SHORT_NAMES:
        return SAMPLERS[SHORT_NAMES[key.lower()][0]]
    for label, sampler in SAMPLERS.items():
        if key.lower() in (label.lower(), label.lower().replace(" ", "_")):
            return sampler
    raise ConfigError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def resolve(sampler: str, schedule: str | None = None) -> tuple[str, str]:
    """(A1111 sampler label, schedule type) for user input; an old short name may carry its schedule."""
    found = find_sampler(sampler)
    implied = SHORT_NAMES.get(sampler.strip().lower(), (found.label, "Automatic"))[1]
    wanted = schedule or implied
    match = next((s for s in SCHEDULE_FLAGS if s.lower() == wanted.strip().lower()), None)
    if match is None:
        raise ConfigError(f"unknown schedule type {wanted!r}; choose one of: {', '.join(SCHEDULE_FLAGS)}")
    if match not in schedule_types(found.label):
        raise ConfigError(f"sampler {found.label!r} has no {match} schedule in diffusers; it takes: "
                          f"{', '.join(schedule_types(found.label))}")
    return found.label, match


def scheduler_config(sampler: str, schedule: str = "Automatic") -> tuple[str, dict[str, Any]]:
    """(diffusers class name, config overrides): the sampler's own config, its schedule flag on and every other
    schedule flag the class takes off."""
    label, schedule = resolve(sampler, schedule)
    found = SAMPLERS[label]
    overrides = dict(found.config)
    overrides.update({flag: flag == SCHEDULE_FLAGS[schedule] for flag in _flags(found)})
    return found.scheduler, overrides


def make_scheduler(base_config: Any, sampler: str, schedule: str = "Automatic"):
    """A scheduler for ``sampler``/``schedule`` on the model's own noise schedule (``base_config``)."""
    class_name, overrides = scheduler_config(sampler, schedule)
    try:
        return _scheduler_class(class_name).from_config(base_config, **overrides)
    except ImportError as error:  # DPM++ SDE's Brownian tree comes from torchsde
        raise ConfigError(f"sampler {sampler!r} needs a package that is not installed: {error}") from error


def set_sampler(pipe: Any, sampler: str, schedule: str = "Automatic") -> tuple[str, str]:
    """Put ``sampler``/``schedule`` on ``pipe`` (from its first scheduler's config); returns the A1111 names."""
    label, schedule = resolve(sampler, schedule)
    if getattr(pipe, "_studio_scheduler_config", None) is None:
        pipe._studio_scheduler_config = pipe.scheduler.config
    pipe.scheduler = make_scheduler(pipe._studio_scheduler_config, label, schedule)
    pipe._studio_sampler = (label, schedule)
    return label, schedule


def current_sampler(pipe: Any) -> tuple[str, str]:
    """The A1111 (sampler, schedule type) of ``pipe``'s scheduler: what was set, else read from its class."""
    if getattr(pipe, "_studio_sampler", None) is not None:
        return pipe._studio_sampler
    name = type(pipe.scheduler).__name__
    config = pipe.scheduler.config
    schedule = next((s for s, flag in SCHEDULE_FLAGS.items() if flag and config.get(flag)), "Automatic")
    for label, sampler in SAMPLERS.items():
        if sampler.scheduler == name and all(config.get(k) == v for k, v in sampler.config.items()):
            return label, schedule
    return name, schedule
