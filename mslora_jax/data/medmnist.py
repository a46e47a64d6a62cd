"""Loads one task from a MedMNIST-layout ``.npz`` file (the real-data path).

Layout: ``{train,val,test}_images`` uint8 ``[N, H, W]`` (grayscale) or ``[N, H, W, 3]`` (RGB) and
``{train,val,test}_labels`` integer ``[N, 1]`` or ``[N]``. Every problem with the file is reported
as a ``DataError`` naming the file, so the command line can print one clear line.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Sequence

import numpy as np

from mslora_jax.data.task import TaskData
from mslora_jax.errors import ConfigError, DataError

_TEST_SPLITS = ("test", "val")
_RESIZE_CHUNK = 4096  # images per resize step; bounds the float32 temporaries.


def load_medmnist_task(
    path: str | os.PathLike,
    *,
    name: str,
    modality: str,
    class_names: Sequence[str],
    labels: Sequence[int] | None = None,
    image_size: int | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    test_split: str = "test",
    seed: int = 0,
) -> TaskData:
    """Reads train and ``test_split`` ("test" or "val") of a MedMNIST ``.npz`` as a ``TaskData``.

    ``labels`` selects a subset of the file's label ids and renumbers them ``0..len(labels)-1`` in
    the given order (e.g. MedNIST's CT-only classes as one task); ``class_names`` names the
    resulting classes. ``max_train``/``max_test`` keep a seeded random subset (in file order),
    and ``image_size`` resizes (antialiased bilinear) when it differs from the file's.
    """
    class_names = tuple(class_names)
    _check_options(path, class_names, labels, image_size, max_train, max_test, test_split)
    arrays = _read_npz(path, ("train", test_split))
    rng = np.random.default_rng(seed)
    # One child seed per split, so max_train does not change which test images are kept.
    train_rng, test_rng = rng.spawn(2)
    splits = {}
    for split, limit, split_rng in (
        ("train", max_train, train_rng),
        (test_split, max_test, test_rng),
    ):
        images, split_labels = _validated_split(path, arrays, split)
        captions = _validated_captions(path, arrays, split, len(images))
        rows, split_labels = _select_classes(
            path, split, np.arange(len(images)), split_labels, class_names, labels
        )
        images = images[rows]
        captions = None if captions is None else captions[rows]
        if not len(split_labels):  # nothing to train on, or an accuracy over no images
            chosen = f" with label ids {list(labels)}" if labels is not None else ""
            raise DataError(f"{path}: the {split} split has no images{chosen}")
        if limit is not None and limit < len(split_labels):
            keep = np.sort(split_rng.choice(len(split_labels), size=limit, replace=False))
            images, split_labels = images[keep], split_labels[keep]
            captions = None if captions is None else captions[keep]
        text = None if captions is None else tuple(str(c) for c in captions)
        splits[split] = (_rgb_at_size(images, image_size), split_labels, text)
    return TaskData(
        name=name,
        modality=modality,
        class_names=class_names,
        train_images=splits["train"][0],
        train_labels=splits["train"][1],
        test_images=splits[test_split][0],
        test_labels=splits[test_split][1],
        train_captions=splits["train"][2],
        test_captions=splits[test_split][2],
    )


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resizes uint8 ``[N, H, W]`` or ``[N, H, W, C]`` to ``size x size``.

    Matches ``jax.image.resize(..., method="linear", antialias=True)``: a triangle kernel widened
    by the downscale factor, applied separably as two small matrices.
    """
    rows = _linear_weights(images.shape[1], size)
    cols = _linear_weights(images.shape[2], size)
    out = np.empty((images.shape[0], size, size, *images.shape[3:]), np.uint8)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].astype(np.float32)
        resized = np.einsum("oh,nhw...,pw->nop...", rows, chunk, cols, optimize=True)
        out[start : start + _RESIZE_CHUNK] = np.clip(np.rint(resized), 0, 255)
    return out


