"""LyCORIS and DoRA modules (LoCon with Tucker ``lora_mid``, LoHa, LoKr, full-diff) as exact LoRA factors.

Every module a file holds becomes the studio's one in-memory form, ``ΔW = (alpha / rank) · up @ down``, with no
approximation: each algorithm's ΔW has an exact low-rank factorization that is built from its factors directly
(no SVD, so no truncation error to record):

- LoCon ``lora_down``/``lora_up`` is a LoRA; with Tucker, ``ΔW[p, r] = Σ mid[i, j] · up[p, i] · down[j, r]``
  (LyCORIS' ``einsum("i j k l, p i, j r -> p r k l")``), so ``down' = mid ×₂ down`` keeps the rank.
- LoHa ``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha / r``: a Hadamard product of rank-r matrices equals the product
  of their row-wise and column-wise Khatri–Rao products, ``up[o, (a, b)] = w1a[o, a] · w2a[o, b]`` and
  ``down[(a, b), i] = w1b[a, i] · w2b[b, i]`` (rank r²). With Tucker cores, ΔW is rebuilt and factored as below.
- LoKr ``ΔW = kron(w1, w2) · scale``: with each factor written as ``U V``, ``kron(U1 V1, U2 V2) =
  kron(U1, U2) @ kron(V1, V2)``; a full factor is ``X @ I`` or ``I @ X`` (whichever inner size is smaller).
- A full-rank ΔW (full-diff ``diff``, DoRA, Tucker LoHa) is ``I @ ΔW`` or ``ΔW @ I`` (rank min(out, in·k·k)).
  full-diff's ``diff_b`` is a bias delta, carried by peft's ``lora_bias``.

Why LoRA factors and not peft's LoHa/LoKr layers: every composition method routes each batch slice to one adapter
through peft's LoRA layers (mixed-batch ``adapter_names``, the merged routing's ``get_delta_weight``,
``set_scale``); peft cannot hold a LoHa and a LoRA adapter in one layer of one model, and its DoRA refuses
per-sample routing. As LoRA factors, LyCORIS files compose, merge and route like any LoRA. DoRA's ΔW depends on
the base weight, ``m · (W + ΔW₀) / ‖W + ΔW₀‖ − W`` (norm over every axis but the magnitude's), so it is computed
when the adapter is attached (:func:`resolve_dora`); at weight 1 it is LyCORIS' ``apply_weight_decompose``, at
other weights it scales linearly as in ComfyUI (LyCORIS interpolates the column scale instead).

Layouts and formulas follow LyCORIS' ``lycoris/modules`` and ``lycoris/functional``: scale = alpha / dim with
dim the decomposed factors' rank (LoKr: 1 when both factors are full), alpha = dim when absent.
"""

from __future__ import annotations

import torch

from studio.errors import AdapterError

LORA_PARTS = {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale"}
LOHA_PARTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"}
LOKR_PARTS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha",
              "dora_scale"}
FULL_PARTS = {"diff", "diff_b"}
# LyCORIS algorithms the studio does not read, by a part only they write
UNSUPPORTED = {"oft_blocks": "OFT/BOFT", "oft_diag": "OFT", "rescale": "OFT/BOFT", "a1.weight": "GLoRA",
               "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA", "on_input": "(IA)³",
               "w_norm": "norm", "b_norm": "norm", "weight": "(IA)³"}


def algorithm(parts: set[str]) -> str:
    """The LyCORIS algorithm a module's parts belong to: lora, loha, lokr or full; an error for the rest."""
    for part in sorted(parts):
        if part in UNSUPPORTED:
            raise AdapterError(f"a {UNSUPPORTED[part]} module ({part!r}); the studio reads LoRA, LoCon, LoHa, "
                               "LoKr, full-diff and DoRA")
    for name, allowed in (("lora", LORA_PARTS), ("loha", LOHA_PARTS), ("lokr", LOKR_PARTS), ("full", FULL_PARTS)):
        if parts <= allowed and parts - {"alpha", "dora_scale"}:
            return name
    raise AdapterError(f"a module with an unknown set of parts {sorted(parts)}")


def _alpha(parts: dict[str, torch.Tensor], dim: int) -> float:
    alpha = parts.get("alpha")
    value = float(alpha) if alpha is not None else float(dim)
    return float(dim) if value == 0 else value  # LyCORIS: alpha 0 or None means alpha = dim


