"""The ``results.json`` schema and the reports built from it (Markdown, CSV, heatmaps).

Schema (accuracies are fractions in [0, 1]; ``None``/``null`` marks a task not yet seen)::

    {"tasks": [{"name": str, "modality": str}, ...],
     "methods": {"<method>": {
         "acc_matrix": [[float | null, ...], ...],  # row i: after stage i, column j: task j
         "avg_acc": float, "bwt": float,             # derived from acc_matrix
         "unified_acc": [float, ...],                # one per task
         "unified_avg_acc": float,                   # mean of unified_acc
         "train_steps_per_s": float,
         # derived too; optional so results of older runs still load:
         "forgetting": float, "fwt": float | null,   # null: no superdiagonal (e.g. joint)
         "mft": float, "mfn": float, "maa": float}},
     "backbone": {...}}                              # optional, free-form (zero-shot acc, ...)

Unknown keys are rejected, so a typo cannot silently drop a field. The ``joint`` baseline has a
one-row ``acc_matrix`` and therefore ``bwt == 0.0`` (see ``metrics.backward_transfer``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mslora_jax.errors import DataError
from mslora_jax.eval import metrics
from mslora_jax.io_utils import atomic_savefig, atomic_write_json, atomic_write_text
from mslora_jax.report.retrieval_results import (
    format_retrieval,
    retrieval_heatmap_results,
    validate_retrieval,
)

METHOD_KEYS = (
    "acc_matrix",
    "avg_acc",
    "bwt",
    "unified_acc",
    "unified_avg_acc",
    "train_steps_per_s",
)
# Keys newer runs add; checked when present (see ``_derived``).
OPTIONAL_METHOD_KEYS = ("forgetting", "fwt", "mft", "mfn", "maa", "routed_acc", "routed_avg_acc")
# Free-form extras: "backbone" describes the frozen backbone (source, zero-shot accuracy, ...).
# "retrieval": the continual retrieval protocol's matrices (``report.retrieval_results``).
OPTIONAL_TOP_KEYS = ("backbone", "retrieval")
# Tolerance when checking that the stored derived numbers match the ones recomputed from the matrix.
_DERIVED_ATOL = 1e-6


def method_summary(
    acc_matrix: metrics.AccMatrix,
    unified_acc: Sequence[float],
    train_steps_per_s: float,
    zero_shot: Sequence[float] | None = None,
    routed_acc: Sequence[float] | None = None,
) -> dict[str, Any]:
    """One method's entry of ``results["methods"]``, with the derived metrics computed.

    ``zero_shot``: the frozen backbone's accuracy per task, for forward transfer (``fwt`` is
    left out without it). ``routed_acc``: accuracy per task under task-agnostic routing
    (``routed_*`` left out without it)."""
    unified = _check_fractions(unified_acc, "unified_acc")
    matrix = metrics.check_acc_matrix(acc_matrix)
    summary = {
        "acc_matrix": matrix,
        **_derived(matrix, zero_shot),
        "unified_acc": unified,
        "unified_avg_acc": float(np.mean(unified)),
        "train_steps_per_s": float(train_steps_per_s),
    }
    if routed_acc is not None:
        routed = _check_fractions(routed_acc, "routed_acc")
        summary |= {"routed_acc": routed, "routed_avg_acc": float(np.mean(routed))}
    return summary


def _derived(matrix: metrics.AccMatrix, zero_shot: Sequence[float] | None) -> dict[str, Any]:
    """Every metric computed from the accuracy matrix (``fwt`` only with ``zero_shot``)."""
    derived = {
        "avg_acc": metrics.average_accuracy(matrix),
        "bwt": metrics.backward_transfer(matrix),
        "forgetting": metrics.forgetting(matrix),
        "mft": metrics.mean_finetuned_accuracy(matrix),
        "mfn": metrics.average_accuracy(matrix),
        "maa": metrics.mean_average_accuracy(matrix),
    }
    if zero_shot is not None:
        derived["fwt"] = metrics.forward_transfer(matrix, zero_shot)
    return derived


def validate_results(obj: Any) -> None:
    """Raises ``DataError`` (a ValueError) naming the first key that breaks the schema."""
    if not isinstance(obj, dict) or set(obj) - set(OPTIONAL_TOP_KEYS) != {"tasks", "methods"}:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            f"results: expected an object with keys ['methods', 'tasks'] (optionally "
            f"{list(OPTIONAL_TOP_KEYS)}), got {keys}"
        )
    if not isinstance(obj.get("backbone", {}), dict):
        raise DataError("results['backbone']: expected an object")
    tasks = obj["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise DataError("results['tasks']: expected a non-empty list")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or set(task) != {"name", "modality"}:
            raise DataError(
                f"results['tasks'][{i}]: expected keys ['modality', 'name'], got {task!r}"
            )
        for key in ("name", "modality"):
            if not isinstance(task[key], str) or not task[key]:
                raise DataError(f"results['tasks'][{i}]['{key}']: expected a non-empty string")
    names = [t["name"] for t in tasks]
    if len(set(names)) != len(names):
        raise DataError(f"results['tasks']: task names must be unique, got {names}")

    methods = obj["methods"]
    if not isinstance(methods, dict) or not methods:
        raise DataError("results['methods']: expected a non-empty object of method name -> entry")
    for name, entry in methods.items():
        where = f"results['methods'][{name!r}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        known = set(METHOD_KEYS) | set(OPTIONAL_METHOD_KEYS)
        missing, unknown = set(METHOD_KEYS) - set(entry), set(entry) - known
        if missing or unknown:
            raise DataError(
                f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
            )
        try:
            matrix = metrics.check_acc_matrix(entry["acc_matrix"])
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}['acc_matrix']: {e}") from e
        if len(matrix[0]) != len(tasks):
            raise DataError(
                f"{where}['acc_matrix']: has {len(matrix[0])} columns, expected one per task "
                f"({len(tasks)})"
            )
        unified = _check_fractions(entry["unified_acc"], f"{where}['unified_acc']")
        if len(unified) != len(tasks):
            raise DataError(
                f"{where}['unified_acc']: has {len(unified)} entries, expected {len(tasks)}"
            )
        zero_shot = obj.get("backbone", {}).get("zero_shot_acc")
        if zero_shot is not None:
            zero_shot = _check_fractions(zero_shot, "results['backbone']['zero_shot_acc']")
            if len(zero_shot) != len(tasks):
                raise DataError(
                    f"results['backbone']['zero_shot_acc']: has {len(zero_shot)} entries, "
                    f"expected {len(tasks)}"
                )
        expected = {**_derived(matrix, zero_shot), "unified_avg_acc": float(np.mean(unified))}
        if "routed_acc" in entry or "routed_avg_acc" in entry:
            routed = _check_fractions(entry.get("routed_acc"), f"{where}['routed_acc']")
            if len(routed) != len(tasks):
                raise DataError(
                    f"{where}['routed_acc']: has {len(routed)} entries, expected {len(tasks)}"
                )
            expected["routed_avg_acc"] = float(np.mean(routed))
            if "routed_avg_acc" not in entry:
                raise DataError(f"{where}: has 'routed_acc' but no 'routed_avg_acc'")
        for key, value in expected.items():
            if key not in entry:  # an optional key older runs did not write
                continue
            got = entry[key]
            if value is None:
                if got is not None:
                    raise DataError(f"{where}['{key}']: is {got!r}, but the data leave it null")
            elif not is_number(got) or abs(got - value) > _DERIVED_ATOL:
                raise DataError(f"{where}['{key}']: is {got!r}, but the data give {value:.6f}")
        if "fwt" in entry and zero_shot is None:
            raise DataError(f"{where}['fwt']: needs results['backbone']['zero_shot_acc']")
        speed = entry["train_steps_per_s"]
        if not is_number(speed) or speed < 0:
            raise DataError(
                f"{where}['train_steps_per_s']: expected a finite number >= 0, got {speed!r}"
            )
    if "retrieval" in obj:
        validate_retrieval(obj["retrieval"], len(tasks))


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates a ``results.json``; errors name the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        obj = json.loads(text, parse_constant=_reject_constant)
        validate_results(obj)
    except (OSError, ValueError) as e:
        raise DataError(f"{os.fspath(path)}: {e}") from e
    return obj


def write_results(workdir: str | os.PathLike, results: dict[str, Any]) -> dict[str, Path]:
    """Validates ``results`` and writes results.json/.md/.csv and acc_matrices.png to ``workdir``.

    Every file is written atomically, and nothing is written unless ``results`` is valid.
    Returns the paths written, keyed by file name.
    """
    validate_results(results)
    workdir = Path(workdir)
    paths = {
        n: workdir / n for n in ("results.json", "results.md", "results.csv", "acc_matrices.png")
    }
    atomic_write_json(paths["results.json"], results)
    atomic_write_text(paths["results.md"], format_report(results) + "\n")
    atomic_write_text(paths["results.csv"], format_csv(results))
    atomic_savefig(plot_acc_matrices(results), paths["acc_matrices.png"], dpi=150)
    if "retrieval" in results:
        paths["retrieval_matrices.png"] = workdir / "retrieval_matrices.png"
        atomic_savefig(plot_retrieval_matrices(results), paths["retrieval_matrices.png"], dpi=120)
    return paths


def plot_retrieval_matrices(results: dict[str, Any]) -> Figure:
    """The retrieval mAP matrices (one panel per method and index policy) of the unified
    database, else the first one, for the first direction."""
    first = next(iter(results["retrieval"]["methods"].values()))["policies"]
    galleries = {g for by_gallery in first.values() for g in by_gallery}
    gallery = "unified" if "unified" in galleries else sorted(galleries)[0]
    direction = next(d for by_gallery in first.values() for d in by_gallery.get(gallery, {}))
    panels = retrieval_heatmap_results(results, gallery, direction)
    label = f"mAP, {direction.replace('_', ' ')}, {gallery} database"
    return plot_acc_matrices(panels, label=label)


# Summary columns of the tables: key, Markdown header, whether it is a fraction shown in percent.
_TABLE_COLUMNS = (
    ("avg_acc", "avg acc (%)", True),
    ("bwt", "BWT (pp)", True),
    ("forgetting", "forgetting (pp)", True),
    ("fwt", "FWT (pp)", True),
    ("mft", "MFT (%)", True),
    ("maa", "MAA (%)", True),
    ("unified_avg_acc", "unified avg acc (%)", True),
    ("routed_avg_acc", "routed avg acc (%)", True),
    ("train_steps_per_s", "steps/s", False),
)


def _columns(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The summary columns some method of ``results`` has (older runs lack the newer ones)."""
    entries = results["methods"].values()
    return [c for c in _TABLE_COLUMNS if any(c[0] in m for m in entries)]


