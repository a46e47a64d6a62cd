"""Learn the task stream with one method: stage by stage, one adapter slot at a time.

Every method runs through the same compiled train step: adapters of all tasks live in a stack of
``T`` slots, and what a method changes (which slot trains, which slots the forward sums, which
regularizers are on) is passed as data in the ``AdapterContext``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from mslora_jax.losses.regularizers import orthogonality_per_slot
from mslora_jax.report.results import format_percent, method_summary
from mslora_jax.report.training_log import TrainingLog
from mslora_jax.train import faults
from mslora_jax.train.adapter_loss import AdapterContext
from mslora_jax.train.baselines import add_fisher, diagonal_fisher, term_fields
from mslora_jax.train.checkpoints import StageCheckpoints, StepCheckpoints, remove_tree
from mslora_jax.train.loop import LoopStats, run_steps
from mslora_jax.train.methods import Method
from mslora_jax.train.optim import Schedule
from mslora_jax.train.preemption import stop_if_preempted
from mslora_jax.train.step import TrainState, init_train_state
from mslora_jax.train.stream_experiment import StreamExperiment, TaskMetrics, initial_trainable

log = logging.getLogger(__name__)

# Once per stage (one small compiled program per stack structure).
_orthogonality_per_slot = jax.jit(orthogonality_per_slot)


def stage_start(exp: StreamExperiment, method: Method, stage: int, slots: dict) -> dict:
    """The adapter ``stage`` starts from: its slot's, if trained before and continued, else the
    stage's fresh adapter."""
    slot = method.slot(stage)
    if method.continues_previous() and slot in slots:
        return slots[slot]
    return exp.fresh_adapter(stage)


def stage_context(
    exp: StreamExperiment,
    method: Method,
    stage: int,
    slots: dict,
    task_indices,
    fisher: dict | None = None,
) -> AdapterContext:
    """What the loss of ``stage`` reads; ``fisher``: EWC's Fisher of the earlier tasks."""
    reg = exp.config.regularizer
    modality = exp.tasks[stage].modality
    same = [slot_modality == modality for slot_modality in exp.slot_modalities]

    def weight(enabled: bool, value: float) -> float:
        # With learned weights the context carries an on/off switch and exp(w) is the weight.
        return (1.0 if reg.learn_weights else value) if enabled else 0.0

    steps = exp.num_steps(task_indices)
    active_slot = method.slot(stage)
    forward_weights = exp.weights(method.train_slots(stage))
    base_params = exp.base_params
    if exp.fold_frozen:  # the frozen slots' deltas merged once for the whole stage
        frozen = [i for i in method.train_slots(stage) if i != active_slot]
        base_params = exp.inference_params(slots, frozen)
    lora_stack = exp.stack(slots)
    return AdapterContext(
        base_params=base_params,
        lora_stack=lora_stack,
        frozen_ortho=_orthogonality_per_slot(lora_stack),
        active_slot=jnp.int32(active_slot),
        forward_weights=forward_weights,
        earlier_mask=exp.mask(method.cr_slots(stage)),
        same_modality=jnp.asarray(same),
        ortho_mask=exp.mask(method.ortho_slots(stage)),
        alpha_cr=jnp.float32(weight(method.use_cr, reg.alpha_cr)),
        beta_ortho=jnp.float32(weight(method.use_ortho, reg.beta_ortho)),
        schedule=Schedule.create(
            exp.learning_rate(task_indices), steps, exp.config.train.warmup_ratio
        ),
        **{"class_tokens": None, **exp.context_inputs()},
        **baseline_fields(exp, method, stage, slots, fisher),
    )


def baseline_fields(exp: StreamExperiment, method: Method, stage: int, slots, fisher) -> dict:
    """A baseline's AdapterContext fields (``train.baselines.term_fields``); ``{}`` otherwise."""
    if method.term is None:
        return {}
    return term_fields(exp, method, stage, slots, stage_start(exp, method, stage, slots), fisher)


def stage_fisher(exp: StreamExperiment, method: Method, stage: int, slots: dict) -> dict:
    """EWC's diagonal Fisher of ``stage``'s task at the adapter it ended with (``slots``),
    from ``regularizer.ewc_fisher_batches`` batches drawn with their own seed."""
    adapter = slots[method.slot(stage)]
    context = stage_context(exp, method, stage, slots, [stage])
    count = exp.config.regularizer.ewc_fisher_batches
    batches = exp.train_batches([stage], count, seed=exp.config.seed * 7919 + 104729 + stage)
    return diagonal_fisher(exp, initial_trainable(exp, method, adapter), context, batches)


