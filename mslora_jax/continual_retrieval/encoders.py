"""The encoder after each stage of one method, and the embeddings it gives, each computed once.

After stage k a method's encoder is the backbone with every adapter it has learned so far summed
(``Method.unified_slots`` over the tasks seen): the model a user deploys without a task id. For
a method with one adapter per task, the adapters of tasks <= j never change after stage j, so the
encoder that indexed task j can be rebuilt exactly at any later stage; a shared adapter (``seq``
and its baselines) is a different encoder after every stage, and rebuilding an old one needs that
stage's checkpoint.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from mslora_jax.continual_retrieval.items import TaskItems
from mslora_jax.errors import CheckpointError
from mslora_jax.retrieval.index import EncoderVersion
from mslora_jax.train.methods import Method
from mslora_jax.train.stream_experiment import StreamExperiment


def slots_after_stages(
    exp: StreamExperiment, method: Method, stage_adapters: list[dict]
) -> list[dict[int, dict]]:
    """The adapters by slot after each stage, from the adapter each stage trained (its stage
    checkpoint); a later stage's adapter replaces its slot's earlier one."""
    out, slots = [], {}
    for stage, adapter in enumerate(stage_adapters):
        slots = {**slots, method.slot(stage): exp.rules.place(adapter)}
        out.append(slots)
    return out


def encoder_slots(method: Method, num_tasks: int, stage: int) -> list[int]:
    """The slots the encoder after ``stage`` sums: every adapter learned by then."""
    seen = num_tasks if method.joint else stage + 1
    return method.unified_slots(seen)


class StageEncoders:
    """Embeddings of ``items`` by the encoder after each stage of ``method``.

    ``stage_adapters[k]``: the adapter stage k trained (its stage checkpoint). ``encoded``
    counts the items each kind of embedding encoded (what an index policy costs).
    """

    def __init__(
        self,
        exp: StreamExperiment,
        method: Method,
        stage_adapters: list[dict],
        items: list[TaskItems],
    ):
        self.exp, self.method, self.items = exp, method, items
        self.num_stages = method.num_stages(exp.num_tasks)
        if len(stage_adapters) != self.num_stages:
            raise CheckpointError(
                f"method {method.name!r}: {len(stage_adapters)} finished stages in its "
                f"checkpoints, expected {self.num_stages}; finish the run first"
            )
        self._slots = slots_after_stages(exp, method, stage_adapters)
        self._memo: dict[tuple, np.ndarray] = {}
        self.encoded: Counter = Counter()

    def seen(self, stage: int) -> list[int]:
        """The tasks in the database after ``stage`` (all of them for ``joint``)."""
        last = self.exp.num_tasks - 1 if self.method.joint else stage
        return list(range(last + 1))

    def index_stage(self, task: int) -> int:
        """The stage right after which ``task``'s items are first indexed."""
        return 0 if self.method.joint else task

    def active(self, stage: int) -> list[int]:
        """The adapter slots the encoder after ``stage`` sums."""
        return encoder_slots(self.method, self.exp.num_tasks, stage)

    def version(self, stage: int) -> EncoderVersion:
        return EncoderVersion(self.method.name, stage, tuple(self.active(stage)))

    def embed(self, kind: str, stage: int, task: int) -> np.ndarray:
        """``task``'s items of ``kind`` (``items.DIRECTION_KINDS``) embedded by the encoder
        after ``stage``; each computed once."""
        key = (kind, stage, task)
        if key not in self._memo:
            out = embed_items(self.exp, self._slots[stage], self.active(stage), self.items, task,
                              kind)  # fmt: skip
            self._memo[key] = out
            self.encoded[kind] += len(out)
        return self._memo[key]


def embed_items(
    exp: StreamExperiment, slots: dict, active: list[int], items: list[TaskItems], task: int,
    kind: str,
) -> np.ndarray:  # fmt: skip
    """``task``'s items of ``kind`` (``items.DIRECTION_KINDS``) embedded with the adapters
    ``active`` of ``slots`` (none: the frozen backbone)."""
    mine = items[task]
    if kind == "prompt":
        out = exp.embed_class_prompts(slots, active, task)
    elif kind == "caption":
        out = exp.embed_texts(slots, active, mine.captions)
    else:
        out = exp.embed_images(slots, active, mine.gallery_images if kind == "gallery"
                               else mine.query_images)  # fmt: skip
    return np.asarray(out, np.float32)
