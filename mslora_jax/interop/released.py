"""Read the released MSLoRA-CR trainer's ``cl_lora.bin`` files into per-task adapter trees.

What the released code writes (``llava/train/trainer.py``, ``LLaVATrainer._save``): after the
stage of task ``k`` (``--max_task k``), ``torch.save`` of every parameter with
``requires_grad``, by its name in ``LlavaMistralForCausalLM.named_parameters()``, as
``<output_dir>/cl_lora.bin``, and the model config as ``<output_dir>/config.json`` with
``mslora_cfg = {"max_task", "lora_rank", "lora_alpha", "lora_dropout"[, "adding_layers"]}`` and
the loss weights ``alpha`` (CR) and ``beta`` (orthogonality), -1 meaning learned.

LoRA sits on every ``nn.Linear`` outside the vision tower, projector and ``lm_head``
(``get_all_linear_names(exclude_keywords=('vision', 'mm_projector', 'lm_head'))``): the decoder's
``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``. Each becomes an ``mslora.Linear``
holding ``cl_lora_pool.task_{i}_lora`` for ``i < max_task``, of which only task ``max_task - 1``
trains, so a stage's file holds that one task's factors::

    model.layers.{l}.self_attn.q_proj.cl_lora_pool.task_{i}_lora.lora_A   [r, in]
    model.layers.{l}.self_attn.q_proj.cl_lora_pool.task_{i}_lora.lora_B   [out, r]

(bf16 when trained with ``--bf16``), plus, in a stage run with ``--alpha -1`` (the first stage of
the released scripts), the 0-d learned loss weights ``alpha`` and ``beta``, which are not part of
the model and are not imported. The delta of task ``i`` is ``(lora_alpha / r) * B_i A_i``, the
layout of ``LoraAdapter`` (``lora_a [r, in]``, ``lora_b [out, r]``), so factors are copied, not
transposed; a scanned decoder stacks layer ``l``'s factors at index ``l``.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
code. PyTorch is imported here, lazily: ``pip install 'mslora_jax[released]'``.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mslora_jax.config import ExperimentConfig
from mslora_jax.errors import CheckpointError, ConfigError
from mslora_jax.interop.hf_llava import check_hf_config, hf_module_name
from mslora_jax.interop.hf_names import listing
from mslora_jax.io_utils import read_json
from mslora_jax.lora.adapter import unrolled_path
from mslora_jax.lora.targets import get_by_path, set_by_path
from mslora_jax.models.lora_dense import LORA_A, LORA_B

CONFIG_FILE = "config.json"  # beside each cl_lora.bin (``model.config.save_pretrained``)
_NAME = re.compile(
    r"^(?P<module>.+)\.cl_lora_pool\.task_(?P<task>\d+)_lora\.lora_(?P<factor>[AB])$"
)
_FACTORS = {"A": LORA_A, "B": LORA_B}
LOSS_WEIGHTS = ("alpha", "beta")  # the released learned loss weights (``--alpha -1``)
_REQUIRED_KEYS = ("max_task", "lora_rank", "lora_alpha")
# config.json keys that name the decoder's size, and the config values they must equal.
_ARCH_KEYS = {
    "num_hidden_layers": "depth",
    "hidden_size": "width",
    "intermediate_size": "mlp_dim",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
}


@dataclasses.dataclass(frozen=True)
class ReleasedFile:
    """One stage's ``cl_lora.bin``: its LoRA factors by (task, HF module, factor) and its
    ``config.json``."""

    path: Path
    factors: dict[tuple[int, str, str], np.ndarray]  # float32; factor is "lora_a" / "lora_b"
    hf_config: dict

    @property
    def mslora_cfg(self) -> dict:
        return self.hf_config["mslora_cfg"]

    @property
    def config_path(self) -> Path:
        return self.path.parent / CONFIG_FILE

    @property
    def tasks(self) -> list[int]:
        return sorted({task for task, _, _ in self.factors})


def load_torch_tensors(path: Path) -> dict[str, np.ndarray]:
    """``{name: float32 array}`` of a ``torch.save``d dict of tensors, read with
    ``torch.load(weights_only=True)``: anything but tensors and plain containers is refused
    before it could run."""
    try:
        import torch
    except ImportError as e:
        raise ConfigError(
            f"reading {path} needs PyTorch (CPU is enough): pip install 'mslora_jax[released]'"
        ) from e
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (the released trainer writes cl_lora.bin)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message explains how to load it anyway; keep only what it found.
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(\.\s|\.?$)", str(e), re.M)
        reason = found[1] if found else type(e).__name__
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True): it holds more than tensors, and "
            f"nothing in it was run ({reason})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch.save file ({e})") from None
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{path}: expected a dict of named tensors (the released trainer's cl_lora.bin), "
            f"got {type(obj).__name__}"
        )
    # bf16 has no numpy dtype: every factor goes through float32, our adapters' dtype.
    return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}


def read_released_config(bin_path: Path) -> dict:
    """The ``config.json`` beside ``bin_path``, checked to hold a usable ``mslora_cfg``."""
    path = bin_path.parent / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; the released trainer saves config.json beside cl_lora.bin, and its "
            "mslora_cfg gives the LoRA rank and alpha"
        )
    hf_config = read_json(path, "released config")
    cfg = hf_config.get("mslora_cfg") if isinstance(hf_config, dict) else None
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{path}: no mslora_cfg (expected the released trainer's "
            '{"max_task", "lora_rank", "lora_alpha", "lora_dropout"})'
        )
    missing = [k for k in _REQUIRED_KEYS if not isinstance(cfg.get(k), (int, float))]
    if missing:
        raise CheckpointError(f"{path}: mslora_cfg has no number for {', '.join(missing)}")
    return hf_config


def read_released_file(bin_path: str | Path) -> ReleasedFile:
    """Read one ``cl_lora.bin`` and its ``config.json``; every tensor name must be a LoRA
    factor (``...cl_lora_pool.task_{i}_lora.lora_{A,B}``) or a learned loss weight."""
    path = Path(bin_path).absolute()
    hf_config = read_released_config(path)
    factors, unknown = {}, []
    for name, value in load_torch_tensors(path).items():
        match = _NAME.match(name)
        if match:
            key = (int(match["task"]), match["module"], _FACTORS[match["factor"]])
            factors[key] = value
        elif not (name in LOSS_WEIGHTS and value.ndim == 0):
            unknown.append(name)
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} tensor(s) that are not released LoRA factors "
            "(<module>.cl_lora_pool.task_<i>_lora.lora_A/B): "
            f"{listing(sorted(unknown), limit=4)}"
        )
    if not factors:
        raise CheckpointError(f"{path}: holds no LoRA factors (cl_lora_pool.task_<i>_lora)")
    max_task = int(hf_config["mslora_cfg"]["max_task"])
    beyond = [t for t in sorted({t for t, _, _ in factors}) if t >= max_task]
    if beyond:
        raise CheckpointError(
            f"{path}: holds task_{beyond[0]}_lora but its config.json says mslora_cfg.max_task="
            f"{max_task} (tasks 0..{max_task - 1})"
        )
    return ReleasedFile(path, factors, hf_config)


def _differs(a: float, b: float) -> bool:
    return not math.isclose(float(a), float(b), rel_tol=1e-9)


def check_released_settings(
    files: Sequence[ReleasedFile], config: ExperimentConfig, *, use_cr: bool, use_ortho: bool
) -> None:
    """CheckpointError naming the file, its key and the config key for every setting of the
    released run that contradicts ``config``: LoRA rank, alpha, dropout, the decoder's size
    and settings, and (for a stage after the first of a method with CR / orthogonality) the
    loss weights it trained with."""
    lora, decoder = config.lora, config.llava.decoder
    for file in files:
        cfg, where = file.mslora_cfg, str(file.config_path)
        diffs = []
        if int(cfg["lora_rank"]) != lora.rank:
            diffs.append(f"mslora_cfg.lora_rank={cfg['lora_rank']} but lora.rank={lora.rank}")
        if _differs(cfg["lora_alpha"], lora.alpha):
            diffs.append(f"mslora_cfg.lora_alpha={cfg['lora_alpha']} but lora.alpha={lora.alpha}")
        if _differs(cfg.get("lora_dropout", 0.0), lora.dropout):
            diffs.append(
                f"mslora_cfg.lora_dropout={cfg.get('lora_dropout', 0.0)} but "
                f"lora.dropout={lora.dropout}"
            )
        for key, field in _ARCH_KEYS.items():
            if key in file.hf_config and file.hf_config[key] != getattr(decoder, field):
                diffs.append(
                    f"{key}={file.hf_config[key]} but llava.decoder.{field}="
                    f"{getattr(decoder, field)}"
                )
        if any(task > 0 for task in file.tasks):  # the first stage has no earlier task: no CR
            diffs += _loss_weight_diffs(file.hf_config, config, use_cr, use_ortho)
        if diffs:
            raise CheckpointError(f"{where}: {'; '.join(diffs)}")
        check_hf_config(file.hf_config, config.llava.model_config(), where)


def _loss_weight_diffs(hf_config: dict, config: ExperimentConfig, use_cr: bool, use_ortho: bool):
    """The released ``alpha`` / ``beta`` (fixed, or -1: learned as exp(w)) against the config's
    ``regularizer`` (only the weights the method uses; keys the file lacks are not checked)."""
    reg, diffs = config.regularizer, []
    for key, ours, used in (("alpha", "alpha_cr", use_cr), ("beta", "beta_ortho", use_ortho)):
        value = hf_config.get(key)
        if not used or not isinstance(value, (int, float)):
            continue
        if value == -1 and not reg.learn_weights:
            diffs.append(f"{key}=-1 (learned) but regularizer.learn_weights=False")
        elif value != -1 and reg.learn_weights:
            diffs.append(f"{key}={value} (fixed) but regularizer.learn_weights=True")
        elif value != -1 and _differs(value, getattr(reg, ours)):
            diffs.append(f"{key}={value} but regularizer.{ours}={getattr(reg, ours)}")
    return diffs


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one released module's factors go: our module path, its layer in a scanned stack
    of ``depth`` layers (None: unrolled), and the factor shapes it needs."""

    path: str
    layer: int | None
    depth: int
    shapes: dict[str, tuple[int, int]]


