"""Which queries and results the gallery picture shows (``report.retrieval_gallery`` draws it):
for each task, its first image query and its first text query (a caption, else a class prompt),
each with its top results in the database after the last stage."""

from __future__ import annotations

import numpy as np

from mslora_jax.continual_retrieval.encoders import StageEncoders
from mslora_jax.continual_retrieval.items import DIRECTION_KINDS, directions, task_items
from mslora_jax.continual_retrieval.protocol import full_ranking, task_scores
from mslora_jax.data.tokenizer import prompt
from mslora_jax.report.retrieval_gallery import GalleryRow
from mslora_jax.train.checkpoints import load_stage_adapters

PREFERRED_METHOD = "mslora_cr_ortho"  # the paper's method, when the run has it


def _image(items, kind: str, row: int) -> np.ndarray:
    return (items.gallery_images if kind == "gallery" else items.query_images)[row]


def gallery_rows(
    encoders: StageEncoders, policy: str, gallery: str, directions, k: int = 5
) -> list[GalleryRow]:
    """Per task, one query of each of ``directions`` whose database holds images (image and
    text queries of images), with its top ``k`` under ``policy`` after the last stage."""
    stage = encoders.num_stages - 1
    rows = []
    for task in encoders.seen(stage):
        for direction in directions:
            query_kind, database_kind, key = DIRECTION_KINDS[direction]
            if database_kind == "caption":
                continue  # a picture of results needs image results
            scores, keys = task_scores(encoders, policy, gallery, direction, stage, task)
            ranking = full_ranking(scores[:1])[0, :k]
            parts = [task] if gallery == "task" else encoders.seen(stage)
            sizes = np.cumsum([0] + [len(encoders.items[p].keys(database_kind, key))
                                     for p in parts])  # fmt: skip
            items = encoders.items[task]
            wanted = items.keys(query_kind, key)[0]
            results = []
            for column in ranking[ranking >= 0]:
                part = int(np.searchsorted(sizes, column, side="right")) - 1
                image = _image(encoders.items[parts[part]], database_kind, column - sizes[part])
                results.append((image, bool(keys[column] == wanted), float(scores[0, column])))
            name = encoders.exp.tasks[task].name
            text = None
            if query_kind == "prompt":
                data = encoders.exp.tasks[task]
                text = prompt(encoders.exp.config.prompt_template, data.modality,
                              data.class_names[0])  # fmt: skip
            elif query_kind == "caption":
                text = items.captions[0]
            image = None if text is not None else items.query_images[0]
            rows.append(GalleryRow(f"{name}: {direction.replace('_', ' ')}", image, text, results))
    return rows


def run_gallery(exp, workdir, method_names, config) -> tuple[str, list[GalleryRow]]:
    """(title, rows) of a finished run's gallery: the paper's method if the run has it (else
    its first), ``versioned`` if asked (else the first policy), the unified database if asked."""
    method = PREFERRED_METHOD if PREFERRED_METHOD in method_names else method_names[0]
    policy = "versioned" if "versioned" in config.index_policy else config.index_policy[0]
    gallery = "unified" if "unified" in config.galleries else config.galleries[0]
    items = task_items(exp.tasks, config, exp.config.seed)
    adapters = [adapter for _, adapter in load_stage_adapters(workdir, method)]
    encoders = StageEncoders(exp, exp.method(method), adapters, items)
    asked = directions(exp.tasks, config)
    # One image query and one text query per task: captions when the stream has them.
    text = "text_to_image" if "text_to_image" in asked else "prompt_to_image"
    shown = tuple(d for d in ("image_to_image", text) if d in asked)
    rows = gallery_rows(encoders, policy, gallery, shown)
    title = (f"{method}, {policy} index, {gallery} database after the last stage: top 5 "
             "(green: relevant)")  # fmt: skip
    return title, rows
