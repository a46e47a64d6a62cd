"""Proof of fit without the hardware: compile a config's train step and generation for a TPU
topology (or this machine's XLA:CPU) ahead of time and print each program's per-device memory.

Prints one JSON line per (program, mesh, gradient accumulation); asserts nothing. Everything is
abstract (no weight is allocated), so the full-size paper config compiles on a CPU-only machine
with ``libtpu`` installed (``pip install -e '.[tpu-aot]'``). A program that does not fit the
chip's HBM is refused by the TPU compiler; that is reported as ``"fits": "no"`` with the
compiler's figures.

- ``train``: the last stage of ``--method`` (its stack holds every earlier, frozen adapter),
  ``--batch`` sequences of ``--text_len`` text tokens (the image's patches spliced in), split into
  ``--grad_accum`` micro-batches; the run's own ``ShardedStep`` (state donated).
- ``generate``: ``llava_generate`` (prefill + KV-cache decode loop of ``--new_tokens``) of one
  evaluation batch of ``--eval_batch`` prompts of ``--prompt_len`` text tokens.

Figures per device, in GiB: arguments, outputs, aliased (donated), temporaries, and
``peak_estimate`` = arguments + outputs - aliased + temporaries, against the device's HBM
(v5e 16 GiB, v4 32 GiB per chip; ``--backend cpu``: ``--hbm_gib``, default 80 for an 80 GB GPU;
XLA:CPU plans no rematerialization, so its temporaries overstate a GPU's).

    python experiments/aot_memory.py --config configs/paper_8task.py --topology v5e:2x4 \
        [--mesh 1,8,1 --mesh 2,4,1] [--batch 16] [--grad_accum 1 --grad_accum 2] [--text_len L]
    python experiments/aot_memory.py --config configs/paper_8task.py --topology v4:2x2x1
    python experiments/aot_memory.py --config configs/paper_8task.py --backend cpu
"""

from __future__ import annotations

import os

