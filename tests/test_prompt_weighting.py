import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from frontends.generate import GenerationRequest, generate
from studio.prompt_weighting import CHUNK, chunk_tokens, parse_emphasis, plain_text, token_positions
from studio.text import build_clip_tokenizer

FILLER = ", ".join(["a white background"] * 30)  # 119 tokens: the words after it land in the second chunk


def test_parse_follows_a1111():
    assert parse_emphasis("a (red:1.5) star") == [("a ", 1.0), ("red", 1.5), (" star", 1.0)]
    runs = dict(parse_emphasis("(big) [small] ((huge)) \\(x\\)"))
    assert runs["big"] == pytest.approx(1.1) and runs["small"] == pytest.approx(1 / 1.1)
    assert runs["huge"] == pytest.approx(1.21)
    assert plain_text("a (red:1.5) star BREAK \\(x\\)") == "a red star (x)"
    assert ("BREAK", -1.0) in parse_emphasis("one BREAK two")
    assert parse_emphasis("(unclosed") == [("unclosed", pytest.approx(1.1))]


def test_chunks_of_75_with_bos_eos_and_break():
    tokenizer = build_clip_tokenizer()
    chunks = chunk_tokens(tokenizer, FILLER + ", a red star")
    assert len(chunks.ids) == 2 and all(len(ids) == CHUNK + 2 for ids in chunks.ids)
    assert all(ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id for ids in chunks.ids)
    assert len(chunk_tokens(tokenizer, "one BREAK two").ids) == 2
    positions = token_positions(tokenizer, FILLER + ", a red star", "star")
    assert positions and all(p > CHUNK + 2 for p in positions)  # in the second chunk
    weighted = chunk_tokens(tokenizer, "a (red:1.5) star")
    assert 1.5 in weighted.weights[0] and weighted.ids == chunk_tokens(tokenizer, "a red star").ids


def test_short_prompt_encodes_as_diffusers(random_base):
    pipe = random_base.pipe
    ours = pipe.encode_texts(["a red star on a white background"])[0]
    stock = StableDiffusionPipeline.encode_prompt(pipe, ["a red star on a white background"], "cpu", 1, False)[0]
    assert torch.equal(ours, stock)


def test_clip_skip_is_penultimate_layer_through_final_norm(random_base):
    pipe = random_base.pipe
    ids = pipe.tokenizer(["a red star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
    expected = pipe.text_encoder.final_layer_norm(states[-2])
    skipped = pipe.encode_texts(["a red star"], clip_skip=1)[0]  # A1111's "Clip skip: 2"
    assert torch.allclose(skipped, expected, atol=1e-6)
    assert not torch.allclose(skipped, pipe.encode_texts(["a red star"])[0], atol=1e-3)


def test_sdxl_long_prompt_pools_the_first_chunk():
    from tests.conftest import make_random_sdxl_base

    pipe = make_random_sdxl_base().pipe
    hidden, pooled = pipe.encode_texts([FILLER + ", a red star", "a red star"])
    assert hidden.shape[:2] == (2, 2 * (CHUNK + 2))
    short_hidden, first_pooled = pipe.encode_texts([FILLER])
    assert torch.allclose(pooled[0], first_pooled[0], atol=1e-6)


def _image(base, prompt: str) -> np.ndarray:
    result = generate(base, GenerationRequest(prompt=prompt, seed=1, steps=4))[0]
    return np.asarray(result.image, dtype=np.float32)


def test_words_after_77_tokens_change_the_image(tiny_base):
    lead = ", ".join(["a white background"] * 19) + ", a {} star, " + ", ".join(["on a white background"] * 15)
    red, blue = lead.format("red"), lead.format("blue")
    tokenizer = tiny_base.pipe.tokenizer
    assert len(tokenizer(red, add_special_tokens=False, verbose=False).input_ids) >= 150
    assert min(token_positions(tokenizer, red, "red")) > CHUNK + 2  # a 77-token cut would drop it
    assert np.abs(_image(tiny_base, red) - _image(tiny_base, blue)).mean() > 1.0


def test_stronger_emphasis_changes_the_image_more(tiny_base):
    plain = _image(tiny_base, "a red star on a white background")
    light = _image(tiny_base, "a (red:1.1) star on a white background")
    strong = _image(tiny_base, "a (red:1.5) star on a white background")
    assert np.abs(strong - plain).mean() > np.abs(light - plain).mean() > 0
