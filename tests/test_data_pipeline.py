"""Tests for the grain-based training and evaluation batch pipelines."""

import numpy as np
import pytest

from mslora_jax.data.loader import iterate
from mslora_jax.data.pipeline import eval_batches, mixture_order, step_indices, train_batches
from mslora_jax.errors import ConfigError, DataError
from tests.helpers import assert_same_batches


def _data(n, size=4):
    """Images whose first pixel encodes the row, labels equal to the row, to track examples."""
    images = np.zeros((n, size, size, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = np.arange(n) // 256
    return images, np.arange(n)


def _ids(batches):
    """Row ids of each batch, ``[steps, b]``, checking images and labels stay paired."""
    ids = []
    for batch in batches:
        pixels = batch["image"][:, 0, 0].astype(int)
        image_ids = pixels[:, 0] + 256 * pixels[:, 1]
        np.testing.assert_array_equal(image_ids, batch["label"])
        ids.append(batch["label"])
    return np.stack(ids)


def test_exact_step_count_shapes_and_dtypes():
    images, labels = _data(100, size=6)
    batches = list(train_batches(images, labels, batch_size=16, num_steps=23, seed=0))
    assert len(batches) == 23
    for batch in batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (16, 6, 6, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32


def test_zero_steps_yields_nothing():
    assert list(train_batches(*_data(10), batch_size=4, num_steps=0, seed=0)) == []


def test_deterministic_for_a_seed_and_different_across_seeds():
    data = _data(64)
    a = _ids(train_batches(*data, batch_size=8, num_steps=20, seed=7))
    b = _ids(train_batches(*data, batch_size=8, num_steps=20, seed=7))
    c = _ids(train_batches(*data, batch_size=8, num_steps=20, seed=8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_each_epoch_is_a_fresh_permutation_with_remainder_dropped():
    # 42 rows, batch 8: 5 steps per epoch, 2 rows left out of each epoch.
    ids = _ids(train_batches(*_data(42), batch_size=8, num_steps=15, seed=0))
    epochs = ids.reshape(3, 40)
    for epoch in epochs:
        assert len(set(epoch.tolist())) == 40
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(np.sort(epochs[0]), epochs[0])  # shuffled, not in file order
    # Over several epochs every row is seen, the dropped ones change from epoch to epoch.
    many = _ids(train_batches(*_data(42), batch_size=8, num_steps=50, seed=0))
    assert set(many.ravel().tolist()) == set(range(42))


def test_resuming_at_a_step_continues_the_same_stream():
    data = _data(50)
    full = _ids(train_batches(*data, batch_size=8, num_steps=20, seed=3))
    resumed = _ids(train_batches(*data, batch_size=8, num_steps=20, seed=3, start_step=13))
    np.testing.assert_array_equal(resumed, full[13:])


def _reference_ids(n, batch, steps, seed):
    """The batches written out by hand: a seeded permutation per epoch, cut into batches."""
    per_epoch = n // batch
    out = []
    for step in range(steps):
        epoch, position = divmod(step, per_epoch)
        order = np.random.default_rng([seed, 1, epoch]).permutation(n)
        out.append(order[position * batch : (position + 1) * batch])
    return np.stack(out)


def test_batches_match_the_hand_written_permutation():
    np.testing.assert_array_equal(
        _ids(train_batches(*_data(42), batch_size=8, num_steps=12, seed=4)),
        _reference_ids(42, 8, 12, seed=4),
    )


def _reference_batches(images, labels, batch, steps, seed, rows, start_step):
    """What the pipeline gave before it read ahead (41b7a3e): for each step, its epoch's seeded
    permutation cut into batches, this process's rows of it gathered."""
    start, stop = rows
    ids = _reference_ids(len(labels), batch, steps, seed)[start_step:, start:stop]
    return [{"image": images[i], "label": labels[i].astype(np.int32)} for i in ids]


@pytest.mark.parametrize("prefetch", [0, 1, 3])
@pytest.mark.parametrize(
    "seed, start_step, rows", [(0, 0, (0, 8)), (4, 5, (2, 6)), (11, 9, (7, 8)), (2**31, 13, (0, 3))]
)
def test_batches_equal_the_old_formula_however_they_are_read(prefetch, seed, start_step, rows):
    # Random images and labels: every array of every step must be the very same as before.
    rng = np.random.default_rng(seed % 97)
    images, labels = rng.normal(size=(29, 3, 2)).astype(np.float32), rng.integers(0, 5, 29)
    options = dict(batch_size=8, num_steps=14, seed=seed, rows=rows, start_step=start_step)
    assert_same_batches(
        train_batches(images, labels, prefetch=prefetch, **options),
        _reference_batches(images, labels, 8, 14, seed, rows, start_step),
    )


def test_worker_processes_give_the_same_batches():
    # Two spawned workers build alternate steps; grain puts them back in order. Seconds: the
    # workers import jax (through grain).
    images, labels = _data(45)
    options = dict(batch_size=8, num_steps=12, seed=3, rows=(2, 7), start_step=5)
    assert_same_batches(
        train_batches(images, labels, num_workers=2, prefetch=1, **options),
        _reference_batches(images, labels, 8, 12, 3, (2, 7), 5),
    )


def test_closing_a_reading_ahead_pipeline_early():
    data = _data(40)
    batches = train_batches(*data, batch_size=8, num_steps=30, seed=1, prefetch=4)
    first = [next(batches) for _ in range(3)]
    batches.close()  # stops the background thread; the batches taken stay valid
    with pytest.raises(StopIteration):
        next(batches)
    np.testing.assert_array_equal(
        _ids(first), _ids(train_batches(*data, batch_size=8, num_steps=3, seed=1))
    )


def test_step_indices_and_errors_from_the_batch_function():
    steps = step_indices(20, batch_size=4, num_steps=8, seed=0, rows=(1, 3), start_step=2)
    assert len(steps) == 6
    np.testing.assert_array_equal(steps[0], _reference_ids(20, 4, 3, 0)[2, 1:3])

    def explode(indices):
        raise DataError(f"bad rows {indices.tolist()}")

    # An error building a batch reaches the caller as itself, read ahead or not.
    for prefetch in (0, 2):
        with pytest.raises(DataError, match="bad rows"):
            next(iterate(steps.map(explode), prefetch=prefetch))


@pytest.mark.parametrize("count", [2, 4, 8])
def test_process_rows_rebuild_the_same_global_batch(count):
    # However many processes share it, their rows concatenate to the single-process batch.
    data, global_batch = _data(70), 16
    full = _ids(train_batches(*data, batch_size=global_batch, num_steps=12, seed=5))
    size = global_batch // count
    parts = [
        _ids(
            train_batches(
                *data,
                batch_size=global_batch,
                num_steps=12,
                seed=5,
                rows=(i * size, (i + 1) * size),
            )
        )
        for i in range(count)
    ]
    assert all(part.shape == (12, size) for part in parts)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)
    resumed = _ids(
        train_batches(*data, batch_size=global_batch, num_steps=12, seed=5, rows=(0, size),
                      start_step=7)
    )  # fmt: skip
    np.testing.assert_array_equal(resumed, parts[0][7:])


def test_uneven_row_ranges():
    data = _data(40)
    full = _ids(train_batches(*data, batch_size=10, num_steps=6, seed=1))
    part = _ids(train_batches(*data, batch_size=10, num_steps=6, seed=1, rows=(3, 10)))
    np.testing.assert_array_equal(part, full[:, 3:])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 64}, "20 training examples is fewer than batch_size 64"),
        ({"rows": (4, 4)}, "rows"),
        ({"rows": (-1, 4)}, "rows"),
        ({"rows": (0, 9)}, "batch_size 8"),
        ({"rows": (0,)}, "rows must be"),
        ({"rows": 3}, "rows must be"),
        ({"start_step": 11}, "start_step"),
        ({"seed": -1}, "seed"),
        ({"prefetch": -1}, "prefetch must be an integer >= 0"),
        ({"num_workers": 1.5}, "num_workers must be an integer >= 0"),
        ({"num_workers": True}, "num_workers"),
    ],
)
def test_bad_arguments_raise_at_call_time(kwargs, message):
    options = {"batch_size": 8, "num_steps": 10, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=message):
        train_batches(*_data(20), **options)  # no next(): checks must not be lazy


