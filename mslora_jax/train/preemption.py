"""Preemption: SIGTERM (how TPU VMs, GKE and SLURM announce it) asks the run to stop cleanly.

The signal only raises a flag; the training loop looks at it after every step, saves an in-stage
checkpoint and raises ``RunPreempted``, which the command line turns into a message and exit code
143 (128 + SIGTERM, what schedulers expect of a process that stopped on SIGTERM). A rerun with the
same workdir continues from that checkpoint.

Multi-process: ``jax.distributed`` already listens for SIGTERM on every host, and
``multihost_utils.reached_preemption_sync_point`` makes all processes agree on the same step to
stop at (otherwise one host would save while the others train on), so there we ask jax instead of
installing our own handler.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 128 + signal.SIGTERM


class RunPreempted(Exception):  # noqa: N818 (not an error: the run stopped as asked)
    """The run stopped on SIGTERM after saving; rerun the same command to continue."""

    exit_code = EXIT_CODE


_requested = threading.Event()


def _on_sigterm(signum, frame) -> None:
    _requested.set()


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While inside, SIGTERM raises the flag that ``preemption_requested`` reads (single
    process, main thread only: Python delivers signals there); the old handler comes back on
    exit."""
    _requested.clear()
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested.clear()


_sync_points = itertools.count()  # jax's sync point wants one increasing id per call


def preemption_requested() -> bool:
    """Whether to stop after the step just run; the same answer on every process (each calls
    this once per train step, so their call counts agree)."""
    if jax.process_count() > 1:
        try:
            return multihost_utils.reached_preemption_sync_point(next(_sync_points))
        except RuntimeError:  # jax_enable_preemption_service is off: no notice to act on
            return False
    return _requested.is_set()


def stop_if_preempted(what: str) -> None:
    """Raise ``RunPreempted`` if SIGTERM has arrived, outside training (e.g. between the tasks
    of an evaluation: the stage's trained state is already saved, so stopping loses nothing).
    Single process only: off the train step, processes have no step to agree on."""
    if _requested.is_set():
        raise RunPreempted(
            f"{what}: stopped on SIGTERM; the stage's trained adapter was saved before its "
            "evaluation. Rerun the same command with the same --workdir to continue."
        )
