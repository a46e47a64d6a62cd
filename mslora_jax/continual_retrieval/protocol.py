"""The continual retrieval protocol: after every stage k of a method, the database holds the
items of the tasks seen so far, and every index policy, gallery and direction gives a matrix
``R[k][j]`` of each metric on task j, with its average, backward transfer and forgetting (the
accuracy matrices' definitions, ``eval.metrics``).

Which encoder embeds what (``policy_stages``; "the encoder after stage s" is
``encoders.StageEncoders``'s):

- ``reindex``: stored items and queries by the encoder after stage k (every item re-encoded);
- ``keep``: task j's items by the encoder after stage j, never again; queries after stage k;
- ``versioned``: as ``keep``, and each task's part of the database is searched with the query
  embedded by the encoder that indexed that part. In a unified database the query is embedded
  once per part and the parts' scores are merged (one query encoding per version searched);
- ``versioned_routed``: as ``versioned`` in a unified database, but the prototype router
  (``eval.router``, frozen features) picks the one part a query searches (one encoding, plus
  the frozen backbone's for the router); a wrong route finds nothing of that query's.

Rankings are full (every database item ranked), so mAP counts every relevant item.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from mslora_jax.config import LABEL_DIRECTIONS, RetrievalConfig
from mslora_jax.continual_retrieval.encoders import StageEncoders, embed_items
from mslora_jax.continual_retrieval.items import (
    DIRECTION_KINDS,
    TaskItems,
    directions,
    task_items,
)
from mslora_jax.errors import DataError
from mslora_jax.eval import metrics
from mslora_jax.eval.router import PrototypeRouter, fit_router
from mslora_jax.retrieval.metrics import ranking_metrics
from mslora_jax.train.checkpoints import load_stage_adapters
from mslora_jax.train.stream_experiment import StreamExperiment

log = logging.getLogger(__name__)

METRICS = ("map", "map@r", "precision@10", "recall@1", "recall@5", "recall@10", "mrr")


def policy_stages(encoders: StageEncoders, policy: str, stage: int, part: int) -> tuple[int, int]:
    """(stage of the query's encoder, stage of the encoder of ``part``'s stored items) when the
    database after ``stage`` is searched under ``policy``."""
    if policy == "reindex":
        return stage, stage
    indexed = encoders.index_stage(part)
    return (stage, indexed) if policy == "keep" else (indexed, indexed)


def full_ranking(scores: np.ndarray) -> np.ndarray:
    """Every column of ``scores`` (``[Q, N]``) ranked best first, ties to the lower column;
    columns scored ``-inf`` (never searched) are left out as ``-1``."""
    order = np.argsort(-scores, axis=1, kind="stable")
    searched = np.isfinite(np.take_along_axis(scores, order, axis=1))
    return np.where(searched, order, -1)


def task_scores(
    encoders: StageEncoders,
    policy: str,
    gallery: str,
    direction: str,
    stage: int,
    task: int,
    routes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores ``[Q, N]``, database keys ``[N]``) of ``task``'s queries against the database
    after ``stage``: ``task``'s own items (``gallery="task"``) or every seen task's."""
    query_kind, database_kind, key = DIRECTION_KINDS[direction]
    parts = [task] if gallery == "task" else encoders.seen(stage)
    blocks, keys = [], []
    for part in parts:
        query_stage, part_stage = policy_stages(encoders, policy, stage, part)
        queries = encoders.embed(query_kind, query_stage, task)
        block = queries @ encoders.embed(database_kind, part_stage, part).T
        if routes is not None:
            block = np.where((routes == part)[:, None], block, -np.inf)
        blocks.append(block)
        keys.append(encoders.items[part].keys(database_kind, key))
    return np.concatenate(blocks, axis=1), np.concatenate(keys)


def stage_metrics(encoders, policy, gallery, direction, stage, task, routes=None) -> dict:
    """Every metric of ``task``'s queries against the database after ``stage``."""
    scores, keys = task_scores(encoders, policy, gallery, direction, stage, task, routes)
    query_kind, _, key = DIRECTION_KINDS[direction]
    asked = encoders.items[task].keys(query_kind, key)
    found = ranking_metrics(full_ranking(scores), asked, keys)
    if found["queries"] == 0:
        raise DataError(
            f"retrieval: no {direction} query of task {encoders.exp.tasks[task].name!r} has a "
            "relevant item in the database; raise retrieval.gallery_per_task"
        )
    return found


def summarize(matrix: list[list[float | None]]) -> dict:
    """A matrix with its average (last row), backward transfer and forgetting."""
    return {
        "matrix": matrix,
        "avg": metrics.average_accuracy(matrix),
        "bwt": metrics.backward_transfer(matrix),
        "forgetting": metrics.forgetting(matrix),
    }


