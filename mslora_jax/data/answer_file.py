"""Reads an answer file: one JSON object per line, a model's answer beside the reference.

Accepts the released MSLoRA-CR / LLaVA-Med answer files (``results/<run>/<task>/
answer-file.jsonl``: the answer in ``text``, the reference in ``gt``) and ours (``answers/<method>/
<task>.jsonl`` of a generative run: the answer in ``answer``). Keys, first found wins, in the
released ``report_results.py``'s order: the answer ``text`` | ``prediction`` | ``answer``; the
reference ``gt`` | ``ground_truth``; ``answer_type`` OPEN or CLOSED (any case; missing: None,
which the released metrics read as OPEN and the clean ones refuse); ``candidates`` optional.
"""

from __future__ import annotations

import os
from typing import Any

from mslora_jax.data.vqa import ANSWER_TYPES, _id, _require, jsonl_records
from mslora_jax.errors import DataError

PREDICTION_KEYS = ("text", "prediction", "answer")
GT_KEYS = ("gt", "ground_truth")


def _first(record: dict, keys: tuple[str, ...], where: str) -> Any:
    for key in keys:
        if key in record:
            return _id(record[key], key, where)  # a string, or an integer as a string
    raise DataError(f"{where}: no {' / '.join(map(repr, keys))} key (record has {sorted(record)})")


def read_answer_file(path: str | os.PathLike) -> tuple[list[str], list[dict[str, Any]]]:
    """(predictions, refs) of an answer file; refs as ``score_answers_as`` takes them.

    Blank lines are skipped; a bad line raises ``DataError`` naming the file and line number.
    """
    preds: list[str] = []
    refs: list[dict[str, Any]] = []
    for _, where, record in jsonl_records(path):
        record = _require(record, (), where)
        answer_type = record.get("answer_type")
        if answer_type is not None:
            if not isinstance(answer_type, str) or answer_type.upper() not in ANSWER_TYPES:
                raise DataError(f"{where}: answer_type must be OPEN or CLOSED, got {answer_type!r}")
            answer_type = answer_type.upper()
        candidates = record.get("candidates") or None
        if candidates is not None and not (
            isinstance(candidates, list) and all(isinstance(c, str) for c in candidates)
        ):
            raise DataError(f"{where}: 'candidates' must be a list of strings, got {candidates!r}")
        preds.append(_first(record, PREDICTION_KEYS, where))
        refs.append(
            {
                "gt": _first(record, GT_KEYS, where),
                "answer_type": answer_type,
                "candidates": candidates,
            }
        )
    if not preds:
        raise DataError(f"{path}: the file holds no answers")
    return preds, refs
