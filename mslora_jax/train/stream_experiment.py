"""The part of a stream experiment that every model shares: tasks, frozen backbone, mesh, the
compiled train step, and the adapter stack it trains one slot at a time.

Model-specific experiments subclass ``StreamExperiment`` (``families.dual_encoder.experiment``,
``families.llava.experiment``); ``train.stream`` learns the stream with one method over any of them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mslora_jax.config import ExperimentConfig
from mslora_jax.errors import ConfigError
from mslora_jax.lora.adapter import init_adapter_params, stack_params
from mslora_jax.lora.merge import merge_stack, with_kernels
from mslora_jax.lora.targets import get_by_path
from mslora_jax.parallel.mesh import check_divisible, round_up_to_batch_shards
from mslora_jax.parallel.rules import ShardingRules
from mslora_jax.parallel.sharded_jit import ShardedOutputs, ShardedStep
from mslora_jax.train.adapter_loss import regularized_adapter_loss
from mslora_jax.train.methods import Method, get_method, task_slots
from mslora_jax.train.optim import make_optimizer
from mslora_jax.train.step import TrainState, init_train_state, make_train_step

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
        self.loss_fn = self._loss(None)
        self.train_step = self._step(self.loss_fn)
        self._term_steps: dict[str, ShardedStep] = {}
        self._fisher_fn = None  # EWC's compiled Fisher step (``train.baselines``), when needed
        self._sharded_builders()
        self.eval_batch_size = round_up_to_batch_shards(config.train.eval_batch_size, mesh)

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

    def embed_images(self, slots: dict[int, dict], active: list[int], images) -> np.ndarray:
        """Unit embeddings ``[N, D]`` of ``images`` with the adapters ``active`` (of ``slots``)
        summed (continual retrieval, ``mslora_jax.continual_retrieval``)."""
        raise ConfigError(f"{type(self).__name__} has no image embeddings for retrieval")

    def embed_class_prompts(
        self, slots: dict[int, dict], active: list[int], task: int
    ) -> np.ndarray:
        """Unit embeddings ``[C, D]`` of ``task``'s class prompts, one per class in label order,
        with the adapters ``active`` (of ``slots``) summed."""
        raise ConfigError(f"{type(self).__name__} has no text embeddings for retrieval")

    def embed_texts(self, slots: dict[int, dict], active: list[int], texts) -> np.ndarray:
        """Unit embeddings ``[N, D]`` of ``texts`` (e.g. captions), tokenized as the run's
        class prompts are, with the adapters ``active`` (of ``slots``) summed."""
        raise ConfigError(f"{type(self).__name__} has no text embeddings for retrieval")

    def distillation(self, term: str):
        """The ``DistillFn`` of the output-distilling baselines (``lwf``, ``modx``)."""
        raise ConfigError(f"method {term!r} is not implemented for {type(self).__name__}")

    def distill_inputs(self, task: int) -> dict:
        """AdapterContext fields the ``lwf`` term reads at ``task``'s stage."""
        return {}

    def _loss(self, term: str | None):
        """The regularized adapter loss, plus the baseline term ``term`` (None: none)."""
        return regularized_adapter_loss(
            self.task_loss(),
            folded=self.fold_frozen,
            cr_distance=self.config.regularizer.cr_distance,
            scaling=self.scaling,
            term=term,
            distill=self.distillation(term) if term in ("lwf", "modx") else None,
        )

    def _step(self, loss_fn) -> ShardedStep:
        train = self.config.train
        step = make_train_step(
            loss_fn, self.optimizer, train.grad_accum_steps, train.micro_batch_size
        )
        return ShardedStep(step, self.rules)

    def loss_for(self, method: Method):
        """The loss of ``method``: ``loss_fn`` for the paper's methods, ``loss_fn`` plus the
        baseline's term (``Method.term``) for a baseline."""
        return self.loss_fn if method.term is None else self._loss(method.term)

    def train_step_for(self, method: Method) -> ShardedStep:
        """The compiled step of ``method``: the shared ``train_step`` for the paper's methods,
        one with the baseline's term for each baseline (compiled once each)."""
        term = method.term
        if term is None:
            return self.train_step
        if term not in self._term_steps:
            self._term_steps[term] = self._step(self.loss_for(method))
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
        """Each task's adapter slot under ``lora.granularity`` (``methods.task_slots``)."""
        return task_slots(self.config.lora.granularity, [task.modality for task in self.tasks])

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
