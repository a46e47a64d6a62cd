"""Accuracy-matrix metrics against hand-computed values."""

import numpy as np
import pytest

from mslora_jax.eval import metrics

# Worked by hand: last row mean = (0.5 + 0.6 + 0.7) / 3 = 0.6;
# BWT = ((0.5 - 0.9) + (0.6 - 0.8)) / 2 = (-0.4 - 0.2) / 2 = -0.3.
MATRIX_3X3 = [
    [0.9, None, None],
    [0.7, 0.8, None],
    [0.5, 0.6, 0.7],
]


def test_average_accuracy_hand_computed():
    assert metrics.average_accuracy(MATRIX_3X3) == pytest.approx(0.6)


def test_backward_transfer_hand_computed():
    assert metrics.backward_transfer(MATRIX_3X3) == pytest.approx(-0.3)


def test_positive_backward_transfer():
    # Learning task 1 improved task 0: BWT = 0.9 - 0.8 = +0.1.
    assert metrics.backward_transfer([[0.8, None], [0.9, 0.7]]) == pytest.approx(0.1)


def test_numpy_input_matches_lists():
    a = np.array([[0.9, 0.1], [0.6, 0.8]])  # upper-triangle values are allowed
    assert metrics.average_accuracy(a) == pytest.approx(0.7)
    assert metrics.backward_transfer(a) == pytest.approx(-0.3)


def test_joint_single_row():
    joint = [[0.9, 0.8, 0.7]]
    assert metrics.average_accuracy(joint) == pytest.approx(0.8)
    assert metrics.backward_transfer(joint) == 0.0


def test_single_row_ignores_none():
    assert metrics.average_accuracy([[0.9, None, 0.7]]) == pytest.approx(0.8)


def test_single_task():
    assert metrics.average_accuracy([[0.75]]) == 0.75
    assert metrics.backward_transfer([[0.75]]) == 0.0


def test_check_returns_python_floats():
    out = metrics.check_acc_matrix(np.array([[np.float32(0.5)]]))
    assert out == [[0.5]] and type(out[0][0]) is float


@pytest.mark.parametrize(
    "matrix, message",
    [
        ([], "empty"),
        ([[]], "empty"),
        ([[0.9, None], [0.5]], "ragged"),
        ([[0.9, None, None], [0.5, 0.6, None]], "2x3"),
        ([[0.9, None], [None, 0.8]], r"\[1\]\[0\] is None"),
        ([[0.9, None], [0.5, float("nan")]], r"\[1\]\[1\]"),
        ([[90.0]], "fraction in"),
        ([[True]], "fraction in"),
        ([["0.5"]], "fraction in"),
        ([[None, None]], "last row"),
    ],
)
def test_invalid_matrices(matrix, message):
    with pytest.raises(ValueError, match=message):
        metrics.average_accuracy(matrix)
    with pytest.raises(ValueError, match=message):
        metrics.backward_transfer(matrix)


def test_accuracy_indices_logits_and_mask():
    labels = np.array([0, 1, 2, 1])
    preds = np.array([0, 1, 0, 0])
    assert metrics.accuracy(preds, labels) == 0.5
    logits = np.eye(3)[preds] * 5.0  # [N, C] scores whose argmax is preds
    assert metrics.accuracy(logits, labels) == 0.5
    # The mask drops the two wrong examples at the end (e.g. batch padding).
    assert metrics.accuracy(preds, labels, mask=[True, True, False, False]) == 1.0


def test_accuracy_errors():
    with pytest.raises(ValueError, match="does not match labels shape"):
        metrics.accuracy(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="mask shape"):
        metrics.accuracy(np.zeros(3), np.zeros(3), mask=np.ones(2, bool))
    with pytest.raises(ValueError, match="zero examples"):
        metrics.accuracy(np.zeros(3), np.zeros(3), mask=np.zeros(3, bool))


# Three stages with the superdiagonal evaluated (task j + 1 after stage j), as runs write it.
A3 = [[0.9, 0.3, None], [0.7, 0.8, 0.4], [0.5, 0.6, 0.7]]


def test_forgetting_hand_computed():
    # column 0: best 0.9 before the last stage, 0.5 at the end; column 1: 0.8 -> 0.6
    assert metrics.forgetting(A3) == pytest.approx((0.4 + 0.2) / 2)
    # the best earlier row counts, not the diagonal: 0.6 then 0.95, ends at 0.5 -> 0.45
    rising = [[0.6, None, None], [0.95, 0.8, None], [0.5, 0.9, 0.7]]
    assert metrics.forgetting(rising) == pytest.approx((0.45 + (-0.1)) / 2)
    assert metrics.forgetting([[0.5, 0.7]]) == 0.0


def test_forward_transfer_hand_computed():
    assert metrics.forward_transfer(A3, [0.2, 0.25, 0.3]) == pytest.approx(
        ((0.3 - 0.25) + (0.4 - 0.3)) / 2
    )
    without_superdiagonal = [[0.9, None, None], [0.7, 0.8, None], [0.5, 0.6, 0.7]]
    assert metrics.forward_transfer(without_superdiagonal, [0.2, 0.25, 0.3]) is None
    assert metrics.forward_transfer([[0.5, 0.7]], [0.1, 0.1]) is None  # joint: one row
    with pytest.raises(ValueError, match="one per task"):
        metrics.forward_transfer(A3, [0.2, 0.25])


def test_mft_mfn_maa_hand_computed():
    assert metrics.mean_finetuned_accuracy(A3) == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    # stage means over seen tasks only: 0.9, (0.7 + 0.8) / 2, (0.5 + 0.6 + 0.7) / 3
    assert metrics.mean_average_accuracy(A3) == pytest.approx((0.9 + 0.75 + 0.6) / 3)
    assert metrics.average_accuracy(A3) == pytest.approx(0.6)  # MFN
    joint = [[0.5, 0.7]]
    assert metrics.mean_finetuned_accuracy(joint) == metrics.mean_average_accuracy(joint) == 0.6
