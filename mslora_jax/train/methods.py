"""The continual-learning methods, each a small declarative spec read by the one trainer.

Adapters live in slots of a stack (one slot per task or, with ``lora.granularity = "modality"``,
per modality; slot 0 only when a single adapter is shared). A method says which slot a stage
trains, which slots the forward sums during training and evaluation, and which regularizers
apply. A baseline adds one loss term (``term``, ``mslora_jax.losses.continual``) to the method
it builds on: ``olora`` to ``mslora``, ``ewc``/``lwf``/``modx`` to ``seq``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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
    # Which slot each task's adapter lives in (``lora.granularity``): None, one slot per task;
    # with one slot per modality, the tasks of a modality share (and keep training) one slot.
    task_slots: tuple[int, ...] | None = None
    # A baseline's extra loss term: "olora" (earlier slots' A factors), "ewc" (Fisher-weighted
    # distance to the stage's starting adapter), "lwf" / "modx" (distillation of the model as
    # the stage began); None for the paper's methods.
    term: str | None = None

    def with_slots(self, task_slots: tuple[int, ...] | None) -> Method:
        """This method with the task -> slot layout ``task_slots`` (None: a slot per task)."""
        return dataclasses.replace(self, task_slots=task_slots)

    def num_stages(self, num_tasks: int) -> int:
        return 1 if self.joint else num_tasks

    def _task_slot(self, task: int) -> int:
        return task if self.task_slots is None else self.task_slots[task]

    def slot(self, stage: int) -> int:
        return self._task_slot(stage) if self.per_task_adapters else 0

    def _slots_up_to(self, task: int) -> list[int]:
        """Slots of tasks 0..task (with a slot per task: 0..task)."""
        return sorted({self._task_slot(t) for t in range(task + 1)})

    def continues_previous(self) -> bool:
        """A stage whose slot was trained before continues it (sequential fine-tuning, or a
        later task of a modality under ``lora.granularity = "modality"``)."""
        return not self.per_task_adapters or self.task_slots is not None

    def train_slots(self, stage: int) -> list[int]:
        return self._slots_up_to(stage) if self.cumulative else [self.slot(stage)]

    def eval_slots(self, task: int) -> list[int]:
        """Slots active when evaluating ``task`` (the paper's protocol: tasks <= task)."""
        if not self.per_task_adapters:
            return [0]
        return self._slots_up_to(task) if self.cumulative else [self._task_slot(task)]

    def unified_slots(self, num_tasks: int) -> list[int]:
        """Every learned adapter active at once."""
        return self._slots_up_to(num_tasks - 1) if self.per_task_adapters else [0]

    def slots_before(self, stage: int) -> list[int]:
        """The per-task slots trained before ``stage`` (with a slot per modality, possibly
        including the stage's own)."""
        return self._slots_up_to(stage - 1) if stage > 0 else []

    def cr_slots(self, stage: int) -> list[int]:
        """Slots trained before ``stage``: with a slot per modality this includes the stage's
        own slot as it was when the stage began (CR pulls the adapter toward that value)."""
        return self.slots_before(stage) if self.use_cr else []

    def olora_slots(self, stage: int) -> list[int]:
        """O-LoRA's earlier slots: those trained before ``stage``, other than its own."""
        if self.term != "olora":
            return []
        return [s for s in self.slots_before(stage) if s != self.slot(stage)]

    def ortho_slots(self, stage: int) -> list[int]:
        return self.train_slots(stage) if self.use_ortho else []

    def changes_eval_of(self, stage: int, task: int) -> bool:
        """Whether training ``stage`` changes the adapters ``task`` is evaluated with."""
        return self.slot(stage) in self.eval_slots(task)


_METHODS = {
    "each": Method("each", per_task_adapters=True, cumulative=False),
    "seq": Method("seq", per_task_adapters=False, cumulative=False),
    "mslora": Method("mslora", per_task_adapters=True, cumulative=True),
    "mslora_cr": Method("mslora_cr", per_task_adapters=True, cumulative=True, use_cr=True),
    "mslora_cr_ortho": Method(
        "mslora_cr_ortho", per_task_adapters=True, cumulative=True, use_cr=True, use_ortho=True
    ),
    "joint": Method("joint", per_task_adapters=False, cumulative=False, joint=True),
    "olora": Method("olora", per_task_adapters=True, cumulative=True, term="olora"),
    "ewc": Method("ewc", per_task_adapters=False, cumulative=False, term="ewc"),
    "lwf": Method("lwf", per_task_adapters=False, cumulative=False, term="lwf"),
    "modx": Method("modx", per_task_adapters=False, cumulative=False, term="modx"),
}
assert tuple(_METHODS) == METHODS


def task_slots(granularity: str, modalities: Sequence[str]) -> tuple[int, ...] | None:
    """Each task's adapter slot under ``lora.granularity`` for a stream of these modalities: None
    for one slot per task; for one per modality, the modality's rank in order of first
    appearance in the stream."""
    if granularity == "task":
        return None
    order = list(dict.fromkeys(modalities))
    return tuple(order.index(modality) for modality in modalities)


def get_method(name: str, task_slots: tuple[int, ...] | None = None) -> Method:
    """The method ``name``, with the task -> slot layout ``task_slots`` (see ``Method``)."""
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; expected one of {METHODS}")
    return _METHODS[name].with_slots(task_slots)
