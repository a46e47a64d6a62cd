"""Benchmark: one MSLoRA-CR adapter train step, PyTorch eager vs mslora_jax, at T tasks.

Prints figures (JSON lines, then a markdown table); asserts nothing about speed.

    python experiments/bench_vs_torch.py [--tasks 1 --tasks 16] [--steps 30] [--threads 1]

Measured: steps/s of the last stage of ``mslora_cr_ortho`` on T synthetic tasks of alternating
modality (CR pulls and pushes): T - 1 frozen adapters, stage T - 1 trained, CR + orthogonality
on; batch 64 of 32x32 images, both towers width 64, depth 2, MLP 256, 8 text tokens; LoRA rank 4
on q/k/v/out/fc1/fc2; random backbone; one fixed batch every step, timed after warm-up, best of
``--rounds`` alternated rounds. PyTorch is written as the released MSLoRA-CR code is: each adapted
``nn.Linear`` holds a list of per-task (A, B) and loops over the active tasks in forward, the
regularizers gather the LoRA tensors from ``named_parameters()`` every step, AdamW trains the
current task's LoRA only. mslora_jax runs its compiled ``exp.train_step`` (frozen adapters
folded into the kernels when ``lora.fold_frozen`` resolves to merge). Before timing, the JAX
backbone and adapters are copied into torch and both sides' loss parts and gradients must agree
(else the script exits non-zero). Needs torch: ``pip install -e .[bench]``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import optax
import torch
import torch.nn.functional as F
from absl import app, flags
from torch import nn

from mslora_jax.config import ExperimentConfig, experiment_config, synthetic_task
from mslora_jax.families.dual_encoder.experiment import Experiment
from mslora_jax.families.dual_encoder.setup import random_experiment
from mslora_jax.models.clip import ModelConfig
from mslora_jax.parallel.mesh import make_mesh, to_global_batch
from mslora_jax.train.methods import get_method
from mslora_jax.train.stream import stage_context

_TASKS = flags.DEFINE_multi_integer("tasks", [1, 4, 8, 16], "Numbers of tasks T (repeatable).")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed train steps per side, T and round.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps before each timing (after compiling).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timing rounds, torch and JAX alternated; best kept.")
_THREADS = flags.DEFINE_integer("threads", 0, "Pin both sides to this many cores; 0: all usable.")
_FOLD = flags.DEFINE_string("fold_frozen", "", "lora.fold_frozen for JAX; empty: the default.")
_TOL = flags.DEFINE_float("tol", 1e-4, "Relative tolerance of the torch-vs-JAX check.")

IMAGE_TOWER = dict(image_size=32, patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=256)
TEXT_TOWER = dict(max_text_len=8, text_width=64, text_depth=2, text_num_heads=4, text_mlp_dim=256)
MODEL = {**IMAGE_TOWER, **TEXT_TOWER, "vocab_size": 1024, "embed_dim": 64}
MODALITIES = ("pathology", "radiology")
METHOD = "mslora_cr_ortho"
ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}
_LORA = {"lora_a": "lora_A", "lora_b": "lora_B"}  # adapter leaf -> torch ParameterList
# Flax parameter paths -> torch parameter names (then "/" -> ".").
_RENAMES = {"/encoder/block_": ".blocks.", "/encoder/": ".", "patch_embed": "patch"}
_RENAMES |= {"/kernel": "/weight", "/scale": "/weight", "/embedding": "/weight"}


def bench_config(num_tasks: int, num_steps: int, fold_frozen: str = "") -> ExperimentConfig:
    """T synthetic tasks of alternating modality with the benchmark's model shapes."""
    stream = [
        synthetic_task(f"task_{i}", MODALITIES[i % 2], seed=100 + i, num_train=128, num_test=16)
        for i in range(num_tasks)
    ]
    config = dict(methods=(METHOD,), modalities=MODALITIES, stream=stream, model=MODEL)
    lora = dict(rank=4, alpha=8.0, **({"fold_frozen": fold_frozen} if fold_frozen else {}))
    config.update(lora=lora, backbone=dict(source="random"), progress=False)
    return experiment_config({**config, "train": dict(batch_size=64, steps_per_task=num_steps)})


# --- PyTorch eager, the released code's way ------------------------------------------------


class LoraLinear(nn.Linear):
    """``nn.Linear`` plus a pool of per-task (A [r, in], B [out, r]); forward loops over it."""

    def __init__(self, d_in: int, d_out: int, num_tasks: int, rank: int, scaling: float):
        super().__init__(d_in, d_out)
        self.lora_A = nn.ParameterList([torch.zeros(rank, d_in) for _ in range(num_tasks)])
        self.lora_B = nn.ParameterList([torch.zeros(d_out, rank) for _ in range(num_tasks)])
        self.scaling, self.active_tasks = scaling, num_tasks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        for t in range(self.active_tasks):
            y = y + self.scaling * (x @ self.lora_A[t].T) @ self.lora_B[t].T
        return y


