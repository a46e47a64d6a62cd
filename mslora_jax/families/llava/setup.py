"""Set up a generative (``model_kind="llava"``) run: data, tokenizer and frozen backbone.

Synthetic tasks are written to ``workdir/data/<task>/`` in the paper's file format first, so the
demo goes through exactly the reader a user's real data goes through.

Multi-process: every process needs the data and the tokenizer, whether or not the workdir is on a
shared filesystem. Both are deterministic functions of the config, so each process makes what it
does not find: a synthetic task is written to a temporary folder and renamed into place (the
first rename wins, the others' identical copies are dropped), and the tokenizer is built by every
process but saved by process 0 only, atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from pathlib import Path

import jax
from jax.sharding import Mesh
from tokenizers import Tokenizer

from mslora_jax.config import ExperimentConfig, TaskConfig
from mslora_jax.data.conversation import (
    build_tokenizer,
    check_tokenizer_fits,
    load_tokenizer,
    render_conversation,
)
from mslora_jax.data.synthetic import SyntheticTaskSpec
from mslora_jax.data.synthetic_vqa import write_synthetic_vqa_task
from mslora_jax.errors import ConfigError, DataError
from mslora_jax.families import Family
from mslora_jax.families.llava.experiment import (
    GenerativeExperiment,
    VqaTask,
    cast_floating,
    chat_template,
    load_vqa_task,
    pretrain_llava,
)
from mslora_jax.io_utils import atomic_write_text
from mslora_jax.lora.targets import select_targets
from mslora_jax.models.llava import init_llava
from mslora_jax.parallel.distributed import is_primary
from mslora_jax.parallel.rules import ShardingRules
from mslora_jax.parallel.sharded_jit import born_sharded
from mslora_jax.train.backbone import obtain_frozen_backbone, pretrain_provenance

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerativeInputs:
    """What a generative run reads from outside its workdir, read and checked (``read_inputs``)."""

    tasks: Mapping[str, VqaTask]  # the VQA tasks (source "vqa") of stream and base, by name
    tokenizer: Tokenizer | None  # llava.tokenizer_file, checked against the model; None: none


def read_inputs(config: ExperimentConfig) -> GenerativeInputs:
    """Reads the user's VQA files and tokenizer file; only reads, so a run checks its input
    before it claims a workdir (and a fixed config can still use that workdir)."""
    tasks = config.stream + config.base_tasks
    path = config.llava.tokenizer_file
    return GenerativeInputs(
        tasks={t.name: load_vqa_task(config, t) for t in tasks if t.source == "vqa"},
        tokenizer=_fitting_tokenizer(config, load_tokenizer(path), path) if path else None,
    )


def load_generative_tasks(
    config: ExperimentConfig, tasks, workdir: Path, read: Mapping[str, VqaTask] | None = None
) -> list[VqaTask]:
    """Read VQA tasks (or take them from ``read``); synthetic ones are first materialised under
    ``workdir/data``."""
    out = []
    for task in tasks:
        if task.source == "synthetic":
            _materialise_synthetic(config, task, workdir / "data" / task.name)
            local = dataclasses.replace(config, data_dir=str(workdir / "data"))
            task = TaskConfig(**{**dataclasses.asdict(task), "source": "vqa"})
            out.append(load_vqa_task(local, task))
        elif read is not None and task.name in read:
            out.append(read[task.name])
        else:
            out.append(load_vqa_task(config, task))
    return out


def _materialise_synthetic(config: ExperimentConfig, task: TaskConfig, folder: Path) -> None:
    """Write a synthetic task into ``folder`` unless it is there; safe with concurrent writers."""
    if (folder / task.test_file).exists():
        return
    spec = SyntheticTaskSpec(task.name, task.modality, task.num_classes, task.seed)
    try:
        # Writes a temporary sibling folder, then renames it to ``folder``.
        write_synthetic_vqa_task(
            spec,
            folder,
            image_size=config.llava.vision.image_size,
            num_train=task.num_train,
            num_test=task.num_test,
        )
    except (OSError, DataError):
        # Another process of this run (same workdir) renamed its identical copy first.
        if not (folder / task.test_file).exists():
            raise


def obtain_tokenizer(
    config: ExperimentConfig,
    tasks: list[VqaTask],
    workdir: Path,
    tokenizer: Tokenizer | None = None,
):
    """``llava.tokenizer_file`` (or ``tokenizer``, that file already read and checked), else a
    byte-level BPE built once from the training texts.

    Checked against the model before anything is trained; errors name the tokenizer file. The
    build is deterministic, so every process of a run gets the same one; process 0 saves it.
    """
    if tokenizer is not None:
        return tokenizer
    path = Path(config.llava.tokenizer_file or workdir / "tokenizer.json")
    if config.llava.tokenizer_file or path.exists():
        tokenizer = load_tokenizer(path)
    else:
        template = chat_template(config)
        texts = [render_conversation(e, template) for t in tasks for e in t.examples]
        tokenizer = build_tokenizer(texts, config.llava.tokenizer_vocab_size)
    _fitting_tokenizer(config, tokenizer, path)
    if is_primary() and not path.exists():
        # Atomic (unlike Tokenizer.save): another process may be reading the path right now.
        atomic_write_text(path, tokenizer.to_str(pretty=True))
    return tokenizer


def _fitting_tokenizer(config: ExperimentConfig, tokenizer: Tokenizer, path) -> Tokenizer:
    """``tokenizer``, if the model can use it; else the error, naming the file at ``path``."""
    try:
        check_tokenizer_fits(
            tokenizer, config.llava.decoder.vocab_size, config.llava.image_token_id
        )
    except (ConfigError, DataError) as error:
        raise type(error)(f"{path}: {error}") from None
    return tokenizer


def llava_model_json(config: ExperimentConfig) -> dict:
    """The ``model`` entry of a LLaVA backbone's meta.json: the architecture only, so settings
    that do not change the weights' meaning (generation length, remat, ...) can change freely."""
    return dataclasses.asdict(config.llava.model_config())


