"""One LoRA adapter per task: a tree mirroring the adapted layers, with its metadata.

``LoraAdapter.params`` holds, for every adapted module path of the backbone (and only those),
``{"lora_a": [r, in], "lora_b": [out, r]}`` (PyTorch/PEFT layout), so the delta of a layer with
kernel ``W: [in, out]`` is ``scaling * A^T B^T``. A scanned decoder's layer (kernel
``[layers, in, out]``) has ``[layers, r, in]`` / ``[layers, out, r]`` factors: one matrix pair
per layer, as if unrolled. Rank, alpha, modality and task name are static
metadata. To run several adapters in one forward pass they are stacked along a leading task axis
(``stack_params``), which is what the ``lora`` collection of the model holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mslora_jax.errors import ConfigError
from mslora_jax.lora.targets import get_by_path, set_by_path
from mslora_jax.models.decoder import SCANNED
from mslora_jax.models.lora_dense import LORA_A, LORA_B


@flax.struct.dataclass
class LoraAdapter:
    params: dict
    rank: int = flax.struct.field(pytree_node=False)
    alpha: float = flax.struct.field(pytree_node=False)
    modality: str = flax.struct.field(pytree_node=False)
    task: str = flax.struct.field(pytree_node=False)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def metadata(self) -> dict:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "modality": self.modality,
            "task": self.task,
        }

    @classmethod
    def from_metadata(cls, params: dict, meta: Mapping) -> LoraAdapter:
        """The adapter of ``params`` with the metadata ``metadata()`` wrote (extra keys, e.g. a
        stage checkpoint's, are ignored)."""
        return cls(
            params,
            int(meta["rank"]),
            float(meta["alpha"]),
            str(meta["modality"]),
            str(meta["task"]),
        )

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))


_SCANNED_PREFIX = f"decoder/{SCANNED}/"


def is_scanned(path: str) -> bool:
    """Whether module ``path`` is a scanned decoder layer (factors ``[layers, ...]``)."""
    return path.startswith(_SCANNED_PREFIX) and len(path) > len(_SCANNED_PREFIX)


def unrolled_path(path: str, layer: int) -> str:
    """Layer ``layer`` of scanned ``decoder/blocks/attn/q`` as unrolled: ``decoder/block_3/...``."""
    return f"decoder/block_{layer}/{path[len(_SCANNED_PREFIX) :]}"


def kaiming_uniform_a(rng: jax.Array, rank: int, fan_in: int) -> jax.Array:
    """PyTorch's ``kaiming_uniform_(a=sqrt(5))`` on an ``[r, in]`` matrix: U(+-1/sqrt(in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(rng, (rank, fan_in), jnp.float32, -bound, bound)


def init_adapter_params(
    base_params: Mapping, targets: Sequence[str], rank: int, rng: jax.Array
) -> dict:
    """A fresh adapter tree: A kaiming-uniform, B zeros (so the model output is unchanged).

    A scanned decoder layer (kernel ``[layers, in, out]``) draws each layer's A as the unrolled
    layout does (one key per ``decoder/block_{i}/...`` path, in that tree's order) and stacks
    them, so one seed gives the same adapters in both layouts."""
    if rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {rank}")
    layers = []  # (path, layer or None, unrolled path): every adapted matrix pair
    for path in targets:
        if not is_scanned(path):
            layers.append((path, None, path))
            continue
        depth = get_by_path(base_params, path)["kernel"].shape[0]
        layers += [(path, i, unrolled_path(path, i)) for i in range(depth)]
    if any(layer is not None for _, layer, _ in layers):
        # The unrolled tree's order: its (sorted) keys, so block_10 comes before block_2.
        layers.sort(key=lambda entry: entry[2].split("/"))
    keys = dict(
        zip(((path, layer) for path, layer, _ in layers), jax.random.split(rng, len(layers)))
    )
    tree: dict = {}
    for path in targets:
        *lead, fan_in, fan_out = get_by_path(base_params, path)["kernel"].shape
        if lead:  # scanned: [layers, r, in], layer i drawn with block_i's key
            draws = [kaiming_uniform_a(keys[path, i], rank, fan_in) for i in range(lead[0])]
            lora_a = jnp.stack(draws)
        else:
            lora_a = kaiming_uniform_a(keys[path, None], rank, fan_in)
        tree = set_by_path(
            tree,
            path,
            {LORA_A: lora_a, LORA_B: jnp.zeros((*lead, fan_out, rank), jnp.float32)},
        )
    return tree


def init_adapter(
    base_params: Mapping,
    targets: Sequence[str],
    *,
    rank: int,
    alpha: float,
    modality: str,
    task: str,
    rng: jax.Array,
) -> LoraAdapter:
    params = init_adapter_params(base_params, targets, rank, rng)
    return LoraAdapter(params, rank, alpha, modality, task)


def stack_params(trees: Sequence[Mapping]) -> dict:
    """Stack adapter trees of identical structure along a new leading task axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_params(stacked: Mapping, num: int | None = None) -> list[dict]:
    num = num or jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num)]


def insert_params(stacked: Mapping, tree: Mapping, index) -> dict:
    """``stacked`` with slot ``index`` (may be traced) set to ``tree``; differentiable in tree."""
    return jax.tree.map(lambda s, x: s.at[index].set(x), stacked, tree)


def adapter_paths(params: Mapping) -> list[str]:
    """Module paths of the layers an adapter tree adapts."""
    out = []

    def walk(node, prefix):
        if LORA_A in node:
            out.append(prefix)
            return
        for k, v in node.items():
            walk(v, f"{prefix}/{k}" if prefix else k)

    walk(params, "")
    return out
