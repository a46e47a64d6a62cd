"""Task-agnostic routing: nearest class prototype of frozen image features."""

import numpy as np
import pytest

from mslora_jax.errors import DataError
from mslora_jax.eval.router import fit_router, router_accuracy
from mslora_jax.report.results import method_summary, validate_results
from mslora_jax.train.stream import run_method
from tests.helpers import random_backbone_experiment


def _clusters(rng, centres: np.ndarray, per_class: int, noise: float):
    labels = np.repeat(np.arange(len(centres)), per_class)
    return centres[labels] + noise * rng.normal(size=(len(labels), centres.shape[1])), labels


def test_router_picks_the_right_task_on_separable_tasks():
    rng = np.random.default_rng(0)
    # Three tasks of two classes each, every class a direction of its own in 8 dimensions.
    centres = [np.eye(8)[2 * t : 2 * t + 2] * 5.0 for t in range(3)]
    train = [_clusters(rng, c, 20, 0.3) for c in centres]
    router = fit_router([x for x, _ in train], [y for _, y in train])
    assert router.prototypes.shape == (6, 8) and list(router.tasks) == [0, 0, 1, 1, 2, 2]
    np.testing.assert_allclose(np.linalg.norm(router.prototypes, axis=1), 1.0)
    for task, c in enumerate(centres):
        test, _ = _clusters(rng, c, 30, 0.3)
        routes = router.route(test)
        assert router_accuracy(routes, task) == 1.0
        assert router_accuracy(routes, (task + 1) % 3) == 0.0


def test_a_prototype_is_the_renormalized_mean_of_unit_features():
    x = np.array([[3.0, 0.0], [0.0, 0.5], [0.0, -2.0]])
    router = fit_router([x[:2], x[2:]], [np.array([0, 0]), np.array([1])])
    np.testing.assert_allclose(router.prototypes[0], [np.sqrt(0.5), np.sqrt(0.5)])
    np.testing.assert_allclose(router.prototypes[1], [0.0, -1.0])
    # Cosine, not distance: a long vector near prototype 0's direction goes to task 0.
    assert list(router.route(np.array([[10.0, 9.0], [0.1, -1.0]]))) == [0, 1]


def test_router_rejects_mismatched_inputs_by_name():
    with pytest.raises(DataError, match="task 0 has 2 feature rows and 1 labels"):
        fit_router([np.zeros((2, 3))], [np.zeros((1,))])
    with pytest.raises(DataError, match="one .features, labels. pair per task"):
        fit_router([], [])


def test_routed_accuracy_matches_the_protocol_when_routing_is_perfect_and_zero_when_wrong():
    exp = random_backbone_experiment(**{"train.steps_per_task": 3})
    method = exp.method("mslora")
    outcome = run_method(exp, method, None, {})
    assert len(exp.router_accuracy()) == exp.num_tasks  # the real router runs
    # Perfect routing reproduces the paper's protocol (each task with adapters <= task).
    exp.__dict__["routes"] = [np.full(len(t.test_labels), i) for i, t in enumerate(exp.tasks)]
    routed = exp.routed_accuracy(outcome.adapters, method)
    np.testing.assert_allclose(routed, outcome.summary["acc_matrix"][-1], atol=1e-12)
    assert exp.router_accuracy() == [1.0] * exp.num_tasks
    # Routing every input to another task scores nothing.
    exp.__dict__["routes"] = [np.full(len(t.test_labels), i - 1) for i, t in enumerate(exp.tasks)]
    assert exp.routed_accuracy(outcome.adapters, method) == [0.0] * exp.num_tasks
    # Half of task 0's inputs routed right: the accuracy counts only those, over all inputs.
    routes = [np.full(len(t.test_labels), i) for i, t in enumerate(exp.tasks)]
    routes[0][1::2] = 1
    exp.__dict__["routes"] = routes
    assert exp.routed_accuracy(outcome.adapters, method)[0] <= 0.5 + 1e-12


def test_results_check_the_routed_mean():
    entry = method_summary([[0.5, None], [0.5, 0.7]], [0.4, 0.6], 1.0, routed_acc=[0.2, 0.4])
    assert entry["routed_avg_acc"] == pytest.approx(0.3)
    results = {"tasks": [{"name": "a", "modality": "m"}, {"name": "b", "modality": "m"}]}
    validate_results({**results, "methods": {"x": entry}})
    with pytest.raises(DataError, match="routed_avg_acc.*the data give 0.300000"):
        validate_results({**results, "methods": {"x": {**entry, "routed_avg_acc": 0.9}}})


def test_the_report_names_each_tasks_router_accuracy():
    from mslora_jax.report.results import format_report

    entry = method_summary([[0.5, None], [0.5, 0.7]], [0.4, 0.6], 1.0, routed_acc=[0.2, 0.4])
    results = {
        "tasks": [{"name": "a", "modality": "m"}, {"name": "b", "modality": "m"}],
        "methods": {"x": entry},
        "backbone": {"router_acc": [0.9, 0.25]},
    }
    text = format_report(results)
    assert "| routed avg acc (%) |" in text and "| 30.0 |" in text
    assert text.endswith("routed to their own task, %): a 90.0, b 25.0.")
