"""LoRA adapters as Hugging Face PEFT folders: written so ``PeftModel.from_pretrained`` loads
them onto the HF base model, and read back into a ``LoraAdapter``.

A PEFT LoRA folder holds ``adapter_model.safetensors`` with, per adapted module ``<m>`` (its
name in the HF base model), ``base_model.model.<m>.lora_A.weight`` ``[r, in]`` and
``base_model.model.<m>.lora_B.weight`` ``[out, r]``, and ``adapter_config.json`` (PEFT's
``LoraConfig``: ``r``, ``lora_alpha``, ``target_modules``, ...). PEFT's delta is
``(lora_alpha / r) * B A`` on ``y = x W^T``, which is ours (``LoraAdapter.scaling * A^T B^T`` on
``y = x W``) with the same factors: nothing is transposed. A scanned decoder layer (factors
``[layers, r, in]``) becomes one PEFT module per layer, named as if unrolled.

Module names come from a ``NameMap``: a function from a flax module path in the unrolled layout
(``decoder/block_3/attn/q``) to the HF module name (``model.layers.3.self_attn.q_proj``), e.g.
``hf_llava.hf_module_name``; so the same code serves every backbone whose HF names we know.
What PEFT has no key for (task, modality, method, stage) goes to a sidecar ``mslora_jax.json``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from mslora_jax.errors import CheckpointError
from mslora_jax.io_utils import atomic_folder, atomic_write_json, read_json
from mslora_jax.lora.adapter import LoraAdapter, adapter_paths, is_scanned, unrolled_path
from mslora_jax.lora.targets import get_by_path, lora_capable_paths, set_by_path
from mslora_jax.models.lora_dense import LORA_A, LORA_B

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
SIDECAR_FILE = "mslora_jax.json"  # our metadata, which PEFT's LoraConfig has no keys for
PREFIX = "base_model.model."  # PEFT's saved names: the wrapped model's module names after it
_KEY = re.compile(rf"^{re.escape(PREFIX)}(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")
_FACTORS = {"lora_A": LORA_A, "lora_B": LORA_B}

NameMap = Callable[[str], str]  # unrolled flax module path -> HF module name

# adapter_config.json settings whose other values mean a different adapter than ours: PEFT
# (key, the value we write and accept). A key the file leaves out takes PEFT's default (these).
_FIXED_SETTINGS = {
    "peft_type": "LORA",
    "fan_in_fan_out": False,  # True: GPT-2 style Conv1D weights, [in, out]
    "bias": "none",  # trained biases
    "use_dora": False,  # weight-decomposed LoRA: a magnitude vector per module
    "lora_bias": False,
    "rank_pattern": {},  # per-module ranks and alphas: ours has one rank and alpha
    "alpha_pattern": {},
    "modules_to_save": None,  # fully trained copies of whole modules
}


def _modules(adapter: LoraAdapter, name_map: NameMap) -> list[tuple[str, str, int | None]]:
    """(HF module name, adapter path, layer or None) of every matrix pair of ``adapter``."""
    out = []
    for path in adapter_paths(adapter.params):
        if not is_scanned(path):
            out.append((name_map(path), path, None))
            continue
        depth = get_by_path(adapter.params, path)[LORA_A].shape[0]
        out += [(name_map(unrolled_path(path, i)), path, i) for i in range(depth)]
    return out


def peft_state_dict(adapter: LoraAdapter, name_map: NameMap) -> dict[str, np.ndarray]:
    """``{PEFT tensor name: float32 array}`` of ``adapter``, as ``adapter_model.safetensors``."""
    tensors = {}
    for module, path, layer in _modules(adapter, name_map):
        node = get_by_path(adapter.params, path)
        for factor, ours in _FACTORS.items():
            value = np.asarray(node[ours], np.float32)
            tensors[f"{PREFIX}{module}.{factor}.weight"] = np.ascontiguousarray(
                value if layer is None else value[layer]
            )
    return tensors


def peft_config(
    adapter: LoraAdapter,
    modules: Sequence[str],
    *,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> dict:
    """``adapter_config.json``: PEFT's ``LoraConfig`` for ``adapter`` on these HF modules.

    ``target_modules`` lists the full module names (PEFT matches a name exactly or as a suffix
    after a dot), so only these modules are wrapped, not every ``q_proj`` of the model."""
    return {
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "use_rslora": False,  # scaling alpha / r, as ours
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        **_FIXED_SETTINGS,
    }


def write_peft_adapter(
    out: os.PathLike | str,
    adapter: LoraAdapter,
    name_map: NameMap,
    *,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    info: Mapping | None = None,
) -> Path:
    """Write ``adapter`` as the PEFT folder ``out`` (which must not exist or be empty).

    Besides the two PEFT files, ``mslora_jax.json`` holds ``adapter.metadata()`` and ``info``
    (method, stage, ...). Written under a temporary name beside ``out`` and renamed at the end.
    """
    modules = _modules(adapter, name_map)
    if not modules:
        raise CheckpointError(f"adapter {adapter.task!r} adapts no module; nothing to export")
    tensors = peft_state_dict(adapter, name_map)
    config = peft_config(
        adapter,
        [module for module, _, _ in modules],
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
    )
    out = Path(out).absolute()
    with atomic_folder(out) as tmp:
        save_file(tensors, tmp / ADAPTER_FILE, metadata={"format": "pt"})  # as PEFT saves
        atomic_write_json(tmp / CONFIG_FILE, config)
        atomic_write_json(tmp / SIDECAR_FILE, {**adapter.metadata(), **(info or {})})
    return out


def merged_adapter(adapters: Sequence[LoraAdapter], *, task: str, modality: str) -> LoraAdapter:
    """One LoRA whose delta is the sum of the adapters' deltas, exactly (no SVD).

    ``sum_i s_i B_i A_i = [s_1 B_1 | ... | s_k B_k] [A_1; ...; A_k]``: rank ``R = sum r_i`` and
    ``alpha = R`` (scaling 1), the scalings folded into B. A module that some adapter does not
    adapt gets zero rows/columns from it, so every module has rank R.
    """
    if not adapters:
        raise CheckpointError("no adapters to merge")
    paths = list(dict.fromkeys(p for a in adapters for p in adapter_paths(a.params)))
    params: dict = {}
    for path in paths:
        shapes = next(get_by_path(a.params, path) for a in adapters if path in _paths(a))
        *lead, _, fan_in = shapes[LORA_A].shape
        fan_out = shapes[LORA_B].shape[-2]
        a_parts, b_parts = [], []
        for adapter in adapters:
            if path in _paths(adapter):
                node = get_by_path(adapter.params, path)
                a_parts.append(np.asarray(node[LORA_A], np.float32))
                b_parts.append(adapter.scaling * np.asarray(node[LORA_B], np.float32))
            else:
                a_parts.append(np.zeros((*lead, adapter.rank, fan_in), np.float32))
                b_parts.append(np.zeros((*lead, fan_out, adapter.rank), np.float32))
        merged = {LORA_A: np.concatenate(a_parts, -2), LORA_B: np.concatenate(b_parts, -1)}
        params = set_by_path(params, path, merged)
    rank = sum(a.rank for a in adapters)
    return LoraAdapter(params, rank, float(rank), modality, task)


def _paths(adapter: LoraAdapter) -> set[str]:
    return set(adapter_paths(adapter.params))


# ---------------------------------------------------------------- reading


def _read_config(folder: Path) -> tuple[int, float]:
    """(r, our alpha) from ``adapter_config.json``; CheckpointError for settings we cannot use."""
    path = folder / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} (a PEFT LoRA folder is expected)")
    config = read_json(path, "PEFT adapter config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    for key, value in _FIXED_SETTINGS.items():
        # null for an optional setting is PEFT's default too.
        if config.get(key, value) != value and not (key != "peft_type" and config[key] is None):
            raise CheckpointError(
                f"{path}: {key}={config[key]!r} is not supported (expected {value!r})"
            )
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise CheckpointError(f"{path}: r={rank!r}; expected a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointError(f"{path}: lora_alpha={alpha!r}; expected a number")
    # rsLoRA scales by lora_alpha / sqrt(r); ours is alpha / r, so the same scaling is this alpha.
    scale_alpha = float(alpha) * np.sqrt(rank) if config.get("use_rslora") else float(alpha)
    return rank, scale_alpha


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    path = folder / ADAPTER_FILE
    if not path.exists():
        other = [p.name for p in folder.glob("adapter_model.*")]
        hint = f" (found {other}: only safetensors is read)" if other else ""
        raise CheckpointError(f"{folder}: no {ADAPTER_FILE}{hint}")
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e


def _capable_modules(base_abstract_params: Mapping, name_map: NameMap) -> dict:
    """``{HF module name: (path, layer or None, depth, in, out)}`` of every LoRA-capable layer."""
    out = {}
    for path in lora_capable_paths(base_abstract_params):
        *lead, fan_in, fan_out = get_by_path(base_abstract_params, path)["kernel"].shape
        if is_scanned(path):
            for i in range(lead[0]):
                out[name_map(unrolled_path(path, i))] = (path, i, lead[0], fan_in, fan_out)
        else:
            out[name_map(path)] = (path, None, 0, fan_in, fan_out)
    return out


def read_peft_adapter(
    folder: os.PathLike | str,
    base_abstract_params: Mapping,
    name_map: NameMap,
    *,
    task: str | None = None,
    modality: str | None = None,
) -> LoraAdapter:
    """The ``LoraAdapter`` of a PEFT LoRA folder, for the backbone ``base_abstract_params``
    (arrays or shape structs; only shapes are used) whose HF module names ``name_map`` gives.

    Every tensor must be a LoRA factor of a LoRA-capable layer of the backbone, with the
    config's rank and the layer's shape; every module needs both factors, and a scanned layer
    needs all its layers. ``task``/``modality`` default to the sidecar's (``mslora_jax.json``,
    written by ``write_peft_adapter``); a folder without one needs them given.
    """
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a PEFT LoRA folder is expected)")
    rank, alpha = _read_config(folder)
    meta = read_json(folder / SIDECAR_FILE, "adapter") if (folder / SIDECAR_FILE).exists() else {}
    task, modality = task or meta.get("task"), modality or meta.get("modality")
    if not task or not modality:
        raise CheckpointError(
            f"{folder}: no task name and modality (no {SIDECAR_FILE}); give them explicitly"
        )
    tensors = _read_tensors(folder)
    where = folder / ADAPTER_FILE
    capable = _capable_modules(base_abstract_params, name_map)
    found: dict[str, dict] = {}  # HF module -> {our factor name: array}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if not match:
            raise CheckpointError(
                f"{where}: tensor {key} is not a LoRA factor "
                f"({PREFIX}<module>.lora_A.weight / .lora_B.weight)"
            )
        module, factor = match["module"], match["factor"]
        if module not in capable:
            examples = ", ".join(sorted(capable)[:3])
            raise CheckpointError(
                f"{where}: module {module} is not a LoRA-capable layer of this model "
                f"(those are named like {examples} ...; does the config match the base model?)"
            )
        _, _, _, fan_in, fan_out = capable[module]
        expected = (rank, fan_in) if factor == "lora_A" else (fan_out, rank)
        if tuple(value.shape) != expected:
            rank_axis = 0 if factor == "lora_A" else 1
            if value.ndim == 2 and value.shape[1 - rank_axis] == expected[1 - rank_axis]:
                why = f"rank {value.shape[rank_axis]}, but {CONFIG_FILE} has r={rank}"
            else:
                why = f"expected {list(expected)} for this model's {capable[module][0]}"
            raise CheckpointError(f"{where}: tensor {key} has shape {list(value.shape)}: {why}")
        found.setdefault(module, {})[_FACTORS[factor]] = np.asarray(value, np.float32)
    if not found:
        raise CheckpointError(f"{where}: holds no LoRA factors")
    return LoraAdapter(_build_tree(found, capable, where), rank, alpha, modality, task)


def _build_tree(found: Mapping[str, dict], capable: Mapping, where: Path) -> dict:
    """The adapter tree from ``{HF module: {lora_a, lora_b}}``; a scanned path's layers are
    stacked (all must be there)."""
    layers: dict[str, dict] = {}  # path -> {layer or None: factors}
    for module, factors in found.items():
        path, layer, _, _, _ = capable[module]
        for factor in (LORA_A, LORA_B):
            if factor not in factors:
                other = "lora_A" if factor == LORA_A else "lora_B"
                raise CheckpointError(f"{where}: module {module} has no {other}.weight")
        layers.setdefault(path, {})[layer] = factors
    tree: dict = {}
    for path, by_layer in layers.items():
        if None in by_layer:
            tree = set_by_path(tree, path, by_layer[None])
            continue
        depth = next(capable[m][2] for m in found if capable[m][0] == path)
        absent = [i for i in range(depth) if i not in by_layer]
        if absent:
            names = [m for m, c in capable.items() if c[0] == path and c[1] in absent]
            raise CheckpointError(
                f"{where}: {path} is one scanned module over {depth} layers, but layer(s) "
                f"{absent} have no factors ({', '.join(names[:3])} ...)"
            )
        stacked = {f: np.stack([by_layer[i][f] for i in range(depth)]) for f in (LORA_A, LORA_B)}
        tree = set_by_path(tree, path, stacked)
    return jax.tree.map(np.asarray, tree)
