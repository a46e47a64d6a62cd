"""Training batches for generative VQA: images plus tokenised conversations, fixed shapes.

Which examples go into which step comes from ``pipeline.train_batches`` run over example
*indices*, so seeded per-epoch shuffling, per-process rows, the exact step count and
resuming at ``start_step`` behave exactly as for the classification tasks (a grain ``MapDataset``
indexed by step; a batch is a pure function of (seed, step)).

Text: every conversation is tokenised once, up front, and right-padded to ``max_len``, so a
conversation whose first answer does not fit fails at construction, not mid-run, and every batch
has the same shapes (the train step compiles once).

Images: decoded lazily on first use by a small thread pool, then cached by path as uint8
``[S, S, 3]`` (``cache_images``). Only this process's rows are ever decoded, and images shared by
several questions are decoded once. The paper's VQA sets have a few thousand images (about
150 KB each at S = 224), so the cache fits easily; pass ``cache_images=False`` for larger data.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tokenizers import Tokenizer

from mslora_jax.data.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from mslora_jax.data.conversation import encode_conversations, pad_batch, special_ids
from mslora_jax.data.pipeline import train_batches
from mslora_jax.data.vqa import VqaExample, load_image
from mslora_jax.errors import ConfigError

Batch = dict[str, np.ndarray]


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
    cache_images: bool = True,
    num_threads: int = 8,
    template: ChatTemplate = DEFAULT_TEMPLATE,
    image_token_id: int | None = None,
    pad_to_square: bool = False,
) -> Iterator[Batch]:
    """Yields this process's ``rows`` of each global batch, steps ``start_step..num_steps-1``:

    ``{"image": uint8 [b, S, S, 3], "input_ids": int32 [b, max_len], "loss_mask": bool
    [b, max_len], "attention_mask": bool [b, max_len]}`` (see ``conversation`` for the template
    and mask convention); ``pad_to_square`` as in ``vqa.load_image``. ``rows = (start, stop)``
    (``process_row_range(mesh, batch_size)``, default all) as in ``pipeline.train_batches``, so
    ``b = stop - start``. Arguments and every conversation are checked here, not on the first
    ``next``.
    """
    if image_size < 1:
        raise ConfigError(f"vqa_train_batches: image_size must be >= 1, got {image_size}")
    if num_threads < 1:
        raise ConfigError(f"vqa_train_batches: num_threads must be >= 1, got {num_threads}")
    pad_id = special_ids(tokenizer, image_token_id).pad
    encodings = encode_conversations(tokenizer, examples, max_len, template, image_token_id)
    text = pad_batch(encodings, pad_id, max_len) if encodings else {}
    index = np.arange(len(examples))
    # train_batches gathers rows of its arrays; giving it the row numbers themselves yields the
    # example indices of each step (under "label") with its shuffling and row selection.
    steps = train_batches(
        index,
        index,
        batch_size=batch_size,
        num_steps=num_steps,
        seed=seed,
        rows=rows,
        start_step=start_step,
    )
    paths = [example.image for example in examples]
    load = functools.partial(load_image, image_size=image_size, pad_to_square=pad_to_square)
    return _batches(steps, text, paths, load, cache_images, num_threads)


def _batches(
    steps: Iterator[Batch],
    text: Batch,
    paths: Sequence[str | os.PathLike],
    load: Callable[[str | os.PathLike], np.ndarray],
    cache_images: bool,
    num_threads: int,
) -> Iterator[Batch]:
    cache: dict[str | os.PathLike, np.ndarray] = {}
    with ThreadPoolExecutor(num_threads, thread_name_prefix="vqa-images") as pool:
        for step in steps:
            rows = step["label"]
            wanted = [paths[row] for row in rows]
            missing = [path for path in dict.fromkeys(wanted) if path not in cache]
            loaded = dict(zip(missing, pool.map(load, missing)))
            images = np.stack([cache[p] if p in cache else loaded[p] for p in wanted])
            if cache_images:
                cache.update(loaded)
            yield {"image": images, **{key: value[rows] for key, value in text.items()}}
