"""Prompt text handling shared by every pipeline and trainer: CLIP's cleaning and the CLIP BPE vocabulary.

The embedded model uses the real CLIP BPE (49,408 ids) so that prompts tokenize exactly as they do for Stable
Diffusion, trigger words behave like a real model's rare tokens, and adapters trained here see the same token
boundaries as on SD 1.5. The vocabulary is rebuilt from the merges file open_clip ships, so nothing downloads.
"""

from __future__ import annotations

import gzip
import html
import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import ftfy
from transformers import CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
_MERGES_IN_VOCAB = 49152 - 256 - 2  # open_clip keeps this many merges so that the vocabulary is 49,408


def clean_prompt(text: str) -> str:
    """Clean a prompt the way CLIP's own tokenizer does: fix mojibake, unescape HTML twice, collapse whitespace."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte → printable character map of byte-level BPE (GPT-2, CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}  # order matters: it fixes the token ids
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token → id) and merge list, rebuilt from open_clip's ``bpe_simple_vocab_16e6.txt.gz``."""
    path = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    with path.open("rb") as raw, gzip.open(raw) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _MERGES_IN_VOCAB + 1]]
    symbols = list(_byte_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"open_clip's BPE file gave {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


def build_clip_tokenizer(model_max_length: int = 77, pad_token: str = END_TOKEN):
    """A transformers ``CLIPTokenizer`` with CLIP's real vocabulary, built offline."""
    vocab, merges = clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad_token)


def split_words(text: str | Sequence[str]) -> list[str]:
    """Comma-separated words (``"circle, square"``, or several such strings, as repeated flags give them) → the
    stripped, non-empty words: DECOR's concepts, trigger phrases, CLoRA's word groups."""
    joined = text if isinstance(text, str) else ",".join(text)
    return [word.strip() for word in joined.split(",") if word.strip()]