class Block(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)) (as ``models.transformer.Block``)."""

    def __init__(self, width: int, heads: int, mlp: int, cfg: ModelConfig, lora: dict):
        super().__init__()
        self.heads, self.act = heads, ACTIVATIONS[cfg.mlp_activation]
        self.ln_attn = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.ln_mlp = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.attn = nn.ModuleDict({n: LoraLinear(width, width, **lora) for n in ("q", "k", "v")})
        self.attn["out"] = LoraLinear(width, width, **lora)
        self.mlp = nn.ModuleDict({"fc1": LoraLinear(width, mlp, **lora)})
        self.mlp["fc2"] = LoraLinear(mlp, width, **lora)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.ln_attn(x)
        q, k, v = (self.attn[m](h).view(b, n, self.heads, -1).transpose(1, 2) for m in "qkv")
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # [B, H, L, L]
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], torch.finfo(logits.dtype).min)
        x = x + self.attn["out"]((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp["fc2"](self.act(self.mlp["fc1"](self.ln_mlp(x))))


class Tower(nn.Module):
    """The ViT (patches, [CLS], positions) or the text transformer (tokens, positions, padding
    mask), then blocks, final LN, [CLS] pooled, projected and L2-normalised."""

    def __init__(self, c: ModelConfig, image: bool, lora: dict):
        super().__init__()
        sizes = (c.width, c.depth, c.num_heads, c.mlp_dim)
        if not image:
            sizes = (c.text_width, c.text_depth, c.text_num_heads, c.text_mlp_dim)
        width, depth, heads, mlp = sizes
        if image:
            self.patch = nn.Conv2d(3, width, c.patch_size, c.patch_size, bias=c.patch_bias)
            self.cls = nn.Parameter(torch.zeros(1, 1, width))
            self.ln_pre = nn.LayerNorm(width, eps=c.layer_norm_eps) if c.pre_norm else None
        else:
            self.token_embed = nn.Embedding(c.vocab_size, width)
        length = 1 + (c.image_size // c.patch_size) ** 2 if image else c.max_text_len
        self.image, self.pos_embed = image, nn.Parameter(torch.zeros(length, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp, c, lora) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width, eps=c.layer_norm_eps)
        self.proj = nn.Linear(width, c.embed_dim, bias=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.image:  # float [B, 3, H, W]
            x = self.patch(inputs).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos_embed
            x = self.ln_pre(x) if self.ln_pre is not None else x
        else:  # token ids [B, L], 0 = padding
            x, mask = self.token_embed(inputs) + self.pos_embed, inputs != 0
        for block in self.blocks:
            x = block(x, mask)
        return F.normalize(self.proj(self.ln_final(x)[:, 0]), dim=-1, eps=1e-6)


class TorchDualEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, num_tasks: int, rank: int, scaling: float):
        super().__init__()
        lora = dict(num_tasks=num_tasks, rank=rank, scaling=scaling)
        self.image, self.text = Tower(cfg, True, lora), Tower(cfg, False, lora)
        self.logit_scale = nn.Parameter(torch.tensor(0.0))


def clip_loss(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE, targets uniform over same-prompt columns (as ``losses.clip_loss``)."""
    scale = logit_scale.clamp(max=math.log(100.0)).exp()
    pos = (ids[:, None] == ids[None, :]).float()
    targets = pos / pos.sum(1, keepdim=True)
    i2t = -(targets * (scale * img @ txt.T).log_softmax(1)).sum(1).mean()
    t2i = -(targets * (scale * txt @ img.T).log_softmax(1)).sum(1).mean()
    return 0.5 * (i2t + t2i)


