"""Tests for the MedMNIST ``.npz`` loader, on small files written by the tests."""

import re

import jax
import numpy as np
import pytest

from mslora_jax.data.medmnist import load_medmnist_task, resize_images
from mslora_jax.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


def _arrays(rgb=False, size=8, sizes=(30, 10, 20), num_classes=3, seed=0, column_labels=True):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(SPLITS, sizes, strict=True):
        shape = (n, size, size, 3) if rgb else (n, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = (np.arange(n) % num_classes).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None] if column_labels else labels
    return arrays


def _write(tmp_path, name="data.npz", **kwargs):
    path = tmp_path / name
    np.savez(path, **(kwargs.pop("arrays", None) or _arrays(**kwargs)))
    return path


def _load(path, **kwargs):
    kwargs.setdefault("class_names", ["a", "b", "c"])
    return load_medmnist_task(path, name="t", modality="radiology", **kwargs)


def test_grayscale_file_with_column_labels(tmp_path):
    arrays = _arrays()
    task = _load(_write(tmp_path, arrays=arrays))
    assert task.train_images.shape == (30, 8, 8, 3) and task.train_images.dtype == np.uint8
    assert task.test_images.shape == (20, 8, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(task.train_images[..., channel], arrays["train_images"])
    np.testing.assert_array_equal(task.train_labels, arrays["train_labels"][:, 0])
    assert task.train_labels.dtype == np.int32
    assert task.class_names == ("a", "b", "c") and task.modality == "radiology"


def test_rgb_file_with_flat_labels_and_val_split(tmp_path):
    arrays = _arrays(rgb=True, column_labels=False)
    task = _load(_write(tmp_path, arrays=arrays), test_split="val")
    np.testing.assert_array_equal(task.train_images, arrays["train_images"])
    np.testing.assert_array_equal(task.test_images, arrays["val_images"])
    np.testing.assert_array_equal(task.test_labels, arrays["val_labels"])


def test_label_subset_is_selected_and_renumbered_in_given_order(tmp_path):
    arrays = _arrays(num_classes=5, sizes=(50, 10, 25))
    task = _load(_write(tmp_path, arrays=arrays), labels=[4, 1], class_names=["four", "one"])
    original = arrays["train_labels"][:, 0]
    keep = np.isin(original, [4, 1])
    np.testing.assert_array_equal(task.train_images[..., 0], arrays["train_images"][keep])
    np.testing.assert_array_equal(task.train_labels, np.where(original[keep] == 4, 0, 1))
    assert set(task.test_labels.tolist()) == {0, 1} and len(task.test_labels) == 10


def test_label_subset_needs_matching_class_names(tmp_path):
    with pytest.raises(ConfigError, match="2 class_names"):
        _load(_write(tmp_path), labels=[0, 1, 2], class_names=["a", "b"])


def test_resize_matches_jax_image_resize(tmp_path):
    for rgb, size in ((False, 5), (True, 5), (True, 13)):
        arrays = _arrays(rgb=rgb)
        task = _load(_write(tmp_path, arrays=arrays), image_size=size)
        assert task.train_images.shape == (30, size, size, 3)
        source = arrays["train_images"].astype(np.float32)
        out_shape = (30, size, size, 3) if rgb else (30, size, size)
        reference = np.asarray(jax.image.resize(source, out_shape, "linear", antialias=True))
        if not rgb:
            reference = reference[..., None]
        # Only x.5 rounding ties may differ.
        assert np.abs(task.train_images - np.rint(reference)).max() <= 1


def test_resize_to_same_size_is_identity():
    images = np.random.default_rng(0).integers(0, 256, (4, 9, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_images(images, 9), images)


def test_max_train_and_max_test_take_a_seeded_subset(tmp_path):
    arrays = _arrays(sizes=(40, 10, 30))
    path = _write(tmp_path, arrays=arrays)
    a = _load(path, max_train=12, max_test=7, seed=1)
    b = _load(path, max_train=12, max_test=7, seed=1)
    c = _load(path, max_train=12, max_test=7, seed=2)
    assert len(a.train_labels) == 12 and len(a.test_labels) == 7
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert not np.array_equal(a.train_images, c.train_images)
    # Rows are real rows of the file, with their own labels.
    rows = {img.tobytes(): lab for img, lab in zip(arrays["train_images"], arrays["train_labels"])}
    for image, label in zip(a.train_images[..., 0], a.train_labels, strict=True):
        assert rows[image.tobytes()][0] == label
    # A limit at or above the split size keeps everything.
    assert len(_load(path, max_train=100).train_labels) == 40


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*not found"):
        _load(path)


@pytest.mark.parametrize("content", [b"", b"not a zip archive at all", b"PK\x03\x04garbage"])
def test_not_an_npz_file(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*not a valid .npz"):
        _load(path)


def test_truncated_file(tmp_path):
    path = _write(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*(corrupt|truncated)"):
        _load(path)


def test_corrupt_member(tmp_path):
    path = tmp_path / "zipped.npz"
    np.savez_compressed(path, **_arrays(size=16))
    data = bytearray(path.read_bytes())
    middle = len(data) // 3
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*corrupt"):
        _load(path)


def test_single_npy_array(tmp_path):
    path = tmp_path / "array.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*not an .npz"):
        _load(path)


@pytest.mark.parametrize("key", ["train_images", "train_labels", "test_images", "test_labels"])
def test_missing_key_is_named(tmp_path, key):
    arrays = _arrays()
    del arrays[key]
    path = _write(tmp_path, arrays=arrays)
    with pytest.raises(DataError, match=re.escape(str(path)) + f".*{key}"):
        _load(path)


def test_val_keys_are_only_needed_for_the_val_split(tmp_path):
    arrays = _arrays()
    del arrays["val_images"], arrays["val_labels"]
    path = _write(tmp_path, arrays=arrays)
    assert len(_load(path).test_labels) == 20
    with pytest.raises(DataError, match="val_images"):
        _load(path, test_split="val")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train_images", np.zeros((30, 8, 8), np.float32), "uint8"),
        ("train_images", np.zeros((30, 64), np.uint8), "shape"),
        ("test_images", np.zeros((20, 8, 8, 4), np.uint8), "shape"),
        ("train_labels", np.zeros((30, 1), np.float32), "integers"),
        ("train_labels", np.zeros((30, 2), np.uint8), "shape"),
        ("train_labels", np.zeros(29, np.uint8), "29 entries"),
    ],
)
def test_wrong_dtype_ndim_or_length(tmp_path, key, value, message):
    arrays = _arrays()
    arrays[key] = value
    path = _write(tmp_path, arrays=arrays)
    with pytest.raises(DataError, match=re.escape(str(path)) + f".*{key}.*{message}"):
        _load(path)


def test_label_outside_class_names(tmp_path):
    path = _write(tmp_path, num_classes=4)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*label 3 outside class_names"):
        _load(path)


def test_requested_label_not_in_file(tmp_path):
    path = _write(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*label id 7 not present"):
        _load(path, labels=[0, 7], class_names=["a", "b"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"test_split": "train"},
        {"class_names": ["a", "a", "b"]},
        {"labels": [0, 0, 1]},
        {"max_train": 0},
        {"image_size": 0},
    ],
)
def test_bad_options(tmp_path, kwargs):
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        _load(_write(tmp_path), **kwargs)