# Before JAX starts: its default backend is this machine's CPU (no attempt to open a TPU, which
# would take libtpu's lockfile and warn); the topology loads libtpu for compiling only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mslora_jax.config import experiment_config  # noqa: E402
from mslora_jax.errors import ConfigError  # noqa: E402
from mslora_jax.parallel import aot  # noqa: E402
from mslora_jax.run.aot import (
    abstract_experiment,
    lower_generation,
    lower_train_step,
    sequence_length,
    sized_config,
)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/paper_8task.py", "Config.")
_BACKEND = flags.DEFINE_enum(
    "backend", "tpu", ["tpu", "cpu"], "Compile for a TPU topology or XLA:CPU."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", "v5e:2x4", "TPU topology name (libtpu's), e.g. v4:2x2x1."
)
_CHIP_CONFIG = flags.DEFINE_string(
    "chip_config", "auto", "libtpu chip config: auto (megacore for v4/v5p), default, megacore."
)
_MESH = flags.DEFINE_multi_string(
    "mesh", None, "data,fsdp,tensor sizes (repeatable); default: 1,n,1 2,n/2,1 1,n/2,2."
)
_WHAT = flags.DEFINE_multi_enum("what", ["train", "generate"], ["train", "generate"], "Programs.")
_METHOD = flags.DEFINE_string("method", "mslora_cr_ortho", "Method whose last stage is sized.")
_BATCH = flags.DEFINE_integer("batch", 0, "Sequences per step; 0: the last task's batch size.")
_ACCUM = flags.DEFINE_multi_integer("grad_accum", None, "Micro-batches per step (repeatable).")
_TEXT_LEN = flags.DEFINE_integer("text_len", 0, "Text tokens per sequence; 0: llava.max_len.")
_NEW = flags.DEFINE_integer("new_tokens", 0, "Generated tokens; 0: llava.max_new_tokens.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 0, "Prompts per batch; 0: train.eval_batch_size.")
_PROMPT_LEN = flags.DEFINE_multi_integer(
    "prompt_len", None, "Text tokens per prompt (repeatable); default: llava.max_len."
)
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "Memory per device; 0: the chip's (cpu: 80).")


def default_meshes(n: int) -> list[tuple[int, int, int]]:
    """Pure FSDP, FSDP x data, FSDP x tensor over ``n`` devices."""
    shapes = [(1, n, 1)]
    if n % 2 == 0 and n > 2:
        shapes += [(2, n // 2, 1), (1, n // 2, 2)]
    return shapes


def _mesh_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise app.UsageError(f"--mesh {text!r}: expected data,fsdp,tensor, e.g. 1,8,1")
    return shape


def _devices():
    if _BACKEND.value == "cpu":
        import jax

        return "cpu", jax.devices("cpu")
    name = _TOPOLOGY.value
    chip = _CHIP_CONFIG.value
    if chip == "auto":
        chip = "megacore" if name.startswith(("v4", "v5p")) else None
    elif chip == "default":
        chip = None
    return name, aot.tpu_topology_devices(name, chip)


def main(argv):
    del argv
    base = experiment_config(_CONFIG.value)
    if base.model_kind != "llava":
        raise app.UsageError("aot_memory sizes LLaVA configs (model_kind='llava')")
    topology, devices = _devices()
    hbm = int(_HBM.value * aot.GIB) if _HBM.value else aot.hbm_bytes_per_device(devices)
    if hbm is None and _BACKEND.value == "cpu":
        hbm = 80 * aot.GIB
    shapes = [_mesh_shape(m) for m in _MESH.value] if _MESH.value else None
    if _BACKEND.value == "cpu":
        shapes = shapes or [(1, 1, 1)]
    shapes = shapes or default_meshes(len(devices))
    batch = _BATCH.value or base.stage_batch_size([len(base.stream) - 1])
    accums = _ACCUM.value or [base.train.grad_accum_steps]
    for shape in shapes:
        mesh = aot.device_mesh(devices[: shape[0] * shape[1] * shape[2]], shape)
        head = {"topology": topology, **aot.mesh_description(mesh)}
        if "train" in _WHAT.value:
            for accum in accums:
                line = {"program": "train", **head, "batch": batch, "grad_accum": accum}
                try:
                    config = sized_config(
                        base,
                        batch_size=batch,
                        grad_accum_steps=accum,
                        text_len=_TEXT_LEN.value or None,
                    )
                    line["text_len"] = config.llava.max_len
                    line["sequence"] = sequence_length(config)
                    start = time.perf_counter()
                    exp = abstract_experiment(config, mesh)
                    program = lower_train_step(exp, _METHOD.value)
                    line["lower_s"] = round(time.perf_counter() - start, 1)
                except ConfigError as error:  # e.g. a batch the mesh does not divide
                    print(json.dumps({**line, "skipped": str(error)}), flush=True)
                    continue
                line["argument_shards_gib"] = round(program.argument_bytes / aot.GIB, 3)
                report, _ = aot.compile_memory(program.lowered, hbm, program.argument_bytes)
                print(json.dumps({**line, **report.as_dict()}), flush=True)
        if "generate" in _WHAT.value:
            config = sized_config(
                base,
                batch_size=batch,
                max_new_tokens=_NEW.value or None,
                eval_batch_size=_EVAL_BATCH.value or None,
            )
            exp = abstract_experiment(config, mesh)
            for prompt_len in _PROMPT_LEN.value or [config.llava.max_len]:
                line = {
                    "program": "generate",
                    **head,
                    "eval_batch": exp.eval_batch_size,
                    "prompt_len": prompt_len,
                    "new_tokens": config.llava.max_new_tokens,
                    "kv_cache_len": sequence_length(config, prompt_len)
                    + config.llava.max_new_tokens
                    - 1,
                }
                start = time.perf_counter()
                program = lower_generation(exp, prompt_len)
                line["lower_s"] = round(time.perf_counter() - start, 1)
                line["argument_shards_gib"] = round(program.argument_bytes / aot.GIB, 3)
                report, _ = aot.compile_memory(program.lowered, hbm, program.argument_bytes)
                print(json.dumps({**line, **report.as_dict()}), flush=True)


if __name__ == "__main__":
    app.run(main)
