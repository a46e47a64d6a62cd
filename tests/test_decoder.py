"""The causal LM, the LLaVA model and generation against explicit references (tiny sizes)."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mslora_jax.errors import ConfigError, DataError
from mslora_jax.lora.adapter import init_adapter_params, stack_params
from mslora_jax.lora.targets import lora_capable_paths, select_targets
from mslora_jax.models.attention import Attention, apply_rope
from mslora_jax.models.clip import ImageEncoder, ModelConfig, init_backbone
from mslora_jax.models.decoder import (
    Decoder,
    DecoderConfig,
    init_decoder,
    positions_from_mask,
    scan_blocks,
)
from mslora_jax.models.decoder_config import unscan_blocks
from mslora_jax.models.generate import greedy_generate, greedy_generate_uncached, llava_generate
from mslora_jax.models.kv_cache import init_cache
from mslora_jax.models.llava import (
    LLAVA_LORA_TARGETS,
    Llava,
    LlavaConfig,
    VisionTower,
    init_llava,
    splice_image_tokens,
)

DEC = DecoderConfig(
    vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48, max_len=32
)
VIT = ModelConfig(image_size=8, patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32)
IMAGE_ID = 5
LLAVA = LlavaConfig(vision=VIT, decoder=DEC, image_token_id=IMAGE_ID)  # 4 patches
UNROLLED = dataclasses.replace(DEC, scan_layers=False)  # block_{i} modules in a Python loop
UNROLLED_LLAVA = dataclasses.replace(LLAVA, decoder=UNROLLED)
PAD = 0


def _host_init(init_fn, seed):
    """Random parameters with the shapes of ``init_fn(rng)`` (traced with ``jax.eval_shape``),
    filled with numpy: compiling Flax's random initializers would cost more than these tests."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "scale":
            value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        elif name == "bias":
            value = 0.1 * rng.normal(size=leaf.shape)
        elif name == "kernel":  # [..., in, out]: unit-variance outputs
            value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        else:  # embeddings, [CLS], positions
            value = rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def dec_params():
    return _host_init(lambda key: init_decoder(DEC, key), 0)


@pytest.fixture(scope="module")
def llava_params():
    return _host_init(lambda key: init_llava(LLAVA, key), 1)


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, ids, mask):
    """Uncached decoder logits ``[B, L, V]`` (one compile per shape, shared by tests)."""
    return Decoder(config).apply({"params": params}, ids, mask, method=Decoder.logits_from_ids)


@jax.jit
def _embed(params, ids):
    return Decoder(DEC).apply({"params": params}, ids, method=Decoder.embed)


