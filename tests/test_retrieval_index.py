"""An index is data: built, merged, saved atomically, restored exactly; a damaged or inconsistent
one is refused with a line that names the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mslora_jax.errors import CheckpointError, DataError
from mslora_jax.retrieval.index import (
    META,
    TENSORS,
    EncoderVersion,
    concat_indexes,
    load_index,
    make_index,
    save_index,
    select_rows,
)

V0 = EncoderVersion("mslora_cr", 0, (0,))
V1 = EncoderVersion("mslora_cr", 1, (0, 1))


def _index(rows=6, version=V0, task="path_a", dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    return make_index(
        rng.normal(size=(rows, 8)),
        ids=[f"{task}/{i}" for i in range(rows)],
        tasks=[task] * rows,
        version=version,
        labels=list(range(rows)),
        dtype=dtype,
    )


def _same(a, b):
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert a.embeddings.dtype == b.embeddings.dtype
    for name in ("ids", "task_names", "encoder_versions", "rows"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("tasks", "labels", "versions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip(tmp_path, dtype):
    index = concat_indexes([_index(dtype=dtype), _index(4, V1, "rad_a", dtype, seed=1)])
    assert np.allclose(np.linalg.norm(index.embeddings.astype(np.float32), axis=1), 1, atol=1e-2)
    save_index(index, tmp_path / "index")
    _same(load_index(tmp_path / "index"), index)


def test_versions_and_tasks_are_kept_per_row():
    index = concat_indexes([_index(), _index(4, V1, "rad_a", seed=1), _index(2, V1, "path_a")])
    assert index.task_names == ("path_a", "rad_a") and index.encoder_versions == (V0, V1)
    assert list(index.rows_of_version(V1)) == list(range(6, 12))
    assert list(index.rows_of_task("path_a")) == [0, 1, 2, 3, 4, 5, 10, 11]
    assert len(index.rows_of_version(EncoderVersion("seq", 0, (0,)))) == 0
    part = select_rows(index, np.array([7, 0]))
    assert part.ids == ("rad_a/1", "path_a/0") and list(part.versions) == [1, 0]


def test_saving_never_overwrites(tmp_path):
    save_index(_index(), tmp_path / "index")
    with pytest.raises(CheckpointError, match="already exists"):
        save_index(_index(seed=3), tmp_path / "index")
    _same(load_index(tmp_path / "index"), _index())  # the first one, untouched


def test_damaged_indexes_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no index at"):
        load_index(tmp_path / "nothing")
    path = save_index(_index(), tmp_path / "index")
    data = bytearray((path / TENSORS).read_bytes())
    data[-3] ^= 0xFF
    (path / TENSORS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged: embeddings.safetensors does not match"):
        load_index(path)

    path = save_index(_index(), tmp_path / "index2")
    meta = json.loads((path / META).read_text())
    (path / META).write_text(json.dumps({**meta, "ids": meta["ids"][:-1]}))
    with pytest.raises(CheckpointError, match="inconsistent: index: 5 item ids for 6 rows"):
        load_index(path)
    (path / META).write_text(json.dumps({**meta, "format": "faiss"}))
    with pytest.raises(CheckpointError, match="format 'faiss'"):
        load_index(path)
    (path / META).write_text(json.dumps({**meta, "dim": 9}))
    with pytest.raises(CheckpointError, match=r"says float32 \(6, 9\)"):
        load_index(path)
    (path / META).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_index(path)


def test_bad_rows_are_refused():
    good = _index()
    with pytest.raises(DataError, match="has norm 2.0000, not 1"):
        type(good)(**{**good.__dict__, "embeddings": good.embeddings * 2})
    with pytest.raises(DataError, match="version numbers must be in"):
        type(good)(**{**good.__dict__, "versions": good.versions + 1})
    with pytest.raises(DataError, match="index dtype must be one of"):
        _index(dtype="float16")
    with pytest.raises(DataError, match=r"image rows of dim 4 \(float32\) to one of image rows"):
        concat_indexes([_index(), make_index(np.ones((1, 4)), ["x"], ["t"], V0)])
