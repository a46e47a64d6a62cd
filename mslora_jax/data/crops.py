"""Region crops at mixed scales: each region's box cut from its image and resized to the
encoder's input, streamed in padded batches through grain, images decoded through a bounded cache.

``RegionCrops(detections, boxes, box_image, size)`` maps region rows to uint8 ``[len(rows), S,
S, 3]``; it pickles without its cache, so grain worker processes (``num_workers``) each keep
their own. ``crop_batches`` streams every region in order as ``{"image", "row", "mask"}`` batches
of one size (the last padded), so a jitted encoder is traced once. ``area_groups`` splits regions
into groups by box-area quantiles (MS-UGCML's mixed-scale groups: group 0 the smallest).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import grain
import numpy as np
from PIL import Image

from mslora_jax.data.coco import Detections
from mslora_jax.data.loader import DEFAULT_PREFETCH, check_count, iterate
from mslora_jax.data.vqa_pipeline import ProcessLocalCache
from mslora_jax.errors import ConfigError

DEFAULT_CACHE_MB = 256


def crop(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """``box`` (``[x, y, w, h]``, rounded outwards to whole pixels, at least one) of ``image``,
    resized bilinearly to ``[size, size, 3]``."""
    height, width = image.shape[:2]
    x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
    x1, y1 = int(np.ceil(box[0] + box[2])), int(np.ceil(box[1] + box[3]))
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    x1, y1 = max(min(x1, width), x0 + 1), max(min(y1, height), y0 + 1)
    patch = Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]))
    return np.asarray(patch.resize((size, size), Image.BILINEAR), np.uint8)


class RegionCrops(ProcessLocalCache):
    """``rows -> uint8 [len(rows), size, size, 3]``: crops of regions ``rows``."""

    def __init__(
        self,
        detections: Detections,
        boxes: np.ndarray,
        box_image: np.ndarray,
        size: int,
        cache_mb: int = DEFAULT_CACHE_MB,
    ):
        if size < 1:
            raise ConfigError(f"RegionCrops: size must be >= 1, got {size}")
        check_count("cache_mb", cache_mb, "RegionCrops")
        if len(boxes) != len(box_image):
            raise ConfigError(f"RegionCrops: {len(boxes)} boxes but {len(box_image)} images")
        self.detections, self.size, self.cache_bytes = detections, size, cache_mb * 2**20
        self.boxes = np.asarray(boxes, np.float32)
        self.box_image = np.asarray(box_image, np.int64)
        self._start_cache()

    def __len__(self) -> int:
        return len(self.boxes)

    def _image(self, index: int) -> np.ndarray:
        with self._lock:
            image = self.cache.get(index)
        if image is None:
            image = self.detections.image(index)
            with self._lock:
                self.cache.put(index, image)
        return image

    def __call__(self, rows) -> np.ndarray:
        out = np.empty((len(rows), self.size, self.size, 3), np.uint8)
        for n, row in enumerate(rows):
            out[n] = crop(self._image(int(self.box_image[row])), self.boxes[row], self.size)
        return out


def _batch(index: int, *, crops: RegionCrops, batch_size: int) -> dict[str, np.ndarray]:
    rows = np.arange(index * batch_size, min((index + 1) * batch_size, len(crops)))
    mask = np.zeros(batch_size, bool)
    mask[: len(rows)] = True
    padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
    return {"image": crops(padded), "row": padded, "mask": mask}


def crop_batches(
    crops: RegionCrops, batch_size: int, prefetch: int = DEFAULT_PREFETCH, num_workers: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Every region's crop in order, in ``{"image", "row", "mask"}`` batches of ``batch_size``
    (the last one padded by repeating its last region; ``mask`` marks the real rows)."""
    if batch_size < 1:
        raise ConfigError(f"crop_batches: batch_size must be >= 1, got {batch_size}")
    count = -(-len(crops) // batch_size)
    make = functools.partial(_batch, crops=crops, batch_size=batch_size)
    return iterate(grain.MapDataset.range(count).map(make), prefetch=prefetch,
                   num_workers=num_workers, where="crop_batches")  # fmt: skip


def area_groups(boxes: np.ndarray, num_groups: int = 4) -> np.ndarray:
    """Each box's group ``0..num_groups-1`` by area quantiles (0: the smallest boxes); ties
    in area share a group."""
    if num_groups < 1:
        raise ConfigError(f"area_groups: num_groups must be >= 1, got {num_groups}")
    area = np.asarray(boxes, np.float64)[:, 2] * np.asarray(boxes, np.float64)[:, 3]
    if len(area) == 0:
        return np.zeros(0, np.int64)
    edges = np.quantile(area, np.linspace(0, 1, num_groups + 1)[1:-1])
    return np.searchsorted(edges, area, side="right").astype(np.int64)