def stage_task_name(exp: StreamExperiment, method: Method, stage: int) -> str:
    """What a stage trains on: its task's name, or "joint" for the joint method's one stage."""
    return "joint" if method.joint else exp.tasks[stage].name


def abstract_train_state(exp: StreamExperiment, method: Method, stage: int):
    """Shapes and shardings of ``method``'s train state at ``stage`` (a restore target)."""
    abstract_adapter = exp.rules.abstract(jax.eval_shape(exp.fresh_adapter, stage))
    init = lambda a: init_train_state(
        initial_trainable(exp, method, a), exp.optimizer, jax.random.PRNGKey(0)
    )
    return abstract_adapter, exp.rules.abstract(jax.eval_shape(init, abstract_adapter))


def train_stage(
    exp: StreamExperiment,
    method: Method,
    stage: int,
    slots: dict,
    training_log: TrainingLog | None = None,
    method_step: int = 0,
    step_checkpoints: StepCheckpoints | None = None,
    fingerprint: dict | None = None,
    fisher: dict | None = None,
) -> tuple[TrainState, dict]:
    """Train the adapter of ``stage``; returns the final train state and timing.

    ``training_log`` gets the scalars every ``train.log_every_steps`` steps, at ``method_step`` (the
    method's steps before this stage) plus the step. With ``step_checkpoints`` the stage starts
    from its newest in-stage checkpoint, if any (the batches continue at its step, so the result
    is the one an uninterrupted run gets), and saves every ``checkpoint.every_steps`` steps, at
    the end (before any evaluation) and on SIGTERM. ``fisher``: EWC's (``stage_context``).
    """
    task_indices = list(range(exp.num_tasks)) if method.joint else [stage]
    steps = exp.num_steps(task_indices)
    name = stage_task_name(exp, method, stage)
    desc = f"{method.name} {stage + 1}/{method.num_stages(exp.num_tasks)} {name}"
    fingerprint = fingerprint or {}
    restored = None
    if step_checkpoints is not None:
        abstract_state = abstract_train_state(exp, method, stage)[1]
        restored = step_checkpoints.restore_latest(abstract_state, fingerprint)
    if restored is None:
        start = stage_start(exp, method, stage, slots)
        key = jax.random.fold_in(jax.random.PRNGKey(exp.config.seed + 1), stage)
        state, start_step, before, final = exp.init_state(method, start, key), 0, _no_timing(), {}
    else:
        start_step, state, meta = restored
        before, final = meta["timing"], meta["final"]
        log.info("%s: resuming at step %d of %d", desc, start_step, steps)
    if start_step < steps:
        context = stage_context(exp, method, stage, slots, task_indices, fisher)
        context = exp.rules.place(context)
        batches = exp.train_batches(
            task_indices, steps, seed=exp.config.seed * 7919 + stage, start_step=start_step
        )

        def save(done: int, state: TrainState, stats: LoopStats) -> None:
            timing = _add_timing(before, stats)
            meta = {"fingerprint": fingerprint, "method": method.name, "stage": stage,
                    "task": name, "step": done, "num_steps": steps, "timing": timing,
                    "final": stats.final_metrics}  # fmt: skip
            step_checkpoints.save(done, state, meta)
            faults.reached("save")

        try:
            state, stats = run_steps(
                exp.train_step_for(method),
                state,
                context,
                batches,
                exp.mesh,
                num_steps=steps,
                desc=desc,
                start_step=start_step,
                progress=exp.config.progress,
                log_every=exp.config.train.log_every_steps or 25,
                on_log=None
                if training_log is None
                else lambda i, scalars: training_log.step(
                    method.name, stage, name, i, method_step + i, scalars
                ),
                checkpoint=None if step_checkpoints is None else save,
                checkpoint_every=exp.config.checkpoint.every_steps,
            )
        finally:
            if step_checkpoints is not None:
                # On disk before evaluation starts, or before a preempted run exits.
                step_checkpoints.wait()
        before, final = _add_timing(before, stats), stats.final_metrics
    timing = {"steps": steps, **before}
    return state, {"timing": timing, "final": final}


