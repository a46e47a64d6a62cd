"""Read a Hugging Face weights folder (safetensors) lazily, one tensor at a time, as float32.

A folder holds either ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(``{"weight_map": {tensor name: shard file}}``). Only the headers are read up front (names,
shapes, dtypes); each tensor is read when asked for, so converting a 7B model never holds more
than the converted tree plus one tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

# Importing ml_dtypes registers numpy's "bfloat16" dtype name, which safetensors' numpy reader
# needs for bf16 tensors (released LLaVA weights are bf16); without it get_tensor raises TypeError.
import ml_dtypes  # noqa: F401
import numpy as np
from safetensors import SafetensorError, safe_open

from mslora_jax.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype names that convert to float32 without loss (or, for F64, as a checkpoint
# would be used anyway); integer, bool and fp8 tensors are not model weights we know how to use.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class TensorSource(Protocol):
    """Named float32 tensors whose shapes are known before any of them is read."""

    def shapes(self) -> Mapping[str, tuple[int, ...]]: ...

    def read(self, name: str) -> np.ndarray: ...

    def describe(self, name: str) -> str:
        """Where ``name`` lives (a file), for error messages."""
        ...


class _Entry(NamedTuple):
    file: Path
    shape: tuple[int, ...]
    dtype: str


def _shard_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from e
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {absent[:3]}")
        return files
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    raise CheckpointError(
        f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (a Hugging Face weights folder saved "
        "as safetensors is expected)"
    )


class SafetensorsFolder:
    """The tensors of one Hugging Face folder (single file or sharded), read as float32."""

    def __init__(self, directory: os.PathLike | str):
        self.directory = Path(directory).absolute()
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a folder")
        self._entries: dict[str, _Entry] = {}
        for file in _shard_files(self.directory):
            try:
                with safe_open(file, framework="numpy") as f:
                    for name in f.keys():
                        tensor = f.get_slice(name)
                        entry = _Entry(file, tuple(tensor.get_shape()), tensor.get_dtype())
                        if name in self._entries:
                            raise CheckpointError(
                                f"tensor {name!r} is in both {self._entries[name].file} and {file}"
                            )
                        self._entries[name] = entry
            except (OSError, SafetensorError) as e:
                raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from e

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry.shape for name, entry in self._entries.items()}

    def describe(self, name: str) -> str:
        return str(self._entries[name].file) if name in self._entries else str(self.directory)

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a float32 array (one copy in the file's dtype while converting)."""
        entry = self._entries[name]
        if entry.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{entry.file}: tensor {name!r} has dtype {entry.dtype}; expected one of "
                f"{FLOAT_DTYPES}"
            )
        try:
            with safe_open(entry.file, framework="numpy") as f:
                return f.get_tensor(name).astype(np.float32, copy=False)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{entry.file}: cannot read tensor {name!r} ({e})") from e


class MergedSource:
    """Several sources seen as one (e.g. a LLaVA folder and a separate CLIP folder).

    Tensor names must not repeat across sources: the converter could not tell which one is meant.
    """

    def __init__(self, sources: Sequence[TensorSource]):
        self._owner: dict[str, TensorSource] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for source in sources:
            for name, shape in source.shapes().items():
                if name in self._owner:
                    raise CheckpointError(
                        f"tensor {name!r} is in both {self._owner[name].describe(name)} and "
                        f"{source.describe(name)}"
                    )
                self._owner[name], self._shapes[name] = source, tuple(shape)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def describe(self, name: str) -> str:
        return self._owner[name].describe(name)

    def read(self, name: str) -> np.ndarray:
        return self._owner[name].read(name)