def _left_pad(rows, length):
    ids = np.full((len(rows), length), PAD, np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
    return jnp.asarray(ids), jnp.asarray(ids != PAD)


def _right_pad(rows, length):
    ids = np.full((len(rows), length), PAD, np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return jnp.asarray(ids), jnp.asarray(ids != PAD)


def test_config_validation():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        dataclasses.replace(DEC, num_kv_heads=3)
    with pytest.raises(ConfigError, match="even for RoPE"):
        dataclasses.replace(DEC, width=36, num_heads=4)  # head_dim 9
    with pytest.raises(ConfigError, match="vision_layer"):
        dataclasses.replace(LLAVA, vision_layer=-4)
    with pytest.raises(ConfigError, match="image_token_id"):
        dataclasses.replace(LLAVA, image_token_id=64)


def test_rope_matches_explicit_formula():
    theta, dh = 500.0, 8
    x = np.random.default_rng(0).normal(size=(2, 3, 2, dh))
    positions = np.array([[0, 1, 7], [3, 0, 12]])
    want = np.empty_like(x)
    for b in range(2):
        for t in range(3):
            for i in range(dh // 2):
                angle = positions[b, t] * theta ** (-2.0 * i / dh)
                c, s = np.cos(angle), np.sin(angle)
                lo, hi = x[b, t, :, i], x[b, t, :, i + dh // 2]
                want[b, t, :, i] = lo * c - hi * s
                want[b, t, :, i + dh // 2] = lo * s + hi * c
    got = jax.jit(apply_rope, static_argnums=2)(jnp.asarray(x, jnp.float32), positions, theta)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    mha_cfg = dataclasses.replace(DEC, num_kv_heads=DEC.num_heads)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 5, DEC.width)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    visible = jnp.broadcast_to(jnp.tril(jnp.ones((5, 5), bool)), (2, 5, 5))
    groups, dh = DEC.num_heads // DEC.num_kv_heads, DEC.head_dim
    kv_width = DEC.num_kv_heads * dh
    shapes = {"q": DEC.width, "k": kv_width, "v": kv_width, "o": DEC.width}
    params = {
        name: {"kernel": jnp.asarray(rng.normal(size=(DEC.width, n)) / 6, jnp.float32)}
        for name, n in shapes.items()
    }

    def repeat_heads(kernel):  # [D, K*Dh] -> [D, H*Dh]; query head h reads kv head h // groups
        kernel = kernel.reshape(DEC.width, DEC.num_kv_heads, dh)
        return jnp.repeat(kernel, groups, axis=1).reshape(DEC.width, DEC.num_heads * dh)

    @jax.jit
    def run(params, x):
        mha_params = {
            **params,
            "k": {"kernel": repeat_heads(params["k"]["kernel"])},
            "v": {"kernel": repeat_heads(params["v"]["kernel"])},
        }
        gqa, _ = Attention(DEC).apply({"params": params}, x, positions, visible)
        mha, _ = Attention(mha_cfg).apply({"params": mha_params}, x, positions, visible)
        return gqa, mha

    gqa, mha = run(params, x)
    assert mha_cfg.num_kv_heads == 4 and DEC.num_kv_heads == 2
    np.testing.assert_allclose(gqa, mha, rtol=1e-5, atol=1e-5)


def test_causal_mask(dec_params):
    ids = np.random.default_rng(3).integers(1, DEC.vocab_size, (2, 8))
    changed = ids.copy()
    changed[:, 5] = (ids[:, 5] + 1) % DEC.vocab_size
    mask = np.ones((2, 8), bool)
    a, b = _logits(DEC, dec_params, ids, mask), _logits(DEC, dec_params, changed, mask)
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=1e-6, atol=1e-6)
    assert np.all(np.abs(a[:, 5:] - b[:, 5:]).max(axis=-1) > 1e-4)


@pytest.mark.parametrize("config", [DEC, UNROLLED], ids=["scanned", "unrolled"])
def test_kv_cache_prefill_and_decode_equal_full_forward(dec_params, config):
    """Teacher forcing on a left-padded batch: prompt prefill, then one token per call."""
    ids, mask = _left_pad([[7, 8, 9, 10, 11, 12, 13, 14], [21, 22, 23, 24, 25]], 8)
    prompt_len = 5  # row 1 has 2 real prompt tokens after 3 pads
    if not config.scan_layers:
        dec_params = unscan_blocks({"decoder": dec_params})["decoder"]
    variables = {"params": dec_params}
    decoder = Decoder(config)

    @jax.jit
    def cached(ids, mask):
        embeds = decoder.apply(variables, ids, method=Decoder.embed)
        positions = positions_from_mask(mask)
        cache = init_cache(DEC, 2, ids.shape[1])
        logits, cache = decoder.apply(
            variables, embeds[:, :prompt_len], positions[:, :prompt_len], mask[:, :prompt_len],
            cache=cache,
        )  # fmt: skip
        steps = [logits]
        for t in range(prompt_len, ids.shape[1]):
            logits, cache = decoder.apply(
                variables, embeds[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1],
                cache=cache,
            )  # fmt: skip
            steps.append(logits)
        return jnp.concatenate(steps, axis=1), cache.index

    got, index = cached(ids, mask)
    want = _logits(config, dec_params, ids, mask)
    np.testing.assert_array_equal(index, [8, 8])
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def traced_generate():
    """``greedy_generate`` under an outer jit that fails if it is traced twice."""

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(params, embeds, mask, stop_ids):
        return greedy_generate(
            Decoder(DEC), {"params": params}, embeds, mask, max_new_tokens=8, stop_ids=stop_ids
        )

    return run


PROMPTS = [[3, 9, 14, 27, 31, 40], [11, 12, 13, 33], [50, 60]]


def test_cached_generation_equals_recompute_with_padding_and_stop(dec_params, traced_generate):
    decoder, variables = Decoder(DEC), {"params": dec_params}
    embed = functools.partial(_embed, dec_params)
    ids, mask = _left_pad(PROMPTS, 6)
    free = greedy_generate_uncached(decoder, variables, embed(ids), mask, max_new_tokens=8)
    assert np.all(free.lengths == 8)
    stop = int(free.tokens[0, 2])  # row 0 stops at step 2 at the latest
    want = greedy_generate_uncached(
        decoder, variables, embed(ids), mask, max_new_tokens=8, stop_ids=(stop,)
    )
    got = traced_generate(dec_params, embed(ids), mask, jnp.array([stop]))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    assert got.lengths[0] <= 3
    for row, n in enumerate(np.asarray(got.lengths)):  # padded after the stop token
        assert stop in np.asarray(got.tokens[row, :n]) or n == 8
        assert np.all(got.tokens[row, n:] == PAD) and np.all(got.logits[row, n:] == 0)
    # The greedy tokens are the argmax of the reported logits, and free-running agrees up to stop.
    n = np.asarray(got.lengths)[:, None] > np.arange(8)
    np.testing.assert_array_equal(jnp.argmax(got.logits, -1)[n], got.tokens[n])
    np.testing.assert_array_equal(free.tokens[n], got.tokens[n])
    # Right-padded prompts (per-row cache index) give the same answers.
    ids_r, mask_r = _right_pad(PROMPTS, 6)
    right = traced_generate(dec_params, embed(ids_r), mask_r, jnp.array([stop]))
    np.testing.assert_array_equal(right.tokens, got.tokens)
    np.testing.assert_allclose(right.logits, got.logits, rtol=1e-4, atol=1e-4)


def test_generation_compiles_once_and_checks_length(dec_params, traced_generate):
    embed = functools.partial(_embed, dec_params)
    for rows in ([[1, 2]], [[4, 5, 6, 7, 8, 9]], [[10], [11, 12, 13, 14, 15, 16]]):
        rows = (rows * 3)[:3]
        ids, mask = _left_pad(rows, 6)
        traced_generate(dec_params, embed(ids), mask, jnp.array([1]))
        traced_generate(dec_params, embed(ids), mask, jnp.array([2]))
    ids, mask = _left_pad(PROMPTS, 6)
    no_logits = jax.eval_shape(
        functools.partial(greedy_generate, Decoder(DEC), max_new_tokens=8, return_logits=False),
        {"params": dec_params},
        embed(ids),
        mask,
    )
    assert no_logits.logits.shape == (3, 8, 0) and no_logits.tokens.shape == (3, 8)
    with pytest.raises(ConfigError, match="no room to generate"):
        greedy_generate(Decoder(DEC), {"params": dec_params}, embed(ids), mask,
                        max_new_tokens=4, max_len=6)  # fmt: skip


def test_splice_image_tokens_matches_concatenation():
    rng = np.random.default_rng(0)
    ids = np.array(
        [[0, 0, 7, 9, IMAGE_ID, 8], [IMAGE_ID, 7, 7, 7, 7, 7], [0, 7, 7, 7, 7, IMAGE_ID]]
    )
    mask = ids != 0
    loss = rng.random(ids.shape) > 0.5
    embeds = rng.normal(size=(3, 6, 2)).astype(np.float32)
    patches = rng.normal(size=(3, 3, 2)).astype(np.float32)
    splice = jax.jit(functools.partial(splice_image_tokens, image_token_id=IMAGE_ID))
    out = splice(embeds, ids, patches, mask, loss)
    assert out.embeds.shape == (3, 8, 2)
    for b in range(3):
        w = int(np.flatnonzero(ids[b] == IMAGE_ID)[0])
        cat = lambda text, img, w=w: np.concatenate([text[:w], img, text[w + 1 :]])
        np.testing.assert_array_equal(out.embeds[b], cat(embeds[b], patches[b]))
        np.testing.assert_array_equal(out.input_ids[b], cat(ids[b], [IMAGE_ID] * 3))
        np.testing.assert_array_equal(out.attention_mask[b], cat(mask[b], [True] * 3))
        np.testing.assert_array_equal(out.loss_mask[b], cat(loss[b], [False] * 3))
        np.testing.assert_array_equal(out.image_mask[b], cat(0 * mask[b], [True] * 3))
    for bad in ([[7, 7, 7]], [[IMAGE_ID, 7, IMAGE_ID]]):
        with pytest.raises(DataError, match="exactly one"):
            splice_image_tokens(
                np.zeros((1, 3, 2)), np.array(bad), patches[:1], np.ones((1, 3), bool),
                image_token_id=IMAGE_ID,
            )  # fmt: skip


def test_llava_replaces_placeholder_with_projected_patches(llava_params):
    model, p = Llava(LLAVA), LLAVA.num_patches
    images = jnp.asarray(np.random.default_rng(4).random((2, 8, 8, 3)), jnp.float32)
    ids, mask = _left_pad([[1, IMAGE_ID, 9, 10, 11], [IMAGE_ID, 12]], 5)

    @jax.jit
    def run(images, ids, mask):
        variables = {"params": llava_params}
        inputs = model.apply(variables, images, ids, mask, method=Llava.prepare_inputs)
        patches = model.apply(variables, images, method=Llava.encode_images)
        text = model.apply(variables, ids, method=lambda m, i: m.decoder.embed(i))
        return inputs, patches, text, model.apply(variables, images, ids, mask)

    inputs, patches, text, logits = run(images, ids, mask)
    assert inputs.embeds.shape == (2, 5 + p - 1, DEC.width) and patches.shape == (2, p, DEC.width)
    assert logits.shape == (2, 5 + p - 1, DEC.vocab_size)
    positions = positions_from_mask(inputs.attention_mask)
    for b, (w, first_pos) in enumerate([(1, 1), (3, 0)]):  # placeholder slot, its position
        np.testing.assert_array_equal(np.flatnonzero(inputs.image_mask[b]), w + np.arange(p))
        np.testing.assert_array_equal(inputs.embeds[b, w : w + p], patches[b])
        np.testing.assert_array_equal(positions[b, w : w + p], first_pos + np.arange(p))
        np.testing.assert_array_equal(inputs.embeds[b, :w], text[b, :w])
        np.testing.assert_array_equal(inputs.embeds[b, w + p :], text[b, w + 1 :])


def test_vision_tower_matches_image_encoder():
    """Same parameter tree as clip.ImageEncoder minus ``proj``; its last hidden state agrees."""
    images = jnp.asarray(np.random.default_rng(5).random((2, 8, 8, 3)), jnp.float32)
    clip_params = _host_init(lambda k: ImageEncoder(VIT).init(k, images)["params"], 6)
    tower_shapes = jax.eval_shape(VisionTower(VIT).init, jax.random.PRNGKey(0), images)["params"]
    without_proj = {k: v for k, v in clip_params.items() if k != "proj"}
    assert jax.tree.structure(tower_shapes) == jax.tree.structure(without_proj)

    @jax.jit
    def run(images):
        tower, state = VisionTower(VIT, layer=-1).apply(  # tower: [B, P, D]
            {"params": without_proj}, images, capture_intermediates=True
        )
        emb = ImageEncoder(VIT).apply({"params": clip_params}, images)
        return tower, state["intermediates"]["encoder"]["__call__"][0], emb

    tower, (_, hidden), emb = run(images)
    assert len(hidden) == VIT.depth + 1
    last = hidden[-1]  # [B, 1 + P, D], with [CLS]
    np.testing.assert_array_equal(tower, last[:, 1:])
    ln = clip_params["encoder"]["ln_final"]
    x = last[:, 0]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    want = (x * ln["scale"] + ln["bias"]) @ clip_params["proj"]["kernel"]
    np.testing.assert_allclose(emb, want, rtol=1e-4, atol=1e-4)


def test_llava_lora_targets_only_decoder_and_zero_b_is_identity(llava_params):
    capable = lora_capable_paths(llava_params)
    layers = ["attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down"]
    want = sorted(f"decoder/blocks/{layer}" for layer in layers)  # scanned: all layers at once
    assert sorted(capable) == want  # not the vision tower, projector, embeddings or lm_head
    assert sorted(select_targets(llava_params, LLAVA_LORA_TARGETS)) == want
    unrolled = jax.eval_shape(lambda k: init_llava(UNROLLED_LLAVA, k), jax.random.PRNGKey(0))
    per_layer = sorted(f"decoder/block_{i}/{layer}" for i in range(DEC.depth) for layer in layers)
    assert sorted(select_targets(unrolled, LLAVA_LORA_TARGETS)) == per_layer
    with pytest.raises(ConfigError, match="matches no LoRA-capable layer"):
        select_targets(llava_params, [r"^vision_tower/"])
    dual = jax.eval_shape(lambda k: init_backbone(VIT, k), jax.random.PRNGKey(0))
    assert len(lora_capable_paths(dual)) == 2 * 2 * 6  # dual encoder unchanged: towers x blocks

    zero_b = jax.jit(lambda k: init_adapter_params(llava_params, want, rank=2, rng=k))(
        jax.random.PRNGKey(7)
    )
    assert all(np.all(x == 0) for x in jax.tree.leaves(zero_b) if x.shape[-1] == 2)  # B: [out, r]
    random_b = jax.tree.map(lambda x: x + 0.1, zero_b)
    images = jnp.asarray(np.random.default_rng(8).random((2, 8, 8, 3)), jnp.float32)
    ids, mask = _left_pad([[1, IMAGE_ID, 9, 10], [IMAGE_ID, 12]], 4)
    forward = jax.jit(
        lambda lora, weights: Llava(LLAVA).apply(
            {"params": llava_params, "lora": lora}, images, ids, mask, weights
        )
    )
    lora = stack_params([zero_b, random_b])
    base = forward(lora, jnp.array([0.0, 0.0]))
    np.testing.assert_allclose(forward(lora, jnp.array([4.0, 0.0])), base, atol=1e-6)
    assert np.abs(forward(lora, jnp.array([0.0, 1.0])) - base).max() > 1e-3

    # llava_generate's first step is the last position of the LLaVA forward.
    out = llava_generate(
        Llava(LLAVA), {"params": llava_params, "lora": lora}, images, ids, mask,
        jnp.array([0.0, 1.0]), max_new_tokens=2,
    )  # fmt: skip
    np.testing.assert_allclose(
        out.logits[:, 0], forward(lora, jnp.array([0.0, 1.0]))[:, -1], rtol=1e-4, atol=1e-4
    )


def test_scanned_decoder_equals_unrolled_with_adapters_and_gradients():
    """One set of weights in both layouts (``scan_blocks``): same logits through the frozen
    stack and the trained adapter, same loss, and the same adapter gradients once the scanned
    ones are split per layer; remat inside the scan changes nothing."""
    params = _host_init(lambda key: init_llava(UNROLLED_LLAVA, key), 2)
    targets = select_targets(params, LLAVA_LORA_TARGETS)
    shift = lambda tree, v: jax.tree.map(lambda x: x + v, tree)
    stack = stack_params(
        [
            shift(init_adapter_params(params, targets, 2, jax.random.PRNGKey(s)), 0.03)
            for s in (1, 2)
        ]
    )
    active = shift(init_adapter_params(params, targets, 2, jax.random.PRNGKey(3)), -0.02)
    images = jnp.asarray(np.random.default_rng(4).random((2, 8, 8, 3)), jnp.float32)
    ids, mask = _right_pad([[1, IMAGE_ID, 9, 10, 11], [1, IMAGE_ID, 12]], 5)

    def loss_and_grad(config, params, stack, active, remat=False):
        def loss(active):
            weight = jnp.broadcast_to(0.5, jax.tree.leaves(active)[0].shape[:-2])
            with_weight = jax.tree.map(
                lambda layer: {**layer, "weight": weight}, active,
                is_leaf=lambda x: isinstance(x, dict) and "lora_a" in x,
            )  # fmt: skip
            logits = Llava(config, remat=remat).apply(
                {"params": params, "lora": stack, "lora_active": with_weight},
                images, ids, mask, jnp.array([1.0, 0.5]),
            )  # fmt: skip
            return jnp.mean(jax.nn.log_softmax(logits)[..., 7]), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(active)

    (loss_u, logits_u), grad_u = loss_and_grad(UNROLLED_LLAVA, params, stack, active)
    scanned = (scan_blocks(params), scan_blocks(stack, axis=1), scan_blocks(active))
    assert jax.tree.structure(scanned[0]) == jax.tree.structure(
        jax.eval_shape(lambda k: init_llava(LLAVA, k), jax.random.PRNGKey(0))
    )
    for remat in (False, True):
        (loss_s, logits_s), grad_s = loss_and_grad(LLAVA, *scanned, remat=remat)
        np.testing.assert_allclose(logits_s, logits_u, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
        chex.assert_trees_all_close(unscan_blocks(grad_s), grad_u, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_u)) > 0
    # The layouts convert both ways without loss.
    chex.assert_trees_all_equal(unscan_blocks(scan_blocks(stack, axis=1), axis=1), stack)


def test_one_seed_gives_the_same_weights_and_adapters_in_both_layouts():
    """``decoder.scan_layers`` is a layout, not a seed: random init and fresh adapters are the
    unrolled layout's draws, stacked (depth 11 puts block_10 before block_2 in tree order)."""
    config = dataclasses.replace(LLAVA, decoder=dataclasses.replace(DEC, depth=11))
    unrolled = dataclasses.replace(
        config, decoder=dataclasses.replace(config.decoder, scan_layers=False)
    )
    scanned_params = init_llava(config, jax.random.PRNGKey(4))
    unrolled_params = init_llava(unrolled, jax.random.PRNGKey(4))
    chex.assert_trees_all_equal(scanned_params, scan_blocks(unrolled_params))
    chex.assert_trees_all_equal(
        init_decoder(config.decoder, jax.random.PRNGKey(5)),
        scan_blocks({"decoder": init_decoder(unrolled.decoder, jax.random.PRNGKey(5))})["decoder"],
    )
    adapter = lambda params: init_adapter_params(
        params, select_targets(params, LLAVA_LORA_TARGETS), 2, jax.random.PRNGKey(6)
    )
    chex.assert_trees_all_equal(adapter(scanned_params), scan_blocks(adapter(unrolled_params)))


def test_mistral_7b_lora_parameter_count():
    """Shapes only (jax.eval_shape): no weights are allocated."""
    config = LlavaConfig.llava_med_v15()
    shapes = jax.eval_shape(lambda k: init_llava(config, k), jax.random.PRNGKey(0))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    assert count(shapes["decoder"]) == 7_241_732_096  # Mistral-7B
    targets = select_targets(shapes, LLAVA_LORA_TARGETS)
    assert len(targets) == 7  # scanned: each projection of all 32 layers in one [32, ...] leaf
    adapter = jax.eval_shape(
        lambda k: init_adapter_params(shapes, targets, rank=64, rng=k), jax.random.PRNGKey(0)
    )
    assert count(adapter) == 167_772_160
    unrolled = dataclasses.replace(
        config, decoder=dataclasses.replace(config.decoder, scan_layers=False)
    )
    shapes = jax.eval_shape(lambda k: init_llava(unrolled, k), jax.random.PRNGKey(0))
    targets = select_targets(shapes, LLAVA_LORA_TARGETS)
    assert len(targets) == 7 * 32
    adapter = jax.eval_shape(
        lambda k: init_adapter_params(shapes, targets, rank=64, rng=k), jax.random.PRNGKey(0)
    )
    assert count(adapter) == 167_772_160


def test_remat_keeps_parameters_values_and_lora_gradients(llava_params):
    """``remat`` only changes what the backward pass stores, never names or numbers."""
    targets = select_targets(llava_params, LLAVA_LORA_TARGETS)
    adapter = jax.tree.map(
        lambda x: x + 0.05, init_adapter_params(llava_params, targets, 2, jax.random.PRNGKey(3))
    )
    images = jnp.asarray(np.random.default_rng(9).random((2, 8, 8, 3)), jnp.float32)
    ids, mask = _right_pad([[1, IMAGE_ID, 9, 10, 11], [1, IMAGE_ID, 12]], 5)

    def loss_and_grad(remat, query_chunk=0):
        model = Llava(LLAVA, remat=remat, query_chunk=query_chunk)
        assert jax.tree.structure(
            jax.eval_shape(lambda k: model.init(k, images, ids, mask)["params"], jax.random.key(0))
        ) == jax.tree.structure(llava_params)

        def loss(lora):
            logits = model.apply(
                {"params": llava_params, "lora": stack_params([lora])},
                images, ids, mask, jnp.ones(1), False,
            )  # fmt: skip
            return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

        return jax.jit(jax.value_and_grad(loss))(adapter)

    (loss_plain, grad_plain), (loss_remat, grad_remat) = loss_and_grad(False), loss_and_grad(True)
    np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
    chex.assert_trees_all_close(grad_remat, grad_plain, rtol=1e-5, atol=1e-7)
    # Attention in query chunks (inside the rematerialized blocks) changes nothing either.
    loss_chunked, grad_chunked = loss_and_grad(True, query_chunk=3)
    np.testing.assert_allclose(loss_chunked, loss_plain, rtol=1e-6)
    chex.assert_trees_all_close(grad_chunked, grad_plain, rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_plain)) > 0


def test_chunked_attention_equals_full_attention_values_and_gradients():
    """``attend`` in query chunks (padded to a multiple) gives the same outputs and gradients."""
    from mslora_jax.models.attention import attend

    rng = np.random.default_rng(0)
    b, length, kv, groups, dh = 2, 11, 2, 2, 8
    q = jnp.asarray(rng.standard_normal((b, length, kv, groups, dh)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, length, kv, dh)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, length, kv, dh)), jnp.float32)
    causal = np.tril(np.ones((length, length), bool))
    keep = rng.random((b, 1, length)) > 0.2
    visible = jnp.asarray(causal[None] & keep | np.eye(length, dtype=bool))

    def loss(q, k, v, chunk):
        return jnp.sum(jnp.sin(attend(q, k, v, visible, chunk)))

    full = attend(q, k, v, visible)
    grads_full = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, 0)
    for chunk in (4, 5, 11):
        np.testing.assert_allclose(attend(q, k, v, visible, chunk), full, rtol=1e-6, atol=1e-6)
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, chunk)
        for g, g_full in zip(grads, grads_full):
            np.testing.assert_allclose(g, g_full, rtol=1e-5, atol=1e-6)


