"""Drive a compiled train step over a stream of host batches: progress bar, timing, logged
scalars, in-stage checkpoints, a clean stop on SIGTERM, and a stop with a clear error when a loss
term or the gradient goes non-finite (no checkpoint is ever written after that).

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
from mslora_jax.train import faults
from mslora_jax.train.preemption import RunPreempted, preemption_requested
from mslora_jax.train.step import TrainState

# checkpoint(steps_done, state, stats_so_far): save the state after ``steps_done`` steps.
CheckpointFn = Callable[[int, TrainState, "LoopStats"], None]


@dataclasses.dataclass
class LoopStats:
    steps: int  # steps run by this call
    timed_steps: int  # steps after the first (which includes compilation when it is new)
    timed_seconds: float
    final_metrics: dict  # the latest fetched scalars

    @property
    def steps_per_s(self) -> float:
        return self.timed_steps / self.timed_seconds if self.timed_seconds > 0 else float("nan")


# What a non-finite metric means, for the error message.
_TERMS = {
    "task_loss": "the task loss",
    "cr": "the contrastive regularizer (CR)",
    "ortho": "the orthogonality regularizer",
    "olora": "O-LoRA's orthogonality term",
    "ewc": "EWC's penalty",
    "lwf": "LwF's distillation term",
    "modx": "Mod-X's distillation term",
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
        f"{num_steps}; the run stops without saving it (every checkpoint written so far is "
        "untouched and from before that step). Lower the learning rate or the regularizer "
        "weights."
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
    start_step: int = 0,
    progress: bool = True,
    log_every: int = 25,
    on_log: Callable[[int, dict], None] | None = None,
    checkpoint: CheckpointFn | None = None,
    checkpoint_every: int | None = None,
) -> tuple[TrainState, LoopStats]:
    """Run steps ``start_step..num_steps-1`` (``batches`` yields exactly those); returns the final
    state and throughput (first step of this call excluded).

    Every ``log_every`` steps and at the last, the latest metrics are fetched: shown on the
    progress bar, passed to ``on_log(step, scalars)`` (with ``steps_per_s`` since the previous
    log point) and checked: a metric that was non-finite at any step so far raises
    ``TrainingDivergedError`` naming that step and term.

    ``checkpoint`` is called after every ``checkpoint_every`` steps, after the last step, and
    after the step at which SIGTERM arrived (then ``RunPreempted`` is raised); the metrics are
    checked first, so only a state with finite losses and gradients is ever saved.
    """
    metrics, scalars = {}, {}
    start = None
    progress = progress and is_primary()  # one bar per run, not one per host
    bar = tqdm(
        total=num_steps,
        initial=start_step,
        desc=desc,
        leave=False,
        disable=not progress,
        mininterval=0.5,
    )
    first_bad = None
    last_log = None  # (step, time) of the previous log point; set after the first step
    for i, batch in zip(range(start_step, num_steps), batches):
        batch = to_global_batch(mesh, batch)
        if i == start_step:  # place state and context once, then call the compiled step directly
            step, state, context = train_step.bind(state, context, batch)
        state, metrics = step(state, context, batch)
        if first_bad is None:
            first_bad = {k: jnp.int32(-1) for k in metrics if k in _TERMS}
        first_bad = _track_nonfinite(first_bad, metrics, jnp.int32(i))
        if i == start_step:
            jax.block_until_ready(state)
            start = time.perf_counter()
            last_log = (i, start)
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
        done = i + 1
        faults.reached("step")
        stop = preemption_requested()
        periodic = checkpoint_every is not None and done % checkpoint_every == 0
        if checkpoint is not None and (stop or periodic or done == num_steps):
            _check_finite(first_bad, desc, num_steps)
            jax.block_until_ready(state)
            ran = done - start_step
            checkpoint(done, state, LoopStats(ran, ran - 1, time.perf_counter() - start, scalars))
        if stop:
            bar.close()
            saved = "saved a checkpoint there" if checkpoint is not None else "nothing saved"
            raise RunPreempted(
                f"{desc}: stopped on SIGTERM after step {done} of {num_steps} ({saved}); rerun "
                "the same command with the same --workdir to continue from it"
            )
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start if start is not None else 0.0
    bar.close()
    if first_bad is not None:
        _check_finite(first_bad, desc, num_steps)
    ran = num_steps - start_step
    final = {k: float(np.asarray(v)) for k, v in metrics.items()}
    return state, LoopStats(ran, max(ran - 1, 0), elapsed, final)