def gather_lora(model: nn.Module) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per task: the (A, B) pair of every adapted layer, read from ``named_parameters()``."""
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if ".lora_" in name:  # <layer>.lora_A.<task>
            layer, kind, task = name.rsplit(".", 2)
            found.setdefault((int(task), layer), {})[kind] = p
    pairs: dict[int, list] = {}
    for (task, _), ab in sorted(found.items()):
        pairs.setdefault(task, []).append((ab["lora_A"], ab["lora_B"]))
    return pairs


def torch_loss(model, batch, tokens, cur: int, same: list[bool], cfg: ExperimentConfig) -> dict:
    """task + alpha_cr * CR + beta_ortho * ortho (``losses.regularizers``), every step."""
    img = model.image(batch["image"].float() / 127.5 - 1.0)
    task = clip_loss(img, model.text(tokens[batch["label"]]), batch["label"], model.logit_scale)
    pairs = gather_lora(model)
    current = [p for ab in pairs[cur] for p in ab]
    cr = torch.zeros(())
    for t in range(cur):  # s_t = mean over tensors of exp(-||P - P_t||_F)
        earlier = [p.detach() for ab in pairs[t] for p in ab]
        s = torch.stack([(-torch.linalg.norm(p - q)).exp() for p, q in zip(current, earlier)])
        cr = cr + (1.0 - s.mean() if same[t] else s.mean())
    ortho = []  # over the (A, B) pairs of every trained slot: ||AA^T - I||^2 + ||B^TB - I||^2
    for t in range(cur + 1):
        for a, b in pairs[t]:
            eye = torch.eye(a.shape[0])
            ortho.append(((a @ a.T - eye) ** 2).sum() + ((b.T @ b - eye) ** 2).sum())
    ortho = torch.stack(ortho).mean()
    total = task + cfg.regularizer.alpha_cr * cr + cfg.regularizer.beta_ortho * ortho
    return {"loss": total, "task_loss": task, "cr": cr, "ortho": ortho}


def torch_name(path: str) -> str:
    """A flax parameter path (``image/encoder/block_0/attn/q``) -> the torch name."""
    for old, new in _RENAMES.items():
        path = path.replace(old, new)
    return path.replace("/", ".")


def flat(tree: dict) -> dict[str, np.ndarray]:
    """``{"a/b/c": leaf}`` of a nested dict of arrays, as numpy."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): np.array(x) for path, x in leaves}


def lora_name(path: str, task: int) -> str:
    """An adapter leaf (``.../attn/q/lora_a``) of ``task`` -> its torch parameter name."""
    layer, kind = path.rsplit("/", 1)
    return f"{torch_name(layer)}.{_LORA[kind]}.{task}"


