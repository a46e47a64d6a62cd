"""orbax checkpoints: the frozen backbone once, one checkpoint per finished stage, and the
last few checkpoints inside the stage in progress.

Layout of a workdir::

    config.json                      the run's config (a rerun must match it)
    backbone/params, backbone/meta.json
    checkpoints/<method>/<stage>/    adapter (the stage's trained LoRA tree), trainer (its
                                     optimizer state, step and rng), metrics, meta
    steps/<method>/<stage>/<step>/   in-stage: trainer after <step> steps, meta (removed once
                                     the stage's checkpoint above is written)

Only what was trained is saved; the backbone is saved once. orbax writes each checkpoint to a
temporary folder and renames it when complete, so an interrupted save never looks finished and
the previous checkpoint stays the newest readable one. The data position needs no saving: a
training batch is a pure function of (seed, step), so step ``k``'s checkpoint resumes with the
batch of step ``k``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from mslora_jax.config import ExperimentConfig, from_mapping
from mslora_jax.errors import CheckpointError
from mslora_jax.io_utils import atomic_write_json, read_json
from mslora_jax.parallel.distributed import is_primary, sync_processes
from mslora_jax.parallel.mesh import replicated
from mslora_jax.train.methods import get_method


def abstract_like(tree, mesh: Mesh):
    """ShapeDtypeStructs of ``tree`` (arrays or shape structs), replicated on ``mesh``."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def describe_differences(old: Any, new: Any, where: str = "config") -> list[str]:
    """Differing leaves; a key missing on one side equals None (a newer optional key, e.g. a
    task's ``batch_size``, does not invalidate a workdir written before it existed) or False (a
    flag added later, e.g. ``decoder.scan_layers``, was off in a workdir written before it)."""
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(old) | set(new)):
            diffs += describe_differences(old.get(key), new.get(key), f"{where}.{key}")
        return diffs
    if isinstance(old, list) and isinstance(new, list) and len(old) != len(new):
        if any(isinstance(x, dict) for x in old + new):  # tasks: their names, not every field
            names = [[x.get("name") if isinstance(x, dict) else x for x in xs] for xs in (old, new)]
            return [f"{where}: {len(old)} entries {names[0]} -> {len(new)} entries {names[1]}"]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            d
            for i, (a, b) in enumerate(zip(old, new))
            for d in describe_differences(a, b, f"{where}[{i}]")
        ]
    if (old is None and new is False) or (old is False and new is None):
        return []
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def check_same_config(saved: dict, current: dict, what: str) -> None:
    """CheckpointError listing the differing keys if ``saved`` and ``current`` differ."""
    diffs = describe_differences(saved, current)
    if diffs:
        shown = "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")
        hint = "use a new --workdir or restore the original config"
        if any(".scan_layers: None -> True" in d for d in diffs):
            hint = (
                "it predates the scanned decoder and holds the unrolled layout (decoder/block_i): "
                "add --config.llava.decoder.scan_layers=False to use it as it is, or use a new "
                "--workdir"
            )
        raise CheckpointError(f"{what} was written with a different config ({shown}); {hint}")


def host_tree(tree):
    """``tree`` as numpy arrays when this is the only process, else unchanged.

    orbax saves host numpy leaves at about a third of the cost of device arrays (no per-array
    device-to-host slicing machinery): 90 ms instead of 215 ms for a demo stage checkpoint, which
    a run writes after every stage. With several processes a leaf may have shards this process
    cannot read, so each process hands orbax its device arrays and writes its own shards. The
    files are the same either way: restoring gives device arrays in the target's shardings.
    """
    return jax.device_get(tree) if jax.process_count() == 1 else tree


