"""``lora.granularity = "modality"``: one adapter per modality, continued by later tasks."""

import jax
import numpy as np
import pytest

from mslora_jax.cli.inspect import load_stage_adapters
from mslora_jax.config import experiment_config
from mslora_jax.errors import ConfigError
from mslora_jax.io_utils import atomic_write_json
from mslora_jax.run.experiment import fingerprint
from mslora_jax.run.pictures import final_slot_adapters, write_pictures
from mslora_jax.train.checkpoints import StageCheckpoints
from mslora_jax.train.methods import get_method
from mslora_jax.train.stream import run_method, stage_context
from tests.helpers import random_backbone_experiment, smoke_dict


def _distance(a: dict, b: dict) -> float:
    return float(
        np.sqrt(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2) for x, y in
                    zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)))
    )  # fmt: skip


def test_method_slots_per_modality():
    # Stream path_a, rad_a, path_b: pathology -> slot 0, radiology -> slot 1.
    method = get_method("mslora_cr", (0, 1, 0))
    assert [method.slot(s) for s in range(3)] == [0, 1, 0]
    assert method.train_slots(2) == [0, 1] and method.eval_slots(0) == [0]
    assert method.cr_slots(2) == [0, 1]  # its own slot as the stage began, and radiology's
    assert method.unified_slots(3) == [0, 1]
    assert method.changes_eval_of(2, 0) and method.changes_eval_of(2, 1)
    assert not method.changes_eval_of(1, 0)
    each = get_method("each", (0, 1, 0))
    assert each.eval_slots(1) == [1] and not each.changes_eval_of(2, 1)
    assert get_method("seq", (0, 1, 0)).slot(2) == 0
    assert not get_method("mslora").continues_previous()
    assert method.continues_previous()


def test_modality_adapter_continues_and_other_modality_stays_bit_for_bit(tmp_path):
    exp = random_backbone_experiment(
        **{"lora.granularity": "modality", "train.steps_per_task": 6, "train.learning_rate": 3e-3}
    )
    assert exp.task_slots == (0, 1, 0) and exp.num_slots == 2
    assert exp.slot_modalities == ["pathology", "radiology"]
    method = exp.method("mslora_cr")
    checkpoints = StageCheckpoints(tmp_path / "checkpoints" / "mslora_cr")
    outcome = run_method(exp, method, checkpoints, {})
    assert set(outcome.adapters) == {0, 1}
    stack = exp.stack(outcome.adapters)
    assert jax.tree.leaves(stack)[0].shape[0] == 2  # memory grows with modalities
    # The adapter of each stage, as saved after it.
    stages = load_stage_adapters(tmp_path, "mslora_cr")
    assert [meta["slot"] for meta, _ in stages] == [0, 1, 0]
    after = [adapter for _, adapter in stages]
    # Stage 2 (path_b) continued pathology's adapter from where path_a left it ...
    moved = _distance(after[2], after[0])
    assert 0 < moved < 0.5 * _distance(after[2], exp.fresh_adapter(2))
    # ... and radiology's adapter is the one rad_a trained, bit for bit.
    for x, y in zip(jax.tree.leaves(outcome.adapters[1]), jax.tree.leaves(after[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # path_a is evaluated afresh after stage 2 (its adapter moved), so forgetting is possible.
    matrix = outcome.summary["acc_matrix"]
    assert matrix[2][0] == exp.accuracy(outcome.adapters, [0], 0)
    assert "forgetting" in outcome.summary
    # CR pulls toward pathology's own adapter as it began the stage, pushes from radiology's.
    context = stage_context(exp, method, 2, {0: after[0], 1: after[1]}, [2])
    np.testing.assert_array_equal(context.earlier_mask, [True, True])
    np.testing.assert_array_equal(context.same_modality, [True, False])
    # The similarity picture compares slots: each modality's final adapter.
    slots = final_slot_adapters(tmp_path, "mslora_cr")
    assert [s["tasks"] for s in slots] == [["path_a", "path_b"], ["rad_a"]]
    for x, y in zip(jax.tree.leaves(slots[0]["params"]), jax.tree.leaves(after[2]), strict=True):
        np.testing.assert_array_equal(x, y)
    atomic_write_json(tmp_path / "config.json", fingerprint(exp.config))
    written = write_pictures(tmp_path, ["mslora_cr"])  # no training log: no loss curves
    assert list(written) == ["adapter_similarity_mslora_cr.png"]
    assert written["adapter_similarity_mslora_cr.png"].read_bytes().startswith(b"\x89PNG")


def test_granularity_is_validated():
    cfg = smoke_dict(**{"lora.granularity": "domain"})
    with pytest.raises(ConfigError, match="lora.granularity='domain' is unknown"):
        experiment_config(cfg)
