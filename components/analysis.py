"""Attention-map analyses from the Hymba paper, as pure functions on tensors.

Every map is ``attn[b, h, q, k]``: row ``q`` holds the normalized scores (summing to 1 over the
allowed keys) from query ``q`` to key ``k``. The key axis may start with ``num_meta`` meta-token
columns (Hymba prepends learned meta tokens; the first real token, right after them, is BOS).
Queries are the *last* ``q`` positions of the key axis, so both the full square map of
``[meta ; tokens]`` and a map with real-token rows only (``k = num_meta + q``) are accepted.

- ``effective_receptive_field``: the ERF of paper §2.2.2 (Fig. 3); ``layer_last_rows`` joins a layer's branches.
- ``attention_entropy`` / ``attention_entropy_per_layer``: row entropy per head (App. D, Fig. 9).
- ``attention_share``: the 'Meta' / 'BOS' / 'Self' / 'Cross' categories of App. C (Fig. 8).
- ``normalize_implicit_attention``: turns an SSM's implicit attention matrix into rows of the
  same kind, so all of the above apply to SSM heads too.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows of a softmax map in bf16 can miss 1 by a few 1e-3; anything further off is not a distribution.
_ROW_SUM_TOLERANCE = 1e-2


class AttentionMapError(ValueError):
    """An attention map has the wrong shape or its rows are not normalized."""


def _check_attention_map(attn: Tensor, name: str) -> None:
    if attn.dim() != 4:
        raise AttentionMapError(
            f"{name} must be a 4-D tensor (batch, heads, queries, keys); got shape {tuple(attn.shape)}"
        )
    if attn.shape[-2] > attn.shape[-1]:
        raise AttentionMapError(
            f"{name} has more queries ({attn.shape[-2]}) than keys ({attn.shape[-1]}); "
            "queries must be the last positions of the key axis"
        )


def _check_rows_normalized(rows: Tensor, name: str) -> None:
    row_sums = rows.float().sum(dim=-1)
    worst = (row_sums - 1.0).abs().max().item()
    if worst > _ROW_SUM_TOLERANCE:
        raise AttentionMapError(
            f"{name} rows must sum to 1 (largest deviation {worst:.3g}); normalize softmax scores, "
            "or pass SSM implicit attention through normalize_implicit_attention first"
        )


def _real_query_rows(attn: Tensor, num_meta: int, name: str) -> tuple[Tensor, Tensor]:
    """The float32 rows (b, h, r, keys) of real (non-meta) queries and their key-axis positions (r,)."""
    num_queries, num_keys = attn.shape[-2], attn.shape[-1]
    if not 0 <= num_meta < num_keys:
        raise AttentionMapError(
            f"num_meta must be in [0, {num_keys}) for {name} with {num_keys} keys; got {num_meta}"
        )
    first_query = num_keys - num_queries
    positions = torch.arange(first_query, num_keys, device=attn.device)
    positions = positions[positions >= num_meta]
    if positions.numel() == 0:
        raise AttentionMapError(f"{name} has no real-token query rows (all {num_queries} are meta tokens)")
    rows = attn.float()[:, :, positions - first_query]
    _check_rows_normalized(rows, name)
    return rows, positions


def layer_last_rows(branch_maps: list[Tensor]) -> Tensor:
    """A layer's heads as one map for the ERF: the last query row of each branch (attention heads, SSM heads)
    averaged over its heads, then over the branches, each given equal weight as the mixer's mean fusion gives its
    two outputs; (b, 1, 1, keys)."""
    rows = [m[:, :, -1:, :].float().mean(dim=1, keepdim=True) for m in branch_maps]
    return torch.stack(rows).mean(dim=0)


def effective_receptive_field(attn_maps: list[Tensor]) -> float:
    """Effective receptive field (ERF) of paper §2.2.2, in tokens.

        ERF ≈ Σ_{n≤N} Σ_{h≤H} Σ_{s≤S} 2·M^h(S,s)·(S−s)·(N−n+1) / (H·N·(N+1))

    Indexing convention: token positions are 0-based along the key axis, ``s = 0 … S`` with
    ``S = keys − 1`` the last token, so ``S − s`` is the distance in tokens from the last token to
    token ``s`` (meta tokens, when present, are positions ``0 … num_meta − 1``). Layers are 1-based,
    ``n = 1 … N`` in list order, so the first layer gets the largest weight ``N`` and the last
    layer weight 1; the weights ``2(N−n+1)/(N(N+1))`` sum to 1. ``M^h(S, s)`` is the last query
    row of head ``h``, averaged over the batch. With those conventions the ERF is a weighted mean
    attention distance: all mass on the last token gives 0, all mass on token 0 gives ``S``.

    Heads are averaged within each layer (the paper's 1/H), which also lets layers with different
    head counts be combined; ``attn_maps`` holds every layer of the model, SSM heads through their implicit
    attention (Fig. 3 gives Mamba an ERF), and a hybrid layer as ``layer_last_rows`` of its two branches.
    All layers must share the key length ``S + 1``.
    Following Ben-Kish et al. 2024 (DeciMamba), as cited by the paper.
    """
    if len(attn_maps) == 0:
        raise AttentionMapError("attn_maps must hold at least one layer's attention map; got an empty list")
    num_keys = attn_maps[0].shape[-1]
    num_layers = len(attn_maps)
    erf = 0.0
    for layer_index, attn in enumerate(attn_maps):
        name = f"attn_maps[{layer_index}]"
        _check_attention_map(attn, name)
        if attn.shape[-1] != num_keys:
            raise AttentionMapError(
                f"{name} has {attn.shape[-1]} keys but attn_maps[0] has {num_keys}; "
                "every layer must see the same sequence"
            )
        last_row = attn[:, :, -1, :].float()  # (b, h, keys): M^h(S, s) per batch element
        _check_rows_normalized(last_row, name)
        distance = torch.arange(num_keys - 1, -1, -1, device=attn.device, dtype=torch.float32)  # S − s
        mean_distance = (last_row.mean(dim=0) * distance).sum(dim=-1).mean().item()  # Σ_s, then 1/H Σ_h
        n = layer_index + 1
        erf += 2.0 * (num_layers - n + 1) / (num_layers * (num_layers + 1)) * mean_distance
    return erf


def attention_entropy(attn: Tensor, eps: float = 1e-12, num_meta: int = 0) -> Tensor:
    """Shannon entropy (nats) of each attention row, averaged over queries and batch: shape (heads,).

    Entries below ``eps`` are clamped inside the log only, so masked zeros contribute exactly 0.
    Query rows of meta tokens (absolute positions ``< num_meta``) are left out, so maps with and
    without meta tokens are compared over the same real-token rows (paper App. D, Fig. 9).
    """
    _check_attention_map(attn, "attn")
    rows, _ = _real_query_rows(attn, num_meta, "attn")
    entropy = -(rows * rows.clamp_min(eps).log()).sum(dim=-1)  # (b, h, real queries)
    return entropy.mean(dim=(0, 2))


def attention_entropy_per_layer(attn_maps: list[Tensor], eps: float = 1e-12, num_meta: int = 0) -> Tensor:
    """``attention_entropy`` of every layer stacked into a (layers, heads) table."""
    if len(attn_maps) == 0:
        raise AttentionMapError("attn_maps must hold at least one layer's attention map; got an empty list")
    per_layer = [attention_entropy(attn, eps=eps, num_meta=num_meta) for attn in attn_maps]
    head_counts = {entropy.shape[0] for entropy in per_layer}
    if len(head_counts) != 1:
        raise AttentionMapError(
            f"attn_maps must have the same number of heads in every layer to form a table; got {sorted(head_counts)}"
        )
    return torch.stack(per_layer)


def attention_share(attn: Tensor, num_meta: int, bos_index: int | None = None) -> dict[str, float]:
    """Fractions of attention going to the paper's four key categories (App. C, Fig. 8).

    'meta': to meta-token columns ``< num_meta``; 'bos': to the BOS column (``bos_index``, by
    default ``num_meta``, the first column after the meta tokens); 'self': the diagonal; 'cross':
    to every other real token. Each real query row is split over the four categories (for the BOS
    row, its diagonal is the BOS column and counts as 'bos'), then the row fractions are averaged
    over real query rows, heads and batch, i.e. summed and divided by the context length as in
    the paper. The four values sum to 1.
    """
    _check_attention_map(attn, "attn")
    num_keys = attn.shape[-1]
    rows, real_positions = _real_query_rows(attn, num_meta, "attn")
    bos = num_meta if bos_index is None else bos_index
    if not num_meta <= bos < num_keys:
        raise AttentionMapError(
            f"bos_index must be a real-token key column in [{num_meta}, {num_keys}); got {bos_index}"
        )

    keys = torch.arange(num_keys, device=attn.device)
    is_meta = (keys < num_meta).expand(len(real_positions), num_keys)
    is_bos = (keys == bos).expand(len(real_positions), num_keys)
    is_self = (keys[None, :] == real_positions[:, None]) & ~is_bos
    is_cross = ~(is_meta | is_bos | is_self)

    def mean_share(mask: Tensor) -> float:
        return (rows * mask).sum(dim=-1).mean().item()

    return {
        "meta": mean_share(is_meta),
        "bos": mean_share(is_bos),
        "self": mean_share(is_self),
        "cross": mean_share(is_cross),
    }


def normalize_implicit_attention(alpha: Tensor) -> Tensor:
    """Row-normalized magnitude of an SSM's implicit attention matrix: (b, d, t, s) → (b, d, t, s).

    A selective scan's implicit attention ``alpha[b, d, t, s]`` (how much input ``s`` contributes
    to output ``t`` in channel ``d``) can be negative and its rows do not sum to 1. Following the
    hidden-attention literature (Ali et al. 2024, "The Hidden Attention of Mamba Models";
    Ben-Kish et al. 2024; Zimerman et al. 2024), as the Hymba paper does for Fig. 8 and 9, we take
    ``|alpha|`` and divide each row by its sum, so each channel behaves like an attention head.
    Entries above the diagonal stay 0; an all-zero row stays all-zero.
    """
    if alpha.dim() != 4:
        raise AttentionMapError(
            f"alpha must be a 4-D tensor (batch, channels, t, s); got shape {tuple(alpha.shape)}"
        )
    magnitude = alpha.abs()
    row_sums = magnitude.sum(dim=-1, keepdim=True)
    return magnitude / row_sums.clamp_min(torch.finfo(magnitude.dtype).tiny)