class StageCheckpoints:
    """One method's per-stage checkpoints under ``directory``."""

    def __init__(self, directory: os.PathLike | str):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def finished_stages(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, stage: int, adapter, trainer, metrics: dict, meta: dict) -> None:
        self._manager.save(
            stage,
            args=ocp.args.Composite(
                adapter=ocp.args.StandardSave(host_tree(adapter)),
                trainer=ocp.args.StandardSave(host_tree(trainer)),
                metrics=ocp.args.JsonSave(metrics),
                meta=ocp.args.JsonSave(meta),
            ),
        )
        self._manager.wait_until_finished()

    def restore(self, stage: int, abstract_adapter, abstract_trainer, fingerprint: dict):
        """(adapter, trainer, metrics, meta) of ``stage``; checks the config fingerprint."""
        where = self.directory / str(stage)
        try:
            meta = self._manager.restore(
                stage, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )["meta"]
        except Exception as e:  # orbax raises many types for a damaged folder
            raise CheckpointError(f"checkpoint {where} is unreadable: {e}") from e
        check_same_config(meta.get("fingerprint", {}), fingerprint, f"checkpoint {where}")
        try:
            restored = self._manager.restore(
                stage,
                args=ocp.args.Composite(
                    adapter=ocp.args.StandardRestore(abstract_adapter),
                    trainer=ocp.args.StandardRestore(abstract_trainer),
                    metrics=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} is unreadable or does not match: {e}") from e
        return restored["adapter"], restored["trainer"], restored["metrics"], meta


class StepCheckpoints:
    """In-stage checkpoints of one stage of one method: the train state after some steps.

    Saves are asynchronous (training goes on while orbax writes; the arrays are copied off the
    device before ``save`` returns, so the next step may reuse their buffers); ``keep`` newest
    ones stay.
    """

    def __init__(self, directory: os.PathLike | str, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (an interrupted save does not count)."""
        return self._manager.latest_step()

    def save(self, step: int, trainer, meta: dict) -> None:
        """Start saving ``trainer`` after ``step`` steps (returns while the files are written)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                trainer=ocp.args.StandardSave(host_tree(trainer)), meta=ocp.args.JsonSave(meta)
            ),
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore_latest(self, abstract_trainer, fingerprint: dict):
        """(step, trainer, meta) of the newest complete checkpoint, or None if there is none."""
        step = self.latest_step()
        if step is None:
            return None
        where = self.directory / str(step)
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for a damaged folder
            raise CheckpointError(f"checkpoint {where} is unreadable: {e}") from e
        meta = meta["meta"]
        check_same_config(meta.get("fingerprint", {}), fingerprint, f"checkpoint {where}")
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(trainer=ocp.args.StandardRestore(abstract_trainer)),
            )
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} is unreadable or does not match: {e}") from e
        return step, restored["trainer"], meta

    def close(self) -> None:
        self._manager.close()


def remove_tree(directory: os.PathLike | str) -> None:
    """Delete ``directory`` (process 0; every process waits for it), e.g. a finished stage's
    in-stage checkpoints."""
    if is_primary():
        shutil.rmtree(directory, ignore_errors=True)
    sync_processes(f"remove {directory}")


def read_tree_on_one_device(path: os.PathLike | str) -> dict:
    """An orbax array tree (e.g. ``checkpoints/<method>/<stage>/adapter``) as numpy, restored
    onto one local device whatever mesh or process count wrote it."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # The item's handler, not a Checkpointer: an item folder has no checkpoint-level metadata
    # file of its own (that sits in the step folder), and a Checkpointer warns about it.
    handler, path = ocp.StandardCheckpointHandler(), Path(path)
    shapes = handler.metadata(path).tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), shapes)
    return jax.tree.map(np.asarray, handler.restore(path, args=ocp.args.StandardRestore(target)))


def save_backbone(directory: os.PathLike | str, params, meta: dict) -> None:
    """Save frozen backbone params (orbax) and their metadata (model config, provenance).

    Every process takes part in the orbax save; process 0 writes meta.json (last: its presence
    marks a complete backbone), and no process returns before it is there.
    """
    directory = Path(directory).absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", params, force=True)
    checkpointer.wait_until_finished()
    if is_primary():
        atomic_write_json(directory / "meta.json", meta)
    sync_processes("save_backbone")


def load_backbone(directory: os.PathLike | str, abstract_params, model_config: dict):
    """Restore backbone params saved by ``save_backbone``; the model config must match."""
    directory = Path(directory).absolute()
    if not (directory / "meta.json").exists() or not (directory / "params").exists():
        raise CheckpointError(f"no backbone at {directory} (expected params/ and meta.json)")
    meta = read_json(directory / "meta.json", "backbone")
    # meta.json went through JSON (tuples became lists), so compare against the same form.
    current = json.loads(json.dumps(model_config))
    check_same_config(meta.get("model", {}), current, f"backbone {directory}")
    try:
        params = ocp.StandardCheckpointer().restore(directory / "params", abstract_params)
    except Exception as e:
        raise CheckpointError(f"backbone {directory}/params is unreadable: {e}") from e
    return params, meta


def read_workdir_config(workdir: str | Path) -> ExperimentConfig:
    """The config a run recorded in ``workdir`` (``config.json``, written by ``claim_workdir``)."""
    return from_mapping(ExperimentConfig, read_json(Path(workdir) / "config.json", "workdir"))


def load_stage_adapters(workdir: str | Path, method: str) -> list[tuple[dict, dict]]:
    """(meta, adapter params as numpy) of every finished stage of ``method``, in stage order."""
    get_method(method)  # an unknown method's name is a ConfigError, not 'no checkpoints'
    directory = Path(workdir).absolute() / "checkpoints" / method
    if not directory.exists():
        raise CheckpointError(f"no checkpoints for method {method!r} under {directory}")
    manager = ocp.CheckpointManager(directory)
    out = []
    for stage in sorted(manager.all_steps()):
        try:
            meta = manager.restore(stage, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            # Onto one device: a workdir written by a multi-device or multi-process run works.
            adapter = read_tree_on_one_device(directory / str(stage) / "adapter")
        except Exception as e:
            raise CheckpointError(f"checkpoint {directory / str(stage)} is unreadable: {e}") from e
        out.append((meta["meta"], adapter))
    return out
