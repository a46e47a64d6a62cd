"""Plain-words messages for a bad ``--config.KEY=VALUE`` override.

ml_collections reports an unknown key as a raw ``AttributeError``/``KeyError`` traceback and a
bad value as absl's "flag ...: invalid literal" line; these functions say which key or value is
wrong and what the config has instead, for ``mslora_jax.cli.parse`` to raise as a ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Callable, Sequence
from typing import Any

from ml_collections import config_dict
from ml_collections.config_flags import config_path
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

# Overrides as ml_collections finds them: -config.x, --config.x=1, --noconfig.flag.
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def override_paths(args: Sequence[str]) -> list[str]:
    """The config paths the overrides in ``args`` name (``--config.lora.rank=4`` -> lora.rank)."""
    return [m.group(1) for m in map(_OVERRIDE.match, args) if m]


def _optional_base(hint: Any) -> type | None:
    """``int`` for ``int | None`` (a scalar a command-line literal can set), else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    scalar = args[0] if len(args) == 1 else None
    return scalar if scalar in (int, float, str, bool) else None


def _field_default(cls: type, name: str) -> Any:
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def fill_schema_defaults(config: Any, paths: Sequence[str], schema: type) -> None:
    """Give ``config`` (an unlocked ConfigDict) the keys of ``paths`` that the typed config
    ``schema`` has but the file does not set, at their defaults, so ``--config.<path>=v`` can
    override them (``--config.checkpoint.every_steps=50`` on a file without a checkpoint
    section). A key left at its default converts to the same typed config, so what the file
    means does not change. Paths into lists, and leaves a literal cannot set (a None default
    that is not ``int | None``-like, a whole section), are left for ``unknown_key_message``."""
    for path in paths:
        parts = config_path.split(path)
        if any(isinstance(part, int) for part in parts):
            continue
        node, cls = config, schema
        for depth, part in enumerate(parts):
            if not (isinstance(node, config_dict.ConfigDict) and dataclasses.is_dataclass(cls)):
                break
            hints = typing.get_type_hints(cls)
            if part not in hints:
                break
            hint, last = hints[part], depth == len(parts) - 1
            if part not in node:
                if not last and dataclasses.is_dataclass(hint):
                    node[part] = config_dict.ConfigDict()
                elif last:
                    default = _field_default(cls, part)
                    if default is None and _optional_base(hint) is not None:
                        node[part] = config_dict.placeholder(_optional_base(hint))
                    elif default is not None and not dataclasses.is_dataclass(default):
                        node[part] = default
                    break
                else:
                    break
            node, cls = node[part], hint


class ConfigFileWithDefaults(ConfigFileFlagParser):
    """ml_collections' config-file parser that also gives the loaded config the keys of
    ``schema()`` that the overrides ``paths`` name (``fill_schema_defaults``) before it is
    locked. ``schema`` is called only when a file is parsed (``--help`` imports no jax)."""

    def __init__(self, name: str, paths: Sequence[str], schema: Callable[[], type]):
        super().__init__(name, lock_config=False)
        self.paths, self.schema = list(paths), schema

    def parse(self, path):
        config = super().parse(path)
        if isinstance(config, config_dict.ConfigDict):
            fill_schema_defaults(config, self.paths, self.schema())
            config.lock()
        return config


def _keys(node: Any) -> list[str] | None:
    if hasattr(node, "keys"):
        return [str(k) for k in node.keys()]
    return None


def _dotted(parts: Sequence[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _in_schema(schema: type | None, parts: Sequence[Any]) -> bool:
    """True if the typed config dataclass ``schema`` has the field path ``parts``."""
    tp: Any = schema
    for part in parts:
        if isinstance(part, int):  # stream[0]: the element type of tuple[TaskConfig, ...]
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            tp = args[0] if args else None
            continue
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return False
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return False
        tp = hints[part]
    return True


def unknown_key_message(
    config: Any, path: str, config_file: str, schema: type | None = None
) -> str | None:
    """Why ``--config.<path>`` names no key of ``config`` (with the nearest key at that level),
    or None if every part of it exists. ``schema``, the typed config the file is converted into,
    tells a misspelt key from a real one that this file does not set."""
    parts = config_path.split(path)
    node = config
    for depth, part in enumerate(parts):
        where = _dotted(parts[:depth]) or "the config"
        if isinstance(part, int):
            if isinstance(node, (list, tuple)) and -len(node) <= part < len(node):
                node = node[part]
                continue
            size = f"has {len(node)} entries" if isinstance(node, (list, tuple)) else "is no list"
            return f"--config.{path}: {where} {size}, so it has no [{part}]"
        keys = _keys(node)
        if keys is None:
            return f"--config.{path}: {where} is {node!r}, a value without keys"
        if part not in keys:
            wanted = _dotted(parts[: depth + 1])
            if _in_schema(schema, parts[: depth + 1]):
                return (
                    f"--config.{path}: {config_file} does not set {wanted} (a valid key, left at "
                    "its default); set it in a copy of the file to change it"
                )
            close = difflib.get_close_matches(part, keys, n=1)
            if close:
                hint = f"did you mean {_dotted([*parts[:depth], close[0]])}?"
            else:
                hint = f"{where} has: {', '.join(sorted(keys))}"
            return f"--config.{path}: no key {wanted} in {config_file}; {hint}"
        node = node[part]
    return None


_ILLEGAL_VALUE = re.compile(r"^flag --config\.([^=]+)=(.*?): (.*)$", re.DOTALL)


def bad_value_message(config: Any, error_text: str) -> str | None:
    """One line for absl's "flag --config.a.b=v: reason" (the type the key holds and its value),
    or None if ``error_text`` is about another flag."""
    match = _ILLEGAL_VALUE.match(error_text)
    if match is None:
        return None
    path, value, reason = match.groups()
    try:
        current = config_path.get_value(path, config)
    except (AttributeError, KeyError, IndexError, ValueError):
        return None
    reason = reason.splitlines()[0] if reason else "not a valid value"
    return (
        f"--config.{path}={value}: expected {type(current).__name__} like the config's "
        f"{current!r}; {reason}"
    )
