"""``--dry-run``: size a run without weights (``jax.eval_shape``) and check its data layout."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from mslora_jax.config import ExperimentConfig, TaskConfig
from mslora_jax.data.registry import tfds_data_dir
from mslora_jax.lora.adapter import init_adapter_params
from mslora_jax.lora.targets import get_by_path, select_targets
from mslora_jax.models.clip import init_backbone
from mslora_jax.models.llava import init_llava
from mslora_jax.parallel.mesh import MESH_AXES, resolve_mesh_shape
from mslora_jax.parallel.rules import ShardingRules


def abstract_backbone(config: ExperimentConfig):
    """The backbone's parameter shapes, with no parameter in memory."""
    key = jax.random.PRNGKey(0)
    if config.model_kind == "llava":
        return jax.eval_shape(functools.partial(init_llava, config.llava.model_config()), key)
    return jax.eval_shape(functools.partial(init_backbone, config.model), key)


def count(tree) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def _layers_at(backbone, path: str) -> int:
    """Layers behind a module path: a scanned kernel ``[layers, in, out]`` holds several."""
    return int(np.prod(get_by_path(backbone, path)["kernel"].shape[:-2]))


def lora_params_per_task(backbone, targets: list[str], rank: int) -> int:
    """Every targeted kernel ``[in, out]`` gets A ``[r, in]`` and B ``[out, r]`` (per layer)."""
    return int(
        sum(
            rank * sum(get_by_path(backbone, p)["kernel"].shape[-2:]) * _layers_at(backbone, p)
            for p in targets
        )
    )


def expected_files(config: ExperimentConfig, task: TaskConfig) -> list[Path]:
    root = Path(config.data_dir)
    if task.source == "medmnist":
        return [root / task.file]
    if task.source == "vqa":
        folder = root / (task.folder or task.name)
        return [folder / task.train_file, folder / task.test_file, folder / task.image_dir]
    if task.source == "tfds":  # <dir>/<name>[/<config>][/<version>]
        tfds_dir = tfds_data_dir(task, config.data_dir) or os.environ.get(
            "TFDS_DATA_DIR", "~/tensorflow_datasets"
        )
        return [Path(tfds_dir).expanduser() / task.tfds_name.replace(":", "/")]
    return []


def check_data_layout(config: ExperimentConfig) -> list[str]:
    """Lines describing what is present and what is missing under ``config.data_dir``."""
    files = {t.name: expected_files(config, t) for t in config.stream}
    if not any(files.values()):
        return ["data: synthetic tasks only (generated, nothing to check)"]
    root = Path(config.data_dir)
    if not root.is_dir():
        lines = [f"data: root {root} does not exist; expected:"]
        lines += [f"  {p}" for paths in files.values() for p in paths]
        return lines
    lines = [f"data: root {root}"]
    for name, paths in files.items():
        missing = [str(p) for p in paths if not p.exists()]
        lines.append(f"  {name}: " + (f"MISSING {', '.join(missing)}" if missing else "ok"))
    return lines


def _bytes_per_device(rules: ShardingRules, tree, itemsize: int | None = None) -> int:
    """Bytes one device holds of ``tree`` sharded by ``rules`` (the largest shard of a leaf)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(rules.shardings(tree))):
        size = itemsize or np.dtype(leaf.dtype).itemsize
        total += int(np.prod(sharding.shard_shape(tuple(leaf.shape)), dtype=np.int64)) * size
    return total


def mesh_lines(config: ExperimentConfig, backbone, targets: list[str]) -> list[str]:
    """The mesh the run builds and what each device holds of the state (no activations).

    The device count is ``num_devices`` (set it to size another machine, e.g. 8 for a v5e-8),
    else this machine's."""
    devices = config.num_devices or jax.device_count()
    shape = resolve_mesh_shape(config.mesh.shape, devices)
    mesh = AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    rules = ShardingRules(mesh, config.model_kind)
    frozen_itemsize = 2 if config.model_kind == "llava" and config.llava.dtype == "bfloat16" else 4
    adapter = jax.eval_shape(
        lambda k: init_adapter_params(backbone, targets, config.lora.rank, k),
        jax.random.PRNGKey(0),
    )
    stack = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((len(config.stream), *x.shape), x.dtype), adapter
    )
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    frozen = _bytes_per_device(rules, backbone, frozen_itemsize)
    lora = _bytes_per_device(rules, stack)
    adam = 2 * _bytes_per_device(rules, adapter)
    return [
        f"mesh (data, fsdp, tensor): {shape} over {devices} devices "
        f"(batch split {shape[0] * shape[1]} ways)",
        f"per device: frozen backbone {gib(frozen)}, {len(config.stream)}-slot LoRA stack "
        f"{gib(lora)}, Adam state of one adapter {gib(adam)}: {gib(frozen + lora + adam)} "
        "before activations (experiments/aot_memory.py compiles the whole step)",
    ]


def dry_run(config: ExperimentConfig) -> str:
    backbone = abstract_backbone(config)
    targets = select_targets(backbone, config.lora.targets)
    per_task = lora_params_per_task(backbone, targets, config.lora.rank)
    layers = sum(_layers_at(backbone, p) for p in targets)
    lines = [
        f"model: {config.model_kind}",
        f"frozen backbone parameters: {count(backbone):,}",
        f"LoRA: rank {config.lora.rank}, alpha {config.lora.alpha}, {layers} adapted layers "
        f"in {len(targets)} modules (e.g. {targets[0]})",
        f"LoRA parameters per task: {per_task:,}",
        *mesh_lines(config, backbone, targets),
        "tasks:",
    ]
    for task in config.stream:
        lr = task.learning_rate or config.train.learning_rate
        epochs = task.epochs or config.train.epochs
        batch = task.batch_size or config.train.batch_size
        lines.append(
            f"  {task.name} ({task.modality}): lr {lr:g}, epochs {epochs:g}, batch {batch}, "
            f"{per_task:,} LoRA parameters"
        )
    if config.backbone.source == "load":
        present = (Path(config.backbone.path) / "meta.json").exists()
        lines.append(f"backbone: {config.backbone.path} " + ("ok" if present else "MISSING"))
    if config.model_kind == "llava" and config.llava.tokenizer_file:
        present = Path(config.llava.tokenizer_file).is_file()
        lines.append(
            f"tokenizer: {config.llava.tokenizer_file} " + ("ok" if present else "MISSING")
        )
    return "\n".join(lines + check_data_layout(config))
