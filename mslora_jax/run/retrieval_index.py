"""Index, query and evaluate with a finished run's encoders (``mslora-jax index``, ``query``,
``evaluate-retrieval``).

An index records the run folder and the encoder version of every row (method, stage, adapter
slots), so a query is embedded by exactly the encoder that embedded the rows it is compared with:
once per version the index holds, each version's rows searched with its own embedding and the
results merged by score (never one embedding against rows of another version).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np

from mslora_jax.continual_retrieval.encoders import encoder_slots, slots_after_stages
from mslora_jax.data.sources import Items, read_items
from mslora_jax.data.vqa import load_image
from mslora_jax.errors import CheckpointError, ConfigError, DataError
from mslora_jax.families import family_of
from mslora_jax.parallel.mesh import make_mesh
from mslora_jax.retrieval.index import EncoderVersion, Index, load_index, make_index, save_index
from mslora_jax.retrieval.metrics import ranking_metrics
from mslora_jax.retrieval.search import SearchResult, merge_results, put_database, search
from mslora_jax.train.checkpoints import load_stage_adapters, read_workdir_config
from mslora_jax.train.stream_experiment import StreamExperiment


@dataclasses.dataclass
class RunEncoders:
    """A finished run's experiment and, per method, the adapters after each of its stages."""

    workdir: Path
    exp: StreamExperiment
    _stages: dict = dataclasses.field(default_factory=dict)

    def slots(self, method: str, stage: int) -> dict:
        if method not in self._stages:
            adapters = [a for _, a in load_stage_adapters(self.workdir, method)]
            self._stages[method] = slots_after_stages(self.exp, self.exp.method(method), adapters)
        stages = self._stages[method]
        if not 0 <= stage < len(stages):
            raise CheckpointError(
                f"method {method!r} of {self.workdir} has {len(stages)} finished stages; "
                f"stage {stage} is not one of them"
            )
        return stages[stage]

    def version(self, method: str, stage: int | None) -> EncoderVersion:
        """The encoder after ``stage`` of ``method`` (None: its last finished stage)."""
        if stage is None:
            self.slots(method, 0)
            stage = len(self._stages[method]) - 1
        self.slots(method, stage)
        active = encoder_slots(self.exp.method(method), self.exp.num_tasks, stage)
        return EncoderVersion(method, stage, tuple(active))

    def embed(self, version: EncoderVersion, items: Items, rows: str) -> np.ndarray:
        """``items``' images (``rows="image"``) or captions (``"text"``) embedded by ``version``."""
        slots, active = self.slots(version.method, version.stage), list(version.slots)
        if rows == "text":
            if items.captions is None:
                raise DataError(f"{items.name}: has no captions to embed as text rows")
            return self.exp.embed_texts(slots, active, items.captions)
        return self.exp.embed_images(slots, active, items.images)


@functools.lru_cache(maxsize=4)
def open_run(workdir: str) -> RunEncoders:
    """The experiment of the finished run in ``workdir`` (its recorded config, inputs and
    backbone), ready to embed with any of its methods' stages."""
    path = Path(workdir).absolute()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a run folder (no config.json)")
    config = read_workdir_config(path)
    if config.model_kind != "dual_encoder":
        raise ConfigError(f"{path}: retrieval needs a dual encoder run, not {config.model_kind!r}")
    mesh = make_mesh(config.num_devices, config.mesh.shape)
    family = family_of(config)
    exp, _ = family.build_experiment(config, path, mesh, family.read_inputs(config))
    return RunEncoders(path, exp)


def index_run(index: Index) -> RunEncoders:
    """The run whose encoders embedded ``index``'s rows."""
    if not index.encoder_workdir:
        raise CheckpointError("this index does not name the run that embedded it; rebuild it")
    return open_run(index.encoder_workdir)


def source_items(run: RunEncoders, source: str, split: str) -> Items:
    """Items of a run task (its name or id) or of a file or folder (``data.sources``)."""
    names = [t.name for t in run.exp.tasks]
    if source in names or (source.isdigit() and int(source) < len(names)):
        task = run.exp.tasks[run.exp.config.task_index(source)]
        if split not in ("train", "test"):
            raise ConfigError(f"split must be train or test for a run task, got {split!r}")
        labels = getattr(task, f"{split}_labels")
        return Items(
            task.name,
            tuple(f"{split}/{i}" for i in range(len(labels))),
            getattr(task, f"{split}_images"),
            labels.astype(np.int32),
            getattr(task, f"{split}_captions"),
        )
    return read_items(source, run.exp.config.model.image_size, split)


