"""Input pipelines: seeded training batches (each process gathers its rows) and padded eval batches.

Training uses a grain ``MapDataset`` indexed by *step*: step -> the indices of its batch -> the
gathered arrays. Grain's per-element shuffle/batch costs ~25 us per example (~1.6 ms for a batch
of 64, too much next to a ~10 ms train step), so shuffling is done per epoch with one numpy
permutation and batches are gathered with fancy indexing. Because a batch is a pure function of
(seed, step), a run resumed at ``start_step`` sees exactly the batches it would have seen, and
reading ahead (``prefetch``) or in worker processes (``num_workers``, see ``loader``) changes
when and where a batch is built, never what it holds.

Multi-process: every process computes the same *global* batch indices for a step and gathers
only its own rows ``[start, stop)`` of them (``parallel.mesh.process_row_range``), so the global
batch, and therefore training, does not depend on how many processes share it. This is the
pipeline's per-process sharding; grain's ``ShardByJaxProcess`` would split the *examples* by
process index instead, which changes the batches with the process count and need not match the
rows the mesh gives each process's devices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from mslora_jax.data.loader import DEFAULT_PREFETCH, check_loader_options, iterate
from mslora_jax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    num_steps: int,
    seed: int,
    rows: tuple[int, int] | None = None,
    start_step: int = 0,
    prefetch: int = DEFAULT_PREFETCH,
    num_workers: int = 0,
    draws: Sequence[int] | None = None,
    sizes: Sequence[int] | None = None,
) -> Iterator[Batch]:
    """Yields ``{"image": [b, ...], "label": int32 [b]}`` for steps ``start_step..num_steps-1``.

    ``batch_size`` is the global batch. ``rows = (start, stop)`` are the rows of every global batch
    this process reads (``process_row_range(mesh, batch_size)``; default all), so
    ``b = stop - start`` and only those examples are gathered. Each epoch is a fresh seeded
    permutation of all examples with the remainder dropped. ``prefetch`` batches are built
    ahead in a background thread (0: on demand), in ``num_workers`` processes if > 0 (see
    ``loader``; each gets a copy of the arrays). With ``draws`` and ``sizes`` the examples are
    consecutive sources (e.g. the tasks of a joint stage) and source ``i`` contributes exactly
    ``draws[i]`` of the run's examples (see ``mixture_order``). Arguments are checked here, not
    on the first ``next``.
    """
    labels = np.asarray(labels, np.int32)
    _check_pair(images, labels)
    check_loader_options(prefetch, num_workers, "train_batches")
    steps = step_indices(
        len(labels),
        batch_size=batch_size,
        num_steps=num_steps,
        seed=seed,
        rows=rows,
        start_step=start_step,
        draws=draws,
        sizes=sizes,
    )
    gather = functools.partial(_gather, images=images, labels=labels)
    return iterate(steps.map(gather), prefetch=prefetch, num_workers=num_workers)


def step_indices(
    num_examples: int,
    *,
    batch_size: int,
    num_steps: int,
    seed: int,
    rows: tuple[int, int] | None = None,
    start_step: int = 0,
    where: str = "train_batches",
    draws: Sequence[int] | None = None,
    sizes: Sequence[int] | None = None,
) -> grain.MapDataset:
    """A ``MapDataset`` over steps ``start_step..num_steps-1``: element ``i`` holds the indices
    (into the ``num_examples`` examples) of this process's ``rows`` of step ``start_step + i``'s
    global batch, as ``train_batches`` gathers them. With ``draws``/``sizes``, the steps read
    ``mixture_order(sizes, draws, seed)`` in order instead of per-epoch permutations. Bad
    arguments raise ConfigError naming ``where``."""
    if batch_size < 1:
        raise ConfigError(f"{where}: batch_size must be >= 1, got {batch_size}")
    start, stop = check_rows(rows, batch_size, where)
    if num_examples < batch_size:
        raise ConfigError(
            f"{where}: {num_examples} training examples is fewer than batch_size {batch_size}"
        )
    if seed < 0:
        raise ConfigError(f"{where}: seed must be >= 0, got {seed}")
    if not 0 <= start_step <= num_steps:
        raise ConfigError(
            f"{where}: need 0 <= start_step <= num_steps, got {start_step} and {num_steps}"
        )
    if (draws is None) != (sizes is None):
        raise ConfigError(f"{where}: give both draws and sizes, or neither")
    if draws is None:
        indices = _StepIndices(num_examples, batch_size, slice(start, stop), seed)
    else:
        if sum(sizes) != num_examples:
            raise ConfigError(
                f"{where}: source sizes {list(sizes)} sum to {sum(sizes)}, not the "
                f"{num_examples} examples"
            )
        if sum(draws) < num_steps * batch_size:
            raise ConfigError(
                f"{where}: draws {list(draws)} hold {sum(draws)} examples, fewer than "
                f"{num_steps} steps of {batch_size}"
            )
        indices = _OrderIndices(mixture_order(sizes, draws, seed), batch_size, slice(start, stop))
    return grain.MapDataset.range(start_step, num_steps).map(indices)


def mixture_order(sizes: Sequence[int], draws: Sequence[int], seed: int) -> np.ndarray:
    """The order in which a run reads ``sum(draws)`` examples of consecutive sources.

    Source ``i`` (global indices ``offset_i .. offset_i + sizes[i] - 1``) contributes exactly
    ``draws[i]`` of them: whole seeded permutations of its examples (its epochs), then a seeded
    subset for the fraction of an epoch left; all draws are then shuffled together. So a joint
    stage sees each task as often as that task's own stage would (its epochs or steps), however
    the tasks' sizes differ, where a uniform permutation of the union would see every task the
    same number of epochs. Seeded, so a resumed run reads the same order.
    """
    if len(sizes) != len(draws) or any(n < 1 for n in sizes) or any(d < 0 for d in draws):
        raise ConfigError(
            f"mixture_order: need one draw count >= 0 per source of >= 1 examples, got sizes "
            f"{list(sizes)} and draws {list(draws)}"
        )
    parts, offset = [], 0
    for source, (size, count) in enumerate(zip(sizes, draws, strict=True)):
        epochs = -(-count // size)
        rngs = [np.random.default_rng([seed, 2, source, e]) for e in range(epochs)]
        order = np.concatenate([r.permutation(size) for r in rngs] or [np.zeros(0, np.int64)])
        parts.append(offset + order[:count])
        offset += size
    mixed = np.random.default_rng([seed, 3]).permutation(np.concatenate(parts))
    mixed.flags.writeable = False
    return mixed


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    prefetch: int = DEFAULT_PREFETCH,
) -> Iterator[Batch]:
    """Yields the data in order as ``{"image", "label", "mask"}`` batches of exactly ``batch_size``.

    The last batch is zero-padded and ``mask`` (bool ``[batch_size]``) marks the real rows, so a
    jitted eval step is traced once. ``prefetch`` batches are built ahead in a background thread
    (0: on demand).
    """
    labels = np.asarray(labels, np.int32)
    _check_pair(images, labels)
    if batch_size < 1:
        raise ConfigError(f"eval_batches: batch_size must be >= 1, got {batch_size}")
    check_loader_options(prefetch, 0, "eval_batches")
    count = -(-len(labels) // batch_size)
    padded = functools.partial(_padded, images=images, labels=labels, batch_size=batch_size)
    return iterate(grain.MapDataset.range(count).map(padded), prefetch=prefetch)


def _padded(index: int, *, images: np.ndarray, labels: np.ndarray, batch_size: int) -> Batch:
    start = index * batch_size
    image, label = images[start : start + batch_size], labels[start : start + batch_size]
    real = len(label)
    mask = np.arange(batch_size) < real
    if real < batch_size:
        pad = batch_size - real
        image = np.concatenate([image, np.zeros((pad, *image.shape[1:]), image.dtype)])
        label = np.concatenate([label, np.zeros(pad, label.dtype)])
    return {"image": image, "label": label, "mask": mask}


def _gather(indices: np.ndarray, *, images: np.ndarray, labels: np.ndarray) -> Batch:
    return {"image": images[indices], "label": labels[indices]}


def _check_pair(images: np.ndarray, labels: np.ndarray) -> None:
    if labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"images {getattr(images, 'shape', None)} and labels {labels.shape} must have the "
            "same length, labels 1-D"
        )


def check_rows(rows: tuple[int, int] | None, batch_size: int, where: str) -> tuple[int, int]:
    """``rows`` as ``(start, stop)`` with ``0 <= start < stop <= batch_size`` (None: all rows)."""
    if rows is None:
        return 0, batch_size
    try:
        start, stop = (int(r) for r in rows)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: rows must be (start, stop), got {rows!r}") from None
    if not 0 <= start < stop <= batch_size:
        raise ConfigError(
            f"{where}: rows (start, stop) = {rows} must satisfy "
            f"0 <= start < stop <= batch_size {batch_size}"
        )
    return start, stop


@dataclasses.dataclass(frozen=True)
class _StepIndices:
    """``step ->`` this process's ``rows`` of the global batch of ``step`` (indices into the
    data). A module-level class, not a closure, so worker processes can unpickle it."""

    num_examples: int
    batch: int
    rows: slice
    seed: int

    def __call__(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.num_examples // self.batch)
        order = _epoch_order(self.num_examples, self.seed, epoch)
        return order[position * self.batch : (position + 1) * self.batch][self.rows]


@dataclasses.dataclass(frozen=True)
class _OrderIndices:
    """``step ->`` this process's ``rows`` of the ``step``-th batch of a fixed ``order``."""

    order: np.ndarray
    batch: int
    rows: slice

    def __call__(self, step: int) -> np.ndarray:
        return self.order[step * self.batch : (step + 1) * self.batch][self.rows]


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation of ``range(num_examples)``; memoised as consecutive steps share one
    (a few entries: pipelines built or read side by side each keep their current epoch)."""
    order = np.random.default_rng([seed, 1, epoch]).permutation(num_examples)
    order.flags.writeable = False  # shared by every batch of the epoch
    return order
