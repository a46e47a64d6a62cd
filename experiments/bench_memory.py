"""Benchmark: memory of one LoRA train step of a config's LLaVA model, without any weights.

Prints figures; asserts nothing. Everything is abstract (``jax.ShapeDtypeStruct``: no parameter
is allocated), so the full-size paper config is sized on a laptop:

- ``residuals_gib``: the activations the run's loss (task loss + CR + ortho) keeps for its
  backward pass, from JAX's own ``saved_residuals`` (backend-independent; what ``llava.remat``
  reduces). Arguments (frozen weights, batch) are not counted again.
- ``argument_gib`` / ``output_gib`` / ``temp_gib``: XLA's ``memory_analysis`` of the run's
  compiled train step (optimizer update included) on this machine's backend. Arguments are the
  frozen backbone, adapter stack, optimizer state and batch. ``temp_gib`` is the backend's own
  buffer plan: on the CPU it does not reflect rematerialization (XLA:CPU keeps the recomputed
  values live; a toy two-layer check shows the same), so read it on the GPU/TPU that trains.

    python experiments/bench_memory.py --config configs/paper_8task.py [--remat both|on|off]
        [--dtype float32|bfloat16]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax._src.ad_checkpoint import saved_residuals  # no public equivalent returns the list
from ml_collections import config_flags
from tokenizers import Tokenizer, models

from mslora_jax.config import experiment_config
from mslora_jax.families.llava.experiment import GenerativeExperiment, VqaTask, cast_floating
from mslora_jax.lora.targets import select_targets
from mslora_jax.models.llava import init_llava
from mslora_jax.parallel.mesh import make_mesh
from mslora_jax.train.adapter_loss import regularized_adapter_loss
from mslora_jax.train.methods import get_method
from mslora_jax.train.step import init_train_state
from mslora_jax.train.stream import stage_context
from mslora_jax.train.stream_experiment import initial_trainable

_CONFIG = config_flags.DEFINE_config_file("config", "configs/paper_8task.py", "Config.")
_REMAT = flags.DEFINE_enum("remat", "both", ["both", "on", "off"], "Decoder rematerialization.")
_METHOD = flags.DEFINE_string("method", "mslora_cr_ortho", "Method whose last stage is sized.")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "llava.dtype (default: the config's)."
)
_BATCH = flags.DEFINE_integer("batch", 0, "Sequences per step; 0: the config's batch size.")

GIB = 2**30


def _tokenizer_without_image_token() -> Tokenizer:
    """The bench tokenizes nothing; the experiment only needs the special tokens to exist."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))


def step_memory(config, remat: bool, method_name: str, batch_size: int) -> dict:
    """Lower and compile the train step of the last stage for abstract inputs; its memory."""
    config = dataclasses.replace(
        config,
        llava=dataclasses.replace(config.llava, remat=remat),
        train=dataclasses.replace(config.train, batch_size=batch_size, steps_per_task=100),
        num_devices=1,
    )
    cfg = config.llava.model_config()
    params = jax.eval_shape(functools.partial(init_llava, cfg), jax.random.PRNGKey(0))
    params = cast_floating(params, config.llava.dtype)
    targets = select_targets(params, config.lora.targets)
    tasks = [VqaTask(t.name, t.modality, [], [], t.primary_metric) for t in config.stream]
    exp = GenerativeExperiment(
        config,
        tasks,
        _tokenizer_without_image_token(),
        make_mesh(1),
        params,
        targets,
        max_len=config.llava.max_len,
        max_new_tokens=config.llava.max_new_tokens,
    )
    method, stage = get_method(method_name), len(tasks) - 1
    earlier = dict.fromkeys(range(stage))
    adapter = jax.eval_shape(exp.fresh_adapter, stage)
    slots = {i: adapter for i in earlier}

    def context_for(base_params, slots):
        exp.base_params = base_params  # traced here: stage_context puts it in the context
        return stage_context(exp, method, stage, slots, [stage])

    context = jax.eval_shape(context_for, params, slots)
    exp.base_params = params
    state = jax.eval_shape(
        lambda a: init_train_state(
            initial_trainable(exp, method, a), exp.optimizer, jax.random.PRNGKey(0)
        ),
        adapter,
    )
    size, length = cfg.vision.image_size, config.llava.max_len
    ids = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    flags_ = jax.ShapeDtypeStruct((batch_size, length), jnp.bool_)
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
        "input_ids": ids,
        "loss_mask": flags_,
        "attention_mask": flags_,
    }
    loss_fn = regularized_adapter_loss(exp.task_loss())

    def loss(trainable, ctx, data):
        # Differentiated with respect to the trainable part only, as the train step does:
        # the frozen vision tower then keeps nothing for a backward pass.
        ctx, data = jax.lax.stop_gradient((ctx, data))
        return loss_fn(trainable, ctx, data, jax.random.PRNGKey(0))[0]

    residuals = saved_residuals(loss, state.trainable, context, batch)
    # Arguments (and stop_gradient of them, which is the same buffer) are already counted.
    aliases = ("from the argument", "output of stop_gradient")
    kept = [aval for aval, source in residuals if not source.startswith(aliases)]
    start = time.perf_counter()
    compiled = exp.train_step.lower(state, context, batch).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return {
        "remat": remat,
        "dtype": config.llava.dtype,
        "batch": batch_size,
        "sequence": length + cfg.num_patches - 1,
        "residuals_gib": round(sum(np.prod(a.shape) * a.dtype.itemsize for a in kept) / GIB, 3),
        "argument_gib": round(mem.argument_size_in_bytes / GIB, 3),
        "output_gib": round(mem.output_size_in_bytes / GIB, 3),
        "temp_gib": round(mem.temp_size_in_bytes / GIB, 3),
        "alias_gib": round(mem.alias_size_in_bytes / GIB, 3),
        # Donated state is aliased to the output, so it is counted once.
        "peak_estimate_gib": round(
            (
                mem.argument_size_in_bytes
                + mem.output_size_in_bytes
                - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes
            )
            / GIB,
            3,
        ),
        "compile_s": round(seconds, 1),
        "backend": jax.default_backend(),
    }


def main(argv):
    del argv
    config = experiment_config(_CONFIG.value)
    if config.model_kind != "llava":
        raise app.UsageError("bench_memory sizes LLaVA configs (model_kind='llava')")
    batch = _BATCH.value or config.train.batch_size
    if _DTYPE.value:
        config = dataclasses.replace(
            config, llava=dataclasses.replace(config.llava, dtype=_DTYPE.value)
        )
    choices = {"both": (False, True), "on": (True,), "off": (False,)}[_REMAT.value]
    for remat in choices:
        print(json.dumps(step_memory(config, remat, _METHOD.value, batch)), flush=True)


if __name__ == "__main__":
    app.run(main)
