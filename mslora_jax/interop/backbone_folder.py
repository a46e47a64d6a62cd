"""Writing a converted backbone folder (what ``backbone.source="load"`` reads), atomically.

Shared by the converters (``llava_med``, ``clip``): the HF ``config.json`` reader, the check
that ``--out`` is free, and the atomic write of params + ``meta.json`` + extra files.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from mslora_jax.errors import CheckpointError
from mslora_jax.io_utils import atomic_write_text
from mslora_jax.train.checkpoints import save_backbone


def read_hf_config(directory: Path, required: bool = False) -> dict:
    """``directory/config.json`` as a dict ({} if absent and not ``required``)."""
    path = directory / "config.json"
    if not path.exists():
        if required:
            raise CheckpointError(f"{path}: not found (a Hugging Face model folder is expected)")
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"{out} already exists and is not empty; remove it or choose another --out"
        )


def save_backbone_atomically(
    out: Path,
    params: dict,
    meta: dict,
    files: Sequence[Path] = (),
    texts: Mapping[str, str] | None = None,
) -> None:
    """Write ``out``: backbone params and meta, copies of ``files``, and ``texts`` (file name ->
    content). Written under a temporary name beside ``out`` and renamed at the end, so a failure
    leaves nothing half-written there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # A dot-name in the same folder: same filesystem, so the final rename is atomic. (mkdir, not
    # tempfile.mkdtemp, so the folder gets the usual permissions rather than 0700.)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        save_backbone(tmp, params, meta)
        for file in files:
            shutil.copyfile(file, tmp / file.name)
        for name, text in (texts or {}).items():
            atomic_write_text(tmp / name, text)
        os.replace(tmp, out)  # replaces an empty folder; fails if one appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
