"""DECOR (arXiv 2412.09169, METHODS §5): project prompt embeddings away from unwanted concepts.

X′ = X − α·X·V·Vᵀ on every row but BOS, where V spans what the unwanted words add to a prompt. The paper
publishes no code; how V is built is the project's decision (METHODS §5.1), made so that V depends on the word:

* A word encoded on its own is almost entirely a component every word shares at that position (on the embedded
  encoder, bases built that way overlap 97–99.8% across unrelated words and remove the BOS row), so V is built
  from the word's **in-context difference** instead: its token rows inside a few neutral templates minus the mean
  row that reference words take at the same place in the same templates.
* The BOS row and the shared word component are projected out of those differences first, so V never touches
  what every prompt has in common, and BOS itself is never projected.
* The words the prompt asks for (``keep``: the prompt's other words at inference, the captions' during training)
  are protected the same way: their own in-context directions are projected out of the unwanted word's before
  V is drawn. On a small encoder words of one kind share directions ("circle" and "star" both carry "a shape");
  without this, removing "circle" also weakens the "star" the prompt asks for.
* V keeps the leading right singular vectors holding ``energy`` of the differences' energy (or the top ``rank``).

Costs no UNet evaluation: one batch of text-encoder passes per call; used at inference by the composition
pipelines and, optionally, on caption embeddings during training.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from studio.errors import ConfigError
from studio.text import clean_prompt

#: Neutral templates the unwanted word is placed in ("{}" marks it): bare, after an article, and before and after
#: generic context, so that V captures the word rather than one position or one neighbour.
TEMPLATES = ("{}", "a {}", "a photo of a {}", "a {} on a background", "the {} in the picture",
             "an image of {} with a background")
#: Generic single-token words whose mean row, at the word's place in each template, is the neutral reference.
REFERENCE_WORDS = ("thing", "object", "item", "picture", "photo", "image", "shape", "color", "style", "person",
                   "place", "texture")
DEFAULT_ENERGY = 0.8

Encode = Callable[[list[str]], torch.Tensor]  # cleaned texts -> hidden states (batch × tokens × d)
Block = tuple[int, int, torch.Tensor]  # (first column, end column, basis) of one text encoder's features


def check_alpha(alpha: float) -> None:
    """DECOR's strength is a fraction: 0 keeps the embeddings, 1 removes the directions exactly."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"DECOR α must be between 0 and 1, not {alpha}")


