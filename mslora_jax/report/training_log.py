"""Training curves of a run: per-step scalars and per-stage metrics, as JSONL and TensorBoard.

``workdir/logs/train.jsonl`` holds one JSON object per line: ``{"kind": "step", "method",
"stage", "task", "step" (within the stage), "method_step" (within the method, over its
stages), loss, task_loss, cr, ortho, grad_norm, lr, steps_per_s}`` every ``log_every`` steps,
and ``{"kind": "stage", "method", "stage", "task", "row", "avg"}`` after each stage's
evaluation. ``workdir/logs/tensorboard/<method>/`` holds the same scalars as TensorBoard event
files (``tensorboard --logdir workdir/logs/tensorboard``), step = ``method_step``. A rerun that
resumes appends; only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from tensorboardX import SummaryWriter

from mslora_jax.parallel.distributed import is_primary

log = logging.getLogger(__name__)


class TrainingLog:
    """Appends training scalars under ``directory`` (``workdir/logs``); a no-op off process 0."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self._writers: dict[str, SummaryWriter] = {}
        self._jsonl = None
        if is_primary():
            self.directory.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.directory / "train.jsonl", "a", encoding="utf-8")

    def _writer(self, method: str) -> SummaryWriter:
        if method not in self._writers:
            self._writers[method] = SummaryWriter(str(self.directory / "tensorboard" / method))
        return self._writers[method]

    def _write(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()  # a killed run keeps every line written so far

    def step(self, method: str, stage: int, task: str, step: int, method_step: int, scalars):
        """One row of per-step scalars (floats), e.g. loss, cr, ortho, lr, steps/s."""
        if self._jsonl is None:
            return
        record = {"kind": "step", "method": method, "stage": stage, "task": task, "step": step}
        self._write({**record, "method_step": method_step, **scalars})
        writer = self._writer(method)
        for name, value in scalars.items():
            writer.add_scalar(f"train/{name}", value, method_step)

    def stage(self, method: str, stage: int, task: str, row: list, method_step: int) -> None:
        """A finished stage's primary metric per task (None: not evaluated) and their mean."""
        if self._jsonl is None:
            return
        seen = [x for x in row if x is not None]
        avg = sum(seen) / len(seen) if seen else math.nan
        self._write({"kind": "stage", "method": method, "stage": stage, "task": task,
                     "row": row, "avg": avg})  # fmt: skip
        writer = self._writer(method)
        writer.add_scalar("eval/avg", avg, method_step)
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def read_step_records(directory: Path | str) -> dict[str, list[dict]]:
    """The ``kind == "step"`` rows of ``directory/train.jsonl`` by method, each method's in
    (stage, step) order; none if the file does not exist.

    A resumed run appends the steps after its checkpoint again, so a (method, stage, step)
    logged twice keeps its last row (the one the finished run's state came from). A line that
    is not a row (a run killed while writing it leaves half of one) is skipped with a warning:
    the curves are a view of the run, and the run's results do not depend on them."""
    path = Path(directory) / "train.jsonl"
    if not path.exists():
        return {}
    rows: dict[tuple[str, int, int], dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record.get("kind") == "step":
                rows[record["method"], int(record["stage"]), int(record["step"])] = record
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s:%d: skipped, not a training log row (%s)", path, number, e)
    out: dict[str, list[dict]] = {}
    for key in sorted(rows, key=lambda k: (k[1], k[2])):
        out.setdefault(key[0], []).append(rows[key])
    return out