# llava.* settings that change what a pretrained backbone learns (its provenance).
_PRETRAINING_KEYS = (
    "tokenizer_file",
    "tokenizer_vocab_size",
    "max_len",
    "template",
    "system_prompt",
    "image_mean",
    "image_std",
    "pad_to_square",
)


def _pretraining_settings(config: ExperimentConfig) -> dict:
    return {key: getattr(config.llava, key) for key in _PRETRAINING_KEYS}


def prepare_generative(
    config: ExperimentConfig, workdir: Path, mesh: Mesh, inputs: GenerativeInputs | None = None
):
    """(experiment, backbone info) for a LLaVA run; pretrains and saves the backbone once.

    ``inputs``: what ``read_inputs(config)`` returned, if the caller read it already."""
    inputs = inputs or GenerativeInputs(tasks={}, tokenizer=None)
    stream = load_generative_tasks(config, config.stream, workdir, inputs.tasks)
    base = load_generative_tasks(config, config.base_tasks, workdir, inputs.tasks)
    tokenizer = obtain_tokenizer(config, base + stream, workdir, inputs.tokenizer)
    model_cfg = config.llava.model_config()
    init = functools.partial(init_llava, model_cfg)
    dtype = config.llava.dtype
    rules = ShardingRules(mesh, "llava")
    # A saved backbone is restored straight into llava.dtype (orbax casts while reading) and
    # into the rules' shardings (each host reads only its shards).
    abstract = cast_floating(rules.abstract(jax.eval_shape(init, jax.random.PRNGKey(0))), dtype)
    params, info = obtain_frozen_backbone(
        config,
        workdir,
        abstract=abstract,
        model_json=llava_model_json(config),
        provenance=pretrain_provenance(config, llava=_pretraining_settings(config)),
        init_fn=lambda rng: born_sharded(init, rules, rng),
        pretrain_fn=lambda rng: (
            pretrain_llava(config, base, tokenizer, mesh, rng, max_len=config.llava.max_len),
            {"steps": config.pretrain.steps},
        ),
    )
    params = cast_floating(params, dtype)  # a fresh or just pretrained one is float32
    targets = select_targets(params, config.lora.targets)
    exp = GenerativeExperiment(
        config,
        stream,
        tokenizer,
        mesh,
        params,
        targets,
        max_len=config.llava.max_len,
        max_new_tokens=config.llava.max_new_tokens,
    )
    return exp, info


def train_sizes(config: ExperimentConfig, inputs: GenerativeInputs) -> list[int]:
    """Training examples per stream task: a VQA task's as read, a synthetic task's as configured
    (it is written into the workdir later)."""
    return [
        len(inputs.tasks[t.name].examples) if t.source == "vqa" else t.num_train
        for t in config.stream
    ]


def random_experiment(config: ExperimentConfig, workdir: Path, mesh: Mesh) -> GenerativeExperiment:
    """The experiment over a seeded random backbone (``backbone.source="random"`` in ``config``);
    its synthetic task folders and tokenizer are written under ``workdir``."""
    return prepare_generative(config, workdir, mesh)[0]


FAMILY = Family(
    read_inputs=read_inputs,
    train_sizes=train_sizes,
    build_experiment=prepare_generative,
    random_experiment=random_experiment,
)