def _no_timing() -> dict:
    return {"timed_steps": 0, "seconds": 0.0}


def _add_timing(before: dict, stats: LoopStats) -> dict:
    """Throughput over the parts of a stage run so far (each part's first step untimed)."""
    return {
        "timed_steps": before["timed_steps"] + stats.timed_steps,
        "seconds": before["seconds"] + stats.timed_seconds,
    }


def evaluate_row(
    exp: StreamExperiment,
    method: Method,
    stage: int,
    slots: dict,
    previous: list[TaskMetrics | None] | None = None,
) -> list[TaskMetrics | None]:
    """Every metric of every task seen after ``stage`` (all tasks for ``joint``), and of the
    next task (``stage + 1``, not trained on yet: the superdiagonal that forward transfer reads;
    it is evaluated with the adapters learned so far).

    A task seen before ``stage`` whose evaluation slots the stage does not train keeps its
    metrics from ``previous`` (the row of stage - 1): with a slot per task, the adapters it is
    evaluated with (slots <= task) never change after its own stage, so
    ``a[stage][task] == a[task][task]`` and recomputing it is wasted work. A shared adapter, or a
    modality slot trained again, is evaluated afresh.
    """
    row: list[TaskMetrics | None] = []
    for task in range(exp.num_tasks):
        stop_if_preempted(f"{method.name} stage {stage + 1}: evaluation")
        if not (method.joint or task <= stage + 1):
            row.append(None)
        elif previous is not None and task < stage and not method.changes_eval_of(stage, task):
            row.append(previous[task])
        else:
            row.append(exp.task_metrics(slots, method.eval_slots(task), task))
    return row


def primary_row(exp: StreamExperiment, row: list[TaskMetrics | None]) -> list[float | None]:
    """A row of the accuracy matrix: each task's primary metric."""
    return [None if m is None else exp.primary_value(m, task) for task, m in enumerate(row)]


def save_stage(
    checkpoints: StageCheckpoints,
    exp: StreamExperiment,
    method: Method,
    stage: int,
    state: TrainState,
    row: list[float | None],
    metric_row: list[TaskMetrics | None],
    info: dict,
    fingerprint: dict,
    **meta,
) -> None:
    """Write ``stage``'s checkpoint: its adapter (``state.trainable["lora"]``) and train state,
    its row of the matrices (``row``: primary metrics, ``metric_row``: every metric), ``info``'s
    timing and final scalars, and the metadata ``run_method`` and ``inspect`` read, plus ``meta``
    (e.g. where an imported adapter came from)."""
    checkpoints.save(
        stage,
        adapter=state.trainable["lora"],
        trainer=state,
        metrics={
            "row": row,
            "task_metrics": metric_row,
            "timing": info["timing"],
            "final": info["final"],
        },
        meta={
            "fingerprint": fingerprint,
            "method": method.name,
            "slot": method.slot(stage),
            "task": stage_task_name(exp, method, stage),
            "modality": "mixed" if method.joint else exp.tasks[stage].modality,
            "rank": exp.config.lora.rank,
            "alpha": exp.config.lora.alpha,
            "targets": exp.targets,
            **meta,
        },
    )


def stage_line(
    exp: StreamExperiment,
    method: Method,
    stage: int,
    row: list[float | None],
    loss: float | None = None,
) -> str:
    """One readable console line for a finished stage: method, stage, task, its row of primary
    metrics (percent; ``–`` for tasks not evaluated yet) and the final training loss."""
    names = {exp.primary_metric(task) for task in range(exp.num_tasks)}
    metric = names.pop() if len(names) == 1 else "primary metrics"
    cells = " ".join(format_percent(x) for x in row)
    tail = "" if loss is None else f"  loss {loss:.4f}"
    where = f"{stage + 1}/{method.num_stages(exp.num_tasks)}"
    return f"{method.name} {where} {stage_task_name(exp, method, stage)}: {metric} {cells}{tail}"


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """What learning the stream with one method produced.

    ``summary`` is the method's ``results.json`` entry, ``adapters`` its adapters by slot, and
    ``task_metrics[stage][task]`` every metric of each task after each stage (``None`` for a
    task not yet seen).
    """

    summary: dict
    adapters: dict[int, dict]
    task_metrics: list[list[TaskMetrics | None]]


