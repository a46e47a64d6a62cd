"""Turn task configs into ``TaskData`` and lay out one class table for a set of tasks."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np

from mslora_jax.config import ExperimentConfig, TaskConfig
from mslora_jax.data.medmnist import load_medmnist_task
from mslora_jax.data.synthetic import SyntheticTaskSpec, make_synthetic_task
from mslora_jax.data.task import TaskData
from mslora_jax.data.tfds_source import load_tfds_task
from mslora_jax.data.tokenizer import prompt


def load_task(task: TaskConfig, *, image_size: int, data_dir: str = "", seed: int = 0) -> TaskData:
    if task.source == "synthetic":
        spec = SyntheticTaskSpec(task.name, task.modality, task.num_classes, task.seed)
        return make_synthetic_task(
            spec,
            image_size=image_size,
            num_train=task.num_train,
            num_test=task.num_test,
            captions=task.captions,
        )
    if task.source == "tfds":
        return load_tfds_task(
            task.tfds_name,
            data_dir=tfds_data_dir(task, data_dir),
            name=task.name,
            modality=task.modality,
            class_names=task.class_names,
            train_split=task.train_split or "train",
            test_split=task.test_split or "test",
            image_key=task.image_key or "image",
            label_key=task.label_key or "label",
            image_size=image_size,
            max_train=task.max_train or None,
            max_test=task.max_test or None,
            seed=seed,
        )
    return load_medmnist_task(
        os.path.join(data_dir, task.file) if data_dir else task.file,
        name=task.name,
        modality=task.modality,
        class_names=list(task.class_names),
        labels=list(task.labels) or None,
        image_size=image_size,
        max_train=task.max_train or None,
        max_test=task.max_test or None,
        seed=seed,
    )


def tfds_data_dir(task: TaskConfig, data_dir: str = "") -> str | None:
    """A tfds task's TFDS data folder: ``tfds_data_dir`` relative to ``data_dir`` (an absolute
    one as is); None when both are unset (TFDS's default, ``~/tensorflow_datasets``)."""
    folder = os.path.join(data_dir, task.tfds_data_dir) if task.tfds_data_dir else data_dir
    return folder or None


def load_tasks(config: ExperimentConfig, tasks: Sequence[TaskConfig]) -> list[TaskData]:
    return [
        load_task(t, image_size=config.model.image_size, data_dir=config.data_dir, seed=config.seed)
        for t in tasks
    ]


@dataclasses.dataclass(frozen=True)
class ClassTable:
    """The prompts of every class of a list of tasks, concatenated in task order, then the
    distinct training captions of the captioned tasks.

    A task's local label ``y`` is global class ``offsets[task] + y``; training batches carry
    global labels so that one token table (and one compiled step) serves every stage. A
    captioned task's training example ``i`` is paired with its caption instead: its label is
    ``caption_rows[task][i]``, the table row of that caption (identical captions share a row, so
    the contrastive loss counts them as one positive).
    """

    tokens: np.ndarray  # [C_total + distinct captions, L] int32
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    caption_rows: tuple[np.ndarray | None, ...] = ()  # per task: [num_train] rows, or None

    def task_tokens(self, task: int, pad_to: int) -> tuple[np.ndarray, np.ndarray]:
        """A task's prompt tokens padded to ``pad_to`` rows, and the mask of real rows."""
        start, size = self.offsets[task], self.sizes[task]
        tokens = np.zeros((pad_to, self.tokens.shape[1]), np.int32)
        tokens[:size] = self.tokens[start : start + size]
        return tokens, np.arange(pad_to) < size

    def train_labels(self, task: int, labels: np.ndarray) -> np.ndarray:
        """What ``task``'s training examples are contrasted with: their caption's row for a
        captioned task, else their global class."""
        rows = self.caption_rows[task] if self.caption_rows else None
        return labels + self.offsets[task] if rows is None else rows


def class_table(
    tasks: Sequence[TaskData], template: str, encode: Callable[[Sequence[str]], np.ndarray]
) -> ClassTable:
    """The class prompts' and training captions' ids, ``encode(texts)``
    (``prompt_tokenizer.prompt_encoder``: the tokenizer the run's text tower reads)."""
    prompts = [prompt(template, t.modality, name) for t in tasks for name in t.class_names]
    sizes = tuple(t.num_classes for t in tasks)
    offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    texts = list(dict.fromkeys(c for t in tasks if t.has_captions for c in t.train_captions))
    row = {caption: len(prompts) + i for i, caption in enumerate(texts)}
    caption_rows = tuple(
        np.array([row[c] for c in t.train_captions], np.int32) if t.has_captions else None
        for t in tasks
    )
    return ClassTable(encode(prompts + texts), offsets, sizes, caption_rows)


def union_train_split(tasks: Sequence[TaskData], table: ClassTable, indices: Sequence[int]):
    """Train images and what each is contrasted with (``ClassTable.train_labels``: a global
    class, or a caption's row) of the tasks ``indices`` (one task or the joint union)."""
    images = np.concatenate([tasks[i].train_images for i in indices])
    labels = np.concatenate([table.train_labels(i, tasks[i].train_labels) for i in indices])
    return images, labels.astype(np.int32)
