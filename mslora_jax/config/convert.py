"""The edge between config files and the library: a ``ConfigDict`` (or nested dict) converted
into the typed dataclasses (``experiment_config``, ``from_mapping``), unknown keys and wrong types
rejected by name, and back to plain JSON (``to_json_dict``).

Split from ``experiment.py``: the conversion is generic over the dataclasses, which do not need it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

from mslora_jax.config.experiment import ExperimentConfig
from mslora_jax.errors import ConfigError


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return from_mapping(tp, value, where)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_type, _) = typing.get_args(tp)
        return tuple(_convert(item_type, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def from_mapping(cls: type, mapping: Mapping, where: str = "config"):
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'{where}.{k}' for k in unknown]}; known: {sorted(known)}"
        )
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in mapping.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from e


def experiment_config(config: Any) -> ExperimentConfig:
    """Convert a ConfigDict (or plain nested dict) into an ``ExperimentConfig``."""
    mapping = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return from_mapping(ExperimentConfig, mapping)


def to_json_dict(config: ExperimentConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))