class Router:
    """The prototype router over the database's frozen image features, routing a query among
    the tasks seen so far (``versioned_routed``)."""

    def __init__(self, exp: StreamExperiment, items: list[TaskItems]):
        self.exp, self.items = exp, items
        frozen = [exp.embed_images({}, [], t.gallery_images) for t in items]
        self.router: PrototypeRouter = fit_router(frozen, [t.gallery_keys for t in items])
        self._features: dict[tuple[str, int], np.ndarray] = {}

    def _frozen(self, kind: str, task: int) -> np.ndarray:
        """The frozen backbone's embeddings of ``task``'s queries of ``kind`` (a text query is
        routed by its text embedding against the image prototypes: the backbone's shared
        image-text space)."""
        if (kind, task) not in self._features:
            self._features[(kind, task)] = embed_items(self.exp, {}, [], self.items, task, kind)
        return self._features[(kind, task)]

    def routes(self, direction: str, task: int, seen: list[int]) -> np.ndarray:
        return self.router.route(self._frozen(DIRECTION_KINDS[direction][0], task), among=seen)


def evaluate_method(
    encoders: StageEncoders,
    config: RetrievalConfig,
    router: Router | None = None,
    directions: tuple[str, ...] = LABEL_DIRECTIONS,
) -> dict:
    """Every configured matrix of one method over ``directions``, with each policy's cost."""
    results: dict = {}
    for policy in config.index_policy:
        for gallery in config.galleries:
            if policy == "versioned_routed" and gallery == "task":
                continue  # a task's own database has one version: routing has nothing to pick
            for direction in directions:
                rows = []
                for stage in range(encoders.num_stages):
                    seen = encoders.seen(stage)
                    row: list[dict | None] = [None] * encoders.exp.num_tasks
                    for task in seen:
                        routes = None
                        if policy == "versioned_routed":
                            routes = router.routes(direction, task, seen)
                        row[task] = stage_metrics(
                            encoders, policy, gallery, direction, stage, task, routes
                        )
                    rows.append(row)
                where = results.setdefault(policy, {}).setdefault(gallery, {})
                where[direction] = {
                    name: summarize([[None if m is None else m[name] for m in r] for r in rows])
                    for name in METRICS
                }
    return {"policies": results, "cost": policy_costs(encoders, config)}


def policy_costs(encoders: StageEncoders, config: RetrievalConfig) -> dict:
    """What each policy costs over the stream: database items encoded, query encodings per
    query after the last stage (unified database), and encoder versions that must be kept.

    ``extra_adapter_copies``: adapters kept only to rebuild an old encoder; none for a method
    whose per-task adapters never change after their stage, one per older version otherwise."""
    sizes = [len(t.gallery_keys) for t in encoders.items]
    last = encoders.num_stages - 1
    versions = len({encoders.index_stage(t) for t in encoders.seen(last)})
    once = sum(sizes)
    every_stage = sum(sizes[t] for k in range(encoders.num_stages) for t in encoders.seen(k))
    method = encoders.method
    frozen_adapters = method.per_task_adapters and method.task_slots is None
    costs = {
        "reindex": {"items_encoded": every_stage, "query_encodings": 1, "encoder_versions": 1},
        "keep": {"items_encoded": once, "query_encodings": 1, "encoder_versions": 1},
        "versioned": {"items_encoded": once, "query_encodings": versions,
                      "encoder_versions": versions},
        "versioned_routed": {"items_encoded": once, "query_encodings": 1,
                             "router_encodings": 1, "encoder_versions": versions},
    }  # fmt: skip
    extra = 0 if frozen_adapters else versions - 1
    for policy in ("versioned", "versioned_routed"):
        costs[policy]["extra_adapter_copies"] = extra
    return {policy: costs[policy] for policy in config.index_policy}


def evaluate_run(
    exp: StreamExperiment, workdir: str | os.PathLike, method_names, config: RetrievalConfig
) -> dict:
    """``results['retrieval']`` of a finished run: every method's matrices, from its stage
    checkpoints under ``workdir``, on the same items (drawn with the run's seed)."""
    items = task_items(exp.tasks, config, exp.config.seed)
    asked = directions(exp.tasks, config)
    router = Router(exp, items) if "versioned_routed" in config.index_policy else None
    out: dict = {
        "settings": {
            "relevance": "same class of the same task (label level)",
            "database": "training images",
            "image_queries": "test images",
            "text_queries": "class prompts; captions of the test images (instance level)",
            "directions": list(asked),
            "database_items": [len(t.gallery_keys) for t in items],
            "image_queries_per_task": [len(t.query_keys) for t in items],
            "encoder": "after stage k: the backbone plus every adapter learned so far",
        },
        "methods": {},
    }
    if router is not None:
        out["router_acc"] = [
            float(np.mean(router.routes("image_to_image", task, list(range(len(items)))) == task))
            for task in range(len(items))
        ]
    for name in method_names:
        adapters = [adapter for _, adapter in load_stage_adapters(workdir, name)]
        encoders = StageEncoders(exp, exp.method(name), adapters, items)
        out["methods"][name] = evaluate_method(encoders, config, router, asked)
        log.info("retrieval %s: %d items and queries encoded", name, sum(encoders.encoded.values()))
    return out
