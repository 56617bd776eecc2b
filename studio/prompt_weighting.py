"""A1111 prompt syntax for CLIP text encoders: ``(word:1.2)``, ``(word)``, ``[word]``, ``BREAK``, and prompts of
any length in 75-token chunks.

How A1111 does it (``modules/prompt_parser.py`` and ``sd_hijack_clip.py``), and so how this module does it:
the prompt is parsed into (text, weight) runs, ``(…)`` multiplying by 1.1, ``[…]`` by 1/1.1, ``(…:w)`` by w,
``\\(`` escaping; the runs are tokenized and cut into chunks of 75 tokens (a cut falls back to the last comma
within 20 tokens; ``BREAK`` starts a new chunk); every chunk becomes ``BOS + 75 + EOS``, padded as the tokenizer
pads, and is encoded on its own; the hidden states are multiplied by each token's weight and rescaled to the
chunk's original mean; the chunks are concatenated along the token axis. SDXL's pooled embedding comes from the
first chunk.

Written here rather than taken from compel: compel parses its own syntax (``word++``, ``(word)1.2``), not A1111's,
and neither it nor sd_embed restores the chunk mean or selects layers by diffusers' ``clip_skip`` the way the
composition pipelines must (one encoder call per chunk, inside ``encode_texts``, where DECOR and CLoRA read the
same token layout). A prompt without emphasis that fits one chunk encodes exactly as diffusers' ``encode_prompt``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers.utils import scale_lora_layers, unscale_lora_layers

CHUNK = 75  # tokens per chunk besides BOS and EOS
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack
BRACKET_UP, BRACKET_DOWN = 1.1, 1 / 1.1

_PIECES = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:|\\")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs of an A1111 prompt; ``BREAK`` is its own run with weight −1. Unclosed brackets apply
    to the end of the prompt; neighbouring runs of equal weight are merged."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _PIECES.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\") and len(piece) == 2:
            runs.append([piece[1], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            scale(round_open.pop(), BRACKET_UP)
        elif piece == "]" and square_open:
            scale(square_open.pop(), BRACKET_DOWN)
        else:
            for index, part in enumerate(_BREAK.split(piece)):
                if index:
                    runs.append(["BREAK", -1.0])
                runs.append([part, 1.0])
    for start in round_open:
        scale(start, BRACKET_UP)
    for start in square_open:
        scale(start, BRACKET_DOWN)
    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1] and run[1] != -1.0:
            merged[-1][0] += run[0]
        else:
            merged.append(list(run))
    return [(str(t), float(w)) for t, w in merged]


@dataclass
class Chunks:
    """One prompt as chunks of 77 token ids with their weights, and where each prompt token landed."""

    ids: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)


def chunk_tokens(tokenizer, text: str, literal: bool = False) -> Chunks:
    """A1111's chunking of ``text`` for ``tokenizer`` (BOS, 75 tokens, EOS, padded as the tokenizer pads).
    ``literal``: the text as written (no emphasis or ``BREAK``), cut after the first chunk as diffusers cuts."""
    runs = [(text, 1.0)] if literal else parse_emphasis(text)
    pieces = [r for r in runs if r[1] != -1.0]
    encoded = tokenizer([t for t, _ in pieces], add_special_tokens=False, verbose=False).input_ids if pieces else []
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    result = Chunks()
    tokens: list[int] = []
    weights: list[float] = []

    def close() -> None:
        nonlocal tokens, weights
        body = tokens + [tokenizer.eos_token_id]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        body += [pad] * (CHUNK + 1 - len(body))
        result.ids.append([tokenizer.bos_token_id] + body)
        result.weights.append([1.0] + weights + [1.0] * (CHUNK + 1 - len(weights)))
        tokens, weights = [], []

    pieces_iter = iter(encoded)
    for _, weight in runs:
        if weight == -1.0:
            close()
            continue
        for token in next(pieces_iter):
            if literal and len(tokens) == CHUNK:
                break
            if len(tokens) == CHUNK:
                last_comma = max((i for i, t in enumerate(tokens) if t == comma), default=-1)
                if last_comma >= 0 and len(tokens) - last_comma - 1 <= COMMA_BACKTRACK:
                    carry, carry_w = tokens[last_comma + 1 :], weights[last_comma + 1 :]
                    tokens, weights = tokens[: last_comma + 1], weights[: last_comma + 1]
                    close()
                    tokens, weights = carry, carry_w
                else:
                    close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not result.ids:
        close()
    if literal:
        del result.ids[1:], result.weights[1:]
    return result


def plain_text(text: str) -> str:
    """The prompt as the model reads it: emphasis brackets and weights removed, ``BREAK`` as a space."""
    return "".join(" " if w == -1.0 else t for t, w in parse_emphasis(text))


def token_positions(tokenizer, text: str, word: str) -> list[int]:
    """Where ``word``'s tokens sit in the encoded prompt (chunk c's tokens start at 77·c + 1), every occurrence.
    CLoRA reads its concept groups' cross-attention at these positions."""
    pieces = tokenizer(plain_text(word), add_special_tokens=False).input_ids
    chunks = chunk_tokens(tokenizer, text)
    found: list[int] = []
    for index, ids in enumerate(chunks.ids):
        body = ids[1 : CHUNK + 1]
        for start in range(len(body) - len(pieces) + 1):
            if pieces and body[start : start + len(pieces)] == pieces:
                found.extend(index * (CHUNK + 2) + 1 + start + k for k in range(len(pieces)))
    return found


