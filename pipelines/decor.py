"""DECOR (arXiv 2412.09169, METHODS §5): project prompt embeddings away from unwanted concepts.

X′ = X − α·X·V·Vᵀ, where V spans the right singular vectors of the stacked word-token embeddings of the unwanted
words (each encoded on its own, BOS/EOS/PAD rows dropped), keeping σ_i > 1e-3·σ_1 or the top ``rank``.
No code accompanies the paper; the steps (which rows, conditional embedding only, per text encoder) are the
project's decisions recorded in METHODS §5.1. Costs no UNet evaluation; used at inference by the composition
pipelines and, optionally, on caption embeddings during training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from studio.errors import ConfigError
from studio.text import clean_prompt


def unwanted_basis(word_embeddings: Sequence[torch.Tensor], rank: int | None = None,
                   relative_cutoff: float = 1e-3) -> torch.Tensor:
    """V (d × k): orthonormal directions spanning the stacked word-token rows (each tensor m_i × d)."""
    rows = [e.float() for e in word_embeddings if len(e)]
    if not rows:
        raise ConfigError("DECOR: the words to remove tokenize to nothing")
    stacked = torch.cat(rows, dim=0)
    _, singular, vh = torch.linalg.svd(stacked, full_matrices=False)
    keep = int((singular > relative_cutoff * singular[0]).sum())
    if rank is not None:
        keep = min(keep, rank)
    return vh[:keep].T.contiguous()


def check_alpha(alpha: float) -> None:
    """DECOR's strength is a fraction: 0 keeps the embeddings, 1 removes the directions exactly."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"DECOR α must be between 0 and 1, not {alpha}")


def project_out(embeddings: torch.Tensor, basis: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """X − α·X·V·Vᵀ over every row (token) of ``embeddings`` (… × d); α = 1 is an exact projection."""
    check_alpha(alpha)
    basis = basis.to(embeddings.device, torch.float32)
    projected = embeddings.float() @ basis @ basis.T
    return (embeddings.float() - alpha * projected).to(embeddings.dtype)


Block = tuple[int, int, torch.Tensor]  # (first column, end column, basis) of one text encoder's features


@torch.no_grad()
def decor_blocks(pipe, words: Sequence[str], rank: int | None = None) -> list[Block]:
    """Unwanted-concept bases per text encoder. Each word is encoded the way the pipeline encodes prompts
    (``encode_texts``), and only its own token rows are kept (no BOS, EOS or padding)."""
    cleaned = [clean_prompt(w) for w in words if w.strip()]
    if not cleaned:
        raise ConfigError("DECOR needs at least one word to remove")
    rows = []
    for word in cleaned:
        count = len(pipe.tokenizer(word, add_special_tokens=False).input_ids)
        hidden, _ = pipe.encode_texts([word])
        rows.append(hidden[0, 1 : 1 + count].float())
    width = rows[0].shape[-1]
    edges = [0, width]
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: CLIP-L and OpenCLIP-G features, side by side
        edges = [0, pipe.text_encoder.config.hidden_size, width]
    return [(start, end, unwanted_basis([r[:, start:end] for r in rows], rank))
            for start, end in zip(edges[:-1], edges[1:])]


def project_blocks(hidden: torch.Tensor, blocks: Sequence[Block], alpha: float = 1.0) -> torch.Tensor:
    """Project each encoder's columns of ``hidden`` with its own basis."""
    parts = [project_out(hidden[..., start:end], basis, alpha) for start, end, basis in blocks]
    return torch.cat(parts, dim=-1)