def orthonormal(vectors: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (d × k) of the rows of ``vectors`` (k × d)."""
    q, _ = torch.linalg.qr(vectors.float().T)
    return q


def unwanted_basis(differences: Sequence[torch.Tensor], protected: torch.Tensor | None = None,
                   rank: int | None = None, energy: float = DEFAULT_ENERGY) -> torch.Tensor:
    """V (d × k): the leading right singular vectors of the stacked difference rows (each tensor m_i × d), after
    removing the ``protected`` directions (orthonormal, d × p) from them; k holds ``energy`` of the energy, or is
    ``rank``."""
    rows = [e.float() for e in differences if len(e)]
    if not rows:
        raise ConfigError("DECOR: the words to remove tokenize to nothing")
    stacked = torch.cat(rows, dim=0)
    if protected is not None:
        protected = protected.float()
        stacked = stacked - stacked @ protected @ protected.T
    _, singular, vh = torch.linalg.svd(stacked, full_matrices=False)
    power = singular.square()
    if float(power.sum()) <= 1e-12 * max(1.0, float(stacked.square().sum())):
        raise ConfigError("DECOR: the words to remove add nothing to a prompt's embeddings")
    keep = int((power.cumsum(0) / power.sum() < energy).sum()) + 1 if rank is None else rank
    return vh[: min(keep, len(vh))].T.contiguous()


def project_out(embeddings: torch.Tensor, basis: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """X − α·X·V·Vᵀ over every row (token) of ``embeddings`` (… × d); α = 1 is an exact projection."""
    check_alpha(alpha)
    basis = basis.to(embeddings.device, torch.float32)
    projected = embeddings.float() @ basis @ basis.T
    return (embeddings.float() - alpha * projected).to(embeddings.dtype)


def _word_start(tokenizer, template: str) -> int:
    """Index of the placeholder's first token in the encoded template (after BOS)."""
    head = template.split("{}")[0].strip()
    return 1 + (len(tokenizer(head, add_special_tokens=False).input_ids) if head else 0)


@torch.no_grad()
def in_context_differences(encode: Encode, tokenizer, word: str) -> list[torch.Tensor]:
    """The word's token rows in each of :data:`TEMPLATES` minus the reference words' mean row at that place."""
    count = len(tokenizer(word, add_special_tokens=False).input_ids)
    if count == 0:
        return []
    texts = [t.format(word) for t in TEMPLATES] + [t.format(r) for t in TEMPLATES for r in REFERENCE_WORDS]
    hidden = encode(texts).float()
    with_word, references = hidden[: len(TEMPLATES)], hidden[len(TEMPLATES) :].unflatten(0, (len(TEMPLATES), -1))
    out = []
    for index, template in enumerate(TEMPLATES):
        start = _word_start(tokenizer, template)
        out.append(with_word[index, start : start + count] - references[index, :, start].mean(0))
    return out


@torch.no_grad()
def shared_directions(encode: Encode) -> torch.Tensor:
    """What every prompt shares, as rows (2 × d): the BOS row and the mean row of a word encoded alone."""
    hidden = encode(["", *REFERENCE_WORDS]).float()
    return torch.stack([hidden[0, 0], hidden[1:, 1].mean(0)])


def check_words(tokenizer, words: Sequence[str]) -> list[str]:
    """The cleaned words to remove; a clear error when there are none or the references do not tokenize alone."""
    cleaned = [clean_prompt(w) for w in words if w.strip()]
    if not cleaned:
        raise ConfigError("DECOR needs at least one word to remove")
    if any(len(tokenizer(r, add_special_tokens=False).input_ids) != 1 for r in REFERENCE_WORDS):
        raise ConfigError("DECOR: this tokenizer splits the reference words; it is not a CLIP tokenizer")
    return cleaned


def kept_words(texts: Sequence[str], removed: Sequence[str]) -> list[str]:
    """The distinct words of ``texts`` (A1111 weights and punctuation stripped), without the removed words."""
    gone = {w.lower() for phrase in removed for w in clean_prompt(phrase).split()}
    found = dict.fromkeys(w.lower() for text in texts for w in re.findall(r"[^\W\d_]+", clean_prompt(text)))
    return [w for w in found if w not in gone]


@torch.no_grad()
def decor_blocks(pipe, words: Sequence[str], rank: int | None = None, energy: float = DEFAULT_ENERGY,
                 keep: Sequence[str] = ()) -> list[Block]:
    """Unwanted-concept bases per text encoder, from the in-context differences of ``words`` encoded the way the
    pipeline encodes prompts (``encode_texts``), with the shared directions and those of the ``keep`` words
    projected out."""
    cleaned = check_words(pipe.tokenizer, words)

    def encode(texts: list[str]) -> torch.Tensor:
        return pipe.encode_texts(texts, zero_empty=False)[0]

    differences = [d for word in cleaned for d in in_context_differences(encode, pipe.tokenizer, word)]
    shared = shared_directions(encode)
    kept = {word: in_context_differences(encode, pipe.tokenizer, word) for word in keep}
    width = shared.shape[-1]
    edges = [0, width]
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: CLIP-L and OpenCLIP-G features, side by side
        edges = [0, pipe.text_encoder.config.hidden_size, width]
    blocks = []
    for start, end in zip(edges[:-1], edges[1:]):
        protected = [shared[:, start:end]]
        base = orthonormal(shared[:, start:end])
        for rows in kept.values():
            if rows:
                protected.append(unwanted_basis([r[:, start:end] for r in rows], base, energy=energy).T)
        blocks.append((start, end, unwanted_basis([d[:, start:end] for d in differences],
                                                  orthonormal(torch.cat(protected)), rank, energy)))
    return blocks


def project_prompts(pipe, hidden: torch.Tensor, prompts: Sequence[str], words: Sequence[str], alpha: float = 1.0,
                    rank: int | None = None) -> torch.Tensor:
    """DECOR on a batch whose rows are ``prompts`` (each repeated len(hidden)/len(prompts) times in a row): each
    prompt with a basis that spares its own words."""
    per_prompt = len(hidden) // max(1, len(prompts))
    bases: dict[str, list[Block]] = {}
    parts = []
    for index, prompt in enumerate(prompts):
        if prompt not in bases:
            bases[prompt] = decor_blocks(pipe, words, rank, keep=kept_words([prompt], words))
        parts.append(project_blocks(hidden[index * per_prompt : (index + 1) * per_prompt], bases[prompt], alpha))
    return torch.cat(parts)


def project_blocks(hidden: torch.Tensor, blocks: Sequence[Block], alpha: float = 1.0) -> torch.Tensor:
    """Project each encoder's columns of ``hidden`` (batch × tokens × d) with its own basis; BOS (row 0) is kept."""
    parts = [project_out(hidden[:, 1:, start:end], basis, alpha) for start, end, basis in blocks]
    return torch.cat([hidden[:, :1], torch.cat(parts, dim=-1)], dim=1)
