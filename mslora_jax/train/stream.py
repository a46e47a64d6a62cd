"""Learn the task stream with one method: stage by stage, one adapter slot at a time.

Every method runs through the same compiled train step: adapters of all tasks live in a stack of
``T`` slots, and what a method changes (which slot trains, which slots the forward sums, which
regularizers are on) is passed as data in the ``AdapterContext``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from mslora_jax.config import ExperimentConfig
from mslora_jax.data.pipeline import train_batches
from mslora_jax.data.registry import ClassTable, class_table, union_train_split
from mslora_jax.data.task import TaskData
from mslora_jax.errors import ConfigError
from mslora_jax.eval.evaluate import (
    evaluate_accuracy,
    image_features,
    make_embed_fn,
    make_predict_fn,
    predict_classes,
)
from mslora_jax.eval.router import PrototypeRouter, fit_router, router_accuracy
from mslora_jax.lora.adapter import init_adapter_params, stack_params
from mslora_jax.lora.merge import merge_stack, with_kernels
from mslora_jax.lora.targets import get_by_path, select_targets
from mslora_jax.losses.contrastive import sharded_clip_loss
from mslora_jax.losses.regularizers import orthogonality_per_slot
from mslora_jax.models.clip import DualEncoder
from mslora_jax.parallel.distributed import is_primary
from mslora_jax.parallel.mesh import batch_shards, check_divisible, process_row_range
from mslora_jax.parallel.rules import ShardingRules
from mslora_jax.parallel.sharded_jit import ShardedOutputs, ShardedStep
from mslora_jax.report.results import method_summary
from mslora_jax.report.training_log import TrainingLog
from mslora_jax.train import faults
from mslora_jax.train.baselines import add_fisher, diagonal_fisher, term_fields
from mslora_jax.train.checkpoints import StageCheckpoints, StepCheckpoints, remove_tree
from mslora_jax.train.loop import LoopStats, run_steps
from mslora_jax.train.methods import Method, get_method
from mslora_jax.train.objectives import (
    AdapterContext,
    clip_distillation,
    clip_task_loss,
    regularized_adapter_loss,
)
from mslora_jax.train.optim import Schedule, make_optimizer
from mslora_jax.train.preemption import stop_if_preempted
from mslora_jax.train.step import TrainState, init_train_state, make_train_step

log = logging.getLogger(__name__)

# Every metric of one task: name -> value (None where undefined, e.g. no items of a kind).
TaskMetrics = dict[str, float | None]


class StreamExperiment:
    """What every method of a run shares: tasks, frozen backbone, mesh, compiled train step.

    Model-specific parts are supplied by subclasses: the task loss, training batches and the
    per-task score that fills the accuracy matrix. Tasks need ``name``, ``modality`` and
    ``num_train``.
    """

    model_family = ""  # the family of sharding rules (``parallel.rules.PARAM_RULES``)

    def __init__(self, config: ExperimentConfig, tasks, mesh: Mesh, base_params: dict, targets):
        train = config.train
        per_micro = "micro_batch_size" if train.micro_batch_size else "(batch / grad_accum_steps)"
        sizes = {"train.batch_size": train.batch_size}
        for task in config.stream:  # per-task batch sizes (TaskConfig.batch_size)
            if task.batch_size:
                sizes[f"task {task.name!r}: batch_size"] = task.batch_size
        for what, size in sizes.items():
            micro = size // train.accum_steps(size, what)
            check_divisible(micro, mesh, f"{what}={size}: rows per micro-batch {per_micro}")
        self.config, self.tasks, self.mesh = config, tasks, mesh
        self.rules = ShardingRules(mesh, self.model_family)
        self.rules.check_rules(base_params)
        # A no-op for a backbone born or restored sharded; replicated inputs get resharded.
        self.base_params, self.targets = self.rules.place(base_params), targets
        self.optimizer = make_optimizer(config.train.weight_decay, config.train.grad_clip_norm)
        self.fold_frozen = resolve_fold(config.lora.fold_frozen, self.base_params, targets)
        # The train step's loss, kept for checks and tools (``loss_fn(trainable, context,
        # batch, rng) -> (loss, metrics)``).
        self.loss_fn = regularized_adapter_loss(
            self.task_loss(),
            folded=self.fold_frozen,
            cr_distance=config.regularizer.cr_distance,
            scaling=self.scaling,
        )
        step = make_train_step(
            self.loss_fn, self.optimizer, train.grad_accum_steps, train.micro_batch_size
        )
        self.train_step = ShardedStep(step, self.rules)
        self._term_steps: dict[str, ShardedStep] = {}
        self._fisher_fn = None  # EWC's compiled Fisher step (``train.baselines``), when needed
        self._sharded_builders()
        shards = batch_shards(mesh)
        self.eval_batch_size = math.ceil(config.train.eval_batch_size / shards) * shards

    # --- supplied by subclasses -------------------------------------------------------------
    def task_loss(self):
        raise NotImplementedError

    def train_batches(
        self, task_indices: list[int], num_steps: int, seed: int, start_step: int = 0
    ):
        """This process's rows of the batches of steps ``start_step..num_steps-1``."""
        raise NotImplementedError

    def task_metrics(self, slots: dict[int, dict], active: list[int], task: int) -> TaskMetrics:
        """Every metric of ``task`` with the adapters ``active`` (of ``slots``) summed.

        Values are fractions in [0, 1] (``None`` where undefined), except counts named
        ``num_*``; the task's primary metric must be among them.
        """
        raise NotImplementedError

    def primary_metric(self, task: int) -> str:
        """The metric that fills the accuracy matrix for ``task``."""
        return "accuracy"

    def answer_records(self, slots: dict[int, dict], active: list[int], task: int):
        """Per-item predictions of ``task`` worth saving (generated answers), or None."""
        return None

    def extra_trainables(self) -> dict:
        """Trainable leaves besides the adapter (e.g. a learned temperature)."""
        return {}

    def context_inputs(self) -> dict:
        """Extra AdapterContext fields the task loss reads."""
        return {}

    def router_accuracy(self) -> list[float] | None:
        """Per task, the fraction of its test inputs the task-agnostic router sends to it
        (None: this model has no router)."""
        return None

    def routed_accuracy(self, slots: dict[int, dict], method: Method) -> list[float] | None:
        """Per task, the primary metric under task-agnostic inference: each test input is
        evaluated as its routed task (that task's evaluation adapters and label set); an input
        routed to another task counts as wrong. None: this model has no router."""
        return None

    def distillation(self, term: str):
        """The ``DistillFn`` of the output-distilling baselines (``lwf``, ``modx``)."""
        raise ConfigError(f"method {term!r} is not implemented for {type(self).__name__}")

    def distill_inputs(self, task: int) -> dict:
        """AdapterContext fields the ``lwf`` term reads at ``task``'s stage."""
        return {}

    def loss_for(self, method: Method):
        """The loss of ``method``: ``loss_fn`` for the paper's methods, ``loss_fn`` plus the
        baseline's term (``Method.term``) for a baseline."""
        term = method.term
        if term is None:
            return self.loss_fn
        return regularized_adapter_loss(
            self.task_loss(),
            folded=self.fold_frozen,
            cr_distance=self.config.regularizer.cr_distance,
            scaling=self.scaling,
            term=term,
            distill=self.distillation(term) if term in ("lwf", "modx") else None,
        )

    def train_step_for(self, method: Method) -> ShardedStep:
        """The compiled step of ``method``: the shared ``train_step`` for the paper's methods,
        one with the baseline's term for each baseline (compiled once each)."""
        term = method.term
        if term is None:
            return self.train_step
        if term not in self._term_steps:
            train = self.config.train
            step = make_train_step(
                self.loss_for(method),
                self.optimizer,
                train.grad_accum_steps,
                train.micro_batch_size,
            )
            self._term_steps[term] = ShardedStep(step, self.rules)
        return self._term_steps[term]

    # --- shared -----------------------------------------------------------------------------
    def accuracy(self, slots: dict[int, dict], active: list[int], task: int) -> float:
        """The primary metric (in [0, 1]) of ``task`` with the adapters ``active`` summed."""
        return self.primary_value(self.task_metrics(slots, active, task), task)

    def primary_value(self, metrics: TaskMetrics, task: int) -> float:
        name = self.primary_metric(task)
        value = metrics.get(name)
        if value is None:
            raise ValueError(
                f"task {self.tasks[task].name!r}: its primary metric {name!r} is undefined "
                f"(got metrics {sorted(metrics)}); pick one that its test split defines"
            )
        return float(value)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_slots(self) -> tuple[int, ...] | None:
        """Each task's adapter slot under ``lora.granularity``: None for one slot per task; for
        one per modality, the modality's rank in order of first appearance in the stream."""
        if self.config.lora.granularity == "task":
            return None
        order = list(dict.fromkeys(task.modality for task in self.tasks))
        return tuple(order.index(task.modality) for task in self.tasks)

    @property
    def num_slots(self) -> int:
        """Adapter slots of the stack: tasks, or modalities (memory grows with these)."""
        slots = self.task_slots
        return self.num_tasks if slots is None else max(slots) + 1

    @property
    def slot_modalities(self) -> list[str]:
        """The modality of each slot (with a slot per task: each task's)."""
        slots = self.task_slots or range(self.num_tasks)
        by_slot = dict(zip(slots, (task.modality for task in self.tasks), strict=True))
        return [by_slot[i] for i in range(self.num_slots)]

    def method(self, name: str) -> Method:
        """The method ``name`` with this run's task -> slot layout."""
        return get_method(name, self.task_slots)

    @property
    def scaling(self) -> float:
        return self.config.lora.alpha / self.config.lora.rank

    def fresh_adapter(self, stage: int) -> dict:
        """The initial adapter of ``stage``: the same for every method, for a fair comparison.

        Born sharded like its base weights (A like the input dimension, B like the output)."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), stage)
        return self._init_adapter(key)

    def stack(self, slots: dict[int, dict]) -> dict:
        """A ``[T, ...]`` stack holding the given slots' adapters and zeros elsewhere (sharded)."""
        # A list with None for empty slots: its structure (and so the compiled builder) says
        # both the number of tasks and which slots are filled.
        return self._build_stack([slots.get(i) for i in range(self.num_slots)])

    def init_state(self, method: Method, adapter: dict, rng) -> TrainState:
        """The train state of ``method`` starting from ``adapter``, born sharded by the rules
        (Adam's moments follow their adapter)."""
        if method.name not in self._init_states:

            def init(adapter, key):
                trainable = initial_trainable(self, method, adapter)
                return init_train_state(trainable, self.optimizer, key)

            self._init_states[method.name] = ShardedOutputs(init, self.rules)
        return self._init_states[method.name](adapter, rng)

    def _sharded_builders(self) -> None:
        """The compiled builders of adapters, stacks and train states (outputs born sharded)."""
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.base_params)
        rank = self.config.lora.rank
        init = lambda key: init_adapter_params(shapes, self.targets, rank, key)  # reads shapes
        self._init_adapter = ShardedOutputs(init, self.rules)
        template = jax.eval_shape(init, jax.random.PRNGKey(0))

        def build(slots: list) -> dict:
            zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), template)
            return stack_params([zero if a is None else a for a in slots])

        self._build_stack = ShardedOutputs(build, self.rules)
        self._merge_stack = ShardedOutputs(merge_stack, self.rules)
        self._init_states: dict[str, ShardedOutputs] = {}

    def inference_params(self, slots: dict[int, dict], active: list[int]) -> dict:
        """The backbone with the adapters ``active`` (of ``slots``) merged into its kernels,
        each weighted alpha / rank: what evaluation and generation run (the adapted model then
        costs what the backbone costs) and, for a folded stage, its frozen adapters.

        Only the adapted kernels are new arrays (born sharded like the kernels they replace);
        every other leaf is the backbone's own.
        """
        merged = {i: a for i, a in slots.items() if i in active}
        if not merged:
            return self.base_params
        kernels = self._merge_stack(self.base_params, self.stack(merged), self.weights(active))
        return with_kernels(self.base_params, kernels)

    def weights(self, slots: list[int]) -> jax.Array:
        """Forward weights: task mask times alpha / rank."""
        return jnp.asarray(
            [self.scaling if i in slots else 0.0 for i in range(self.num_slots)], jnp.float32
        )

    def mask(self, slots: list[int]) -> jax.Array:
        return jnp.asarray([i in slots for i in range(self.num_slots)])

    def task_steps(self, task: int, batch_size: int) -> int:
        """Steps of ``batch_size`` that ``task``'s epochs (or ``train.steps_per_task``) take."""
        cfg = self.config.train
        if cfg.steps_per_task:
            return cfg.steps_per_task
        epochs = self.config.stream[task].epochs or cfg.epochs
        return math.ceil(epochs * self.tasks[task].num_train / batch_size)

    def num_steps(self, task_indices: list[int]) -> int:
        batch_size = self.config.stage_batch_size(task_indices)
        return sum(self.task_steps(i, batch_size) for i in task_indices)

    def stage_mixture(self, task_indices: list[int]) -> dict:
        """``train_batches``' ``draws``/``sizes`` for a stage over several tasks (``joint``): each
        task contributes the examples its own stage would read (its steps times the batch), so
        per-task epochs are honoured; ``{}`` for a one-task stage."""
        if len(task_indices) == 1:
            return {}
        batch_size = self.config.stage_batch_size(task_indices)
        return {
            "draws": [self.task_steps(i, batch_size) * batch_size for i in task_indices],
            "sizes": [self.tasks[i].num_train for i in task_indices],
        }

    def learning_rate(self, task_indices: list[int]) -> float:
        """The stage's learning rate: its tasks' common rate (``ExperimentConfig`` refuses a
        ``joint`` over tasks whose rates differ)."""
        rates = {
            self.config.stream[i].learning_rate or self.config.train.learning_rate
            for i in task_indices
        }
        if len(rates) != 1:
            raise ConfigError(f"tasks {task_indices} of one stage set different learning rates")
        return rates.pop()


