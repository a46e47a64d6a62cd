"""Which dense layers get LoRA: ordered regular expressions over module paths.

A module path is the '/'-joined key path of a layer in the backbone's ``params`` tree, e.g.
``image/encoder/block_0/attn/q``. Only the attention (q, k, v, out) and MLP (fc1, fc2) layers of
either tower are LoRA-capable; a user's patterns choose among them (as PEFT's
``target_modules``). Every pattern must match at least one layer, so a typo is an error rather
than a silently un-adapted model.

In the LLaVA model (``mslora_jax.models.llava``) the capable layers are the decoder's attention
(q, k, v, o) and SwiGLU MLP (gate, up, down) projections; its ``vision_tower`` (a ViT built from
the same blocks) and projector stay frozen as released.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from mslora_jax.errors import ConfigError

# The LoraDense layers of mslora_jax.models.transformer (attn q/k/v/out, mlp fc1/fc2) and of
# mslora_jax.models.decoder (attn q/k/v/o, mlp gate/up/down), except under the LLaVA
# ``vision_tower/`` (frozen). The dual encoder's matches are unchanged (it has no such paths).
LORA_CAPABLE = re.compile(
    r"^(?!vision_tower/)(.*/)?(attn/(q|k|v|o|out)|mlp/(fc1|fc2|gate|up|down))$"
)


def module_paths(params: Mapping, prefix: str = "") -> list[str]:
    """Paths of every module in ``params`` that directly holds a ``kernel``."""
    paths = []
    for key, value in params.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            if "kernel" in value:
                paths.append(path)
            paths.extend(module_paths(value, path))
    return paths


def lora_capable_paths(params: Mapping) -> list[str]:
    return [p for p in module_paths(params) if LORA_CAPABLE.search(p)]


def select_targets(params: Mapping, patterns: Sequence[str]) -> list[str]:
    """The LoRA-capable module paths matched (``re.search``) by any pattern, in tree order.

    Raises ConfigError for an invalid regex, an empty pattern list, or a pattern that matches
    no LoRA-capable layer (the message lists the capable paths).
    """
    if not patterns:
        raise ConfigError("lora.targets is empty: name at least one layer pattern")
    capable = lora_capable_paths(params)
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ConfigError(f"lora.targets: invalid regular expression {pattern!r}: {e}") from e
    for pattern, regex in zip(patterns, compiled):
        if not any(regex.search(p) for p in capable):
            raise ConfigError(
                f"lora.targets pattern {pattern!r} matches no LoRA-capable layer; "
                f"capable layers look like {capable[:4]} ... (attention and MLP projections)"
            )
    return [p for p in capable if any(r.search(p) for r in compiled)]


def get_by_path(tree: Mapping, path: str):
    node = tree
    for key in path.split("/"):
        node = node[key]
    return node


def set_by_path(tree: dict, path: str, value) -> dict:
    """A copy of nested dict ``tree`` with ``path`` set to ``value`` (creating dicts as needed)."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = set_by_path(tree.get(head, {}), rest, value) if rest else value
    return out
