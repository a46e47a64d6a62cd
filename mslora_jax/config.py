"""Typed, frozen library options, converted from an ``ml_collections.ConfigDict`` at the edge.

Experiment files (``configs/*.py``) return a ConfigDict so users can copy, edit and override them
from the command line. The library itself only ever sees these dataclasses, which reject unknown
keys and bad values with an error naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from mslora_jax.data.chat_template import ChatTemplate
from mslora_jax.errors import ConfigError
from mslora_jax.eval.answer_metrics import METRIC_NAMES
from mslora_jax.eval.scoring import METRIC_SETS
from mslora_jax.losses.regularizers import CR_DISTANCES
from mslora_jax.models.clip import ModelConfig, check_image_stats
from mslora_jax.models.decoder import ATTENTION_KERNELS, DecoderConfig
from mslora_jax.models.llava import LlavaConfig

# The paper's methods (run when a config names none) and the continual-learning baselines
# (``train.methods``, README "The method in a paragraph"); ``methods`` may name any of them.
PAPER_METHODS = ("each", "seq", "mslora", "mslora_cr", "mslora_cr_ortho", "joint")
BASELINE_METHODS = ("olora", "ewc", "lwf", "modx")
METHODS = PAPER_METHODS + BASELINE_METHODS
# Baselines that distil the dual encoder's outputs; a llava stream refuses them by name.
DUAL_ENCODER_ONLY = ("lwf", "modx")
TASK_SOURCES = ("synthetic", "medmnist", "tfds", "vqa")
MODEL_KINDS = ("dual_encoder", "llava")
BACKBONE_SOURCES = ("pretrain", "random", "load")


# lora.fold_frozen. "auto" stacks bf16 kernels: rounding W + delta to bf16 moves every entry by
# up to half its bf16 spacing (2^-9 of |W|), the order of a small trained delta's entries, and the
# merged copy of the adapted kernels would cost a second backbone's memory where it is tightest.
FOLD_MODES = ("auto", "merge", "stack")
GRANULARITIES = ("task", "modality")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 8.0
    # Regexes over module paths (re.search), e.g. "attn/(q|v)$" or "^image/"; see lora.targets.
    targets: tuple[str, ...] = (r"attn/(q|k|v|out)$", r"mlp/(fc1|fc2)$")
    dropout: float = 0.0
    # How a stage's frozen adapters enter the training forward: "merge" (their weighted deltas
    # folded into the frozen kernels once per stage: the step costs one adapter whatever the
    # number of tasks), "stack" (the [T, ...] stack summed in every layer, exact in any dtype)
    # or "auto": merge float32 kernels, stack lower-precision ones (see ``FOLD_MODES``).
    fold_frozen: str = "auto"
    # "task": one adapter per task (the paper). "modality": one per modality; a later task of a
    # seen modality continues that adapter (fresh optimizer state), the others stay frozen.
    granularity: str = "task"

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"lora.granularity={self.granularity!r} is unknown; expected one of {GRANULARITIES}"
            )
        if self.fold_frozen not in FOLD_MODES:
            raise ConfigError(
                f"lora.fold_frozen={self.fold_frozen!r} is unknown; expected one of {FOLD_MODES}"
            )


@dataclasses.dataclass(frozen=True)
class RegularizerConfig:
    alpha_cr: float = 0.1
    beta_ortho: float = 0.01
    # Learn each weight as exp(w), w initialised at init_log_weight (as released with the paper).
    learn_weights: bool = False
    init_log_weight: float = -4.6
    # The CR distance between adapters (mslora_jax.losses.regularizers): "released" (each A and
    # B matrix's Frobenius distance, as released), "normalized" (each divided by sqrt(numel)) or
    # "delta_w" (per layer, ||s B_c A_c - s B_t A_t||_F with s = alpha / rank).
    cr_distance: str = "released"
    # The baselines' weights (mslora_jax.losses.continual; README, "The method in a paragraph").
    # O-LoRA: lambda_1 of sum |A_c A_i^T| (0.5, O-LoRA's released lamda_1).
    olora_lambda: float = 0.5
    # EWC: lambda of (lambda / 2) sum F (theta - theta*)^2; F from this many batches per task.
    ewc_lambda: float = 100.0
    ewc_fisher_batches: int = 8
    # LwF: lambda_o of the KL to the previous model's class logits at temperature T (LwF's 1, 2).
    lwf_lambda: float = 1.0
    lwf_temperature: float = 2.0
    # Mod-X: alpha of the in-batch similarity distillation (20, as Mod-X's released scripts).
    modx_lambda: float = 20.0

    def __post_init__(self):
        if self.cr_distance not in CR_DISTANCES:
            raise ConfigError(
                f"regularizer.cr_distance={self.cr_distance!r} is unknown; expected one of "
                f"{CR_DISTANCES}"
            )
        for key in ("olora_lambda", "ewc_lambda", "lwf_lambda", "modx_lambda"):
            if getattr(self, key) < 0:
                raise ConfigError(f"regularizer.{key} must be >= 0, got {getattr(self, key)}")
        if self.ewc_fisher_batches < 1:
            raise ConfigError(
                f"regularizer.ewc_fisher_batches must be >= 1, got {self.ewc_fisher_batches}"
            )
        if self.lwf_temperature <= 0:
            raise ConfigError(
                f"regularizer.lwf_temperature must be > 0, got {self.lwf_temperature}"
            )


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
class TaskConfig:
    """One task: synthetic (generated from a seed), medmnist (read from an .npz file), tfds (a
    prepared TFDS dataset) or vqa (the paper's JSON layout)."""

    name: str
    modality: str
    source: str = "synthetic"
    # synthetic
    num_classes: int = 4
    seed: int = 0
    num_train: int = 1024
    num_test: int = 512
    # medmnist
    file: str = ""
    class_names: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()  # subset of the file's label ids, remapped to 0..n-1
    max_train: int = 0  # 0 = all
    max_test: int = 0
    # tfds: a TFDS image-classification dataset prepared (as array_record) under
    # data_dir/tfds_data_dir, read from its files; class_names default to the label feature's
    # names and max_train/max_test cap it as above. None = the default in the comment (None, so
    # workdirs written before these keys existed still match).
    tfds_name: str | None = None  # e.g. "patch_camelyon", "name:1.2.0", "name/config"
    tfds_data_dir: str | None = None  # relative to data_dir (None: data_dir itself)
    train_split: str | None = None  # "train"; TFDS split syntax, e.g. "train[:90%]"
    test_split: str | None = None  # "test"; e.g. "validation"
    image_key: str | None = None  # "image"
    label_key: str | None = None  # "label"
    # vqa (the paper's format, files relative to data_dir/<folder or name>/)
    folder: str = ""  # defaults to the task name
    train_file: str = "train.json"
    test_file: str = "test.jsonl"
    image_dir: str = "images"
    primary_metric: str = "closed_accuracy"
    # per-task overrides of the train config (0 = use train.*)
    learning_rate: float = 0.0
    epochs: float = 0.0
    batch_size: int | None = None  # global sequences per step; None or 0 = train.batch_size

    def __post_init__(self):
        if self.source not in TASK_SOURCES:
            raise ConfigError(
                f"task {self.name!r}: source={self.source!r} is unknown; "
                f"expected one of {TASK_SOURCES}"
            )
        if self.source == "medmnist" and not (self.file and self.class_names):
            raise ConfigError(f"task {self.name!r}: a medmnist task needs file and class_names")
        self._check_tfds_keys()
        if self.source == "synthetic" and min(self.num_train, self.num_test) < 1:
            raise ConfigError(
                f"task {self.name!r}: num_train and num_test must be >= 1 (an empty split), got "
                f"{self.num_train} and {self.num_test}"
            )
        size = self.batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ConfigError(
                f"task {self.name!r}: batch_size={size!r} must be an integer >= 1 "
                "(or 0 / None for train.batch_size)"
            )

    def _check_tfds_keys(self) -> None:
        keys = ("tfds_name", "tfds_data_dir", "train_split", "test_split", "image_key", "label_key")
        given = {key: getattr(self, key) for key in keys if getattr(self, key) is not None}
        if self.source != "tfds":
            if given:
                raise ConfigError(
                    f"task {self.name!r}: {sorted(given)} only apply to source='tfds' "
                    f"(this task has source={self.source!r})"
                )
            return
        for key, value in given.items():  # _convert passes `str | None` through unchecked
            if not isinstance(value, str) or (key != "tfds_data_dir" and not value):
                raise ConfigError(
                    f"task {self.name!r}: {key} must be a non-empty string, got {value!r}"
                )
        if not self.tfds_name:
            raise ConfigError(
                f"task {self.name!r}: a tfds task needs tfds_name (e.g. 'patch_camelyon')"
            )
        if self.labels:
            raise ConfigError(
                f"task {self.name!r}: labels (a subset of label ids) is not supported for tfds "
                "tasks: choosing rows by label would decode every record of the split"
            )


DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LlavaSettings:
    """The generative model (``model_kind="llava"``): ViT sizes, its layer, and the decoder."""

    vision: ModelConfig = ModelConfig()
    vision_layer: int = -2
    decoder: DecoderConfig = DecoderConfig(
        vocab_size=512, width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=128, max_len=256
    )
    image_token_id: int = 4  # "<image>" in mslora_jax.data.conversation.SPECIAL_TOKENS
    # Centre non-square images on a square before resizing (LLaVA's image_aspect_ratio="pad")
    # instead of squashing them.
    pad_to_square: bool = False
    max_len: int = 160  # text tokens per training sequence (before the image tokens are spliced)
    max_new_tokens: int = 8  # generated answer length limit at evaluation
    tokenizer_file: str = ""  # a tokenizer.json; empty: build a byte-level BPE from the data
    tokenizer_vocab_size: int = 512  # for a built tokenizer
    # Conversation template (mslora_jax.data.chat_template): "vicuna_v1" (LLaVA v1) or
    # "mistral_instruct" (LLaVA-Med v1.5's); system line: None = the template's default.
    template: str = "vicuna_v1"
    system_prompt: str | None = None
    # Image normalization per RGB channel, on [0, 1] pixels: (x - mean) / std. None: x * 2 - 1
    # (what the backbones trained here use); a released CLIP tower needs CLIP's mean and std.
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    # Recompute decoder blocks in the backward pass instead of keeping their activations: what
    # makes a 7B decoder's LoRA training fit (experiments/bench_memory.py); same results.
    remat: bool = False
    # Decoder attention scores computed this many queries at a time (0: all at once). Same
    # values; the float32 [B, heads, L, L] scores of long sequences no longer fill memory.
    attention_chunk: int = 0
    # Attention kernel of the cache-free forward (training): None or "xla"
    # (jax.nn.dot_product_attention, any backend), "splash" (the Pallas flash kernel for TPUs:
    # no [B, H, L, L] scores, causal blocks skipped; needs TPU devices) or "splash_interpret"
    # (that kernel interpreted, any backend, slow: for checking). Generation with the KV cache
    # always uses XLA's. (None, not "xla", is the default so workdirs written before this key
    # existed still match.)
    attention_kernel: str | None = None
    # Frozen backbone and activations in "bfloat16" (half the memory; LoRA adapters, their
    # optimizer and the loss stay float32) or "float32".
    dtype: str = "float32"

    def __post_init__(self):
        ChatTemplate(self.template, self.system_prompt)  # raises for an unknown template
        if self.attention_chunk < 0:
            raise ConfigError(f"llava.attention_chunk must be >= 0, got {self.attention_chunk}")
        if self.attention_kernel is not None and self.attention_kernel not in ATTENTION_KERNELS:
            raise ConfigError(
                f"llava.attention_kernel={self.attention_kernel!r} is unknown; expected one of "
                f"{ATTENTION_KERNELS}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"llava.dtype={self.dtype!r} is unknown; expected one of {DTYPES}")
        mean, std = check_image_stats(self.image_mean, self.image_std, "llava")
        object.__setattr__(self, "image_mean", mean)  # lists from a ConfigDict -> tuples
        object.__setattr__(self, "image_std", std)

    def model_config(self) -> LlavaConfig:
        """The model's own config (the training-only fields above are left out)."""
        return LlavaConfig(
            vision=self.vision,
            vision_layer=self.vision_layer,
            decoder=self.decoder,
            image_token_id=self.image_token_id,
        )


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


def synthetic_task(
    name: str,
    modality: str,
    seed: int,
    num_classes: int = 4,
    num_train: int = 1024,
    num_test: int = 512,
) -> dict:
    """A synthetic task entry for ``config.stream``/``config.base_tasks`` (for config files)."""
    return dict(
        name=name,
        modality=modality,
        source="synthetic",
        num_classes=num_classes,
        seed=seed,
        num_train=num_train,
        num_test=num_test,
    )


def synthetic_base_tasks(
    modalities: tuple[str, ...] = ("pathology", "radiology", "dermatology"),
    per_modality: int = 2,
    num_classes: int = 6,
    num_train: int = 2048,
) -> list[dict]:
    """Pretraining tasks for a backbone: ``per_modality`` synthetic tasks of each modality.

    Their seeds (1000 + ...) never collide with the stream seeds used in the shipped configs.
    """
    return [
        synthetic_task(
            f"base_{m}_{i}", m, seed=1000 + 10 * j + i, num_classes=num_classes, num_train=num_train
        )
        for j, m in enumerate(modalities)
        for i in range(per_modality)
    ]


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return from_mapping(tp, value, where)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_type, _) = typing.get_args(tp)
        return tuple(_convert(item_type, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def from_mapping(cls: type, mapping: Mapping, where: str = "config"):
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'{where}.{k}' for k in unknown]}; known: {sorted(known)}"
        )
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in mapping.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from e


def experiment_config(config: Any) -> ExperimentConfig:
    """Convert a ConfigDict (or plain nested dict) into an ``ExperimentConfig``."""
    mapping = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return from_mapping(ExperimentConfig, mapping)


def to_json_dict(config: ExperimentConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))
