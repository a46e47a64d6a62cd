"""Multi-seed summaries: mean, sample std and 95% Student-t intervals over seeds, per method and
metric, and paired differences against a baseline method (``mslora``).

Input: one ``results.json`` dict per seed (``mslora_jax.report.results``). Every numeric scalar
of a method's entry is a metric (``avg_acc``, ``bwt``, ..., ``train_steps_per_s`` and any later
one such as ``routed_avg_acc``); lists (``acc_matrix``, ``unified_acc``) are not, except that
each task's final accuracy (the matrix's last row) is summarized too. A metric that is ``None``
(``fwt`` of ``joint``) or absent in a seed is left out of that seed: its ``n`` is smaller.

The interval of ``n`` values with mean ``m`` and sample std ``s`` (``ddof=1``) is
``m ± t_{0.975, n-1} · s / sqrt(n)``; it needs ``n >= 2``. The paired comparison of method X
with the baseline takes, seed by seed, ``X − baseline`` and gives the same interval of those
differences; where it excludes 0 the difference is significant at the 5% level (two-sided
paired t-test), seed-to-seed noise that both methods share cancelling out.

Pure: no jax, no training; ``mslora_jax.run.sweep`` runs the seeds and calls the writers
(``mslora_jax.report.sweep_files``: summary.md, .csv and .png).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from mslora_jax.errors import DataError
from mslora_jax.report.results import is_number
from mslora_jax.report.retrieval_sweep import summarize_retrieval

BASELINE = "mslora"
CONFIDENCE = 0.95

# t_{0.975, df}, the two-sided 95% quantile of Student's t, for df = 1..30 (scipy.stats.t.ppf,
# rounded to 6 decimals; tests/test_sweep.py checks them against scipy and textbook values).
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
    2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
    2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
    2.048407, 2.045230, 2.042272,
)  # fmt: skip
_Z975 = 1.959963984540054  # the standard normal's 0.975 quantile


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (``df >= 1``).

    Dependency-free: a table for df 1..30, and beyond it the Cornish-Fisher expansion of t in
    the normal quantile z to order df^-4 (Abramowitz & Stegun 26.7.5), whose error there is
    below 1e-7 (3e-8 at df = 31, shrinking as df grows).
    """
    if isinstance(df, bool) or not isinstance(df, numbers.Integral) or df < 1:
        raise ValueError(f"t quantile: degrees of freedom must be an integer >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


@dataclasses.dataclass(frozen=True)
class Interval:
    """Mean, sample std (``ddof=1``), count and 95% t half-width of some values over seeds;
    ``std`` and ``half_width`` are None for fewer than two values."""

    mean: float
    std: float | None
    n: int
    half_width: float | None

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of 0 (False without an interval)."""
        return self.half_width is not None and (self.low > 0 or self.high < 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "std": self.std,
            "n": self.n,
            "ci95_half_width": self.half_width,
            "ci95_low": self.low,
            "ci95_high": self.high,
        }


def interval(values: Sequence[float]) -> Interval:
    """The ``Interval`` of ``values`` (at least one)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"interval: expected a non-empty list of numbers, got {values!r}")
    mean = float(np.mean(x))
    if len(x) < 2:
        return Interval(mean, None, 1, None)
    std = float(np.std(x, ddof=1))
    return Interval(mean, std, len(x), t_quantile_975(len(x) - 1) * std / math.sqrt(len(x)))


def scalar_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """A method entry's numeric scalars, in its own order (lists and None left out)."""
    return {k: float(v) for k, v in entry.items() if is_number(v)}


def _methods(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Every method of any seed, in the order they first appear."""
    return list(dict.fromkeys(name for r in runs for name in r["methods"]))


def _task_names(runs: Sequence[dict[str, Any]], seeds: Sequence[int]) -> list[str]:
    names = [t["name"] for t in runs[0]["tasks"]]
    for seed, r in zip(seeds[1:], runs[1:]):
        other = [t["name"] for t in r["tasks"]]
        if other != names:
            raise DataError(
                f"seed {seed}: its tasks {other} differ from seed {seeds[0]}'s {names}; a sweep "
                "varies only the seed"
            )
    return names


def _check_seeds(runs: Sequence[dict[str, Any]], seeds: Sequence[int] | None) -> list[int]:
    if not runs:
        raise ValueError("a sweep summary needs the results of at least one seed")
    seeds = list(range(len(runs))) if seeds is None else list(seeds)
    if len(seeds) != len(runs):
        raise ValueError(f"{len(seeds)} seeds for {len(runs)} results")
    return seeds


def _collect(runs: Sequence[dict[str, Any]], method: str) -> dict[str, list[float]]:
    """Each metric's values over the seeds that have the method and a number for the metric."""
    values: dict[str, list[float]] = {}
    for r in runs:
        for key, value in scalar_metrics(r["methods"].get(method, {})).items():
            values.setdefault(key, []).append(value)
    return values


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Interval]]:
    """``{method: {metric: Interval}}`` over the seeds' results."""
    return {m: {k: interval(v) for k, v in _collect(runs, m).items()} for m in _methods(runs)}