def load_into_torch(model: TorchDualEncoder, params: dict, adapters: list[dict]) -> None:
    """Copy mslora_jax's backbone (flax layout) and the adapters of tasks 0..T-1 into torch."""
    state = {}
    for path, x in flat(params).items():
        if path.endswith("kernel"):  # dense [in, out] -> [out, in]; conv HWIO -> OIHW
            x = x.T if x.ndim == 2 else x.transpose(3, 2, 0, 1)
        state[torch_name(path)] = torch.from_numpy(np.ascontiguousarray(x))
    for t, adapter in enumerate(adapters):
        state.update({lora_name(k, t): torch.from_numpy(x) for k, x in flat(adapter).items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"torch model: missing {missing}, unexpected {unexpected}")


# --- the benchmark -------------------------------------------------------------------------


def random_adapter(exp: Experiment, task: int) -> dict:
    """``task``'s fresh adapter plus noise on A and B, so that every slot changes the loss."""
    leaves, treedef = jax.tree.flatten(exp.fresh_adapter(task))
    keys = jax.random.split(jax.random.PRNGKey(1000 + task), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return treedef.unflatten(noisy)


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """``train.optim.Schedule`` (linear warmup from 0, then cosine to 0) over its peak."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return step / max(warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def timed(fn: Callable[[], object], warmup: int, steps: int) -> float:
    """Seconds of ``steps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - start


def bench(num_tasks: int, steps: int, warmup: int, rounds: int, tol: float, fold: str) -> dict:
    """Check, then time, the last stage of a ``num_tasks``-task stream on both sides."""
    total_steps = 1 + rounds * (warmup + steps)
    config = bench_config(num_tasks, total_steps, fold)
    method, stage = get_method(METHOD), num_tasks - 1
    mesh = make_mesh(config.num_devices)
    exp = random_experiment(config, None, mesh)
    adapters = [random_adapter(exp, t) for t in range(num_tasks)]
    context = stage_context(exp, method, stage, dict(enumerate(adapters[:stage])), [stage])
    state = exp.init_state(method, adapters[stage], jax.random.PRNGKey(1))
    host_batch = next(iter(exp.train_batches([stage], 1, seed=0)))
    batch = to_global_batch(mesh, host_batch)  # device-resident, fed every step

    model = TorchDualEncoder(config.model, num_tasks, config.lora.rank, exp.scaling)
    load_into_torch(model, exp.base_params, adapters)  # the backbone without merged deltas
    for name, p in model.named_parameters():  # only the current task's A and B train
        p.requires_grad_(".lora_" in name and name.rsplit(".", 1)[1] == str(stage))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    train = config.train
    opt = torch.optim.AdamW(
        trainable.values(), train.learning_rate, weight_decay=train.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, train.warmup_ratio)
    )
    images = torch.from_numpy(host_batch["image"]).permute(0, 3, 1, 2).contiguous()  # NCHW
    tb = {"image": images, "label": torch.from_numpy(host_batch["label"]).long()}
    tokens = torch.from_numpy(exp.table.tokens).long()
    same = [t.modality == exp.tasks[stage].modality for t in exp.tasks]

    def torch_grads() -> dict:
        opt.zero_grad(set_to_none=True)
        parts = torch_loss(model, tb, tokens, stage, same, config)
        parts["loss"].backward()
        if train.grad_clip_norm > 0:
            nn.utils.clip_grad_norm_(trainable.values(), train.grad_clip_norm)
        return parts

    def torch_step() -> None:
        torch_grads()
        opt.step()
        sched.step()

    # The check, at the same parameters: loss parts, and the (clipped) gradient, which JAX's
    # step leaves in Adam's first moment after its first update: mu = (1 - b1) g, b1 = 0.9.
    torch_parts = {k: float(v.detach()) for k, v in torch_grads().items()}
    step, state, context = exp.train_step.bind(state, exp.rules.place(context), batch)
    state, metrics = step(state, context, batch)
    jax_parts = {k: float(metrics[k]) for k in torch_parts}
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
    adam = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s))
    grads = {lora_name(k, stage): g / 0.1 for k, g in flat(adam.mu["lora"]).items()}
    err = sum(float(np.sum((trainable[n].grad.numpy() - g) ** 2)) for n, g in grads.items())
    check = {k: rel_diff(torch_parts[k], jax_parts[k]) for k in torch_parts}
    check["grad"] = math.sqrt(err / sum(float(np.sum(g**2)) for g in grads.values()))
    line = {"tasks": num_tasks, "torch": torch_parts, "jax": jax_parts, "rel_diff": check}
    print(json.dumps(line), flush=True)
    if max(check.values()) > tol:
        sys.exit(f"T={num_tasks}: torch and mslora_jax disagree beyond {tol}: {check}")
    opt.step()  # both sides have now taken their first step
    sched.step()

    def jax_step() -> None:
        nonlocal state
        state, _ = step(state, context, batch)

    def jax_seconds() -> float:  # dispatch is asynchronous: wait before and after the loop
        jax.block_until_ready(state)
        return timed(jax_step, warmup, steps) + timed(lambda: jax.block_until_ready(state), 0, 1)

    seconds: dict[str, list[float]] = {"torch": [], "jax": []}
    for _ in range(rounds):  # alternated, so that a burst of machine load hits both sides
        seconds["torch"].append(timed(torch_step, warmup, steps))
        seconds["jax"].append(jax_seconds())
    row = {f"{k}_steps_per_s": round(steps / min(v), 2) for k, v in seconds.items()}
    ratio = round(min(seconds["torch"]) / min(seconds["jax"]), 2)
    row.update(ratio=ratio, jax_fold_frozen=getattr(exp, "fold_frozen", None))
    return {"tasks": num_tasks, **row}


def main(argv):
    del argv
    if _THREADS.value:  # before JAX starts its CPU client, which sizes its pool by affinity
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: _THREADS.value])
    threads = len(os.sched_getaffinity(0))  # XLA's CPU thread pool: one thread per usable core
    torch.set_num_threads(threads)
    setup = dict(steps=_STEPS.value, warmup=_WARMUP.value, rounds=_ROUNDS.value)
    setup.update(jax=jax.__version__, jax_platform=jax.devices()[0].platform)
    setup.update(jax_cpu_threads=threads, torch=torch.__version__)
    print(json.dumps({**setup, "torch_threads": torch.get_num_threads()}), flush=True)
    rows = []
    for num_tasks in _TASKS.value:
        rows.append(bench(num_tasks, *(f.value for f in (_STEPS, _WARMUP, _ROUNDS, _TOL, _FOLD))))
        print(json.dumps(rows[-1]), flush=True)
    lo, hi = min(rows, key=lambda r: r["tasks"]), max(rows, key=lambda r: r["tasks"])
    growth = {}
    for side in ("jax", "torch"):  # step time at the most tasks over that at the fewest
        key = f"{side}_step_time_T{hi['tasks']}_over_T{lo['tasks']}"
        growth[key] = round(lo[f"{side}_steps_per_s"] / hi[f"{side}_steps_per_s"], 2)
    print(json.dumps(growth))
    columns = ("tasks", "torch_steps_per_s", "jax_steps_per_s", "ratio")
    print("\n| T | torch steps/s | mslora_jax steps/s | jax / torch |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in columns) + " |")


if __name__ == "__main__":
    app.run(main)
