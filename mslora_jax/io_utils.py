"""Atomic file writes: a crash or an exception mid-write never leaves a half-written file.

Each writer writes a temporary file in the target's directory (same filesystem, so the final
``os.replace`` is an atomic rename), flushes and fsyncs it, then replaces the target. On any
failure the temporary file is removed and the old target, if there was one, is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from mslora_jax.errors import CheckpointError


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yields a binary file that replaces ``path`` when the block exits without an exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name keeps the target's extension (savefig infers the format from it) and starts
    # with a dot so a half-written file is not mistaken for a result.
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; keep the old file's mode, else the usual 0644.
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Makes the rename itself durable; best effort (not every OS can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically, creating parent directories."""
    with _atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically, creating parent directories."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON atomically.

    Raises ValueError for NaN or infinity (they are not valid JSON and usually mean a broken run);
    the value is serialized before anything is written, so the old file stays as it was.
    """
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"cannot write {os.fspath(path)}: {e} (NaN or infinity)") from e
    atomic_write_text(path, text + "\n")


def atomic_savefig(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    """Saves a matplotlib figure to ``path`` atomically; the format comes from the extension."""
    fmt = Path(path).suffix.lstrip(".").lower()
    if not fmt:
        raise ValueError(f"cannot save figure to {os.fspath(path)}: no extension to give a format")
    with _atomic_file(path) as f:
        fig.savefig(f, format=fmt, **savefig_kwargs)


def check_new_folder(out: Path) -> None:
    """CheckpointError unless ``out`` is absent or an empty folder: an output never overwrites."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"{out} already exists and is not empty; remove it or choose another --out"
        )


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yields a new temporary folder beside ``out`` that is renamed to ``out`` when the block
    exits without an exception (and removed when it raises), so ``out`` is never half-written.

    ``out`` must be absent or empty (``check_new_folder``), checked before the block runs.
    """
    out = Path(out).absolute()
    check_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A dot-name in the same folder: same filesystem, so the final rename is atomic. (mkdir, not
    # tempfile.mkdtemp, so the folder gets the usual permissions rather than 0700.)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)  # replaces an empty folder; fails if one appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file; a missing or malformed file is a CheckpointError naming ``what``."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what}: cannot read {path}: {e}") from e
