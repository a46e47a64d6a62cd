"""The in-memory form of one task of the stream: images, labels, class names, modality."""

from __future__ import annotations

import dataclasses

import numpy as np

from mslora_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One classification task.

    Images are uint8 ``[N, H, W, 3]`` (grayscale sources are repeated to 3 channels); labels are
    int32 ``[N]`` in ``[0, len(class_names))``. The class names become the text prompts, so tasks
    with different label sets share one model without per-task heads.
    """

    name: str
    modality: str
    class_names: tuple[str, ...]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    # One caption per image (captioned tasks: paired image-text retrieval and training), or
    # None. A caption describes its own image beyond the class.
    train_captions: tuple[str, ...] | None = None
    test_captions: tuple[str, ...] | None = None

    def __post_init__(self):
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise DataError(
                    f"task {self.name!r}: {split}_images must be uint8 [N, H, W, 3], "
                    f"got {images.dtype} {images.shape}"
                )
            if labels.shape != (images.shape[0],):
                raise DataError(
                    f"task {self.name!r}: {split}_labels must have shape ({images.shape[0]},), "
                    f"got {labels.shape}"
                )
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
                raise DataError(
                    f"task {self.name!r}: {split}_labels must lie in [0, {len(self.class_names)}),"
                    f" got range [{labels.min()}, {labels.max()}]"
                )

        if (self.train_captions is None) != (self.test_captions is None):
            raise DataError(
                f"task {self.name!r}: captions must be given for both splits or for neither"
            )
        for split in ("train", "test") if self.has_captions else ():
            captions = getattr(self, f"{split}_captions")
            count = len(getattr(self, f"{split}_labels"))
            if len(captions) != count:
                raise DataError(
                    f"task {self.name!r}: {len(captions)} {split} captions for {count} images"
                )
            empty = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
            if empty:
                raise DataError(f"task {self.name!r}: {split} caption {empty[0]} is empty")

    @property
    def has_captions(self) -> bool:
        return self.train_captions is not None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])
