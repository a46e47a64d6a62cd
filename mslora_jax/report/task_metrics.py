"""The per-task metric table written beside ``results.json``: every metric, not just the primary.

``results.json`` keeps one number per task and stage (the task's primary metric) so that average
accuracy and backward transfer are defined for every model. This report keeps all of them: for
the generative model that is LLaVA-Med's full set (exact match, closed accuracy, token P/R/F1,
BLEU-1..4, ...); for the dual encoder it is classification accuracy. Schema::

    {"tasks": [{"name": str, "modality": str, "primary_metric": str}, ...],
     "zero_shot": [{metric: value | null}, ...],          # frozen backbone, no adapter
     "methods": {"<method>": [[{metric: value | null} | null, ...], ...]},
                                                           # [stage][task]; null: not yet seen
     "answer_metrics": "released" | "clean"}              # optional (generative runs): whose
                                                           # definitions (``eval.metrics``)

Values are fractions in [0, 1], except counts whose names start with ``num_``; ``null`` marks a
metric that is undefined for the task (e.g. closed accuracy on a split with no closed question).
The Markdown and CSV tables show each method's metrics after its last stage, one row per
(method, task).
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
from pathlib import Path
from typing import Any

from mslora_jax.errors import DataError
from mslora_jax.eval.scoring import METRIC_SETS
from mslora_jax.io_utils import atomic_write_json, atomic_write_text
from mslora_jax.report.results import format_percent, md_escape

ZERO_SHOT = "(frozen backbone)"  # the table's row label for the model without adapters
_FILES = ("task_metrics.json", "task_metrics.md", "task_metrics.csv")
ANSWER_METRICS_NOTES = {
    "released": "the released MSLoRA-CR evaluator's definitions, as in the paper's table; "
    "P/R/F1 and BLEU over open questions only",
    "clean": "mslora_jax.eval.answer_metrics; P/R/F1 and BLEU over all questions",
}


def validate_task_metrics(obj: Any) -> None:
    """Raises ``DataError`` naming the first entry that breaks the schema above."""
    if not isinstance(obj, dict) or set(obj) - {"answer_metrics"} != {
        "tasks",
        "zero_shot",
        "methods",
    }:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            "task metrics: expected keys ['methods', 'tasks', 'zero_shot'] (and optionally "
            f"'answer_metrics'), got {keys}"
        )
    if obj.get("answer_metrics", "clean") not in METRIC_SETS:
        raise DataError(
            f"task metrics['answer_metrics']: is {obj['answer_metrics']!r}; expected one of "
            f"{METRIC_SETS}"
        )
    tasks = obj["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise DataError("task metrics['tasks']: expected a non-empty list")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or set(task) != {"name", "modality", "primary_metric"}:
            raise DataError(
                f"task metrics['tasks'][{i}]: expected keys ['modality', 'name', "
                f"'primary_metric'], got {task!r}"
            )
    _check_row(obj["zero_shot"], tasks, "task metrics['zero_shot']", allow_unseen=False)
    methods = obj["methods"]
    if not isinstance(methods, dict) or not methods:
        raise DataError("task metrics['methods']: expected a non-empty object")
    for name, stages in methods.items():
        where = f"task metrics['methods'][{name!r}]"
        if not isinstance(stages, list) or not stages:
            raise DataError(f"{where}: expected a non-empty list of stages")
        for s, row in enumerate(stages):
            _check_row(row, tasks, f"{where}[{s}]", allow_unseen=True)


def write_task_metrics(workdir: str | os.PathLike, report: dict[str, Any]) -> dict[str, Path]:
    """Validates ``report`` and writes task_metrics.json/.md/.csv atomically to ``workdir``."""
    validate_task_metrics(report)
    paths = {name: Path(workdir) / name for name in _FILES}
    atomic_write_json(paths["task_metrics.json"], report)
    atomic_write_text(paths["task_metrics.md"], format_task_metrics_markdown(report) + "\n")
    atomic_write_text(paths["task_metrics.csv"], format_task_metrics_csv(report))
    return paths


def metric_names(report: dict[str, Any]) -> list[str]:
    """Every metric name in the report, in first-seen order, counts (``num_*``) last."""
    seen: dict[str, None] = {}
    for row in [report["zero_shot"], *(stages[-1] for stages in report["methods"].values())]:
        for metrics in row:
            seen.update(dict.fromkeys(metrics or {}))
    return sorted(seen, key=lambda n: n.startswith("num_"))  # stable: keeps first-seen order


def final_rows(report: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """(method, task index, metrics) after each method's last stage, frozen backbone first."""
    out = [(ZERO_SHOT, t, m) for t, m in enumerate(report["zero_shot"])]
    for method, stages in report["methods"].items():
        out += [(method, t, m) for t, m in enumerate(stages[-1]) if m is not None]
    return out


def format_task_metrics_markdown(report: dict[str, Any]) -> str:
    """One row per (method, task): the primary metric, then every metric; percentages."""
    names = metric_names(report)
    tasks = report["tasks"]
    header = ["method", "task", "primary metric", "primary (%)", *names]
    align = ["---", "---", "---"] + ["---:"] * (len(header) - 3)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    if "answer_metrics" in report:
        note = ANSWER_METRICS_NOTES[report["answer_metrics"]]
        lines = [f"Answer metrics: {report['answer_metrics']} ({note}).", ""] + lines
    for method, t, metrics in final_rows(report):
        primary = tasks[t]["primary_metric"]
        cells = [
            md_escape(method),
            md_escape(tasks[t]["name"]),
            primary,
            _cell(primary, metrics.get(primary)),
            *(_cell(n, metrics.get(n)) for n in names),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_task_metrics_csv(report: dict[str, Any]) -> str:
    """The Markdown table's rows as CSV with raw values; an undefined metric is an empty cell."""
    names = metric_names(report)
    tasks = report["tasks"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "task", "modality", "primary_metric", *names])
    for method, t, metrics in final_rows(report):
        values = ["" if metrics.get(n) is None else repr(float(metrics[n])) for n in names]
        writer.writerow(
            [method, tasks[t]["name"], tasks[t]["modality"], tasks[t]["primary_metric"], *values]
        )
    return buf.getvalue()


def _cell(name: str, value: float | None) -> str:
    if value is None:
        return "–"
    return str(int(value)) if name.startswith("num_") else format_percent(value)


def _check_row(row: Any, tasks: list, where: str, *, allow_unseen: bool) -> None:
    if not isinstance(row, list) or len(row) != len(tasks):
        raise DataError(f"{where}: expected a list with one entry per task ({len(tasks)})")
    for t, metrics in enumerate(row):
        if metrics is None and allow_unseen:
            continue
        if not isinstance(metrics, dict) or not metrics:
            raise DataError(f"{where}[{t}]: expected an object of metric name -> value")
        for name, value in metrics.items():
            if value is None:
                continue
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and (name.startswith("num_") or 0 <= value <= 1)
            if not ok:
                raise DataError(
                    f"{where}[{t}][{name!r}]: is {value!r}; expected a fraction in [0, 1] or null"
                )