class Experiment(StreamExperiment):
    """The dual encoder on image classification tasks (prediction = nearest class prompt)."""

    model_family = "dual_encoder"

    def __init__(
        self, config, tasks: list[TaskData], table: ClassTable, mesh, base_params, targets
    ):
        self.table = table
        self.model = DualEncoder(config.model, lora_dropout=config.lora.dropout)
        self.predict_fn = make_predict_fn(self.model)
        self.max_classes = max(table.sizes)
        super().__init__(config, tasks, mesh, base_params, targets)

    def task_loss(self):
        return clip_task_loss(self.model, sharded_clip_loss(self.mesh))

    def extra_trainables(self) -> dict:
        if self.config.train.learn_temperature:
            return {"logit_scale": self.base_params["logit_scale"]}
        return {}

    def context_inputs(self) -> dict:
        return {"class_tokens": jnp.asarray(self.table.tokens)}

    def distillation(self, term: str):
        return clip_distillation(self.model, term, self.config.regularizer.lwf_temperature)

    def distill_inputs(self, task: int) -> dict:
        tokens, valid = self.table.task_tokens(task, self.max_classes)
        return {"task_tokens": jnp.asarray(tokens), "task_valid": jnp.asarray(valid)}

    def train_batches(
        self, task_indices: list[int], num_steps: int, seed: int, start_step: int = 0
    ):
        images, labels = union_train_split(self.tasks, self.table, task_indices)
        batch_size = self.config.stage_batch_size(task_indices)
        return train_batches(
            images,
            labels,
            batch_size=batch_size,
            num_steps=num_steps,
            seed=seed,
            rows=process_row_range(self.mesh, batch_size),
            start_step=start_step,
            **self.stage_mixture(task_indices),
            **self.config.train.input_options(),
        )

    @functools.cached_property
    def routes(self) -> list[np.ndarray]:
        """The router's task for each test image of each task (see ``eval.router``)."""
        embed, weights = make_embed_fn(self.model), self.weights([])
        params = self.inference_params({}, [])

        def features(images):
            return image_features(embed, self.mesh, params, weights, images, self.eval_batch_size)

        router: PrototypeRouter = fit_router(
            [features(t.train_images) for t in self.tasks], [t.train_labels for t in self.tasks]
        )
        return [router.route(features(t.test_images)) for t in self.tasks]

    def router_accuracy(self) -> list[float]:
        return [router_accuracy(routes, task) for task, routes in enumerate(self.routes)]

    def routed_accuracy(self, slots: dict[int, dict], method: Method) -> list[float]:
        accuracies = []
        for task, routes in enumerate(self.routes):
            data, kept = self.tasks[task], routes == task
            if not kept.any():
                accuracies.append(0.0)
                continue
            active = method.eval_slots(task)
            tokens, valid = self.table.task_tokens(task, self.max_classes)
            preds = predict_classes(
                self.predict_fn,
                self.mesh,
                self.inference_params(slots, active),
                None,
                self.weights(active),
                data.test_images[kept],
                tokens,
                valid,
                self.eval_batch_size,
            )
            accuracies.append(float(np.sum(preds == data.test_labels[kept]) / len(routes)))
        return accuracies

    def task_metrics(self, slots: dict[int, dict], active: list[int], task: int) -> TaskMetrics:
        tokens, valid = self.table.task_tokens(task, self.max_classes)
        data = self.tasks[task]
        accuracy = evaluate_accuracy(
            self.predict_fn,
            self.mesh,
            self.inference_params(slots, active),
            None,
            self.weights(active),
            data.test_images,
            data.test_labels,
            tokens,
            valid,
            self.eval_batch_size,
        )
        return {"accuracy": accuracy}