def test_mismatched_images_and_labels():
    images, labels = _data(20)
    with pytest.raises(DataError):
        train_batches(images, labels[:19], batch_size=4, num_steps=1, seed=0)
    with pytest.raises(DataError):
        eval_batches(images, labels[:19], batch_size=4)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_eval_batches_are_in_order_padded_and_masked(prefetch):
    images, labels = _data(10)
    batches = list(eval_batches(images, labels, batch_size=4, prefetch=prefetch))
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (4, 4, 4, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        assert batch["mask"].shape == (4,) and batch["mask"].dtype == np.bool_
    np.testing.assert_array_equal(batches[-1]["mask"], [True, True, False, False])
    assert not batches[-1]["image"][2:].any() and not batches[-1]["label"][2:].any()
    real = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(real, labels)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[:10], images)


def test_eval_batches_exact_multiple_and_empty():
    batches = list(eval_batches(*_data(8), batch_size=4))
    assert len(batches) == 2 and all(b["mask"].all() for b in batches)
    assert list(eval_batches(*_data(0), batch_size=4)) == []
    with pytest.raises(ConfigError):
        eval_batches(*_data(8), batch_size=0)
    with pytest.raises(ConfigError, match="eval_batches: prefetch"):
        eval_batches(*_data(8), batch_size=4, prefetch=-2)


def test_a_mixture_reads_each_source_exactly_its_draws():
    sizes, draws = [10, 30, 4], [25, 30, 1]  # 2.5 epochs, 1 epoch, a quarter epoch
    order = mixture_order(sizes, draws, seed=5)
    source = np.searchsorted(np.cumsum(sizes), order, side="right")
    np.testing.assert_array_equal(np.bincount(source, minlength=3), draws)
    first = order[source == 0]
    # Whole epochs first: every example of source 0 twice, then five of them a third time.
    np.testing.assert_array_equal(np.bincount(first, minlength=10) >= 2, True)
    assert set(order[source == 1]) == set(range(10, 40))
    assert not np.array_equal(order, np.sort(order))  # sources shuffled together
    np.testing.assert_array_equal(order, mixture_order(sizes, draws, seed=5))
    assert not np.array_equal(order, mixture_order(sizes, draws, seed=6))
    data = _data(44)
    kwargs = dict(batch_size=8, num_steps=7, seed=5, draws=draws, sizes=sizes)
    ids = _ids(train_batches(*data, **kwargs))
    np.testing.assert_array_equal(ids, order[:56].reshape(7, 8))
    resumed = _ids(train_batches(*data, **kwargs, start_step=4, rows=(2, 6)))
    np.testing.assert_array_equal(resumed, ids[4:, 2:6])
    with pytest.raises(ConfigError, match="fewer than 8 steps of 8"):
        train_batches(*data, **{**kwargs, "num_steps": 8})
    with pytest.raises(ConfigError, match="sum to 44, not the 40"):
        train_batches(*_data(40), **kwargs)
    with pytest.raises(ConfigError, match="both draws and sizes"):
        train_batches(*data, batch_size=8, num_steps=1, seed=0, draws=draws)