def run_method(
    exp: StreamExperiment,
    method: Method,
    checkpoints: StageCheckpoints | None,
    fingerprint: dict,
    training_log: TrainingLog | None = None,
    steps_dir: Path | None = None,
    zero_shot: list[float] | None = None,
) -> MethodRun:
    """Learn the stream with ``method``, resuming after its last checkpointed stage (and inside
    the next one from its newest in-stage checkpoint under ``steps_dir/<stage>``); training
    scalars and each stage's row go to ``training_log``. ``zero_shot`` (the backbone's primary
    metric per task) gives the summary its forward transfer."""
    slots: dict[int, dict] = {}
    fisher = None  # EWC's Fisher of the stages so far, recomputed for restored stages
    rows, timings, metric_rows = [], [], []
    finished = set(checkpoints.finished_stages()) if checkpoints else set()
    num_stages = method.num_stages(exp.num_tasks)
    for stage in range(num_stages):  # each stage's training shows its own bar (train.loop)
        slot = method.slot(stage)
        if stage in finished:
            # Restored straight into the rules' shardings (each host reads only its shards).
            abstract_adapter, abstract_state = abstract_train_state(exp, method, stage)
            adapter, _, metrics, _ = checkpoints.restore(
                stage, abstract_adapter, abstract_state, fingerprint
            )
            slots[slot] = adapter
            rows.append(metrics["row"])
            # Checkpoints written before per-task metrics existed hold the primary metric only.
            primary_only = [
                None if x is None else {exp.primary_metric(t): x}
                for t, x in enumerate(metrics["row"])
            ]
            metric_rows.append(metrics.get("task_metrics", primary_only))
            timings.append(metrics["timing"])
            log.info("%s (restored from %s)", stage_line(exp, method, stage, metrics["row"]),
                     checkpoints.directory)  # fmt: skip
            if steps_dir is not None and (steps_dir / str(stage)).exists():
                remove_tree(steps_dir / str(stage))  # left by a kill after the stage's save
            if method.term == "ewc" and stage + 1 < num_stages:
                fisher = add_fisher(fisher, stage_fisher(exp, method, stage, slots))
            continue
        method_step = sum(t["steps"] for t in timings)
        in_stage = None
        if steps_dir is not None:
            in_stage = StepCheckpoints(steps_dir / str(stage), exp.config.checkpoint.max_to_keep)
        state, info = train_stage(
            exp, method, stage, slots, training_log, method_step, in_stage, fingerprint, fisher
        )
        slots[slot] = state.trainable["lora"]
        if method.term == "ewc" and stage + 1 < num_stages:
            fisher = add_fisher(fisher, stage_fisher(exp, method, stage, slots))
        faults.reached("eval")
        previous = metric_rows[-1] if metric_rows else None
        metric_row = evaluate_row(exp, method, stage, slots, previous)
        row = primary_row(exp, metric_row)
        if training_log is not None:
            name = stage_task_name(exp, method, stage)
            training_log.stage(method.name, stage, name, row, method_step + info["timing"]["steps"])
        rows.append(row)
        metric_rows.append(metric_row)
        timings.append(info["timing"])
        log.info("%s", stage_line(exp, method, stage, row, info["final"].get("loss")))
        log.debug("%s stage %d: every metric %s, final scalars %s, timing %s", method.name, stage,
                  metric_row, info["final"], info["timing"])  # fmt: skip
        if checkpoints:
            save_stage(checkpoints, exp, method, stage, state, row, metric_row, info, fingerprint)
        if in_stage is not None:
            in_stage.close()
            remove_tree(in_stage.directory)  # the stage's checkpoint above supersedes them
    unified_slots = method.unified_slots(exp.num_tasks)
    unified = [exp.accuracy(slots, unified_slots, task) for task in range(exp.num_tasks)]
    timed = sum(t["timed_steps"] for t in timings)
    seconds = sum(t["seconds"] for t in timings)
    summary = method_summary(
        rows,
        unified,
        timed / seconds if seconds > 0 else 0.0,
        zero_shot,
        routed_acc=exp.routed_accuracy(slots, method),
    )
    return MethodRun(summary, slots, metric_rows)
