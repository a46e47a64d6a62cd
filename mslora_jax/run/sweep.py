"""A multi-seed sweep: the same experiment once per seed, then a summary over the seeds.

``run_sweep(config, seeds, workdir)`` runs ``run_experiment`` with ``config.seed`` set to each
seed into ``workdir/seed_<s>/``, then writes ``workdir/summary.{json,md,csv,png}``
(``mslora_jax.report.sweep``: means, 95% Student-t intervals, paired differences against
``mslora``). Each seed folder is an ordinary run folder, so a rerun of the sweep resumes each
seed where it stopped, and a finished seed only reloads its checkpoints and evaluates.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mslora_jax.config import ExperimentConfig
from mslora_jax.errors import CommandLineError
from mslora_jax.parallel.distributed import is_primary
from mslora_jax.report.sweep import summarize
from mslora_jax.report.sweep_files import write_summary

log = logging.getLogger(__name__)

RunExperiment = Callable[[ExperimentConfig, Path], dict[str, Any]]


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``: comma-separated non-negative integers, at least two
    distinct (an interval needs two), no repeats. ``CommandLineError`` naming the problem."""
    where = f"--seeds {text!r}"
    words = [w.strip() for w in str(text).split(",")]
    if not any(words):
        raise CommandLineError(f"{where}: expected comma-separated seeds such as 0,1,2")
    seeds = []
    for word in words:
        if not word.isdigit() or not word.isascii():  # rejects '', '-1', '1.5', 'x'
            raise CommandLineError(
                f"{where}: {word!r} is not a non-negative integer (expected comma-separated "
                "seeds such as 0,1,2)"
            )
        seeds.append(int(word))
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise CommandLineError(f"{where}: seed {repeated[0]} is given more than once")
    if len(seeds) < 2:
        raise CommandLineError(
            f"{where}: a sweep needs at least two distinct seeds for its confidence intervals"
        )
    return tuple(seeds)


def seed_workdir(workdir: str | os.PathLike, seed: int) -> Path:
    return Path(workdir) / f"seed_{seed}"


def run_sweep(
    config: ExperimentConfig,
    seeds: Sequence[int],
    workdir: str | os.PathLike,
    run: RunExperiment | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``config`` once per seed and write the summary; returns it.

    ``run(config, seed_workdir)`` runs one seed; default ``run_experiment`` (tests pass a
    stand-in). The seeds run one after another, in the order given.
    """
    if run is None:
        from mslora_jax.run.experiment import run_experiment as run
    seeds = list(seeds)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    workdir = Path(workdir)
    runs = []
    for i, seed in enumerate(seeds):
        log.info("sweep: seed %d (%d of %d) in %s", seed, i + 1, len(seeds), workdir)
        runs.append(run(dataclasses.replace(config, seed=seed), seed_workdir(workdir, seed)))
    summary = summarize(runs, seeds)
    if is_primary():
        write_summary(workdir, summary)
    return summary
