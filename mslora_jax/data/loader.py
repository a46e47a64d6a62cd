"""Read a grain ``MapDataset`` of whole batches in order: on demand, ahead in a background
thread, or in worker processes.

Every pipeline here is a ``MapDataset`` whose element ``i`` is batch ``i`` (a pure function of
``i``), so how it is read changes when a batch is built and where, never what it holds:

- ``prefetch=0, num_workers=0``: built in the calling thread when asked for (random access:
  grain's iterator costs ~0.3 ms per element, not worth paying without the overlap).
- ``prefetch=k``: one background thread (``to_iter_dataset(ReadOptions(num_threads=1,
  prefetch_buffer_size=k))``) builds up to ``k`` batches ahead, so the host builds batch
  ``i + 1`` while the device runs step ``i``. One thread, not more: the batch functions keep
  per-process state (an image cache) and parallelise inside a batch where that helps.
- ``num_workers=n``: ``mp_prefetch`` with ``n`` spawned processes; worker ``w`` builds batches
  ``w, w + n, ...`` (``k`` ahead each, at least one) and grain interleaves them back in order.
  Each worker gets a pickled copy of the dataset (its arrays, its own image cache) and imports
  jax through grain: seconds to start, so workers pay off only where building a batch is
  CPU-heavy (decoding images), not for in-memory gathers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import grain
from absl import flags

from mslora_jax.errors import ConfigError

T = TypeVar("T")

# Batches built ahead by default: one to hand over while the next is being built.
DEFAULT_PREFETCH = 2


def check_loader_options(prefetch: int, num_workers: int, where: str) -> None:
    """ConfigError naming ``where`` unless both are integers >= 0."""
    check_count("prefetch", prefetch, where)
    check_count("num_workers", num_workers, where)


def check_count(name: str, value: int, where: str) -> None:
    """ConfigError naming ``where`` and ``name`` unless ``value`` is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {name} must be an integer >= 0, got {value!r}")


def iterate(
    dataset: grain.MapDataset[T],
    *,
    prefetch: int = DEFAULT_PREFETCH,
    num_workers: int = 0,
    where: str = "input pipeline",
) -> Iterator[T]:
    """The elements of ``dataset`` in order, read as the module docstring says.

    Options are checked here; threads and processes start on the first ``next`` and stop when
    the iterator is exhausted, closed or garbage collected.
    """
    check_loader_options(prefetch, num_workers, where)
    return _elements(dataset, prefetch, num_workers)


def _elements(dataset: grain.MapDataset[T], prefetch: int, num_workers: int) -> Iterator[T]:
    if not prefetch and not num_workers:
        for i in range(len(dataset)):
            yield dataset[i]
        return
    if num_workers:
        _parse_absl_flags()
        # In a worker, elements are built one after another; its output queue is the buffer.
        serial = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        options = grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)
        )
        pipeline = dataset.to_iter_dataset(serial).mp_prefetch(options)
    else:
        ahead = grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)
        pipeline = dataset.to_iter_dataset(ahead)
    iterator = iter(pipeline)
    try:
        yield from iterator
    finally:
        iterator.close()  # stop the thread or the worker processes now, not at GC


def _parse_absl_flags() -> None:
    # grain <= 0.2.18 reads one of its absl flags (worker profiling) when it starts workers, and
    # absl refuses before flags are parsed, which only absl.app programs do (not pytest or a
    # notebook): google/grain#1355, fixed upstream by #1362. Marking them parsed keeps every
    # flag at its default; absl.app still parses the command line when it runs.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
