"""Synthetic detection scenes for tests and the object-retrieval demo: several objects of several
classes and sizes on a textured background, with their boxes (a ``data.coco.Detections``).

Each class has a shape (disc, ring, square, diamond, cross, ellipse), a colour and a typical size
(small, medium or large, in turn), so the classes differ in what an unsupervised embedding can
see, and sizes vary within a class (x0.7 to x1.3) so that every class appears at several scales.
The background is a smooth pastel field with pixel noise (a stained-slide look). Objects are
placed at random, at most lightly overlapping (IoU of boxes <= 0.1); a box is the tight box of its
object's pixels. Everything follows from the seed.
"""

from __future__ import annotations

import numpy as np

from mslora_jax.data.coco import Detections
from mslora_jax.errors import ConfigError

SHAPES = ("disc", "ring", "square", "diamond", "cross", "ellipse")
COLOURS = np.array(
    [[200, 40, 60], [90, 40, 160], [30, 110, 60], [200, 140, 20], [30, 90, 190], [120, 60, 30]],
    np.float32,
)
SIZE_FRACTIONS = (0.10, 0.18, 0.28)  # small, medium, large: of the image side


def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, angle: float) -> np.ndarray:
    """The object's pixels on a grid of coordinates in [-1, 1] around its centre."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    r = np.sqrt(u**2 + v**2)
    if shape == "disc":
        return r <= 1.0
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    return (u / 1.0) ** 2 + (v / 0.55) ** 2 <= 1.0  # ellipse


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    field = np.zeros((size, size), np.float32)
    for _ in range(4):  # a few low-frequency waves
        fy, fx, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        field += np.sin(2 * np.pi * (fy * yy + fx * xx) + phase).astype(np.float32)
    tint = np.array([235, 215, 225], np.float32) + rng.uniform(-15, 15, 3).astype(np.float32)
    image = tint + 6.0 * field[..., None]
    return image + rng.normal(0.0, 6.0, image.shape).astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def make_scenes(
    num_images: int,
    *,
    num_classes: int = 3,
    image_size: int = 64,
    objects_per_image: tuple[int, int] = (3, 7),
    seed: int = 0,
    name: str = "scenes",
) -> Detections:
    """``num_images`` scenes of ``image_size`` pixels with ``objects_per_image`` (inclusive
    range) objects each, of ``num_classes`` classes (at most ``len(SHAPES)``)."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ConfigError(f"synthetic scenes: num_classes must be in 1..{len(SHAPES)}")
    low, high = objects_per_image
    if not 1 <= low <= high:
        raise ConfigError(f"synthetic scenes: objects_per_image must be 1 <= low <= high, got "
                          f"{objects_per_image}")  # fmt: skip
    if image_size < 24:
        raise ConfigError(f"synthetic scenes: image_size must be >= 24, got {image_size}")
    rng = np.random.default_rng([seed, 0x5CE7E])
    pixels, boxes, box_image, box_class = [], [], [], []
    for index in range(num_images):
        image = _background(rng, image_size)
        placed: list[np.ndarray] = []
        for _ in range(int(rng.integers(low, high + 1))):
            cls = int(rng.integers(num_classes))
            side = SIZE_FRACTIONS[cls % len(SIZE_FRACTIONS)] * image_size * rng.uniform(0.7, 1.3)
            radius = max(2.0, side / 2)
            for _attempt in range(20):
                cy, cx = rng.uniform(radius, image_size - radius, 2)
                yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
                mask = _mask(SHAPES[cls], (yy - cy) / radius, (xx - cx) / radius,
                             rng.uniform(0, np.pi))  # fmt: skip
                ys, xs = np.nonzero(mask)
                if len(ys) < 4:
                    continue
                box = np.array([xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                ys.max() - ys.min() + 1], np.float32)  # fmt: skip
                if all(_iou(box, other) <= 0.1 for other in placed):
                    break
            else:
                continue  # no room left for this object
            colour = COLOURS[cls] * rng.uniform(0.85, 1.15)
            shade = 1.0 - 0.25 * np.clip(np.hypot(yy - cy, xx - cx) / radius, 0, 1)
            image = np.where(mask[..., None], colour * shade[..., None], image)
            placed.append(box)
            boxes.append(box)
            box_image.append(index)
            box_class.append(cls)
        pixels.append(np.clip(image, 0, 255).astype(np.uint8))
    return Detections(
        name=name,
        files=tuple(f"{name}_{i}" for i in range(num_images)),
        sizes=np.full((num_images, 2), image_size, np.int64),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        box_image=np.asarray(box_image, np.int64),
        box_class=np.asarray(box_class, np.int64),
        class_names=tuple(f"{SHAPES[c]}" for c in range(num_classes)),
        pixels=tuple(pixels),
    )