def _full_answer_loss(logits, input_ids, loss_mask):
    """The cross-entropy over every position's logits, masked (what the answer loss avoids)."""
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = jnp.clip(input_ids[:, 1:], 0, logits.shape[-1] - 1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_answer_only_loss_equals_the_full_loss(chunk):
    """Logits at the answer positions only (sorted to the front, in chunks, empty chunks
    skipped) give the masked full cross-entropy, in value and in gradients."""
    from mslora_jax.losses.answer import answer_cross_entropy

    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 11, 8)), jnp.float32)
    head_w = jnp.asarray(rng.normal(size=(8, 13)), jnp.float32)
    ids = jnp.asarray(rng.integers(-1, 13, size=(3, 11)), jnp.int32)  # -1: a sentinel id
    mask = np.zeros((3, 11), bool)
    mask[0, 4:7], mask[1, 9:], mask[1, 2] = True, True, True  # row 2 has no answer
    mask = jnp.asarray(mask)

    def answer(hidden, w):
        return answer_cross_entropy(lambda h: h @ w, hidden, ids, mask, chunk)

    def full(hidden, w):
        return _full_answer_loss(hidden @ w, ids, mask)

    value, grads = jax.value_and_grad(answer, argnums=(0, 1))(hidden, head_w)
    ref, ref_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, head_w)
    np.testing.assert_allclose(value, ref, rtol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
    empty = answer_cross_entropy(lambda h: h @ head_w, hidden, ids, jnp.zeros_like(mask), chunk)
    assert float(empty) == 0.0


def test_llava_answer_loss_and_last_position_logits(llava_params):
    """The training loss of LLaVA (answer positions only) equals the full-logit loss, and a
    decoder asked for logits at some positions returns those of the full forward."""
    from mslora_jax.families.llava.experiment import answer_loss

    model = Llava(LLAVA)
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    ids = jnp.asarray([[1, IMAGE_ID, 7, 8, 9, 10, 0, 0], [IMAGE_ID, 3, 4, 11, 12, 13, 14, 2]])
    attention = ids != 0
    loss_mask = jnp.asarray([[0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]], bool)
    variables = {"params": llava_params}
    batch = {"image": images, "input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}
    got = answer_loss(model, variables, batch, None, jax.random.PRNGKey(0), True)
    inputs = model.apply(variables, images, ids, attention, loss_mask, method=Llava.prepare_inputs)
    logits = model.apply(variables, inputs, method=Llava.forward_spliced)
    want = _full_answer_loss(logits, inputs.input_ids, inputs.loss_mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    decoder = Decoder(DEC)
    dec_vars = {"params": llava_params["decoder"]}
    positions = positions_from_mask(inputs.attention_mask)
    at = jnp.asarray([[5, 0], [10, 3]])
    picked, _ = decoder.apply(
        dec_vars, inputs.embeds, positions, inputs.attention_mask, logits_at=at
    )
    full_logits, _ = decoder.apply(dec_vars, inputs.embeds, positions, inputs.attention_mask)
    np.testing.assert_allclose(
        picked, jnp.take_along_axis(full_logits, at[..., None], axis=1), rtol=1e-5, atol=1e-6
    )
