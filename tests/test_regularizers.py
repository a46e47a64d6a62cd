"""CR and orthogonality losses on hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np

from mslora_jax.losses.regularizers import (
    adapter_similarities,
    contrastive_regularizer,
    orthogonality_regularizer,
)


def _layer(a, b):
    return {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}


def test_cr_hand_computed_with_sign_flip():
    # One layer, rank 1. Active: A = [[3, 0]], B = [[0], [0]].
    active = {"l": _layer([[3.0, 0.0]], [[0.0], [0.0]])}
    # Slot 0: A differs by 3 (norm 3); B same -> s0 = (e^-3 + e^0) / 2.
    # Slot 1: A same, B differs by (3, 4) -> norm 5 -> s1 = (1 + e^-5) / 2.
    stacked = {
        "l": _layer(
            [[[0.0, 0.0]], [[3.0, 0.0]], [[0, 0]]], [[[0.0], [0.0]], [[3.0], [4.0]], [[0], [0]]]
        )
    }
    s0, s1 = (np.exp(-3) + 1) / 2, (1 + np.exp(-5)) / 2
    np.testing.assert_allclose(adapter_similarities(active, stacked)[:2], [s0, s1], rtol=1e-6)
    earlier = jnp.array([True, True, False])
    # Same modality pulls (1 - s), a different one pushes (s).
    got = contrastive_regularizer(active, stacked, earlier, jnp.array([True, False, False]))
    np.testing.assert_allclose(got, (1 - s0) + s1, rtol=1e-6)
    flipped = contrastive_regularizer(active, stacked, earlier, jnp.array([False, True, False]))
    np.testing.assert_allclose(flipped, s0 + (1 - s1), rtol=1e-6)
    # Slot 2 is not earlier: ignored whatever its modality.
    only_first = contrastive_regularizer(
        active, stacked, jnp.array([True, False, False]), jnp.array([True, True, True])
    )
    np.testing.assert_allclose(only_first, 1 - s0, rtol=1e-6)


def test_cr_gradient_moves_only_the_active_adapter_and_has_the_right_direction():
    active = {"l": _layer([[1.0, 0.0]], [[0.5], [0.0]])}
    stacked = {"l": _layer([[[0.0, 0.0]]], [[[0.0], [0.0]]])}
    pull = jax.grad(contrastive_regularizer)(active, stacked, jnp.array([True]), jnp.array([True]))
    push = jax.grad(contrastive_regularizer)(active, stacked, jnp.array([True]), jnp.array([False]))
    # Pull: descending the gradient moves A toward the earlier (zero) adapter; push: away.
    assert float(pull["l"]["lora_a"][0, 0]) > 0 > float(push["l"]["lora_a"][0, 0])
    # Identical adapters (distance 0): finite gradient, no NaN.
    same = jax.grad(contrastive_regularizer)(
        active, jax.tree.map(lambda x: x[None], active), jnp.array([True]), jnp.array([True])
    )
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(same))


def test_orthogonality_hand_computed():
    # Rank 2. Task 0: A = diag(1, 2) (2x2) -> AA^T - I = diag(0, 3) -> 9;
    #                 B = [[1, 0], [0, 1], [1, 0]] -> B^T B - I = [[1, 0], [0, 0]] -> 1.
    # Task 1: A = 0 -> ||-I||^2 = 2; B = 0 -> 2.
    a = [np.diag([1.0, 2.0]), np.zeros((2, 2))]
    b = [np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), np.zeros((3, 2))]
    stacked = {"x": {"y": _layer(a, b)}, "z": _layer(a, b)}
    both = orthogonality_regularizer(stacked, jnp.array([True, True]))
    np.testing.assert_allclose(both, (10 + 4) / 2, rtol=1e-6)  # same two layers: mean is unchanged
    first = orthogonality_regularizer(stacked, jnp.array([True, False]))
    np.testing.assert_allclose(first, 10.0, rtol=1e-6)
    orthonormal = {"l": _layer([np.eye(2)], [np.eye(2)])}
    np.testing.assert_allclose(orthogonality_regularizer(orthonormal, jnp.array([True])), 0.0)


def test_scanned_layers_count_as_separate_tensors():
    """A scanned decoder's ``[T, layers, ...]`` factors give CR, similarities and
    orthogonality equal to the unrolled ``block_{i}`` trees (each layer one P, as released)."""
    from mslora_jax.losses.regularizers import orthogonality_per_slot, orthogonality_with_active
    from mslora_jax.models.decoder import scan_blocks

    rng = np.random.default_rng(0)

    def layer(lead):
        return _layer(rng.normal(size=(*lead, 2, 5)), rng.normal(size=(*lead, 3, 2)))

    stack = {"decoder": {f"block_{i}": {"q": layer((4,))} for i in range(3)}, "x": layer((4,))}
    active = {"decoder": {f"block_{i}": {"q": layer(())} for i in range(3)}, "x": layer(())}
    stack_s, active_s = scan_blocks(stack, axis=1), scan_blocks(active)
    assert active_s["decoder"]["blocks"]["q"]["lora_a"].shape == (3, 2, 5)
    earlier, same = jnp.array([True, True, False, False]), jnp.array([True, False, True, False])
    mask = jnp.array([True, True, True, False])
    np.testing.assert_allclose(
        adapter_similarities(active_s, stack_s), adapter_similarities(active, stack), rtol=1e-6
    )
    np.testing.assert_allclose(
        contrastive_regularizer(active_s, stack_s, earlier, same),
        contrastive_regularizer(active, stack, earlier, same),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        orthogonality_regularizer(stack_s, mask), orthogonality_regularizer(stack, mask), rtol=1e-6
    )
    np.testing.assert_allclose(
        orthogonality_with_active(orthogonality_per_slot(stack_s), active_s, mask, 2),
        orthogonality_with_active(orthogonality_per_slot(stack), active, mask, 2),
        rtol=1e-6,
    )
