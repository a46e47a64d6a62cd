"""An index is data: unit-norm embeddings, and for every row its item id, task, label and the
encoder version that produced it.

A version names the encoder exactly: the method, the stage after which it was taken (``-1``: the
frozen backbone) and the adapter slots its forward sums. Rows of different versions may share
an index (a database that was never re-encoded), and ``rows_of_version`` finds those that one
encoder can be queried against; nothing mixes versions silently.

On disk (``save_index``, written atomically into a new folder)::

    INDEX/embeddings.safetensors   embeddings (float32 or bfloat16), task, label, version
    INDEX/index.json               format, rows, dim, dtype, what the rows embed, item ids,
                                   task names, encoder versions and the run that holds them,
                                   the SHA-256 of the tensors file

``load_index`` refuses a damaged or inconsistent index with one line that names the problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from mslora_jax.errors import CheckpointError, DataError
from mslora_jax.io_utils import atomic_folder, atomic_write_json, read_json

FORMAT = "mslora_jax.retrieval.index/1"
TENSORS, META = "embeddings.safetensors", "index.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}
ROW_KINDS = ("image", "text")
NORM_TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2}  # bf16 keeps 8 bits of mantissa


@dataclasses.dataclass(frozen=True)
class EncoderVersion:
    """The encoder that embedded a row: ``method`` after ``stage`` (-1: the frozen backbone),
    its forward summing the adapters of ``slots``."""

    method: str
    stage: int
    slots: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"method": self.method, "stage": self.stage, "slots": list(self.slots)}


@dataclasses.dataclass(frozen=True, eq=False)
class Index:
    """``embeddings[i]`` (unit norm) embeds item ``ids[i]`` of task ``task_names[tasks[i]]``,
    class ``labels[i]`` (-1: none), by ``encoder_versions[versions[i]]``; ``rows`` says what
    the rows embed (``"image"`` or ``"text"``)."""

    embeddings: np.ndarray
    ids: tuple[str, ...]
    tasks: np.ndarray
    labels: np.ndarray
    versions: np.ndarray
    task_names: tuple[str, ...]
    encoder_versions: tuple[EncoderVersion, ...]
    rows: str = "image"
    # The run folder whose stage checkpoints rebuild every encoder version ("": unknown), so a
    # query is embedded by exactly the encoders that embedded the rows it is compared with.
    encoder_workdir: str = ""

    def __post_init__(self):
        problem = _problem(self)
        if problem:
            raise DataError(f"index: {problem}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dtype_name(self) -> str:
        return next(name for name, dt in DTYPES.items() if dt == self.embeddings.dtype)

    def rows_of_version(self, version: EncoderVersion) -> np.ndarray:
        """Row numbers embedded by exactly ``version`` (none if it never indexed a row)."""
        if version not in self.encoder_versions:
            return np.zeros(0, np.int64)
        return np.flatnonzero(self.versions == self.encoder_versions.index(version))

    def rows_of_task(self, task: str) -> np.ndarray:
        if task not in self.task_names:
            return np.zeros(0, np.int64)
        return np.flatnonzero(self.tasks == self.task_names.index(task))


def _problem(index: Index) -> str | None:
    """What is wrong with ``index``, or None."""
    e = index.embeddings
    if e.ndim != 2 or e.dtype not in DTYPES.values():
        return f"embeddings must be (rows, dim) float32 or bfloat16, not {e.dtype} {e.shape}"
    n = len(e)
    for name in ("tasks", "labels", "versions"):
        column = getattr(index, name)
        if column.shape != (n,) or column.dtype.kind not in "iu":
            return f"{name} must be {n} integers (one per row), got {column.dtype} {column.shape}"
    if len(index.ids) != n:
        return f"{len(index.ids)} item ids for {n} rows"
    if index.rows not in ROW_KINDS:
        return f"rows must be one of {ROW_KINDS}, got {index.rows!r}"
    if n and not (0 <= index.tasks.min() and index.tasks.max() < len(index.task_names)):
        return f"task numbers must be in [0, {len(index.task_names)}) (the task names)"
    if n and not (0 <= index.versions.min() and index.versions.max() < len(index.encoder_versions)):
        return f"version numbers must be in [0, {len(index.encoder_versions)}) (the versions)"
    norms = np.linalg.norm(e.astype(np.float32), axis=1)
    tolerance = NORM_TOLERANCE[index.dtype_name]
    if n and not np.all(np.abs(norms - 1.0) <= tolerance):
        worst = int(np.argmax(np.abs(norms - 1.0)))
        return f"row {worst} (id {index.ids[worst]!r}) has norm {norms[worst]:.4f}, not 1"
    return None


def make_index(
    embeddings: np.ndarray,
    ids: Sequence[str],
    tasks: Sequence[str],
    version: EncoderVersion,
    labels: Sequence[int] | None = None,
    rows: str = "image",
    dtype: str = "float32",
    encoder_workdir: str = "",
) -> Index:
    """An index of ``embeddings`` (normalised here) all made by ``version``; ``tasks``: each
    row's task name."""
    if dtype not in DTYPES:
        raise DataError(f"index dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    e = np.asarray(embeddings, np.float32)
    e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    names = tuple(dict.fromkeys(tasks))
    n = len(e)
    return Index(
        embeddings=e.astype(DTYPES[dtype]),
        ids=tuple(str(i) for i in ids),
        tasks=np.array([names.index(t) for t in tasks], np.int32).reshape(-1),
        labels=np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32),
        versions=np.zeros(n, np.int32),
        task_names=names,
        encoder_versions=(version,),
        rows=rows,
        encoder_workdir=encoder_workdir,
    )


