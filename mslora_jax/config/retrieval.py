"""``RetrievalConfig``: the continual retrieval protocol run after the methods (``retrieval.*``).

After every stage of every method the database holds the items of the tasks seen so far; the
index policies say which encoder embedded each stored item and which one embeds a query
(``mslora_jax.continual_retrieval``, docs/retrieval.md).
"""

from __future__ import annotations

import dataclasses

from mslora_jax.errors import ConfigError

# reindex: every stored item re-encoded after each stage (backfilling); keep: each task's items
# encoded once, right after its own stage (Wang et al.'s "no reindexing"), queries by the newest
# encoder; versioned: as keep, and each part of the database is queried with the encoder that
# indexed it; versioned_routed: as versioned, the part chosen by the prototype router alone.
INDEX_POLICIES = ("reindex", "keep", "versioned", "versioned_routed")
# task: each task's own database (task-incremental); unified: one database of every task seen.
GALLERIES = ("task", "unified")
# Label level (any classification task; same class of the same task is relevant):
# image_to_image, test images against the indexed training images; prompt_to_image, each class
# prompt against them. Instance level (captioned tasks; an image and a caption are relevant to
# each other when it is that image's caption): text_to_image, test captions against the indexed
# test images; image_to_text, test images against the indexed test captions.
LABEL_DIRECTIONS = ("image_to_image", "prompt_to_image")
CAPTION_DIRECTIONS = ("text_to_image", "image_to_text")
DIRECTIONS = LABEL_DIRECTIONS + CAPTION_DIRECTIONS


def _check_choices(key: str, values: tuple[str, ...], known: tuple[str, ...]) -> None:
    if not values:
        raise ConfigError(f"retrieval.{key} is empty; choose from {known}")
    unknown = [v for v in values if v not in known]
    if unknown or len(set(values)) != len(values):
        what = f"unknown {unknown}" if unknown else "repeated entries"
        raise ConfigError(f"retrieval.{key}={list(values)}: {what}; choose from {known}")


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """Which retrieval evaluations a run adds after training (``enabled``), and on what data."""

    enabled: bool = False
    index_policy: tuple[str, ...] = INDEX_POLICIES
    galleries: tuple[str, ...] = GALLERIES
    # Empty: every direction the stream supports (the caption ones when every task has captions).
    directions: tuple[str, ...] = ()
    # Items indexed per task, drawn from its training split (0: all of it), and image queries
    # per task, drawn from its test split (0: all of it); the same draw for every method.
    gallery_per_task: int = 0
    queries_per_task: int = 0

    def __post_init__(self):
        _check_choices("index_policy", self.index_policy, INDEX_POLICIES)
        _check_choices("galleries", self.galleries, GALLERIES)
        if self.directions:
            _check_choices("directions", self.directions, DIRECTIONS)
        for key in ("gallery_per_task", "queries_per_task"):
            if getattr(self, key) < 0:
                raise ConfigError(f"retrieval.{key}={getattr(self, key)}: expected >= 0 (0: all)")
