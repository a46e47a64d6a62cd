"""A LLaVA run's train step and generation, lowered for abstract inputs on any mesh.

Nothing is allocated: the backbone, adapter stack, optimizer state and batches are
``jax.ShapeDtypeStruct``s with the shardings of the run's rules, so the full-size paper config is
lowered (and then compiled, e.g. for a TPU topology by ``parallel.aot``) on a laptop. The train
step is the last stage of a method (its stack holds every earlier adapter, the case with the most
context), through the experiment's own ``ShardedStep``; the generation is ``llava_generate`` as
``GenerativeExperiment.answers`` calls it (prefill, then the KV-cache decode loop).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from tokenizers import Tokenizer, models

from mslora_jax.config import ExperimentConfig
from mslora_jax.families.llava.experiment import (
    GenerativeExperiment,
    VqaTask,
    cast_floating,
    pixels,
)
from mslora_jax.lora.targets import select_targets
from mslora_jax.models.generate import llava_generate
from mslora_jax.models.llava import init_llava
from mslora_jax.parallel.aot import per_device_bytes
from mslora_jax.parallel.mesh import batch_sharding, replicated
from mslora_jax.parallel.sharded_jit import sharding_context
from mslora_jax.train.step import init_train_state
from mslora_jax.train.stream import stage_context
from mslora_jax.train.stream_experiment import initial_trainable


def sized_config(
    config: ExperimentConfig,
    *,
    batch_size: int | None = None,
    grad_accum_steps: int | None = None,
    text_len: int | None = None,
    max_new_tokens: int | None = None,
    eval_batch_size: int | None = None,
) -> ExperimentConfig:
    """``config`` with the sizes that set memory replaced (None keeps the config's value).

    A ``batch_size`` replaces every task's own batch size too."""
    train, llava = config.train, config.llava
    keep = lambda value, default: default if value is None else value
    stream = config.stream
    if batch_size is not None:
        stream = tuple(dataclasses.replace(t, batch_size=None) for t in stream)
    return dataclasses.replace(
        config,
        stream=stream,
        train=dataclasses.replace(
            train,
            batch_size=keep(batch_size, train.batch_size),
            grad_accum_steps=keep(grad_accum_steps, train.grad_accum_steps),
            eval_batch_size=keep(eval_batch_size, train.eval_batch_size),
            steps_per_task=100,  # the schedule's length is data; no task data is read
        ),
        llava=dataclasses.replace(
            llava,
            max_len=keep(text_len, llava.max_len),
            max_new_tokens=keep(max_new_tokens, llava.max_new_tokens),
        ),
    )


def _placeholder_tokenizer() -> Tokenizer:
    """Nothing is tokenized; the experiment only needs the special tokens to exist."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))


def abstract_experiment(config: ExperimentConfig, mesh: Mesh) -> GenerativeExperiment:
    """The run's ``GenerativeExperiment`` on ``mesh`` over an abstract backbone (no weights)."""
    if config.model_kind != "llava":
        raise ValueError(f"abstract_experiment sizes LLaVA configs, got {config.model_kind!r}")
    cfg = config.llava.model_config()
    params = jax.eval_shape(functools.partial(init_llava, cfg), jax.random.PRNGKey(0))
    params = cast_floating(params, config.llava.dtype)
    tasks = [VqaTask(t.name, t.modality, [], [], t.primary_metric) for t in config.stream]
    return GenerativeExperiment(
        config,
        tasks,
        _placeholder_tokenizer(),
        mesh,
        params,  # placed abstractly by the rules: ShapeDtypeStructs with shardings
        select_targets(params, config.lora.targets),
        max_len=config.llava.max_len,
        max_new_tokens=config.llava.max_new_tokens,
    )


def abstract_stage(exp: GenerativeExperiment, method_name: str, stage: int | None = None):
    """``(state, context)`` of ``stage`` (default: the last) of ``method_name``, abstract.

    Every earlier slot holds an adapter, as when the stream reaches that stage."""
    method = exp.method(method_name)
    stage = exp.num_tasks - 1 if stage is None else stage
    adapter = jax.eval_shape(exp.fresh_adapter, stage)
    slots = dict.fromkeys(method.slots_before(stage), adapter)
    base_params = exp.base_params

    def context_for(base, slots):
        exp.base_params = base  # traced here: stage_context puts it into the context
        try:
            return stage_context(exp, method, stage, slots, [stage])
        finally:
            exp.base_params = base_params

    context = jax.eval_shape(context_for, base_params, slots)
    state = jax.eval_shape(
        lambda a: init_train_state(
            initial_trainable(exp, method, a), exp.optimizer, jax.random.PRNGKey(0)
        ),
        adapter,
    )
    return state, context


def train_batch_spec(config: ExperimentConfig) -> dict:
    """A training batch as ``ShapeDtypeStruct``s: ``train.batch_size`` rows of
    ``llava.max_len`` text tokens (the image tokens are spliced in by the model)."""
    rows, length = config.train.batch_size, config.llava.max_len
    size = config.llava.vision.image_size
    tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    flags = jax.ShapeDtypeStruct((rows, length), jnp.bool_)
    return {
        "image": jax.ShapeDtypeStruct((rows, size, size, 3), jnp.uint8),
        "input_ids": tokens,
        "loss_mask": flags,
        "attention_mask": flags,
    }


def sequence_length(config: ExperimentConfig, text_len: int | None = None) -> int:
    """Decoder positions of a sequence: the text tokens with ``<image>`` replaced by patches."""
    text_len = config.llava.max_len if text_len is None else text_len
    return text_len + config.llava.model_config().num_patches - 1


class Program(NamedTuple):
    """A lowered program and the bytes of one device's shards of its arguments."""

    lowered: jax.stages.Lowered
    argument_bytes: int


def lower_train_step(exp: GenerativeExperiment, method_name: str = "mslora_cr_ortho") -> Program:
    """The run's train step of ``method_name`` (``exp.train_step_for``: the shared step, or a
    baseline's own), state donated, lowered for the last stage."""
    state, context = abstract_stage(exp, method_name)
    args = (state, context, train_batch_spec(exp.config))
    train_step = exp.train_step_for(exp.method(method_name))
    lowered = train_step.lower(*args)
    return Program(lowered, per_device_bytes(args, train_step.shardings(*args)))


def lower_generation(exp: GenerativeExperiment, prompt_len: int | None = None) -> Program:
    """``llava_generate`` of one evaluation batch (``exp.eval_batch_size`` prompts of
    ``prompt_len`` text tokens, default ``llava.max_len``; ``llava.max_new_tokens`` new
    tokens), lowered with the evaluation's shardings: the adapter-merged backbone by the rules,
    prompts and KV cache over the batch axes."""
    config = exp.config
    rows = exp.eval_batch_size
    prompt_len = config.llava.max_len if prompt_len is None else prompt_len
    size = config.llava.vision.image_size
    data = batch_sharding(exp.mesh)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=data)
    images = spec((rows, size, size, 3), jnp.uint8)
    ids = spec((rows, prompt_len), jnp.int32)
    mask = spec((rows, prompt_len), jnp.bool_)
    # Evaluation merges the adapters into the kernels (``exp.inference_params``): the
    # backbone's shapes and shardings, no adapter stack.
    variables = {"params": exp.base_params}
    weights = jax.ShapeDtypeStruct((exp.num_slots,), jnp.float32, sharding=replicated(exp.mesh))
    args = (variables, images, ids, mask, weights)

    def generate(variables, images, ids, mask, weights):
        out = llava_generate(
            exp.model,
            variables,
            pixels(config, images),
            ids,
            mask,
            weights,
            max_new_tokens=config.llava.max_new_tokens,
            stop_ids=(exp.ids.eos,),
            pad_id=exp.ids.pad,
            return_logits=False,
        )
        return out.tokens, out.lengths

    with sharding_context(exp.rules):
        lowered = jax.jit(generate, out_shardings=data).lower(*args)
    return Program(lowered, per_device_bytes(args))