def concat_indexes(indexes: Sequence[Index]) -> Index:
    """One index holding the rows of ``indexes`` in order (same dim, dtype and kind of rows);
    task names and encoder versions are merged."""
    if not indexes:
        raise DataError("cannot concatenate zero indexes")
    first = indexes[0]
    for other in indexes[1:]:
        if (other.embeddings.shape[1], other.embeddings.dtype, other.rows) != (
            first.embeddings.shape[1], first.embeddings.dtype, first.rows,
        ):  # fmt: skip
            raise DataError(
                f"cannot concatenate an index of {other.rows} rows of dim "
                f"{other.embeddings.shape[1]} ({other.dtype_name}) to one of {first.rows} rows of "
                f"dim {first.embeddings.shape[1]} ({first.dtype_name})"
            )
    homes = {x.encoder_workdir for x in indexes}
    if len(homes) > 1:
        raise DataError(f"cannot concatenate indexes of different runs: {sorted(homes)}")
    task_names = tuple(dict.fromkeys(t for x in indexes for t in x.task_names))
    versions = tuple(dict.fromkeys(v for x in indexes for v in x.encoder_versions))
    return Index(
        embeddings=np.concatenate([x.embeddings for x in indexes]),
        ids=tuple(i for x in indexes for i in x.ids),
        # Each part's numbers go through a small table of its own names, not row by row.
        tasks=np.concatenate(
            [
                np.array([task_names.index(t) for t in x.task_names], np.int32)[x.tasks]
                for x in indexes
            ]
        ),  # fmt: skip
        labels=np.concatenate([x.labels for x in indexes]).astype(np.int32),
        versions=np.concatenate(
            [
                np.array([versions.index(v) for v in x.encoder_versions], np.int32)[x.versions]
                for x in indexes
            ]
        ),  # fmt: skip
        task_names=task_names,
        encoder_versions=versions,
        rows=first.rows,
        encoder_workdir=first.encoder_workdir,
    )


def select_rows(index: Index, rows: np.ndarray) -> Index:
    """The index restricted to ``rows`` (in that order)."""
    rows = np.asarray(rows, np.int64)
    return dataclasses.replace(
        index,
        embeddings=index.embeddings[rows],
        ids=tuple(index.ids[i] for i in rows),
        tasks=index.tasks[rows],
        labels=index.labels[rows],
        versions=index.versions[rows],
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_index(index: Index, out: str | os.PathLike) -> Path:
    """Write ``index`` to the new folder ``out`` (absent or empty), atomically."""
    with atomic_folder(out) as tmp:
        tensors = {
            "embeddings": index.embeddings,
            "task": index.tasks.astype(np.int32),
            "label": index.labels.astype(np.int32),
            "version": index.versions.astype(np.int32),
        }
        save_file(tensors, str(tmp / TENSORS))
        meta = {
            "format": FORMAT,
            "rows": len(index),
            "dim": int(index.embeddings.shape[1]),
            "dtype": index.dtype_name,
            "embeds": index.rows,
            "ids": list(index.ids),
            "task_names": list(index.task_names),
            "encoder_versions": [v.as_dict() for v in index.encoder_versions],
            "encoder_workdir": index.encoder_workdir,
            "sha256": _sha256(tmp / TENSORS),
        }
        atomic_write_json(tmp / META, meta)
    return Path(out)


def load_index(path: str | os.PathLike) -> Index:
    """The index saved at ``path``; CheckpointError naming the problem if it is missing,
    damaged or inconsistent."""
    path = Path(path)
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        raise CheckpointError(f"no index at {path} (expected {META} and {TENSORS})")
    meta = read_json(path / META, f"index {path}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"index {path}: {META} has format {found!r}, expected {FORMAT!r}")
    if _sha256(path / TENSORS) != meta.get("sha256"):
        raise CheckpointError(
            f"index {path} is damaged: {TENSORS} does not match the SHA-256 in {META}"
        )
    try:
        tensors = load_file(str(path / TENSORS))
        dtype = DTYPES[meta["dtype"]]
        embeddings = tensors["embeddings"]
        if embeddings.dtype != dtype or embeddings.shape != (meta["rows"], meta["dim"]):
            raise CheckpointError(
                f"index {path}: embeddings are {embeddings.dtype} {embeddings.shape}, but "
                f"{META} says {meta['dtype']} ({meta['rows']}, {meta['dim']})"
            )
        versions = tuple(
            EncoderVersion(v["method"], int(v["stage"]), tuple(int(s) for s in v["slots"]))
            for v in meta["encoder_versions"]
        )
        return Index(
            embeddings=embeddings,
            ids=tuple(meta["ids"]),
            tasks=tensors["task"],
            labels=tensors["label"],
            versions=tensors["version"],
            task_names=tuple(meta["task_names"]),
            encoder_versions=versions,
            rows=meta["embeds"],
            encoder_workdir=str(meta.get("encoder_workdir", "")),
        )
    except CheckpointError:
        raise
    except DataError as e:
        raise CheckpointError(f"index {path} is inconsistent: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"index {path}: {META} or {TENSORS} lacks {e}") from e
