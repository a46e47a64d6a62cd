"""Drive a compiled train step over a stream of host batches, with a progress bar and timing."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

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
) -> tuple[TrainState, LoopStats]:
    """Run ``num_steps`` steps; returns the final state and throughput (first step excluded)."""
    metrics = {}
    start = None
    progress = progress and is_primary()  # one bar per run, not one per host
    bar = tqdm(total=num_steps, desc=desc, leave=False, disable=not progress, mininterval=0.5)
    for i, batch in enumerate(batches):
        if i == num_steps:
            break
        batch = to_global_batch(mesh, batch)
        if i == 0:  # place state and context once, then call the compiled step directly
            step, state, context = train_step.bind(state, context, batch)
        state, metrics = step(state, context, batch)
        if i == 0:
            jax.block_until_ready(state)
            start = time.perf_counter()
        if progress and (i % 25 == 0 or i == num_steps - 1):
            bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", refresh=False)
        bar.update(1)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start if start is not None else 0.0
    bar.close()
    final = {k: float(np.asarray(v)) for k, v in metrics.items()}
    return state, LoopStats(num_steps, max(num_steps - 1, 0), elapsed, final)
