"""What the continual retrieval protocol indexes and asks, per task.

Label-level retrieval on classification tasks (the usual content-based medical image retrieval
protocol): the database holds training images, image queries are test images, text queries are
the class prompts, and a database item is relevant to a query of the same class of the same
task. Keys are the run's *global* class ids (``ClassTable``: task offset + label), so in one
unified database a class of one task never matches a class of another.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mslora_jax.config import RetrievalConfig


@dataclasses.dataclass(frozen=True)
class TaskItems:
    """One task's database items and queries; ``*_keys`` are global class ids."""

    gallery_images: np.ndarray
    gallery_keys: np.ndarray
    query_images: np.ndarray
    query_keys: np.ndarray
    prompt_keys: np.ndarray  # one text query per class, in label order


def draw(count: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``limit`` of ``count`` items drawn without replacement (0: all)."""
    if limit == 0 or limit >= count:
        return np.arange(count)
    return np.sort(rng.choice(count, size=limit, replace=False))


def task_items(tasks, config: RetrievalConfig, seed: int) -> list[TaskItems]:
    """Each task's items (``tasks``: ``TaskData``). The draw depends on ``seed`` and the task
    only, so every method and every index policy is scored on the same items."""
    out, offset = [], 0
    for index, task in enumerate(tasks):
        rng = np.random.default_rng([seed, index, 0x5EED])
        kept = draw(len(task.train_labels), config.gallery_per_task, rng)
        asked = draw(len(task.test_labels), config.queries_per_task, rng)
        out.append(
            TaskItems(
                gallery_images=task.train_images[kept],
                gallery_keys=task.train_labels[kept].astype(np.int64) + offset,
                query_images=task.test_images[asked],
                query_keys=task.test_labels[asked].astype(np.int64) + offset,
                prompt_keys=np.arange(task.num_classes, dtype=np.int64) + offset,
            )
        )
        offset += task.num_classes  # the class table's layout (data.registry.class_table)
    return out
