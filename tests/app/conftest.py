"""App fixtures: a library folder, an outputs folder and two small adapters, isolated per test module."""

import inspect

import pytest

import app
from studio.adapters.file import save_adapter
from tests.conftest import make_adapter, make_random_base


class NoProgress:
    """Stands in for gr.Progress when handlers are called as plain functions."""

    def __call__(self, *args, **kwargs):
        return None

    def tqdm(self, iterable, *args, **kwargs):
        return iterable


@pytest.fixture
def studio_env(tmp_path, monkeypatch):
    import app

    home = tmp_path / "home"
    (home / "adapters").mkdir(parents=True)
    monkeypatch.setenv("STUDIO_HOME", str(home))
    monkeypatch.setattr(app, "OUTPUTS", tmp_path / "outputs")
    base = make_random_base()
    for name, seed in (("one", 1), ("two", 2)):
        adapter = make_adapter(base, seed=seed)
        adapter.metadata["ss_output_name"] = name
        adapter.metadata["studio.trigger_words"] = f'["{name}word"]'
        save_adapter(adapter, home / "adapters" / f"{name}.safetensors")
    studio = app.Studio()
    studio._base = base
    return studio, home


#: The Compose form's fields after the adapter rows, in the order the handlers take them.
FORM_FIELDS = list(inspect.signature(app.Studio.request).parameters)[2:]  # after self and rows
ROW_FIELDS = ("on", "adapter", "weight", "own_prompt")


def form(prompt="a red solid sks on a white background", rows=None, method="merge", negative="", perp_neg=False,
         seed=3, batch=1, weight="1.0", clora_words="", clora_fill=False, **fields):
    """Values of the Compose form in the order the handlers take them, given by name."""
    cells = []
    chosen = rows or []
    for index in range(app.ROWS):
        if index < len(chosen):
            cells += [True, chosen[index], weight, ""]
        else:
            cells += [False, None, "1.0", ""]
    named = {"prompt": prompt, "negative": negative, "method": method, "switch_interval": 5, "cache_interval": 0,
             "clora_words": clora_words, "clora_fill": clora_fill, "perp_neg": perp_neg, "perp_neg_weight": 1.5,
             "decor_words": "", "decor_alpha": 1.0, "seed": seed, "randomize": False, "steps": 3, "guidance": 5.0,
             "size": 64, "batch": batch, "sampler": app.MODEL_SAMPLER, "schedule": "Automatic", "clip_skip": 1,
             "init": None, "strength": 0.75, "hires_scale": 1.0, "hires_steps": 0, "hires_strength": 0.7,
             "hires_upscaler": "Latent", "mask_blur": 4.0, **fields}
    assert set(named) == set(FORM_FIELDS), set(named) ^ set(FORM_FIELDS)
    return [*cells, *(named[name] for name in FORM_FIELDS)]


def recipe_form(values):
    """``app.recipe_to_form``'s values by name: ``rows`` (one dict per adapter row) and the named fields."""
    rows = [dict(zip(ROW_FIELDS, values[4 * i : 4 * i + 4])) for i in range(app.ROWS)]
    return {"rows": rows, **dict(zip(app.RECIPE_FIELDS, values[4 * app.ROWS :]))}