def released_modules(abstract: Mapping, targets: Sequence[str], rank: int) -> dict[str, _Slot]:
    """``{HF module name: _Slot}`` for every adapted matrix of the LLaVA tree ``abstract`` (only
    shapes are read), named through ``hf_llava``'s module table."""
    out = {}
    for path in targets:
        kernel = get_by_path(abstract, path)["kernel"]
        *lead, fan_in, fan_out = kernel.shape
        shapes = {LORA_A: (rank, fan_in), LORA_B: (fan_out, rank)}
        for layer in range(lead[0]) if lead else [None]:
            module = unrolled_path(path, layer) if layer is not None else path
            name = hf_module_name(module)  # CheckpointError naming a module with none
            out[name] = _Slot(path, layer, lead[0] if lead else 0, shapes)
    return out


def released_adapters(
    files: Sequence[ReleasedFile], abstract: Mapping, targets: Sequence[str], rank: int
) -> list[dict]:
    """The adapter tree (``LoraAdapter.params``, float32 numpy) of each released task, in task
    order ``0..K-1``; refuses a task given twice or missing, a module the config does not adapt
    (or the reverse), and a factor of the wrong shape."""
    modules = released_modules(abstract, targets, rank)
    by_task: dict[int, dict[tuple[str, str], np.ndarray]] = {}
    source: dict[int, Path] = {}
    for file in files:
        for task in file.tasks:
            if task in source:
                raise CheckpointError(
                    f"task_{task}_lora is in both {source[task]} and {file.path}; give each "
                    "stage's cl_lora.bin once"
                )
            source[task] = file.path
        for (task, module, factor), value in file.factors.items():
            by_task.setdefault(task, {})[module, factor] = value
    tasks = sorted(by_task)
    if tasks != list(range(len(tasks))):
        missing = sorted(set(range(tasks[-1] + 1)) - set(tasks))
        raise CheckpointError(
            f"no file holds task_{missing[0]}_lora (given: tasks {tasks}); the released trainer "
            "writes task k's factors to the cl_lora.bin of stage k + 1: give every stage's file"
        )
    return [_task_tree(by_task[t], modules, t, source[t]) for t in tasks]


