"""``jax.jit`` with explicit input/output shardings derived from the sharding rules.

A train step ``step(state, context, batch) -> (state, metrics)`` is compiled with:

- ``state`` and ``context`` leaves sharded by path (``ShardingRules.shardings``: frozen weights
  and their optimizer moments FSDP/tensor-sharded, each LoRA factor like its base weight, scalars
  and masks replicated), the new state given the same shardings as the old one, and the old
  state donated (its buffers are reused for the new one);
- every batch leaf sharded over ``(data, fsdp)``, metrics replicated.

The shardings depend only on the arguments' structure and shapes, so one jitted function is kept
per structure: every stage and method with the same trainable tree shares one compiled program.
Tracing runs under the mesh and the logical-axis rules, so the models' activation constraints
(``flax.linen.with_logical_constraint``) take effect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import flax.linen as nn
import jax

from mslora_jax.parallel.mesh import batch_sharding, replicated
from mslora_jax.parallel.rules import ShardingRules


@contextlib.contextmanager
def sharding_context(rules: ShardingRules):
    """Trace under the mesh and the logical -> mesh table (activation constraints apply)."""
    with jax.set_mesh(rules.mesh), nn.logical_axis_rules(rules.flax_rules()):
        yield


def _structure_key(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


class ShardedOutputs:
    """``fn`` compiled with the rules' shardings as outputs: ``eval_shape`` -> shardings ->
    ``jit(out_shardings=...)``, so what it builds (parameters, adapters, optimizer state) is born
    sharded, with no full copy on one device. One compiled program per argument structure."""

    def __init__(self, fn: Callable, rules: ShardingRules):
        self._fn, self.rules = fn, rules
        self._jitted: dict = {}

    def __call__(self, *args):
        key = _structure_key(args)
        if key not in self._jitted:
            shardings = self.rules.shardings(jax.eval_shape(self._fn, *args))
            self._jitted[key] = jax.jit(self._fn, out_shardings=shardings)
        return self._jitted[key](*args)


def born_sharded(fn: Callable, rules: ShardingRules, *args):
    """``fn(*args)`` once, born sharded (see ``ShardedOutputs``)."""
    return ShardedOutputs(fn, rules)(*args)


class ShardedStep:
    """``step(state, context, batch) -> (state, metrics)``, jitted per argument structure."""

    def __init__(self, step: Callable, rules: ShardingRules, donate_state: bool = True):
        self._step, self.rules, self._donate = step, rules, donate_state
        self._jitted: dict = {}

    def shardings(self, state, context, batch):
        """(state, context, batch) shardings for arguments (or ShapeDtypeStructs) like these."""
        data = batch_sharding(self.rules.mesh)
        return (
            self.rules.shardings(state),
            self.rules.shardings(context),
            jax.tree.map(lambda _: data, batch),
        )

    def _jit_for(self, args):
        key = _structure_key(args)
        if key not in self._jitted:
            in_shardings = self.shardings(*args)
            self._jitted[key] = (
                jax.jit(
                    self._step,
                    in_shardings=in_shardings,
                    out_shardings=(in_shardings[0], replicated(self.rules.mesh)),
                    donate_argnums=(0,) if self._donate else (),
                ),
                in_shardings,
            )
        return self._jitted[key]

    def bind(self, state, context, batch):
        """``(step, state, context)``: the compiled step for arguments like these, and state and
        context placed on its shardings. ``step(state, context, batch)`` then runs with no
        per-call placement or structure check (what a training loop wants: with a few hundred
        leaves those cost milliseconds per step); batches must come sharded over (data, fsdp)
        (``to_global_batch``) with the same shapes."""
        fn, in_shardings = self._jit_for((state, context, batch))
        state, context = jax.device_put((state, context), in_shardings[:2])

        def step(state, context, batch):
            with sharding_context(self.rules):
                return fn(state, context, batch)

        return step, state, context

    def __call__(self, state, context, batch):
        """One step for any arguments: they are put on the step's shardings first."""
        fn, in_shardings = self._jit_for((state, context, batch))
        args = jax.device_put((state, context, batch), in_shardings)
        with sharding_context(self.rules):
            return fn(*args)

    def lower(self, state, context, batch):
        """Lower for abstract arguments (``ShapeDtypeStruct``s), e.g. to compile ahead of time."""
        fn, _ = self._jit_for((state, context, batch))
        with sharding_context(self.rules):
            return fn.lower(state, context, batch)

    def _cache_size(self) -> int:
        """Compiled programs over all argument structures (for trace-count tests)."""
        return sum(fn._cache_size() for fn, _ in self._jitted.values())
