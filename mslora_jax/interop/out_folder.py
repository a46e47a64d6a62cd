"""Output folders written all at once: a new folder appears complete or not at all.

Used by the converters and importers of ``interop`` (``convert-llava-med``, ``import-released``):
the folder is filled under a temporary dot-name beside its target and renamed at the end, so a
failure (bad input found late, a crash, Ctrl-C) leaves nothing half-written where a run looks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from mslora_jax.errors import CheckpointError


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """CheckpointError if ``out`` exists and is not an empty folder (nothing is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"{out} already exists and is not empty; remove it or choose another {flag}"
        )


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yields an empty temporary folder that becomes ``out`` when the block exits normally.

    On an exception the temporary folder is removed and ``out`` is left as it was. The final
    ``os.replace`` replaces an empty ``out`` and fails if a non-empty one appeared meanwhile.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    # A dot-name in the same folder: same filesystem, so the final rename is atomic. (mkdir, not
    # tempfile.mkdtemp, so the folder gets the usual permissions rather than 0700.)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