def format_markdown_table(results: dict[str, Any]) -> str:
    """One row per method: summary metrics, then each task's accuracy after the last stage.

    Accuracies are percentages with one decimal; BWT, forgetting and FWT are in percentage
    points (MFN is avg acc). A metric a method leaves undefined is a dash.
    """
    names = [md_escape(t["name"]) for t in results["tasks"]]
    columns = _columns(results)
    header = ["method", *(c[1] for c in columns), *names]
    align = ["---"] + ["---:"] * (len(header) - 1)  # numbers right-aligned
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for method, m in results["methods"].items():
        cells = []
        for key, _, percent in columns:
            value = m.get(key)
            cells.append(format_percent(value) if percent or value is None else f"{value:.2f}")
        row = [md_escape(method), *cells, *(format_percent(x) for x in m["acc_matrix"][-1])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_report(results: dict[str, Any]) -> str:
    """``results.md``: the table, then the router's accuracy when there is one."""
    parts = [format_markdown_table(results), format_router(results), format_retrieval(results)]
    return "\n\n".join(filter(None, parts))


def format_router(results: dict[str, Any]) -> str:
    """A line with the share of each task's test inputs the router sends to that task ("" for
    results without a router)."""
    accuracy = results.get("backbone", {}).get("router_acc")
    if not accuracy:
        return ""
    cells = ", ".join(
        f"{md_escape(t['name'])} {format_percent(x)}"
        for t, x in zip(results["tasks"], accuracy, strict=True)
    )
    return f"Router accuracy (test inputs routed to their own task, %): {cells}."


def format_csv(results: dict[str, Any]) -> str:
    """The Markdown table's columns as CSV, with raw fractions; an undefined metric or an
    unseen task is an empty cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    keys = [c[0] for c in _columns(results)]
    writer.writerow(["method", *keys, *(t["name"] for t in results["tasks"])])
    cell = lambda x: "" if x is None else repr(float(x))
    for method, m in results["methods"].items():
        final = [cell(x) for x in m["acc_matrix"][-1]]
        writer.writerow([method, *(cell(m.get(k)) for k in keys), *final])
    return buf.getvalue()


def plot_acc_matrices(results: dict[str, Any], label: str = "accuracy") -> Figure:
    """One annotated heatmap per method on a shared 0-1 colour scale; unseen cells stay blank."""
    tasks = [f"{t['name']}\n({t['modality']})" for t in results["tasks"]]
    methods = list(results["methods"].items())
    n_cols = min(3, len(methods))
    n_rows = math.ceil(len(methods) / n_cols)
    cell = 0.75  # inches per matrix cell
    fig = Figure(
        figsize=(n_cols * (len(tasks) * cell + 2.2) + 1.0, n_rows * (len(tasks) * cell + 1.8)),
        layout="constrained",
    )
    FigureCanvasAgg(fig)  # Agg explicitly, without touching pyplot's global backend.
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    image = None
    for ax, (method, m) in zip(axes, methods, strict=False):
        matrix = np.array(
            [[np.nan if x is None else x for x in row] for row in m["acc_matrix"]], dtype=float
        )
        image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap="viridis")
        for (i, j), x in np.ndenumerate(matrix):
            if not np.isnan(x):
                colour = "black" if x > 0.6 else "white"  # dark end of viridis is low accuracy
                ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=8, color=colour)
        ax.set_title(method)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
        stages = (
            ["joint (all tasks)"] if len(matrix) == 1 else [t["name"] for t in results["tasks"]]
        )
        ax.set_yticks(range(len(stages)), stages, fontsize=8)
        ax.set_xlabel("evaluated on")
        ax.set_ylabel("after training on")
    for ax in axes[len(methods) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[: len(methods)].tolist(), label=label, shrink=0.8)
    return fig


def _check_fractions(values: Any, where: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
        raise DataError(f"{where}: expected a list of accuracies, got {type(values).__name__}")
    out = list(values)
    if not out:
        raise DataError(f"{where}: expected at least one accuracy")
    for i, x in enumerate(out):
        if not is_number(x) or not 0.0 <= x <= 1.0:
            raise DataError(f"{where}[{i}]: is {x!r}; expected a fraction in [0, 1]")
    return [float(x) for x in out]


def is_number(x: Any) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _reject_constant(name: str) -> None:
    raise ValueError(f"invalid JSON constant {name} (NaN or infinity)")


def format_percent(x: float | None) -> str:
    if x is None:
        return "–"
    s = f"{100.0 * x:.1f}"
    return "0.0" if s == "-0.0" else s


def md_escape(s: str) -> str:
    return s.replace("|", "\\|")
