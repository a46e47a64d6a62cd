"""Batched greedy generation for ``models.decoder.Decoder`` (and LLaVA) with a KV cache.

``greedy_generate`` is one jit-compiled program per (model, prompt shape, max_new_tokens,
number of stop ids): a prefill writes the whole prompt into the cache, then a
``lax.while_loop`` decodes one token per step for every row (rows that stopped keep running
but their outputs are padded) and exits early once all rows stopped.
``greedy_generate_uncached`` is the slow reference that recomputes the whole sequence every
step.

Prompts are given as embeddings (``Decoder.embed`` of ids, or LLaVA's spliced inputs) with an
``attention_mask``; left padding is the usual layout, but right padding works too: each row
continues from the slot after its own last real token (the cache keeps a per-row index).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mslora_jax.errors import ConfigError
from mslora_jax.models.decoder import Decoder, positions_from_mask
from mslora_jax.models.kv_cache import init_cache
from mslora_jax.models.llava import Llava, check_image_tokens, decoder_variables


class Generation(NamedTuple):
    tokens: jax.Array  # [B, N] int32; pad_id after each row's stop token
    logits: jax.Array  # [B, N, V] float32; the logits each token was chosen from, 0 after stop
    lengths: jax.Array  # [B] int32; tokens generated per row, its stop token included


def _num_steps(prompt_len: int, max_new_tokens: int, max_len: int | None, decoder: Decoder):
    """How many tokens fit: at most ``max_new_tokens`` and prompt + generated <= ``max_len``."""
    model_max = decoder.config.max_len
    max_len = model_max if max_len is None else max_len
    if max_len > model_max:
        raise ConfigError(f"generation max_len={max_len} is over decoder.max_len={model_max}")
    steps = min(max_new_tokens, max_len - prompt_len)
    if steps < 1:
        raise ConfigError(
            f"no room to generate: prompt of {prompt_len} tokens, max_len={max_len}, "
            f"max_new_tokens={max_new_tokens}"
        )
    return steps


def _last_real(attention_mask: jax.Array) -> jax.Array:
    """``[B]``: one past the slot of each row's last real token."""
    slots = jnp.arange(1, attention_mask.shape[1] + 1)
    return jnp.max(jnp.where(attention_mask, slots, 0), axis=1)


