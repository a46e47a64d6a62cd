"""Sharding rules: parameter paths -> logical axes -> mesh axes (MaxText's two-table idea).

1. ``PARAM_RULES[family]``: ordered ``(regex, logical axes)`` pairs. A rule's regex matches a
   *suffix* of a parameter's '/'-joined path (``decoder/block_3/attn/q/kernel``), so the same
   rules also place the copies of a parameter inside other trees: its Adam moments
   (``opt_state/0/mu/decoder/...``), the frozen backbone inside a train context
   (``base_params/decoder/...``). The first matching rule wins. Every backbone parameter must match
   a rule and every rule (but the ``OPTIONAL_RULES`` of layers only some text towers have) must
   match some parameter (``check_rules``): a typo or a new layer is an
   error naming the path, never a silently replicated 7B model.
2. ``LOGICAL_TO_MESH``: logical axis -> mesh axes. ``embed`` goes to ``fsdp`` (every frozen
   weight is split over the FSDP devices), heads / MLP / vocabulary to ``tensor``; the rest
   (norms, positions, the LoRA rank) stays unsharded.

A LoRA factor inherits the logical axis of the base dimension it touches: for a kernel
``[in, out]`` with axes ``(li, lo)``, ``lora_a`` ``[.., r, in]`` gets ``(.., None, li)`` and
``lora_b`` ``[.., out, r]`` gets ``(.., lo, None)`` (leading stack axes unsharded; a scanned
kernel's ``layers`` axis is kept, unsharded, in place). A dimension
whose size the mesh axes do not divide stays unsharded (e.g. a 1-head test model on tensor=2).
FSDP splits every array: one that no rule puts on ``fsdp`` is split over it along its largest
divisible dimension (see ``ShardingRules.spec``), so a LoRA B ``[mlp, r]`` is split too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mslora_jax.errors import ConfigError
from mslora_jax.models.lora_dense import LORA_A, LORA_B
from mslora_jax.parallel.mesh import BATCH_AXES, FSDP_AXIS, TENSOR_AXIS

Axes = tuple[str | None, ...]
Rule = tuple[str, Axes]

# The ViT / text transformer of models.transformer (dual encoder towers, LLaVA's vision tower).
_TRANSFORMER_RULES: tuple[Rule, ...] = (
    (r"encoder/block_\d+/attn/(q|k|v)/kernel", ("embed", "heads")),
    (r"encoder/block_\d+/attn/(q|k|v)/bias", ("heads",)),
    (r"encoder/block_\d+/attn/out/kernel", ("heads", "embed")),
    (r"encoder/block_\d+/mlp/fc1/kernel", ("embed", "mlp")),
    (r"encoder/block_\d+/mlp/fc1/bias", ("mlp",)),
    (r"encoder/block_\d+/mlp/fc2/kernel", ("mlp", "embed")),
    # (Released CLIP towers have no patch bias; the rule still matches the blocks' biases.)
    (r"(encoder/block_\d+/(attn/out|mlp/fc2)|patch_embed)/bias", ("embed",)),
    (r"(ln_attn|ln_mlp|ln_final|ln_pre)/(scale|bias)", ("norm",)),
    (r"patch_embed/kernel", ("patch", "patch", "channels", "embed")),
    (r"(image|vision_tower)/cls", (None, None, "embed")),
    (r"(image|vision_tower)/pos_embed", ("positions", "embed")),
)

# A decoder block's parameters, below ``decoder/block_{i}/`` (unrolled) or ``decoder/blocks/``
# (scanned: one more leading ``layers`` axis, never sharded: each scan step reads one layer).
_DECODER_BLOCK_RULES: tuple[Rule, ...] = (
    (r"attn/q/kernel", ("embed", "heads")),
    (r"attn/(k|v)/kernel", ("embed", "kv_heads")),
    (r"attn/o/kernel", ("heads", "embed")),
    (r"mlp/(gate|up)/kernel", ("embed", "mlp")),
    (r"mlp/down/kernel", ("mlp", "embed")),
    (r"(attn_norm|mlp_norm)/scale", ("norm",)),
)

# The two layouts' rule prefixes (``check_rules`` expects the rules of one of them to be used).
_LAYOUT_PREFIXES = (r"decoder/block_\d+/", r"decoder/blocks/")

# models.decoder (Mistral/LLaMA-style) and LLaVA's projector.
_DECODER_RULES: tuple[Rule, ...] = (
    (r"decoder/embed_tokens/embedding", ("vocab", "embed")),
    *((rf"decoder/block_\d+/{pattern}", axes) for pattern, axes in _DECODER_BLOCK_RULES),
    *((rf"decoder/blocks/{pattern}", ("layers", *axes)) for pattern, axes in _DECODER_BLOCK_RULES),
    (r"decoder/norm/scale", ("norm",)),
    (r"decoder/lm_head/kernel", ("embed", "vocab")),
    # The projector maps the vision width to the decoder's: shard the decoder side.
    (r"projector/linear_1/kernel", ("vision_embed", "embed")),
    (r"projector/linear_2/kernel", ("mlp", "embed")),
    (r"projector/linear_\d/bias", ("embed",)),
)

# The dual encoder's text towers (models.clip.TEXT_TOWERS) differ in their embeddings: the
# hashed and CLIP towers have ``pos_embed``, BERT's (models.bert) position, token-type and
# LayerNorm'd embeddings and, with "pooler" pooling, a pooler. These rules match only with the
# tower that has the layer, so they are in OPTIONAL_RULES: ``check_rules`` lets them match
# nothing (a parameter that none matches is still an error).
_TEXT_TOWER_RULES: tuple[Rule, ...] = (
    (r"text/pos_embed", ("positions", "embed")),
    (r"text/position_embed/embedding", ("positions", "embed")),
    (r"text/type_embed/embedding", ("token_types", "embed")),
    (r"text/ln_embed/(scale|bias)", ("norm",)),
    (r"text/pooler/kernel", ("embed", "mlp")),
    (r"text/pooler/bias", ("mlp",)),
)
OPTIONAL_RULES = frozenset(pattern for pattern, _ in _TEXT_TOWER_RULES)

PARAM_RULES: dict[str, tuple[Rule, ...]] = {
    "dual_encoder": _TRANSFORMER_RULES
    + _TEXT_TOWER_RULES
    + (
        (r"text/token_embed/embedding", ("vocab", "embed")),
        (r"(image|text)/proj/kernel", ("embed", "proj")),
        (r"logit_scale", ()),
    ),
    "llava": _DECODER_RULES + _TRANSFORMER_RULES,
}

# Logical axis -> mesh axes (None: unsharded). Activation names (batch, act_*) are used by the
# models' sharding constraints (``flax.linen.with_logical_constraint``).
LOGICAL_TO_MESH: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", FSDP_AXIS),
    ("heads", TENSOR_AXIS),
    ("kv_heads", TENSOR_AXIS),
    ("mlp", TENSOR_AXIS),
    ("vocab", TENSOR_AXIS),
    ("batch", BATCH_AXES),
    ("act_heads", TENSOR_AXIS),
    ("act_kv_heads", TENSOR_AXIS),
    ("act_mlp", TENSOR_AXIS),
    ("act_vocab", TENSOR_AXIS),
)


def path_string(key_path) -> str:
    """'/'-joined names of a ``jax.tree_util`` key path (dict keys, attributes, indices)."""
    parts = []
    for key in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _compile(rules: Sequence[Rule]) -> list[tuple[re.Pattern, Axes]]:
    return [(re.compile(rf"(?:^|/){pattern}$"), axes) for pattern, axes in rules]


class ShardingRules:
    """A model family's parameter rules plus the logical -> mesh table, bound to a mesh."""

    def __init__(self, mesh: Mesh, family: str, logical_to_mesh=LOGICAL_TO_MESH):
        if family not in PARAM_RULES:
            raise ConfigError(f"no sharding rules for model family {family!r}")
        self.mesh, self.family = mesh, family
        self.rules = PARAM_RULES[family]
        self._compiled = _compile(self.rules)
        self.logical_to_mesh = dict(logical_to_mesh)

    # --- logical axes ------------------------------------------------------------------------
    def logical_axes(self, path: str) -> Axes | None:
        """Logical axes of the parameter at ``path`` (first matching rule), or None."""
        for regex, axes in self._compiled:
            if regex.search(path):
                return axes
        return None

    def check_rules(self, params: Mapping) -> None:
        """ConfigError unless every parameter matches a rule of the right rank and every rule
        matches some parameter."""
        used = set()
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            path = path_string(key_path)
            for i, (regex, axes) in enumerate(self._compiled):
                if regex.search(path):
                    used.add(i)
                    if len(axes) != len(leaf.shape):
                        raise ConfigError(
                            f"sharding rule {self.rules[i][0]!r} gives {len(axes)} axes {axes} "
                            f"to parameter {path} of shape {tuple(leaf.shape)}"
                        )
                    break
            else:
                raise ConfigError(
                    f"parameter {path} {tuple(leaf.shape)} matches no {self.family} sharding "
                    "rule (mslora_jax.parallel.rules.PARAM_RULES)"
                )
        unused = [
            self.rules[i][0]
            for i in range(len(self.rules))
            if i not in used and self.rules[i][0] not in OPTIONAL_RULES
        ]
        # A decoder is scanned or unrolled: the other layout's rules may match nothing.
        absent = [
            p for p in _LAYOUT_PREFIXES if not any(self.rules[i][0].startswith(p) for i in used)
        ]
        if len(absent) < len(_LAYOUT_PREFIXES):
            unused = [r for r in unused if not r.startswith(tuple(absent))]
        if unused:
            raise ConfigError(f"{self.family} sharding rules match no parameter: {unused}")

    # --- mesh axes ---------------------------------------------------------------------------
    def mesh_axes(self, logical: str | None):
        return None if logical is None else self.logical_to_mesh.get(logical)

    def spec(self, logical: Axes, shape: Sequence[int], keep_whole: Sequence[int] = ()) -> P:
        """The PartitionSpec of an array with these logical axes; undivisible dims unsharded.

        FSDP splits *every* array: if no logical axis put ``fsdp`` on a dimension (a LoRA B
        ``[mlp, r]``, a norm scale), the largest dimension it divides (never one listed in
        ``keep_whole``: LoRA rank and task-slot axes, nor a ``layers`` axis) is split over
        ``fsdp`` too.
        """
        keep_whole = {*keep_whole, *(i for i, name in enumerate(logical) if name == "layers")}
        out: list[tuple[str, ...]] = []
        taken: set[str] = set()
        for name, size in zip(logical, shape):
            axes = self.mesh_axes(name)
            names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            names = tuple(a for a in names if self.mesh.shape[a] > 1 and a not in taken)
            if not names or size % self._ways(names):
                out.append(())
                continue
            taken.update(names)  # a mesh axis shards at most one dimension of an array
            out.append(names)
        if self.mesh.shape.get(FSDP_AXIS, 1) > 1 and FSDP_AXIS not in taken:
            fits = [
                i
                for i, size in enumerate(shape)
                if i not in keep_whole and size % self._ways(out[i] + (FSDP_AXIS,)) == 0
            ]
            if fits:
                best = max(fits, key=lambda i: shape[i])
                out[best] = out[best] + (FSDP_AXIS,)
        return P(*(None if not n else n[0] if len(n) == 1 else n for n in out))

    def _ways(self, names: Sequence[str]) -> int:
        return int(np.prod([self.mesh.shape[a] for a in names]))

    def leaf_spec(self, path: str, shape: Sequence[int]) -> P:
        """The spec of any leaf: a parameter (or its copy), a LoRA factor, or else replicated."""
        head, _, name = path.rpartition("/")
        if name in (LORA_A, LORA_B) and len(shape) >= 2:
            base = self.logical_axes(f"{head}/kernel")
            if base is not None and len(shape) >= len(base):
                # Stack axes (unsharded), then the kernel's own leading axes (a scanned layer's
                # ``layers``), then the factor's matrix: [.., r, in] or [.., out, r].
                lead = (None,) * (len(shape) - len(base)) + tuple(base[:-2])
                logical = lead + ((None, base[-2]) if name == LORA_A else (base[-1], None))
                rank_dim = len(shape) - 2 if name == LORA_A else len(shape) - 1
                return self.spec(logical, shape, keep_whole=(*range(len(lead)), rank_dim))
        logical = self.logical_axes(path)
        if logical is None or len(logical) != len(shape):
            return P()
        return self.spec(logical, shape)

    def shardings(self, tree):
        """NamedShardings for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s)."""

        def one(key_path, leaf):
            shape = np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape
            return NamedSharding(self.mesh, self.leaf_spec(path_string(key_path), shape))

        return jax.tree_util.tree_map_with_path(one, tree)

    def abstract(self, tree):
        """``ShapeDtypeStruct``s of ``tree`` carrying the shardings of these rules."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            tree,
            self.shardings(tree),
        )

    def place(self, tree):
        """``tree`` on the mesh as the rules say (a no-op for leaves already placed so).

        ``ShapeDtypeStruct`` leaves (abstract trees, e.g. for ahead-of-time compilation) get the
        shardings attached instead."""
        leaves = jax.tree.leaves(tree)
        if leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
            return self.abstract(tree)
        return jax.device_put(tree, self.shardings(tree))

    def flax_rules(self) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
        """The logical -> mesh table for ``flax.linen.logical_axis_rules`` (activations)."""
        return tuple(self.logical_to_mesh.items())


def describe_shardings(rules: ShardingRules, params) -> list[str]:
    """``path shape -> spec (per-device shape)`` lines, for logs and the dry run."""
    lines = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_string(key_path)
        sharding = NamedSharding(rules.mesh, rules.leaf_spec(path, leaf.shape))
        local = sharding.shard_shape(tuple(leaf.shape))
        lines.append(f"{path} {tuple(leaf.shape)} -> {sharding.spec} {local}")
    return lines
