"""Task-agnostic inference: choose a task's adapters from the input alone.

The paper's protocol evaluates task *j* with the adapters of tasks <= *j*, so it needs the task
id at test time. The router removes that need: it keeps, for every class of every task, the mean
of the **frozen** backbone's unit image embeddings over the task's training split (a nearest
class-mean classifier, as in prototype-based continual learning), and sends a test image to the
task of its nearest prototype (cosine similarity). Because the backbone is frozen, the
prototypes do not depend on the method or on the stage at which a task was learned: storing
them as each task arrives and building them at the end give the same router.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mslora_jax.errors import DataError


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


@dataclasses.dataclass(frozen=True)
class PrototypeRouter:
    """Unit prototypes ``[P, D]`` and the task each belongs to (``[P]`` ints)."""

    prototypes: np.ndarray
    tasks: np.ndarray

    def route(self, features: np.ndarray, among: Sequence[int] | None = None) -> np.ndarray:
        """The task of the nearest prototype of each row of ``features`` (``[N, D]``); with
        ``among``, of the nearest prototype of those tasks only (e.g. the tasks seen so far)."""
        if len(features) == 0:
            return np.zeros((0,), np.int64)
        scores = _unit(np.asarray(features, np.float64)) @ self.prototypes.T
        if among is not None:
            allowed = np.isin(self.tasks, np.asarray(among))
            if not allowed.any():
                raise DataError(f"route: no prototype belongs to the tasks {list(among)}")
            scores = np.where(allowed[None, :], scores, -np.inf)
        return self.tasks[np.argmax(scores, axis=-1)]


def fit_router(features: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> PrototypeRouter:
    """One prototype per (task, class present in its training split): the renormalized mean
    of the unit features of that class. ``features[t]`` is ``[N_t, D]``, ``labels[t]`` ``[N_t]``."""
    if len(features) != len(labels) or not features:
        raise DataError(
            f"fit_router: expected one (features, labels) pair per task, got {len(features)} "
            f"feature arrays and {len(labels)} label arrays"
        )
    prototypes, tasks = [], []
    for task, (x, y) in enumerate(zip(features, labels, strict=True)):
        x, y = _unit(np.asarray(x, np.float64)), np.asarray(y)
        if len(x) != len(y) or not len(x):
            raise DataError(
                f"fit_router: task {task} has {len(x)} feature rows and {len(y)} labels "
                "(need the same, non-zero number)"
            )
        for label in np.unique(y):
            prototypes.append(x[y == label].mean(axis=0))
            tasks.append(task)
    return PrototypeRouter(_unit(np.stack(prototypes)), np.asarray(tasks, np.int64))


def router_accuracy(routes: np.ndarray, task: int) -> float:
    """The fraction of ``task``'s test images routed to ``task``."""
    return float(np.mean(np.asarray(routes) == task)) if len(routes) else 0.0
