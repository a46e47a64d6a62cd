"""Writing a converted backbone folder (what ``backbone.source="load"`` reads), atomically.

Shared by the converters (``llava_med``, ``clip``): the HF ``config.json`` reader and the
atomic write of params + ``meta.json`` + extra files.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from mslora_jax.errors import CheckpointError
from mslora_jax.io_utils import atomic_folder, atomic_write_text, read_json
from mslora_jax.train.checkpoints import save_backbone


def read_hf_config(directory: Path, required: bool = False) -> dict:
    """``directory/config.json`` as a dict ({} if absent and not ``required``)."""
    path = directory / "config.json"
    if not path.exists() and required:
        raise CheckpointError(f"{path}: not found (a Hugging Face model folder is expected)")
    return read_json(path, "Hugging Face config") if path.exists() else {}


def save_backbone_atomically(
    out: Path,
    params: dict,
    meta: dict,
    files: Sequence[Path] = (),
    texts: Mapping[str, str] | None = None,
) -> None:
    """Write ``out``: backbone params and meta, copies of ``files``, and ``texts`` (file name ->
    content), all at once (``io_utils.atomic_folder``: ``out`` must be absent or empty, and a
    failure leaves nothing half-written there)."""
    with atomic_folder(out) as tmp:
        save_backbone(tmp, params, meta)
        for file in files:
            shutil.copyfile(file, tmp / file.name)
        for name, text in (texts or {}).items():
            atomic_write_text(tmp / name, text)
