import pytest

from frontends.generate import GenerationRequest, describe, generate, request_from_parameters
from studio.errors import ConfigError
from studio.samplers import SAMPLERS, current_sampler, resolve, schedule_types, scheduler_config, set_sampler

# (A1111 sampler, schedule) → (diffusers class, flags that must be set)
TABLE = {
    ("Euler", "Automatic"): ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    ("Euler", "Karras"): ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "use_exponential_sigmas": False}),
    ("Euler a", "Automatic"): ("EulerAncestralDiscreteScheduler", {}),
    ("DPM++ 2M", "Automatic"): ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++",
                                                                "solver_order": 2, "use_karras_sigmas": False}),
    ("DPM++ 2M", "Karras"): ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++",
                                                             "use_karras_sigmas": True}),
    ("DPM++ 2M", "Exponential"): ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True,
                                                                  "use_karras_sigmas": False}),
    ("DPM++ 2M SDE", "Karras"): ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                 "use_karras_sigmas": True}),
    ("DPM++ SDE", "Karras"): ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    ("DPM2", "Karras"): ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    ("DPM2 a", "Automatic"): ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    ("Heun", "Automatic"): ("HeunDiscreteScheduler", {}),
    ("LMS", "Karras"): ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    ("DDIM", "Automatic"): ("DDIMScheduler", {}),
    ("PLMS", "Automatic"): ("PNDMScheduler", {"skip_prk_steps": True}),
    ("UniPC", "Karras"): ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    ("LCM", "Automatic"): ("LCMScheduler", {}),
}


@pytest.mark.parametrize(("names", "expected"), list(TABLE.items()))
def test_each_sampler_and_schedule_maps_to_its_diffusers_config(names, expected, tiny_base):
    class_name, flags = scheduler_config(*names)
    assert class_name == expected[0]
    assert {k: flags[k] for k in expected[1]} == expected[1]
    import diffusers

    made = getattr(diffusers, class_name).from_config(tiny_base.pipe.scheduler.config, **flags)
    assert all(made.config[k] == v for k, v in expected[1].items())


def test_every_pair_survives_the_png_round_trip(random_base):
    pipe = random_base.pipe
    for label in SAMPLERS:
        for schedule in schedule_types(label):
            set_sampler(pipe, label, schedule)
            assert current_sampler(pipe) == (label, schedule)
            request = GenerationRequest(prompt="x", steps=2).resolved(random_base)
            parameters, _ = describe(random_base, request, 0)
            back = request_from_parameters(parameters)
            assert resolve(back.sampler, back.schedule) == (label, schedule)
    set_sampler(pipe, "DDIM")


def test_old_names_and_bad_names(random_base):
    assert resolve("dpm++_karras") == ("DPM++ 2M", "Karras")
    assert resolve("euler_a") == ("Euler a", "Automatic")
    assert resolve("dpm++ 2m", "karras") == ("DPM++ 2M", "Karras")
    with pytest.raises(ConfigError, match="unknown sampler 'Restart'"):
        resolve("Restart")
    with pytest.raises(ConfigError, match="has no Karras schedule"):
        resolve("DDIM", "Karras")
    with pytest.raises(ConfigError, match="unknown schedule type"):
        resolve("Euler", "Polyexponential")
    set_sampler(random_base.pipe, "DPM++ 2M", "Karras")
    set_sampler(random_base.pipe, "Euler")  # flags of one sampler never leak into the next
    assert random_base.pipe.scheduler.config.use_karras_sigmas is False
    set_sampler(random_base.pipe, "DDIM")


def test_schedule_changes_the_image(tiny_base):
    import numpy as np

    def image(schedule):
        request = GenerationRequest(prompt="a red star", seed=1, steps=4, sampler="DPM++ 2M", schedule=schedule)
        return np.asarray(generate(tiny_base, request)[0].image, np.float32)

    try:
        assert np.abs(image("Karras") - image("Automatic")).mean() > 0.5
    finally:
        set_sampler(tiny_base.pipe, "DDIM")
