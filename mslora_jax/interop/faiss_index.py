"""Write an index as FAISS reads it (``mslora-jax export-faiss``): an ``IndexFlatIP`` that FAISS
users serve as is, and a sidecar with each row's item id, task and label in FAISS row order.

    OUT/index.faiss    faiss.write_index of an IndexFlatIP over the float32 embeddings
    OUT/rows.jsonl     {"row", "id", "task", "label", "version"} per line, in row order

Inner product over unit vectors is cosine similarity, what ``retrieval.search`` ranks by, so a
FAISS search of the exported file returns the same top-k. faiss-cpu is an optional extra
(``pip install 'mslora-jax[faiss]'``), imported only here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mslora_jax.errors import ConfigError
from mslora_jax.io_utils import atomic_folder
from mslora_jax.retrieval.index import load_index

FAISS_FILE, ROWS_FILE = "index.faiss", "rows.jsonl"


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ConfigError(
            "export-faiss needs faiss-cpu: pip install 'mslora-jax[faiss]' (or faiss-cpu)"
        ) from e
    return faiss


def export_faiss(index_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the index at ``index_path`` into the new folder ``out`` (atomically)."""
    faiss = _faiss()
    index = load_index(index_path)
    embeddings = np.ascontiguousarray(index.embeddings.astype(np.float32))
    flat = faiss.IndexFlatIP(embeddings.shape[1])
    flat.add(embeddings)
    with atomic_folder(out) as tmp:
        faiss.write_index(flat, str(tmp / FAISS_FILE))
        with open(tmp / ROWS_FILE, "w", encoding="utf-8") as f:
            for row, item in enumerate(index.ids):
                version = index.encoder_versions[index.versions[row]].as_dict()
                record = {"row": row, "id": item, "task": index.task_names[index.tasks[row]],
                          "label": int(index.labels[row]), "version": version}  # fmt: skip
                f.write(json.dumps(record) + "\n")
    return Path(out)
