"""App fixtures: a library folder, an outputs folder and two small adapters, isolated per test module."""

import pytest

from studio.adapters.file import save_adapter
from tests.adapters.test_files import make_adapter
from tests.conftest import make_random_base


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


def form(prompt="a red solid sks on a white background", rows=None, method="merge", negative="", perp_neg=False,
         seed=3, batch=1, weight="1.0", clora_words="", clora_fill=False, sampler="Model default",
         schedule="Automatic", clip_skip=1, init=None, strength=0.75, hires_scale=1.0, hires_steps=0,
         hires_strength=0.7, hires_upscaler="Latent"):
    """Values of the Compose form in the order the handlers take them."""
    cells = []
    chosen = rows or []
    for index in range(4):
        if index < len(chosen):
            cells += [True, chosen[index], weight, ""]
        else:
            cells += [False, None, "1.0", ""]
    return [*cells, prompt, negative, method, 5, 0, clora_words, clora_fill, perp_neg, 1.5, "", 1.0, seed, False, 3,
            5.0, 64, batch, sampler, schedule, clip_skip, init, strength, hires_scale, hires_steps, hires_strength,
            hires_upscaler]
