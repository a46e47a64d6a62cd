"""Table-driven mapping of a flax parameter tree onto named Hugging Face tensors.

Shared by the converters (``hf_llava``, ``hf_bert``): a converter turns every leaf path of its
target tree (``jax.eval_shape`` of the model's init) into the name of one HF tensor with a table
of ``(flax module regex, HF module template)`` rows, checks all names and shapes against the
source's headers (``check_tensor_names``) before reading anything, then reads one tensor at a
time into the leaf it fills (``read_targets``). ``check_settings`` compares the ``config.json``
keys that shapes cannot check.

Layouts: torch ``Linear.weight`` is ``[out, in]``, a flax ``Dense`` kernel ``[in, out]``; a torch
conv weight is ``[out, in, kh, kw]``, a flax ``Conv`` kernel ``[kh, kw, in, out]`` (both are
cross-correlations, so no flip).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from mslora_jax.errors import CheckpointError
from mslora_jax.interop.safetensors_folder import TensorSource


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an HF tensor becomes a flax leaf, and which HF shape a flax shape implies."""

    to_flax: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


SAME = Layout(lambda a: a, lambda s: tuple(s))
LINEAR = Layout(lambda a: a.T, lambda s: tuple(s)[::-1])  # [out, in] -> [in, out]
CONV = Layout(  # [D, 3, p, p] -> [p, p, 3, D]
    lambda a: a.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1])
)

# Leaf name of flax's Dense/Conv/LayerNorm/RMSNorm/Embed -> HF's.
LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


@dataclasses.dataclass(frozen=True)
class Target:
    """One leaf of the flax tree and the HF tensor that fills it."""

    path: str  # "decoder/block_0/attn/q/kernel"
    shape: tuple[int, ...]  # the flax leaf's shape (one layer's, for a scanned leaf)
    layout: Layout
    layer: int | None = None  # a scanned leaf ``[depth, *shape]``: the layer this tensor fills
    depth: int = 0

    @property
    def where(self) -> str:
        """The leaf (and layer) for messages: ``decoder/blocks/attn/q/kernel[3]``."""
        return self.path if self.layer is None else f"{self.path}[{self.layer}]"

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.layout.hf_shape(self.shape)


def path_str(path) -> str:
    """A jax key path as ``a/b/c``."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def leaf_paths(abstract: Mapping) -> list[tuple[str, tuple[int, ...]]]:
    """``(path, shape)`` of every leaf of a params tree (arrays or ``ShapeDtypeStruct``s)."""
    return [
        (path_str(path), tuple(leaf.shape))
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    ]


def table_name(
    path: str, ndim: int, modules: Sequence[tuple[str, str]]
) -> tuple[str, Layout] | None:
    """The HF tensor name and layout of leaf ``path`` by the first matching ``modules`` row.

    A row is ``(flax module regex, HF module template)``, matched in full against the module
    part of ``path``; the template may use the regex's groups (``\\1``). None if no row matches.
    """
    module, leaf = path.rsplit("/", 1)
    for pattern, template in modules:
        match = re.fullmatch(pattern, module)
        if match and leaf in LEAF_NAMES:
            layout = {2: LINEAR, 4: CONV}.get(ndim, SAME) if leaf == "kernel" else SAME
            return f"{match.expand(template)}.{LEAF_NAMES[leaf]}", layout
    return None


def listing(names: Sequence[str], limit: int = 5) -> str:
    more = f" ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tensor_names(
    targets: Mapping[str, Target],
    shapes: Mapping[str, tuple[int, ...]],
    where: str,
    may_skip: Callable[[str], bool] = lambda name: False,
    missing_hint: Callable[[list[str]], str] = lambda missing: "",
) -> None:
    """CheckpointError for missing tensors, tensors nobody uses, or a wrong shape; reads nothing.

    ``where`` names the source in messages; tensors with ``may_skip(name)`` may go unused;
    ``missing_hint(missing names)`` is appended to the message about missing tensors.
    """
    missing = sorted(set(targets) - set(shapes))
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensor(s) missing: {listing(missing)}{missing_hint(missing)}"
        )
    unexpected = sorted(n for n in shapes if n not in targets and not may_skip(n))
    if unexpected:
        raise CheckpointError(
            f"{where}: {len(unexpected)} tensor(s) the model has no place for: "
            f"{listing(unexpected)} (does the config match these weights?)"
        )
    for name, target in targets.items():
        if tuple(shapes[name]) != target.hf_shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {list(shapes[name])}, expected "
                f"{list(target.hf_shape)} for {target.where} (does the config match these weights?)"
            )


def read_targets(
    targets: Mapping[str, Target], source: TensorSource, dtype=np.float32
) -> dict[str, np.ndarray]:
    """``{leaf path: dtype array}``, read one tensor at a time (names and shapes checked first).

    The peak memory is the result plus one tensor.
    """
    flat = {}
    for name, target in targets.items():
        # Materialize the (transposed) view as C-ordered ``dtype`` now, one tensor at a time.
        value = np.ascontiguousarray(target.layout.to_flax(source.read(name)), dtype=dtype)
        if value.shape != target.shape:  # a source whose data disagrees with its header
            raise CheckpointError(
                f"{source.describe(name)}: tensor {name} read as {list(value.shape)}, "
                f"expected {list(target.hf_shape)}"
            )
        if target.layer is None:
            flat[target.path] = value
        else:  # a scanned leaf: filled layer by layer, so no second copy of it is ever made
            if target.path not in flat:
                flat[target.path] = np.empty((target.depth, *target.shape), dtype)
            flat[target.path][target.layer] = value
    return flat


def unflatten(flat: Mapping[str, object]) -> dict:
    """Nested dicts from ``{"a/b/c": leaf}``."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def same_setting(a: object, b: object) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def check_settings(hf_config: Mapping, expected: Mapping[str, object], where: str) -> None:
    """CheckpointError naming every ``config.json`` key whose value differs from ``expected``.

    Only keys the file states are checked (a missing key means HF's default, which we do not
    guess).
    """
    diffs = [
        f"{key}={hf_config[key]!r} but the config has {value!r}"
        for key, value in expected.items()
        if key in hf_config and not same_setting(hf_config[key], value)
    ]
    if diffs:
        raise CheckpointError(f"{where}: {'; '.join(diffs)}")