@functools.partial(
    jax.jit, static_argnames=("decoder", "max_new_tokens", "max_len", "pad_id", "return_logits")
)
def greedy_generate(
    decoder: Decoder,
    variables: Mapping,
    prompt_embeds: jax.Array,
    attention_mask: jax.Array,
    task_weights: jax.Array | None = None,
    *,
    max_new_tokens: int,
    stop_ids: jax.Array | Sequence[int] = (),
    max_len: int | None = None,
    pad_id: int = 0,
    return_logits: bool = True,
) -> Generation:
    """Greedy decoding of ``prompt_embeds`` ``[B, L, D]`` (``attention_mask`` ``[B, L]``).

    ``variables``: the decoder's ``{"params": ..., "lora": ...}``; ``task_weights`` ``[T]``
    selects the adapters. Generates at most ``max_new_tokens`` and at most ``max_len - L``
    (default ``decoder.config.max_len``) tokens per row; a row stops after emitting any of
    ``stop_ids`` (an int array ``[S]``: data, so other stop ids of the same count reuse the
    compiled program). Outputs are ``[B, max_new_tokens]``, padded with ``pad_id``;
    ``return_logits=False`` keeps ``logits`` empty (``[B, N, 0]``), e.g. for a 32k vocabulary.
    """
    batch, prompt_len = attention_mask.shape
    steps = _num_steps(prompt_len, max_new_tokens, max_len, decoder)
    attention_mask = attention_mask.astype(bool)
    stops = jnp.asarray(stop_ids, jnp.int32).reshape(-1)  # [S]

    def embed(ids):  # [B, 1] -> [B, 1, D]
        return decoder.apply(variables, ids, method=Decoder.embed).astype(prompt_embeds.dtype)

    # Prefill: the prompt fills slots [0, L); the last generated token is never written back.
    cache = init_cache(decoder.config, batch, prompt_len + steps - 1, prompt_embeds.dtype)
    positions = positions_from_mask(attention_mask)
    last = _last_real(attention_mask)
    # Logits at each row's last real token only: lm_head never runs over the whole prompt.
    logits, cache = decoder.apply(
        variables,
        prompt_embeds,
        positions,
        attention_mask,
        task_weights,
        cache,
        logits_at=jnp.maximum(last - 1, 0)[:, None],
    )
    first = logits[:, 0].astype(jnp.float32)  # [B, V]
    cache = cache.replace(index=last)  # right padding: continue after the last real token

    token = jnp.argmax(first, axis=-1).astype(jnp.int32)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    kept = first.shape[-1] if return_logits else 0  # vocabulary entries kept per step
    all_logits = jnp.zeros((batch, max_new_tokens, kept), jnp.float32)
    all_logits = all_logits.at[:, 0].set(first[:, :kept])
    done = jnp.isin(token, stops)
    state = (
        jnp.int32(1),  # step
        cache,
        token,  # [B] last token
        done,  # [B] bool
        jnp.sum(attention_mask, axis=1).astype(jnp.int32),  # [B] position of the next token
        tokens,
        all_logits,
        jnp.ones((batch,), jnp.int32),  # lengths
    )

    def cond(state):
        step, done = state[0], state[3]
        return (step < steps) & ~jnp.all(done)

    def body(state):
        step, cache, token, done, pos, tokens, all_logits, lengths = state
        logits, cache = decoder.apply(
            variables,
            embed(token[:, None]),
            pos[:, None],
            jnp.ones((batch, 1), bool),
            task_weights,
            cache,
        )
        logits = jnp.where(done[:, None], 0.0, logits[:, 0].astype(jnp.float32))
        token = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        all_logits = jax.lax.dynamic_update_slice(all_logits, logits[:, None, :kept], (0, step, 0))
        lengths = lengths + ~done
        done = done | jnp.isin(token, stops)
        return step + 1, cache, token, done, pos + 1, tokens, all_logits, lengths

    state = jax.lax.while_loop(cond, body, state)
    return Generation(tokens=state[5], logits=state[6], lengths=state[7])


class _ReferenceState(NamedTuple):
    embeds: jax.Array  # [B, L + steps, D]; columns after the generated tokens are zeros
    mask: jax.Array  # [B, L + steps] bool; False on padding and not-yet-generated columns
    read: jax.Array  # [B] the column whose logits give the next token
    done: jax.Array  # [B] bool
    tokens: jax.Array  # [B, N]
    logits: jax.Array  # [B, N, V]
    lengths: jax.Array  # [B]


