"""The per-task metric table written beside results.json."""

import csv
import io
import json
import re

import pytest

from mslora_jax.errors import DataError
from mslora_jax.report.task_metrics import (
    ZERO_SHOT,
    format_task_metrics_csv,
    format_task_metrics_markdown,
    metric_names,
    validate_task_metrics,
    write_task_metrics,
)


def _report():
    tasks = [
        {"name": "vqa", "modality": "pathology", "primary_metric": "closed_accuracy"},
        {"name": "report", "modality": "radiology", "primary_metric": "bleu1"},
    ]
    closed = {"closed_accuracy": 0.5, "bleu1": 0.25, "num_closed": 4.0}
    open_only = {"closed_accuracy": None, "bleu1": 0.125, "num_closed": 0.0}
    return {
        "tasks": tasks,
        "zero_shot": [closed, open_only],
        "methods": {
            "seq": [[closed, None], [{**closed, "closed_accuracy": 0.75}, open_only]],
            "joint": [[closed, open_only]],
        },
    }


def test_markdown_has_primary_and_every_metric_after_the_last_stage():
    lines = format_task_metrics_markdown(_report()).splitlines()
    assert lines[0] == (
        "| method | task | primary metric | primary (%) | closed_accuracy | bleu1 | num_closed |"
    )
    assert lines[2] == f"| {ZERO_SHOT} | vqa | closed_accuracy | 50.0 | 50.0 | 25.0 | 4 |"
    # seq after its last stage: 75 % closed accuracy on vqa; report has no closed question.
    assert lines[4] == "| seq | vqa | closed_accuracy | 75.0 | 75.0 | 25.0 | 4 |"
    assert lines[5] == "| seq | report | bleu1 | 12.5 | – | 12.5 | 0 |"
    assert len(lines) == 2 + 2 * 3


def test_csv_holds_raw_values_and_empty_cells_for_undefined():
    rows = list(csv.reader(io.StringIO(format_task_metrics_csv(_report()))))
    assert rows[0] == [
        "method",
        "task",
        "modality",
        "primary_metric",
        "closed_accuracy",
        "bleu1",
        "num_closed",
    ]
    assert rows[4] == ["seq", "report", "radiology", "bleu1", "", "0.125", "0.0"]


def test_metric_names_put_counts_last():
    report = _report()
    report["zero_shot"][0] = {"num_closed": 1.0, "f1": 0.5}
    assert metric_names(report) == ["f1", "closed_accuracy", "bleu1", "num_closed"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("zero_shot"), "expected keys"),
        (lambda r: r["tasks"][0].pop("primary_metric"), "tasks'][0]"),
        (lambda r: r["zero_shot"].pop(), "one entry per task"),
        (lambda r: r["zero_shot"].__setitem__(1, None), "zero_shot'][1]"),
        (lambda r: r["methods"]["seq"][1][0].__setitem__("bleu1", 1.5), "'bleu1'"),
        (lambda r: r["methods"]["seq"][1][0].__setitem__("bleu1", float("nan")), "'bleu1'"),
        (lambda r: r["methods"].__setitem__("joint", []), "non-empty list of stages"),
    ],
)
def test_validation_names_the_bad_entry(mutate, message):
    report = _report()
    mutate(report)
    with pytest.raises(DataError, match=re.escape(message)):
        validate_task_metrics(report)


def test_write_is_all_or_nothing(tmp_path):
    paths = write_task_metrics(tmp_path, _report())
    assert json.loads(paths["task_metrics.json"].read_text()) == _report()
    before = {p: p.read_bytes() for p in paths.values()}
    bad = _report()
    bad["methods"]["seq"][0][0]["bleu1"] = -0.1
    with pytest.raises(DataError):
        write_task_metrics(tmp_path, bad)
    assert {p: p.read_bytes() for p in paths.values()} == before
