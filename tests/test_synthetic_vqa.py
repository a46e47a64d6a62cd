"""Tests for the synthetic VQA task writer (paper-format files from synthetic images)."""

import json
import os
import re

import numpy as np
import pytest

from mslora_jax.data.synthetic import SyntheticTaskSpec, make_synthetic_task
from mslora_jax.data.synthetic_vqa import write_synthetic_vqa_task
from mslora_jax.data.vqa import load_image, read_test_file, read_train_file
from mslora_jax.errors import ConfigError, DataError

SPEC = SyntheticTaskSpec("derm-vqa", "dermatology", 5, seed=3)


def _write(folder, spec=SPEC, num_train=60, num_test=40, **kw):
    return write_synthetic_vqa_task(
        spec, folder, image_size=16, num_train=num_train, num_test=num_test, **kw
    )


def _test_records(summary):
    with open(summary["test_file"], encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_files_round_trip_through_the_readers(tmp_path):
    summary = _write(tmp_path / "task")
    image_dir = summary["image_dir"]
    train = read_train_file(summary["train_file"], image_dir)
    test = read_test_file(summary["test_file"], image_dir)
    assert len(train) == 60 and len(test) == 40
    assert summary["class_names"] and len(set(summary["class_names"])) == 5
    assert os.path.basename(train[0].image) == "train_000000.png"
    assert os.path.basename(test[0].image) == "test_000000.png"
    ((question, answer),) = train[0].turns
    assert question.startswith("<image>\n") and answer
    # Pixels on disk are exactly the generator's images (PNG is lossless, no resize at 16 px).
    task = make_synthetic_task(SPEC, image_size=16, num_train=60, num_test=40)
    np.testing.assert_array_equal(load_image(train[7].image, 16), task.train_images[7])
    np.testing.assert_array_equal(load_image(test[5].image, 16), task.test_images[5])
    # Nothing but the finished folder is left beside it.
    assert sorted(os.listdir(tmp_path)) == ["task"]


def test_answers_match_the_true_class(tmp_path):
    summary = _write(tmp_path / "task")
    names = summary["class_names"]
    task = make_synthetic_task(SPEC, image_size=16, num_train=60, num_test=40)
    for record, label in zip(_test_records(summary), task.test_labels):
        true_name, text, gt = names[label], record["text"], record["gt"]
        if record["answer_type"] == "OPEN":
            assert gt == true_name
        elif text.startswith("Is this"):
            assert gt == true_name and true_name in record["candidates"]
        else:
            subject = re.match(r"Is there (\w+) in this dermatology image\?", text).group(1)
            assert gt == ("yes" if subject == true_name else "no")


def test_same_spec_gives_identical_files(tmp_path):
    a, b = _write(tmp_path / "a"), _write(tmp_path / "b")
    for key in ("train_file", "test_file"):
        with open(a[key], encoding="utf-8") as fa, open(b[key], encoding="utf-8") as fb:
            assert fa.read() == fb.read()
    train_a = read_train_file(a["train_file"], a["image_dir"])
    train_b = read_train_file(b["train_file"], b["image_dir"])
    for ex_a, ex_b in zip(train_a, train_b):
        np.testing.assert_array_equal(load_image(ex_a.image, 16), load_image(ex_b.image, 16))
    other = _write(tmp_path / "c", spec=SyntheticTaskSpec("derm-vqa", "dermatology", 5, seed=4))
    with open(a["test_file"]) as fa, open(other["test_file"]) as fc:
        assert fa.read() != fc.read()


@pytest.mark.parametrize("open_fraction", [0.0, 0.3, 1.0])
def test_answer_types_mix_as_requested(tmp_path, open_fraction):
    summary = _write(tmp_path / "task", open_fraction=open_fraction)
    types = [r["answer_type"] for r in _test_records(summary)]
    assert types.count("OPEN") == round(open_fraction * 40)
    assert summary["test_answer_types"] == {
        "OPEN": types.count("OPEN"),
        "CLOSED": types.count("CLOSED"),
    }
    train = read_train_file(summary["train_file"], summary["image_dir"])
    open_train = sum(
        q.endswith("What is shown in this dermatology image?")
        for ((q, _),) in (ex.turns for ex in train)
    )
    assert open_train == round(open_fraction * 60)


def test_closed_gt_among_candidates_and_yes_no_balanced(tmp_path):
    summary = _write(tmp_path / "task", num_test=200, open_fraction=0.2)
    records = _test_records(summary)
    closed = [r for r in records if r["answer_type"] == "CLOSED"]
    assert all(r["gt"] in r["candidates"] for r in closed)
    assert all(r["candidates"] == [] for r in records if r["answer_type"] == "OPEN")
    yes_no = [r["gt"] for r in closed if r["candidates"] == ["yes", "no"]]
    choices = [r for r in closed if r["candidates"] != ["yes", "no"]]
    assert abs(yes_no.count("yes") - yes_no.count("no")) <= 1
    assert abs(len(yes_no) - len(choices)) <= 1
    # The true class is not always listed first.
    firsts = [r["candidates"][0] == r["gt"] for r in choices]
    assert 0 < sum(firsts) < len(firsts)


def test_refuses_a_non_empty_folder_but_fills_an_empty_one(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="full"):
        _write(full)
    assert os.listdir(full) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    summary = _write(empty)
    assert sorted(os.listdir(empty)) == ["images", "test.jsonl", "train.json"]
    assert summary["folder"] == str(empty)


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="open_fraction"):
        _write(tmp_path / "t", open_fraction=1.5)
    with pytest.raises(ConfigError, match="num_train"):
        _write(tmp_path / "t", num_train=0)
    assert not (tmp_path / "t").exists()
