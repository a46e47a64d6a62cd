"""The retrieval gallery picture: a few queries, each with its top results, relevant results
framed green and the others red. A retrieval result is a picture of images, not a list of ids.

Pure: it takes arrays and returns a matplotlib ``Figure`` drawn with Agg; which queries and
results to show is ``continual_retrieval.gallery``'s job.
"""

from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

RELEVANT, OTHER = "#1a9850", "#d73027"  # green, red


@dataclasses.dataclass(frozen=True)
class GalleryRow:
    """One query (an image ``[H, W, 3]`` uint8, or a text) and its ranked results: images,
    whether each is relevant, and its score; ``title`` says what was asked."""

    title: str
    query_image: np.ndarray | None
    query_text: str | None
    results: list[tuple[np.ndarray, bool, float]]


def plot_gallery(rows: list[GalleryRow], title: str = "") -> Figure:
    """One row per query: the query, then its results left to right."""
    columns = 1 + max((len(r.results) for r in rows), default=0)
    fig = Figure(figsize=(1.5 * columns + 1.0, 1.6 * len(rows) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for ax_row, row in zip(axes, rows, strict=True):
        query = ax_row[0]
        if row.query_image is not None:
            query.imshow(row.query_image, interpolation="nearest")
        else:
            query.text(0.5, 0.5, "\n".join(textwrap.wrap(f'"{row.query_text}"', 22)),
                       ha="center", va="center", fontsize=6.5, wrap=True)  # fmt: skip
        query.set_title(row.title, fontsize=7)
        for ax, (image, relevant, score) in zip(ax_row[1:], row.results, strict=False):
            ax.imshow(image, interpolation="nearest")
            colour = RELEVANT if relevant else OTHER
            for spine in ax.spines.values():
                spine.set_color(colour)
                spine.set_linewidth(3)
            ax.set_title(f"{score:.2f}", fontsize=7, color=colour)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in ax_row[1 + len(row.results) :]:
            ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