def _as_product(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A factor as U (rows × r) @ V (r × columns): the stored pair, or the full matrix against an identity."""
    if full is None:
        return a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    full = full.reshape(full.shape[0], -1).double()
    rows, columns = full.shape
    if rows <= columns:
        return torch.eye(rows, dtype=torch.float64), full
    return full, torch.eye(columns, dtype=torch.float64)


def full_rank_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with ``up @ down == delta`` exactly: one factor is an identity (rank min(out, in·k·k))."""
    out, columns = delta.shape[0], delta[0].numel()
    flat = delta.reshape(out, columns)
    if out <= columns:
        return flat.reshape(delta.shape).clone(), _shaped_up(torch.eye(out, dtype=delta.dtype), delta.dim())
    down = torch.eye(columns, dtype=delta.dtype).reshape(columns, *delta.shape[1:])
    return down, _shaped_up(flat.clone(), delta.dim())


def _shaped_up(up: torch.Tensor, dims: int) -> torch.Tensor:
    return up.reshape(*up.shape, *([1] * (dims - 2)))


def _lora(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    rank = int(down.shape[0])
    if "lora_mid.weight" in parts:  # Tucker: down is 1×1 (r, in), mid (r, r, k, k), up (out, r)
        mid = parts["lora_mid.weight"].double()
        down = torch.einsum("ijkl,jr->irkl", mid, down.double().flatten(1)).float()
    return down, up, _alpha(parts, rank)


def _loha(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoHa; a convolution without Tucker stores its kernel flattened (w1b: r × in·k·k), so its factors stay 2-D
    until the adapter is attached and the target's kernel is known (:mod:`studio.adapters.fit`)."""
    w1a, w1b, w2a, w2b = (parts[k].double() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    rank = int(w1b.shape[0])
    scale = _alpha(parts, rank) / rank
    if "hada_t1" in parts or "hada_t2" in parts:  # Tucker: w = einsum(t, w_b, w_a) over (out, in, k, k)
        w1 = torch.einsum("ij...,jr,ip->pr...", parts["hada_t1"].double(), w1b, w1a)
        w2 = torch.einsum("ij...,jr,ip->pr...", parts["hada_t2"].double(), w2b, w2a)
        down, up = full_rank_factors(w1 * w2 * scale)
        return down.float(), up.float(), float(down.shape[0])
    out = w1a.shape[0]
    up = (w1a[:, :, None] * w2a[:, None, :]).reshape(out, -1)
    b1, b2 = w1b.flatten(1), w2b.flatten(1)
    down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
    rank2 = down.shape[0]
    if w1b.dim() == 4:
        down, up = down.reshape(rank2, *w1b.shape[1:]), up.reshape(out, rank2, 1, 1)
    return down.float(), up.float(), scale * rank2


def _lokr(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
    dim = None
    if "lokr_w1" not in parts:
        dim = int(parts["lokr_w1_b"].shape[0])
    w2_full = parts.get("lokr_w2")
    if w2_full is None:
        dim = int(parts["lokr_w2_b"].shape[0])
        if "lokr_t2" in parts:  # Tucker: w2 = einsum(t2, w2a (r, b), w2b (r, d)) → (b, d, k, k)
            w2_full = torch.einsum("ij...,ip,jr->pr...", parts["lokr_t2"].double(), parts["lokr_w2_a"].double(),
                                   parts["lokr_w2_b"].double())
    scale = 1.0 if dim is None else _alpha(parts, dim) / dim
    u1, v1 = _as_product(parts.get("lokr_w1"), parts.get("lokr_w1_a"), parts.get("lokr_w1_b"))
    w2_shape = w2_full.shape if w2_full is not None else parts["lokr_w2_b"].shape
    conv = len(w2_shape) == 4
    kernel = tuple(w2_shape[2:]) if conv else ()
    if w2_full is not None:
        u2, v2 = _as_product(w2_full, None, None)
    else:
        u2, v2 = _as_product(None, parts["lokr_w2_a"], parts["lokr_w2_b"])
    up, down = torch.kron(u1, u2), torch.kron(v1, v2)
    if conv:  # columns of kron(V1, V2) are (c, d, k, k) in the order LyCORIS' make_kron gives
        in_channels = v1.shape[1] * (v2.shape[1] // (kernel[0] * kernel[1]))
        down = down.reshape(down.shape[0], in_channels, *kernel)
        up = up.reshape(*up.shape, 1, 1)
    return down.float(), up.float(), scale * down.shape[0]


def module_factors(parts: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor, torch.Tensor, float,
                                                            torch.Tensor | None]:
    """(algorithm, down, up, alpha, bias delta) of one kohya/LyCORIS module, exact: up @ down · alpha / rank = ΔW."""
    kind = algorithm(set(parts))
    bias = None
    if kind == "lora":
        down, up, alpha = _lora(parts)
    elif kind == "loha":
        down, up, alpha = _loha(parts)
    elif kind == "lokr":
        down, up, alpha = _lokr(parts)
    else:
        diff = parts["diff"].double()
        down, up = full_rank_factors(diff)
        down, up, alpha = down.float(), up.float(), float(down.shape[0])
        bias = parts.get("diff_b")
    return kind, down, up, alpha, bias


def resolve_dora(magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """DoRA's ΔW against base ``weight``: ``m · (W + ΔW₀) / ‖W + ΔW₀‖ − W``, the norm taken over every axis but
    the one the magnitude lies on (kohya/LyCORIS: input channels, shape (1, in, …); peft: output, shape (out,))."""
    combined = weight.double() + delta.double()
    m = magnitude.double()
    if m.numel() == combined.shape[0] and (m.dim() == 1 or m.shape[0] == combined.shape[0]):
        norm = combined.reshape(combined.shape[0], -1).norm(dim=1)
        m = m.reshape(-1)
        shape = (combined.shape[0],) + (1,) * (combined.dim() - 1)
    elif m.numel() == combined.shape[1]:
        norm = combined.transpose(0, 1).reshape(combined.shape[1], -1).norm(dim=1)
        m = m.reshape(-1)
        shape = (1, combined.shape[1]) + (1,) * (combined.dim() - 2)
    else:
        raise AdapterError(f"a DoRA magnitude of shape {list(magnitude.shape)} fits neither axis of a "
                           f"{list(weight.shape)} weight")
    return (combined * (m / norm).reshape(shape) - weight.double()).float()
