"""A small version of the embedded model's prompt-following measurement, so a regression fails CI.

Thresholds sit below the committed model's measured accuracy (README table) with room for the smaller sample.
"""

import math

from studio.eval.domain import Reading
from studio.eval.prompt_following import (
    PromptCase,
    grid_cases,
    measure_guidance_sweep,
    measure_prompt_following,
    partial_cases,
    score,
)

# measured on the committed model with bench/prompt_following.py; see README
MINIMUM = {"background": 0.85, "color": 0.85, "texture": 0.8, "shape": 0.8, "all": 0.7}


def test_grid_cases_cover_seen_and_held_out():
    seen, held = grid_cases(20, held_out=False), grid_cases(10, held_out=True)
    assert len({c.prompt for c in seen}) == 20
    assert all(("red", "star") != (c.color, c.shape) for c in seen)
    assert all(c.prompt.endswith("background") for c in held)


def test_committed_model_follows_prompts(tiny_base, evaluator):
    tables = measure_prompt_following(tiny_base, evaluator, n=48, seed=7, batch_size=24)
    for attribute, minimum in MINIMUM.items():
        assert tables["seen"][attribute] >= minimum, tables


def test_partial_prompts_are_scored_only_on_what_they_name():
    drawn = Reading(shape="star", color="red", texture="striped", background="black", confidence={})
    cases = [PromptCase("red", None, "star", None), PromptCase(None, "solid", None, "black"),
             PromptCase("red", "striped", "star", "white")]
    assert [c.prompt for c in cases[:2]] == ["a red star", "a solid shape on a black background"]
    table = score([drawn] * 3, cases)
    assert table["color"] == 1.0 and table["shape"] == 1.0  # named twice, right twice
    assert table["texture"] == 0.5 and table["background"] == 0.5
    assert math.isclose(table["all"], 1 / 3)  # only "a red star" has every named attribute right
    assert math.isnan(score([drawn], cases[:1])["texture"])  # no prompt names a texture


def test_partial_cases_leave_attributes_out_at_the_given_rate():
    cases = partial_cases(grid_cases(400, held_out=False), drop_attribute=0.4, seed=3)
    assert cases == partial_cases(grid_cases(400, held_out=False), drop_attribute=0.4, seed=3)
    left_out = sum(getattr(c, n) is None for c in cases for n in ("color", "texture", "shape", "background"))
    assert abs(left_out / 1600 - 0.4) < 0.04
    assert all(c.expected() for c in cases)
    assert partial_cases(grid_cases(5, held_out=False), 0.0) == grid_cases(5, held_out=False)


def test_guidance_sweep_scores_the_same_prompts_at_each_scale(tiny_base, evaluator):
    rows = measure_guidance_sweep(tiny_base, evaluator, [1.0, 5.0], n=3, seed=2, steps=4, drop_attribute=0.5)
    assert [(r["guidance"], r["n"]) for r in rows] == [(1.0, 3), (5.0, 3)]
    assert all(0.0 <= r["all"] <= 1.0 for r in rows)
