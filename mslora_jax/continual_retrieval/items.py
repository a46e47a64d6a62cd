"""What the continual retrieval protocol indexes and asks, per task, and in which directions.

Label level, on any classification task (the usual content-based medical image retrieval
protocol): the database holds training images; image queries are test images and text queries
the class prompts; a database item is relevant to a query of the same class of the same task.
Keys are the run's *global* class ids (``ClassTable``: task offset + label), so in one unified
database a class of one task never matches a class of another.

Instance level, on captioned tasks: test images and their captions, each side indexed in turn;
an image and a caption are relevant to each other when the caption is the image's own, or the
same text (a caption describes every image it was written for alike).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mslora_jax.config import CAPTION_DIRECTIONS, LABEL_DIRECTIONS, RetrievalConfig
from mslora_jax.errors import DataError

# direction -> (what the queries are, what the database holds, the key that decides relevance);
# kinds: "gallery" (training images), "image" (test images), "prompt" (class prompts),
# "caption" (the test images' captions).
DIRECTION_KINDS = {
    "image_to_image": ("image", "gallery", "class"),
    "prompt_to_image": ("prompt", "gallery", "class"),
    "text_to_image": ("caption", "image", "caption"),
    "image_to_text": ("image", "caption", "caption"),
}


@dataclasses.dataclass(frozen=True)
class TaskItems:
    """One task's database items and queries; ``*_keys`` are global class ids, and
    ``caption_keys`` global ids of distinct caption texts (None without captions)."""

    gallery_images: np.ndarray
    gallery_keys: np.ndarray
    query_images: np.ndarray
    query_keys: np.ndarray
    prompt_keys: np.ndarray  # one text query per class, in label order
    captions: tuple[str, ...] | None = None  # of query_images
    caption_keys: np.ndarray | None = None

    def keys(self, kind: str, key: str) -> np.ndarray:
        """The keys of this task's items of ``kind`` under relevance ``key``."""
        if key == "caption":
            return self.caption_keys
        return {"gallery": self.gallery_keys, "image": self.query_keys,
                "prompt": self.prompt_keys}[kind]  # fmt: skip


def draw(count: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``limit`` of ``count`` items drawn without replacement (0: all)."""
    if limit == 0 or limit >= count:
        return np.arange(count)
    return np.sort(rng.choice(count, size=limit, replace=False))


def task_items(tasks, config: RetrievalConfig, seed: int) -> list[TaskItems]:
    """Each task's items (``tasks``: ``TaskData``). The draw depends on ``seed`` and the task
    only, so every method and every index policy is scored on the same items."""
    out, offset, caption_ids = [], 0, {}
    for index, task in enumerate(tasks):
        rng = np.random.default_rng([seed, index, 0x5EED])
        kept = draw(len(task.train_labels), config.gallery_per_task, rng)
        asked = draw(len(task.test_labels), config.queries_per_task, rng)
        captions = None
        if task.has_captions:
            captions = tuple(task.test_captions[i] for i in asked)
        keys = None
        if captions is not None:
            keys = np.array([caption_ids.setdefault((index, c), len(caption_ids))
                             for c in captions], np.int64)  # fmt: skip
        out.append(
            TaskItems(
                gallery_images=task.train_images[kept],
                gallery_keys=task.train_labels[kept].astype(np.int64) + offset,
                query_images=task.test_images[asked],
                query_keys=task.test_labels[asked].astype(np.int64) + offset,
                prompt_keys=np.arange(task.num_classes, dtype=np.int64) + offset,
                captions=captions,
                caption_keys=keys,
            )
        )
        offset += task.num_classes  # the class table's layout (data.registry.class_table)
    return out


def directions(tasks, config: RetrievalConfig) -> tuple[str, ...]:
    """The directions to evaluate: ``retrieval.directions``, or every one the stream supports
    (the caption directions when every task has captions). DataError naming the first task
    without captions when a caption direction is asked of it."""
    captioned = all(t.has_captions for t in tasks)
    if not config.directions:
        return LABEL_DIRECTIONS + (CAPTION_DIRECTIONS if captioned else ())
    asked = [d for d in config.directions if d in CAPTION_DIRECTIONS]
    if asked and not captioned:
        name = next(t.name for t in tasks if not t.has_captions)
        raise DataError(
            f"retrieval.directions asks for {asked}, but task {name!r} has no captions; drop "
            f"them or caption every task"
        )
    return tuple(config.directions)