def aggregate_final_acc(
    runs: Sequence[dict[str, Any]], seeds: Sequence[int] | None = None
) -> dict[str, dict[str, Interval]]:
    """``{method: {task: Interval}}`` of each task's accuracy after the last stage."""
    seeds = _check_seeds(runs, seeds)
    names = _task_names(runs, seeds)
    out = {}
    for m in _methods(runs):
        rows = [r["methods"][m]["acc_matrix"][-1] for r in runs if m in r["methods"]]
        out[m] = {
            name: interval(col)
            for j, name in enumerate(names)
            if (col := [row[j] for row in rows if is_number(row[j])])
        }
    return out


def paired_differences(
    runs: Sequence[dict[str, Any]], baseline: str = BASELINE
) -> dict[str, dict[str, Interval]]:
    """``{method: {metric: Interval of (method − baseline) seed by seed}}`` for every method
    other than ``baseline``, over the seeds where both have a number; empty without it."""
    out: dict[str, dict[str, Interval]] = {}
    for m in _methods(runs):
        if m == baseline:
            continue
        diffs: dict[str, list[float]] = {}
        for r in runs:
            if m not in r["methods"] or baseline not in r["methods"]:
                continue
            base = scalar_metrics(r["methods"][baseline])
            for key, value in scalar_metrics(r["methods"][m]).items():
                if key in base:
                    diffs.setdefault(key, []).append(value - base[key])
        if diffs:
            out[m] = {k: interval(v) for k, v in diffs.items()}
    return out


def _values(runs: Sequence[dict[str, Any]], method: str) -> dict[str, list[float | None]]:
    """Each metric's value per seed (None where a seed lacks it), for summary.json."""
    keys = dict.fromkeys(k for r in runs for k in scalar_metrics(r["methods"].get(method, {})))
    return {k: [scalar_metrics(r["methods"].get(method, {})).get(k) for r in runs] for k in keys}


def summarize(
    runs: Sequence[dict[str, Any]], seeds: Sequence[int] | None = None, baseline: str = BASELINE
) -> dict[str, Any]:
    """The JSON summary (``summary.json``) of one results dict per seed (``seeds``: their
    seeds, default 0..n-1): every interval, its per-seed values, and the paired differences."""
    seeds = _check_seeds(runs, seeds)
    tasks = runs[0]["tasks"]
    _task_names(runs, seeds)
    stats = aggregate(runs)
    methods = {}
    for m, metrics in stats.items():
        values = _values(runs, m)
        methods[m] = {k: {**iv.to_json(), "values": values[k]} for k, iv in metrics.items()}
    vs = {
        m: {k: {**iv.to_json(), "excludes_zero": iv.excludes_zero} for k, iv in metrics.items()}
        for m, metrics in paired_differences(runs, baseline).items()
    }
    final = {
        m: {t: iv.to_json() for t, iv in per_task.items()}
        for m, per_task in aggregate_final_acc(runs, seeds).items()
    }
    retrieval = summarize_retrieval(runs, interval)
    return {
        **_router_summary(runs, [t["name"] for t in tasks]),
        **({"retrieval": retrieval} if retrieval else {}),
        "seeds": seeds,
        "confidence": CONFIDENCE,
        "interval": "mean ± t_{0.975, n-1} · std / sqrt(n) over seeds (std with ddof=1)",
        "tasks": tasks,
        "baseline": baseline if any(baseline in r["methods"] for r in runs) else None,
        "methods": methods,
        "final_acc": final,
        "vs_baseline": vs,
    }


def _router_summary(runs: Sequence[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """``{"router": ...}``: intervals of the router's accuracy, overall and per task, when
    every seed recorded it (``backbone.router_acc``); else nothing."""
    per_seed = [r.get("backbone", {}).get("router_acc") for r in runs]
    if any(acc is None for acc in per_seed):
        return {}
    per_task = {t: interval([acc[i] for acc in per_seed]).to_json() for i, t in enumerate(tasks)}
    overall = interval([sum(acc) / len(acc) for acc in per_seed]).to_json()
    return {"router": {"avg_acc": overall, "acc": per_task}}
