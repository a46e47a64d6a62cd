"""Which definitions the answer metrics use: ``eval.metrics = "released" | "clean"``.

* ``"clean"``: ``mslora_jax.eval.answer_metrics`` (token-based, defined for every input).
* ``"released"``: ``mslora_jax.eval.released_metrics``, the released MSLoRA-CR evaluator's
  numbers (the paper's table), quirks included.

Both return the same metric names (fractions in [0, 1]), so a task's ``primary_metric`` means
the same score under either; what each name holds is documented in those two modules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from mslora_jax.data.answer_file import read_answer_file
from mslora_jax.errors import ConfigError, DataError
from mslora_jax.eval.answer_metrics import score_answers
from mslora_jax.eval.released_metrics import score_answers_released

METRIC_SETS = ("released", "clean")


def score_answers_as(
    metrics: str, preds: Sequence[str], refs: Sequence[Mapping[str, object]]
) -> dict[str, float]:
    """``score_answers`` (clean) or ``score_answers_released`` by the name ``metrics``."""
    if metrics == "clean":
        return score_answers(preds, refs)
    if metrics == "released":
        return score_answers_released(preds, refs)
    raise ConfigError(f"eval.metrics={metrics!r} is unknown; expected one of {METRIC_SETS}")


def score_answer_file(path: str | os.PathLike, metrics: str) -> dict[str, float]:
    """The ``metrics`` scores of an answer file (``data.answer_file``); DataError names it."""
    preds, refs = read_answer_file(path)
    try:
        return score_answers_as(metrics, preds, refs)
    except ConfigError:
        raise
    except ValueError as error:  # e.g. a record the clean metrics cannot score
        raise DataError(f"{path}: {error} (answers counted from 0, blank lines skipped)") from None
