"""source="tfds": tiny TFDS datasets prepared in tmp_path (array_record, PNG bytes, no TF)."""

import io
import json
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mslora_jax.config import TaskConfig, experiment_config
from mslora_jax.data.medmnist import resize_images
from mslora_jax.data.prompt_tokenizer import prompt_encoder
from mslora_jax.data.registry import class_table, load_task, load_tasks
from mslora_jax.data.tfds_source import load_tfds_task
from mslora_jax.data.tokenizer import tokenize
from mslora_jax.errors import ConfigError, DataError
from mslora_jax.run.dry_run import dry_run
from mslora_jax.run.experiment import fingerprint
from mslora_jax.train.checkpoints import check_same_config
from tests.helpers import load_config_file, smoke_config

NAMES = ["benign", "malignant", "normal"]
SIZES = {"train": 36, "test": 12, "validation": 9}


def _png(image: np.ndarray) -> bytes:
    # PNG bytes, not arrays: tfds encodes an array with tf.image.encode_png (needs TensorFlow).
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="png")
    return buffer.getvalue()


def _splits(shape, seed):
    rng = np.random.default_rng(seed)
    return {
        split: (rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.permutation(n) % 3)
        for split, n in SIZES.items()
    }


def _prepare(data_dir, dataset_name, splits, shape, names=NAMES):
    """Writes ``splits`` ({split: (images, labels)}) as TFDS dataset ``dataset_name`` 1.0.0."""

    # Not registered: reading must work from the files alone, as for a dataset prepared elsewhere.
    with tfds.core.registered.skip_registration():

        class Builder(tfds.core.GeneratorBasedBuilder):
            name = dataset_name
            VERSION = tfds.core.Version("1.0.0")
            # No checksums file beside this module to look for; finding one would import
            # importlib_resources, which tfds 4.9 uses on Python 3.11 but does not install.
            code_path = None

            def _info(self):
                features = {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=shape, encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=names),
                    "score": tfds.features.Scalar(np.int64),
                }
                return tfds.core.DatasetInfo(
                    builder=self, features=tfds.features.FeaturesDict(features)
                )

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(split) for split in splits}

            def _generate_examples(self, split):
                for i, (image, label) in enumerate(zip(*splits[split])):
                    example = {"id": f"{split}_{i}", "image": _png(image), "label": int(label)}
                    yield i, {**example, "score": int(label)}

    Builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def _mixed_sizes(n, seed):
    """``n`` RGB images alternately 6x6 and 12x12 (a feature of shape (None, None, 3))."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (6 + 6 * (i % 2),) * 2 + (3,), np.uint8) for i in range(n)]
    return images, rng.permutation(n) % 2


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    rgb, gray = _splits((8, 8, 3), seed=0), _splits((10, 10, 1), seed=1)
    _prepare(data_dir, "tiny_cells", rgb, (8, 8, 3))
    _prepare(data_dir, "tiny_gray", gray, (10, 10, 1))
    # Stand-ins for the three datasets of configs/pcam_tfds.py: their names, features, splits.
    pcam = {s: (images[:8], labels[:8] % 2) for s, (images, labels) in rgb.items()}
    _prepare(data_dir, "patch_camelyon", pcam, (8, 8, 3), names=["0", "1"])
    malaria = {"train": _mixed_sizes(10, seed=2)}
    _prepare(data_dir, "malaria", malaria, (None, None, 3), names=["parasitized", "uninfected"])
    colorectal = {"train": (rgb["train"][0][:10], np.arange(10) % 8)}
    _prepare(data_dir, "colorectal_histology", colorectal, (8, 8, 3), names=list("abcdefgh"))
    return data_dir, rgb, gray, malaria


def _load(data_dir, tfds_name="tiny_cells", **kwargs):
    return load_tfds_task(
        tfds_name, data_dir=str(data_dir), name="t", modality="pathology", **kwargs
    )


def _row_ids(images, labels, written):
    """Index of each loaded (image, label) among the written rows; fails on any mismatch."""
    lookup = {im.tobytes(): i for i, im in enumerate(written[0])}
    rows = np.array([lookup[im.tobytes()] for im in images])  # KeyError: an image not written
    np.testing.assert_array_equal(labels, written[1][rows])
    return rows


def test_reads_images_labels_and_class_names_exactly(prepared):
    data_dir, rgb, _, _ = prepared
    task = _load(data_dir, test_split="validation")
    assert task.class_names == tuple(NAMES) and task.modality == "pathology"
    assert task.train_images.dtype == np.uint8 and task.train_labels.dtype == np.int32
    # TFDS stores records in its own (hashed) order: every written row comes back once.
    for split, images, labels in (
        ("train", task.train_images, task.train_labels),
        ("validation", task.test_images, task.test_labels),
    ):
        assert images.shape == (SIZES[split], 8, 8, 3)
        assert sorted(_row_ids(images, labels, rgb[split])) == list(range(SIZES[split]))
    test = _load(data_dir, class_names=["b", "m", "n"], label_key="score")
    assert test.class_names == ("b", "m", "n")
    assert sorted(_row_ids(test.test_images, test.test_labels, rgb["test"])) == list(range(12))
    np.testing.assert_array_equal(test.train_images, task.train_images)  # same record order


def test_caps_are_seeded_subsets_in_record_order(prepared):
    data_dir, rgb, _, _ = prepared
    full = _load(data_dir)
    capped = _load(data_dir, max_train=10, max_test=5, seed=3)
    assert capped.num_train == 10 and len(capped.test_labels) == 5
    rows = _row_ids(capped.train_images, capped.train_labels, rgb["train"])
    in_full = _row_ids(full.train_images, full.train_labels, rgb["train"]).tolist()
    positions = [in_full.index(r) for r in rows]
    assert positions == sorted(positions) and len(set(positions)) == 10
    again = _load(data_dir, max_train=10, max_test=5, seed=3)
    np.testing.assert_array_equal(again.train_images, capped.train_images)
    other_cap = _load(data_dir, max_train=20, max_test=5, seed=3)
    np.testing.assert_array_equal(other_cap.test_images, capped.test_images)
    assert not np.array_equal(
        _load(data_dir, max_train=10, seed=4).train_images, capped.train_images
    )


def test_grayscale_is_resized_then_repeated_to_rgb(prepared):
    data_dir, _, gray, _ = prepared
    raw = _load(data_dir, "tiny_gray")
    assert raw.train_images.shape == (36, 10, 10, 3)
    np.testing.assert_array_equal(
        raw.train_images[..., 1:], np.repeat(raw.train_images[..., :1], 2, -1)
    )
    _row_ids(raw.train_images[..., :1], raw.train_labels, gray["train"])
    resized = _load(data_dir, "tiny_gray", image_size=8)
    expected = np.repeat(resize_images(raw.train_images[..., :1], 8), 3, axis=-1)
    np.testing.assert_array_equal(resized.train_images, expected)


def test_bad_dataset_split_feature_and_class_names_are_named(prepared):
    data_dir, _, _, _ = prepared
    with pytest.raises(DataError, match=r"'tiny_nope' in .*not prepared.*tfds build tiny_nope"):
        _load(data_dir, "tiny_nope")
    with pytest.raises(DataError, match=r"split 'valid'.*splits \['test', 'train', 'validation'\]"):
        _load(data_dir, test_split="valid")
    with pytest.raises(DataError, match=r"split 'train\[:abc\]'"):
        _load(data_dir, train_split="train[:abc]")
    with pytest.raises(DataError, match=r"no feature 'img' \(image_key\).*'image', 'label'"):
        _load(data_dir, image_key="img")
    with pytest.raises(DataError, match="feature 'label' .image_key. must be an Image"):
        _load(data_dir, image_key="label")
    with pytest.raises(DataError, match="feature 'id' .label_key. must be a ClassLabel"):
        _load(data_dir, label_key="id")
    with pytest.raises(DataError, match="'score' is a plain integer without class names"):
        _load(data_dir, label_key="score")
    with pytest.raises(DataError, match=r"2 class_names \['a', 'b'\] given but .* 3 classes"):
        _load(data_dir, class_names=["a", "b"])
    with pytest.raises(DataError, match=r"split 'train' has label 2 outside the 2 class names"):
        _load(data_dir, label_key="score", class_names=["a", "b"])
    with pytest.raises(ConfigError, match="max_train must be >= 1"):
        _load(data_dir, max_train=-1)


def test_tfrecord_and_truncated_files_are_named(prepared, tmp_path):
    data_dir, _, _, _ = prepared
    # As `tfds build` writes by default: the same dataset recorded as tfrecord.
    shutil.copytree(data_dir / "tiny_cells", tmp_path / "tfr" / "tiny_cells")
    info_path = tmp_path / "tfr" / "tiny_cells" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    with pytest.raises(DataError, match="prepared as tfrecord .* --file_format=array_record"):
        _load(tmp_path / "tfr")
    shutil.copytree(data_dir / "tiny_cells", tmp_path / "cut" / "tiny_cells")
    shard = next((tmp_path / "cut" / "tiny_cells" / "1.0.0").glob("*-train.array_record-*"))
    shard.write_bytes(shard.read_bytes()[:300])
    with pytest.raises(DataError, match="split 'train'.*cannot read record"):
        _load(tmp_path / "cut")


def _task(**overrides):
    return {
        "name": "cells",
        "modality": "pathology",
        "source": "tfds",
        "tfds_name": "tiny_cells",
        **overrides,
    }


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="a tfds task needs tfds_name"):
        TaskConfig(**_task(tfds_name=None))
    with pytest.raises(ConfigError, match=r"\['test_split'\] only apply to source='tfds'"):
        TaskConfig(
            name="m",
            modality="pathology",
            source="medmnist",
            file="m.npz",
            class_names=("a",),
            test_split="val",
        )
    with pytest.raises(ConfigError, match="train_split must be a non-empty string, got 3"):
        TaskConfig(**_task(train_split=3))
    with pytest.raises(ConfigError, match="labels .* not supported for tfds"):
        TaskConfig(**_task(labels=(0, 1)))
    with pytest.raises(ConfigError, match="source='tfds' is a classification task"):
        smoke_config(**{"model_kind": "llava", "stream": [_task()]})


def test_tfds_data_dir_is_relative_to_data_dir(prepared):
    data_dir, _, _, _ = prepared
    relative = TaskConfig(**_task(tfds_data_dir=data_dir.name, max_train=5))
    task = load_task(relative, image_size=8, data_dir=str(data_dir.parent))
    assert task.class_names == tuple(NAMES) and task.num_train == 5
    absolute = TaskConfig(**_task(tfds_data_dir=str(data_dir), max_train=5))
    same = load_task(absolute, image_size=8, data_dir="/elsewhere")
    np.testing.assert_array_equal(same.train_images, task.train_images)
    with pytest.raises(DataError, match=f"not prepared .*{data_dir.parent}/tiny_cells"):
        load_task(TaskConfig(**_task()), image_size=8, data_dir=str(data_dir.parent))


def test_variable_size_images_are_resized_one_by_one(prepared):
    data_dir, _, _, malaria = prepared
    task = _load(
        data_dir, "malaria", train_split="train[:80%]", test_split="train[80%:]", image_size=8
    )
    assert task.class_names == ("parasitized", "uninfected")
    assert task.train_images.shape == (8, 8, 8, 3) and task.test_images.shape == (2, 8, 8, 3)
    expected = [resize_images(image[None], 8)[0] for image in malaria["train"][0]]
    rows = _row_ids(
        np.concatenate([task.train_images, task.test_images]),
        np.concatenate([task.train_labels, task.test_labels]),
        (np.stack(expected), malaria["train"][1]),
    )
    assert sorted(rows) == list(range(10))
    with pytest.raises(DataError, match="images of different sizes"):
        _load(data_dir, "malaria", image_size=None)


def test_shipped_config_reads_its_tfds_tasks(prepared):
    data_dir, _, _, _ = prepared
    config = experiment_config(load_config_file("pcam_tfds.py", str(data_dir)))
    tasks = load_tasks(config, config.stream)
    assert [t.name for t in tasks] == ["pcam", "malaria", "colorectal"]
    assert tasks[0].class_names == ("normal lymph node", "lymph node metastasis")
    assert tasks[1].class_names == ("parasitized", "uninfected")  # the feature's own names
    assert [(t.num_train, len(t.test_labels)) for t in tasks] == [(8, 8), (8, 2), (8, 2)]
    assert {t.image_shape for t in tasks} == {(32, 32, 3)}
    table = class_table(tasks, config.prompt_template, prompt_encoder(config))
    assert table.sizes == (2, 2, 8)
    prompts = ["a pathology image of lymph node metastasis", "a microscopy image of parasitized"]
    expected = tokenize(prompts, max_len=10, vocab_size=1024)
    np.testing.assert_array_equal(table.tokens[[1, 2]], expected)
    report = dry_run(config)
    assert all(f"  {name}: ok" in report for name in ("pcam", "malaria", "colorectal")), report
    missing = dry_run(experiment_config(load_config_file("pcam_tfds.py", str(data_dir / "none"))))
    assert "patch_camelyon" in missing and "does not exist" in missing


def test_workdirs_written_before_the_tfds_keys_still_match():
    config = smoke_config()
    old = fingerprint(config)
    for task in old["stream"] + old["base_tasks"]:
        for key in (
            "tfds_name",
            "tfds_data_dir",
            "train_split",
            "test_split",
            "image_key",
            "label_key",
        ):
            del task[key]
    check_same_config(old, fingerprint(config), "workdir")
