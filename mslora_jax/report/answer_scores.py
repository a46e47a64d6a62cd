"""The table ``mslora-jax score`` prints: one answer file's metrics, in percent.

Under ``released`` the rows follow the released evaluator's ``metrics.txt`` (same order, its row
name beside ours), with four decimals so the two can be compared to 0.01 points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from mslora_jax.eval.answer_metrics import METRIC_NAMES
from mslora_jax.eval.released_metrics import RELEASED_NAMES


def format_answer_scores(scores: Mapping[str, float], metrics: str) -> str:
    """A plain-text table of ``scores`` (fractions; NaN = undefined) scored with ``metrics``."""
    if metrics == "released":
        rows = [["metric", "released name", "value (%)"]]
        rows += [[n, RELEASED_NAMES[n], _percent(scores[n])] for n in RELEASED_NAMES]
    else:
        rows = [["metric", "value (%)"]] + [[n, _percent(scores[n])] for n in METRIC_NAMES]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [_line(r, widths) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = f"{int(scores['num_open'])} open, {int(scores['num_closed'])} closed answers"
    return "\n".join([f"metrics: {metrics} ({counts})", *lines])


def _line(cells: list[str], widths: list[int]) -> str:
    """Text cells left-aligned, the value (last cell) right-aligned."""
    *text, value = cells
    return "  ".join([c.ljust(w) for c, w in zip(text, widths)] + [value.rjust(widths[-1])])


def _percent(value: float) -> str:
    return "–" if math.isnan(value) else f"{100.0 * value:.4f}"
