"""How a run trains and evaluates: the adapters' training loop (``config.train``), in-stage
checkpoints (``config.checkpoint``), the backbone and its pretraining (``config.backbone``,
``config.pretrain``), the device mesh (``config.mesh``) and answer scoring (``config.eval``).

Split from ``experiment.py`` so each group of settings reads on its own; ``ExperimentConfig``
holds one of each.
"""

from __future__ import annotations

import dataclasses

from mslora_jax.errors import ConfigError
from mslora_jax.eval.scoring import METRIC_SETS

BACKBONE_SOURCES = ("pretrain", "random", "load")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64
    steps_per_task: int = 0  # > 0 overrides epochs
    epochs: float = 1.0
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 disables clipping
    learn_temperature: bool = False
    eval_batch_size: int = 256
    # Split each batch into this many micro-batches whose gradients are averaged before one
    # update: same batch size, a fraction of the activation memory (LLaVA/HF semantics: each
    # micro-batch's loss is its own mean; the dual encoder's negatives are its micro-batch).
    grad_accum_steps: int = 1
    # Instead of a count: micro-batches of this many rows (0: off), so the number of
    # micro-batches follows each task's batch size (24 -> 3 and 16 -> 2 for 8 rows) and the
    # activation memory is that of ``micro_batch_size`` rows whatever the task.
    micro_batch_size: int = 0
    # Training scalars (workdir/logs: train.jsonl, TensorBoard) every this many steps, and the
    # non-finite check's fetch; None: 25 (None so workdirs written before this key still match).
    log_every_steps: int | None = None
    # Input pipeline (mslora_jax.data.loader): when and where batches are built, never what they
    # hold. Batches built ahead in a background thread (None: 2; 0: on demand); worker processes
    # building them (None or 0: this process; they pay off for decoding VQA images, and start
    # anew, in seconds, for each stage's training and each evaluation); MiB of decoded VQA
    # training images cached per process (None: 1024; 0: none). Run-time knobs (RESUMABLE_KEYS).
    input_prefetch: int | None = None
    input_workers: int | None = None
    image_cache_mb: int | None = None

    def __post_init__(self):
        if self.log_every_steps is not None and self.log_every_steps < 1:
            raise ConfigError(f"train.log_every_steps must be >= 1, got {self.log_every_steps}")
        for key in ("input_prefetch", "input_workers", "image_cache_mb"):
            value = getattr(self, key)
            bad = isinstance(value, bool) or not isinstance(value, int) or value < 0
            if value is not None and bad:
                raise ConfigError(f"train.{key} must be an integer >= 0 (or None), got {value!r}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("train.batch_size and train.eval_batch_size must be >= 1")
        if self.micro_batch_size < 0:
            raise ConfigError(f"train.micro_batch_size must be >= 0, got {self.micro_batch_size}")
        if self.micro_batch_size and self.grad_accum_steps != 1:
            raise ConfigError(
                "set train.micro_batch_size or train.grad_accum_steps, not both "
                f"(got {self.micro_batch_size} and {self.grad_accum_steps})"
            )
        if self.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.steps_per_task < 0 or self.epochs <= 0:
            raise ConfigError("train.steps_per_task must be >= 0 and train.epochs > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self.accum_steps(self.batch_size, "train.batch_size")

    def accum_steps(self, batch_size: int, what: str = "batch_size") -> int:
        """Micro-batches per step for a batch of ``batch_size`` rows; ConfigError unless they
        divide it evenly."""
        if self.micro_batch_size:
            if batch_size % self.micro_batch_size:
                raise ConfigError(
                    f"{what}={batch_size} is not divisible by "
                    f"train.micro_batch_size={self.micro_batch_size}"
                )
            return batch_size // self.micro_batch_size
        if batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"{what}={batch_size} is not divisible by "
                f"train.grad_accum_steps={self.grad_accum_steps}"
            )
        return self.grad_accum_steps

    def input_options(self) -> dict:
        """``prefetch`` and ``num_workers`` for the input pipelines: those set (``input_*``);
        the pipelines' own defaults stand for the others."""
        options = {"prefetch": self.input_prefetch, "num_workers": self.input_workers}
        return {key: value for key, value in options.items() if value is not None}


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints inside a stage (``train.checkpoints.StepCheckpoints``): a run-time knob, so a
    resumed run may change it. Whatever these are, a stage's trained adapter is saved when its
    training ends, before its evaluation, and on SIGTERM."""

    every_steps: int | None = None  # also every this many steps of a stage; None: never
    keep: int | None = None  # in-stage checkpoints kept per stage, newest first; None: 2

    def __post_init__(self):
        for key in ("every_steps", "keep"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ConfigError(f"checkpoint.{key} must be >= 1 or None, got {value!r}")

    @property
    def max_to_keep(self) -> int:
        return self.keep or 2


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    steps: int = 600
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 1e-4


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    source: str = "pretrain"  # pretrain | random | load
    path: str = ""  # for source="load": a backbone folder written by a previous run

    def __post_init__(self):
        if self.source not in BACKBONE_SOURCES:
            raise ConfigError(
                f"backbone.source={self.source!r} is unknown; expected one of {BACKBONE_SOURCES}"
            )
        if self.source == "load" and not self.path:
            raise ConfigError('backbone.source="load" needs backbone.path')


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (``parallel.mesh``); -1 = the remaining devices (at most one)."""

    data: int = -1  # pure data parallelism: parameters replicated
    fsdp: int = 1  # batch and frozen weights split (FSDP)
    tensor: int = 1  # decoder heads / MLP / vocabulary split

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(
                f"mesh.data/fsdp/tensor = {sizes}: sizes must be >= 1, at most one of them -1"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How answers are scored (the generative model; the dual encoder's accuracy is unaffected)."""

    # "clean": mslora_jax.eval.answer_metrics; "released": the released MSLoRA-CR evaluator's
    # definitions, quirks included (mslora_jax.eval.released_metrics), for the paper's table.
    metrics: str = "clean"

    def __post_init__(self):
        if self.metrics not in METRIC_SETS:
            raise ConfigError(
                f"eval.metrics={self.metrics!r} is unknown; expected one of {METRIC_SETS}"
            )
