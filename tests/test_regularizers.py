"""CR and orthogonality losses on hand-computed cases."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _released_reference(active, stacked):
    """The released formula as it was written before the distance variants (bit-exact check)."""
    per_tensor = jax.tree.map(
        lambda p, s: jnp.exp(
            -jnp.sqrt(jnp.sum(jnp.square(p[None] - s), axis=(-2, -1))).reshape(s.shape[0], -1)
        ),
        active,
        stacked,
    )
    return jnp.mean(jnp.concatenate(jax.tree.leaves(per_tensor), axis=1), axis=1)


def _random_adapters(rng, lead=(), num_slots=3, rank=3):
    """An active adapter and a ``[num_slots, ...]`` stack: two plain layers and one with extra
    leading (scanned layer) axes ``lead``, of different sizes."""

    def layer(extra, out, inp):
        return _layer(rng.normal(size=(*extra, rank, inp)), rng.normal(size=(*extra, out, rank)))

    def tree(extra):
        return {
            "x": {"q": layer(extra, 3, 5), "fc": layer(extra, 7, 4)},
            "dec": layer((*extra, *lead), 6, 6),
        }

    return tree(()), tree((num_slots,))


def _numpy_delta_w_similarities(active, stacked, scaling):
    """Explicit reference: per layer (and scanned slice) ``||s B_c A_c - s B_t A_t||_F`` from the
    ``[out, in]`` products in float64, then the mean of ``exp(-d)`` over layers."""
    f64 = lambda x: np.asarray(x, np.float64)
    num_slots = jax.tree.leaves(stacked)[0].shape[0]
    sims = []
    for t in range(num_slots):
        terms = []
        for name in ("x/q", "x/fc", "dec"):
            act, stk = active, stacked
            for part in name.split("/"):
                act, stk = act[part], stk[part]
            delta_c = f64(act["lora_b"]) @ f64(act["lora_a"])  # [..., out, in]
            delta_t = f64(stk["lora_b"][t]) @ f64(stk["lora_a"][t])
            d = np.linalg.norm(
                (scaling * (delta_c - delta_t)).reshape(-1, *delta_c.shape[-2:]), axis=(-2, -1)
            )
            terms += list(np.exp(-d))
        sims.append(np.mean(terms))
    return np.array(sims)


def test_released_is_unchanged_bit_for_bit():
    active, stacked = _random_adapters(np.random.default_rng(1), lead=(4,))
    expected = _released_reference(active, stacked)
    np.testing.assert_array_equal(adapter_similarities(active, stacked), expected)
    np.testing.assert_array_equal(adapter_similarities(active, stacked, "released", 2.0), expected)


def test_normalized_hand_computed():
    # The case of test_cr_hand_computed_with_sign_flip; every matrix has 2 entries, so each
    # distance is divided by sqrt(2).
    active = {"l": _layer([[3.0, 0.0]], [[0.0], [0.0]])}
    stacked = {"l": _layer([[[0.0, 0.0]], [[3.0, 0.0]]], [[[0.0], [0.0]], [[3.0], [4.0]]])}
    expected = [(np.exp(-3 / np.sqrt(2)) + 1) / 2, (1 + np.exp(-5 / np.sqrt(2))) / 2]
    got = adapter_similarities(active, stacked, "normalized")
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Matrices of different sizes: A [1, 4] differs by 2 in every entry (RMS 2), B [2, 1] by 1.
    active = {"l": _layer([[2.0, 2.0, 2.0, 2.0]], [[1.0], [1.0]])}
    stacked = {"l": _layer(np.zeros((1, 1, 4)), np.zeros((1, 2, 1)))}
    got = adapter_similarities(active, stacked, "normalized")
    np.testing.assert_allclose(got, [(np.exp(-2.0) + np.exp(-1.0)) / 2], rtol=1e-6)
    np.testing.assert_allclose(
        contrastive_regularizer(
            active, stacked, jnp.array([True]), jnp.array([True]), "normalized"
        ),
        1 - (np.exp(-2.0) + np.exp(-1.0)) / 2,
        rtol=1e-6,
    )


def test_delta_w_hand_computed():
    # Rank 1, s = 0.5. Active: B A = [[2], [0]] [[1, 0]] = [[2, 0], [0, 0]].
    # Slot 0: B A = [[0], [1]] [[0, 1]] = [[0, 0], [0, 1]] -> s (dW_c - dW_0) = [[1, 0], [0, -0.5]],
    #   d = sqrt(1.25). Slot 1: (2B, A/2), the same product -> d = 0, s = 1 (released: not 1).
    # One layer: the mean is that layer's exp(-d), whatever the number of matrices.
    active = {"l": _layer([[1.0, 0.0]], [[2.0], [0.0]])}
    stacked = {"l": _layer([[[0.0, 1.0]], [[0.5, 0.0]]], [[[0.0], [1.0]], [[4.0], [0.0]]])}
    got = adapter_similarities(active, stacked, "delta_w", scaling=0.5)
    np.testing.assert_allclose(got, [np.exp(-np.sqrt(1.25)), 1.0], rtol=1e-6)
    assert float(adapter_similarities(active, stacked)[1]) < 0.9
    # Without the scaling the distance doubles.
    got = adapter_similarities(active, stacked, "delta_w")
    np.testing.assert_allclose(got[0], np.exp(-np.sqrt(5.0)), rtol=1e-6)
    cr = contrastive_regularizer(
        active, stacked, jnp.array([True, True]), jnp.array([False, True]), "delta_w", 0.5
    )
    np.testing.assert_allclose(cr, np.exp(-np.sqrt(1.25)) + 0.0, atol=1e-6)


@pytest.mark.parametrize("lead", [(), (4,)])
def test_delta_w_matches_the_explicit_products(lead):
    """Against ``B @ A`` in float64, with a scanned (extra layer axis) layer when ``lead``; one
    term per layer slice."""
    active, stacked = _random_adapters(np.random.default_rng(2), lead=lead)
    # Scaled so the distances are of order 1 (exp(-d) neither 0 nor 1).
    for scaling in (0.05, 0.2):
        got = adapter_similarities(active, stacked, "delta_w", scaling)
        expected = _numpy_delta_w_similarities(active, stacked, scaling)
        assert 0.05 < expected.min() and expected.max() < 0.95
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_variants_equal_for_scanned_and_unrolled_layers():
    from mslora_jax.models.decoder import scan_blocks

    rng = np.random.default_rng(3)

    def layer(lead):
        return _layer(rng.normal(size=(*lead, 2, 5)), rng.normal(size=(*lead, 3, 2)) * 0.1)

    stack = {"decoder": {f"block_{i}": {"q": layer((4,))} for i in range(3)}, "x": layer((4,))}
    active = {"decoder": {f"block_{i}": {"q": layer(())} for i in range(3)}, "x": layer(())}
    stack_s, active_s = scan_blocks(stack, axis=1), scan_blocks(active)
    for distance in ("normalized", "delta_w"):
        np.testing.assert_allclose(
            adapter_similarities(active_s, stack_s, distance, 0.5),
            adapter_similarities(active, stack, distance, 0.5),
            rtol=1e-6,
        )


def test_delta_w_gradient_matches_the_explicit_formula():
    """The Gram-matrix distance differentiates like the one from explicit products."""
    active, stacked = _random_adapters(np.random.default_rng(4), lead=(2,), num_slots=2)
    earlier, same = jnp.array([True, True]), jnp.array([True, False])

    def explicit(active):
        def sims(act, stk):
            delta = 0.1 * (act["lora_b"] @ act["lora_a"] - stk["lora_b"] @ stk["lora_a"])
            return jnp.exp(-jnp.sqrt(jnp.sum(delta**2, axis=(-2, -1)))).reshape(2, -1)

        layers = [(active["x"]["q"], stacked["x"]["q"]), (active["x"]["fc"], stacked["x"]["fc"])]
        layers.append((active["dec"], stacked["dec"]))
        s = jnp.mean(jnp.concatenate([sims(a, t) for a, t in layers], axis=1), axis=1)
        return jnp.sum(jnp.where(same, 1.0 - s, s))

    got = jax.grad(contrastive_regularizer)(active, stacked, earlier, same, "delta_w", 0.1)
    chex.assert_trees_all_close(got, jax.grad(explicit)(active), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("distance", ["released", "normalized", "delta_w"])
def test_gradient_finite_at_identical_adapters(distance):
    """Distance 0 (identical adapters; fresh ones, B = 0, whose delta W is exactly 0): finite
    gradients, no NaN from the square root."""
    active, _ = _random_adapters(np.random.default_rng(5))
    fresh = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if path[-1].key == "lora_b" else x, active
    )
    for adapter in (active, fresh):
        stacked = jax.tree.map(lambda x: x[None], adapter)
        grads = jax.grad(contrastive_regularizer)(
            adapter, stacked, jnp.array([True]), jnp.array([True]), distance, 0.5
        )
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(grads))
    if distance == "delta_w":
        np.testing.assert_array_equal(adapter_similarities(fresh, stacked, distance, 0.5), [1.0])
        assert not any(np.any(x) for x in jax.tree.leaves(grads))


def test_unknown_distance_is_refused():
    active = {"l": _layer([[1.0]], [[1.0]])}
    with pytest.raises(ValueError, match="unknown CR distance 'frobenius'"):
        adapter_similarities(active, jax.tree.map(lambda x: x[None], active), "frobenius")


def test_inspect_similarity_follows_the_run_s_distance():
    """``mslora-jax inspect`` (and the adapter similarity plots) use the similarity of the run's
    ``cr_distance``."""
    from mslora_jax.lora.compare import cr_similarity

    active, stacked = _random_adapters(np.random.default_rng(6), lead=(2,), num_slots=1)
    other = jax.tree.map(lambda x: np.asarray(x[0]), stacked)
    active = jax.tree.map(np.asarray, active)
    for distance, scaling in (("released", 1.0), ("normalized", 1.0), ("delta_w", 0.1)):
        expected = adapter_similarities(active, stacked, distance, scaling)[0]
        np.testing.assert_allclose(cr_similarity(active, other, distance, scaling), expected, 1e-6)
