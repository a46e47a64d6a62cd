"""Captioned tasks: synthetic captions from the latent factors, captions in a MedMNIST-layout
.npz, their checks, and the class table that pairs each training image with its caption."""

import numpy as np
import pytest

from mslora_jax.data.medmnist import load_medmnist_task
from mslora_jax.data.registry import class_table, union_train_split
from mslora_jax.data.synthetic import SyntheticTaskSpec, make_synthetic_task
from mslora_jax.data.synthetic_captions import CAPTION_WORDS, FACTORS, LEVELS, level
from mslora_jax.data.task import TaskData
from mslora_jax.data.tokenizer import tokenize
from mslora_jax.errors import ConfigError, DataError
from mslora_jax.train.checkpoints import describe_differences
from tests.helpers import smoke_config


def _task(modality="radiology", captions=True, **sizes):
    spec = SyntheticTaskSpec("t", modality, 3, 7)
    sizes = {"num_train": 96, "num_test": 48, **sizes}
    return make_synthetic_task(spec, image_size=8, captions=captions, **sizes)


@pytest.mark.parametrize("modality", sorted(FACTORS))
def test_synthetic_captions_describe_each_image_beyond_its_class(modality):
    task = _task(modality)
    plain = _task(modality, captions=False)
    # Captions change no image, and only a captioned task has them.
    np.testing.assert_array_equal(task.train_images, plain.train_images)
    assert plain.train_captions is None and plain.test_captions is None
    assert len(task.train_captions) == 96 and len(task.test_captions) == 48
    for caption, label in zip(task.train_captions, task.train_labels, strict=True):
        words = caption.split()
        assert words[:2] == [modality, task.class_names[label]] and words[2] == "with"
        assert len(words) == CAPTION_WORDS
        assert [w for w in words[3::2]] == [w for w in words[3::2] if w in LEVELS]
        assert words[4::2] == [word for _, word in FACTORS[modality]]
    # More distinct captions than classes: a caption narrows its class down.
    assert len(set(task.train_captions)) > 2 * task.num_classes
    assert _task(modality).train_captions == task.train_captions  # deterministic


def test_levels_are_five_equal_bins():
    np.testing.assert_array_equal(level(np.array([0.0, 0.19, 0.2, 0.59, 0.99, 1.0])),
                                  [0, 0, 1, 2, 4, 4])  # fmt: skip


def test_a_caption_per_image_is_checked():
    task = _task()
    with pytest.raises(DataError, match="47 test captions for 48 images"):
        TaskData(**{**task.__dict__, "test_captions": task.test_captions[:-1]})
    with pytest.raises(DataError, match="train caption 3 is empty"):
        bad = list(task.train_captions)
        bad[3] = " "
        TaskData(**{**task.__dict__, "train_captions": tuple(bad)})
    with pytest.raises(DataError, match="both splits or for neither"):
        TaskData(**{**task.__dict__, "test_captions": None})


def test_captions_are_for_synthetic_tasks_only_in_configs():
    with pytest.raises(ConfigError, match="captions=True generates captions for synthetic"):
        task = dict(name="m", modality="radiology", source="medmnist", file="x.npz")
        smoke_config(stream=[{**task, "class_names": ("a", "b"), "captions": True}])


def _npz(tmp_path, **extra):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 255, (12, 8, 8), np.uint8),
        "train_labels": np.arange(12) % 3,
        "test_images": rng.integers(0, 255, (6, 8, 8), np.uint8),
        "test_labels": np.arange(6) % 3,
        "train_captions": np.array([f"train image {i}" for i in range(12)]),
        "test_captions": np.array([f"test image {i}" for i in range(6)]),
        **extra,
    }
    path = tmp_path / "data.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_npz_captions_follow_their_images_through_label_subsets_and_caps(tmp_path):
    path = _npz(tmp_path)
    task = load_medmnist_task(path, name="m", modality="radiology", class_names=("b", "a"),
                              labels=(2, 0), max_train=5, seed=3)  # fmt: skip
    assert len(task.train_captions) == 5
    for caption, label in zip(task.train_captions, task.train_labels, strict=True):
        original = int(caption.split()[-1])  # its row in the file, whose label is row % 3
        assert (2, 0)[label] == original % 3
    assert task.test_captions == ("test image 0", "test image 2", "test image 3",
                                  "test image 5")  # fmt: skip
    plain = tmp_path / "plain"
    plain.mkdir()
    no_captions = _npz(plain, train_captions=None, test_captions=None)
    assert not load_medmnist_task(no_captions, name="m", modality="r",
                                  class_names=("a", "b", "c")).has_captions  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"test_captions": np.array(["x"] * 5)}, "test_captions has 5 entries but test_images"),
        ({"train_captions": np.arange(12)}, "train_captions must be a 1-d array of strings"),
        ({"train_captions": np.array(["ok"] * 11 + [""])}, "train_captions entry 11 is empty"),
        ({"test_captions": None}, "captions must be given for both splits or for neither"),
    ],
)
def test_bad_npz_captions_are_one_line_errors(tmp_path, extra, message):
    with pytest.raises(DataError, match=message):
        load_medmnist_task(_npz(tmp_path, **extra), name="m", modality="r",
                           class_names=("a", "b", "c"))  # fmt: skip


def test_the_class_table_pairs_each_training_image_with_its_caption_row():
    captioned, plain = _task(), _task(captions=False)
    encode = lambda texts: tokenize(texts, max_len=12, vocab_size=256)
    table = class_table([plain, captioned], "a {modality} image of {label}", encode)
    distinct = list(dict.fromkeys(captioned.train_captions))
    assert table.tokens.shape[0] == 6 + len(distinct)
    _, labels = union_train_split([plain, captioned], table, [0, 1])
    np.testing.assert_array_equal(labels[:96], plain.train_labels)  # classes 0..2
    rows = labels[96:]
    # Each row holds its own caption's tokens; identical captions share one row.
    np.testing.assert_array_equal(table.tokens[rows], encode(list(captioned.train_captions)))
    assert len(set(rows.tolist())) == len(distinct) and rows.min() == 6


def test_workdirs_written_before_captions_existed_still_match():
    # A task's config then had no captions key; now it is False: the same run.
    old = {"base_tasks": [{"name": "a", "seed": 1}], "seed": 0}
    new = {"base_tasks": [{"name": "a", "seed": 1, "captions": False}], "seed": 0}
    assert describe_differences(old, new) == []
    captioned = {"base_tasks": [{"name": "a", "seed": 1, "captions": True}], "seed": 0}
    assert describe_differences(old, captioned) == ["config.base_tasks[0].captions: None -> True"]
