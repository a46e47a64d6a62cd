"""Benchmark: one adapter train step of a config on device: time, throughput, FLOPs, MFU, memory.

    python experiments/bench_step.py --config configs/demo.py [--method mslora_cr_ortho] \
        [--steps 50] [--num_devices 0] [--mesh data,fsdp,tensor] [--peak_tflops X]

Prints one JSON object; asserts nothing. Dual encoder and LLaVA configs alike; the backbone is
random (``backbone.source="random"``: nothing downloads or pretrains). The step is the last stage
of ``--method`` (every earlier slot holds a fresh adapter), called through the training loop's
own path (``exp.train_step.bind``) on one fixed device-resident batch; after warm-up each step is
timed to completion. Sequences/s = batch / step time; tokens per sequence: the dual encoder's
image patches + text tokens, LLaVA's decoder positions (text tokens + patches - 1).

FLOPs per step, two counts:

- ``xla_flops``: XLA's cost analysis of the compiled step: everything it runs (recompute,
  optimizer, regularizers, elementwise ops). It analyses the partitioned program of one
  device; ``xla_flops_per_step`` is that times the devices.
- ``model_flops``: analytic, for LoRA training (no rematerialisation recompute, the usual MFU
  convention). A frozen matmul of N weights costs 2·N per token forward plus 2·N for its input
  gradient (no weight gradient) where the backward reaches it: not the patch embeddings, nor the
  LLaVA vision tower and projector (upstream of every adapter: forward only). The trained
  adapter costs 6·N_lora per token; the frozen adapters the forward sums are frozen matmuls (none
  when folded into the kernels, ``lora.fold_frozen``). Attention scores (QK^T and AV over the full
  L x L, as computed: the causal half is not discounted) cost 4·L·d per token per layer forward,
  x3 with the backward. Not counted: embedding lookups, norms, activations, the loss and the
  CR/ortho regularizers; LLaVA's ``lm_head`` at the scored (answer) positions only, as the loss
  computes it.

MFU = model_flops / step time / (peak FLOP/s per device x devices); the peak is ``--peak_tflops``
or the bf16 dense figure of the device kind (none on CPU). Peak memory: the device's
``peak_bytes_in_use`` where it reports one, else the compiler's estimate for the step.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from flax.traverse_util import flatten_dict
from ml_collections import config_flags

from mslora_jax.config import MeshConfig, experiment_config
from mslora_jax.parallel.mesh import to_global_batch
from mslora_jax.run.experiment import random_backbone_experiment
from mslora_jax.train.methods import get_method
from mslora_jax.train.stream import stage_context
from mslora_jax.train.stream_experiment import StreamExperiment

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config.")
_METHOD = flags.DEFINE_string("method", "mslora_cr_ortho", "Method whose last stage is timed.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps (after the warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one compiles).")
_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices of the mesh; 0 = all.")
_MESH = flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes, e.g. 1,-1,1.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for the MFU.")
_WORKDIR = flags.DEFINE_string("workdir", "", "LLaVA only: data/tokenizer folder; default: temp.")

# bf16 dense peak TFLOP/s per device, by device_kind substring (first match wins).
PEAK_TFLOPS = (
    ("TPU v5 lite", 197.0),  # v5e: Google Cloud TPU v5e docs, 197 TFLOPS bf16
    ("TPU v5", 459.0),  # v5p: Google Cloud TPU v5p docs, 459 TFLOPS bf16
    ("TPU v4", 275.0),  # Google Cloud TPU v4 docs, 275 TFLOPS bf16
    ("H100 PCIe", 756.0),  # NVIDIA H100 datasheet: 1513 with sparsity, half dense
    ("H100", 989.0),  # NVIDIA H100 SXM datasheet: 1979 with sparsity, 989 dense
    ("H200", 989.0),  # NVIDIA H200 SXM datasheet: 1979 with sparsity (H200 NVL: 835 dense)
)


def matmul_rules(exp: StreamExperiment, host_batch: dict) -> tuple[list, list, int]:
    """``(kernel rules, attention, tokens per sequence)``: ordered ``(path regex, tokens per
    step, backward?)`` and ``(layers, length L, width d, sequences, backward?)``."""
    rows = len(host_batch["image"]) * jax.process_count()
    if exp.config.model_kind == "llava":
        cfg = exp.config.llava.model_config()
        vis, dec, p = cfg.vision, cfg.decoder, cfg.num_patches
        used = cfg.vision_layer % (vis.depth + 1)  # ViT blocks below the hidden state taken
        seq = host_batch["input_ids"].shape[1] + p - 1
        scored = int(np.sum(host_batch["loss_mask"][:, 1:])) * jax.process_count()
        rules = [(r"^vision_tower/patch_embed$", rows * p, False)]
        rules += [
            (rf"^vision_tower/encoder/block_{i}/", rows * (p + 1), False) for i in range(used)
        ]
        rules += [
            (r"^vision_tower/", 0, False),
            (r"^projector/", rows * p, False),
            (r"^decoder/lm_head$", scored, True),
            (r"^decoder/", rows * seq, True),
        ]
        attention = [(used, p + 1, vis.width, rows, False)]
        attention.append((dec.depth, seq, dec.num_heads * dec.head_dim, rows, True))
        return rules, attention, seq
    cfg = exp.config.model
    p, text = (cfg.image_size // cfg.patch_size) ** 2, cfg.max_text_len
    rules = [
        (r"^image/patch_embed$", rows * p, False),
        (r"/proj$", rows, True),  # applied to the pooled [CLS] only
        (r"^image/", rows * (p + 1), True),
        (r"^text/", rows * text, True),
    ]
    attention = [(cfg.depth, p + 1, cfg.width, rows, True)]
    attention.append((cfg.text_depth, text, cfg.text_width, rows, True))
    return rules, attention, p + text


def _sizes(tree: dict) -> dict[str, int]:
    """Weights per module path: a kernel, or an adapter's A + B."""
    out: dict[str, int] = {}
    for key, leaf in flatten_dict(tree, sep="/").items():
        module, _, name = key.rpartition("/")
        if name in ("kernel", "lora_a", "lora_b"):
            out[module] = out.get(module, 0) + int(np.prod(leaf.shape))
    return out


