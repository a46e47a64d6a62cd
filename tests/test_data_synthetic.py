"""Tests for the synthetic multi-modality task generator."""

import re
import time

import numpy as np
import pytest

from mslora_jax.data.synthetic import MODALITIES, SyntheticTaskSpec, make_synthetic_task
from mslora_jax.errors import ConfigError


def _task(modality="pathology", seed=0, num_classes=4, size=16, n_train=200, n_test=100, **kw):
    spec = SyntheticTaskSpec(f"{modality}-{seed}", modality, num_classes, seed)
    return make_synthetic_task(spec, image_size=size, num_train=n_train, num_test=n_test, **kw)


def _linear_probe_accuracy(task, ridge=10.0):
    """Test accuracy of a ridge-regression classifier on one-hot targets over raw pixels."""
    x = task.train_images.reshape(len(task.train_images), -1) / 255.0
    mean = x.mean(0)
    x = x - mean
    x_test = task.test_images.reshape(len(task.test_images), -1) / 255.0 - mean
    y = np.eye(task.num_classes)[task.train_labels]
    w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ (y - y.mean(0)))
    return np.mean((x_test @ w).argmax(1) == task.test_labels)


def test_unknown_modality_names_it_and_the_valid_ones():
    with pytest.raises(ConfigError, match="histology") as info:
        SyntheticTaskSpec("t", "histology", 4, 0)
    for modality in MODALITIES:
        assert modality in str(info.value)


@pytest.mark.parametrize("num_classes", [0, 1])
def test_fewer_than_two_classes_is_rejected(num_classes):
    with pytest.raises(ConfigError, match="num_classes"):
        SyntheticTaskSpec("t", "radiology", num_classes, 0)


@pytest.mark.parametrize("kwargs", [{"difficulty": -1.0}, {"size": 2}, {"n_train": -1}])
def test_bad_generation_arguments_are_rejected(kwargs):
    with pytest.raises(ConfigError):
        _task(**kwargs)


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("size", [16, 28])
def test_shapes_dtypes_and_metadata(modality, size):
    task = _task(modality, size=size, n_train=50, n_test=30)
    assert task.train_images.shape == (50, size, size, 3)
    assert task.test_images.shape == (30, size, size, 3)
    assert task.train_images.dtype == np.uint8 and task.test_images.dtype == np.uint8
    assert task.train_labels.dtype == np.int32 and task.test_labels.dtype == np.int32
    assert task.modality == modality and task.num_classes == 4
    # Images are not degenerate: they use a real part of the intensity range.
    assert task.train_images.std() > 10


def test_same_spec_is_bit_identical():
    a, b = _task("dermatology", seed=3), _task("dermatology", seed=3)
    assert a.class_names == b.class_names
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_different_seeds_give_different_classes():
    a, b = _task("radiology", seed=1), _task("radiology", seed=2)
    assert a.class_names != b.class_names
    assert not np.array_equal(a.train_images, b.train_images)
    # Class prototypes differ: per-class mean images are not the same between the tasks.
    mean_a = np.stack([a.train_images[a.train_labels == c].mean(0) for c in range(4)])
    mean_b = np.stack([b.train_images[b.train_labels == c].mean(0) for c in range(4)])
    assert np.abs(mean_a - mean_b).mean() > 2.0


def test_splits_are_independent_of_each_others_size():
    small, large = _task(n_train=64, n_test=40), _task(n_train=2000, n_test=40)
    np.testing.assert_array_equal(small.test_images, large.test_images)
    np.testing.assert_array_equal(small.test_labels, large.test_labels)
    # Chunked rendering does not depend on the split size either.
    np.testing.assert_array_equal(small.train_images[:64], _task(n_train=64).train_images)


@pytest.mark.parametrize("num_classes", [2, 5, 10])
def test_labels_are_balanced(num_classes):
    task = _task("pathology", num_classes=num_classes, n_train=503, n_test=97)
    for labels in (task.train_labels, task.test_labels):
        counts = np.bincount(labels, minlength=num_classes)
        assert counts.max() - counts.min() <= 1


def test_class_names_are_unique_pronounceable_words():
    names = []
    for seed in range(20):
        task = _task(MODALITIES[seed % 3], seed=seed, num_classes=10, n_train=0, n_test=0)
        assert len(set(task.class_names)) == 10
        for name in task.class_names:
            assert re.fullmatch(r"[a-z]{4,}", name), name
            assert re.search(r"[aeiou]", name)
        names.extend(task.class_names)
    # Different seeds give (mostly) different words.
    assert len(set(names)) > 0.9 * len(names)


def _mean_colour(task):
    return task.train_images.reshape(-1, 3).mean(0)


def test_modalities_look_different():
    path, rad, derm = (_task(m, n_train=300) for m in MODALITIES)
    # Radiology is grayscale: the three channels are identical.
    np.testing.assert_array_equal(rad.train_images[..., 0], rad.train_images[..., 1])
    np.testing.assert_array_equal(rad.train_images[..., 0], rad.train_images[..., 2])
    r, g, b = _mean_colour(path)  # H&E stains: pink/purple, green absorbed most
    assert r > g + 30 and b > g + 30
    r, g, b = _mean_colour(derm)  # skin tones: red > green > blue
    assert r > g + 20 > b + 30
    assert not np.array_equal(path.train_images[..., 0], path.train_images[..., 1])
    colours = [_mean_colour(t) for t in (path, rad, derm)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(colours[i] - colours[j]).max() > 30


def test_tasks_of_one_modality_share_their_look():
    # Colour statistics of two pathology tasks are closer to each other than to dermatology.
    a, b = _mean_colour(_task("pathology", seed=5)), _mean_colour(_task("pathology", seed=6))
    d = _mean_colour(_task("dermatology", seed=5))
    assert np.abs(a - b).max() < 0.5 * min(np.abs(a - d).max(), np.abs(b - d).max())


@pytest.mark.parametrize("modality", MODALITIES)
def test_learnable_but_not_trivial_for_a_linear_probe(modality):
    start = time.perf_counter()
    task = _task(modality, seed=0, n_train=1000, n_test=1000)
    print(f"{modality}: {2000 / (time.perf_counter() - start):.0f} images/s at 16x16")
    accuracy = _linear_probe_accuracy(task)
    print(f"{modality}: linear probe accuracy {accuracy:.3f} (chance 0.25)")
    assert 0.5 < accuracy < 0.95


def test_difficulty_knob_makes_tasks_harder():
    easy = _linear_probe_accuracy(_task("dermatology", n_train=800, n_test=400, difficulty=0.3))
    hard = _linear_probe_accuracy(_task("dermatology", n_train=800, n_test=400, difficulty=2.0))
    assert easy > hard + 0.15
