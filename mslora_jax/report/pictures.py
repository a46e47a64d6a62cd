"""Pictures of a run beyond the accuracy matrices: how similar the learned adapters are, and the
training loss of every stage.

Pure functions: they take arrays and records and return a matplotlib ``Figure`` drawn with Agg
(pyplot's global backend is never touched). Reading a workdir is ``run.pictures``'s job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# The loss terms the training log records (``train.loop``), in subplot order, with their titles.
LOSS_TERMS = (
    ("loss", "total loss"),
    ("task_loss", "task loss"),
    ("cr", "CR term"),
    ("ortho", "orthogonality term"),
)


def modality_order(modalities: Sequence[str], order: Sequence[str] = ()) -> list[int]:
    """Indices of ``modalities`` grouped by modality: the modalities of ``order`` first (e.g.
    the config's ``modalities``), in that order, then any others sorted by name; the stream's
    order within a group (the sort is stable)."""
    rank = {m: i for i, m in enumerate(order)}
    key = lambda i: (rank.get(modalities[i], len(rank)), modalities[i])
    return sorted(range(len(modalities)), key=key)


def _groups(modalities: Sequence[str]) -> list[tuple[str, int, int]]:
    """(modality, first, last) of every run of equal neighbours in ``modalities``."""
    out: list[tuple[str, int, int]] = []
    for i, m in enumerate(modalities):
        if out and out[-1][0] == m:
            out[-1] = (m, out[-1][1], i)
        else:
            out.append((m, i, i))
    return out


def _heatmap(ax, matrix: np.ndarray, labels, modalities, vmin, vmax, cmap, dark_low: bool):
    """One annotated square heatmap with lines between modality groups, named on the top axis.
    ``dark_low``: the colour map is dark at its low end (viridis) rather than at both (RdBu)."""
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=vmin, vmax=vmax, cmap=cmap)
    for (i, j), x in np.ndenumerate(matrix):
        if np.isnan(x):
            ax.text(j, i, "–", ha="center", va="center", fontsize=8)
            continue
        light = x > vmin + 0.6 * (vmax - vmin) if dark_low else abs(x) < 0.6 * vmax
        colour = "black" if light else "white"
        ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=8, color=colour)
    n = len(labels)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    groups = _groups(modalities)
    for _, first, _ in groups[1:]:
        ax.axhline(first - 0.5, color="black", linewidth=1.5)
        ax.axvline(first - 0.5, color="black", linewidth=1.5)
    top = ax.secondary_xaxis("top")
    top.set_xticks([(first + last) / 2 for _, first, last in groups], [g[0] for g in groups])
    top.tick_params(length=0, labelsize=9)
    return image


def plot_adapter_similarity(
    labels: Sequence[str],
    modalities: Sequence[str],
    similarity: np.ndarray,
    cosine: np.ndarray,
    *,
    title: str,
    similarity_label: str = "CR similarity mean exp(-d)",
    modality_first: Sequence[str] = (),
) -> Figure:
    """Two heatmaps of the adapters ``labels`` (each of modality ``modalities``): the CR
    similarity in [0, 1], and the delta-W cosine in [-1, 1] (``lora.compare``), both
    ``[n, n]`` in the order of ``labels``. Rows and columns are regrouped by modality
    (``modality_order(modalities, modality_first)``); NaN cells show a dash."""
    n = len(labels)
    for name, matrix in (("similarity", similarity), ("cosine", cosine)):
        if np.shape(matrix) != (n, n):
            raise ValueError(f"{name}: expected a {n} x {n} matrix, got shape {np.shape(matrix)}")
    order = modality_order(modalities, modality_first)
    labels = [labels[i] for i in order]
    modalities = [modalities[i] for i in order]
    regroup = lambda m: np.asarray(m, dtype=float)[np.ix_(order, order)]
    side = max(3.0, 0.6 * n + 1.5)  # inches per panel
    fig = Figure(figsize=(2 * side + 2.5, side + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    panels = (
        (left, regroup(similarity), 0.0, 1.0, "viridis", True, similarity_label),
        (right, regroup(cosine), -1.0, 1.0, "RdBu_r", False, "cosine of flattened delta-W"),
    )
    for ax, matrix, vmin, vmax, cmap, dark_low, label in panels:
        image = _heatmap(ax, matrix, labels, modalities, vmin, vmax, cmap, dark_low)
        ax.set_title(label, fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(title)
    return fig


def plot_loss_curves(records: Sequence[Mapping], *, title: str) -> Figure:
    """Per-stage training curves from the training log's step rows (``stage``, ``task``,
    ``step`` within the stage, and the ``LOSS_TERMS``): one subplot per term the rows record
    (CR and orthogonality only where some row has them non-zero, i.e. the method uses them),
    one line per stage. A stage with few logged points gets markers."""
    if not records:
        raise ValueError(f"{title}: no training log rows to plot")
    terms = [
        (key, name)
        for key, name in LOSS_TERMS
        if any(key in r for r in records)
        and (key in ("loss", "task_loss") or any(r.get(key, 0.0) != 0.0 for r in records))
    ]
    stages: dict[int, list[Mapping]] = {}
    for r in records:
        stages.setdefault(int(r["stage"]), []).append(r)
    fig = Figure(figsize=(4.2 * len(terms) + 1.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(terms), squeeze=False)[0]
    for ax, (key, name) in zip(axes, terms, strict=True):
        for stage, rows in sorted(stages.items()):
            rows = sorted((r for r in rows if key in r), key=lambda r: r["step"])
            if not rows:
                continue
            ax.plot(
                [r["step"] for r in rows],
                [r[key] for r in rows],
                marker="o" if len(rows) <= 10 else None,
                markersize=3,
                label=f"{stage}: {rows[0]['task']}",
            )
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step within stage")
        ax.grid(alpha=0.3)
    axes[0].legend(title="stage: task", fontsize=8, title_fontsize=8)
    fig.suptitle(title)
    return fig
