"""Detection data in COCO format: an image folder plus an ``instances_*.json`` with ``images``
(``id``, ``file_name`` relative to the folder of the JSON file, ``width``, ``height``),
``annotations`` (``id``, ``image_id``, ``category_id``, ``bbox`` as ``[x, y, w, h]`` in pixels)
and ``categories`` (``id``, ``name``). The BCCD blood-smear set in ``shared/data/real`` is laid
out so; ``write_coco`` writes the same layout (synthetic scenes for tests and the demo).

``read_coco`` checks everything it reads and refuses a bad file with one line that names the
file and the entry: malformed JSON, a missing key, an unknown category or image, a box outside its
image or without area, a missing image file. Images are decoded only when asked for
(``Detections.image``), so a large set costs nothing until it is used.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mslora_jax.errors import DataError
from mslora_jax.io_utils import atomic_write_json

# A box may overhang its image by this many pixels (annotation tools round outwards).
EDGE_TOLERANCE = 1.0


@dataclasses.dataclass(frozen=True)
class Detections:
    """Images and their ground-truth boxes. ``boxes[i]`` is ``[x, y, w, h]`` (float32 pixels)
    in image ``box_image[i]`` (an index into ``files``), of class ``box_class[i]`` (an index into
    ``class_names``). ``pixels``, when given, holds the decoded images (synthetic scenes)."""

    name: str
    files: tuple[str, ...]
    sizes: np.ndarray  # [N, 2] int (height, width)
    boxes: np.ndarray  # [M, 4] float32 x, y, w, h
    box_image: np.ndarray  # [M] int
    box_class: np.ndarray  # [M] int
    class_names: tuple[str, ...]
    pixels: tuple[np.ndarray, ...] | None = None
    image_ids: tuple = ()  # each image's id in its file (default: 0..N-1)

    @property
    def num_images(self) -> int:
        return len(self.files)

    def image(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 ``[H, W, 3]``."""
        if self.pixels is not None:
            return self.pixels[index]
        return read_rgb(self.files[index])

    def index_of(self, image_id) -> int:
        """The index of the image whose id in its file is ``image_id``."""
        ids = self.image_ids or tuple(range(self.num_images))
        try:
            return ids.index(image_id)
        except ValueError:
            raise DataError(f"{self.name}: no image with id {image_id!r}") from None

    def boxes_of(self, index: int) -> np.ndarray:
        """Row numbers of image ``index``'s boxes."""
        return np.flatnonzero(self.box_image == index)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from e


def _field(record, key: str, where: str):
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where}: missing key {key!r}")
    return record[key]


def read_coco(path: str | os.PathLike, name: str = "") -> Detections:
    """The images and boxes of a COCO ``instances`` file (images relative to its folder)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a JSON file ({e})") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(_field(data, key, str(path)), list):
            raise DataError(f"{path}: {key!r} must be a list")
    categories = {}
    for i, c in enumerate(data["categories"]):
        where = f"{path}: categories[{i}]"
        categories.setdefault(_field(c, "id", where), str(_field(c, "name", where)))
    category_ids = sorted(categories)
    images, files, sizes = {}, [], []
    for i, record in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        image_id = _field(record, "id", where)
        if image_id in images:
            raise DataError(f"{where}: image id {image_id!r} appears twice")
        file = path.parent / str(_field(record, "file_name", where))
        if not file.is_file():
            raise DataError(f"{where}: image file {file} not found")
        width, height = _field(record, "width", where), _field(record, "height", where)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                   for v in (width, height)):  # fmt: skip
            raise DataError(f"{where}: width and height must be positive integers")
        images[image_id] = len(files)
        files.append(str(file))
        sizes.append((int(height), int(width)))
    boxes, box_image, box_class = [], [], []
    for i, record in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        image_id, category = _field(record, "image_id", where), _field(record, "category_id", where)
        if image_id not in images:
            raise DataError(f"{where}: image_id {image_id!r} is not in 'images'")
        if category not in categories:
            raise DataError(f"{where}: category_id {category!r} is not in 'categories'")
        box = _field(record, "bbox", where)
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float))
                                                                for v in box)):  # fmt: skip
            raise DataError(f"{where}: bbox must be [x, y, width, height], got {box!r}")
        x, y, w, h = (float(v) for v in box)
        height, width = sizes[images[image_id]]
        if w <= 0 or h <= 0:
            raise DataError(f"{where}: bbox {box} has no area")
        t = EDGE_TOLERANCE
        if x < -t or y < -t or x + w > width + t or y + h > height + t:
            raise DataError(f"{where}: bbox {box} lies outside its {width}x{height} image")
        boxes.append((x, y, w, h))
        box_image.append(images[image_id])
        box_class.append(category_ids.index(category))
    return Detections(
        name=name or path.stem,
        files=tuple(files),
        sizes=np.asarray(sizes, np.int64).reshape(-1, 2),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        box_image=np.asarray(box_image, np.int64),
        box_class=np.asarray(box_class, np.int64),
        class_names=tuple(categories[c] for c in category_ids),
        image_ids=tuple(images),
    )


def write_coco(detections: Detections, folder: str | os.PathLike, split: str) -> Path:
    """Write ``detections`` (with ``pixels``) as ``folder/images/<split>_<i>.png`` plus
    ``folder/instances_<split>.json``; returns the JSON file's path."""
    if detections.pixels is None:
        raise DataError("write_coco needs decoded images (Detections.pixels)")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    ids = detections.image_ids or tuple(range(detections.num_images))
    images = []
    for i, pixels in enumerate(detections.pixels):
        file = f"images/{split}_{i}.png"
        Image.fromarray(pixels).save(folder / file)
        images.append({"id": detections.image_ids[i] if detections.image_ids else i,
                       "file_name": file, "width": int(pixels.shape[1]),
                       "height": int(pixels.shape[0])})  # fmt: skip
    annotations = [
        {"id": j, "image_id": ids[int(detections.box_image[j])], "category_id": int(c),
         "bbox": [round(float(v), 2) for v in detections.boxes[j]],
         "area": float(detections.boxes[j, 2] * detections.boxes[j, 3]), "iscrowd": 0}
        for j, c in enumerate(detections.box_class)
    ]  # fmt: skip
    categories = [{"id": i, "name": n} for i, n in enumerate(detections.class_names)]
    path = folder / f"instances_{split}.json"
    atomic_write_json(path, {"images": images, "annotations": annotations,
                             "categories": categories})  # fmt: skip
    return path
