"""Fault injection for the kill tests: ``MSLORA_JAX_FAULT="KILL@save:2"`` makes this process
send itself SIGKILL (or ``TERM``: SIGTERM) the 2nd time it reaches the named point.

Points: ``step`` (after a train step), ``save`` (an in-stage checkpoint save has started and is
still being written in the background), ``eval`` (a stage's evaluation is about to start).
Counts are per process, over all methods and stages. Unset (always, outside tests): no effect.
"""

from __future__ import annotations

import collections
import os
import signal

from mslora_jax.errors import ConfigError

ENV = "MSLORA_JAX_FAULT"
POINTS = ("step", "save", "eval")
_SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
_seen: collections.Counter = collections.Counter()


def _parse(spec: str) -> tuple[signal.Signals, str, int]:
    try:
        name, rest = spec.split("@")
        point, count = rest.split(":")
        if name not in _SIGNALS or point not in POINTS or int(count) < 1:
            raise ValueError
        return _SIGNALS[name], point, int(count)
    except ValueError:
        raise ConfigError(
            f"${ENV}={spec!r}: expected SIGNAL@POINT:N with SIGNAL in {sorted(_SIGNALS)}, "
            f"POINT in {POINTS} and N >= 1"
        ) from None


def reached(point: str) -> None:
    """Count one arrival at ``point``; deliver the configured signal on the configured one."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    sig, target, count = _parse(spec)
    if point != target:
        return
    _seen[point] += 1
    if _seen[point] == count:
        os.kill(os.getpid(), sig)