def _linear_weights(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` interpolation matrix with half-pixel centres, rows summing to 1."""
    scale = out_size / in_size
    kernel_scale = max(1.0 / scale, 1.0)  # widen the kernel when shrinking (antialiasing)
    centres = (np.arange(out_size) + 0.5) / scale - 0.5
    dist = (np.arange(in_size)[None, :] - centres[:, None]) / kernel_scale
    weights = np.maximum(0.0, 1.0 - np.abs(dist))
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _check_options(path, class_names, labels, image_size, max_train, max_test, test_split):
    if test_split not in _TEST_SPLITS:
        raise ConfigError(f"{path}: test_split must be one of {_TEST_SPLITS}, got {test_split!r}")
    if not class_names or len(set(class_names)) != len(class_names):
        raise ConfigError(f"{path}: class_names must be non-empty and unique, got {class_names}")
    if labels is not None:
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{path}: labels must be unique, got {list(labels)}")
        if any(label < 0 for label in labels):
            raise ConfigError(f"{path}: labels must be >= 0, got {list(labels)}")
        if len(labels) != len(class_names):
            raise ConfigError(
                f"{path}: {len(labels)} label ids {list(labels)} selected but "
                f"{len(class_names)} class_names given"
            )
    if image_size is not None and image_size < 1:
        raise ConfigError(f"{path}: image_size must be >= 1, got {image_size}")
    for key, limit in (("max_train", max_train), ("max_test", max_test)):
        if limit is not None and limit < 1:
            raise ConfigError(f"{path}: {key} must be >= 1, got {limit}")


def _read_npz(path, splits: Sequence[str]) -> dict[str, np.ndarray]:
    """Reads the image and label arrays of ``splits``; any unreadable file is a ``DataError``."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    keys = [f"{split}_{kind}" for split in splits for kind in ("images", "labels")]
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        # Neither zip nor .npy magic makes numpy try pickle; that message would only mislead.
        detail = "unrecognised format" if "pickle" in str(error) else str(error)
        raise DataError(
            f"{path}: not a valid .npz file, corrupt or truncated ({detail})"
        ) from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an .npz archive (it holds a single .npy array)")
    with archive:
        missing = [key for key in keys if key not in archive.files]
        if missing:
            raise DataError(
                f"{path}: missing key {missing[0]!r} (file has {sorted(archive.files)})"
            )
        # Captions are optional, but both splits or neither (TaskData checks the pairing).
        keys += [f"{split}_captions" for split in splits if f"{split}_captions" in archive.files]
        try:
            return {key: archive[key] for key in keys}
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as error:
            raise DataError(f"{path}: corrupt array in .npz file ({error})") from error


def _validated_split(path, arrays, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {split}_images must be uint8, got {images.dtype}")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise DataError(
            f"{path}: {split}_images must be [N, H, W] or [N, H, W, 3], got shape {images.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {split}_labels must be integers, got {labels.dtype}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{path}: {split}_labels must be [N] or [N, 1], got shape {labels.shape}")
    if len(labels) != len(images):
        raise DataError(
            f"{path}: {split}_labels has {len(labels)} entries but {split}_images has "
            f"{len(images)} images"
        )
    return images, labels.astype(np.int64)


def read_split(path, split: str, image_size: int | None = None):
    """(images uint8 ``[N, S, S, 3]``, labels int32, captions or None) of one split of a
    MedMNIST-layout ``.npz``, all of it, labels as stored (for indexing outside a run)."""
    arrays = _read_npz(path, (split,))
    images, labels = _validated_split(path, arrays, split)
    captions = _validated_captions(path, arrays, split, len(images))
    text = None if captions is None else tuple(str(c) for c in captions)
    return _rgb_at_size(images, image_size), labels.astype(np.int32), text


def _rgb_at_size(images: np.ndarray, image_size: int | None) -> np.ndarray:
    """Images resized to ``image_size`` (when given and different), grayscale repeated to 3
    channels: uint8 ``[N, S, S, 3]``."""
    if image_size is not None and image_size != images.shape[1]:
        images = resize_images(images, image_size)
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    return np.ascontiguousarray(images)


def _validated_captions(path, arrays, split: str, count: int) -> np.ndarray | None:
    """``{split}_captions`` as a string array of ``count`` entries, or None if absent."""
    captions = arrays.get(f"{split}_captions")
    if captions is None:
        return None
    if captions.dtype.kind != "U" or captions.ndim != 1:
        raise DataError(
            f"{path}: {split}_captions must be a 1-d array of strings, got {captions.dtype} "
            f"with shape {captions.shape}"
        )
    if len(captions) != count:
        raise DataError(
            f"{path}: {split}_captions has {len(captions)} entries but {split}_images has "
            f"{count} images"
        )
    empty = np.flatnonzero(np.char.str_len(np.char.strip(captions)) == 0)
    if len(empty):
        raise DataError(f"{path}: {split}_captions entry {empty[0]} is empty")
    return captions


def _select_classes(path, split, images, labels, class_names, wanted):
    """Keeps the rows whose label is in ``wanted`` and renumbers them; checks label ranges."""
    if wanted is None:
        bad = labels[(labels < 0) | (labels >= len(class_names))]
        if bad.size:
            raise DataError(
                f"{path}: {split}_labels contains label {bad[0]} outside class_names "
                f"(expected 0..{len(class_names) - 1} for {len(class_names)} names)"
            )
        return images, labels.astype(np.int32)
    present = np.unique(labels)
    if split == "train":
        absent = [int(label) for label in wanted if label not in present]
        if absent:
            raise DataError(
                f"{path}: requested label id {absent[0]} not present in {split}_labels "
                f"(file has {present.tolist()})"
            )
    keep = np.isin(labels, np.asarray(wanted))
    # Lookup table from original id to its position in ``wanted``.
    table = np.full(max(int(present.max(initial=0)), max(wanted)) + 1, -1, np.int32)
    table[np.asarray(wanted)] = np.arange(len(wanted), dtype=np.int32)
    return images[keep], table[labels[keep]]