@functools.partial(jax.jit, static_argnames=("decoder", "pad_id"))
def _reference_step(decoder, variables, task_weights, stops, state, step, pad_id):
    """One uncached step: the full forward over the whole buffer, then append the argmax."""
    s = state
    logits, _ = decoder.apply(
        variables, s.embeds, positions_from_mask(s.mask), s.mask, task_weights
    )  # [B, L + steps, V]
    logits = jnp.take_along_axis(logits.astype(jnp.float32), s.read[:, None, None], axis=1)[:, 0]
    logits = jnp.where(s.done[:, None], 0.0, logits)
    token = jnp.where(s.done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    column = s.embeds.shape[1] - s.tokens.shape[1] + step  # L + step (N = steps here)
    new = decoder.apply(variables, token[:, None], method=Decoder.embed)[:, 0]
    return _ReferenceState(
        embeds=s.embeds.at[:, column].set(new.astype(s.embeds.dtype)),
        mask=s.mask.at[:, column].set(True),
        read=jnp.full_like(s.read, column),
        done=s.done | jnp.isin(token, stops),
        tokens=s.tokens.at[:, step].set(token),
        logits=s.logits.at[:, step].set(logits),
        lengths=s.lengths + ~s.done,
    )


def greedy_generate_uncached(
    decoder: Decoder,
    variables: Mapping,
    prompt_embeds: jax.Array,
    attention_mask: jax.Array,
    task_weights: jax.Array | None = None,
    *,
    max_new_tokens: int,
    stop_ids: jax.Array | Sequence[int] = (),
    max_len: int | None = None,
    pad_id: int = 0,
) -> Generation:
    """Reference for ``greedy_generate``: recomputes the full sequence at every step (slow).

    The sequence lives in a buffer of ``L + steps`` columns whose not-yet-generated columns are
    masked out (causal attention never sees them anyway), so each step has the same shapes and
    the step compiles once.
    """
    batch, prompt_len = attention_mask.shape
    steps = _num_steps(prompt_len, max_new_tokens, max_len, decoder)
    mask = jnp.pad(jnp.asarray(attention_mask, bool), ((0, 0), (0, steps)))
    state = _ReferenceState(
        embeds=jnp.pad(prompt_embeds, ((0, 0), (0, steps), (0, 0))),
        mask=mask,
        # Step 0 reads the prompt's last real token (not column L - 1 if right-padded).
        read=jnp.maximum(_last_real(mask) - 1, 0),
        done=jnp.zeros((batch,), bool),
        tokens=jnp.full((batch, steps), pad_id, jnp.int32),
        logits=jnp.zeros((batch, steps, decoder.config.vocab_size), jnp.float32),
        lengths=jnp.zeros((batch,), jnp.int32),
    )
    stops = jnp.asarray(stop_ids, jnp.int32).reshape(-1)
    for step in range(steps):
        state = _reference_step(decoder, variables, task_weights, stops, state, step, pad_id)
    fill = ((0, 0), (0, max_new_tokens - steps))
    return Generation(
        tokens=jnp.pad(state.tokens, fill, constant_values=pad_id),
        logits=jnp.pad(state.logits, fill + ((0, 0),)),
        lengths=state.lengths,
    )


def llava_generate(
    model: Llava,
    variables: Mapping,
    images: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    task_weights: jax.Array | None = None,
    *,
    max_new_tokens: int,
    stop_ids: jax.Array | Sequence[int] = (),
    max_len: int | None = None,
    pad_id: int = 0,
    return_logits: bool = True,
) -> Generation:
    """Greedy answers for (left-padded) LLaVA prompts: splice the images in, then generate.

    Concrete ``input_ids`` are checked for exactly one ``<image>`` per row before compiling.
    """
    if not isinstance(input_ids, jax.core.Tracer):
        check_image_tokens(input_ids, model.config.image_token_id)
    return _llava_generate(
        model,
        variables,
        images,
        input_ids,
        attention_mask,
        task_weights,
        jnp.asarray(stop_ids, jnp.int32).reshape(-1),
        max_new_tokens=max_new_tokens,
        max_len=max_len,
        pad_id=pad_id,
        return_logits=return_logits,
    )


@functools.partial(
    jax.jit,
    static_argnames=("model", "max_new_tokens", "max_len", "pad_id", "return_logits"),
)
def _llava_generate(
    model: Llava,
    variables: Mapping,
    images: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    task_weights: jax.Array | None,
    stop_ids: jax.Array,
    *,
    max_new_tokens: int,
    max_len: int | None,
    pad_id: int,
    return_logits: bool,
) -> Generation:
    inputs = model.apply(variables, images, input_ids, attention_mask, method=Llava.prepare_inputs)
    return greedy_generate(
        Decoder(model.config.decoder, query_chunk=model.query_chunk),
        decoder_variables(dict(variables)),
        inputs.embeds,
        inputs.attention_mask,
        task_weights,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        max_len=max_len,
        pad_id=pad_id,
        return_logits=return_logits,
    )
