"""DECOR (arXiv 2412.09169, METHODS §5): project prompt embeddings away from unwanted concepts.

X′ = X − α·X·V·Vᵀ, where V spans the right singular vectors of the stacked word-token embeddings of the unwanted
words (each encoded on its own, BOS/EOS/PAD rows dropped), keeping σ_i > 1e-3·σ_1 or the top ``rank``.
No code accompanies the paper; the steps (which rows, conditional embedding only, per text encoder) are the
project's decisions recorded in METHODS §5.1. Costs no UNet evaluation; used at inference by the composition
pipeline and, optionally, on caption embeddings during training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def unwanted_basis(word_embeddings: Sequence[torch.Tensor], rank: int | None = None,
                   relative_cutoff: float = 1e-3) -> torch.Tensor:
    """V (d × k): orthonormal directions spanning the stacked word-token rows (each tensor m_i × d)."""
    rows = [e.float() for e in word_embeddings if len(e)]
    if not rows:
        from studio.errors import ConfigError

        raise ConfigError("DECOR: the words to remove tokenize to nothing")
    stacked = torch.cat(rows, dim=0)
    _, singular, vh = torch.linalg.svd(stacked, full_matrices=False)
    keep = int((singular > relative_cutoff * singular[0]).sum())
    if rank is not None:
        keep = min(keep, rank)
    return vh[:keep].T.contiguous()


def project_out(embeddings: torch.Tensor, basis: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """X − α·X·V·Vᵀ over every row (token) of ``embeddings`` (… × d); α = 1 is an exact projection."""
    if not 0.0 <= alpha <= 1.0:
        from studio.errors import ConfigError

        raise ConfigError(f"DECOR α must be between 0 and 1, not {alpha}")
    basis = basis.to(embeddings.device, torch.float32)
    projected = embeddings.float() @ basis @ basis.T
    return (embeddings.float() - alpha * projected).to(embeddings.dtype)


@torch.no_grad()
def word_token_embeddings(tokenizer, text_encoder, words: Sequence[str], device: torch.device) -> list[torch.Tensor]:
    """Each word's encoder output rows for its own tokens only (no BOS, EOS or padding)."""
    from studio.text import clean_prompt

    rows = []
    for word in words:
        ids = tokenizer(clean_prompt(word), truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids.to(device)
        hidden = text_encoder(ids)[0][0]
        rows.append(hidden[1 : ids.shape[1] - 1])
    return rows


def decor_basis(pipe, words: Sequence[str], rank: int | None = None) -> torch.Tensor:
    """The unwanted-concept basis for the pipeline's (first) text encoder."""
    from studio.errors import ConfigError

    cleaned = [w.strip() for w in words if w.strip()]
    if not cleaned:
        raise ConfigError("DECOR needs at least one word to remove")
    rows = word_token_embeddings(pipe.tokenizer, pipe.text_encoder, cleaned, pipe.text_encoder.device)
    return unwanted_basis(rows, rank)
