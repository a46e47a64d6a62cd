"""Drive a compiled train step over a stream of host batches: progress bar, timing, logged
scalars, and a stop with a clear error when a loss term or the gradient goes non-finite.

Metrics stay on the device between log points (fetching them every step would stall the
dispatch queue); a tiny device-side update keeps, per metric, the first step at which it was
non-finite, so the error names the exact step even between log points.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from mslora_jax.errors import TrainingDivergedError
from mslora_jax.parallel.distributed import is_primary
from mslora_jax.parallel.mesh import to_global_batch
from mslora_jax.parallel.sharded_jit import ShardedStep
from mslora_jax.train.step import TrainState


@dataclasses.dataclass
class LoopStats:
    steps: int
    timed_steps: int  # steps after the first (which includes compilation when it is new)
    timed_seconds: float
    final_metrics: dict

    @property
    def steps_per_s(self) -> float:
        return self.timed_steps / self.timed_seconds if self.timed_seconds > 0 else float("nan")


# What a non-finite metric means, for the error message.
_TERMS = {
    "task_loss": "the task loss",
    "cr": "the contrastive regularizer (CR)",
    "ortho": "the orthogonality regularizer",
    "grad_norm": "the gradient",
    "loss": "the total loss",
}


@jax.jit
def _track_nonfinite(first_bad: dict, metrics: dict, step: jax.Array) -> dict:
    """Per metric: the first step at which it was not finite (-1: none so far)."""
    return {
        k: jnp.where((first_bad[k] < 0) & ~jnp.isfinite(metrics[k]), step, first_bad[k])
        for k in first_bad
    }


def _check_finite(first_bad: dict, desc: str, num_steps: int) -> None:
    bad = {k: int(v) for k, v in jax.device_get(first_bad).items() if int(v) >= 0}
    if not bad:
        return
    step = min(bad.values())
    terms = [text for k, text in _TERMS.items() if bad.get(k) == step]
    raise TrainingDivergedError(
        f"{desc}: {', '.join(terms)} became non-finite (NaN or Inf) at step {step + 1} of "
        f"{num_steps}; the run stops before this stage is saved (earlier stages' checkpoints "
        "are untouched). Lower the learning rate or the regularizer weights."
    )


def run_steps(
    train_step: ShardedStep,
    state: TrainState,
    context,
    batches: Iterable[dict],
    mesh: Mesh,
    *,
    num_steps: int,
    desc: str,
    progress: bool = True,
    log_every: int = 25,
    on_log: Callable[[int, dict], None] | None = None,
) -> tuple[TrainState, LoopStats]:
    """Run ``num_steps`` steps; returns the final state and throughput (first step excluded).

    Every ``log_every`` steps and at the last, the latest metrics are fetched: shown on the
    progress bar, passed to ``on_log(step, scalars)`` (with ``steps_per_s`` since the previous
    log point) and checked: a metric that was non-finite at any step so far raises
    ``TrainingDivergedError`` naming that step and term.
    """
    metrics = {}
    start = None
    progress = progress and is_primary()  # one bar per run, not one per host
    bar = tqdm(total=num_steps, desc=desc, leave=False, disable=not progress, mininterval=0.5)
    first_bad = None
    last_log = None  # (step, time) of the previous log point; set after the first step
    for i, batch in enumerate(batches):
        if i == num_steps:
            break
        batch = to_global_batch(mesh, batch)
        if i == 0:  # place state and context once, then call the compiled step directly
            step, state, context = train_step.bind(state, context, batch)
        state, metrics = step(state, context, batch)
        if first_bad is None:
            first_bad = {k: jnp.int32(-1) for k in metrics if k in _TERMS}
        first_bad = _track_nonfinite(first_bad, metrics, jnp.int32(i))
        if i == 0:
            jax.block_until_ready(state)
            start = time.perf_counter()
            last_log = (0, start)
        if i % log_every == 0 or i == num_steps - 1:
            _check_finite(first_bad, desc, num_steps)
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            if i > last_log[0]:
                scalars["steps_per_s"] = (i - last_log[0]) / (now - last_log[1])
                last_log = (i, now)
            if on_log is not None:
                on_log(i, scalars)
            if progress:
                bar.set_postfix(loss=f"{scalars['loss']:.3f}", refresh=False)
        bar.update(1)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start if start is not None else 0.0
    bar.close()
    if first_bad is not None:
        _check_finite(first_bad, desc, num_steps)
    final = {k: float(np.asarray(v)) for k, v in metrics.items()}
    return state, LoopStats(num_steps, max(num_steps - 1, 0), elapsed, final)
