"""Figures for the paper's analyses (Hymba Fig. 3, 8, 9 and attention maps), saved as PNG files.

Uses matplotlib's object-oriented API on an Agg canvas, so no pyplot state or display is touched.
Every helper returns the path of the PNG it wrote (parent folders are created).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SHARE_CATEGORIES = ("meta", "bos", "self", "cross")


class ErfCachePoint(NamedTuple):
    """One model in the ERF vs cache-size trade-off (paper Fig. 3)."""

    label: str
    cache_mb: float
    erf: float


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png; got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_attention_map(attn: torch.Tensor, title: str, path: str | Path) -> Path:
    """Heat map of one (queries, keys) attention map."""
    if attn.dim() != 2:
        raise ValueError(f"attn must be a 2-D (queries, keys) map; got shape {tuple(attn.shape)}")
    figure = Figure(figsize=(5, 4.5))
    axes = figure.add_subplot()
    image = axes.imshow(attn.detach().float().cpu().numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="attention score")
    axes.set(title=title, xlabel="key position", ylabel="query position")
    return _save(figure, path)


def plot_entropy_per_layer(with_meta: torch.Tensor, without_meta: torch.Tensor, path: str | Path) -> Path:
    """Layer-wise attention entropy with vs without meta tokens (paper Fig. 9).

    Inputs are (layers, heads) tables from ``attention_entropy_per_layer``; the line is the mean
    over heads and the band spans the lowest to the highest head.
    """
    if with_meta.dim() != 2 or with_meta.shape[0] != without_meta.shape[0] or without_meta.dim() != 2:
        raise ValueError(
            f"with_meta and without_meta must be (layers, heads) tables with the same number of layers; "
            f"got {tuple(with_meta.shape)} and {tuple(without_meta.shape)}"
        )
    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    layers = range(with_meta.shape[0])
    for table, label in ((without_meta, "w/o meta tokens"), (with_meta, "w/ meta tokens")):
        table = table.detach().float().cpu()
        axes.plot(layers, table.mean(dim=1).numpy(), marker="o", label=label)
        axes.fill_between(layers, table.min(dim=1).values.numpy(), table.max(dim=1).values.numpy(), alpha=0.2)
    axes.set(xlabel="layer", ylabel="attention entropy (nats)", title="Attention map entropy per layer")
    axes.legend()
    return _save(figure, path)


def plot_attention_share(shares_by_model: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """Stacked bars of the 'meta' / 'bos' / 'self' / 'cross' shares of each model (paper Fig. 8)."""
    if len(shares_by_model) == 0:
        raise ValueError("shares_by_model must hold at least one model's attention_share result")
    for model, shares in shares_by_model.items():
        if set(shares) != set(SHARE_CATEGORIES):
            raise ValueError(
                f"shares_by_model[{model!r}] must have exactly the keys {list(SHARE_CATEGORIES)}; got {sorted(shares)}"
            )
    figure = Figure(figsize=(1.5 + 1.2 * len(shares_by_model), 4))
    axes = figure.add_subplot()
    models = list(shares_by_model)
    bottoms = [0.0] * len(models)
    for category in SHARE_CATEGORIES:
        heights = [shares_by_model[model][category] for model in models]
        axes.bar(models, heights, bottom=bottoms, label=category.capitalize() if category != "bos" else "BOS")
        bottoms = [bottom + height for bottom, height in zip(bottoms, heights)]
    axes.set(ylabel="share of attention", ylim=(0, 1), title="Attention by key category")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(figure, path)


def plot_erf_vs_cache(points: Sequence[ErfCachePoint | tuple[str, float, float]], path: str | Path) -> Path:
    """Scatter of effective receptive field against cache size, one labelled point per model (paper Fig. 3)."""
    if len(points) == 0:
        raise ValueError("points must hold at least one (label, cache_mb, erf) point")
    figure = Figure(figsize=(5, 4))
    axes = figure.add_subplot()
    for label, cache_mb, erf in (ErfCachePoint(*point) for point in points):
        axes.scatter([cache_mb], [erf], s=40)
        axes.annotate(label, (cache_mb, erf), textcoords="offset points", xytext=(5, 5))
    axes.set(xlabel="cache size (MB)", ylabel="effective receptive field (tokens)", title="ERF vs cache size")
    return _save(figure, path)