def model_flops(
    exp: StreamExperiment, host_batch: dict, adapter: dict, frozen_summed: int
) -> float:
    """The analytic FLOPs of one step (see the module docstring)."""
    rules, attention, _ = matmul_rules(exp, host_batch)

    def tokens(path: str) -> tuple[int, bool]:
        for pattern, count, backward in rules:
            if re.search(pattern, path):
                return count, backward
        raise ValueError(f"no FLOPs rule for the matmul {path!r}")

    total = 0.0
    for path, n in _sizes(exp.base_params).items():
        count, backward = tokens(path)
        total += (4 if backward else 2) * n * count
    for path, n in _sizes(adapter).items():
        count, _ = tokens(path)
        total += (6 + 4 * frozen_summed) * n * count
    for layers, length, width, rows, backward in attention:
        total += (3 if backward else 1) * 4 * length * length * width * layers * rows
    return total


def peak_tflops(kind: str) -> tuple[float | None, str]:
    if _PEAK.value:
        return _PEAK.value, "--peak_tflops"
    for key, value in PEAK_TFLOPS:
        if key in kind:
            return value, f"bf16 dense, {key}"
    return None, f"unknown for {kind!r}"


def peak_memory(device: jax.Device, compiled: jax.stages.Compiled) -> tuple[int, str]:
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device memory_stats peak_bytes_in_use"
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return int(total - m.alias_size_in_bytes), "compiler estimate: args + outputs + temp - alias"


def main(argv: list[str]) -> None:
    del argv
    config = experiment_config(_CONFIG.value)
    if _DEVICES.value is not None:
        config = dataclasses.replace(config, num_devices=_DEVICES.value)
    if _MESH.value:
        sizes = [int(s) for s in _MESH.value.split(",")]
        if len(sizes) != 3:
            raise app.UsageError(f"--mesh {_MESH.value!r}: expected data,fsdp,tensor")
        config = dataclasses.replace(config, mesh=MeshConfig(*sizes))
    with tempfile.TemporaryDirectory() as tmp:
        exp = random_backbone_experiment(config, Path(_WORKDIR.value or tmp))
        method = get_method(_METHOD.value)
        stage = method.num_stages(exp.num_tasks) - 1
        task_indices = list(range(exp.num_tasks)) if method.joint else [stage]
        slots = {method.slot(s): exp.fresh_adapter(s) for s in range(stage)}
        adapter = exp.fresh_adapter(stage)
        state = exp.init_state(method, adapter, jax.random.PRNGKey(1))
        context = exp.rules.place(stage_context(exp, method, stage, slots, task_indices))
        host_batch = next(iter(exp.train_batches(task_indices, 1, seed=0)))
    batch = to_global_batch(exp.mesh, host_batch)
    start = time.perf_counter()
    step, state, context = exp.train_step.bind(state, context, batch)
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    abstract = jax.tree.map(spec, (state, context, batch))  # before the state is donated
    for _ in range(max(_WARMUP.value, 1)):
        state, _ = step(state, context, batch)
    jax.block_until_ready(state)
    first = time.perf_counter() - start
    times = []
    for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        state, _ = step(state, context, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    compiled = exp.train_step.lower(*abstract).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla = cost.get("flops") if cost else None
    rows = len(host_batch["image"]) * jax.process_count()
    per_seq = matmul_rules(exp, host_batch)[2]
    summed = 0 if exp.fold_frozen else len(set(method.train_slots(stage)) - {method.slot(stage)})
    flops = model_flops(exp, host_batch, adapter, summed)
    device = exp.mesh.devices.flat[0]
    peak, peak_source = peak_tflops(device.device_kind)
    memory, memory_source = peak_memory(device, compiled)
    pct = lambda q: round(float(np.percentile(times, q)), 6)
    print(
        json.dumps(
            {
                "platform": device.platform,
                "device_kind": device.device_kind,
                "devices": exp.mesh.size,
                "mesh": dict(exp.mesh.shape),
                "model_kind": exp.config.model_kind,
                "method": method.name,
                "stage": stage,
                "num_tasks": exp.num_tasks,
                "frozen_adapters_folded": exp.fold_frozen,
                "batch_size": rows,
                "grad_accum_steps": exp.config.train.grad_accum_steps,
                "tokens_per_sequence": per_seq,
                "timed_steps": len(times),
                "step_s": {"median": pct(50), "p10": pct(10), "p90": pct(90), "min": pct(0)},
                "warmup_s_incl_compile": round(first, 2),
                "sequences_per_s": round(rows / seconds, 1),
                "tokens_per_s": round(rows * per_seq / seconds, 1),
                "model_flops_per_step": flops,
                "xla_flops_per_device": xla,
                "xla_flops_per_step": xla * exp.mesh.size if xla is not None else None,
                "model_tflops_per_s": round(flops / seconds / 1e12, 6),
                "peak_tflops_per_device": peak,
                "peak_source": peak_source,
                "mfu": round(flops / seconds / (peak * 1e12 * exp.mesh.size), 4) if peak else None,
                "peak_memory_gib_per_device": round(memory / 2**30, 4),
                "peak_memory_source": memory_source,
                "lora_params_per_task": sum(_sizes(adapter).values()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    app.run(main)
