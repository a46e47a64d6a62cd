"""Items to index or to ask from outside a run: a MedMNIST-layout ``.npz``, a folder of images
(optionally with a captions file), or one image file. A run's own tasks are read by the run.

An image folder holds PNG/JPEG files, searched recursively; images in subfolders are labelled by
their top-level subfolder (class folders, in sorted order), images at the top by -1 (no label).
Captions, when the folder has them, are in ``captions.jsonl`` (one ``{"image": RELATIVE_PATH,
"caption": TEXT}`` object per line) or ``captions.csv`` (a header ``image,caption``), one caption
per image. Each item's id is its path relative to the folder (``SPLIT/ROW`` for an ``.npz``).
A bad file is a ``DataError`` naming the file and the line or key.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from mslora_jax.data.medmnist import read_split
from mslora_jax.data.vqa import load_image
from mslora_jax.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CAPTION_FILES = ("captions.jsonl", "captions.csv")


@dataclasses.dataclass(frozen=True)
class Items:
    """Images (uint8 ``[N, S, S, 3]``) with an id each, labels (-1: none) and captions (or
    None); ``name`` names where they came from (an index's task name)."""

    name: str
    ids: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    captions: tuple[str, ...] | None = None


def read_items(source: str | os.PathLike, image_size: int, split: str = "train") -> Items:
    """The items of ``source``: an ``.npz`` (its ``split``), an image folder, or one image."""
    path = Path(source)
    if path.is_dir():
        return _folder(path, image_size)
    if path.suffix == ".npz":
        images, labels, captions = read_split(path, split, image_size)
        ids = tuple(f"{split}/{i}" for i in range(len(labels)))
        return Items(path.stem, ids, images, labels, captions)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return Items(path.stem, (path.name,), load_image(path, image_size)[None],
                     np.full(1, -1, np.int32))  # fmt: skip
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    raise DataError(f"{path}: expected an .npz file, an image folder or a PNG/JPEG image")


def _folder(folder: Path, image_size: int) -> Items:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DataError(f"{folder}: no PNG or JPEG images in this folder")
    ids = tuple(p.relative_to(folder).as_posix() for p in files)
    classes = sorted({i.split("/")[0] for i in ids if "/" in i})
    labels = np.array([classes.index(i.split("/")[0]) if "/" in i else -1 for i in ids], np.int32)
    images = np.stack([load_image(p, image_size) for p in files])
    return Items(folder.name, ids, images, labels, _captions(folder, ids))


def _captions(folder: Path, ids: tuple[str, ...]) -> tuple[str, ...] | None:
    """The folder's captions in ``ids`` order, or None if it has no captions file."""
    found = [folder / name for name in CAPTION_FILES if (folder / name).is_file()]
    if not found:
        return None
    if len(found) > 1:
        raise DataError(f"{folder}: has both {CAPTION_FILES[0]} and {CAPTION_FILES[1]}; keep one")
    path = found[0]
    pairs = _jsonl_pairs(path) if path.suffix == ".jsonl" else _csv_pairs(path)
    by_image: dict[str, str] = {}
    for where, image, caption in pairs:
        if not isinstance(image, str) or not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{path}:{where}: expected a non-empty 'image' and 'caption'")
        if image in by_image:
            raise DataError(f"{path}:{where}: a second caption for {image!r}")
        if image not in ids:
            raise DataError(f"{path}:{where}: image {image!r} is not in {folder}")
        by_image[image] = caption
    missing = [i for i in ids if i not in by_image]
    if missing:
        raise DataError(f"{path}: no caption for image {missing[0]!r} ({len(missing)} without)")
    return tuple(by_image[i] for i in ids)


def _jsonl_pairs(path: Path):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not a JSON object ({e.msg})") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: not a JSON object")
            yield number, record.get("image"), record.get("caption")


def _csv_pairs(path: Path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected a header with columns image,caption")
        for row in reader:
            yield reader.line_num, row.get("image"), row.get("caption")
