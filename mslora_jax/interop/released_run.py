"""``mslora-jax import-released``: a run folder whose finished stages are the released adapters.

The released tasks ``1..K`` (``interop.released``) become stages ``0..K-1`` of one of the
config's methods, written exactly as ``train.stream.run_method`` writes a trained stage: the
adapter in its slot, a fresh train state around it, the stage's row of the matrices (each
stage is evaluated here, the forward summing the adapters of tasks ``1..k``, as the released
``eval_mslora_cr.py`` does with ``task_mask[:k] = True``) and the metadata, plus the config and
backbone of the run. ``mslora-jax run --config C --workdir W`` then restores them and trains
stage ``K + 1`` on; ``mslora-jax inspect`` reads them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import jax

from mslora_jax.config import ExperimentConfig
from mslora_jax.errors import ConfigError
from mslora_jax.families.llava.setup import prepare_generative
from mslora_jax.interop.released import (
    ReleasedFile,
    check_released_settings,
    read_released_file,
    released_adapters,
)
from mslora_jax.io_utils import atomic_folder, check_new_folder
from mslora_jax.lora.targets import select_targets
from mslora_jax.models.llava import init_llava
from mslora_jax.parallel.mesh import make_mesh
from mslora_jax.run.experiment import claim_workdir, fingerprint, read_inputs
from mslora_jax.train.checkpoints import StageCheckpoints
from mslora_jax.train.methods import get_method
from mslora_jax.train.stream import evaluate_row, primary_row, save_stage

log = logging.getLogger(__name__)

# What the released trainer can have run: with --is_same_modality, CR plus orthogonality
# (llava_mistral.py adds the orthogonality loss only together with CR); without, neither.
RELEASED_METHODS = ("mslora_cr_ortho", "mslora")
_NOT_TRAINED = {"steps": 0, "timed_steps": 0, "seconds": 0.0}  # an imported stage's timing


@dataclasses.dataclass(frozen=True)
class ImportedStage:
    """One imported stage: the task it was trained on, the file it came from, its row."""

    task: str
    source: str
    row: list[float | None]


def released_method(config: ExperimentConfig, name: str | None) -> str:
    """The method the released stages become: ``name``, or the config's one method among
    ``RELEASED_METHODS``; it must be one of the config's methods (so ``run`` continues it)."""
    if name is None:
        candidates = [m for m in config.methods if m in RELEASED_METHODS]
        if len(candidates) != 1:
            raise ConfigError(
                f"the config's methods {list(config.methods)} hold {len(candidates)} of "
                f"{list(RELEASED_METHODS)}; choose the method with --method"
            )
        name = candidates[0]
    get_method(name)  # an unknown name is a ConfigError naming the known ones
    if name not in RELEASED_METHODS:
        raise ConfigError(
            f"method {name!r} is not what the released trainer runs: its stages are "
            f"{RELEASED_METHODS[0]} (with --is_same_modality) or {RELEASED_METHODS[1]} (without)"
        )
    if name not in config.methods:
        raise ConfigError(
            f"method {name!r} is not among the config's methods {list(config.methods)}, so "
            "`mslora-jax run` would not continue it"
        )
    if config.lora.granularity != "task":
        raise ConfigError(
            f'the released adapters are one per task: lora.granularity must be "task", not '
            f"{config.lora.granularity!r}"
        )
    return name


def read_released(config: ExperimentConfig, bins: Sequence[str | os.PathLike], method: str):
    """The released files, checked against ``config``, and one adapter tree per task."""
    if config.model_kind != "llava":
        raise ConfigError(
            f'the released adapters are LLaVA\'s: model_kind must be "llava", not '
            f"{config.model_kind!r}"
        )
    if not bins:
        raise ConfigError("give the released cl_lora.bin of every stage (--bin FILE, repeated)")
    files = [read_released_file(path) for path in bins]
    spec = get_method(method)
    check_released_settings(files, config, use_cr=spec.use_cr, use_ortho=spec.use_ortho)
    abstract = jax.eval_shape(
        functools.partial(init_llava, config.llava.model_config()), jax.random.PRNGKey(0)
    )
    targets = select_targets(abstract, config.lora.targets)
    adapters = released_adapters(files, abstract, targets, config.lora.rank)
    if len(adapters) > len(config.stream):
        raise ConfigError(
            f"the released files hold {len(adapters)} tasks but the config's stream has "
            f"{len(config.stream)}: {[t.name for t in config.stream]}"
        )
    return files, adapters


def _source_of(files: Sequence[ReleasedFile], task: int) -> ReleasedFile:
    return next(f for f in files if task in f.tasks)


def import_released(
    config: ExperimentConfig,
    bins: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    method: str | None = None,
) -> list[ImportedStage]:
    """Write the run folder ``out`` whose first stages of ``method`` are the released tasks.

    ``bins``: every stage's ``cl_lora.bin`` (any order; each holds its own task's factors),
    each with its ``config.json`` beside it. Everything is read and checked before anything is
    built; ``out`` must not exist or be empty, and is written under a temporary name next to
    it, then renamed, so a failure leaves nothing there.
    """
    out = Path(out).absolute()
    check_new_folder(out)
    method = released_method(config, method)
    files, adapters = read_released(config, bins, method)
    mesh = make_mesh(config.num_devices, config.mesh.shape)
    inputs = read_inputs(config)
    stages, run_fingerprint = [], fingerprint(config)
    with atomic_folder(out) as tmp:
        claim_workdir(config, tmp)
        exp, _ = prepare_generative(config, tmp, mesh, inputs)
        spec = exp.method(method)
        checkpoints = StageCheckpoints(tmp / "checkpoints" / method)
        slots: dict[int, dict] = {}
        previous = None
        for stage, params in enumerate(adapters):
            source = _source_of(files, stage)
            slots[spec.slot(stage)] = adapter = exp.rules.place(params)
            # A fresh optimizer state around the adapter: what a finished stage's checkpoint
            # holds (a run restores it only to read the adapter).
            state = exp.init_state(spec, adapter, jax.random.PRNGKey(0))
            metric_row = evaluate_row(exp, spec, stage, slots, previous)
            row = primary_row(exp, metric_row)
            info = {"timing": dict(_NOT_TRAINED), "final": {}}
            released = {"file": str(source.path), "mslora_cfg": source.mslora_cfg}
            args = (checkpoints, exp, spec, stage, state, row, metric_row, info, run_fingerprint)
            save_stage(*args, released=released)
            stages.append(ImportedStage(exp.tasks[stage].name, str(source.path), row))
            log.info("imported %s as %s stage %d: %s", source.path, method, stage, row)
            previous = metric_row
    return stages
