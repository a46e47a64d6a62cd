"""Loads one task from a TFDS image-classification dataset prepared under a data folder.

The dataset is opened from its prepared files (``dataset_info.json``, ``features.json`` and the
``array_record`` shards under ``<data_dir>/<name>/<version>/``), not from the catalog's builder
code, so nothing is ever downloaded or generated and TensorFlow is not needed: records are read
by random access through ``tfds``'s data source (``as_data_source``) and images decoded with
PIL. The data source is wrapped in a grain ``MapDataset`` read by threads (PIL decodes PNG/JPEG
with the GIL released), in record order.

In memory, like ``medmnist``: the training pipeline, the joint stage's union of tasks and the
evaluation all index ``TaskData`` arrays, and the lead's exact-resume contract (a batch is a pure
function of seed and step) rests on those arrays. So the split is decoded once, resized to the
model's image size as it is read, and only the ``max_train``/``max_test`` records are decoded at
all (a seeded subset chosen by index, which random access makes cheap). For PCAM (262,144 train
images of 96x96x3, 7.2 GB as uint8) set ``max_train`` to what fits in host memory; every
process of a multi-host run holds the whole task, as with ``medmnist``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import grain
import numpy as np

from mslora_jax.data.medmnist import resize_images
from mslora_jax.data.task import TaskData
from mslora_jax.errors import ConfigError, DataError

_CHUNK = 1024  # images decoded before one batched resize; bounds the float32 temporaries.
_READ_THREADS = min(16, os.cpu_count() or 1)


def load_tfds_task(
    tfds_name: str,
    *,
    data_dir: str | None,
    name: str,
    modality: str,
    class_names: Sequence[str] = (),
    train_split: str = "train",
    test_split: str = "test",
    image_key: str = "image",
    label_key: str = "label",
    image_size: int | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Reads ``train_split`` and ``test_split`` of the prepared dataset ``tfds_name`` as a task.

    ``data_dir`` is the TFDS data folder (None: TFDS's default, ``$TFDS_DATA_DIR`` or
    ``~/tensorflow_datasets``). ``class_names`` default to the names of the ``label_key``
    feature (a ``ClassLabel``); given, their count must match it. ``max_train``/``max_test`` keep
    a seeded random subset in record order (seeded as ``medmnist`` does), and ``image_size``
    resizes (antialiased bilinear, ``medmnist.resize_images``); grayscale is repeated to RGB.
    """
    where = f"tfds dataset {tfds_name!r} in {data_dir or 'the default TFDS data dir'}"
    for key, limit in (("max_train", max_train), ("max_test", max_test)):
        if limit is not None and limit < 1:
            raise ConfigError(f"{where}: {key} must be >= 1, got {limit}")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"{where}: image_size must be >= 1, got {image_size}")
    builder = _open_builder(tfds_name, data_dir, where)
    features = builder.info.features
    _check_image_feature(features, image_key, where)
    class_names = _class_names(features, label_key, class_names, where)
    # One child seed per split, as medmnist: max_train does not change which test images are kept.
    train_rng, test_rng = np.random.default_rng(seed).spawn(2)
    splits = {}
    for role, split, limit, rng in (
        ("train", train_split, max_train, train_rng),
        ("test", test_split, max_test, test_rng),
    ):
        source = _data_source(builder, split, (image_key, label_key), where)
        count = len(source)
        if count == 0:
            raise DataError(f"{where}: split {split!r} has no examples")
        keep = np.arange(count)
        if limit is not None and limit < count:
            keep = np.sort(rng.choice(count, size=limit, replace=False))
        images, labels = _read(
            source, keep, image_key, label_key, image_size, f"{where}, split {split!r}"
        )
        bad = labels[(labels < 0) | (labels >= len(class_names))]
        if bad.size:
            raise DataError(
                f"{where}: split {split!r} has label {bad[0]} outside the {len(class_names)} "
                f"class names {list(class_names)}"
            )
        splits[role] = images, labels
    return TaskData(
        name=name,
        modality=modality,
        class_names=class_names,
        train_images=splits["train"][0],
        train_labels=splits["train"][1],
        test_images=splits["test"][0],
        test_labels=splits["test"][1],
    )


def _open_builder(tfds_name: str, data_dir: str | None, where: str):
    """The read-only builder of the prepared files (never the catalog's code: that may download,
    and for catalog names it needs ``importlib_resources``, which tfds 4.9 does not install)."""
    from tensorflow_datasets.core import file_adapters, read_only_builder, registered

    try:
        builder = read_only_builder.builder_from_files(tfds_name, data_dir=data_dir)
    except registered.DatasetNotFoundError as error:
        folder = os.path.join(data_dir or "<data dir>", *tfds_name.replace(":", "/").split("/"))
        raise DataError(
            f"{where}: not prepared (no {folder}/.../dataset_info.json with features.json). "
            f"Prepare it with `tfds build {tfds_name} --data_dir=<dir> "
            "--file_format=array_record` (generating needs TensorFlow; reading here does not)"
        ) from error
    except (ValueError, OSError) as error:
        raise DataError(f"{where}: cannot read its dataset info ({error})") from error
    random_access = file_adapters.FileFormat.with_random_access()
    if not builder.info.available_file_formats() & set(random_access):
        stored = getattr(builder.info.file_format, "value", "an unknown format")
        raise DataError(
            f"{where}: prepared as {stored} at {builder.data_dir}; random "
            f"access needs {' or '.join(f.value for f in random_access)}. Re-prepare it with "
            f"`tfds build {tfds_name} --file_format=array_record`, or convert it with `tfds "
            f"convert_format --dataset_version_dir={builder.data_dir} "
            "--out_file_format=array_record --out_dir=<new dir>` (both need TensorFlow)"
        )
    return builder


