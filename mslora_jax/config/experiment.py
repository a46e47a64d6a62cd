"""The whole experiment (``ExperimentConfig``): which methods run over which stream of tasks, with
which model, and one of each group of settings from the sibling modules; the checks that span
groups (a method against the model kind, a task's batch size against gradient accumulation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mslora_jax.config.llava import LlavaSettings
from mslora_jax.config.lora import LoraConfig, RegularizerConfig
from mslora_jax.config.retrieval import RetrievalConfig
from mslora_jax.config.tasks import TaskConfig
from mslora_jax.config.training import (
    BackboneConfig,
    CheckpointConfig,
    EvalConfig,
    MeshConfig,
    PretrainConfig,
    TrainConfig,
)
from mslora_jax.errors import ConfigError
from mslora_jax.eval.answer_metrics import METRIC_NAMES
from mslora_jax.models.clip import ModelConfig

# The paper's methods (run when a config names none) and the continual-learning baselines
# (``train.methods``, docs/method.md, "Methods and baselines"); ``methods`` may name any of them.
PAPER_METHODS = ("each", "seq", "mslora", "mslora_cr", "mslora_cr_ortho", "joint")
BASELINE_METHODS = ("olora", "ewc", "lwf", "modx")
METHODS = PAPER_METHODS + BASELINE_METHODS
# Baselines that distil the dual encoder's outputs; a llava stream refuses them by name.
DUAL_ENCODER_ONLY = ("lwf", "modx")
MODEL_KINDS = ("dual_encoder", "llava")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    seed: int = 0
    methods: tuple[str, ...] = PAPER_METHODS
    modalities: tuple[str, ...] = ()
    # {modality} and {label} are filled in; the text tower reads the result.
    prompt_template: str = "a {modality} image of {label}"
    stream: tuple[TaskConfig, ...] = ()
    base_tasks: tuple[TaskConfig, ...] = ()  # for backbone pretraining, not part of the stream
    data_dir: str = ""  # medmnist files and tfds/vqa data folders are relative to this folder
    model_kind: str = "dual_encoder"  # dual_encoder | llava
    model: ModelConfig = ModelConfig()
    llava: LlavaSettings = LlavaSettings()
    lora: LoraConfig = LoraConfig()
    regularizer: RegularizerConfig = RegularizerConfig()
    train: TrainConfig = TrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    backbone: BackboneConfig = BackboneConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    num_devices: int = 0  # devices of the mesh; 0 = all (global) devices
    mesh: MeshConfig = MeshConfig()
    progress: bool = True
    eval: EvalConfig = EvalConfig()
    retrieval: RetrievalConfig = RetrievalConfig()

    def __post_init__(self):
        if self.model_kind not in MODEL_KINDS:
            raise ConfigError(f"model_kind={self.model_kind!r} is unknown; expected {MODEL_KINDS}")
        for method in self.methods:
            if method not in METHODS:
                raise ConfigError(f"unknown method {method!r}; expected one of {METHODS}")
        if not self.stream:
            raise ConfigError("config.stream is empty: list at least one task")
        names = [t.name for t in self.stream + self.base_tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"task names must be unique; repeated: {duplicates}")
        for task in self.stream + self.base_tasks:
            if self.modalities and task.modality not in self.modalities:
                raise ConfigError(
                    f"task {task.name!r}: unknown modality {task.modality!r}; "
                    f"config.modalities = {self.modalities}"
                )
        for task in self.stream:
            if task.batch_size:
                self.train.accum_steps(task.batch_size, f"task {task.name!r}: batch_size")
        rates = {t.name: t.learning_rate or self.train.learning_rate for t in self.stream}
        if "joint" in self.methods and len(set(rates.values())) > 1:
            # One stage, one optimizer: per-task rates cannot be honoured, so refuse rather
            # than silently train at train.learning_rate (per-task epochs are honoured).
            raise ConfigError(
                "method 'joint' trains every task in one stage at one learning rate, but the "
                f"stream's tasks set different learning_rate values {rates}; drop 'joint' from "
                "methods or give the tasks one learning rate"
            )
        if self.backbone.source == "pretrain" and not self.base_tasks:
            raise ConfigError('backbone.source="pretrain" needs config.base_tasks')
        if self.model_kind == "llava":
            if self.retrieval.enabled:
                raise ConfigError(
                    "retrieval.enabled needs image and text embeddings: it runs with "
                    "model_kind='dual_encoder', not 'llava'"
                )
            for method in self.methods:
                if method in DUAL_ENCODER_ONLY:
                    raise ConfigError(
                        f"method {method!r} distils the dual encoder's image-text logits and is "
                        "not implemented for model_kind='llava'; drop it from methods"
                    )
            for task in self.stream:
                if task.source == "tfds":
                    raise ConfigError(
                        f"task {task.name!r}: source='tfds' is a classification task for "
                        "model_kind='dual_encoder'; a llava stream reads vqa (or synthetic) tasks"
                    )
                if task.primary_metric not in METRIC_NAMES:
                    raise ConfigError(
                        f"task {task.name!r}: primary_metric={task.primary_metric!r} is unknown; "
                        f"expected one of {METRIC_NAMES}"
                    )

    def stage_batch_size(self, task_indices: Sequence[int]) -> int:
        """The global batch size of a stage training the stream tasks ``task_indices``.

        Each task's own ``batch_size``, else ``train.batch_size``; a stage over several tasks
        (``joint``) uses their common batch size if they all agree, else ``train.batch_size``.
        """
        sizes = {self.stream[i].batch_size or self.train.batch_size for i in task_indices}
        return sizes.pop() if len(sizes) == 1 else self.train.batch_size

    def task_index(self, name_or_id: str | int) -> int:
        """Stream position of a task given by name or id; ConfigError if there is none."""
        names = [t.name for t in self.stream]
        if isinstance(name_or_id, int) or str(name_or_id).isdigit():
            index = int(name_or_id)
            if not 0 <= index < len(names):
                raise ConfigError(f"task id {index} is out of range: the stream has {len(names)}")
            return index
        if name_or_id not in names:
            raise ConfigError(f"unknown task name {name_or_id!r}; the stream has {names}")
        return names.index(name_or_id)