def _task_tree(
    factors: Mapping[tuple[str, str], np.ndarray],
    modules: Mapping[str, _Slot],
    task: int,
    path: Path,
) -> dict:
    where = f"{path}: task_{task}_lora"
    given = {module for module, _ in factors}
    unknown = sorted(given - set(modules))
    if unknown:
        raise CheckpointError(
            f"{where}: module(s) the config does not adapt: {listing(unknown, limit=4)} "
            "(lora.targets and llava.decoder.depth must cover what the released run adapted)"
        )
    missing = sorted(set(modules) - given)
    if missing:
        raise CheckpointError(
            f"{where}: no factors for {listing(missing, limit=4)}, which the config adapts "
            "(lora.targets; a released run with mslora_cfg.adding_layers adapts only those layers)"
        )
    flat: dict[str, np.ndarray] = {}
    for name, slot in modules.items():
        for factor, shape in slot.shapes.items():
            if (name, factor) not in factors:
                raise CheckpointError(f"{where}: {name} has no lora_{factor[-1].upper()}")
            value = factors[name, factor]
            if value.shape != shape:
                raise CheckpointError(
                    f"{where}: {name}.lora_{factor[-1].upper()} has shape {list(value.shape)}, "
                    f"expected {list(shape)} (rank, in / out, rank: lora.rank and the model's "
                    "sizes)"
                )
            key = f"{slot.path}/{factor}"
            if slot.layer is None:
                flat[key] = value
            else:  # a scanned stack [layers, ...], filled layer by layer
                stack = flat.setdefault(key, np.zeros((slot.depth, *shape), np.float32))
                stack[slot.layer] = value
    tree: dict = {}
    for key, value in flat.items():
        tree = set_by_path(tree, key, np.ascontiguousarray(value, np.float32))
    return tree
