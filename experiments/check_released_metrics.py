"""Checks ``eval.metrics="released"`` against the released evaluator's own numbers.

    python experiments/check_released_metrics.py --results /path/to/MSLoRA_CR/results

Scores every ``<run>/<task>/answer-file.jsonl`` under ``--results`` with
``mslora_jax.eval.released_metrics`` and compares each metric with the ``metrics.txt`` beside
it (the table ``llava/eval/report_results.py`` wrote: percentages, six significant digits).
Prints the largest |difference| per file in points and exits non-zero if any exceeds
``--tolerance`` (0.01 points), if a file's rows differ from the metrics we define for it, or if
no answer file is found.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from absl import app, flags

from mslora_jax.errors import DataError
from mslora_jax.eval.released_metrics import RELEASED_NAMES
from mslora_jax.eval.scoring import score_answer_file

_RESULTS = flags.DEFINE_string("results", None, "The released results/ folder.", required=True)
_TOLERANCE = flags.DEFINE_float("tolerance", 0.01, "Largest allowed |difference|, in points.")
_OURS = {released: ours for ours, released in RELEASED_NAMES.items()}


def read_metrics_txt(path: Path) -> dict[str, float]:
    """{released row name: value in percent} of a released ``metrics.txt`` (tabulate table)."""
    rows = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith(("Metric", "---")):
            continue
        name, _, value = line.rstrip().rpartition(" ")
        try:
            rows[name.strip()] = float(value)
        except ValueError:
            raise DataError(
                f"{path}: line {number}: expected 'NAME  VALUE', got {line!r}"
            ) from None
    return rows


def compare_file(answers: Path) -> tuple[float, str, int]:
    """(max |difference| in points, the metric where it is, answers scored) for one file;
    the difference is inf where the released table and ours have different rows."""
    released = read_metrics_txt(answers.with_name("metrics.txt"))
    scores = score_answer_file(answers, "released")
    ours = {
        name: 100.0 * scores[_OURS[name]] for name in _OURS if not math.isnan(scores[_OURS[name]])
    }
    count = int(scores["num_open"] + scores["num_closed"])
    if set(ours) != set(released):
        return math.inf, f"rows {sorted(released)} != ours {sorted(ours)}", count
    diffs = {name: abs(ours[name] - released[name]) for name in released}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst, count


def main(argv: list[str]) -> int:
    del argv
    root = Path(_RESULTS.value)
    files = sorted(root.glob("*/*/answer-file.jsonl"))
    if not files:
        print(f"no <run>/<task>/answer-file.jsonl under {root}", file=sys.stderr)
        return 1
    rows = [(str(f.parent.relative_to(root)), *compare_file(f)) for f in files]
    width = max(len(r[0]) for r in rows)
    print(f"{'run/task'.ljust(width)}  answers  max |diff| (points)  at")
    for name, diff, where, count in rows:
        print(f"{name.ljust(width)}  {count:7d}  {diff:19.2e}  {where}")
    worst = max(r[1] for r in rows)
    ok = worst <= _TOLERANCE.value
    print(f"\n{len(rows)} files, largest |diff| {worst:.2e} points: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
