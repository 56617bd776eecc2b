import open_clip
import pytest

from studio.text import CLIP_VOCAB_SIZE, build_clip_tokenizer, clean_prompt

PROMPTS = [
    "a red striped star on a white background",
    "A photo of a sks dog, 4k &amp; HDR!!",
    "zigzag   waves\tmoon cross",
    "don't stop: café naïve 123",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


def test_vocabulary_is_clips(tokenizer):
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_open_clip(tokenizer, prompt):
    ours = tokenizer(clean_prompt(prompt)).input_ids
    theirs = open_clip.get_tokenizer("ViT-B-32")([prompt])[0].tolist()[: len(ours)]
    assert ours == theirs


def test_clean_prompt_unescapes_and_collapses_whitespace():
    assert clean_prompt("  a &amp;amp; b \n c ") == "a & b c"