def resolve_fold(mode: str, base_params: dict, targets: list[str]) -> bool:
    """Whether frozen adapters are merged into the kernels (``lora.fold_frozen``); ``auto``
    merges when every adapted kernel is float32 (see ``config.FOLD_MODES``)."""
    if mode != "auto":
        return mode == "merge"
    return all(get_by_path(base_params, p)["kernel"].dtype == jnp.float32 for p in targets)


def initial_trainable(exp: StreamExperiment, method: Method, adapter: dict) -> dict:
    """The trainable partition: the active adapter, plus what the config asks to learn."""
    trainable = {"lora": adapter, **exp.extra_trainables()}
    reg = exp.config.regularizer
    if reg.learn_weights and method.use_cr:
        trainable["log_alpha_cr"] = jnp.float32(reg.init_log_weight)
    if reg.learn_weights and method.use_ortho:
        trainable["log_beta_ortho"] = jnp.float32(reg.init_log_weight)
    return trainable


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
    show = exp.config.progress and is_primary()
    stages = tqdm(range(num_stages), desc=method.name, disable=not show)
    for stage in stages:
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
            log.info("%s: restored stage %d from %s", method.name, stage, checkpoints.directory)
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
        log.info("%s stage %d: %s (final %s)", method.name, stage, row, info["final"])
        if checkpoints:
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
                    "slot": slot,
                    "task": stage_task_name(exp, method, stage),
                    "modality": "mixed" if method.joint else exp.tasks[stage].modality,
                    "rank": exp.config.lora.rank,
                    "alpha": exp.config.lora.alpha,
                    "targets": exp.targets,
                },
            )
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


def build_experiment(
    config: ExperimentConfig, tasks: list[TaskData], mesh: Mesh, base_params: dict
) -> Experiment:
    """Bundle a stream's tasks with the frozen backbone; checks the LoRA target patterns."""
    table = class_table(
        tasks,
        config.prompt_template,
        max_len=config.model.max_text_len,
        vocab_size=config.model.vocab_size,
    )
    targets = select_targets(base_params, config.lora.targets)
    return Experiment(config, tasks, table, mesh, base_params, targets)