def _check_image_feature(features, key: str, where: str) -> None:
    import tensorflow_datasets as tfds

    feature = _feature(features, key, "image_key", where)
    if not isinstance(feature, tfds.features.Image):
        raise DataError(
            f"{where}: feature {key!r} (image_key) must be an Image, got {type(feature).__name__}"
        )
    if feature.np_dtype != np.uint8 or feature.shape[-1] not in (1, 3):
        raise DataError(
            f"{where}: feature {key!r} must hold uint8 images with 1 or 3 channels, got "
            f"{feature.np_dtype} of shape {feature.shape}"
        )


def _class_names(features, key: str, given: Sequence[str], where: str) -> tuple[str, ...]:
    """``given`` or the label feature's names, checked against the feature's class count."""
    import tensorflow_datasets as tfds

    feature = _feature(features, key, "label_key", where)
    given = tuple(given)
    if isinstance(feature, tfds.features.ClassLabel):
        if given and len(given) != feature.num_classes:
            raise DataError(
                f"{where}: {len(given)} class_names {list(given)} given but feature {key!r} has "
                f"{feature.num_classes} classes {feature.names}"
            )
        names = given or tuple(feature.names)
    elif (
        isinstance(feature, tfds.features.Tensor)
        and feature.shape == ()
        and np.issubdtype(feature.np_dtype, np.integer)
    ):
        if not given:
            raise DataError(
                f"{where}: feature {key!r} is a plain integer without class names; set class_names"
            )
        names = given
    else:
        raise DataError(
            f"{where}: feature {key!r} (label_key) must be a ClassLabel or a scalar integer, got "
            f"{feature!r}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: class names must be unique, got {list(names)}")
    return names


def _feature(features, key: str, what: str, where: str):
    if key not in features.keys():
        raise DataError(
            f"{where}: no feature {key!r} ({what}); the dataset has {sorted(features.keys())}"
        )
    return features[key]


def _data_source(builder, split: str, keys: Sequence[str], where: str):
    """Random access to ``split``; features other than ``keys`` are left undecoded."""
    import tensorflow_datasets as tfds

    skip = {k: tfds.decode.SkipDecoding() for k in builder.info.features.keys() if k not in keys}
    try:
        return builder.as_data_source(split, decoders=skip)
    except ValueError as error:  # an unknown split, bad slice syntax, an empty slice
        raise DataError(
            f"{where}: cannot read split {split!r} ({str(error).splitlines()[0]}); the dataset "
            f"has splits {sorted(builder.info.splits)}"
        ) from error


def _read(source, keep: np.ndarray, image_key, label_key, image_size, where):
    """Decodes records ``keep`` (in order) into uint8 ``[N, S, S, 3]`` and int32 ``[N]``."""
    record = functools.partial(_record, source, keep, image_key, label_key, where)
    decoded = (
        grain.MapDataset.range(len(keep))
        .map(record)
        .to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=256))
    )
    labels = np.empty(len(keep), np.int32)
    out, chunk = None, []
    for i, (image, label) in enumerate(decoded):
        labels[i] = label
        chunk.append(image)
        if len(chunk) == _CHUNK or i == len(keep) - 1:
            images = _resized(chunk, image_size, where)
            if out is None:
                out = np.empty((len(keep), *images.shape[1:3], 3), np.uint8)
            elif images.shape[1:3] != out.shape[1:3]:
                raise DataError(
                    f"{where}: images of different sizes {out.shape[1:3]} and "
                    f"{images.shape[1:3]}; set the model's image_size to resize them"
                )
            out[i + 1 - len(chunk) : i + 1] = images  # [n, S, S, 1] broadcasts to RGB
            chunk = []
    return out, labels


def _record(source, keep, image_key, label_key, where, position: int):
    index = int(keep[position])
    try:
        example = source[index]
    except (RuntimeError, OSError, ValueError) as error:  # truncated or corrupt shards
        raise DataError(f"{where}: cannot read record {index} ({error})") from error
    image = np.asarray(example[image_key])
    image = image[..., None] if image.ndim == 2 else image  # a grayscale file in an RGB feature
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise DataError(f"{where}: record {index} decodes to an image of shape {image.shape}")
    return image, int(example[label_key])


def _resized(images: list[np.ndarray], image_size: int | None, where: str) -> np.ndarray:
    """``images`` ([H, W, C] each) as one ``[n, S, S, C]`` array, resized to ``image_size``."""
    if len({im.shape for im in images}) == 1:
        stacked = np.stack(images)
        if image_size is None or stacked.shape[1:3] == (image_size, image_size):
            return stacked
        return resize_images(stacked, image_size)
    if image_size is None:
        raise DataError(
            f"{where}: images of different sizes ({images[0].shape}, ...); set image_size"
        )
    return np.concatenate([resize_images(im[None], image_size) for im in images])
