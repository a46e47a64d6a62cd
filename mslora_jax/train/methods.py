"""The continual-learning methods, each a small declarative spec read by the one trainer.

Adapters live in slots of a stack (one slot per task, or slot 0 only when a single adapter is
shared). A method says which slot a stage trains, which slots the forward sums during training
and evaluation, and which regularizers apply.
"""

from __future__ import annotations

import dataclasses

from mslora_jax.config import METHODS
from mslora_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    per_task_adapters: bool  # each task trains its own slot; otherwise slot 0 is shared
    cumulative: bool  # the forward sums the adapters of tasks 1..k (MSLoRA)
    use_cr: bool = False
    use_ortho: bool = False
    joint: bool = False  # one stage on the union of all tasks

    def num_stages(self, num_tasks: int) -> int:
        return 1 if self.joint else num_tasks

    def slot(self, stage: int) -> int:
        return stage if self.per_task_adapters else 0

    def continues_previous(self) -> bool:
        """The shared adapter carries over between stages (sequential fine-tuning)."""
        return not self.per_task_adapters

    def train_slots(self, stage: int) -> list[int]:
        return list(range(stage + 1)) if self.cumulative else [self.slot(stage)]

    def eval_slots(self, task: int) -> list[int]:
        """Slots active when evaluating ``task`` (the paper's protocol: tasks <= task)."""
        if not self.per_task_adapters:
            return [0]
        return list(range(task + 1)) if self.cumulative else [task]

    def unified_slots(self, num_tasks: int) -> list[int]:
        """Every learned adapter active at once."""
        return list(range(num_tasks)) if self.per_task_adapters else [0]

    def cr_slots(self, stage: int) -> list[int]:
        return list(range(stage)) if self.use_cr else []

    def ortho_slots(self, stage: int) -> list[int]:
        return self.train_slots(stage) if self.use_ortho else []


_METHODS = {
    "each": Method("each", per_task_adapters=True, cumulative=False),
    "seq": Method("seq", per_task_adapters=False, cumulative=False),
    "mslora": Method("mslora", per_task_adapters=True, cumulative=True),
    "mslora_cr": Method("mslora_cr", per_task_adapters=True, cumulative=True, use_cr=True),
    "mslora_cr_ortho": Method(
        "mslora_cr_ortho", per_task_adapters=True, cumulative=True, use_cr=True, use_ortho=True
    ),
    "joint": Method("joint", per_task_adapters=False, cumulative=False, joint=True),
}
assert tuple(_METHODS) == METHODS


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; expected one of {METHODS}")
    return _METHODS[name]
