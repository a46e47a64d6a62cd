"""Training and evaluation batches for generative VQA: images plus tokenised text, fixed shapes.

Which examples go into which training step comes from ``pipeline.step_indices``, so seeded
per-epoch shuffling, per-process rows, the exact step count and resuming at ``start_step``
behave exactly as for the classification tasks (a grain ``MapDataset`` indexed by step; a batch
is a pure function of (seed, step)); ``prefetch`` and ``num_workers`` choose how it is read
(``loader``: ahead in a background thread, or in worker processes) without changing a batch.

Text: every conversation is tokenised once, up front, and right-padded to ``max_len``, so a
conversation whose first answer does not fit fails at construction, not mid-run, and every batch
has the same shapes (the train step compiles once).

Images: decoded when a batch first needs them, by a small thread pool (``num_threads``), in the
process that builds the batch (a worker process with ``num_workers``), and kept as uint8
``[S, S, 3]`` in a least-recently-used cache of ``image_cache_mb`` MiB per process (0: off).
Only this process's rows are ever decoded, and images shared by several questions are decoded
once. The default (1 GiB) holds the paper's VQA sets (a few thousand images, about 150 KB each
at S = 224); with workers, each keeps its own cache, so the bound is per worker.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
from collections.abc import Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grain
import numpy as np
from tokenizers import Tokenizer

from mslora_jax.data.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from mslora_jax.data.conversation import (
    encode_conversations,
    left_pad_prompts,
    pad_batch,
    special_ids,
)
from mslora_jax.data.loader import DEFAULT_PREFETCH, check_count, check_loader_options, iterate
from mslora_jax.data.pipeline import check_rows, step_indices
from mslora_jax.data.vqa import VqaExample, load_image
from mslora_jax.errors import ConfigError

Batch = dict[str, np.ndarray]
ImagePath = str | os.PathLike

DEFAULT_IMAGE_CACHE_MB = 1024


def vqa_train_batches(
    examples: Sequence[VqaExample],
    tokenizer: Tokenizer,
    *,
    image_size: int,
    max_len: int,
    batch_size: int,
    num_steps: int,
    seed: int,
    rows: tuple[int, int] | None = None,
    start_step: int = 0,
    image_cache_mb: int = DEFAULT_IMAGE_CACHE_MB,
    num_threads: int = 8,
    prefetch: int = DEFAULT_PREFETCH,
    num_workers: int = 0,
    template: ChatTemplate = DEFAULT_TEMPLATE,
    image_token_id: int | None = None,
    pad_to_square: bool = False,
    draws: Sequence[int] | None = None,
    sizes: Sequence[int] | None = None,
) -> Iterator[Batch]:
    """Yields this process's ``rows`` of each global batch, steps ``start_step..num_steps-1``:

    ``{"image": uint8 [b, S, S, 3], "input_ids": int32 [b, max_len], "loss_mask": bool
    [b, max_len], "attention_mask": bool [b, max_len]}`` (see ``conversation`` for the template
    and mask convention); ``pad_to_square`` as in
    ``vqa.load_image``. ``rows = (start, stop)`` (``process_row_range(mesh, batch_size)``,
    default all) and ``draws``/``sizes`` (a mixture of consecutive sources) as in
    ``pipeline.train_batches``, so ``b = stop - start``. Images, cache and
    reading options as in the module docstring. Arguments and every conversation are checked
    here, not on the first ``next``.
    """
    where = "vqa_train_batches"
    check_count("image_cache_mb", image_cache_mb, where)
    images = ImageRows(
        [example.image for example in examples],
        image_size=image_size,
        pad_to_square=pad_to_square,
        cache_bytes=image_cache_mb * 2**20,
        num_threads=num_threads,
        where=where,
    )
    check_loader_options(prefetch, num_workers, where)
    pad_id = special_ids(tokenizer, image_token_id).pad
    encodings = encode_conversations(tokenizer, examples, max_len, template, image_token_id)
    text = pad_batch(encodings, pad_id, max_len) if encodings else {}
    steps = step_indices(
        len(examples),
        batch_size=batch_size,
        num_steps=num_steps,
        seed=seed,
        rows=rows,
        start_step=start_step,
        where=where,
        draws=draws,
        sizes=sizes,
    )
    batch = functools.partial(_train_batch, images=images, text=text)
    return iterate(steps.map(batch), prefetch=prefetch, num_workers=num_workers, where=where)


def vqa_eval_batches(
    image_paths: Sequence[ImagePath],
    prompts: Sequence[np.ndarray],
    *,
    batch_size: int,
    image_size: int,
    pad_id: int,
    rows: tuple[int, int] | None = None,
    pad_to_square: bool = False,
    num_threads: int = 8,
    prefetch: int = DEFAULT_PREFETCH,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """Test items in order, in batches of exactly ``batch_size`` (the last one filled up by
    repeating its last item, so one compiled generation serves all).

    Item ``i`` is the image ``image_paths[i]`` and the encoded prompt ``prompts[i]``; every batch
    holds this process's ``rows = (start, stop)`` of ``{"image": uint8 [b, S, S, 3],
    "input_ids", "attention_mask", "positions": [b, L]}`` with the prompts left-padded
    (``conversation.left_pad_prompts``) to the longest of *all* prompts, ``L``. Batch ``j``
    answers items ``j * batch_size ...``, at most ``batch_size`` of them. Each image is decoded
    once per pass (no cache: a test image is used once).
    """
    where = "vqa_eval_batches"
    if len(image_paths) != len(prompts) or not prompts:
        raise ConfigError(
            f"{where}: needs one prompt per image and at least one item, got "
            f"{len(image_paths)} images and {len(prompts)} prompts"
        )
    if batch_size < 1:
        raise ConfigError(f"{where}: batch_size must be >= 1, got {batch_size}")
    start, stop = check_rows(rows, batch_size, where)
    check_loader_options(prefetch, num_workers, where)
    images = ImageRows(
        image_paths,
        image_size=image_size,
        pad_to_square=pad_to_square,
        cache_bytes=0,
        num_threads=num_threads,
        where=where,
    )
    batch = functools.partial(
        _eval_batch,
        images=images,
        prompts=list(prompts),
        pad_id=pad_id,
        length=max(len(p) for p in prompts),
        batch_size=batch_size,
        rows=slice(start, stop),
    )
    count = -(-len(prompts) // batch_size)
    dataset = grain.MapDataset.range(count).map(batch)
    return iterate(dataset, prefetch=prefetch, num_workers=num_workers, where=where)


def _train_batch(rows: np.ndarray, *, images: ImageRows, text: Batch) -> Batch:
    return {"image": images(rows), **{key: value[rows] for key, value in text.items()}}


def _eval_batch(
    index: int,
    *,
    images: ImageRows,
    prompts: list[np.ndarray],
    pad_id: int,
    length: int,
    batch_size: int,
    rows: slice,
) -> Batch:
    chunk = list(range(index * batch_size, min((index + 1) * batch_size, len(prompts))))
    items = (chunk + [chunk[-1]] * (batch_size - len(chunk)))[rows]
    # Padding is per row, so this process's rows alone give the rows of the full batch.
    padded = left_pad_prompts([prompts[i] for i in items], pad_id, length)
    return {"image": images(items), **padded}


class ProcessLocalCache:
    """An ``ImageCache`` of ``self.cache_bytes`` and its lock, built by each process for itself:
    the object pickles without them, so each grain worker starts with an empty cache."""

    cache_bytes: int

    def _start_cache(self) -> None:
        self.cache = ImageCache(self.cache_bytes)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["cache"], state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start_cache()


class ImageRows(ProcessLocalCache):
    """``rows -> uint8 [len(rows), S, S, 3]``: the images ``paths[rows]``, decoded by
    ``vqa.load_image`` (``num_threads`` at a time) through an ``ImageCache`` of ``cache_bytes``.

    Pickles without its cache (and lock), so each worker process starts with an empty one.
    """

    def __init__(
        self,
        paths: Sequence[ImagePath],
        *,
        image_size: int,
        pad_to_square: bool = False,
        cache_bytes: int = 0,
        num_threads: int = 8,
        where: str = "ImageRows",
    ):
        if image_size < 1:
            raise ConfigError(f"{where}: image_size must be >= 1, got {image_size}")
        if num_threads < 1:
            raise ConfigError(f"{where}: num_threads must be >= 1, got {num_threads}")
        self.paths = list(paths)
        self.image_size, self.pad_to_square = image_size, pad_to_square
        self.num_threads, self.cache_bytes = num_threads, cache_bytes
        self._start_cache()

    def load(self, path: ImagePath) -> np.ndarray:
        return load_image(path, self.image_size, self.pad_to_square)

    def __call__(self, rows: Sequence[int]) -> np.ndarray:
        wanted = [self.paths[row] for row in rows]
        with self._lock:
            found = {path: self.cache.get(path) for path in dict.fromkeys(wanted)}
        missing = [path for path, image in found.items() if image is None]
        if len(missing) > 1 and self.num_threads > 1:
            with ThreadPoolExecutor(min(self.num_threads, len(missing))) as pool:
                decoded = list(pool.map(self.load, missing))
        else:
            decoded = [self.load(path) for path in missing]
        with self._lock:
            for path, image in zip(missing, decoded, strict=True):
                self.cache.put(path, image)
        found.update(zip(missing, decoded, strict=True))
        return np.stack([found[path] for path in wanted])


class ImageCache:
    """A least-recently-used map ``key -> array`` holding at most ``max_bytes`` of arrays.

    ``get`` marks an entry as used; ``put`` evicts the least recently used entries until the new
    one fits, and keeps nothing larger than ``max_bytes`` (so ``max_bytes=0`` keeps nothing).
    Not thread-safe on its own (``ImageRows`` locks around it).
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ConfigError(f"ImageCache: max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: collections.OrderedDict[Hashable, np.ndarray] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> np.ndarray | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if key in self._entries:
            self.nbytes -= self._entries.pop(key).nbytes
        if value.nbytes > self.max_bytes:
            return
        while self.nbytes + value.nbytes > self.max_bytes:
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes
        self._entries[key] = value
        self.nbytes += value.nbytes
