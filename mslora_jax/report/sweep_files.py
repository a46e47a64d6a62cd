"""The files of a sweep's summary: summary.json as ``summarize`` gives it, summary.md (tables of
"mean ± half-width" per metric group and the paired differences), summary.csv (long format, raw
fractions) and summary.png (accuracy bars with 95% error bars), and ``write_summary``.

Separate from ``report.sweep``, which computes the summary: this module only formats and writes
it, and is where matplotlib enters.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mslora_jax.io_utils import atomic_savefig, atomic_write_json, atomic_write_text
from mslora_jax.report.results import format_percent, md_escape
from mslora_jax.report.sweep import BASELINE

SUMMARY_FILES = ("summary.json", "summary.md", "summary.csv", "summary.png")


def _router_line(summary: dict[str, Any]) -> list[str]:
    router = summary.get("router")
    if not router:
        return []
    n = len(summary["seeds"])
    cells = ", ".join(f"{md_escape(t)} {_cell(iv, True, n)}" for t, iv in router["acc"].items())
    return [
        "",
        "Router accuracy (share of test inputs routed to their own task, %): "
        f"mean {_cell(router['avg_acc'], True, n)}; {cells}.",
    ]


# Metric groups of summary.md: title, whether the numbers are fractions shown x100, the keys.
# Keys not listed go to accuracy if they end in "_acc" (routed_avg_acc, ...), else to "other".
_GROUPS = (
    ("accuracy (%)", True, ("avg_acc", "unified_avg_acc", "mft", "mfn", "maa")),
    ("transfer (pp)", True, ("bwt", "forgetting", "fwt")),
    ("speed (train steps/s)", False, ("train_steps_per_s",)),
)
# Column headers of the known metrics (units are in each table's title); others by their key.
_LABELS = {
    "avg_acc": "avg acc",
    "unified_avg_acc": "unified avg acc",
    "mft": "MFT",
    "mfn": "MFN",
    "maa": "MAA",
    "bwt": "BWT",
    "forgetting": "forgetting",
    "fwt": "FWT",
    "train_steps_per_s": "steps/s",
}
_label = lambda key: md_escape(_LABELS.get(key, key.replace("_", " ")))
_PLOT_KEYS = ("avg_acc", "unified_avg_acc", "routed_avg_acc")


def _groups(keys: Sequence[str]) -> list[tuple[str, bool, list[str]]]:
    """The metric groups over ``keys``: listed keys first, then the unlisted ones."""
    listed = {k for _, _, group in _GROUPS for k in group}
    extra = [k for k in keys if k not in listed]
    out = []
    for i, (title, percent, group) in enumerate(_GROUPS):
        members = [k for k in group if k in keys]
        if i == 0:
            members += [k for k in extra if k.endswith("_acc")]
        out.append((title, percent, members))
    out.append(("other", False, [k for k in extra if not k.endswith("_acc")]))
    return [g for g in out if g[2]]


def _cell(stat: dict[str, Any] | None, percent: bool, n_seeds: int) -> str:
    """ "mean ± half-width", "(n=k)" if fewer seeds had it, "*" if a paired interval excludes 0."""
    if stat is None:
        return "–"
    number = format_percent if percent else (lambda x: f"{x:.2f}")
    text = number(stat["mean"])
    if stat["ci95_half_width"] is not None:
        text += f" ± {number(stat['ci95_half_width'])}"
    if stat["n"] != n_seeds:
        text += f" (n={stat['n']})"
    return text + ("*" if stat.get("excludes_zero") else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _all_keys(per_method: dict[str, dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for metrics in per_method.values() for k in metrics))


def format_summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: per metric group a table of methods by "mean ± 95% half-width" (accuracies in
    percent, transfer in percentage points), each task's final accuracy in the accuracy table,
    then the paired differences against the baseline, "*" where the interval excludes 0."""
    seeds, n = summary["seeds"], len(summary["seeds"])
    over = f"mean ± 95% t-interval half-width over n = {n} seeds ({', '.join(map(str, seeds))})"
    methods = summary["methods"]
    tasks = [t["name"] for t in summary["tasks"]]
    lines = [f"# Sweep summary: {over}"]
    for i, (title, percent, keys) in enumerate(_groups(_all_keys(methods))):
        header = ["method", *map(_label, keys), *map(md_escape, tasks if i == 0 else [])]
        rows = []
        for m, metrics in methods.items():
            final = summary["final_acc"].get(m, {})
            cells = [_cell(metrics.get(k), percent, n) for k in keys]
            if i == 0:
                cells += [_cell(final.get(t), True, n) for t in tasks]
            rows.append([md_escape(m), *cells])
        lines += ["", f"## {title.capitalize()}, n = {n} seeds", "", *_table(header, rows)]
        if i == 0 and tasks:
            lines += ["", f"Task columns ({', '.join(map(md_escape, tasks))}): final accuracy."]
            lines += _router_line(summary)
    vs = summary["vs_baseline"]
    baseline = summary["baseline"]
    if vs:
        lines += [
            "",
            f"## Paired difference against {baseline} (method − {baseline}), n = {n} seeds",
            "",
            "Mean ± 95% t-interval half-width of the per-seed differences (pp for accuracies "
            "and transfer); * marks an interval that excludes 0.",
            "",
        ]
        groups = _groups(_all_keys(vs))
        header = ["method", *(_label(k) for _, _, keys in groups for k in keys)]
        rows = []
        for m, diffs in vs.items():
            cells = [_cell(diffs.get(k), percent, n) for _, percent, keys in groups for k in keys]
            rows.append([md_escape(m), *cells])
        lines += _table(header, rows)
    elif baseline is None:
        lines += ["", f"No paired comparison: no seed ran {BASELINE}."]
    return "\n".join(lines + _retrieval_lines(summary))


