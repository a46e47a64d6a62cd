"""Continual-learning metrics over an accuracy matrix, and plain classification accuracy.

The accuracy matrix ``a`` has one row per training stage and one column per task:
``a[i][j]`` is the accuracy (a fraction in [0, 1]) on task j's test split after stage i, and
``None`` where task j has not been seen yet (j > i). A sequential run over T tasks gives a square
T x T matrix; the ``joint`` baseline, trained once on all tasks, gives a single row.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

AccMatrix = Sequence[Sequence[float | None]]


def check_acc_matrix(acc_matrix: AccMatrix) -> list[list[float | None]]:
    """Validates an accuracy matrix and returns it as lists of Python floats and None.

    Rules: at least one row and one column; all rows the same length; square when there is more
    than one row; entries are None or finite numbers in [0, 1]; on a square matrix every entry on
    or below the diagonal (tasks already seen) is present; a single row has at least one entry.
    Entries above the diagonal may be present (some runs evaluate unseen tasks too).
    """
    rows = [list(row) for row in acc_matrix]
    if not rows or not rows[0]:
        raise ValueError("accuracy matrix is empty; expected at least one row and one column")
    n_cols = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != n_cols:
            raise ValueError(
                f"accuracy matrix is ragged: row 0 has {n_cols} entries, row {i} has {len(row)}"
            )
    if len(rows) > 1 and len(rows) != n_cols:
        raise ValueError(
            f"accuracy matrix is {len(rows)}x{n_cols}; with more than one row it must be square "
            "(row i: after stage i, column j: task j)"
        )
    out: list[list[float | None]] = []
    for i, row in enumerate(rows):
        out_row: list[float | None] = []
        for j, x in enumerate(row):
            if x is None:
                if len(rows) > 1 and j <= i:
                    raise ValueError(
                        f"accuracy matrix entry [{i}][{j}] is None, but task {j} was seen by "
                        f"stage {i}; only entries above the diagonal may be None"
                    )
                out_row.append(None)
                continue
            if (
                not isinstance(x, numbers.Real)
                or isinstance(x, bool)
                or not math.isfinite(x)
                or not 0.0 <= x <= 1.0
            ):
                raise ValueError(
                    f"accuracy matrix entry [{i}][{j}] is {x!r}; expected None or a fraction in "
                    "[0, 1]"
                )
            out_row.append(float(x))
        out.append(out_row)
    if all(x is None for x in out[-1]):
        raise ValueError("accuracy matrix has no accuracies in its last row")
    return out


def average_accuracy(acc_matrix: AccMatrix) -> float:
    """Mean accuracy over tasks after the last stage: mean of the last row's non-None entries."""
    last = [x for x in check_acc_matrix(acc_matrix)[-1] if x is not None]
    return float(np.mean(last))


def backward_transfer(acc_matrix: AccMatrix) -> float:
    """BWT = mean over j < T of (a[T][j] - a[j][j]), T the last row (Lopez-Paz & Ranzato, 2017).

    Negative values are forgetting. Returns 0.0 for a single-row matrix (the ``joint`` baseline is
    trained once, so there is no earlier accuracy to compare with) and for a single task.
    """
    a = check_acc_matrix(acc_matrix)
    t = len(a) - 1
    if t == 0:
        return 0.0
    return float(np.mean([a[t][j] - a[j][j] for j in range(t)]))


def forgetting(acc_matrix: AccMatrix) -> float:
    """Mean over j < T of ``max_{j <= i < T} a[i][j] - a[T][j]`` (Chaudhry et al., 2018).

    How far each earlier task fell from its best accuracy before the last stage; >= 0 except
    where the last stage improved a task beyond every earlier row. 0.0 for a single row.
    """
    a = check_acc_matrix(acc_matrix)
    t = len(a) - 1
    if t == 0:
        return 0.0
    return float(np.mean([max(a[i][j] for i in range(j, t)) - a[t][j] for j in range(t)]))


def forward_transfer(acc_matrix: AccMatrix, zero_shot: Sequence[float]) -> float | None:
    """FWT = mean over j >= 1 of ``a[j-1][j] - zero_shot[j]`` (Lopez-Paz & Ranzato, 2017).

    How much learning tasks < j helped task j before it was trained on, against the frozen
    backbone. ``None`` where undefined: a single row, or a superdiagonal entry not evaluated.
    """
    a = check_acc_matrix(acc_matrix)
    if len(zero_shot) != len(a[0]):
        raise ValueError(
            f"zero-shot accuracies: {len(zero_shot)} entries, expected one per task ({len(a[0])})"
        )
    if len(a) == 1 or any(a[j - 1][j] is None for j in range(1, len(a))):
        return None
    return float(np.mean([a[j - 1][j] - zero_shot[j] for j in range(1, len(a))]))


def mean_finetuned_accuracy(acc_matrix: AccMatrix) -> float:
    """MFT: mean over j of ``a[j][j]``, each task right after it was learned (for one row,
    the row's mean)."""
    a = check_acc_matrix(acc_matrix)
    if len(a) == 1:
        return average_accuracy(a)
    return float(np.mean([a[j][j] for j in range(len(a))]))


def mean_average_accuracy(acc_matrix: AccMatrix) -> float:
    """MAA: mean over stages k of the mean over seen tasks ``j <= k`` of ``a[k][j]``.

    The mean final accuracy (MFN) is ``average_accuracy``."""
    a = check_acc_matrix(acc_matrix)
    if len(a) == 1:
        return average_accuracy(a)
    return float(np.mean([np.mean(a[k][: k + 1]) for k in range(len(a))]))


def accuracy(predictions: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of examples where the prediction equals the label.

    ``predictions`` are class indices with the shape of ``labels``, or scores with one more
    (class) axis, reduced by argmax. ``mask`` (bool, shape of ``labels``) selects the examples
    that count, e.g. to drop the padding of the last eval batch. Accepts numpy or JAX arrays.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(axis=-1)
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions shape {predictions.shape} does not match labels shape {labels.shape} "
            "(expected the same shape, or one extra class axis of scores)"
        )
    correct = predictions == labels
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != labels.shape:
            raise ValueError(f"mask shape {mask.shape} does not match labels shape {labels.shape}")
        correct = correct[mask]
    if correct.size == 0:
        raise ValueError("accuracy of zero examples is undefined (empty labels or all-False mask)")
    return float(correct.mean())
