"""One task of the stream or of backbone pretraining (``TaskConfig``: where its data comes from
and its per-task overrides), and helpers that write synthetic task entries for config files.

Split from ``experiment.py`` so the task settings read on their own; ``ExperimentConfig.stream``
and ``base_tasks`` hold these.
"""

from __future__ import annotations

import dataclasses

from mslora_jax.errors import ConfigError

TASK_SOURCES = ("synthetic", "medmnist", "tfds", "vqa")


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
    # Generate a caption per image from the latent factors that render it (data.synthetic);
    # a medmnist .npz carries its own (train_captions / test_captions keys).
    captions: bool = False
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
        if self.captions and self.source != "synthetic":
            raise ConfigError(
                f"task {self.name!r}: captions=True generates captions for synthetic tasks; a "
                f"{self.source} task carries its own (a medmnist .npz: train_captions and "
                "test_captions keys)"
            )
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


def synthetic_task(
    name: str,
    modality: str,
    seed: int,
    num_classes: int = 4,
    num_train: int = 1024,
    num_test: int = 512,
    captions: bool = False,
) -> dict:
    """A synthetic task entry for ``config.stream``/``config.base_tasks`` (for config files)."""
    entry = dict(
        name=name,
        modality=modality,
        source="synthetic",
        num_classes=num_classes,
        seed=seed,
        num_train=num_train,
        num_test=num_test,
    )
    return {**entry, "captions": True} if captions else entry


def synthetic_base_tasks(
    modalities: tuple[str, ...] = ("pathology", "radiology", "dermatology"),
    per_modality: int = 2,
    num_classes: int = 6,
    num_train: int = 2048,
    captions: bool = False,
) -> list[dict]:
    """Pretraining tasks for a backbone: ``per_modality`` synthetic tasks of each modality
    (``captions``: pretrained on image-caption pairs, as a CLIP is).

    Their seeds (1000 + ...) never collide with the stream seeds used in the shipped configs.
    """
    return [
        synthetic_task(
            f"base_{m}_{i}",
            m,
            seed=1000 + 10 * j + i,
            num_classes=num_classes,
            num_train=num_train,
            captions=captions,
        )
        for j, m in enumerate(modalities)
        for i in range(per_modality)
    ]
