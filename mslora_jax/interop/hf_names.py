"""Table-driven conversion of Hugging Face tensors onto a flax parameter tree.

A ``NameTable`` says which HF tensor fills each leaf: module rules (a flax module path regex ->
an HF module name template, matched in full) plus flax's leaf names (``kernel`` -> ``weight``...)
and a few leaves named one by one. The conversion is driven by the target tree (``jax.eval_shape``
of the model's init): every leaf's path becomes the name of one HF tensor, which is read,
re-laid out and checked against the leaf's shape. A missing tensor is an error, as is one left
over that the table does not ignore, so a config that does not match the weights cannot load
silently. Names and shapes are all checked before the first tensor is read.

Layouts: torch ``Linear.weight`` is ``[out, in]``, a flax ``Dense`` kernel ``[in, out]``; a torch
conv weight is ``[out, in, kh, kw]``, a flax ``Conv`` kernel ``[kh, kw, in, out]`` (both are
cross-correlations, so no flip). A scanned stack's leaf ``<scanned>/...`` ``[depth, ...]`` is
filled from the HF layer ``i`` of every i, one layer's tensor at a time, into one array.
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
CLS = Layout(lambda a: a.reshape(1, 1, -1), lambda s: tuple(s)[2:])  # [D] -> [1, 1, D]

# Hugging Face's ``hidden_act`` names (transformers' ACT2FN) -> ``transformer.ACTIVATIONS``.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}
# Leaf name of flax's Dense/Conv/LayerNorm/RMSNorm/Embed -> HF's.
LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


@dataclasses.dataclass(frozen=True)
class NameTable:
    """Where each flax leaf's HF tensor is. Templates may hold ``{key}`` placeholders, filled
    from the ``subs`` given to ``hf_targets`` (e.g. LLaVA's vision tower prefix)."""

    modules: tuple[tuple[str, str], ...]  # (flax module path regex, HF module name template)
    leaves: Mapping[str, tuple[str, Layout]] = dataclasses.field(default_factory=dict)
    ignored: tuple[str, ...] = ()  # HF names (re.search) that may go unused
    # A scanned stack: (its flax prefix "decoder/blocks/", the unrolled "decoder/block_{i}/").
    scanned: tuple[str, str] | None = None
    # A hint appended to the "missing" error, given the missing names ("" for none).
    missing_hint: Callable[[list[str]], str] = lambda names: ""

    def is_ignored(self, name: str) -> bool:
        return any(re.search(pattern, name) for pattern in self.ignored)


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
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _fill(template: str, subs: Mapping[str, str]) -> str:
    for key, value in subs.items():
        template = template.replace(f"{{{key}}}", value)
    return template


def module_name(module: str, table: NameTable, subs: Mapping[str, str] | None = None) -> str:
    """The HF module name of the flax module path ``module`` (e.g. for exporting adapters).

    ``image/encoder/block_0/attn/q`` -> ``vision_model.encoder.layers.0.self_attn.q_proj``;
    CheckpointError if the table has no rule for it.
    """
    for pattern, template in table.modules:
        match = re.fullmatch(pattern, module)
        if match:
            return match.expand(_fill(template, subs or {}))
    raise CheckpointError(f"module {module} has no known Hugging Face counterpart")


def hf_name(
    path: str, ndim: int, table: NameTable, subs: Mapping[str, str] | None = None
) -> tuple[str, Layout]:
    """(HF tensor name, layout) of the flax leaf ``path`` with ``ndim`` dimensions."""
    if path in table.leaves:
        template, layout = table.leaves[path]
        return _fill(template, subs or {}), layout
    module, leaf = path.rsplit("/", 1)
    if leaf not in LEAF_NAMES:
        raise CheckpointError(f"parameter {path} has no known Hugging Face counterpart")
    try:
        name = module_name(module, table, subs)
    except CheckpointError:
        raise CheckpointError(f"parameter {path} has no known Hugging Face counterpart") from None
    layout = {2: LINEAR, 4: CONV}.get(ndim, SAME) if leaf == "kernel" else SAME
    return f"{name}.{LEAF_NAMES[leaf]}", layout


def hf_targets(
    abstract: dict, table: NameTable, subs: Mapping[str, str] | None = None
) -> dict[str, Target]:
    """``{HF tensor name: Target}`` for every leaf of the params tree ``abstract``."""
    targets = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        path, shape = path_str(path), tuple(leaf.shape)
        if table.scanned and path.startswith(table.scanned[0]):
            prefix, unrolled = table.scanned  # one HF tensor per layer, named as if unrolled
            for i in range(shape[0]):
                name, layout = hf_name(
                    unrolled.format(i=i) + path[len(prefix) :], len(shape) - 1, table, subs
                )
                targets[name] = Target(path, shape[1:], layout, layer=i, depth=shape[0])
            continue
        name, layout = hf_name(path, len(shape), table, subs)
        targets[name] = Target(path, shape, layout)
    return targets


def listing(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` of ``names`` for an error message, and how many there are in all."""
    more = f" ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tensor_names(
    targets: Mapping[str, Target],
    shapes: Mapping[str, tuple[int, ...]],
    where: str,
    table: NameTable,
    skip: Callable[[str], bool] | None = None,
) -> None:
    """CheckpointError for missing tensors, tensors nobody uses, or a wrong shape; reads nothing.

    ``where`` names the source in messages; tensors the table ignores or ``skip(name)`` accepts
    may go unused.
    """
    missing = sorted(set(targets) - set(shapes))
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensor(s) missing: {listing(missing)}"
            f"{table.missing_hint(missing)}"
        )
    unexpected = sorted(
        n
        for n in shapes
        if n not in targets and not (table.is_ignored(n) or (skip is not None and skip(n)))
    )
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


def convert_tensors(
    abstract: dict,
    source: TensorSource,
    table: NameTable,
    *,
    subs: Mapping[str, str] | None = None,
    skip: Callable[[str], bool] | None = None,
    where: str = "Hugging Face weights",
    dtype=np.float32,
) -> dict:
    """The params tree (nested dicts of ``dtype`` numpy arrays) from HF-named tensors.

    ``abstract``: the model's params tree (arrays or ``ShapeDtypeStruct``s; only shapes are
    used). Names and shapes are all checked first; then tensors are read one at a time, so the
    peak memory is the result plus one tensor.
    """
    targets = hf_targets(abstract, table, subs)
    check_tensor_names(targets, source.shapes(), where, table, skip)
    flat = {}
    for name, target in targets.items():
        # Materialize the (transposed) view as C-ordered ``dtype`` now, one tensor at a time.
        # (np.asarray, not np.ascontiguousarray, which turns a 0-d logit_scale into [1].)
        value = np.asarray(target.layout.to_flax(source.read(name)), dtype=dtype, order="C")
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
    return unflatten(flat)


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}``."""
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
    """CheckpointError naming every key of ``hf_config`` (a ``config.json`` section) whose value
    differs from ``expected``'s. Only keys the file states are checked (a missing key means HF's
    default, which is not guessed here)."""
    diffs = [
        f"{key}={hf_config[key]!r} but the config has {value!r}"
        for key, value in expected.items()
        if key in hf_config and not same_setting(hf_config[key], value)
    ]
    if diffs:
        raise CheckpointError(f"{where}: {'; '.join(diffs)}")
