"""A small version of the embedded model's prompt-following measurement, so a regression fails CI.

Thresholds sit below the committed model's measured accuracy (README table) with room for the smaller sample.
"""

from studio.eval.prompt_following import grid_cases, measure_prompt_following

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