def _retrieval_lines(summary: dict[str, Any]) -> list[str]:
    """summary.md's retrieval section: per database and direction, each method's final mAP
    (forgetting in brackets) under each policy, then the paired policy differences."""
    retrieval = summary.get("retrieval")
    if not retrieval:
        return []
    n = len(summary["seeds"])
    methods = retrieval["methods"]
    wheres = list(dict.fromkeys(w for m in methods.values() for p in m.values() for w in p))
    lines = ["", f"## Retrieval ({retrieval['metric']}), n = {n} seeds", "",
             "Final mAP (%), forgetting (pp) in brackets; docs/retrieval.md."]  # fmt: skip
    for where in wheres:
        policies = list(dict.fromkeys(p for m in methods.values() for p in m if where in m[p]))
        rows = []
        for method, by_policy in methods.items():
            cells = []
            for policy in policies:
                stat = by_policy.get(policy, {}).get(where)
                cells.append("–" if stat is None else f"{_cell(stat['avg'], True, n)} "
                             f"({_cell(stat['forgetting'], True, n)})")  # fmt: skip
            rows.append([md_escape(method), *cells])
        lines += ["", f"**{where.replace('_', ' ')}**", "", *_table(["method", *policies], rows)]
    paired = retrieval["paired"]
    if paired:
        labels = list(dict.fromkeys(label for m in paired.values() for label in m))
        header = ["method"] + [f"{a}, {w.replace('_', ' ')}" for a in labels for w in wheres]
        rows = []
        for method, by_label in paired.items():
            cells = []
            for label in labels:
                for where in wheres:
                    stat = by_label.get(label, {}).get(where)
                    cells.append("–" if stat is None else f"{_cell(stat['avg'], True, n)} "
                                 f"({_cell(stat['forgetting'], True, n)})")  # fmt: skip
            rows.append([md_escape(method), *cells])
        lines += ["", "Paired differences between policies, seed by seed: final mAP (pp), "
                  "forgetting (pp) in brackets; * marks an interval that excludes 0.", "",
                  *_table(header, rows)]  # fmt: skip
    return lines


_CSV_HEADER = ("method", "metric", "mean", "std", "n", "ci95_low", "ci95_high")


def format_summary_csv(summary: dict[str, Any]) -> str:
    """summary.csv, long format: one row per (method, metric) with raw fractions; each task's
    final accuracy is the metric ``final_acc[<task>]``; no interval is an empty cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_CSV_HEADER)
    cell = lambda x: "" if x is None else repr(float(x))

    def row(method: str, metric: str, stat: dict[str, Any]) -> None:
        writer.writerow(
            [method, metric, cell(stat["mean"]), cell(stat["std"]), stat["n"]]
            + [cell(stat["ci95_low"]), cell(stat["ci95_high"])]
        )

    for m, metrics in summary["methods"].items():
        for k, stat in metrics.items():
            row(m, k, stat)
        for t, stat in summary["final_acc"].get(m, {}).items():
            row(m, f"final_acc[{t}]", stat)
    return buf.getvalue()


def plot_summary(summary: dict[str, Any]) -> Figure:
    """Bars of avg_acc (and unified_avg_acc, routed_avg_acc where present) per method, error
    bars the 95% half-width (none for a single seed)."""
    methods = list(summary["methods"])
    keys = [k for k in _PLOT_KEYS if any(k in summary["methods"][m] for m in methods)]
    fig = Figure(figsize=(max(5.0, 1.1 * len(methods) * max(1, len(keys)) + 1.5), 4.0))
    FigureCanvasAgg(fig)  # Agg explicitly, without touching pyplot's global backend.
    ax = fig.subplots()
    width = 0.8 / max(1, len(keys))
    x = np.arange(len(methods))
    for i, key in enumerate(keys):
        stats = [summary["methods"][m].get(key) for m in methods]
        means = [np.nan if s is None else 100 * s["mean"] for s in stats]
        errors = [
            0.0 if s is None or s["ci95_half_width"] is None else 100 * s["ci95_half_width"]
            for s in stats
        ]
        offset = (i - (len(keys) - 1) / 2) * width
        ax.bar(x + offset, means, width, yerr=errors, capsize=3, label=key)
    ax.set_xticks(x, methods, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    n = len(summary["seeds"])
    ax.set_title(f"mean ± 95% t-interval over {n} seeds")
    if keys:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_summary(workdir: str | os.PathLike, summary: dict[str, Any]) -> dict[str, Path]:
    """Write summary.json/.md/.csv/.png into ``workdir`` (each atomically); the paths by name."""
    paths = {n: Path(workdir) / n for n in SUMMARY_FILES}
    atomic_write_json(paths["summary.json"], summary)
    atomic_write_text(paths["summary.md"], format_summary_markdown(summary) + "\n")
    atomic_write_text(paths["summary.csv"], format_summary_csv(summary))
    atomic_savefig(plot_summary(summary), paths["summary.png"], dpi=150)
    return paths
