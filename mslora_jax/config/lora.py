"""LoRA settings (``config.lora``: rank, targets, how frozen adapters fold) and the regularizers'
weights (``config.regularizer``: MSLoRA-CR's and the baselines').

Split from ``experiment.py`` so each group of settings reads on its own; ``ExperimentConfig``
holds one of each.
"""

from __future__ import annotations

import dataclasses

from mslora_jax.errors import ConfigError
from mslora_jax.losses.regularizers import CR_DISTANCES

# lora.fold_frozen. "auto" stacks bf16 kernels: rounding W + delta to bf16 moves every entry by
# up to half its bf16 spacing (2^-9 of |W|), the order of a small trained delta's entries, and the
# merged copy of the adapted kernels would cost a second backbone's memory where it is tightest.
FOLD_MODES = ("auto", "merge", "stack")
GRANULARITIES = ("task", "modality")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 8.0
    # Regexes over module paths (re.search), e.g. "attn/(q|v)$" or "^image/"; see lora.targets.
    targets: tuple[str, ...] = (r"attn/(q|k|v|out)$", r"mlp/(fc1|fc2)$")
    dropout: float = 0.0
    # How a stage's frozen adapters enter the training forward: "merge" (their weighted deltas
    # folded into the frozen kernels once per stage: the step costs one adapter whatever the
    # number of tasks), "stack" (the [T, ...] stack summed in every layer, exact in any dtype)
    # or "auto": merge float32 kernels, stack lower-precision ones (see ``FOLD_MODES``).
    fold_frozen: str = "auto"
    # "task": one adapter per task (the paper). "modality": one per modality; a later task of a
    # seen modality continues that adapter (fresh optimizer state), the others stay frozen.
    granularity: str = "task"

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"lora.granularity={self.granularity!r} is unknown; expected one of {GRANULARITIES}"
            )
        if self.fold_frozen not in FOLD_MODES:
            raise ConfigError(
                f"lora.fold_frozen={self.fold_frozen!r} is unknown; expected one of {FOLD_MODES}"
            )


@dataclasses.dataclass(frozen=True)
class RegularizerConfig:
    alpha_cr: float = 0.1
    beta_ortho: float = 0.01
    # Learn each weight as exp(w), w initialised at init_log_weight (as released with the paper).
    learn_weights: bool = False
    init_log_weight: float = -4.6
    # The CR distance between adapters (mslora_jax.losses.regularizers): "released" (each A and
    # B matrix's Frobenius distance, as released), "normalized" (each divided by sqrt(numel)) or
    # "delta_w" (per layer, ||s B_c A_c - s B_t A_t||_F with s = alpha / rank).
    cr_distance: str = "released"
    # The baselines' weights (mslora_jax.losses.continual; docs/method.md, "Methods and baselines").
    # O-LoRA: lambda_1 of sum |A_c A_i^T| (0.5, O-LoRA's released lamda_1).
    olora_lambda: float = 0.5
    # EWC: lambda of (lambda / 2) sum F (theta - theta*)^2; F from this many batches per task.
    ewc_lambda: float = 100.0
    ewc_fisher_batches: int = 8
    # LwF: lambda_o of the KL to the previous model's class logits at temperature T (LwF's 1, 2).
    lwf_lambda: float = 1.0
    lwf_temperature: float = 2.0
    # Mod-X: alpha of the in-batch similarity distillation (20, as Mod-X's released scripts).
    modx_lambda: float = 20.0

    def __post_init__(self):
        if self.cr_distance not in CR_DISTANCES:
            raise ConfigError(
                f"regularizer.cr_distance={self.cr_distance!r} is unknown; expected one of "
                f"{CR_DISTANCES}"
            )
        for key in ("olora_lambda", "ewc_lambda", "lwf_lambda", "modx_lambda"):
            if getattr(self, key) < 0:
                raise ConfigError(f"regularizer.{key} must be >= 0, got {getattr(self, key)}")
        if self.ewc_fisher_batches < 1:
            raise ConfigError(
                f"regularizer.ewc_fisher_batches must be >= 1, got {self.ewc_fisher_batches}"
            )
        if self.lwf_temperature <= 0:
            raise ConfigError(
                f"regularizer.lwf_temperature must be > 0, got {self.lwf_temperature}"
            )