def build_index(
    workdir: str | os.PathLike,
    method: str,
    data: str,
    out: str | os.PathLike,
    *,
    stage: int | None = None,
    split: str = "train",
    rows: str = "image",
    dtype: str = "float32",
) -> Index:
    """Embed ``data``'s items with ``method``'s encoder after ``stage`` and save the index at
    ``out`` (a new folder, written atomically)."""
    if Path(out).exists() and any(Path(out).iterdir()):
        raise CheckpointError(f"{out} already exists and is not empty; choose a new --out")
    run = open_run(str(Path(workdir).absolute()))
    version = run.version(method, stage)
    items = source_items(run, data, split)
    index = make_index(
        run.embed(version, items, rows),
        items.ids,
        [items.name] * len(items.ids),
        version,
        labels=items.labels,
        rows=rows,
        dtype=dtype,
        encoder_workdir=str(run.workdir),
    )
    save_index(index, out)
    return index


def search_index(index: Index, embed, k: int) -> SearchResult:
    """The top-``k`` rows of ``index`` for queries that ``embed(run, version)`` embeds, once per
    encoder version of the index, each version's rows searched with its own embedding."""
    run = index_run(index)
    parts, row_maps = [], []
    for version in index.encoder_versions:
        rows = index.rows_of_version(version)
        database = put_database(index.embeddings[rows], run.exp.mesh)
        parts.append(search(database, embed(run, version), min(k, len(rows))))
        row_maps.append(rows)
    return merge_results(parts, row_maps, k)


def query_index(
    index_path: str | os.PathLike, *, text: str | None = None, image: str | None = None, k=10
) -> list[dict]:
    """The ``k`` best rows for one text or one image file: ``[{"id", "task", "score"}]``."""
    if (text is None) == (image is None):
        raise ConfigError("give exactly one query: --text or --image")
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    index = load_index(index_path)

    def embed(run: RunEncoders, version: EncoderVersion) -> np.ndarray:
        if text is not None:
            items = Items("query", ("query",), np.zeros((1, 1, 1, 3), np.uint8),
                          np.full(1, -1, np.int32), (text,))  # fmt: skip
            return run.embed(version, items, "text")
        size = run.exp.config.model.image_size
        items = Items("query", ("query",), load_image(image, size)[None], np.full(1, -1, np.int32))
        return run.embed(version, items, "image")

    found = search_index(index, embed, k)
    return [
        {"id": index.ids[r], "task": index.task_names[index.tasks[r]], "score": float(s)}
        for s, r in zip(found.scores[0], found.rows[0], strict=True)
        if r >= 0
    ]


def evaluate_index(
    index_path: str | os.PathLike, queries: str, *, split: str = "test", rows: str = "image"
) -> dict:
    """Recall@1/5/10, MRR, mAP, mAP@R and Precision@10 of ``queries``' items against the index,
    over full rankings. Same kind of rows on both sides (image against image): label level, a
    row relevant when it has the query's label (and its task, when the query source is one of
    the index's tasks). Text against image or back: instance level, the row with the query's
    own item id (same task and split: a caption and its image)."""
    index = load_index(index_path)
    items = source_items(index_run(index), queries, split)
    found = search_index(index, lambda run, v: run.embed(v, items, rows), len(index))
    task = index.task_names.index(items.name) if items.name in index.task_names else -1
    if rows == index.rows:
        database = np.stack([index.labels, np.where(task >= 0, index.tasks, -1)], 1)
        asked = np.stack([items.labels, np.full(len(items.labels), task)], 1)
    else:  # instance level: (task, item id)
        ids = {i: n for n, i in enumerate(dict.fromkeys(index.ids + items.ids))}
        database = np.stack([index.tasks, [ids[i] for i in index.ids]], 1)
        asked = np.stack([np.full(len(items.ids), task), [ids[i] for i in items.ids]], 1)
    keys = {tuple(k): n for n, k in enumerate(map(tuple, np.concatenate([database, asked])))}
    database_keys = np.array([keys[tuple(k)] for k in database])
    query_keys = np.array([keys[tuple(k)] for k in asked])
    if rows == index.rows:
        query_keys = np.where(items.labels >= 0, query_keys, -1)  # unlabelled: nothing relevant
    return ranking_metrics(found.rows, query_keys, database_keys)