def select_hidden(output, clip_skip: int | None, final_norm, penultimate_default: bool) -> torch.Tensor:
    """The hidden states diffusers' ``clip_skip`` picks: SD takes the last layer (``clip_skip`` k: the (k+1)-th
    from last, through the final layer norm); SDXL takes the penultimate layer (k: the (k+2)-th from last) without
    the norm. A1111's "Clip skip: n" is diffusers' ``clip_skip = n − 1``."""
    if penultimate_default:
        return output.hidden_states[-((clip_skip or 0) + 2)]
    if not clip_skip:
        return output[0]
    return final_norm(output.hidden_states[-(clip_skip + 1)])


def encode_chunks(tokenizer, text_encoder, texts: Sequence[str], clip_skip: int | None = None,
                  penultimate_default: bool = False, chunk_count: int | None = None, literal: bool = False,
                  lora_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states [batch, 77·chunks, width] of ``texts`` (every text padded with empty chunks to the longest,
    or to ``chunk_count``), and the first chunk's ``text_embeds`` when the encoder has a projection.
    ``lora_scale`` scales the encoder's peft LoRA layers for the call, as diffusers' ``encode_prompt`` does."""
    if lora_scale is None:
        return _encode_chunks(tokenizer, text_encoder, texts, clip_skip, penultimate_default, chunk_count, literal)
    scale_lora_layers(text_encoder, lora_scale)
    try:
        return _encode_chunks(tokenizer, text_encoder, texts, clip_skip, penultimate_default, chunk_count, literal)
    finally:
        unscale_lora_layers(text_encoder, lora_scale)


def _encode_chunks(tokenizer, text_encoder, texts: Sequence[str], clip_skip: int | None,
                   penultimate_default: bool, chunk_count: int | None, literal: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    device = text_encoder.device
    prompts = [chunk_tokens(tokenizer, t, literal) for t in texts]
    count = max([chunk_count or 0] + [len(p.ids) for p in prompts])
    empty = chunk_tokens(tokenizer, "")
    for prompt in prompts:
        prompt.ids += empty.ids * (count - len(prompt.ids))
        prompt.weights += empty.weights * (count - len(prompt.weights))
    hidden, pooled = [], None
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 5 flattened it
    for index in range(count):
        ids = torch.tensor([p.ids[index] for p in prompts], device=device)
        output = text_encoder(ids, output_hidden_states=True)
        states = select_hidden(output, clip_skip, final_norm, penultimate_default)
        weights = torch.tensor([p.weights[index] for p in prompts], device=device, dtype=states.dtype)
        if bool((weights != 1).any()):
            original = states.float().mean()
            states = states * weights[..., None]
            states = states * (original / states.float().mean()).to(states.dtype)
        hidden.append(states)
        if index == 0 and hasattr(output, "text_embeds"):
            pooled = output.text_embeds
    return torch.cat(hidden, dim=1), pooled


def chunk_count(tokenizer, texts: Sequence[str]) -> int:
    """How many 75-token chunks the longest of ``texts`` takes."""
    return max(len(chunk_tokens(tokenizer, t).ids) for t in texts)
