"""The app reads LyCORIS files from the library and A1111 tags in its prompt."""

import numpy as np
import pytest
from PIL import Image

from studio.png import read_recipe
from tests.adapters import formats
from tests.app.conftest import NoProgress, form


def test_a_lycoris_row_and_the_same_prompt_tag_give_one_image(studio_env):
    import gradio as gr

    studio, home = studio_env
    formats.loha(studio._base, home / "adapters", "ink-wash")
    by_row, _, _ = studio.generate("", *form(rows=["ink-wash"], weight="0.8"), progress=NoProgress())
    by_tag, _, _ = studio.generate("", *form(prompt="a red solid sks on a white background <lyco:ink-wash:0.8>"),
                                   progress=NoProgress())
    plain, _, _ = studio.generate("", *form(), progress=NoProgress())
    row, tag, base = (np.asarray(Image.open(g[0][0]), dtype=float) for g in (by_row, by_tag, plain))
    assert np.array_equal(row, tag) and np.abs(row - base).mean() > 0
    assert "<lyco:ink-wash:0.8>" in read_recipe(by_tag[0][0])[0]  # A1111's parameters keep the tag
    with pytest.raises(gr.Error, match="no adapter named 'ink-wsh'; close matches: ink-wash"):
        studio.generate("", *form(prompt="a <lyco:ink-wsh:1>"), progress=NoProgress())
